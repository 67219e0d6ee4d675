"""The bookkeeping every agent's loop shares (:class:`TrainingLoop`): episode returns, evaluations,
diagnostics, checkpoints, ``--resume`` and ``--stop-after``, the progress bar and steps/s."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Optional

import gymnasium as gym
import numpy as np
import torch
from torchrl.data import TensorDictReplayBuffer
from tqdm import tqdm

from agents.checkpoints import Checkpointer
from agents.envs import evaluate
from agents.logs import Logger
from torchsample.diagnostics import critic_diagnostics


def diagnostics(loss_module, buffer: TensorDictReplayBuffer, rows: int, batch_size: int) -> dict[str, float]:
    """:func:`torchsample.diagnostics.critic_diagnostics` of the loss's critic on ``rows`` rows drawn
    uniformly from ``buffer``'s storage (the same rows whatever the sampler), through the buffer's own
    transform (Atari re-stacks its frames there); on a forked RNG, so a run with diagnostics draws the
    same actions and batches as one without.

    Examples:
        >>> from torchrl.data import LazyTensorStorage
        >>> from torchrl.modules import MLP, QValueActor
        >>> from torchrl.objectives import DQNLoss
        >>> from agents.envs import to_tensordict
        >>> q = QValueActor(MLP(in_features=4, out_features=2, num_cells=[16]), in_keys=["observation"],
        ...                 action_space="categorical")
        >>> loss = DQNLoss(q, action_space="categorical", delay_value=False)
        >>> buffer = TensorDictReplayBuffer(storage=LazyTensorStorage(64))
        >>> rows = [to_tensordict(torch.randn(4), i % 2, 1.0, torch.randn(4), False, False, "cpu") for i in range(64)]
        >>> _ = buffer.extend(torch.stack(rows))
        >>> "srank" in diagnostics(loss, buffer, rows=32, batch_size=8)
        True
    """
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise ValueError(f"diagnostics rows must be an int >= 1 (--diagnostics-rows, 0: m * batch-size), got {rows!r}")
    storage = buffer.storage
    devices = [storage.device] if storage.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        index = torch.randint(len(storage), (rows,))
        large = storage[index].set("index", index.to(storage.device))
        return critic_diagnostics(loss_module, buffer.transform(large), batch_size)


def diagnose_from_first_update(cfg, loss_module, buffer: TensorDictReplayBuffer, optimizer) -> Callable[[], dict]:
    """The ``diagnose`` callback of :class:`TrainingLoop`: :func:`diagnostics` on ``--diagnostics-rows`` rows
    (0: ``m * batch-size``), or nothing before the first update (``optimizer`` has no state yet).

    Examples:
        >>> from types import SimpleNamespace
        >>> cfg = SimpleNamespace(diagnostics_rows=0, m=4, batch_size=8)
        >>> diagnose = diagnose_from_first_update(cfg, None, None, torch.optim.SGD([torch.zeros(1)], lr=0.1))
        >>> diagnose()
        {}
    """
    rows = cfg.diagnostics_rows or cfg.m * cfg.batch_size
    return lambda: diagnostics(loss_module, buffer, rows, cfg.batch_size) if optimizer.state else {}


class StepTimer:
    """Steps per second after a burn-in, so compilation and warm-up do not count.

    Examples:
        >>> timer = StepTimer(burn_in=10)
        >>> timer.rate(5), timer.rate(10)  # before the burn-in, then the clock starts
        (nan, nan)
        >>> timer.rate(20) > 0
        True
    """

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


class TrainingLoop:
    """The bookkeeping every agent's loop shares, around the agent's own acting and learning.

    Episode returns (``train.csv``), evaluations of ``policy`` every ``eval_every`` steps and at the
    end (``eval.csv``), checkpoints with ``--resume`` and ``--stop-after`` (:class:`Checkpointer`;
    ``state`` names what it saves besides the buffer), the progress bar and steps/s after
    ``burn_in`` steps. An agent's loop reads::

        loop = TrainingLoop(cfg, "dqn", env, rb, state, greedy, burn_in=1500, bar_every=1000, recent=10)
        env, obs = loop.env, loop.obs  # with --resume: the checkpoint's env and episode
        for step in loop.steps():
            next_obs, reward, terminated, truncated, _ = env.step(action)
            rb.add(...)
            obs = loop.record(step, next_obs, reward, terminated or truncated)  # after an episode: the next one's
            ...  # learn
            if loop.end_step(step, obs):  # True: --stop-after reached (a checkpoint was written)
                break
        return loop.close()

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from agents.config import RunOptions
        >>> from agents.envs import make_env, to_tensordict
        >>> cfg = RunOptions(stop_after=30, progress=False)
        >>> cfg.out, cfg.total_steps, cfg.eval_every, cfg.eval_episodes = Path(tempfile.mkdtemp()), 50, 20, 1
        >>> cfg.env_id, cfg.sampler = "CartPole-v1", "uniform"
        >>> from torchrl.data import LazyTensorStorage
        >>> buffer = TensorDictReplayBuffer(storage=LazyTensorStorage(100), batch_size=2)
        >>> loop = TrainingLoop(cfg, "demo", make_env(cfg.env_id, 0), buffer, {}, lambda obs: 0,
        ...                     burn_in=10, bar_every=10, recent=5)
        >>> env, obs = loop.env, loop.obs
        >>> for step in loop.steps():
        ...     next_obs, reward, terminated, truncated, _ = env.step(1)
        ...     _ = buffer.add(to_tensordict(obs, 1, reward, next_obs, terminated, truncated, torch.device("cpu")))
        ...     obs = loop.record(step, next_obs, reward, terminated or truncated)
        ...     if loop.end_step(step, obs):
        ...         break
        >>> result = loop.close()
        >>> result["stopped_at"], (cfg.out / "eval.csv").read_text().splitlines()[1].split(",")[:2]
        (30, ['20', '9.0'])
    """

    def __init__(
        self,
        cfg,
        name: str,
        env: gym.Env,
        buffer: TensorDictReplayBuffer,
        state: dict,
        policy: Callable[[np.ndarray], np.ndarray],
        *,
        burn_in: int,
        bar_every: int,
        recent: int,
        diagnose: Optional[Callable[[], dict]] = None,
    ) -> None:
        self.cfg, self.policy, self.bar_every, self.recent = cfg, policy, bar_every, recent
        self.diagnose = diagnose  # the agent's diagnostics (loop.diagnostics), every cfg.diagnostics_every steps
        run_name = f"{name}-{cfg.sampler}-{cfg.env_id.replace('/', '-')}-seed{cfg.seed}"
        self.checkpoints = Checkpointer(cfg, cfg.out, state, buffer, cfg.total_steps)
        start_step, self.env, saved = self.checkpoints.resume(env, cfg.seed)
        self.logger = Logger(cfg.out, cfg, exp_name=run_name, start_step=start_step)
        self.obs, self.episode_return, self.episode_returns = (
            saved["obs"],
            saved["episode_return"],
            saved["episode_returns"],
        )
        self.timer, self.t_start, self.last_eval, self.stopped_at = StepTimer(burn_in), time.time(), float("nan"), None
        # A resumed run's wall time goes on from its checkpoint's, so eval.csv holds the whole run's.
        self.wall_before = saved.get("wall_time", 0.0)
        self.bar = tqdm(
            range(start_step, cfg.total_steps),
            initial=start_step,
            total=cfg.total_steps,
            disable=not cfg.progress,
            mininterval=1.0,
            desc=f"{name} {cfg.sampler} {cfg.env_id}",
        )

    def steps(self):
        """The remaining step numbers (from the checkpoint's with ``--resume``), with the progress bar."""
        return self.bar

    def record(self, step: int, next_obs, reward: float, done: bool, **train_values: float):
        """Count ``reward``; when the episode is ``done``, log its return and start the next one.
        Returns the observation to act on next."""
        self.episode_return += float(reward)
        if not done:
            return next_obs
        self.episode_returns.append(self.episode_return)
        self.logger.log("train", step + 1, episode_return=self.episode_return, **train_values)
        self.episode_return = 0.0
        return self.env.reset()[0]

    def end_step(self, step: int, obs) -> bool:
        """Evaluate and checkpoint when due after ``step``; True when the run stops here (``--stop-after``)."""
        cfg = self.cfg
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.total_steps:
            self.last_eval = evaluate(cfg.env_id, self.policy, cfg.eval_episodes, seed=10_000 + cfg.seed)
            self.logger.log(
                "eval",
                step + 1,
                eval_return=self.last_eval,
                wall_time=self.wall_time(),
                steps_per_s=self.timer.rate(step),
            )
        if self.diagnose is not None and cfg.diagnostics_every > 0 and (step + 1) % cfg.diagnostics_every == 0:
            values = self.diagnose()
            if values:
                self.logger.log("diagnostics", step + 1, **values)
        if self.checkpoints.after_step(
            step + 1,
            self.env,
            obs=obs,
            episode_return=self.episode_return,
            episode_returns=self.episode_returns,
            wall_time=self.wall_time(),
        ):
            self.stopped_at = step + 1
            return True
        if step % self.bar_every == 0 or step + 1 == cfg.total_steps:  # the final bar shows the final figures
            recent = np.mean(self.episode_returns[-self.recent :]) if self.episode_returns else float("nan")
            self.bar.set_postfix(ret=f"{recent:.1f}", eval=f"{self.last_eval:.1f}", sps=f"{self.timer.rate(step):.0f}")
        self.timer.rate(step)
        return False

    def wall_time(self) -> float:
        """Seconds the run has taken, those before its checkpoint included when it was resumed."""
        return self.wall_before + time.time() - self.t_start

    def close(self) -> dict:
        """``{"final_eval", "wall_time"}``, and ``"stopped_at"`` when ``--stop-after`` ended the run."""
        self.bar.close()
        self.env.close()
        self.logger.close()
        result = {"final_eval": self.last_eval, "wall_time": self.wall_time()}
        return result if self.stopped_at is None else {**result, "stopped_at": self.stopped_at}
