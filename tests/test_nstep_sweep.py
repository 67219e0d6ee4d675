"""The n-step small-batch sweep's page (issue 30): its figures recomputed by hand from a CSV, and the
committed page equal to what its generator writes from the committed CSV alone."""

import json
from itertools import combinations, product
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import AGENT_DEPS, require  # noqa: E402

require(*AGENT_DEPS + ("rliable", "pandas", "scipy"))
from experiments import nstep_sweep  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def tau_b_by_hand(xs, ys) -> float:
    """Kendall's tau-b from its definition over all pairs."""
    concordant = discordant = tied_x = tied_y = 0
    for (x1, y1), (x2, y2) in combinations(zip(xs, ys), 2):
        if x1 == x2:
            tied_x += 1
        if y1 == y2:
            tied_y += 1
        if x1 != x2 and y1 != y2:
            if (x1 - x2) * (y1 - y2) > 0:
                concordant += 1
            else:
                discordant += 1
    n0 = len(xs) * (len(xs) - 1) // 2
    return (concordant - discordant) / np.sqrt((n0 - tied_x) * (n0 - tied_y))


def fake_sweep(path: Path, laber_slope: float) -> dict:
    """A finished sweep's CSV: uniform flat and noisy, LaBER-mean falling with the batch size by ``laber_slope``."""
    rng = np.random.default_rng(3)
    rows, finals = ["batch_size,sampler,seed,step,return"], {}
    for b, sampler, seed in product(nstep_sweep.BATCH_SIZES, nstep_sweep.SAMPLERS, nstep_sweep.SEEDS):
        base = 200.0 if sampler == "uniform" else 400.0 - laber_slope * np.log2(b)
        final = float(np.round(base + rng.normal(0, 20), 1))
        finals[(b, sampler, seed)] = final
        rows += [f"{b},{sampler},{seed},10000,{final / 2}", f"{b},{sampler},{seed},{nstep_sweep.TOTAL_STEPS},{final}"]
    path.write_text("\n".join(rows) + "\n")
    return finals


def test_the_page_recomputes_by_hand(tmp_path):
    finals = fake_sweep(tmp_path / "sweep.csv", laber_slope=40.0)
    text = nstep_sweep.page(tmp_path / "sweep.csv", {}, reps=200)
    assert "**Status: complete**, 30 of 30 runs." in text
    for sampler in nstep_sweep.SAMPLERS:
        keys = [k for k in finals if k[1] == sampler]
        tau = tau_b_by_hand([k[0] for k in keys], [finals[k] for k in keys])
        assert f"| {sampler} | 15 | {tau:.2f} |" in text
    # LaBER-mean falls by 160 over the sweep against noise of 20: a strong negative trend, which Holm keeps.
    assert "| laber-mean | 15 | -0.8" in text and text.count("| smaller batches do better |") == 1
    for b in nstep_sweep.BATCH_SIZES:
        x = np.sort([finals[(b, "laber-mean", s)] for s in nstep_sweep.SEEDS])
        y = [finals[(b, "uniform", s)] for s in nstep_sweep.SEEDS]
        # three runs: floor(3 / 4) = 0 cut, so the IQM is the mean; P(X > Y) over the 9 pairs.
        p = np.mean([1.0 if xi > yi else 0.5 if xi == yi else 0.0 for xi in x for yi in y])
        assert f"| {b} | {np.mean(y):.1f} [" in text and f"| {x.mean():.1f} [" in text
        assert f"| {p:.2f} [" in text


def test_a_flat_sweep_is_a_null(tmp_path):
    fake_sweep(tmp_path / "sweep.csv", laber_slope=0.0)
    text = nstep_sweep.page(tmp_path / "sweep.csv", {}, reps=100)
    assert "| Holm at 0.05 |" in text and "| null |" in text


@pytest.mark.parametrize("p_values", [(0.01, 0.04), (0.03, 0.04), (0.02, 0.30), (0.5, 0.001)])
def test_holm_is_the_textbook_step_down(p_values):
    named = dict(zip("ab", p_values))
    first, second = sorted(named, key=named.get)
    expected = {first: named[first] <= 0.025}
    expected[second] = expected[first] and named[second] <= 0.05
    assert nstep_sweep.holm(named) == expected


def test_the_committed_page_is_its_generators():
    cfg = nstep_sweep.Config()
    csv, page = ROOT / cfg.csv, ROOT / cfg.page
    if csv.exists():
        meta = json.loads(csv.with_suffix(".json").read_text())
        assert nstep_sweep.page(csv, meta) == page.read_text()
    else:  # committed before the runs: the design alone
        assert nstep_sweep.page_without_runs(csv.name) == page.read_text()
