"""Kernel-vs-reference cases for the fused LaBER kernel, run by ``test_laber_kernel.py``.

Not collected directly (no ``test_`` prefix): they need ``TRITON_INTERPRET=1`` set before triton
decorates the kernel (on CPU), or a CUDA device (compiled), so they run in a subprocess of their own.
"""
import math

import pytest
import torch
import triton
import triton.language as tl
from scipy import stats

from torchsample.codes import Surrogate as S
from torchsample.codes import Weighting as W
from torchsample.kernels.laber import launch_laber, rng_state
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
        tl.store(out_ptr + c * B + offs, tl.rand(seed, counter + c * B + offs), mask=offs < B)


def kernel_uniforms(state: torch.Tensor, C: int, B: int) -> torch.Tensor:
    out = torch.full((C, B), float("nan"), device=state.device)
    philox_uniforms_kernel[(C,)](state, out, B, BLOCK_B=128)
    return out


def make_inputs(surrogate: int, C: int, N: int, K: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if surrogate == S.CATEGORICAL:
        pred = torch.randn(C, N, K, generator=g) * 2
        target = torch.softmax(torch.randn(C, N, K, generator=g), -1)
    else:
        pred = torch.randn(C, N, 1, generator=g)
        target = torch.randn(C, N, 1, generator=g)
        if surrogate == S.PRIORITY:
            pred = pred.abs()
            pred[:, ::4] = 0.0  # items without mass: never drawn when eps == 0
            target = pred
    return pred.to(DEVICE, dtype), target.to(DEVICE, dtype)


def fresh_state(seed: int) -> torch.Tensor:
    return rng_state(torch.device(DEVICE), torch.Generator(DEVICE).manual_seed(seed))


def run(pred, target, state, B, surrogate, weighting, eps=0.0, huber_delta=1.0):
    # NaN-filled inputs to the reference check would show an output the kernel left unwritten.
    return launch_laber(pred, target, state, B, surrogate, weighting, eps, huber_delta)


CASES = [
    pytest.param(s, w, C, N, K, dt, id=f"{S(s).label}-{W(w).label}-N{N}-K{K}-C{C}-{dt}")
    for s, K in [(S.PRIORITY, 1), (S.L2, 1), (S.HUBER, 1), (S.CATEGORICAL, 1), (S.CATEGORICAL, 51)]
    for N in (1, 127, 1000, 4097)
    for C in (1, 2)
    for w, dt in ([(W.MEAN, "fp32"), (W.LAZY, "fp16"), (W.MAX, "bf16")] if N == 127 else [(W((N + C + s) % 3), "fp32")])
]


@pytest.mark.parametrize("surrogate, weighting, C, N, K, dtype", CASES)
def test_kernel_matches_reference(surrogate, weighting, C, N, K, dtype):
    pred, target = make_inputs(surrogate, C, N, K, DTYPES[dtype])
    B = 97
    state = fresh_state(N + K)
    u = kernel_uniforms(state, C, B)
    index, weight, priority = run(pred, target, state, B, surrogate, weighting, eps=0.0, huber_delta=0.7)
    ref_index, ref_weight, ref_priority = laber_naive(pred, target, u, surrogate, weighting, 0.0, 0.7)
    tol = {"fp32": 1e-6, "fp16": 1e-3, "bf16": 1e-2}[dtype] if surrogate != S.CATEGORICAL else 2e-5
    torch.testing.assert_close(priority, ref_priority, rtol=tol, atol=tol)
    assert ((index >= 0) & (index < N)).all()
    has_mass = priority.sum(1) > 0  # an all-zero row (N == 1 here) draws uniformly
    assert (priority.gather(1, index)[has_mass] > 0).all(), "drew an item with zero priority"
    # Same uniforms, same search: a draw may differ only where u * sum(p) lies within the rounding
    # error of a float32 prefix sum (at most N * 2^-24 * sum(p)) of the boundary between the two.
    cdf = ref_priority.double().cumsum(-1)
    total = cdf[:, -1:]
    differ = index != ref_index
    boundary = cdf.gather(1, torch.minimum(index, ref_index))
    distance = (u.double() * total - boundary).abs()
    tolerance = (N * 2.0**-24 * total).expand_as(distance)
    assert (distance[differ] <= tolerance[differ]).all(), "a draw differs from the reference away from any boundary"
    assert differ.float().mean() < 0.1
    expected = torch.where(has_mass[:, None], importance_weights(priority, index, W(weighting).label), 1.0)
    torch.testing.assert_close(weight, expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("C", [1, 2])
@pytest.mark.parametrize("N, K", [(127, 1), (1000, 51), (65536, 1)], ids=["N127-K1", "N1000-K51", "N65536-K1"])
def test_kernel_draws_follow_the_priorities(N, K, C):
    surrogate = S.CATEGORICAL if K > 1 else S.PRIORITY
    pred, target = make_inputs(surrogate, C, N, K, torch.float32, seed=1)
    B = 20_000
    index, _, priority = run(pred, target, fresh_state(3), B, surrogate, W.MEAN)
    bins = min(N, 50)  # coarse cells keep the expected counts large for the chi-square test
    cell = torch.arange(N, device=DEVICE) * bins // N
    for c in range(C):
        probs = torch.zeros(bins, dtype=torch.float64).index_add_(0, cell.cpu(), priority[c].double().cpu())
        counts = torch.bincount(cell[index[c]].cpu(), minlength=bins).double()
        keep = probs > 0
        assert counts[~keep].sum() == 0
        expected = probs[keep] / probs[keep].sum() * B
        assert stats.chisquare(counts[keep].numpy(), expected.numpy()).pvalue > ALPHA


def test_all_zero_row_is_uniform_with_unit_weight():
    p = torch.zeros(2, 40, 1, device=DEVICE)
    p[1, 5] = 2.0
    index, weight, _ = run(p, p, fresh_state(4), 8000, S.PRIORITY, W.MEAN)
    assert (weight[0] == 1).all() and (index[1] == 5).all()
    torch.testing.assert_close(weight[1], torch.full_like(weight[1], (2.0 / 40) / 2.0))
    counts = torch.bincount(index[0].cpu(), minlength=40).double().numpy()
    assert stats.chisquare(counts).pvalue > ALPHA


def test_state_advances_and_generators_reproduce():
    pred, target = make_inputs(S.L2, 2, 300, 1, torch.float32)
    state = torch.tensor([1234, 0, 0], device=DEVICE)
    first = run(pred, target, state, 50, S.L2, W.MEAN)
    assert state.tolist() == [1234, 100, 0]  # counter += C * B, ticket reset
    second = run(pred, target, state, 50, S.L2, W.MEAN)
    assert not torch.equal(first[0], second[0])
    a = run(pred, target, fresh_state(9), 50, S.L2, W.MEAN)
    b = run(pred, target, fresh_state(9), 50, S.L2, W.MEAN)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_unbiased_mean_weights():
    N, B, reps = 128, 32, 300  # each row is a program: the interpreter runs them one by one
    g = torch.randn(N, generator=torch.Generator().manual_seed(5)).to(DEVICE) * 3 + 1
    p = (g.abs() + 0.1).expand(reps, N).unsqueeze(-1).contiguous()
    index, weight, _ = run(p, p, fresh_state(6), B, S.PRIORITY, W.MEAN)
    estimates = (weight * g[index]).mean(-1).double()
    z = (estimates.mean() - g.double().mean()) / (estimates.std() / math.sqrt(reps))
    assert abs(z.item()) < stats.norm.isf(ALPHA / 2)
