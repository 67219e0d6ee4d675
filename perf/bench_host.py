"""Host time of one call of the fused op, measured without a GPU: where the eager microseconds go.

    python -m perf.bench_host            # runs/perf/host_cpu.csv (UPDATE_RESULTS=1: perf/results/)

On the H200 the eager op took 230-520 us a call for every N <= 262k, 0.6-0.75x the naive torch path,
while the kernel itself takes 4-13 us in a CUDA graph: the rest is host time. That part is
Python and the dispatcher, and runs the same on a CPU: here the op's CUDA path runs on CPU tensors
with the Triton launches replaced by no-ops, so each row is pure host time (the launches' own cost,
Triton's argument binding and the driver call, is not in it). Peers, timed interleaved:

* ``public path``: what ``laber_select`` does on CUDA tensors after its argument checks
  (``torchsample.ops._fused``: the codes, the default random state, the op, the squeezes);
* ``op (dispatcher)``: ``torch.ops.torchsample.laber_fused``, the registered op, as torch.compile
  and make_fx see it;
* ``direct``: ``laber_fused_call``, what an eager call runs: the op's implementation without the
  dispatcher;
* ``launch_laber``, ``allocate_buffers``, ``launch_plan``: its parts.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import torch

import torchsample.kernels.laber as laber  # noqa: E402
from perf.common import RESULTS, describe, environment, time_interleaved, write_csv
from torchsample import ops  # noqa: E402
from torchsample.codes import LossKind, Weighting  # noqa: E402

COLUMNS = ["N", "B", "C", "part", "median_us", "q20_us", "q80_us"]


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=RESULTS / "host_cpu.csv")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with launches_replaced_by_no_ops():
            rows = measure(args.samples)
        env = environment("cpu")  # records the one thread timed
    finally:
        torch.set_num_threads(threads)
    write_csv(args.out, rows, COLUMNS, env)
    print(f"Host time of one fused-op call, launches replaced by no-ops ({describe(env)}); us, median [q20, q80]\n")
    print("| C | N | B | " + " | ".join(dict.fromkeys(r["part"] for r in rows)) + " |")
    print("| --- " * (3 + len(dict.fromkeys(r["part"] for r in rows))) + "|")
    for key in dict.fromkeys((r["C"], r["N"], r["B"]) for r in rows):
        cells = [f"{r['median_us']:.1f}" for r in rows if (r["C"], r["N"], r["B"]) == key]
        print(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + " |")
    print(f"\nCSV: {args.out}")


def measure(samples: int) -> list[dict]:
    rows = []
    loss, weighting = int(LossKind.L2), int(Weighting.MEAN)
    for C, N, B in [(1, 1024, 32), (1, 16384, 256), (2, 262144, 32)]:
        q, y = torch.rand(C, N, 1), torch.rand(C, N, 1)
        state = laber.new_rng_state("cpu")
        fns = {
            "public path": lambda: ops._fused(q, y, None, B, loss, "mean", 1e-6, 1.0, None, state),
            "op (dispatcher)": lambda: torch.ops.torchsample.laber_fused(
                q, y, None, state, B, loss, weighting, 1e-6, 1.0, True
            ),
            "direct": lambda: laber.laber_fused_call(q, y, None, state, B, loss, weighting, 1e-6, 1.0),
            "launch_laber": lambda: laber.launch_laber(
                q, y, None, state, B, loss, weighting, 1e-6, 1.0, traceable=False
            ),
            "allocate_buffers": lambda: laber.allocate_buffers(q, B, loss),
            "launch_plan": lambda: laber.launch_plan(N, 1, B, loss, 0),
        }
        timings = time_interleaved(fns, samples=samples, warmup=min(200, samples), device="cpu", samples_per_turn=50)
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
