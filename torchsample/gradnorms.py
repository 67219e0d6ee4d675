"""Per-sample gradient norms that need the network: the last layer's input, and every parameter's norm.

LaBER (Lahire et al., 2022) samples transition ``i`` in proportion to its per-sample gradient norm
``||grad_theta l_i||``. The formulas of the ``"output"`` and ``"last-layer"`` rungs live in
:mod:`torchsample.surrogates`; this module gives what they cannot compute from outputs alone:

===============  ===================================================================================
``last-layer``   :func:`capture_last_layer_input`: the input ``h_i`` of the last ``nn.Linear``
                 (:func:`last_linear`) in the forward that computes the prediction, for
                 :func:`torchsample.surrogates.last_layer_norm`
``exact``        :func:`exact_grad_norms`: the norm over every parameter; by ghost norms (one forward,
                 one backward to the layers' outputs, no per-sample gradient of the network is
                 materialised) for ``nn.Linear`` and ``nn.Conv2d``, or by
                 ``torch.func.vmap(torch.func.grad(...))`` (:func:`per_sample_grads`), the reference
===============  ===================================================================================

The paper's App. C explains why the last rung matters: the output surrogate equals the gradient norm
up to ``||d q_i / d theta||``, which it treats as constant; Katharopoulos & Fleuret (2018) observe
that most of the variation of the per-sample gradient norm comes from the last layer, which
``last-layer`` captures exactly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

__all__ = [
    "last_linear",
    "capture_last_layer_input",
    "LayerInputCapture",
    "per_sample_grads",
    "exact_grad_norms",
    "GHOST_LAYERS",
]

GHOST_LAYERS = (nn.Linear, nn.Conv2d)  # the layers whose per-sample norms have a ghost form here
GRAD_NORM_METHODS = ("auto", "ghost", "vmap")


# ---------------------------------------------------------------------------------------------
# The last layer


def last_linear(module: nn.Module) -> nn.Linear:
    """The last ``nn.Linear`` of ``module`` in registration order (the output layer of an ``MLP``,
    a ``Sequential``, TorchRL's actors and value operators, the MinAtar network).

    Examples:
        >>> import torch
        >>> last_linear(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)))
        Linear(in_features=8, out_features=2, bias=True)
    """
    layer = None
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            layer = sub
    if layer is None:
        raise ValueError(f"{type(module).__name__} has no nn.Linear layer")
    return layer


class LayerInputCapture(contextlib.AbstractContextManager):
    """Holds the input of one layer from forwards run inside its ``with`` block (a forward hook).

    ``features`` is the input of the layer's most recent call, as the forward saw it (with its
    graph, and batched if the call ran under ``torch.vmap``: read it inside the vmapped function
    and return it from there, see :func:`capture_last_layer_input`). A capture that stays entered
    across calls (its hook registered once, outside ``torch.compile``, where registering it is a
    graph break) records only while ``recording`` is true, so that the other forwards of the
    network (the training step, TorchRL's vmapped critics) leave nothing behind.
    """

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer
        self.recording = True
        self._features: Tensor | None = None
        self._handle = None

    def _hook(self, module: nn.Module, inputs: tuple, output: Any) -> None:
        if self.recording:
            self._features = inputs[0]

    def __enter__(self) -> LayerInputCapture:
        self._features = None
        self._handle = self.layer.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()
        self._handle = None

    @property
    def features(self) -> Tensor:
        if self._features is None:
            raise RuntimeError(f"{type(self.layer).__name__} was not called inside the capture block")
        return self._features

    def pop(self) -> Tensor:
        """``features``, which the capture then forgets: a capture that stays entered across calls
        would otherwise keep the activation alive, and under ``torch.vmap`` a batched tensor must not
        outlive the vmapped function (``torch.compile`` fails on it: "Cannot access storage of
        BatchedTensorImpl", torch 2.14)."""
        features = self.features
        self._features = None
        return features


def capture_last_layer_input(module: nn.Module, layer: nn.Module | None = None) -> LayerInputCapture:
    """A context manager that captures the input of ``module``'s last ``nn.Linear`` (the penultimate
    features ``h``) from the forward that computes the prediction: no second pass.

    A forward hook on the layer object, so it sees every way TorchRL runs the network: a plain call,
    a functional call with swapped parameters (``params.to_module(module)``: the layer object stays,
    only its tensors change), the target parameters (enter the block around the online prediction
    only), and ``torch.vmap`` over stacked critic parameters (SAC, TD3). Under ``vmap`` the captured
    tensor is batched over the critics and lives only inside the vmapped function: enter the block
    *inside* that function and return ``features`` from it, and ``vmap`` hands back ``[C, N, F]``
    (second example). Read outside, it is a dead wrapper. Under ``torch.compile(fullgraph=True)``,
    enter the block outside the compiled function and read ``features`` inside it: the hook then
    traces into the graph, whereas registering it inside is a graph break ("Unsupported setattr()",
    torch 2.14).

    Args:
        module: the network (``loss.value_network``, ``loss.qvalue_network`` or a plain module).
        layer: the layer whose input to capture; default :func:`last_linear` of ``module``.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        >>> x, y = torch.randn(5, 4), torch.randn(5)
        >>> with capture_last_layer_input(net) as cap:
        ...     q = net(x).squeeze(-1)
        >>> from torchsample.surrogates import critic_priorities
        >>> critic_priorities(q, y, features=cap.features).shape     # the last-layer rung
        torch.Size([5])

        Two critics under ``torch.vmap`` (stacked parameters, one row set each):

        >>> from tensordict import TensorDict
        >>> params = torch.stack([TensorDict.from_module(net).data, TensorDict.from_module(net).data * 2])
        >>> def critic(p, rows):
        ...     with p.to_module(net), capture_last_layer_input(net) as cap:
        ...         q = net(rows).squeeze(-1)
        ...     return q, cap.features
        >>> q, h = torch.vmap(critic)(params, torch.randn(2, 5, 4))
        >>> q.shape, h.shape
        (torch.Size([2, 5]), torch.Size([2, 5, 8]))
    """
    return LayerInputCapture(last_linear(module) if layer is None else layer)


# ---------------------------------------------------------------------------------------------
# The whole network


def per_sample_grads(
    per_sample_loss: Callable[..., Tensor], params: Any, *inputs: Any, chunk_size: int | None = None
) -> Any:
    """Per-sample gradients by ``torch.func.vmap(torch.func.grad(...))``: the reference.

    ``grads[i] = grad_params per_sample_loss(params, *inputs[i:i+1])`` for each row ``i``, computed
    for the leaves of ``params`` that require grad; the others get zeros.

    Args:
        per_sample_loss: ``(params, *inputs) -> [N]`` per-sample losses; it runs the network with
            ``params`` (e.g. ``with params.to_module(net): ...`` or ``torch.func.functional_call``),
            and mixes no rows (no batch norm).
        params: a pytree of tensors: a dict, a ``TensorDict`` or TorchRL's ``TensorDictParams``
            (``loss.value_network_params``; a critic's ``loss.qvalue_network_params[c]``).
        inputs: tensors or tensordicts with a leading batch dimension ``N``.
        chunk_size: rows per vmapped chunk (``None``: all at once), to bound memory.

    Returns:
        ``params``' structure with a leading ``[N]`` on every leaf.

    Examples:
        >>> import torch
        >>> from torch.func import functional_call
        >>> net = torch.nn.Linear(3, 1)
        >>> params = dict(net.named_parameters())
        >>> def per_sample_loss(p, x, y):
        ...     return (functional_call(net, p, (x,)).squeeze(-1) - y) ** 2
        >>> grads = per_sample_grads(per_sample_loss, params, torch.randn(6, 3), torch.randn(6))
        >>> grads["weight"].shape, grads["bias"].shape
        (torch.Size([6, 1, 3]), torch.Size([6, 1]))
    """
    leaves, spec = _flatten_params(params)
    trained = [i for i, leaf in enumerate(leaves) if leaf.requires_grad]
    if not trained:
        raise ValueError("per_sample_grads: no tensor of params requires grad")
    fixed = [leaf.detach() for leaf in leaves]
    n = _batch_size(inputs)

    def one_sample(trained_leaves, *sample):
        full = list(fixed)
        for i, leaf in zip(trained, trained_leaves):
            full[i] = leaf
        losses = per_sample_loss(tree_unflatten(full, spec), *(x.unsqueeze(0) for x in sample))
        return losses.sum()

    grads = vmap(grad(one_sample), in_dims=(None, *(0,) * len(inputs)), chunk_size=chunk_size)(
        [fixed[i] for i in trained], *inputs
    )
    out = [leaf.new_zeros(n, *leaf.shape) for leaf in fixed]
    for i, g in zip(trained, grads):
        out[i] = g
    return tree_unflatten(out, spec)


def exact_grad_norms(
    module: nn.Module,
    per_sample_loss: Callable[..., Tensor],
    params: Any,
    *inputs: Any,
    method: str = "auto",
    chunk_size: int | None = None,
) -> Tensor:
    """Per-sample gradient norms over the parameters of ``module``: ``||grad_theta l_i||_2``, ``[N]``.

    ``method="ghost"`` (Goodfellow, 2015; Li et al., 2022; Opacus's ghost clipping): one forward with
    hooks that keep each layer's input ``a`` and output, one backward to the layers' outputs for
    ``G = d(sum_i l_i) / d out`` (row ``i`` of ``G`` is sample ``i``'s output gradient ``g_i``, as no
    layer mixes rows), then per layer, with ``T`` the positions a sample passes through the layer
    (1 for a 2-D Linear input; the sequence length; a convolution's output pixels, with ``a`` the
    unfolded patches, ``F.unfold``):

    =================  ====================================================================
    ``T = 1``          ``||a_i||^2 ||g_i||^2`` (weight) ``+ ||g_i||^2`` (bias)
    ``T > 1``, Gram    ``<a_i a_i^T, g_i g_i^T>_F`` (weight, ``T x T`` Gram matrices)
                       ``+ ||sum_t g_it||^2`` (bias)
    ``T > 1``, direct  ``||g_i^T a_i||_F^2``: one layer's per-sample gradient, where that is
                       cheaper than the Gram matrices (``T (d + k) > d k``; Bu et al., 2022's
                       mixed ghost clipping; MinAtar's conv: ``T = 64``, ``d k = 36 x 16``)
    =================  ====================================================================

    summed over layers and square-rooted. A layer called more than once in the closure (a Linear
    on two inputs) counts each call as more positions ``t``. No per-sample gradient of the whole
    network is materialised; parameter gradients are not computed at all. Both methods count the
    weights and biases that require grad as the forward sees them (a frozen layer counts for 0).

    ``method="vmap"``: :func:`per_sample_grads` (``torch.func.vmap(torch.func.grad(...))``), the
    reference, for any layer. ``method="auto"``: ghost when every layer of ``module`` with
    parameters is a plain ``nn.Linear`` or ``nn.Conv2d``, vmap otherwise.

    Twin critics (SAC, TD3): call once per critic with ``params = loss.qvalue_network_params[c]``
    and its rows; ghost norms need a plain forward, not one under ``torch.vmap``.

    Args:
        module: the network whose layers' parameters count (``loss.value_network``).
        per_sample_loss: ``(params, *inputs) -> [N]``, running ``module`` with ``params`` (see
            :func:`per_sample_grads`); every row's loss depends on that row alone.
        params: ``module``'s parameters as a pytree (``dict(module.named_parameters())``,
            ``loss.value_network_params``), handed to ``per_sample_loss``.
        inputs: tensors or tensordicts with a leading batch dimension ``N``.
        method: ``"auto"`` (default), ``"ghost"`` or ``"vmap"``.
        chunk_size: the vmap path's chunk size.

    Returns:
        ``[N]`` float32 norms, without a graph.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from torch.func import functional_call
        >>> net = nn.Sequential(nn.Conv2d(4, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(1024, 3))
        >>> params = dict(net.named_parameters())
        >>> def per_sample_loss(p, x, a, y):
        ...     q = functional_call(net, p, (x,)).gather(-1, a.unsqueeze(-1)).squeeze(-1)
        ...     return (q - y) ** 2
        >>> x, a, y = torch.randn(8, 4, 10, 10), torch.randint(3, (8,)), torch.randn(8)
        >>> ghost = exact_grad_norms(net, per_sample_loss, params, x, a, y)
        >>> reference = exact_grad_norms(net, per_sample_loss, params, x, a, y, method="vmap")
        >>> torch.allclose(ghost, reference, rtol=1e-4)
        True
    """
    if method not in GRAD_NORM_METHODS:
        raise ValueError(f"exact_grad_norms: method must be one of {GRAD_NORM_METHODS}, got {method!r}")
    unsupported = _layers_without_ghost_form(module)
    if method == "ghost" and unsupported:
        raise ValueError(
            f"exact_grad_norms: no ghost norm for {', '.join(unsupported)} "
            f"(only {[c.__name__ for c in GHOST_LAYERS]}); use method='vmap' or 'auto'"
        )
    if method == "vmap" or (method == "auto" and unsupported):
        grads = per_sample_grads(per_sample_loss, params, *inputs, chunk_size=chunk_size)
        leaves, _ = _flatten_params(grads)
        return torch.stack([g.detach().float().flatten(1).square().sum(1) for g in leaves]).sum(0).sqrt()
    return _ghost_norms(module, per_sample_loss, params, inputs)


# ---------------------------------------------------------------------------------------------
# Ghost norms


def _ghost_norms(module: nn.Module, per_sample_loss: Callable[..., Tensor], params: Any, inputs: Sequence) -> Tensor:
    n = _batch_size(inputs)
    layers = [m for m in module.modules() if isinstance(m, GHOST_LAYERS)]
    # Per call: (layer, input, output, which of weight and bias are trained), as the forward saw them
    # (the tensors that params.to_module or functional_call put in), like the vmap path's leaves.
    calls: list[tuple[nn.Module, Tensor, Tensor, bool, bool]] = []

    def record(layer, layer_inputs, output):
        if torch._C._functorch.is_batchedtensor(output):  # no public test for a vmapped tensor
            raise RuntimeError(
                "exact_grad_norms: the closure ran the network under torch.vmap; ghost norms need a plain "
                "forward (call once per critic) or method='vmap'"
            )
        weight = layer.weight.requires_grad
        bias = layer.bias is not None and layer.bias.requires_grad
        if weight or bias:
            calls.append((layer, layer_inputs[0].detach(), output, weight, bias))

    handles = [layer.register_forward_hook(record) for layer in layers]
    try:
        with torch.enable_grad():
            losses = per_sample_loss(params, *inputs)
    finally:
        for handle in handles:
            handle.remove()
    if losses.shape != (n,):
        raise ValueError(f"exact_grad_norms: per_sample_loss must return [N] = [{n}], got {tuple(losses.shape)}")
    if not calls:
        raise ValueError(
            "exact_grad_norms: no Linear or Conv2d layer with parameters that require grad ran: "
            "pass params that require grad"
        )
    out_grads = torch.autograd.grad(losses.sum(), [out for _, _, out, _, _ in calls], materialize_grads=True)
    per_layer: dict[nn.Module, list[tuple[Tensor, Tensor]]] = {}
    trained: dict[nn.Module, tuple[bool, bool]] = {}
    for (layer, a, _, weight, bias), g in zip(calls, out_grads):
        per_layer.setdefault(layer, []).append(_positions(layer, a, g.detach(), n))
        trained[layer] = (weight, bias)
    sq_norm = losses.new_zeros(n, dtype=torch.float32)
    for layer, pairs in per_layer.items():
        # [N * groups, T, d] and [N * groups, T, k]; a layer's calls add positions (no copy for one call).
        a = pairs[0][0] if len(pairs) == 1 else torch.cat([a for a, _ in pairs], dim=1)
        g = pairs[0][1] if len(pairs) == 1 else torch.cat([g for _, g in pairs], dim=1)
        sq = _sq_norm(a, g, *trained[layer])
        sq_norm += sq.float().view(n, -1).sum(1)  # conv groups: their blocks' norms add
    return sq_norm.sqrt()


def _positions(layer: nn.Module, a: Tensor, g: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """``(a [N * groups, T, d], g [N * groups, T, k])``: the per-sample inputs and output gradients of
    one call, one row per position ``t`` at which the weight is applied."""
    if a.shape[0] != n:
        raise ValueError(f"exact_grad_norms: {type(layer).__name__} ran on {a.shape[0]} rows, the losses have {n}")
    if isinstance(layer, nn.Linear):
        return a.reshape(n, -1, a.shape[-1]), g.reshape(n, -1, g.shape[-1])
    # Conv2d: the patches [N, C_in * kh * kw, T] that F.unfold gives, from strided views and one copy
    # (F.unfold took 13.7 ms, this 2.5 ms, on MinAtar's [1024, 4, 10, 10] input, one CPU thread);
    # padded as the layer's forward pads; split by groups.
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    a = F.pad(a, layer._reversed_padding_repeated_twice, mode=mode)
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel_size, layer.stride, layer.dilation
    windows = a.unfold(2, (kh - 1) * dh + 1, sh).unfold(3, (kw - 1) * dw + 1, sw)[..., ::dh, ::dw]
    patches = windows.permute(0, 1, 4, 5, 2, 3).reshape(n * layer.groups, -1, g.shape[-2] * g.shape[-1])
    g = g.reshape(n * layer.groups, -1, g.shape[-2] * g.shape[-1])
    return patches.transpose(1, 2), g.transpose(1, 2)


def _sq_norm(a: Tensor, g: Tensor, weight: bool, bias: bool) -> Tensor:
    """``||sum_t g_t a_t^T||_F^2`` (weight) ``+ ||sum_t g_t||^2`` (bias), each where trained, per row
    of ``a [M, T, d]``, ``g [M, T, k]``; the weight's by the cheaper form."""
    t, d, k = a.shape[1], a.shape[2], g.shape[2]
    g_sum = g.squeeze(1) if t == 1 else g.sum(1)
    sq = _sq_frobenius(g_sum) if bias else 0.0
    if not weight:
        return sq
    if t == 1:
        return sq + _sq_frobenius(a) * (sq if bias else _sq_frobenius(g_sum))
    if t * (d + k) <= d * k:  # Gram matrices: M T^2 (d + k) flops against M T d k
        gram_a, gram_g = torch.bmm(a, a.transpose(1, 2)), torch.bmm(g, g.transpose(1, 2))
        return sq + torch.linalg.vecdot(gram_a.flatten(1), gram_g.flatten(1))
    return sq + _sq_frobenius(torch.bmm(g.transpose(1, 2), a))


def _sq_frobenius(x: Tensor) -> Tensor:
    """``||x_i||_F^2`` per row of ``[M, ...]``, in one fused reduction (no squared temporary)."""
    return torch.linalg.vector_norm(x, dim=tuple(range(1, x.dim()))).square_()


def _layers_without_ghost_form(module: nn.Module) -> list[str]:
    """Names of the layers with parameters that the ghost path cannot handle (a Linear subclass with
    other parameters, such as TorchRL's NoisyLinear, counts as one)."""
    names = []
    for name, sub in module.named_modules():
        own = {key for key, p in sub.named_parameters(recurse=False)}
        if not own:
            continue
        if not (type(sub) in GHOST_LAYERS and own <= {"weight", "bias"}):
            names.append(f"{name or '<root>'} ({type(sub).__name__})")
    return names


def _flatten_params(params: Any) -> tuple[list[Tensor], Any]:
    leaves, spec = tree_flatten(params)
    if len(leaves) == 1 and not isinstance(leaves[0], Tensor) and hasattr(params, "select"):
        # TensorDictParams is not a pytree node; its plain TensorDict view (same tensors) is.
        params = params.select(*params.keys(True, True))
        leaves, spec = tree_flatten(params)
    if not all(isinstance(leaf, Tensor) for leaf in leaves):
        raise TypeError(f"params must be a pytree of tensors (dict, TensorDict), got {type(params).__name__}")
    return leaves, spec


def _batch_size(inputs: Sequence) -> int:
    if not inputs:
        raise ValueError("exact_grad_norms: pass the batch's inputs after params, each with a leading N")
    sizes = {int(x.shape[0]) for x in inputs}
    if len(sizes) != 1:
        raise ValueError(f"inputs must share their leading (batch) dimension, got {sorted(sizes)}")
    return sizes.pop()
