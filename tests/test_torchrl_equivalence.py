"""On plain rows LaBER's update is TorchRL's own (issue 31, item 4).

``LaBERLoss`` (and ``C51Loss``) compute the critic losses themselves: the paper's estimator ``mean(w l)``
and the per-critic columns of ``[B, 1 + C]`` batches need the per-sample losses, which TorchRL's losses
reduce inside ``forward``. Each such copy is held here to TorchRL's own module on the same rows, losses
and gradients: without weights (the paper's estimator is then the mean TorchRL takes) and, where TorchRL
weights rows, with ``"priority_weight"`` under ``estimator="self_normalized"`` (TorchRL's
``sum(w l) / sum(w)``). TD3's is ``tests/test_td3_update.py``.
"""

import pytest
import torch
from torchrl.objectives import DistributionalDQNLoss

from tests.setups import batch, c51_loss, dqn_loss, sac_loss
from torchsample import LaBERLoss


def _leaves(loss):
    return [p for p in loss.parameters() if p.requires_grad]


def _assert_same_update(ours: dict, theirs: dict, keys, leaves):
    for key in keys:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6)
    mine = torch.autograd.grad(sum(ours[k] for k in keys), leaves, allow_unused=True)
    reference = torch.autograd.grad(sum(theirs[k] for k in keys), leaves, allow_unused=True)
    for a, b in zip(mine, reference):
        if b is None:
            assert a is None or not a.any()
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss_function", ["l2", "smooth_l1"])
@pytest.mark.parametrize("double_dqn", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_dqn(loss_function, double_dqn, weighted):
    loss = dqn_loss(loss_function, double_dqn=double_dqn)
    with torch.no_grad():  # a target network that differs from the online one
        for p in loss.target_value_network_params.values(True, True):
            p.add_(0.1 * torch.randn_like(p))
    rows = batch(32, seed=3)
    if weighted:
        rows["priority_weight"] = torch.rand(32) + 0.1
    ours = LaBERLoss(loss, estimator="self_normalized" if weighted else "paper")(rows.clone())
    theirs = loss(rows.clone())
    _assert_same_update(ours, theirs, ["loss"], _leaves(loss))


def test_c51_is_torchrls_distributional_dqn():
    """``C51Loss`` (no ``.item()``, so no graph break, and the projected target kept for LaBER) gives what
    TorchRL's ``DistributionalDQNLoss.forward`` gives on the same module and rows."""
    loss = c51_loss()
    with torch.no_grad():
        for p in loss.target_value_network_params.values(True, True):
            p.add_(0.1 * torch.randn_like(p))
    rows = batch(32, seed=4)
    ours = LaBERLoss(loss)(rows.clone())
    theirs = DistributionalDQNLoss.forward(loss, rows.clone())
    _assert_same_update(ours, theirs, ["loss"], _leaves(loss))


def test_sac():
    """The same random state: the target's next action and the actor's action are drawn in the same order."""
    loss = sac_loss()
    with torch.no_grad():
        for p in loss.target_qvalue_network_params.values(True, True):
            p.add_(0.1 * torch.randn_like(p))
    rows = batch(32, continuous=True, seed=5)
    torch.manual_seed(7)
    ours = LaBERLoss(loss)(rows.clone())
    torch.manual_seed(7)
    theirs = loss(rows.clone())
    assert set(ours.keys()) == set(theirs.keys())
    for key in ("alpha", "entropy"):
        torch.testing.assert_close(ours[key], theirs[key])
    _assert_same_update(ours, theirs, ["loss_qvalue", "loss_actor", "loss_alpha"], _leaves(loss))
