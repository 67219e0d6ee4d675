"""What DQN and C51 share, once: the options and env-family defaults of a value-based agent, its optimizer,
target network and update wiring (compile, CUDA graph), and its loop (epsilon-greedy acting, training phases,
PER's and GER's priorities).

An agent (``agents/dqn.py``, ``agents/c51.py``) adds its own network, loss, greedy action values, replay buffer
and objective; the two differ in nothing else, so the rest is written here and not twice. Read top to bottom:
config, the families' defaults, optimizer and target updater, the update and the loop. ``# ALGO LOGIC`` marks
what a researcher edits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torchrl.objectives import HardUpdate, SoftUpdate

from agents.config import RunOptions
from agents.envs import to_tensordict
from agents.loop import TrainingLoop, diagnose_from_first_update
from agents.replay import VALUE_SAMPLERS, anneal_beta, feed_back
from torchsample import make_update


@dataclass
class ValueConfig(RunOptions):
    """A value-based agent's options (DQN's and C51's Config add their loss's)."""

    env_id: str = "CartPole-v1"
    """gymnasium id: CartPole-v1, Acrobot-v1, MinAtar/{Breakout,Asterix,Freeway,Seaquest,SpaceInvaders}-v1,
    or an Atari game ALE/<Game>-v5 (e.g. ALE/Breakout-v5, ALE/Pong-v5)"""
    sampler: Literal[VALUE_SAMPLERS] = "laber-mean"  # type: ignore[valid-type]
    """how training rows are drawn from the buffer (large-batch: uniform with m * batch-size rows; per-laber-mean
    and ger-laber-mean: PER or GER draws m * batch-size rows, LaBER keeps batch-size; ger: PER with exact
    gradient-norm priorities)"""
    m: int = 4
    """LaBER's large batch is m * batch-size rows, scored and down-sampled to batch-size"""
    surrogate: Literal["output", "last-layer", "exact"] = "output"
    """what LaBER scores the large batch with: the loss gradient at the output (the paper's), with respect to
    the last linear layer (||g|| sqrt(||h||^2 + 1)), or over every parameter (exact, by ghost norms)"""
    batch_size: int = 64
    """rows per gradient step"""
    total_steps: int = 50_000
    """environment steps"""
    learning_starts: int = 1_000
    """random-action steps that fill the buffer before learning"""
    train_freq: int = 256
    """environment steps between training phases"""
    gradient_steps: int = 128
    """gradient steps per training phase"""
    buffer_size: int = 100_000
    """replay capacity (transitions)"""
    optimizer: Literal["adam", "rmsprop"] = "adam"
    """adam, or centered RMSProp (alpha 0.95)"""
    lr: float = 2.3e-3
    """learning rate"""
    optimizer_eps: float = 1e-8
    """epsilon of the optimizer's denominator (MinAtar's RMSProp 0.01; Dopamine's DQN RMSProp 1e-5, C51 Adam
    0.0003125)"""
    lr_schedule: Literal["constant", "linear"] = "linear"
    """learning-rate schedule; linear decays to 0 at the end"""
    gamma: float = 0.98
    """discount factor"""
    n_step: int = 1
    """n-step returns: the buffer stores k-step transitions (TorchRL's MultiStepTransform; k = n except at an
    episode's end) and the target bootstraps with gamma ** k (1: one-step targets)"""
    target_tau: float = 0.005
    """Polyak factor of a soft target update after every gradient step; 0: hard copies every target-update
    gradient steps instead"""
    target_update: int = 128
    """gradient steps between hard target-network copies (when target-tau is 0)"""
    start_epsilon: float = 1.0
    """initial exploration rate"""
    end_epsilon: float = 0.04
    """final exploration rate"""
    exploration_steps: int = 8_000
    """steps over which epsilon decays linearly from start-epsilon to end-epsilon"""
    max_grad_norm: float = 10.0
    """gradient-norm clipping (0: none)"""
    clip_rewards: bool = False
    """store rewards clipped to [-1, 1] (returns are logged unclipped)"""
    hidden: int = 256
    """width of the two hidden layers of the classic-control MLP"""
    eval_every: int = 5_000
    """steps between evaluations (acting greedily on the Q-values, or their expectation for C51)"""
    eval_episodes: int = 10
    """episodes per evaluation"""
    eval_epsilon: float = 0.0
    """exploration rate while evaluating (0: greedy)"""
    out: Path = Path("runs/value")
    """run folder: eval.csv, train.csv, config.txt, checkpoint/"""


# MinAtar's own DQN, the LaBER paper's Table 3 (the Config's defaults are classic control's).
MINATAR = dict(
    batch_size=32,
    total_steps=5_000_000,
    learning_starts=5_000,
    train_freq=1,
    gradient_steps=1,
    optimizer="rmsprop",
    lr=1e-4,
    lr_schedule="constant",
    gamma=0.99,
    target_tau=0.0,
    target_update=1_000,
    end_epsilon=0.1,
    exploration_steps=100_000,
    optimizer_eps=0.01,
)
# Dopamine's schedule (dqn.gin and c51.gin agree on it; each agent adds its optimizer), the LaBER paper's
# Table 2. Dopamine counts the target period in agent steps (8 000), this loop in gradient steps: 8 000 / 4.
ATARI = dict(
    batch_size=32,
    total_steps=50_000_000,
    learning_starts=20_000,
    train_freq=4,
    gradient_steps=1,
    buffer_size=1_000_000,
    lr=2.5e-4,
    lr_schedule="constant",
    gamma=0.99,
    target_tau=0.0,
    target_update=2_000,
    end_epsilon=0.01,
    exploration_steps=250_000,
    max_grad_norm=0.0,
    clip_rewards=True,
    eval_every=250_000,
    eval_epsilon=0.001,
)


def make_optimizer(cfg: ValueConfig, loss_module, device: torch.device) -> torch.optim.Optimizer:
    """Adam, or centered RMSProp (MinAtar's and Dopamine's DQN), on the loss's parameters.

    Examples:
        >>> opt = make_optimizer(ValueConfig(optimizer="rmsprop"), torch.nn.Linear(2, 1), torch.device("cpu"))
        >>> type(opt).__name__, opt.param_groups[0]["centered"]
        ('RMSprop', True)
    """
    lr = torch.tensor(cfg.lr, device=device)  # a tensor learning rate changes without recompiling the update
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(loss_module.parameters(), lr=lr, alpha=0.95, centered=True, eps=cfg.optimizer_eps)
    return torch.optim.Adam(loss_module.parameters(), lr=lr, eps=cfg.optimizer_eps, capturable=device.type == "cuda")


def make_target_updater(cfg: ValueConfig, loss_module) -> SoftUpdate | HardUpdate:
    """A soft target update after every gradient step (``--target-tau`` > 0), else hard copies every
    ``--target-update`` gradient steps.

    Examples:
        >>> from agents import dqn
        >>> from agents.envs import make_env
        >>> loss_module, _ = dqn.build_dqn(dqn.Config(), make_env("CartPole-v1", 0), torch.device("cpu"))
        >>> type(make_target_updater(dqn.Config(target_tau=0.0), loss_module)).__name__
        'HardUpdate'
    """
    if cfg.target_tau > 0:
        return SoftUpdate(loss_module, tau=cfg.target_tau)
    return HardUpdate(loss_module, value_network_update_interval=cfg.target_update)


def linear_epsilon(cfg: ValueConfig, step: int) -> float:
    """Epsilon at ``step``: linear from ``start_epsilon`` to ``end_epsilon`` over ``exploration_steps``.

    Examples:
        >>> linear_epsilon(ValueConfig(start_epsilon=1.0, end_epsilon=0.1, exploration_steps=100), 50)
        0.55
    """
    frac = min(step / cfg.exploration_steps, 1.0)
    return cfg.start_epsilon + frac * (cfg.end_epsilon - cfg.start_epsilon)


def train(
    cfg: ValueConfig,
    name: str,
    env,
    device: torch.device,
    *,
    loss_module,
    objective: Callable,
    q_values: Callable[[torch.Tensor], torch.Tensor],
    rb,
) -> dict:
    """The update and the loop around an agent's ``objective(rows) -> (loss, rows)``: the optimizer and the
    target network (:func:`make_optimizer`, :func:`make_target_updater`), the update (``torchsample.make_update``:
    zero_grad, objective, backward, clip, step, target update; two fullgraph graphs with ``--compile``, a CUDA
    graph with ``--cudagraphs``); then act epsilon-greedily on ``q_values`` (``[batch, actions]``), store the
    transition, every ``train_freq`` steps run ``gradient_steps`` updates on ``rb.sample()`` and give the rows'
    priorities back; evaluations, checkpoints and logs through :class:`TrainingLoop`. Returns its summary
    (``{"final_eval", "wall_time"}``, and ``"stopped_at"`` after ``--stop-after``).

    Examples:
        >>> import tempfile
        >>> from agents import dqn
        >>> cfg = dqn.Config(total_steps=300, learning_starts=100, eval_every=300, eval_episodes=1, batch_size=8,
        ...                  train_freq=50, gradient_steps=2, progress=False, out=Path(tempfile.mkdtemp()))
        >>> dqn.main(cfg)["final_eval"] > 0
        True
    """
    target_updater = make_target_updater(cfg, loss_module)
    optimizer = make_optimizer(cfg, loss_module, device)
    update = make_update(
        objective, optimizer, target_updater, max_grad_norm=cfg.max_grad_norm or None, compile=cfg.compile
    )
    if cfg.cudagraphs:
        from tensordict.nn import CudaGraphModule

        update = CudaGraphModule(update, warmup=5)

    @torch.no_grad()
    def greedy(obs: np.ndarray) -> int:
        return int(q_values(torch.as_tensor(obs, device=device).unsqueeze(0)).argmax(-1).item())

    def evaluation_policy(obs: np.ndarray) -> int:
        # Dopamine evaluates Atari with epsilon 0.001: a greedy agent can stall a whole episode (Breakout without FIRE).
        if cfg.eval_epsilon > 0 and np.random.random() < cfg.eval_epsilon:
            return int(np.random.randint(env.action_space.n))
        return greedy(obs)

    # Episode returns, evaluations, checkpoints (--resume, --stop-after), the progress bar.
    loop = TrainingLoop(
        cfg,
        name,
        env,
        rb,
        {"loss": loss_module, "optimizer": optimizer, "target_updater": target_updater},
        evaluation_policy,
        burn_in=cfg.learning_starts + 500,
        bar_every=1000,
        recent=10,
        diagnose=diagnose_from_first_update(cfg, loss_module, rb, optimizer),
    )
    env, obs = loop.env, loop.obs
    for step in loop.steps():
        # ALGO LOGIC: epsilon-greedy acting; rewards stored clipped on Atari, returns logged unclipped
        epsilon = linear_epsilon(cfg, step)
        if step < cfg.learning_starts or np.random.random() < epsilon:
            action = env.action_space.sample()
        else:
            action = greedy(obs)
        next_obs, reward, terminated, truncated, _ = env.step(action)
        stored_reward = float(np.clip(reward, -1.0, 1.0)) if cfg.clip_rewards else reward
        rb.add(to_tensordict(obs, action, stored_reward, next_obs, terminated, truncated, device))
        obs = loop.record(step, next_obs, reward, terminated or truncated, epsilon=epsilon)

        # ALGO LOGIC: a training phase every train_freq steps
        if step >= cfg.learning_starts and (step + 1) % cfg.train_freq == 0:
            if cfg.lr_schedule == "linear":
                optimizer.param_groups[0]["lr"].fill_(cfg.lr * (1.0 - step / cfg.total_steps))
            prioritized = anneal_beta(rb, step, cfg.total_steps)  # PER, GER (and LaBER over them)
            for _ in range(cfg.gradient_steps):
                _, data = update(rb.sample())
                if prioritized:  # the rows' new priorities: the loss's "td_error", GER's exact norms
                    feed_back(rb, data)

        if loop.end_step(step, obs):
            break
    return loop.close()
