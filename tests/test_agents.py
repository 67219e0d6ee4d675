"""The training scripts: each agent runs a few hundred steps with each sampler in a subprocess, its
returns lie in what the environment can give, DQN learns CartPole, ``--resume`` reproduces the
uninterrupted run, ``--help`` shows the defaults a run uses, and the sampler choice is built in one
place (``experiments.compare``: tests/test_compare.py)."""

import ast
import csv
import dataclasses
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torchrl.data import PrioritizedSampler
from torchrl.objectives import SoftUpdate

from tests.conftest import AGENT_DEPS, require, requires_cuda  # noqa: E402
from torchsample import GERSampler
from torchsample.sampler import LaBERDraw

require(*AGENT_DEPS)
from agents import c51, dqn, replay, sac, td3  # noqa: E402
from agents.config import cli  # noqa: E402
from agents.envs import make_env, to_tensordict  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAMPLERS = [
    "uniform",
    "per",
    "laber-mean",
    "laber-lazy",
    "laber-max",
    "large-batch",
    "per-laber-mean",
    "ger",
    "ger-laber-mean",
    "lfiw",
    "lfiw-laber-mean",
]
AGENTS = {"dqn": dqn, "c51": c51, "sac": sac, "td3": td3}
# LFIW re-weights an actor-critic's critics (Sinha et al.'s SAC and TD3): DQN and C51 do not offer it.
VALUE_BASED_SAMPLERS = [name for name in SAMPLERS if not name.startswith("lfiw")]
# A fast buffer of 100 rows: the slow one passes LFIW's threshold at step 101, so short runs re-weight.
LFIW_ARGS = ["--lfiw-fast-size", "100", "--lfiw-log-every", "50"]
# Small runs: a few hundred steps, learning from step 100, evaluation at the end.
DISCRETE = [
    "--env-id",
    "CartPole-v1",
    "--total-steps",
    "300",
    "--learning-starts",
    "100",
    "--eval-every",
    "300",
    "--eval-episodes",
    "1",
    "--batch-size",
    "16",
    "--train-freq",
    "20",
    "--gradient-steps",
    "4",
]
CONTINUOUS = [
    "--env-id",
    "Pendulum-v1",
    "--total-steps",
    "300",
    "--learning-starts",
    "200",
    "--eval-every",
    "300",
    "--eval-episodes",
    "1",
    "--batch-size",
    "16",
    "--hidden",
    "32",
    "32",
]
AGENT_ARGS = {"dqn": DISCRETE, "c51": DISCRETE, "sac": CONTINUOUS, "td3": CONTINUOUS}
# What one episode can return: CartPole-v1 +1 per step, 1 to 500 steps; Pendulum-v1 200 steps of
# -(theta^2 + 0.1 theta_dot^2 + 0.001 u^2) with |theta| <= pi, |theta_dot| <= 8, |u| <= 2; MinAtar
# Breakout +1 per brick; MuJoCo: any finite number.
RETURN_RANGE = {
    "CartPole-v1": (1.0, 500.0),
    "Pendulum-v1": (-200 * (math.pi**2 + 0.1 * 8**2 + 0.001 * 2**2), 0.0),
    "MinAtar/Breakout-v1": (0.0, math.inf),
    "HalfCheetah-v5": (-math.inf, math.inf),
    "Hopper-v5": (-math.inf, math.inf),
}

pytestmark = pytest.mark.slow


def run_agent(algo: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", f"agents.{algo}", "--no-progress", *args]
    proc = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
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


RUNS = [
    (algo, sampler) for algo in AGENT_ARGS for sampler in (SAMPLERS if algo in ("sac", "td3") else VALUE_BASED_SAMPLERS)
]


@pytest.mark.parametrize("algo, sampler", RUNS, ids=[f"{algo}-{sampler}" for algo, sampler in RUNS])
def test_agent_runs_with_each_sampler(algo, sampler, tmp_path):
    lfiw = sampler.startswith("lfiw")
    run_agent(algo, *AGENT_ARGS[algo], "--sampler", sampler, *(LFIW_ARGS if lfiw else []), "--out", str(tmp_path))
    evals = read_csv(tmp_path / "eval.csv")
    assert len(evals) == 1 and evals[0]["step"] == "300"
    assert_returns_possible(tmp_path, AGENT_ARGS[algo][1])
    assert len(read_csv(tmp_path / "train.csv")) >= 1  # CartPole's random episodes end quickly, Pendulum's at 200
    assert (tmp_path / "checkpoint" / "state.pt").exists()
    assert not (tmp_path / "checkpoint" / "buffer").exists()  # a finished run keeps no buffer unless asked
    if lfiw:
        # Updates from step 200, past the threshold since step 101: the ratio logged every 50 steps.
        rows = read_csv(tmp_path / "lfiw.csv")
        assert [(r["step"], r["slow_size"]) for r in rows] == [("250", "250"), ("300", "300")]
        for row in rows:
            mean, std, ess = float(row["ratio_mean"]), float(row["ratio_std"]), float(row["ess"])
            assert mean > 0 and std >= 0 and 0 < ess <= 1 + 1e-6 and math.isfinite(float(row["ratio_loss"])), row
        saved = torch.load(tmp_path / "checkpoint" / "state.pt", weights_only=False)["modules"]
        assert {"lfiw", "lfiw_optimizer", "lfiw_fast_buffer"} <= set(saved)


def test_dqn_learns_cartpole(tmp_path):
    """With its own defaults, LaBER-mean DQN gets far past a random policy (about 22) in 3000 steps
    (10 training phases); a broken estimator (weights, priorities, targets) does not."""
    run_agent(
        "dqn",
        "--env-id",
        "CartPole-v1",
        "--sampler",
        "laber-mean",
        "--total-steps",
        "3000",
        "--learning-starts",
        "500",
        "--eval-every",
        "3000",
        "--out",
        str(tmp_path),
    )
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


def test_a_finished_run_keeps_its_buffer_only_if_asked(tmp_path):
    """Issue 23, item 3: every final checkpoint held the buffer (81 MB per MinAtar run, 7.7 GB in one study)."""
    run_agent("dqn", *AGENT_ARGS["dqn"], "--sampler", "uniform", "--keep-buffer", "--out", str(tmp_path / "kept"))
    assert (tmp_path / "kept" / "checkpoint" / "buffer").is_dir()
    run_agent("dqn", *AGENT_ARGS["dqn"], "--sampler", "uniform", "--out", str(tmp_path / "dropped"))
    assert not (tmp_path / "dropped" / "checkpoint" / "buffer").exists()
    with pytest.raises(AssertionError, match="holds no replay buffer"):
        run_agent("dqn", *AGENT_ARGS["dqn"], "--sampler", "uniform", "--out", str(tmp_path / "dropped"), "--resume")


# SAC with lfiw-laber-mean covers what SAC with laber-mean did (LaBER, the buffer, the RNGs) and LFIW's state.
@pytest.mark.parametrize("algo, sampler", [("dqn", "laber-mean"), ("dqn", "per"), ("sac", "lfiw-laber-mean")])
def test_resume_reproduces_the_uninterrupted_run(algo, sampler, tmp_path):
    lfiw = sampler.startswith("lfiw")  # the ratio network, its optimiser and the fast buffer must resume too
    args = [
        *AGENT_ARGS[algo],
        "--total-steps",
        "400",
        "--eval-every",
        "200",
        "--sampler",
        sampler,
        "--learning-starts",
        "100",
        *(LFIW_ARGS if lfiw else []),
    ]
    run_agent(algo, *args, "--out", str(tmp_path / "straight"))
    run_agent(algo, *args, "--out", str(tmp_path / "resumed"), "--stop-after", "250")
    # The interrupted run must really stop early: its last evaluation is the one at step 200.
    assert [r["step"] for r in read_csv(tmp_path / "resumed" / "eval.csv")] == ["200"]
    run_agent(algo, *args, "--out", str(tmp_path / "resumed"), "--resume")
    assert_returns_possible(tmp_path / "straight", AGENT_ARGS[algo][1])
    logs = [("train", "episode_return"), ("eval", "eval_return")] + ([("lfiw", "ratio_mean")] if lfiw else [])
    for name, key in logs:
        straight = [(r["step"], r[key]) for r in read_csv(tmp_path / "straight" / f"{name}.csv")]
        resumed = [(r["step"], r[key]) for r in read_csv(tmp_path / "resumed" / f"{name}.csv")]
        assert straight == resumed and len(straight) > 1
    for module in ["loss", "lfiw"] if lfiw else ["loss"]:
        a = torch.load(tmp_path / "straight" / "checkpoint" / "state.pt", weights_only=False)["modules"][module]
        b = torch.load(tmp_path / "resumed" / "checkpoint" / "state.pt", weights_only=False)["modules"][module]
        assert a.keys() == b.keys()
        for key in a:
            same = torch.equal(a[key], b[key]) if torch.is_tensor(a[key]) else a[key] == b[key]  # tensordict 0.11
            assert same, (module, key)  # also keeps the parameters' batch size and device


def test_dqn_with_n_step_returns_stores_n_step_rows_and_resumes(tmp_path):
    """``--n-step 3`` (issue 28, item 4): DQN trains 400 steps on CartPole through LaBER, its buffer holds
    TorchRL's 3-step rows (``k = 3``, fewer at an episode's end, whose done flags they carry; CartPole pays
    1 per step, so the k-step reward is ``sum_{j<k} gamma^j``), and ``--resume`` reproduces the run, the
    transitions waiting in the transform's window included. ``--n-step 1`` adds no transform: today's runs."""
    args = [*AGENT_ARGS["dqn"], "--total-steps", "400", "--eval-every", "200", "--sampler", "laber-mean"]
    args += ["--n-step", "3", "--keep-buffer"]
    run_agent("dqn", *args, "--out", str(tmp_path / "straight"))
    run_agent("dqn", *args, "--out", str(tmp_path / "resumed"), "--stop-after", "250")
    run_agent("dqn", *args, "--out", str(tmp_path / "resumed"), "--resume")
    assert_returns_possible(tmp_path / "straight", "CartPole-v1")
    for name, key in [("train", "episode_return"), ("eval", "eval_return")]:
        straight = [(r["step"], r[key]) for r in read_csv(tmp_path / "straight" / f"{name}.csv")]
        assert straight == [(r["step"], r[key]) for r in read_csv(tmp_path / "resumed" / f"{name}.csv")]

    env, cpu = make_env("CartPole-v1", 0), torch.device("cpu")
    buffers = []
    for run in ("straight", "resumed"):
        cfg = dqn.Config(n_step=3)  # the runs' buffer size, which rb.loads expects
        loss_module, _ = dqn.build_dqn(cfg, env, cpu)
        rb, _ = dqn.make_replay(cfg, loss_module, env, cpu)
        rb.loads(tmp_path / run / "checkpoint" / "buffer")
        buffers.append(rb[:])
    rows = buffers[0]
    assert len(rows) == 400 - 3  # the last 3 transitions wait for their successors
    assert (rows.exclude("index") == buffers[1].exclude("index")).all()
    k = rows["steps_to_next_obs"]
    assert k.max() == 3 and (k < 3).any()
    gamma = dqn.Config().gamma
    torch.testing.assert_close(rows["next", "reward"].squeeze(-1), (1 - gamma**k) / (1 - gamma))
    assert rows["next", "done"][k < 3].all()  # a window shorter than 3 ends its episode
    cfg = dqn.Config(buffer_size=1_000)
    assert len(dqn.make_replay(cfg, dqn.build_dqn(cfg, env, cpu)[0], env, cpu)[0].transform) == 0


@pytest.mark.parametrize("algo", list(AGENT_ARGS))
def test_help_documents_every_option(algo):
    proc = run_agent(algo, "--help")
    for option in ["--sampler", "--m", "--batch-size", "--compile", "--cudagraphs", "--resume", "--device", "--env-id"]:
        assert option in proc.stdout
    # Every sampler the agent supports (LFIW's for SAC and TD3 only); the help box wraps a long list, so
    # compare without spaces and borders.
    offered = SAMPLERS if algo in ("sac", "td3") else VALUE_BASED_SAMPLERS
    assert "--sampler{" + ",".join(offered) + "}" in re.sub(r"[\s│╭╮╰╯─]", "", proc.stdout)
    assert list(replay.ACTOR_CRITIC_SAMPLERS) == SAMPLERS and list(replay.VALUE_SAMPLERS) == VALUE_BASED_SAMPLERS
    assert "(default: None)" not in proc.stdout


# The values each env family's runs use: until now the fields below defaulted to None and got these
# values after parsing (the README's results came from them; docs/agents.md says where they come from).
CLASSIC = dict(
    batch_size=64,
    total_steps=50_000,
    learning_starts=1_000,
    train_freq=256,
    gradient_steps=128,
    lr=2.3e-3,
    gamma=0.98,
    lr_schedule="linear",
    target_update=128,
    target_tau=0.005,
    end_epsilon=0.04,
    exploration_steps=8_000,
    optimizer="adam",
)
MINATAR = dict(
    batch_size=32,
    total_steps=5_000_000,
    learning_starts=5_000,
    train_freq=1,
    gradient_steps=1,
    lr=1e-4,
    gamma=0.99,
    lr_schedule="constant",
    target_update=1_000,
    target_tau=0.0,
    end_epsilon=0.1,
    exploration_steps=100_000,
    optimizer="rmsprop",
)
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


@pytest.mark.parametrize(
    "algo, env_id",
    list(FAMILY_DEFAULTS),
    ids=[f"{algo}-{env_id.replace('/', '-')}" for algo, env_id in FAMILY_DEFAULTS],
)
def test_help_shows_the_defaults_the_env_family_runs_with(algo, env_id, capsys):
    """``--env-id X --help`` prints X's family's values, and parsing ``--env-id X`` gives them."""
    agent = AGENTS[algo]
    expected = FAMILY_DEFAULTS[algo, env_id]
    cfg = cli(agent.env_defaults, agent.Config.env_id, ["--env-id", env_id])
    assert cfg == agent.env_defaults(env_id)
    assert {name: getattr(cfg, name) for name in expected} == expected
    assert all(getattr(cfg, f.name) is not None for f in dataclasses.fields(cfg))
    assert cli(agent.env_defaults, agent.Config.env_id, [f"--env_id={env_id}", "--m", "8"]) == dataclasses.replace(
        cfg, m=8
    )

    with pytest.raises(SystemExit):
        cli(agent.env_defaults, agent.Config.env_id, ["--env-id", env_id, "--help"])
    text = " ".join(re.sub("[│╭╮╰╯─]", " ", capsys.readouterr().out).split())  # the help box, unwrapped
    assert "(default: None)" not in text
    for name, value in expected.items():
        shown = " ".join(map(str, value)) if isinstance(value, tuple) else str(value)
        option = text[text.index(f"--{name.replace('_', '-')} ") :]
        assert option[option.index("(default: ") :].startswith(f"(default: {shown})"), option[:200]


@pytest.mark.parametrize(
    "module",
    [
        "agents/config",
        "agents/value_based",
        "agents/actor_critic",
        "agents/dqn",
        "agents/c51",
        "agents/sac",
        "agents/td3",
        "experiments/config",  # experiments.compare's Config, moved there (issue 31, item 3)
    ],
)
def test_every_config_field_has_a_docstring(module):
    """tyro turns the string under a field into its --help text: a field without one is undocumented."""
    tree = ast.parse((ROOT / f"{module}.py").read_text())
    configs = [
        node
        for node in tree.body
        if isinstance(node, ast.ClassDef) and node.name in ("Config", "RunOptions", "ValueConfig", "ActorCriticConfig")
    ]
    assert configs
    for config in configs:
        body = config.body
        fields = [i for i, node in enumerate(body) if isinstance(node, ast.AnnAssign)]
        assert fields, config.name
        for i in fields:
            following = body[i + 1] if i + 1 < len(body) else None
            documented = (
                isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
                and following.value.value.strip()
            )
            assert documented, f"{module}.py {config.name}.{body[i].target.id} has no docstring"


# The loop each family shares (agents/dqn.py's docstring says why): an agent imports its own family's, no other.
FAMILY = {"dqn": "value_based", "c51": "value_based", "sac": "actor_critic", "td3": "actor_critic"}


@pytest.mark.parametrize("algo", list(AGENTS))
def test_each_agent_reads_alone(algo):
    """An agent imports no other agent, only its family's loop and bookkeeping, and its file shows its config,
    network, loss, replay buffer and update, the places a researcher edits marked ``# ALGO LOGIC``."""
    tree = ast.parse((ROOT / "agents" / f"{algo}.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported |= {f"{node.module}.{alias.name}" for alias in node.names} | {node.module}
        elif isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
    others = {f"agents.{name}" for name in AGENTS if name != algo} | {
        f"agents.{family}" for family in set(FAMILY.values()) - {FAMILY[algo]}
    }
    assert not imported & others, imported & others
    defined = {node.name for node in tree.body if isinstance(node, (ast.ClassDef, ast.FunctionDef))}
    assert {"Config", "env_defaults", "main", f"build_{algo}"} <= defined
    # main itself builds the loss and runs the update: no hidden switch for another algorithm.
    source = (ROOT / "agents" / f"{algo}.py").read_text()
    for foreign in ("actor_every", "build=", "with_env_defaults"):
        assert foreign not in source, foreign
    for shown in (
        f"build_{algo}(cfg, env, device)",
        "make_replay(cfg",
        "LaBERLoss(loss_module)",
        "def objective(",
        "ALGO LOGIC",
    ):
        assert shown in source, shown


# The replay buffer each agent builds for its --sampler (dqn.make_replay; SAC and TD3 alike, with LFIW).


def _cartpole_replay(sampler: str, batch_size: int = 8, m: int = 4, rows: int = 64, compile: bool = False):
    env = make_env("CartPole-v1", 0)
    cfg = dqn.Config(sampler=sampler, batch_size=batch_size, m=m, buffer_size=1_000, compile=compile)
    loss_module, _ = dqn.build_dqn(cfg, env, torch.device("cpu"))
    SoftUpdate(loss_module, tau=0.005)  # the agent's target updater (without one TorchRL warns)
    rb, laber = dqn.make_replay(cfg, loss_module, env, torch.device("cpu"))
    obs, _ = env.reset(seed=0)
    for _ in range(rows):
        action = env.action_space.sample()
        next_obs, reward, terminated, truncated, _ = env.step(action)
        rb.add(to_tensordict(obs, action, reward, next_obs, terminated, truncated, torch.device("cpu")))
        obs = env.reset()[0] if terminated or truncated else next_obs
    return rb, laber, loss_module


@pytest.mark.parametrize("compile", [False, True], ids=["sampler", "compiled-update"])
@pytest.mark.parametrize("sampler", VALUE_BASED_SAMPLERS)
def test_the_buffer_draws_what_each_sampler_names(sampler, compile):
    """LaBER through LaBERSampler (B rows out of rb.sample()), or, for a compiled update, in the update
    (rb.sample() gives m * B rows, LaBER keeps B); PER and GER through TorchRL's PrioritizedSampler."""
    torch.manual_seed(0)
    rb, laber, _ = _cartpole_replay(sampler, compile=compile)
    weighting = sampler.rpartition("laber-")[2] if "laber-" in sampler else None
    batch = rb.sample()
    in_update = compile and weighting is not None
    assert batch.batch_size == torch.Size([32 if sampler == "large-batch" or in_update else 8])
    assert (laber is not None) == in_update
    assert isinstance(rb.sampler, LaBERDraw) == (weighting is not None and not compile)
    if in_update:
        selected = laber(batch)
        assert selected.batch_size == torch.Size([8])
        assert set(selected["index"].tolist()) <= set(batch["index"].tolist())
        batch = selected
    if weighting is not None:
        weights = batch["priority_weight"]
        assert torch.isfinite(weights).all() and (weights > 0).all()
        assert laber is None or laber.weighting == weighting
    assert isinstance(rb.sampler, PrioritizedSampler) == sampler.startswith(("per", "ger"))
    assert isinstance(rb.sampler, GERSampler) == sampler.startswith("ger")


def test_per_laber_updates_the_priorities_of_the_rows_kept():
    """PER-LaBER with twin critics: the kept rows come as [B, 1 + C] (column 0 the actor's), with one
    storage index per "td_error"; each of them gets its own priority through
    rb.update_priority(batch["index"], batch["td_error"]), as the agents call it, and only they do."""
    torch.manual_seed(0)
    np.random.seed(0)
    env = make_env("Pendulum-v1", 0)
    cfg = sac.Config(hidden=(32, 32), sampler="per-laber-mean", batch_size=8, m=4, buffer_size=1_000)
    loss_module, _ = sac.build_sac(cfg, env, torch.device("cpu"))
    SoftUpdate(loss_module, tau=0.005)
    rb, *_ = sac.make_replay(cfg, loss_module, env, torch.device("cpu"))
    obs, _ = env.reset(seed=0)
    for _ in range(64):
        action = env.action_space.sample()
        next_obs, reward, terminated, truncated, _ = env.step(action)
        rb.add(to_tensordict(obs, action, reward, next_obs, terminated, truncated, torch.device("cpu")))
        obs = next_obs
    rb.update_priority(torch.arange(64), torch.rand(64) + 0.1)  # unequal priorities: PER weights != 1
    kept = rb.sample()
    assert kept.batch_size == torch.Size([8, 3]) and kept["td_error"].shape == kept["index"].shape
    tree = rb.sampler._sum_tree
    before = torch.tensor([tree[i] for i in range(64)])  # (priority + eps)^alpha of every stored row
    kept.set("td_error", kept["index"].float() + 1.0)  # a priority that names its row, duplicates agree
    rb.update_priority(kept["index"], kept["td_error"])
    after = torch.tensor([tree[i] for i in range(64)])
    index = kept["index"].reshape(-1).unique()
    torch.testing.assert_close(after[index], (index.float() + 1.0 + rb.sampler._eps) ** rb.sampler.alpha)
    others = torch.ones(64, dtype=torch.bool)
    others[index] = False
    assert torch.equal(after[others], before[others])


def test_unknown_sampler_is_a_value_error_naming_the_choices():
    with pytest.raises(ValueError, match="sampler must be one of .*laber-mean"):
        replay.make_sampler(dqn.Config(sampler="no-such-sampler"), loss_module=None)


@pytest.mark.parametrize("algo", ["dqn", "sac"])
def test_progress_bar_shows_steps_return_and_steps_per_second(algo, tmp_path):
    # 800 steps: past the steps/s burn-in (learning starts + 500 for DQN, + 200 for SAC).
    args = [*AGENT_ARGS[algo], "--total-steps", "800", "--eval-every", "800", "--learning-starts", "100"]
    cmd = [sys.executable, "-m", f"agents.{algo}", *args, "--sampler", "laber-mean", "--out", str(tmp_path)]
    proc = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
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
    run_agent(
        algo, *AGENT_ARGS[algo], "--sampler", "laber-mean", "--device", "cuda", "--cudagraphs", "--out", str(tmp_path)
    )
    assert read_csv(tmp_path / "eval.csv")[0]["step"] == "300"
    assert_returns_possible(tmp_path, AGENT_ARGS[algo][1])
