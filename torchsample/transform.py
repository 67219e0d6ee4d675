"""``torchsample.LaBER``: the LaBER down-sample as a TorchRL replay-buffer transform.

The buffer draws the large batch (``m * B`` rows, uniformly or with a ``PrioritizedSampler`` for
PER-LaBER); the transform scores every row with the loss module's own networks (forward only, no
gradient), calls the fused op :func:`torchsample.laber_select`, and returns the ``B`` selected rows
with their importance weights in ``"priority_weight"``.
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from tensordict import TensorDict, TensorDictBase
from torch import Tensor, nn
from torchrl.envs.transforms import Transform

from .losses import CRITIC_ROWS, TARGET, pred_and_target, surrogate_of
from .ops import laber_downsample, laber_select
from .codes import SURROGATES, WEIGHTINGS
from .surrogates import td_priority

__all__ = ["LaBER"]

CRITICS = ("independent", "joint")
# What TensorDictReplayBuffer.sample() writes from the sampler's info after the transforms ran.
_INFO_KEYS = ("index", "priority_weight", "index_generation")


class LaBER(Transform):
    """Large Batch Experience Replay (Lahire, Geist and Rachelson, ICML 2022) as a buffer transform.

    The buffer samples a large batch of ``m * B`` transitions; LaBER scores each with a surrogate
    of its per-sample gradient norm, computed by one no-grad forward of the loss's own networks,
    and keeps ``B`` of them, drawn i.i.d. with probability ``p_i / sum_j p_j``, with importance
    weights (``weighting``: ``mean_j(p_j) / p_i`` by default) in ``"priority_weight"``. The
    surrogate follows the loss: ``|q - y|`` for ``DQNLoss(loss_function="l2")``,
    ``min(|q - y|, 1)`` for ``"smooth_l1"``, ``||softmax(z) - m||_2`` for C51, and one priority
    row per critic for ``SACLoss`` / ``TD3Loss``.

    Twin critics (``critics=``): ``"independent"`` (the paper's) draws ``B`` rows per critic from
    its own priorities, returned as ``td["critic_rows"]`` (batch ``[B, C]``), while the rows of
    the returned tensordict itself are ``B`` uniform rows of the large batch for the actor;
    ``"joint"`` draws one set of rows from ``sqrt(sum_c p_c^2)``. :class:`torchsample.LaBERLoss`
    trains each critic on its rows, weighted, and the actor unweighted.

    In a ``TensorDictReplayBuffer`` each returned row's ``"index"`` is its storage index, so
    ``rb.update_priority`` works; with a ``PrioritizedSampler`` drawing the large batch (PER-LaBER)
    the PER weights of the selected rows multiply LaBER's. The transform holds the loss module
    without registering it: it stays out of the buffer's ``state_dict`` and out of ``eval()``.
    Called directly on a large-batch tensordict (``laber(td)``) it does the same, and traces
    under ``torch.compile(fullgraph=True)``.

    Args:
        loss_module: the TorchRL loss whose critic is trained on the selected rows.
        batch_size: ``B``, rows kept (the buffer's batch size is the large batch, e.g. ``4 * B``).
        weighting: ``"mean"`` (default), ``"lazy"`` or ``"max"``.
        eps: added to every priority (1e-6).
        surrogate: ``None`` (follow the loss), or a callable ``td -> (pred, target)`` for any other
            loss; then ``surrogate_kind`` names the formula (``"l2"``, ``"huber"``, ``"categorical"``).
        critics: ``"independent"`` (default) or ``"joint"``, for losses with several critics.
        generator: a ``torch.Generator`` for reproducible draws (eager only).

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from torchrl.data import LazyTensorStorage, TensorDictReplayBuffer
        >>> from torchrl.modules import QValueActor
        >>> from torchrl.objectives import DQNLoss
        >>> from torchsample import LaBER
        >>> actor = QValueActor(torch.nn.Linear(4, 2), in_keys=["observation"], action_space="categorical")
        >>> loss = DQNLoss(actor, loss_function="smooth_l1", delay_value=True, action_space="categorical")
        >>> loss.make_value_estimator(gamma=0.99)
        >>> rb = TensorDictReplayBuffer(storage=LazyTensorStorage(1000), batch_size=4 * 32)
        >>> rb.append_transform(LaBER(loss, batch_size=32))
        TensorDictReplayBuffer(...)
        >>> _ = rb.extend(TensorDict({"observation": torch.randn(100, 4), "action": torch.randint(2, (100,)),
        ...     ("next", "observation"): torch.randn(100, 4), ("next", "reward"): torch.randn(100, 1),
        ...     ("next", "done"): torch.zeros(100, 1, dtype=torch.bool),
        ...     ("next", "terminated"): torch.zeros(100, 1, dtype=torch.bool)}, [100]))
        >>> batch = rb.sample()
        >>> batch.batch_size, batch["priority_weight"].shape, batch["index"].shape
        (torch.Size([32]), torch.Size([32]), torch.Size([32]))
    """

    def __init__(
        self,
        loss_module: nn.Module,
        batch_size: int,
        *,
        weighting: str = "mean",
        eps: float = 1e-6,
        surrogate: Optional[Callable[[TensorDictBase], tuple[Tensor, Tensor]]] = None,
        surrogate_kind: str = "l2",
        critics: str = "independent",
        generator: Optional[torch.Generator] = None,
    ) -> None:
        super().__init__()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        if critics not in CRITICS:
            raise ValueError(f"critics must be one of {CRITICS}, got {critics!r}")
        if surrogate is not None and not callable(surrogate):
            raise TypeError(f"surrogate must be a callable td -> (pred, target) or None, got {type(surrogate).__name__}")
        if surrogate_kind not in SURROGATES:
            raise ValueError(f"surrogate_kind must be one of {SURROGATES}, got {surrogate_kind!r}")
        # Held outside nn.Module's registry: not a submodule, so not in state_dict() nor eval().
        self.__dict__["_loss_module"] = loss_module
        self.__dict__["_generator"] = generator
        self.kind = surrogate_kind if surrogate is not None else surrogate_of(loss_module)
        self.__dict__["_surrogate"] = surrogate
        self.batch_size = batch_size
        self.weighting = weighting
        self.eps = eps
        self.critics = critics

    @property
    def loss_module(self) -> nn.Module:
        return self.__dict__["_loss_module"]

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        return self.select(tensordict)

    # A replay buffer's Compose calls the transform; an env would call _call: both select.
    def _call(self, tensordict: TensorDictBase) -> TensorDictBase:
        return self.select(tensordict)

    def select(self, large: TensorDictBase) -> TensorDictBase:
        """The ``B`` rows (and per-critic rows) LaBER keeps from the large batch ``large``."""
        if large.batch_dims != 1:
            raise ValueError(f"LaBER expects a large batch with one batch dimension, got batch_size={tuple(large.batch_size)}")
        if large.batch_size[0] == 0:
            raise ValueError("LaBER got an empty large batch: the buffer holds no data")
        generator = self.__dict__["_generator"]
        with torch.no_grad():
            surrogate = self.__dict__["_surrogate"]
            pred, target = surrogate(large) if surrogate is not None else pred_and_target(self.loss_module, large)
        several = self.kind != "categorical" and pred.dim() == 2 and pred.shape[0] > 1
        options = dict(weighting=self.weighting, eps=self.eps, generator=generator)
        # The selected rows carry their TD target, so that the update does not compute it again.
        keep_target = surrogate is None

        if not several:
            drawn = laber_select(pred, target, self.batch_size, surrogate=self.kind, **options)
            return self._rows(large, drawn.index, drawn.weight, target if keep_target else None)
        shared_target = target.expand_as(pred) if target.dim() == 1 else target
        if self.critics == "joint":
            per_critic = td_priority(pred, shared_target, loss="huber" if self.kind == "huber" else "l2")
            drawn = laber_downsample(per_critic.square().sum(0).sqrt(), self.batch_size, **options)
            return self._rows(large, drawn.index, drawn.weight, target if keep_target and target.dim() == 1 else None)
        drawn = laber_select(pred, shared_target, self.batch_size, surrogate=self.kind, **options)  # [C, B]
        # The actor trains on uniform rows of the large batch; each critic on its own rows.
        uniform = torch.randint(large.batch_size[0], (self.batch_size,), device=pred.device, generator=generator)
        out = large[uniform]
        critic_rows = large[drawn.index.T]  # [B, C]
        critic_rows.set(self._weight_key, drawn.weight.T)
        if keep_target:
            critic_rows.set(TARGET, shared_target.gather(-1, drawn.index).T)
        out.set(CRITIC_ROWS, critic_rows)
        return self._mark(out, uniform, drawn.index.T)

    def _rows(self, large: TensorDictBase, index: Tensor, weight: Tensor, target: Optional[Tensor]) -> TensorDictBase:
        out = large[index]
        out.set(self._weight_key, weight)
        if target is not None:
            out.set(TARGET, target[index])
        return self._mark(out, index, None)

    @property
    def _weight_key(self):
        keys = getattr(self.loss_module, "tensor_keys", None)
        return keys.priority_weight if keys is not None else "priority_weight"

    def _mark(self, out: TensorDictBase, rows: Tensor, critic_rows: Optional[Tensor]) -> TensorDictBase:
        if torch.compiler.is_compiling() or type(out) is not TensorDict:
            return out
        out.__class__ = _SelectedRows
        out.__dict__["_laber"] = {"rows": rows, "critic_rows": critic_rows, "done": set(), "weight_key": self._weight_key}
        return out

    def _inv_call(self, tensordict: TensorDictBase) -> TensorDictBase:
        return tensordict  # writing to the buffer is untouched

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(batch_size={self.batch_size}, weighting={self.weighting!r}, "
                f"surrogate={self.kind!r}, critics={self.critics!r}, eps={self.eps})")


class _SelectedRows(TensorDict):
    """The rows LaBER kept, as returned through a ``TensorDictReplayBuffer``.

    ``TensorDictReplayBuffer.sample()`` writes the sampler's info into the batch after the
    transforms ran (torchrl 0.14.1): an ``m*B``-long ``"index"`` and, with a
    ``PrioritizedSampler``, ``"priority_weight"``. The first write of each such entry is mapped
    onto the kept rows: ``"index"`` becomes each row's storage index, PER's weight multiplies
    LaBER's (PER-LaBER). Every later write, and every derived tensordict, is ordinary.
    """

    def set(self, key, item, *args, **kwargs):
        laber = self.__dict__.get("_laber")
        if laber is not None and key in _INFO_KEYS and key not in laber["done"] and isinstance(item, Tensor):
            laber["done"].add(key)
            rows, critic_rows = laber["rows"], laber["critic_rows"]
            item = item.to(rows.device)
            if key == laber["weight_key"]:
                if critic_rows is None:
                    return super().set(key, self.get(key) * item[rows], *args, **kwargs)
                # Twin critics: PER's weights go to the critic rows; the actor rows stay unweighted.
                sub = self.get(CRITIC_ROWS)
                sub.set(key, sub.get(key) * item[critic_rows])
                return self
            if critic_rows is not None:
                self.get(CRITIC_ROWS).set(key, item[critic_rows])
            return super().set(key, item[rows], *args, **kwargs)
        return super().set(key, item, *args, **kwargs)
