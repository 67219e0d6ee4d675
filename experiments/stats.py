"""The statistics of a comparison: each run's score (:func:`run_score`: the final evaluation, or the mean over
a window of evaluations), rliable's aggregate metrics with stratified-bootstrap CIs (Agarwal et al., 2021,
"Deep Reinforcement Learning at the Edge of the Statistical Precipice"), the probability of improvement over
uniform, and score normalisation for the optimality gap. Holm-corrected pairwise comparisons:
:mod:`experiments.contrasts`."""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager
from typing import Optional

import numpy as np
from rliable import library as rly
from rliable import metrics

from experiments.config import DEFAULT_WINDOW, Metric
from experiments.runs import Run, read_eval

# Score normalisation for the optimality gap and the multi-task aggregates: x_hat = (x - low) / (high - low),
# low and high the returns an episode can give. An env not listed here gets no optimality gap and is left
# out of the normalised aggregates (the tables say so).
SCORE_RANGES = {
    "CartPole-v1": (0.0, 500.0),  # +1 per step; the episode ends at 500 steps
    "Acrobot-v1": (-500.0, 0.0),  # -1 per step until the goal, 500 steps at most; no policy reaches 0
    "Pendulum-v1": (-200 * math.pi**2, 0.0),  # hanging still at the bottom all 200 steps; upright from the start
    "MinAtar/Breakout-v1": (0.0, 30.0),  # +1 per brick; 30 = one full wall (3 rows x 10), then a new wall appears
}


def run_score(steps, returns, metric: Metric = "final", window: tuple[int, int] = DEFAULT_WINDOW) -> float:
    """One run's score from its evaluation curve (``steps[i]``, ``returns[i]``: the greedy evaluations).

    ==========  ======================================================================================
    ``final``   ``returns[-1]``, the evaluation at the run's last step
    ``window``  ``mean(returns[i] for low <= steps[i] <= high)``, ``(low, high) = window`` (both ends in)
    ==========  ======================================================================================

    A window's mean is steadier than one evaluation (on MinAtar Breakout a single evaluation moves by up to
    about 2 points between evaluations). ``ValueError`` for a run that ends before ``high`` (its window would
    be cut short, a different metric) or has no evaluation in the window.

    Examples:
        >>> steps, returns = [5000, 10000, 15000, 20000], [0.0, 1.0, 2.0, 4.0]
        >>> run_score(steps, returns)
        4.0
        >>> run_score(steps, returns, "window", (10000, 20000))
        2.3333333333333335
        >>> run_score(steps, returns, "window", (10000, 25000))
        Traceback (most recent call last):
        ...
        ValueError: the run ends at step 20000, before the window 10000-25000 does
    """
    steps, returns = np.asarray(steps, dtype=float), np.asarray(returns, dtype=float)
    if metric == "final":
        return float(returns[-1])
    if metric != "window":
        raise ValueError(f"metric: expected 'final' or 'window', got {metric!r}")
    low, high = window
    if low > high:
        raise ValueError(f"window: expected low <= high, got {low}-{high}")
    if steps[-1] < high:
        raise ValueError(f"the run ends at step {steps[-1]:.0f}, before the window {low}-{high} does")
    inside = (steps >= low) & (steps <= high)
    if not inside.any():
        raise ValueError(f"the run has no evaluation in the window {low}-{high}")
    return float(returns[inside].mean())


def metric_label(metric: Metric = "final", window: tuple[int, int] = DEFAULT_WINDOW) -> str:
    """What a table's scores are, in words.

    Examples:
        >>> metric_label()
        'final greedy evaluation return'
        >>> metric_label("window", (25000, 40000))
        'mean greedy evaluation return over the evaluations at steps 25000-40000'
    """
    if metric == "final":
        return "final greedy evaluation return"
    return f"mean greedy evaluation return over the evaluations at steps {window[0]}-{window[1]}"


# The aggregate metrics of rliable, each on a (runs x tasks) score matrix.
METRICS: dict[str, Callable[[np.ndarray], float]] = {
    "mean": metrics.aggregate_mean,
    "iqm": metrics.aggregate_iqm,
    "optimality_gap": metrics.aggregate_optimality_gap,
}


@contextmanager
def global_numpy_seed(seed: int):
    """numpy's global generator seeded with ``seed`` inside the block, as it was after it.

    rliable's StratifiedBootstrap draws its indices with ``np.random.choice``, the global generator (its
    ``random_state`` argument does not reach them): every bootstrap here runs inside this block, so that a
    table is reproducible and the caller's own draws are left alone.

    Examples:
        >>> with global_numpy_seed(0):
        ...     a = np.random.rand()
        >>> with global_numpy_seed(0):
        ...     b = np.random.rand()
        >>> a == b
        True
    """
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def interval_estimates(
    scores: dict[str, np.ndarray], names: list[str], reps: int = 5000, seed: int = 0, level: float = 0.95
) -> dict[str, dict[str, tuple[float, float, float]]]:
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
        with global_numpy_seed(seed):  # per sampler: its CI does not depend on the others in the table
            points, cis = rly.get_interval_estimates(
                {key: np.asarray(value, dtype=float)},
                lambda x: np.array([f(x) for f in funcs]),
                reps=reps,
                confidence_interval_size=level,
            )
        estimates[key] = {
            name: (float(points[key][i]), float(cis[key][0, i]), float(cis[key][1, i])) for i, name in enumerate(names)
        }
    return estimates


def improvement_over(
    scores: dict[str, np.ndarray], baseline: str, reps: int = 5000, seed: int = 0, level: float = 0.95
) -> dict[str, tuple[float, float, float]]:
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
        with global_numpy_seed(seed):
            points, cis = rly.get_interval_estimates(
                {key: pair},
                lambda x, y: np.array([metrics.probability_of_improvement(x, y)]),
                reps=reps,
                confidence_interval_size=level,
            )
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


def summarise(
    runs: list[Run],
    samplers: list[str],
    env_id: str,
    reps: int,
    metric: Metric = "final",
    window: tuple[int, int] = DEFAULT_WINDOW,
) -> list[dict]:
    """One row per sampler: runs, failed, mean / IQM / optimality gap / P(> uniform) with CIs, time.

    Each run's score is :func:`run_score` (``metric``, ``window``); the runs in order of their seed, so that
    the bootstrap draws the same resamples whatever order the runs were listed or read in."""
    finals, rows = {}, []
    for sampler in samplers:
        mine = sorted((r for r in runs if r.sampler == sampler), key=lambda r: r.seed)
        evals = [(r, read_eval(r.folder)) for r in mine if r.returncode == 0]
        evals = [(r, e) for r, e in evals if e is not None]
        row = {"sampler": sampler, "runs": len(evals), "failed": len(mine) - len(evals)}
        if evals:
            # [runs, 1 task]
            finals[sampler] = np.array([[run_score(e["step"], e["eval_return"], metric, window)] for _, e in evals])
            sps = [e["steps_per_s"][-1] for _, e in evals]
            row.update(
                wall_time_s=np.mean([r.wall_time for r, _ in evals]),
                steps_per_s=float(np.nanmean(sps)) if not np.all(np.isnan(sps)) else float("nan"),
            )
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


def scores_of(
    runs: list[Run], samplers: list[str], metric: Metric = "final", window: tuple[int, int] = DEFAULT_WINDOW
) -> dict[str, np.ndarray]:
    """``{sampler: [runs, 1] scores}`` (:func:`run_score`) of the runs that finished, in order of their seed,
    the matrices :func:`summarise` bootstraps; a sampler with no finished run is left out."""
    scores = {}
    for sampler in samplers:
        mine = sorted((r for r in runs if r.sampler == sampler and r.returncode == 0), key=lambda r: r.seed)
        evals = [e for e in (read_eval(r.folder) for r in mine) if e is not None]
        if evals:
            scores[sampler] = np.array([[run_score(e["step"], e["eval_return"], metric, window)] for e in evals])
    return scores
