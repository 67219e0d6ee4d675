"""What each loss predicts and targets (torchsample.critics, torchsample.c51): the surrogates LaBER
scores with are the gradient norms at the output, row by row, with TorchRL's own losses as the reference."""

import pytest
import torch
from torchrl.objectives import DistributionalDQNLoss

from tests.conftest import DEVICES
from tests.setups import ACTIONS, ATOMS, LOSSES, OBS, batch, c51_loss, dqn_loss
from torchsample import LaBER, LaBERLoss, categorical_projection, laber_select, pred_and_target
from torchsample.critics import Critic
from torchsample.views import critic_of


def last_layer_bias(module: torch.nn.Module) -> torch.Tensor:
    """The bias of the last Linear: its gradient on one row is the gradient w.r.t. the output."""
    return [m for m in module.modules() if isinstance(m, torch.nn.Linear)][-1].bias


def rowwise_ratios(priorities, grad_norms):
    ratio = grad_norms / priorities
    return ratio, (ratio - ratio[0]).abs().max() / ratio[0]


# ---------------------------------------------------------------------------------------------
# Surrogates against autograd, row by row, with TorchRL's own losses as the reference


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loss_function", ["l2", "smooth_l1"], ids=["l2", "huber"])
@pytest.mark.parametrize("double_dqn", [False, True], ids=["dqn", "double-dqn"])
def test_dqn_surrogate_is_the_gradient_norm_at_the_output(device, loss_function, double_dqn):
    """The output rung is the gradient norm of the loss as TorchRL computes it, not up to a factor:
    2 |q - y| for its l2, (q - y)^2."""
    loss = dqn_loss(loss_function, double_dqn=double_dqn, device=device)
    td = batch(12, device=device)
    td["next", "reward"] *= 3  # some |TD| above Huber's threshold
    laber = LaBER(loss, batch_size=4)
    with torch.no_grad():
        pred, target = pred_and_target(loss, td)
    surrogate = laber_select(pred, target, 4, loss=laber.loss_kind, eps=0.0).priority
    bias = last_layer_bias(loss.value_network)
    norms = []
    for i in range(12):  # TorchRL's DQNLoss on one row; the bias gradient is dl/dQ(s_i, .)
        bias.grad = None
        loss(td[i : i + 1])["loss"].sum().backward()  # TorchRL's DQNLoss.forward is the reference
        norms.append(bias.grad.norm())
    torch.testing.assert_close(torch.stack(norms), surrogate, rtol=1e-4, atol=1e-6)
    if loss_function == "smooth_l1":
        assert (surrogate < 1).any() and (surrogate == 1).any()  # both sides of the threshold


@pytest.mark.parametrize("device", DEVICES)
def test_c51_surrogate_is_the_gradient_norm_at_the_logits(device):
    loss = c51_loss(device=device)
    td = batch(10, device=device)
    with torch.no_grad():
        pred, target = pred_and_target(loss, td)
    surrogate = laber_select(pred, target, 4, loss="categorical", eps=0.0).priority
    # TorchRL's own DistributionalDQNLoss (its projection, not ours) gives the reference gradient.
    reference = DistributionalDQNLoss(loss.value_network, gamma=0.9, delay_value=True)
    reference.target_value_network_params.update(loss.target_value_network_params)
    bias = last_layer_bias(loss.value_network)
    for i in range(10):
        bias.grad = None
        row = td[i : i + 1].clone()
        row["action"] = row["action"].unsqueeze(-1)  # TorchRL's C51 reads a [1] action as one-hot
        reference(row)["loss"].sum().backward()
        grad = bias.grad.view(ATOMS, ACTIONS)
        torch.testing.assert_close(grad[:, td["action"][i]].norm(), surrogate[i], rtol=1e-4, atol=1e-6)
        # Only the chosen action's logits get a gradient; .item(): pytest.approx reads a tensor through numpy.
        assert grad.norm().item() == pytest.approx(grad[:, td["action"][i]].norm().item(), rel=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["sac", "td3"])
def test_twin_critic_surrogates_are_each_critics_gradient_norm(device, name):
    loss = LOSSES[name](device=device)
    td = batch(8, continuous=True, device=device)
    for i in range(8):
        row = td[i : i + 1]
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
    m = categorical_projection(
        torch.full((3, 5), 0.2), torch.tensor([0.0, 0.5, 9.0]), torch.tensor([1.0, 1.0, 1.0]), 0.5, support
    )
    torch.testing.assert_close(m.sum(-1), torch.ones(3))
    assert m[2, -1] == 1.0  # everything clamped to v_max


# ---------------------------------------------------------------------------------------------
# The registry


def test_each_loss_family_has_its_view_and_keys():
    views = {name: critic_of(make()) for name, make in LOSSES.items()}
    assert {name: type(v).__name__ for name, v in views.items()} == {
        "dqn": "DQNCritic",
        "c51": "C51Critic",
        "sac": "SACCritics",
        "td3": "TD3Critics",
    }
    assert {name: v.loss_keys for name, v in views.items()} == {
        "dqn": ("loss",),
        "c51": ("loss",),
        "sac": ("loss_qvalue", "loss_actor", "loss_alpha"),
        "td3": ("loss_qvalue", "loss_actor"),
    }
    assert [v.num_critics for v in views.values()] == [1, 1, 2, 2]
    assert [v.loss_kind for v in views.values()] == ["l2", "categorical", "l2", "l2"]


def test_unknown_loss_and_overridden_forward_are_refused():
    with pytest.raises(TypeError, match="prediction=callable"):
        critic_of(torch.nn.Linear(2, 2))

    class MyDQN(type(dqn_loss())):
        def forward(self, td):
            return super().forward(td)

    loss = dqn_loss()
    loss.__class__ = MyDQN  # the same loss, with a forward LaBERLoss would bypass
    with pytest.raises(TypeError, match="overrides forward"):
        LaBERLoss(loss)
    # Registering a view for the subclass (local to this test) is the way to opt in.
    critic_of.register(MyDQN)(type("MyDQNCritic", (type(critic_of(dqn_loss())),), {"forwards": (MyDQN.forward,)}))
    assert LaBERLoss(loss).out_keys == ["loss"]
    assert type(critic_of(loss)).__name__ == "MyDQNCritic" and isinstance(critic_of(loss), Critic)


class _MatMul(torch.nn.Module):
    """A Q-network with no ``nn.Linear``: ``x @ W``."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(OBS, ACTIONS) / OBS**0.5)

    def forward(self, x):
        return x @ self.weight


def test_a_critic_without_nn_linear_scores_with_the_output_and_exact_rungs():
    """Only the last-layer rung needs an ``nn.Linear`` (its formula reads the layer's input and bias); the
    other rungs score any network, and the last-layer rung says what it misses."""
    from tensordict.nn import TensorDictModule
    from torchrl.modules import QValueActor
    from torchrl.objectives import DQNLoss

    from torchsample import grad_norm_scores

    actor = QValueActor(TensorDictModule(_MatMul(), ["observation"], ["action_value"]), action_space="categorical")
    loss = DQNLoss(actor, loss_function="l2", delay_value=True, action_space="categorical")
    loss.make_value_estimator(gamma=0.9)
    large = batch(64)
    assert LaBER(loss, 16, generator=torch.Generator().manual_seed(0))(large).batch_size == (16,)
    output = grad_norm_scores(loss, large, "output")
    exact = grad_norm_scores(loss, large, "exact")
    # Q_a = x . W[:, a]: the gradient over W is the output gradient times x in column a
    torch.testing.assert_close(exact, output * large["observation"].norm(dim=-1))
    with pytest.raises(ValueError, match="no nn.Linear"):
        LaBER(loss, 16, surrogate="last-layer")(large)
