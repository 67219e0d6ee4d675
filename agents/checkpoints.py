"""Checkpoints: everything needed to continue a run exactly (modules, optimizers, the replay buffer, the env,
the RNGs and the loop's position), written atomically, and :class:`Checkpointer`, which the training loop
asks when to write one and where a ``--resume``d run starts."""

from __future__ import annotations

import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Optional

import gymnasium as gym
import numpy as np
import torch
from torchrl.data import TensorDictReplayBuffer

from agents.config import RunOptions
from agents.nstep import MultiStep


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _state_of(obj) -> dict:
    """``obj.state_dict()``; for TorchRL 0.11's target updaters, which have none, the same fields
    as 0.14's ``TargetNetUpdater.state_dict``: whether it is initialised and HardUpdate's counter."""
    if hasattr(obj, "state_dict"):
        return obj.state_dict()
    return {name: getattr(obj, name) for name in ("initialized", "counter") if hasattr(obj, name)}


def _load_state_of(obj, state: dict) -> None:
    """Restores what :func:`_state_of` returned."""
    if hasattr(obj, "load_state_dict"):
        obj.load_state_dict(state)
        return
    for name, value in state.items():
        setattr(obj, name, value)


def save_checkpoint(
    path: Path, *, step: int, modules: dict, buffer: Optional[TensorDictReplayBuffer], env: gym.Env, loop_state: dict
) -> None:
    """Writes ``path`` (a folder): module/optimizer state, the buffer (unless ``None``), the env and the RNGs.

    The env is pickled so that the episode in progress continues where it stopped; gymnasium's
    classic-control and MinAtar envs pickle, MuJoCo's do not (then ``env`` is ``None`` and a resumed
    run starts a new episode).

    Examples:
        >>> import tempfile
        >>> from torchrl.data import LazyTensorStorage
        >>> from agents.envs import make_env, to_tensordict
        >>> path, net = Path(tempfile.mkdtemp()) / "checkpoint", torch.nn.Linear(2, 1)
        >>> buffer = TensorDictReplayBuffer(storage=LazyTensorStorage(10))
        >>> _ = buffer.add(to_tensordict([0.0], 0, 1.0, [1.0], False, False, "cpu"))
        >>> save_checkpoint(path, step=7, modules={"net": net}, buffer=buffer, env=make_env("CartPole-v1", 0),
        ...                 loop_state={"episode_return": 3.0})
        >>> step, env, loop_state = load_checkpoint(path, modules={"net": net}, buffer=buffer)
        >>> step, type(env.unwrapped).__name__, loop_state
        (7, 'CartPoleEnv', {'episode_return': 3.0})
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # what an interrupted save left
    tmp.mkdir(parents=True)
    if buffer is not None:
        buffer.dumps(tmp / "buffer")
    try:
        env_bytes = pickle.dumps(env)
    except Exception:
        env_bytes = None
    torch.save(
        {
            "step": step,
            "modules": {k: _state_of(v) for k, v in modules.items()},
            "rng": _rng_state(),
            "env": env_bytes,
            "loop": loop_state,
        },
        tmp / "state.pt",
    )
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


def load_checkpoint(
    path: Path, *, modules: dict, buffer: TensorDictReplayBuffer
) -> tuple[int, Optional[gym.Env], dict]:
    """Restores what :func:`save_checkpoint` wrote; returns ``(step, env or None, loop_state)``."""
    path = Path(path)
    state = torch.load(path / "state.pt", weights_only=False)
    if not (path / "buffer").exists():
        raise FileNotFoundError(
            f"{path} holds no replay buffer: it is the final checkpoint of a finished run, saved "
            "without --keep-buffer; there is nothing to resume"
        )
    for key, module in modules.items():
        _load_state_of(module, state["modules"][key])
    buffer.loads(path / "buffer")
    _set_rng_state(state["rng"])
    env = pickle.loads(state["env"]) if state["env"] is not None else None
    return state["step"], env, state["loop"]


class Checkpointer:
    """Resume, periodic checkpoints and a simulated preemption, the same for every agent's loop.

    The loop's own position (``obs``, ``episode_return``, ``episode_returns``) travels with the
    checkpoint, so ``--resume`` continues the episode in progress where the env pickles.

    Examples:
        >>> import tempfile, torch
        >>> from agents.envs import make_env, to_tensordict
        >>> net = torch.nn.Linear(4, 2)
        >>> from torchrl.data import LazyTensorStorage
        >>> buffer = TensorDictReplayBuffer(storage=LazyTensorStorage(10), batch_size=2)
        >>> ckpt = Checkpointer(RunOptions(stop_after=3), Path(tempfile.mkdtemp()), {"net": net}, buffer, total_steps=5)
        >>> step, env, loop = ckpt.resume(make_env("CartPole-v1", 0), seed=0)
        >>> step, sorted(loop)
        (0, ['episode_return', 'episode_returns', 'obs'])
        >>> obs, loop["obs"] = loop["obs"], env.step(0)[0]
        >>> _ = buffer.add(to_tensordict(obs, 0, 1.0, loop["obs"], False, False, torch.device("cpu")))
        >>> ckpt.after_step(3, env, **loop), (ckpt.path / "state.pt").exists()
        (True, True)
    """

    def __init__(
        self, opts: RunOptions, out: Path, modules: dict, buffer: TensorDictReplayBuffer, total_steps: int
    ) -> None:
        self.opts, self.path, self.total_steps = opts, Path(out) / "checkpoint", total_steps
        self.modules, self.buffer = modules, buffer

    def resume(self, env: gym.Env, seed: int) -> tuple[int, gym.Env, dict]:
        """``(start step, env, loop state)``: the checkpoint's with ``--resume``, else a fresh start."""
        loop = {"obs": env.reset(seed=seed)[0], "episode_return": 0.0, "episode_returns": []}
        if not (self.opts.resume and self.path.exists()):
            return 0, env, loop
        step, saved_env, saved = load_checkpoint(self.path, modules=self.modules, buffer=self.buffer)
        if saved_env is None:  # MuJoCo envs do not pickle: the resumed run starts a new episode
            for transform in self.buffer.transform:
                if isinstance(transform, MultiStep):  # --n-step: the saved episode ends where it stopped
                    transform.truncate()
            return step, env, {**saved, "obs": env.reset()[0], "episode_return": 0.0}
        return step, saved_env, saved

    def after_step(self, step: int, env: gym.Env, **loop_state) -> bool:
        """Checkpoint when one is due after ``step`` env steps; True when the run stops here (``--stop-after``)."""
        stopping = bool(self.opts.stop_after) and step == self.opts.stop_after
        due = self.opts.checkpoint_every and step % self.opts.checkpoint_every == 0
        if stopping or due or step == self.total_steps:
            # A finished run has nothing left to resume: its buffer only if asked (--keep-buffer).
            finished = step == self.total_steps and not stopping
            buffer = None if finished and not self.opts.keep_buffer else self.buffer
            save_checkpoint(self.path, step=step, modules=self.modules, buffer=buffer, env=env, loop_state=loop_state)
        return stopping
