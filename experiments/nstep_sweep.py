"""``python -m experiments.nstep_sweep``: the small-batch sweep with n-step returns (issue 30),
``docs/results/small-batch-nstep.md``, written from the study's compact CSV alone (:mod:`experiments.export`),
with the analysis fixed before the runs.

    python -m experiments.nstep_sweep                                              # from the committed CSV
    python -m experiments.nstep_sweep --runs runs/small-batch/cartpole-nstep3      # export the run folders first

Why: the small-batch thesis (Obando-Ceron, 2023) finds smaller batches better only with multi-step returns
("batch size is inversely correlated with performance only when multi-step returns are used"; DQN with
n = 3, its Figs. 2.20-2.21). The sweep on ``small-batch.md`` ran one-step DQN, where the thesis predicts
nothing. This is the same CartPole sweep (DQN, 20k steps, the same number of gradient steps at every batch
size, uniform and LaBER-mean, seeds 0-2) with ``--n-step 3``. Fixed in advance:

* the score: each run's final greedy evaluation return (the one-step sweep's metric);
* the thesis's test, per sampler: Kendall's tau-b between the batch size and the score over its 15 runs
  (``scipy.stats.kendalltau``, two-sided p), Holm-corrected over the two samplers at family-wise 0.05.
  "Smaller batches do better" means tau < 0 and the corrected test rejects; anything else is a null;
* described, not tested: per batch size, each sampler's IQM with its 95% stratified-bootstrap CI and
  P(laber-mean > uniform) with its 95% CI (five comparisons, uncorrected: no claim rests on them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import tyro
from scipy import stats as scipy_stats

from experiments.export import export, read_curves, score_matrices, scores_from_curves
from experiments.reports import markdown_table
from experiments.stats import improvement_over, interval_estimates

SAMPLERS = ["uniform", "laber-mean"]
FOCUS = "laber-mean"
SEEDS = [0, 1, 2]
BATCH_SIZES = [8, 16, 32, 64, 128]
TOTAL_STEPS = 20_000
N_STEP = 3
ALPHA = 0.05
STUDY = (
    f"python -m experiments.compare --algo dqn --env-id CartPole-v1 --samplers {' '.join(SAMPLERS)} "
    f"--seeds {' '.join(map(str, SEEDS))} --batch-sizes {' '.join(map(str, BATCH_SIZES))} "
    f'--total-steps {TOTAL_STEPS} --jobs 2 --reuse --extra="--n-step {N_STEP}" --out runs/small-batch/cartpole-nstep3'
)


@dataclass
class Config:
    runs: Optional[Path] = None
    """the sweep's run folders (``bs<b>/<sampler>/seed<k>/``): export them to --csv first"""
    csv: Path = Path("docs/results/small-batch/cartpole-nstep3.csv")
    """the compact CSV the page is computed from (and its .json sidecar)"""
    page: Path = Path("docs/results/small-batch-nstep.md")
    """the page to write"""
    bootstrap: int = 5000
    """bootstrap resamples for every interval"""


def batch_size_trend(scores_by_batch: dict[int, dict[int, float]]) -> tuple[float, float, int]:
    """Kendall's tau-b between the batch size and the runs' scores, its two-sided p-value and the number
    of runs: ``tau_b = (C - D) / sqrt((n0 - n1)(n0 - n2))`` over all pairs of runs (``C`` concordant, ``D``
    discordant, ``n0 = n(n-1)/2``, ``n1`` and ``n2`` the pairs tied in batch size and in score); tau < 0:
    smaller batches score higher.

    Examples:
        >>> tau, p, n = batch_size_trend({8: {0: 3.0, 1: 2.5}, 16: {0: 2.0, 1: 1.5}, 32: {0: 1.0, 1: 0.5}})
        >>> round(tau, 3), n
        (-0.894, 6)
        >>> bool(p < 0.05)
        True
    """
    sizes = [b for b, by_seed in scores_by_batch.items() for _ in by_seed]
    values = [v for by_seed in scores_by_batch.values() for v in by_seed.values()]
    result = scipy_stats.kendalltau(sizes, values)
    return float(result.statistic), float(result.pvalue), len(values)


def holm(p_values: dict[str, float], alpha: float = ALPHA) -> dict[str, bool]:
    """Holm's step-down (Holm, 1979): sorted ascending, the i-th (i = 1..k) is rejected while
    ``p_(i) <= alpha / (k - i + 1)`` and all before it were; the first that is not stops it.

    Examples:
        >>> holm({"a": 0.02, "b": 0.04}), holm({"a": 0.03, "b": 0.04})
        ({'a': True, 'b': True}, {'a': False, 'b': False})
    """
    rejected, going = {}, True
    for i, name in enumerate(sorted(p_values, key=p_values.get)):
        going = going and p_values[name] <= alpha / (len(p_values) - i)
        rejected[name] = going
    return rejected


def page(curves_csv: Path, meta: dict, reps: int = 5000) -> str:
    """The page's markdown, computed from ``curves_csv`` (and ``meta``, its sidecar)."""
    curves = [c for c in read_curves(curves_csv) if c.steps[-1] >= TOTAL_STEPS and c.seed in SEEDS]
    by_batch = {b: scores_from_curves(curves, "final", batch_size=b) for b in BATCH_SIZES}
    n_runs = sum(len(s) for per_sampler in by_batch.values() for s in per_sampler.values())
    expected = len(SAMPLERS) * len(SEEDS) * len(BATCH_SIZES)
    complete = n_runs == expected
    lines = [
        "# The small-batch sweep with n-step returns (issue 30)",
        "",
        f"**Status: complete**, {n_runs} of {expected} runs."
        if complete
        else f"**Status: {'not started' if not n_runs else 'under way'}, {n_runs} of {expected} runs finished.** "
        "No verdict until all have.",
        "",
        f"- **Commit of the runs**: {meta.get('stamps', {}).get('commit', 'not recorded')}.",
        f"- **Exported**: {meta.get('exported', 'not yet')}.",
        "- **Machine**: the 2-core VM, two runs at a time, one thread each.",
        f"- **Study command**:\n\n  ```bash\n  {STUDY}\n  ```",
        "- **This page**: `python -m experiments.nstep_sweep --runs runs/small-batch/cartpole-nstep3` exports the "
        "run folders to the CSV and writes the page; without `--runs`, from the committed CSV alone.",
        f"- **Data**: [`small-batch/{curves_csv.name}`](small-batch/{curves_csv.name}), every evaluation of every "
        "run (`batch_size, sampler, seed, step, return`), and its `.json` sidecar.",
        "",
        "## The design, fixed before the runs",
        "",
        "The one-step sweep on [small-batch.md](small-batch.md) found no small-batch advantage on CartPole, which is "
        "what the small-batch thesis (Obando-Ceron, 2023) predicts for DQN with one-step targets: it finds batch "
        'size "inversely correlated with performance only when multi-step returns are used" (DQN with n = 3, its '
        f"Figs. 2.20-2.21). This is the same sweep with `--n-step {N_STEP}`: CartPole-v1, DQN, {TOTAL_STEPS} steps, "
        "the same arguments at every batch size but `--batch-size` (so the same number of gradient steps), batch "
        f"sizes {', '.join(map(str, BATCH_SIZES))}, uniform and LaBER-mean (m = 4), seeds "
        f"{', '.join(map(str, SEEDS))}.",
        "",
        "- **Score**: each run's final greedy evaluation return (10 episodes), as in the one-step sweep.",
        "- **The thesis's test**, per sampler: Kendall's tau-b between batch size and score over its "
        f"{len(SEEDS) * len(BATCH_SIZES)} runs (two-sided p), Holm-corrected over the two samplers at family-wise "
        f"{ALPHA}. *Smaller batches do better* means tau < 0 and the corrected test rejects; anything else is a null.",
        "- **Described, not tested**: per batch size, each sampler's IQM with its 95% stratified-bootstrap CI "
        "(rliable, 5000 resamples) and P(laber-mean > uniform) with its 95% CI: five uncorrected comparisons, on "
        "which no claim rests.",
        "- **What it cannot show**: CartPole is not Atari, 20k steps is short and 3 seeds a batch size is few; "
        "a null here is weak evidence against the thesis, and a trend would be a lead for MinAtar, not a result.",
        "",
    ]
    if not n_runs:
        return "\n".join(lines)
    trends = {s: batch_size_trend({b: by_batch[b].get(s, {}) for b in BATCH_SIZES}) for s in SAMPLERS}
    rejected = holm({s: p for s, (_, p, _) in trends.items()})
    lines += ["## Result", ""]
    if not complete:
        lines += [f"A preview of {n_runs} runs: the test is for all {expected}.", ""]
    rows = []
    for s in SAMPLERS:
        tau, p, n = trends[s]
        verdict = "smaller batches do better" if rejected[s] and tau < 0 else "null"
        if rejected[s] and tau > 0:
            verdict = "larger batches do better"
        rows.append([s, str(n), f"{tau:.2f}", f"{p:.3f}", verdict if complete else "(preview)"])
    lines += ["**The thesis's test** (Kendall's tau-b, batch size against final return, Holm over the two):", ""]
    lines += [*markdown_table(["sampler", "runs", "tau", "p", "Holm at 0.05"], rows), ""]
    header = ["batch size", "uniform IQM [95% CI]", "laber-mean IQM [95% CI]", "P(laber-mean > uniform) [95% CI]"]
    cells = []
    for b in BATCH_SIZES:
        matrices = score_matrices(by_batch[b])
        est = interval_estimates(matrices, ["iqm"], reps)
        row = [str(b)]
        for s in SAMPLERS:
            iqm = est.get(s, {}).get("iqm")
            row.append(f"{iqm[0]:.1f} [{iqm[1]:.1f}, {iqm[2]:.1f}]" if iqm else "-")
        p = improvement_over(matrices, "uniform", reps).get(FOCUS) if "uniform" in matrices else None
        row.append(f"{p[0]:.2f} [{p[1]:.2f}, {p[2]:.2f}]" if p else "-")
        cells.append(row)
    lines += ["**Per batch size** (described, not tested):", "", *markdown_table(header, cells), ""]
    finals = []
    for b in BATCH_SIZES:
        for seed in SEEDS:
            finals.append(
                [str(b), str(seed)] + [f"{by_batch[b].get(s, {}).get(seed, float('nan')):.1f}" for s in SAMPLERS]
            )
    lines += ["Every run's final return:", "", *markdown_table(["batch size", "seed", *SAMPLERS], finals), ""]
    if meta.get("left_out"):
        lines += ["Runs left out of the CSV when it was exported:", ""]
        lines += [f"- {line}" for line in meta["left_out"]] + [""]
    return "\n".join(lines)


def main(cfg: Config) -> str:
    sidecar = cfg.csv.with_suffix(".json")
    if cfg.runs is not None:
        cfg.csv.parent.mkdir(parents=True, exist_ok=True)
        meta = export(cfg.runs, cfg.csv)
        commit = Path(f"{Path(cfg.runs)}.commit")  # the study's stamp beside its runs, if it wrote one
        if commit.exists():
            meta["stamps"] = {"commit": commit.read_text().strip()}
        sidecar.write_text(json.dumps(meta, indent=1) + "\n")
    meta = json.loads(sidecar.read_text()) if sidecar.exists() else {}
    text = page(cfg.csv, meta, cfg.bootstrap) if cfg.csv.exists() else page_without_runs(cfg.csv.name)
    cfg.page.parent.mkdir(parents=True, exist_ok=True)
    cfg.page.write_text(text)
    return text


def page_without_runs(csv_name: str) -> str:
    """The page before any run: the design alone, committed before the runs start."""
    import tempfile

    empty = Path(tempfile.mkdtemp()) / csv_name
    empty.write_text("batch_size,sampler,seed,step,return\n")
    return page(empty, {})


if __name__ == "__main__":
    print(main(tyro.cli(Config)))
