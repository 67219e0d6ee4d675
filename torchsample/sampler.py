"""``torchsample.LaBERSampler``: LaBER on TorchRL's sampler extension point.

A replay buffer asks its sampler for ``B`` storage indices and the info to write beside the rows.
:class:`LaBERSampler` asks its inner sampler (uniform, ``PrioritizedSampler``, ...) for ``m * B``,
reads those rows from the storage, lets :class:`torchsample.LaBER` choose ``B`` of them, and
returns their storage indices with LaBER's weights (times the inner sampler's) as the info: TorchRL
itself gathers the kept rows and writes ``"index"`` and ``"priority_weight"``.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from tensordict import TensorDictBase
from torchrl.data.replay_buffers.samplers import RandomSampler, Sampler

from .transform import LaBER

__all__ = ["LaBERSampler"]


class LaBERSampler(Sampler):
    """Sample a replay buffer through LaBER: ``m * B`` rows from ``inner``, ``B`` kept by ``laber``.

    ``rb.sample()`` then returns the ``B`` rows (``[B, 1 + C]`` for independent twin critics, see
    :class:`torchsample.LaBER`) with ``"index"`` their storage indices, ``"priority_weight"`` LaBER's
    weight times the inner sampler's (PER's importance weight for PER-LaBER, none for uniform),
    ``"target_value"`` their TD targets for :class:`torchsample.LaBERLoss` to reuse, and for
    ``[B, 1 + C]`` batches PER's ``"td_error"``. The buffer's ``batch_size`` is ``B``: the sampler
    draws ``m`` times as many (``laber.batch_size`` is not used).

    ``rb.update_priority(batch["index"], batch["td_error"])`` reaches the inner sampler (flattened,
    so that ``[B, 1 + C]`` batches work); so do ``extend``, ``state_dict``/``load_state_dict``,
    ``dumps``/``loads`` and ``default_priority``. The sampler's state is the inner sampler's: LaBER
    keeps none between draws.

    The rows are scored as the storage holds them: ``transform`` (a callable on the large batch,
    e.g. the buffer's own decoding transform) runs before scoring where the networks need it.

    Args:
        laber: the :class:`torchsample.LaBER` module that keeps the rows (its loss, weighting, eps,
            surrogate rung, critics and generator).
        m: the large batch is ``m * B`` rows (the paper uses 4).
        inner: the sampler that draws the large batch: ``RandomSampler()`` (default, LaBER) or a
            ``PrioritizedSampler`` (PER-LaBER).
        transform: optional callable applied to the large batch before scoring.

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from torchrl.data import LazyTensorStorage, TensorDictReplayBuffer
        >>> from torchrl.modules import QValueActor
        >>> from torchrl.objectives import DQNLoss
        >>> from torchsample import LaBER, LaBERSampler
        >>> actor = QValueActor(torch.nn.Linear(4, 2), in_keys=["observation"], action_space="categorical")
        >>> loss = DQNLoss(actor, loss_function="smooth_l1", delay_value=True, action_space="categorical")
        >>> loss.make_value_estimator(gamma=0.99)
        >>> rb = TensorDictReplayBuffer(storage=LazyTensorStorage(1000),
        ...                             sampler=LaBERSampler(LaBER(loss, batch_size=32), m=4), batch_size=32)
        >>> _ = rb.extend(TensorDict({"observation": torch.randn(100, 4), "action": torch.randint(2, (100,)),
        ...     ("next", "observation"): torch.randn(100, 4), ("next", "reward"): torch.randn(100, 1),
        ...     ("next", "done"): torch.zeros(100, 1, dtype=torch.bool),
        ...     ("next", "terminated"): torch.zeros(100, 1, dtype=torch.bool)}, [100]))
        >>> batch = rb.sample()
        >>> batch.batch_size, batch["priority_weight"].shape, batch["index"].shape
        (torch.Size([32]), torch.Size([32]), torch.Size([32]))
    """

    def __init__(self, laber: LaBER, *, m: int = 4, inner: Optional[Sampler] = None,
                 transform: Optional[Callable[[TensorDictBase], TensorDictBase]] = None) -> None:
        if not isinstance(laber, LaBER):
            raise TypeError(f"laber must be a torchsample.LaBER, got {type(laber).__name__}")
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"m must be an int >= 1, got {m!r}")
        if inner is not None and not isinstance(inner, Sampler):
            raise TypeError(f"inner must be a TorchRL Sampler, got {type(inner).__name__}")
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable, got {type(transform).__name__}")
        self.laber = laber
        self.m = m
        self.inner = RandomSampler() if inner is None else inner
        self.transform = transform

    def sample(self, storage, batch_size: int) -> tuple[torch.Tensor, dict]:
        large_index, inner_info = self.inner.sample(storage, self.m * batch_size)
        if isinstance(large_index, tuple):
            raise ValueError("LaBERSampler needs a one-dimensional storage (its inner sampler returned a tuple index)")
        large = storage.get(large_index)
        if self.transform is not None:
            large = self.transform(large)
        kept = self.laber.selection(large, batch_size)
        position = kept.index.to(large_index.device)
        keys = self.laber.keys
        weight = kept.weight.to(large_index.device)
        inner_weight = inner_info.get(keys.weight, None)
        if inner_weight is not None:
            weight = weight * torch.as_tensor(inner_weight, device=weight.device)[position].to(weight.dtype)
        info = {keys.weight: weight}
        if kept.target is not None:
            info[keys.target] = kept.target
        if kept.td_error is not None:
            info[keys.priority] = kept.td_error
        return large_index[position], info

    def update_priority(self, index: Any, priority: Any, *, storage=None) -> None:
        index, priority = torch.as_tensor(index), torch.as_tensor(priority)
        if index.shape == priority.shape:  # [B, 1 + C] batches: one storage index per priority
            index, priority = index.reshape(-1), priority.reshape(-1)
        self.inner.update_priority(index, priority, storage=storage)

    # Everything that is state or bookkeeping belongs to the inner sampler.
    def extend(self, index: torch.Tensor) -> None:
        self.inner.extend(index)

    def add(self, index: int) -> None:
        self.inner.add(index)

    def mark_update(self, index, *, storage=None) -> None:
        self.inner.mark_update(index, storage=storage)

    @property
    def default_priority(self) -> float:
        return self.inner.default_priority

    @property
    def ran_out(self) -> bool:
        return self.inner.ran_out

    def _empty(self) -> None:
        self.inner._empty()

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.inner.load_state_dict(state_dict)

    def dumps(self, path) -> None:
        self.inner.dumps(path)

    def loads(self, path) -> None:
        self.inner.loads(path)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.laber!r}, m={self.m}, inner={self.inner!r})"
