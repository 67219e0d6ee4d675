"""``python -m experiments.compare``: run samplers x seeds (x batch sizes) of one agent in parallel
processes, then tabulate and plot the results with rliable's aggregate metrics and stratified-bootstrap
CIs (Agarwal et al., 2021, "Deep Reinforcement Learning at the Edge of the Statistical Precipice").

    python -m experiments.compare --algo dqn --env-id CartPole-v1 --samplers laber-mean uniform per --seeds 0 1 2
    python -m experiments.compare --algo dqn --env-id CartPole-v1 --samplers uniform laber-mean --seeds 0 1 \\
        --batch-sizes 8 16 32 64 128                        # the small-batch study
    python -m experiments.compare --aggregate runs/compare/dqn-cartpole runs/compare/dqn-acrobot --out runs/compare/all

**One task** writes ``<out>/<sampler>/seed<k>/`` per run and ``<out>/results.md``, ``results.csv`` and
``curves.png``. Per sampler, over the final greedy evaluation return of its runs: mean and IQM of the
return, the optimality gap of the normalised return (:data:`experiments.stats.SCORE_RANGES`) and the probability of
improvement over ``uniform`` (when it is among the samplers), each with a 95% stratified-bootstrap CI;
wall time and steps/s. A run that fails is reported (exit code and its last lines), the others kept.
Runs with ``--diagnostics-every`` (in ``--extra``) also give ``diagnostics.png``: the total variation
of each surrogate's sampling to exact sampling over training (the paper's App. H) beside the gradient
norm and variance, srank and dormant fraction.

**The score** of each run is its final evaluation by default; ``--metric window --window 25000 40000`` makes
it the mean of its evaluations at steps 25000-40000 (:func:`experiments.stats.run_score`). ``--focus
laber-mean`` adds P(laber-mean > each other sampler) with Holm-corrected intervals and the separation rule
(:mod:`experiments.contrasts`).

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

**Adding to a comparison** (``--reuse``): a run whose folder already holds a finished run launched with
the same arguments (its ``args.json``) is kept and not launched again, so more seeds or samplers can be
added to an existing ``<out>`` and an interrupted comparison finished; the tables count kept and new
runs alike. An interrupted run with the same arguments and a checkpoint
(``--extra="--checkpoint-every K"``) goes on from it (``--resume``). A finished run's checkpoint keeps
no replay buffer (``--keep-buffer`` in ``--extra`` keeps it).

**Several tasks** (``--aggregate DIR ...``) runs nothing: it reads existing one-task ``<out>`` folders
and writes ``<out>/aggregate.md``, ``aggregate.csv``, ``profiles.png`` (rliable's performance profiles)
and ``aggregate.png`` (mean, IQM and optimality gap with CIs) over the normalised returns.
"""

from __future__ import annotations

import os
import shlex
from concurrent.futures import ThreadPoolExecutor

import tyro

from experiments.aggregate import aggregate
from experiments.config import Config
from experiments.contrasts import contrast_table, holm_improvement, separation
from experiments.reports import diagnostics_table, plot_curves, plot_diagnostics, write_tables
from experiments.runs import Run, labels, launch
from experiments.stats import metric_label, scores_of, summarise
from experiments.sweep import plot_sweep, sweep_rows, write_sweep


def contrasts(cfg: Config, runs: list[Run], names: list[str]) -> list[str]:
    """The markdown lines of ``--focus``'s Holm-corrected comparisons ([] without ``--focus``)."""
    if cfg.focus is None:
        return []
    scores = scores_of(runs, names, cfg.metric, cfg.window)
    others = [n for n in names if n != cfg.focus and n in scores]
    if cfg.focus not in scores or not others:
        return ["", f"--focus {cfg.focus}: no comparison, the runs lack it or every other sampler."]
    rows = holm_improvement(scores, cfg.focus, others, cfg.bootstrap)
    lines = ["", f"{cfg.focus} against each other sampler, Holm-corrected over the {len(others)} comparisons:", ""]
    lines += contrast_table(rows, cfg.focus)
    if "uniform" in others:
        lines += [
            "",
            f"Separation rule (corrected interval of P(> uniform) above 0.5): {cfg.focus} " + separation(rows) + ".",
        ]
    return lines


def main(cfg: Config) -> list[dict]:
    if cfg.focus is not None and cfg.focus not in labels(cfg) and not cfg.aggregate:
        raise ValueError(f"--focus {cfg.focus}: not one of the --samplers labels {labels(cfg)}")
    if cfg.aggregate:
        return aggregate(cfg)
    if cfg.batch_sizes and "--batch-size" in shlex.split(cfg.extra):
        raise ValueError("--batch-sizes sets each run's --batch-size: leave it out of --extra")
    batch_sizes, names = cfg.batch_sizes or [None], labels(cfg)
    runs = [
        Run(s, k, (cfg.out / f"bs{b}" if b is not None else cfg.out) / s / f"seed{k}", batch_size=b)
        for b in batch_sizes
        for k in cfg.seeds
        for s in names
    ]
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
        title = (
            f"{cfg.algo.upper()} on {cfg.env_id}"
            + (f", batch size {b}" if b is not None else "")
            + f", {len(cfg.seeds)} seeds"
        )
        rows_by_batch[b] = summarise(mine, names, cfg.env_id, cfg.bootstrap, cfg.metric, cfg.window)
        label = metric_label(cfg.metric, cfg.window)
        print(write_tables(out, title, cfg.env_id, rows_by_batch[b], mine, label, contrasts(cfg, mine, names)))
        print(
            f"plot: {plot_curves(out, title, mine, names, max(cfg.bootstrap // 5, 100))}\n"
            f"table: {out / 'results.md'}, {out / 'results.csv'}"
        )
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
