"""The fused LaBER kernel: surrogate, ``+eps``, prefix sum, Philox draws, search, weights; one launch.

One program per critic row ``c`` of ``[C, N, K]`` predictions and targets:

1. ``p_i = surrogate(pred_i, target_i) + eps`` (ready priorities, ``|q - y|``, ``min(|q - y|, delta)``
   or ``||softmax(z_i) - m_i||_2``), written to ``priority[c]``; the inclusive prefix sum to a scratch
   row, in chunks of ``BLOCK_N`` so that any ``N`` fits one program;
2. ``B`` uniforms ``u = tl.rand(seed, counter + c*B + b) * sum(p)``, and for each the smallest ``i``
   with ``cdf_i > u`` (binary search, ``ceil(log2(N+1))`` steps), never an item with ``p_i = 0``;
3. weights: ``mean(p)/p_i``, ``1/p_i`` or ``min_minibatch(p)/p_i``; an all-zero row draws uniformly
   with weight 1.

The Philox state ``(seed, counter, ticket)`` lives on the device: the programs read it, and the last
one to finish advances ``counter`` by ``C*B``, so consecutive calls draw fresh numbers without a
host sync and the op can sit inside a captured CUDA graph. ``float32`` reference: ``laber_naive.py``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from torchsample.codes import Surrogate, Weighting

# The codes as constexprs: a jitted function may read only constexpr globals.
PRIORITY = tl.constexpr(int(Surrogate.PRIORITY))
HUBER = tl.constexpr(int(Surrogate.HUBER))
CATEGORICAL = tl.constexpr(int(Surrogate.CATEGORICAL))
MEAN = tl.constexpr(int(Weighting.MEAN))
LAZY = tl.constexpr(int(Weighting.LAZY))

__all__ = ["laber_fused", "launch_laber", "rng_state"]


@triton.jit
def laber_fused_kernel(
    pred_ptr,  # [C, N, K] predictions, logits or ready priorities (K == 1)
    target_ptr,  # [C, N, K] targets or target distributions (unused for ready priorities)
    priority_ptr,  # [C, N] float32 out: p + eps
    cdf_ptr,  # [C, N] float32 scratch: inclusive prefix sum of p
    index_ptr,  # [C, B] int64 out
    weight_ptr,  # [C, B] float32 out
    state_ptr,  # [3] int64: Philox seed, counter, ticket
    C,
    N,
    K,
    B,
    eps,
    huber_delta,
    search_steps,
    stride_pc,
    stride_pn,
    stride_pk,
    stride_tc,
    stride_tn,
    stride_tk,
    SURROGATE: tl.constexpr,  # a torchsample.codes.Surrogate
    WEIGHTING: tl.constexpr,  # a torchsample.codes.Weighting
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    c = tl.program_id(0).to(tl.int64)
    seed = tl.load(state_ptr)
    counter = tl.load(state_ptr + 1)
    pred_row = pred_ptr + c * stride_pc
    target_row = target_ptr + c * stride_tc
    priority_row = priority_ptr + c * N
    cdf_row = cdf_ptr + c * N

    # 1. Priorities and their prefix sum, chunk by chunk.
    total = tl.zeros((), dtype=tl.float32)
    last_positive = tl.full((), -1, dtype=tl.int64)
    for start in range(0, N, BLOCK_N):
        offs = start + tl.arange(0, BLOCK_N).to(tl.int64)
        mask = offs < N
        if SURROGATE == CATEGORICAL:
            offs_k = tl.arange(0, BLOCK_K)
            mask_nk = mask[:, None] & (offs_k[None, :] < K)
            z = tl.load(pred_row + offs[:, None] * stride_pn + offs_k[None, :] * stride_pk, mask=mask_nk,
                        other=0.0).to(tl.float32)
            # A large finite fill (not -inf, and after the cast: fp16 has no 1e30) keeps padded
            # rows free of inf - inf.
            z = tl.where(mask_nk, z, -1e30)
            m = tl.load(target_row + offs[:, None] * stride_tn + offs_k[None, :] * stride_tk, mask=mask_nk,
                        other=0.0).to(tl.float32)
            e = tl.exp(z - tl.max(z, axis=1)[:, None])
            diff = tl.where(mask_nk, e / tl.sum(e, axis=1)[:, None] - m, 0.0)
            p = tl.sqrt(tl.sum(diff * diff, axis=1))
        else:
            x = tl.load(pred_row + offs * stride_pn, mask=mask, other=0.0).to(tl.float32)
            if SURROGATE == PRIORITY:
                p = x
            else:
                y = tl.load(target_row + offs * stride_tn, mask=mask, other=0.0).to(tl.float32)
                p = tl.abs(x - y)
                if SURROGATE == HUBER:
                    p = tl.minimum(p, huber_delta)
        p = tl.where(mask, p + eps, 0.0)
        tl.store(priority_row + offs, p, mask=mask)
        tl.store(cdf_row + offs, tl.cumsum(p, axis=0) + total, mask=mask)
        total += tl.sum(p, axis=0)
        last_positive = tl.maximum(last_positive, tl.max(tl.where(mask & (p > 0), offs, -1), axis=0))
    empty = total <= 0.0
    last_positive = tl.maximum(last_positive, 0)

    # 2. Draws: the smallest i with cdf_i > u, by binary search over the prefix sum.
    smallest = tl.full((), float("inf"), dtype=tl.float32)
    for b_start in range(0, B, BLOCK_B):
        offs_b = b_start + tl.arange(0, BLOCK_B).to(tl.int64)
        mask_b = offs_b < B
        u01 = tl.rand(seed, counter + c * B + offs_b)
        u = u01 * total
        lo = tl.zeros((BLOCK_B,), dtype=tl.int64)
        hi = tl.zeros((BLOCK_B,), dtype=tl.int64) + N
        for _ in range(search_steps):
            mid = (lo + hi) // 2
            below = tl.load(cdf_row + mid, mask=mask_b & (mid < N), other=float("inf")) <= u
            lo = tl.where(below, mid + 1, lo)
            hi = tl.where(below, hi, mid)
        index = tl.minimum(lo, last_positive)
        # A zero-width gap left by rounding in the parallel prefix sum must not return p == 0.
        picked = tl.load(priority_row + index, mask=mask_b, other=1.0)
        index = tl.where(picked > 0, index, last_positive)
        index = tl.where(empty, tl.minimum((u01 * N).to(tl.int64), N - 1), index)
        tl.store(index_ptr + c * B + offs_b, index, mask=mask_b)
        picked = tl.load(priority_row + index, mask=mask_b, other=float("inf"))
        smallest = tl.minimum(smallest, tl.min(tl.where(mask_b, picked, float("inf")), axis=0))

    # 3. Weights (the max variant needs the minibatch minimum of step 2).
    for b_start in range(0, B, BLOCK_B):
        offs_b = b_start + tl.arange(0, BLOCK_B).to(tl.int64)
        mask_b = offs_b < B
        index = tl.load(index_ptr + c * B + offs_b, mask=mask_b, other=0)
        picked = tl.load(priority_row + index, mask=mask_b, other=1.0)
        picked = tl.where(empty, 1.0, picked)  # an all-zero row gets weight 1, not 0/0
        if WEIGHTING == MEAN:
            weight = (total / N) / picked
        elif WEIGHTING == LAZY:
            weight = 1.0 / picked
        else:
            weight = smallest / picked
        tl.store(weight_ptr + c * B + offs_b, tl.where(empty, 1.0, weight), mask=mask_b)

    # Advance the counter once every program has read it (atomics are acq_rel).
    ticket = tl.atomic_add(state_ptr + 2, 1)
    if ticket == C - 1:
        tl.store(state_ptr + 1, counter + C * B)
        tl.store(state_ptr + 2, 0)


def block_sizes(N: int, K: int, B: int, surrogate: int) -> dict:
    """``BLOCK_N`` caps the ``[BLOCK_N, BLOCK_K]`` tile at 8192 elements (4096 for K > 1: softmax
    keeps a few tiles live); ``BLOCK_B`` at 1024 draws per chunk."""
    block_k = triton.next_power_of_2(K)
    budget = 4096 if surrogate == Surrogate.CATEGORICAL else 8192
    block_n = max(16, min(triton.next_power_of_2(N), budget // block_k))
    return {"BLOCK_N": block_n, "BLOCK_K": block_k, "BLOCK_B": max(16, min(triton.next_power_of_2(B), 1024))}


def launch_laber(pred: Tensor, target: Tensor, state: Tensor, batch_size: int, surrogate: int, weighting: int,
                 eps: float, huber_delta: float, *, kernel=None) -> tuple[Tensor, Tensor, Tensor]:
    """Allocate the outputs and launch the kernel once, with no host sync.

    ``kernel`` defaults to the jitted kernel wrapped by ``wrap_triton`` (so ``torch.compile`` sees
    the launch); the tests pass the interpreter's version, which ``wrap_triton`` does not accept.
    """
    C, N, K = pred.shape
    device = pred.device
    priority = torch.empty(C, N, device=device, dtype=torch.float32)
    cdf = torch.empty(C, N, device=device, dtype=torch.float32)
    index = torch.empty(C, batch_size, device=device, dtype=torch.int64)
    weight = torch.empty(C, batch_size, device=device, dtype=torch.float32)
    blocks = block_sizes(N, K, batch_size, surrogate)
    launcher = kernel if kernel is not None else wrap_triton(laber_fused_kernel)
    launcher[(C,)](
        pred, target, priority, cdf, index, weight, state,
        C, N, K, batch_size, eps, huber_delta, N.bit_length(),
        pred.stride(0), pred.stride(1), pred.stride(2), target.stride(0), target.stride(1), target.stride(2),
        SURROGATE=int(surrogate), WEIGHTING=int(weighting), num_warps=4 if blocks["BLOCK_N"] * blocks["BLOCK_K"] <= 2048 else 8,
        **blocks,
    )
    return index, weight, priority


@triton_op("torchsample::laber_fused", mutates_args={"rng_state"})
def laber_fused(pred: Tensor, target: Tensor, rng_state: Tensor, batch_size: int, surrogate: int, weighting: int,
                eps: float, huber_delta: float) -> tuple[Tensor, Tensor, Tensor]:
    """``torch.ops.torchsample.laber_fused``: the fused LaBER op on CUDA tensors.

    Args:
        pred, target: ``[C, N, K]``, fp32/fp16/bf16/fp64.
        rng_state: int64 ``[3]`` on the same device, from :func:`rng_state`; advanced in place.
        batch_size: ``B``; surrogate: a :class:`torchsample.codes.Surrogate` (K > 1 only for
        ``CATEGORICAL``); weighting: a :class:`torchsample.codes.Weighting`; eps, huber_delta: floats.

    Returns:
        ``index`` int64 ``[C, B]``, ``weight`` float32 ``[C, B]``, ``priority`` float32 ``[C, N]``.

    Examples:
        >>> # needs a GPU, hence the SKIP
        >>> q = torch.rand(2, 128, 1, device="cuda")  # doctest: +SKIP
        >>> index, weight, priority = torch.ops.torchsample.laber_fused(  # doctest: +SKIP
        ...     q, q, rng_state(q.device), 32, Surrogate.PRIORITY, Weighting.MEAN, 1e-6, 1.0)
    """
    return launch_laber(pred, target, rng_state, batch_size, surrogate, weighting, eps, huber_delta)


_STATES: dict = {}


def rng_state(device: torch.device, generator: torch.Generator | None = None) -> Tensor:
    """The Philox state ``(seed, counter, ticket)`` the kernel reads, an int64 ``[3]`` device tensor.

    Without ``generator``: one persistent state per device, seeded from torch's default CPU
    generator when first used (so ``torch.manual_seed`` before the first call reproduces a run)
    and advanced by the kernel itself. With ``generator``: a fresh state drawn from it, so a seeded
    generator reproduces the draw.
    """
    if generator is not None:
        seed = torch.randint(0, 2**62, (1,), device=generator.device, generator=generator).to(device)
        return torch.cat([seed, torch.zeros(2, dtype=torch.int64, device=device)])
    key = torch.device(device)
    state = _STATES.get(key)
    if state is None:
        seed = torch.randint(0, 2**62, (1,))
        state = _STATES[key] = torch.cat([seed, torch.zeros(2, dtype=torch.int64)]).to(key)
    return state
