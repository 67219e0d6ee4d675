"""Run samplers x seeds (x batch sizes) of one agent in parallel processes, then tabulate and plot the
results with rliable's aggregate metrics and stratified-bootstrap CIs (Agarwal et al., 2021, "Deep
Reinforcement Learning at the Edge of the Statistical Precipice").

    python -m agents.compare --algo dqn --env-id CartPole-v1 --samplers laber-mean uniform per --seeds 0 1 2
    python -m agents.compare --algo dqn --env-id CartPole-v1 --samplers uniform laber-mean --seeds 0 1 \\
        --batch-sizes 8 16 32 64 128                        # the small-batch study
    python -m agents.compare --aggregate runs/compare/dqn-cartpole runs/compare/dqn-acrobot --out runs/compare/all

**One task** writes ``<out>/<sampler>/seed<k>/`` per run and ``<out>/results.md``, ``results.csv`` and
``curves.png``. Per sampler, over the final greedy evaluation return of its runs: mean and IQM of the
return, the optimality gap of the normalised return (:data:`SCORE_RANGES`) and the probability of
improvement over ``uniform`` (when it is among the samplers), each with a 95% stratified-bootstrap CI;
wall time and steps/s. A run that fails is reported (exit code and its last lines), the others kept.
Runs with ``--diagnostics-every`` (in ``--extra``) also give ``diagnostics.png``: the total variation
of each surrogate's sampling to exact sampling over training (the paper's App. H) beside the gradient
norm and variance, srank and dormant fraction.

**A batch-size sweep** (``--batch-sizes``) runs samplers x seeds x batch sizes into
``<out>/bs<k>/<sampler>/seed<j>/``, writes the one-task files per batch size in ``<out>/bs<k>/``, and
``<out>/sweep.md``, ``sweep.csv`` and ``sweep.png``: final IQM with its CI, wall time and, where the
runs wrote ``diagnostics.csv``, the mean over runs of each diagnostic's last row, per batch size and
sampler. Every run gets the same arguments but ``--batch-size``, so the same ``--total-steps``,
``--learning-starts``, ``--train-freq`` and ``--gradient-steps``: the number of gradient steps is the
same at every batch size (the table's "gradient steps" column counts them from each run's config.txt).

**Variants**: a ``--samplers`` entry ``LABEL=SAMPLER ARGS...`` runs that sampler with more arguments of
its own under its own label (folder and table row), e.g. the surrogate ladder in one table:
``--samplers uniform laber-mean "laber-mean-exact=laber-mean --surrogate exact"``.

**Adding to a comparison** (``--reuse``): a run whose folder already holds a finished run with the same
arguments is kept and not launched again, so more seeds or samplers can be added to an existing ``<out>``
and an interrupted comparison finished; the tables count kept and new runs alike. An interrupted run
with the same arguments and a checkpoint (``--extra="--checkpoint-every K"``) goes on from it
(``--resume``). A finished run's checkpoint keeps no replay buffer (``--keep-buffer`` in ``--extra``
keeps it).

**Several tasks** (``--aggregate DIR ...``) runs nothing: it reads existing one-task ``<out>`` folders
and writes ``<out>/aggregate.md``, ``aggregate.csv``, ``profiles.png`` (rliable's performance profiles)
and ``aggregate.png`` (mean, IQM and optimality gap with CIs) over the normalised returns.
"""
from __future__ import annotations

import csv
import math
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Optional

import numpy as np
import tyro
from rliable import library as rly
from rliable import metrics

ALGOS = ("dqn", "c51", "sac", "td3")

# Score normalisation for the optimality gap and the multi-task aggregates: x_hat = (x - low) / (high - low),
# low and high the returns an episode can give. An env not listed here gets no optimality gap and is left
# out of the normalised aggregates (the tables say so).
SCORE_RANGES = {
    "CartPole-v1": (0.0, 500.0),  # +1 per step; the episode ends at 500 steps
    "Acrobot-v1": (-500.0, 0.0),  # -1 per step until the goal, 500 steps at most; no policy reaches 0
    "Pendulum-v1": (-200 * math.pi ** 2, 0.0),  # hanging still at the bottom all 200 steps; upright from the start
    "MinAtar/Breakout-v1": (0.0, 30.0),  # +1 per brick; 30 = one full wall (3 rows x 10), then a new wall appears
}

# The aggregate metrics of rliable, each on a (runs x tasks) score matrix.
METRICS: dict[str, Callable[[np.ndarray], float]] = {
    "mean": metrics.aggregate_mean,
    "iqm": metrics.aggregate_iqm,
    "optimality_gap": metrics.aggregate_optimality_gap,
}


@dataclass
class Config:
    algo: Literal["dqn", "c51", "sac", "td3"] = "dqn"
    """which agent: python -m agents.<algo>"""
    env_id: str = "CartPole-v1"
    """gymnasium id passed to every run"""
    samplers: list[str] = field(default_factory=lambda: ["laber-mean", "uniform", "per"])
    """samplers to compare (any of the agent's --sampler choices); an entry "LABEL=SAMPLER ARGS..." is a
    variant with more arguments of its own, e.g. "last-layer=laber-mean --surrogate last-layer\""""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """one run per sampler and seed"""
    batch_sizes: list[int] = field(default_factory=list)
    """a batch-size sweep: runs with --batch-size k, all else equal, so equal gradient steps (empty: no sweep)"""
    total_steps: Optional[int] = None
    """environment steps per run (None: the agent's default for the env)"""
    extra: str = ""
    """more arguments for every run, as one string, e.g. "--m 8 --batch-size 32\""""
    jobs: int = 0
    """parallel runs (0: one per CPU core)"""
    out: Path = Path("runs/compare")
    """results folder; each run writes to <out>/<sampler>/seed<k>/ (a sweep: <out>/bs<k>/<sampler>/seed<j>/)"""
    aggregate: list[Path] = field(default_factory=list)
    """existing one-task <out> folders to aggregate across tasks into <out>; runs nothing"""
    bootstrap: int = 5000
    """bootstrap resamples for the confidence intervals"""
    reuse: bool = False
    """keep each run whose folder already holds a finished run with the same arguments (see
    :func:`finished_run`) and launch only the others: to add seeds or samplers to a comparison, or to
    finish an interrupted one"""


@dataclass
class Run:
    sampler: str
    seed: int
    folder: Path
    batch_size: Optional[int] = None
    returncode: Optional[int] = None
    log_tail: str = ""
    wall_time: float = float("nan")
    reused: bool = False  # found finished in its folder (--reuse), not run again


# ---------------------------------------------------------------------------------------------------
# Aggregate metrics (rliable)


@contextmanager
def _global_numpy_seed(seed: int):
    # rliable's StratifiedBootstrap draws its indices with np.random.choice, the global generator (its
    # random_state argument does not reach them): seed that one for reproducible tables, then restore it.
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def interval_estimates(scores: dict[str, np.ndarray], names: list[str], reps: int = 5000, seed: int = 0,
                       level: float = 0.95) -> dict[str, dict[str, tuple[float, float, float]]]:
    """rliable's aggregate metrics with stratified-bootstrap percentile CIs, per sampler.

    ``scores[sampler]`` is a ``[runs, tasks]`` matrix ``x``; the metrics (:data:`METRICS`), over all
    ``N x M`` entries:

    ================  ===============================================================================
    ``mean``          ``(1/M) sum_m (1/N) sum_n x[n, m]``
    ``iqm``           mean of the middle 50% of the sorted ``x`` (``scipy.stats.trim_mean(x, 0.25)``:
                      ``floor(NM/4)`` cut at each end)
    ``optimality_gap`` ``1 - mean(min(x, 1))`` (``x`` normalised: 1 is the best score, see
                      :data:`SCORE_RANGES`)
    ================  ===============================================================================

    The CI: ``reps`` resamples, each drawing ``N`` runs with replacement within every task (stratified),
    the ``(1 - level) / 2`` and ``(1 + level) / 2`` percentiles of the metric over them
    (``rliable.library.get_interval_estimates``, method "percentile"). Returns
    ``{sampler: {name: (point, low, high)}}``; ``seed`` fixes the resamples.

    Examples:
        >>> x = np.array([[1.0], [2.0], [3.0], [10.0]])
        >>> est = interval_estimates({"a": x}, ["mean", "iqm"], reps=200)
        >>> est["a"]["mean"][0], est["a"]["iqm"][0]
        (4.0, 2.5)
        >>> low, high = est["a"]["iqm"][1:]
        >>> bool(1.0 <= low <= 2.5 <= high <= 10.0)
        True
    """
    funcs = [METRICS[name] for name in names]
    estimates = {}
    for key, value in scores.items():
        with _global_numpy_seed(seed):  # per sampler: its CI does not depend on the others in the table
            points, cis = rly.get_interval_estimates({key: np.asarray(value, dtype=float)},
                                                     lambda x: np.array([f(x) for f in funcs]), reps=reps,
                                                     confidence_interval_size=level)
        estimates[key] = {name: (float(points[key][i]), float(cis[key][0, i]), float(cis[key][1, i]))
                          for i, name in enumerate(names)}
    return estimates


def improvement_over(scores: dict[str, np.ndarray], baseline: str, reps: int = 5000, seed: int = 0,
                     level: float = 0.95) -> dict[str, tuple[float, float, float]]:
    """Probability of improvement of each sampler over ``baseline``, with a stratified-bootstrap CI.

    For ``[runs, tasks]`` matrices ``x`` (``N_x`` runs) and ``y`` (the baseline's, ``N_y`` runs):
    ``P(X > Y) = (1/M) sum_m (1 / (N_x N_y)) sum_i sum_j S(x[i, m], y[j, m])`` with ``S = 1`` if
    ``x > y``, ``1/2`` if equal, ``0`` else: the chance that a run of the sampler ends above a run of
    the baseline on a random task (``rliable.metrics.probability_of_improvement``, Mann-Whitney U).
    Its CI resamples the runs of both samplers independently within each task
    (``rliable.library.get_interval_estimates`` on the pair). Returns ``{sampler: (p, low, high)}``
    for every sampler but the baseline.

    Examples:
        >>> x = np.array([[1.0], [2.0], [3.0]])
        >>> improvement_over({"uniform": x, "same": x.copy(), "better": x + 10}, "uniform", reps=200)["better"]
        (1.0, 1.0, 1.0)
        >>> improvement_over({"uniform": x, "same": x.copy()}, "uniform", reps=200)["same"][0]
        0.5
    """
    estimates = {}
    for key, value in scores.items():
        if key == baseline:
            continue
        pair = [np.asarray(value, dtype=float), np.asarray(scores[baseline], dtype=float)]
        with _global_numpy_seed(seed):
            points, cis = rly.get_interval_estimates(
                {key: pair}, lambda x, y: np.array([metrics.probability_of_improvement(x, y)]), reps=reps,
                confidence_interval_size=level)
        estimates[key] = (float(points[key][0]), float(cis[key][0, 0]), float(cis[key][1, 0]))
    return estimates


def normalise(returns: np.ndarray, env_id: str) -> Optional[np.ndarray]:
    """``(x - low) / (high - low)`` with ``(low, high) = SCORE_RANGES[env_id]``; None for an env not there.

    Examples:
        >>> normalise(np.array([0.0, 250.0, 500.0]), "CartPole-v1")
        array([0. , 0.5, 1. ])
        >>> normalise(np.array([1.0]), "MountainCar-v0") is None
        True
    """
    if env_id not in SCORE_RANGES:
        return None
    low, high = SCORE_RANGES[env_id]
    return (np.asarray(returns, dtype=float) - low) / (high - low)


# ---------------------------------------------------------------------------------------------------
# Runs and what they wrote


def variant(entry: str) -> tuple[str, list[str]]:
    """A ``--samplers`` entry as (label, agent arguments): a sampler name, or ``LABEL=SAMPLER ARGS...``
    for a variant that differs from the others in more than the sampler. The label names the run
    folders and the table's row.

    Examples:
        >>> variant("per")
        ('per', ['--sampler', 'per'])
        >>> variant("last-layer=laber-mean --surrogate last-layer")
        ('last-layer', ['--sampler', 'laber-mean', '--surrogate', 'last-layer'])
    """
    label, _, rest = entry.partition("=")
    words = shlex.split(rest) if rest else [label]
    label = label.strip()
    if not label or "/" in label or " " in label or not words or words[0].startswith("-"):
        raise ValueError(f"--samplers entry {entry!r}: expected SAMPLER or LABEL=SAMPLER ARGS..., the label "
                         "without spaces or '/'")
    return label, ["--sampler", *words]


def labels(cfg: Config) -> list[str]:
    """The table rows: each ``--samplers`` entry's label (see :func:`variant`)."""
    names = [variant(e)[0] for e in cfg.samplers]
    if len(set(names)) != len(names):
        raise ValueError(f"--samplers: two entries share a label in {names}")
    return names


def command(cfg: Config, run: Run) -> list[str]:
    """The agent's command line for one run (``run.sampler`` is a ``--samplers`` entry's label)."""
    entry = dict(variant(e) for e in cfg.samplers)[run.sampler]
    cmd = [sys.executable, "-m", f"agents.{cfg.algo}", "--env-id", cfg.env_id, *entry,
           "--seed", str(run.seed), "--out", str(run.folder), "--no-progress", "--threads", "1"]
    if cfg.total_steps is not None:
        cmd += ["--total-steps", str(cfg.total_steps)]
    if run.batch_size is not None:
        cmd += ["--batch-size", str(run.batch_size)]
    return cmd + shlex.split(cfg.extra)


def _same_value(given: list[str], recorded: str) -> bool:
    """Whether a flag's values on a command line equal a config.txt value (numbers compared as numbers,
    tuples and lists item by item)."""
    items = [x.strip().strip("'\"") for x in recorded[1:-1].split(",")] if recorded[:1] in "([" else [recorded]
    items = [x for x in items if x]
    if len(items) != len(given):
        return False
    for a, b in zip(given, items):
        try:
            if float(a) != float(b):
                return False
        except ValueError:
            if a != b:
                return False
    return True


def finished_run(args: list[str], folder: Path) -> Optional[float]:
    """The wall time of the finished run in ``folder`` if it was made with the agent arguments ``args``,
    else None.

    Finished: ``eval.csv``'s last row is at ``total_steps`` (the loop always evaluates at the last step).
    Same arguments: every ``--flag value...`` in ``args`` but ``--out`` (the folder is the run's, wherever
    it was written) equals ``flag``'s value in the run's ``config.txt`` (``--no-flag`` reads as
    ``flag=False``, a bare ``--flag`` as ``True``); a flag the config does not record counts as
    different, so an unknown run is rerun, never reused.

    Examples:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> _ = (folder / "config.txt").write_text("seed=1\\nprogress=False\\nlr=0.001\\ntotal_steps=600\\n")
        >>> _ = (folder / "eval.csv").write_text("step,eval_return,wall_time,steps_per_s\\n600,9.0,12.5,48.0\\n")
        >>> finished_run(["--seed", "1", "--no-progress", "--lr", "1e-3"], folder)
        12.5
        >>> finished_run(["--seed", "2"], folder) is None
        True
    """
    config, evals = read_config(folder), read_eval(folder)
    if not config or evals is None or "total_steps" not in config:
        return None
    if int(evals["step"][-1]) != int(config["total_steps"]):
        return None
    return float(evals["wall_time"][-1]) if same_arguments(args, config) else None


def same_arguments(args: list[str], config: dict[str, str]) -> bool:
    """Whether the agent arguments ``args`` are those a run's ``config.txt`` (as a dict) records (see
    :func:`finished_run`)."""
    i = 0
    while i < len(args):
        if not args[i].startswith("--"):
            return False  # a stray value: not a command line this function understands
        key, values = args[i][2:].replace("-", "_"), []
        i += 1
        while i < len(args) and not args[i].startswith("--"):
            values.append(args[i])
            i += 1
        if not values and key not in config and key.startswith("no_"):
            key, values = key[3:], ["False"]
        elif not values:
            values = ["True"]
        if key != "out" and (key not in config or not _same_value(values, config[key])):
            return False
    return True


def launch(cfg: Config, run: Run) -> Run:
    cmd = command(cfg, run)
    if cfg.reuse:
        wall_time = finished_run(cmd[3:], run.folder)
        if wall_time is not None:
            run.wall_time, run.returncode, run.reused = wall_time, 0, True
            return run
        # An interrupted run with the same arguments resumes from its last checkpoint (--checkpoint-every).
        if (run.folder / "checkpoint" / "buffer").is_dir() and same_arguments(cmd[3:], read_config(run.folder)):
            cmd = [*cmd, "--resume"]
    run.folder.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(run.folder / "stdout.log", "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    run.wall_time = time.time() - start
    run.returncode = proc.returncode
    if proc.returncode != 0:
        run.log_tail = "\n".join((run.folder / "stdout.log").read_text().splitlines()[-15:])
    return run


def read_csv_columns(path: Path) -> Optional[dict[str, np.ndarray]]:
    """A CSV file of numbers as ``{column: values}``; None if it is missing or has no rows."""
    if not path.exists():
        return None
    with path.open() as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return None
    return {key: np.array([float(r[key]) if r[key] != "" else np.nan for r in rows]) for key in rows[0]}


def read_eval(folder: Path) -> Optional[dict[str, np.ndarray]]:
    return read_csv_columns(folder / "eval.csv")


def read_config(folder: Path) -> dict[str, str]:
    """A run's config.txt (``key=value`` lines) as strings."""
    path = folder / "config.txt"
    if not path.exists():
        return {}
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def gradient_steps(algo: str, config: dict[str, str]) -> Optional[int]:
    """Gradient steps a run takes, from its config.txt; None if the config lacks a field.

    DQN and C51 take ``gradient_steps`` updates at every env step ``s >= learning_starts`` with
    ``(s + 1) % train_freq == 0``: ``(T // f - L // f) * g``. SAC and TD3 take one per env step from
    ``learning_starts`` on: ``T - L`` (TD3's actor every ``policy_delay`` of them). None depends on the
    batch size.

    Examples:
        >>> gradient_steps("dqn", {"total_steps": "600", "learning_starts": "200", "train_freq": "20",
        ...                        "gradient_steps": "4"})
        80
        >>> gradient_steps("sac", {"total_steps": "8000", "learning_starts": "1000"})
        7000
    """
    try:
        total, start = int(config["total_steps"]), int(config["learning_starts"])
        if algo in ("dqn", "c51"):
            freq = int(config["train_freq"])
            return (total // freq - start // freq) * int(config["gradient_steps"])
        return max(total - start, 0)
    except KeyError:
        return None


def final_diagnostics(folders: list[Path]) -> dict[str, float]:
    """Mean over runs of the last row of each run's ``diagnostics.csv`` (every column but ``step``).

    Runs without the file are left out; ``{}`` when none wrote one.
    """
    lasts = [d for d in (read_csv_columns(f / "diagnostics.csv") for f in folders) if d is not None]
    columns = list(dict.fromkeys(k for d in lasts for k in d if k != "step"))
    return {k: float(np.nanmean([d[k][-1] if k in d else np.nan for d in lasts])) for k in columns}


# ---------------------------------------------------------------------------------------------------
# One task: table and curves


def summarise(runs: list[Run], samplers: list[str], env_id: str, reps: int) -> list[dict]:
    """One row per sampler: runs, failed, mean / IQM / optimality gap / P(> uniform) with CIs, time."""
    finals, rows = {}, []
    for sampler in samplers:
        mine = [r for r in runs if r.sampler == sampler]
        evals = [(r, read_eval(r.folder)) for r in mine if r.returncode == 0]
        evals = [(r, e) for r, e in evals if e is not None]
        row = {"sampler": sampler, "runs": len(evals), "failed": len(mine) - len(evals)}
        if evals:
            finals[sampler] = np.array([[e["eval_return"][-1]] for _, e in evals])  # [runs, 1 task]
            sps = [e["steps_per_s"][-1] for _, e in evals]
            row.update(wall_time_s=np.mean([r.wall_time for r, _ in evals]),
                       steps_per_s=float(np.nanmean(sps)) if not np.all(np.isnan(sps)) else float("nan"))
        rows.append(row)
    raw = interval_estimates(finals, ["mean", "iqm"], reps)
    normalised = {k: normalise(v, env_id) for k, v in finals.items()} if env_id in SCORE_RANGES else {}
    gap = interval_estimates(normalised, ["optimality_gap"], reps)
    better = improvement_over(finals, "uniform", reps) if "uniform" in finals else {}
    for row in rows:
        name = row["sampler"]
        estimates = {**raw.get(name, {}), **gap.get(name, {})}
        if name in better:
            estimates["p_improve"] = better[name]
        for key, (point, low, high) in estimates.items():
            row.update({key: point, f"{key}_lo": low, f"{key}_hi": high})
    return rows


KEYS = ["sampler", "runs", "failed", "mean", "mean_lo", "mean_hi", "iqm", "iqm_lo", "iqm_hi", "wall_time_s",
        "steps_per_s", "optimality_gap", "optimality_gap_lo", "optimality_gap_hi", "p_improve", "p_improve_lo",
        "p_improve_hi"]


def _ci(row: dict, key: str, digits: int) -> str:
    if key not in row:
        return "-"
    return f"{row[key]:.{digits}f} [{row[key + '_lo']:.{digits}f}, {row[key + '_hi']:.{digits}f}]"


def write_csv(path: Path, rows: list[dict], keys: list[str]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in keys})


def write_tables(out: Path, title: str, env_id: str, rows: list[dict], runs: list[Run]) -> str:
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "results.csv", rows, KEYS)
    has_gap, has_p = env_id in SCORE_RANGES, any("p_improve" in r for r in rows)
    header = ["sampler", "runs", "mean [95% CI]", "IQM [95% CI]"]
    header += ["optimality gap [95% CI]"] * has_gap + ["P(> uniform) [95% CI]"] * has_p
    header += ["wall time (s)", "steps/s"]
    lines = [f"{title}; final greedy evaluation return (95% stratified-bootstrap CIs, rliable)", "",
             "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for r in rows:
        if r["runs"] == 0:
            lines.append(f"| {r['sampler']} | 0 ({r['failed']} failed) |" + " - |" * (len(header) - 2))
            continue
        failed = f" ({r['failed']} failed)" if r["failed"] else ""
        cells = [r["sampler"], f"{r['runs']}{failed}", _ci(r, "mean", 1), _ci(r, "iqm", 1)]
        cells += [_ci(r, "optimality_gap", 2)] * has_gap + [_ci(r, "p_improve", 2)] * has_p
        cells += [f"{r['wall_time_s']:.0f}", f"{r['steps_per_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if has_gap:
        low, high = SCORE_RANGES[env_id]
        lines.append(f"Optimality gap: 1 - mean(min(x, 1)) of the return normalised as x = (return - {low:g}) / "
                     f"({high:g} - {low:g}) (agents.compare.SCORE_RANGES).")
    else:
        lines.append(f"Optimality gap: left out, {env_id} has no score range in agents.compare.SCORE_RANGES.")
    if has_p:
        lines.append("P(> uniform): the probability that a run of the sampler ends above a run of uniform "
                     "(ties count 1/2).")
    failures = [r for r in runs if r.returncode != 0]
    if failures:
        lines += ["", "Failed runs:"]
        for r in failures:
            lines.append(f"- {r.sampler} seed {r.seed}: exit code {r.returncode}, log {r.folder / 'stdout.log'}")
    table = "\n".join(lines) + "\n"
    (out / "results.md").write_text(table)
    return table


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(out: Path, title: str, runs: list[Run], samplers: list[str], reps: int) -> Path:
    """Mean evaluation return over seeds against steps, with its pointwise 95% bootstrap CI (rliable)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for sampler in samplers:
        curves = [read_eval(r.folder) for r in runs if r.sampler == sampler and r.returncode == 0]
        curves = [c for c in curves if c is not None]
        if not curves:
            continue
        length = min(len(c["step"]) for c in curves)
        steps = curves[0]["step"][:length]
        values = np.stack([c["eval_return"][:length] for c in curves])[:, None, :]  # [runs, 1 task, evals]
        with _global_numpy_seed(0):
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


def read_diagnostics(runs: list[Run]) -> dict[str, list[dict[str, np.ndarray]]]:
    """``{sampler: [diagnostics.csv columns of each of its runs]}`` for the runs that finished and wrote one."""
    logs = {}
    for r in runs:
        log = read_csv_columns(r.folder / "diagnostics.csv") if r.returncode == 0 else None
        if log is not None:
            logs.setdefault(r.sampler, []).append(log)
    return logs


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

    plt = _pyplot()
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
    lines = [f"{title}: diagnostics of {len(logs)} runs, {n} measurements (each run's critic on uniform draws "
             "of its buffer)", "", "| diagnostic | median [min, max] |", "| --- | --- |"]

    def row(name: str, values: np.ndarray) -> None:
        values = values[np.isfinite(values)]
        if len(values):
            lines.append(f"| {name} | {np.median(values):.3g} [{values.min():.3g}, {values.max():.3g}] |")

    moments = sorted((k for k in pooled if k.startswith("second_moment/")), key=_coarse_to_exact)
    for key in sorted((k for k in pooled if k.startswith("tv/")), key=_coarse_to_exact) + moments:
        row(key, pooled[key])
    if "second_moment/ideal" in pooled and len(pooled["second_moment/ideal"]) == n:
        for key in [k for k in moments if k != "second_moment/ideal"]:
            if len(pooled[key]) == n:
                row(f"{key} / ideal", pooled[key] / pooled["second_moment/ideal"])
    both = {"tv/last-layer", "tv/output"} <= pooled.keys()
    if both and len(pooled["tv/last-layer"]) == len(pooled["tv/output"]) == n:
        closer = int(np.sum(pooled["tv/last-layer"] < pooled["tv/output"]))
        lines += ["", f"Last-layer sampling closer to exact sampling than output sampling: {closer} of {n} "
                  "measurements."]
    path = out / "diagnostics.md"
    path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------------------------------------------
# The batch-size sweep


SWEEP_KEYS = ["batch_size", *KEYS[:3], "gradient_steps", *KEYS[3:]]


def sweep_rows(cfg: Config, runs: list[Run], rows_by_batch: dict[int, list[dict]]) -> list[dict]:
    """The per-batch-size rows with the batch size, gradient steps and final diagnostics added."""
    rows = []
    for batch_size, per_sampler in rows_by_batch.items():
        for row in per_sampler:
            ok = [r for r in runs if r.batch_size == batch_size and r.sampler == row["sampler"] and r.returncode == 0]
            counts = {gradient_steps(cfg.algo, read_config(r.folder)) for r in ok} - {None}
            steps = counts.pop() if len(counts) == 1 else ("differ" if counts else "")
            rows.append({"batch_size": batch_size, **row, "gradient_steps": steps,
                         **final_diagnostics([r.folder for r in ok])})
    return rows


def diagnostic_columns(rows: list[dict]) -> list[str]:
    """The diagnostics.csv columns the sweep's rows carry (what :func:`final_diagnostics` added)."""
    return list(dict.fromkeys(k for r in rows for k in r if k not in SWEEP_KEYS and not k.endswith(("_lo", "_hi"))))


def write_sweep(cfg: Config, rows: list[dict]) -> str:
    diagnostics = diagnostic_columns(rows)
    write_csv(cfg.out / "sweep.csv", rows, SWEEP_KEYS + diagnostics)
    header = ["batch size", "sampler", "runs", "gradient steps", "IQM [95% CI]", "wall time (s)", *diagnostics]
    lines = [f"{cfg.algo.upper()} on {cfg.env_id}, batch sizes {' '.join(map(str, cfg.batch_sizes))}, "
             f"{len(cfg.seeds)} seeds; final greedy evaluation return (95% stratified-bootstrap CIs, rliable)", "",
             "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for r in rows:
        failed = f" ({r['failed']} failed)" if r["failed"] else ""
        wall = f"{r['wall_time_s']:.0f}" if "wall_time_s" in r else "-"
        cells = [str(r["batch_size"]), r["sampler"], f"{r['runs']}{failed}", str(r["gradient_steps"] or "-"),
                 _ci(r, "iqm", 1), wall, *(f"{r[k]:.4g}" if k in r else "-" for k in diagnostics)]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Every run has the same arguments but --batch-size, so the same number of gradient steps; "
                 "diagnostics: the mean over runs of the last row of each run's diagnostics.csv."
                 if diagnostics else "Every run has the same arguments but --batch-size, so the same number of "
                 "gradient steps; no run wrote diagnostics.csv.")
    if len({r["gradient_steps"] for r in rows if r["runs"]}) > 1:
        lines.append("WARNING: the runs' gradient steps differ (see the column): --extra or a default changed them.")
    table = "\n".join(lines) + "\n"
    (cfg.out / "sweep.md").write_text(table)
    return table


def plot_sweep(cfg: Config, rows: list[dict]) -> Path:
    """Final IQM with its CI, wall time and each diagnostic against the batch size, one line per sampler."""
    plt = _pyplot()
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
        ax.set_title({"iqm": "final return, IQM and 95% CI", "wall_time_s": "wall time per run (s)"}.get(key, key))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    axes.flat[0].legend()
    fig.suptitle(f"{cfg.algo.upper()} on {cfg.env_id}: batch-size sweep at a fixed number of gradient steps")
    path = cfg.out / "sweep.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------
# Several tasks


def load_task(folder: Path) -> tuple[str, list[str], dict[str, dict[int, float]]]:
    """A one-task compare folder: its env id, its samplers (in results.csv's order where there is one)
    and each sampler's final return per seed, from ``<folder>/<sampler>/seed<k>/eval.csv``."""
    finals: dict[str, dict[int, float]] = {}
    env_ids = set()
    for run in sorted(folder.glob("*/seed*")):
        evals = read_eval(run)
        if evals is not None:
            finals.setdefault(run.parent.name, {})[int(run.name[len("seed"):])] = float(evals["eval_return"][-1])
            env_ids.add(read_config(run).get("env_id", "?"))
    if len(env_ids) != 1:
        raise ValueError(f"{folder}: expected the runs of one env, found {sorted(env_ids) or 'no runs'}")
    listed = folder / "results.csv"
    order = [r["sampler"] for r in csv.DictReader(listed.read_text().splitlines())] if listed.exists() else []
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
        normalised[sampler] = np.array([[normalise(tasks[k][2][sampler][s], tasks[k][0]) for k in known]
                                        for s in seeds[sampler]]).reshape(len(seeds[sampler]), len(known))
    usable = {s: v for s, v in normalised.items() if v.size}
    estimates = interval_estimates(usable, ["mean", "iqm", "optimality_gap"], cfg.bootstrap)
    better = improvement_over({s: v for s, v in raw.items() if v.size}, "uniform", cfg.bootstrap) \
        if "uniform" in raw and raw["uniform"].size else {}
    rows = []
    for sampler in samplers:
        row = {"sampler": sampler, "runs": len(seeds[sampler]), "tasks": len(tasks)}
        for key, (point, low, high) in estimates.get(sampler, {}).items():
            row.update({key: point, f"{key}_lo": low, f"{key}_hi": high})
        if sampler in better:
            row.update(p_improve=better[sampler][0], p_improve_lo=better[sampler][1], p_improve_hi=better[sampler][2])
        rows.append(row)

    cfg.out.mkdir(parents=True, exist_ok=True)
    keys = ["sampler", "runs", "tasks", "mean", "mean_lo", "mean_hi", "iqm", "iqm_lo", "iqm_hi", "optimality_gap",
            "optimality_gap_lo", "optimality_gap_hi", "p_improve", "p_improve_lo", "p_improve_hi"]
    write_csv(cfg.out / "aggregate.csv", rows, keys)
    header = ["sampler", "runs per task", "mean [95% CI]", "IQM [95% CI]", "optimality gap [95% CI]"]
    header += ["P(> uniform) [95% CI]"] * bool(better)
    lines = [f"{len(tasks)} tasks ({', '.join(f'{names[k]}: {env}' for k, (env, _, _) in tasks.items())}); final "
             "greedy evaluation return normalised per task (agents.compare.SCORE_RANGES), 95% stratified-bootstrap "
             "CIs (rliable)", "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for r in rows:
        cells = [r["sampler"], str(r["runs"]), _ci(r, "mean", 3), _ci(r, "iqm", 3), _ci(r, "optimality_gap", 3)]
        cells += [_ci(r, "p_improve", 2)] * bool(better)
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    unknown = [names[k] for k in tasks if k not in known]
    lines.append(f"Mean, IQM and optimality gap over {len(known)} tasks" +
                 (f"; left out (no score range): {', '.join(unknown)}." if unknown else "."))
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
    plt = _pyplot()
    from rliable import plot_utils

    top = max(1.0, max(float(v.max()) for v in normalised.values()))
    taus = np.linspace(0.0, top, 101)
    with _global_numpy_seed(0):
        profiles, profile_cis = rly.create_performance_profile(normalised, taus, reps=max(cfg.bootstrap // 5, 100))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    plot_utils.plot_performance_profiles(profiles, taus, performance_profile_cis=profile_cis, ax=ax,
                                         xlabel=r"normalised return $\tau$", ylabel=r"fraction of runs above $\tau$")
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(cfg.out / "profiles.png", dpi=120)
    plt.close(fig)

    names = ["mean", "iqm", "optimality_gap"]
    points = {s: np.array([estimates[s][n][0] for n in names]) for s in estimates}
    cis = {s: np.array([[estimates[s][n][1] for n in names], [estimates[s][n][2] for n in names]]) for s in estimates}
    fig, _ = plot_utils.plot_interval_estimates(points, cis, metric_names=["Mean", "IQM", "Optimality gap"],
                                                algorithms=list(estimates), xlabel="normalised return",
                                                row_height=0.6, xlabel_y_coordinate=-0.9 / len(estimates))
    fig.savefig(cfg.out / "aggregate.png", dpi=120, bbox_inches="tight")
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------


def main(cfg: Config) -> list[dict]:
    if cfg.aggregate:
        return aggregate(cfg)
    if cfg.batch_sizes and "--batch-size" in shlex.split(cfg.extra):
        raise ValueError("--batch-sizes sets each run's --batch-size: leave it out of --extra")
    batch_sizes, names = cfg.batch_sizes or [None], labels(cfg)
    runs = [Run(s, k, (cfg.out / f"bs{b}" if b is not None else cfg.out) / s / f"seed{k}", batch_size=b)
            for b in batch_sizes for k in cfg.seeds for s in names]
    jobs = cfg.jobs or os.cpu_count() or 1
    print(f"{len(runs)} runs of agents.{cfg.algo} on {cfg.env_id}, {jobs} at a time", flush=True)
    with ThreadPoolExecutor(jobs) as pool:
        for run in pool.map(lambda r: launch(cfg, r), runs):
            status = "ok" if run.returncode == 0 else f"FAILED (exit {run.returncode})"
            status += " (reused)" if run.reused else ""
            size = f"bs {run.batch_size} " if run.batch_size is not None else ""
            print(f"  {size}{run.sampler:12s} seed {run.seed}: {status} in {run.wall_time:.0f} s", flush=True)
            if run.returncode != 0:
                print("    " + run.log_tail.replace("\n", "\n    "), flush=True)
    rows_by_batch = {}
    for b in batch_sizes:
        mine = [r for r in runs if r.batch_size == b]
        out = cfg.out / f"bs{b}" if b is not None else cfg.out
        title = f"{cfg.algo.upper()} on {cfg.env_id}" + (f", batch size {b}" if b is not None else "") + \
            f", {len(cfg.seeds)} seeds"
        rows_by_batch[b] = summarise(mine, names, cfg.env_id, cfg.bootstrap)
        print(write_tables(out, title, cfg.env_id, rows_by_batch[b], mine))
        print(f"plot: {plot_curves(out, title, mine, names, max(cfg.bootstrap // 5, 100))}\n"
              f"table: {out / 'results.md'}, {out / 'results.csv'}")
        diagnostics = plot_diagnostics(out, title, mine, names)
        if diagnostics is not None:
            table = diagnostics_table(out, title, mine)
            print(f"diagnostics: {diagnostics}, {table}")
    if not cfg.batch_sizes:
        return rows_by_batch[None]
    rows = sweep_rows(cfg, runs, rows_by_batch)
    print(write_sweep(cfg, rows))
    print(f"plot: {plot_sweep(cfg, rows)}\ntable: {cfg.out / 'sweep.md'}, {cfg.out / 'sweep.csv'}")
    return rows


if __name__ == "__main__":
    main(tyro.cli(Config))
