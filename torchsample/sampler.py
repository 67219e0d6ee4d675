"""LaBER and GER on TorchRL's sampler extension point: ``LaBERSampler`` and ``GERSampler``.

A replay buffer asks its sampler for ``B`` storage indices and the info to write beside the rows.
:class:`LaBERSampler` asks its inner sampler (uniform, ``PrioritizedSampler``, :class:`GERSampler`)
for ``m * B``, reads those rows from the storage, lets :class:`torchsample.LaBER` choose ``B`` of them,
and returns their storage indices with LaBER's weights (times the inner sampler's) as the info:
TorchRL itself gathers the kept rows and writes ``"index"`` and ``"priority_weight"``.

Everything that is state belongs to the inner sampler, and TorchRL reaches it through the wrapper:
priority updates (``rb.update_priority``, ``rb.update_tensordict_priority``, ``rb.add`` of a row that
carries a priority), the priorities of rows already in a storage, PER's ``alpha``/``beta`` (and
TorchRL's parameter schedulers), ``state_dict``/``dumps``/pickling, iteration. With a prioritized
inner sampler the wrapper *is* a ``PrioritizedSampler`` to TorchRL (:class:`PrioritizedLaBERSampler`),
as TorchRL's buffers check ``isinstance`` before they hand priorities on.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any, Optional

import torch
from tensordict import TensorDictBase, is_tensorclass
from torch import Tensor, nn
from torchrl.data.replay_buffers.samplers import PrioritizedSampler, RandomSampler, Sampler

from .critics import PrivateCritic
from .scoring import score_rows
from .surrogates import joint_norm
from .transform import LaBER

__all__ = ["LaBERSampler", "PrioritizedLaBERSampler", "GERSampler"]


class LaBERSampler(Sampler):
    """Sample a replay buffer through LaBER: ``m * B`` rows from ``inner``, ``B`` kept by ``laber``.

    ``rb.sample()`` then returns the ``B`` rows (``[B, 1 + C]`` for independent twin critics, see
    :class:`torchsample.LaBER`) with ``"index"`` their storage indices, ``"priority_weight"`` LaBER's
    weight times the inner sampler's (PER's importance weight for PER-LaBER, none for uniform),
    ``"target_value"`` their TD targets for :class:`torchsample.LaBERLoss` to reuse, and for
    ``[B, 1 + C]`` batches PER's ``"td_error"``. The buffer's ``batch_size`` is ``B``: the sampler
    draws ``m`` times as many (``laber.batch_size`` is not used).

    What works as with TorchRL's own samplers (``tests/test_sampler_contract.py``):

    * every one-dimensional storage (``ListStorage``'s rows are stacked into one TensorDict before
      scoring), rows that are TensorDicts or tensorclasses (LaBER scores them with the loss's networks:
      plain tensors and pytrees are refused with a ``TypeError``);
    * the buffer's ``generator=``: the large batch and LaBER's draw both come from it, so a seed
      gives the same rows, and restoring the generator's state repeats the next sample (without
      prefetching: its threads race for the generator, with TorchRL's own samplers too);
    * priorities: ``rb.update_priority(batch["index"], batch["td_error"])`` (flattened, so ``[B, 1 + C]``
      batches work), ``rb.update_tensordict_priority(batch)``, ``rb.add``/``extend`` of rows that carry
      a priority, default priorities for rows already in the storage, PER's ``alpha`` and ``beta`` and
      TorchRL's ``LinearScheduler``/``StepScheduler`` on them;
    * ``state_dict``/``load_state_dict``, ``dumps``/``loads``, iteration (``for batch in rb``, with an
      inner sampler without replacement too), ``prefetch``.

    **Pickling** (``pickle``, ``copy.deepcopy`` of the buffer) leaves the loss module behind: a copy of
    it would score rows with frozen networks while training updates the live ones. The unpickled
    sampler keeps its inner sampler's state and refuses to draw until :meth:`attach` gives it a
    :class:`torchsample.LaBER` again. **Prefetching** (``prefetch=k``) draws batches in TorchRL's
    background threads ahead of use: each is scored with the networks as they were when it was
    drawn, up to ``k`` updates before it is used (TorchRL's own PER has the same staleness of
    priorities); use ``prefetch=0`` (the default) for the paper's LaBER, where each batch is scored
    just before its update.

    **Not supported**, refused with a ``ValueError`` that says so: storages with more than one
    dimension (``ndim=2``) and rows that are trajectories (each stored row ``[T]`` steps): LaBER draws
    transitions, so store them flat. TorchRL's ``consume_after_n_samples`` takes only its default
    ``RandomSampler`` (its own check), as it does for ``PrioritizedSampler``.

    The rows are scored as the storage holds them: ``transform`` (a callable on the large batch,
    e.g. the buffer's own decoding transform, or :class:`torchsample.lfiw.LFIW`) runs before scoring;
    a weight it writes into the large batch (``"priority_weight"``) multiplies LaBER's.

    Args:
        laber: the :class:`torchsample.LaBER` module that keeps the rows (its loss, weighting, eps,
            surrogate rung, critics); its ``generator`` is used unless the buffer has one.
        m: the large batch is ``m * B`` rows (the paper uses 4).
        inner: the sampler that draws the large batch: ``RandomSampler()`` (default, LaBER), a
            ``PrioritizedSampler`` (PER-LaBER) or a :class:`GERSampler` (GER-LaBER).
        transform: optional callable applied to the large batch before scoring.
        compile: score and draw in one ``torch.compile``d graph (compiled at the first sample, the shapes
            fixed at ``m * B`` rows). The rows then come from LaBER's own random state, not the buffer's
            ``generator`` (a compiled graph takes none): seed with ``torch.manual_seed``.

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from torchrl.data import LazyTensorStorage, PrioritizedSampler, TensorDictReplayBuffer
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
        >>> per_laber = LaBERSampler(LaBER(loss, batch_size=32), inner=PrioritizedSampler(1000, alpha=0.6, beta=0.4))
        >>> isinstance(per_laber, PrioritizedSampler), per_laber.beta
        (True, 0.4)
    """

    def __new__(
        cls,
        laber: Optional[LaBER] = None,
        *,
        m: int = 4,
        inner: Optional[Sampler] = None,
        transform: Optional[Callable] = None,
        compile: bool = False,
    ):
        # A prioritized inner sampler makes the wrapper a PrioritizedSampler to TorchRL.
        if cls is LaBERSampler and isinstance(inner, PrioritizedSampler):
            cls = PrioritizedLaBERSampler
        return super().__new__(cls)

    def __init__(
        self,
        laber: LaBER,
        *,
        m: int = 4,
        inner: Optional[Sampler] = None,
        transform: Optional[Callable[[TensorDictBase], TensorDictBase]] = None,
        compile: bool = False,
    ) -> None:
        if not isinstance(laber, LaBER):
            raise TypeError(f"laber must be a torchsample.LaBER, got {type(laber).__name__}")
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"m must be an int >= 1, got {m!r}")
        if inner is not None and not isinstance(inner, Sampler):
            raise TypeError(f"inner must be a TorchRL Sampler, got {type(inner).__name__}")
        if isinstance(inner, LaBERSampler):
            raise TypeError("inner is a LaBERSampler already: LaBER of LaBER is not a sampler this library offers")
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable, got {type(transform).__name__}")
        self.__dict__.update(
            laber=laber,
            m=m,
            inner=RandomSampler() if inner is None else inner,
            transform=transform,
            compile=bool(compile),
            _generator=None,
            _lock=threading.Lock(),
            _compiled=None,
        )

    # The buffer sets its generator here (ReplayBuffer.set_rng): the inner sampler draws the large
    # batch from it, LaBER the kept rows.
    @property
    def _rng(self) -> Optional[torch.Generator]:
        return self.__dict__.get("_generator")

    @_rng.setter
    def _rng(self, generator: Optional[torch.Generator]) -> None:
        self.__dict__["_generator"] = generator
        self.inner._rng = generator

    def attach(self, laber: LaBER) -> LaBERSampler:
        """Give an unpickled sampler (which left its loss module behind) the LaBER module to draw with."""
        if not isinstance(laber, LaBER):
            raise TypeError(f"laber must be a torchsample.LaBER, got {type(laber).__name__}")
        self.__dict__["laber"] = laber
        return self

    def sample(self, storage, batch_size: int) -> tuple[Tensor, dict]:
        laber = self.__dict__.get("laber")
        if laber is None:
            raise RuntimeError(
                "this LaBERSampler was unpickled (or deep-copied) without its LaBER module, whose networks must be the "
                "ones being trained: give it one with sampler.attach(LaBER(loss_module, batch_size))"
            )
        with self._lock:  # prefetch threads: the large batch and the kept rows from one stretch of the generator
            large_index, large, inner_info, kept = self._draw(laber, storage, batch_size)
        position = kept.index.to(large_index.device)
        keys = laber.keys
        weight = kept.weight.to(large_index.device)
        inner_weight = inner_info.get(keys.weight, None)
        if inner_weight is not None:
            weight = weight * torch.as_tensor(inner_weight, device=weight.device)[position].to(weight.dtype)
        if self.transform is not None and keys.weight in large.keys():  # e.g. LFIW's, over the large batch
            weight = weight * large.get(keys.weight).to(weight.device)[position].to(weight.dtype)
        info = {keys.weight: weight}
        if kept.target is not None:
            info[keys.target] = kept.target
        if kept.td_error is not None:
            info[keys.priority] = kept.td_error
        return large_index[position], info

    def _draw(self, laber: LaBER, storage, batch_size: int):
        large_index, inner_info = self.inner.sample(storage, self.m * batch_size)
        if isinstance(large_index, tuple):
            raise ValueError("LaBERSampler needs a one-dimensional storage (its inner sampler returned a tuple index)")
        large = _collate(storage.get(large_index))
        if large.batch_dims != 1:
            raise ValueError(
                "LaBERSampler scores one transition per storage row; this storage's rows have a shape of their "
                f"own, {tuple(large.batch_size[1:])} (trajectories?): store single transitions, e.g. with "
                "rb.extend(trajectories.reshape(-1))"
            )
        if "index" not in large.keys():  # rows written outside a TensorDictReplayBuffer
            large.set("index", large_index.to(large.device) if large.device is not None else large_index)
        if self.transform is not None:
            large = self.transform(large)
        if self.compile:
            return large_index, large, inner_info, self._compiled_selection(laber)(large, batch_size)
        return large_index, large, inner_info, laber.selection(large, batch_size, generator=self._rng)

    def _compiled_selection(self, laber: LaBER) -> Callable:
        """``laber.selection`` compiled once per LaBER module: the scoring forward, the surrogate and the draw
        in one graph (fixed shapes, ``m * B`` rows). Its draws come from LaBER's own random state (torch's
        default generator on CPU, the kernel's state on CUDA): a compiled graph takes no ``torch.Generator``."""
        compiled = self.__dict__["_compiled"]
        if compiled is None or compiled[0] is not laber:

            def selection(large: TensorDictBase, batch_size: int):
                return laber.selection(large, batch_size)

            compiled = (laber, torch.compile(selection, dynamic=False))
            self.__dict__["_compiled"] = compiled
        return compiled[1]

    def update_priority(self, index: Any, priority: Any, *, storage=None) -> None:
        rows = _batch_being_prioritized()
        if rows is not None:
            index, priority = rows
        index, priority = torch.as_tensor(index), torch.as_tensor(priority)
        if index.shape == priority.shape:  # [B, 1 + C] batches: one storage index per priority
            index, priority = index.reshape(-1), priority.reshape(-1)
        self.inner.update_priority(index, priority, storage=storage)

    # Everything that is state or bookkeeping belongs to the inner sampler.
    def extend(self, index: Tensor) -> None:
        self.inner.extend(index)

    def add(self, index: int) -> None:
        self.inner.add(index)

    def mark_update(self, index, *, storage=None) -> None:
        self.inner.mark_update(index, storage=storage)

    def can_sample(self, storage, batch_size: int) -> bool:
        return self.inner.can_sample(storage, self.m * batch_size)

    @property
    def default_priority(self) -> float:
        return self.inner.default_priority

    @property
    def ran_out(self) -> bool:
        return self.inner.ran_out

    @ran_out.setter
    def ran_out(self, value: bool) -> None:
        self.inner.ran_out = value

    @property
    def _remaining_batches(self) -> int:
        return self.inner._remaining_batches

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

    def __getattr__(self, name: str):
        # Anything else the inner sampler has (its own attributes, e.g. PrioritizedSampler's
        # max_capacity) is read through the wrapper.
        inner = self.__dict__.get("inner")
        if inner is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(inner, name)

    def __getstate__(self) -> dict:
        # The loss module stays behind (see the class doc), the generator too (as TorchRL's samplers do).
        return {**self.__dict__, "laber": None, "_generator": None, "_lock": None, "_compiled": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    def __repr__(self) -> str:
        laber = self.__dict__.get("laber")
        return (
            f"{type(self).__name__}({'detached' if laber is None else repr(laber)}, m={self.m}, inner={self.inner!r})"
        )


class PrioritizedLaBERSampler(LaBERSampler, PrioritizedSampler):
    """PER-LaBER (or GER-LaBER): a :class:`LaBERSampler` over a ``PrioritizedSampler``, which TorchRL's
    buffers take for a ``PrioritizedSampler`` (``isinstance``) and whose prioritized state is the inner
    sampler's. ``LaBERSampler(laber, inner=PrioritizedSampler(...))`` returns one; ``alpha``, ``beta``
    and every other member of ``PrioritizedSampler`` reach the inner sampler."""

    def __init__(
        self,
        laber: LaBER,
        *,
        m: int = 4,
        inner: Optional[PrioritizedSampler] = None,
        transform: Optional[Callable[[TensorDictBase], TensorDictBase]] = None,
    ) -> None:
        if not isinstance(inner, PrioritizedSampler):
            raise TypeError(f"PrioritizedLaBERSampler needs a PrioritizedSampler inner, got {type(inner).__name__}")
        super().__init__(laber, m=m, inner=inner, transform=transform)  # PrioritizedSampler.__init__ never runs


def _forwarded(name: str, member):
    """A member of ``PrioritizedSampler`` that :class:`PrioritizedLaBERSampler` hands to its inner sampler."""
    if isinstance(member, property):
        return property(
            lambda self: getattr(self.inner, name),
            (lambda self, value: setattr(self.inner, name, value)) if member.fset else None,
            doc=member.__doc__,
        )

    def method(self, *args, **kwargs):
        return getattr(self.inner, name)(*args, **kwargs)

    method.__name__, method.__doc__ = name, getattr(member, "__doc__", None)
    return method


for _name, _member in vars(PrioritizedSampler).items():
    if _name.startswith("__") or hasattr(LaBERSampler, _name) and _name in vars(LaBERSampler):
        continue
    if isinstance(_member, property) or callable(_member):
        setattr(PrioritizedLaBERSampler, _name, _forwarded(_name, _member))


class GERSampler(PrioritizedSampler):
    """Gradient Experience Replay (GER; Lahire, Geist and Rachelson, 2022): PER whose priorities are
    the rows' exact per-sample gradient norms.

    A TorchRL ``PrioritizedSampler`` (proportional, ``alpha``, ``beta``, ``eps``) whose
    :meth:`update_from` scores the rows an update used, after the update, with
    ``||grad_theta l_i||`` over every parameter of the critic (:func:`torchsample.grad_norm_scores`,
    ``"exact"``; over twin critics the norm over both critics' parameters, ``sqrt(sum_c n_c^2)``), and
    writes those as their priorities. GER-LaBER: ``LaBERSampler(laber, inner=GERSampler(...))``,
    whose :meth:`update_from` reaches this one.

    Pickling leaves the loss module behind, as :class:`LaBERSampler` does (:meth:`attach`).

    Args:
        loss_module: the TorchRL loss whose critic is scored (a :class:`torchsample.critics.Critic` view).
        max_capacity, alpha, beta, eps, **kwargs: as ``PrioritizedSampler``'s.

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from torchrl.data import LazyTensorStorage, TensorDictReplayBuffer
        >>> from torchrl.modules import QValueActor
        >>> from torchrl.objectives import DQNLoss
        >>> from torchsample import GERSampler
        >>> loss = DQNLoss(QValueActor(torch.nn.Linear(4, 2), in_keys=["observation"], action_space="categorical"),
        ...                delay_value=True, action_space="categorical")
        >>> loss.make_value_estimator(gamma=0.99)
        >>> rb = TensorDictReplayBuffer(storage=LazyTensorStorage(1000), batch_size=8,
        ...                             sampler=GERSampler(loss, 1000, alpha=0.6, beta=0.4))
        >>> _ = rb.extend(TensorDict({"observation": torch.randn(100, 4), "action": torch.randint(2, (100,)),
        ...     ("next", "observation"): torch.randn(100, 4), ("next", "reward"): torch.randn(100, 1),
        ...     ("next", "done"): torch.zeros(100, 1, dtype=torch.bool),
        ...     ("next", "terminated"): torch.zeros(100, 1, dtype=torch.bool)}, [100]))
        >>> batch = rb.sample()
        >>> # ... the update on batch ...
        >>> rb.sampler.update_from(batch).shape      # the exact gradient norms, now the rows' priorities
        torch.Size([8])
    """

    def __init__(
        self,
        loss_module: nn.Module,
        max_capacity: int,
        alpha: float = 0.6,
        beta: float = 0.4,
        eps: float = 1e-8,
        **kwargs,
    ) -> None:
        super().__init__(max_capacity, alpha, beta, eps, **kwargs)
        self.__dict__["_critic"] = PrivateCritic(loss_module)  # scores with its own modules: no hook on the user's

    def attach(self, loss_module: nn.Module) -> GERSampler:
        """Give an unpickled sampler the loss module to score with."""
        self.__dict__["_critic"] = PrivateCritic(loss_module)
        return self

    def priorities(self, batch: TensorDictBase) -> Tensor:
        """``[N]`` exact gradient norms of the rows of ``batch`` (flattened), on the networks as they are."""
        critic = self.__dict__.get("_critic")
        if critic is None:
            raise RuntimeError("this GERSampler was unpickled without its loss module: sampler.attach(loss_module)")
        return joint_norm(score_rows(critic.view, batch.reshape(-1), "exact").norms)

    def update_from(self, batch: TensorDictBase) -> Tensor:
        """Scores the rows of ``batch`` (``[B]`` or ``[B, 1 + C]``, with their ``"index"``) and writes the
        norms as their priorities; returns them. Call it after the update, on the batch it used."""
        rows = batch.reshape(-1)
        priority = self.priorities(rows)
        self.update_priority(rows.get("index"), priority)
        return priority

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_critic": None}


def _collate(rows) -> TensorDictBase:
    """The large batch as one TensorDict: what a ``ListStorage`` returns is a list of rows, and a
    tensorclass's rows are scored as the TensorDict of its fields."""
    if isinstance(rows, (list, tuple)):
        if rows and all(isinstance(row, TensorDictBase) or is_tensorclass(row) for row in rows):
            rows = torch.stack(list(rows)).contiguous()  # a lazy stack becomes one TensorDict
        else:
            rows = rows[0] if rows else rows
    if is_tensorclass(rows):
        rows = rows.to_tensordict()
    if not isinstance(rows, TensorDictBase):
        raise TypeError(
            f"LaBER scores TensorDict rows with the loss's networks; this storage holds {type(rows).__name__}. "
            "Store transitions as TensorDicts (TensorDictReplayBuffer, or ReplayBuffer(...).extend(TensorDict(...)))"
        )
    return rows


def _batch_being_prioritized(depth: int = 6) -> Optional[tuple[Tensor, Tensor]]:
    """``(index, priority)`` of a ``[B, 1 + C]`` batch handed to ``rb.update_tensordict_priority``, read
    from that call's frame, else ``None``.

    TorchRL reduces a two-dimensional batch to its first column before it reaches the sampler (a
    trajectory's rule: the first step's index, the largest priority of the row), which for LaBER's
    independent twin critics would give the actor's uniform rows (column 0) the critics' rows'
    priorities, silently. Each row keeps its own here.
    """
    frame = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            return None
        if frame.f_code.co_name == "update_tensordict_priority":
            data, buffer = frame.f_locals.get("data"), frame.f_locals.get("self")
            if isinstance(data, TensorDictBase) and data.batch_dims == 2 and "index" in data.keys():
                priority = data.get(getattr(buffer, "priority_key", "td_error"), None)
                if priority is not None and priority.shape[:2] == data.shape:
                    return data.get("index"), priority.reshape(data.shape)
            return None
        frame = frame.f_back
    return None
