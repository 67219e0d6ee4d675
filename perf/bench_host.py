"""Host time of one call of the fused op, measured without a GPU: where the eager microseconds go.

    python -m perf.bench_host            # runs/perf/host_cpu.csv (UPDATE_RESULTS=1: perf/results/)

On the H200 the eager op took 230-520 us a call for every N <= 262k, 0.6-0.75x the naive torch path,
while the kernel itself takes 4-13 us in a CUDA graph: the rest is host time. That part is
Python, the dispatcher and Triton's launch, and runs the same on a CPU: here the op's CUDA path runs on
CPU tensors, each row pure host time. Peers, timed interleaved:

* ``public path``: what ``laber_select`` does on CUDA tensors after its argument checks
  (``torchsample.ops._fused``: the codes, the default random state, the op, the squeezes), launches
  replaced by no-ops;
* ``public path + triton``: the same with Triton's own launch path (``JITFunction.run``: binding the
  arguments, their specialisation, the cache lookup, the grid) and only the driver stubbed: a stand-in
  driver names an sm_90 device, and the compiled kernel's ``run`` (the driver's launch) does nothing;
* ``op (dispatcher)``: ``torch.ops.torchsample.laber_fused``, the registered op, as torch.compile
  and make_fx see it (launches replaced by no-ops);
* ``direct``, ``direct + triton``: ``laber_fused_call``, what an eager call runs: the op's implementation
  without the dispatcher, without and with Triton's launch path;
* ``launch_laber``, ``allocate_buffers``, ``launch_plan``: its parts.

The driver's launch left out is ``cuLaunchKernel`` behind Triton's C launcher (a few us on a GPU host).
"""

from __future__ import annotations

import argparse
import contextlib
from collections import defaultdict
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget

import torchsample.kernels.laber as laber  # noqa: E402
from perf.common import RESULTS, describe, environment, time_interleaved, write_csv
from torchsample import ops  # noqa: E402
from torchsample.codes import LossKind, Weighting  # noqa: E402

COLUMNS = ["N", "B", "C", "part", "median_us", "q20_us", "q80_us"]
KERNELS = (laber.laber_fused_kernel, laber.laber_draw_kernel)
TRITON_LAUNCH = laber._as_is  # the eager launcher as the module defines it: Triton's own kernel[grid](...)


def no_op_launches(kernel):
    class Launcher:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    return Launcher()


@contextlib.contextmanager
def launches_replaced_by_no_ops():
    """Both launchers (traceable or not) launch nothing inside; restored after, even on error."""
    saved = laber.wrap_triton, laber._as_is
    laber.wrap_triton = laber._as_is = no_op_launches
    try:
        yield
    finally:
        laber.wrap_triton, laber._as_is = saved


class StandInDriver:
    """What ``JITFunction.run`` asks of Triton's driver: an sm_90 device, its stream 0."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


class NotLaunched:
    """A compiled kernel whose launch (the driver call) does nothing."""

    function = packed_metadata = None

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, *args):
        return None


@contextlib.contextmanager
def triton_without_a_driver():
    """Triton's launch path runs as on a GPU but for the driver: :class:`StandInDriver`, and a
    "compile" that returns :class:`NotLaunched` (compiling is once per specialisation, not per call).
    The kernels' caches and Triton's driver are restored after."""
    driver = triton.runtime.driver
    saved_driver = driver._active
    saved = [(k, k.device_caches, k.__dict__.get("compile")) for k in KERNELS]
    driver._active = StandInDriver()
    try:
        for kernel in KERNELS:
            kernel.device_caches = defaultdict(kernel.create_binder)
            kernel.device_caches[0]  # the binder, for the stand-in's target
            kernel.compile = lambda src, target=None, options=None, **kwargs: NotLaunched()
        yield
    finally:
        driver._active = saved_driver
        for kernel, caches, compile_ in saved:
            kernel.device_caches = caches
            if compile_ is None:
                kernel.__dict__.pop("compile", None)
            else:
                kernel.compile = compile_


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=RESULTS / "host_cpu.csv")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with launches_replaced_by_no_ops(), triton_without_a_driver():
            rows = measure(args.samples)
        env = environment("cpu")  # records the one thread timed
    finally:
        torch.set_num_threads(threads)
    write_csv(args.out, rows, COLUMNS, env)
    print(f"Host time of one fused-op call on CPU ({describe(env)}); us, median [q20, q80]\n")
    parts = list(dict.fromkeys(r["part"] for r in rows))
    print("| C | N | B | " + " | ".join(parts) + " |")
    print("| --- " * (3 + len(parts)) + "|")
    for key in dict.fromkeys((r["C"], r["N"], r["B"]) for r in rows):
        cells = [f"{r['median_us']:.1f}" for r in rows if (r["C"], r["N"], r["B"]) == key]
        print(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + " |")
    print(f"\nCSV: {args.out}")


def measure(samples: int) -> list[dict]:
    """Every part at three shapes, interleaved. The eager parts launch through ``laber._as_is``: each
    call sets it first (no-op launches, or Triton's own path on the stand-in driver), so that peers
    with and without Triton interleave; setting a module global costs tens of ns."""
    rows = []
    loss, weighting = int(LossKind.L2), int(Weighting.MEAN)
    no_op, triton_path = no_op_launches, TRITON_LAUNCH

    def launching(launcher, fn):
        def call():
            laber._as_is = launcher
            return fn()

        return call

    for C, N, B in [(1, 1024, 32), (1, 16384, 256), (2, 262144, 32)]:
        q, y = torch.rand(C, N, 1), torch.rand(C, N, 1)
        state = laber.new_rng_state("cpu")
        public = lambda: ops._fused(q, y, None, B, loss, "mean", 1e-6, 1.0, None, state)  # noqa: E731
        direct = lambda: laber.laber_fused_call(q, y, None, state, B, loss, weighting, 1e-6, 1.0)  # noqa: E731
        fns = {
            "public path": launching(no_op, public),
            "public path + triton": launching(triton_path, public),
            "op (dispatcher)": launching(
                no_op,
                lambda: torch.ops.torchsample.laber_fused(q, y, None, state, B, loss, weighting, 1e-6, 1.0, True),
            ),
            "direct": launching(no_op, direct),
            "direct + triton": launching(triton_path, direct),
            "launch_laber": launching(
                no_op,
                lambda: laber.launch_laber(q, y, None, state, B, loss, weighting, 1e-6, 1.0, traceable=False),
            ),
            "allocate_buffers": lambda: laber.allocate_buffers(q, B, loss),
            "launch_plan": lambda: laber.launch_plan(N, 1, B, loss, 0),
        }
        timings = time_interleaved(fns, samples=samples, warmup=min(200, samples), device="cpu", samples_per_turn=50)
        laber._as_is = no_op
        for part, t in timings.items():
            rows.append(
                {
                    "N": N,
                    "B": B,
                    "C": C,
                    "part": part,
                    "median_us": t.median * 1e6,
                    "q20_us": t.q20 * 1e6,
                    "q80_us": t.q80 * 1e6,
                }
            )
    return rows


if __name__ == "__main__":
    main()
