"""The fused LaBER kernel: surrogate, ``+eps``, prefix sums, Philox draws, search, weights; one launch.

Each critic row ``c`` of ``[C, N, K]`` predictions and targets is cut into ``T = ceil(N / BLOCK_N)``
tiles, one program per ``(c, tile)``, all in one launch (grid ``C * T``):

1. **Tiles, in parallel.** ``p_i = surrogate(pred_i, target_i) + eps`` (ready priorities, or the
   output gradient norm of :mod:`torchsample.surrogates`: ``2 |q - y|``, ``min(|q - y|, delta)`` or
   ``||softmax(z_i) - m_i||_2``; for the last-layer rung times ``sqrt(||h_i||^2 + 1)``, or ``||h_i||``
   for a layer without bias, ``h`` the ``[C, N, D]`` penultimate features), written to
   ``priority[c]`` in float32. In float64, the tile's chunks of ``CHUNK`` items are summed and
   their inclusive prefix within the tile is written, ``chunk_j = sum_{j' <= j} sum_{i in j'} p_i``
   (the last is the tile's mass), with the tile's last item with ``p_i > 0``.
2. **Arrival.** Each program takes a ticket (an ``acq_rel`` atomic on the row's slot of the state,
   after a barrier so that every thread's stores precede it); the one that completes the row, and
   only it, reads the other tiles' results (after the acquire and a barrier) and goes on to 3 and 4.
   A row of one tile skips the ticket. With more rows than slots, rows ``c = s, s + S, ...`` share
   slot ``s`` and its last arrival handles them all.
3. **Tile prefix.** ``tile_t = sum_{t' <= t} mass_t'`` in float64, and ``total = tile_{T-1}``.
4. **Draws.** ``B`` uniforms on the grid ``k * 2^-52`` from two Philox words each,
   ``u = u01 * total < total``, and for each a three-level search for the smallest ``i`` with
   ``cdf_i > u``, ``cdf`` in float64: the tile (binary search over ``tile``), the chunk in it
   (binary search over ``tile_{t-1} + chunk``), the item in it (a float64 prefix of the chunk's
   ``CHUNK`` priorities, in registers). Weights from the picked ``p_i``, in registers:
   ``mean(p)/p_i`` or ``1/p_i``; ``min_minibatch(p)/p_i`` takes a second pass after a barrier,
   as it needs every draw first. An all-zero row draws ``floor(u01 * N)`` with weight 1.

**Accuracy.** Every boundary ``cdf_i`` is a float64 sum of float32 ``p``, at most ~30 roundings of
``2^-53 * total`` deep, and ``u`` has 52 bits: the probability of each item is within ``2^-47`` of
``p_i / sum(p)`` (plus one step of the uniforms' grid, ``2^-52``), 3e-8 relative for an item of
average mass at ``N = 4M``, where one float32 prefix sum with float32 uniforms is off by about
``1.2e-7 * N`` relative (12% at 1M). Measured at ``N = 2^22`` from the search's own arithmetic
(``tests/kernels``): within 0.96 of a grid step, 1.3e-9 relative for items of average mass. A
rounding gap that would land on ``p_i = 0`` falls back to the row's last positive item, so
zero-priority items are never drawn.

**Cost.** The tiles read the inputs once and write ``priority`` plus ``8 / CHUNK`` bytes an item.
With few draws (``ceil(B / BLOCK_B) <= MAX_ROUNDS_IN_TILE`` rounds) the program that completed a row
draws them itself, ``ceil(B / BLOCK_B)`` rounds of about ``log2(T) + log2(BLOCK_N / CHUNK) + 2``
dependent loads from L2. Spreading them over programs of the same launch would need those programs
to wait for the last tile: a spin-wait, whose forward progress rests on the order in which the GPU
starts programs and which the interpreter (one program after another) cannot exercise. So more
draws take a second launch, :func:`laber_draw_kernel`, ``C * ceil(B / BLOCK_B)`` programs of one
round each (the first H200 run: ``B = 65536`` drawn by one program took 1157 us, 0.43x the naive
path). The completing program then only writes the tile prefix (step 3), and the draws read the
same Philox offsets, so both paths draw the same indices from the same state.

**State.** ``state`` (int64 ``[3 + S]``) holds the Philox ``seed``, ``counter``, a ticket of rows
(or draw programs) done, and ``S`` arrival tickets. The program that finishes the last row (or the
last draw program) advances ``counter`` by ``C * B`` and resets the tickets it used, so consecutive
calls draw fresh numbers with no host sync, and the op can sit inside a captured CUDA graph. Two
launches must not share a state at the same time (two streams, two graphs replayed concurrently):
give each caller its own (:func:`new_rng_state`); the default one (:func:`rng_state`) is one per
device and stream. ``float32`` reference: ``laber_naive.py``.

**Arguments.** Eight tensors, four runtime ints (``N``, ``B``, the tiles and their search depth), and
constants for what one caller does not vary (``C``, ``K``, ``D``, the state's slots, ``eps``, the Huber
threshold, the bias, the codes, the block sizes): Triton binds and specialises each runtime argument
on every eager call, and a new constant compiles once. The inputs are read as contiguous rows
(:func:`launch_laber` makes them so; a no-op for the usual ones), so no strides are passed. Every int
argument may reach the kernel as a ``tl.constexpr``: Triton specialises ints equal to 1 at launch.
So no int argument has a method called on it (``tl.cast(B, tl.int64)``, not ``B.to(tl.int64)``): the
tests compile the kernels with every int as a constant, each one alone, and with the specialisation
Triton derives from real launch arguments.

**torch.compile.** The op is a ``triton_op``: Inductor sees the launches and walks each kernel's IR to
learn which tensors it writes (``identify_accessed_tensors``, or ``identify_mutated_tensors`` on older
torch). That walk follows every path from a load or store back to the arguments, unmemoised, so a
chain of unrolled steps that each read the step before more than once grows as a power of its length:
the chunk search is a ``tl.range`` loop (walked once, unrolled later by Triton), and the tests time the
analysis of every launch at large sizes.
"""

from __future__ import annotations

import contextlib
import functools
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.library import triton_op, wrap_triton
from torch.utils._python_dispatch import _get_current_dispatch_mode

from torchsample.codes import LossKind, Surrogate, Weighting

# The codes as constexprs: a jitted function may read only constexpr globals.
PRIORITY = tl.constexpr(int(LossKind.PRIORITY))
L2 = tl.constexpr(int(LossKind.L2))
HUBER = tl.constexpr(int(LossKind.HUBER))
CATEGORICAL = tl.constexpr(int(LossKind.CATEGORICAL))
LAST_LAYER = tl.constexpr(int(Surrogate.LAST_LAYER))
MEAN = tl.constexpr(int(Weighting.MEAN))
LAZY = tl.constexpr(int(Weighting.LAZY))
MAX = tl.constexpr(int(Weighting.MAX))
SURROGATE_OUTPUT, SURROGATE_LAST_LAYER = int(Surrogate.OUTPUT), int(Surrogate.LAST_LAYER)  # host-side ints

RNG_SLOTS = 64  # arrival tickets in a state: up to 64 rows of several tiles complete independently
MAX_ROUNDS_IN_TILE = 4  # rounds of draws the completing program does itself; more take a launch of their own

__all__ = [
    "laber_fused",
    "laber_fused_call",
    "launch_laber",
    "launch_plan",
    "launch_arguments",
    "launch_shape",
    "allocate_buffers",
    "new_rng_state",
    "rng_state",
    "RNG_SLOTS",
]


@triton.jit
def uniform52(seed, offsets):
    """Uniforms ``k * 2^-52``, ``0 <= k < 2^52``, as float64: 26 bits from each of two Philox words.

    ``u01 * total`` then rounds to less than ``total``, so every draw lands in the row.
    """
    r0, r1, _, _ = tl.randint4x(seed, offsets)
    high = (r0 >> 6).to(tl.float64)
    low = (r1 >> 6).to(tl.float64)
    return (high * 67108864.0 + low) * 2.220446049250313e-16  # (high * 2^26 + low) * 2^-52


@triton.jit
def search(
    u,
    mask,
    priority_row,
    chunk_row,
    tile_row,
    N,
    n_tiles,
    tile_steps,
    last_positive,
    BLOCK_N: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """For ``u`` in ``[0, total)``: the smallest ``i`` with ``cdf_i > u`` and its ``p_i`` (step 4).

    ``tile_row`` holds the tile prefix (step 3), ``chunk_row`` the chunk prefixes within each tile,
    ``priority_row`` the float32 priorities. Never returns an item with ``p_i = 0`` when the row has
    mass: a gap left by rounding returns the chunk's last positive item, else ``last_positive``.
    """
    CHUNKS: tl.constexpr = BLOCK_N // CHUNK
    # The tile: the smallest t with tile_t > u, by binary search (lo == hi after tile_steps
    # halvings); start = tile_{t-1}, 0 for t = 0. Written out twice, not a helper: each nested jit
    # call costs the interpreter milliseconds.
    lo = tl.zeros(u.shape, dtype=tl.int32)
    hi = lo + n_tiles
    start = tl.zeros(u.shape, dtype=tl.float64)
    for _ in range(tile_steps):
        mid = (lo + hi) // 2
        value = tl.load(tile_row + mid, mask=mask & (mid < n_tiles), other=float("inf"))
        below = value <= u
        lo = tl.where(below, mid + 1, lo)
        hi = tl.where(below, hi, mid)
        start = tl.where(below, value, start)
    tile = tl.minimum(lo, n_tiles - 1).to(tl.int64)
    # The chunk: the smallest j with start + chunk_j > u. Comparing sums (not u - start with chunk_j)
    # keeps each level's boundaries monotone and consistent with the level above.
    tile_start = start
    chunk_prefix = chunk_row + tile * CHUNKS
    lo = tl.zeros(u.shape, dtype=tl.int32)
    hi = lo + CHUNKS
    # A loop (scf.for) in the IR, unrolled by Triton's own pass: torch.compile's analysis of the kernel
    # (identify_accessed_tensors) walks every path from a load back to the arguments without memoising,
    # so CHUNKS.bit_length() copies of a step that reads lo and hi twice each took 3^levels paths there
    # (minutes at 512-item tiles); a loop body is walked once. The PTX is the same as static_range's.
    for _ in tl.range(CHUNKS.bit_length(), loop_unroll_factor=CHUNKS.bit_length()):
        mid = (lo + hi) // 2
        value = tile_start + tl.load(chunk_prefix + mid, mask=mask & (mid < CHUNKS), other=float("inf"))
        below = value <= u
        lo = tl.where(below, mid + 1, lo)
        hi = tl.where(below, hi, mid)
        start = tl.where(below, value, start)
    # The item: a float64 prefix of the chunk's priorities, in registers.
    first = tile * BLOCK_N + tl.minimum(lo, CHUNKS - 1) * CHUNK
    offs_k = tl.arange(0, CHUNK)
    items = first[:, None] + offs_k[None, :]
    p = tl.load(priority_row + items, mask=mask[:, None] & (items < N), other=0.0)
    ends = start[:, None] + tl.cumsum(p.to(tl.float64), axis=1)
    k = tl.sum((ends <= u[:, None]).to(tl.int32), axis=1)
    # u past the chunk's last end (rounding) takes its last positive item.
    k = tl.where(k < CHUNK, k, tl.max(tl.where(p > 0, offs_k[None, :], -1), axis=1))
    picked = tl.sum(tl.where(offs_k[None, :] == k[:, None], p, 0.0), axis=1)
    index = tl.where(picked > 0, first + k, last_positive)
    # Predicated off but for those gaps (no extra load); draws outside mask get 1, not 0.
    fallback = picked <= 0
    picked = tl.where(fallback, tl.load(priority_row + index, mask=mask & fallback, other=1.0), picked)
    return index, picked


@triton.jit
def tile_priorities(
    pred_row,
    target_row,
    h_row,
    offs,
    mask,
    K: tl.constexpr,
    D: tl.constexpr,
    EPS: tl.constexpr,
    HUBER_DELTA: tl.constexpr,
    BIAS_SQ: tl.constexpr,
    LOSS: tl.constexpr,
    SURROGATE: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``p + eps`` in float32 of the items ``offs`` (``[CHUNKS, CHUNK]``) of a row, 0 outside ``mask`` (step 1).

    The rows are contiguous: item ``i``'s ``K`` values at ``i * K``, its ``D`` features at ``i * D``.
    ``target_row`` is ``None`` for ready priorities, ``h_row`` for the output rung: neither is read then.
    """
    if LOSS == CATEGORICAL:
        offs_k = tl.arange(0, BLOCK_K)[None, None, :]
        mask_nk = mask[:, :, None] & (offs_k < K)
        z = tl.load(pred_row + offs[:, :, None] * K + offs_k, mask=mask_nk, other=0.0).to(tl.float32)
        # A large finite fill (not -inf, and after the cast: fp16 has no 1e30) keeps padded rows
        # free of inf - inf.
        z = tl.where(mask_nk, z, -1e30)
        m = tl.load(target_row + offs[:, :, None] * K + offs_k, mask=mask_nk, other=0.0).to(tl.float32)
        e = tl.exp(z - tl.max(z, axis=2)[:, :, None])
        diff = tl.where(mask_nk, e / tl.sum(e, axis=2)[:, :, None] - m, 0.0)
        p = tl.sqrt(tl.sum(diff * diff, axis=2))
    else:
        x = tl.load(pred_row + offs, mask=mask, other=0.0).to(tl.float32)
        if LOSS == PRIORITY:
            p = x
        else:
            y = tl.load(target_row + offs, mask=mask, other=0.0).to(tl.float32)
            p = tl.abs(x - y)
            if LOSS == L2:
                p = 2.0 * p  # the gradient norm of (q - y)^2, TorchRL's l2
            if LOSS == HUBER:
                p = tl.minimum(p, HUBER_DELTA)
    if SURROGATE == LAST_LAYER:
        # ||h_i||^2 in float32, BLOCK_D features of every item at a time.
        offs_d = tl.arange(0, BLOCK_D)[None, None, :]
        h_sq = tl.zeros_like(p)
        for d_start in range(0, D, BLOCK_D):
            mask_nd = mask[:, :, None] & (d_start + offs_d < D)
            h = tl.load(h_row + offs[:, :, None] * D + (d_start + offs_d), mask=mask_nd, other=0.0).to(tl.float32)
            h_sq += tl.sum(h * h, axis=2)
        p = p * tl.sqrt(h_sq + BIAS_SQ)  # ||(h, 1)|| with a bias, ||h|| without
    return tl.where(mask, p + EPS, 0.0)


@triton.jit
def row_prefix(chunk_row, tile_row, tile_last_row, n_tiles, CHUNKS: tl.constexpr, BLOCK_T: tl.constexpr):
    """Step 3 for one complete row: writes the tile prefix from each tile's mass (its last chunk
    prefix); returns ``total`` (the prefix's last entry, bit for bit) and the row's last item with
    ``p > 0`` (0 if none)."""
    total = tl.zeros((), dtype=tl.float64)
    last_positive = tl.full((), -1.0, dtype=tl.float64)
    for t_start in range(0, n_tiles, BLOCK_T):
        offs_t = t_start + tl.arange(0, BLOCK_T)
        mask_t = offs_t < n_tiles
        mass = tl.load(chunk_row + offs_t * CHUNKS + CHUNKS - 1, mask=mask_t, other=0.0)
        last_positive = tl.maximum(last_positive, tl.max(tl.load(tile_last_row + offs_t, mask=mask_t, other=-1.0)))
        prefix = total + tl.cumsum(mass, axis=0)
        tl.store(tile_row + offs_t, prefix, mask=mask_t)
        total = tl.sum(tl.where(offs_t == tl.minimum(t_start + BLOCK_T, n_tiles) - 1, prefix, 0.0), axis=0)
    return total, tl.maximum(last_positive, 0.0).to(tl.int64)


@triton.jit
def draw_block(
    row,
    offs_b,
    seed,
    counter,
    total,
    last_positive,
    priority_row,
    chunk_row,
    tile_row,
    index_ptr,
    weight_ptr,
    N,
    B,
    n_tiles,
    tile_steps,
    WEIGHTING: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """Step 4 for the draws ``offs_b`` of ``row``: stores their indices and weights (for ``"max"``
    the picked ``p``, until the minimum is known) and returns the picked ``p`` (``inf`` outside)."""
    mask_b = offs_b < B
    empty = total <= 0.0
    u01 = uniform52(seed, counter + row * B + offs_b)
    index, picked = search(
        u01 * total, mask_b, priority_row, chunk_row, tile_row, N, n_tiles, tile_steps, last_positive, BLOCK_N, CHUNK
    )
    index = tl.where(empty, tl.minimum((u01 * N).to(tl.int64), N - 1), index)
    tl.store(index_ptr + row * B + offs_b, index, mask=mask_b)
    picked = tl.where(empty, 1.0, picked)  # an all-zero row gets weight 1, not 0/0
    if WEIGHTING == MEAN:
        weight = (total / N).to(tl.float32) / picked
    elif WEIGHTING == LAZY:
        weight = 1.0 / picked
    else:
        weight = picked
    tl.store(weight_ptr + row * B + offs_b, tl.where(empty, 1.0, weight), mask=mask_b)
    return tl.where(mask_b, picked, float("inf"))


@triton.jit
def draw_row(
    row,
    seed,
    counter,
    priority_ptr,
    scratch_ptr,
    index_ptr,
    weight_ptr,
    N,
    B,
    n_tiles,
    tile_steps,
    WEIGHTING: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """Steps 3 and 4 for one complete row, in the program that completed it."""
    CHUNKS: tl.constexpr = BLOCK_N // CHUNK
    priority_row = priority_ptr + row * N
    chunk_row = scratch_ptr + row * n_tiles * (CHUNKS + 2)
    tile_row = chunk_row + n_tiles * CHUNKS
    total, last_positive = row_prefix(chunk_row, tile_row, tile_row + n_tiles, n_tiles, CHUNKS, BLOCK_T)
    # Other threads wrote the prefix that the searches read (Triton places barriers for shared
    # memory only).
    tl.debug_barrier()
    smallest = tl.full((), float("inf"), dtype=tl.float32)
    for b_start in range(0, B, BLOCK_B):
        offs_b = b_start + tl.arange(0, BLOCK_B).to(tl.int64)
        picked = draw_block(
            row,
            offs_b,
            seed,
            counter,
            total,
            last_positive,
            priority_row,
            chunk_row,
            tile_row,
            index_ptr,
            weight_ptr,
            N,
            B,
            n_tiles,
            tile_steps,
            WEIGHTING,
            BLOCK_N,
            CHUNK,
        )
        smallest = tl.minimum(smallest, tl.min(picked, axis=0))
    if WEIGHTING == MAX:
        # The picked p stored above by other threads is read back.
        tl.debug_barrier()
        for b_start in range(0, B, BLOCK_B):
            offs_b = b_start + tl.arange(0, BLOCK_B).to(tl.int64)
            mask_b = offs_b < B
            picked = tl.load(weight_ptr + row * B + offs_b, mask=mask_b, other=1.0)
            tl.store(weight_ptr + row * B + offs_b, smallest / picked, mask=mask_b)


@triton.jit
def laber_fused_kernel(
    pred_ptr,  # [C, N, K] predictions, logits or ready priorities (K == 1), contiguous
    target_ptr,  # [C, N, K] targets or target distributions, contiguous; None for ready priorities
    h_ptr,  # [C, N, D] penultimate features, contiguous (last-layer rung); None for the output rung
    priority_ptr,  # [C, N] float32 out: p + eps
    scratch_ptr,  # [C, T * (CHUNKS + 2)] float64: per row, chunk prefixes [T, CHUNKS] | tile prefix [T]
    #                (step 3) | last item with p > 0 of each tile [T] (-1: none; exact in float64)
    index_ptr,  # [C, B] int64 out
    weight_ptr,  # [C, B] float32 out
    state_ptr,  # [3 + S] int64: Philox seed, counter, rows-done ticket, S arrival tickets
    N,
    B,
    n_tiles,  # T = ceil(N / BLOCK_N)
    tile_steps,  # T.bit_length()
    # What does not vary between calls of one caller is a constant: Triton binds fewer arguments per
    # call (about 0.2 us each), and a new value compiles once.
    C: tl.constexpr,
    K: tl.constexpr,  # the atoms of a row (1 but for CATEGORICAL); pred and target are contiguous [C, N, K]
    D: tl.constexpr,  # the features of a row (last-layer rung; else 0); h is contiguous [C, N, D]
    n_slots: tl.constexpr,  # S
    EPS: tl.constexpr,
    HUBER_DELTA: tl.constexpr,  # HUBER only (else 1.0)
    BIAS_SQ: tl.constexpr,  # last-layer rung: 1.0 if the layer has a bias, else 0.0
    LOSS: tl.constexpr,  # a torchsample.codes.LossKind
    SURROGATE: tl.constexpr,  # a torchsample.codes.Surrogate: OUTPUT or LAST_LAYER
    WEIGHTING: tl.constexpr,  # a torchsample.codes.Weighting
    BLOCK_N: tl.constexpr,  # items of a tile
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,  # features of a row read at a time (last-layer)
    CHUNK: tl.constexpr,  # items of a chunk, the last level of the search
    BLOCK_B: tl.constexpr,
    BLOCK_T: tl.constexpr,
    DRAW: tl.constexpr,  # the completing program draws (few rounds); else laber_draw_kernel does, next
):
    CHUNKS: tl.constexpr = BLOCK_N // CHUNK
    pid = tl.program_id(0).to(tl.int64)
    c = pid // n_tiles
    tile = pid % n_tiles

    # 1. This tile's priorities (as [CHUNKS, CHUNK]), chunk prefixes and last positive item.
    offs = tile * BLOCK_N + (tl.arange(0, CHUNKS)[:, None] * CHUNK + tl.arange(0, CHUNK)[None, :]).to(tl.int64)
    mask = offs < N
    # Each row's start (c is int64: so is every offset); None stays None where it is not read.
    target_row = target_ptr
    h_row = h_ptr
    if LOSS != PRIORITY:
        target_row = target_ptr + c * N * K
    if SURROGATE == LAST_LAYER:
        h_row = h_ptr + c * N * D
    p = tile_priorities(
        pred_ptr + c * N * K,
        target_row,
        h_row,
        offs,
        mask,
        K,
        D,
        EPS,
        HUBER_DELTA,
        BIAS_SQ,
        LOSS,
        SURROGATE,
        BLOCK_K,
        BLOCK_D,
    )
    tl.store(priority_ptr + c * N + offs, p, mask=mask)
    chunks = tl.cumsum(tl.sum(p.to(tl.float64), axis=1), axis=0)
    chunk_row = scratch_ptr + c * n_tiles * (CHUNKS + 2)
    tl.store(chunk_row + tile * CHUNKS + tl.arange(0, CHUNKS), chunks)
    tl.store(chunk_row + n_tiles * (CHUNKS + 1) + tile, tl.max(tl.where(p > 0, offs, -1)).to(tl.float64))
    # Every thread's stores above happen before the ticket below (its release) and before this
    # program's own search reads them back.
    tl.debug_barrier()

    # 2. Arrival: a row of one tile is complete now; else the last of its slot's tickets completes it.
    slot = c % n_slots
    first_row = c
    row_step = C  # range(c, C, C) is the row c alone
    rows = tl.full((), 1, dtype=tl.int64)
    done = n_tiles == 1
    if n_tiles > 1:
        first_row = slot
        row_step = n_slots
        rows = (C - 1 - slot) // n_slots + 1
        arrived = tl.atomic_add(state_ptr + 3 + slot, 1, sem="acq_rel", scope="gpu")
        done = arrived == n_tiles * rows - 1
    if done:
        # The other tiles' stores were released before their tickets and acquired by this one; the
        # barrier orders every thread's loads below after it.
        tl.debug_barrier()
        if n_tiles > 1:
            tl.store(state_ptr + 3 + slot, 0)  # every ticket of this slot is in: reset for the next call
        if DRAW:
            seed = tl.load(state_ptr)
            counter = tl.load(state_ptr + 1)
            for row in range(first_row, C, row_step):
                draw_row(
                    row,
                    seed,
                    counter,
                    priority_ptr,
                    scratch_ptr,
                    index_ptr,
                    weight_ptr,
                    N,
                    B,
                    n_tiles,
                    tile_steps,
                    WEIGHTING,
                    BLOCK_N,
                    CHUNK,
                    BLOCK_B,
                    BLOCK_T,
                )
            # The counter advances once every row has read it: every thread's reads precede the
            # ticket (the barrier), and the tickets are acq_rel.
            tl.debug_barrier()
            rows_done = tl.atomic_add(state_ptr + 2, rows, sem="acq_rel", scope="gpu")
            if rows_done + rows == C:
                tl.store(state_ptr + 1, counter + tl.cast(B, tl.int64) * C)
                tl.store(state_ptr + 2, 0)
        else:
            # Step 3 only; the row's last positive item goes where laber_draw_kernel reads it.
            for row in range(first_row, C, row_step):
                row_chunks = scratch_ptr + row * n_tiles * (CHUNKS + 2)
                tile_row = row_chunks + n_tiles * CHUNKS
                _, last_positive = row_prefix(row_chunks, tile_row, tile_row + n_tiles, n_tiles, CHUNKS, BLOCK_T)
                tl.store(tile_row + n_tiles, last_positive.to(tl.float64))


@triton.jit
def laber_draw_kernel(
    priority_ptr,  # [C, N] float32: p + eps, from laber_fused_kernel
    scratch_ptr,  # [C, T * (CHUNKS + 2)] float64: chunk prefixes | tile prefix | the row's last positive item first
    index_ptr,  # [C, B] int64 out
    weight_ptr,  # [C, B] float32 out (for "max": the picked p; the launcher divides)
    state_ptr,  # [3 + S] int64: Philox seed, counter, programs-done ticket, arrival tickets
    N,
    B,
    n_tiles,
    tile_steps,
    n_blocks,  # programs per row: ceil(B / BLOCK_B)
    C: tl.constexpr,
    WEIGHTING: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    """Step 4 as a launch of its own, after :func:`laber_fused_kernel` with ``DRAW=False``: one
    round of ``BLOCK_B`` draws of one row per program, on the same Philox offsets as the fused path."""
    CHUNKS: tl.constexpr = BLOCK_N // CHUNK
    pid = tl.program_id(0).to(tl.int64)
    row = pid // n_blocks
    offs_b = (pid % n_blocks) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    chunk_row = scratch_ptr + row * n_tiles * (CHUNKS + 2)
    tile_row = chunk_row + n_tiles * CHUNKS
    total = tl.load(tile_row + n_tiles - 1)
    last_positive = tl.load(tile_row + n_tiles).to(tl.int64)
    seed = tl.load(state_ptr)
    counter = tl.load(state_ptr + 1)
    draw_block(
        row,
        offs_b,
        seed,
        counter,
        total,
        last_positive,
        priority_ptr + row * N,
        chunk_row,
        tile_row,
        index_ptr,
        weight_ptr,
        N,
        B,
        n_tiles,
        tile_steps,
        WEIGHTING,
        BLOCK_N,
        CHUNK,
    )
    # The last program to finish advances the counter: every thread's read of it precedes the ticket.
    tl.debug_barrier()
    finished = tl.atomic_add(state_ptr + 2, 1, sem="acq_rel", scope="gpu")
    if finished == C * n_blocks - 1:
        tl.store(state_ptr + 1, counter + tl.cast(B, tl.int64) * C)
        tl.store(state_ptr + 2, 0)


def _next_power_of_2(n: int) -> int:
    # triton.next_power_of_2 and triton.cdiv are constexpr functions: about 3 us a call on the host
    # (measured), and a launch needs several of them.
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class LaunchPlan(NamedTuple):
    """How :func:`launch_laber` launches for a shape (:func:`launch_plan`)."""

    n_tiles: int  # T = ceil(N / BLOCK_N): programs per row of the fused kernel
    tile_steps: int  # T.bit_length(): the halvings of the search over tiles
    scratch_per_row: int  # T * (BLOCK_N // CHUNK + 2) float64
    split_draws: bool  # more than MAX_ROUNDS_IN_TILE rounds: laber_draw_kernel draws
    draw_blocks: int  # programs per row of laber_draw_kernel: ceil(B / DRAW_BLOCK_B)
    constexprs: dict  # the fused kernel's block sizes (not to be mutated: the plan is cached)
    num_warps: int
    draw_block_b: int
    draw_num_warps: int


SMALL_N = 16384  # rows up to this many items take the small-N shape (launch_plan, shape="auto")
SHAPES = ("auto", "large")  # launch_plan's rules: "large" is the large-N rules at every N (the shape before issue 29)


@functools.lru_cache(maxsize=4096)
def launch_plan(N: int, K: int, B: int, loss: int, D: int = 0, shape: str = "auto") -> LaunchPlan:
    """The launch of ``[C, N, K]`` inputs (``D`` features a row for the last-layer rung) drawing ``B``
    per row: block sizes and ``num_warps`` from register counts of the sm_90 build (ptxas -v), and
    whether the draws take a launch of their own. Cached: a launch pays a dict lookup for it.

    **Large N** (and ``shape="large"`` at any N). A tile holds up to 4096 items (2048 elements
    ``[BLOCK_N, BLOCK_K]`` for K > 1, whose softmax keeps several tiles live), chunks hold 8 items,
    a round of draws ``32 * num_warps``; 8 warps for a full tile or ``B >= 256``, 4 for K > 1. These
    run in 80-102 registers with no spills; 8192-item tiles, 16-item chunks or 64 draws a warp need
    128-255 registers, spill, or move the last level's ``[BLOCK_B, CHUNK]`` float64 through 64 KB of
    shared memory. The last-layer rung (``D > 0`` features a row) reads ``[BLOCK_N, BLOCK_D]``
    features at a time, 2048 elements: ``BLOCK_D <= 32`` and 64-row tiles for K = 1 (108-126
    registers at D = 128 and 256, no spill; 4096 elements took 243 registers at 4 warps and spilled
    at 8), ``BLOCK_D <= 64`` beside the softmax for K > 1 (161 registers at K = 51, D = 128;
    ``BLOCK_D = 32`` spilled 32 bytes there). The draw kernel runs one round of 256 draws (8 warps) a
    program.

    **Small N** (``N <= SMALL_N``, issue 29 item 4). There the data are small (at most 6.7 MB, the
    categorical K = 51 row at N = 16k) and the time is the serial chain of one call: the tiles (in
    parallel), then, for a row of several tiles, the arrival (a release fence and a ticket per tile on
    one address), the completing program's prefix over the ``T`` tile masses, and for each draw
    ``tile_steps + CHUNKS.bit_length() + 1`` dependent loads from L2 (about ``log2(N / CHUNK) + 3``,
    whatever the split between tiles and chunks). Under the large-N rules categorical K = 51 at
    N = 16k runs 512 tiles of 32 items (4 warps): 512 tickets, a 512-entry prefix, 14 dependent loads
    a draw. Two changes shorten that chain at the same data a thread:

    * **Chunks sized by the draws.** The item level holds ``[BLOCK_B, CHUNK]`` float64 prefixes in
      registers; the large-N rules size it for full rounds (``BLOCK_B = 32 * num_warps``, 8 items a
      thread). With few draws (``B = 32``: one round of 32) the same 8 a thread allow
      ``CHUNK = 256 * num_warps / BLOCK_B`` items (32 at 4 warps, 64 at 8; at most 64 and the tile):
      each doubling drops one dependent load from every draw (2-3 of 14 at N = 16k), and the tile's
      chunk prefix shrinks alike. Large B keeps ``CHUNK = 8``.
    * **Tiles by warps.** For K > 1 and the last-layer rung (tiles of 8-64 items), 8 warps and
      tiles of twice the items: the same elements a thread (4096 over 256 threads), half the tiles,
      tickets and prefix entries, one tile step fewer. The scalar losses keep their tiles: one tile
      up to 4096 items (no arrival at all) and 4 at 16k.

    Registers (ptxas -v, sm_90) grow with the wider last level: categorical 96 -> 128 (2 programs an
    SM: N = 16k's 256 tiles in one wave of a 132-SM H100/H200; A100 and H100 PCIe take a second
    partial wave of 28-40), the last-layer rung 128 -> 184-191 (one program an SM: 128 tiles at
    N = 16k, C = 1), with at most 16 bytes spilled where the large-N shapes spilled 32-56.

    Categorical K = 51 at N = 16k, B = 32: 256 tiles, 8 warps, chunks of 64, 11 dependent loads a
    draw (was 512 tiles, 4 warps, chunks of 8, 14). The loads are L2 hits of a few hundred cycles
    each; an estimate, not a measurement: the GPU check reports the plan of every row
    (``perf/bench_kernel.py``: ``tiles``, ``programs``, ``warps``, ``tile_items``, ``chunk``) and
    times the large-N shape beside it (variant ``laber-large-shape``), so the next GPU run confirms or
    refutes it. ``shape="large"`` applies the large-N rules at every N.
    """
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    small = shape == "auto" and N <= SMALL_N
    block_k = _next_power_of_2(K)
    categorical = loss == LossKind.CATEGORICAL
    block_d = min(_next_power_of_2(D), 64 if categorical else 32) if D > 0 else 1
    # Elements of a tile's [BLOCK_N, BLOCK_K] (or [BLOCK_N, BLOCK_D]) block: 2048 at 4 warps; at
    # small N the K > 1 and last-layer tiles take 8 warps and 4096 (the same 16 a thread).
    wide = small and (categorical or D > 0)
    elements = 4096 if wide else 2048
    if categorical:
        block_n = max(8, min(_next_power_of_2(N), elements // max(block_k, block_d)))
        num_warps = 8 if wide else 4
    else:
        block_n = max(16, min(_next_power_of_2(N), 4096 if D == 0 else elements // block_d))
        num_warps = 8 if wide or block_n == 4096 or B >= 256 else 4
    n_tiles = _cdiv(N, block_n)
    block_b = max(16, min(_next_power_of_2(B), 32 * num_warps))
    split = _cdiv(B, block_b) > MAX_ROUNDS_IN_TILE
    # The item level's [BLOCK_B, CHUNK] float64: 8 a thread, as in a full round of 8-item chunks.
    chunk = max(8, min(64, block_n, 256 * num_warps // block_b)) if small and not split else 8
    draw_num_warps = 8
    draw_block_b = max(16, min(_next_power_of_2(B), 32 * draw_num_warps))
    constexprs = {
        "BLOCK_N": block_n,
        "BLOCK_K": block_k,
        "BLOCK_D": block_d,
        "CHUNK": chunk,
        "BLOCK_B": block_b,
        "BLOCK_T": max(16, min(_next_power_of_2(n_tiles), 1024)),
    }
    return LaunchPlan(
        n_tiles,
        n_tiles.bit_length(),
        n_tiles * (block_n // chunk + 2),
        split,
        _cdiv(B, draw_block_b),
        constexprs,
        num_warps,
        draw_block_b,
        draw_num_warps,
    )


def launch_shape(C: int, N: int, K: int, B: int, loss: int, D: int = 0, shape: str = "auto") -> dict:
    """What :func:`launch_plan` chose for ``C`` rows, as the GPU check reports it per row.

    ``tiles`` (a row's), ``programs`` (of the fused launch: ``C * tiles``), ``warps``, ``tile_items``
    (``BLOCK_N``), ``chunk`` (items of the search's last level), ``draw_programs`` (of the second
    launch, 0 without one) and ``search_loads``: the dependent loads of one draw's search
    (``tile_steps + CHUNKS.bit_length() + 1``).

    Examples:
        >>> launch_shape(1, 16384, 51, 32, int(LossKind.CATEGORICAL))["tiles"], launch_shape(
        ...     1, 16384, 51, 32, int(LossKind.CATEGORICAL), shape="large")["tiles"]
        (256, 512)
    """
    plan = launch_plan(N, K, B, int(loss), D, shape)
    blocks = plan.constexprs
    return {
        "tiles": plan.n_tiles,
        "programs": C * plan.n_tiles,
        "warps": plan.num_warps,
        "tile_items": blocks["BLOCK_N"],
        "chunk": blocks["CHUNK"],
        "draw_programs": C * plan.draw_blocks if plan.split_draws else 0,
        "search_loads": plan.tile_steps + (blocks["BLOCK_N"] // blocks["CHUNK"]).bit_length() + 1,
    }


class Buffers(NamedTuple):
    """What one launch writes: the three outputs and the float64 scratch of step 1."""

    index: Tensor  # [C, B] int64
    weight: Tensor  # [C, B] float32
    priority: Tensor  # [C, N] float32
    scratch: Tensor  # [C, T * (BLOCK_N // CHUNK + 2)] float64


def allocate_buffers(pred: Tensor, batch_size: int, loss: int, D: int = 0, plan: LaunchPlan | None = None) -> Buffers:
    """Fresh (uninitialised) buffers for :func:`launch_laber` on ``pred``'s device (``D``: the
    features of a row for the last-layer rung, 0 for the output rung)."""
    C, N, K = pred.shape
    if plan is None:
        plan = launch_plan(N, K, batch_size, int(loss), D)
    device = pred.device
    return Buffers(
        torch.empty(C, batch_size, device=device, dtype=torch.int64),
        torch.empty(C, batch_size, device=device, dtype=torch.float32),
        torch.empty(C, N, device=device, dtype=torch.float32),
        torch.empty(C, plan.scratch_per_row, device=device, dtype=torch.float64),
    )


class Launch(NamedTuple):
    """One kernel launch's grid and arguments but the tensors (:func:`launch_arguments`)."""

    grid: tuple  # (programs,)
    ints: tuple  # the runtime int arguments, after the tensors
    constants: dict  # the constexprs and num_warps (not to be mutated: the launch is cached)


@functools.lru_cache(maxsize=4096)
def launch_arguments(
    N: int,
    K: int,
    B: int,
    loss: int,
    D: int,
    C: int,
    slots: int,
    weighting: int,
    eps: float,
    huber_delta: float,
    bias: bool,
    split: bool,
    shape: str = "auto",
) -> tuple[Launch, Launch | None]:
    """The fused kernel's launch and, when the draws take their own (``split``), the draw kernel's.

    Cached, so an eager call builds no argument lists: it passes the tensors and these. Arguments the
    kernel ignores take a fixed value (``HUBER_DELTA`` but for Huber, ``BIAS_SQ`` but for the
    last-layer rung), so that they do not compile a kernel of their own.

    Examples:
        >>> fused, draw = launch_arguments(1024, 1, 32, int(LossKind.L2), 0, 1, RNG_SLOTS, 0, 1e-6, 1.0, True, False)
        >>> fused.grid, fused.ints, draw   # one tile of 1024 items: (N, B, tiles, tile_steps)
        ((1,), (1024, 32, 1, 1), None)
    """
    plan = launch_plan(N, K, B, loss, D, shape)
    fused = Launch(
        (C * plan.n_tiles,),
        (N, B, plan.n_tiles, plan.tile_steps),
        {
            "C": C,
            "K": K,
            "D": D,
            "n_slots": slots,
            "EPS": float(eps),
            "HUBER_DELTA": float(huber_delta) if loss == LossKind.HUBER else 1.0,
            "BIAS_SQ": (1.0 if bias else 0.0) if D > 0 else 1.0,
            "LOSS": loss,
            "SURROGATE": SURROGATE_LAST_LAYER if D > 0 else SURROGATE_OUTPUT,
            "WEIGHTING": weighting,
            "DRAW": not split,
            **plan.constexprs,
            "num_warps": plan.num_warps,
        },
    )
    if not split:
        return fused, None
    draw = Launch(
        (C * plan.draw_blocks,),
        (N, B, plan.n_tiles, plan.tile_steps, plan.draw_blocks),
        {
            "C": C,
            "WEIGHTING": weighting,
            "BLOCK_N": plan.constexprs["BLOCK_N"],
            "CHUNK": plan.constexprs["CHUNK"],
            "BLOCK_B": plan.draw_block_b,
            "num_warps": plan.draw_num_warps,
        },
    )
    return fused, draw


def launch_laber(
    pred: Tensor,
    target: Tensor,
    features: Tensor | None,
    state: Tensor,
    batch_size: int,
    loss: int,
    weighting: int,
    eps: float,
    huber_delta: float,
    bias: bool = True,
    *,
    buffers: Buffers | None = None,
    split_draws: bool | None = None,
    traceable: bool = True,
    shape: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    """Launch the kernel (and, for many draws, :func:`laber_draw_kernel` after it), with no host
    sync; returns ``(index, weight, priority)``.

    ``features`` (``[C, N, D]``) selects the last-layer rung (``bias``: whether that layer has one),
    ``None`` the output rung.
    ``buffers`` (from :func:`allocate_buffers`) lets the tests fill outputs and scratch with poison
    first, so that anything left unwritten shows; ``split_draws`` overrides :func:`launch_plan`'s
    choice of where the draws run (the tests check that both give the same draws). The kernels go
    through ``wrap_triton``, so that ``torch.compile`` sees the launches; ``traceable=False`` launches
    them as they are (:func:`laber_fused_call`, where nothing traces). ``shape`` picks
    :func:`launch_plan`'s rules (``"large"``: the large-N shape at every N, which the GPU check times
    beside the default).
    """
    C, N, K = pred.shape
    if not isinstance(state, Tensor) or state.dtype != torch.int64 or state.dim() != 1 or state.numel() < 4:
        raise TypeError(f"rng_state must be an int64 [3 + S] tensor from new_rng_state, got {state!r:.80}")
    if state.device != pred.device:
        raise ValueError(f"rng_state is on {state.device}, the inputs on {pred.device}")
    if features is not None and (features.dim() != 3 or features.shape[:2] != (C, N) or features.shape[2] == 0):
        raise ValueError(f"features must be [C, N, D] = [{C}, {N}, D > 0], got {tuple(features.shape)}")
    D = 0 if features is None else features.shape[2]
    # The kernel reads contiguous rows (no strides to bind): a no-op for the usual inputs, a copy else.
    # What the kernel does not read goes as None: Triton binds a tensor in about 0.5 us, None for free.
    pred = pred.contiguous()
    target = None if int(loss) == int(LossKind.PRIORITY) else target.contiguous()
    h = None if features is None else features.contiguous()
    plan = launch_plan(N, K, batch_size, int(loss), D, shape)
    split = plan.split_draws if split_draws is None else split_draws
    index, weight, priority, scratch = (
        buffers if buffers is not None else allocate_buffers(pred, batch_size, loss, D, plan)
    )
    fused, draw = launch_arguments(
        N, K, batch_size, int(loss), D, C, state.numel() - 3, int(weighting), eps, huber_delta, bias, split, shape
    )
    # Triton launches on the current device: tensors on another GPU need their own current. Not
    # while tracing (fake tensors: no device to switch to, and Inductor guards the device itself).
    on_device = (
        torch.cuda.device(pred.device)
        if pred.is_cuda and not is_fake(pred) and pred.device.index != torch.cuda.current_device()
        else contextlib.nullcontext()
    )
    wrap = wrap_triton if traceable else _as_is
    with on_device:
        wrap(laber_fused_kernel)[fused.grid](
            pred, target, h, priority, scratch, index, weight, state, *fused.ints, **fused.constants
        )
        if draw is not None:
            wrap(laber_draw_kernel)[draw.grid](priority, scratch, index, weight, state, *draw.ints, **draw.constants)
            if int(weighting) == int(Weighting.MAX):
                # The draw programs stored each picked p; the minimum over the minibatch spans them all.
                torch.div(weight.amin(-1, keepdim=True), weight, out=weight)
    return index, weight, priority


def _as_is(kernel):
    return kernel


@triton_op("torchsample::laber_fused", mutates_args={"rng_state"})
def laber_fused(
    pred: Tensor,
    target: Tensor,
    features: Optional[Tensor],
    rng_state: Tensor,
    batch_size: int,
    loss: int,
    weighting: int,
    eps: float,
    huber_delta: float,
    bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``torch.ops.torchsample.laber_fused``: the fused LaBER op on CUDA tensors.

    Args:
        pred, target: ``[C, N, K]``, fp32/fp16/bf16/fp64.
        features: ``None`` for the output rung, ``p_i = ||g_i||``; ``[C, N, D]`` penultimate features
            (any float dtype) for the last-layer rung, ``p_i = ||g_i|| sqrt(||h_i||^2 + 1)``
            (``||g_i|| ||h_i||`` when ``bias`` is false: the last layer has none).
        rng_state: int64 ``[3 + S]`` on the same device, from :func:`new_rng_state` (owned by the
            caller) or :func:`rng_state` (the device's default); advanced in place.
        batch_size: ``B``; loss: a :class:`torchsample.codes.LossKind` (K > 1 only for
        ``CATEGORICAL``); weighting: a :class:`torchsample.codes.Weighting`; eps, huber_delta: floats;
        bias: whether the last layer has a bias (last-layer rung only).

    Returns:
        ``index`` int64 ``[C, B]``, ``weight`` float32 ``[C, B]``, ``priority`` float32 ``[C, N]``.

    Examples:
        >>> # needs a GPU, hence the SKIP
        >>> q, h = torch.rand(2, 128, 1, device="cuda"), torch.randn(2, 128, 64, device="cuda")  # doctest: +SKIP
        >>> index, weight, priority = torch.ops.torchsample.laber_fused(  # doctest: +SKIP
        ...     q, q, h, new_rng_state(q.device), 32, LossKind.PRIORITY, Weighting.MEAN, 1e-6, 1.0, True)
    """
    return launch_laber(pred, target, features, rng_state, batch_size, loss, weighting, eps, huber_delta, bias)


def _traced(x: Tensor) -> bool:
    """Whether a call on ``x`` is being traced or transformed: torch.compile, make_fx or export (a
    dispatch mode), fake tensors, functorch's wrappers."""
    return (
        torch.compiler.is_compiling()
        or is_fake(x)
        or _get_current_dispatch_mode() is not None
        or torch._C._functorch.is_functorch_wrapped_tensor(x)
    )


def laber_fused_call(
    pred: Tensor,
    target: Tensor,
    features: Optional[Tensor],
    rng_state: Tensor,
    batch_size: int,
    loss: int,
    weighting: int,
    eps: float,
    huber_delta: float,
    bias: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`laber_fused`, the op, where something traces the call; else its implementation directly.

    Eagerly the op's dispatch is pure host time, about 13 us a call (measured on CPU with the launches
    replaced by no-ops, ``python -m perf.bench_host``), more than the kernel takes on a GPU for N <= 16k.
    """
    if _traced(pred):
        return torch.ops.torchsample.laber_fused(
            pred, target, features, rng_state, batch_size, loss, weighting, eps, huber_delta, bias
        )
    return launch_laber(
        pred, target, features, rng_state, batch_size, loss, weighting, eps, huber_delta, bias, traceable=False
    )


def new_rng_state(
    device: torch.device | str, generator: torch.Generator | None = None, slots: int = RNG_SLOTS
) -> Tensor:
    """A fresh state for the kernel: int64 ``[3 + slots]``, ``(seed, 0, 0, ...)`` on ``device``.

    The seed comes from ``generator`` (on any device), or from torch's default CPU generator, so
    ``torch.manual_seed`` reproduces it. A caller that owns its state (a module buffer, created
    before any capture or compile) draws independently of every other caller; the kernel advances
    it in place. ``slots`` arrival tickets let that many rows of several tiles finish in parallel.

    Examples:
        >>> state = new_rng_state("cpu", torch.Generator().manual_seed(0))
        >>> state.shape, state[1:].abs().sum().item()
        (torch.Size([67]), 0)
    """
    on = generator.device if generator is not None else "cpu"
    seed = torch.randint(0, 2**62, (1,), generator=generator, device=on)
    return torch.cat([seed.cpu(), torch.zeros(2 + slots, dtype=torch.int64)]).to(device)


_STATES: dict = {}


def _stream_key(device: torch.device):
    """What a default state is keyed by besides the device: the current CUDA stream in eager mode
    (two streams may run launches at the same time, which must not share tickets), ``None`` while
    torch.compile traces (a compiled graph's default state is its own, apart from eager calls')."""
    if torch.compiler.is_compiling() or device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.current_stream(device).stream_id


def rng_state(device: torch.device, generator: torch.Generator | None = None) -> Tensor:
    """The state a plain op call uses: one persistent :func:`new_rng_state` per device and CUDA
    stream, created when first used and advanced by the kernel itself; with ``generator``, a fresh
    one drawn from it, so a seeded generator reproduces the draw.

    Calls on one stream run one after another and share the stream's state; calls on two streams
    have one each, so they may run at the same time. A captured CUDA graph replayed beside eager
    calls, or a compiled function used from several streams at once, needs a state of its own:
    pass ``rng_state=new_rng_state(device)``, created before capture (as :class:`torchsample.LaBER`
    does with its buffer). A stream's default state cannot be created while that stream captures.
    """
    if generator is not None:
        return new_rng_state(device, generator)
    device = torch.device(device)
    key = (device, _stream_key(device))
    state = _STATES.get(key)
    if state is None:
        if (
            device.type == "cuda"
            and not torch.compiler.is_compiling()
            and torch.cuda.is_available()
            and torch.cuda.is_current_stream_capturing()
        ):
            raise RuntimeError(
                "laber: this stream has no default rng_state yet and one cannot be created during CUDA graph "
                "capture; pass rng_state=torchsample.kernels.laber.new_rng_state(device), created before capture "
                "(or call the op once on this stream before capturing)"
            )
        state = _STATES[key] = new_rng_state(device)
    return state
