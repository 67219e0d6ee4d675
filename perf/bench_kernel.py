"""The fused LaBER op on the GPU: time per call against the naive torch path, and exactness.

    python -m perf.bench_kernel                 # CUDA: the sweep, the bandwidth floor, the chi-square check
    python -m perf.bench_kernel --quick         # CUDA: fewer sizes
    python -m perf.bench_kernel --device cpu    # a small run of the same code on CPU (a smoke test: no graphs)

Peers, timed interleaved (``perf/common.py``, CUDA events) on the same inputs, eager and each
captured in a CUDA graph (``calls`` consecutive calls in one ``torch.cuda.CUDAGraph``, replayed):

* ``laber``: the public op, ``laber_select`` (``loss="l2"``, ``"categorical"``; the output rung,
  or the last-layer rung with ``D = 128`` features a row, ``l2+last-layer``) or ``laber_downsample``
  (ready priorities); on CUDA one launch of the fused kernel;
* ``naive``: the plain torch path: the priority (``torchsample.critic_priorities``, times
  ``sqrt(||h||^2 + 1)`` for the last layer) ``+ eps``,
  ``torch.multinomial(p, B, replacement=True)``, the weights (``torchsample.importance_weights``);
* ``multinomial``: ``torch.multinomial`` alone on ready priorities;
* ``laber-large-shape`` (CUDA, graph only, rows with ``N <= 16k`` whose plan differs): the fused kernel
  under ``launch_plan``'s large-N rules (``shape="large"``, the shape before issue 29 item 4), so that
  one run compares the small-N shape with it on the same GPU.

Each ``laber`` row carries the launch ``launch_plan`` chose (``PLAN_COLUMNS``: ``tiles`` a row,
``programs`` of the fused launch, ``warps``, ``tile_items``, ``chunk``, ``draw_programs`` of a second
launch, ``search_loads``: dependent loads of one draw's search). At ``N <= 16k`` a graph holds at least
20 calls, so its own launch stays a small part of each call's time.

Eager times are per call of a loop of back-to-back calls (host launch cost included where it
dominates); graph times are per call inside a replayed graph. Sizes: ``N`` from 128 to 4M, ``B``
from 32 to 65536, ``C`` (critics) 1 and 2, categorical ``K = 51``. Reported: us per call, draws/s
(``C * B`` per call), input GB/s (bytes of the op's inputs read once, per call) and the time
relative to the naive path in the same mode.

Then two checks:

* **Bandwidth floor** at ``N = 4M, B = 65536`` (ready priorities): each call on a cold L2 cache,
  interleaved with a ``copy_`` of the same bytes (the device's copy bandwidth: it reads and writes
  them) and with ``torch.searchsorted`` of ``B`` uniforms in an ``N``-long prefix sum (the ``B``
  searches). Floor = one read of the priorities at that bandwidth + the searches; the issue's
  target is ``laber <= 3 x floor``.
* **Exactness** at ``N = 2^20`` (``C = 2``, ``eps = 0``, priorities spread over 6 decades, every
  1000th one zero): index counts of about 64 draws per item, eager and from replays of a captured
  graph (each replay must draw fresh numbers), against ``P(i) = p_i / sum_j p_j`` by chi-square
  (scipy) over coarse cells (1024 per row) and over single items (expected >= 5 each); zero-priority
  items must never be drawn, the two rows' draws must be independent and the weights must be
  ``mean(p) / p_i``.

Writes ``runs/perf/kernel_<device>.csv`` (``perf/results/`` with ``UPDATE_RESULTS=1``; the device name
and versions on every row). Exits 1 when a ``laber`` timing or a check failed.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from perf.common import (
    FLOOR_TARGET,
    RESULTS,
    Timing,
    calls_for,
    cuda_graph,
    describe,
    environment,
    fmt,
    read_csv,
    repeat,
    resolve_device,
    time_interleaved,
    write_csv,
)
from perf.gpu_check import kernel_section
from torchsample import critic_priorities, importance_weights, laber_downsample, laber_select  # noqa: E402
from torchsample.codes import LossKind

EPS = 1e-6
VARIANTS = ["laber", "naive", "multinomial"]
# The fused op under launch_plan's large-N rules at a small N (issue 29 item 4): timed beside the default
# plan in a CUDA graph, where only the GPU work counts, on rows whose two plans differ.
LARGE_SHAPE = "laber-large-shape"
SMALL_N = 16384
GRAPH_MIN_CALLS = 20  # calls per replayed graph at N <= SMALL_N: the graph's own launch stays under ~5% a call
# What launch_plan chose for each laber row (kernels/laber.py, launch_shape): the fused launch's
# programs (C * tiles), warps, items a tile, items a chunk, the second launch's programs, the dependent
# loads of one draw's search, and which rules ("auto": the default; "large": the large-N rules).
PLAN_COLUMNS = ["shape", "tiles", "programs", "warps", "tile_items", "chunk", "draw_programs", "search_loads"]
COLUMNS = [
    "sweep",
    "score",
    "C",
    "N",
    "B",
    "K",
    "variant",
    "mode",
    "median_us",
    "q20_us",
    "q80_us",
    "calls",
    "draws_per_s",
    "input_GBps",
    "time_vs_naive",
    *PLAN_COLUMNS,
    "value",
    "note",
]
P_VALUE_FLOOR = 1e-4  # a correct sampler fails a check this rarely


@dataclass(frozen=True)
class Case:
    sweep: str  # what varies: "N", "B", "C", "K", "D" or "priority"
    loss: str  # "priority" (laber_downsample), "l2" or "categorical" (laber_select)
    C: int
    N: int
    B: int
    K: int = 1
    D: int = 0  # features a row: the last-layer rung; 0: the output rung

    @property
    def kind(self) -> str:
        """The loss, and the rung where it is not the output: the CSV's ``score`` column (what the kernel
        scores), the key perf/gpu_check.py groups the rows by."""
        return self.loss + (f"+last-layer-D{self.D}" if self.D else "")

    @property
    def label(self) -> str:
        return f"{self.kind} C={self.C} N={self.N} B={self.B}" + (f" K={self.K}" if self.K > 1 else "")


def cases(quick: bool, cuda: bool) -> list[Case]:
    if not cuda:  # a smoke test of every code path at CPU sizes
        return [
            Case("N", "l2", 1, 128, 32),
            Case("N", "l2", 1, 16384, 32),
            Case("B", "l2", 1, 16384, 4096),
            Case("C", "l2", 2, 1024, 32),
            Case("K", "categorical", 1, 1024, 32, 51),
            Case("D", "l2", 1, 1024, 32, D=128),
            Case("priority", "priority", 1, 16384, 256),
        ]
    if quick:
        return [Case("N", "l2", 1, n, 32) for n in (128, 16384, 2**20)] + [
            Case("B", "l2", 1, 2**20, 65536),
            Case("C", "l2", 2, 16384, 32),
            Case("K", "categorical", 1, 1024, 32, 51),
            Case("D", "l2", 1, 16384, 32, D=128),
            Case("priority", "priority", 1, 2**22, 65536),
        ]
    return (
        [Case("N", "l2", 1, n, 32) for n in (128, 1024, 4096, 16384, 65536, 2**18, 2**20, 2**22)]
        + [Case("B", "l2", 1, 2**20, b) for b in (256, 4096, 65536)]
        + [Case("C", "l2", 2, n, 32) for n in (1024, 16384, 2**20)]
        + [Case("K", "categorical", 1, n, 32, 51) for n in (128, 1024, 16384, 2**18)]
        + [Case("K", "categorical", 2, 1024, 32, 51)]
        + [Case("D", "l2", 1, n, 32, D=128) for n in (128, 1024, 16384, 2**18)]
        + [Case("D", "l2", 2, 1024, 32, D=256), Case("D", "categorical", 1, 1024, 32, 51, D=128)]
        + [Case("priority", "priority", 1, n, b) for n, b in ((1024, 32), (16384, 32), (2**22, 32), (2**22, 65536))]
    )


def plan_columns(case: Case, variant: str = "laber") -> dict:
    """The launch :func:`torchsample.kernels.laber.launch_plan` chose for ``variant``'s call on ``case``
    (``PLAN_COLUMNS``; the public ops launch ``[C, N, K]`` rows of ``LossKind`` ``case.loss``); empty for
    the peers, which launch no fused kernel.

    Examples:
        >>> row = plan_columns(Case("K", "categorical", 1, 16384, 32, 51))
        >>> [row[k] for k in ("shape", "tiles", "programs", "warps", "tile_items", "chunk", "search_loads")]
        ['auto', 256, 256, 8, 64, 64, 11]
    """
    if variant not in ("laber", LARGE_SHAPE):
        return {}
    from torchsample.kernels.laber import launch_shape

    shape = "large" if variant == LARGE_SHAPE else "auto"
    return {"shape": shape, **launch_shape(case.C, case.N, case.K, case.B, LOSS_CODES[case.loss], case.D, shape)}


# The LossKind each public call launches with: laber_downsample ready priorities, laber_select the loss.
LOSS_CODES = {"priority": int(LossKind.PRIORITY), "l2": int(LossKind.L2), "categorical": int(LossKind.CATEGORICAL)}


def differs_from_large_shape(case: Case) -> bool:
    """Whether the default plan of ``case`` is not the large-N rules' (then both are timed in a graph)."""
    auto, large = plan_columns(case), plan_columns(case, LARGE_SHAPE)
    return {**auto, "shape": ""} != {**large, "shape": ""}


def make_inputs(case: Case, device) -> tuple[tuple, torch.Tensor]:
    """The op's inputs (``[N]``-shaped when ``C == 1``) and the ready priorities ``[C, N]`` / ``[N]``."""
    g = torch.Generator(device=device).manual_seed(0)
    lead = (case.C,) if case.C > 1 else ()
    if case.loss == "priority":
        p = torch.rand(*lead, case.N, device=device, generator=g)
        return (p,), p + EPS
    if case.loss == "l2":
        pred, target = (torch.randn(*lead, case.N, device=device, generator=g) for _ in range(2))
        p = critic_priorities(pred, target)
    else:
        pred = torch.randn(*lead, case.N, case.K, device=device, generator=g)
        target = torch.softmax(torch.randn(*lead, case.N, case.K, device=device, generator=g), dim=-1)
        p = critic_priorities(pred, target, "categorical")
    if not case.D:
        return (pred, target), p + EPS
    features = torch.randn(*lead, case.N, case.D, device=device, generator=g)
    return (pred, target, features), critic_priorities(pred, target, case.loss, features=features) + EPS


def variants(case: Case, inputs: tuple, ready: torch.Tensor) -> dict:
    b = case.B
    if case.loss == "priority":
        (p,) = inputs
        laber = lambda: laber_downsample(p, b, eps=EPS)  # noqa: E731
        priority = lambda: p + EPS  # noqa: E731
    else:
        pred, target, *features = inputs
        h = features[0] if features else None
        rung = {"surrogate": "last-layer", "features": h} if features else {}
        laber = lambda: laber_select(pred, target, b, loss=case.loss, eps=EPS, **rung)  # noqa: E731
        priority = lambda: critic_priorities(pred, target, case.loss, features=h).add_(EPS)  # noqa: E731

    def naive():
        p = priority()
        index = torch.multinomial(p, b, replacement=True)
        return index, importance_weights(p, index, "mean")

    fns = {"laber": laber, "naive": naive, "multinomial": lambda: torch.multinomial(ready, b, replacement=True)}
    if ready.is_cuda and differs_from_large_shape(case):
        fns[LARGE_SHAPE] = large_shape_call(case, inputs)
    return fns


def large_shape_call(case: Case, inputs: tuple):
    """The fused kernel on ``case``'s inputs under the large-N rules (``launch_laber(shape="large")``, as
    the public call launches it but for the plan), with a random state of its own."""
    from torchsample.codes import Weighting
    from torchsample.kernels import laber

    rows = (case.C, case.N, case.K)
    pred, *rest = (t.reshape(*rows) for t in inputs[:2])
    target = rest[0] if rest else pred
    h = inputs[2].reshape(case.C, case.N, case.D) if case.D else None
    state = laber.new_rng_state(pred.device)
    loss, mean = LOSS_CODES[case.loss], int(Weighting.MEAN)
    return lambda: laber.launch_laber(
        pred, target, h, state, case.B, loss, mean, EPS, 1.0, True, traceable=False, shape="large"
    )


def input_bytes(case: Case, variant: str, inputs: tuple, ready: torch.Tensor) -> int:
    tensors = (ready,) if variant == "multinomial" else inputs
    return sum(t.numel() * t.element_size() for t in tensors)


def time_case(case: Case, device, samples: int, graphs: bool) -> list[dict]:
    """Rows for one case: each variant eager (and in a CUDA graph), interleaved within each mode."""
    inputs, ready = make_inputs(case, device)
    fns = variants(case, inputs, ready)
    rows = []
    for mode in ("eager", "graph") if graphs else ("eager",):
        timed, notes = {}, {}
        for name, fn in fns.items():
            if mode == "eager" and name == LARGE_SHAPE:
                continue  # the plan is GPU work: compared in a graph, where the host path does not count
            try:
                if mode == "eager":
                    timed[name] = repeat(fn, calls_for(fn, device))
                else:  # more calls per replay: a graph's own launch (a few us) stays a small part of a sample
                    calls = calls_for(fn, device, target_seconds=1e-3)
                    # The first H200 run replayed 2-7 calls a graph at N <= 16k (its eager call took 230-520
                    # us), so a few us of the graph's own launch went into each call's time, more where
                    # fewer calls: at least GRAPH_MIN_CALLS there.
                    timed[name] = cuda_graph(fn, max(calls, GRAPH_MIN_CALLS) if case.N <= SMALL_N else calls)
            except Exception as err:  # keep going: the row says what failed
                notes[name] = f"failed: {type(err).__name__}: {str(err)[:200]}"
                print(f"  FAILED {case.label} {name} {mode}: {notes[name]}", flush=True)
                traceback.print_exc(limit=-2)
        try:
            timings: dict[str, Timing] = time_interleaved(timed, samples=samples, warmup=3, device=device)
        except Exception as err:
            timings = {}
            for name in timed:
                notes[name] = f"failed while timing: {type(err).__name__}: {str(err)[:200]}"
            print(f"  FAILED {case.label} {mode}: {notes[next(iter(timed), 'laber')]}", flush=True)
        naive = timings.get("naive")
        for name in fns:
            if name not in timed and name not in notes:
                continue  # not run in this mode
            row = {
                "sweep": case.sweep,
                "score": case.kind,
                "C": case.C,
                "N": case.N,
                "B": case.B,
                "K": case.K,
                "variant": name,
                "mode": mode,
                **plan_columns(case, name),
                "note": notes.get(name, ""),
            }
            t = timings.get(name)
            if t is not None:
                row.update(
                    median_us=t.us,
                    q20_us=t.q20 * 1e6,
                    q80_us=t.q80 * 1e6,
                    calls=getattr(timed[name], "calls", 1),
                    draws_per_s=case.C * case.B / t.median,
                    input_GBps=input_bytes(case, name, inputs, ready) / t.median / 1e9,
                    time_vs_naive=t.median / naive.median if naive else "",
                )
            rows.append(row)
        del timed
    del inputs, ready, fns
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()  # the graphs' memory pools
    return rows


def print_case(case: Case, rows: list[dict]) -> None:
    by = {(r["variant"], r["mode"]): r for r in rows}
    for mode in ("eager", "graph"):
        if ("laber", mode) not in by:
            continue
        us = {v: by[v, mode].get("median_us") for v in VARIANTS}
        speedup = us["naive"] / us["laber"] if us["naive"] and us["laber"] else None
        gbps = by["laber", mode].get("input_GBps")
        print(
            f"| {case.sweep} | {case.kind} | {case.C} | {case.N} | {case.B} | {case.K} | {mode} | {fmt(us['laber'])} | "
            f"{fmt(us['naive'])} | {fmt(us['multinomial'])} | {fmt(speedup, 2)} | {fmt(gbps, 1)} |",
            flush=True,
        )


# ---------------------------------------------------------------------------------------------
# Bandwidth floor


def bandwidth_floor(device, n: int, b: int, samples: int) -> list[dict]:
    """``laber_downsample`` on cold caches against one read of the priorities + ``B`` searches."""
    g = torch.Generator(device=device).manual_seed(1)
    p = torch.rand(n, device=device, generator=g)
    dst = torch.empty_like(p)
    cdf = torch.cumsum(p, 0)
    u = torch.rand(b, device=device, generator=g) * cdf[-1]
    fns = {
        "laber": lambda: laber_downsample(p, b, eps=EPS),
        "copy": lambda: dst.copy_(p),
        "search": lambda: torch.searchsorted(cdf, u),
    }
    t = time_interleaved(
        fns,
        samples=samples,
        warmup=5,
        device=device,
        flush_l2=True,
        progress=f"bandwidth floor: N={n}, B={b}, cold L2 ...",
    )
    nbytes = p.numel() * p.element_size()
    bandwidth = 2 * nbytes / t["copy"].median  # copy_ reads and writes nbytes
    read = nbytes / bandwidth
    floor = read + t["search"].median
    ratio = t["laber"].median / floor
    base = {"sweep": "floor", "score": "priority", "C": 1, "N": n, "B": b, "K": 1, "mode": "cold"}
    rows = [
        {
            **base,
            "variant": "copy",
            "median_us": t["copy"].us,
            "input_GBps": bandwidth / 1e9,
            "note": f"copy_ of {nbytes} bytes; GBps = 2 * bytes / time (read + write)",
        },
        {**base, "variant": "search", "median_us": t["search"].us, "note": f"torch.searchsorted of {b} uniforms"},
        {
            **base,
            "variant": "floor",
            "median_us": floor * 1e6,
            "input_GBps": nbytes / floor / 1e9,
            "note": f"one read of the priorities at copy bandwidth ({read * 1e6:.1f} us) + the searches",
        },
        {
            **base,
            "variant": "laber",
            "median_us": t["laber"].us,
            "input_GBps": nbytes / t["laber"].median / 1e9,
            "value": ratio,
            "note": f"value = laber / floor; target <= {FLOOR_TARGET:g}",
        },
    ]
    print(
        f"copy bandwidth {bandwidth / 1e9:.0f} GB/s: read {read * 1e6:.1f} us + searches {t['search'].us:.1f} us "
        f"= floor {floor * 1e6:.1f} us; laber_downsample {t['laber'].us:.1f} us = {ratio:.2f} x floor "
        f"(target <= {FLOOR_TARGET:g}: {'met' if ratio <= FLOOR_TARGET else 'NOT met'})",
        flush=True,
    )
    return rows


# ---------------------------------------------------------------------------------------------
# Exactness


def exactness_priorities(n: int, device) -> torch.Tensor:
    """``[2, n]``: log-uniform over 6 decades, every 1000th item zero; row 1 is row 0 reversed."""
    g = torch.Generator(device="cpu").manual_seed(2)
    p = torch.pow(10.0, -6.0 * torch.rand(n, generator=g, dtype=torch.float64))
    p[::1000] = 0.0
    return torch.stack([p, p.flip(0)]).float().to(device)


def exactness(device, n: int, b: int, draws_per_item: int, graph: bool, variant: str = "laber") -> list[dict]:
    """Chi-square of index counts against ``P(i)``; zero items never drawn; rows independent; weights.

    ``variant="multinomial"`` runs the same checks on ``torch.multinomial`` (a reference: it sums
    in float32 too), weights left out.
    """
    from scipy import stats

    print(
        f"exactness of {variant} ({'graph replays' if graph else 'eager'}): N = {n}, C = 2, B = {b}, "
        f"about {draws_per_item} draws per item",
        flush=True,
    )
    p = exactness_priorities(n, device)
    counts = torch.zeros(2, n, dtype=torch.int64, device=device)
    ones = torch.ones(2, b, dtype=torch.int64, device=device)
    if variant == "laber":
        draw = lambda: laber_downsample(p, b, eps=0.0).index  # noqa: E731
    else:
        draw = lambda: torch.multinomial(p, b, replacement=True)  # noqa: E731

    def draw_and_count():
        counts.scatter_add_(1, draw(), ones)

    calls = max(1, draws_per_item * n // b)
    if graph:
        replay = cuda_graph(draw_and_count, calls=1)
        counts.zero_()  # the warm-up and capture counted too
        for _ in range(calls):
            replay()
    else:
        for _ in range(calls):
            draw_and_count()
    index = draw().cpu()
    observed = counts.double().cpu()
    p64 = p.double().cpu()
    prob = p64 / p64.sum(1, keepdim=True)
    total = observed.sum(1, keepdim=True)
    expected = prob * total

    # Coarse cells: 1024 contiguous cells per row.
    cells = 1024
    oc, ec = observed.view(2, cells, -1).sum(-1), expected.view(2, cells, -1).sum(-1)
    coarse = ((oc - ec) ** 2 / ec).sum().item()
    coarse_dof = 2 * (cells - 1)
    # Single items with expected >= 5; the rest pooled into one cell per row.
    big = expected >= 5
    fine = (((observed - expected) ** 2 / expected.clamp_min(1e-300))[big]).sum().item()
    pooled_o, pooled_e = (observed * ~big).sum(1), (expected * ~big).sum(1)
    fine += (((pooled_o - pooled_e) ** 2 / pooled_e.clamp_min(1e-300))[pooled_e > 0]).sum().item()
    fine_dof = int(big.sum().item()) + int((pooled_e > 0).sum().item()) - 2
    zero_draws = int(observed[p64 == 0].sum().item())
    # Independent rows: row 1 is row 0 reversed, so shared uniforms would mirror the indices.
    mirrored = (index[1] == n - 1 - index[0]).double().mean().item()
    mirrored_expected = (prob[0] * prob[0].flip(0)).sum().item()

    mode = "graph" if graph else "eager"
    base = {"sweep": "exactness", "score": "priority", "C": 2, "N": n, "B": b, "K": 1, "variant": variant, "mode": mode}
    checks = [
        (
            "chisquare-cells",
            stats.chi2.sf(coarse, coarse_dof),
            f"chi2 {coarse:.1f}, dof {coarse_dof}, {int(total.sum())} draws; value = p-value, pass > {P_VALUE_FLOOR:g}",
        ),
        (
            "chisquare-items",
            stats.chi2.sf(fine, fine_dof),
            f"chi2 {fine:.1f}, dof {fine_dof}; value = p-value, pass > {P_VALUE_FLOOR:g}",
        ),
        ("zero-priority-draws", zero_draws, "value = draws of items with p = 0; pass = 0"),
        (
            "mirrored-draws",
            mirrored,
            f"value = share of b with index[1, b] == N-1-index[0, b]; independent rows: "
            f"{mirrored_expected:.2g}; pass < 0.01",
        ),
    ]
    if variant == "laber":
        out = laber_downsample(p, b, eps=0.0)
        weight_expected = p64.mean(1, keepdim=True) / p64.gather(1, out.index.cpu())
        weight_error = ((out.weight.double().cpu() - weight_expected).abs() / weight_expected).max().item()
        checks.append(
            ("weight-rel-error", weight_error, "value = max relative error of w against mean(p)/p_i; pass < 1e-4")
        )
    rows = []
    for name, value, note in checks:
        ok = {
            "chisquare-cells": value > P_VALUE_FLOOR,
            "chisquare-items": value > P_VALUE_FLOOR,
            "zero-priority-draws": value == 0,
            "mirrored-draws": value < 0.01,
            "weight-rel-error": value < 1e-4,
        }[name]
        rows.append(
            {**base, "sweep": f"exactness:{name}", "value": value, "note": ("pass; " if ok else "FAIL; ") + note}
        )
        print(f"  {variant} {mode} {name}: {value:.4g} ({'pass' if ok else 'FAIL'}; {note})", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------


def failures(rows: list[dict]) -> list[str]:
    """Timings of the fused op that failed and checks it failed (a missed target is not a failure)."""
    failed = [
        f"{r['sweep']} {r.get('score')} N={r.get('N')} {r['mode']}: {r['note']}"
        for r in rows
        if r["variant"] == "laber" and str(r.get("note", "")).startswith("failed")
    ]
    return failed + [
        f"{r['sweep']} {r['mode']}: {r['note']}"
        for r in rows
        if r["variant"] == "laber" and str(r.get("note", "")).startswith("FAIL")
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer sizes and samples")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cuda or cpu (a small smoke run)")
    parser.add_argument("--samples", type=int, default=None, help="timed samples per variant (default 100, quick 30)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="CSV path (default runs/perf/kernel_<device>.csv, or perf/results/ with UPDATE_RESULTS=1)",
    )
    args = parser.parse_args()
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        print("bench_kernel: --device cuda, but torch sees no CUDA device: nothing to measure.")
        return
    if args.device == "auto" and not cuda:
        print(
            "bench_kernel: no CUDA device; this benchmark is for the GPU (the fused kernel). "
            "`--device cpu` runs a small CPU version of it as a smoke test."
        )
        return
    torch.set_num_threads(1)
    torch.manual_seed(0)
    samples = args.samples or (30 if args.quick or not cuda else 100)
    env = environment(device)
    out = args.out or RESULTS / f"kernel_{device.type}.csv"
    print(
        f"{describe(env)}\nmedians of {samples} interleaved samples; eager: back-to-back calls; "
        f"graph: calls inside a replayed CUDA graph\n",
        flush=True,
    )
    rows = []
    print(
        "| sweep | score | C | N | B | K | mode | laber (us) | naive (us) | multinomial (us) | naive / laber | "
        "laber GB/s |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        flush=True,
    )
    for case in cases(args.quick, cuda):
        case_rows = time_case(case, device, samples, graphs=cuda)
        print_case(case, case_rows)
        rows += case_rows
        write_csv(out, rows, COLUMNS, env)  # after each case: a run cut short keeps what it measured
    print()
    n, b, per_item = (2**20, 65536, 64) if cuda else (2**14, 4096, 16)
    checks = [("bandwidth floor", lambda: bandwidth_floor(device, 2**22 if cuda else 2**18, b, samples))]
    for graph in (False, True) if cuda else (False,):
        checks.append(
            (f"exactness {'graph' if graph else 'eager'}", lambda graph=graph: exactness(device, n, b, per_item, graph))
        )
    checks.append(("exactness of torch.multinomial", lambda: exactness(device, n, b, per_item, False, "multinomial")))
    for name, check in checks:
        try:
            rows += check()
        except Exception as err:
            print(f"FAILED {name}: {type(err).__name__}: {err}", flush=True)
            traceback.print_exc(limit=-3)
            rows.append(
                {
                    "sweep": name.replace(" ", "-"),
                    "variant": "laber" if "multinomial" not in name else "multinomial",
                    "mode": "",
                    "note": f"FAIL; {type(err).__name__}: {str(err)[:200]}",
                }
            )
        write_csv(out, rows, COLUMNS, env)
    print("\n" + "\n".join(kernel_section(read_csv(out))))  # the table, the targets, the checks
    print(f"CSV: {out}")
    failed = failures(rows)
    if failed:
        print("FAILED:\n" + "\n".join(f"- {f}" for f in failed))
        sys.exit(1)


if __name__ == "__main__":
    main()
