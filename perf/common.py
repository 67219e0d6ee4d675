"""What every benchmark in perf/ shares: one interleaved timer, CUDA-graph capture, one CSV writer.

* :func:`time_interleaved` times several callables in turn, sample by sample, so that drifts of the
  machine (other load, clock changes) hit every peer alike; medians and 20/80% quantiles after a
  warm-up. CPU: ``time.perf_counter``. CUDA: CUDA events, so a sample is the time from when the
  device reached the call to when it finished it; with calls queued back to back that is the time
  per call of a loop (host launch cost included where the host is the bottleneck), with
  ``flush_l2=True`` (one call per sample) it is one call on cold caches, as
  ``triton.testing.do_bench`` measures. ``do_bench`` itself times one function at a time, so it
  cannot interleave peers.
* :func:`repeat` and :func:`cuda_graph` turn a call into ``k`` calls per sample (eager, or captured
  in one ``torch.cuda.CUDAGraph`` and replayed); the timer divides by ``k``.
* :func:`write_csv` writes rows (pandas) with the device name, thread count, the versions of python,
  torch, triton, tensordict, torchrl, CUDA and the git commit on every row (:func:`environment`).
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Optional

import pandas as pd
import torch

from agents.devices import resolve_device  # noqa: F401  (the benchmarks import it from here)

ROOT = Path(__file__).resolve().parents[1]
# The figures README and docs quote are committed in perf/results; a benchmark writes there only when asked
# (UPDATE_RESULTS=1, `make bench UPDATE_RESULTS=1`), else to runs/perf, which git ignores.
COMMITTED = ROOT / "perf" / "results"
RESULTS = COMMITTED if os.environ.get("UPDATE_RESULTS") == "1" else ROOT / "runs" / "perf"
ENV_COLUMNS = ["device", "threads", "python", "torch", "triton", "tensordict", "torchrl", "cuda", "git_commit"]
L2_FLUSH_BYTES = 256 * 2**20  # larger than any L2 cache today (H100: 50 MB), as triton's do_bench

# The GPU targets (issue 10, for an H100; issue 24 for the floor, after the first H200 run); benchmarks print them
# beside what they measured (never asserted).
GRAPH_TARGET_US = 8.0  # the fused op in a CUDA graph, N <= 16k
SPEEDUP_TARGET = 3.0  # the fused op against the naive torch path, eager and graphed
FLOOR_TARGET = 5.0  # N = 4M, B = 65536: within 5x of one read of the priorities at memory bandwidth + the B searches
# The update targets (issue 24, restated by issue 29): each mode against the same mode, never a graphed LaBER
# update against an ungraphed peer (the first H200 summary divided graphed LaBER by compiled uniform).
UPDATE_TARGET_MODE = "cudagraph"  # the mode the two targets below are set for: compiled + CUDA graph
UPDATE_VS_UNIFORM_TARGET = 1.15  # graphed LaBER update / graphed uniform update
UPDATE_VS_PER_TARGET = 0.7  # graphed LaBER update / graphed update with TorchRL's PER


# ---------------------------------------------------------------------------------------------
# Devices


def device_name(device: torch.device) -> str:
    """``"NVIDIA H100 80GB HBM3"``, or ``"cpu:<model name>"`` from /proc/cpuinfo."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu:{model or platform.processor() or platform.machine()}"


def synchronize(device: torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# The timer


@dataclass(frozen=True)
class Timing:
    """Seconds per call: median and 20/80% quantiles over ``samples`` samples."""

    median: float
    q20: float
    q80: float
    samples: int

    @property
    def us(self) -> float:
        return self.median * 1e6


def repeat(fn: Callable[[], object], calls: int) -> Callable[[], None]:
    """``fn`` called ``calls`` times per sample (the timer divides by ``calls``)."""

    def repeated() -> None:
        for _ in range(calls):
            fn()

    repeated.calls = calls
    return repeated


def cuda_graph(fn: Callable[[], object], calls: int = 1, warmup: int = 3) -> Callable[[], None]:
    """Capture ``calls`` consecutive calls of ``fn`` in one CUDA graph; returns its replay.

    ``fn`` runs ``warmup`` times on a side stream first (lazy initialisation, Triton compiles and
    allocator warm-up must happen outside the capture). Replays re-run the captured kernels on the
    same memory: an op whose random state is a device tensor it advances draws fresh numbers on each
    replay. The timer divides a replay's time by ``calls``.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    torch.cuda.synchronize()

    def replay() -> None:
        graph.replay()

    replay.calls = calls
    replay.graph = graph  # keeps the graph (and its memory pool) alive with the callable
    return replay


def time_interleaved(
    fns: Mapping[str, Callable[[], object]],
    *,
    samples: int,
    warmup: int,
    device,
    samples_per_turn: int = 1,
    flush_l2: bool = False,
    progress: Optional[str] = None,
) -> dict[str, Timing]:
    """Time each callable of ``fns`` in turn; returns seconds per call of each, by name.

    Every callable first runs ``warmup`` times. Then, turn after turn, each callable in order takes
    ``samples_per_turn`` samples (one sample = one invocation, divided by the callable's ``calls``
    attribute: see :func:`repeat` and :func:`cuda_graph`), until each has ``samples`` samples.

    Args:
        fns: name -> callable with no arguments.
        samples: samples per callable (the median is over these).
        warmup: untimed invocations of each callable first.
        device: where the work runs; CUDA is timed with CUDA events, CPU with ``perf_counter``.
        samples_per_turn: consecutive samples of one callable before the next takes its turn
            (e.g. 10 for training updates, whose caches a switch of peer disturbs).
        flush_l2: CUDA only: overwrite a 256 MB buffer before each sample (outside the timed
            span) so that each sample starts on a cold L2 cache; use with one call per sample.
        progress: a label to print (flushed) before timing, for long sweeps.

    Examples:
        >>> t = time_interleaved({"a": lambda: None, "b": repeat(lambda: None, 10)}, samples=5, warmup=1, device="cpu")
        >>> sorted(t), t["a"].samples
        (['a', 'b'], 5)
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    if progress:
        print(progress, flush=True)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    flush_buffer = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device) if cuda and flush_l2 else None
    seconds: dict[str, list[float]] = {name: [] for name in fns}
    turns = -(-samples // samples_per_turn)
    for _ in range(turns):
        pending = []  # CUDA: (name, calls, start, end), read after the turn's synchronize
        for name, fn in fns.items():
            calls = getattr(fn, "calls", 1)
            for _ in range(samples_per_turn):
                if cuda:
                    if flush_buffer is not None:
                        flush_buffer.zero_()
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    fn()
                    end.record()
                    pending.append((name, calls, start, end))
                else:
                    t0 = time.perf_counter()
                    fn()
                    seconds[name].append((time.perf_counter() - t0) / calls)
        if cuda:
            torch.cuda.synchronize(device)
            for name, calls, start, end in pending:
                seconds[name].append(start.elapsed_time(end) * 1e-3 / calls)
    del flush_buffer
    return {name: _summarise(values[:samples]) for name, values in seconds.items()}


def _summarise(values: Sequence[float]) -> Timing:
    ordered = sorted(values)

    def quantile(q: float) -> float:
        return ordered[min(int(q * len(ordered)), len(ordered) - 1)]

    return Timing(statistics.median(ordered), quantile(0.2), quantile(0.8), len(ordered))


def calls_for(fn: Callable[[], object], device, target_seconds: float = 2e-4, most: int = 100) -> int:
    """How many calls of ``fn`` make one sample of about ``target_seconds`` (1 to ``most``).

    Timer and event resolution (about 1 us) and the launch of a CUDA graph (a few us) then stay a
    small part of each sample.
    """
    fn()
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(3):
        fn()
    synchronize(device)
    per_call = (time.perf_counter() - t0) / 3
    return int(max(1, min(most, round(target_seconds / max(per_call, 1e-9)))))


# ---------------------------------------------------------------------------------------------
# Environment and CSV


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return ""


def git_commit() -> str:
    """The checkout's commit (``-dirty`` when tracked files differ from it); ``$GIT_COMMIT`` wins.

    A copy of the project without ``.git`` (e.g. on the GPU machine) gives ``"unknown"`` unless
    ``GIT_COMMIT`` is set.
    """
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def environment(device) -> dict:
    """What every CSV row records about where and with what it was measured."""
    device = torch.device(device)
    return {
        "device": device_name(device),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton") or _version("pytorch-triton"),
        "tensordict": _version("tensordict"),
        "torchrl": _version("torchrl"),
        "cuda": (torch.version.cuda or "") if device.type == "cuda" else "",
        "git_commit": git_commit(),
    }


def describe(env: Mapping[str, object]) -> str:
    """One line naming the device and versions, for the top of a printed table."""
    return (
        f"{env['device']}, {env['threads']} CPU thread(s), python {env['python']}, torch {env['torch']}, "
        f"triton {env['triton'] or '-'}, tensordict {env['tensordict'] or '-'}, torchrl {env['torchrl'] or '-'}"
        + (f", CUDA {env['cuda']}" if env["cuda"] else "")
        + f", commit {env['git_commit']}"
    )


def write_csv(
    path: Path, rows: Iterable[Mapping[str, object]], columns: Sequence[str], env: Mapping[str, object]
) -> Path:
    """Write ``rows`` (missing columns left empty) with the ``env`` columns appended to every row.

    A row may carry its own value of an ``env`` column (e.g. ``device`` in a file with CPU and CUDA
    rows).

    Rewrites the whole file, so a script may call it after each group of cases: a run stopped by
    a time limit leaves what it measured.

    Examples:
        >>> import tempfile
        >>> env = dict.fromkeys(ENV_COLUMNS, "") | {"device": "cpu:x", "threads": 1}
        >>> path = write_csv(Path(tempfile.mkdtemp()) / "x.csv", [{"op": "a", "median_us": 1.5}, {"op": "b"}],
        ...                  ["op", "median_us"], env)
        >>> path.read_text().splitlines()[:2]
        ['op,median_us,device,threads,python,torch,triton,tensordict,torchrl,cuda,git_commit', 'a,1.5,cpu:x,1,,,,,,,']
        >>> read_csv(path)[1]["median_us"], read_csv(path)[1]["device"]
        ('', 'cpu:x')
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    # object columns: each value written as itself (an int stays "3" beside an empty cell, not "3.0").
    env = {k: env[k] for k in ENV_COLUMNS}
    frame = pd.DataFrame([{**env, **row} for row in rows], columns=[*columns, *ENV_COLUMNS], dtype=object)
    # "\r\n", the csv module's line ending, which the committed perf/results files have: a rerun diffs by value only.
    frame.to_csv(tmp, index=False, lineterminator="\r\n")
    os.replace(tmp, path)  # a reader never sees a half-written file
    return path


def read_csv(path: Path) -> list[dict]:
    """A CSV file's rows as ``{column: text}``, an empty cell as ``""`` (no NaN: the tables print cells as
    they are). Example: :func:`write_csv`."""
    return pd.read_csv(path, dtype=str, keep_default_na=False).to_dict("records")


def fmt(value: Optional[float], digits: int = 1) -> str:
    """A table cell: ``-`` for a missing value."""
    return "-" if value is None else f"{value:.{digits}f}"
