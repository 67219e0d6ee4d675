"""LaBER and GER on TorchRL's sampler extension point.

A replay buffer asks its sampler for ``B`` storage indices and the info to write beside the rows. A LaBER
sampler draws ``m * B`` rows, reads them from the storage, lets :class:`torchsample.LaBER` choose ``B``
of them, and returns their storage indices with LaBER's weights (times the large draw's own) as the info:
TorchRL itself gathers the kept rows and writes ``"index"`` and ``"priority_weight"``.

=====================================  ==========================================================
sampler                                the large batch of ``m * B`` rows is drawn by
=====================================  ==========================================================
``LaBERSampler(laber, m, inner=...)``  ``inner``: ``RandomSampler()`` (LaBER), or another sampler
                                       of transitions (e.g. ``SamplerWithoutReplacement``)
``PrioritizedLaBERSampler(laber, ...)`` PER: it *is* a TorchRL ``PrioritizedSampler`` (PER-LaBER)
``GERLaBERSampler(laber, ...)``        GER: it *is* a :class:`GERSampler` (GER-LaBER)
``GERSampler(loss, ...)``              (no LaBER) PER with exact gradient-norm priorities
=====================================  ==========================================================

The prioritized ones are subclasses of TorchRL's ``PrioritizedSampler``: its priority trees, updates,
``alpha``/``beta`` (and TorchRL's schedulers), ``state_dict`` and pickling are theirs by inheritance, and
TorchRL's buffers, which check ``isinstance(sampler, PrioritizedSampler)`` before they hand priorities
on, treat them as PER. Only ``sample`` (the large draw, then LaBER) and ``update_priority`` (the
``[B, 1 + C]`` batches of independent twin critics) are LaBER's.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any, Optional

import torch
from tensordict import TensorDictBase, is_tensorclass
from torch import Tensor, nn
from torchrl.data.replay_buffers.samplers import PrioritizedSampler, RandomSampler, Sampler, SliceSampler

from .scoring import score_rows
from .surrogates import joint_norm
from .transform import LaBER
from .views import PrivateCritic

__all__ = ["LaBERSampler", "PrioritizedLaBERSampler", "GERSampler", "GERLaBERSampler", "LaBERDraw"]

_RECENT = 16  # [B, 1 + C] samples remembered, to recognise their first column in a reduced priority update


class LaBERDraw:
    """The base of every LaBER sampler (``isinstance(sampler, LaBERDraw)``), and what each does: draw ``m * B``
    rows (:meth:`_draw_large`, the next class in the MRO's ``sample``), let LaBER keep ``B`` of them, and hand
    the ``[B, 1 + C]`` batches' priorities on per row.

    The draw, from :meth:`sample` to the kernel: ``_draw_large`` (``m * B`` storage indices) ->
    ``storage.get`` and :func:`_collate` (one TensorDict) -> ``transform`` -> ``LaBER.selection``
    (:mod:`torchsample.scoring` scores the rows with LaBER's private copy of the loss,
    :func:`torchsample.laber_select` draws ``B``) -> the kept rows' storage indices and weights.
    """

    def _init_laber(self, laber: LaBER, m: int, transform: Optional[Callable], compile: bool) -> None:
        if not isinstance(laber, LaBER):
            raise TypeError(f"laber must be a torchsample.LaBER, got {type(laber).__name__}")
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"m must be an int >= 1, got {m!r}")
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable, got {type(transform).__name__}")
        self.laber: Optional[LaBER] = laber
        self.m = m
        self.transform = transform
        self.compile = bool(compile)
        self._lock = threading.Lock()
        self._compiled: Optional[tuple[LaBER, Callable]] = None
        self._actor_rows: deque = deque(maxlen=_RECENT)

    def attach(self, laber: LaBER):
        """Give an unpickled sampler (which left its loss module behind) the LaBER module to draw with."""
        if not isinstance(laber, LaBER):
            raise TypeError(f"laber must be a torchsample.LaBER, got {type(laber).__name__}")
        self.laber = laber
        return self

    def _draw_large(self, storage, n: int) -> tuple[Any, dict]:
        return super().sample(storage, n)

    def sample(self, storage, batch_size: int) -> tuple[Any, dict]:
        laber = self.laber
        if laber is None:
            raise RuntimeError(
                "this LaBER sampler was unpickled (or deep-copied) without its LaBER module, whose networks must be "
                "the ones being trained: give it one with sampler.attach(LaBER(loss_module, batch_size))"
            )
        with self._lock:  # prefetch threads: the large batch and the kept rows from one stretch of the generator
            large_index, large_info = self._draw_large(storage, self.m * batch_size)
            large = _collate(storage.get(large_index))
            if large.batch_dims != 1:
                raise ValueError(
                    "LaBER scores one transition per storage row; this storage's rows have a shape of their own, "
                    f"{tuple(large.batch_size[1:])} (trajectories?): store single transitions, e.g. with "
                    "rb.extend(trajectories.reshape(-1)), or a storage with ndim=2"
                )
            if "index" not in large.keys():  # rows written outside a TensorDictReplayBuffer
                flat = torch.stack(large_index, -1) if isinstance(large_index, tuple) else large_index
                large.set("index", flat.to(large.device) if large.device is not None else flat)
            if self.transform is not None:
                large = self.transform(large)
            if self.compile:
                kept = self._compiled_selection(laber)(large, batch_size)
            else:
                kept = laber.selection(large, batch_size, generator=self._rng)
        keys = laber.keys
        on = large_index[0].device if isinstance(large_index, tuple) else large_index.device
        position = kept.index.to(on)
        weight = kept.weight.to(on)
        large_weight = large_info.get(keys.weight, None)  # PER's importance weight of the large draw
        if large_weight is not None:
            weight = weight * torch.as_tensor(large_weight, device=on)[position].to(weight.dtype)
        if self.transform is not None and keys.weight in large.keys():  # e.g. LFIW's, over the large batch
            weight = weight * large.get(keys.weight).to(on)[position].to(weight.dtype)
        info = {keys.weight: weight}
        if kept.target is not None:
            info[keys.target] = kept.target
        if kept.td_error is not None:
            info[keys.priority] = kept.td_error
        # ndim=2 storages index a row by one tensor per dimension: the kept rows' are those tensors' rows.
        index = tuple(i[position] for i in large_index) if isinstance(large_index, tuple) else large_index[position]
        if position.dim() == 2 and not isinstance(index, tuple):  # see update_priority
            self._actor_rows.append(index[:, 0])
        return index, info

    def _compiled_selection(self, laber: LaBER) -> Callable:
        """``laber.selection`` compiled once per LaBER module: the scoring forward, the surrogate and the draw
        in one graph (fixed shapes, ``m * B`` rows). Its draws come from LaBER's own random state (torch's
        default generator on CPU, the kernel's state on CUDA): a compiled graph takes no ``torch.Generator``."""
        if self._compiled is None or self._compiled[0] is not laber:

            def selection(large: TensorDictBase, batch_size: int):
                return laber.selection(large, batch_size)

            self._compiled = (laber, torch.compile(selection, dynamic=False))
        return self._compiled[1]

    def can_sample(self, storage, batch_size: int) -> bool:
        return super().can_sample(storage, self.m * batch_size)

    def update_priority(self, index: Any, priority: Any, *, storage=None) -> None:
        """``[B, 1 + C]`` batches (independent twin critics): one priority per cell, flattened, so every
        critic's row gets its own. TorchRL's ``rb.update_tensordict_priority(batch)`` cannot deliver them: it
        reduces a 2-D batch to its first column (a trajectory's rule), the actor's uniform rows, with the
        largest priority of each row; a call that does so is refused, with the call that works."""
        index, priority = torch.as_tensor(index), torch.as_tensor(priority)
        ndim = getattr(storage, "ndim", 1) or 1
        if priority.numel() > 1 and index.numel() == priority.numel() * ndim:
            # One priority per cell of a [B] or [B, 1 + C] batch (for an ndim=2 storage, each cell's
            # coordinates): one row of the index per priority.
            index, priority = index.reshape(-1, ndim) if ndim > 1 else index.reshape(-1), priority.reshape(-1)
        if index.dim() == 1 and priority.dim() == 1 and self._is_reduced(index):
            raise ValueError(
                "these priorities are those of a [B, 1 + C] LaBER batch (independent twin critics) reduced to its "
                "first column, as rb.update_tensordict_priority(batch) and rb.update_priority(batch) do: the critics' "
                "rows would not get theirs. Call rb.update_priority(batch['index'], batch['td_error'])"
            )
        super().update_priority(index, priority, storage=storage)

    def _is_reduced(self, index: Tensor) -> bool:
        """Whether ``index`` is the first column of a ``[B, 1 + C]`` sample this sampler returned lately."""
        return any(r.shape == index.shape and torch.equal(r.to(index.device), index) for r in list(self._actor_rows))

    def __getstate__(self) -> dict:
        # The loss module stays behind (see LaBERSampler), the generator too (as TorchRL's samplers do).
        state = super().__getstate__()
        state = dict(state if state is not None else self.__dict__)
        state.update(laber=None, _lock=None, _compiled=None, _actor_rows=None)
        state.pop("_rng", None)
        return state

    def __setstate__(self, state: dict) -> None:
        state = {**state, "_lock": threading.Lock(), "_actor_rows": deque(maxlen=_RECENT)}
        if hasattr(super(), "__setstate__"):
            super().__setstate__(state)
        else:
            self.__dict__.update(state)

    def _laber_repr(self) -> str:
        return "detached" if self.laber is None else repr(self.laber)


class LaBERSampler(LaBERDraw, Sampler):
    """Sample a replay buffer through LaBER: ``m * B`` rows from ``inner``, ``B`` kept by ``laber``.

    ``rb.sample()`` then returns the ``B`` rows (``[B, 1 + C]`` for independent twin critics, see
    :class:`torchsample.LaBER`) with ``"index"`` their storage indices, ``"priority_weight"`` LaBER's
    weight, ``"target_value"`` their TD targets for :class:`torchsample.LaBERLoss` to reuse, and for
    ``[B, 1 + C]`` batches PER's ``"td_error"``. The buffer's ``batch_size`` is ``B``: the sampler
    draws ``m`` times as many (``laber.batch_size`` is not used). PER-LaBER and GER-LaBER are
    :class:`PrioritizedLaBERSampler` and :class:`GERLaBERSampler`.

    What works as with TorchRL's own samplers (``tests/test_sampler_contract.py``):

    * every storage of transitions: one-dimensional ones (``ListStorage``'s rows are stacked into one
      TensorDict before scoring) and ``ndim=2`` ones (a collector's ``[T, num_envs]`` batches kept whole;
      the draw is over transitions, the index one tensor per dimension as TorchRL's samplers return it);
      rows that are TensorDicts or tensorclasses (LaBER scores them with the loss's networks: plain tensors
      and pytrees are refused with a ``TypeError``);
    * priorities, for a :class:`PrioritizedLaBERSampler`: ``rb.update_priority(batch["index"],
      batch["td_error"])``, one priority per cell of a ``[B]`` or ``[B, 1 + C]`` batch (on an ``ndim=2``
      storage pass them flat, ``batch["index"].reshape(-1, 2)`` and ``batch["td_error"].reshape(-1)``:
      TorchRL transposes a 2-D priority there, its ``[envs, T]`` layout);
    * the buffer's ``generator=``: the large batch and LaBER's draw both come from it, so a seed gives the
      same rows, and restoring the generator's state repeats the next sample (without prefetching: its
      threads race for the generator, with TorchRL's own samplers too);
    * ``state_dict``/``load_state_dict``, ``dumps``/``loads``, iteration (``for batch in rb``, with an inner
      sampler without replacement too), ``prefetch`` (scored with the networks as they are when prefetched,
      up to ``prefetch`` updates before use; scoring runs on LaBER's private copy of the loss, so training
      in the main thread is not disturbed).

    **Pickling** (``pickle``, ``copy.deepcopy`` of the buffer) leaves the loss module behind: a copy of
    it would score rows with frozen networks while training updates the live ones. The unpickled
    sampler refuses to draw until :meth:`attach` gives it a :class:`torchsample.LaBER` again.

    **Not supported**, refused with an error that says so: rows that are trajectories (each stored row
    ``[T]`` steps) and ``SliceSampler`` (it draws sub-trajectories, LaBER draws transitions);
    a ``PrioritizedSampler`` as ``inner`` (use :class:`PrioritizedLaBERSampler`). TorchRL's
    ``consume_after_n_samples`` takes only its default ``RandomSampler`` (its own check).

    Args:
        laber: the :class:`torchsample.LaBER` module that keeps the rows (its loss, weighting, eps,
            surrogate rung, critics); its ``generator`` is used unless the buffer has one.
        m: the large batch is ``m * B`` rows (the paper uses 4).
        inner: the sampler that draws the large batch: ``RandomSampler()`` (default) or another sampler of
            transitions without priorities (e.g. ``SamplerWithoutReplacement()``).
        transform: optional callable applied to the large batch before scoring (e.g. the buffer's own
            decoding transform, or :class:`torchsample.lfiw.LFIW`); a weight it writes into the large batch
            (``"priority_weight"``) multiplies LaBER's.
        compile: score and draw in one ``torch.compile``d graph (compiled at the first sample, the shapes
            fixed at ``m * B`` rows). The rows then come from LaBER's own random state, not the buffer's
            ``generator`` (a compiled graph takes none): seed with ``torch.manual_seed``.

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

    def __init__(
        self,
        laber: LaBER,
        *,
        m: int = 4,
        inner: Optional[Sampler] = None,
        transform: Optional[Callable[[TensorDictBase], TensorDictBase]] = None,
        compile: bool = False,
    ) -> None:
        if inner is not None and not isinstance(inner, Sampler):
            raise TypeError(f"inner must be a TorchRL Sampler, got {type(inner).__name__}")
        if isinstance(inner, LaBERDraw):
            raise TypeError("inner is a LaBER sampler already: LaBER of LaBER is not a sampler this library offers")
        if isinstance(inner, PrioritizedSampler):
            raise TypeError(
                "PER-LaBER is a sampler of its own, which TorchRL's buffers treat as PER: "
                "PrioritizedLaBERSampler(laber, max_capacity, alpha, beta, m=4) (GERLaBERSampler for GER-LaBER)"
            )
        if isinstance(inner, SliceSampler):
            raise TypeError(
                f"{type(inner).__name__} draws sub-trajectories; LaBER draws transitions and scores each one: use "
                "RandomSampler (or PrioritizedLaBERSampler) over a storage of transitions (ndim=1, or ndim=2 for "
                "[T, num_envs] batches)"
            )
        self._init_laber(laber, m, transform, compile)
        self.inner = RandomSampler() if inner is None else inner

    def _draw_large(self, storage, n: int) -> tuple[Any, dict]:
        return self.inner.sample(storage, n)

    # The state and bookkeeping belong to the inner sampler, each member handed on by name.
    @property
    def _rng(self) -> Optional[torch.Generator]:
        # The buffer sets its generator here (ReplayBuffer.set_rng): the inner sampler draws the large batch
        # from it, LaBER the kept rows.
        return self.inner._rng

    @_rng.setter
    def _rng(self, generator: Optional[torch.Generator]) -> None:
        self.inner._rng = generator

    def update_priority(self, index: Any, priority: Any, *, storage=None) -> None:
        self.inner.update_priority(index, priority, storage=storage)

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

    def __getstate__(self) -> dict:
        return {**self.__dict__, "laber": None, "_lock": None, "_compiled": None, "_actor_rows": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock(), _actor_rows=deque(maxlen=_RECENT))
        self.inner._rng = None  # as TorchRL's samplers: the generator is the buffer's, set again by it

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._laber_repr()}, m={self.m}, inner={self.inner!r})"


class PrioritizedLaBERSampler(LaBERDraw, PrioritizedSampler):
    """PER-LaBER: TorchRL's ``PrioritizedSampler`` draws ``m * B`` rows (PER's weights), LaBER keeps ``B``.

    A ``PrioritizedSampler`` by inheritance: its priority tree, ``update_priority`` (``[B, 1 + C]``
    batches flattened, one priority per cell), ``rb.add``/``extend`` of rows that carry a priority,
    default priorities of rows already in a storage, ``alpha``/``beta`` and TorchRL's schedulers,
    ``state_dict``, ``dumps``/``loads`` and pickling are PER's; TorchRL's buffers treat it as PER. The
    kept rows' ``"priority_weight"`` is LaBER's weight times PER's importance weight. Everything
    else as :class:`LaBERSampler` (``m``, ``transform``, ``compile``, :meth:`attach` after pickling).

    Args:
        laber: the :class:`torchsample.LaBER` module that keeps the rows.
        max_capacity, alpha, beta, eps, *args, **kwargs: ``PrioritizedSampler``'s.
        m, transform, compile: as :class:`LaBERSampler`'s (keywords).

    Examples:
        >>> import torch
        >>> from torchrl.data import PrioritizedSampler
        >>> from torchrl.modules import QValueActor
        >>> from torchrl.objectives import DQNLoss
        >>> from torchsample import LaBER, PrioritizedLaBERSampler
        >>> loss = DQNLoss(QValueActor(torch.nn.Linear(4, 2), in_keys=["observation"], action_space="categorical"),
        ...                delay_value=True, action_space="categorical")
        >>> per_laber = PrioritizedLaBERSampler(LaBER(loss, batch_size=32), 1000, alpha=0.6, beta=0.4, m=4)
        >>> isinstance(per_laber, PrioritizedSampler), per_laber.beta
        (True, 0.4)
    """

    def __init__(
        self,
        laber: LaBER,
        max_capacity: int,
        alpha: float = 0.6,
        beta: float = 0.4,
        eps: float = 1e-8,
        *args,
        m: int = 4,
        transform: Optional[Callable[[TensorDictBase], TensorDictBase]] = None,
        compile: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(max_capacity, alpha, beta, eps, *args, **kwargs)
        self._init_laber(laber, m, transform, compile)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._laber_repr()}, m={self.m}, alpha={self.alpha}, beta={self.beta})"


class GERSampler(PrioritizedSampler):
    """Gradient Experience Replay (GER; Lahire, Geist and Rachelson, 2022): PER whose priorities are
    the rows' exact per-sample gradient norms.

    A TorchRL ``PrioritizedSampler`` (proportional, ``alpha``, ``beta``, ``eps``) whose
    :meth:`update_from` scores the rows an update used, after the update, with
    ``||grad_theta l_i||`` over every parameter of the critic (:func:`torchsample.grad_norm_scores`,
    ``"exact"``; over twin critics the norm over both critics' parameters, ``sqrt(sum_c n_c^2)``), and
    writes those as their priorities. GER-LaBER: :class:`GERLaBERSampler`.

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
        PrioritizedSampler.__init__(self, max_capacity, alpha, beta, eps, **kwargs)
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
        return {**PrioritizedSampler.__getstate__(self), "_critic": None}


class GERLaBERSampler(LaBERDraw, GERSampler):
    """GER-LaBER: :class:`GERSampler` (PER with exact gradient-norm priorities) draws ``m * B`` rows, LaBER
    keeps ``B``. A :class:`GERSampler` by inheritance (:meth:`update_from` after each update), otherwise as
    :class:`PrioritizedLaBERSampler`; GER scores with the loss of ``laber``.

    Examples:
        >>> import torch
        >>> from torchrl.modules import QValueActor
        >>> from torchrl.objectives import DQNLoss
        >>> from torchsample import GERLaBERSampler, LaBER
        >>> loss = DQNLoss(QValueActor(torch.nn.Linear(4, 2), in_keys=["observation"], action_space="categorical"),
        ...                delay_value=True, action_space="categorical")
        >>> loss.make_value_estimator(gamma=0.99)
        >>> GERLaBERSampler(LaBER(loss, batch_size=32), 1000, alpha=0.6, beta=0.4, m=4).m
        4
    """

    def __init__(
        self,
        laber: LaBER,
        max_capacity: int,
        alpha: float = 0.6,
        beta: float = 0.4,
        eps: float = 1e-8,
        *,
        m: int = 4,
        transform: Optional[Callable[[TensorDictBase], TensorDictBase]] = None,
        compile: bool = False,
        **kwargs,
    ) -> None:
        if not isinstance(laber, LaBER):
            raise TypeError(f"laber must be a torchsample.LaBER, got {type(laber).__name__}")
        super().__init__(laber.loss_module, max_capacity, alpha, beta, eps, **kwargs)
        self._init_laber(laber, m, transform, compile)

    def attach(self, laber: LaBER) -> GERLaBERSampler:
        """Give an unpickled sampler its LaBER module (GER scores with the same loss)."""
        LaBERDraw.attach(self, laber)
        GERSampler.attach(self, laber.loss_module)
        return self

    def __getstate__(self) -> dict:
        return {**LaBERDraw.__getstate__(self), "_critic": None}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._laber_repr()}, m={self.m}, alpha={self.alpha}, beta={self.beta})"


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
