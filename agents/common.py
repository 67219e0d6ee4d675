"""What the agents really share: the config's env-family defaults, the sampler choice, evaluation,
logging, checkpoints and the loop's bookkeeping.

Everything algorithm-specific (networks, losses, the update, acting) stays in the agent's own file.
"""

from __future__ import annotations

import argparse
import csv
import inspect
import os
import pickle
import random
import secrets
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, NamedTuple, Optional, TypeVar

import gymnasium as gym
import numpy as np
import torch
import tyro
from tensordict import TensorDict
from torchrl.data import TensorDictReplayBuffer
from torchrl.envs import MultiStepTransform
from tqdm import tqdm

from agents.devices import resolve_device  # noqa: F401  (the agents import it from here)
from torchsample.diagnostics import critic_diagnostics

C = TypeVar("C")


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
    """torch CPU threads (1 lets experiments.compare run one process per core)"""
    checkpoint_every: int = 0
    """steps between checkpoints (0: only at the end)"""
    keep_buffer: bool = False
    """keep the replay buffer in the final checkpoint too (the buffer of a finished run is left out unless asked:
    81 MB per MinAtar run; checkpoints a run may resume from keep it)"""
    stop_after: int = 0
    """stop (after writing a checkpoint) at this step, as a preempted job would (0: run to the end)"""
    resume: bool = False
    """continue from <out>/checkpoint exactly where it stopped (buffer, optimizer, sampler, RNGs)"""
    progress: bool = True
    """show a progress bar"""
    diagnostics_every: int = 0
    """steps between diagnostics of the critic on --diagnostics-rows rows drawn uniformly from the buffer, to
    <out>/diagnostics.csv: App. H's total variation of each surrogate (and uniform) to the exact gradient
    norms', App. C's second moments, the gradient norm and variance, srank, dormant fraction
    (torchsample.diagnostics.critic_diagnostics; costs a backward per row-batch, so steps/s drops; 0: off)"""
    diagnostics_rows: int = 0
    """rows the diagnostics draw (0: m * batch-size, the large batch LaBER scores). A fixed count makes
    srank, the dormant fraction and the TVs comparable across batch sizes (srank is bounded by it)"""
    logger: Literal["csv", "tensorboard", "wandb"] = "csv"
    """TorchRL logger that also receives every scalar, under <out>/<logger>/ (wandb offline, no network);
    <out>/train.csv and <out>/eval.csv are written whichever is chosen"""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_env(env_id: str, seed: int) -> gym.Env:
    """A gymnasium env; ``MinAtar/*`` ids are registered on demand, ``ALE/*`` ids come preprocessed
    (``agents.atari.make_atari_env``: 84x84 grey, 4 frames, frame skip 4, sticky actions)."""
    if env_id.startswith("ALE/"):
        from agents.atari import make_atari_env

        env = make_atari_env(env_id)
    else:
        if env_id.startswith("MinAtar/"):
            import minatar.gym

            minatar.gym.register_envs()
        env = gym.make(env_id)
    env.reset(seed=seed)
    env.action_space.seed(seed)
    return env


# ---------------------------------------------------------------------------------------------
# The config: defaults per environment family


def cli(env_defaults: Callable[[str], C], default_env_id: str, args: Optional[Sequence[str]] = None) -> C:
    """Parse ``args`` (the command line when None) into a Config whose defaults are those of
    ``--env-id``'s family (``default_env_id``'s when ``--env-id`` is not given).

    ``env_defaults(env_id)`` gives an agent's Config for ``env_id`` (e.g. DQN's MinAtar values for
    ``MinAtar/*``). ``--env-id`` is read first, so ``--help`` shows the values a run will use:
    ``python -m agents.dqn --env-id MinAtar/Breakout-v1 --help``.

    Examples:
        >>> from agents import dqn
        >>> cfg = cli(dqn.env_defaults, "CartPole-v1", ["--env-id", "MinAtar/Breakout-v1", "--lr", "3e-4"])
        >>> cfg.batch_size, cfg.optimizer, cfg.lr
        (32, 'rmsprop', 0.0003)
    """
    peek = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    peek.add_argument("--env-id", "--env_id", default=default_env_id)
    env_id = peek.parse_known_args(args)[0].env_id
    defaults = env_defaults(env_id)
    return tyro.cli(type(defaults), default=defaults, args=args)


# ---------------------------------------------------------------------------------------------
# The --sampler names (each agent builds its replay buffer from them, in its own file)


class SamplerChoice(NamedTuple):
    """What a ``--sampler`` name asks for (see :func:`sampler_choice`)."""

    draw: Literal["uniform", "per", "ger"]
    """what draws the buffer's rows: TorchRL's ``RandomSampler`` or ``PrioritizedSampler`` (PER's ``|TD|``),
    or ``torchsample.GERSampler`` (PER with the rows' exact gradient norms)"""
    weighting: Optional[str]
    """LaBER keeps ``B`` of ``m * B`` drawn rows with these weights (``torchsample.LaBERSampler``); None: no LaBER"""
    large_batch: bool
    """the LaBER paper's fairness baseline: the update trains on all ``m * B`` uniform rows"""
    lfiw: bool
    """LFIW (Sinha et al.): a fast and a slow buffer, the critics' rows weighted by a learned density ratio
    before any down-sample; actor-critic agents only (SAC, TD3), as in the paper"""


# DQN's and C51's --sampler choices; SAC and TD3 add LFIW's. PER-LaBER and GER-LaBER (the LaBER paper's): PER
# or GER draws the large batch, LaBER keeps B, the weights multiply. Exact-gradient LaBER is laber-mean with
# --surrogate exact.
VALUE_SAMPLERS = (
    "uniform",
    "per",
    "laber-mean",
    "laber-lazy",
    "laber-max",
    "large-batch",
    "per-laber-mean",
    "ger",
    "ger-laber-mean",
)
ACTOR_CRITIC_SAMPLERS = (*VALUE_SAMPLERS, "lfiw", "lfiw-laber-mean")
# PER's exponents (Schaul et al., proportional); beta is annealed to 1 over the run.
PER_ALPHA, PER_BETA = 0.6, 0.4


def sampler_choice(name: str) -> SamplerChoice:
    """What ``--sampler name`` asks for.

    Examples:
        >>> sampler_choice("ger-laber-mean")
        SamplerChoice(draw='ger', weighting='mean', large_batch=False, lfiw=False)
        >>> sampler_choice("lfiw").lfiw, sampler_choice("large-batch").large_batch
        (True, True)
    """
    if name not in ACTOR_CRITIC_SAMPLERS:
        raise ValueError(f"sampler must be one of {ACTOR_CRITIC_SAMPLERS}, got {name!r}")
    prefix, _, weighting = name.rpartition("laber-") if "laber-" in name else (name, "", "")
    base = prefix.rstrip("-")
    return SamplerChoice(
        draw=base if base in ("per", "ger") else "uniform",
        weighting=weighting or None,
        large_batch=name == "large-batch",
        lfiw=base == "lfiw",
    )


def diagnostics(loss_module, buffer: TensorDictReplayBuffer, rows: int, batch_size: int) -> dict[str, float]:
    """:func:`torchsample.diagnostics.critic_diagnostics` of the loss's critic on ``rows`` rows drawn
    uniformly from ``buffer``'s storage (the same rows whatever the sampler), through the buffer's own
    transform (Atari re-stacks its frames there); on a forked RNG, so a run with diagnostics draws the
    same actions and batches as one without."""
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise ValueError(f"diagnostics rows must be an int >= 1 (--diagnostics-rows, 0: m * batch-size), got {rows!r}")
    storage = buffer.storage
    devices = [storage.device] if storage.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        index = torch.randint(len(storage), (rows,))
        large = storage[index].set("index", index.to(storage.device))
        return critic_diagnostics(loss_module, buffer.transform(large), batch_size)


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


def make_torchrl_logger(kind: str, log_dir: Path, exp_name: str, fresh: bool = True):
    """TorchRL's ``CSVLogger``, ``TensorboardLogger`` or ``WandbLogger`` (``kind``) writing under ``log_dir``.

    A ``fresh`` run replaces what an earlier run of the same name left: the CSV and TensorBoard
    loggers' ``<log_dir>/<exp_name>/`` is emptied (else both runs' points would mix in one curve); a
    resumed run (``fresh=False``) adds to it.

    wandb runs offline: ``WANDB_MODE=offline`` is set before ``wandb.init`` reads it, so no login and
    no network; ``wandb sync <log_dir>/wandb/offline-run-*`` uploads the run later. The run's wandb id
    is kept in ``<log_dir>/run_id``, so a ``--resume``d run logs to the same wandb run (a second
    offline folder with the same id, which ``wandb sync`` appends) instead of starting another; a
    fresh run draws a new id (earlier offline runs stay, as runs of their own).
    """
    from torchrl.record.loggers import CSVLogger, TensorboardLogger, WandbLogger

    if kind in ("csv", "tensorboard") and fresh:
        shutil.rmtree(Path(log_dir) / exp_name, ignore_errors=True)
    if kind == "csv":
        return CSVLogger(exp_name, log_dir=str(log_dir))
    if kind == "tensorboard":
        return TensorboardLogger(exp_name, log_dir=str(log_dir))
    if kind == "wandb":
        os.environ["WANDB_MODE"] = "offline"
        id_file = Path(log_dir) / "run_id"
        if fresh or not id_file.exists():
            id_file.parent.mkdir(parents=True, exist_ok=True)
            id_file.write_text(secrets.token_hex(4))  # wandb's id form: 8 lower-case letters and digits
        options = {"mode": "offline"}
        if "log_env_packages" in inspect.signature(WandbLogger.__init__).parameters:  # torchrl >= 0.12
            options["log_env_packages"] = False  # else it lists every installed package in the run
        return WandbLogger(
            exp_name,
            offline=True,
            save_dir=str(log_dir),
            id=id_file.read_text().strip(),
            project="torchsample",
            **options,
        )
    raise ValueError(f"logger must be one of csv, tensorboard, wandb, got {kind!r}")


def log_scalars(sink, scalars: dict[str, float], step: int) -> None:
    """``scalars`` to a TorchRL logger at ``step``: one ``log_metrics`` call where the logger has it
    (torchrl 0.14), else ``log_scalar`` per key (torchrl 0.11 has no ``log_metrics``)."""
    log_metrics = getattr(sink, "log_metrics", None)
    if log_metrics is not None:
        log_metrics(scalars, step=step)
        return
    for key, value in scalars.items():
        sink.log_scalar(key, value, step=step)


def close_logger(sink) -> None:
    """Flush and close a TorchRL logger: ``close()`` where it has one (torchrl 0.14); torchrl 0.11's
    loggers have none, so their writer is closed directly (wandb's run finished, TensorBoard's
    ``SummaryWriter`` closed; its CSV files are flushed at every write)."""
    close = getattr(sink, "close", None)
    if close is not None:
        close()
        return
    experiment = getattr(sink, "experiment", None)
    for method in ("finish", "close"):
        if callable(getattr(experiment, method, None)):
            getattr(experiment, method)()
            return


class Logger:
    """Appends rows to ``<run_dir>/<name>.csv`` and sends the same scalars to TorchRL's logger
    ``config.logger`` (``"<name>/<key>"`` at ``step``), under ``<run_dir>/<config.logger>/``.

    The wide CSV files (one row per call, columns ``step,<key>,...``; ``name`` one of :attr:`FILES`)
    are what ``experiments.compare`` reads; TorchRL's ``CSVLogger`` writes one two-column file per scalar
    without a header, so it is the extra sink here, not a replacement.

    A run that starts at ``start_step`` 0 replaces the files an earlier run left in ``run_dir`` (they
    would otherwise carry both runs' rows); a run resumed from a checkpoint at ``start_step`` keeps
    their rows up to that step and drops the later ones, which the interrupted run wrote after its
    last checkpoint and the resumed run writes again.

    Examples:
        >>> import tempfile
        >>> run_dir = Path(tempfile.mkdtemp())
        >>> logger = Logger(run_dir, RunOptions(logger="csv"), exp_name="demo")
        >>> logger.log("eval", 100, eval_return=1.5)
        >>> logger.close()
        >>> (run_dir / "eval.csv").read_text().splitlines()
        ['step,eval_return', '100,1.5']
        >>> (run_dir / "csv" / "demo" / "scalars" / "eval" / "eval_return.csv").read_text().splitlines()
        ['100,1.5']
    """

    FILES = ("train", "eval", "diagnostics", "lfiw")

    def __init__(self, run_dir: Path, config, exp_name: str = "run", start_step: int = 0) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for name in self.FILES:
            self._keep_rows_until(self.run_dir / f"{name}.csv", start_step)
        (self.run_dir / "config.txt").write_text("\n".join(f"{k}={v}" for k, v in asdict(config).items()) + "\n")
        self.kind = config.logger
        self.sink = make_torchrl_logger(config.logger, self.run_dir / config.logger, exp_name, fresh=start_step == 0)
        if config.logger == "wandb":  # the run's config beside its curves on the dashboard
            self.sink.log_hparams({k: str(v) for k, v in asdict(config).items()})

    @staticmethod
    def _keep_rows_until(path: Path, step: int) -> None:
        if not path.exists():
            return
        if step == 0:
            path.unlink()
            return
        lines = path.read_text().splitlines(keepends=True)
        if lines:  # an interrupted run may have left the file empty
            path.write_text(lines[0] + "".join(r for r in lines[1:] if int(float(r.split(",", 1)[0])) <= step))

    def log(self, name: str, step: int, **values: float) -> None:
        if name not in self.FILES:
            raise ValueError(f"Logger writes {', '.join(f'{n}.csv' for n in self.FILES)}; got {name!r}")
        path = self.run_dir / f"{name}.csv"
        new = not path.exists()
        with path.open("a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["step", *values])
            writer.writerow([step, *values.values()])
        log_scalars(self.sink, {f"{name}/{key}": float(value) for key, value in values.items()}, step)

    def close(self) -> None:
        """Flush and close the TorchRL logger; with wandb, every logged scalar is in the offline run's
        ``.wandb`` file when this returns."""
        close_logger(self.sink)
        if self.kind == "wandb":
            # finish() returns once wandb's service has the exit record, but the service closes the run's
            # file after that, on its own thread: a reader right after once saw only the file's header
            # (a CI-style test on a loaded machine). teardown() waits for the service to stop.
            import wandb

            wandb.teardown()


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


def state_of(obj) -> dict:
    """``obj.state_dict()``; for TorchRL 0.11's target updaters, which have none, the same fields
    as 0.14's ``TargetNetUpdater.state_dict``: whether it is initialised and HardUpdate's counter."""
    if hasattr(obj, "state_dict"):
        return obj.state_dict()
    return {name: getattr(obj, name) for name in ("initialized", "counter") if hasattr(obj, name)}


def load_state_of(obj, state: dict) -> None:
    """Restores what :func:`state_of` returned."""
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
            "modules": {k: state_of(v) for k, v in modules.items()},
            "rng": rng_state(),
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
        load_state_of(module, state["modules"][key])
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
        self.diagnose = diagnose  # the agent's diagnostics (common.diagnostics), every cfg.diagnostics_every steps
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


# ---------------------------------------------------------------------------------------------
# --n-step: TorchRL's MultiStepTransform on the buffer


class MultiStep(MultiStepTransform):
    """TorchRL's ``MultiStepTransform(n_steps, gamma)`` as the agents write with it (``--n-step``).

    On write, row ``t`` becomes the ``k``-step transition, ``k = min(n, steps left in its episode)``:
    ``("next", "reward") = sum_{j<k} gamma^j r_{t+j}``, the rest of ``"next"`` (observation, ``done``,
    ``terminated``, ``truncated``) that of step ``t + k - 1``, and ``"steps_to_next_obs" = k``; TorchRL's
    losses then regress on ``y = R_t^(k) + gamma^k (1 - terminated) Q'(s_{t+k})``, and so does LaBER, which
    reads the same rows. A row is written once its ``n`` successors are in (the last ``n`` wait). Three
    differences from the transform as TorchRL builds it, all on the writing side:

    * the done flags come from the window's end (``done_keys=[]``): TorchRL's default keeps row ``t``'s own,
      so the ``n - 1`` rows before a termination would bootstrap from the terminal observation;
    * ``rb.add`` of one transition (batch size ``[]``): ``TensorDictReplayBuffer.add`` hands it to the
      transform as it is, and the transform needs a time dimension;
    * the waiting transitions are saved with the buffer (``rb.dumps``, the checkpoint), so ``--resume``
      continues the window where it stopped.

    The transitions must arrive in order, one env's consecutive steps, ``("next", "done")`` set at every
    episode's end (termination or truncation), as the agents' loops add them.

    Examples:
        >>> import torch
        >>> from torchrl.data import LazyTensorStorage, TensorDictReplayBuffer
        >>> rb = TensorDictReplayBuffer(storage=LazyTensorStorage(10), transform=MultiStep(3, gamma=0.5))
        >>> for t in range(5):  # one episode of 5 steps, reward 1 each
        ...     _ = rb.add(to_tensordict([t], 0, 1.0, [t + 1], t == 4, False, "cpu"))
        >>> rb[:]["next", "reward"].squeeze(-1), rb[:]["steps_to_next_obs"]
        (tensor([1.7500, 1.7500]), tensor([3, 3]))
    """

    def __init__(self, n_steps: int, gamma: float) -> None:
        super().__init__(n_steps, gamma, done_keys=[])

    def _inv_call(self, tensordict):
        if tensordict.batch_dims == 0:  # one transition: a time dimension of one step
            out = super()._inv_call(tensordict.unsqueeze(0))
            return None if out is None else out.squeeze(0)
        return super()._inv_call(tensordict)

    def truncate(self) -> None:
        """End the episode whose steps wait here as a truncation (a resumed run whose env did not pickle
        starts a new one): they are written with the rewards of their own episode and bootstrap from its
        last observation."""
        if self._buffer is not None:
            for key in ("done", "truncated"):
                self._buffer["next", key][-1] = True

    def get_extra_state(self) -> dict:
        pending = self._buffer
        # Plain tensors: TorchRL's rb.loads reads the transform's state with torch.load(weights_only=True).
        return {
            "pending": None if pending is None else pending.to_dict(),
            "size": None if pending is None else list(pending.batch_size),
        }

    def set_extra_state(self, state: dict) -> None:
        pending = state["pending"]
        self._buffer = None if pending is None else TensorDict(pending, batch_size=state["size"])


def add_n_step(rb: TensorDictReplayBuffer, n_step: int, gamma: float) -> None:
    """``--n-step``: ``rb`` stores ``n_step``-step transitions (:class:`MultiStep`, discounted by the loss's
    ``gamma``); ``n_step=1`` leaves it as it is (one-step rows, today's runs unchanged)."""
    if isinstance(n_step, bool) or not isinstance(n_step, int) or n_step < 1:
        raise ValueError(f"--n-step must be an int >= 1, got {n_step!r}")
    if n_step == 1:
        return
    if len(rb.transform):
        # Atari's FrameStackReplay rebuilds a row's frame stacks from its neighbours in the storage.
        raise ValueError(f"--n-step {n_step} needs a buffer without a transform of its own, got {rb.transform}")
    rb.append_transform(MultiStep(n_step, gamma))
