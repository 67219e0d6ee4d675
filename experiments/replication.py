"""``python -m experiments.replication``: issue 30's results page, ``docs/results/replication.md``, written from
the study's compact CSV alone (:mod:`experiments.export`), with the analysis fixed before the runs.

    python -m experiments.replication                                          # from the committed CSV
    python -m experiments.replication --runs runs/replication/breakout-b8      # export the run folders first

The study (its command is on the page): MinAtar/Breakout-v1, DQN with the project's MinAtar defaults, batch
size 8, m = 4, 40k steps, epsilon over 20k, a greedy evaluation (10 episodes) every 5k; uniform, PER
(alpha 0.6, beta 0.4 -> 1), LaBER-mean and large-batch (uniform on 4B rows); seeds 3-17. Fixed in advance:

* primary metric: each run's mean greedy return over its evaluations at 25k-40k steps
  (:func:`experiments.stats.run_score`, ``window``); secondary: the final return;
* per arm, the IQM with its 95% stratified-bootstrap CI (rliable, 5000 resamples);
* P(LaBER-mean > uniform), P(LaBER-mean > PER), P(LaBER-mean > large-batch), Holm-corrected over the three
  (:func:`experiments.contrasts.holm_improvement`);
* separation: the corrected interval of P(LaBER-mean > uniform) lies above 0.5; anything else is a null.

Seeds 0-2 found the lead (``docs/results/small-batch.md``): the page reports them apart and never pools them.
The same numbers come from the run folders with ``python -m experiments.compare ... --reuse --metric window
--window 25000 40000 --focus laber-mean`` (the command on the page): both bootstrap the runs in seed order
with the same seed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import tyro
from rliable import library as rly

from experiments.contrasts import contrast_table, holm_improvement, separation
from experiments.export import export, read_curves, score_matrices, scores_from_curves
from experiments.markdown import markdown_table
from experiments.reports import pyplot
from experiments.stats import global_numpy_seed, interval_estimates, metric_label

ARMS = ["uniform", "per", "laber-mean", "large-batch"]
FOCUS = "laber-mean"
SEEDS = list(range(3, 18))
WINDOW = (25_000, 40_000)
TOTAL_STEPS = 40_000
EXTRA = "--batch-size 8 --m 4 --exploration-steps 20000 --eval-every 5000 --checkpoint-every 5000"
STUDY = (
    "python -m experiments.compare --algo dqn --env-id MinAtar/Breakout-v1 --samplers uniform per laber-mean "
    f'large-batch --seeds {" ".join(map(str, SEEDS))} --total-steps {TOTAL_STEPS} --jobs 2 --reuse --extra="{EXTRA}" '
    "--out runs/replication/breakout-b8"
)
RECOMPUTE = f"{STUDY} --metric window --window {WINDOW[0]} {WINDOW[1]} --focus {FOCUS}"
# The study's own timestamps, written by its script next to the runs' folder (runs/replication.<name>).
STAMPS = ("commit", "started", "resumed", "three-arms-done", "finished")

# The lead, from docs/results/small-batch.md (MinAtar Breakout, B = 8, 40k steps, seeds 0-2, final returns):
# its runs are not on any machine the project has now, so only the page's printed figures exist.
LEAD = {
    "uniform": ("1.0 [0.6, 1.6]", "0.7 / 0.6 / 1.6"),
    "laber-mean": ("2.4 [2.2, 2.5]", "2.2 / 2.5 / 2.5"),
}


@dataclass
class Config:
    runs: Optional[Path] = None
    """the study's run folders: export them to --csv first (finished runs only, unless --include-unfinished)"""
    csv: Path = Path("docs/results/replication/breakout-b8.csv")
    """the compact CSV the page is computed from (and its .json sidecar)"""
    page: Path = Path("docs/results/replication.md")
    """the page to write"""
    include_unfinished: bool = False
    """with --runs: export runs under way too (a preview; the page says so, and the window metric needs runs
    that reached 40k steps)"""
    bootstrap: int = 5000
    """bootstrap resamples for every interval"""


def study_stamps(runs: Path) -> dict[str, str]:
    """The study script's stamps beside its runs (``<runs>/../<name>.<stamp>``, e.g. ``runs/replication.commit``
    for ``runs/replication/breakout-b8``), those that exist.

    Examples:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> _ = (root / "replication.commit").write_text("38e9b50\\n")
        >>> study_stamps(root / "replication" / "breakout-b8")
        {'commit': '38e9b50'}
    """
    found = {}
    for stamp in STAMPS:
        path = Path(f"{Path(runs).parent}.{stamp}")
        if path.exists():
            found[stamp] = path.read_text().strip()
    return found


def _commits(stamps: dict[str, str]) -> str:
    """The commit line: one commit, or two where the study was resumed (the ``resumed`` stamp: ``<when>
    <commit>``) on a fresh machine from the committed run files of the finished runs.

    Examples:
        >>> _commits({"commit": "38e9b50"})
        '38e9b50 (the study ran from a worktree frozen at it).'
        >>> _commits({"commit": "38e9b50", "resumed": "2026-12-07T06:55:38Z eb86079"})[:60]
        '38e9b50 for the runs finished before 2026-12-07T06:55:38Z (t'
    """
    if "commit" not in stamps:
        return "not recorded."
    if "resumed" not in stamps:
        return f"{stamps['commit']} (the study ran from a worktree frozen at it)."
    when, commit = stamps["resumed"].split()
    return (
        f"{stamps['commit']} for the runs finished before {when} (their files are kept under "
        f"`replication/runs/` at {commit[:7]}); {commit} for the others, resumed then on a fresh machine from "
        "those files (`--reuse`), each from a worktree frozen at its commit. The agent arguments are the same "
        "at both (the sidecar's `arguments`: one line per arm); the rerun check below, if any, compares runs of the "
        "two commits."
    )


def _rerun_check(curves_csv: Path, check_csv: Path) -> list[str]:
    """Runs of the study rerun at the later commit (``<csv>-check.csv``, perhaps shorter: the agents' only use
    of ``--total-steps`` in DQN without PER is where to stop) against the study's own, at the evaluations
    both have: the same seed should give the same evaluations, whichever commit ran it."""
    study = {(c.sampler, c.seed): c for c in read_curves(curves_csv)}
    lines = []
    for c in read_curves(check_csv):
        mine = study.get((c.sampler, c.seed))
        if mine is None:
            continue
        steps = np.intersect1d(mine.steps, c.steps)
        if not len(steps):
            lines.append(f"- {c.sampler} seed {c.seed}: no evaluation at a step the study's run has.")
            continue
        ours = mine.returns[np.isin(mine.steps, steps)]
        theirs = c.returns[np.isin(c.steps, steps)]
        gap = float(np.max(np.abs(ours - theirs)))
        at = f"{len(steps)} evaluation{'s' * (len(steps) > 1)} (steps {', '.join(map(str, steps))}: "
        at += f"{', '.join(f'{r:g}' for r in theirs)})"
        verdict = f"the same returns at its {at}" if gap == 0.0 else f"returns differ by up to {gap:.2f} at {at}"
        lines.append(f"- {c.sampler} seed {c.seed}, {c.steps[-1]} steps: {verdict}.")
    return lines


def _arm_rows(matrices: dict[str, dict[str, np.ndarray]], reps: int) -> list[list[str]]:
    """One table row per arm: runs, then IQM [95% CI] and mean [95% CI] for each metric."""
    estimates = {m: interval_estimates(x, ["iqm", "mean"], reps) for m, x in matrices.items()}
    cells = []
    for arm in ARMS:
        row = [arm, str(len(matrices["window"].get(arm, [])))]
        for m in ("window", "final"):
            for name in ("iqm", "mean"):
                est = estimates[m].get(arm, {}).get(name)
                row.append(f"{est[0]:.2f} [{est[1]:.2f}, {est[2]:.2f}]" if est else "-")
        cells.append(row)
    return cells


def _per_run(scores: dict[str, dict[str, dict[int, float]]]) -> list[str]:
    """Every run's two scores, a row per seed: the table the statistics are computed from."""
    seeds = sorted({k for by_arm in scores["window"].values() for k in by_arm})
    cells = []
    for seed in seeds:
        row = [str(seed)]
        for arm in ARMS:
            w, f = scores["window"].get(arm, {}).get(seed), scores["final"].get(arm, {}).get(seed)
            row.append(f"{w:.2f} ({f:.1f})" if w is not None else "-")
        cells.append(row)
    return markdown_table(["seed", *ARMS], cells)


def page(curves_csv: Path, meta: dict, reps: int = 5000) -> str:
    """The page's markdown, computed from ``curves_csv`` (and ``meta``, its sidecar: stamps and provenance)."""
    curves = read_curves(curves_csv)
    # A run under way (an export with --include-unfinished) has no 25k-40k mean yet: it is counted, not scored.
    under_way = sorted(f"{c.sampler} seed {c.seed}" for c in curves if c.steps[-1] < TOTAL_STEPS)
    curves = [c for c in curves if c.steps[-1] >= TOTAL_STEPS]
    scores = {
        "window": scores_from_curves(curves, "window", WINDOW, seeds=SEEDS),
        "final": scores_from_curves(curves, "final", seeds=SEEDS),
    }
    matrices = {m: score_matrices(s) for m, s in scores.items()}
    n_runs = sum(len(v) for v in scores["window"].values())
    expected = len(ARMS) * len(SEEDS)
    complete = n_runs == expected and all(len(scores["window"].get(a, {})) == len(SEEDS) for a in ARMS)
    stamps = meta.get("stamps", {})
    lines = [
        "# Does LaBER help? The pre-registered replication (issue 30)",
        "",
    ]
    if complete:
        lines.append(f"**Status: complete**, {n_runs} of {expected} runs.")
    else:
        lines.append(
            f"**Status: under way, {n_runs} of {expected} runs finished. Everything below is a preview of the runs "
            "finished so far, not the result: the analysis is fixed for all 60 runs.**"
        )
        if under_way:
            lines.append(f"Under way when exported, not scored: {', '.join(under_way)}.")
    lines += [
        "",
        "- **Commit of the runs**: " + _commits(stamps),
        f"- **Date**: started {stamps.get('started', 'not recorded')}"
        + (f", uniform, PER and LaBER-mean done {stamps['three-arms-done']}" if "three-arms-done" in stamps else "")
        + (f", finished {stamps['finished']}" if "finished" in stamps else ", not finished when exported")
        + f"; exported {meta.get('exported', 'not recorded')}.",
        "- **Machine**: the 2-core VM, two runs at a time, one thread each.",
        f"- **Study command** (uniform, PER and LaBER-mean were run first, then the same command with "
        f"`large-batch` added; `--reuse` kept the finished runs):\n\n  ```bash\n  {STUDY}\n  ```",
        "- **This page**: `python -m experiments.replication` recomputes it from the committed CSV alone; "
        "`python -m experiments.replication --runs runs/replication/breakout-b8` exports the run folders to the "
        "CSV first. From the run folders, the same tables (`runs/replication/breakout-b8/results.md`):"
        f"\n\n  ```bash\n  {RECOMPUTE}\n  ```",
        f"- **Data**: [`replication/{curves_csv.name}`](replication/{curves_csv.name}), every evaluation of every "
        f"run (`sampler, seed, step, return`), and its sidecar `{curves_csv.with_suffix('.json').name}` (the agent "
        "arguments per arm, the runs left out).",
        "",
        "## The design, fixed before the runs",
        "",
        "MinAtar/Breakout-v1, DQN with the project's MinAtar defaults (`agents/dqn.py`), batch size B = 8, m = 4, "
        "40k steps, epsilon decayed over 20k, a greedy evaluation of 10 episodes every 5k steps. Arms: uniform, "
        "PER (alpha 0.6, beta 0.4 -> 1), LaBER-mean and large-batch (uniform on 4B = 32 rows, the paper's "
        "fairness baseline). Fresh seeds 3-17 (15 per arm); seeds 0-2 found the lead and are reported apart below.",
        "",
        f"- **Primary metric**: each run's {metric_label('window', WINDOW)} (four evaluations: 25k, 30k, 35k, "
        "40k): a single evaluation moves by up to about 2 points between evaluations.",
        "- **Secondary**: the final return (the evaluation at 40k).",
        "- **Per arm**: IQM and mean with 95% stratified-bootstrap CIs (rliable, percentile method, "
        f"{reps} resamples, seed 0; with one task the bootstrap resamples each arm's runs).",
        f"- **Comparisons**: P({FOCUS} > uniform), P({FOCUS} > per), P({FOCUS} > large-batch), the probability "
        "that a run of LaBER-mean scores above a run of the other arm (ties 1/2), each with a bootstrap interval "
        "Holm-corrected over the k = 3 at family-wise level 0.05: ordered by their two-sided bootstrap p-value "
        "of P = 1/2, the i-th gets the confidence level 1 - 0.05 / (k - i + 1) (98.3%, 97.5%, 95%), and Holm's "
        "step-down reads the decisions off those intervals (`experiments.contrasts.holm_improvement`).",
        f"- **Separation**: the corrected interval of P({FOCUS} > uniform) lies above 0.5. Otherwise the result "
        "is a null at this budget, reported with the intervals it has.",
        "",
    ]
    if not scores["window"]:
        lines += ["No run has finished yet.", ""]
        return "\n".join(lines)
    verdict = {}
    contrasts = {}
    for m in ("window", "final"):
        others = [a for a in ARMS if a != FOCUS and a in matrices[m]]
        if FOCUS in matrices[m] and others:
            contrasts[m] = holm_improvement(matrices[m], FOCUS, others, reps)
            if "uniform" in others:
                verdict[m] = separation(contrasts[m])
    lines += ["## Result", ""]
    if not complete:
        # The test was fixed for all the runs: a subset, chosen by which runs finished first, decides nothing.
        lines.append(
            f"No verdict until all {expected} runs have finished: the intervals below are those of "
            f"{n_runs} runs, a preview."
        )
    elif "window" in verdict:
        lines.append(f"**On the primary metric, {FOCUS} {verdict['window']}.**")
    else:
        lines.append(f"No verdict: the runs lack {FOCUS} or uniform.")
    header = ["arm", "runs"] + [
        f"{name} [95% CI], {what}"
        for what in ("25k-40k mean (primary)", "final (secondary)")
        for name in ("IQM", "mean")
    ]
    lines += ["", *markdown_table(header, _arm_rows(matrices, reps)), ""]
    for m, title in (("window", "Primary metric (25k-40k mean)"), ("final", "Secondary metric (final return)")):
        if m in contrasts:
            lines += [f"**{title}**: {FOCUS} against each arm, Holm-corrected over the {len(contrasts[m])}:", ""]
            lines += [*contrast_table(contrasts[m], FOCUS), ""]
    if "final" in verdict and complete:
        lines += [f"On the secondary metric (not the pre-registered test), {FOCUS} {verdict['final']}.", ""]
    lines += [
        f"![curves](replication/{curves_csv.with_suffix('.png').name})",
        "",
        "Every run's primary score, its final return in parentheses (seed by seed; the seeds of one row share "
        "nothing but the seed):",
        "",
        *_per_run(scores),
        "",
        "## The lead (seeds 0-2), reported apart",
        "",
        "The lead this study tests, from the batch-size sweep ([small-batch.md](small-batch.md), `make "
        "small-batch`: the same settings at B = 8 plus diagnostics on a forked generator, run at commits 11a4d99 "
        "and 17ca3e5, uniform and LaBER-mean only): final returns, 3 seeds a side. "
        "It is not pooled with the runs above, and its per-run curves were never committed (the runs are not on "
        "this machine), so only its final returns as printed there exist; its 25k-40k mean cannot be computed.",
        "",
        *markdown_table(
            ["arm", "runs", "final IQM [95% CI]", "finals, seeds 0 / 1 / 2"],
            [[arm, "3", iqm, finals] for arm, (iqm, finals) in LEAD.items()],
        ),
        "",
        "LaBER-mean ended above uniform in 9 of 9 pairs there: a lead from the best of 10 comparisons (5 batch "
        "sizes x 2 environments). With no effect at all, 3 runs a side order completely one way with chance "
        "1 / C(6, 3) = 0.05, and at least one of 10 such comparisons (taken as independent) does with chance "
        "1 - 0.95^10 = 0.40; uniform "
        "at B = 8 (1.0) was also the lowest point of its own sweep. Hence this study: its analysis fixed before "
        "its runs, fresh seeds.",
        "",
    ]
    check_csv = curves_csv.with_name(f"{curves_csv.stem}-check.csv")
    if check_csv.exists():
        lines += [
            "## The rerun check",
            "",
            f"Runs the study finished at its first commit, rerun at the later one (`{check_csv.name}`, written "
            "by `experiments.export` from the rerun's folders):",
            "",
            *_rerun_check(curves_csv, check_csv),
            "",
        ]
        note = (
            json.loads(check_csv.with_suffix(".json").read_text()).get("note")
            if check_csv.with_suffix(".json").exists()
            else None
        )
        if note:
            lines += [f"The rerun's sidecar: {note}.", ""]
    if meta.get("left_out"):
        lines += ["Runs left out of the CSV when it was exported:", ""]
        lines += [f"- {line}" for line in meta["left_out"]] + [""]
    return "\n".join(lines)


def plot(curves_csv: Path, reps: int = 1000) -> Path:
    """``<csv>.png`` beside the CSV: each arm's mean evaluation return over its finished runs against steps,
    with a pointwise 95% bootstrap CI (rliable, as ``curves.png`` of ``experiments.compare``), the primary
    metric's window shaded."""
    plt = pyplot()
    curves = [c for c in read_curves(curves_csv) if c.steps[-1] >= TOTAL_STEPS and c.seed in SEEDS]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm in ARMS:
        mine = [c for c in curves if c.sampler == arm]
        if not mine:
            continue
        length = min(len(c.steps) for c in mine)
        values = np.stack([c.returns[:length] for c in mine])[:, None, :]  # [runs, 1 task, evaluations]
        with global_numpy_seed(0):
            mean, ci = rly.get_interval_estimates({arm: values}, lambda x: x.mean(axis=(0, 1)), reps=reps)
        (line,) = ax.plot(mine[0].steps[:length], mean[arm], marker="o", label=f"{arm} (n={len(mine)})")
        ax.fill_between(mine[0].steps[:length], ci[arm][0], ci[arm][1], color=line.get_color(), alpha=0.15)
    ax.axvspan(*WINDOW, color="grey", alpha=0.1, label="primary metric's window")
    ax.set_xlabel("environment steps")
    ax.set_ylabel("greedy evaluation return (10 episodes)")
    ax.set_title("MinAtar Breakout, DQN, B = 8: mean and 95% bootstrap CI over seeds 3-17")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = curves_csv.with_suffix(".png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(cfg: Config) -> str:
    sidecar = cfg.csv.with_suffix(".json")
    if cfg.runs is not None:
        meta = export(cfg.runs, cfg.csv, cfg.include_unfinished)
        meta["stamps"] = study_stamps(cfg.runs)
        sidecar.write_text(json.dumps(meta, indent=1) + "\n")
    meta = json.loads(sidecar.read_text()) if sidecar.exists() else {}
    text = page(cfg.csv, meta, cfg.bootstrap)
    plot(cfg.csv)
    cfg.page.parent.mkdir(parents=True, exist_ok=True)
    cfg.page.write_text(text)
    return text


if __name__ == "__main__":
    print(main(tyro.cli(Config)))
