"""Per-row scores of the surrogate ladder's first two rungs, on one scale: every formula lives here.

LaBER (Lahire et al., 2022, Sec. 3.2) samples transition ``i`` in proportion to its per-sample
gradient norm ``||grad_theta l_i||``. The first two rungs of the ladder have closed forms from the
loss gradient at the network's output, ``g_i = dl_i / d out_i`` (:func:`output_gradient`):

==================  =====================================  ====================================
``loss``            per-sample loss ``l_i``                ``||g_i||``, the ``"output"`` rung
==================  =====================================  ====================================
``"l2"``            ``(q_i - y_i)^2`` (TorchRL's l2)       ``2 |q_i - y_i|``
``"huber"``         Huber, ``delta`` (smooth_l1 for 1)     ``min(|q_i - y_i|, delta)``
``"categorical"``   ``-sum_k m_ik log softmax(z_i)_k``     ``||softmax(z_i) - m_i||_2`` (App. D)
==================  =====================================  ====================================

The ``"last-layer"`` rung, the exact norm over the last linear layer ``out = W h + b``, is
``||g_i|| sqrt(||h_i||^2 + 1)`` (``||g_i|| ||h_i||`` without a bias), ``h_i`` the layer's input
(:func:`last_layer_norm`). Both rungs are exactly the gradient norm over their parameters of the loss
*as the loss module computes it*, the scale of the ``"exact"`` rung
(:func:`torchsample.gradnorms.exact_grad_norms`), so ``output <= last-layer <= exact`` holds row by row.
The paper writes ``|q - y|`` for the l2 rung, the gradient norm of ``(q - y)^2 / 2`` (its App. C
figures are on that scale): half of TorchRL's, the same draws and the same ``"mean"`` and ``"max"``
weights (``"lazy"``'s ``1 / p_i`` halves).

:func:`critic_priorities` is the one function that scores rows at these rungs: the CPU path of
:func:`torchsample.laber_select` (whose CUDA kernel computes the same formulas and is tested against
a reference of its own, ``kernels/laber_naive.py``), :class:`torchsample.LaBER`'s joint twin-critic
draw (``reduce="norm"``: the norm over every critic's parameters), :func:`torchsample.grad_norm_scores`
and the diagnostics. :func:`td_error` is PER's priority, ``|q - y|`` (the largest over twin critics).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .codes import LOSS_KINDS

__all__ = ["output_gradient", "critic_priorities", "last_layer_norm", "joint_norm", "td_error", "REDUCTIONS"]

REDUCTIONS = (None, "norm")  # critic_priorities' reduce=: one row per critic, or sqrt(sum_c p_c^2)


def output_gradient(pred: Tensor, target: Tensor, loss: str = "l2", *, huber_delta: float = 1.0) -> Tensor:
    """Per-sample gradient of the loss with respect to the critic's output, ``g_i = dl_i / d out_i``.

    ``2 (q_i - y_i)`` (``"l2"``), ``clamp(q_i - y_i, -delta, delta)`` (``"huber"``), ``softmax(z_i) - m_i``
    over the atoms (``"categorical"``; ``pred`` may be the chosen action's logits or log-probabilities,
    whose softmax is the same). Where the network has one output per action (DQN, C51) the gradient
    is zero at the other actions' outputs, so this is the whole output gradient. Float32, no graph.

    Args:
        pred: ``[..., N]`` values (``[..., N, K]`` logits or log-probabilities for ``"categorical"``).
        target: the same shape: TD targets, or the projected target distribution ``m``.
        loss: ``"l2"``, ``"huber"`` or ``"categorical"``.
        huber_delta: the Huber threshold (1.0 as in ``smooth_l1_loss``).

    Examples:
        >>> import torch
        >>> output_gradient(torch.tensor([0.0, 3.0]), torch.tensor([0.5, 1.0]))
        tensor([-1.,  4.])
        >>> output_gradient(torch.tensor([0.0, 3.0]), torch.tensor([0.5, 1.0]), "huber")
        tensor([-0.5000,  1.0000])
        >>> output_gradient(torch.zeros(1, 2), torch.tensor([[1.0, 0.0]]), "categorical")
        tensor([[-0.5000,  0.5000]])
    """
    _check_loss(loss, huber_delta)
    _check_pair("pred", pred, "target", target)
    if loss == "categorical" and pred.dim() < 2:
        raise ValueError(f"pred must be [..., N, K] logits for loss='categorical', got shape {tuple(pred.shape)}")
    pred, target = pred.detach().float(), target.detach().float()
    if loss == "l2":
        return 2.0 * (pred - target)
    if loss == "huber":
        return (pred - target).clamp_(-huber_delta, huber_delta)
    return torch.softmax(pred, dim=-1) - target


def critic_priorities(
    pred: Tensor,
    target: Tensor,
    loss: str = "l2",
    *,
    features: Optional[Tensor] = None,
    bias: bool = True,
    huber_delta: float = 1.0,
    reduce: Optional[str] = None,
) -> Tensor:
    """Each row's gradient norm at the ``"output"`` rung, or at ``"last-layer"`` with ``features``.

    ``p_i = ||g_i||`` (the module's table), times ``sqrt(||h_i||^2 + 1)`` (``||h_i||`` with
    ``bias=False``) where ``features`` ``h`` are given. Twin critics score ``[C, N]``:
    ``reduce="norm"`` gives ``sqrt(sum_c p_{c,i}^2)``, the norm over every critic's parameters
    (one shared draw, GER's priority over both critics).

    Args:
        pred: ``[N]`` or ``[C, N]`` predictions (``[..., N, K]`` logits for ``"categorical"``).
        target: the same shape (a ``[N]`` target is broadcast over the critics).
        loss: ``"l2"``, ``"huber"`` or ``"categorical"``.
        features: ``[..., N, D]`` inputs of the last linear layer in the forward that gave ``pred``.
        bias: whether that layer has a bias.
        huber_delta: the Huber threshold.
        reduce: ``None`` (a row per critic) or ``"norm"`` (over the first dim, the critics).

    Returns:
        float32 ``[..., N]`` (``[N]`` with ``reduce="norm"``), no graph.

    Examples:
        >>> import torch
        >>> q, y = torch.tensor([[0.0, 3.0], [1.0, 1.0]]), torch.tensor([0.5, 1.0])   # 2 critics, N = 2
        >>> critic_priorities(q, y)
        tensor([[1., 4.],
                [1., 0.]])
        >>> critic_priorities(q, y, reduce="norm")
        tensor([1.4142, 4.0000])
        >>> h = torch.tensor([[[0.0, 0.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 0.0]]])   # ||h|| = 0, 5 / 0, 0
        >>> critic_priorities(q, y, features=h, bias=False)
        tensor([[ 0., 20.],
                [ 0.,  0.]])
    """
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    if isinstance(target, Tensor) and isinstance(pred, Tensor) and target.shape != pred.shape:
        target = target.expand_as(pred)
    g = output_gradient(pred, target, loss, huber_delta=huber_delta)
    norm = torch.linalg.vector_norm(g, dim=-1) if loss == "categorical" else g.abs_()
    if features is not None:
        norm = last_layer_norm(norm, features, bias=bias)
    return joint_norm(norm) if reduce == "norm" else norm


def last_layer_norm(output_grad_norm: Tensor, features: Tensor, *, bias: bool = True) -> Tensor:
    """Exact per-sample gradient norm with respect to a linear layer's weight and bias.

    For ``out_i = W h_i + b`` the per-sample gradients are ``g_i h_i^T`` (rank one) and ``g_i``, so

        ``||grad_(W, b) l_i|| = ||g_i|| * sqrt(||h_i||^2 + 1)``   (``||g_i|| * ||h_i||`` without bias)

    from the output gradient's norm ``||g_i||`` and the layer's input ``h_i``
    (:func:`torchsample.gradnorms.capture_last_layer_input`). Exact when the layer sees each sample
    once through a 2-D input ``[N, F]`` (MLPs, the MinAtar and Atari networks).

    Args:
        output_grad_norm: ``[..., N]`` norms ``||g_i||`` (one row per critic for ``[C, N]``).
        features: ``[..., N, F]`` the layer's inputs.
        bias: whether the layer has a bias.

    Returns:
        ``[..., N]`` float32 norms, no graph.

    Examples:
        >>> import torch
        >>> h = torch.tensor([[0.0, 0.0], [3.0, 4.0]])          # ||h|| = 0 and 5
        >>> last_layer_norm(torch.tensor([2.0, 1.0]), h)        # 2 * 1 and 1 * sqrt(26)
        tensor([2.0000, 5.0990])
        >>> last_layer_norm(torch.tensor([2.0, 1.0]), h, bias=False)
        tensor([0., 5.])
    """
    if not isinstance(output_grad_norm, Tensor) or not isinstance(features, Tensor):
        raise TypeError("last_layer_norm: output_grad_norm and features must be tensors")
    if features.dim() < 2 or output_grad_norm.shape != features.shape[:-1]:
        raise ValueError(
            f"last_layer_norm: features must be [..., N, F] with output_grad_norm [..., N], "
            f"got {tuple(features.shape)} and {tuple(output_grad_norm.shape)}"
        )
    # Few, in-place ops: on one CPU core at N = 128 each extra op is a visible share of the forward.
    h_norm = torch.linalg.vector_norm(features.detach().float(), dim=-1)
    factor = h_norm.square_().add_(1.0).sqrt_() if bias else h_norm
    return output_grad_norm.detach().float().mul(factor)


def joint_norm(norms: Tensor) -> Tensor:
    """``sqrt(sum_c n_{c,i}^2)`` of ``[C, N]`` per-critic gradient norms (at any rung): the norm of each
    row's gradient over every critic's parameters, as the critics' parameters are disjoint; ``[N]``
    norms are returned as they are.

    Examples:
        >>> import torch
        >>> joint_norm(torch.tensor([[3.0, 0.0], [4.0, 1.0]]))
        tensor([5., 1.])
    """
    return norms.square().sum(0).sqrt() if norms.dim() > 1 else norms


def td_error(pred: Tensor, target: Tensor) -> Tensor:
    """PER's priority of each row: ``|q_i - y_i|`` (Schaul et al.; TorchRL's ``DQNLoss`` writes ``TD^2``),
    the largest over the critics for ``[C, N]`` predictions. Float32, no graph.

    Examples:
        >>> import torch
        >>> td_error(torch.tensor([[0.0, 3.0], [1.0, 1.0]]), torch.tensor([0.5, 1.0]))
        tensor([0.5000, 2.0000])
    """
    _check_pair("pred", pred, "target", target.expand_as(pred) if isinstance(target, Tensor) else target)
    error = (pred.detach().float() - target.detach().float()).abs_()
    return error.amax(0) if error.dim() > 1 else error


def _check_loss(loss: str, huber_delta: float) -> None:
    if loss not in LOSS_KINDS:
        raise ValueError(f"loss must be one of {LOSS_KINDS}, got {loss!r}")
    if loss == "huber" and not huber_delta > 0:
        raise ValueError(f"huber_delta must be > 0, got {huber_delta}")


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
