"""Per-sample gradient norms (torchsample.gradnorms) against torch.func, row by row: the last layer's
closed form for DQN, C51 and the SAC/TD3 critics, and the ghost norms of whole networks."""

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torchrl.objectives.utils import distance_loss

from tests.setups import ACTIONS, batch, c51_loss, dqn_loss, sac_loss, td3_loss
from torchsample.c51 import _atoms_of_action, _log_probs
from torchsample.critics import gather_action, swap_params
from torchsample.gradnorms import capture_last_layer_input, exact_grad_norms, last_linear, per_sample_grads
from torchsample.surrogates import critic_priorities, last_layer_norm, output_gradient
from torchsample.views import critic_of

N = 12


# ---------------------------------------------------------------------------------------------
# Helpers: each loss family's per-sample loss as a function of explicit parameters (torch.func)


def dqn_prediction(loss, params, td):
    td_copy = td.clone(False)
    with swap_params(params, loss.value_network):
        loss.value_network(td_copy)
    return gather_action(td_copy.get("action_value"), td.get("action"), loss.action_space)


def c51_prediction(loss, params, td):
    return _atoms_of_action(_log_probs(loss, td.clone(False), params), td.get("action"), loss.action_space)


def critic_prediction(loss, params, rows):
    """One twin critic ``params`` (``loss.qvalue_network_params[c]``) on ``rows``: ``[N]``."""
    net = loss.qvalue_network
    with swap_params(params, net):
        out = net(rows.select(*net.in_keys).clone(False))
    return out.get("state_action_value").squeeze(-1)


def last_layer_keys(module):
    """The params keys of :func:`last_linear` (TorchRL's params mirror ``named_modules``): its weight, and
    its bias where it has one."""
    layer = last_linear(module)
    name = next(name for name, sub in module.named_modules() if sub is layer)
    return [(*name.split("."), "weight")] + ([(*name.split("."), "bias")] if layer.bias is not None else [])


def norms_of(grads, keys):
    return torch.stack([grads.get(key).flatten(1).square().sum(1) for key in keys]).sum(0).sqrt()


def assert_rows_close(actual, expected):
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# output_gradient is dl/d(output), by autograd


@pytest.mark.parametrize("loss, torch_loss", [("l2", "l2"), ("huber", "smooth_l1")])
def test_output_gradient_is_the_loss_gradient_at_the_output(loss, torch_loss):
    pred = (torch.randn(20) * 2).requires_grad_()
    target = torch.randn(20)
    (expected,) = torch.autograd.grad(distance_loss(pred, target, torch_loss).sum(), pred)
    torch.testing.assert_close(output_gradient(pred, target, loss), expected)


def test_output_gradient_categorical_is_the_cross_entropy_gradient_at_the_logits():
    logits = torch.randn(6, 11, requires_grad=True)
    m = torch.softmax(torch.randn(6, 11), -1)
    (expected,) = torch.autograd.grad(-(m * torch.log_softmax(logits, -1)).sum(), logits)
    torch.testing.assert_close(output_gradient(logits, m, "categorical"), expected)
    # C51's critic predicts log-probabilities: the same gradient.
    torch.testing.assert_close(output_gradient(torch.log_softmax(logits, -1), m, "categorical"), expected)


# ---------------------------------------------------------------------------------------------
# The last layer, against torch.func's per-sample gradients of its weight and bias


@pytest.mark.parametrize("loss_function", ["l2", "smooth_l1"], ids=["l2", "huber"])
@pytest.mark.parametrize("double_dqn", [False, True], ids=["dqn", "double-dqn"])
def test_last_layer_norm_dqn(loss_function, double_dqn):
    loss = dqn_loss(loss_function, double_dqn=double_dqn)
    critic = critic_of(loss)
    td = batch(N)
    td["next", "reward"] *= 3  # some |TD| above Huber's threshold
    target = critic.target(td)
    with capture_last_layer_input(loss.value_network) as cap:
        pred = critic.prediction(td)
    torch.testing.assert_close(pred, dqn_prediction(loss, loss.value_network_params, td))
    norms = critic_priorities(pred, target, critic.loss_kind, features=cap.features)

    grads = per_sample_grads(
        lambda p, td, y: critic.per_sample_loss(dqn_prediction(loss, p, td), y), loss.value_network_params, td, target
    )
    assert_rows_close(norms, norms_of(grads, last_layer_keys(loss.value_network)))
    # The features matter: the ratio to the output surrogate varies from row to row.
    ratio = norms / output_gradient(pred, target, critic.loss_kind).abs()
    assert ratio.std() > 0.01 * ratio.mean()


def test_last_layer_norm_c51():
    loss = c51_loss()
    critic = critic_of(loss)
    td = batch(N)
    target = critic.target(td)
    with capture_last_layer_input(loss.value_network) as cap:
        pred = critic.prediction(td)  # [N, atoms]; the last Linear's output is [N, atoms * actions]
    assert cap.features.shape == (N, 16)
    norms = critic_priorities(pred, target, "categorical", features=cap.features)

    grads = per_sample_grads(
        lambda p, td, m: critic.per_sample_loss(c51_prediction(loss, p, td), m), loss.value_network_params, td, target
    )
    assert_rows_close(norms, norms_of(grads, last_layer_keys(loss.value_network)))


@pytest.mark.parametrize("make_loss", [sac_loss, td3_loss], ids=["sac", "td3"])
def test_last_layer_norm_twin_critics_under_vmap(make_loss):
    loss = make_loss()
    critic = critic_of(loss)
    net = loss.qvalue_network
    td = batch(N, continuous=True)
    target = critic.target(td)
    # Each critic on its own rows, as LaBER's independent down-samples give them.
    index = torch.stack([torch.arange(N), torch.randperm(N)])
    rows = torch.stack([td[index[0]], td[index[1]]])
    targets = target[index]

    def one_critic(params, rows):
        with capture_last_layer_input(net) as cap:
            q = critic_prediction(loss, params, rows)
        return q, cap.features

    q, features = torch.vmap(one_critic, (0, 0))(loss.qvalue_network_params, rows)
    assert features.shape == (2, N, 16)
    torch.testing.assert_close(q, critic.rows_prediction(rows))  # the forward LaBER scores with
    norms = critic_priorities(q, targets, critic.loss_kind, features=features)

    for c in range(2):
        grads = per_sample_grads(
            lambda p, rows, y: distance_loss(critic_prediction(loss, p, rows), y, loss.loss_function),
            loss.qvalue_network_params[c],
            rows[c],
            targets[c],
        )
        assert_rows_close(norms[c], norms_of(grads, last_layer_keys(net)))


def test_captured_features_are_those_of_the_latest_call_in_the_block():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    x1, x2 = torch.randn(2, 3), torch.randn(5, 3)
    with capture_last_layer_input(net) as cap:
        net(x1)
        net(x2)
    torch.testing.assert_close(cap.features, torch.relu(net[0](x2)))
    net(x1)  # the hook is gone after the block
    assert cap.features.shape == (5, 4)
    with pytest.raises(RuntimeError, match="not called"), capture_last_layer_input(net) as cap:
        _ = cap.features


# ---------------------------------------------------------------------------------------------
# per_sample_grads (the reference) against one backward per row


def test_per_sample_grads_match_one_backward_per_row():
    loss = dqn_loss()
    critic = critic_of(loss)
    td = batch(5)
    target = critic.target(td)
    grads = per_sample_grads(
        lambda p, td, y: critic.per_sample_loss(dqn_prediction(loss, p, td), y), loss.value_network_params, td, target
    )
    params = loss.value_network_params
    keys = list(params.keys(True, True))
    for i in range(5):
        row = critic.per_sample_loss(dqn_prediction(loss, params, td[i : i + 1]), target[i : i + 1]).sum()
        expected = torch.autograd.grad(row, [params.get(key) for key in keys])
        for key, g in zip(keys, expected):
            torch.testing.assert_close(grads.get(key)[i], g, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Ghost norms against torch.func, row by row


def module_loss(net):
    """Squared TD error of the taken action, with ``net``'s parameters passed explicitly."""

    def per_sample_loss(params, x, action, y):
        q = functional_call(net, params, (x,)).gather(-1, action.unsqueeze(-1)).squeeze(-1)
        return (q - y) ** 2

    return per_sample_loss


def check_ghost(net, x, n_actions):
    params = dict(net.named_parameters())
    action, y = torch.randint(n_actions, (x.shape[0],)), torch.randn(x.shape[0])
    ghost = exact_grad_norms(net, module_loss(net), params, x, action, y, method="ghost")
    reference = exact_grad_norms(net, module_loss(net), params, x, action, y, method="vmap")
    assert_rows_close(ghost, reference)
    return ghost


def minatar_net(actions=ACTIONS):
    return nn.Sequential(
        nn.Conv2d(4, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8 * 8, 128), nn.ReLU(), nn.Linear(128, actions)
    )


def test_ghost_norms_mlp_cartpole_like():
    check_ghost(
        nn.Sequential(nn.Linear(4, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2)), torch.randn(N, 4), 2
    )


def test_ghost_norms_minatar_conv_net():
    x = (torch.rand(N, 4, 10, 10) < 0.3).float()
    norms = check_ghost(minatar_net(), x, ACTIONS)
    assert (norms > 0).all()


@pytest.mark.parametrize(
    "conv",
    [
        pytest.param(dict(in_channels=8, out_channels=16, kernel_size=3, stride=2), id="gram-stride2"),
        pytest.param(
            dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, padding_mode="reflect"), id="reflect-pad"
        ),
        pytest.param(
            dict(in_channels=4, out_channels=6, kernel_size=(3, 2), groups=2, bias=False, dilation=(1, 2)),
            id="groups2-dilated-nobias",
        ),
        pytest.param(dict(in_channels=4, out_channels=4, kernel_size=3, padding="same"), id="same"),
    ],
)
def test_ghost_norms_conv2d_variants(conv):
    layer = nn.Conv2d(**conv)
    net = nn.Sequential(layer, nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
    net(torch.randn(1, conv["in_channels"], 7, 7))  # materialise the lazy layer
    check_ghost(net, torch.randn(N, conv["in_channels"], 7, 7), 3)


class SequenceNet(nn.Module):
    """A Linear on a sequence ``[N, T, d]`` (the Gram form) and one Linear called twice."""

    def __init__(self):
        super().__init__()
        self.token = nn.Linear(8, 8)
        self.shared = nn.Linear(8, 3)

    def forward(self, x):
        z = torch.tanh(self.token(x))  # [N, 3, 8]: T = 3, 3 * (8 + 8) <= 8 * 8
        return self.shared(z.mean(1)) + self.shared(z[:, 0])


def test_ghost_norms_sequence_input_and_a_layer_called_twice():
    check_ghost(SequenceNet(), torch.randn(N, 3, 8), 3)


def test_ghost_norms_count_the_parameters_that_require_grad_as_the_reference_does():
    net = minatar_net()
    params = dict(net.named_parameters())
    params["0.weight"] = params["0.weight"].detach()  # a frozen conv kernel, its bias trained
    params["3.bias"] = params["3.bias"].detach()
    x, action, y = torch.randn(N, 4, 10, 10), torch.randint(ACTIONS, (N,)), torch.randn(N)
    ghost = exact_grad_norms(net, module_loss(net), params, x, action, y, method="ghost")
    assert_rows_close(ghost, exact_grad_norms(net, module_loss(net), params, x, action, y, method="vmap"))
    assert (ghost < exact_grad_norms(net, module_loss(net), dict(net.named_parameters()), x, action, y)).all()


@pytest.mark.parametrize("make_loss", [sac_loss, td3_loss], ids=["sac", "td3"])
def test_ghost_norms_twin_critics(make_loss):
    loss = make_loss()
    critic = critic_of(loss)
    td = batch(N, continuous=True)
    target = critic.target(td)

    def per_sample_loss(params, rows, y):
        return distance_loss(critic_prediction(loss, params, rows), y, loss.loss_function)

    for c in range(loss.num_qvalue_nets):
        params = loss.qvalue_network_params[c]
        ghost = exact_grad_norms(loss.qvalue_network, per_sample_loss, params, td, target, method="ghost")
        reference = exact_grad_norms(loss.qvalue_network, per_sample_loss, params, td, target, method="vmap")
        assert_rows_close(ghost, reference)


def test_ghost_norms_dqn_loss_params():
    loss = dqn_loss()
    critic = critic_of(loss)
    td = batch(N)
    target = critic.target(td)

    def per_sample_loss(p, td, y):
        return critic.per_sample_loss(dqn_prediction(loss, p, td), y)

    ghost = exact_grad_norms(loss.value_network, per_sample_loss, loss.value_network_params, td, target)
    reference = exact_grad_norms(
        loss.value_network, per_sample_loss, loss.value_network_params, td, target, method="vmap"
    )
    assert_rows_close(ghost, reference)
    # The last layer's share is below the whole network's norm, and not equal to it.
    with capture_last_layer_input(loss.value_network) as cap:
        pred = critic.prediction(td)
    last = critic_priorities(pred, target, critic.loss_kind, features=cap.features)
    assert (last <= ghost * (1 + 1e-5)).all() and (last < ghost * 0.999).any()


# ---------------------------------------------------------------------------------------------
# Fallback and errors


def test_auto_falls_back_to_vmap_for_layers_without_a_ghost_form():
    net = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    params = dict(net.named_parameters())
    x, action, y = torch.randn(N, 4), torch.randint(2, (N,)), torch.randn(N)
    with pytest.raises(ValueError, match="LayerNorm"):
        exact_grad_norms(net, module_loss(net), params, x, action, y, method="ghost")
    auto = exact_grad_norms(net, module_loss(net), params, x, action, y)
    assert_rows_close(auto, exact_grad_norms(net, module_loss(net), params, x, action, y, method="vmap"))


def test_ghost_norms_refuse_a_forward_under_vmap():
    loss = td3_loss()
    td = batch(N, continuous=True)

    def per_sample_loss(params, td, y):
        return critic_of(loss).rows_prediction(td.expand(2, N))[0] - y  # TorchRL's vmapped critics

    with pytest.raises(RuntimeError, match="vmap"):
        exact_grad_norms(
            loss.qvalue_network, per_sample_loss, loss.qvalue_network_params, td, torch.zeros(N), method="ghost"
        )


def test_bad_arguments():
    net = nn.Linear(3, 2)
    params = dict(net.named_parameters())
    x, action, y = torch.randn(4, 3), torch.randint(2, (4,)), torch.randn(4)
    with pytest.raises(ValueError, match="method"):
        exact_grad_norms(net, module_loss(net), params, x, action, y, method="fast")
    with pytest.raises(ValueError, match=r"\[N\]"):
        exact_grad_norms(net, lambda p, x: functional_call(net, p, (x,)), params, x)
    with pytest.raises(ValueError, match="leading"):
        exact_grad_norms(net, module_loss(net), params, x, action, torch.randn(5))
    with pytest.raises(ValueError, match="require grad"):
        exact_grad_norms(
            net, module_loss(net), {k: v.detach() for k, v in params.items()}, x, action, y, method="ghost"
        )
    with pytest.raises(ValueError, match="loss must be one of"):
        output_gradient(torch.zeros(3), torch.zeros(3), "l1")
    with pytest.raises(ValueError, match="same shape"):
        output_gradient(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match=r"features must be \[..., N, F\] with output_grad_norm"):
        last_layer_norm(torch.zeros(3), torch.zeros(4, 5))
    with pytest.raises(ValueError, match="no nn.Linear"):
        last_linear(nn.ReLU())
    with pytest.raises(ValueError, match="huber_delta"):
        output_gradient(torch.zeros(3), torch.zeros(3), "huber", huber_delta=0.0)
