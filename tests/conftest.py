"""Shared test fixtures and the skip predicate for CUDA-only tests."""
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


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
