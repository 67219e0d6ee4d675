"""What a comparison is: :class:`Config`, ``python -m experiments.compare``'s command line, and the score it
ranks the runs by (:data:`Metric`, :data:`DEFAULT_WINDOW`).

The lowest module of the package: every other one reads the config from here, and :mod:`experiments.compare`
(the command line) imports them all.

Examples:
    >>> cfg = Config(samplers=["uniform", "per"], seeds=[0])
    >>> cfg.algo, cfg.metric, cfg.window
    ('dqn', 'final', (25000, 40000))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

Metric = Literal["final", "window"]

# Issue 30's primary metric: the evaluations at 25k-40k steps of a 40k-step MinAtar run (every 5k: four of them).
DEFAULT_WINDOW = (25_000, 40_000)


@dataclass
class Config:
    """Samplers x seeds (x batch sizes) of one agent on one env, or several finished tasks to aggregate."""

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
    metric: Metric = "final"
    """each run's score: "final" (its last evaluation) or "window" (the mean of its evaluations at steps
    within --window, both ends included; issue 30's primary metric)"""
    window: tuple[int, int] = DEFAULT_WINDOW
    """the steps (low high) whose evaluations --metric window averages"""
    focus: Optional[str] = None
    """a sampler to compare with every other one: P(focus > other) with Holm-corrected intervals over the
    comparisons, and whether it separates from uniform (experiments.contrasts)"""
    reuse: bool = False
    """keep each run whose folder already holds a finished run with the same arguments (see
    :func:`experiments.runs.finished_run`), resume interrupted ones, and launch only the others: to add
    seeds or samplers to a comparison, or to finish an interrupted one"""
