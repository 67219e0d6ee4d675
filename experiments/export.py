"""``python -m experiments.export RUNS_DIR OUT_CSV``: one compact CSV of a study's evaluation curves, to commit
beside its results page, and the reader that recomputes the page's statistics from that file alone.

    python -m experiments.export runs/replication/breakout-b8 docs/results/replication/breakout-b8.csv \
        --keep docs/results/replication/runs/breakout-b8     # and what --reuse needs of each finished run

The CSV has one row per evaluation of every run: ``sampler, seed, step, return`` (``batch_size`` first when
the study is a batch-size sweep, ``<RUNS_DIR>/bs<k>/<sampler>/seed<j>/``), sorted by batch size, sampler,
seed and step; ``return`` is the run's greedy evaluation return (its ``eval.csv``'s ``eval_return``). Only
finished runs go in (``eval.csv`` reaches ``total_steps`` of its ``config.txt``) unless
``--include-unfinished``; the runs left out are listed in the sidecar ``OUT_CSV`` with ``.json`` for
``.csv``, which also keeps each sampler's agent arguments (``args.json``, seed and folder aside, as one shell
string), the env and when the export was made.
"""

from __future__ import annotations

import datetime
import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import tyro

from experiments.config import DEFAULT_WINDOW, Metric
from experiments.runs import read_config, read_eval, recorded_arguments
from experiments.stats import run_score


@dataclass
class Curve:
    """One run's evaluation curve, as the compact CSV holds it."""

    sampler: str
    seed: int
    steps: np.ndarray
    returns: np.ndarray
    batch_size: Optional[int] = None


def run_folders(runs_dir: Path) -> list[tuple[str, int, Optional[int], Path]]:
    """``(sampler, seed, batch_size, folder)`` of every run folder with an ``eval.csv`` under ``runs_dir``:
    ``<sampler>/seed<k>/`` (batch size None) and ``bs<b>/<sampler>/seed<k>/``, sorted."""
    found = []
    for path in Path(runs_dir).glob("**/seed*/eval.csv"):
        folder = path.parent
        parts = folder.relative_to(runs_dir).parts
        if len(parts) == 2:
            found.append((parts[0], int(parts[1][len("seed") :]), None, folder))
        elif len(parts) == 3 and parts[0].startswith("bs"):
            found.append((parts[1], int(parts[2][len("seed") :]), int(parts[0][len("bs") :]), folder))
    return sorted(found, key=lambda r: (r[2] or 0, r[0], r[1]))


def unfinished(folder: Path) -> Optional[str]:
    """Why the run in ``folder`` has not finished, None if it has (its last evaluation at ``total_steps``)."""
    evals, total = read_eval(folder), read_config(folder).get("total_steps")
    if evals is None:
        return "no evaluation"
    if total is None:
        return "no total_steps in config.txt"
    if int(evals["step"][-1]) != int(total):
        return f"last evaluation at step {int(evals['step'][-1])} of {total}"
    return None


def _agent_arguments(folder: Path) -> Optional[list[str]]:
    """The run's ``args.json`` without ``--seed`` and ``--out`` and their values: what every seed shares."""
    args, out, skip = recorded_arguments(folder), [], False
    if args is None:
        return None
    for arg in args:
        if skip:
            skip = False
        elif arg in ("--seed", "--out"):
            skip = True
        else:
            out.append(arg)
    return out


def export(runs_dir: Path, out_csv: Path, include_unfinished: bool = False) -> dict:
    """Write the compact CSV of the runs under ``runs_dir`` and its ``.json`` sidecar; returns the sidecar.

    Examples:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> for sampler, seed, values in [("uniform", 3, "0.5,1.0"), ("laber-mean", 3, "1.0,2.0")]:
        ...     run = root / "runs" / sampler / f"seed{seed}"
        ...     run.mkdir(parents=True)
        ...     a, b = values.split(",")
        ...     _ = (run / "eval.csv").write_text(f"step,eval_return,wall_time,steps_per_s\\n5,{a},1,1\\n10,{b},2,1\\n")
        ...     _ = (run / "config.txt").write_text("env_id=CartPole-v1\\ntotal_steps=10\\n")
        >>> export(root / "runs", root / "study.csv")["runs"]
        2
        >>> print((root / "study.csv").read_text().strip())
        sampler,seed,step,return
        laber-mean,3,5,1.0
        laber-mean,3,10,2.0
        uniform,3,5,0.5
        uniform,3,10,1.0
    """
    runs_dir, out_csv = Path(runs_dir), Path(out_csv)
    found = run_folders(runs_dir)
    sweep = any(b is not None for _, _, b, _ in found)
    columns = ["batch_size"] * sweep + ["sampler", "seed", "step", "return"]
    curves, left_out, arguments, env_ids = [], [], {}, set()
    for sampler, seed, batch_size, folder in found:
        why = unfinished(folder)
        name = str(folder.relative_to(runs_dir))
        if why is not None and (not include_unfinished or why == "no evaluation"):
            left_out.append(f"{name}: {why}")
            continue
        evals = read_eval(folder)
        curve = {
            "sampler": sampler,
            "seed": seed,
            "step": evals["step"].astype(np.int64),
            "return": evals["eval_return"],
        }
        curves.append(pd.DataFrame({"batch_size": batch_size, **curve} if sweep else curve, columns=columns))
        env_ids.add(read_config(folder).get("env_id", "?"))
        args = _agent_arguments(folder)
        if args is not None:
            args = shlex.join(args)
            key = sampler if batch_size is None else f"bs{batch_size}/{sampler}"
            arguments.setdefault(key, [])
            if args not in arguments[key]:
                arguments[key].append(args)  # more than one list: the seeds of a sampler differ in more
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    # Returns as float64, which pandas writes as repr(float) does: the shortest text that reads back exactly.
    table = pd.concat(curves, ignore_index=True) if curves else pd.DataFrame(columns=columns)
    table.to_csv(out_csv, index=False, lineterminator="\n")
    kept = len(curves)
    meta = {
        "source": str(runs_dir),
        "exported": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "env_ids": sorted(env_ids),
        "runs": kept,
        "include_unfinished": include_unfinished,
        "left_out": left_out,
        "arguments": arguments,
    }
    out_csv.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def read_curves(path: Path) -> list[Curve]:
    """The runs' curves from a compact CSV (:func:`export`), in the file's order.

    Examples:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "study.csv"
        >>> _ = path.write_text("sampler,seed,step,return\\nper,1,5,0.5\\nper,1,10,1.5\\nper,2,10,3.0\\n")
        >>> [(c.sampler, c.seed, c.steps.tolist(), c.returns.tolist()) for c in read_curves(path)]
        [('per', 1, [5, 10], [0.5, 1.5]), ('per', 2, [10], [3.0])]
    """
    # Samplers as text ("nan" is a label, not a missing value); an empty batch_size is a study without a sweep.
    table = pd.read_csv(
        path,
        dtype={"sampler": str},
        keep_default_na=False,
        na_values={"batch_size": [""]},
        float_precision="round_trip",
    )
    if "batch_size" not in table:
        table["batch_size"] = np.nan
    out = []
    for (sampler, seed, batch_size), rows in table.groupby(["sampler", "seed", "batch_size"], sort=False, dropna=False):
        rows = rows.sort_values("step", kind="stable")
        size = None if pd.isna(batch_size) else int(batch_size)
        out.append(Curve(sampler, int(seed), rows["step"].to_numpy(), rows["return"].to_numpy(dtype=float), size))
    return out


def scores_from_curves(
    curves: list[Curve],
    metric: Metric = "final",
    window: tuple[int, int] = DEFAULT_WINDOW,
    batch_size: Optional[int] = None,
    seeds: Optional[list[int]] = None,
) -> dict[str, dict[int, float]]:
    """``{sampler: {seed: score}}`` (:func:`experiments.stats.run_score`) of the curves at ``batch_size``
    (None: a study without a sweep), those of ``seeds`` only if given; samplers in order of appearance.

    Examples:
        >>> curves = [Curve("per", 1, np.array([5, 10]), np.array([1.0, 3.0]))]
        >>> scores_from_curves(curves), scores_from_curves(curves, "window", (5, 10))
        ({'per': {1: 3.0}}, {'per': {1: 2.0}})
    """
    scores: dict[str, dict[int, float]] = {}
    for c in curves:
        if c.batch_size == batch_size and (seeds is None or c.seed in seeds):
            scores.setdefault(c.sampler, {})[c.seed] = run_score(c.steps, c.returns, metric, window)
    return scores


def score_matrices(scores: dict[str, dict[int, float]]) -> dict[str, np.ndarray]:
    """``{sampler: [runs, 1]}`` in order of the seed: the matrices :func:`experiments.stats.summarise`
    bootstraps from run folders, so the two give the same resamples and intervals.

    Examples:
        >>> score_matrices({"per": {4: 1.0, 3: 2.0}})["per"].tolist()
        [[2.0], [1.0]]
    """
    return {s: np.array([[by_seed[k]] for k in sorted(by_seed)]) for s, by_seed in scores.items()}


# What a page quotes beyond the returns comes along where a run wrote it: the LFIW ratio (lfiw.csv) and the
# App. C / H diagnostics (diagnostics.csv), a few kB each.
KEPT_FILES = ("args.json", "config.txt", "eval.csv", "lfiw.csv", "diagnostics.csv")


def keep_runs(runs_dir: Path, kept_dir: Path) -> list[Path]:
    """Copy what ``--reuse`` needs of every finished run under ``runs_dir`` (``args.json``, ``config.txt``,
    ``eval.csv``: a few kB a run; and ``lfiw.csv`` and ``diagnostics.csv`` where the run wrote them, which pages
    quote) to the same place under ``kept_dir``, to commit: a study that a session leaves unfinished resumes on
    a fresh machine after :func:`restore_runs`. Returns the folders kept.

    Examples:
        >>> import tempfile
        >>> runs, kept = Path(tempfile.mkdtemp()), Path(tempfile.mkdtemp())
        >>> run = runs / "uniform" / "seed3"
        >>> run.mkdir(parents=True)
        >>> _ = (run / "config.txt").write_text("total_steps=600\\n")
        >>> _ = (run / "eval.csv").write_text("step,eval_return,wall_time,steps_per_s\\n600,9.0,12.5,48.0\\n")
        >>> _ = (run / "args.json").write_text("[]")
        >>> [str(p.relative_to(kept)) for p in keep_runs(runs, kept)]
        ['uniform/seed3']
        >>> _ = restore_runs(kept, runs / "copy")
        >>> sorted(p.name for p in (runs / "copy" / "uniform" / "seed3").iterdir())
        ['args.json', 'config.txt', 'eval.csv']
    """
    done = []
    for _, _, _, folder in run_folders(runs_dir):
        if unfinished(folder) is None:
            target = Path(kept_dir) / folder.relative_to(runs_dir)
            target.mkdir(parents=True, exist_ok=True)
            for name in KEPT_FILES:
                if (folder / name).exists():
                    (target / name).write_bytes((folder / name).read_bytes())
            done.append(target)
    return done


def restore_runs(kept_dir: Path, runs_dir: Path) -> list[Path]:
    """The inverse of :func:`keep_runs`: the kept runs' files back into ``runs_dir``, where ``python -m
    experiments.compare ... --reuse`` keeps them and launches only the runs still missing."""
    restored = []
    for path in sorted(Path(kept_dir).glob("**/seed*/eval.csv")):
        target = Path(runs_dir) / path.parent.relative_to(kept_dir)
        target.mkdir(parents=True, exist_ok=True)
        for name in KEPT_FILES:
            if (path.parent / name).exists():
                (target / name).write_bytes((path.parent / name).read_bytes())
        restored.append(target)
    return restored


@dataclass
class Args:
    runs_dir: tyro.conf.Positional[Path]
    """a study's runs: <runs_dir>/<sampler>/seed<k>/ or <runs_dir>/bs<b>/<sampler>/seed<k>/"""
    out_csv: tyro.conf.Positional[Path]
    """the compact CSV to write (its .json sidecar beside it)"""
    include_unfinished: bool = False
    """export runs that have not reached their last step too (a preview of a study under way)"""
    keep: Optional[Path] = None
    """also copy the finished runs' args.json, config.txt and eval.csv there (to commit: --reuse resumes from them)"""


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.keep is not None:
        print(f"{args.keep}: {len(keep_runs(args.runs_dir, args.keep))} finished runs kept")
    meta = export(args.runs_dir, args.out_csv, args.include_unfinished)
    print(f"{args.out_csv}: {meta['runs']} runs; left out: {len(meta['left_out'])}")
    for line in meta["left_out"]:
        print(f"  {line}")
