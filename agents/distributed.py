"""Distributed DQN: collectors in Ray actors feed one TorchRL Ray replay buffer; the learner draws a large batch
from it and down-samples it with LaBER on its own device, or samples it with PER.

LaBER keeps no state in the buffer: the buffer is a plain uniform one (TorchRL's ``RayReplayBuffer``, an actor
that may live on any node) and nothing flows back to it from the learner. PER, the baseline, runs TorchRL's
``PrioritizedSampler`` inside the same kind of actor and sends the new priorities back after every update.

One file, top to bottom: config, cluster, network, collector, buffer, learner, loop. What each piece is and
how to run it on a multi-node cluster: ``docs/distributed.md``.

    python -m agents.distributed --sampler laber-mean --collectors 2    # a one-node cluster on 127.0.0.1
    python -m agents.distributed --sampler per --collectors 2
    python -m agents.distributed --address auto --collectors 8          # on a running cluster (ray start)
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal, Optional

import gymnasium as gym
import numpy as np
import torch
import tyro
from tensordict import TensorDict
from torch import nn
from torchrl.data import LazyTensorStorage, PrioritizedSampler, RandomSampler, TensorDictReplayBuffer
from torchrl.data.replay_buffers import RayReplayBuffer
from torchrl.modules import QValueActor
from torchrl.objectives import DQNLoss, SoftUpdate

from agents.devices import resolve_device
from torchsample import LaBER, LaBERLoss, make_update

try:
    import ray
except ImportError:  # the [distributed] extra; without it the module still imports (doctests, --help)
    ray = None

ROOT = Path(__file__).resolve().parents[1]
Sampler = Literal["laber-mean", "laber-lazy", "laber-max", "per", "uniform"]


@dataclass
class Config:
    """DQN on CartPole with collectors in Ray actors and a TorchRL Ray replay buffer."""

    sampler: Sampler = "laber-mean"
    """laber-*: draw m * batch-size rows uniformly from the Ray buffer and keep batch-size of them here;
    per: TorchRL's PrioritizedSampler in the buffer actor; uniform: batch-size rows, no weights"""
    collectors: int = 2
    """collector actors, each with its own environment and a copy of the Q-network"""
    address: Optional[str] = None
    """Ray cluster to join ("auto", or the head's HOST:PORT); none: start a one-node cluster on 127.0.0.1"""
    num_cpus: int = 2
    """CPUs of the one-node cluster this script starts (ignored with --address)"""
    collector_cpus: float = 1.0
    """CPUs Ray reserves for each collector (a collector that finds none free would wait forever)"""
    env_id: str = "CartPole-v1"
    """gymnasium id of a discrete-action environment with vector observations"""
    total_steps: int = 20_000
    """environment steps, summed over the collectors"""
    learning_starts: int = 1_000
    """steps in the buffer before the first update"""
    updates_per_step: float = 0.5
    """replay ratio: gradient updates per environment step once learning has started; the learner waits
    for the collectors when it is ahead (dqn.py's 128 updates every 256 steps)"""
    chunk: int = 128
    """environment steps a collector runs between two writes to the buffer (one network call each)"""
    max_lead: int = 1_000
    """steps the collectors may run ahead of what the learner has consumed at its replay ratio before they
    wait for it (a rate limiter, as Reverb's SampleToInsertRatio)"""
    draws_per_call: int = 8
    """large batches (laber-*) or batches (uniform) one call to the buffer returns, one per update: the
    draws are i.i.d. uniform either way, and fewer, larger calls cost less (per: always 1, the priorities
    change after every update)"""
    sync_every: int = 32
    """updates between two publications of the learner's weights to the collectors"""
    m: int = 4
    """LaBER's large batch is m * batch-size rows"""
    batch_size: int = 64
    """rows per gradient step"""
    buffer_size: int = 100_000
    """replay capacity (transitions)"""
    lr: float = 2.3e-3
    """Adam's learning rate"""
    gamma: float = 0.98
    """discount factor"""
    target_tau: float = 0.005
    """Polyak factor of the target network, after every update"""
    max_grad_norm: float = 10.0
    """gradient-norm clipping"""
    hidden: int = 256
    """width of the two hidden layers"""
    start_epsilon: float = 1.0
    """exploration rate of the first steps"""
    end_epsilon: float = 0.04
    """exploration rate after exploration-steps"""
    exploration_steps: int = 8_000
    """steps over which epsilon decays linearly"""
    per_alpha: float = 0.6
    """PER's priority exponent"""
    per_beta: float = 0.4
    """PER's importance-weight exponent (fixed: TorchRL's Ray buffer has no call that changes it remotely)"""
    eval_episodes: int = 10
    """greedy episodes of the final evaluation"""
    log_every: float = 5.0
    """seconds between progress lines"""
    seed: int = 0
    """seeds torch, numpy and every collector's environment (collector i: seed + 1 + i)"""
    device: str = "auto"
    """the learner's device: auto (CUDA when present), cpu or cuda"""
    threads: int = 1
    """torch CPU threads of the learner (each collector uses one)"""


# ---------------------------------------------------------------------------------------------
# The cluster

# The one-node cluster: every process on 127.0.0.1, no usage report.
LOCAL_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


@contextlib.contextmanager
def ray_cluster(address: Optional[str] = None, num_cpus: int = 2) -> Iterator[None]:
    """Join the Ray cluster at ``address``, or start a one-node cluster on the loopback interface only
    (``address=None``); on the way out, errors included, disconnect (and so stop the cluster it started).

    Joining ships the ``agents`` package to the workers (Ray's ``runtime_env`` ``py_modules``): they import
    ``agents.distributed`` to build the collectors. The nodes need torchsample and Ray installed.
    """
    if ray is None:
        raise ImportError("agents.distributed needs Ray: pip install 'torchsample[distributed]'")
    if ray.is_initialized():
        raise RuntimeError("Ray is already initialised in this process: shut it down first (ray.shutdown())")
    saved = {name: os.environ.get(name) for name in LOCAL_ENV}
    constants = ray._private.ray_constants
    saved_cluster = constants.ENABLE_RAY_CLUSTER
    try:
        if address is None:
            # Ray advertises even a one-node cluster on the machine's outward address (measured: ray.nodes()
            # gave the eth0 address and the raylet listened on every interface). Its switch for machines
            # without a cluster network (macOS, Windows) keeps every Ray process on 127.0.0.1: the workers
            # read it from the environment, and this process, which imported Ray with torchrl, reads the
            # constant.
            os.environ.update(LOCAL_ENV)
            constants.ENABLE_RAY_CLUSTER = False
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
        else:
            # The workers import agents.distributed (the collectors' class): Ray ships the package to them.
            ray.init(address=address, runtime_env={"py_modules": [str(ROOT / "agents")]})
        yield
    finally:
        ray.shutdown()
        constants.ENABLE_RAY_CLUSTER = saved_cluster
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# ---------------------------------------------------------------------------------------------
# The Q-network, the environment and a collector


def q_network(obs_dim: int, n_actions: int, hidden: int) -> nn.Module:
    """Two ReLU layers of ``hidden`` units, one output per action (CleanRL's CartPole network)."""
    return nn.Sequential(
        nn.Linear(obs_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, n_actions)
    )


def make_env(env_id: str, seed: int) -> gym.Env:
    env = gym.make(env_id)
    env.reset(seed=seed)
    env.action_space.seed(seed)
    return env


class EnvCollector:
    """One environment and a copy of the Q-network, run as a Ray actor (:func:`start_collectors`).

    ``collect`` runs ``steps`` epsilon-greedy steps with the weights it is given and writes them to the
    Ray buffer in one ``extend``: what it wrote stays there if the actor dies later.
    """

    def __init__(self, env_id: str, hidden: int, seed: int) -> None:
        torch.set_num_threads(1)
        self.env = make_env(env_id, seed)
        self.obs, _ = self.env.reset(seed=seed)
        self.rng = np.random.default_rng(seed)
        self.q = q_network(self.env.observation_space.shape[0], self.env.action_space.n, hidden)
        self.episode_return = 0.0

    @torch.no_grad()
    def collect(self, weights: dict, epsilon: float, steps: int, buffer=None):
        """``steps`` transitions in TorchRL's layout, written to ``buffer`` (a client of the Ray buffer).

        Returns ``(steps written, returns of the episodes that ended)``; with ``buffer=None`` the
        transitions themselves instead of their count (for a buffer in the learner's process).
        """
        self.q.load_state_dict(weights)
        obs, actions, rewards, next_obs, terminated, truncated, returns = [], [], [], [], [], [], []
        for _ in range(steps):
            if self.rng.random() < epsilon:
                action = int(self.env.action_space.sample())
            else:
                action = int(self.q(torch.as_tensor(self.obs)).argmax())
            next_ob, reward, term, trunc, _ = self.env.step(action)
            obs.append(self.obs)
            actions.append(action)
            rewards.append(reward)
            next_obs.append(next_ob)
            terminated.append(term)
            truncated.append(trunc)
            self.episode_return += float(reward)
            if term or trunc:
                returns.append(self.episode_return)
                self.episode_return = 0.0
                next_ob, _ = self.env.reset()
            self.obs = next_ob
        term, trunc = torch.tensor(terminated).unsqueeze(-1), torch.tensor(truncated).unsqueeze(-1)
        rows = TensorDict(
            {
                "observation": torch.as_tensor(np.stack(obs)),
                "action": torch.tensor(actions),
                ("next", "observation"): torch.as_tensor(np.stack(next_obs)),
                ("next", "reward"): torch.tensor(rewards, dtype=torch.float32).unsqueeze(-1),
                ("next", "terminated"): term,
                ("next", "truncated"): trunc,
                ("next", "done"): term | trunc,
            },
            batch_size=[steps],
        )
        if buffer is None:
            return rows, returns
        buffer.extend(rows)
        return steps, returns


def start_collectors(cfg: Config, n: Optional[int] = None) -> list:
    """``n`` (default ``cfg.collectors``) :class:`EnvCollector` actors, ``cfg.collector_cpus`` each."""
    actor = ray.remote(num_cpus=cfg.collector_cpus)(EnvCollector)
    return [actor.remote(cfg.env_id, cfg.hidden, cfg.seed + 1 + i) for i in range(cfg.collectors if n is None else n)]


# ---------------------------------------------------------------------------------------------
# The buffer


def make_replay(cfg: Config, *, remote: bool = True):
    """TorchRL's ``RayReplayBuffer``: a ``TensorDictReplayBuffer`` in its own actor (no CPU reserved: it
    waits on the network), uniform for LaBER and uniform, prioritized for PER. ``remote=False``: the same
    buffer in this process (the benchmark's reference). Storage, sampler go as constructors, which the
    actor calls."""
    if cfg.sampler == "per":
        sampler = partial(PrioritizedSampler, cfg.buffer_size, alpha=cfg.per_alpha, beta=cfg.per_beta)
    else:
        sampler = RandomSampler
    storage = partial(LazyTensorStorage, cfg.buffer_size)
    if not remote:
        return TensorDictReplayBuffer(storage=storage(), sampler=sampler())
    return RayReplayBuffer(
        replay_buffer_cls=TensorDictReplayBuffer, storage=storage, sampler=sampler, remote_config={"num_cpus": 0}
    )


# ---------------------------------------------------------------------------------------------
# The learner


class Learner:
    """The Q-network and one DQN update per :meth:`step`, drawn from ``replay``.

    ``step`` draws ``m * B`` rows (laber-*) or ``B`` rows (per, uniform), keeps ``B`` of the large batch
    with ``torchsample.LaBER`` here, on ``device``, takes a gradient step on ``mean(w * l)``
    (``torchsample.LaBERLoss``: LaBER's or PER's weights, 1 for uniform) and, for PER, sends ``|TD|`` of
    the rows back to the buffer as their new priorities: a second round trip, which LaBER does without.

    A uniform draw does not depend on the network, so it can be made early: one call to the buffer
    returns ``cfg.draws_per_call`` draws, and with ``prefetch`` the next call is in flight while the
    updates compute. LaBER scores each large batch when it is used, with the weights of that moment.
    PER's next draw depends on the priorities this update sends: one draw per call, no prefetch
    (``ValueError``).
    """

    def __init__(
        self, cfg: Config, obs_dim: int, n_actions: int, replay, *, device: torch.device, prefetch: bool = False
    ) -> None:
        if prefetch and cfg.sampler == "per":
            raise ValueError("prefetch draws before the priorities of this update arrive: not with --sampler per")
        self.cfg, self.replay, self.device, self.prefetch = cfg, replay, device, prefetch
        self.network = q_network(obs_dim, n_actions, cfg.hidden).to(device)
        loss_module = DQNLoss(
            QValueActor(self.network, in_keys=["observation"], action_space="categorical"),
            loss_function="smooth_l1",
            delay_value=True,
            double_dqn=True,
            action_space="categorical",
        )
        loss_module.make_value_estimator(gamma=cfg.gamma)
        laber = None
        if cfg.sampler.startswith("laber-"):
            laber = LaBER(loss_module, cfg.batch_size, weighting=cfg.sampler.removeprefix("laber-"))
        self.laber = laber
        weighted_loss = LaBERLoss(loss_module)  # the paper's estimator mean(w * l)
        optimizer = torch.optim.Adam(loss_module.parameters(), lr=cfg.lr)

        def objective(batch):
            if laber is not None:
                batch = laber(batch)  # score the m*B rows with the loss's own networks, keep B, weights
            return weighted_loss(batch)["loss"], batch

        self.update = make_update(
            objective, optimizer, SoftUpdate(loss_module, tau=cfg.target_tau), max_grad_norm=cfg.max_grad_norm
        )
        self.draw_size = cfg.m * cfg.batch_size if laber is not None else cfg.batch_size
        self.draws_per_call = 1 if cfg.sampler == "per" else cfg.draws_per_call
        self._draws: list[TensorDict] = []
        # One thread waits for the buffer's reply (Ray's get releases the GIL) while torch computes.
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="draw") if prefetch else None
        self._next = None

    def draw(self) -> TensorDict:
        if not self._draws:
            size = self.draws_per_call * self.draw_size
            if self._pool is None:
                rows = self.replay.sample(size)
            else:
                rows = (self._next or self._pool.submit(self.replay.sample, size)).result()
                self._next = self._pool.submit(self.replay.sample, size)
            self._draws = list(rows.split(self.draw_size))
        return self._draws.pop()

    def step(self) -> TensorDict:
        """One update; returns the rows it trained on (with ``"index"``, weights and ``"td_error"``)."""
        _, batch = self.update(self.draw().to(self.device))
        if self.cfg.sampler == "per":
            self.replay.update_priority(batch["index"], batch["td_error"].detach())
        return batch

    def weights(self) -> dict:
        """The Q-network's weights on the CPU, for the collectors."""
        return {name: value.cpu() for name, value in self.network.state_dict().items()}

    def close(self) -> None:
        """Wait for the draw in flight, so that the buffer can be closed."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)


# ---------------------------------------------------------------------------------------------
# The loop


def epsilon(cfg: Config, step: int) -> float:
    frac = min(step / cfg.exploration_steps, 1.0)
    return cfg.start_epsilon + frac * (cfg.end_epsilon - cfg.start_epsilon)


def evaluate(env_id: str, network: nn.Module, episodes: int, seed: int, device: torch.device) -> float:
    """Mean return of the greedy policy over ``episodes`` fresh episodes."""
    env, returns = gym.make(env_id), []
    for episode in range(episodes):
        obs, _ = env.reset(seed=seed + episode)
        done, total = False, 0.0
        while not done:
            with torch.no_grad():
                action = int(network(torch.as_tensor(obs, device=device)).argmax())
            obs, reward, terminated, truncated, _ = env.step(action)
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    return float(np.mean(returns))


def train(cfg: Config, replay, collectors: list, log: Callable[[str], None] = print) -> dict:
    """Run the collectors and the learner until ``cfg.total_steps`` steps are collected and learnt from.

    Each collector has one ``collect`` call in flight at a time; the learner harvests the finished ones
    without waiting and starts the next with its latest published weights. The replay ratio holds both
    ways: the learner updates while it is within ``updates_per_step`` of the steps collected, and a
    collector waits while the steps exceed what the learner has consumed by more than ``max_lead``. A
    collector that dies is dropped (``lost_collectors``): what it wrote stays in the buffer, the others
    and the learner go on.
    """
    device = resolve_device(cfg.device)
    probe = gym.make(cfg.env_id)
    obs_dim, n_actions = probe.observation_space.shape[0], probe.action_space.n
    probe.close()
    learner = Learner(cfg, obs_dim, n_actions, replay, device=device, prefetch=cfg.sampler != "per")
    client = replay.client()  # a handle the actors can hold; the owner (replay) keeps shutdown rights
    weights = ray.put(learner.weights())
    pending, idle, launched = {}, list(collectors), 0
    steps = updates = lost = 0
    returns: list[float] = []

    def launch(actor) -> None:
        nonlocal launched
        n = min(cfg.chunk, cfg.total_steps - launched)
        pending[actor.collect.remote(weights, epsilon(cfg, launched), n, client)] = actor
        launched += n

    start = last_log = time.perf_counter()
    learn_time = 0.0
    try:
        while True:
            ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0) if pending else ([], [])
            for ref in ready:
                actor = pending.pop(ref)
                try:
                    written, episode_returns = ray.get(ref)
                except ray.exceptions.RayActorError as err:
                    lost += 1
                    log(
                        f"collector lost ({type(err).__name__}): its rows stay in the buffer, "
                        f"{len(pending) + len(idle)} collectors go on"
                    )
                    continue
                steps += written
                returns += episode_returns
                idle.append(actor)
            consumed = cfg.learning_starts + updates / cfg.updates_per_step
            while idle and launched < cfg.total_steps and launched < consumed + cfg.max_lead:
                launch(idle.pop(0))  # the longest idle first: every collector keeps stepping
            if steps >= cfg.learning_starts and updates < (steps - cfg.learning_starts) * cfg.updates_per_step:
                tic = time.perf_counter()
                learner.step()
                learn_time += time.perf_counter() - tic
                updates += 1
                if updates % cfg.sync_every == 0:
                    weights = ray.put(learner.weights())
            elif pending:
                ray.wait(list(pending), num_returns=1, timeout=1.0)  # ahead of the collectors: wait for data
            else:
                break
            now = time.perf_counter()
            if now - last_log >= cfg.log_every:
                last_log = now
                recent = f"{np.mean(returns[-10:]):.1f}" if returns else "-"
                log(
                    f"steps {steps:>7}  updates {updates:>6}  updates/s {updates / max(learn_time, 1e-9):6.1f}  "
                    f"steps/s {steps / (now - start):7.1f}  return (last 10 episodes) {recent:>6}  "
                    f"collectors {len(pending) + len(idle)}"
                )
    finally:
        learner.close()
    wall = time.perf_counter() - start
    final = evaluate(cfg.env_id, learner.network, cfg.eval_episodes, cfg.seed + 10_000, device)
    result = dict(
        steps=steps,
        updates=updates,
        episodes=len(returns),
        lost_collectors=lost,
        updates_per_s=updates / max(learn_time, 1e-9),
        steps_per_s=steps / wall,
        wall_s=wall,
        eval_return=final,
    )
    log(
        f"done: {steps} steps, {updates} updates ({result['updates_per_s']:.1f} updates/s while updating), "
        f"{result['steps_per_s']:.1f} steps/s, final greedy evaluation return {final:.1f} "
        f"({cfg.eval_episodes} episodes)"
    )
    return result


def main(cfg: Config) -> dict:
    if ray is None:
        raise SystemExit("agents.distributed needs Ray: pip install 'torchsample[distributed]'")
    if cfg.address is None and cfg.collectors * cfg.collector_cpus > cfg.num_cpus:
        raise SystemExit(
            f"{cfg.collectors} collectors of {cfg.collector_cpus} CPU need more than --num-cpus "
            f"{cfg.num_cpus}: raise --num-cpus or lower --collector-cpus"
        )
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    with ray_cluster(cfg.address, cfg.num_cpus):
        replay = make_replay(cfg)
        collectors = []
        try:
            collectors = start_collectors(cfg)
            log = partial(print, flush=True)
            large = f" (m = {cfg.m})" if cfg.sampler.startswith("laber-") else ""
            log(
                f"sampler {cfg.sampler}{large}, {cfg.collectors} collectors, {cfg.total_steps} steps, "
                f"Ray at {ray.get_runtime_context().gcs_address}"
            )
            return train(cfg, replay, collectors, log)
        finally:
            for actor in collectors:
                ray.kill(actor)
            replay.close()


if __name__ == "__main__":
    main(tyro.cli(Config))
