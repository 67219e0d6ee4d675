"""The fused LaBER kernel: numerics against the reference, ahead-of-time compilation and its PTX,
the CUDA dispatch, and (on a GPU) CUDA graphs and devices.

``TRITON_INTERPRET`` is read when ``triton.jit`` decorates a kernel, so the interpreter cases
(``laber_cases.py``) run in a subprocess with it set, while this process keeps the real JIT
functions that ``triton.compile`` needs. On a CUDA machine the same cases also run compiled, on the
device.

The interpreter runs one program after another, so it cannot show races between the threads of a
program or between programs. Those are checked in the sm_90 PTX: Triton places barriers for shared
memory only, so a value that a thread stores to global memory and another thread of the same
program loads back needs a ``bar.sync`` in between, and a program that reads what other programs
wrote needs their stores released before, and its loads acquired after, the ticket.
"""
import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import requires_cuda

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from torchsample.codes import LossKind as L  # noqa: E402
from torchsample.codes import Surrogate as S  # noqa: E402
from torchsample.codes import Weighting as W  # noqa: E402
from torchsample.kernels.laber import block_sizes, laber_fused_kernel, new_rng_state  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CASES = Path(__file__).with_name("laber_cases.py")
ALPHA = 1e-4


def run_cases(interpret: bool) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
        env["CUDA_VISIBLE_DEVICES"] = ""  # the interpreter runs on CPU tensors
    proc = subprocess.run([sys.executable, "-m", "pytest", str(CASES), "-q", "-p", "no:cacheprovider", "-W", "error::RuntimeWarning"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout


@pytest.mark.slow
def test_kernel_under_the_interpreter_matches_reference():
    run_cases(interpret=True)


@pytest.mark.gpu
@requires_cuda
def test_kernel_on_cuda_matches_reference():
    run_cases(interpret=False)


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compilation, and what its PTX shows

SIGNATURE = {
    "pred_ptr": "*fp32", "target_ptr": "*fp32", "h_ptr": "*fp32", "priority_ptr": "*fp32", "scratch_ptr": "*fp64",
    "index_ptr": "*i64", "weight_ptr": "*fp32", "state_ptr": "*i64", "C": "i32", "N": "i32", "K": "i32", "D": "i32",
    "B": "i32", "n_tiles": "i32", "n_slots": "i32", "eps": "fp32", "huber_delta": "fp32", "tile_steps": "i32",
    "stride_pc": "i64", "stride_pn": "i64", "stride_pk": "i64", "stride_tc": "i64", "stride_tn": "i64",
    "stride_tk": "i64", "stride_hc": "i64", "stride_hn": "i64", "stride_hd": "i64", "LOSS": "constexpr",
    "SURROGATE": "constexpr", "WEIGHTING": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr",
    "BLOCK_D": "constexpr", "CHUNK": "constexpr", "BLOCK_B": "constexpr", "BLOCK_T": "constexpr",
}
PARAM = {name: i for i, name in enumerate(SIGNATURE)}
# Every branch of the three constexprs at least once, both warp counts, full tiles and partial ones,
# low-precision inputs on three of them; the last-layer rung (D features a row) on a scalar loss and
# on the categorical one (the MinAtar network's D = 128, a MuJoCo critic's 256).
VARIANTS = [
    pytest.param(L.PRIORITY, W.MEAN, 1, 100_000, 32, "fp32", 0, id="priority-mean-N100000-fp32"),
    pytest.param(L.L2, W.LAZY, 1, 1000, 32, "fp16", 0, id="l2-lazy-N1000-fp16"),
    pytest.param(L.HUBER, W.MAX, 1, 1000, 4096, "fp32", 0, id="huber-max-B4096-fp32"),
    pytest.param(L.CATEGORICAL, W.MEAN, 51, 1000, 32, "bf16", 0, id="categorical-mean-K51-bf16"),
    pytest.param(L.HUBER, W.MEAN, 1, 100_000, 256, "bf16", 256, id="last-layer-huber-mean-D256-bf16"),
    pytest.param(L.CATEGORICAL, W.MAX, 51, 1000, 32, "fp32", 128, id="last-layer-categorical-max-K51-D128-fp32"),
]


@functools.cache
def compile_for(arch: int, loss: int, weighting: int, K: int, N: int, B: int, dtype: str, D: int):
    signature = {**SIGNATURE, "pred_ptr": f"*{dtype}", "target_ptr": f"*{dtype}", "h_ptr": f"*{dtype}"}
    blocks = block_sizes(N, K, B, loss, D)
    num_warps = blocks.pop("num_warps")
    surrogate = S.LAST_LAYER if D else S.OUTPUT
    constexprs = {"LOSS": int(loss), "SURROGATE": int(surrogate), "WEIGHTING": int(weighting), **blocks}
    return triton.compile(ASTSource(fn=laber_fused_kernel, signature=signature, constexprs=constexprs),
                          target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})


def skip_if_interpreted():
    if not isinstance(laber_fused_kernel, triton.runtime.JITFunction):
        pytest.skip("TRITON_INTERPRET is set in this process")


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90], ids=["sm80", "sm90"])
@pytest.mark.parametrize("loss, weighting, K, N, B, dtype, D", VARIANTS)
def test_kernel_compiles_ahead_of_time(arch, loss, weighting, K, N, B, dtype, D):
    skip_if_interpreted()
    compiled = compile_for(arch, loss, weighting, K, N, B, dtype, D)
    assert f".target sm_{arch}" in compiled.asm["ptx"]
    assert len(compiled.asm["cubin"]) > 1000


_LOAD_PARAM = re.compile(r"ld\.param\.\w+\s+(%\w+),\s*\[\w+_param_(\d+)\]")
_REGISTER = re.compile(r"%[a-z]+\d+")
_PREDICATE = re.compile(r"^@!?%p\d+\s+")


def global_accesses(ptx: str) -> list[tuple[str, str, set]]:
    """``(instruction, kind, params)`` of each ``bar.sync`` and global load, store and atomic of
    ``ptx``, in text order; ``params``: the pointer parameters its address derives from, by a
    flow-insensitive propagation through every instruction but loads (a loaded value is data), so
    empty for an address that went through shared memory (a layout conversion)."""
    lines = [_PREDICATE.sub("", line.split("//")[0].strip()) for line in ptx.splitlines()]
    derived: dict[str, set] = {}
    for line in lines:
        if match := _LOAD_PARAM.search(line):
            derived.setdefault(match.group(1), set()).add(int(match.group(2)))
    changed = True
    while changed:
        changed = False
        for line in lines:
            if not line or line.startswith(("ld.", "st.", "atom.", "bra", "bar", "setp", ".", "$", "{", "}")):
                continue
            registers = _REGISTER.findall(line)
            if len(registers) < 2:
                continue
            sources = set().union(*(derived.get(r, set()) for r in registers[1:]))
            if not sources <= derived.setdefault(registers[0], set()):
                derived[registers[0]] |= sources
                changed = True
    accesses = []
    for line in lines:
        if line.startswith("bar.sync"):
            accesses.append((line, "bar", set()))
        elif line.startswith(("ld.global", "st.global", "atom.global")):
            address = re.search(r"\[\s*(%\w+)", line).group(1)
            accesses.append((line, line.split(".")[0], derived.get(address, set())))
    return accesses


def unsynced_reloads(ptx: str, buffers: set) -> list[str]:
    """Loads from a buffer that the kernel stored to earlier (in text order) with no ``bar.sync``
    in between: another thread may read before the store lands. An access of unknown address
    counts as touching every buffer. (A loop-carried reuse would need a flow-sensitive walk; the
    kernel has none.)"""
    stored, found = set(), []
    for line, kind, params in global_accesses(ptx):
        params = params or set(buffers)
        if kind == "bar":
            stored.clear()
        elif kind == "st":
            stored |= params & buffers
        elif kind == "ld" and params & stored:
            found.append(line)
    return found


@pytest.mark.slow
@pytest.mark.parametrize("loss, weighting, K, N, B, dtype, D", VARIANTS)
def test_sm90_ptx_orders_memory(loss, weighting, K, N, B, dtype, D):
    """Issue 10, items 1, 2 and 6, read in the sm_90 PTX.

    1. Mean and lazy weights come from registers: nothing loads the index or weight outputs back;
       max reads its stored picks back only after a ``bar.sync``.
    2. Every store to the priorities and the scratch (chunk prefixes, tile prefix) is followed by
       a ``bar.sync`` before any load from them (the tile's own search, the prefix pass).
    6. The arrival ticket is ``atom.acq_rel.gpu``, with a ``bar.sync`` between the tile's last
       store and it (the release covers every thread's stores) and between it and the first load of
       what other programs wrote (every thread's loads come after the acquire).
    """
    skip_if_interpreted()
    ptx = compile_for(90, loss, weighting, K, N, B, dtype, D).asm["ptx"]
    outputs = {PARAM["priority_ptr"], PARAM["scratch_ptr"], PARAM["index_ptr"], PARAM["weight_ptr"]}
    assert unsynced_reloads(ptx, outputs) == []
    accesses = global_accesses(ptx)
    reloads = [line for line, kind, params in accesses
               if kind == "ld" and params & {PARAM["index_ptr"], PARAM["weight_ptr"]}]
    assert (reloads == []) == (weighting != W.MAX)
    atomics = [i for i, (_, kind, _) in enumerate(accesses) if kind == "atom"]
    assert len(atomics) == 2 and all(".gpu.acq_rel." in accesses[i][0] for i in atomics)  # arrival, rows done
    tile_data = {PARAM["priority_ptr"], PARAM["scratch_ptr"]}
    arrival = atomics[0]
    last_store = max(i for i, (_, kind, params) in enumerate(accesses[:arrival]) if kind == "st" and params & tile_data)
    first_load = min(i for i, (_, kind, params) in enumerate(accesses)
                     if i > arrival and kind == "ld" and params & tile_data)
    assert any(kind == "bar" for _, kind, _ in accesses[last_store:arrival])
    assert any(kind == "bar" for _, kind, _ in accesses[arrival:first_load])


# ---------------------------------------------------------------------------------------------
# The CUDA dispatch, traced with fake CUDA tensors (no GPU needed)


@pytest.mark.parametrize("state", ["default", "explicit"])
@pytest.mark.parametrize("op", ["downsample", "select-huber", "select-categorical", "select-last-layer"])
def test_cuda_dispatch_is_one_fused_op(op, state, monkeypatch):
    """The CUDA path of the public ops is a single ``torchsample::laber_fused`` call, with a fake
    implementation that gives the right shapes, on the caller's ``rng_state`` if given (else the
    device's default state)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    import torchsample.kernels.laber as laber_module
    from torchsample import laber_downsample, laber_select

    def fn(x, y, rng_state):
        if state == "default":
            monkeypatch.setitem(laber_module._STATES, x.device, rng_state)
        kwargs = {"rng_state": rng_state} if state == "explicit" else {}
        if op == "downsample":
            out = laber_downsample(x, 32, weighting="max", **kwargs)
        elif op == "select-last-layer":
            out = laber_select(x, y, 32, loss="huber", surrogate="last-layer", features=h, **kwargs)
        else:
            out = laber_select(x, y, 32, loss=op.split("-")[1], **kwargs)
        return out.index, out.weight, out.priority

    shape = (2, 128, 51) if op == "select-categorical" else (2, 128)
    with FakeTensorMode():
        x, y = torch.empty(shape, device="cuda"), torch.empty(shape, device="cuda")
        h = torch.empty(2, 128, 64, device="cuda", dtype=torch.bfloat16)
        rng_state = torch.empty(3 + 64, dtype=torch.int64, device="cuda")
        graph = make_fx(fn)(x, y, rng_state)
        index, weight, priority = graph(x, y, rng_state)
    calls = [n for n in graph.graph.nodes if n.op == "call_function"]
    fused = [n for n in calls if n.target == torch.ops.torchsample.laber_fused.default]
    assert len(fused) == 1 and fused[0].args[3].name == list(graph.graph.nodes)[2].name  # the state given
    assert (fused[0].args[2] is None) == (op != "select-last-layer")  # the features, for the last-layer rung
    assert not [n for n in calls if "multinomial" in str(n.target) or "cumsum" in str(n.target)]
    assert index.shape == weight.shape == (2, 32) and index.dtype == torch.int64 and priority.shape == (2, 128)


@pytest.mark.parametrize(
    "make_state, with_generator, error, match",
    [
        (lambda: torch.empty(3, dtype=torch.int64, device="cuda"), False, TypeError,
         r"rng_state must be an int64 \[3 \+ S\]"),
        (lambda: torch.empty(67, dtype=torch.float32, device="cuda"), False, TypeError, "rng_state must be an int64"),
        (lambda: torch.empty(67, dtype=torch.int64), False, ValueError, "rng_state is on cpu"),
        (lambda: torch.empty(67, dtype=torch.int64, device="cuda"), True, ValueError, "not both"),
    ],
    ids=["short", "dtype", "device", "with-generator"],
)
def test_cuda_rng_state_bad_input(make_state, with_generator, error, match):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from torchsample import laber_downsample

    generator = torch.Generator() if with_generator else None
    with FakeTensorMode():
        p = torch.empty(2, 128, device="cuda")
        with pytest.raises(error, match=match):
            laber_downsample(p, 32, rng_state=make_state(), generator=generator)


# ---------------------------------------------------------------------------------------------
# On a GPU: devices, CUDA graphs, torch.compile(mode="reduce-overhead")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_a_non_current_gpu_launches_on_its_own_device():
    from torchsample import laber_downsample

    p = torch.rand(2, 20_000, device="cuda:1")

    def draw():
        return laber_downsample(p, 512, eps=0.0, rng_state=new_rng_state("cuda:1", torch.Generator().manual_seed(0)))

    with torch.cuda.device(0):
        out = draw()
    torch.cuda.synchronize(1)
    with torch.cuda.device(1):
        expected = draw()
    assert out.index.device == p.device
    assert torch.equal(out.index, expected.index) and torch.equal(out.weight, expected.weight)


def _check_draws(draws: list, p: torch.Tensor) -> None:
    """Each replay drew afresh, and all of them together follow ``p`` row by row."""
    from tests.kernels.laber_cases import coarse_chi_square_pvalue

    assert all(not torch.equal(a, b) for a, b in zip(draws, draws[1:])), "a replay repeated the draws"
    index = torch.stack(draws)  # [replays, C, B]
    for c in range(p.shape[0]):
        assert coarse_chi_square_pvalue(index[:, c], p[c]) > ALPHA


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("N", [1000, 20_000], ids=["one-tile", "five-tiles"])
def test_draws_in_a_captured_cuda_graph_are_fresh_each_replay(N):
    from torchsample import laber_downsample

    C, B, replays = 2, 4096, 8
    p = torch.rand(C, N, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    p[:, ::5] = 0.0
    state = new_rng_state("cuda", torch.Generator().manual_seed(1))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        laber_downsample(p, B, eps=0.0, rng_state=state)  # compiles the kernel outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = laber_downsample(p, B, eps=0.0, rng_state=state)
    counter = state[1].item()
    draws = []
    for _ in range(replays):
        graph.replay()
        draws.append(out.index.clone())
    assert state[1].item() == counter + replays * C * B and (state[2:] == 0).all()
    _check_draws(draws, p)


@pytest.mark.gpu
@pytest.mark.slow
@requires_cuda
def test_draws_under_reduce_overhead_are_fresh_each_call():
    """A module that owns its state as a buffer, created eagerly: CUDA graph trees accept the
    kernel's mutation of it, record no skip, and every call draws afresh."""
    from torch._dynamo.utils import counters

    from torchsample import laber_downsample

    C, N, B, calls = 2, 20_000, 4096, 8

    class Sampler(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("rng_state", new_rng_state("cpu", torch.Generator().manual_seed(2)))

        def forward(self, p):
            out = laber_downsample(p, B, eps=0.0, rng_state=self.rng_state)
            return out.index, out.weight

    torch._dynamo.reset()
    counters.clear()
    sampler = Sampler().cuda()
    step = torch.compile(sampler, mode="reduce-overhead", fullgraph=True)
    p = torch.rand(C, N, device="cuda", generator=torch.Generator("cuda").manual_seed(3))
    p[:, ::5] = 0.0
    draws = [step(p)[0].clone() for _ in range(calls)]
    assert counters["inductor"]["cudagraph_skips"] == 0
    assert sampler.rng_state[1].item() == calls * C * B and (sampler.rng_state[2:] == 0).all()
    _check_draws(draws, p)
