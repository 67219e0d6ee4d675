"""C51 (Bellemare et al., 2017) for LaBER: the projection, what the critic predicts and targets, the loss.

* :func:`categorical_projection`: ``r + gamma * z`` projected on the support, with no ``.item()`` and
  no data-dependent branch, so that it compiles with ``fullgraph=True``;
* :class:`C51Loss`: TorchRL's ``DistributionalDQNLoss`` computed by the two below, so that it compiles;
* :class:`C51Critic`: the :class:`torchsample.critics.Critic` view of ``DistributionalDQNLoss`` (in
  :func:`torchsample.critic_of`'s table of built-in views): the chosen action's log-distribution
  ``log p(s, a)`` against the projected Double-Q target ``m``, the output gradient norm
  ``||softmax(z) - m||_2`` (Lahire et al., App. D), the per-sample cross-entropy.
"""

from __future__ import annotations

import torch
from tensordict import TensorDict, TensorDictBase
from torch import Tensor
from torchrl.envs.utils import step_mdp
from torchrl.objectives import DistributionalDQNLoss

from .critics import Critic, swap_params

__all__ = ["categorical_projection", "C51Loss", "C51Critic"]


def categorical_projection(
    next_probs: Tensor, reward: Tensor, not_terminal: Tensor, discount: Tensor | float, support: Tensor
) -> Tensor:
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


def _log_probs(loss: DistributionalDQNLoss, td: TensorDictBase, params) -> Tensor:
    """``[N, K, A]`` log-probabilities (and the greedy action) from ``params``.

    Runs the actor's network and log-softmax but not TorchRL's ``DistributionalQValueModule``,
    whose input check (``(log_softmax_values > 0).any()``) is a data-dependent branch: a graph break.
    """
    *layers, _ = loss.value_network.module
    with swap_params(params, loss.value_network):
        for layer in layers:
            td = layer(td)
    return td.get(loss.tensor_keys.action_value)


def _atoms_of_action(values: Tensor, action: Tensor, action_space) -> Tensor:
    """``[N, K]``: the atoms of the chosen action from ``[N, K, A]`` values."""
    if action_space == "categorical":
        index = action.reshape(-1, 1, 1).expand(-1, values.shape[-2], 1)
        return values.gather(-1, index).squeeze(-1)
    return (values * action.unsqueeze(-2).to(values.dtype)).sum(-1)


def _target(loss: DistributionalDQNLoss, td: TensorDictBase) -> Tensor:
    # DistributionalDQNLoss.forward's target (Double-Q next action, target network
    # probabilities), with the projection made traceable.
    keys = loss.tensor_keys
    support = loss.value_network_params["support"]
    next_td = step_mdp(td, keep_other=False)
    next_log_ps = _log_probs(loss, next_td.clone(False), loss.value_network_params.data)
    next_action = (next_log_ps.exp() * support.unsqueeze(-1)).sum(-2).argmax(-1)  # the online net picks
    next_probs = _log_probs(loss, next_td, loss.target_value_network_params).exp()
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
    Writes the per-sample cross-entropy to ``"td_error"`` as TorchRL's does, and reduces with
    ``"priority_weight"`` where the rows carry it: ``reduction="mean"`` gives ``sum(w*l) / sum(w)``
    as TorchRL's losses do, ``"sum"`` gives ``sum(w*l)``, ``"none"`` gives ``w*l``.

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

    def forward(self, tensordict: TensorDictBase) -> TensorDict:
        critic = C51Critic(self)
        loss = critic.per_sample_loss(critic.prediction(tensordict), critic.target(tensordict))
        tensordict.set(self.tensor_keys.priority, loss.detach().unsqueeze(-1))
        weight = tensordict.get(self.tensor_keys.priority_weight, None)
        if weight is not None:
            loss = loss * weight
        if self.reduction == "mean":
            loss = loss.mean() if weight is None else loss.sum() / weight.sum()
        elif self.reduction == "sum":
            loss = loss.sum()
        return TensorDict(loss=loss)


class C51Critic(Critic):
    """``DistributionalDQNLoss``: ``log p(s, a)`` ``[N, K]`` against the projected target ``m`` ``[N, K]``."""

    loss_kind = "categorical"
    forwards = (DistributionalDQNLoss.forward, C51Loss.forward)

    def prediction(self, td: TensorDictBase, params: TensorDictBase | None = None) -> Tensor:
        loss = self.loss
        log_ps = _log_probs(loss, td.clone(False), loss.value_network_params if params is None else params)  # [N, K, A]
        return _atoms_of_action(log_ps, td.get(loss.tensor_keys.action), loss.action_space)

    @torch.no_grad()
    def target(self, td: TensorDictBase) -> Tensor:
        return _target(self.loss, td)

    def per_sample_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        return -(target * pred).sum(-1)

    def td_error(self, pred: Tensor, target: Tensor, per_sample: Tensor | None = None) -> Tensor:
        """The per-sample cross-entropy: what TorchRL's C51 loss hands to a PrioritizedSampler."""
        return (self.per_sample_loss(pred, target) if per_sample is None else per_sample).detach()
