"""The fused LaBER kernel: numerics against the reference, and ahead-of-time compilation.

``TRITON_INTERPRET`` is read when ``triton.jit`` decorates a kernel, so the interpreter cases
(``laber_cases.py``) run in a subprocess with it set, while this process keeps the real JIT
functions that ``triton.compile`` needs. On a CUDA machine the same cases also run compiled, on the
device.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import requires_cuda

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from torchsample.codes import Surrogate as S  # noqa: E402
from torchsample.codes import Weighting as W  # noqa: E402
from torchsample.kernels.laber import block_sizes, laber_fused_kernel  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CASES = Path(__file__).with_name("laber_cases.py")


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


SIGNATURE = {
    "pred_ptr": "*fp32", "target_ptr": "*fp32", "priority_ptr": "*fp32", "cdf_ptr": "*fp32", "index_ptr": "*i64",
    "weight_ptr": "*fp32", "state_ptr": "*i64", "C": "i32", "N": "i32", "K": "i32", "B": "i32", "eps": "fp32",
    "huber_delta": "fp32", "search_steps": "i32", "stride_pc": "i64", "stride_pn": "i64", "stride_pk": "i64",
    "stride_tc": "i64", "stride_tn": "i64", "stride_tk": "i64", "SURROGATE": "constexpr", "WEIGHTING": "constexpr",
    "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "BLOCK_B": "constexpr",
}
# Every branch of both constexprs at least once, and low-precision inputs on two of them.
VARIANTS = [
    pytest.param(S.PRIORITY, W.MEAN, 1, "fp32", id="priority-mean-fp32"),
    pytest.param(S.L2, W.LAZY, 1, "fp16", id="l2-lazy-fp16"),
    pytest.param(S.HUBER, W.MAX, 1, "fp32", id="huber-max-fp32"),
    pytest.param(S.CATEGORICAL, W.MEAN, 51, "bf16", id="categorical-mean-K51-bf16"),
]


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90], ids=["sm80", "sm90"])
@pytest.mark.parametrize("surrogate, weighting, K, dtype", VARIANTS)
def test_kernel_compiles_ahead_of_time(arch, surrogate, weighting, K, dtype):
    if not isinstance(laber_fused_kernel, triton.runtime.JITFunction):
        pytest.skip("TRITON_INTERPRET is set in this process")
    signature = {**SIGNATURE, "pred_ptr": f"*{dtype}", "target_ptr": f"*{dtype}"}
    constexprs = {"SURROGATE": int(surrogate), "WEIGHTING": int(weighting), **block_sizes(1000, K, 32, surrogate)}
    compiled = triton.compile(ASTSource(fn=laber_fused_kernel, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", arch, 32))
    assert f".target sm_{arch}" in compiled.asm["ptx"]
    assert len(compiled.asm["cubin"]) > 1000


@pytest.mark.parametrize("op", ["downsample", "select-huber", "select-categorical"])
def test_cuda_dispatch_is_one_fused_op(op, monkeypatch):
    """Traced with fake CUDA tensors (no GPU needed): the CUDA path of the public ops is a single
    ``torchsample::laber_fused`` call, with a fake implementation that gives the right shapes."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    import torchsample.kernels.laber as laber_module
    from torchsample import laber_downsample, laber_select

    def fn(x, y, state):
        monkeypatch.setitem(laber_module._STATES, x.device, state)
        if op == "downsample":
            out = laber_downsample(x, 32, weighting="max")
        else:
            out = laber_select(x, y, 32, surrogate=op.split("-")[1])
        return out.index, out.weight, out.priority

    shape = (2, 128, 51) if op == "select-categorical" else (2, 128)
    with FakeTensorMode():
        x, y = torch.empty(shape, device="cuda"), torch.empty(shape, device="cuda")
        graph = make_fx(fn)(x, y, torch.empty(3, dtype=torch.int64, device="cuda"))
        index, weight, priority = graph(x, y, torch.empty(3, dtype=torch.int64, device="cuda"))
    calls = [n.target for n in graph.graph.nodes if n.op == "call_function"]
    assert calls.count(torch.ops.torchsample.laber_fused.default) == 1
    assert not [c for c in calls if "multinomial" in str(c) or "cumsum" in str(c)]
    assert index.shape == weight.shape == (2, 32) and index.dtype == torch.int64 and priority.shape == (2, 128)
