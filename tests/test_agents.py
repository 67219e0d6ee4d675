"""The training scripts: each agent runs a few hundred steps with each sampler in a subprocess,
``--resume`` reproduces the uninterrupted run, and ``agents.compare`` writes its table and plot."""
import ast
import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import requires_cuda

ROOT = Path(__file__).resolve().parents[1]
SAMPLERS = ["uniform", "per", "laber-mean", "laber-lazy", "laber-max", "large-batch"]
# Small runs: a few hundred steps, learning from step 100, evaluation at the end.
DISCRETE = ["--env-id", "CartPole-v1", "--total-steps", "300", "--learning-starts", "100", "--eval-every", "300",
            "--eval-episodes", "1", "--batch-size", "16", "--train-freq", "20", "--gradient-steps", "4"]
CONTINUOUS = ["--env-id", "Pendulum-v1", "--total-steps", "300", "--learning-starts", "200", "--eval-every", "300",
              "--eval-episodes", "1", "--batch-size", "16", "--hidden", "32", "32"]
AGENT_ARGS = {"dqn": DISCRETE, "c51": DISCRETE, "sac": CONTINUOUS, "td3": CONTINUOUS}

pytestmark = pytest.mark.slow


def run_agent(algo: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", f"agents.{algo}", "--no-progress", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("algo", list(AGENT_ARGS))
def test_agent_runs_with_each_sampler(algo, sampler, tmp_path):
    run_agent(algo, *AGENT_ARGS[algo], "--sampler", sampler, "--out", str(tmp_path))
    evals = read_csv(tmp_path / "eval.csv")
    assert len(evals) == 1 and evals[0]["step"] == "300"
    assert float(evals[0]["eval_return"]) != 0
    assert (tmp_path / "checkpoint" / "state.pt").exists()


# Beyond classic control: MinAtar's network (DQN, C51, the paper's Table 3), MuJoCo bodies (SAC, TD3,
# Tables 4-5), and the compiled update.
SETTINGS = {
    "dqn-minatar": ("dqn", ["--env-id", "MinAtar/Breakout-v1", *DISCRETE[2:]]),
    "c51-minatar": ("c51", ["--env-id", "MinAtar/Breakout-v1", *DISCRETE[2:]]),
    "sac-halfcheetah": ("sac", ["--env-id", "HalfCheetah-v5", *CONTINUOUS[2:]]),
    "td3-hopper": ("td3", ["--env-id", "Hopper-v5", *CONTINUOUS[2:]]),
    "dqn-compiled": ("dqn", [*DISCRETE, "--compile"]),
    "sac-compiled": ("sac", [*CONTINUOUS, "--compile"]),
}


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_agent_runs_on_minatar_mujoco_and_compiled(setting, tmp_path):
    algo, args = SETTINGS[setting]
    run_agent(algo, *args, "--sampler", "laber-mean", "--out", str(tmp_path))
    evals = read_csv(tmp_path / "eval.csv")
    assert len(evals) == 1 and evals[0]["step"] == "300"
    config = (tmp_path / "config.txt").read_text()
    assert f"env_id={args[args.index('--env-id') + 1]}" in config
    assert ("compile=True" in config) == ("--compile" in args)


@pytest.mark.parametrize("algo, sampler", [("dqn", "laber-mean"), ("dqn", "per"), ("sac", "laber-mean")])
def test_resume_reproduces_the_uninterrupted_run(algo, sampler, tmp_path):
    args = [*AGENT_ARGS[algo], "--total-steps", "400", "--eval-every", "200", "--sampler", sampler,
            "--learning-starts", "100"]
    run_agent(algo, *args, "--out", str(tmp_path / "straight"))
    run_agent(algo, *args, "--out", str(tmp_path / "resumed"), "--stop-after", "250")
    # The interrupted run must really stop early: its last evaluation is the one at step 200.
    assert [r["step"] for r in read_csv(tmp_path / "resumed" / "eval.csv")] == ["200"]
    run_agent(algo, *args, "--out", str(tmp_path / "resumed"), "--resume")
    for name, key in [("train", "episode_return"), ("eval", "eval_return")]:
        straight = [(r["step"], r[key]) for r in read_csv(tmp_path / "straight" / f"{name}.csv")]
        resumed = [(r["step"], r[key]) for r in read_csv(tmp_path / "resumed" / f"{name}.csv")]
        assert straight == resumed and len(straight) > 1
    a = torch.load(tmp_path / "straight" / "checkpoint" / "state.pt", weights_only=False)["modules"]["loss"]
    b = torch.load(tmp_path / "resumed" / "checkpoint" / "state.pt", weights_only=False)["modules"]["loss"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_compare_writes_table_and_plot_and_survives_a_failed_run(tmp_path):
    out = tmp_path / "cmp"
    cmd = [sys.executable, "-m", "agents.compare", "--algo", "dqn", "--samplers", "laber-mean", "uniform", "no-such-sampler",
           "--seeds", "0", "1", "--out", str(out), "--bootstrap", "200",
           "--extra=" + " ".join(DISCRETE[2:])]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = (out / "results.md").read_text()
    assert "| laber-mean | 2 |" in table and "| uniform | 2 |" in table
    assert "| no-such-sampler | 0 (2 failed) |" in table and "Failed runs:" in table
    rows = read_csv(out / "results.csv")
    assert [r["sampler"] for r in rows] == ["laber-mean", "uniform", "no-such-sampler"]
    assert float(rows[0]["iqm_lo"]) <= float(rows[0]["iqm"]) <= float(rows[0]["iqm_hi"])
    assert (out / "curves.png").stat().st_size > 10_000


@pytest.mark.parametrize("algo", list(AGENT_ARGS))
def test_help_documents_every_option(algo):
    proc = run_agent(algo, "--help")
    for option in ["--sampler", "--m", "--batch-size", "--compile", "--cudagraphs", "--resume", "--device", "--env-id"]:
        assert option in proc.stdout
    assert "laber-mean" in proc.stdout and "large-batch" in proc.stdout


@pytest.mark.parametrize("module", ["common", "dqn", "c51", "sac", "td3", "compare"])
def test_every_config_field_has_a_docstring(module):
    """tyro turns the string under a field into its --help text: a field without one is undocumented."""
    tree = ast.parse((ROOT / "agents" / f"{module}.py").read_text())
    configs = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name in ("Config", "RunOptions")]
    assert configs
    for config in configs:
        body = config.body
        fields = [i for i, node in enumerate(body) if isinstance(node, ast.AnnAssign)]
        assert fields, config.name
        for i in fields:
            following = body[i + 1] if i + 1 < len(body) else None
            documented = (isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                          and isinstance(following.value.value, str) and following.value.value.strip())
            assert documented, f"agents/{module}.py {config.name}.{body[i].target.id} has no docstring"


@pytest.mark.parametrize("algo", ["dqn", "sac"])
def test_progress_bar_shows_steps_return_and_steps_per_second(algo, tmp_path):
    # 800 steps: past the steps/s burn-in (learning starts + 500 for DQN, + 200 for SAC).
    args = [*AGENT_ARGS[algo], "--total-steps", "800", "--eval-every", "800", "--learning-starts", "100"]
    cmd = [sys.executable, "-m", f"agents.{algo}", *args, "--sampler", "laber-mean", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = proc.stderr.replace("\r", "\n").strip().splitlines()[-1]
    assert "800/800" in final, final
    figures = dict(re.findall(r"(ret|eval|sps)=(-?[0-9.]+)", final))
    assert set(figures) == {"ret", "eval", "sps"}, final
    assert float(figures["sps"]) > 0
    assert float(figures["eval"]) == pytest.approx(float(read_csv(tmp_path / "eval.csv")[-1]["eval_return"]), abs=0.05)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("algo", ["dqn", "sac"])
def test_agent_runs_with_cudagraphs_on_cuda(algo, tmp_path):
    run_agent(algo, *AGENT_ARGS[algo], "--sampler", "laber-mean", "--device", "cuda", "--cudagraphs",
              "--out", str(tmp_path))
    assert read_csv(tmp_path / "eval.csv")[0]["step"] == "300"
