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
from torchsample.codes import Weighting as W  # noqa: E402
from torchsample.kernels.laber import laber_fused_kernel, new_rng_state  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CASES = Path(__file__).with_name("laber_cases.py")
ALPHA = 1e-4


def run_cases(interpret: bool) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
        env["CUDA_VISIBLE_DEVICES"] = ""  # the interpreter runs on CPU tensors
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(CASES), "-q", "-p", "no:cacheprovider", "-W", "error::RuntimeWarning"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
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

# Every branch of the three constexprs at least once, both warp counts, full tiles and partial ones,
# low-precision inputs on three of them; the last-layer rung (D features a row) on a scalar loss and
# on the categorical one (the MinAtar network's D = 128, a MuJoCo critic's 256); many draws, which
# take the second launch (laber_draw_kernel), with each weighting.
VARIANTS = [
    pytest.param(L.PRIORITY, W.MEAN, 1, 100_000, 32, "fp32", 0, id="priority-mean-N100000-fp32"),
    pytest.param(L.L2, W.LAZY, 1, 1000, 32, "fp16", 0, id="l2-lazy-N1000-fp16"),
    pytest.param(L.HUBER, W.MAX, 1, 1000, 1024, "fp32", 0, id="huber-max-B1024-fp32"),
    pytest.param(L.CATEGORICAL, W.MEAN, 51, 1000, 32, "bf16", 0, id="categorical-mean-K51-bf16"),
    pytest.param(L.HUBER, W.MEAN, 1, 100_000, 256, "bf16", 256, id="last-layer-huber-mean-D256-bf16"),
    pytest.param(L.CATEGORICAL, W.MAX, 51, 1000, 32, "fp32", 128, id="last-layer-categorical-max-K51-D128-fp32"),
    pytest.param(L.PRIORITY, W.MAX, 1, 4_194_304, 65536, "fp32", 0, id="priority-max-N4M-B65536-split"),
    pytest.param(L.L2, W.LAZY, 1, 1000, 4096, "fp16", 0, id="l2-lazy-B4096-split"),
]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def launch_arguments(loss, weighting, C, K, N, B, dtype="fp32", D=0) -> list:
    """``(kernel, args, kwargs)`` of every launch :func:`launch_laber` makes for these inputs, recorded
    instead of launched (CPU tensors: nothing here needs a GPU)."""
    from torchsample.kernels import laber

    pred = torch.zeros(C, N, K, dtype=DTYPES[dtype])
    features = torch.zeros(C, N, D, dtype=DTYPES[dtype]) if D else None
    launches = []

    def recording(kernel):
        class Launcher:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: launches.append((kernel, args, kwargs))

        return Launcher()

    original = laber.wrap_triton
    laber.wrap_triton = recording
    try:
        laber.launch_laber(pred, pred, features, new_rng_state("cpu"), B, loss, weighting, 1e-6, 1.0)
    finally:
        laber.wrap_triton = original
    return launches


def compile_launch(kernel, args, kwargs, arch: int, ints: str = "runtime", until: str = "cubin"):
    """``triton.compile`` of one recorded launch for ``sm_<arch>``, no GPU needed. ``ints``:

    * ``"runtime"``: every int argument a runtime ``i32``/``i64`` (no specialisation);
    * ``"specialised"``: what Triton's JIT compiles for these arguments at launch (ints equal to 1 as
      constexprs, divisibility by 16 of ints and pointers), derived by Triton's own binder;
    * ``"constants"``: every int argument a constexpr, as Inductor passes them when it analyses a
      user kernel under torch.compile.

    ``until="ttir"`` stops after Triton's front end (where a constexpr int breaks a kernel).
    """
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import mangle_type

    target = GPUTarget("cuda", arch, 32)
    options = {k: v for k, v in kwargs.items() if k in ("num_warps",)}
    kwargs = {k: v for k, v in kwargs.items() if k not in options}
    bound = dict(zip(kernel.arg_names, args)) | kwargs
    attrs = {}
    if ints == "specialised":
        from triton.runtime.jit import create_function_from_signature

        backend = make_backend(target)
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        bound_args, specialization, launch_options = binder(*args, **kwargs, **options)
        parsed, signature, constexprs, attrs = kernel._pack_args(
            backend, {**kwargs, **options}, bound_args, specialization, launch_options
        )
        constexprs = {kernel.arg_names[path[0]]: value for path, value in constexprs.items()}
    else:
        signature, constexprs = {}, {}
        for param, name in zip(kernel.params, kernel.arg_names):
            value = bound[name]
            if param.is_constexpr or ints == "constants" and isinstance(value, int) and not isinstance(value, bool):
                signature[name], constexprs[name] = "constexpr", value
            else:
                signature[name] = mangle_type(value)
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    if until == "ttir":
        import triton._C.libtriton as libtriton

        context = libtriton.ir.context()
        backend = make_backend(target)
        libtriton.ir.load_dialects(context)
        backend.load_dialects(context)
        opts = backend.parse_options(options)
        return source.make_ir(target, opts, backend.get_codegen_implementation(opts), backend.get_module_map(), context)
    return triton.compile(source, target=target, options=options)


@functools.cache
def compile_for(arch: int, loss: int, weighting: int, K: int, N: int, B: int, dtype: str, D: int) -> tuple:
    """The compiled kernels of one call (one, or two when the draws take their own launch), every int
    argument a runtime value."""
    return tuple(
        compile_launch(kernel, args, kwargs, arch)
        for kernel, args, kwargs in launch_arguments(loss, weighting, 2, K, N, B, dtype, D)
    )


def skip_if_interpreted():
    if not isinstance(laber_fused_kernel, triton.runtime.JITFunction):
        pytest.skip("TRITON_INTERPRET is set in this process")


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90], ids=["sm80", "sm90"])
@pytest.mark.parametrize("loss, weighting, K, N, B, dtype, D", VARIANTS)
def test_kernel_compiles_ahead_of_time(arch, loss, weighting, K, N, B, dtype, D):
    skip_if_interpreted()
    for compiled in compile_for(arch, loss, weighting, K, N, B, dtype, D):
        assert f".target sm_{arch}" in compiled.asm["ptx"]
        assert len(compiled.asm["cubin"]) > 1000
    assert len(compile_for(arch, loss, weighting, K, N, B, dtype, D)) == (2 if B >= 4096 else 1)


# Shapes whose ints Triton specialises at launch: B, C, N, K, D (and the tiles, strides) equal to 1.
SPECIALISED = [
    pytest.param(1, 1, 1, 1, 0, id="C1-N1-B1"),
    pytest.param(1, 100_000, 1, 1, 0, id="C1-N100000-B1"),  # one row of several tiles
    pytest.param(3, 1, 1, 1, 0, id="C3-N1-B1"),
    pytest.param(1, 128, 51, 1, 0, id="C1-K51-B1"),
    pytest.param(2, 5000, 1, 32, 1, id="C2-D1-B32"),  # the last-layer rung with one feature
    pytest.param(1, 4096, 1, 65536, 0, id="C1-N4096-B65536"),  # the second launch, one row
    pytest.param(2, 16, 1, 16, 16, id="C2-N16-B16-D16"),  # every size divisible by 16
]


@pytest.mark.slow
@pytest.mark.parametrize("weighting", [W.MEAN, W.MAX], ids=lambda w: w.label)
@pytest.mark.parametrize("C, N, K, B, D", SPECIALISED)
def test_kernel_compiles_as_triton_specialises_it_at_launch(C, N, K, B, D, weighting):
    """Issue 24, item 1: the first H200 run failed to compile B = 1, an int Triton turned into a
    constexpr at launch, which an explicit all-``i32`` signature never shows. Here the signature,
    constexprs and divisibility attributes are the ones Triton's own binder derives from the real
    launch arguments, compiled for sm_90."""
    skip_if_interpreted()
    loss = L.CATEGORICAL if K > 1 else L.PRIORITY
    for kernel, args, kwargs in launch_arguments(loss, weighting, C, K, N, B, "fp32", D):
        assert len(compile_launch(kernel, args, kwargs, 90, ints="specialised").asm["cubin"]) > 1000


@pytest.mark.slow
@pytest.mark.parametrize(
    "C, N, K, B, D",
    [
        pytest.param(2, 5000, 1, 32, 16, id="C2-N5000-B32-D16"),
        pytest.param(1, 100_000, 51, 4096, 0, id="C1-N100000-K51-B4096"),
    ],
)
def test_kernel_front_end_takes_every_int_as_a_constant(C, N, K, B, D):
    """Under torch.compile, Inductor's analysis of a user kernel passed B = 32 as a constant, and
    the kernel failed there (the H200 run's ``update_compiled.log``). Every int argument as a
    constexpr, all at once and each one alone."""
    skip_if_interpreted()
    loss = L.CATEGORICAL if K > 1 else L.HUBER
    for kernel, args, kwargs in launch_arguments(loss, W.MAX, C, K, N, B, "fp32", D):
        compile_launch(kernel, args, kwargs, 90, ints="constants", until="ttir")
        ints = [
            i
            for i, (param, arg) in enumerate(zip(kernel.params, args))
            if not param.is_constexpr and isinstance(arg, int)
        ]
        for i in ints:
            alone = tuple(1 if j == i else arg for j, arg in enumerate(args))  # the value Triton specialises
            compile_launch(kernel, alone, kwargs, 90, ints="specialised", until="ttir")


@pytest.mark.slow
def test_inductor_mutation_analysis_reads_the_kernels(monkeypatch):
    """torch.compile's analysis of which tensors a user kernel mutates (its TTIR with torch's own
    argument handling) succeeds: when it fails, Inductor assumes every input is mutated, which broke
    the compiled update on the H200 (torch 2.11). Uses torch's private ``generate_ttir`` with the
    sm_90 target in place of a GPU driver."""
    skip_if_interpreted()
    wrap = pytest.importorskip("torch._higher_order_ops.triton_kernel_wrap")
    if not hasattr(wrap, "generate_ttir"):
        pytest.skip("this torch has no generate_ttir")

    class Driver:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    monkeypatch.setattr(triton.runtime.driver, "_active", Driver(), raising=False)
    if triton.runtime.driver.active.get_current_target() != GPUTarget("cuda", 90, 32):
        pytest.skip("cannot stand in for triton's driver here")
    for kernel, args, kwargs in launch_arguments(L.HUBER, W.MAX, 2, 1, 5000, 4096):
        named = dict(zip(kernel.arg_names, args)) | {k: v for k, v in kwargs.items() if k != "num_warps"}
        module, names = wrap.generate_ttir(kernel, named, {})
        assert "state_ptr" in names and "index_ptr" in names


# What each launch writes: the fused kernel with its draws, without them (DRAW=False), the draw kernel.
WRITES = {
    ("laber_fused_kernel", True): ["index_ptr", "priority_ptr", "scratch_ptr", "state_ptr", "weight_ptr"],
    ("laber_fused_kernel", False): ["priority_ptr", "scratch_ptr", "state_ptr"],
    ("laber_draw_kernel", True): ["index_ptr", "state_ptr", "weight_ptr"],
}


@pytest.mark.slow
@pytest.mark.parametrize("N, B", [(16384, 256), (262144, 32)], ids=["N16384-B256", "N262144-B32"])
def test_compiled_path_analyses_every_launch_in_seconds(N, B):
    """Issue 29, item 1: under torch.compile (torch >= 2.13) Inductor's analysis of the kernels walked
    their IR for minutes (> 30 s a launch at N = 16384, B = 256), then marked every input written. The
    path a compiled call takes before running anything (AOTAutograd's functionalization of the op and
    the analysis of each launch, ``tests/kernels/compile_analysis.py``) finishes for every score type,
    and for the draws in their own launch, well within the subprocess's limit (a hang fails here), and
    each launch writes only its outputs and the random state, never ``pred``, ``target`` or ``h``."""
    skip_if_interpreted()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "tests.kernels.compile_analysis", str(N), str(B)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,  # about 15 s on two busy cores; the unwalkable kernel took minutes per launch
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the compiled path's analysis of the launches did not finish in 240 s")
    assert proc.returncode == 0, proc.stderr[-4000:]
    import json

    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(results) == {
        "priority-mean",
        "l2-lazy-C2",
        "huber-max",
        "categorical-K51",
        "last-layer-huber-D128",
        "huber-max-split",
    }
    for case, launches in results.items():
        split = case.endswith("-split")
        expected = [("laber_fused_kernel", not split)] + ([("laber_draw_kernel", True)] if split else [])
        assert [(kernel, WRITES[kernel, draws]) for kernel, draws in expected] == [
            (kernel, written) for kernel, written, _ in launches
        ], case


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


def ptx_params(loss, D: int) -> dict:
    """The fused kernel's PTX parameter index of each runtime argument: constexprs and the tensors
    passed as ``None`` (``target`` for ready priorities, ``h`` for the output rung) are not parameters."""
    absent = {"target_ptr"} if loss == L.PRIORITY else set()
    absent |= {"h_ptr"} if D == 0 else set()
    names = [
        name
        for name, param in zip(laber_fused_kernel.arg_names, laber_fused_kernel.params)
        if not param.is_constexpr and name not in absent
    ]
    return {name: i for i, name in enumerate(names)}


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
    compiled = compile_for(90, loss, weighting, K, N, B, dtype, D)
    if len(compiled) == 2:
        pytest.skip("the draws take a launch of their own: test_sm90_ptx_of_the_draw_launch")
    ptx = compiled[0].asm["ptx"]
    PARAM = ptx_params(loss, D)
    outputs = {PARAM["priority_ptr"], PARAM["scratch_ptr"], PARAM["index_ptr"], PARAM["weight_ptr"]}
    assert unsynced_reloads(ptx, outputs) == []
    accesses = global_accesses(ptx)
    reloads = [
        line for line, kind, params in accesses if kind == "ld" and params & {PARAM["index_ptr"], PARAM["weight_ptr"]}
    ]
    assert (reloads == []) == (weighting != W.MAX)
    atomics = [i for i, (_, kind, _) in enumerate(accesses) if kind == "atom"]
    assert len(atomics) == 2 and all(".gpu.acq_rel." in accesses[i][0] for i in atomics)  # arrival, rows done
    tile_data = {PARAM["priority_ptr"], PARAM["scratch_ptr"]}
    arrival = atomics[0]
    last_store = max(i for i, (_, kind, params) in enumerate(accesses[:arrival]) if kind == "st" and params & tile_data)
    first_load = min(
        i for i, (_, kind, params) in enumerate(accesses) if i > arrival and kind == "ld" and params & tile_data
    )
    assert any(kind == "bar" for _, kind, _ in accesses[last_store:arrival])
    assert any(kind == "bar" for _, kind, _ in accesses[arrival:first_load])


@pytest.mark.slow
def test_sm90_ptx_of_the_draw_launch():
    """Many draws: the fused kernel (``DRAW=False``) takes its arrival ticket as above, writes no
    index or weight and never touches the counter's ticket; the draw kernel's one atomic, its
    programs-done ticket, is ``atom.acq_rel.gpu`` after a ``bar.sync`` that follows every thread's
    read of the state, so the last program cannot advance the counter under another's read."""
    skip_if_interpreted()
    fused, draw = compile_for(90, L.PRIORITY, W.MAX, 1, 4_194_304, 65536, "fp32", 0)
    PARAM = ptx_params(L.PRIORITY, 0)
    accesses = global_accesses(fused.asm["ptx"])
    atomics = [line for line, kind, _ in accesses if kind == "atom"]
    assert len(atomics) == 1 and ".gpu.acq_rel." in atomics[0]
    assert not [
        line for line, kind, params in accesses if kind == "st" and params & {PARAM["index_ptr"], PARAM["weight_ptr"]}
    ]
    assert unsynced_reloads(fused.asm["ptx"], {PARAM["priority_ptr"], PARAM["scratch_ptr"]}) == []

    from torchsample.kernels.laber import laber_draw_kernel

    PARAM = {name: i for i, name in enumerate(laber_draw_kernel.arg_names)}
    accesses = global_accesses(draw.asm["ptx"])
    atomics = [i for i, (_, kind, _) in enumerate(accesses) if kind == "atom"]
    assert len(atomics) == 1 and ".gpu.acq_rel." in accesses[atomics[0]][0]
    state_reads = [i for i, (_, kind, params) in enumerate(accesses) if kind == "ld" and PARAM["state_ptr"] in params]
    assert state_reads and max(state_reads) < atomics[0]
    assert any(kind == "bar" for _, kind, _ in accesses[max(state_reads) : atomics[0]])


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
            monkeypatch.setitem(laber_module._STATES, (x.device, laber_module._stream_key(x.device)), rng_state)
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


@pytest.mark.parametrize("op", ["downsample-max", "select-huber", "select-categorical", "select-last-layer"])
def test_dynamo_traces_the_cuda_path(op):
    """torch.compile on the op failed on torch 2.11 (issue 24, item 2): dynamo could not trace the
    lookup of the weighting's code (iterating an Enum). Dynamo traces the CUDA path here, through a
    strict ``torch.export`` on fake CUDA tensors (no GPU needed), to the one fused op."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from torchsample import laber_downsample, laber_select

    class Sample(torch.nn.Module):
        def forward(self, x, y, h, rng_state):
            if op == "downsample-max":
                out = laber_downsample(x, 32, weighting="max", rng_state=rng_state)
            elif op == "select-last-layer":
                out = laber_select(x, y, 32, loss="huber", surrogate="last-layer", features=h, rng_state=rng_state)
            else:
                out = laber_select(x, y, 32, loss=op.split("-")[1], weighting="lazy", rng_state=rng_state)
            return out.index, out.weight

    shape = (2, 128, 51) if op == "select-categorical" else (2, 128)
    with FakeTensorMode(allow_non_fake_inputs=True):
        x, y = torch.empty(shape, device="cuda"), torch.empty(shape, device="cuda")
        h = torch.empty(2, 128, 64, device="cuda")
        rng_state = torch.empty(3 + 64, dtype=torch.int64, device="cuda")
        exported = torch.export.export(Sample(), (x, y, h, rng_state), strict=True)
    fused = [n for n in exported.graph.nodes if n.target == torch.ops.torchsample.laber_fused.default]
    assert len(fused) == 1


def test_an_eager_call_launches_without_the_dispatcher(monkeypatch):
    """Eagerly, the op's dispatch is host time only (``perf/bench_host.py``): an untraced call runs the
    implementation with the raw kernels; a traced one (make_fx above, torch.compile) the op."""
    import torchsample.kernels.laber as laber_module

    launched = []

    def recorder(how):
        def wrap(kernel):
            class Launcher:
                def __getitem__(self, grid):
                    return lambda *args, **kwargs: launched.append((how, kernel.__name__))

            return Launcher()

        return wrap

    monkeypatch.setattr(laber_module, "_as_is", recorder("raw"))
    monkeypatch.setattr(laber_module, "wrap_triton", recorder("wrapped"))
    p = torch.rand(2, 100, 1)  # CPU tensors stand in for CUDA ones: nothing is launched
    index, weight, priority = laber_module.laber_fused_call(
        p, p, None, new_rng_state("cpu"), 4096, int(L.PRIORITY), int(W.MEAN), 0.0, 1.0
    )
    assert launched == [("raw", "laber_fused_kernel"), ("raw", "laber_draw_kernel")]
    assert index.shape == weight.shape == (2, 4096) and priority.shape == (2, 100)


def test_the_default_random_state_is_one_per_device_and_stream(monkeypatch):
    """Two streams may run launches at once, which must not share arrival tickets (issue 24, item 11):
    each stream gets its own default state; calls on one stream share it; a stream that is capturing
    a CUDA graph cannot get one (it is made with a host-to-device copy)."""
    import torchsample.kernels.laber as laber_module

    monkeypatch.setattr(laber_module, "_STATES", {})
    stream = {"id": 1}
    monkeypatch.setattr(laber_module, "_stream_key", lambda device: stream["id"])
    device = torch.device("cpu")
    first = laber_module.rng_state(device)
    assert laber_module.rng_state(device) is first
    stream["id"] = 2
    second = laber_module.rng_state(device)
    assert second is not first and laber_module.rng_state(device) is second
    stream["id"] = 1
    assert laber_module.rng_state(device) is first
    seeded = laber_module.rng_state(device, torch.Generator().manual_seed(0))
    assert seeded is not first and torch.equal(seeded, new_rng_state("cpu", torch.Generator().manual_seed(0)))
    stream["id"] = 3
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="cannot be created during CUDA graph capture"):
        laber_module.rng_state(torch.device("cuda", 0))


@pytest.mark.parametrize(
    "make_state, with_generator, error, match",
    [
        (
            lambda: torch.empty(3, dtype=torch.int64, device="cuda"),
            False,
            TypeError,
            r"rng_state must be an int64 \[3 \+ S\]",
        ),
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


@pytest.mark.gpu
@requires_cuda
def test_two_streams_draw_from_states_of_their_own():
    """Default states on two streams at once: each stream's counter advances by its own calls and
    its tickets are back to 0 (a shared state would interleave them)."""
    import torchsample.kernels.laber as laber_module
    from torchsample import laber_downsample

    C, N, B, calls = 2, 20_000, 2048, 20
    p = torch.rand(C, N, device="cuda", generator=torch.Generator("cuda").manual_seed(4))
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    states = []
    for stream in streams:
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            laber_downsample(p, B, eps=0.0)  # makes this stream's default state
            states.append(laber_module.rng_state(p.device))
    start = [state[1].item() for state in states]
    draws = [[], []]
    for _ in range(calls):
        for i, stream in enumerate(streams):
            with torch.cuda.stream(stream):
                draws[i].append(laber_downsample(p, B, eps=0.0).index)
    torch.cuda.synchronize()
    assert states[0] is not states[1]
    for state, first in zip(states, start):
        assert state[1].item() == first + calls * C * B and (state[2:] == 0).all()
    for stream_draws in draws:
        _check_draws(stream_draws, p)
