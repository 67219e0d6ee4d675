"""``laber(large)``, the functional call, and LaBERLoss: rows, weights, twin critics, PER-LaBER."""

import pytest
import torch
from tensordict import TensorDict
from torchrl.data import LazyTensorStorage, PrioritizedSampler, TensorDictReplayBuffer

from tests.conftest import requires_cuda
from tests.setups import LOSSES, batch, dqn_loss, total_loss
from torchsample import LaBER, LaBERLoss, laber_downsample, laber_select, pred_and_target
from torchsample.critics import TARGET
from torchsample.weights import importance_weights


def test_kept_rows_are_rows_of_the_large_batch_with_the_ops_weights():
    loss = dqn_loss()
    large = batch(64)
    large["position"] = torch.arange(64)
    out = LaBER(loss, batch_size=16, weighting="max", generator=torch.Generator().manual_seed(0))(large)
    assert type(out) is TensorDict and out.batch_size == (16,)
    with torch.no_grad():
        pred, target = pred_and_target(loss, large)
    drawn = laber_select(pred, target, 16, weighting="max", generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out["position"], drawn.index)
    torch.testing.assert_close(out["observation"], large["observation"][drawn.index])
    torch.testing.assert_close(out["priority_weight"], drawn.weight)
    torch.testing.assert_close(out[TARGET], target[drawn.index])


def test_weights_reach_the_loss_and_weightings_give_different_updates():
    losses = {}
    for weighting in ("mean", "lazy", "max"):
        for estimator in ("paper", "self_normalized"):
            torch.manual_seed(0)
            loss = dqn_loss()
            laber = LaBER(loss, batch_size=8, weighting=weighting, generator=torch.Generator().manual_seed(1))
            rows = laber(batch(64))
            weighted = LaBERLoss(loss, estimator=estimator)
            value = weighted(rows)["loss"]
            per_sample = torch.nn.functional.mse_loss(*pred_and_target(loss, rows), reduction="none")
            w = rows["priority_weight"]
            expected = (w * per_sample).mean() if estimator == "paper" else (w * per_sample).sum() / w.sum()
            torch.testing.assert_close(value, expected)
            value.backward()
            losses[weighting, estimator] = torch.cat(
                [p.grad.flatten() for p in loss.parameters() if p.grad is not None]
            )
    paper = [losses[w, "paper"] for w in ("mean", "lazy", "max")]
    assert not torch.allclose(paper[0], paper[1]) and not torch.allclose(paper[0], paper[2])
    # Self-normalised, the three weightings (all proportional to 1/p) give the same update.
    torch.testing.assert_close(losses["mean", "self_normalized"], losses["lazy", "self_normalized"])
    torch.testing.assert_close(losses["mean", "self_normalized"], losses["max", "self_normalized"])


# ---------------------------------------------------------------------------------------------
# Twin critics


@pytest.mark.parametrize("name", ["sac", "td3"])
def test_independent_critics_each_get_their_own_rows(name):
    loss = LOSSES[name]()
    large = batch(128, continuous=True)
    large["position"] = torch.arange(128)
    torch.manual_seed(5)  # the targets are stochastic (next-action sample, target noise)
    out = LaBER(loss, batch_size=16, generator=torch.Generator().manual_seed(0))(large)
    assert type(out) is TensorDict and out.batch_size == (16, 3)  # [B, 1 + C]
    # The same draw as the op on each critic's own priorities (the actor's uniform column first).
    torch.manual_seed(5)
    with torch.no_grad():
        pred, target = pred_and_target(loss, large)
    g = torch.Generator().manual_seed(0)
    drawn = laber_select(pred, target.expand_as(pred), 16, generator=g)
    actor = torch.randint(128, (16, 1), generator=g)
    torch.testing.assert_close(out["position"], torch.cat([actor, drawn.index.T], 1))
    torch.testing.assert_close(out["priority_weight"][:, 1:], drawn.weight.T)
    assert (out["priority_weight"][:, 0] == 1).all()  # the actor's rows are not weighted
    torch.testing.assert_close(out[TARGET], target[out["position"]])
    # PER's priority of every kept row: its largest |TD| over the critics.
    torch.testing.assert_close(out["td_error"], (pred - target).abs().amax(0)[out["position"]])


@pytest.mark.parametrize("name", ["sac", "td3"])
def test_loss_routes_each_critic_to_its_own_column(name):
    """``loss_qvalue`` = sum_c mean_i(w_{c,i} * (q_c(column 1 + c)_i - y_i)^2), critic by critic."""
    loss = LOSSES[name]()
    torch.manual_seed(5)
    out = LaBER(loss, batch_size=16, generator=torch.Generator().manual_seed(0))(batch(128, continuous=True))
    value = LaBERLoss(loss)(out.clone())["loss_qvalue"]
    expected = 0.0
    for c in range(2):
        rows = out[:, 1 + c].select("observation", "action")
        params = loss.qvalue_network_params[c]
        with params.to_module(loss.qvalue_network):
            q = loss.qvalue_network(rows)["state_action_value"].squeeze(-1)
        w, y = out["priority_weight"][:, 1 + c], out[TARGET][:, 1 + c]
        expected = expected + (w * (q - y) ** 2).mean()
    torch.testing.assert_close(value, expected)
    # The columns matter: swapping the two critics' rows changes the loss.
    swapped = out[:, [0, 2, 1]].clone()
    assert not torch.allclose(LaBERLoss(loss)(swapped)["loss_qvalue"], value)
    losses = LaBERLoss(loss)(out.clone())
    assert sorted(losses.keys()) == sorted(LaBERLoss(loss).out_keys)
    total_loss(losses).backward()


@pytest.mark.parametrize("name", ["dqn", "c51", "sac", "td3"])
def test_laber_loss_leaves_the_users_loss_as_it_was(name):
    """Issue 21, item 10: LaBERLoss set the wrapped loss's ``reduction`` to "none". It reads the loss
    and changes nothing; the actor's loss (and SAC's temperature's) is what TorchRL's own loss gives
    on the actor's rows, reduced as the user's loss says."""
    loss = LOSSES[name]()
    # tensordict 0.11 also puts the parameters' batch size and device (not tensors) in the state dict
    state = {k: v.clone() if torch.is_tensor(v) else v for k, v in loss.state_dict().items()}
    reduction = loss.reduction
    weighted = LaBERLoss(loss)
    assert loss.reduction == reduction == "mean"
    continuous = name in ("sac", "td3")
    rows = batch(16, continuous=continuous)
    torch.manual_seed(3)
    ours = weighted(rows.clone())
    assert loss.reduction == reduction
    assert all(torch.equal(v, state[k]) if torch.is_tensor(v) else v == state[k] for k, v in loss.state_dict().items())
    if continuous:
        torch.manual_seed(3)  # SAC samples actions: the same draws as LaBERLoss's
        reference = loss(rows.clone())  # TorchRL's own forward on the same, unweighted rows
        torch.testing.assert_close(ours["loss_actor"], reference["loss_actor"])
        if name == "sac":
            torch.testing.assert_close(ours["loss_alpha"], reference["loss_alpha"])


def test_joint_critics_draw_from_the_root_sum_of_squares():
    loss = LOSSES["td3"]()
    large = batch(128, continuous=True)
    large["position"] = torch.arange(128)
    torch.manual_seed(7)
    out = LaBER(loss, batch_size=32, critics="joint", eps=0.0, generator=torch.Generator().manual_seed(3))(large)
    assert out.batch_size == (32,)
    torch.manual_seed(7)
    with torch.no_grad():
        pred, target = pred_and_target(loss, large)
    joint = ((pred - target) ** 2).sum(0).sqrt()  # sqrt(sum_c p_c^2), p_c = |q_c - y|
    drawn = laber_downsample(joint, 32, eps=0.0, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(out["position"], drawn.index)
    torch.testing.assert_close(out["priority_weight"], importance_weights(joint, drawn.index))
    # A shared draw: LaBERLoss trains both critics on these rows, the max |TD| goes to PER.
    losses = LaBERLoss(loss)(out)
    assert out["td_error"].shape == (32,) and set(losses.keys()) == set(loss(out.clone()).keys())


# ---------------------------------------------------------------------------------------------
# PER-LaBER on the functional path


def test_per_weights_of_the_kept_rows_multiply_laber_weights():
    loss = dqn_loss()
    rb = TensorDictReplayBuffer(
        storage=LazyTensorStorage(1000), sampler=PrioritizedSampler(1000, 0.6, 0.4), batch_size=64
    )
    rb.extend(batch(200))
    rb.update_priority(torch.arange(200), torch.rand(200) * 5)  # PER weights that differ per row
    large = rb.sample()
    assert large["priority_weight"].std() > 0
    out = LaBER(loss, batch_size=16, generator=torch.Generator().manual_seed(2))(large)
    kept = LaBER(loss, batch_size=16, generator=torch.Generator().manual_seed(2)).selection(large)
    torch.testing.assert_close(out["priority_weight"], kept.weight * large["priority_weight"][kept.index])
    torch.testing.assert_close(out["index"], large["index"][kept.index])  # storage indices
    LaBERLoss(loss)(out)
    rb.update_priority(out["index"], out["td_error"])


def test_laber_holds_the_losss_networks_without_owning_them():
    loss = dqn_loss()
    laber = LaBER(loss, batch_size=16)
    assert laber(batch(64)).batch_size == (16,)
    assert loss.training and all(m.training for m in loss.modules())
    assert "value_network" not in str(laber.state_dict())


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"batch_size": 4, "weighting": "median"}, ValueError, "weighting"),
        ({"batch_size": 4, "critics": "both"}, ValueError, "critics"),
        (
            {"batch_size": 4, "surrogate": "full"},
            ValueError,
            r"surrogate must be one of \('output', 'last-layer', 'exact'\)",
        ),
        ({"batch_size": 4, "surrogate": 3}, ValueError, "surrogate must be one of"),
        ({"batch_size": 4, "prediction": 3}, TypeError, "prediction must be a callable"),
        (
            {"batch_size": 4, "prediction": lambda td: td, "loss": "l1"},
            ValueError,
            r"loss must be one of \('l2', 'huber', 'categorical'\)",
        ),
        ({"batch_size": 4, "loss": "huber"}, ValueError, "formula of a custom prediction="),
        ({"batch_size": 4, "prediction": lambda td: td, "surrogate": "exact"}, ValueError, "needs the loss module"),
    ],
    ids=[
        "batch",
        "weighting",
        "critics",
        "surrogate",
        "surrogate-int",
        "prediction",
        "loss",
        "loss-without-prediction",
        "exact-custom",
    ],
)
def test_transform_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        LaBER(dqn_loss(), **kwargs)


def test_custom_prediction_callable():
    loss = dqn_loss()
    calls = []

    def prediction(td):
        calls.append(td.batch_size)
        return td["next", "reward"].squeeze(-1), torch.zeros(td.batch_size)

    large = batch(40)
    large["next", "reward"][::2] = 0.0  # no mass: with eps=0 these rows are never kept
    out = LaBER(loss, batch_size=8, prediction=prediction, eps=0.0)(large)
    assert calls == [torch.Size([40])] and out.batch_size == (8,)
    assert (out["next", "reward"] != 0).all()
    # The last-layer rung takes the features from the callable too; the rows of zero features keep
    # the output priority, the others are scaled up, and the zero-priority rows stay out.
    features = torch.zeros(40, 3)
    features[1::4] = 10.0
    laber = LaBER(
        loss, batch_size=8, prediction=lambda td: (*prediction(td), features), surrogate="last-layer", eps=0.0
    )
    assert (laber(large)["next", "reward"] != 0).all()
    with pytest.raises(ValueError, match=r"\(pred, target, features\) for 'last-layer', got 2"):
        LaBER(loss, batch_size=8, prediction=prediction, surrogate="last-layer")(large)
    with pytest.raises(ValueError, match="empty large batch"):
        LaBER(loss, batch_size=8)(batch(0))
    with pytest.raises(ValueError, match="one batch dimension"):
        LaBER(loss, batch_size=8)(batch(40).reshape(4, 10))


@pytest.mark.gpu
@requires_cuda
def test_laber_owns_its_kernel_state_on_cuda():
    """The module's buffer is the state the kernel advances: fresh draws each call, compiled too."""
    loss = dqn_loss(device="cuda")
    laber = LaBER(loss, batch_size=16)
    assert laber.rng_state is not None and laber.rng_state.device.type == "cuda"
    assert "rng_state" in dict(laber.named_buffers())
    large = batch(256, device="cuda")
    large["position"] = torch.arange(256, device="cuda")
    counter = laber.rng_state[1].item()
    first, second = laber(large)["position"], laber(large)["position"]
    assert laber.rng_state[1].item() == counter + 2 * 16 and not torch.equal(first, second)
    compiled = torch.compile(laber, mode="reduce-overhead")
    draws = [compiled(large)["position"].clone() for _ in range(4)]
    assert len({tuple(d.tolist()) for d in draws}) == 4


def test_laber_has_no_kernel_state_on_cpu():
    laber = LaBER(dqn_loss(), batch_size=8)
    assert laber.rng_state is None and laber.state_dict() == {}
