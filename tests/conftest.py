"""Shared test fixtures, the skip predicate for CUDA-only tests and for optional dependencies."""

import importlib.util
import os

import pytest
import torch

# make test runs two pytest-xdist workers on two cores: one torch thread each, not two each.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")

# Devices every op test runs on: CPU always, CUDA where there is one (those ids carry the gpu mark).
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu, requires_cuda])]


# What the agents import (the [agents] extra): a test module that runs them skips without it, so that
# the GPU check runs on an image with only the library's own dependencies (`make gpu-check`).
AGENT_DEPS = ("tyro", "gymnasium", "tqdm")


def require(*modules: str) -> None:
    """Skip the calling test module unless every one of ``modules`` can be imported."""
    for name in modules:
        pytest.importorskip(name)


def has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
