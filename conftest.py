"""Collection on any machine: the agents' docstring examples are collected only where the agents'
dependencies are installed.

``make test`` installs every extra. The GPU check (``make gpu-check``) runs on an image that may have
only torch, triton, numpy, scipy, pytest and the library's own dependencies: there the agents'
modules (collected for their doctests, ``--doctest-modules``) are left out instead of failing
collection, and the test modules that run the agents skip themselves (``tests.conftest.require``).

``kernels/`` installs as ``torchsample.kernels``. Collecting its doctests would import each file a
second time, as ``kernels.laber``: a second module that registers ``torch.ops.torchsample.laber_fused``
again, so the op would run that copy's functions (torch 2.11 takes the last registration) and a test
that patches ``torchsample.kernels.laber`` would not reach them. Collection gets the installed modules
under the folder's name instead: one module per file.
"""

import importlib
import importlib.util
import pkgutil
import sys
from pathlib import Path

AGENTS = ("tyro", "gymnasium", "tqdm")
NEEDS = {  # module glob -> what importing those modules needs
    "agents/*.py": AGENTS,
    "experiments/*.py": AGENTS + ("rliable", "matplotlib", "pandas"),
    "agents/atari.py": ("gymnasium", "ale_py", "cv2"),
    "agents/distributed.py": AGENTS + ("ray",),
}

collect_ignore_glob = [
    glob for glob, modules in NEEDS.items() if any(importlib.util.find_spec(name) is None for name in modules)
]


if importlib.util.find_spec("triton") is not None:  # laber.py needs it; without it, its collection fails alone
    import torchsample.kernels

    sys.modules["kernels"] = torchsample.kernels
    for info in pkgutil.iter_modules([str(Path(__file__).parent / "kernels")]):
        sys.modules[f"kernels.{info.name}"] = importlib.import_module(f"torchsample.kernels.{info.name}")
