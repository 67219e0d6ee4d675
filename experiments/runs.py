"""The runs of a comparison: their command lines, launching them (or keeping a finished one, or resuming an
interrupted one), and reading what they wrote (``eval.csv``, ``config.txt``, ``diagnostics.csv``).

Each launched run's folder gets ``args.json``, the agent's arguments as launched; ``--reuse`` keeps a run
whose ``args.json`` equals the arguments it would be launched with (its folder aside) and whose
``eval.csv`` reaches its last step, and resumes one that stopped before with a checkpoint.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from experiments.config import Config


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
        raise ValueError(
            f"--samplers entry {entry!r}: expected SAMPLER or LABEL=SAMPLER ARGS..., the label without spaces or '/'"
        )
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
    cmd = [
        sys.executable,
        "-m",
        f"agents.{cfg.algo}",
        "--env-id",
        cfg.env_id,
        *entry,
        "--seed",
        str(run.seed),
        "--out",
        str(run.folder),
        "--no-progress",
        "--threads",
        "1",
    ]
    if cfg.total_steps is not None:
        cmd += ["--total-steps", str(cfg.total_steps)]
    if run.batch_size is not None:
        cmd += ["--batch-size", str(run.batch_size)]
    return cmd + shlex.split(cfg.extra)


def _comparable(args: list[str]) -> list[str]:
    """The arguments that make a run what it is: without ``--out`` (the folder is the run's, wherever it
    was written) and ``--resume`` (how it was started)."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--out":
            skip = True
        elif arg != "--resume":
            out.append(arg)
    return out


def recorded_arguments(folder: Path) -> Optional[list[str]]:
    """The agent arguments a run was launched with (its ``args.json``), None for a folder without one."""
    path = Path(folder) / "args.json"
    return json.loads(path.read_text()) if path.exists() else None


def same_arguments(args: list[str], folder: Path) -> bool:
    """Whether the run in ``folder`` was launched with ``args`` (``--out`` and ``--resume`` aside)."""
    recorded = recorded_arguments(folder)
    return recorded is not None and _comparable(recorded) == _comparable(args)


def finished_run(args: list[str], folder: Path) -> Optional[float]:
    """The wall time of the finished run in ``folder`` if it was launched with ``args``, else None.

    Finished: ``eval.csv``'s last row is at ``total_steps`` (the loop always evaluates at the last step).

    Examples:
        >>> import json, tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> _ = (folder / "args.json").write_text(json.dumps(["--seed", "1", "--out", "/elsewhere"]))
        >>> _ = (folder / "config.txt").write_text("seed=1\\ntotal_steps=600\\n")
        >>> _ = (folder / "eval.csv").write_text("step,eval_return,wall_time,steps_per_s\\n600,9.0,12.5,48.0\\n")
        >>> finished_run(["--seed", "1", "--out", str(folder)], folder)
        12.5
        >>> finished_run(["--seed", "2", "--out", str(folder)], folder) is None
        True
    """
    config, evals = read_config(folder), read_eval(folder)
    if not config or evals is None or "total_steps" not in config:
        return None
    if int(evals["step"][-1]) != int(config["total_steps"]) or not same_arguments(args, folder):
        return None
    return float(evals["wall_time"][-1])


def launch(cfg: Config, run: Run) -> Run:
    """Run one agent process into ``run.folder`` (keeping a finished run with ``cfg.reuse``, resuming an
    interrupted one from its checkpoint); fills in its return code and wall time (a finished run's: its
    ``eval.csv``'s last, launched or kept alike; a failed run's: the process's)."""
    cmd = command(cfg, run)
    args = cmd[3:]
    if cfg.reuse:
        wall_time = finished_run(args, run.folder)
        if wall_time is not None:
            run.wall_time, run.returncode, run.reused = wall_time, 0, True
            return run
        # An interrupted run with the same arguments resumes from its last checkpoint (--checkpoint-every).
        if (run.folder / "checkpoint" / "buffer").is_dir() and same_arguments(args, run.folder):
            cmd = [*cmd, "--resume"]
    run.folder.mkdir(parents=True, exist_ok=True)
    (run.folder / "args.json").write_text(json.dumps(args))
    start = time.time()
    with open(run.folder / "stdout.log", "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    run.wall_time = time.time() - start
    run.returncode = proc.returncode
    # One wall time for every finished run, launched or kept: its own eval.csv's, which a resumed run sums
    # over its segments (agents/loop.py); the process's time would count the last segment and the start-up.
    recorded = finished_run(args, run.folder) if proc.returncode == 0 else None
    if recorded is not None:
        run.wall_time = recorded
    if proc.returncode != 0:
        run.log_tail = "\n".join((run.folder / "stdout.log").read_text().splitlines()[-15:])
    return run


def read_csv_columns(path: Path) -> Optional[dict[str, np.ndarray]]:
    """A CSV file of numbers as ``{column: float64 values}``, an empty cell as NaN; None if the file is missing
    or has no rows.

    Examples:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "eval.csv"
        >>> _ = path.write_text("step,eval_return,wall_time,steps_per_s\\n200,9.5,1.5,\\n400,21.0,3.0,130.0\\n")
        >>> columns = read_csv_columns(path)
        >>> list(columns), columns["eval_return"].tolist(), columns["steps_per_s"].tolist()
        (['step', 'eval_return', 'wall_time', 'steps_per_s'], [9.5, 21.0], [nan, 130.0])
        >>> _ = path.write_text("step,eval_return,wall_time,steps_per_s\\n")
        >>> read_csv_columns(path) is None
        True
    """
    if not path.exists() or path.stat().st_size == 0:
        return None
    # round_trip: parse each number as Python's float() does (pandas' default parser may differ in the last
    # bit, and experiments.export writes these values back out with repr).
    frame = pd.read_csv(path, dtype=float, float_precision="round_trip")
    if frame.empty:
        return None
    return {key: frame[key].to_numpy() for key in frame.columns}


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


def read_diagnostics(runs: list[Run]) -> dict[str, list[dict[str, np.ndarray]]]:
    """``{sampler: [diagnostics.csv columns of each of its runs]}`` for the runs that finished and wrote one."""
    logs = {}
    for r in runs:
        log = read_csv_columns(r.folder / "diagnostics.csv") if r.returncode == 0 else None
        if log is not None:
            logs.setdefault(r.sampler, []).append(log)
    return logs
