"""Collection on any machine: the agents' docstring examples are collected only where the agents'
dependencies are installed.

``make test`` installs every extra. The GPU check (``make gpu-check``) runs on an image that may have
only torch, triton, numpy, scipy, pytest and the library's own dependencies: there the agents'
modules (collected for their doctests, ``--doctest-modules``) are left out instead of failing
collection, and the test modules that run the agents skip themselves (``tests.conftest.require``).
"""

import importlib.util

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
