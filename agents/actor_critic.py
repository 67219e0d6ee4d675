"""What SAC and TD3 share, once: the options and defaults of an actor-critic agent on continuous actions, its
twin critics' network, its replay (with LFIW's fast and slow buffers) and its loop.

An agent (``agents/sac.py``, ``agents/td3.py``) adds its own actor, loss, exploration and update (``learn``);
everything else the two did alike is written here and not twice. Read top to bottom: config, critic,
replay, the loop. ``# ALGO LOGIC`` marks what a researcher edits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tensordict import TensorDictBase
from torch import nn
from torchrl.data import Bounded
from torchrl.modules import MLP, ValueOperator

from agents import replay
from agents.config import RunOptions
from agents.envs import to_tensordict
from agents.loop import TrainingLoop, diagnose_from_first_update
from agents.replay import ACTOR_CRITIC_SAMPLERS, anneal_beta, feed_back
from torchsample.lfiw import LFIW, FastSlowReplay, RatioNetwork
from torchsample.sampler import LaBERDraw


@dataclass
class ActorCriticConfig(RunOptions):
    """An actor-critic agent's options (SAC's and TD3's Config add or change their own)."""

    env_id: str = "Pendulum-v1"
    """gymnasium id with a Box action space: Pendulum-v1, HalfCheetah-v5, Hopper-v5, ..."""
    sampler: Literal[ACTOR_CRITIC_SAMPLERS] = "laber-mean"  # type: ignore[valid-type]
    """how training rows are drawn from the buffer (large-batch: uniform with m * batch-size rows;
    per-laber-mean, ger-laber-mean: PER or GER draws m * batch-size rows, LaBER keeps batch-size; ger: PER with
    exact gradient-norm priorities; lfiw, lfiw-laber-mean: the critics' rows weighted by a fast-vs-slow
    density ratio, Sinha et al., docs/lfiw.md)"""
    m: int = 4
    """LaBER's large batch is m * batch-size rows, scored and down-sampled to batch-size"""
    surrogate: Literal["output", "last-layer", "exact"] = "output"
    """what LaBER scores the large batch with: the loss gradient at the output (the paper's), with respect to
    the last linear layer (||g|| sqrt(||h||^2 + 1)), or over every parameter (exact, by ghost norms)"""
    critics: Literal["independent", "joint"] = "independent"
    """LaBER with twin critics: one down-sample per critic (the paper's) or one from sqrt(sum p_c^2)"""
    batch_size: int = 256
    """rows per gradient step"""
    total_steps: int = 15_000
    """environment steps"""
    learning_starts: int = 1_000
    """random-action steps that fill the buffer before learning"""
    buffer_size: int = 1_000_000
    """replay capacity (transitions)"""
    lr: float = 1e-3
    """Adam learning rate of critics and actor (and of SAC's temperature)"""
    adam_eps: float = 1e-5
    """Adam epsilon"""
    gamma: float = 0.99
    """discount factor"""
    n_step: int = 1
    """n-step returns: the buffer stores k-step transitions (TorchRL's MultiStepTransform; k = n except at an
    episode's end) and the target bootstraps with gamma ** k (1: one-step targets)"""
    tau: float = 0.005
    """Polyak factor of the target networks (SAC: the critics after every gradient step; TD3: actor and critics
    at every actor update)"""
    hidden: tuple[int, ...] = (256, 256)
    """hidden layers of actor and critics"""
    loss: Literal["l2", "huber"] = "l2"
    """critic loss; LaBER's surrogate follows it"""
    lfiw_fast_size: int = 10_000
    """lfiw*: the fast buffer, the latest transitions; no re-weighting until the slow buffer (buffer-size)
    holds more than this, so a run shorter than it is uniform replay (10^4: ours, docs/lfiw.md)"""
    lfiw_temperature: float = 5.0
    """lfiw*: T in w^(1/T) / mean(w^(1/T)); larger is closer to uniform, 1 the estimated ratio as it is"""
    lfiw_f: Literal["js", "kl"] = "js"
    """lfiw*: the f-divergence whose variational bound trains the ratio network (Eq. 10)"""
    lfiw_log_every: int = 1_000
    """lfiw*: steps between rows of lfiw.csv: the ratio's mean, std and effective sample size"""
    eval_every: int = 5_000
    """steps between deterministic evaluations"""
    eval_episodes: int = 5
    """episodes per evaluation"""
    out: Path = Path("runs/actor-critic")
    """run folder: eval.csv, train.csv, config.txt, checkpoint/"""


# MuJoCo bodies (HalfCheetah, Hopper, ...): the LaBER paper's Tables 4 (SAC) and 5 (TD3); the Config's defaults
# are Pendulum's.
MUJOCO = dict(total_steps=1_000_000)


def action_spec(env, device) -> Bounded:
    """The env's Box action space as TorchRL's ``Bounded`` spec.

    Examples:
        >>> from agents.envs import make_env
        >>> action_spec(make_env("Pendulum-v1", 0), "cpu").space.high
        tensor([2.])
    """
    space = env.action_space
    return Bounded(torch.as_tensor(space.low), torch.as_tensor(space.high), space.shape, device=device)


def make_critic(cfg: ActorCriticConfig, env, device) -> ValueOperator:
    """Q(s, a): an MLP on the concatenated observation and action; SACLoss and TD3Loss vmap the twin copies.

    Examples:
        >>> from tensordict import TensorDict
        >>> from agents.envs import make_env
        >>> critic = make_critic(ActorCriticConfig(hidden=(8,)), make_env("Pendulum-v1", 0), "cpu")
        >>> critic(TensorDict({"observation": torch.zeros(3), "action": torch.zeros(1)}))["state_action_value"].shape
        torch.Size([1])
    """
    in_features = env.observation_space.shape[0] + env.action_space.shape[0]
    return ValueOperator(
        MLP(in_features=in_features, out_features=1, num_cells=list(cfg.hidden), activation_class=nn.ReLU),
        in_keys=["observation", "action"],
    ).to(device)


def make_optimizer(cfg: ActorCriticConfig, loss_module, device: torch.device) -> torch.optim.Adam:
    """One Adam for critics, actor (and SAC's temperature), with a tensor learning rate (no recompiles).

    Examples:
        >>> make_optimizer(ActorCriticConfig(), torch.nn.Linear(2, 1), torch.device("cpu")).defaults["eps"]
        1e-05
    """
    lr = torch.tensor(cfg.lr, device=device)
    return torch.optim.Adam(loss_module.parameters(), lr=lr, eps=cfg.adam_eps, capturable=device.type == "cuda")


def make_replay(cfg: ActorCriticConfig, loss_module, env, device: torch.device):
    """``(rb, laber, lfiw, fast_slow)``: the replay buffer of ``--sampler`` and, for a compiled update, the LaBER
    module the update calls (``agents/replay.py``; LaBER keeps ``B`` of ``m * B`` rows per critic); with LFIW,
    its module and two buffers (``torchsample.lfiw``), ``rb`` then being the slow one, whose rows LFIW weighs
    (before LaBER keeps ``B``: the sampler's ``transform``). ``lfiw`` and ``fast_slow`` are None without LFIW.

    Examples:
        >>> from agents import sac
        >>> from agents.envs import make_env
        >>> env, cfg = make_env("Pendulum-v1", 0), sac.Config(hidden=(8,), sampler="lfiw", buffer_size=200,
        ...                                                   lfiw_fast_size=100)
        >>> loss_module, _ = sac.build_sac(cfg, env, torch.device("cpu"))
        >>> rb, laber, lfiw, fast_slow = make_replay(cfg, loss_module, env, torch.device("cpu"))
        >>> rb is fast_slow.slow, laber, type(lfiw).__name__
        (True, None, 'LFIW')
    """
    if not cfg.sampler.startswith("lfiw"):
        rb, laber = replay.make_replay(cfg, loss_module, env, device, critics=cfg.critics)
        return rb, laber, None, None
    if cfg.n_step != 1:
        raise ValueError("--n-step with LFIW: its fast and slow buffers store one-step transitions")
    sampler, rows, laber = replay.make_sampler(cfg, loss_module, critics=cfg.critics)
    fast_slow = FastSlowReplay(cfg.lfiw_fast_size, cfg.buffer_size, device=device, sampler=sampler, batch_size=rows)
    features = env.observation_space.shape[0] + env.action_space.shape[0]  # w_psi(s, a)
    lfiw = LFIW(RatioNetwork(features).to(device), replay=fast_slow, f=cfg.lfiw_f, temperature=cfg.lfiw_temperature)
    if isinstance(sampler, LaBERDraw):  # w~ normalised over the large batch, then LaBER keeps B (docs/lfiw.md)
        sampler.transform = lfiw
    return fast_slow.slow, laber, lfiw, fast_slow


def lfiw_log(lfiw: LFIW, fast_slow: FastSlowReplay, ratio_loss: torch.Tensor, rows: int) -> dict[str, float]:
    """What lfiw.csv records: the ratio's mean, spread and effective sample size on ``rows`` uniform rows of the
    slow buffer, as many as w~ is normalised over (drawn on a forked RNG: logging does not change the run), its
    last loss (Eq. 10; minus it bounds ``D_f(fast || slow)`` from below) and the slow buffer's size.

    Examples:
        >>> from agents import sac
        >>> from agents.envs import make_env
        >>> env, cfg = make_env("Pendulum-v1", 0), sac.Config(hidden=(8,), sampler="lfiw", buffer_size=200,
        ...                                                   lfiw_fast_size=10)
        >>> _, _, lfiw, fast_slow = make_replay(cfg, sac.build_sac(cfg, env, "cpu")[0], env, "cpu")
        >>> obs, _ = env.reset(seed=0)
        >>> for _ in range(20):
        ...     next_obs, reward, terminated, truncated, _ = env.step(env.action_space.sample())
        ...     fast_slow.add(to_tensordict(obs, env.action_space.sample(), reward, next_obs, False, False, "cpu"))
        ...     obs = next_obs
        >>> sorted(lfiw_log(lfiw, fast_slow, torch.tensor(0.5), rows=8))
        ['ess', 'ratio_loss', 'ratio_mean', 'ratio_std', 'slow_size']
    """
    with torch.random.fork_rng(devices=[]):
        stats = {key: value.item() for key, value in lfiw.stats(fast_slow.sample_slow(rows)).items()}
    return {**stats, "ratio_loss": ratio_loss.item(), "slow_size": len(fast_slow.slow)}


def train(
    cfg: ActorCriticConfig,
    name: str,
    env,
    device: torch.device,
    policy: Callable[..., np.ndarray],
    learn: Callable[[TensorDictBase, int], TensorDictBase],
    replay_parts: tuple,
    state: dict,
) -> dict:
    """The loop: act with ``policy(obs, explore=True)`` (random actions for ``learning_starts`` steps), store the
    transition (LFIW: in its fast and slow buffers), then one update per step: LFIW's ratio network takes its
    step, a batch is drawn (and weighted by LFIW), ``learn(batch, step)`` trains on it and returns the rows,
    whose priorities go back to PER or GER. ``replay_parts`` is :func:`make_replay`'s ``(rb, laber, lfiw,
    fast_slow)``; ``state`` the modules a checkpoint saves (``"loss"`` and ``"optimizer"`` among them).
    Evaluations (``policy(obs)``), checkpoints and logs through :class:`TrainingLoop`; returns its
    summary (``{"final_eval", "wall_time"}``, and ``"stopped_at"`` after ``--stop-after``).

    Examples:
        >>> import tempfile
        >>> from agents import td3
        >>> cfg = td3.Config(total_steps=150, learning_starts=100, eval_every=150, eval_episodes=1, batch_size=8,
        ...                  hidden=(8,), buffer_size=1_000, progress=False, out=Path(tempfile.mkdtemp()))
        >>> td3.main(cfg)["final_eval"] < 0  # Pendulum's returns are negative
        True
    """
    rb, _, lfiw, fast_slow = replay_parts
    if lfiw is not None:  # the ratio network, its optimizer and the fast buffer resume too
        state = {**state, "lfiw": lfiw, "lfiw_optimizer": lfiw.optimizer, "lfiw_fast_buffer": fast_slow.fast}
    # Episode returns, evaluations, checkpoints (--resume, --stop-after), the progress bar.
    loop = TrainingLoop(
        cfg,
        name,
        env,
        rb,
        state,
        policy,
        burn_in=cfg.learning_starts + 200,
        bar_every=500,
        recent=5,
        diagnose=diagnose_from_first_update(cfg, state["loss"], rb, state["optimizer"]),
    )
    env, obs = loop.env, loop.obs
    for step in loop.steps():
        # ALGO LOGIC: acting (random actions until learning starts) and storing the transition
        action = env.action_space.sample() if step < cfg.learning_starts else policy(obs, explore=True)
        next_obs, reward, terminated, truncated, _ = env.step(action)
        transition = to_tensordict(
            obs.astype(np.float32),
            np.asarray(action, dtype=np.float32),
            reward,
            next_obs.astype(np.float32),
            terminated,
            truncated,
            device,
        )
        (rb if fast_slow is None else fast_slow).add(transition)  # LFIW: to the fast and the slow buffer
        obs = loop.record(step, next_obs, reward, terminated or truncated)

        # ALGO LOGIC: one update per step
        if step >= cfg.learning_starts:
            prioritized = anneal_beta(rb, step, cfg.total_steps)  # PER, GER (and LaBER over them)
            if lfiw is not None and lfiw.active:  # Alg. 1: past the threshold, w_psi takes a step (Eq. 10) first
                ratio_loss = lfiw.update(fast_slow.sample_slow(cfg.batch_size), fast_slow.sample_fast(cfg.batch_size))
            data = rb.sample()  # with LFIW and LaBERSampler, w~ weighs the large batch before LaBER keeps B rows
            if lfiw is not None and not isinstance(rb.sampler, LaBERDraw):
                data = lfiw(data)  # Eq. 11-12: the critics' rows weighted by w~, normalised over them
            data = learn(data, step)
            if prioritized:  # the rows' new priorities: PER's largest |TD| over the critics, GER's exact norms
                feed_back(rb, data)
            if lfiw is not None and lfiw.active and (step + 1) % cfg.lfiw_log_every == 0:
                rows = cfg.m * cfg.batch_size if "laber" in cfg.sampler else rb.batch_size  # w~'s normaliser
                loop.logger.log("lfiw", step + 1, **lfiw_log(lfiw, fast_slow, ratio_loss, rows))

        if loop.end_step(step, obs):
            break
    return loop.close()
