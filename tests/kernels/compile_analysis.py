"""What torch.compile does with the fused op's launches before any code runs, on CPU: run as a script.

    python -m tests.kernels.compile_analysis N B      # prints one JSON object

AOTAutograd decomposes the ``triton_op`` under functionalization and asks Inductor's kernel analysis
(``get_mutated_tensors``: ``identify_accessed_tensors`` on torch >= 2.13, ``identify_mutated_tensors``
before) which tensors each launch writes; Inductor's lowering asks the same again. Here that path runs
through ``aot_export_module`` on fake CUDA tensors, with a stand-in for Triton's driver that names an
sm_90 device, for each score type at ``[C, N, K]`` inputs drawing ``B``, and once with the draws forced
into their own launch. The JSON maps ``case -> [[kernel, tensors written, seconds], ...]``.

A kernel whose IR the analysis cannot walk in time hangs here (the caller's timeout), or comes back
with every tensor argument marked written.
"""

from __future__ import annotations

import json
import sys
import time

import torch
import triton
from triton.backends.compiler import GPUTarget


class StandInDriver:
    """All that the analysis asks of Triton's driver: the target."""

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0


def cases(N: int) -> dict:
    """case -> (loss code, weighting code, C, K, D)."""
    from torchsample.codes import LossKind as L
    from torchsample.codes import Weighting as W

    return {
        "priority-mean": (L.PRIORITY, W.MEAN, 1, 1, 0),
        "l2-lazy-C2": (L.L2, W.LAZY, 2, 1, 0),
        "huber-max": (L.HUBER, W.MAX, 1, 1, 0),
        "categorical-K51": (L.CATEGORICAL, W.MEAN, 1, 51, 0),
        "last-layer-huber-D128": (L.HUBER, W.MEAN, 2, 1, 128),
    }


def analyse(N: int, B: int, loss, weighting, C: int, K: int, D: int) -> list:
    from torch._functorch.aot_autograd import aot_export_module
    from torch._subclasses.fake_tensor import FakeTensorMode

    import torchsample.kernels.laber  # noqa: F401  (registers the op)

    class Sample(torch.nn.Module):
        def forward(self, pred, target, features, state):
            return torch.ops.torchsample.laber_fused(
                pred, target, features, state, B, int(loss), int(weighting), 1e-6, 1.0, True
            )

    with FakeTensorMode():
        pred = torch.empty(C, N, K, device="cuda")
        features = torch.empty(C, N, D, device="cuda", dtype=torch.bfloat16) if D else None
        state = torch.empty(3 + 64, dtype=torch.int64, device="cuda")
        start = time.perf_counter()
        graph, _ = aot_export_module(Sample(), (pred, pred.clone(), features, state), trace_joint=False)
        seconds = time.perf_counter() - start
    launches = [n for n in graph.graph.nodes if "triton_kernel_wrapper" in str(n.target)]
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    return [
        [
            kernel_side_table.get_kernel(n.kwargs["kernel_idx"]).fn.__name__,
            sorted(n.kwargs["tensors_to_clone"]),
            seconds,
        ]
        for n in launches
    ]


def main(N: int, B: int) -> dict:
    triton.runtime.driver._active = StandInDriver()
    import torchsample.kernels.laber as laber

    results = {}
    for name, (loss, weighting, C, K, D) in cases(N).items():
        results[name] = analyse(N, B, loss, weighting, C, K, D)
    # The draws in a launch of their own (the plan takes it for many draws): every launch of the op.
    laber.MAX_ROUNDS_IN_TILE = 0
    laber.launch_plan.cache_clear()
    laber.launch_arguments.cache_clear()
    loss, weighting, C, K, D = cases(N)["huber-max"]
    results["huber-max-split"] = analyse(N, B, loss, weighting, C, K, D)
    return results


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]), int(sys.argv[2]))))
