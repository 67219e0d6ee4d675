"""What the agents really share: the sampler choice, evaluation, logging, checkpoints.

Everything algorithm-specific (networks, losses, the update) stays in the agent's own file.
"""
from __future__ import annotations

import csv
import os
import pickle
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import gymnasium as gym
import numpy as np
import torch
from tensordict import TensorDict
from torchrl.data import LazyTensorStorage, PrioritizedSampler, RandomSampler, TensorDictReplayBuffer

SAMPLERS = ("uniform", "per", "laber-mean", "laber-lazy", "laber-max", "large-batch")


@dataclass
class RunOptions:
    """How a run is executed, the same for every agent (each agent's Config adds its own fields)."""

    seed: int = 0
    """seeds python, numpy, torch and the environment"""
    device: str = "auto"
    """auto (CUDA when present), cpu or cuda"""
    compile: bool = False
    """torch.compile the update (two fullgraph graphs, see torchsample.make_update)"""
    cudagraphs: bool = False
    """capture the update in a CUDA graph (CUDA only)"""
    threads: int = 1
    """torch CPU threads (1 lets agents.compare run one process per core)"""
    checkpoint_every: int = 0
    """steps between checkpoints (0: only at the end)"""
    stop_after: int = 0
    """stop (after writing a checkpoint) at this step, as a preempted job would (0: run to the end)"""
    resume: bool = False
    """continue from <out>/checkpoint exactly where it stopped (buffer, optimizer, sampler, RNGs)"""
    progress: bool = True
    """show a progress bar"""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_env(env_id: str, seed: int) -> gym.Env:
    """A gymnasium env; ``MinAtar/*`` ids are registered on demand."""
    if env_id.startswith("MinAtar/"):
        import minatar.gym

        minatar.gym.register_envs()
    env = gym.make(env_id)
    env.reset(seed=seed)
    env.action_space.seed(seed)
    return env


# ---------------------------------------------------------------------------------------------
# The sampler choice


def make_buffer(sampler: str, *, buffer_size: int, batch_size: int, m: int, device: torch.device,
                per_alpha: float = 0.6, per_beta: float = 0.4) -> TensorDictReplayBuffer:
    """The replay buffer each ``--sampler`` needs.

    * ``uniform``: ``batch_size`` rows uniformly;
    * ``large-batch``: ``m * batch_size`` rows uniformly (the LaBER paper's fairness baseline);
    * ``per``: TorchRL's ``PrioritizedSampler`` (proportional, ``alpha``, ``beta`` annealed by the
      caller with :func:`anneal_per_beta`), ``batch_size`` rows;
    * ``laber-*``: ``m * batch_size`` rows uniformly; the caller down-samples them with
      :class:`torchsample.LaBER`.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    large = sampler == "large-batch" or sampler.startswith("laber")
    storage = LazyTensorStorage(buffer_size, device=device)
    if sampler == "per":
        return TensorDictReplayBuffer(
            storage=storage,
            sampler=PrioritizedSampler(buffer_size, alpha=per_alpha, beta=per_beta),
            batch_size=batch_size,
        )
    return TensorDictReplayBuffer(storage=storage, sampler=RandomSampler(), batch_size=m * batch_size if large else batch_size)


def anneal_per_beta(buffer: TensorDictReplayBuffer, progress: float, start: float = 0.4) -> None:
    """PER's importance-sampling exponent, annealed linearly from ``start`` to 1 (Schaul et al.).

    ``beta = start + (1 - start) * clamp(progress, 0, 1)``; buffers without a ``PrioritizedSampler``
    are left alone.

    Examples:
        >>> buffer = make_buffer("per", buffer_size=10, batch_size=2, m=1, device=torch.device("cpu"))
        >>> anneal_per_beta(buffer, 0.5); round(buffer.sampler.beta, 6)
        0.7
        >>> anneal_per_beta(buffer, 2.0); buffer.sampler.beta
        1.0
    """
    if isinstance(buffer.sampler, PrioritizedSampler):
        buffer.sampler.beta = start + (1.0 - start) * min(max(progress, 0.0), 1.0)


# ---------------------------------------------------------------------------------------------
# Evaluation


def evaluate(env_id: str, policy: Callable[[np.ndarray], np.ndarray], episodes: int, seed: int) -> float:
    """Mean undiscounted return of ``policy`` (deterministic) over ``episodes`` fresh episodes."""
    env = make_env(env_id, seed)
    returns = []
    for episode in range(episodes):
        obs, _ = env.reset(seed=seed + episode)
        done, total = False, 0.0
        while not done:
            obs, reward, terminated, truncated, _ = env.step(policy(obs))
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    env.close()
    return float(np.mean(returns))


# ---------------------------------------------------------------------------------------------
# Logging


class Logger:
    """Appends rows to ``<run_dir>/<name>.csv`` (and TensorBoard when it is installed)."""

    def __init__(self, run_dir: Path, config) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.txt").write_text("\n".join(f"{k}={v}" for k, v in asdict(config).items()) + "\n")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.run_dir / "tb"))
        except Exception:  # tensorboard is optional
            self.tb = None

    def log(self, name: str, step: int, **values: float) -> None:
        path = self.run_dir / f"{name}.csv"
        new = not path.exists()
        with path.open("a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["step", *values])
            writer.writerow([step, *values.values()])
        if self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(f"{name}/{key}", value, step)


# ---------------------------------------------------------------------------------------------
# Checkpoints: everything needed to continue a run exactly


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, *, step: int, modules: dict, buffer: TensorDictReplayBuffer, env: gym.Env,
                    loop_state: dict) -> None:
    """Writes ``path`` (a folder): module/optimizer state, the buffer, the env and the RNGs.

    The env is pickled so that the episode in progress continues where it stopped; gymnasium's
    classic-control and MinAtar envs pickle, MuJoCo's do not (then ``env`` is ``None`` and a resumed
    run starts a new episode).
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    buffer.dumps(tmp / "buffer")
    try:
        env_bytes = pickle.dumps(env)
    except Exception:
        env_bytes = None
    torch.save(
        {
            "step": step,
            "modules": {k: v.state_dict() for k, v in modules.items()},
            "rng": rng_state(),
            "env": env_bytes,
            "loop": loop_state,
        },
        tmp / "state.pt",
    )
    if path.exists():
        import shutil

        shutil.rmtree(path)
    os.replace(tmp, path)


def load_checkpoint(path: Path, *, modules: dict, buffer: TensorDictReplayBuffer) -> tuple[int, Optional[gym.Env], dict]:
    """Restores what :func:`save_checkpoint` wrote; returns ``(step, env or None, loop_state)``."""
    path = Path(path)
    state = torch.load(path / "state.pt", weights_only=False)
    for key, module in modules.items():
        module.load_state_dict(state["modules"][key])
    buffer.loads(path / "buffer")
    set_rng_state(state["rng"])
    env = pickle.loads(state["env"]) if state["env"] is not None else None
    return state["step"], env, state["loop"]


class Checkpointer:
    """Resume, periodic checkpoints and a simulated preemption, the same for every agent's loop.

    The loop's own position (``obs``, ``episode_return``, ``episode_returns``) travels with the
    checkpoint, so ``--resume`` continues the episode in progress where the env pickles.

    Examples:
        >>> import tempfile, torch
        >>> net = torch.nn.Linear(4, 2)
        >>> buffer = make_buffer("uniform", buffer_size=10, batch_size=2, m=1, device=torch.device("cpu"))
        >>> ckpt = Checkpointer(RunOptions(stop_after=3), Path(tempfile.mkdtemp()), {"net": net}, buffer, total_steps=5)
        >>> step, env, loop = ckpt.resume(make_env("CartPole-v1", 0), seed=0)
        >>> step, sorted(loop)
        (0, ['episode_return', 'episode_returns', 'obs'])
        >>> obs, loop["obs"] = loop["obs"], env.step(0)[0]
        >>> _ = buffer.add(to_tensordict(obs, 0, 1.0, loop["obs"], False, False, torch.device("cpu")))
        >>> ckpt.after_step(3, env, **loop), (ckpt.path / "state.pt").exists()
        (True, True)
    """

    def __init__(self, opts: RunOptions, out: Path, modules: dict, buffer: TensorDictReplayBuffer, total_steps: int) -> None:
        self.opts, self.path, self.total_steps = opts, Path(out) / "checkpoint", total_steps
        self.modules, self.buffer = modules, buffer

    def resume(self, env: gym.Env, seed: int) -> tuple[int, gym.Env, dict]:
        """``(start step, env, loop state)``: the checkpoint's with ``--resume``, else a fresh start."""
        loop = {"obs": env.reset(seed=seed)[0], "episode_return": 0.0, "episode_returns": []}
        if not (self.opts.resume and self.path.exists()):
            return 0, env, loop
        step, saved_env, saved = load_checkpoint(self.path, modules=self.modules, buffer=self.buffer)
        if saved_env is None:  # MuJoCo envs do not pickle: the resumed run starts a new episode
            return step, env, {**saved, "obs": env.reset()[0], "episode_return": 0.0}
        return step, saved_env, saved

    def after_step(self, step: int, env: gym.Env, **loop_state) -> bool:
        """Checkpoint when one is due after ``step`` env steps; True when the run stops here (``--stop-after``)."""
        stopping = bool(self.opts.stop_after) and step == self.opts.stop_after
        due = self.opts.checkpoint_every and step % self.opts.checkpoint_every == 0
        if stopping or due or step == self.total_steps:
            save_checkpoint(self.path, step=step, modules=self.modules, buffer=self.buffer, env=env, loop_state=loop_state)
        return stopping


class StepTimer:
    """Steps per second after a burn-in, so compilation and warm-up do not count."""

    def __init__(self, burn_in: int) -> None:
        self.burn_in, self.t0, self.step0 = burn_in, None, 0

    def rate(self, step: int) -> float:
        if step < self.burn_in:
            return float("nan")
        if self.t0 is None:
            self.t0, self.step0 = time.perf_counter(), step
            return float("nan")
        elapsed = time.perf_counter() - self.t0
        return (step - self.step0) / elapsed if elapsed > 0 else float("nan")


def to_tensordict(obs, action, reward, next_obs, terminated, truncated, device) -> TensorDict:
    """One transition in TorchRL's layout (``("next", ...)`` keys), batch size ``[]``."""
    return TensorDict(
        {
            "observation": torch.as_tensor(obs, device=device),
            "action": torch.as_tensor(action, device=device),
            ("next", "observation"): torch.as_tensor(next_obs, device=device),
            ("next", "reward"): torch.as_tensor([reward], dtype=torch.float32, device=device),
            ("next", "terminated"): torch.as_tensor([terminated], device=device),
            ("next", "truncated"): torch.as_tensor([truncated], device=device),
            ("next", "done"): torch.as_tensor([terminated or truncated], device=device),
        },
        batch_size=[],
        device=device,
    )
