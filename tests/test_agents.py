"""The training scripts: each agent runs a few hundred steps with each sampler in a subprocess,
``--resume`` reproduces the uninterrupted run, and ``agents.compare`` writes its table and plot."""
import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
    assert not (tmp_path / "resumed" / "eval.csv").read_text().count("400")
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
