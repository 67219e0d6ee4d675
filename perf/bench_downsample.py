"""Time per call of the LaBER down-sample: ours against cpprb's LaBERmean and naive eager torch.

    python perf/bench_downsample.py            # full: many iterations
    python perf/bench_downsample.py --quick    # fewer iterations

Peers, measured in the same run, interleaved call by call so that machine noise hits all alike:

* ``laber_downsample`` (ready priorities) and ``laber_select`` (surrogate from q and y fused in);
* cpprb's ``LaBERmean(B, m)(priorities=...)`` (NumPy);
* naive eager torch: ``s = p.sum(); i = torch.multinomial(p, B, True); w = (s / N) / p[i]``.

On CPU the table gives medians and ratios against the peers. On CUDA it also times the fused
kernel with ``triton.testing.do_bench`` and counts the kernels one call launches.
"""
from __future__ import annotations

import argparse
import csv
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from torchsample import laber_downsample, laber_select

SIZES = [(32, 4), (256, 4), (32, 32), (1024, 16)]  # (B, m): N = m * B


def naive(p: torch.Tensor, batch_size: int):
    total = p.sum()
    index = torch.multinomial(p, batch_size, replacement=True)
    return index, (total / p.numel()) / p[index]


def interleaved_medians(calls: dict, iterations: int, warmup: int = 200) -> dict:
    """Median seconds per call of each callable, timing them in turn within each iteration."""
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in calls}
    for _ in range(iterations):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def cuda_section(rows: list, iterations: int) -> None:
    import triton.testing
    from torch.profiler import ProfilerActivity, profile

    for b, m in SIZES:
        n = b * m
        p = torch.rand(n, device="cuda")
        q, y = torch.randn(n, device="cuda"), torch.randn(n, device="cuda")
        ours = triton.testing.do_bench(lambda: laber_select(q, y, b), quantiles=[0.5])
        eager = triton.testing.do_bench(lambda: naive((q - y).abs() + 1e-6, b), quantiles=[0.5])
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            laber_select(q, y, b)
            torch.cuda.synchronize()
        kernels = sum(1 for e in prof.events() if e.device_type.name == "CUDA")
        rows.append({"device": torch.cuda.get_device_name(), "B": b, "m": m, "op": "laber_select (do_bench)",
                     "median_us": ours * 1e3, "ratio": ours / eager, "peer": "naive eager", "kernels": kernels})
        print(f"| {b} | {m} | fused kernel {ours * 1e3:.1f} us | naive eager {eager * 1e3:.1f} us | "
              f"{eager / ours:.1f}x faster | {kernels} kernel launch(es) |")
        del p


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer iterations (make bench)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--out", type=Path, default=None, help="CSV path (default perf/results/downsample_<device>.csv)")
    args = parser.parse_args()
    from cpprb import LaBERmean

    torch.set_num_threads(args.threads)
    iterations = 2000 if args.quick else 20000
    device_name = platform.processor() or platform.machine()
    rows = []
    print(f"CPU ({device_name}), {args.threads} thread(s), torch {torch.__version__}, median of {iterations} "
          "interleaved calls\n")
    print("| B | m | laber_downsample (us) | laber_select (us) | cpprb LaBERmean (us) | naive eager (us) | "
          "downsample / cpprb | downsample / naive | select / naive |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for b, m in SIZES:
        n = b * m
        g = torch.Generator().manual_seed(0)
        p = torch.rand(n, generator=g)
        q, y = torch.randn(n, generator=g), torch.randn(n, generator=g)
        p_np = p.numpy().astype(np.float64)
        laber = LaBERmean(b, m)
        medians = interleaved_medians({
            "downsample": lambda: laber_downsample(p, b),
            "select": lambda: laber_select(q, y, b),
            "cpprb": lambda: laber(priorities=p_np),
            "naive": lambda: naive(p, b),
        }, iterations)
        us = {k: v * 1e6 for k, v in medians.items()}
        print(f"| {b} | {m} | {us['downsample']:.1f} | {us['select']:.1f} | {us['cpprb']:.1f} | {us['naive']:.1f} | "
              f"{us['downsample'] / us['cpprb']:.2f} | {us['downsample'] / us['naive']:.2f} | "
              f"{us['select'] / us['naive']:.2f} |")
        for op in ("downsample", "select", "cpprb", "naive"):
            rows.append({"device": f"cpu:{device_name}", "B": b, "m": m, "op": op, "median_us": us[op],
                         "ratio": us[op] / us["naive"], "peer": "naive eager", "kernels": ""})
    if torch.cuda.is_available():
        print(f"\nCUDA ({torch.cuda.get_device_name()}), triton.testing.do_bench medians\n")
        cuda_section(rows, iterations)
    out = args.out or Path("perf/results") / f"downsample_{'cuda' if torch.cuda.is_available() else 'cpu'}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*rows[0], "torch", "threads"])
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "torch": torch.__version__, "threads": args.threads})
    print(f"\nCSV: {out}")


if __name__ == "__main__":
    main()
