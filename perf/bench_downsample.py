"""Time per call of the LaBER down-sample: ours against cpprb's LaBERmean and naive eager torch.

    python -m perf.bench_downsample            # full: many iterations
    python -m perf.bench_downsample --quick    # fewer iterations

Peers, measured in the same run, interleaved call by call so that machine noise hits all alike:

* ``laber_downsample`` (ready priorities) and ``laber_select`` (surrogate from q and y fused in);
* cpprb's ``LaBERmean(B, m)(priorities=...)`` (NumPy);
* naive eager torch: ``s = p.sum(); i = torch.multinomial(p, B, True); w = (s / N) / p[i]``.

On CPU the table gives medians and ratios against the peers. On CUDA it also times ``laber_select``
(the fused kernel) against the naive version on the device, with CUDA events, and counts the
kernels one call launches; ``perf/bench_kernel.py`` is the full GPU benchmark.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from perf.common import RESULTS, calls_for, describe, environment, repeat, time_interleaved, write_csv
from torchsample import laber_downsample, laber_select

SIZES = [(32, 4), (256, 4), (32, 32), (1024, 16)]  # (B, m): N = m * B
COLUMNS = ["B", "m", "op", "median_us", "ratio", "peer", "kernels"]


def naive(p: torch.Tensor, batch_size: int):
    total = p.sum()
    index = torch.multinomial(p, batch_size, replacement=True)
    return index, (total / p.numel()) / p[index]


def cuda_section(iterations: int, env: dict) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    device = torch.device("cuda")
    rows = []
    for b, m in SIZES:
        n = b * m
        q, y = torch.randn(n, device=device), torch.randn(n, device=device)
        ours = lambda: laber_select(q, y, b)  # noqa: E731
        eager = lambda: naive((q - y).abs() + 1e-6, b)  # noqa: E731
        calls = calls_for(eager, device)
        t = time_interleaved(
            {"ours": repeat(ours, calls), "naive": repeat(eager, calls)},
            samples=max(iterations // 20, 50),
            warmup=20,
            device=device,
        )
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            ours()
            torch.cuda.synchronize()
        kernels = sum(1 for e in prof.events() if e.device_type.name == "CUDA")
        where = {"device": env["device"], "cuda": env["cuda"]}
        rows.append(
            {
                "B": b,
                "m": m,
                "op": "laber_select (fused)",
                "median_us": t["ours"].us,
                "ratio": t["ours"].median / t["naive"].median,
                "peer": "naive eager",
                "kernels": kernels,
                **where,
            }
        )
        rows.append(
            {"B": b, "m": m, "op": "naive", "median_us": t["naive"].us, "ratio": 1.0, "peer": "naive eager", **where}
        )
        print(
            f"| {b} | {m} | fused kernel {t['ours'].us:.1f} us | naive eager {t['naive'].us:.1f} us | "
            f"{t['naive'].median / t['ours'].median:.1f}x faster | {kernels} kernel launch(es) |",
            flush=True,
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer iterations (make bench)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="CSV path (default runs/perf/downsample_<device>.csv, or perf/results/ with UPDATE_RESULTS=1)",
    )
    args = parser.parse_args()
    from cpprb import LaBERmean

    torch.set_num_threads(args.threads)
    iterations = 2000 if args.quick else 20000
    cpu_env = environment("cpu")
    rows = []
    print(f"{describe(cpu_env)}; median of {iterations} interleaved calls\n")
    print(
        "| B | m | laber_downsample (us) | laber_select (us) | cpprb LaBERmean (us) | naive eager (us) | "
        "downsample / cpprb | downsample / naive | select / naive |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for b, m in SIZES:
        n = b * m
        g = torch.Generator().manual_seed(0)
        p = torch.rand(n, generator=g)
        q, y = torch.randn(n, generator=g), torch.randn(n, generator=g)
        p_np = p.numpy().astype(np.float64)
        laber = LaBERmean(b, m)
        t = time_interleaved(
            {
                "downsample": lambda: laber_downsample(p, b),
                "select": lambda: laber_select(q, y, b),
                "cpprb": lambda: laber(priorities=p_np),
                "naive": lambda: naive(p, b),
            },
            samples=iterations,
            warmup=200,
            device="cpu",
        )
        us = {k: v.us for k, v in t.items()}
        print(
            f"| {b} | {m} | {us['downsample']:.1f} | {us['select']:.1f} | {us['cpprb']:.1f} | {us['naive']:.1f} | "
            f"{us['downsample'] / us['cpprb']:.2f} | {us['downsample'] / us['naive']:.2f} | "
            f"{us['select'] / us['naive']:.2f} |",
            flush=True,
        )
        for op in ("downsample", "select", "cpprb", "naive"):
            rows.append(
                {"B": b, "m": m, "op": op, "median_us": us[op], "ratio": us[op] / us["naive"], "peer": "naive eager"}
            )
    if torch.cuda.is_available():
        cuda_env = environment("cuda")
        print(f"\n{describe(cuda_env)}; CUDA events, medians\n")
        rows += cuda_section(iterations, cuda_env)
    out = args.out or RESULTS / f"downsample_{'cuda' if torch.cuda.is_available() else 'cpu'}.csv"
    write_csv(out, rows, COLUMNS, cpu_env)
    print(f"\nCSV: {out}")


if __name__ == "__main__":
    main()
