"""The GPU check on a bare image: only torch, triton, numpy, scipy, pandas, pytest and the library's own
dependencies (torchrl, tensordict). The first H200 run collected 0 GPU tests there, because the
doctest collection imported the agents' extras. Here those extras are hidden from a subprocess
(``find_spec`` says they are not installed, importing them fails), as on such an image."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What `make install` adds beyond the library's dependencies and the GPU image's own packages (torch, triton,
# numpy, scipy, pytest, pandas: ../shared/gpu/README.md; perf/common.py writes its CSVs with pandas). matplotlib
# and tqdm are on the image too, but nothing the check imports at start may need them.
OPTIONAL = (
    "tyro",
    "gymnasium",
    "tqdm",
    "minatar",
    "rliable",
    "ale_py",
    "cv2",
    "ray",
    "wandb",
    "tensorboard",
    "mujoco",
    "cpprb",
    "matplotlib",
    "seaborn",
)


def run_without_extras(tmp_path: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    (tmp_path / "sitecustomize.py").write_text(
        textwrap.dedent(f"""
        import importlib.util, sys
        HIDDEN = {set(OPTIONAL)!r}
        _find_spec = importlib.util.find_spec

        def find_spec(name, package=None):
            return None if name.split(".")[0] in HIDDEN else _find_spec(name, package)

        class Hide:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in HIDDEN:
                    raise ModuleNotFoundError(f"No module named {{name!r}} (hidden by the test)", name=name)

        importlib.util.find_spec = find_spec
        sys.meta_path.insert(0, Hide())
    """)
    )
    env = {"PYTHONPATH": f"{tmp_path}:{ROOT}", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_gpu_tests_collect_without_the_extras(tmp_path):
    proc = run_without_extras(
        tmp_path, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "-m", "gpu"
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "error" not in out.lower(), out[-4000:]
    collected = [line for line in proc.stdout.splitlines() if "::" in line]
    # The kernel's, the ops' and the losses' GPU tests remain; the agents' are left out.
    assert any("test_laber_kernel.py" in line for line in collected)
    assert any("test_ops.py" in line for line in collected)
    assert not any("test_agents.py" in line or "test_compare.py" in line for line in collected)


@pytest.mark.slow
def test_gpu_check_says_which_steps_ran_without_the_extras(tmp_path):
    """The import step runs first and passes; the update benchmark, which needs the agents, is
    reported as not run, in the output and in the summary; the check does not fail for it."""
    proc = run_without_extras(
        tmp_path,
        "perf/gpu_check.py",
        "--cpu-smoke",
        "--results-dir",
        str(tmp_path / "results"),
        "--only",
        "import",
        "update",
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "import ok" in out
    summary = (tmp_path / "results" / "gpu_summary_cpu.md").read_text()
    assert "| import | passed |" in summary
    assert "| update | not run: needs tyro, gymnasium, tqdm (the [agents] extra) |" in summary
