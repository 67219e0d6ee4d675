"""TorchRL's own replay-buffer tests with LaBERSampler in place of its samplers (docs/results/torchrl-rb.md).

With ``RBCHECK_LABER=1``, every ``RandomSampler`` constructed during the tests (by a test, or as
``ReplayBuffer``'s default) becomes ``LaBERSampler(LaBER(nn.Module(), 1, prediction=...), m=M,
inner=<the original>)``, and every ``PrioritizedSampler`` (by a test, or inside TorchRL's prioritized
buffers) a ``PrioritizedLaBERSampler`` with the same arguments. The constructor of
TorchRL's sampler metaclass is wrapped, so only construction changes: ``isinstance`` checks, unpickling
and every other sampler class (slice samplers, ``SamplerWithoutReplacement``, ensembles) are untouched.
The prediction scores every row alike (``|pred - target| = 1``), so every row can be drawn and LaBER's
weights are exactly 1: what is tested is the sampler contract, not LaBER's scores. Without the variable,
the same files run as TorchRL ships them (the baseline). ``RBCHECK_USAGE_DIR`` receives, per test,
how many samplers were wrapped and how many large batches were scored.
"""

import json
import os

import pytest
import torch

if os.environ.get("RBCHECK_LABER") == "1":
    from torchrl.data.replay_buffers.samplers import PrioritizedSampler, RandomSampler
    from torchrl.data.replay_buffers.samplers import base as samplers_base

    from torchsample import LaBER, LaBERSampler, PrioritizedLaBERSampler

    M = int(os.environ.get("RBCHECK_M", "2"))
    # With prediction=, LaBER reads only its module's parameters (for the device) and tensor keys.
    LOSS = torch.nn.Module()
    USAGE: dict[str, dict[str, int]] = {}
    CURRENT = ["<collection>"]

    def mark(what: str) -> None:
        counts = USAGE.setdefault(CURRENT[0], {"wrapped": 0, "scored": 0})
        counts[what] += 1

    def prediction(td):
        mark("scored")
        n = td.batch_size[0]
        index = td.get("index", None)
        device = index.device if isinstance(index, torch.Tensor) else (td.device or torch.device("cpu"))
        return torch.ones(n, device=device), torch.zeros(n, device=device)

    construct = samplers_base._SamplerMeta.__call__

    def construct_through_laber(cls, *args, **kwargs):
        if cls is PrioritizedSampler:
            mark("wrapped")
            return construct(PrioritizedLaBERSampler, LaBER(LOSS, 1, prediction=prediction), *args, m=M, **kwargs)
        sampler = construct(cls, *args, **kwargs)
        if type(sampler) is RandomSampler:
            mark("wrapped")
            return LaBERSampler(LaBER(LOSS, 1, prediction=prediction), m=M, inner=sampler)
        return sampler

    samplers_base._SamplerMeta.__call__ = construct_through_laber

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(item, nextitem):
        CURRENT[0] = item.nodeid
        yield
        CURRENT[0] = "<between>"

    def pytest_sessionfinish(session, exitstatus):
        folder = os.environ.get("RBCHECK_USAGE_DIR")
        if folder:
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, f"usage_{os.getpid()}.json"), "w") as f:
                json.dump(USAGE, f)
