"""Several tasks at once: the aggregate metrics of the normalised return across one-task comparisons."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from rliable import library as rly

from experiments.config import Config
from experiments.markdown import markdown_table
from experiments.reports import ci, pyplot, write_csv
from experiments.runs import read_config, read_eval
from experiments.stats import SCORE_RANGES, global_numpy_seed, improvement_over, interval_estimates, normalise


def load_task(folder: Path) -> tuple[str, list[str], dict[str, dict[int, float]]]:
    """A one-task compare folder: its env id, its samplers (in results.csv's order where there is one)
    and each sampler's final return per seed, from ``<folder>/<sampler>/seed<k>/eval.csv``."""
    finals: dict[str, dict[int, float]] = {}
    env_ids = set()
    for run in sorted(folder.glob("*/seed*")):
        evals = read_eval(run)
        if evals is not None:
            finals.setdefault(run.parent.name, {})[int(run.name[len("seed") :])] = float(evals["eval_return"][-1])
            env_ids.add(read_config(run).get("env_id", "?"))
    if len(env_ids) != 1:
        raise ValueError(f"{folder}: expected the runs of one env, found {sorted(env_ids) or 'no runs'}")
    listed = folder / "results.csv"
    # Labels as text: a sampler labelled "nan" or "none" is no missing value.
    order = pd.read_csv(listed, dtype=str, keep_default_na=False)["sampler"].tolist() if listed.exists() else []
    samplers = [s for s in order if s in finals] + sorted(set(finals) - set(order))
    return env_ids.pop(), samplers, finals


def aggregate(cfg: Config) -> list[dict]:
    """Mean, IQM and optimality gap of the normalised return and P(> uniform) across the tasks' runs."""
    tasks = {str(folder): load_task(folder) for folder in cfg.aggregate}
    names = {key: Path(key).name for key in tasks}
    first = next(iter(tasks.values()))
    samplers = [s for s in first[1] if all(s in finals for _, _, finals in tasks.values())]
    known = [key for key, (env_id, _, _) in tasks.items() if env_id in SCORE_RANGES]
    raw, normalised, seeds = {}, {}, {}
    for sampler in samplers:
        # rliable takes a [runs, tasks] matrix: the seeds every task has.
        seeds[sampler] = sorted(set.intersection(*(set(finals[sampler]) for _, _, finals in tasks.values())))
        raw[sampler] = np.array([[tasks[k][2][sampler][s] for k in tasks] for s in seeds[sampler]])
        normalised[sampler] = np.array(
            [[normalise(tasks[k][2][sampler][s], tasks[k][0]) for k in known] for s in seeds[sampler]]
        ).reshape(len(seeds[sampler]), len(known))
    usable = {s: v for s, v in normalised.items() if v.size}
    estimates = interval_estimates(usable, ["mean", "iqm", "optimality_gap"], cfg.bootstrap)
    better = (
        improvement_over({s: v for s, v in raw.items() if v.size}, "uniform", cfg.bootstrap)
        if "uniform" in raw and raw["uniform"].size
        else {}
    )
    rows = []
    for sampler in samplers:
        row = {"sampler": sampler, "runs": len(seeds[sampler]), "tasks": len(tasks)}
        for key, (point, low, high) in estimates.get(sampler, {}).items():
            row.update({key: point, f"{key}_lo": low, f"{key}_hi": high})
        if sampler in better:
            row.update(p_improve=better[sampler][0], p_improve_lo=better[sampler][1], p_improve_hi=better[sampler][2])
        rows.append(row)

    cfg.out.mkdir(parents=True, exist_ok=True)
    keys = [
        "sampler",
        "runs",
        "tasks",
        "mean",
        "mean_lo",
        "mean_hi",
        "iqm",
        "iqm_lo",
        "iqm_hi",
        "optimality_gap",
        "optimality_gap_lo",
        "optimality_gap_hi",
        "p_improve",
        "p_improve_lo",
        "p_improve_hi",
    ]
    write_csv(cfg.out / "aggregate.csv", rows, keys)
    header = ["sampler", "runs per task", "mean [95% CI]", "IQM [95% CI]", "optimality gap [95% CI]"]
    header += ["P(> uniform) [95% CI]"] * bool(better)
    cells = [
        [r["sampler"], str(r["runs"]), ci(r, "mean", 3), ci(r, "iqm", 3), ci(r, "optimality_gap", 3)]
        + [ci(r, "p_improve", 2)] * bool(better)
        for r in rows
    ]
    lines = [
        f"{len(tasks)} tasks ({', '.join(f'{names[k]}: {env}' for k, (env, _, _) in tasks.items())}); final "
        "greedy evaluation return normalised per task (experiments.stats.SCORE_RANGES), 95% stratified-bootstrap "
        "CIs (rliable)",
        "",
        *markdown_table(header, cells),
        "",
    ]
    unknown = [names[k] for k in tasks if k not in known]
    lines.append(
        f"Mean, IQM and optimality gap over {len(known)} tasks"
        + (f"; left out (no score range): {', '.join(unknown)}." if unknown else ".")
    )
    if better:
        lines.append(f"P(> uniform) over all {len(tasks)} tasks (rank-based, needs no normalisation).")
    left = [s for s in first[1] if s not in samplers]
    if left:
        lines.append(f"Samplers not in every task, left out: {', '.join(left)}.")
    table = "\n".join(lines) + "\n"
    (cfg.out / "aggregate.md").write_text(table)
    if known:
        plot_aggregate(cfg, usable, estimates)
    print(table)
    return rows


def plot_aggregate(cfg: Config, normalised: dict[str, np.ndarray], estimates: dict) -> None:
    """rliable's performance profiles (``profiles.png``) and interval estimates (``aggregate.png``)."""
    plt = pyplot()
    from rliable import plot_utils

    top = max(1.0, max(float(v.max()) for v in normalised.values()))
    taus = np.linspace(0.0, top, 101)
    with global_numpy_seed(0):
        profiles, profile_cis = rly.create_performance_profile(normalised, taus, reps=max(cfg.bootstrap // 5, 100))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    plot_utils.plot_performance_profiles(
        profiles,
        taus,
        performance_profile_cis=profile_cis,
        ax=ax,
        xlabel=r"normalised return $\tau$",
        ylabel=r"fraction of runs above $\tau$",
    )
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(cfg.out / "profiles.png", dpi=120)
    plt.close(fig)

    names = ["mean", "iqm", "optimality_gap"]
    points = {s: np.array([estimates[s][n][0] for n in names]) for s in estimates}
    cis = {s: np.array([[estimates[s][n][1] for n in names], [estimates[s][n][2] for n in names]]) for s in estimates}
    fig, _ = plot_utils.plot_interval_estimates(
        points,
        cis,
        metric_names=["Mean", "IQM", "Optimality gap"],
        algorithms=list(estimates),
        xlabel="normalised return",
        row_height=0.6,
        xlabel_y_coordinate=-0.9 / len(estimates),
    )
    fig.savefig(cfg.out / "aggregate.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
