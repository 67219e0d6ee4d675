"""Float32 plain-torch reference of :mod:`torchsample.kernels.laber`, step for step.

Self-contained, as a reference should be: its own few lines for the surrogates (the library's live in
:mod:`torchsample.surrogates`, which the kernel tests also hold this file to). Given the uniforms ``u``
the kernel would draw, it returns what the kernel computes: the same float32 priorities, and the same
draws up to where ``u * sum(p)`` lies within float64 rounding of a boundary of the cumulative sum
(the kernel sums in another order: tiles, chunks, items), so the kernel tests can hold the kernel to
it draw for draw.
"""

from __future__ import annotations

import torch
from torch import Tensor

from torchsample.codes import LossKind, Weighting


def laber_naive(
    pred: Tensor,
    target: Tensor,
    u: Tensor,
    loss: int,
    weighting: int,
    eps: float,
    huber_delta: float = 1.0,
    features: Tensor | None = None,
    bias: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """The kernel's algorithm on ``[C, N, K]`` inputs and ``[C, B]`` uniforms in ``[0, 1)``.

    ``p = ||g|| + eps`` in float32, ``||g||`` the output gradient norm of ``loss`` (``2 |q - y|``,
    ``min(|q - y|, delta)``, ``||softmax(z) - m||``), times ``sqrt(||h||^2 + 1)`` (``||h||`` without
    ``bias``) where ``features`` ``h`` (``[C, N, D]``, the last-layer rung) are given; ``cdf`` its
    float64 cumulative sum; ``index = min(#{i: cdf_i <= u * cdf_N}, last i with p_i > 0)``, and the
    last positive item if rounding lands on a zero; all-zero rows draw ``floor(u * N)`` with weight
    1. ``u`` is used in float64 (the kernel's uniforms have 52 bits).

    Examples:
        >>> import torch
        >>> from torchsample.codes import LossKind, Weighting
        >>> p = torch.tensor([[[0.0], [1.0], [3.0]]])
        >>> u = torch.tensor([[0.0, 0.3, 0.9]])
        >>> index, weight, priority = laber_naive(p, p, u, LossKind.PRIORITY, Weighting.MEAN, 0.0)
        >>> index.tolist(), priority.tolist()
        ([[1, 2, 2]], [[0.0, 1.0, 3.0]])
        >>> h = torch.tensor([[[0.0, 0.0], [3.0, 4.0], [0.0, 0.0]]])      # ||h|| = 0, 5, 0
        >>> laber_naive(p, p, torch.tensor([[0.5]]), LossKind.PRIORITY, Weighting.MEAN, 0.0, features=h)[2]
        tensor([[0.0000, 5.0990, 3.0000]])
    """
    loss = LossKind(loss)
    pred, target = pred.float(), target.float()
    if loss is LossKind.PRIORITY:
        p = pred[..., 0]
    elif loss is LossKind.CATEGORICAL:
        p = (torch.softmax(pred, -1) - target).norm(dim=-1)
    elif loss is LossKind.L2:
        p = 2 * (pred[..., 0] - target[..., 0]).abs()
    else:
        p = (pred[..., 0] - target[..., 0]).abs().clamp(max=huber_delta)
    if features is not None:
        h_sq = features.float().square().sum(-1)
        p = p * (h_sq + 1).sqrt() if bias else p * h_sq.sqrt()
    p = p + eps
    C, N = p.shape
    cdf = p.double().cumsum(-1)
    total = cdf[:, -1:]
    positions = torch.arange(N, device=p.device).expand(C, N)
    last_positive = torch.where(p > 0, positions, 0).amax(-1, keepdim=True)
    index = torch.searchsorted(cdf, u.double() * total, right=True).clamp(max=N - 1)
    index = torch.minimum(index, last_positive)
    index = torch.where(p.gather(-1, index) > 0, index, last_positive)
    empty = total <= 0
    index = torch.where(empty, (u.double() * N).long().clamp(max=N - 1), index)
    picked = p.gather(-1, index)
    if Weighting(weighting) is Weighting.MEAN:
        weight = p.mean(-1, keepdim=True) / picked
    elif Weighting(weighting) is Weighting.LAZY:
        weight = 1 / picked
    else:
        weight = picked.amin(-1, keepdim=True) / picked
    return index, torch.where(empty, 1.0, weight), p
