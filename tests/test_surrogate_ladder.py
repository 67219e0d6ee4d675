"""The surrogate ladder, ``surrogate="output" | "last-layer" | "exact"``.

Each rung equals ``torch.func``'s per-sample gradient norm of the per-sample TD loss over its
parameters (the output, the last linear layer's weight and bias, every parameter), row by row, for
DQN (an MLP and the MinAtar conv net), C51 and the SAC/TD3 critics; the reference is written with
TorchRL's modules directly (tests/test_gradnorms.py's helpers), not through torchsample.critics.
LaBER at each rung draws in proportion to that rung's scores, with weights ``mean(p) / p``. A last
layer without bias has the last-layer rung ``||g|| ||h||`` (issue 21: it was ``||g|| sqrt(||h||^2 + 1)``
whatever the layer, and could exceed ``"exact"``).
"""

import pytest
import torch
from torch import nn
from torchrl.modules import MLP, QValueActor
from torchrl.objectives import DQNLoss
from torchrl.objectives.utils import distance_loss

from tests.setups import ACTIONS, OBS, batch, c51_loss, dqn_loss, sac_loss, td3_loss
from tests.test_gradnorms import (
    assert_rows_close,
    c51_prediction,
    critic_prediction,
    dqn_prediction,
    last_layer_keys,
    minatar_net,
    norms_of,
)
from tests.test_ops import ALPHA, chi_square_pvalue
from torchsample import SURROGATES, LaBER, LaBERSampler, grad_norm_scores
from torchsample.gradnorms import per_sample_grads
from torchsample.views import critic_of

N = 24
DRAWS = 20_000


def minatar_dqn_loss():
    """agents/dqn.py's MinAtar network shape (Conv2d 3x3 -> Linear -> Linear) in TorchRL's DQNLoss."""
    actor = QValueActor(minatar_net(), in_keys=["observation"], action_space="categorical")
    loss = DQNLoss(actor, loss_function="l2", delay_value=True, action_space="categorical")
    loss.make_value_estimator(gamma=0.9)
    return loss


def dqn_loss_without_bias():
    """A DQN whose last layer has no bias: the last-layer rung is ||g|| ||h||."""
    net = MLP(in_features=OBS, out_features=ACTIONS, num_cells=[16], activation_class=nn.ReLU, bias_last_layer=False)
    loss = DQNLoss(
        QValueActor(net, in_keys=["observation"], action_space="categorical"),
        loss_function="l2",
        delay_value=True,
        action_space="categorical",
    )
    loss.make_value_estimator(gamma=0.9)
    return loss


FAMILIES = {
    "dqn-l2": lambda: dqn_loss("l2"),
    "dqn-no-bias": dqn_loss_without_bias,
    "double-dqn-huber": lambda: dqn_loss("smooth_l1", double_dqn=True),
    "dqn-minatar": minatar_dqn_loss,
    "c51": c51_loss,
    "sac": sac_loss,
    "td3": td3_loss,
}


def data(name: str, n: int, seed: int = 0):
    td = batch(n, continuous=name in ("sac", "td3"), seed=seed)
    td["next", "reward"] *= 3  # some |TD| above Huber's threshold
    if name == "dqn-minatar":
        g = torch.Generator().manual_seed(seed)
        td["observation"] = (torch.rand(n, 4, 10, 10, generator=g) < 0.3).float()
        td["next", "observation"] = (torch.rand(n, 4, 10, 10, generator=g) < 0.3).float()
    return td


def reference_critics(name: str, loss):
    """``(network, params, prediction(params, td), per-sample loss(pred, target))`` of each critic."""
    if name in ("sac", "td3"):
        return [
            (
                loss.qvalue_network,
                loss.qvalue_network_params[c],
                lambda p, td: critic_prediction(loss, p, td),
                lambda q, y: distance_loss(q, y, loss.loss_function),
            )
            for c in range(loss.num_qvalue_nets)
        ]
    if name == "c51":
        return [
            (
                loss.value_network,
                loss.value_network_params,
                lambda p, td: c51_prediction(loss, p, td),
                lambda log_p, m: -(m * log_p).sum(-1),
            )
        ]
    return [
        (
            loss.value_network,
            loss.value_network_params,
            lambda p, td: dqn_prediction(loss, p, td),
            lambda q, y: distance_loss(q, y, loss.loss_function),
        )
    ]


def reference_norms(name: str, loss, td, target) -> dict:
    """Each rung by torch.func / autograd: ``{rung: [N] or [C, N]}``."""
    out = {rung: [] for rung in SURROGATES}
    for network, params, predict, per_sample in reference_critics(name, loss):
        grads = per_sample_grads(lambda p, td, y: per_sample(predict(p, td), y), params, td, target)
        out["exact"].append(norms_of(grads, list(grads.keys(True, True))))
        out["last-layer"].append(norms_of(grads, last_layer_keys(network)))
        pred = predict(params, td).detach().requires_grad_()
        # C51's output is the logits z, whose log-softmax the critic predicts (the same up to a constant
        # per row): the loss as a function of z.
        at_output = per_sample(pred.log_softmax(-1), target) if name == "c51" else per_sample(pred, target)
        (g,) = torch.autograd.grad(at_output.sum(), pred)
        out["output"].append(g.abs() if g.dim() == 1 else g.norm(dim=-1))
    return {rung: torch.stack(v) if len(v) > 1 else v[0] for rung, v in out.items()}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_each_rung_is_the_per_sample_gradient_norm_over_its_parameters(name):
    loss = FAMILIES[name]()
    td = data(name, N)
    target = critic_of(loss).target(td)  # SAC's and TD3's are random: one for all rungs
    expected = reference_norms(name, loss, td, target)
    with torch.no_grad():  # LaBER scores under no_grad: "exact" enables grad itself
        scores = {rung: grad_norm_scores(loss, td, rung, target=target) for rung in SURROGATES}
    for rung in SURROGATES:
        assert_rows_close(scores[rung], expected[rung])
        assert not scores[rung].requires_grad
    # The rungs differ: the last layer adds the features' norm (with a bias: without one the output
    # gradient is no parameter's gradient), the other layers add more.
    if critic_of(loss).last_layer_bias:
        assert (scores["output"] < scores["last-layer"]).all()
    assert (scores["last-layer"] <= scores["exact"] * (1 + 1e-5)).all()
    assert (scores["last-layer"] < scores["exact"] * 0.999).any()
    assert_rows_close(grad_norm_scores(loss, td, "exact", target=target, method="vmap"), expected["exact"])


def selection_case(name: str, rung: str, critics: str = "independent"):
    """A loss whose target is deterministic (TD3 without smoothing noise), its rung's scores and one
    LaBER selection of DRAWS rows from N = 64 (eps = 0: the weights are then scale-free)."""
    loss = FAMILIES[name]()
    if name == "td3":
        loss.policy_noise = 0.0
    large = data(name, 64, seed=1)
    scores = grad_norm_scores(loss, large, rung)
    laber = LaBER(
        loss, batch_size=DRAWS, surrogate=rung, critics=critics, eps=0.0, generator=torch.Generator().manual_seed(2)
    )
    return scores, laber.selection(large)


@pytest.mark.parametrize("rung", SURROGATES)
@pytest.mark.parametrize("name", ["dqn-l2", "dqn-no-bias", "dqn-minatar", "c51", "td3"])
def test_laber_draws_each_rung_in_proportion_to_its_scores(name, rung):
    """A chi-square goodness of fit at ALPHA (its tolerance follows from the DRAWS), and the weights
    ``mean(p) / p_i``: LaBER's priorities are the rung's scores."""
    scores, kept = selection_case(name, rung)
    if scores.dim() == 1:
        columns = [(kept.index, kept.weight, scores)]
    else:  # [B, 1 + C]: column 1 + c holds critic c's draws
        columns = [(kept.index[:, 1 + c], kept.weight[:, 1 + c], scores[c]) for c in range(scores.shape[0])]
    for index, weight, p in columns:
        assert chi_square_pvalue(index, p / p.sum()) > ALPHA
        torch.testing.assert_close(weight, p.mean() / p[index], rtol=1e-4, atol=0)


@pytest.mark.parametrize("rung", SURROGATES)
def test_joint_twin_critics_draw_by_the_norm_over_both(rung):
    """``critics="joint"``: one draw from ``sqrt(sum_c p_c^2)``, the norm over both critics' parameters."""
    scores, kept = selection_case("td3", rung, critics="joint")
    joint = scores.square().sum(0).sqrt()
    assert kept.index.shape == (DRAWS,)
    assert chi_square_pvalue(kept.index, joint / joint.sum()) > ALPHA
    torch.testing.assert_close(kept.weight, joint.mean() / joint[kept.index], rtol=1e-4, atol=0)


def test_the_rung_is_shown_and_reaches_the_buffer():
    from torchrl.data import LazyTensorStorage, TensorDictReplayBuffer

    loss = dqn_loss()
    laber = LaBER(loss, batch_size=8, surrogate="last-layer")
    assert "surrogate='last-layer'" in repr(laber) and "loss='l2'" in repr(laber)
    sampler = LaBERSampler(laber, m=4)
    assert "surrogate='last-layer'" in repr(sampler)
    rb = TensorDictReplayBuffer(storage=LazyTensorStorage(100), sampler=sampler, batch_size=8)
    rb.extend(data("dqn-l2", 64))
    seen = []
    original = laber._score
    laber._score = lambda large: seen.append(original(large)) or seen[-1]  # what the buffer's draw scored with
    sample = rb.sample()
    pred, target, features, exact = seen[0]
    assert features.shape == (32, 16) and exact is None and sample.batch_size == (8,)


def test_last_layer_hook_goes_on_labers_private_copy_never_on_the_users_layer():
    from torchsample.gradnorms import last_linear

    loss = dqn_loss()
    layer = last_linear(loss.value_network)
    laber = LaBER(loss, batch_size=8, surrogate="last-layer")
    assert len(layer._forward_hooks) == 0  # the user's module is never changed, hooks included
    assert len(last_linear(laber._critic.network)._forward_hooks) == 1
    laber(data("dqn-l2", 32))
    assert laber.__dict__["_capture"]._features is None  # the features are not kept after the draw
    assert len(layer._forward_hooks) == 0


def test_bad_keywords():
    loss = dqn_loss()
    td = data("dqn-l2", 8)
    with pytest.raises(ValueError, match=r"surrogate must be one of \('output', 'last-layer', 'exact'\)"):
        grad_norm_scores(loss, td, "full")
    with pytest.raises(ValueError, match="method must be one of"):
        grad_norm_scores(loss, td, "exact", method="fast")
    with pytest.raises(ValueError, match=r"surrogate must be one of \('output', 'last-layer', 'exact'\)"):
        LaBER(loss, batch_size=4, surrogate="l2")  # the old meaning of the word
    with pytest.raises(TypeError, match="prediction=callable"):
        grad_norm_scores(torch.nn.Linear(2, 2), td)
