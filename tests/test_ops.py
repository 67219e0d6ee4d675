"""The LaBER ops: sampling distribution, weights, reproducibility, bad input, torch.compile.

Statistical tests use fixed seeds and a significance level fixed in advance (ALPHA), so each
assertion is a real hypothesis test whose tolerance follows from the sample size; the power tests
show the same machinery rejects a wrong distribution.
"""

import math

import pytest
import torch
from scipy import stats

from tests.conftest import DEVICES
from torchsample import critic_priorities, laber_downsample, laber_select

ALPHA = 1e-4  # false-alarm rate of each statistical assertion
DRAWS = 40_000


def distributions(n: int) -> dict:
    ar = torch.arange(n, dtype=torch.float32)
    with_zeros = torch.rand(n, generator=torch.Generator().manual_seed(n)) ** 2
    with_zeros[::3] = 0.0
    return {
        "uniform": torch.ones(n),
        "linear": ar + 1.0,
        "powerlaw": (ar + 1.0) ** -1.5,
        "with-zeros": with_zeros,
        "one-hot-ish": torch.where(ar == n // 2, 1.0, 1e-3),
    }


def chi_square_pvalue(index: torch.Tensor, probs: torch.Tensor) -> float:
    """Goodness of fit of drawn indices to ``probs``; cells with expected count < 5 are pooled."""
    counts = torch.bincount(index.flatten().cpu(), minlength=probs.numel()).double()
    probs = probs.double().cpu()
    expected = probs / probs.sum() * counts.sum()
    small = expected < 5
    if small.any():
        counts = torch.cat([counts[~small], counts[small].sum().view(1)])
        expected = torch.cat([expected[~small], expected[small].sum().view(1)])
    keep = expected > 0
    assert counts[~keep].sum() == 0, "drew an index whose probability is zero"
    if keep.sum() < 2:
        return 1.0
    return stats.chisquare(counts[keep].numpy(), expected[keep].numpy()).pvalue


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("eps", [0.0, 1e-6], ids=["eps0", "eps1e-6"])
@pytest.mark.parametrize("name", list(distributions(4)))
@pytest.mark.parametrize("critics", [1, 2], ids=["C1", "C2"])
def test_index_frequencies_fit_target_distribution(device, eps, name, critics):
    n = 64
    rows = [distributions(n)[name], distributions(n)["linear"]][:critics]
    p = torch.stack(rows).to(device) if critics == 2 else rows[0].to(device)
    out = laber_downsample(p, DRAWS, eps=eps, generator=torch.Generator(device).manual_seed(1))
    for c in range(critics):
        row_p = (p if critics == 1 else p[c]).float() + eps
        row_index = out.index if critics == 1 else out.index[c]
        assert chi_square_pvalue(row_index, row_p / row_p.sum()) > ALPHA
        if eps == 0:
            assert (row_p[row_index] > 0).all()


def test_chi_square_has_power_against_a_wrong_distribution():
    p = distributions(64)["linear"]
    out = laber_downsample(p, DRAWS, generator=torch.Generator().manual_seed(1))
    uniform = torch.full((64,), 1 / 64)
    assert chi_square_pvalue(out.index, uniform) < ALPHA
    slightly_off = p + 0.2 * p.mean()
    assert chi_square_pvalue(out.index, slightly_off / slightly_off.sum()) < ALPHA


@pytest.mark.parametrize("device", DEVICES)
def test_mean_weights_make_the_minibatch_loss_unbiased(device):
    """E[mean_i(w_i g_i)] equals the large batch's mean of g; the tolerance is z * standard error."""
    gen = torch.Generator(device).manual_seed(2)
    n, b, reps = 128, 32, 4000
    g = torch.randn(n, generator=torch.Generator().manual_seed(3)).to(device) * 3 + 1
    p = (g.abs() + 0.1 * torch.rand(n, generator=torch.Generator().manual_seed(4)).to(device)).expand(reps, n)
    out = laber_downsample(p.contiguous(), b, generator=gen)  # reps independent rows in one call
    estimates = (out.weight * g[out.index]).mean(-1).double()
    z = (estimates.mean() - g.double().mean()) / (estimates.std() / math.sqrt(reps))
    assert abs(z.item()) < stats.norm.isf(ALPHA / 2)
    # Power: without the weights the same estimator is visibly biased.
    unweighted = g[out.index].mean(-1).double()
    z_unweighted = (unweighted.mean() - g.double().mean()) / (unweighted.std() / math.sqrt(reps))
    assert abs(z_unweighted.item()) > stats.norm.isf(ALPHA / 2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("critics", [1, 2], ids=["C1", "C2"])
def test_weight_formulas(device, critics):
    shape = (critics, 200) if critics == 2 else (200,)
    p = torch.rand(shape, device=device)
    eps = 1e-3
    for weighting in ("mean", "lazy", "max"):
        out = laber_downsample(p, 50, weighting=weighting, eps=eps)
        q = p.float() + eps
        torch.testing.assert_close(out.priority, q)
        picked = q.gather(-1, out.index)
        expected = {
            "mean": q.mean(-1, keepdim=True) / picked,
            "lazy": 1.0 / picked,
            "max": picked.amin(-1, keepdim=True) / picked,
        }[weighting]
        torch.testing.assert_close(out.weight, expected, rtol=1e-6, atol=0)
        assert out.index.dtype == torch.int64 and out.weight.dtype == torch.float32
        assert out.index.shape == out.weight.shape == (*shape[:-1], 50)
    assert laber_downsample(p, 50, weighting="max").weight.amax(-1).sub(1).abs().max() < 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_all_zero_priorities_sample_uniformly_with_unit_weight(device):
    p = torch.zeros(2, 50, device=device)
    p[1] = torch.rand(50, device=device)  # the other row is untouched by the fallback
    out = laber_downsample(p, DRAWS, eps=0.0, generator=torch.Generator(device).manual_seed(5))
    assert (out.weight[0] == 1).all()
    assert chi_square_pvalue(out.index[0], torch.full((50,), 1 / 50)) > ALPHA
    torch.testing.assert_close(out.weight[1], p[1].mean() / p[1][out.index[1]])


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_generator_reproduces(device):
    p = torch.rand(2, 300, device=device)
    draw = lambda seed: laber_downsample(p, 64, generator=torch.Generator(device).manual_seed(seed))  # noqa: E731
    a, b, c = draw(7), draw(7), draw(8)
    assert torch.equal(a.index, b.index) and torch.equal(a.weight, b.weight)
    assert not torch.equal(a.index, c.index)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_low_and_high_precision_inputs_compute_in_float32(device, dtype):
    p = torch.rand(100, device=device).to(dtype)
    out = laber_downsample(p, 10)
    assert out.priority.dtype == out.weight.dtype == torch.float32
    torch.testing.assert_close(out.priority, p.float() + 1e-6)
    q, y = torch.randn(2, 100, device=device).to(dtype), torch.randn(2, 100, device=device).to(dtype)
    sel = laber_select(q, y, 10)
    torch.testing.assert_close(sel.priority, 2 * (q.float() - y.float()).abs() + 1e-6)


# ---------------------------------------------------------------------------------------------
# laber_select: the surrogates


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("critics", [1, 2], ids=["C1", "C2"])
def test_select_priorities_are_the_surrogates(device, critics):
    lead = (critics,) if critics == 2 else ()
    q, y = torch.randn(*lead, 257, device=device) * 2, torch.randn(*lead, 257, device=device)
    # TorchRL's l2 is (q - y)^2: its output gradient norm is 2 |q - y|.
    torch.testing.assert_close(laber_select(q, y, 8).priority, 2 * (q - y).abs() + 1e-6)
    torch.testing.assert_close(laber_select(q, y, 8).priority, critic_priorities(q, y) + 1e-6)
    huber = laber_select(q, y, 8, loss="huber", eps=0.0).priority
    torch.testing.assert_close(huber, (q - y).abs().clamp(max=1.0))
    assert huber.max() <= 1.0
    torch.testing.assert_close(
        laber_select(q, y, 8, loss="huber", huber_delta=0.5, eps=0.0).priority, (q - y).abs().clamp(max=0.5)
    )
    logits = torch.randn(*lead, 257, 51, device=device)
    target = torch.softmax(torch.randn(*lead, 257, 51, device=device), -1)
    cat = laber_select(logits, target, 8, loss="categorical", eps=0.0)
    torch.testing.assert_close(cat.priority, (torch.softmax(logits, -1) - target).norm(dim=-1))
    torch.testing.assert_close(cat.priority, critic_priorities(logits, target, "categorical"))
    assert cat.index.shape == (*lead, 8)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("critics", [1, 2], ids=["C1", "C2"])
@pytest.mark.parametrize("loss", ["l2", "huber", "categorical"])
def test_select_last_layer_priorities(device, critics, loss):
    """``p_i = output priority * sqrt(||h_i||^2 + 1)``, with features of another dtype than pred."""
    lead = (critics,) if critics == 2 else ()
    atoms = (11,) if loss == "categorical" else ()
    pred, target = torch.randn(*lead, 129, *atoms, device=device) * 2, torch.randn(*lead, 129, *atoms, device=device)
    if loss == "categorical":
        target = torch.softmax(target, -1)
    h = torch.randn(*lead, 129, 40, device=device).to(torch.bfloat16)
    out = laber_select(pred, target, 8, loss=loss, surrogate="last-layer", features=h, eps=0.0)
    output = laber_select(pred, target, 8, loss=loss, eps=0.0).priority
    torch.testing.assert_close(out.priority, output * (h.float().square().sum(-1) + 1).sqrt())
    assert out.index.shape == (*lead, 8)


@pytest.mark.parametrize("device", DEVICES)
def test_select_draws_in_proportion_to_the_surrogate(device):
    q = torch.linspace(0, 3, 40, device=device)
    y = torch.zeros(40, device=device)
    out = laber_select(q, y, DRAWS, eps=0.0, generator=torch.Generator(device).manual_seed(9))
    assert chi_square_pvalue(out.index, q / q.sum()) > ALPHA
    assert (out.index != 0).all()  # |q_0 - y_0| = 0


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "priorities, kwargs, error, match",
    [
        (torch.tensor([1.0, float("nan")]), {}, ValueError, "priorities contain NaN"),
        (torch.tensor([1.0, float("inf")]), {}, ValueError, "priorities contain inf"),
        (torch.tensor([1.0, -0.5]), {}, ValueError, "priorities contain negative"),
        (torch.tensor([1.0, -0.5]), {"eps": 0.0}, ValueError, "priorities contain negative"),
        (torch.ones(4), {"batch_size": 0}, ValueError, "batch_size must be >= 1"),
        (torch.ones(4), {"batch_size": 2.0}, TypeError, "batch_size must be an int"),
        (torch.ones(4), {"batch_size": True}, TypeError, "batch_size must be an int"),
        (torch.ones(0), {}, ValueError, "priorities must be a non-empty"),
        (torch.ones(2, 0), {}, ValueError, "priorities must be a non-empty"),
        (torch.ones(2, 3, 4), {}, ValueError, r"priorities must be a non-empty \[N\] or \[C, N\]"),
        (torch.ones(4, dtype=torch.int64), {}, TypeError, "priorities must be a floating-point"),
        ([1.0, 2.0], {}, TypeError, "priorities must be a tensor"),
        (torch.ones(4), {"weighting": "median"}, ValueError, "weighting must be one of"),
        (torch.ones(4), {"eps": -1.0}, ValueError, "eps must be"),
        (torch.ones(4), {"eps": float("nan")}, ValueError, "eps must be"),
    ],
    ids=[
        "nan",
        "inf",
        "negative",
        "negative-eps0",
        "batch0",
        "batch-float",
        "batch-bool",
        "empty",
        "empty-rows",
        "3d",
        "int",
        "list",
        "weighting",
        "eps-negative",
        "eps-nan",
    ],
)
def test_downsample_bad_input(priorities, kwargs, error, match):
    kwargs = {"batch_size": 2, **kwargs}
    with pytest.raises(error, match=match):
        laber_downsample(priorities, kwargs.pop("batch_size"), **kwargs)


@pytest.mark.parametrize(
    "pred, target, kwargs, error, match",
    [
        (torch.ones(4), torch.ones(5), {}, ValueError, "pred and target must have the same shape"),
        (torch.ones(4), torch.ones(4, dtype=torch.float64), {}, TypeError, "same dtype"),
        (torch.ones(4), torch.ones(4, device="meta"), {}, ValueError, "same device"),
        (torch.ones(4), torch.ones(4), {"loss": "l1"}, ValueError, "loss must be one of"),
        (torch.ones(4), torch.ones(4), {"loss": "categorical"}, ValueError, r"pred must be \[N, K\]"),
        (torch.ones(2, 3, 4), torch.ones(2, 3, 4), {}, ValueError, r"pred must be \[N\] or \[C, N\]"),
        (
            torch.tensor([0.0, float("nan")]),
            torch.zeros(2),
            {},
            ValueError,
            "computed from pred and target contain NaN",
        ),
        (torch.ones(4), torch.ones(4), {"huber_delta": 0.0, "loss": "huber"}, ValueError, "huber_delta"),
        (torch.ones(0), torch.ones(0), {}, ValueError, "pred is empty"),
        (torch.ones(4, dtype=torch.int32), torch.ones(4, dtype=torch.int32), {}, TypeError, "floating-point"),
        (
            torch.ones(4),
            torch.ones(4),
            {"surrogate": "full"},
            ValueError,
            r"surrogate must be one of \('output', 'last-layer', 'exact'\)",
        ),
        (torch.ones(4), torch.ones(4), {"surrogate": "exact"}, ValueError, "use torchsample.LaBER"),
        (torch.ones(4), torch.ones(4), {"surrogate": "last-layer"}, ValueError, "needs features="),
        (torch.ones(4), torch.ones(4), {"features": torch.ones(4, 3)}, ValueError, "pass surrogate='last-layer'"),
        (
            torch.ones(2, 4),
            torch.ones(2, 4),
            {"surrogate": "last-layer", "features": torch.ones(4, 3)},
            ValueError,
            r"features must be \[2, 4, D\]",
        ),
        (
            torch.ones(4, 5),
            torch.ones(4, 5),
            {"surrogate": "last-layer", "features": torch.ones(4, 5, 3), "loss": "categorical"},
            ValueError,
            r"features must be \[4, D\]",
        ),
        (
            torch.ones(4),
            torch.ones(4),
            {"surrogate": "last-layer", "features": torch.ones(4, 3, dtype=torch.int64)},
            TypeError,
            "features must be a floating-point",
        ),
        (
            torch.ones(4),
            torch.ones(4),
            {"surrogate": "last-layer", "features": torch.ones(4, 3, device="meta")},
            ValueError,
            "features must be on pred's device",
        ),
    ],
    ids=[
        "shape",
        "dtype",
        "device",
        "loss",
        "categorical-1d",
        "3d",
        "nan",
        "huber-delta",
        "empty",
        "int",
        "surrogate",
        "exact",
        "last-layer-no-features",
        "features-without-last-layer",
        "features-rows",
        "features-categorical-rows",
        "features-int",
        "features-device",
    ],
)
def test_select_bad_input(pred, target, kwargs, error, match):
    with pytest.raises(error, match=match):
        laber_select(pred, target, 2, **kwargs)


# ---------------------------------------------------------------------------------------------
# torch.compile


def _downsample_fn(p):
    out = laber_downsample(p, 16, weighting="max")
    return out.index, out.weight


def _select_fn(q, y):
    out = laber_select(q, y, 16, loss="huber")
    return out.index, out.weight, out.priority


def _categorical_fn(z, m):
    out = laber_select(z, m, 16, loss="categorical")
    return out.index, out.weight


@pytest.mark.slow
@pytest.mark.parametrize(
    "fn, make_args",
    [
        (_downsample_fn, lambda: (torch.rand(2, 64),)),
        (_select_fn, lambda: (torch.randn(64), torch.randn(64))),
        (_categorical_fn, lambda: (torch.randn(2, 64, 11), torch.softmax(torch.randn(2, 64, 11), -1))),
    ],
    ids=["downsample", "select-huber", "select-categorical"],
)
def test_compiles_with_fullgraph_and_no_graph_break(fn, make_args):
    torch._dynamo.reset()
    args = make_args()
    assert torch._dynamo.explain(fn)(*args).graph_break_count == 0
    index, weight, *rest = torch.compile(fn, fullgraph=True)(*args)
    eager_index, eager_weight, *_ = fn(*args)
    assert index.shape == eager_index.shape and index.dtype == torch.int64
    n = args[0].shape[-2] if fn is _categorical_fn else args[0].shape[-1]
    assert ((index >= 0) & (index < n)).all() and torch.isfinite(weight).all() and (weight > 0).all()


@pytest.mark.slow
def test_compiled_value_check_fires():
    torch._dynamo.reset()
    compiled = torch.compile(_downsample_fn, fullgraph=True)
    compiled(torch.rand(2, 64))
    with pytest.raises(RuntimeError, match="finite and non-negative"):
        compiled(-torch.rand(2, 64))
