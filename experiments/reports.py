"""The reports of a comparison: markdown tables (one writer), CSV files (pandas) and plots (rliable's CIs)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
from rliable import library as rly

from experiments.markdown import markdown_table
from experiments.runs import Run, read_diagnostics, read_eval
from experiments.stats import SCORE_RANGES, global_numpy_seed

KEYS = [
    "sampler",
    "runs",
    "failed",
    "mean",
    "mean_lo",
    "mean_hi",
    "iqm",
    "iqm_lo",
    "iqm_hi",
    "wall_time_s",
    "steps_per_s",
    "optimality_gap",
    "optimality_gap_lo",
    "optimality_gap_hi",
    "p_improve",
    "p_improve_lo",
    "p_improve_hi",
]


def ci(row: dict, key: str, digits: int) -> str:
    """``point [low, high]`` of ``row[key]`` and its CI, ``-`` where the row has none."""
    if key not in row:
        return "-"
    return f"{row[key]:.{digits}f} [{row[key + '_lo']:.{digits}f}, {row[key + '_hi']:.{digits}f}]"


def write_csv(path: Path, rows: list[dict], keys: list[str]) -> None:
    """``rows`` as a CSV file with the columns ``keys`` in that order: a key a row lacks (or a NaN) is an empty
    cell, a key not in ``keys`` is left out.

    Examples:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "results.csv"
        >>> rows = [{"sampler": "per", "runs": 3, "mean": 0.25, "note": "x"}, {"sampler": "uniform", "runs": 0}]
        >>> write_csv(path, rows, ["sampler", "runs", "mean"])
        >>> print(path.read_text(), end="")
        sampler,runs,mean
        per,3,0.25
        uniform,0,
    """
    # object columns: each value written as itself (an int stays "3" beside an empty cell, not "3.0").
    pd.DataFrame(rows, columns=keys, dtype=object).to_csv(path, index=False)


def write_tables(
    out: Path,
    title: str,
    env_id: str,
    rows: list[dict],
    runs: list[Run],
    metric: str = "final greedy evaluation return",
    more: list[str] = (),
) -> str:
    """``results.md`` and ``results.csv`` of one task; ``metric`` names the runs' score (see
    :func:`experiments.stats.metric_label`), ``more`` are markdown lines added after the table."""
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "results.csv", rows, KEYS)
    has_gap, has_p = env_id in SCORE_RANGES, any("p_improve" in r for r in rows)
    header = ["sampler", "runs", "mean [95% CI]", "IQM [95% CI]"]
    header += ["optimality gap [95% CI]"] * has_gap + ["P(> uniform) [95% CI]"] * has_p
    header += ["wall time (s)", "steps/s"]
    cells = []
    for r in rows:
        if r["runs"] == 0:
            cells.append([r["sampler"], f"0 ({r['failed']} failed)"] + ["-"] * (len(header) - 2))
            continue
        failed = f" ({r['failed']} failed)" if r["failed"] else ""
        row = [r["sampler"], f"{r['runs']}{failed}", ci(r, "mean", 1), ci(r, "iqm", 1)]
        row += [ci(r, "optimality_gap", 2)] * has_gap + [ci(r, "p_improve", 2)] * has_p
        cells.append(row + [f"{r['wall_time_s']:.0f}", f"{r['steps_per_s']:.0f}"])
    lines = [
        f"{title}; {metric} (95% stratified-bootstrap CIs, rliable)",
        "",
        *markdown_table(header, cells),
        "",
    ]
    if has_gap:
        low, high = SCORE_RANGES[env_id]
        lines.append(
            f"Optimality gap: 1 - mean(min(x, 1)) of the return normalised as x = (return - {low:g}) / "
            f"({high:g} - {low:g}) (experiments.stats.SCORE_RANGES)."
        )
    else:
        lines.append(f"Optimality gap: left out, {env_id} has no score range in experiments.stats.SCORE_RANGES.")
    if has_p:
        lines.append(
            "P(> uniform): the probability that a run of the sampler scores above a run of uniform (ties count 1/2)."
        )
    lines += list(more)
    failures = [r for r in runs if r.returncode != 0]
    if failures:
        lines += ["", "Failed runs:"]
        for r in failures:
            lines.append(f"- {r.sampler} seed {r.seed}: exit code {r.returncode}, log {r.folder / 'stdout.log'}")
    table = "\n".join(lines) + "\n"
    (out / "results.md").write_text(table)
    return table


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend, imported when a plot is first drawn: a comparison
    runs on machines without a display, and the tables need no matplotlib.

    Examples:
        >>> fig, ax = pyplot().subplots()
        >>> pyplot().close(fig)
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(out: Path, title: str, runs: list[Run], samplers: list[str], reps: int) -> Path:
    """Mean evaluation return over seeds against steps, with its pointwise 95% bootstrap CI (rliable)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for sampler in samplers:
        curves = [read_eval(r.folder) for r in runs if r.sampler == sampler and r.returncode == 0]
        curves = [c for c in curves if c is not None]
        if not curves:
            continue
        length = min(len(c["step"]) for c in curves)
        steps = curves[0]["step"][:length]
        values = np.stack([c["eval_return"][:length] for c in curves])[:, None, :]  # [runs, 1 task, evals]
        with global_numpy_seed(0):
            mean, ci = rly.get_interval_estimates({sampler: values}, lambda x: x.mean(axis=(0, 1)), reps=reps)
        (line,) = ax.plot(steps, mean[sampler], label=f"{sampler} (n={len(curves)})")
        ax.fill_between(steps, ci[sampler][0], ci[sampler][1], color=line.get_color(), alpha=0.2)
    ax.set_xlabel("environment steps")
    ax.set_ylabel("evaluation return")
    ax.set_title(f"{title}: mean and 95% bootstrap CI over seeds")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


TV_COLUMNS = {"tv/uniform": "uniform", "tv/output": "output", "tv/last-layer": "last-layer"}

NETWORK_COLUMNS = ["grad_norm", "grad_variance", "srank", "dormant_fraction"]


def _coarse_to_exact(column: str) -> tuple[int, str]:
    """Sort key of ``tv/*`` and ``second_moment/*`` columns: uniform, output, last-layer, ideal, then others."""
    order = ["uniform", "output", "last-layer", "ideal"]
    rung = column.split("/", 1)[-1]
    return (order.index(rung) if rung in order else len(order), column)


def plot_diagnostics(out: Path, title: str, runs: list[Run], samplers: list[str]) -> Optional[Path]:
    """``diagnostics.png`` from the runs' ``diagnostics.csv`` (``--diagnostics-every``), None if none wrote one.

    First panel, the paper's App. H figure for these runs: the total variation ``sum_i |P(i) - Q(i)|``
    of uniform, output-surrogate and last-layer sampling to exact-gradient sampling, mean over every
    run (each run measures its own critic on uniform draws of its buffer). Then one panel per network
    diagnostic (gradient norm and variance, srank, dormant fraction), a line per sampler, mean over seeds.
    """
    logs = read_diagnostics(runs)
    if not logs:
        return None

    def mean_curve(curves: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
        length = min(len(c["step"]) for c in curves)
        return curves[0]["step"][:length], np.mean([c[key][:length] for c in curves], axis=0)

    plt = pyplot()
    fig, axes = plt.subplots(1, 1 + len(NETWORK_COLUMNS), figsize=(4 * (1 + len(NETWORK_COLUMNS)), 3.6))
    everything = [c for curves in logs.values() for c in curves]
    for key, label in TV_COLUMNS.items():
        steps, values = mean_curve(everything, key)
        axes[0].plot(steps, values, label=label)
    axes[0].set_title(f"TV to exact sampling (n={len(everything)})")
    axes[0].set_ylim(0, 2)
    axes[0].legend()
    for ax, key in zip(axes[1:], NETWORK_COLUMNS):
        for sampler in samplers:
            if sampler in logs:
                ax.plot(*mean_curve(logs[sampler], key), label=sampler)
        ax.set_title(key)
    axes[-1].legend(fontsize=7)
    for ax in axes:
        ax.set_xlabel("environment steps")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{title}: diagnostics (mean over seeds)")
    fig.tight_layout()
    path = out / "diagnostics.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def diagnostics_table(out: Path, title: str, runs: list[Run]) -> Optional[Path]:
    """``diagnostics.md``: the App. H and App. C diagnostics pooled over every measurement of every run
    (each run measures its own critic), None if no run wrote ``diagnostics.csv``.

    Per column ``tv/*`` (total variation to exact sampling) and ``second_moment/*`` (App. C's second
    moment of the weighted gradient estimate; also divided by ``second_moment/ideal``, exact
    sampling's, measurement by measurement): the median and range. Then how often last-layer
    sampling was closer to exact sampling than the output surrogate's (``tv/last-layer < tv/output``).
    """
    logs = [log for per_sampler in read_diagnostics(runs).values() for log in per_sampler]
    if not logs:
        return None
    keys = dict.fromkeys(k for log in logs for k in log)
    pooled = {k: np.concatenate([log[k] for log in logs if k in log]) for k in keys}
    n = len(pooled["step"])
    cells = []

    def row(name: str, values: np.ndarray) -> None:
        values = values[np.isfinite(values)]
        if len(values):
            cells.append([name, f"{np.median(values):.3g} [{values.min():.3g}, {values.max():.3g}]"])

    moments = sorted((k for k in pooled if k.startswith("second_moment/")), key=_coarse_to_exact)
    for key in sorted((k for k in pooled if k.startswith("tv/")), key=_coarse_to_exact) + moments:
        row(key, pooled[key])
    if "second_moment/ideal" in pooled and len(pooled["second_moment/ideal"]) == n:
        for key in [k for k in moments if k != "second_moment/ideal"]:
            if len(pooled[key]) == n:
                row(f"{key} / ideal", pooled[key] / pooled["second_moment/ideal"])
    lines = [
        f"{title}: diagnostics of {len(logs)} runs, {n} measurements (each run's critic on uniform draws "
        "of its buffer)",
        "",
        *markdown_table(["diagnostic", "median [min, max]"], cells),
    ]
    both = {"tv/last-layer", "tv/output"} <= pooled.keys()
    if both and len(pooled["tv/last-layer"]) == len(pooled["tv/output"]) == n:
        closer = int(np.sum(pooled["tv/last-layer"] < pooled["tv/output"]))
        lines += [
            "",
            f"Last-layer sampling closer to exact sampling than output sampling: {closer} of {n} measurements.",
        ]
    path = out / "diagnostics.md"
    path.write_text("\n".join(lines) + "\n")
    return path
