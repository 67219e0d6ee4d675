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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Literal, Optional, Sequence, TypeVar

import gymnasium as gym
import numpy as np
import torch
import tyro
from tensordict import TensorDict
from torchrl.data import LazyTensorStorage, PrioritizedSampler, RandomSampler, TensorDictReplayBuffer
from tqdm import tqdm

from torchsample import LaBER, grad_norm_scores
from torchsample.surrogates import joint_norm
from torchsample.diagnostics import critic_diagnostics
from torchsample.lfiw import LFIW, FastSlowReplay, RatioNetwork

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
    """torch CPU threads (1 lets agents.compare run one process per core)"""
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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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
# The sampler choice


@dataclass(frozen=True)
class SamplerSpec:
    """How one ``--sampler`` draws a training batch."""

    prioritized: bool
    """the buffer draws with TorchRL's ``PrioritizedSampler``, priorities from the loss's ``"td_error"``"""
    large: bool
    """the buffer draws ``m * B`` rows (else ``B``)"""
    weighting: Optional[str] = None
    """LaBER down-samples the large batch to ``B`` rows with these weights (None: no down-sample)"""
    priority: Literal["td", "exact"] = "td"
    """with ``prioritized``: PER's ``|TD|`` (the loss's ``"td_error"``), or GER's exact per-sample gradient
    norm over the critic's parameters (:func:`torchsample.grad_norm_scores`), of the rows each update used"""
    lfiw: bool = False
    """LFIW (Sinha et al.): a fast and a slow buffer, the slow rows weighted by a learned density ratio
    before any down-sample; actor-critic agents only (SAC, TD3), as in the paper"""


SAMPLERS = {
    "uniform": SamplerSpec(prioritized=False, large=False),
    "per": SamplerSpec(prioritized=True, large=False),
    "laber-mean": SamplerSpec(prioritized=False, large=True, weighting="mean"),
    "laber-lazy": SamplerSpec(prioritized=False, large=True, weighting="lazy"),
    "laber-max": SamplerSpec(prioritized=False, large=True, weighting="max"),
    "large-batch": SamplerSpec(prioritized=False, large=True),  # the LaBER paper's fairness baseline
    # PER-LaBER (the LaBER paper's): PER draws the large batch, LaBER keeps B, the weights multiply.
    "per-laber-mean": SamplerSpec(prioritized=True, large=True, weighting="mean"),
    # GER (the LaBER paper's): PER with exact per-sample gradient norms as priorities; GER-LaBER: GER
    # draws the large batch, LaBER keeps B (exact-gradient LaBER is laber-mean with --surrogate exact).
    "ger": SamplerSpec(prioritized=True, large=False, priority="exact"),
    "ger-laber-mean": SamplerSpec(prioritized=True, large=True, weighting="mean", priority="exact"),
    "lfiw": SamplerSpec(prioritized=False, large=False, lfiw=True),
    # LFIW weighs the large slow batch (its normaliser a mean over D_s), then LaBER keeps B: docs/lfiw.md.
    "lfiw-laber-mean": SamplerSpec(prioritized=False, large=True, weighting="mean", lfiw=True),
}
# The agents' --sampler choices, SAMPLERS' names (tyro lists a Literal's values in --help).
SamplerName = Literal[tuple(SAMPLERS)]  # type: ignore[valid-type]


def make_buffer(sampler: str, *, buffer_size: int, batch_size: int, m: int, device: torch.device,
                per_alpha: float = 0.6, per_beta: float = 0.4) -> TensorDictReplayBuffer:
    """The replay buffer ``sampler`` needs (see :data:`SAMPLERS`): its batch is ``m * batch_size``
    rows for a large-batch sampler, else ``batch_size``; drawn by TorchRL's ``PrioritizedSampler``
    (proportional, ``per_alpha``, ``per_beta``) or uniformly with replacement."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {tuple(SAMPLERS)}, got {sampler!r}")
    spec = SAMPLERS[sampler]
    if spec.lfiw:
        raise ValueError(f"{sampler!r} keeps two buffers, a fast and a slow one: Replay builds them (FastSlowReplay)")
    inner = PrioritizedSampler(buffer_size, alpha=per_alpha, beta=per_beta) if spec.prioritized else RandomSampler()
    return TensorDictReplayBuffer(storage=LazyTensorStorage(buffer_size, device=device), sampler=inner,
                                  batch_size=m * batch_size if spec.large else batch_size)


class Replay:
    """The replay buffer and the ``--sampler`` choice, in one place for every agent.

    * ``add(transition)``: store a transition;
    * ``sample(progress)``: the buffer's draw, ``B`` or ``m * B`` rows; PER's importance exponent
      ``beta`` is annealed linearly from ``per_beta`` to 1 over ``progress`` in [0, 1] (Schaul et al.);
    * ``downsample(batch)``, inside the update: LaBER keeps ``B`` of the ``m * B`` rows, scored with
      ``loss_module``'s own networks (the other samplers pass the batch through); rows that carry a
      ``"priority_weight"`` (PER's, LFIW's) keep it multiplied into LaBER's;
    * ``after_update(batch)``: PER's new priorities, the ``"td_error"`` the loss (or LaBER) wrote for
      the rows the update used; GER's, their exact per-sample gradient norms after the update
      (``sqrt(sum_c n_c^2)`` over twin critics: the norm over both critics' parameters);
    * ``diagnostics()``: :func:`torchsample.diagnostics.critic_diagnostics` on ``diagnostics_rows``
      rows (0: ``m * B``) drawn uniformly from the buffer (the same rows whatever the sampler), ``{}``
      before the first update.

    ``surrogate`` is the LaBER samplers' rung: ``"output"`` (the paper's), ``"last-layer"`` or
    ``"exact"`` (exact-gradient LaBER).

    LFIW (``lfiw``, ``lfiw-laber-mean``; Sinha et al., Algorithm 1; ``docs/lfiw.md``): every
    transition goes to a fast buffer (the latest ``lfiw_fast_size``) and to the slow one (``buffer``,
    ``buffer_size``). Once the slow buffer holds more than ``lfiw_fast_size`` rows, ``sample`` first
    trains the ratio network one step on ``B`` slow rows against ``B`` fast rows (Eq. 10), then
    writes the self-normalised weights ``w~`` (Eq. 11) of the slow rows it returns (all ``m * B``
    of them before LaBER's down-sample) into ``"priority_weight"``, which weighs the critics' TD
    loss (Eq. 12); before that, weight 1. ``lfiw_stats()`` gives what to log of the ratio, and
    ``checkpoint_modules()`` what a checkpoint must keep besides ``buffer``. Only actor-critic
    losses (SAC, TD3: the paper's) are accepted; ``ratio_features`` is the width of
    ``cat(observation, action)``.

    A new sampler is a new :data:`SAMPLERS` entry (``--sampler`` offers every name there).

    Examples:
        >>> replay = Replay("per", None, buffer_size=10, batch_size=2, m=4, device=torch.device("cpu"))
        >>> for t in range(5):
        ...     replay.add(to_tensordict([0.0], 0, 1.0, [1.0], False, False, torch.device("cpu")))
        >>> replay.sample(progress=0.5).batch_size, round(replay.buffer.sampler.beta, 6)
        (torch.Size([2]), 0.7)
        >>> Replay("large-batch", None, buffer_size=10, batch_size=2, m=4, device=torch.device("cpu")).buffer.batch_size
        8
    """

    def __init__(self, sampler: str, loss_module, *, buffer_size: int, batch_size: int, m: int, device: torch.device,
                 critics: str = "independent", surrogate: str = "output", per_alpha: float = 0.6,
                 per_beta: float = 0.4, ratio_features: Optional[int] = None, lfiw_fast_size: int = 10_000, lfiw_temperature: float = 5.0,
                 lfiw_f: str = "js", diagnostics_rows: int = 0) -> None:
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {tuple(SAMPLERS)}, got {sampler!r}")
        if isinstance(diagnostics_rows, bool) or not isinstance(diagnostics_rows, int) or diagnostics_rows < 0:
            raise ValueError(f"diagnostics_rows must be an int >= 0 (0: m * batch_size), got {diagnostics_rows!r}")
        self.diagnostics_rows = diagnostics_rows or m * batch_size
        self.spec, self.per_beta, self.batch_size, self.m = SAMPLERS[sampler], per_beta, batch_size, m
        self.loss_module, self.updates = loss_module, 0
        self.lfiw = self.fast_slow = self.ratio_loss = self.weighted = None
        if self.spec.lfiw:
            if not hasattr(loss_module, "actor_network"):
                raise ValueError(
                    f"--sampler {sampler}: LFIW re-weights the critic of an actor-critic agent (SAC, TD3, as in "
                    f"Sinha et al.); {type(loss_module).__name__} has no actor. Use it with agents.sac or agents.td3")
            if ratio_features is None:
                raise ValueError(f"--sampler {sampler} needs ratio_features, the width of cat(observation, action)")
            self.fast_slow = FastSlowReplay(lfiw_fast_size, buffer_size, device=device)
            self.buffer = self.fast_slow.slow  # the checkpoint's buffer; the fast one is in checkpoint_modules()
            # threshold: LFIW's default, the fast buffer's size (before it the two buffers hold the same rows)
            self.lfiw = LFIW(RatioNetwork(ratio_features).to(device), replay=self.fast_slow, f=lfiw_f,
                             temperature=lfiw_temperature)
            self.rows = m * batch_size if self.spec.large else batch_size
        else:
            self.buffer = make_buffer(sampler, buffer_size=buffer_size, batch_size=batch_size, m=m, device=device,
                                      per_alpha=per_alpha, per_beta=per_beta)
        # critics: LaBER with twin critics, one down-sample per critic ("independent") or one shared ("joint").
        self.laber = (LaBER(loss_module, batch_size=batch_size, weighting=self.spec.weighting, critics=critics,
                            surrogate=surrogate) if self.spec.weighting is not None else None)

    def add(self, transition: TensorDict) -> None:
        (self.buffer if self.fast_slow is None else self.fast_slow).add(transition)

    def sample(self, progress: float) -> TensorDict:
        if self.lfiw is not None:
            return self._lfiw_sample()
        if self.spec.prioritized:
            self.buffer.sampler.beta = self.per_beta + (1.0 - self.per_beta) * min(max(progress, 0.0), 1.0)
        return self.buffer.sample()

    def _lfiw_sample(self) -> TensorDict:
        # Algorithm 1: past the threshold, w_psi takes a step (Eq. 10) before it weighs the critics' rows.
        if self.lfiw.active:
            self.ratio_loss = self.lfiw.update(self.fast_slow.sample_slow(self.batch_size),
                                               self.fast_slow.sample_fast(self.batch_size))
        # w~ is normalised over these rows, a uniform sample of D_s: the large batch, before LaBER's down-sample.
        self.weighted = self.lfiw(self.fast_slow.sample_slow(self.rows))
        return self.weighted

    def downsample(self, batch: TensorDict) -> TensorDict:
        return batch if self.laber is None else self.laber(batch)

    def after_update(self, batch: TensorDict) -> None:
        self.updates += 1
        if not self.spec.prioritized:
            return
        # Flat: PER-LaBER's twin-critic batches are [B, 1 + C], one storage index per priority, and
        # TorchRL reads a 2-D index as one into a multi-dimensional storage.
        rows = batch.reshape(-1)
        if self.spec.priority == "exact":
            priority = joint_norm(grad_norm_scores(self.loss_module, rows, "exact"))
        else:
            priority = rows["td_error"]
        self.buffer.update_priority(rows["index"], priority.reshape(-1))

    def diagnostics(self) -> dict[str, float]:
        """:func:`torchsample.diagnostics.critic_diagnostics` of the loss's critic on ``diagnostics_rows``
        rows drawn uniformly from the (slow) buffer; ``{}`` before the first update."""
        if self.updates == 0 or self.loss_module is None:
            return {}
        storage = self.buffer.storage
        # On a forked RNG: a run with diagnostics draws the same actions and batches as one without.
        devices = [storage.device] if storage.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            index = torch.randint(len(storage), (self.diagnostics_rows,))
            rows = storage[index].set("index", index.to(storage.device))
            # The buffer's own sample transform, as for a training batch (Atari re-stacks its frames there).
            return critic_diagnostics(self.loss_module, self.buffer.transform(rows), self.batch_size)

    def lfiw_stats(self) -> dict[str, float]:
        """The ratio network's mean, std and ESS (:func:`torchsample.lfiw.ratio_stats`) on the last
        weighted slow batch (the large one with LaBER), its last loss (Eq. 10; minus it bounds
        ``D_f(fast || slow)`` from below) and the slow buffer's size; ``{}`` without LFIW or before
        the threshold, when no weighting happens."""
        if self.lfiw is None or not self.lfiw.active or self.ratio_loss is None:
            return {}
        stats = {key: value.item() for key, value in self.lfiw.stats(self.weighted).items()}
        return {**stats, "ratio_loss": self.ratio_loss.item(), "slow_size": len(self.fast_slow.slow)}

    def checkpoint_modules(self) -> dict:
        """What a checkpoint keeps besides ``buffer`` (as objects with ``state_dict``): with LFIW the
        ratio network, its optimiser and the fast buffer (small: ``lfiw_fast_size`` rows)."""
        if self.lfiw is None:
            return {}
        return {"lfiw": self.lfiw, "lfiw_optimizer": self.lfiw.optimizer, "lfiw_fast_buffer": self.fast_slow.fast}


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
        return WandbLogger(exp_name, offline=True, save_dir=str(log_dir), id=id_file.read_text().strip(),
                           project="torchsample", **options)
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
    are what ``agents.compare`` reads; TorchRL's ``CSVLogger`` writes one two-column file per scalar
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


def save_checkpoint(path: Path, *, step: int, modules: dict, buffer: Optional[TensorDictReplayBuffer], env: gym.Env,
                    loop_state: dict) -> None:
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


def load_checkpoint(path: Path, *, modules: dict, buffer: TensorDictReplayBuffer) -> tuple[int, Optional[gym.Env], dict]:
    """Restores what :func:`save_checkpoint` wrote; returns ``(step, env or None, loop_state)``."""
    path = Path(path)
    state = torch.load(path / "state.pt", weights_only=False)
    if not (path / "buffer").exists():
        raise FileNotFoundError(f"{path} holds no replay buffer: it is the final checkpoint of a finished run, saved "
                                "without --keep-buffer; there is nothing to resume")
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

        loop = TrainingLoop(cfg, "dqn", env, replay.buffer, state, greedy, burn_in=1500, bar_every=1000, recent=10)
        env, obs = loop.env, loop.obs  # with --resume: the checkpoint's env and episode
        for step in loop.steps():
            next_obs, reward, terminated, truncated, _ = env.step(action)
            replay.add(...)
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
        >>> buffer = make_buffer("uniform", buffer_size=100, batch_size=2, m=1, device=torch.device("cpu"))
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

    def __init__(self, cfg, name: str, env: gym.Env, buffer: TensorDictReplayBuffer, state: dict,
                 policy: Callable[[np.ndarray], np.ndarray], *, burn_in: int, bar_every: int, recent: int,
                 diagnose: Optional[Callable[[], dict]] = None) -> None:
        self.cfg, self.policy, self.bar_every, self.recent = cfg, policy, bar_every, recent
        self.diagnose = diagnose  # Replay.diagnostics, every cfg.diagnostics_every steps
        run_name = f"{name}-{cfg.sampler}-{cfg.env_id.replace('/', '-')}-seed{cfg.seed}"
        self.checkpoints = Checkpointer(cfg, cfg.out, state, buffer, cfg.total_steps)
        start_step, self.env, saved = self.checkpoints.resume(env, cfg.seed)
        self.logger = Logger(cfg.out, cfg, exp_name=run_name, start_step=start_step)
        self.obs, self.episode_return, self.episode_returns = saved["obs"], saved["episode_return"], saved["episode_returns"]
        self.timer, self.t_start, self.last_eval, self.stopped_at = StepTimer(burn_in), time.time(), float("nan"), None
        # A resumed run's wall time goes on from its checkpoint's, so eval.csv holds the whole run's.
        self.wall_before = saved.get("wall_time", 0.0)
        self.bar = tqdm(range(start_step, cfg.total_steps), initial=start_step, total=cfg.total_steps,
                        disable=not cfg.progress, mininterval=1.0, desc=f"{name} {cfg.sampler} {cfg.env_id}")

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
            self.logger.log("eval", step + 1, eval_return=self.last_eval, wall_time=self.wall_time(),
                            steps_per_s=self.timer.rate(step))
        if self.diagnose is not None and cfg.diagnostics_every > 0 and (step + 1) % cfg.diagnostics_every == 0:
            values = self.diagnose()
            if values:
                self.logger.log("diagnostics", step + 1, **values)
        if self.checkpoints.after_step(step + 1, self.env, obs=obs, episode_return=self.episode_return,
                                       episode_returns=self.episode_returns, wall_time=self.wall_time()):
            self.stopped_at = step + 1
            return True
        if step % self.bar_every == 0 or step + 1 == cfg.total_steps:  # the final bar shows the final figures
            recent = np.mean(self.episode_returns[-self.recent:]) if self.episode_returns else float("nan")
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
