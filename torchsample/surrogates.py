"""The ``"output"`` rung of the surrogate ladder: cheap stand-ins for the per-sample gradient norm.

LaBER (Lahire et al., 2022, Sec. 3.2) samples transition ``i`` with probability proportional to
``||dL(q_i, y_i)/dq_i||``, the norm of the loss gradient with respect to the network's output. It
equals the full per-sample gradient norm up to the factor ``||d q_i / d theta||``, which the paper
treats as roughly constant across samples. For the usual losses that norm has a closed form:

=====================  ==========================================================
loss                   surrogate ``p_i``
=====================  ==========================================================
L2 ``(q - y)^2 / 2``   ``|q_i - y_i|``
Huber (``delta``)      ``min(|q_i - y_i|, delta)``
C51 cross-entropy      ``|| softmax(z_i) - m_i ||_2`` over the atoms (App. D)
=====================  ==========================================================

These are the plain-torch definitions, one per ``loss=`` of :func:`torchsample.laber_select`, whose
CPU path calls them and whose fused CUDA kernel is tested against them. The sharper rungs,
``"last-layer"`` and ``"exact"``, are in :mod:`torchsample.gradnorms`.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["td_priority", "categorical_priority"]


def td_priority(pred: Tensor, target: Tensor, *, loss: str = "l2", huber_delta: float = 1.0) -> Tensor:
    """Surrogate priority of a scalar-output critic: the TD error's gradient norm.

    ``p = |pred - target|`` for ``loss="l2"`` and ``p = min(|pred - target|, huber_delta)`` for
    ``loss="huber"`` (the derivative of the Huber loss is the TD error clipped to ``huber_delta``).
    Computed in float32 whatever the input dtype; no gradient flows through it.

    Args:
        pred: predicted values ``q_i``, any shape (e.g. ``[N]`` or ``[C, N]`` for ``C`` critics).
        target: TD targets ``y_i``, same shape, dtype and device as ``pred``.
        loss: ``"l2"`` (default) or ``"huber"``.
        huber_delta: the Huber threshold; 1.0 as in ``smooth_l1_loss``.

    Examples:
        >>> import torch
        >>> from torchsample import td_priority
        >>> td_priority(torch.tensor([0.0, 3.0]), torch.tensor([0.5, 1.0]))
        tensor([0.5000, 2.0000])
        >>> td_priority(torch.tensor([0.0, 3.0]), torch.tensor([0.5, 1.0]), loss="huber")
        tensor([0.5000, 1.0000])
    """
    if loss not in ("l2", "huber"):
        raise ValueError(f"td_priority: loss must be 'l2' or 'huber', got {loss!r}")
    _check_pair("pred", pred, "target", target)
    delta = (pred.detach().float() - target.detach().float()).abs_()
    if loss == "huber":
        if not huber_delta > 0:
            raise ValueError(f"td_priority: huber_delta must be > 0, got {huber_delta}")
        delta = delta.clamp_(max=huber_delta)
    return delta


def categorical_priority(logits: Tensor, target: Tensor) -> Tensor:
    """Surrogate priority of a distributional (C51) critic, Lahire et al. App. D.

    ``p_i = || softmax(z_i) - m_i ||_2`` over the last (atom) dimension: the gradient of the
    cross-entropy ``-sum_k m_ik log softmax(z_i)_k`` with respect to the logits ``z_i``.

    Args:
        logits: ``[..., N, K]`` logits of the chosen action's return distribution.
        target: ``[..., N, K]`` projected target distribution ``m_i`` (rows sum to 1).

    Returns:
        ``[..., N]`` float32 priorities.

    Examples:
        >>> import torch
        >>> from torchsample import categorical_priority
        >>> logits = torch.zeros(1, 2)                 # uniform over 2 atoms
        >>> categorical_priority(logits, torch.tensor([[1.0, 0.0]]))
        tensor([0.7071])
    """
    _check_pair("logits", logits, "target", target)
    if logits.dim() < 2:
        raise ValueError(f"categorical_priority: logits must be [..., N, K], got shape {tuple(logits.shape)}")
    probs = torch.softmax(logits.detach().float(), dim=-1)
    return torch.linalg.vector_norm(probs - target.detach().float(), dim=-1)


def _check_pair(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    """Shape, dtype and device agreement of two inputs, with errors that name them."""
    if not isinstance(a, Tensor) or not isinstance(b, Tensor):
        raise TypeError(f"{name_a} and {name_b} must be tensors, got {type(a).__name__} and {type(b).__name__}")
    if not a.is_floating_point():
        raise TypeError(f"{name_a} must be a floating-point tensor, got {a.dtype}")
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise TypeError(f"{name_a} and {name_b} must have the same dtype, got {a.dtype} and {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"{name_a} and {name_b} must be on the same device, got {a.device} and {b.device}")
