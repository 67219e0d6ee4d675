"""``make gpu-check``: the kernel import, the GPU tests, the kernel benchmark and the update benchmark on
CUDA, then a summary.

    make gpu-check PYTHON=python3               # on the GPU machine (../shared/gpu/suite.sh runs this)
    python -m perf.gpu_check                    # the same
    python -m perf.gpu_check --cpu-smoke --results-dir /tmp/gpu-check   # without a GPU: every step at CPU
                                                                        # smoke sizes, to check the plumbing

Results go to ``--results-dir``, else ``$OUT`` (what the GPU machine brings back), else
``$GPU_RESULTS_DIR``, else ``perf/results``: each step's log as it runs, its CSV as the benchmark writes
it (after each case), and the summary after every step, so a run stopped at the machine's limit still
returns every finished step's files.

Steps, each in its own process under a time limit, correctness first, the whole check within
``--budget`` seconds (7.5 minutes: a GPU machine gives 10 minutes a command, start-up included; sized
from the first H200 run: tests 138 s, kernel benchmark 52 s, the update benchmark's compiles the rest):

1. ``import``: the kernel module imports, the op is registered, and one small call compiles and runs
   on the device. If this fails nothing else can, so the check stops here, loudly;
2. ``pytest -m gpu`` (the tests marked ``gpu``; test modules whose optional dependencies are missing
   skip themselves, so a bare image with the library's own dependencies runs the rest);
3. ``perf/bench_kernel.py --device cuda`` -> ``perf/results/kernel_cuda.csv``;
4. ``perf/bench_update.py --device cuda`` -> ``perf/results/update_cuda.csv`` (needs the agents' extra:
   without it the step is reported as not run): DQN first (eager, compiled, CUDA graph: uniform, PER,
   LaBERSampler, functional LaBER), then SAC, with its compiles capped (``--compile-budget``).

A step that fails or runs out of time does not stop the next (but ``import``). Then
``perf/results/gpu_summary_cuda.md``: the device and versions, each step's status and time (or why it
did not run), and the headline figures of the CSVs this run wrote, beside the targets of issues 10, 24
and 29 (each update mode against the same mode). Exits 1 when a step failed or timed out.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from perf.common import (
    COMMITTED,
    FLOOR_TARGET,
    GRAPH_TARGET_US,
    ROOT,
    SPEEDUP_TARGET,
    UPDATE_TARGET_MODE,
    UPDATE_VS_PER_TARGET,
    UPDATE_VS_UNIFORM_TARGET,
    describe,
    environment,
    read_csv,
)

TIMEOUTS = {"import": 45, "tests": 150, "kernel": 90, "update": 180}  # seconds, each step at most
BUDGET = 450  # seconds for the whole check: a step's limit is cut to what is left
COMPILE_BUDGET = 110  # seconds of the update step spent compiling and capturing; the rest is not compiled
AGENT_DEPS = ("tyro", "gymnasium", "tqdm")  # what perf/bench_update.py imports through the agents

# The import step: a failure here means no other step can say anything.
IMPORT_CHECK = """
import torch, triton, torchrl, tensordict
import torchsample.kernels.laber
from torchsample import laber_downsample
assert hasattr(torch.ops.torchsample, "laber_fused"), "torch.ops.torchsample.laber_fused is not registered"
device = "{device}"
p = torch.rand(1, 100, device=device)
out = laber_downsample(p, 1, rng_state=torchsample.kernels.laber.new_rng_state(device)) if device == "cuda" \
    else laber_downsample(p, 1)
assert 0 <= int(out.index[0]) < 100
print("import ok: torch", torch.__version__, "triton", triton.__version__, "torchrl", torchrl.__version__,
      "tensordict", tensordict.__version__, "device", torch.cuda.get_device_name() if device == "cuda" else "cpu")
"""


@dataclass
class Step:
    name: str
    command: list[str]
    timeout: float
    needs: tuple[str, ...] = ()  # modules the step imports beyond the library's own dependencies
    rc: int | None = None
    timed_out: bool = False
    seconds: float = 0.0
    skipped: str = ""  # why the step did not run
    tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=25))
    log: Path | None = None  # the step's output, written as it comes
    started: bool = False

    @property
    def status(self) -> str:
        if not self.started and not self.skipped:
            return "not run: the check stopped before it"
        if self.skipped:
            return f"not run: {self.skipped}"
        if self.timed_out:
            return f"TIMED OUT after {self.timeout:.0f} s"
        return "passed" if self.rc == 0 else f"FAILED (exit {self.rc})"

    @property
    def failed(self) -> bool:
        return self.started and not self.skipped and self.rc != 0

    def run(self) -> None:
        """Run with output streamed (and its tail kept); on timeout kill the whole process group."""
        missing = [name for name in self.needs if importlib.util.find_spec(name) is None]
        if missing:
            self.skipped = f"needs {', '.join(missing)} (the [agents] extra)"
            print(f"\n=== {self.name}: {self.status}", flush=True)
            return
        self.started = True
        print(f"\n=== {self.name}: {' '.join(self.command)} (limit {self.timeout:.0f} s)", flush=True)
        start = time.perf_counter()
        try:
            proc = subprocess.Popen(
                self.command,
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        except OSError as err:
            self.rc, self.tail = 127, collections.deque([f"could not start: {err}"])
            return

        log = self.log.open("w") if self.log is not None else None

        def pump() -> None:
            for line in proc.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                if log is not None:  # line by line: a check killed at the machine's limit keeps it
                    log.write(line)
                    log.flush()
                self.tail.append(line.rstrip("\n"))

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            self.rc = proc.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self.timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            self.rc = proc.wait()
        reader.join(timeout=10)
        if log is not None:
            log.close()
        self.seconds = time.perf_counter() - start
        print(f"=== {self.name}: {self.status} in {self.seconds:.0f} s", flush=True)


def steps_for(args) -> list[Step]:
    py = sys.executable
    device = "cpu" if args.cpu_smoke else "cuda"
    check = Step("import", [py, "-c", IMPORT_CHECK.format(device=device)], args.timeout["import"])
    # No doctest collection (addopts): importing every module needs extras a bare GPU image lacks (rliable).
    tests = Step(
        "tests",
        [
            py,
            "-m",
            "pytest",
            "-m",
            "gpu",
            "-q",
            "-p",
            "no:cacheprovider",
            "-rfEs",
            "-o",
            "addopts=",
            "--continue-on-collection-errors",
            "tests",
        ],
        args.timeout["tests"],
    )
    out = args.results_dir
    if args.cpu_smoke:
        return [
            check,
            tests,
            Step(
                "kernel",
                [py, "-m", "perf.bench_kernel", "--device", "cpu", "--out", str(out / "kernel_cpu.csv")],
                args.timeout["kernel"],
            ),
            Step(
                "update",
                [
                    py,
                    "-m",
                    "perf.bench_update",
                    "--device",
                    "cpu",
                    "--models",
                    "dqn-cartpole",
                    "--modes",
                    "eager",
                    "compiled",
                    "cudagraph",
                    "--iterations",
                    "20",
                    "--compile-budget",
                    str(args.compile_budget),
                    "--out",
                    str(out / "update_cpu.csv"),
                ],
                args.timeout["update"],
                needs=AGENT_DEPS,
            ),
        ]
    return [
        check,
        tests,
        Step(
            "kernel",
            [py, "-m", "perf.bench_kernel", "--device", "cuda", "--out", str(out / "kernel_cuda.csv")],
            args.timeout["kernel"],
        ),
        Step(
            "update",
            [
                py,
                "-m",
                "perf.bench_update",
                "--device",
                "cuda",
                "--compile-budget",
                str(args.compile_budget),
                "--out",
                str(out / "update_cuda.csv"),
            ],
            args.timeout["update"],
            needs=AGENT_DEPS,
        ),
    ]


def run_steps(steps: list[Step], budget: float = float("inf"), after_each=None) -> None:
    """Each step in turn, within ``budget`` seconds in all (a step's limit is cut to what is left);
    after a failed ``import`` the others are reported as not run. ``after_each()`` runs after every
    step (the summary is rewritten there, so that a check stopped later keeps it)."""
    deadline = time.perf_counter() + budget
    for step in steps:
        broken = next((s for s in steps if s.name == "import" and s.failed), None)
        if broken is not None and step is not broken:
            step.skipped = "the import step failed"
        elif deadline - time.perf_counter() < 5:
            step.skipped = "no time left in the check's budget"
            print(f"\n=== {step.name}: {step.status}", flush=True)
        else:
            step.timeout = min(step.timeout, deadline - time.perf_counter())
            step.run()
        if after_each is not None:
            after_each()


# ---------------------------------------------------------------------------------------------
# The summary


def number(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def cell(value, digits: int = 1, suffix: str = "") -> str:
    x = number(value)
    return "-" if x is None else f"{x:.{digits}f}{suffix}"


def fresh_csv(path: Path, since: float) -> list[dict] | None:
    """The rows of ``path`` when this run wrote it (else None: a stale file says nothing about this run)."""
    if not path.exists() or path.stat().st_mtime < since:
        return None
    return read_csv(path)


def launch_cell(row: dict) -> str:
    """The launch ``launch_plan`` chose for a ``laber`` row (``perf/bench_kernel.py``'s plan columns):
    ``programs x warps``, items a tile and a chunk, dependent loads of a draw's search, a second launch's
    programs; ``-`` for a CSV without them."""
    if number(row.get("programs")) is None:
        return "-"
    text = (
        f"{row['programs']} x {row['warps']}w, tile {row['tile_items']}, chunk {row['chunk']}, "
        f"{row['search_loads']} loads"
    )
    return text + (f" + {row['draw_programs']} draw" if number(row.get("draw_programs")) else "")


def kernel_section(rows: list[dict] | None) -> list[str]:
    if rows is None:
        return ["No kernel CSV from this run.", ""]
    timed = {}
    for r in rows:
        if r["mode"] in ("eager", "graph") and not r["sweep"].startswith(("floor", "exactness")):
            timed[(r["score"], r["C"], r["N"], r["B"], r["K"]), r["variant"], r["mode"]] = r
    lines = [
        "| score | C | N | B | K | eager laber (us) | naive / laber | graph laber (us) | naive / laber | "
        "multinomial graph (us) | laber graph GB/s | launch (programs x warps, items) | "
        "large-N shape graph (us) |",
        "| --- " * 13 + "|",
    ]
    small_graph, speedups, shape_ratios = [], {"eager": [], "graph": []}, []
    for key in dict.fromkeys(k for k, _, _ in timed):
        eager, graph = timed.get((key, "laber", "eager"), {}), timed.get((key, "laber", "graph"), {})
        ratios = {mode: number(r.get("time_vs_naive")) for mode, r in (("eager", eager), ("graph", graph))}
        for mode, ratio in ratios.items():
            if ratio:
                speedups[mode].append(1 / ratio)
        if number(graph.get("median_us")) is not None and int(key[2]) <= 16384:
            small_graph.append(number(graph["median_us"]))
        speedup = {m: (1 / r if r else None) for m, r in ratios.items()}
        large = number(timed.get((key, "laber-large-shape", "graph"), {}).get("median_us"))
        if large and number(graph.get("median_us")):
            shape_ratios.append(number(graph["median_us"]) / large)
        lines.append(
            f"| {' | '.join(key)} | {cell(eager.get('median_us'))} | {cell(speedup['eager'], 2, 'x')} | "
            f"{cell(graph.get('median_us'))} | {cell(speedup['graph'], 2, 'x')} | "
            f"{cell(timed.get((key, 'multinomial', 'graph'), {}).get('median_us'))} | "
            f"{cell(graph.get('input_GBps'))} | {launch_cell(graph or eager)} | "
            f"{cell(timed.get((key, 'laber-large-shape', 'graph'), {}).get('median_us'))} |"
        )
    failed = [r for r in rows if r["variant"] == "laber" and r["note"].startswith("failed")]
    lines += ["", "Targets (issues 10 and 24):", ""]
    if small_graph:
        worst = max(small_graph)
        lines.append(
            f"- fused op in a CUDA graph, N <= 16k: at most {worst:.1f} us (target <= {GRAPH_TARGET_US:g} us: "
            f"{'met' if worst <= GRAPH_TARGET_US else 'not met'})"
        )
    if shape_ratios:
        lines.append(
            f"- small-N launch shape / large-N shape, graph (issue 29 item 4; < 1: the small-N shape is faster): "
            f"{min(shape_ratios):.2f}x to {max(shape_ratios):.2f}x over {len(shape_ratios)} rows"
        )
    for mode, values in speedups.items():
        if values:
            lines.append(
                f"- naive / fused, {mode}: {min(values):.2f}x to {max(values):.2f}x "
                f"(target >= {SPEEDUP_TARGET:g}x: "
                f"{'met' if min(values) >= SPEEDUP_TARGET else 'not met'} everywhere)"
            )
    floor = {r["variant"]: r for r in rows if r["sweep"] == "floor"}
    if "laber" in floor and number(floor["laber"].get("value")) is not None:
        ratio = number(floor["laber"]["value"])
        lines.append(
            f"- N = {floor['laber']['N']}, B = {floor['laber']['B']}, cold L2: laber_downsample "
            f"{cell(floor['laber']['median_us'])} us; floor {cell(floor.get('floor', {}).get('median_us'))} us "
            f"(copy bandwidth {cell(floor.get('copy', {}).get('input_GBps'), 0)} GB/s, searches "
            f"{cell(floor.get('search', {}).get('median_us'))} us): {ratio:.2f}x the floor "
            f"(target <= {FLOOR_TARGET:g}x: {'met' if ratio <= FLOOR_TARGET else 'not met'})"
        )
    else:
        lines.append("- bandwidth floor: not measured")
    checks = [r for r in rows if r["sweep"].startswith("exactness")]
    sizes = f"N = {checks[0]['N']}, B = {checks[0]['B']}, " if checks else ""
    lines += [
        "",
        f"Exactness ({sizes}C = 2, eps = 0; `multinomial` is torch's own, for reference):",
        "",
        "| check | sampler | mode | value | result |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in checks:
        result, _, note = r["note"].partition("; ")
        value = number(r.get("value"))
        shown = "-" if value is None else f"{value:.4g}"
        lines.append(f"| {r['sweep'].split(':')[-1]} | {r['variant']} | {r['mode']} | {shown} | {result}: {note} |")
    if failed:
        lines += ["", "Failed timings of the fused op:", ""] + [
            f"- {r['score']} C={r['C']} N={r['N']} B={r['B']} K={r['K']} {r['mode']}: {r['note']}" for r in failed
        ]
    return lines + [""]


def update_section(rows: list[dict] | None) -> list[str]:
    if rows is None:
        return ["No update CSV from this run.", ""]
    lines = [
        "| model | mode | sampler | median (ms) | vs uniform | vs PER | vs large batch | note |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    ms = {}
    for r in rows:
        ms[r["model"], r["mode"], r["sampler"]] = number(r["median_ms"])
        lines.append(
            f"| {r['model']} | {r['mode']} | {r['sampler']} | {cell(r['median_ms'], 3)} | "
            f"{cell(r['vs_uniform'], 2)} | "
            f"{cell(r['vs_per'], 2)} | {cell(r['vs_large-batch'], 2)} | {r.get('note', '')} |"
        )
    lines += ["", update_targets(rows, ms)]
    return lines + [""]


LABER_SAMPLERS = {"laber-mean": "functional LaBER", "laber-sampler": "LaBERSampler"}


def update_targets(rows: list[dict], ms: dict) -> str:
    """Each LaBER update against the uniform and the PER update of the same model and mode (issue 29:
    a graphed LaBER update over a compiled, ungraphed uniform one said "met" at 6x); the targets are
    set for the CUDA-graphed mode, the other modes' ratios are shown without a verdict."""
    lines = [
        f"Targets (issues 24 and 29): {UPDATE_TARGET_MODE} LaBER update <= {UPDATE_VS_UNIFORM_TARGET:g}x the "
        f"{UPDATE_TARGET_MODE} uniform update and <= {UPDATE_VS_PER_TARGET:g}x the {UPDATE_TARGET_MODE} update with "
        "TorchRL's PER; each ratio is against the same model and mode, from this run.",
        "",
    ]
    for model in dict.fromkeys(r["model"] for r in rows):
        for mode in dict.fromkeys(r["mode"] for r in rows if r["model"] == model):
            for sampler, label in LABER_SAMPLERS.items():
                laber = ms.get((model, mode, sampler))
                if not laber:
                    continue
                parts = []
                for peer, target in (("uniform", UPDATE_VS_UNIFORM_TARGET), ("per", UPDATE_VS_PER_TARGET)):
                    base = ms.get((model, mode, peer))
                    name = "uniform" if peer == "uniform" else "PER"
                    if not base:
                        parts.append(f"vs {mode} {name} not measured")
                        continue
                    ratio = laber / base
                    verdict = f" (target <= {target:g}x: {'met' if ratio <= target else 'not met'})"
                    parts.append(
                        f"{ratio:.2f}x the {mode} {name} update" + (verdict if mode == UPDATE_TARGET_MODE else "")
                    )
                lines.append(f"- {model}, {mode}, {label}: " + "; ".join(parts))
    return "\n".join(lines)


def write_summary(path: Path, steps: list[Step], tag: str, results_dir: Path, since: float) -> None:
    env = environment("cuda" if tag == "cuda" else "cpu")
    lines = [
        f"# GPU check: {env['device']}",
        "",
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {describe(env)}.",
        "",
        "Written by `make gpu-check` (`perf/gpu_check.py`); the figures are this run's, from the CSVs named below.",
        "",
        "| step | status | seconds | command |",
        "| --- | --- | --- | --- |",
    ]
    for s in steps:
        command = " ".join(Path(c).name if c == sys.executable else c for c in s.command)
        lines.append(f"| {s.name} | {s.status} | {s.seconds:.0f} | `{command}` |")
    tests = next((s for s in steps if s.name == "tests"), None)
    if tests is not None and tests.tail:
        lines += ["", f"pytest: {tests.tail[-1]}"]
    lines += ["", f"## The fused op (`kernel_{tag}.csv`)", ""]
    lines += kernel_section(fresh_csv(results_dir / f"kernel_{tag}.csv", since))
    lines += [f"## The update (`update_{tag}.csv`)", ""]
    lines += update_section(fresh_csv(results_dir / f"update_{tag}.csv", since))
    for s in steps:
        if s.failed:
            lines += [f"## {s.name}: {s.status}, last lines", "", "```", *s.tail, "```", ""]
    tmp = path.with_name(path.name + ".tmp")  # a check killed while writing keeps the previous summary
    tmp.write_text("\n".join(lines))
    os.replace(tmp, path)


def default_results_dir() -> Path:
    """``$OUT`` (the GPU machine brings back what is there), else ``$GPU_RESULTS_DIR`` (``suite.sh``
    names it), else ``perf/results``."""
    for name in ("OUT", "GPU_RESULTS_DIR"):
        if os.environ.get(name):
            return Path(os.environ[name])
    return COMMITTED


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="no GPU: run every step at CPU smoke sizes")
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=default_results_dir(),
        help="where the logs, CSVs and the summary go, each as it is written (default $OUT, else "
        "$GPU_RESULTS_DIR, else perf/results)",
    )
    parser.add_argument("--budget", type=float, default=BUDGET, help=f"seconds for the whole check ({BUDGET})")
    parser.add_argument(
        "--compile-budget",
        type=float,
        default=COMPILE_BUDGET,
        help=f"seconds the update step may spend compiling ({COMPILE_BUDGET}); later compiled rows are not measured",
    )
    parser.add_argument("--only", nargs="+", choices=list(TIMEOUTS), help="run only these steps")
    parser.add_argument(
        "--timeout",
        nargs="+",
        default=[],
        metavar="STEP=SECONDS",
        help=f"time limits per step (default {', '.join(f'{k}={v}' for k, v in TIMEOUTS.items())})",
    )
    args = parser.parse_args()
    args.results_dir = args.results_dir.resolve()
    args.timeout = {**TIMEOUTS, **{k: float(v) for k, v in (item.split("=", 1) for item in args.timeout)}}
    if not args.cpu_smoke and not torch.cuda.is_available():
        print(
            "gpu-check: torch sees no CUDA device (torch.cuda.is_available() is False): nothing to check. "
            "`python -m perf.gpu_check --cpu-smoke --results-dir DIR` runs the plumbing on CPU."
        )
        sys.exit(2)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    tag = "cpu" if args.cpu_smoke else "cuda"
    since = time.time() - 1
    steps = [s for s in steps_for(args) if not args.only or s.name in args.only]
    for step in steps:
        step.log = args.results_dir / f"{step.name}_{tag}.log"
    summary = args.results_dir / f"gpu_summary_{tag}.md"
    print(f"gpu-check: results in {args.results_dir} (logs as they run, CSVs per case, the summary per step)")
    write_summary(summary, steps, tag, args.results_dir, since)
    run_steps(steps, args.budget, lambda: write_summary(summary, steps, tag, args.results_dir, since))
    print(
        f"\n=== gpu-check summary: {summary}\n" + "\n".join(f"{s.name}: {s.status} ({s.seconds:.0f} s)" for s in steps)
    )
    failed = [s.name for s in steps if s.failed]
    if failed:
        print(f"gpu-check FAILED: {', '.join(failed)}")
        sys.exit(1)


if __name__ == "__main__":
    main()
