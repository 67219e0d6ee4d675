"""The batch-size sweep (the small-batch study): per batch size and sampler, the final IQM with its CI,
P(> uniform) at that batch size, the wall time and the runs' last diagnostics, at an equal number of gradient
steps."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from experiments.config import Config
from experiments.markdown import markdown_table
from experiments.reports import KEYS, ci, pyplot, write_csv
from experiments.runs import Run, final_diagnostics, gradient_steps, labels, read_config
from experiments.stats import metric_label

SWEEP_KEYS = ["batch_size", *KEYS[:3], "gradient_steps", *KEYS[3:]]


def sweep_rows(cfg: Config, runs: list[Run], rows_by_batch: dict[int, list[dict]]) -> list[dict]:
    """The per-batch-size rows with the batch size, gradient steps and final diagnostics added."""
    rows = []
    for batch_size, per_sampler in rows_by_batch.items():
        for row in per_sampler:
            ok = [r for r in runs if r.batch_size == batch_size and r.sampler == row["sampler"] and r.returncode == 0]
            counts = {gradient_steps(cfg.algo, read_config(r.folder)) for r in ok} - {None}
            steps = counts.pop() if len(counts) == 1 else ("differ" if counts else "")
            rows.append(
                {"batch_size": batch_size, **row, "gradient_steps": steps, **final_diagnostics([r.folder for r in ok])}
            )
    return rows


def diagnostic_columns(rows: list[dict]) -> list[str]:
    """The diagnostics.csv columns the sweep's rows carry (what :func:`final_diagnostics` added)."""
    return list(dict.fromkeys(k for r in rows for k in r if k not in SWEEP_KEYS and not k.endswith(("_lo", "_hi"))))


def write_sweep(cfg: Config, rows: list[dict]) -> str:
    diagnostics = diagnostic_columns(rows)
    write_csv(cfg.out / "sweep.csv", rows, SWEEP_KEYS + diagnostics)
    has_p = any("p_improve" in r for r in rows)
    header = ["batch size", "sampler", "runs", "gradient steps", "IQM [95% CI]"]
    header += ["P(> uniform) [95% CI]"] * has_p + ["wall time (s)", *diagnostics]
    cells = []
    for r in rows:
        failed = f" ({r['failed']} failed)" if r["failed"] else ""
        wall = f"{r['wall_time_s']:.0f}" if "wall_time_s" in r else "-"
        cells.append(
            [
                str(r["batch_size"]),
                r["sampler"],
                f"{r['runs']}{failed}",
                str(r["gradient_steps"] or "-"),
                ci(r, "iqm", 1),
                *[ci(r, "p_improve", 2)] * has_p,
                wall,
                *(f"{r[k]:.4g}" if k in r else "-" for k in diagnostics),
            ]
        )
    lines = [
        f"{cfg.algo.upper()} on {cfg.env_id}, batch sizes {' '.join(map(str, cfg.batch_sizes))}, "
        f"{len(cfg.seeds)} seeds; {metric_label(cfg.metric, cfg.window)} (95% stratified-bootstrap CIs, rliable)",
        "",
        *markdown_table(header, cells),
        "",
    ]
    lines.append(
        "Every run has the same arguments but --batch-size, so the same number of gradient steps; "
        "diagnostics: the mean over runs of the last row of each run's diagnostics.csv."
        if diagnostics
        else "Every run has the same arguments but --batch-size, so the same number of "
        "gradient steps; no run wrote diagnostics.csv."
    )
    if len({r["gradient_steps"] for r in rows if r["runs"]}) > 1:
        lines.append("WARNING: the runs' gradient steps differ (see the column): --extra or a default changed them.")
    table = "\n".join(lines) + "\n"
    (cfg.out / "sweep.md").write_text(table)
    return table


def plot_sweep(cfg: Config, rows: list[dict]) -> Path:
    """Final IQM with its CI, wall time and each diagnostic against the batch size, one line per sampler."""
    plt = pyplot()
    diagnostics = diagnostic_columns(rows)
    panels = ["iqm", "wall_time_s", *diagnostics]
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    # Constrained layout leaves room for the suptitle (tight_layout let it overlap the top panels' titles).
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.5 * ncols, 3.6 * nrows), squeeze=False, layout="constrained")
    for ax, key in zip(axes.flat, panels):
        for sampler in labels(cfg):
            mine = [r for r in rows if r["sampler"] == sampler and key in r]
            x = np.array([r["batch_size"] for r in mine])
            y = np.array([r[key] for r in mine])
            if key == "iqm":
                err = np.array([[r[key] - r["iqm_lo"] for r in mine], [r["iqm_hi"] - r[key] for r in mine]])
                ax.errorbar(x, y, yerr=err.reshape(2, -1), marker="o", capsize=3, label=sampler)
            else:
                ax.plot(x, y, marker="o", label=sampler)
        ax.set_xscale("log", base=2)
        ax.set_xticks(cfg.batch_sizes, [str(b) for b in cfg.batch_sizes])
        ax.set_xlabel("batch size")
        ax.set_title(
            {
                "iqm": f"{'final return' if cfg.metric == 'final' else 'window mean'}, IQM and 95% CI",
                "wall_time_s": "wall time per run (s)",
            }.get(key, key)
        )
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    axes.flat[0].legend()
    fig.suptitle(f"{cfg.algo.upper()} on {cfg.env_id}: batch-size sweep at a fixed number of gradient steps")
    path = cfg.out / "sweep.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
