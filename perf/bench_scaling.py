"""How the cost grows: the down-sampling op against N and B, and one sampling step against buffer size.

    python -m perf.bench_scaling --quick   # coarse grids
    python -m perf.bench_scaling --full    # finer grids, buffers up to 1e7 where memory allows

1. ``laber_select`` against ``N = m * B`` from 128 to 65536 (B = 32) and against ``B`` (N = 16384),
   beside the naive eager torch down-sample of the same size.
2. One sampling step as the buffer grows (1e4 .. 1e6, 1e7 with --full): LaBER's (uniform draw of
   ``m * B`` rows from a ``TensorDictReplayBuffer``, then the op on their priorities) against
   TorchRL's ``PrioritizedSampler`` (sample ``B`` rows + ``update_priority`` of them).

Each pair of peers is timed interleaved, call by call (``perf/common.py``); medians after a warm-up.
Writes ``runs/perf/scaling_<device>.csv`` (``perf/results/`` with ``UPDATE_RESULTS=1``) and log-log
plots ``scaling_op.png`` and ``scaling_buffer.png``; prints the tables.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from tensordict import TensorDict
from torchrl.data import LazyTensorStorage, PrioritizedSampler, TensorDictReplayBuffer

from perf.common import RESULTS, describe, environment, resolve_device, time_interleaved, write_csv
from torchsample import laber_downsample, laber_select

B, M = 32, 4
COLUMNS = ["sweep", "N", "B", "buffer_size", "laber_select_us", "naive_us", "laber_step_us", "per_step_us"]


def naive(p: torch.Tensor, batch_size: int):
    index = torch.multinomial(p, batch_size, replacement=True)
    return index, (p.sum() / p.numel()) / p[index]


def op_scaling(device, iterations: int, full: bool) -> list[dict]:
    rows = []
    sizes = [128 * 2**k for k in range(0, 10, 1 if full else 2)]  # 128 .. 65536
    for n in sizes:
        q, y = torch.randn(n, device=device), torch.randn(n, device=device)
        p = (q - y).abs() + 1e-6
        t = time_interleaved(
            {"ours": lambda: laber_select(q, y, B), "naive": lambda: naive(p, B)},
            samples=iterations,
            warmup=20,
            device=device,
        )
        rows.append({"sweep": "N", "N": n, "B": B, "laber_select_us": t["ours"].us, "naive_us": t["naive"].us})
    n = 16384
    q, y = torch.randn(n, device=device), torch.randn(n, device=device)
    p = (q - y).abs() + 1e-6
    for b in [32, 128, 512, 2048, 8192][:: 1 if full else 2]:
        t = time_interleaved(
            {"ours": lambda: laber_select(q, y, b), "naive": lambda: naive(p, b)},
            samples=iterations,
            warmup=20,
            device=device,
        )
        rows.append({"sweep": "B", "N": n, "B": b, "laber_select_us": t["ours"].us, "naive_us": t["naive"].us})
    return rows


def transitions(n: int, device) -> TensorDict:
    return TensorDict(
        {
            "observation": torch.randn(n, 4),
            "action": torch.randint(2, (n,)),
            ("next", "observation"): torch.randn(n, 4),
            ("next", "reward"): torch.randn(n, 1),
        },
        [n],
    ).to(device)


def buffer_scaling(device, iterations: int, full: bool) -> list[dict]:
    rows = []
    sizes = [10_000, 100_000, 1_000_000] + ([10_000_000] if full else [])
    for size in sizes:
        try:
            data = transitions(size, device)
        except RuntimeError:  # out of memory: report what fitted
            break
        uniform = TensorDictReplayBuffer(storage=LazyTensorStorage(size, device=device), batch_size=M * B)
        uniform.extend(data)
        per = TensorDictReplayBuffer(
            storage=LazyTensorStorage(size, device=device),
            batch_size=B,
            sampler=PrioritizedSampler(size, alpha=0.6, beta=0.4),
        )
        per.extend(data)
        del data
        new_priority = torch.rand(B, device=device)

        def laber_step():
            large = uniform.sample()
            return laber_downsample(large["next", "reward"].squeeze(-1).abs(), B)

        def per_step():
            sample = per.sample()
            per.update_priority(sample["index"], new_priority)

        t = time_interleaved({"laber": laber_step, "per": per_step}, samples=iterations, warmup=20, device=device)
        rows.append(
            {"sweep": "buffer", "buffer_size": size, "laber_step_us": t["laber"].us, "per_step_us": t["per"].us}
        )
        uniform = per = None  # the next size's buffers need the memory
    return rows


def plot(rows: list[dict], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, sweep, x in [(axes[0], "N", "N"), (axes[1], "B", "B")]:
        sel = [r for r in rows if r["sweep"] == sweep]
        ax.loglog([r[x] for r in sel], [r["laber_select_us"] for r in sel], "o-", label="laber_select")
        ax.loglog([r[x] for r in sel], [r["naive_us"] for r in sel], "s--", label="naive eager")
        ax.set_xlabel(x)
        ax.set_ylabel("median time per call (us)")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    axes[0].set_title(f"against N = m*B (B = {B})")
    axes[1].set_title("against B (N = 16384)")
    fig.tight_layout()
    paths.append(out_dir / "scaling_op.png")
    fig.savefig(paths[-1], dpi=110)
    sel = [r for r in rows if r["sweep"] == "buffer"]
    if sel:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        ax.loglog(
            [r["buffer_size"] for r in sel], [r["laber_step_us"] for r in sel], "o-", label=f"LaBER (m={M}, B={B})"
        )
        ax.loglog([r["buffer_size"] for r in sel], [r["per_step_us"] for r in sel], "s--", label="PER sample + update")
        ax.set_xlabel("transitions in the buffer")
        ax.set_ylabel("median time per step (us)")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
        fig.tight_layout()
        paths.append(out_dir / "scaling_buffer.png")
        fig.savefig(paths[-1], dpi=110)
    plt.close("all")
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="coarse grids (default)")
    mode.add_argument("--full", action="store_true", help="finer grids and a 1e7 buffer")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    device = resolve_device(args.device)
    torch.set_num_threads(1)
    logging.getLogger("torchrl").setLevel(logging.WARNING)  # one "Initialized LazyTensorStorage" line per buffer
    env = environment(device)
    iterations = 500 if args.full else 200
    print(f"{describe(env)}; medians of {iterations} interleaved calls\n", flush=True)
    rows = op_scaling(device, iterations, args.full) + buffer_scaling(device, iterations, args.full)
    print("| sweep | N | B | laber_select (us) | naive eager (us) |\n| --- | --- | --- | --- | --- |")
    for r in rows:
        if r["sweep"] in ("N", "B"):
            print(f"| {r['sweep']} | {r['N']} | {r['B']} | {r['laber_select_us']:.1f} | {r['naive_us']:.1f} |")
    print("\n| buffer size | LaBER step (us) | PER sample + update (us) | PER / LaBER |\n| --- | --- | --- | --- |")
    for r in rows:
        if r["sweep"] == "buffer":
            print(
                f"| {r['buffer_size']:.0e} | {r['laber_step_us']:.0f} | {r['per_step_us']:.0f} | "
                f"{r['per_step_us'] / r['laber_step_us']:.2f} |"
            )
    out = write_csv(args.out_dir / f"scaling_{device.type}.csv", rows, COLUMNS, env)
    print(f"\nCSV: {out}; plots: {', '.join(str(p) for p in plot(rows, args.out_dir))}")


if __name__ == "__main__":
    main()
