"""The helpers perf/ shares (timer, CSV), the kernel benchmark's exactness check and the GPU summary, on CPU."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from perf import bench_kernel, common, gpu_check


def test_timer_interleaves_samples_and_divides_by_calls():
    order = []
    fns = {"a": lambda: order.append("a"), "b": common.repeat(lambda: order.append("b"), 3)}
    timings = common.time_interleaved(fns, samples=4, warmup=1, device="cpu", samples_per_turn=2)
    assert order == ["a"] + ["b"] * 3 + (["a"] * 2 + ["b"] * 6) * 2
    assert {name: t.samples for name, t in timings.items()} == {"a": 4, "b": 4}
    assert all(0 <= t.q20 <= t.median <= t.q80 for t in timings.values())


def test_timer_reports_seconds_per_call():
    sleep = common.repeat(lambda: time.sleep(1e-3), 4)
    t = common.time_interleaved({"sleep": sleep}, samples=3, warmup=0, device="cpu")["sleep"]
    assert 1e-3 <= t.median < 3e-3  # per call; one sample (4 calls) takes at least 4 ms


def test_timer_cuda_branch_reads_events_after_each_turn(monkeypatch):
    """The CUDA branch's bookkeeping, with host-clock stand-ins for CUDA events (no GPU needed)."""

    class Event:
        def __init__(self, enable_timing):
            assert enable_timing

        def record(self):
            self.t = time.perf_counter()

        def elapsed_time(self, end):  # milliseconds, as CUDA's
            return (end.t - self.t) * 1e3

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    sleep = common.repeat(lambda: time.sleep(1e-3), 2)
    timings = common.time_interleaved(
        {"sleep": sleep, "none": lambda: None}, samples=5, warmup=1, device="cuda", samples_per_turn=2
    )
    assert {k: t.samples for k, t in timings.items()} == {"sleep": 5, "none": 5}
    assert 1e-3 <= timings["sleep"].median < 3e-3 and timings["none"].median < 1e-3


def test_csv_rows_carry_device_and_versions(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_COMMIT", "abc123")
    env = common.environment("cpu")
    assert env["torch"] == torch.__version__ and env["git_commit"] == "abc123" and env["device"].startswith("cpu:")
    path = common.write_csv(
        tmp_path / "x.csv", [{"op": "a", "median_us": 1.5}, {"op": "b", "device": "other"}], ["op", "median_us"], env
    )
    rows = common.read_csv(path)
    assert list(rows[0]) == ["op", "median_us", *common.ENV_COLUMNS]
    assert [r["device"] for r in rows] == [env["device"], "other"]
    assert rows[1]["median_us"] == "" and all(r["torch"] == torch.__version__ for r in rows)


def test_exactness_check_passes_torch_and_catches_a_biased_sampler(monkeypatch):
    torch.manual_seed(0)
    rows = bench_kernel.exactness("cpu", 4096, 1024, 16, graph=False)
    assert all(r["note"].startswith("pass") for r in rows), [r["note"] for r in rows]

    exact = bench_kernel.laber_downsample

    def biased(p, b, eps=0.0):  # draws item i + 1 instead of i one time in ten
        out = exact(p, b, eps=eps)
        shift = (torch.rand(out.index.shape) < 0.1).long()
        return out._replace(index=(out.index + shift).clamp_max(p.shape[-1] - 1))

    monkeypatch.setattr(bench_kernel, "laber_downsample", biased)
    rows = {r["sweep"]: r for r in bench_kernel.exactness("cpu", 4096, 1024, 16, graph=False)}
    assert rows["exactness:chisquare-items"]["note"].startswith("FAIL")
    assert rows["exactness:zero-priority-draws"]["note"].startswith("FAIL")


def test_gpu_summary_renders_cuda_rows():
    """The summary's sections from rows shaped as the CUDA runs write them (no GPU needed)."""
    timing = {"sweep": "N", "score": "l2", "C": "1", "N": "16384", "B": "32", "K": "1", "note": ""}
    kernel = [
        {**timing, "variant": "laber", "mode": "eager", "median_us": "10", "time_vs_naive": "0.25", "input_GBps": "13"},
        {**timing, "variant": "naive", "mode": "eager", "median_us": "40", "time_vs_naive": "1"},
        {**timing, "variant": "laber", "mode": "graph", "median_us": "5", "time_vs_naive": "0.5", "input_GBps": "26"},
        {**timing, "variant": "multinomial", "mode": "graph", "median_us": "4", "time_vs_naive": "0.4"},
        {**timing, "sweep": "floor", "variant": "laber", "mode": "cold", "median_us": "300", "value": "2.5"},
        {**timing, "sweep": "floor", "variant": "floor", "mode": "cold", "median_us": "120"},
        {
            **timing,
            "sweep": "exactness:chisquare-items",
            "variant": "laber",
            "mode": "graph",
            "value": "0.3",
            "note": "pass; chi2 1, dof 1",
        },
    ]
    text = "\n".join(gpu_check.kernel_section(kernel))
    assert "| l2 | 1 | 16384 | 32 | 1 | 10.0 | 4.00x | 5.0 | 2.00x | 4.0 | 26.0 |" in text
    assert "at most 5.0 us (target <= 8 us: met)" in text
    assert "naive / fused, graph: 2.00x to 2.00x (target >= 3x: not met" in text
    assert "2.50x the floor (target <= 5x: met)" in text
    assert "| chisquare-items | laber | graph | 0.3 | pass: chi2 1, dof 1 |" in text
    update = [
        {
            "model": "dqn-minatar",
            "mode": mode,
            "sampler": sampler,
            "median_ms": ms,
            "vs_uniform": "",
            "vs_per": "",
            "vs_large-batch": "",
            "note": "",
        }
        for mode, sampler, ms in [
            ("compiled", "uniform", "0.5"),
            ("compiled", "laber-mean", "0.6"),
            ("cudagraph", "uniform", "2.0"),
            ("cudagraph", "laber-mean", "2.2"),
            ("cudagraph", "laber-sampler", "3.0"),
        ]
    ]
    text = "\n".join(gpu_check.update_section(update))
    # Each mode against the same mode (issue 29): the graphed LaBER update over the graphed uniform one.
    assert (
        "dqn-minatar, cudagraph, functional LaBER: 1.10x the cudagraph uniform update (target <= 1.15x: met); "
        "vs cudagraph PER not measured" in text
    )
    assert "dqn-minatar, cudagraph, LaBERSampler: 1.50x the cudagraph uniform update (target <= 1.15x: not met)" in text
    assert "dqn-minatar, compiled, functional LaBER: 1.20x the compiled uniform update; vs compiled PER" in text


def test_gpu_summary_without_results():
    assert gpu_check.kernel_section(None)[0].startswith("No kernel CSV")
    assert gpu_check.update_section(None)[0].startswith("No update CSV")


def test_host_benchmark_runs_every_part_and_restores_the_launchers(tmp_path):
    """perf.bench_host calls the op's internals by name: a changed signature must fail here, not on a GPU day."""
    import triton

    import torchsample.kernels.laber as laber
    from perf import bench_host

    launchers = laber.wrap_triton, laber._as_is
    driver, caches = triton.runtime.driver._active, [k.device_caches for k in bench_host.KERNELS]
    out = tmp_path / "host.csv"
    bench_host.main(["--samples", "3", "--out", str(out)])
    assert (laber.wrap_triton, laber._as_is) == launchers
    parts = {line.split(",")[3] for line in out.read_text().splitlines()[1:] if not line.startswith("#")}
    assert parts == {
        "public path",
        "public path + triton",
        "op (dispatcher)",
        "direct",
        "direct + triton",
        "launch_laber",
        "allocate_buffers",
        "launch_plan",
    }
    assert triton.runtime.driver._active is driver  # the stand-in driver and the kernels' caches are undone
    assert [k.device_caches for k in bench_host.KERNELS] == caches
    assert not any("compile" in vars(k) for k in bench_host.KERNELS)


def test_triton_launch_path_runs_with_only_the_driver_stubbed():
    """The ``+ triton`` rows of perf.bench_host go through Triton's own ``JITFunction.run`` (binding,
    specialisation, cache) and reach the compiled kernel's launch once per kernel launch."""
    import triton

    import torchsample.kernels.laber as laber
    from perf import bench_host

    launched = []
    driver, caches = triton.runtime.driver._active, laber.laber_fused_kernel.device_caches
    with bench_host.triton_without_a_driver():
        bench_host.NotLaunched.run, original = (
            (lambda self, *args: launched.append(len(args))),
            bench_host.NotLaunched.run,
        )
        try:
            q = torch.rand(1, 1000, 1)
            for _ in range(2):
                laber.laber_fused_call(q, q, None, laber.new_rng_state("cpu"), 32, 2, 0, 1e-6, 1.0)
        finally:
            bench_host.NotLaunched.run = original
    assert len(launched) == 2
    assert triton.runtime.driver._active is driver and laber.laber_fused_kernel.device_caches is caches


def _step_script(results, name, seconds, csv=True):
    """A step that writes its CSV (as a benchmark does, after each case) and then runs ``seconds``."""
    code = (
        f"import pathlib, time; print('{name} starts', flush=True); "
        + (f"pathlib.Path({str(results)!r}, '{name}_out.csv').write_text('a\\n1\\n'); " if csv else "")
        + f"time.sleep({seconds}); print('{name} done')"
    )
    return [sys.executable, "-c", code]


def test_gpu_check_keeps_finished_steps_when_a_step_times_out(tmp_path):
    """A step past its limit is killed, the next still runs, and the budget cuts the last one's limit:
    each finished step's log and CSV, and a summary naming every status, are in the results dir."""
    steps = [
        gpu_check.Step("kernel", _step_script(tmp_path, "kernel", 0), 60),
        gpu_check.Step("update", _step_script(tmp_path, "update", 60), 3),
        gpu_check.Step("tests", _step_script(tmp_path, "tests", 3), 60),
        gpu_check.Step("import", _step_script(tmp_path, "import", 0), 60),
    ]
    for step in steps:
        step.log = tmp_path / f"{step.name}_cpu.log"
    summary = tmp_path / "gpu_summary_cpu.md"
    written = []

    def after_each():
        gpu_check.write_summary(summary, steps, "cpu", tmp_path, 0)
        written.append(summary.read_text())

    # 11 s: after the update's 3 and the tests' 3 (and start-ups) under 5 are left, too few to start the last
    gpu_check.run_steps(steps, budget=11, after_each=after_each)
    assert [s.status for s in steps[:3]] == ["passed", "TIMED OUT after 3 s", "passed"]
    assert steps[3].status.startswith("not run: no time left")
    assert "kernel done" in (tmp_path / "kernel_cpu.log").read_text()
    assert "update starts" in (tmp_path / "update_cpu.log").read_text()
    assert (tmp_path / "kernel_out.csv").exists() and (tmp_path / "update_out.csv").exists()
    assert (
        len(written) == 4
        and "| kernel | passed |" in written[0]
        and "| update | not run: the check stopped" in written[0]
    )
    assert "| update | TIMED OUT after 3 s |" in written[-1]


def test_gpu_check_killed_mid_run_leaves_the_finished_steps_files(tmp_path):
    """Issue 29, item 2: the machine's limit kills the whole check (SIGKILL, no cleanup); the steps that
    finished before have their CSV, log and the summary in the results dir ($OUT)."""
    script = f"""
import sys
sys.path.insert(0, {str(common.ROOT)!r})
from pathlib import Path
from perf import gpu_check
from tests.test_perf_helpers import _step_script
out = Path({str(tmp_path)!r})
steps = [gpu_check.Step("kernel", _step_script(out, "kernel", 0), 60),
         gpu_check.Step("update", _step_script(out, "update", 600), 600)]
for s in steps:
    s.log = out / (s.name + "_cpu.log")
summary = out / "gpu_summary_cpu.md"
gpu_check.run_steps(steps, after_each=lambda: gpu_check.write_summary(summary, steps, "cpu", out, 0))
"""
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=common.ROOT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            log = tmp_path / "update_cpu.log"
            if log.exists() and "update starts" in log.read_text():
                break
            time.sleep(0.2)
        else:
            pytest.fail("the second step never started")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    text = (tmp_path / "gpu_summary_cpu.md").read_text()
    assert "| kernel | passed |" in text and "| update | not run: the check stopped before it |" in text
    assert (tmp_path / "kernel_out.csv").read_text() == "a\n1\n"
    assert "kernel done" in (tmp_path / "kernel_cpu.log").read_text()


def test_gpu_check_results_go_to_out(monkeypatch):
    monkeypatch.setenv("OUT", "/somewhere/out")
    monkeypatch.setenv("GPU_RESULTS_DIR", "/elsewhere")
    assert str(gpu_check.default_results_dir()) == "/somewhere/out"
    monkeypatch.delenv("OUT")
    assert str(gpu_check.default_results_dir()) == "/elsewhere"
    monkeypatch.delenv("GPU_RESULTS_DIR")
    assert gpu_check.default_results_dir() == common.COMMITTED


def test_kernel_rows_carry_the_launch_plan():
    """Issue 29 item 4: every ``laber`` row says how ``launch_plan`` launched it (CPU: the op's torch path
    runs, the plan columns are the plan the CUDA call takes); the peers' rows leave them empty."""
    case = bench_kernel.Case("K", "categorical", 1, 1024, 32, 51)
    rows = bench_kernel.time_case(case, "cpu", samples=3, graphs=False)
    by = {r["variant"]: r for r in rows}
    assert set(by) == {"laber", "naive", "multinomial"}  # laber-large-shape: CUDA graphs only
    laber = by["laber"]
    assert {k: laber[k] for k in bench_kernel.PLAN_COLUMNS} == {
        "shape": "auto",
        "tiles": 16,
        "programs": 16,
        "warps": 8,
        "tile_items": 64,
        "chunk": 64,
        "draw_programs": 0,
        "search_loads": 7,
    }
    assert not any(k in by["naive"] for k in bench_kernel.PLAN_COLUMNS)
    assert set(bench_kernel.PLAN_COLUMNS) <= set(bench_kernel.COLUMNS)
    # Every CPU smoke case's plan, and the large-N rules' beside it where they differ.
    for case in bench_kernel.cases(quick=False, cuda=False):
        plan = bench_kernel.plan_columns(case)
        assert all(isinstance(plan[k], int) and plan[k] >= 0 for k in bench_kernel.PLAN_COLUMNS[1:]), case
        assert plan["programs"] == case.C * plan["tiles"]
    issue = bench_kernel.Case("K", "categorical", 1, 16384, 32, 51)
    assert bench_kernel.differs_from_large_shape(issue)
    assert bench_kernel.plan_columns(issue, bench_kernel.LARGE_SHAPE)["tiles"] == 512
    assert not bench_kernel.differs_from_large_shape(bench_kernel.Case("N", "l2", 1, 2**20, 32))


def test_gpu_summary_shows_each_rows_launch_and_the_large_n_shape():
    timing = {"sweep": "K", "score": "categorical", "C": "1", "N": "16384", "B": "32", "K": "51", "note": ""}
    plan = {"tiles": "256", "programs": "256", "warps": "8", "tile_items": "64", "chunk": "64"}
    plan |= {"draw_programs": "0", "search_loads": "11"}
    kernel = [
        {**timing, **plan, "variant": "laber", "mode": "graph", "median_us": "6", "time_vs_naive": "0.2"},
        {**timing, "variant": "naive", "mode": "graph", "median_us": "30", "time_vs_naive": "1"},
        {**timing, "variant": "laber-large-shape", "mode": "graph", "median_us": "12", "time_vs_naive": "0.4"},
    ]
    text = "\n".join(gpu_check.kernel_section(kernel))
    assert "| 6.0 | 5.00x | - | - | 256 x 8w, tile 64, chunk 64, 11 loads | 12.0 |" in text
    assert "small-N launch shape / large-N shape, graph" in text and "0.50x to 0.50x over 1 rows" in text
    # A CSV without the plan columns (the first H200 run's) still renders.
    old = [{k: v for k, v in r.items() if k not in plan} for r in kernel[:2]]
    assert "| 6.0 | 5.00x | - | - | - | - |" in "\n".join(gpu_check.kernel_section(old))
