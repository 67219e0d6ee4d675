"""torchsample.LaBER in TorchRL replay buffers, and LaBERLoss: surrogates, rows, weights, twin critics."""
import pytest
import torch
from tensordict import TensorDict
from torchrl.data import LazyTensorStorage, ListStorage, PrioritizedSampler, ReplayBuffer, TensorDictReplayBuffer
from torchrl.objectives import DistributionalDQNLoss

from tests.conftest import DEVICES
from tests.setups import ACTIONS, ATOMS, CONTINUOUS, LOSSES, batch, c51_loss, dqn_loss
from torchsample import LaBER, LaBERLoss, categorical_projection, laber_select, pred_and_target
from torchsample.losses import CRITIC_ROWS, TARGET


def last_layer_bias(module: torch.nn.Module) -> torch.Tensor:
    """The bias of the last Linear: its gradient on one row is the gradient w.r.t. the output."""
    return [m for m in module.modules() if isinstance(m, torch.nn.Linear)][-1].bias


def rowwise_ratios(priorities, grad_norms):
    ratio = grad_norms / priorities
    return ratio, (ratio - ratio[0]).abs().max() / ratio[0]


# ---------------------------------------------------------------------------------------------
# Surrogates against autograd, row by row, with TorchRL's own losses as the reference


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loss_function, factor", [("l2", 2.0), ("smooth_l1", 1.0)], ids=["l2", "huber"])
@pytest.mark.parametrize("double_dqn", [False, True], ids=["dqn", "double-dqn"])
def test_dqn_surrogate_is_the_gradient_norm_at_the_output(device, loss_function, factor, double_dqn):
    loss = dqn_loss(loss_function, double_dqn=double_dqn, device=device)
    td = batch(12, device=device)
    td["next", "reward"] *= 3  # some |TD| above Huber's threshold
    laber = LaBER(loss, batch_size=4)
    with torch.no_grad():
        pred, target = pred_and_target(loss, td)
    surrogate = laber_select(pred, target, 4, surrogate=laber.kind, eps=0.0).priority
    bias = last_layer_bias(loss.value_network)
    norms = []
    for i in range(12):  # TorchRL's DQNLoss on one row; the bias gradient is dl/dQ(s_i, .)
        bias.grad = None
        loss(td[i:i + 1])["loss"].sum().backward()  # TorchRL's DQNLoss.forward is the reference
        norms.append(bias.grad.norm())
    torch.testing.assert_close(torch.stack(norms), factor * surrogate, rtol=1e-4, atol=1e-6)
    if loss_function == "smooth_l1":
        assert (surrogate < 1).any() and (surrogate == 1).any()  # both sides of the threshold


@pytest.mark.parametrize("device", DEVICES)
def test_c51_surrogate_is_the_gradient_norm_at_the_logits(device):
    loss = c51_loss(device=device)
    td = batch(10, device=device)
    with torch.no_grad():
        pred, target = pred_and_target(loss, td)
    surrogate = laber_select(pred, target, 4, surrogate="categorical", eps=0.0).priority
    # TorchRL's own DistributionalDQNLoss (its projection, not ours) gives the reference gradient.
    reference = DistributionalDQNLoss(loss.value_network, gamma=0.9, delay_value=True)
    reference.target_value_network_params.update(loss.target_value_network_params)
    bias = last_layer_bias(loss.value_network)
    for i in range(10):
        bias.grad = None
        row = td[i:i + 1].clone()
        row["action"] = row["action"].unsqueeze(-1)  # TorchRL's C51 reads a [1] action as one-hot
        reference(row)["loss"].sum().backward()
        grad = bias.grad.view(ATOMS, ACTIONS)
        torch.testing.assert_close(grad[:, td["action"][i]].norm(), surrogate[i], rtol=1e-4, atol=1e-6)
        assert grad.norm() == pytest.approx(grad[:, td["action"][i]].norm().item(), rel=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["sac", "td3"])
def test_twin_critic_surrogates_are_each_critics_gradient_norm(device, name):
    loss = LOSSES[name](device=device)
    td = batch(8, continuous=True, device=device)
    for i in range(8):
        row = td[i:i + 1]
        torch.manual_seed(i)  # the same target noise / next-action sample as the loss below
        with torch.no_grad():
            pred, target = pred_and_target(loss, row)
        surrogate = (pred - target).abs().squeeze(-1)  # [C]
        for p in loss.qvalue_network_params.values(True, True):
            p.grad = None
        torch.manual_seed(i)
        critic_loss = loss.qvalue_v2_loss(row)[0] if name == "sac" else loss.value_loss(row)[0]
        critic_loss.sum().backward()
        bias_key = [k for k in loss.qvalue_network_params.keys(True, True) if k[-1] == "bias"][-1]
        grad = loss.qvalue_network_params.get(bias_key).grad.reshape(2)  # one scalar per critic
        torch.testing.assert_close(grad.abs(), 2 * surrogate, rtol=1e-4, atol=1e-6)


def test_categorical_projection_matches_torchrl():
    """Our traceable projection and TorchRL's (inside DistributionalDQNLoss) agree: same loss."""
    loss = c51_loss()
    td = batch(32, seed=3)
    td["next", "reward"] *= 4  # push Tz outside the support and onto atoms
    ours = LaBERLoss(c51_loss())
    ours.loss_module.load_state_dict(loss.state_dict())
    reference = DistributionalDQNLoss(loss.value_network, gamma=0.9, delay_value=True, reduction="none")
    reference.target_value_network_params.update(loss.target_value_network_params)
    torch.testing.assert_close(ours(td.clone())["loss"], reference(td.clone())["loss"].mean(), rtol=1e-5, atol=1e-6)
    support = torch.linspace(-1, 1, 5)
    m = categorical_projection(torch.full((3, 5), 0.2), torch.tensor([0.0, 0.5, 9.0]), torch.tensor([1.0, 1.0, 1.0]),
                               0.5, support)
    torch.testing.assert_close(m.sum(-1), torch.ones(3))
    assert m[2, -1] == 1.0  # everything clamped to v_max


# ---------------------------------------------------------------------------------------------
# In a replay buffer


def filled_buffer(name, n=200, m=4, b=16, sampler=None, device="cpu"):
    rb = TensorDictReplayBuffer(storage=LazyTensorStorage(1000, device=device), batch_size=m * b,
                                **({"sampler": sampler} if sampler is not None else {}))
    rb.extend(batch(n, continuous=CONTINUOUS[name], device=device))
    return rb


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["dqn", "c51"])
def test_sample_returns_selected_rows_with_storage_index_and_weights(device, name, recwarn):
    loss = LOSSES[name](device=device)
    rb = filled_buffer(name, device=device)
    rb.append_transform(LaBER(loss, batch_size=16, generator=torch.Generator(device).manual_seed(0)))
    sample = rb.sample()
    assert not [w for w in recwarn if "torchsample" in str(w.filename)]
    assert sample.batch_size == (16,)
    stored = rb.storage[sample["index"]]  # rb[...] would apply the transform again
    for key in ("observation", "action", ("next", "observation"), ("next", "reward")):
        torch.testing.assert_close(sample[key], stored[key])
    w = sample["priority_weight"]
    assert w.shape == (16,) and (w > 0).all()
    torch.testing.assert_close(sample[TARGET].shape[0], 16)


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
            losses[weighting, estimator] = torch.cat([p.grad.flatten() for p in loss.parameters() if p.grad is not None])
    paper = [losses[w, "paper"] for w in ("mean", "lazy", "max")]
    assert not torch.allclose(paper[0], paper[1]) and not torch.allclose(paper[0], paper[2])
    # Self-normalised, the three weightings (all proportional to 1/p) give the same update.
    torch.testing.assert_close(losses["mean", "self_normalized"], losses["lazy", "self_normalized"])
    torch.testing.assert_close(losses["mean", "self_normalized"], losses["max", "self_normalized"])


@pytest.mark.parametrize("name", ["sac", "td3"])
def test_independent_critics_each_get_their_own_rows(name):
    loss = LOSSES[name]()
    large = batch(128, continuous=True)
    torch.manual_seed(5)  # the targets are stochastic (next-action sample, target noise)
    out = LaBER(loss, batch_size=16, generator=torch.Generator().manual_seed(0))(large)
    rows = out[CRITIC_ROWS]
    assert out.batch_size == (16,) and rows.batch_size == (16, 2)
    assert "priority_weight" not in out.keys() and rows["priority_weight"].shape == (16, 2)
    assert not torch.equal(rows["observation"][:, 0], rows["observation"][:, 1])
    # The same draw as the op on each critic's own priorities.
    torch.manual_seed(5)
    with torch.no_grad():
        pred, target = pred_and_target(loss, large)
    drawn = laber_select(pred, target.expand_as(pred), 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(rows["observation"], large["observation"][drawn.index.T])
    torch.testing.assert_close(rows["priority_weight"], drawn.weight.T, rtol=1e-3, atol=0)
    joint = LaBER(loss, batch_size=16, critics="joint")(large)
    assert CRITIC_ROWS not in joint.keys() and joint["priority_weight"].shape == (16,)
    # The wrapped loss trains each critic on its own rows and the actor on the uniform rows.
    out_loss = LaBERLoss(loss)(out)
    assert set(out_loss.keys()) >= {"loss_qvalue", "loss_actor"}
    sum(v for k, v in out_loss.items() if k.startswith("loss")).backward()


def test_per_laber_end_to_end_with_update_priority():
    loss = dqn_loss()
    sampler = PrioritizedSampler(1000, alpha=0.6, beta=0.4)
    rb = filled_buffer("dqn", sampler=sampler)
    laber = LaBER(loss, batch_size=16)
    rb.append_transform(laber)
    weighted = LaBERLoss(loss)
    for _ in range(3):
        sample, info = rb.sample(return_info=True)
        assert sample.batch_size == (16,)
        # PER's weights of the selected rows multiply LaBER's.
        positions = [int((info["index"] == i).nonzero()[0]) for i in sample["index"].tolist()]
        per_weight = torch.as_tensor(info["priority_weight"])[positions]
        assert (sample["priority_weight"] > 0).all() and per_weight.shape == (16,)
        weighted(sample)["loss"].backward()
        rb.update_priority(sample["index"], sample["td_error"])
    tree = sampler._sum_tree
    for i, p in zip(sample["index"].tolist(), sample["td_error"].tolist()):
        assert tree[i] == pytest.approx((p + sampler._eps) ** 0.6, rel=1e-4)


def test_plain_replay_buffer_of_tensordicts():
    loss = dqn_loss()
    rb = ReplayBuffer(storage=ListStorage(500), batch_size=64)
    rb.extend(batch(100))
    rb.append_transform(LaBER(loss, batch_size=16))
    assert rb.sample().batch_size == (16,)


def test_networks_stay_in_training_mode_and_out_of_the_buffer_state(tmp_path):
    loss = dqn_loss()
    rb = filled_buffer("dqn")
    rb.append_transform(LaBER(loss, batch_size=16))
    assert loss.training and all(m.training for m in loss.modules())
    state = rb.state_dict()
    flat = str(state)
    assert "value_network" not in flat and "weight" not in flat
    rb.dumps(tmp_path / "rb")
    restored = filled_buffer("dqn", n=1)
    restored.append_transform(LaBER(loss, batch_size=16))
    restored.loads(tmp_path / "rb")
    assert len(restored) == len(rb)
    torch.testing.assert_close(restored.storage[:200]["observation"], rb.storage[:200]["observation"])
    fresh = filled_buffer("dqn", n=1)
    fresh.append_transform(LaBER(loss, batch_size=16))
    fresh.load_state_dict(state)
    assert len(fresh) == 200 and fresh.sample().batch_size == (16,)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"batch_size": 4, "weighting": "median"}, ValueError, "weighting"),
        ({"batch_size": 4, "critics": "both"}, ValueError, "critics"),
        ({"batch_size": 4, "surrogate": 3}, TypeError, "surrogate"),
    ],
)
def test_transform_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        LaBER(dqn_loss(), **kwargs)


def test_custom_surrogate_callable():
    loss = dqn_loss()
    calls = []

    def surrogate(td):
        calls.append(td.batch_size)
        return td["next", "reward"].squeeze(-1), torch.zeros(td.batch_size)

    out = LaBER(loss, batch_size=8, surrogate=surrogate, eps=0.0)(batch(40))
    assert calls == [torch.Size([40])] and out.batch_size == (8,)
    assert (out["next", "reward"] != 0).all()
    with pytest.raises(ValueError, match="empty large batch"):
        LaBER(loss, batch_size=8)(batch(0))
