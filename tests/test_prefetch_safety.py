"""Training beside TorchRL's prefetch threads (issue 28, item 1).

With ``prefetch=k`` a ``TensorDictReplayBuffer`` samples in background threads while the main thread
trains; LaBER scores each large batch there with the loss's networks. Scoring must leave the user's
modules alone: if it swaps parameters into them (``params.to_module(module)``), the main thread's
forward runs, now and then, with the scorer's tensors (no gradient, or the target network's), and an
update raises or silently leaves a parameter without its gradient. Each loss trains for 200 updates in
the main thread with ``prefetch=3``; the control is the same loop without prefetch.
"""

import pytest
import torch
from torchrl.data import LazyTensorStorage, TensorDictReplayBuffer

from tests.setups import CONTINUOUS, LOSSES, batch, total_loss
from torchsample import LaBER, LaBERLoss, LaBERSampler

UPDATES, B, M = 200, 16, 4


def train(name: str, prefetch: int) -> tuple[int, int]:
    """``(updates that raised, updates where a parameter that needs a gradient got none)``."""
    torch.manual_seed(0)
    loss = LOSSES[name]()
    rb = TensorDictReplayBuffer(
        storage=LazyTensorStorage(1000),
        sampler=LaBERSampler(LaBER(loss, B), m=M),
        batch_size=B,
        prefetch=prefetch or None,
    )
    rb.extend(batch(1000, continuous=CONTINUOUS[name]))
    objective = LaBERLoss(loss)
    params = [p for p in loss.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-3)
    raised = lost = 0
    for _ in range(UPDATES):
        sample = rb.sample()
        optimizer.zero_grad(set_to_none=True)
        try:
            out = objective(sample)
            total_loss(out).backward()
        except RuntimeError:
            raised += 1
            continue
        # Every parameter of the networks the objective trains gets a gradient: the critic's, and for SAC/TD3
        # the actor's (and SAC's temperature); the target networks' copies are not parameters of the update.
        trained = [p for p in params if p.grad is not None]
        lost += len(trained) < expected_trained(loss, name)
        optimizer.step()
    return raised, lost


def expected_trained(loss, name: str) -> int:
    """How many parameters the objective gives a gradient, counted on one update without any thread around."""
    if name not in _EXPECTED:
        torch.manual_seed(1)
        objective = LaBERLoss(loss)
        out = objective(LaBER(loss, B)(batch(M * B, continuous=CONTINUOUS[name])))
        total_loss(out).backward()
        _EXPECTED[name] = sum(p.grad is not None for p in loss.parameters() if p.requires_grad)
        loss.zero_grad(set_to_none=True)
    return _EXPECTED[name]


_EXPECTED: dict[str, int] = {}


@pytest.mark.parametrize("name", ["dqn", "c51", "sac", "td3"])
def test_training_beside_prefetch_threads_loses_no_gradient(name):
    assert train(name, prefetch=0) == (0, 0), "the control loop itself fails"
    assert train(name, prefetch=3) == (0, 0)


@pytest.mark.parametrize("name", ["dqn", "c51", "sac", "td3"])
def test_scoring_sets_no_process_wide_mode(name, monkeypatch):
    """tensordict keeps the exploration mode (``set_exploration_type``) and the log-prob aggregation
    (``set_composite_lp_aggregate``) process-wide, not per thread: entered from a prefetch thread they would
    switch the mode of the collector or the evaluation running in the main thread (TorchRL's SAC target
    enters both). LaBER's scoring enters neither."""
    from tensordict.nn.probabilistic import set_interaction_type
    from tensordict.nn.utils import set_composite_lp_aggregate

    entered = []
    for cls in (set_interaction_type, set_composite_lp_aggregate):
        enter = cls.__enter__
        monkeypatch.setattr(cls, "__enter__", lambda self, enter=enter, cls=cls: (entered.append(cls), enter(self))[1])
    loss = LOSSES[name]()
    laber = LaBER(loss, B)
    laber.selection(batch(M * B, continuous=CONTINUOUS[name]))
    assert entered == []
