"""The training scripts: each agent runs a few hundred steps with each sampler in a subprocess, its
returns lie in what the environment can give, DQN learns CartPole, ``--resume`` reproduces the
uninterrupted run, ``--help`` shows the defaults a run uses, the sampler choice is built in one
place, and ``agents.compare`` writes its table and plot."""
import ast
import csv
import dataclasses
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchrl.data import PrioritizedSampler
from torchrl.objectives import SoftUpdate

from agents import c51, common, dqn, sac, td3
from tests.conftest import requires_cuda

ROOT = Path(__file__).resolve().parents[1]
SAMPLERS = ["uniform", "per", "laber-mean", "laber-lazy", "laber-max", "large-batch"]
AGENTS = {"dqn": dqn, "c51": c51, "sac": sac, "td3": td3}
# Small runs: a few hundred steps, learning from step 100, evaluation at the end.
DISCRETE = ["--env-id", "CartPole-v1", "--total-steps", "300", "--learning-starts", "100", "--eval-every", "300",
            "--eval-episodes", "1", "--batch-size", "16", "--train-freq", "20", "--gradient-steps", "4"]
CONTINUOUS = ["--env-id", "Pendulum-v1", "--total-steps", "300", "--learning-starts", "200", "--eval-every", "300",
              "--eval-episodes", "1", "--batch-size", "16", "--hidden", "32", "32"]
AGENT_ARGS = {"dqn": DISCRETE, "c51": DISCRETE, "sac": CONTINUOUS, "td3": CONTINUOUS}
# What one episode can return: CartPole-v1 +1 per step, 1 to 500 steps; Pendulum-v1 200 steps of
# -(theta^2 + 0.1 theta_dot^2 + 0.001 u^2) with |theta| <= pi, |theta_dot| <= 8, |u| <= 2; MinAtar
# Breakout +1 per brick; MuJoCo: any finite number.
RETURN_RANGE = {
    "CartPole-v1": (1.0, 500.0),
    "Pendulum-v1": (-200 * (math.pi ** 2 + 0.1 * 8 ** 2 + 0.001 * 2 ** 2), 0.0),
    "MinAtar/Breakout-v1": (0.0, math.inf),
    "HalfCheetah-v5": (-math.inf, math.inf),
    "Hopper-v5": (-math.inf, math.inf),
}

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


def assert_returns_possible(run_dir: Path, env_id: str) -> None:
    """Every evaluation and training-episode return is finite and one the environment can give."""
    lo, hi = RETURN_RANGE[env_id]
    returns = [float(r["eval_return"]) for r in read_csv(run_dir / "eval.csv")]
    if (run_dir / "train.csv").exists():
        returns += [float(r["episode_return"]) for r in read_csv(run_dir / "train.csv")]
    for value in returns:
        assert math.isfinite(value) and lo <= value <= hi, (env_id, value)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("algo", list(AGENT_ARGS))
def test_agent_runs_with_each_sampler(algo, sampler, tmp_path):
    run_agent(algo, *AGENT_ARGS[algo], "--sampler", sampler, "--out", str(tmp_path))
    evals = read_csv(tmp_path / "eval.csv")
    assert len(evals) == 1 and evals[0]["step"] == "300"
    assert_returns_possible(tmp_path, AGENT_ARGS[algo][1])
    assert len(read_csv(tmp_path / "train.csv")) >= 1  # CartPole's random episodes end quickly, Pendulum's at 200
    assert (tmp_path / "checkpoint" / "state.pt").exists()


def test_dqn_learns_cartpole(tmp_path):
    """With its own defaults, LaBER-mean DQN gets far past a random policy (about 22) in 3000 steps
    (10 training phases); a broken estimator (weights, priorities, targets) does not."""
    run_agent("dqn", "--env-id", "CartPole-v1", "--sampler", "laber-mean", "--total-steps", "3000",
              "--learning-starts", "500", "--eval-every", "3000", "--out", str(tmp_path))
    assert_returns_possible(tmp_path, "CartPole-v1")
    assert float(read_csv(tmp_path / "eval.csv")[-1]["eval_return"]) > 100


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
    env_id = args[args.index("--env-id") + 1]
    run_agent(algo, *args, "--sampler", "laber-mean", "--out", str(tmp_path))
    evals = read_csv(tmp_path / "eval.csv")
    assert len(evals) == 1 and evals[0]["step"] == "300"
    assert_returns_possible(tmp_path, env_id)
    config = dict(line.split("=", 1) for line in (tmp_path / "config.txt").read_text().splitlines())
    assert config["env_id"] == env_id and config["compile"] == str("--compile" in args)
    # The options the command line leaves alone keep the env family's defaults.
    expected = AGENTS[algo].env_defaults(env_id)
    assert config["gamma"] == str(expected.gamma) and config["total_steps"] == "300"
    if algo in ("dqn", "c51"):
        assert config["optimizer"] == expected.optimizer == ("rmsprop" if "minatar" in setting else "adam")


@pytest.mark.parametrize("algo, sampler", [("dqn", "laber-mean"), ("dqn", "per"), ("sac", "laber-mean")])
def test_resume_reproduces_the_uninterrupted_run(algo, sampler, tmp_path):
    args = [*AGENT_ARGS[algo], "--total-steps", "400", "--eval-every", "200", "--sampler", sampler,
            "--learning-starts", "100"]
    run_agent(algo, *args, "--out", str(tmp_path / "straight"))
    run_agent(algo, *args, "--out", str(tmp_path / "resumed"), "--stop-after", "250")
    # The interrupted run must really stop early: its last evaluation is the one at step 200.
    assert [r["step"] for r in read_csv(tmp_path / "resumed" / "eval.csv")] == ["200"]
    run_agent(algo, *args, "--out", str(tmp_path / "resumed"), "--resume")
    assert_returns_possible(tmp_path / "straight", AGENT_ARGS[algo][1])
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
    for sampler in ("laber-mean", "uniform"):
        for seed in (0, 1):
            assert_returns_possible(out / sampler / f"seed{seed}", "CartPole-v1")
    assert (out / "curves.png").stat().st_size > 10_000


@pytest.mark.parametrize("algo", list(AGENT_ARGS))
def test_help_documents_every_option(algo):
    proc = run_agent(algo, "--help")
    for option in ["--sampler", "--m", "--batch-size", "--compile", "--cudagraphs", "--resume", "--device", "--env-id"]:
        assert option in proc.stdout
    assert "--sampler {" + ",".join(common.SAMPLERS) + "}" in proc.stdout  # every sampler, one shared list
    assert list(common.SAMPLERS) == SAMPLERS
    assert "(default: None)" not in proc.stdout


# The values each env family's runs use: until now the fields below defaulted to None and got these
# values after parsing (the README's results came from them; docs/agents.md says where they come from).
CLASSIC = dict(batch_size=64, total_steps=50_000, learning_starts=1_000, train_freq=256, gradient_steps=128,
               lr=2.3e-3, gamma=0.98, lr_schedule="linear", target_update=128, target_tau=0.005, end_epsilon=0.04,
               exploration_steps=8_000, optimizer="adam")
MINATAR = dict(batch_size=32, total_steps=5_000_000, learning_starts=5_000, train_freq=1, gradient_steps=1,
               lr=1e-4, gamma=0.99, lr_schedule="constant", target_update=1_000, target_tau=0.0, end_epsilon=0.1,
               exploration_steps=100_000, optimizer="rmsprop")
FAMILY_DEFAULTS = {
    ("dqn", "CartPole-v1"): CLASSIC,
    ("dqn", "MinAtar/Breakout-v1"): MINATAR,
    ("c51", "Acrobot-v1"): {**CLASSIC, "v_min": 0.0, "v_max": 50.0},
    ("c51", "MinAtar/Asterix-v1"): {**MINATAR, "v_min": -10.0, "v_max": 10.0},
    ("sac", "Pendulum-v1"): dict(total_steps=15_000, batch_size=256, hidden=(256, 256)),
    ("sac", "HalfCheetah-v5"): dict(total_steps=1_000_000, batch_size=256, hidden=(256, 256)),
    ("td3", "Pendulum-v1"): dict(total_steps=15_000, batch_size=100, hidden=(400, 300), policy_delay=2),
    ("td3", "Hopper-v5"): dict(total_steps=1_000_000, batch_size=100, hidden=(400, 300), policy_delay=2),
}


@pytest.mark.parametrize("algo, env_id", list(FAMILY_DEFAULTS),
                         ids=[f"{algo}-{env_id.replace('/', '-')}" for algo, env_id in FAMILY_DEFAULTS])
def test_help_shows_the_defaults_the_env_family_runs_with(algo, env_id, capsys):
    """``--env-id X --help`` prints X's family's values, and parsing ``--env-id X`` gives them."""
    agent = AGENTS[algo]
    expected = FAMILY_DEFAULTS[algo, env_id]
    cfg = common.cli(agent.env_defaults, agent.Config.env_id, ["--env-id", env_id])
    assert cfg == agent.env_defaults(env_id)
    assert {name: getattr(cfg, name) for name in expected} == expected
    assert all(getattr(cfg, f.name) is not None for f in dataclasses.fields(cfg))
    assert common.cli(agent.env_defaults, agent.Config.env_id, [f"--env_id={env_id}", "--m", "8"]) == \
        dataclasses.replace(cfg, m=8)

    with pytest.raises(SystemExit):
        common.cli(agent.env_defaults, agent.Config.env_id, ["--env-id", env_id, "--help"])
    text = " ".join(re.sub("[│╭╮╰╯─]", " ", capsys.readouterr().out).split())  # the help box, unwrapped
    assert "(default: None)" not in text
    for name, value in expected.items():
        shown = " ".join(map(str, value)) if isinstance(value, tuple) else str(value)
        option = text[text.index(f"--{name.replace('_', '-')} "):]
        assert option[option.index("(default: "):].startswith(f"(default: {shown})"), option[:200]


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


@pytest.mark.parametrize("algo", list(AGENTS))
def test_each_agent_reads_alone(algo):
    """An agent imports no other agent (only ``agents.common``) and has its own config, loss and loop."""
    tree = ast.parse((ROOT / "agents" / f"{algo}.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported |= {f"{node.module}.{alias.name}" for alias in node.names} | {node.module}
        elif isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
    others = {f"agents.{name}" for name in AGENTS if name != algo}
    assert not imported & others, imported & others
    defined = {node.name for node in tree.body if isinstance(node, (ast.ClassDef, ast.FunctionDef))}
    assert {"Config", "env_defaults", "main", f"build_{algo}"} <= defined
    # main itself builds the loss and runs the update: no hidden switch for another algorithm.
    source = (ROOT / "agents" / f"{algo}.py").read_text()
    for foreign in ("actor_every", "build=", "with_env_defaults"):
        assert foreign not in source, foreign


# The sampler choice, built once in agents.common for all four agents.


def _cartpole_replay(sampler: str, batch_size: int = 8, m: int = 4, rows: int = 64):
    env = common.make_env("CartPole-v1", 0)
    loss_module, _ = dqn.build_dqn(dqn.Config(), env, torch.device("cpu"))
    SoftUpdate(loss_module, tau=0.005)  # the agent's target updater (without one TorchRL warns)
    replay = common.Replay(sampler, loss_module, buffer_size=1_000, batch_size=batch_size, m=m,
                           device=torch.device("cpu"))
    obs, _ = env.reset(seed=0)
    for _ in range(rows):
        action = env.action_space.sample()
        next_obs, reward, terminated, truncated, _ = env.step(action)
        replay.add(common.to_tensordict(obs, action, reward, next_obs, terminated, truncated, torch.device("cpu")))
        obs = env.reset()[0] if terminated or truncated else next_obs
    return replay, loss_module


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_replay_draws_what_each_sampler_names(sampler):
    torch.manual_seed(0)
    replay, _ = _cartpole_replay(sampler)
    spec = common.SAMPLERS[sampler]
    batch = replay.sample(progress=0.0)
    assert batch.batch_size == torch.Size([32 if spec.large else 8])
    selected = replay.downsample(batch)
    if sampler.startswith("laber"):
        assert selected.batch_size == torch.Size([8])
        assert set(selected["index"].tolist()) <= set(batch["index"].tolist())
        weights = selected["priority_weight"]
        assert torch.isfinite(weights).all() and (weights > 0).all()
    else:
        assert selected is batch  # no down-sample
    assert isinstance(replay.buffer.sampler, PrioritizedSampler) == (sampler == "per")


def test_replay_anneals_per_beta_and_updates_priorities():
    torch.manual_seed(0)
    replay, _ = _cartpole_replay("per")
    replay.sample(progress=0.5)
    assert replay.buffer.sampler.beta == pytest.approx(0.7)
    replay.sample(progress=2.0)
    assert replay.buffer.sampler.beta == 1.0
    # After the update, the priorities are the batch's "td_error": one row far above the rest is
    # (almost surely) the only row drawn.
    rows = torch.arange(64)
    td_error = torch.zeros(64)
    td_error[5] = 1e6
    replay.after_update({"index": rows, "td_error": td_error})
    assert set(replay.sample(progress=1.0)["index"].tolist()) == {5}


def test_replay_leaves_priorities_alone_without_per():
    replay, _ = _cartpole_replay("laber-mean")
    batch = replay.downsample(replay.sample(progress=0.0))
    replay.after_update(batch)  # a uniform buffer has no priorities to update: a no-op, no error
    assert batch.batch_size == torch.Size([8])


def test_unknown_sampler_is_a_value_error_naming_the_choices():
    with pytest.raises(ValueError, match="sampler must be one of .*laber-mean"):
        common.make_buffer("no-such-sampler", buffer_size=10, batch_size=2, m=4, device=torch.device("cpu"))


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
    assert_returns_possible(tmp_path, AGENT_ARGS[algo][1])


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("algo", ["dqn", "sac"])
def test_agent_runs_with_cudagraphs_on_cuda(algo, tmp_path):
    run_agent(algo, *AGENT_ARGS[algo], "--sampler", "laber-mean", "--device", "cuda", "--cudagraphs",
              "--out", str(tmp_path))
    assert read_csv(tmp_path / "eval.csv")[0]["step"] == "300"
    assert_returns_possible(tmp_path, AGENT_ARGS[algo][1])
