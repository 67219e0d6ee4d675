"""LaBER composed with TorchRL's losses: what each loss predicts and targets, and how weights reach it.

Two jobs, shared by :class:`torchsample.LaBER` (the surrogate, no gradient) and :class:`LaBERLoss`
(the update), so that both read the loss module's own networks, target parameters and value
estimator the same way:

* :func:`pred_and_target` gives, for any large batch, what the critic predicts and what it is
  regressed on: ``q_i`` and ``y_i`` for ``DQNLoss`` (Double DQN included), the chosen action's
  log-distribution and the projected target distribution for ``DistributionalDQNLoss`` (C51), and
  ``q_{c,i}`` (one row per critic) and ``y_i`` for ``SACLoss`` / ``TD3Loss``.
* :class:`LaBERLoss` reduces with the paper's estimator ``mean_i(w_i * l_i)`` (``estimator="paper"``,
  the default) or TorchRL's self-normalised ``sum_i(w_i l_i) / sum_i(w_i)``
  (``estimator="self_normalized"``). Only critic losses are weighted; with twin critics each critic
  is trained on its own rows and the actor (and SAC's temperature) on uniform rows.

:func:`categorical_projection` is the C51 projection without ``.item()`` or host syncs, so that
:class:`C51Loss` (TorchRL's ``DistributionalDQNLoss`` semantics) compiles with ``fullgraph=True``.
"""
from __future__ import annotations

from typing import Optional

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import TensorDictModuleBase
from torch import Tensor, nn
from torchrl.envs.utils import step_mdp
from torchrl.objectives import DistributionalDQNLoss, DQNLoss, SACLoss, TD3Loss
from torchrl.objectives.utils import _vmap_func, distance_loss

__all__ = [
    "pred_and_target",
    "categorical_projection",
    "C51Loss",
    "LaBERLoss",
    "surrogate_of",
    "ESTIMATORS",
]

ESTIMATORS = ("paper", "self_normalized")
CRITIC_ROWS = "critic_rows"  # [B, C] sub-tensordict: the rows each critic trains on
TARGET = "target_value"  # the TD target LaBER computed for its surrogate, reused by the update


def surrogate_of(loss: nn.Module) -> str:
    """The surrogate that matches a TorchRL loss: ``"l2"``, ``"huber"`` or ``"categorical"``.

    ``|delta|`` is the gradient norm of ``delta^2 / 2``, ``min(|delta|, 1)`` that of the Huber loss
    (TorchRL's ``"smooth_l1"``), and C51's is the per-atom L2 norm (Lahire et al., App. D).

    Examples:
        >>> from torch import nn
        >>> from torchrl.modules import QValueActor
        >>> from torchrl.objectives import DQNLoss
        >>> actor = QValueActor(nn.Linear(4, 2), in_keys=["observation"], action_space="categorical")
        >>> surrogate_of(DQNLoss(actor, loss_function="smooth_l1", action_space="categorical"))
        'huber'
    """
    if isinstance(loss, DistributionalDQNLoss):
        return "categorical"
    if isinstance(loss, (DQNLoss, SACLoss, TD3Loss)):
        name = loss.loss_function
        if name == "l2":
            return "l2"
        if name == "smooth_l1":
            return "huber"
        raise ValueError(f"no LaBER surrogate for loss_function={name!r}; use 'l2' or 'smooth_l1', or pass surrogate=")
    raise TypeError(
        f"no built-in surrogate for {type(loss).__name__}: pass surrogate=callable(td) -> (pred, target)"
    )


def num_critics(loss: nn.Module) -> int:
    return loss.num_qvalue_nets if isinstance(loss, (SACLoss, TD3Loss)) else 1


# ---------------------------------------------------------------------------------------------
# What each loss predicts and targets


def pred_and_target(loss: nn.Module, td: TensorDictBase) -> tuple[Tensor, Tensor]:
    """``(prediction(loss, td), td_target(loss, td))``: what the critic predicts and is regressed on.

    Shapes: ``[N]`` and ``[N]`` for DQN; ``[N, K]`` log-probabilities and ``[N, K]`` projected
    target probabilities for C51; ``[C, N]`` and ``[N]`` for SAC/TD3 (C critics). The prediction
    keeps its graph, the target has none. Wrap in ``torch.no_grad()`` for the surrogate alone.

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from torchrl.modules import QValueActor
        >>> from torchrl.objectives import DQNLoss
        >>> loss = DQNLoss(QValueActor(torch.nn.Linear(4, 2), in_keys=["observation"],
        ...                action_space="categorical"), delay_value=True, action_space="categorical")
        >>> loss.make_value_estimator(gamma=0.99)
        >>> td = TensorDict({"observation": torch.randn(8, 4), "action": torch.randint(2, (8,)),
        ...     ("next", "observation"): torch.randn(8, 4), ("next", "reward"): torch.randn(8, 1),
        ...     ("next", "done"): torch.zeros(8, 1, dtype=torch.bool),
        ...     ("next", "terminated"): torch.zeros(8, 1, dtype=torch.bool)}, [8])
        >>> q, y = pred_and_target(loss, td)
        >>> q.shape, y.shape
        (torch.Size([8]), torch.Size([8]))
    """
    return prediction(loss, td), td_target(loss, td)


def prediction(loss: nn.Module, td: TensorDictBase) -> Tensor:
    """The critic's output on the rows of ``td``, with its graph (see :func:`pred_and_target`)."""
    if isinstance(loss, DistributionalDQNLoss):
        log_ps = _c51_log_probs(loss, td.clone(False), loss.value_network_params)  # [N, K, A]
        return _atoms_of_action(log_ps, td.get(loss.tensor_keys.action), loss.action_space)
    if isinstance(loss, DQNLoss):
        td_copy = td.clone(False)
        with loss.value_network_params.to_module(loss.value_network, preserve_module_state=False):
            loss.value_network(td_copy)
        return _gather_action(td_copy.get(loss.tensor_keys.action_value), td.get(loss.tensor_keys.action),
                              loss.action_space)
    if isinstance(loss, (SACLoss, TD3Loss)):
        rows = td.select(*loss.qvalue_network.in_keys, strict=False).expand(num_critics(loss), *td.batch_size)
        return _per_critic_pred(loss, rows)
    raise TypeError(f"no prediction for {type(loss).__name__}")


@torch.no_grad()
def td_target(loss: nn.Module, td: TensorDictBase) -> Tensor:
    """What the critic is regressed on, as the loss computes it (see :func:`pred_and_target`)."""
    if isinstance(loss, DistributionalDQNLoss):
        return _c51_target(loss, td)
    if isinstance(loss, DQNLoss):
        return _dqn_target(loss, td)
    if isinstance(loss, (SACLoss, TD3Loss)):
        return critic_target(loss, td)
    raise TypeError(f"no TD target for {type(loss).__name__}")


def _dqn_target(loss: DQNLoss, td: TensorDictBase) -> Tensor:
    # DQNLoss.forward's target: the value estimator with the target parameters, Double DQN's
    # next action from the online network.
    keys = loss.tensor_keys
    td_copy = td.clone(False)
    next_value = None
    if loss.double_dqn:
        next_td = step_mdp(td_copy, keep_other=False)
        next_td_target = next_td.clone(False)
        with loss.value_network_params.data.to_module(loss.value_network, preserve_module_state=False):
            loss.value_network(next_td)
        with loss.target_value_network_params.to_module(loss.value_network, preserve_module_state=False):
            loss.value_network(next_td_target)
        next_value = _gather_action(
            next_td_target.get(keys.action_value), next_td.get(keys.action), loss.action_space
        ).unsqueeze(-1)
    return loss.value_estimator.value_estimate(
        td_copy, target_params=loss.target_value_network_params, next_value=next_value
    ).squeeze(-1)


def _gather_action(values: Tensor, action: Tensor, action_space) -> Tensor:
    """``values[..., a]`` for categorical actions, ``(values * one_hot).sum(-1)`` otherwise."""
    if action_space == "categorical":
        if action.ndim != values.ndim:
            action = action.unsqueeze(-1)
        return values.gather(-1, action).squeeze(-1)
    return (values * action.to(values.dtype)).sum(-1)


def categorical_projection(next_probs: Tensor, reward: Tensor, not_terminal: Tensor, discount: Tensor | float,
                           support: Tensor) -> Tensor:
    """Project ``r + gamma * z`` onto the fixed support ``z`` (Bellemare et al., 2017, Alg. 1).

    ``Tz_j = clamp(r + discount * not_terminal * z_j, z_0, z_{K-1})`` is split between its two
    neighbouring atoms in proportion to its distance to each. Batched, and with no ``.item()``
    or data-dependent branch, so it compiles with ``fullgraph=True``.

    Args:
        next_probs: ``[N, K]`` target distribution of the next state's chosen action.
        reward, not_terminal: ``[N]`` or ``[N, 1]``.
        discount: ``gamma`` (or ``gamma ** n``), a float or a tensor broadcastable to ``[N, 1]``.
        support: ``[K]`` evenly spaced atoms.

    Returns:
        ``[N, K]`` projected distribution ``m`` (rows sum to 1).

    Examples:
        >>> import torch
        >>> support = torch.linspace(-1.0, 1.0, 3)               # atoms -1, 0, 1
        >>> p = torch.tensor([[0.0, 1.0, 0.0]])                  # all mass on 0
        >>> categorical_projection(p, torch.tensor([0.5]), torch.tensor([0.0]), 0.9, support)
        tensor([[0.0000, 0.5000, 0.5000]])
    """
    atoms = support.numel()
    v_min, v_max = support[0], support[-1]
    delta_z = (v_max - v_min) / (atoms - 1)
    reward = reward.reshape(-1, 1).to(next_probs.dtype)
    not_terminal = not_terminal.reshape(-1, 1).to(next_probs.dtype)
    tz = (reward + discount * not_terminal * support).clamp(v_min, v_max)
    b = (tz - v_min) / delta_z
    lower, upper = b.floor(), b.ceil()
    # When b lands on an atom, lower == upper and both shares below would be 0: move one away.
    exact = lower == upper
    lower = torch.where(exact & (upper > 0), lower - 1, lower)
    upper = torch.where(exact & (lower < atoms - 1) & (lower == upper), upper + 1, upper)
    m = torch.zeros_like(next_probs)
    m.scatter_add_(-1, lower.long(), next_probs * (upper - b))
    m.scatter_add_(-1, upper.long(), next_probs * (b - lower))
    return m


def _c51_log_probs(loss: DistributionalDQNLoss, td: TensorDictBase, params) -> TensorDictBase:
    """``[N, K, A]`` log-probabilities (and the greedy action) from ``params``.

    Runs the actor's network and log-softmax but not TorchRL's ``DistributionalQValueModule``,
    whose input check (``(log_softmax_values > 0).any()``) is a data-dependent branch: a graph break.
    """
    *layers, _ = loss.value_network.module
    with params.to_module(loss.value_network, preserve_module_state=False):
        for layer in layers:
            td = layer(td)
    return td.get(loss.tensor_keys.action_value)


def _atoms_of_action(values: Tensor, action: Tensor, action_space) -> Tensor:
    """``[N, K]``: the atoms of the chosen action from ``[N, K, A]`` values."""
    if action_space == "categorical":
        index = action.reshape(-1, 1, 1).expand(-1, values.shape[-2], 1)
        return values.gather(-1, index).squeeze(-1)
    return (values * action.unsqueeze(-2).to(values.dtype)).sum(-1)


def _c51_target(loss: DistributionalDQNLoss, td: TensorDictBase) -> Tensor:
    # DistributionalDQNLoss.forward's target (Double-Q next action, target network
    # probabilities), with the projection made traceable.
    keys = loss.tensor_keys
    support = loss.value_network_params["support"]
    next_td = step_mdp(td, keep_other=False)
    next_log_ps = _c51_log_probs(loss, next_td.clone(False), loss.value_network_params.data)
    next_action = (next_log_ps.exp() * support.unsqueeze(-1)).sum(-2).argmax(-1)  # the online net picks
    next_probs = _c51_log_probs(loss, next_td, loss.target_value_network_params).exp()
    next_probs_a = _atoms_of_action(next_probs, next_action, "categorical")
    reward = td.get(("next", keys.reward))
    terminated = td.get(("next", keys.terminated), default=td.get(("next", keys.done)))
    discount = loss.gamma ** td.get(keys.steps_to_next_obs, default=torch.ones_like(reward))
    return categorical_projection(next_probs_a, reward, ~terminated, discount.reshape(-1, 1), support)


class C51Loss(DistributionalDQNLoss):
    """TorchRL's ``DistributionalDQNLoss`` (C51, Double-Q target) that compiles with ``fullgraph=True``.

    The same loss, ``-sum_k m_k log p_k(s, a)`` with ``m`` the projected target distribution, and
    the same constructor; the projection is :func:`categorical_projection`, so there is no
    ``.item()``, no CPU round trip and no graph break (TorchRL's has 17 under torch.compile).
    Writes the per-sample cross-entropy to ``"td_error"`` as TorchRL's does.

    Examples:
        >>> import torch
        >>> from torchrl.data import OneHot
        >>> from torchrl.modules import DistributionalQValueActor
        >>> support = torch.linspace(-10, 10, 11)
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 22), torch.nn.Unflatten(-1, (11, 2)))
        >>> actor = DistributionalQValueActor(net, in_keys=["observation"], support=support,
        ...                                   action_space="categorical")
        >>> loss = C51Loss(actor, gamma=0.99, delay_value=True, reduction="none")
    """

    def forward(self, tensordict: TensorDictBase):
        log_ps_a, target = pred_and_target(self, tensordict)
        loss = -(target * log_ps_a).sum(-1)
        tensordict.set(self.tensor_keys.priority, loss.detach().unsqueeze(-1))
        weights = self._maybe_get_priority_weight(tensordict)
        return TensorDict(loss=self._reduce_loss(loss, tensordict=tensordict, weights=weights))


def _per_critic_pred(loss: SACLoss | TD3Loss, rows: TensorDictBase) -> Tensor:
    """``[C, B]``: critic ``c`` on rows ``rows[c]`` (vmapped over critics' parameters and rows)."""
    vmapped = loss.__dict__.get("_laber_vmap_qvalue_00")
    if vmapped is None:
        vmapped = _vmap_func(loss.qvalue_network, (0, 0), randomness=loss.vmap_randomness)
        loss.__dict__["_laber_vmap_qvalue_00"] = vmapped
    out = vmapped(rows.select(*loss.qvalue_network.in_keys, strict=False), loss.qvalue_network_params)
    return out.get(loss.tensor_keys.state_action_value).squeeze(-1)


@torch.no_grad()
def critic_target(loss: SACLoss | TD3Loss, td: TensorDictBase) -> Tensor:
    """``[N]`` TD targets of SAC (soft, twin-min) or TD3 (clipped noise, twin-min), as the loss computes."""
    if isinstance(loss, SACLoss):
        if loss._version != 2:
            raise ValueError("LaBER composes with SACLoss without a value network (SAC v2)")
        return loss._compute_target_v2(td)
    # TD3Loss.value_loss's target, step for step.
    keys = loss.tensor_keys
    td = td.clone(False)
    next_td = step_mdp(td).select(*loss.actor_network.in_keys, strict=False)
    with loss.target_actor_network_params.to_module(loss.actor_network, preserve_module_state=False):
        next_td = loss.actor_network(next_td)
    next_action = next_td.get(keys.action)
    noise = (torch.randn_like(next_action) * loss.policy_noise).clamp(-loss.noise_clip, loss.noise_clip)
    next_td.set(keys.action, (next_action + noise).clamp(loss.min_action, loss.max_action))
    rows = next_td.select(*loss.qvalue_network.in_keys, strict=False).expand(loss.num_qvalue_nets, *next_td.batch_size)
    next_q = loss._vmap_qvalue_network00(rows, loss.target_qvalue_network_params)
    next_q = next_q.get(keys.state_action_value).squeeze(-1).min(0)[0]
    td.set(("next", keys.state_action_value), next_q.unsqueeze(-1))
    return loss.value_estimator.value_estimate(td).squeeze(-1)


# ---------------------------------------------------------------------------------------------
# The update


def _stored_target(td: TensorDictBase, loss: nn.Module) -> Tensor:
    """The target LaBER already computed for these rows (same parameters: no need to redo it)."""
    target = td.get(TARGET, None)
    return td_target(loss, td) if target is None else target


def weighted_mean(per_sample: Tensor, weight: Optional[Tensor], estimator: str = "paper") -> Tensor:
    """``mean(w * l)`` (``"paper"``) or ``sum(w * l) / sum(w)`` (``"self_normalized"``) over the last dim.

    Examples:
        >>> import torch
        >>> l, w = torch.tensor([1.0, 3.0]), torch.tensor([2.0, 0.0])
        >>> weighted_mean(l, w), weighted_mean(l, w, "self_normalized"), weighted_mean(l, None)
        (tensor(1.), tensor(1.), tensor(2.))
    """
    if weight is None:
        return per_sample.mean(-1)
    if estimator == "paper":
        return (weight * per_sample).mean(-1)
    return (weight * per_sample).sum(-1) / weight.sum(-1)


class LaBERLoss(TensorDictModuleBase):
    """A TorchRL loss reduced with LaBER's weights: the paper's estimator, twin critics done right.

    Wraps ``DQNLoss``, ``DistributionalDQNLoss`` / :class:`C51Loss`, ``SACLoss`` or ``TD3Loss``
    and returns the same keys as the wrapped loss, scalar:

    * critic losses ``mean_i(w_i * l_i)`` (``estimator="paper"``, Lahire et al. Eq. 4; unbiased for
      the large batch's mean loss under LaBER-mean) or ``sum_i(w_i l_i) / sum_i(w_i)``
      (``estimator="self_normalized"``, what TorchRL's ``reduction="mean"`` computes, under which
      the LaBER-mean, -lazy and -max weights give the same update). ``w`` is ``"priority_weight"``
      (LaBER's, PER's, or their product for PER-LaBER); rows without it weigh 1.
    * twin critics (SAC, TD3): critic ``c`` is trained on its own rows, ``td["critic_rows"][:, c]``,
      as :class:`torchsample.LaBER` with ``critics="independent"`` draws them; without
      ``"critic_rows"`` all critics share the rows of ``td``. The actor (and SAC's temperature)
      loss is the plain mean over the rows of ``td`` (uniform rows of the large batch): only critic
      losses are weighted.

    The wrapped loss is switched to ``reduction="none"``; this module reduces.

    Args:
        loss_module: the TorchRL loss.
        estimator: ``"paper"`` (default) or ``"self_normalized"``.

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from torchrl.modules import QValueActor
        >>> from torchrl.objectives import DQNLoss
        >>> dqn = DQNLoss(QValueActor(torch.nn.Linear(4, 2), in_keys=["observation"],
        ...               action_space="categorical"), delay_value=True, action_space="categorical")
        >>> dqn.make_value_estimator(gamma=0.99)
        >>> loss = LaBERLoss(dqn)
        >>> td = TensorDict({"observation": torch.randn(8, 4), "action": torch.randint(2, (8,)),
        ...     ("next", "observation"): torch.randn(8, 4), ("next", "reward"): torch.randn(8, 1),
        ...     ("next", "done"): torch.zeros(8, 1, dtype=torch.bool),
        ...     ("next", "terminated"): torch.zeros(8, 1, dtype=torch.bool),
        ...     "priority_weight": torch.rand(8)}, [8])
        >>> loss(td)["loss"].shape
        torch.Size([])
    """

    def __init__(self, loss_module: nn.Module, *, estimator: str = "paper") -> None:
        super().__init__()
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        if not isinstance(loss_module, (DQNLoss, DistributionalDQNLoss, SACLoss, TD3Loss)):
            raise TypeError(f"LaBERLoss wraps DQNLoss, DistributionalDQNLoss, SACLoss or TD3Loss, got {type(loss_module).__name__}")
        loss_module.reduction = "none"
        self.loss_module = loss_module
        self.estimator = estimator
        self.in_keys = list(getattr(loss_module, "in_keys", []))
        self.out_keys = ["loss"] if num_critics(loss_module) == 1 else ["loss_qvalue", "loss_actor"]

    def forward(self, td: TensorDictBase) -> TensorDictBase:
        loss = self.loss_module
        keys = loss.tensor_keys
        weight = td.get(keys.priority_weight, None)
        if num_critics(loss) > 1:
            return self._twin_critics(td, weight)
        pred = prediction(loss, td)
        target = _stored_target(td, loss)
        if isinstance(loss, DistributionalDQNLoss):
            per_sample = -(target * pred).sum(-1)
            priority = per_sample  # what TorchRL's C51 loss hands to a PrioritizedSampler
        else:
            per_sample = distance_loss(pred, target, loss_function=loss.loss_function)
            priority = (pred - target).abs()  # |TD|, PER's priority (TorchRL's DQNLoss writes TD^2)
        td.set(keys.priority, priority.detach())
        return TensorDict(loss=weighted_mean(per_sample, weight, self.estimator))

    def _twin_critics(self, td: TensorDictBase, weight: Optional[Tensor]):
        loss = self.loss_module
        weight_key = loss.tensor_keys.priority_weight
        critic_rows = td.get(CRITIC_ROWS, None)
        if critic_rows is None:  # all critics on the rows of td
            pred = prediction(loss, td)
            target = _stored_target(td, loss).expand_as(pred)
            critic_weight = weight
        else:  # [B, C] -> [C, B]: critic c on its own rows
            rows = critic_rows.transpose(0, 1)
            pred = _per_critic_pred(loss, rows)
            target = rows.get(TARGET, None)
            if target is None:
                target = critic_target(loss, rows.reshape(-1)).reshape(pred.shape)
            critic_weight = rows.get(weight_key, None)
        per_sample = distance_loss(pred, target, loss_function=loss.loss_function)  # [C, B]
        out = {"loss_qvalue": weighted_mean(per_sample, critic_weight, self.estimator).sum(0)}
        actor_rows = td.exclude(weight_key, CRITIC_ROWS, TARGET)
        loss_actor, metadata = loss.actor_loss(actor_rows)
        out["loss_actor"] = loss_actor.mean()
        if isinstance(loss, SACLoss):
            out["loss_alpha"] = loss._alpha_loss(log_prob=metadata["log_prob"]).mean()
        if critic_rows is None:  # |TD| of the most wrong critic, for a PrioritizedSampler
            td.set(loss.tensor_keys.priority, (pred - target).detach().abs().amax(0))
        return TensorDict(out)
