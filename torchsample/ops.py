"""The LaBER down-sampling ops: :func:`laber_downsample` and its fused form :func:`laber_select`.

Both draw ``batch_size`` indices per row i.i.d. with ``P(i) = p_i / sum_j p_j`` (with replacement),
where ``p = priorities + eps``, and return the importance weights of :mod:`torchsample.weights`.
A row whose priorities are all zero (possible only with ``eps=0``) is sampled uniformly, weight 1.

Where each runs:

* **CUDA**: one launch of the fused Triton kernel ``torch.ops.torchsample.laber_fused``
  (:mod:`torchsample.kernels.laber`): the priority (output or last-layer rung), ``+eps``, prefix
  sum, Philox uniforms, search and weights, with no host synchronisation. Its random state lives
  on the device (or is drawn from ``generator``), so the call can sit inside a captured CUDA graph.
  Priority *values* are not checked there, as that needs a host sync; set
  ``TORCHSAMPLE_CHECK_VALUES=1`` to check them at the cost of one sync per call.
* **CPU**: plain torch (``torch.multinomial``). A ``torch.library`` wrapper was measured here at
  about 50 us of overhead a call, more than the work itself, so there is none. Value checks ride
  on ``torch.multinomial``'s own: the fast path pays nothing for them. Values in ``(-eps, 0)`` are
  absorbed by ``eps`` and pass.
* **Under torch.compile** (``fullgraph=True`` works): value checks become
  ``torch._assert_async`` (a ``RuntimeError`` instead of a ``ValueError``) and ``generator`` is not
  supported.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .codes import LOSS_CODES, LOSS_KINDS, SURROGATES, WEIGHTING_CODES, WEIGHTINGS, LossKind
from .surrogates import _check_pair, critic_priorities
from .weights import importance_weights

__all__ = ["LaBERSample", "laber_downsample", "laber_select"]

CHECK_VALUES_ON_CUDA = os.environ.get("TORCHSAMPLE_CHECK_VALUES", "0") == "1"
_FLOAT_DTYPES = frozenset((torch.float32, torch.float16, torch.bfloat16, torch.float64))
_is_compiling = torch.compiler.is_compiling


class LaBERSample(NamedTuple):
    """What a LaBER selection returns: the down-sampling ops, and :meth:`torchsample.LaBER.selection`.

    Attributes:
        index: int64 ``[B]`` or ``[C, B]``, indices into ``0..N-1`` (``LaBER.selection`` with independent
            twin critics: ``[B, 1 + C]``, column 0 the actor's uniform rows, column ``1 + c`` critic ``c``'s).
        weight: float32, same shape as ``index``: the importance weights (1 in the actor's column).
        priority: float32 ``[N]`` or ``[C, N]``: the priorities the draw used, ``eps`` included.
        target: ``LaBER.selection`` only: the TD target of each kept row, same shape as ``index``; ``None``
            from the ops and with a custom ``prediction``.
        td_error: ``LaBER.selection`` with a ``[B, 1 + C]`` index only: each kept row's largest ``|TD|`` over
            the critics, PER's priority (the update trains each critic on other rows, so LaBER computes it).
    """

    index: Tensor
    weight: Tensor
    priority: Tensor
    target: Optional[Tensor] = None
    td_error: Optional[Tensor] = None


def laber_downsample(
    priorities: Tensor,
    batch_size: int,
    *,
    weighting: str = "mean",
    eps: float = 1e-6,
    generator: Optional[torch.Generator] = None,
    rng_state: Optional[Tensor] = None,
) -> LaBERSample:
    """Down-sample a large batch in proportion to its priorities (LaBER, Lahire et al., 2022).

    Draws ``batch_size`` indices per row i.i.d. with ``P(i) = p_i / sum_j p_j``,
    ``p = priorities + eps``, and weights them (``weighting``):

    * ``"mean"``: ``w_i = mean_j(p_j) / p_i``, so ``mean_i(w_i * l_i)`` is unbiased for the large
      batch's mean loss;
    * ``"lazy"``: ``w_i = 1 / p_i``;
    * ``"max"``: ``w_i = min_{j in minibatch}(p_j) / p_i``.

    Args:
        priorities: ``[N]``, or ``[C, N]`` with one row per critic; non-negative and finite.
            fp16/bf16/fp64 are computed in float32.
        batch_size: ``B``, the number of indices drawn per row (e.g. 32 from ``N = 4 * 32``).
        weighting: ``"mean"`` (default), ``"lazy"`` or ``"max"``.
        eps: added to every priority (cpprb's 1e-6 by default; 0 allowed).
        generator: a ``torch.Generator`` on the priorities' device, for reproducible draws.
        rng_state: CUDA only: the fused kernel's random state, an int64 ``[3 + S]`` tensor on the
            priorities' device from :func:`torchsample.kernels.laber.new_rng_state`, which the
            kernel advances in place. Owned by the caller (e.g. a module buffer created before
            capture or compile), it makes the call's draws independent of every other caller's and
            lets CUDA graphs and ``torch.compile(mode="reduce-overhead")`` replay fresh draws.
            Default: one shared state per device. Not with ``generator``; ignored on CPU.

    Returns:
        :class:`LaBERSample` ``(index, weight, priority)``.

    Examples:
        >>> import torch
        >>> from torchsample import laber_downsample
        >>> g = torch.Generator().manual_seed(0)
        >>> out = laber_downsample(torch.tensor([0.0, 1.0, 3.0, 0.0]), 8, eps=0.0, generator=g)
        >>> sorted(set(out.index.tolist()))          # zero-priority items are never drawn
        [1, 2]
        >>> out.weight[out.index == 1][0].item()     # mean(p) / p_1 = 1 / 1
        1.0
    """
    _check_common(batch_size, weighting, eps)
    if not isinstance(priorities, Tensor):
        raise TypeError(f"priorities must be a tensor, got {type(priorities).__name__}")
    dtype = priorities.dtype
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"priorities must be a floating-point tensor, got {dtype}")
    if priorities.dim() not in (1, 2) or priorities.numel() == 0:
        raise ValueError(f"priorities must be a non-empty [N] or [C, N] tensor, got shape {tuple(priorities.shape)}")
    if priorities.is_cuda:
        if CHECK_VALUES_ON_CUDA:
            _check_values(priorities.float(), "priorities")
        p3 = priorities.unsqueeze(-1)
        return _fused(p3, p3, None, batch_size, LossKind.PRIORITY, weighting, eps, 1.0, generator, rng_state)
    p = priorities if dtype is torch.float32 else priorities.float()
    # A cached 0-dim eps tensor: adding a Python float costs ~1.5 us more a call on CPU (measured).
    return _downsample(p + _scalar(eps), batch_size, weighting, generator, "priorities")


def laber_select(
    pred: Tensor,
    target: Tensor,
    batch_size: int,
    *,
    loss: str = "l2",
    surrogate: str = "output",
    features: Optional[Tensor] = None,
    bias: bool = True,
    weighting: str = "mean",
    eps: float = 1e-6,
    huber_delta: float = 1.0,
    generator: Optional[torch.Generator] = None,
    rng_state: Optional[Tensor] = None,
) -> LaBERSample:
    """Per-sample gradient-norm priorities and the LaBER down-sample in one call (one kernel launch on CUDA).

    The priority of row ``i`` is its gradient norm at a rung of the surrogate ladder
    (:func:`torchsample.surrogates.critic_priorities`, on the scale of the loss as TorchRL computes
    it), then the draw is :func:`laber_downsample`'s. ``"output"``, the norm at the network's output:

    * ``loss="l2"``: ``p_i = 2 |pred_i - target_i|`` (the loss ``(q - y)^2``); ``[N]`` or ``[C, N]``;
    * ``loss="huber"``: ``p_i = min(|pred_i - target_i|, huber_delta)``; same shapes;
    * ``loss="categorical"``: ``p_i = ||softmax(pred_i) - target_i||_2``; ``pred`` are logits (or
      log-probabilities) and ``target`` a distribution, ``[N, K]`` or ``[C, N, K]``.

    ``"last-layer"``, the exact norm with respect to the last linear layer's weight and bias: the
    output norm above times ``sqrt(||h_i||^2 + 1)`` (``||h_i||`` with ``bias=False``, a layer without
    bias), ``h_i = features[..., i, :]`` the penultimate features of the forward that computed ``pred``.

    ``"exact"`` needs the network, which this op does not see: use :class:`torchsample.LaBER`
    (``surrogate="exact"``), or :func:`torchsample.grad_norm_scores` /
    :func:`torchsample.gradnorms.exact_grad_norms` and then :func:`laber_downsample`.

    Args:
        pred: predictions (or logits) of the large batch, no gradient needed.
        target: TD targets (or target distributions), same shape, dtype and device as ``pred``.
        batch_size: ``B``, rows drawn per critic.
        loss: ``"l2"`` (default), ``"huber"`` or ``"categorical"``: the loss's output gradient.
        surrogate: ``"output"`` (default) or ``"last-layer"``.
        features: ``"last-layer"`` only: ``[N, D]`` or ``[C, N, D]`` penultimate features, any float
            dtype, on ``pred``'s device (e.g. 128 for the MinAtar network, 256 for a MuJoCo critic).
        bias: ``"last-layer"`` only: whether the last linear layer has a bias.
        weighting, eps, generator, rng_state: as in :func:`laber_downsample`.
        huber_delta: the Huber threshold (1.0, as ``smooth_l1_loss``).

    Returns:
        :class:`LaBERSample` ``(index, weight, priority)``; ``priority`` is ``[N]`` or ``[C, N]``.

    Examples:
        >>> import torch
        >>> from torchsample import laber_select
        >>> q, y = torch.randn(2, 128), torch.randn(2, 128)   # two critics, N = 128
        >>> out = laber_select(q, y, 32)
        >>> out.index.shape, out.weight.shape, out.priority.shape
        (torch.Size([2, 32]), torch.Size([2, 32]), torch.Size([2, 128]))
        >>> logits, m = torch.randn(128, 51), torch.softmax(torch.randn(128, 51), -1)
        >>> laber_select(logits, m, 32, loss="categorical").index.shape
        torch.Size([32])
        >>> h = torch.randn(2, 128, 64)                          # each critic's penultimate features
        >>> out = laber_select(q, y, 32, surrogate="last-layer", features=h, eps=0.0)
        >>> torch.allclose(out.priority, 2 * (q - y).abs() * (h.norm(dim=-1) ** 2 + 1).sqrt())
        True
    """
    _check_common(batch_size, weighting, eps)
    if loss not in LOSS_KINDS:
        raise ValueError(f"loss must be one of {LOSS_KINDS}, got {loss!r}")
    _check_surrogate(surrogate, features)
    if not huber_delta > 0:
        raise ValueError(f"huber_delta must be > 0, got {huber_delta}")
    _check_pair("pred", pred, "target", target)
    categorical = loss == "categorical"
    dims = (2, 3) if categorical else (1, 2)
    if pred.dim() not in dims:
        expected = "[N, K] or [C, N, K]" if categorical else "[N] or [C, N]"
        raise ValueError(f"pred must be {expected} for loss={loss!r}, got shape {tuple(pred.shape)}")
    if pred.shape[dims[0] - 1] == 0 or pred.numel() == 0:
        raise ValueError("pred is empty (N == 0 or K == 0): there is nothing to down-sample")
    rows = pred.shape[:-1] if categorical else pred.shape
    if features is not None:
        _check_features(features, rows, pred.device)
    if pred.is_cuda:
        if CHECK_VALUES_ON_CUDA:
            _check_values(torch.stack([pred.float(), target.float()]).abs(), "pred and target")
        pred3, target3 = (pred, target) if categorical else (pred.unsqueeze(-1), target.unsqueeze(-1))
        return _fused(
            pred3,
            target3,
            features,
            batch_size,
            LOSS_CODES[loss],
            weighting,
            eps,
            huber_delta,
            generator,
            rng_state,
            bias,
        )
    p = critic_priorities(pred, target, loss, features=features, bias=bias, huber_delta=huber_delta)
    # p is a fresh float32 tensor, so eps can go in place.
    return _downsample(
        p.add_(_scalar(eps)), batch_size, weighting, generator, "priorities computed from pred and target"
    )


# --------------------------------------------------------------------------------------------
# CPU path


_EPS_TENSORS: dict = {}


def _scalar(value: float):
    """``value`` as a cached 0-dim float32 tensor (a plain float while compiling, where it fuses)."""
    if _is_compiling():
        return value
    tensor = _EPS_TENSORS.get(value)
    if tensor is None:
        tensor = _EPS_TENSORS[value] = torch.tensor(value, dtype=torch.float32)
    return tensor


def _downsample(p: Tensor, batch_size: int, weighting: str, generator, name: str) -> LaBERSample:
    """Draw and weigh from float32 priorities ``p`` (``eps`` already added, not aliasing input)."""
    if _is_compiling():
        return _downsample_traceable(p, batch_size, weighting)
    try:
        index = torch.multinomial(p, batch_size, replacement=True, generator=generator)
    except RuntimeError:
        # multinomial refuses NaN/inf/negative values and all-zero rows: sort out which it was.
        _check_values(p, name)
        return _downsample_with_empty_rows(p, batch_size, weighting, generator)
    return LaBERSample(index, importance_weights(p, index, weighting), p)


def _downsample_with_empty_rows(p: Tensor, batch_size: int, weighting: str, generator) -> LaBERSample:
    """Rows whose priorities are all zero fall back to uniform sampling with weight 1."""
    empty = p.sum(-1, keepdim=True) <= 0
    index = torch.multinomial(torch.where(empty, 1.0, p), batch_size, replacement=True, generator=generator)
    weight = torch.where(empty, 1.0, importance_weights(p, index, weighting))
    return LaBERSample(index, weight, p)


def _downsample_traceable(p: Tensor, batch_size: int, weighting: str) -> LaBERSample:
    """The compile-friendly form: checks as ``torch._assert_async``, no data-dependent branch."""
    total = p.sum(-1, keepdim=True)
    torch._assert_async(
        torch.isfinite(total).all() & (p.amin() >= 0),
        "laber: priorities must be finite and non-negative",
    )
    empty = total <= 0
    index = torch.multinomial(torch.where(empty, 1.0, p), batch_size, replacement=True)
    weight = torch.where(empty, 1.0, importance_weights(p, index, weighting))
    return LaBERSample(index, weight, p)


# --------------------------------------------------------------------------------------------
# CUDA path


def _fused(
    pred3, target3, features, batch_size, loss_code, weighting, eps, huber_delta, generator, state, bias: bool = True
) -> LaBERSample:
    """One launch of the fused kernel on ``[C, N, K]`` inputs (and ``[C, N, D]`` features for the
    last-layer rung); squeezes the critic dim back.

    ``state`` is the caller's random state (``rng_state=``, checked by the launcher); without one,
    the device's default state, or a fresh one drawn from ``generator``.
    """
    from .kernels.laber import laber_fused_call, rng_state  # imported lazily: triton is only needed on CUDA

    if state is None:
        state = rng_state(pred3.device, generator)
    elif generator is not None:
        raise ValueError("pass generator or rng_state, not both")
    squeeze = pred3.dim() == 2
    if squeeze:
        pred3, target3 = pred3.unsqueeze(0), target3.unsqueeze(0)
        features = None if features is None else features.unsqueeze(0)
    index, weight, priority = laber_fused_call(
        pred3,
        target3,
        features,
        state,
        batch_size,
        int(loss_code),
        WEIGHTING_CODES[weighting],
        float(eps),
        float(huber_delta),
        bool(bias),
    )
    if squeeze:
        return LaBERSample(index.squeeze(0), weight.squeeze(0), priority.squeeze(0))
    return LaBERSample(index, weight, priority)


# --------------------------------------------------------------------------------------------
# Argument checks: Python-level checks cost nothing on the device; value checks are above.


def _check_common(batch_size, weighting: str, eps: float) -> None:
    # One cheap combined test first: this runs on every call of the hot path.
    if type(batch_size) is int and batch_size >= 1 and weighting in WEIGHTINGS and 0 <= eps < math.inf:
        return
    if isinstance(batch_size, bool) or not isinstance(batch_size, int):
        raise TypeError(f"batch_size must be an int, got {type(batch_size).__name__}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")


def _check_surrogate(surrogate: str, features: Optional[Tensor]) -> None:
    if surrogate == "output" and features is None or surrogate == "last-layer" and features is not None:
        return
    if surrogate == "exact":
        raise ValueError(
            "laber_select cannot compute surrogate='exact': it needs the network's parameters, which it does not "
            "see; use torchsample.LaBER(loss, B, surrogate='exact'), or torchsample.grad_norm_scores (or "
            "torchsample.gradnorms.exact_grad_norms) and then laber_downsample"
        )
    if surrogate not in SURROGATES:
        raise ValueError(f"surrogate must be one of {SURROGATES}, got {surrogate!r}")
    if features is None:
        raise ValueError("surrogate='last-layer' needs features=: the penultimate features [N, D] or [C, N, D]")
    raise ValueError("features= is the last-layer rung's input: pass surrogate='last-layer' with it")


def _check_features(features, rows: torch.Size, device: torch.device) -> None:
    if not isinstance(features, Tensor):
        raise TypeError(f"features must be a tensor, got {type(features).__name__}")
    if features.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"features must be a floating-point tensor, got {features.dtype}")
    if features.dim() != len(rows) + 1 or features.shape[:-1] != rows or features.shape[-1] == 0:
        shape = "[" + ", ".join(map(str, rows)) + ", D]"
        raise ValueError(
            f"features must be {shape} (one row of D > 0 features per prediction), got shape {tuple(features.shape)}"
        )
    if features.device != device:
        raise ValueError(f"features must be on pred's device {device}, got {features.device}")


def _check_values(p: Tensor, name: str) -> None:
    """Raise a ValueError naming ``name`` on NaN, inf or negative entries (one host sync)."""
    if torch.isnan(p).any():
        raise ValueError(f"{name} contain NaN")
    if torch.isinf(p).any():
        raise ValueError(f"{name} contain inf")
    if (p < 0).any():
        raise ValueError(f"{name} contain negative values")
