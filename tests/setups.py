"""Small TorchRL losses and batches that the transform, loss and benchmark tests share."""

import torch
from tensordict import TensorDict
from tensordict.nn import NormalParamExtractor, TensorDictModule
from torch import nn
from torchrl.data import Bounded
from torchrl.modules import (
    MLP,
    Actor,
    DistributionalQValueActor,
    ProbabilisticActor,
    QValueActor,
    TanhNormal,
    ValueOperator,
)
from torchrl.objectives import DQNLoss, SACLoss, TD3Loss

from torchsample import C51Loss

OBS, ACTIONS, ACT_DIM, ATOMS = 4, 3, 2, 11


def dqn_loss(loss_function="l2", double_dqn=False, device="cpu"):
    net = MLP(in_features=OBS, out_features=ACTIONS, num_cells=[16], activation_class=nn.ReLU)
    actor = QValueActor(net, in_keys=["observation"], action_space="categorical").to(device)
    loss = DQNLoss(
        actor, loss_function=loss_function, delay_value=True, double_dqn=double_dqn, action_space="categorical"
    )
    loss.make_value_estimator(gamma=0.9)
    return loss


def c51_loss(device="cpu"):
    support = torch.linspace(-5.0, 5.0, ATOMS)
    net = nn.Sequential(
        MLP(in_features=OBS, out_features=ATOMS * ACTIONS, num_cells=[16], activation_class=nn.ReLU),
        nn.Unflatten(-1, (ATOMS, ACTIONS)),
    )
    actor = DistributionalQValueActor(net, in_keys=["observation"], support=support, action_space="categorical").to(
        device
    )
    return C51Loss(actor, gamma=0.9, delay_value=True)


def qvalue_net(device):
    return ValueOperator(
        MLP(in_features=OBS + ACT_DIM, out_features=1, num_cells=[16], activation_class=nn.ReLU),
        in_keys=["observation", "action"],
    ).to(device)


def action_spec(device):
    return Bounded(-torch.ones(ACT_DIM), torch.ones(ACT_DIM), (ACT_DIM,), device=device)


def sac_loss(loss_function="l2", device="cpu"):
    net = nn.Sequential(
        MLP(in_features=OBS, out_features=2 * ACT_DIM, num_cells=[16], activation_class=nn.ReLU), NormalParamExtractor()
    )
    actor = ProbabilisticActor(
        TensorDictModule(net, in_keys=["observation"], out_keys=["loc", "scale"]),
        in_keys=["loc", "scale"],
        spec=action_spec(device),
        distribution_class=TanhNormal,
        return_log_prob=True,
    ).to(device)
    loss = SACLoss(
        actor, qvalue_net(device), num_qvalue_nets=2, loss_function=loss_function, action_spec=action_spec(device)
    )
    loss.make_value_estimator(gamma=0.9)
    return loss


def td3_loss(loss_function="l2", device="cpu"):
    net = nn.Sequential(MLP(in_features=OBS, out_features=ACT_DIM, num_cells=[16], activation_class=nn.ReLU), nn.Tanh())
    actor = Actor(net, in_keys=["observation"], spec=action_spec(device)).to(device)
    loss = TD3Loss(actor, qvalue_net(device), action_spec=action_spec(device), loss_function=loss_function)
    loss.make_value_estimator(gamma=0.9)
    return loss


def batch(n, *, continuous=False, device="cpu", seed=0):
    """``n`` random transitions in TorchRL's layout; a quarter of them terminal."""
    g = torch.Generator().manual_seed(seed)
    action = torch.rand(n, ACT_DIM, generator=g) * 2 - 1 if continuous else torch.randint(ACTIONS, (n,), generator=g)
    terminated = torch.rand(n, 1, generator=g) < 0.25
    return TensorDict(
        {
            "observation": torch.randn(n, OBS, generator=g),
            "action": action,
            ("next", "observation"): torch.randn(n, OBS, generator=g),
            ("next", "reward"): torch.randn(n, 1, generator=g),
            ("next", "done"): terminated.clone(),
            ("next", "terminated"): terminated,
        },
        [n],
    ).to(device)


LOSSES = {"dqn": dqn_loss, "c51": c51_loss, "sac": sac_loss, "td3": td3_loss}
CONTINUOUS = {"dqn": False, "c51": False, "sac": True, "td3": True}


def recomputed_rtol(pred, target, p, *, rtol=1e-5):
    """Relative tolerance of a LaBER weight whose surrogate ``p = |pred - target| + eps`` a test recomputes.

    The test's forward pass may round differently from the sampler's (another batch shape, another
    CPU's matmul kernels): pred and target each carry a few ulps of their magnitude, which
    ``pred - target`` does not cancel, so ``mean(p) / p_i`` is known to ``8 ulp (|pred_i| + |target_i|) / p_i``
    on top of ``rtol`` (a weight far from cancellation gets no more than ``rtol``).
    """
    ulp = torch.finfo(torch.float32).eps
    return rtol + 8 * ulp * (pred.abs() + target.abs()) / p


def assert_relatively_close(actual, expected, rtol):
    """``|actual - expected| <= rtol * |expected|`` elementwise, ``rtol`` a tensor of per-element tolerances."""
    error = (actual - expected).abs() / expected.abs()
    assert (error <= rtol).all(), f"relative errors {error[error > rtol]} above {rtol[error > rtol]}"


def total_loss(out) -> torch.Tensor:
    """The sum of a loss module's losses (its ``"loss*"`` keys; SAC's ``"alpha"``, TD3's values are logged figures)."""
    return sum(v for k, v in out.items() if k.startswith("loss"))
