"""Run samplers x seeds of one agent in parallel processes, then tabulate and plot the results.

    python -m agents.compare --algo dqn --env-id CartPole-v1 --samplers laber-mean uniform per --seeds 0 1 2

Writes ``<out>/results.md``, ``<out>/results.csv`` and ``<out>/curves.png``. Per sampler: the final
evaluation return as mean and IQM (interquartile mean) with a 95% stratified-bootstrap confidence
interval (Agarwal et al., 2021, as the small-batch study uses), wall time and steps/s. A run that
fails is reported (exit code and its last lines) and the others are kept.
"""
from __future__ import annotations

import csv
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import tyro

ALGOS = ("dqn", "c51", "sac", "td3")


@dataclass
class Config:
    algo: Literal["dqn", "c51", "sac", "td3"] = "dqn"
    """which agent: python -m agents.<algo>"""
    env_id: str = "CartPole-v1"
    """gymnasium id passed to every run"""
    samplers: list[str] = field(default_factory=lambda: ["laber-mean", "uniform", "per"])
    """samplers to compare (any of the agent's --sampler choices)"""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """one run per sampler and seed"""
    total_steps: Optional[int] = None
    """environment steps per run (None: the agent's default for the env)"""
    extra: str = ""
    """more arguments for every run, as one string, e.g. "--m 8 --batch-size 32\""""
    jobs: int = 0
    """parallel runs (0: one per CPU core)"""
    out: Path = Path("runs/compare")
    """results folder; each run writes to <out>/<sampler>/seed<k>/"""
    bootstrap: int = 5000
    """bootstrap resamples for the confidence intervals"""


@dataclass
class Run:
    sampler: str
    seed: int
    folder: Path
    returncode: Optional[int] = None
    log_tail: str = ""
    wall_time: float = float("nan")


def launch(cfg: Config, run: Run) -> Run:
    cmd = [sys.executable, "-m", f"agents.{cfg.algo}", "--env-id", cfg.env_id, "--sampler", run.sampler,
           "--seed", str(run.seed), "--out", str(run.folder), "--no-progress", "--threads", "1"]
    if cfg.total_steps is not None:
        cmd += ["--total-steps", str(cfg.total_steps)]
    cmd += shlex.split(cfg.extra)
    run.folder.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(run.folder / "stdout.log", "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    run.wall_time = time.time() - start
    run.returncode = proc.returncode
    if proc.returncode != 0:
        run.log_tail = "\n".join((run.folder / "stdout.log").read_text().splitlines()[-15:])
    return run


def read_eval(folder: Path) -> Optional[dict]:
    path = folder / "eval.csv"
    if not path.exists():
        return None
    with path.open() as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return None
    return {key: np.array([float(r[key]) for r in rows]) for key in rows[0]}


def iqm(scores: np.ndarray) -> float:
    """Interquartile mean: the mean of the middle 50% of the scores (trimmed at 25% each side)."""
    scores = np.sort(np.asarray(scores, dtype=float))
    n = len(scores)
    lo, hi = int(np.floor(0.25 * n)), int(np.ceil(0.75 * n))
    return float(scores[lo:hi].mean()) if hi > lo else float(scores.mean())


def stratified_bootstrap_ci(scores_by_task: dict, statistic, reps: int, seed: int = 0, level: float = 0.95):
    """Percentile CI of ``statistic`` over runs, resampling runs with replacement within each task."""
    rng = np.random.default_rng(seed)
    tasks = [np.asarray(v, dtype=float) for v in scores_by_task.values()]
    stats = np.empty(reps)
    for r in range(reps):
        stats[r] = statistic(np.concatenate([t[rng.integers(0, len(t), len(t))] for t in tasks]))
    return float(np.quantile(stats, (1 - level) / 2)), float(np.quantile(stats, (1 + level) / 2))


def summarise(cfg: Config, runs: list[Run]) -> list[dict]:
    rows = []
    for sampler in cfg.samplers:
        mine = [r for r in runs if r.sampler == sampler]
        evals = [(r, read_eval(r.folder)) for r in mine if r.returncode == 0]
        evals = [(r, e) for r, e in evals if e is not None]
        finals = np.array([e["eval_return"][-1] for _, e in evals])
        row = {"sampler": sampler, "runs": len(evals), "failed": len(mine) - len(evals)}
        if len(finals):
            ci = stratified_bootstrap_ci({cfg.env_id: finals}, iqm, cfg.bootstrap)
            mean_ci = stratified_bootstrap_ci({cfg.env_id: finals}, np.mean, cfg.bootstrap)
            sps = [e["steps_per_s"][-1] for _, e in evals]
            row.update(mean=finals.mean(), mean_lo=mean_ci[0], mean_hi=mean_ci[1], iqm=iqm(finals), iqm_lo=ci[0],
                       iqm_hi=ci[1], wall_time_s=np.mean([r.wall_time for r, _ in evals]),
                       steps_per_s=float(np.nanmean(sps)) if not np.all(np.isnan(sps)) else float("nan"))
        rows.append(row)
    return rows


def write_tables(cfg: Config, rows: list[dict], runs: list[Run]) -> str:
    cfg.out.mkdir(parents=True, exist_ok=True)
    keys = ["sampler", "runs", "failed", "mean", "mean_lo", "mean_hi", "iqm", "iqm_lo", "iqm_hi", "wall_time_s", "steps_per_s"]
    with (cfg.out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in keys})
    lines = [
        f"{cfg.algo.upper()} on {cfg.env_id}, {len(cfg.seeds)} seeds; final greedy evaluation return "
        f"(95% stratified-bootstrap CIs)",
        "",
        "| sampler | runs | mean [95% CI] | IQM [95% CI] | wall time (s) | steps/s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if r["runs"] == 0:
            lines.append(f"| {r['sampler']} | 0 ({r['failed']} failed) | - | - | - | - |")
            continue
        failed = f" ({r['failed']} failed)" if r["failed"] else ""
        lines.append(
            f"| {r['sampler']} | {r['runs']}{failed} | {r['mean']:.1f} [{r['mean_lo']:.1f}, {r['mean_hi']:.1f}] | "
            f"{r['iqm']:.1f} [{r['iqm_lo']:.1f}, {r['iqm_hi']:.1f}] | {r['wall_time_s']:.0f} | {r['steps_per_s']:.0f} |"
        )
    failures = [r for r in runs if r.returncode != 0]
    if failures:
        lines += ["", "Failed runs:"]
        for r in failures:
            lines.append(f"- {r.sampler} seed {r.seed}: exit code {r.returncode}, log {r.folder / 'stdout.log'}")
    table = "\n".join(lines) + "\n"
    (cfg.out / "results.md").write_text(table)
    return table


def plot_curves(cfg: Config, runs: list[Run]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for sampler in cfg.samplers:
        curves = [read_eval(r.folder) for r in runs if r.sampler == sampler and r.returncode == 0]
        curves = [c for c in curves if c is not None]
        if not curves:
            continue
        length = min(len(c["step"]) for c in curves)
        steps = curves[0]["step"][:length]
        values = np.stack([c["eval_return"][:length] for c in curves])
        rng = np.random.default_rng(0)
        boot = values[rng.integers(0, len(values), (cfg.bootstrap // 5, len(values)))].mean(1)
        (line,) = ax.plot(steps, values.mean(0), label=f"{sampler} (n={len(values)})")
        ax.fill_between(steps, np.quantile(boot, 0.025, axis=0), np.quantile(boot, 0.975, axis=0),
                        color=line.get_color(), alpha=0.2)
    ax.set_xlabel("environment steps")
    ax.set_ylabel("evaluation return")
    ax.set_title(f"{cfg.algo.upper()} on {cfg.env_id}: mean and 95% bootstrap CI over seeds")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = cfg.out / "curves.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(cfg: Config) -> list[dict]:
    runs = [Run(s, k, cfg.out / s / f"seed{k}") for k in cfg.seeds for s in cfg.samplers]
    jobs = cfg.jobs or os.cpu_count() or 1
    print(f"{len(runs)} runs of agents.{cfg.algo} on {cfg.env_id}, {jobs} at a time", flush=True)
    with ThreadPoolExecutor(jobs) as pool:
        for run in pool.map(lambda r: launch(cfg, r), runs):
            status = "ok" if run.returncode == 0 else f"FAILED (exit {run.returncode})"
            print(f"  {run.sampler:12s} seed {run.seed}: {status} in {run.wall_time:.0f} s", flush=True)
            if run.returncode != 0:
                print("    " + run.log_tail.replace("\n", "\n    "), flush=True)
    rows = summarise(cfg, runs)
    print(write_tables(cfg, rows, runs))
    print(f"plot: {plot_curves(cfg, runs)}\ntable: {cfg.out / 'results.md'}, {cfg.out / 'results.csv'}")
    return rows


if __name__ == "__main__":
    main(tyro.cli(Config))
