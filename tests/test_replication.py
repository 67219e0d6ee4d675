"""Issue 30's analysis: the window metric, Holm-corrected comparisons, the compact CSV of a study and its
reader, the replication page; every figure checked against a computation that does not go through
``experiments`` (numpy by hand, the pairwise definition of P(X > Y), textbook Holm)."""

import json
import re
import subprocess
import sys
from itertools import product
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import AGENT_DEPS, require  # noqa: E402

require(*AGENT_DEPS + ("rliable", "matplotlib", "pandas"))
from experiments import compare, contrasts, export, replication, stats  # noqa: E402
from experiments import runs as run_module  # noqa: E402
from experiments.config import Config  # noqa: E402
from experiments.runs import Run, command  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMALL = ROOT / "tests" / "data" / "study_small.csv"  # hand-made: 3 arms x seeds 3-7, evaluations at 5-20


def iqm_by_hand(values) -> float:
    """The mean of the middle half: floor(n / 4) cut at each end of the sorted values."""
    x = np.sort(np.asarray(values, dtype=float).ravel())
    cut = len(x) // 4
    return float(x[cut : len(x) - cut].mean())


def p_by_hand(xs, ys) -> float:
    """P(X > Y) by its definition: over all pairs, 1 if x > y, 1/2 if equal."""
    wins = sum(1.0 if x > y else 0.5 if x == y else 0.0 for x in xs for y in ys)
    return wins / (len(xs) * len(ys))


# ---------------------------------------------------------------------------------------------------
# The committed CSV's figures, recomputed


def test_the_small_csv_recomputes_iqm_and_p_improvement_by_hand():
    curves = export.read_curves(SMALL)
    final = export.scores_from_curves(curves, "final")
    assert list(final) == ["uniform", "laber-mean", "per"] and all(len(v) == 5 for v in final.values())
    # The finals written out by hand from the file (the evaluation at step 20 of each run, seeds 3-7).
    assert [final["laber-mean"][k] for k in range(3, 8)] == [2.5, 1.0, 3.5, 1.5, 3.0]
    assert [final["uniform"][k] for k in range(3, 8)] == [1.0, 2.5, 0.5, 3.0, 1.5]
    matrices = export.score_matrices(final)
    est = stats.interval_estimates(matrices, ["iqm"], reps=200)
    # laber-mean sorted 1, 1.5, 2.5, 3, 3.5: one cut at each end, (1.5 + 2.5 + 3) / 3.
    assert est["laber-mean"]["iqm"][0] == pytest.approx(7 / 3)
    assert est["uniform"]["iqm"][0] == pytest.approx((1.0 + 1.5 + 2.5) / 3)
    # P(laber-mean > uniform) pair by pair: 3.5 + 1.5 + 5 + 2.5 + 4.5 wins of 25 (ties 1/2).
    better = stats.improvement_over(matrices, "uniform", reps=200)
    assert better["laber-mean"][0] == pytest.approx(17 / 25)

    window = export.scores_from_curves(curves, "window", (10, 20))
    for sampler in window:
        by_hand = {}
        for c in curves:
            if c.sampler == sampler:
                by_hand[c.seed] = np.mean([r for s, r in zip(c.steps, c.returns) if 10 <= s <= 20])
        assert window[sampler] == pytest.approx(by_hand)
    matrices = export.score_matrices(window)
    est = stats.interval_estimates(matrices, ["iqm"], reps=200)
    better = stats.improvement_over(matrices, "uniform", reps=200)
    for sampler in window:
        assert est[sampler]["iqm"][0] == pytest.approx(iqm_by_hand(list(window[sampler].values())))
        if sampler != "uniform":
            expected = p_by_hand(list(window[sampler].values()), list(window["uniform"].values()))
            assert better[sampler][0] == pytest.approx(expected)
    # By hand on the window means (laber-mean 2, 2, 2.5, 7/6, 2.5; uniform 7/6, 5/3, 5/6, 2.5, 2/3): 19.5 of 25.
    assert better["laber-mean"][0] == pytest.approx(19.5 / 25)


def committed_studies() -> list[Path]:
    """The studies' CSVs (a ``-check.csv`` beside one is a rerun of some of its runs, read by its page)."""
    return sorted(p for p in (ROOT / "docs" / "results").glob("replication/*.csv") if not p.stem.endswith("-check"))


@pytest.mark.parametrize("path", committed_studies(), ids=lambda p: p.name)
def test_the_committed_replication_csv_recomputes_its_page(path):
    """The page is what its generator writes from the committed CSV alone, and its IQMs and P(> uniform)
    are numpy's by hand on that CSV."""
    meta = json.loads(path.with_suffix(".json").read_text())
    text = (ROOT / "docs" / "results" / "replication.md").read_text()
    assert replication.page(path, meta) == text
    curves = [c for c in export.read_curves(path) if c.steps[-1] >= replication.TOTAL_STEPS]
    window = export.scores_from_curves(curves, "window", replication.WINDOW, seeds=replication.SEEDS)
    for arm, by_seed in window.items():
        row = next(line for line in text.splitlines() if line.startswith(f"| {arm} | {len(by_seed)} | "))
        assert row.split(" | ")[2].startswith(f"{iqm_by_hand(list(by_seed.values())):.2f} [")
    if "uniform" in window and replication.FOCUS in window:
        p = p_by_hand(list(window[replication.FOCUS].values()), list(window["uniform"].values()))
        assert f"| P({replication.FOCUS} > uniform) | {p:.2f} |" in text


# ---------------------------------------------------------------------------------------------------
# The window metric


def test_window_metric_averages_the_evaluations_inside_both_ends():
    steps, returns = [5000, 10000, 25000, 30000, 35000, 40000], [9.0, 9.0, 1.0, 2.0, 3.0, 6.0]
    assert stats.run_score(steps, returns, "window", (25000, 40000)) == 3.0
    assert stats.run_score(steps, returns, "final") == 6.0
    with pytest.raises(ValueError, match="ends at step 40000"):
        stats.run_score(steps, returns, "window", (25000, 45000))
    with pytest.raises(ValueError, match="no evaluation"):
        stats.run_score(steps, returns, "window", (11000, 12000))
    with pytest.raises(ValueError, match="metric"):
        stats.run_score(steps, returns, "best")


# ---------------------------------------------------------------------------------------------------
# Holm


def holm_by_textbook(p_values: list[float], alpha: float) -> list[bool]:
    """Holm (1979): sort ascending, reject H_(i) while p_(i) <= alpha / (k - i + 1), stop at the first not."""
    k, rejected = len(p_values), [False] * len(p_values)
    for i, j in enumerate(sorted(range(k), key=lambda j: p_values[j])):
        if p_values[j] > alpha / (k - i):
            break
        rejected[j] = True
    return rejected


def replicates_with_share_below(share: float, n: int = 10_000) -> np.ndarray:
    """Bootstrap replicates of which ``share`` lie at 0.4 (below 1/2), the rest at 0.8."""
    below = round(share * n)
    return np.concatenate([np.full(below, 0.4), np.full(n - below, 0.8)])


@pytest.mark.parametrize(
    "shares",
    [
        (0.001, 0.002, 0.003),  # all far below every threshold: all separated
        (0.010, 0.011, 0.020),  # p = 0.020 > 0.05/3: the first stops it, though the others' intervals clear 1/2
        (0.005, 0.011, 0.020),  # p = 0.010, 0.022, 0.040: below 0.05/3, 0.05/2, 0.05: all three
        (0.005, 0.013, 0.020),  # p = 0.026 > 0.05/2 at the second: the third is not separated either
        (0.030, 0.001, 0.300),  # out of order: the second comparison goes first
    ],
)
def test_holm_intervals_give_the_textbook_decisions(shares):
    replicates = {f"other{i}": replicates_with_share_below(s) for i, s in enumerate(shares)}
    rows = contrasts.holm_from_replicates({c: 0.8 for c in replicates}, replicates, alpha=0.05)
    p_values = [2 * s for s in shares]
    assert [r["p_boot"] for r in rows] == pytest.approx(p_values)
    assert [r["separated"] for r in rows] == holm_by_textbook(p_values, 0.05)
    ranks = [sorted(range(3), key=lambda j: p_values[j]).index(i) + 1 for i in range(3)]
    assert [r["rank"] for r in rows] == ranks
    assert [r["level"] for r in rows] == pytest.approx([1 - 0.05 / (4 - rank) for rank in ranks])
    for row in rows:  # every corrected interval that leaves out 1/2 here lies above it
        assert row["direction"] == ("above" if row["lo"] > 0.5 else None)


def test_holm_95_interval_is_improvement_over_s_and_the_corrected_one_is_wider():
    rng = np.random.default_rng(0)
    scores = {"laber-mean": rng.normal(1.0, 1.0, (15, 1)), "uniform": rng.normal(0.3, 1.0, (15, 1))}
    scores["per"] = rng.normal(0.8, 1.0, (15, 1))
    scores["large-batch"] = rng.normal(0.9, 1.0, (15, 1))
    rows = contrasts.holm_improvement(scores, "laber-mean", ["uniform", "per", "large-batch"], reps=1000)
    for row in rows:
        pair = {"laber-mean": scores["laber-mean"], row["other"]: scores[row["other"]]}
        p, lo95, hi95 = stats.improvement_over(pair, row["other"], reps=1000)["laber-mean"]
        assert (row["p"], row["lo95"], row["hi95"]) == pytest.approx((p, lo95, hi95))
        assert row["p"] == pytest.approx(p_by_hand(scores["laber-mean"].ravel(), scores[row["other"]].ravel()))
        assert row["lo"] <= row["lo95"] <= row["hi95"] <= row["hi"]
    assert sorted(r["level"] for r in rows) == pytest.approx([0.95, 0.975, 1 - 0.05 / 3])
    verdict = contrasts.separation(rows)
    assert verdict.startswith(("separates from uniform", "does not separate from uniform", "ends below uniform"))


# ---------------------------------------------------------------------------------------------------
# A whole study: run folders -> compare --reuse, and run folders -> CSV -> page, give the same numbers


def fake_study(root: Path, cfg: Config, arms: list[str], seeds: list[int], unfinished=()) -> None:
    """Run folders as the study's agents leave them (eval.csv, config.txt, args.json), returns made up."""
    rng = np.random.default_rng(7)
    for arm, seed in product(arms, seeds):
        run = Run(arm, seed, root / arm / f"seed{seed}")
        run.folder.mkdir(parents=True)
        last = 20_000 if (arm, seed) in unfinished else 40_000
        steps = range(5000, last + 1, 5000)
        offset = {"laber-mean": 1.0, "large-batch": 0.5}.get(arm, 0.0)
        rows = "".join(f"{s},{max(0.0, round(offset + rng.normal(1.5, 0.8), 1))},{s / 100},100.0\n" for s in steps)
        (run.folder / "eval.csv").write_text("step,eval_return,wall_time,steps_per_s\n" + rows)
        (run.folder / "config.txt").write_text(f"env_id=MinAtar/Breakout-v1\nseed={seed}\ntotal_steps=40000\n")
        (run.folder / "args.json").write_text(json.dumps(command(cfg, run)[3:]))


def study_config(out: Path, seeds: list[int]) -> Config:
    return Config(
        algo="dqn",
        env_id="MinAtar/Breakout-v1",
        samplers=replication.ARMS,
        seeds=seeds,
        total_steps=40_000,
        extra=replication.EXTRA,
        jobs=2,
        out=out,
        reuse=True,
        bootstrap=300,
        metric="window",
        window=replication.WINDOW,
        focus=replication.FOCUS,
    )


def test_compare_reuse_and_the_page_from_the_csv_give_the_same_figures(tmp_path, monkeypatch):
    runs = tmp_path / "runs" / "replication" / "breakout-b8"
    cfg = study_config(runs, replication.SEEDS)
    fake_study(runs, cfg, replication.ARMS, replication.SEEDS)
    (tmp_path / "runs" / "replication.commit").write_text("abc1234\n")
    (tmp_path / "runs" / "replication.started").write_text("2026-12-07T04:00:33Z\n")

    def refuse(cmd, **kwargs):
        raise AssertionError(f"--reuse launched a finished run: {cmd}")

    monkeypatch.setattr(run_module.subprocess, "run", refuse)
    rows = compare.main(cfg)
    results = (runs / "results.md").read_text()
    assert "mean greedy evaluation return over the evaluations at steps 25000-40000" in results

    csv_path, page_path = tmp_path / "docs" / "study.csv", tmp_path / "docs" / "replication.md"
    text = replication.main(replication.Config(runs=runs, csv=csv_path, page=page_path, bootstrap=300))
    assert page_path.read_text() == text and "**Status: complete**, 60 of 60 runs." in text
    assert "abc1234" in text and "started 2026-12-07T04:00:33Z" in text
    assert csv_path.with_suffix(".png").stat().st_size > 10_000 and "![curves](replication/study.png)" in text
    # From the committed CSV alone (no run folders), the same page.
    import shutil

    shutil.rmtree(runs)
    assert replication.main(replication.Config(csv=csv_path, page=page_path, bootstrap=300)) == text
    for row in rows:  # compare's IQM [95% CI] per arm, on the page to 2 digits
        iqm = f"| {row['sampler']} | 15 | {row['iqm']:.2f} [{row['iqm_lo']:.2f}, {row['iqm_hi']:.2f}] |"
        assert iqm in text
    holm = [line for line in results.splitlines() if line.startswith(f"| P({replication.FOCUS} > ")]
    assert len(holm) == 3 and all(line in text for line in holm)  # the primary metric's three comparisons
    assert re.search(r"\*\*On the primary metric, laber-mean (separates|does not separate|ends below)", text)
    assert "Separation rule" in results


def test_export_leaves_out_unfinished_runs_unless_asked_and_the_page_says_under_way(tmp_path):
    runs = tmp_path / "breakout-b8"
    seeds = [3, 4]
    fake_study(runs, study_config(runs, seeds), ["uniform", "laber-mean"], seeds, unfinished={("uniform", 4)})
    meta = export.export(runs, tmp_path / "a.csv")
    assert meta["runs"] == 3 and meta["left_out"] == ["uniform/seed4: last evaluation at step 20000 of 40000"]
    assert meta["arguments"]["uniform"][0].startswith("--env-id MinAtar/Breakout-v1 --sampler uniform --no-progress")
    assert export.export(runs, tmp_path / "b.csv", include_unfinished=True)["runs"] == 4
    text = replication.page(tmp_path / "b.csv", {}, reps=100)
    assert "**Status: under way, 3 of 60 runs finished." in text and "not scored: uniform seed 4" in text


def test_export_reads_a_sweep_with_its_batch_sizes(tmp_path):
    for b, sampler, seed in product((8, 16), ("uniform",), (0,)):
        folder = tmp_path / f"bs{b}" / sampler / f"seed{seed}"
        folder.mkdir(parents=True)
        (folder / "eval.csv").write_text(f"step,eval_return,wall_time,steps_per_s\n10,{b / 8},1,1\n")
        (folder / "config.txt").write_text("total_steps=10\n")
    export.export(tmp_path, tmp_path / "sweep.csv")
    assert (tmp_path / "sweep.csv").read_text().splitlines()[0] == "batch_size,sampler,seed,step,return"
    curves = export.read_curves(tmp_path / "sweep.csv")
    assert export.scores_from_curves(curves, batch_size=16) == {"uniform": {0: 2.0}}


def test_export_command_line(tmp_path):
    folder = tmp_path / "runs" / "per" / "seed1"
    folder.mkdir(parents=True)
    (folder / "eval.csv").write_text("step,eval_return,wall_time,steps_per_s\n10,1.5,1,1\n")
    (folder / "config.txt").write_text("total_steps=10\n")
    cmd = [sys.executable, "-m", "experiments.export", str(tmp_path / "runs"), str(tmp_path / "out.csv")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out.csv").read_text() == "sampler,seed,step,return\nper,1,10,1.5\n"


def test_a_resumed_study_names_both_commits_and_checks_a_rerun(tmp_path):
    """A study resumed at a later commit says which runs ran where, and a rerun of finished runs at that
    commit is compared evaluation by evaluation with the study's own."""
    study = tmp_path / "study.csv"
    study.write_text(
        "sampler,seed,step,return\n"
        + "".join(f"{a},3,{s},{r}\n" for a, r in (("laber-mean", 1.5), ("uniform", 0.5)) for s in (20000, 40000))
    )
    check = tmp_path / "study-check.csv"
    check.write_text("sampler,seed,step,return\nlaber-mean,3,20000,1.5\nlaber-mean,3,40000,1.5\n")
    meta = {"stamps": {"commit": "38e9b50", "resumed": "2026-12-07T06:55:38Z eb86079abc"}}
    text = replication.page(study, meta, reps=50)
    assert "38e9b50 for the runs finished before 2026-12-07T06:55:38Z" in text and "eb86079abc for the others" in text
    assert (
        "- laber-mean seed 3, 40000 steps: the same returns at its 2 evaluations (steps 20000, 40000: 1.5, 1.5)."
        in text
    )
    check.write_text("sampler,seed,step,return\nlaber-mean,3,20000,0.25\n")  # a shorter rerun
    text = replication.page(study, meta, reps=50)
    assert "- laber-mean seed 3, 20000 steps: returns differ by up to 1.25 at 1 evaluation (steps 20000: 0.25)." in text
    check.unlink()
    assert "## The rerun check" not in replication.page(study, meta, reps=50)
