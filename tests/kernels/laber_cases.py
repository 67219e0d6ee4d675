"""Kernel-vs-reference cases for the fused LaBER kernel, run by ``test_laber_kernel.py``.

Not collected directly (no ``test_`` prefix): they need ``TRITON_INTERPRET=1`` set before triton
decorates the kernel (on CPU), or a CUDA device (compiled), so they run in a subprocess of their own.
Every launch writes into buffers filled with poison first (NaN, -1), so an output or a scratch
entry that the kernel leaves unwritten, or reads before it is written, fails a check.
"""

import math

import pytest
import torch
import triton
import triton.language as tl
from scipy import stats

from torchsample.codes import LossKind as L
from torchsample.codes import Weighting as W
from torchsample.kernels import laber
from torchsample.kernels.laber import allocate_buffers, launch_laber, new_rng_state
from torchsample.kernels.laber_naive import laber_naive
from torchsample.weights import importance_weights

DEVICE = "cuda" if torch.cuda.is_available() and not triton.knobs.runtime.interpret else "cpu"
ALPHA = 1e-4
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@triton.jit
def philox_uniforms_kernel(state_ptr, out_ptr, B, BLOCK_B: tl.constexpr):
    """The uniforms the LaBER kernel draws for the same state (same seed, same offsets)."""
    c = tl.program_id(0).to(tl.int64)
    seed = tl.load(state_ptr)
    counter = tl.load(state_ptr + 1)
    for start in range(0, B, BLOCK_B):
        offs = start + tl.arange(0, BLOCK_B).to(tl.int64)
        tl.store(out_ptr + c * B + offs, laber.uniform52(seed, counter + c * B + offs), mask=offs < B)


def kernel_uniforms(state: torch.Tensor, C: int, B: int) -> torch.Tensor:
    out = torch.full((C, B), float("nan"), device=state.device, dtype=torch.float64)
    philox_uniforms_kernel[(C,)](state, out, B, BLOCK_B=1024)
    return out


@triton.jit
def search_kernel(
    u_ptr,
    index_ptr,
    priority_ptr,
    scratch_ptr,
    N,
    n_tiles,
    tile_steps,
    last_positive,
    B,
    BLOCK_N: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    """The LaBER kernel's search (its own ``search``) of row 0 for given ``u`` in ``[0, total)``."""
    offs = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask = offs < B
    u = tl.load(u_ptr + offs, mask=mask, other=0.0)
    tile_row = scratch_ptr + n_tiles * (BLOCK_N // CHUNK)
    index, _ = laber.search(
        u, mask, priority_ptr, scratch_ptr, tile_row, N, n_tiles, tile_steps, last_positive, BLOCK_N, CHUNK
    )
    tl.store(index_ptr + offs, index, mask=mask)


def make_inputs(loss: int, C: int, N: int, K: int, dtype: torch.dtype, seed: int = 0, D: int = 0):
    """``(pred, target, features)``: ``[C, N, K]`` inputs of ``loss``, and ``[C, N, D]`` features of
    the last-layer rung (``None`` for ``D = 0``, the output rung), a quarter of their rows zero."""
    g = torch.Generator().manual_seed(seed)
    features = None
    if D > 0:
        features = torch.randn(C, N, D, generator=g) * torch.rand(C, N, 1, generator=g) * 3
        features[:, 1::4] = 0.0  # ||h|| = 0: the factor is 1, the output priority alone
        features = features.to(DEVICE, dtype)
    if loss == L.CATEGORICAL:
        pred = torch.randn(C, N, K, generator=g) * 2
        target = torch.softmax(torch.randn(C, N, K, generator=g), -1)
    else:
        pred = torch.randn(C, N, 1, generator=g)
        target = torch.randn(C, N, 1, generator=g)
        if loss == L.PRIORITY:
            pred = pred.abs()
            pred[:, ::4] = 0.0  # items without mass: never drawn when eps == 0
            target = pred
    return pred.to(DEVICE, dtype), target.to(DEVICE, dtype), features


def fresh_state(seed: int, slots: int = laber.RNG_SLOTS) -> torch.Tensor:
    return new_rng_state(DEVICE, torch.Generator().manual_seed(seed), slots)


def poisoned_buffers(pred, B, loss, D=0) -> laber.Buffers:
    buffers = allocate_buffers(pred, B, loss, D)
    buffers.index.fill_(-1)
    for t in buffers[1:]:
        t.fill_(float("nan"))
    return buffers


def run(pred, target, state, B, loss, weighting, eps=0.0, huber_delta=1.0, features=None, split_draws=None, bias=True):
    """One call into poisoned buffers; checks that every output was written."""
    buffers = poisoned_buffers(pred, B, loss, 0 if features is None else features.shape[-1])
    index, weight, priority = launch_laber(
        pred,
        target,
        features,
        state,
        B,
        loss,
        weighting,
        eps,
        huber_delta,
        bias,
        buffers=buffers,
        split_draws=split_draws,
    )
    assert ((index >= 0) & (index < pred.shape[1])).all(), "an index is unwritten or out of range"
    assert torch.isfinite(weight).all() and (weight > 0).all(), "a weight is unwritten or not positive"
    assert not priority.isnan().any(), "a priority is unwritten"
    return index, weight, priority


def coarse_chi_square_pvalue(index: torch.Tensor, priority: torch.Tensor, bins: int = 50) -> float:
    """Goodness of fit of one row's draws to ``priority``, over ``bins`` cells of neighbouring items
    (coarse cells keep the expected counts large)."""
    N = priority.numel()
    bins = min(N, bins)
    cell = torch.arange(N) * bins // N
    probs = torch.zeros(bins, dtype=torch.float64).index_add_(0, cell, priority.double().cpu())
    counts = torch.bincount(cell[index.flatten().cpu()], minlength=bins).double()
    keep = probs > 0
    assert counts[~keep].sum() == 0, "drew from a cell without mass"
    expected = probs[keep] / probs[keep].sum() * counts.sum()
    return stats.chisquare(counts[keep].numpy(), expected.numpy()).pvalue


def kind(s, K, D=0):
    return f"{L(s).label}-K{K}" + (f"-last-layer-D{D}" if D else "")


# (loss, K, weighting, C, N, B, dtype[, D]): every loss, weighting and dtype, N from 1 to 2^20
# (one tile, several, a last tile of one item), B from 1 to 4096 (one round of draws or several, a
# last round of one draw); the last-layer rung with D features (one block of them or several, a
# partial last one; tiles of 64 rows for D >= 32, so N = 4097 spans 65); sized so that the
# interpreter runs them all in about a minute.
MATCH = [
    (L.PRIORITY, 1, W.MEAN, 1, 1, 1, "fp32"),
    (L.HUBER, 1, W.MAX, 2, 1, 32, "fp32"),
    (L.CATEGORICAL, 51, W.LAZY, 2, 1, 33, "fp32"),
    (L.PRIORITY, 1, W.MEAN, 2, 127, 513, "fp32"),
    (L.L2, 1, W.LAZY, 2, 127, 97, "fp16"),
    (L.HUBER, 1, W.MAX, 1, 127, 97, "bf16"),
    (L.CATEGORICAL, 1, W.MEAN, 2, 127, 97, "fp32"),
    (L.CATEGORICAL, 51, W.MAX, 2, 127, 128, "bf16"),
    (L.CATEGORICAL, 51, W.LAZY, 1, 127, 97, "fp16"),
    (L.L2, 1, W.MAX, 1, 128, 1024, "fp32"),
    (L.CATEGORICAL, 51, W.MEAN, 2, 1000, 97, "fp32"),
    (L.PRIORITY, 1, W.LAZY, 2, 4097, 1025, "fp32"),
    (L.HUBER, 1, W.MEAN, 2, 4097, 97, "fp32"),
    (L.CATEGORICAL, 51, W.MAX, 1, 4097, 97, "fp32"),
    (L.L2, 1, W.MEAN, 2, 8193, 4096, "fp32"),
    (L.PRIORITY, 1, W.MAX, 2, 65537, 1025, "fp32"),
    (L.HUBER, 1, W.LAZY, 1, 65537, 97, "bf16"),
    (L.PRIORITY, 1, W.MEAN, 1, 2**20, 4096, "fp32"),
    (L.L2, 1, W.MEAN, 2, 1, 33, "fp32", 7),
    (L.L2, 1, W.MAX, 2, 127, 97, "fp32", 40),
    (L.HUBER, 1, W.LAZY, 1, 4097, 97, "bf16", 128),
    (L.CATEGORICAL, 51, W.MEAN, 2, 127, 97, "fp16", 200),
    (L.CATEGORICAL, 51, W.MAX, 1, 1000, 513, "fp32", 256),
    (L.HUBER, 1, W.MEAN, 2, 127, 97, "fp32", 16, False),  # a last layer without bias: ||g|| ||h||
]


@pytest.mark.parametrize(
    "loss, K, weighting, C, N, B, dtype, D, bias",
    [
        pytest.param(
            *case,
            *(0, True)[len(case) - 7 :],
            id=f"{kind(case[0], case[1], *case[7:8])}-{W(case[2]).label}-"
            f"C{case[3]}-N{case[4]}-B{case[5]}-{case[6]}" + ("-no-bias" if case[8:] == (False,) else ""),
        )
        for case in MATCH
    ],
)
def test_kernel_matches_reference(loss, K, weighting, C, N, B, dtype, D, bias):
    pred, target, features = make_inputs(loss, C, N, K, DTYPES[dtype], D=D)
    state = fresh_state(N + K + B)
    u = kernel_uniforms(state, C, B)
    index, weight, priority = run(
        pred, target, state, B, loss, weighting, eps=0.0, huber_delta=0.7, features=features, bias=bias
    )
    ref_index, ref_weight, ref_priority = laber_naive(pred, target, u, loss, weighting, 0.0, 0.7, features, bias)
    # The softmax and the feature norms are summed in another order than the reference's.
    tol = 2e-5 if loss == L.CATEGORICAL or D else {"fp32": 1e-6, "fp16": 1e-3, "bf16": 1e-2}[dtype]
    torch.testing.assert_close(priority, ref_priority, rtol=tol, atol=tol)
    has_mass = priority.sum(1) > 0  # an all-zero row (N == 1 here) draws uniformly
    assert (priority.gather(1, index)[has_mass] > 0).all(), "drew an item with zero priority"
    # Same uniforms, same search: a draw may differ only where u * sum(p) lies within the rounding
    # of a float64 cumulative sum (summed in another order) of the boundary between the two.
    cdf = ref_priority.double().cumsum(-1)
    total = cdf[:, -1:]
    differ = index != ref_index
    boundary = cdf.gather(1, torch.minimum(index, ref_index))
    distance = (u * total - boundary).abs()
    tolerance = (N * 2.0**-50 * total).expand_as(distance)
    assert (distance[differ] <= tolerance[differ]).all(), "a draw differs from the reference away from any boundary"
    expected = torch.where(has_mass[:, None], importance_weights(priority, index, W(weighting).label), 1.0)
    torch.testing.assert_close(weight, expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize(
    "loss, K, D, bias",
    [
        (L.L2, 1, 0, True),
        (L.HUBER, 1, 0, True),
        (L.CATEGORICAL, 51, 0, True),
        (L.L2, 1, 7, True),
        (L.HUBER, 1, 7, False),
        (L.CATEGORICAL, 51, 7, False),
    ],
    ids=["l2", "huber", "categorical", "l2-last-layer", "huber-last-layer-no-bias", "categorical-last-layer-no-bias"],
)
def test_reference_priorities_are_the_librarys(loss, K, D, bias):
    """The reference's own few lines give what the library's one home of the formulas gives."""
    from torchsample.surrogates import critic_priorities

    pred, target, features = make_inputs(loss, 2, 50, K, torch.float32, D=D)
    u = torch.rand(2, 3)
    _, _, priority = laber_naive(pred, target, u, loss, W.MEAN, 0.0, 0.7, features, bias)
    if K == 1:
        pred, target = pred[..., 0], target[..., 0]
    expected = critic_priorities(pred, target, L(loss).label, features=features, bias=bias, huber_delta=0.7)
    torch.testing.assert_close(priority, expected.to(priority.device))


@pytest.mark.parametrize("N, K", [(127, 1), (1000, 51), (65536, 1)], ids=["N127-K1", "N1000-K51", "N65536-K1"])
def test_kernel_draws_follow_the_priorities(N, K):
    C = 2  # two rows, two streams of uniforms
    loss = L.CATEGORICAL if K > 1 else L.PRIORITY
    pred, target, _ = make_inputs(loss, C, N, K, torch.float32, seed=1)
    B = 10_000
    index, _, priority = run(pred, target, fresh_state(3), B, loss, W.MEAN)
    for c in range(C):
        assert coarse_chi_square_pvalue(index[c], priority[c]) > ALPHA


def test_draws_resolve_small_items_behind_a_large_prefix():
    """N = 2^20: 2^19 items of mass 1, then 2^19 of mass 2^-6. A float32 cumulative sum (ulp 1/16
    at 2^19) and float32 uniforms resolve only every fourth of the light items, so the four residues
    ``i mod 4`` of the light half get far from equal shares; the kernel's float64 levels and 52-bit
    uniforms give each its 1/4."""
    N, B = 2**20, 8192
    p = torch.ones(1, N, 1)
    p[:, N // 2 :] = 2.0**-6
    index, _, _ = run(p.to(DEVICE), p.to(DEVICE), fresh_state(7), B, L.PRIORITY, W.MEAN)
    index = index[0].cpu()
    light = index >= N // 2
    counts = torch.cat([(~light).sum().view(1), torch.bincount(index[light] % 4, minlength=4)]).double()
    light_share = (N // 2 * 2.0**-6) / (N // 2 * (1 + 2.0**-6))
    expected = torch.tensor([1 - light_share] + [light_share / 4] * 4, dtype=torch.float64) * B
    assert stats.chisquare(counts.numpy(), expected.numpy()).pvalue > ALPHA


def test_effective_probabilities_at_4m_are_within_2_to_the_minus_47():
    """The probability with which the kernel's search returns item ``i``, computed exactly: on the
    grid of its uniforms (``u01 = k * 2^-52``), the first ``k`` that reaches each boundary, by
    bisection through the kernel's own ``search``. At N = 2^22 (1024 tiles), probes at tile and
    chunk edges, after a heavy prefix, in zero-mass chunks and at random: each is within 2^-47 of
    ``p_i / sum(p)``, 3e-8 relative for an item of average mass (the issue asks 1e-4)."""
    N = 2**22
    g = torch.Generator().manual_seed(11)
    p = torch.rand(1, N, 1, generator=g) + 0.5
    p[0, N // 2 : N // 2 + 4096] *= 2.0**-10  # light items behind half the mass
    p[0, 3 * N // 4 : 3 * N // 4 + 64] = 0.0  # zero-mass chunks
    p = p.to(DEVICE)
    blocks = laber.launch_plan(N, 1, 1, L.PRIORITY).constexprs
    buffers = poisoned_buffers(p, 1, L.PRIORITY)
    launch_laber(p, p, None, fresh_state(0), 1, L.PRIORITY, W.MEAN, 0.0, 1.0, buffers=buffers)
    priority = buffers.priority[0]
    n_tiles = triton.cdiv(N, blocks["BLOCK_N"])
    tile_prefix = buffers.scratch[0, n_tiles * (blocks["BLOCK_N"] // blocks["CHUNK"]) :][:n_tiles]
    total = tile_prefix[-1].item()
    edges = torch.arange(1, 16) * blocks["BLOCK_N"]
    probes = torch.cat(
        [
            edges - 1,
            edges,
            edges + 7,
            edges + 8,
            torch.arange(N // 2 - 2, N // 2 + 100),
            torch.arange(3 * N // 4 - 2, 3 * N // 4 + 66),
            torch.randint(0, N, (200,), generator=g),
        ]
    )
    # Item i is returned for k in [first(i), first(i + 1)): first(j) = the smallest k whose index >= j.
    targets = torch.cat([probes, probes + 1]).to(DEVICE)
    lo = torch.zeros_like(targets, dtype=torch.int64)
    hi = torch.full_like(lo, 2**52)
    last_positive = int((priority > 0).nonzero().max())
    while (lo < hi).any():
        mid = (lo + hi) // 2
        u = (mid.double() * 2.0**-52) * total
        index = torch.full_like(targets, -1)
        search_kernel[(triton.cdiv(len(u), 1024),)](
            u,
            index,
            priority,
            buffers.scratch,
            N,
            n_tiles,
            n_tiles.bit_length(),
            last_positive,
            len(u),
            BLOCK_N=blocks["BLOCK_N"],
            CHUNK=blocks["CHUNK"],
            BLOCK_B=1024,
        )
        reached = index >= targets
        hi = torch.where(reached, mid, hi)
        lo = torch.where(reached, lo, mid + 1)
    first, after = lo.cpu().double().chunk(2)
    effective = (after - first) * 2.0**-52
    exact = priority.double().cpu()[probes] / math.fsum(priority.double().cpu().tolist())
    assert (effective[exact == 0] == 0).all(), "a zero-mass item has a probability"
    error = (effective - exact).abs()
    assert error.max() < 2.0**-47, f"largest error {error.max():.3g}"
    relative = (error / exact)[priority.cpu()[probes] >= 0.5]
    assert relative.max() < 3e-8, f"largest relative error {relative.max():.3g}"


def test_all_zero_row_is_uniform_with_unit_weight():
    p = torch.zeros(2, 40, 1, device=DEVICE)
    p[1, 5] = 2.0
    index, weight, _ = run(p, p, fresh_state(4), 8000, L.PRIORITY, W.MEAN)
    assert (weight[0] == 1).all() and (index[1] == 5).all()
    torch.testing.assert_close(weight[1], torch.full_like(weight[1], (2.0 / 40) / 2.0))
    counts = torch.bincount(index[0].cpu(), minlength=40).double().numpy()
    assert stats.chisquare(counts).pvalue > ALPHA


@pytest.mark.parametrize("N", [300, 20_000], ids=["one-tile", "three-tiles"])
def test_state_advances_and_generators_reproduce(N):
    """The counter advances by C * B per call and every ticket is back to 0, however many rows share
    an arrival slot (the draws do not depend on it)."""
    C, B = 3, 50
    pred, target, _ = make_inputs(L.L2, C, N, 1, torch.float32)
    state = torch.tensor([1234] + [0] * (2 + laber.RNG_SLOTS), device=DEVICE)
    first = run(pred, target, state, B, L.L2, W.MEAN)
    assert state[1].item() == C * B and (state[2:] == 0).all()
    second = run(pred, target, state, B, L.L2, W.MEAN)
    assert state[1].item() == 2 * C * B and (state[2:] == 0).all()
    assert not torch.equal(first[0], second[0])
    a = run(pred, target, fresh_state(9), B, L.L2, W.MAX)
    one_slot = fresh_state(9, slots=1)  # all three rows complete in the last of their 3 * T programs
    b = run(pred, target, one_slot, B, L.L2, W.MAX)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert one_slot[1].item() == C * B and (one_slot[2:] == 0).all()


def record_grids(monkeypatch) -> list:
    """``(kernel name, grid)`` of every launch from now on."""
    grids = []

    def recording(kernel):
        class Launcher:
            def __getitem__(self, grid):
                grids.append((kernel.__name__, grid))
                return kernel[grid]

        return Launcher()

    monkeypatch.setattr(laber, "wrap_triton", recording)
    return grids


def test_rows_of_several_tiles_spread_over_programs(monkeypatch):
    """One launch of ``C * ceil(N / BLOCK_N)`` programs: a row of 65537 items takes 17, not 1."""
    grids = record_grids(monkeypatch)
    pred, target, _ = make_inputs(L.PRIORITY, 2, 65537, 1, torch.float32)
    run(pred, target, fresh_state(5), 8, L.PRIORITY, W.MEAN)
    assert laber.launch_plan(65537, 1, 8, L.PRIORITY).constexprs["BLOCK_N"] == 4096
    assert grids == [("laber_fused_kernel", (2 * 17,))]


def test_many_draws_spread_over_programs_of_a_second_launch(monkeypatch):
    """More than MAX_ROUNDS_IN_TILE rounds of draws: a second launch of one round per program."""
    grids = record_grids(monkeypatch)
    plan = laber.launch_plan(1000, 1, 65536, int(L.PRIORITY))
    assert plan.split_draws and not laber.launch_plan(1000, 1, 512, int(L.PRIORITY)).split_draws
    pred, target, _ = make_inputs(L.PRIORITY, 2, 1000, 1, torch.float32)
    run(pred, target, fresh_state(5), 65536, L.PRIORITY, W.MEAN)
    assert grids == [("laber_fused_kernel", (2,)), ("laber_draw_kernel", (2 * 65536 // plan.draw_block_b,))]


@pytest.mark.parametrize("weighting", [W.MEAN, W.LAZY, W.MAX], ids=lambda w: w.label)
@pytest.mark.parametrize("N, B", [(300, 77), (20_000, 700)], ids=["one-tile-B77", "five-tiles-B700"])
def test_draws_of_a_second_launch_are_the_fused_launchs_draws(N, B, weighting):
    """The same state gives the same indices and weights whether the completing programs draw or a
    second launch does (same Philox offsets); either way the counter advances by ``C * B`` and every
    ticket is back to 0. Three rows share one arrival slot: the second launch finds each row's prefix."""
    C = 3
    pred, target, _ = make_inputs(L.HUBER, C, N, 1, torch.float32, seed=3)
    states = [fresh_state(8, slots=1), fresh_state(8, slots=1)]
    fused = run(pred, target, states[0], B, L.HUBER, weighting, eps=1e-6, split_draws=False)
    split = run(pred, target, states[1], B, L.HUBER, weighting, eps=1e-6, split_draws=True)
    assert torch.equal(fused[0], split[0])
    torch.testing.assert_close(fused[1], split[1], rtol=0, atol=0)
    for state in states:
        assert state[1].item() == C * B and (state[2:] == 0).all()


def test_unbiased_mean_weights():
    """E[mean_i(w_i g_i)] equals the large batch's mean of g. The B = reps * 32 draws of a row are
    i.i.d., so reps groups of 32 are reps independent minibatches (one program, not reps)."""
    N, B, reps = 128, 32, 300
    g = torch.randn(N, generator=torch.Generator().manual_seed(5)).to(DEVICE) * 3 + 1
    p = (g.abs() + 0.1).view(1, N, 1)
    index, weight, _ = run(p, p, fresh_state(6), reps * B, L.PRIORITY, W.MEAN)
    estimates = (weight * g[index]).view(reps, B).mean(-1).double()
    z = (estimates.mean() - g.double().mean()) / (estimates.std() / math.sqrt(reps))
    assert abs(z.item()) < stats.norm.isf(ALPHA / 2)
