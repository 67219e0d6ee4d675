"""DQN with a choice of replay sampler: uniform, PER, LaBER (mean/lazy/max) or a large batch.

One file, top to bottom: config, network, loss, sampler, update, loop. The LaBER down-sample is
``torchsample.LaBER`` called on the buffer's large batch inside the update; PER is TorchRL's
``PrioritizedSampler``; both are built by ``agents.common.Replay``. Where each default comes from:
``docs/agents.md``.

    python -m agents.dqn --env-id CartPole-v1 --sampler laber-mean
    python -m agents.dqn --env-id MinAtar/Breakout-v1 --sampler laber-mean   # the paper's setting
    python -m agents.dqn --env-id MinAtar/Breakout-v1 --help                 # MinAtar's defaults
    python -m agents.dqn --env-id ALE/Breakout-v5 --help                     # Atari: Dopamine's DQN
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn
from torchrl.modules import MLP, QValueActor
from torchrl.objectives import DQNLoss, HardUpdate, SoftUpdate

from agents.atari import FrameStackReplay, NatureCNN, is_atari
from agents.common import (
    Replay, RunOptions, SamplerName, TrainingLoop, cli, make_env, resolve_device, seed_everything, to_tensordict,
)
from torchsample import LaBERLoss, make_update


@dataclass
class Config(RunOptions):
    """DQN. The defaults shown are those of --env-id's family: classic control (CartPole-v1, Acrobot-v1),
    MinAtar (python -m agents.dqn --env-id MinAtar/Breakout-v1 --help) or Atari (--env-id ALE/Pong-v5)."""

    env_id: str = "CartPole-v1"
    """gymnasium id: CartPole-v1, Acrobot-v1, MinAtar/{Breakout,Asterix,Freeway,Seaquest,SpaceInvaders}-v1,
    or an Atari game ALE/<Game>-v5 (e.g. ALE/Breakout-v5, ALE/Pong-v5)"""
    sampler: SamplerName = "laber-mean"
    """how training rows are drawn from the buffer (large-batch: uniform with m * batch-size rows; per-laber-mean
    and ger-laber-mean: PER or GER draws m * batch-size rows, LaBER keeps batch-size; ger: PER with exact
    gradient-norm priorities; lfiw*: SAC and TD3 only)"""
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
    """epsilon of the optimizer's denominator (MinAtar's RMSProp 0.01, Dopamine's 1e-5)"""
    lr_schedule: Literal["constant", "linear"] = "linear"
    """learning-rate schedule; linear decays to 0 at the end"""
    gamma: float = 0.98
    """discount factor"""
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
    double_dqn: bool = True
    """Double DQN targets (van Hasselt et al.): the online network picks the next action"""
    loss: Literal["l2", "huber"] = "huber"
    """TD loss; LaBER's surrogate follows it (|delta| for l2, min(|delta|, 1) for huber)"""
    hidden: int = 256
    """width of the two hidden layers of the classic-control MLP"""
    eval_every: int = 5_000
    """steps between evaluations"""
    eval_episodes: int = 10
    """episodes per evaluation"""
    eval_epsilon: float = 0.0
    """exploration rate while evaluating (0: greedy)"""
    out: Path = Path("runs/dqn")
    """run folder: eval.csv, train.csv, config.txt, checkpoint/"""


# MinAtar's own DQN, the LaBER paper's Table 3 (Config's defaults are classic control's).
MINATAR = dict(batch_size=32, total_steps=5_000_000, learning_starts=5_000, train_freq=1, gradient_steps=1,
               optimizer="rmsprop", lr=1e-4, lr_schedule="constant", gamma=0.99, target_tau=0.0, target_update=1_000,
               end_epsilon=0.1, exploration_steps=100_000, optimizer_eps=0.01)
# Dopamine's DQN (dqn.gin), the LaBER paper's Table 2. Dopamine counts the target period in agent
# steps (8 000), this loop in gradient steps: 8 000 / 4 = 2 000.
ATARI = dict(batch_size=32, total_steps=50_000_000, learning_starts=20_000, train_freq=4, gradient_steps=1,
             buffer_size=1_000_000, optimizer="rmsprop", lr=2.5e-4, optimizer_eps=1e-5, lr_schedule="constant",
             gamma=0.99, target_tau=0.0, target_update=2_000, end_epsilon=0.01, exploration_steps=250_000,
             max_grad_norm=0.0, double_dqn=False, clip_rewards=True, eval_every=250_000, eval_epsilon=0.001)


def env_defaults(env_id: str) -> Config:
    """The defaults for ``env_id``: MinAtar's for ``MinAtar/*``, Atari's for ``ALE/*``, else classic
    control's (``Config()``'s)."""
    family = MINATAR if env_id.startswith("MinAtar/") else ATARI if is_atari(env_id) else {}
    return Config(env_id=env_id, **family)


class MinAtarQNetwork(nn.Module):
    """Conv(3x3, 16, stride 1) -> FC 128 -> FC n_actions, ReLU (MinAtar's and the paper's Table 3)."""

    def __init__(self, in_channels: int, outputs: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 16, kernel_size=3, stride=1)
        self.fc = nn.Linear(16 * 8 * 8, 128)
        self.out = nn.Linear(128, outputs)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        x = obs.float().movedim(-1, -3)  # MinAtar observations are [..., 10, 10, C] booleans
        x = torch.relu(self.conv(x)).flatten(-3)
        return self.out(torch.relu(self.fc(x)))


def make_q_network(cfg: Config, env) -> nn.Module:
    """The Nature-DQN network on Atari, the MinAtar network on MinAtar, a two-layer ReLU MLP elsewhere;
    one output per action."""
    if is_atari(cfg.env_id):
        return NatureCNN(env.observation_space.shape[0], env.action_space.n)
    if cfg.env_id.startswith("MinAtar/"):
        return MinAtarQNetwork(env.observation_space.shape[-1], env.action_space.n)
    return MLP(in_features=env.observation_space.shape[0], out_features=env.action_space.n,
               num_cells=[cfg.hidden, cfg.hidden], activation_class=nn.ReLU)


def build_dqn(cfg: Config, env, device: torch.device):
    """TorchRL's DQNLoss with a delayed (target) copy of the Q-network; and the Q-network."""
    q_network = make_q_network(cfg, env).to(device)
    actor = QValueActor(q_network, in_keys=["observation"], action_space="categorical")
    loss_module = DQNLoss(actor, loss_function="l2" if cfg.loss == "l2" else "smooth_l1", delay_value=True,
                          action_space="categorical", double_dqn=cfg.double_dqn)
    loss_module.make_value_estimator(gamma=cfg.gamma)
    return loss_module, q_network


def linear_epsilon(cfg: Config, step: int) -> float:
    frac = min(step / cfg.exploration_steps, 1.0)
    return cfg.start_epsilon + frac * (cfg.end_epsilon - cfg.start_epsilon)


def main(cfg: Config) -> dict:
    device = resolve_device(cfg.device)
    torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    env = make_env(cfg.env_id, cfg.seed)
    loss_module, q_network = build_dqn(cfg, env, device)
    # The paper's estimator mean(w * l), with LaBER's or PER's weights (1 when there are none).
    weighted_loss = LaBERLoss(loss_module)
    target_updater = (SoftUpdate(loss_module, tau=cfg.target_tau) if cfg.target_tau > 0
                      else HardUpdate(loss_module, value_network_update_interval=cfg.target_update))
    # A tensor learning rate can change without recompiling a compiled update.
    lr = torch.tensor(cfg.lr, device=device)
    if cfg.optimizer == "rmsprop":
        optimizer = torch.optim.RMSprop(loss_module.parameters(), lr=lr, alpha=0.95, centered=True,
                                        eps=cfg.optimizer_eps)
    else:
        optimizer = torch.optim.Adam(loss_module.parameters(), lr=lr, eps=cfg.optimizer_eps,
                                     capturable=device.type == "cuda")

    # The sampler: the buffer draws B rows (uniform, per) or m*B rows (large-batch, laber-*).
    replay = Replay(cfg.sampler, loss_module, buffer_size=cfg.buffer_size, batch_size=cfg.batch_size, m=cfg.m,
                    surrogate=cfg.surrogate, device=device, diagnostics_rows=cfg.diagnostics_rows)
    if is_atari(cfg.env_id):  # store 2 of a transition's 8 frames, re-stack them when drawn (agents/atari.py)
        replay.buffer.append_transform(FrameStackReplay(replay.buffer.storage, env.observation_space.shape))

    def objective(data):
        data = replay.downsample(data)  # LaBER: score the m*B rows with the loss's own networks, keep B
        return weighted_loss(data)["loss"], data

    # zero_grad, objective, backward, clip, step, target update; two fullgraph graphs with --compile.
    update = make_update(objective, optimizer, target_updater, max_grad_norm=cfg.max_grad_norm or None,
                         compile=cfg.compile)
    if cfg.cudagraphs:
        from tensordict.nn import CudaGraphModule

        update = CudaGraphModule(update, warmup=5)

    @torch.no_grad()
    def greedy(obs: np.ndarray) -> int:
        return int(q_network(torch.as_tensor(obs, device=device).unsqueeze(0)).argmax(-1).item())

    def evaluation_policy(obs: np.ndarray) -> int:
        # Dopamine evaluates Atari with epsilon 0.001: a greedy agent can stall a whole episode (Breakout without FIRE).
        if cfg.eval_epsilon > 0 and np.random.random() < cfg.eval_epsilon:
            return int(np.random.randint(env.action_space.n))
        return greedy(obs)

    # Episode returns, evaluations, checkpoints (--resume, --stop-after), the progress bar.
    loop = TrainingLoop(cfg, "dqn", env, replay.buffer,
                        {"loss": loss_module, "optimizer": optimizer, "target_updater": target_updater},
                        evaluation_policy, burn_in=cfg.learning_starts + 500, bar_every=1000, recent=10,
                        diagnose=replay.diagnostics)
    env, obs = loop.env, loop.obs
    for step in loop.steps():
        epsilon = linear_epsilon(cfg, step)
        if step < cfg.learning_starts or np.random.random() < epsilon:
            action = env.action_space.sample()
        else:
            action = greedy(obs)
        next_obs, reward, terminated, truncated, _ = env.step(action)
        stored_reward = float(np.clip(reward, -1.0, 1.0)) if cfg.clip_rewards else reward
        replay.add(to_tensordict(obs, action, stored_reward, next_obs, terminated, truncated, device))
        obs = loop.record(step, next_obs, reward, terminated or truncated, epsilon=epsilon)

        if step >= cfg.learning_starts and (step + 1) % cfg.train_freq == 0:
            if cfg.lr_schedule == "linear":
                optimizer.param_groups[0]["lr"].fill_(cfg.lr * (1.0 - step / cfg.total_steps))
            for _ in range(cfg.gradient_steps):
                _, data = update(replay.sample(progress=step / cfg.total_steps))
                replay.after_update(data)  # PER: the new priorities, |TD|; GER: the exact gradient norms

        if loop.end_step(step, obs):
            break
    return loop.close()


if __name__ == "__main__":
    main(cli(env_defaults, Config.env_id))
