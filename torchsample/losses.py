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

from .critics import TARGET
from .views import critic_of

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
    ``TD3Loss`` (any loss with a registered :class:`torchsample.critics.Critic`) and returns what the
    wrapped loss returns, under the same keys (:attr:`out_keys`, the loss's own): ``"loss"`` (DQN, C51);
    ``"loss_actor"``, ``"loss_qvalue"``, ``"loss_alpha"``, ``"alpha"``, ``"entropy"`` (SAC);
    ``"loss_actor"``, ``"loss_qvalue"``, ``"pred_value"``, ``"state_action_value_actor"``,
    ``"next_state_value"``, ``"target_value"`` (TD3; ``"next_state_value"`` drawn with its own smoothing noise
    where the target is LaBER's).

    * Critic losses are ``mean_i(w_i * l_i)`` (``estimator="paper"``, Lahire et al. Eq. 4; unbiased
      for the large batch's mean loss under LaBER-mean) or ``sum_i(w_i l_i) / sum_i(w_i)``
      (``estimator="self_normalized"``, what TorchRL's ``reduction="mean"`` computes, under which the
      LaBER-mean, -lazy and -max weights give the same update). ``w`` is ``"priority_weight"``
      (LaBER's, PER's, or their product for PER-LaBER); rows without it weigh 1.
    * Twin critics (SAC, TD3) on a ``[B, 1 + C]`` batch, as :class:`torchsample.LaBER` with
      ``critics="independent"`` returns it: critic ``c`` trains on column ``1 + c``, its own rows,
      weighted; the actor (and SAC's temperature) on column 0, uniform rows of the large batch,
      unweighted, by the wrapped loss's own ``actor_loss``. On a ``[B]`` batch every critic trains on
      the same rows.
    * The TD target is read from ``"target_value"`` where LaBER left it (computed with the same
      parameters), else computed. ``"td_error"`` gets ``|TD|`` for a ``PrioritizedSampler``
      (TorchRL's ``DQNLoss`` writes ``TD^2``), the cross-entropy for C51, the largest ``|TD|`` over
      the critics for SAC/TD3; on a ``[B, 1 + C]`` batch LaBER already wrote it for every column.

    **A split update** keeps its structure with the wrapped loss's entry points: :meth:`value_loss`
    (the critic loss alone) and :meth:`actor_loss` (the actor's alone), each ``(loss, metadata)`` like
    ``TD3Loss.value_loss`` / ``TD3Loss.actor_loss``. TorchRL's TD3 script steps the critic, then
    computes the delayed actor loss on the same batch every ``policy_delay`` updates: the same calls
    here, and no actor loss is computed on the updates that do not step it.

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
        >>> critic_loss, metadata = loss.value_loss(td)   # the split update's critic step
        >>> sorted(metadata)
        ['pred_value', 'target_value', 'td_error']
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
        own = list(getattr(loss_module, "out_keys", None) or [])
        self.out_keys = own + [k for k in critic.loss_keys if k not in own]

    def forward(self, td: TensorDictBase) -> TensorDictBase:
        critic = self.__dict__["_critic"]
        value, value_metadata = self.value_loss(td)
        if critic.num_critics == 1:
            return TensorDict(loss=value)
        actor, actor_metadata = self.actor_loss(td)
        out = {"loss_actor": actor, "loss_qvalue": value, **critic.outputs(actor_metadata)}
        out.update((k, v) for k, v in value_metadata.items() if k != "td_error")
        if "next_state_value" in self.out_keys and hasattr(critic, "next_value"):
            # TD3's: a logged figure only, computed here (with fresh smoothing noise where LaBER's target is
            # reused) so that value_loss, the training step, computes no more than it needs.
            rows = td[:, 1:].transpose(0, 1) if td.batch_dims == 2 else td
            out["next_state_value"] = critic.next_value(rows.reshape(-1)).reshape(rows.shape)
        return TensorDict({k: out[k] for k in self.out_keys if k in out})

    def value_loss(self, td: TensorDictBase) -> tuple[Tensor, dict[str, Tensor]]:
        """``(critic loss, metadata)``: the critic's weighted loss alone (``"loss"`` for DQN and C51,
        ``"loss_qvalue"`` for SAC and TD3), and its ``"pred_value"``, ``"target_value"`` and ``"td_error"``
        (also written into ``td`` for a ``PrioritizedSampler``)."""
        critic = self.__dict__["_critic"]
        keys = self.loss_module.tensor_keys
        if critic.num_critics == 1:
            pred = critic.prediction(td)
            target = _target(critic, td)
            per_sample = critic.per_sample_loss(pred, target)
            td_error = critic.td_error(pred, target, per_sample)
            td.set(keys.priority, td_error)
            loss = weighted_mean(per_sample, td.get(keys.priority_weight, None), self.estimator)
            return loss, {"pred_value": pred.detach(), "target_value": target, "td_error": td_error}
        C = critic.num_critics
        if td.batch_dims == 2:  # [B, 1 + C]: column 0 the actor's rows, column 1 + c critic c's
            if td.shape[1] != 1 + C:
                raise ValueError(f"a [B, 1 + C] batch for {C} critics must have {1 + C} columns, got {tuple(td.shape)}")
            rows = td[:, 1:].transpose(0, 1)  # [C, B]
            pred = critic.rows_prediction(rows)
            target = rows.get(TARGET, None)
            if target is None:
                target = critic.target(rows.reshape(-1)).reshape(pred.shape)
            weight = rows.get(keys.priority_weight, None)
            td_error = td.get(keys.priority, None)  # LaBER wrote every column's
        elif td.batch_dims == 1:  # every critic on the rows of td
            pred = critic.prediction(td)
            target = _target(critic, td).expand_as(pred)  # [C, B], one row of targets per critic
            weight = td.get(keys.priority_weight, None)
            td_error = critic.td_error(pred, target)  # the largest |TD| over the critics
            td.set(keys.priority, td_error)
        else:
            raise ValueError(f"expected a [B] or [B, 1 + C] batch, got batch_size={tuple(td.shape)}")
        per_sample = critic.per_sample_loss(pred, target)  # [C, B]
        loss = weighted_mean(per_sample, weight, self.estimator).sum(0)
        metadata = {"pred_value": pred.detach(), "target_value": target}
        if td_error is not None:
            metadata["td_error"] = td_error
        return loss, metadata

    def actor_loss(self, td: TensorDictBase) -> tuple[Tensor, dict[str, Tensor]]:
        """``(loss_actor, metadata)``: the wrapped loss's own ``actor_loss`` on the actor's rows (column 0 of
        a ``[B, 1 + C]`` batch, all of a ``[B]`` one), unweighted: LaBER's weights are the critics'.
        SAC and TD3 only."""
        critic = self.__dict__["_critic"]
        keys = self.loss_module.tensor_keys
        actor_rows = td[:, 0] if td.batch_dims == 2 else td
        return critic.actor_loss(actor_rows.exclude(keys.priority_weight, keys.priority, TARGET))


def _target(critic, td: TensorDictBase) -> Tensor:
    """The target LaBER already computed for these rows (same parameters: no need to redo it)."""
    target = td.get(TARGET, None)
    return critic.target(td) if target is None else target
