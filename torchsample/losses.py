"""LaBER's update: a TorchRL loss reduced with the importance weights, by the paper's estimator.

:class:`LaBERLoss` reads the loss through its :class:`torchsample.critics.Critic` view (the same one
:class:`torchsample.LaBER` scored the large batch with) and reduces the critic's per-sample losses
with :func:`weighted_mean`.
"""

from __future__ import annotations

from typing import Optional

from tensordict import TensorDict, TensorDictBase
from tensordict.nn import TensorDictModuleBase
from torch import Tensor, nn

from .critics import TARGET, critic_of

__all__ = ["LaBERLoss", "weighted_mean", "ESTIMATORS"]

ESTIMATORS = ("paper", "self_normalized")


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

    Wraps ``DQNLoss``, ``DistributionalDQNLoss`` / :class:`torchsample.C51Loss`, ``SACLoss`` or
    ``TD3Loss`` (any loss with a registered :class:`torchsample.critics.Critic`) and returns the
    keys in :attr:`out_keys`, scalar: ``"loss"`` (DQN, C51), ``"loss_qvalue"`` and ``"loss_actor"``
    (TD3), and ``"loss_alpha"`` too (SAC).

    * Critic losses are ``mean_i(w_i * l_i)`` (``estimator="paper"``, Lahire et al. Eq. 4; unbiased
      for the large batch's mean loss under LaBER-mean) or ``sum_i(w_i l_i) / sum_i(w_i)``
      (``estimator="self_normalized"``, what TorchRL's ``reduction="mean"`` computes, under which the
      LaBER-mean, -lazy and -max weights give the same update). ``w`` is ``"priority_weight"``
      (LaBER's, PER's, or their product for PER-LaBER); rows without it weigh 1.
    * Twin critics (SAC, TD3) on a ``[B, 1 + C]`` batch, as :class:`torchsample.LaBER` with
      ``critics="independent"`` returns it: critic ``c`` trains on column ``1 + c``, its own rows,
      weighted; the actor (and SAC's temperature) on column 0, uniform rows of the large batch,
      unweighted, reduced as the wrapped loss's ``reduction`` says (TorchRL's default ``"mean"``).
      On a ``[B]`` batch every critic trains on the same rows.
    * The TD target is read from ``"target_value"`` where LaBER left it (computed with the same
      parameters), else computed. ``"td_error"`` gets ``|TD|`` for a ``PrioritizedSampler``
      (TorchRL's ``DQNLoss`` writes ``TD^2``), the cross-entropy for C51, the largest ``|TD|`` over
      the critics for SAC/TD3; on a ``[B, 1 + C]`` batch LaBER already wrote it for every column.

    The wrapped loss is read, never changed. This module computes the critic loss that the wrapped
    class's ``forward`` computes, not by calling it: a subclass that overrides ``forward`` is refused
    with a ``TypeError``, as its change would be silently bypassed (register a
    :class:`torchsample.critics.Critic` for it instead).

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
        >>> loss(td)["loss"].shape, loss.out_keys
        (torch.Size([]), ['loss'])
    """

    def __init__(self, loss_module: nn.Module, *, estimator: str = "paper") -> None:
        super().__init__()
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        critic = critic_of(loss_module)
        if type(loss_module).forward not in critic.forwards:
            raise TypeError(
                f"{type(loss_module).__name__} overrides forward(): LaBERLoss computes the loss of "
                f"{' / '.join(f.__qualname__.split('.')[0] for f in critic.forwards)} itself and would bypass it; "
                "register a torchsample.critics.Critic for your class to say what it predicts and targets"
            )
        self.loss_module = loss_module
        self.__dict__["_critic"] = critic
        self.estimator = estimator
        self.in_keys = list(getattr(loss_module, "in_keys", []))
        self.out_keys = list(critic.loss_keys)

    def forward(self, td: TensorDictBase) -> TensorDictBase:
        critic = self.__dict__["_critic"]
        if critic.num_critics > 1:
            return self._twin_critics(td)
        keys = self.loss_module.tensor_keys
        pred = critic.prediction(td)
        target = _target(critic, td)
        per_sample = critic.per_sample_loss(pred, target)
        td.set(keys.priority, critic.td_error(pred, target, per_sample))
        return TensorDict(loss=weighted_mean(per_sample, td.get(keys.priority_weight, None), self.estimator))

    def _twin_critics(self, td: TensorDictBase) -> TensorDictBase:
        critic = self.__dict__["_critic"]
        keys = self.loss_module.tensor_keys
        C = critic.num_critics
        if td.batch_dims == 2:  # [B, 1 + C]: column 0 the actor's rows, column 1 + c critic c's
            if td.shape[1] != 1 + C:
                raise ValueError(f"a [B, 1 + C] batch for {C} critics must have {1 + C} columns, got {tuple(td.shape)}")
            actor_rows = td[:, 0]
            rows = td[:, 1:].transpose(0, 1)  # [C, B]
            pred = critic.rows_prediction(rows)
            target = rows.get(TARGET, None)
            if target is None:
                target = critic.target(rows.reshape(-1)).reshape(pred.shape)
            weight = rows.get(keys.priority_weight, None)
        elif td.batch_dims == 1:  # every critic on the rows of td
            actor_rows = td
            pred = critic.prediction(td)
            target = _target(critic, td).expand_as(pred)
            weight = td.get(keys.priority_weight, None)
            td.set(keys.priority, critic.td_error(pred, target))  # the largest |TD| over the critics
        else:
            raise ValueError(f"expected a [B] or [B, 1 + C] batch, got batch_size={tuple(td.shape)}")
        per_sample = critic.per_sample_loss(pred, target)  # [C, B]
        out = {"loss_qvalue": weighted_mean(per_sample, weight, self.estimator).sum(0)}
        # TorchRL's actor losses would weigh by "priority_weight": only the critics are weighted.
        out.update(critic.actor_losses(actor_rows.exclude(keys.priority_weight, keys.priority, TARGET)))
        return TensorDict(out)


def _target(critic, td: TensorDictBase) -> Tensor:
    """The target LaBER already computed for these rows (same parameters: no need to redo it)."""
    target = td.get(TARGET, None)
    return critic.target(td) if target is None else target
