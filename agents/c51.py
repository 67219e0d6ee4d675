"""C51 (Bellemare et al., 2017) with a choice of replay sampler: uniform, PER, LaBER or a large batch.

One file, top to bottom: config, network, loss, sampler, update, loop. The Q-network outputs
``atoms`` logits per action, a distribution over returns on a fixed support; the loss is
:class:`torchsample.C51Loss` (TorchRL's ``DistributionalDQNLoss``, compile-friendly): the
cross-entropy to the target distribution projected onto the support. LaBER's surrogate for C51 is
``||softmax(z_i) - m_i||_2``, the norm of the cross-entropy's gradient w.r.t. the logits (Lahire et
al., 2022, App. D). Where each default comes from: ``docs/agents.md``.

    python -m agents.c51 --env-id CartPole-v1 --sampler laber-mean
    python -m agents.c51 --env-id MinAtar/Breakout-v1 --help   # MinAtar's defaults
    python -m agents.c51 --env-id ALE/Breakout-v5 --help       # Atari: Dopamine's C51
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn
from torchrl.modules import MLP, DistributionalQValueActor
from torchrl.objectives import HardUpdate, SoftUpdate

from agents.atari import FrameStackReplay, NatureCNN, is_atari
from agents.common import (
    Replay, RunOptions, SamplerName, TrainingLoop, cli, make_env, resolve_device, seed_everything, to_tensordict,
)
from torchsample import C51Loss, LaBERLoss, make_update


@dataclass
class Config(RunOptions):
    """C51. The defaults shown are those of --env-id's family: classic control (CartPole-v1, Acrobot-v1),
    MinAtar (python -m agents.c51 --env-id MinAtar/Breakout-v1 --help) or Atari (--env-id ALE/Pong-v5)."""

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
    """epsilon of the optimizer's denominator (MinAtar's RMSProp 0.01, Dopamine's Adam 0.0003125)"""
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
    atoms: int = 51
    """atoms of the return distribution"""
    v_min: float = 0.0
    """lowest atom (the support is atoms evenly spaced values from v-min to v-max)"""
    v_max: float = 50.0
    """highest atom"""
    hidden: int = 256
    """width of the two hidden layers of the classic-control MLP"""
    eval_every: int = 5_000
    """steps between evaluations (acting on the expected Q-values)"""
    eval_episodes: int = 10
    """episodes per evaluation"""
    eval_epsilon: float = 0.0
    """exploration rate while evaluating (0: greedy)"""
    out: Path = Path("runs/c51")
    """run folder: eval.csv, train.csv, config.txt, checkpoint/"""


# MinAtar's own DQN, the LaBER paper's Table 3, with the support of Bellemare et al.'s C51 (Config's
# defaults are classic control's).
MINATAR = dict(batch_size=32, total_steps=5_000_000, learning_starts=5_000, train_freq=1, gradient_steps=1,
               optimizer="rmsprop", lr=1e-4, lr_schedule="constant", gamma=0.99, target_tau=0.0, target_update=1_000,
               end_epsilon=0.1, exploration_steps=100_000, v_min=-10.0, v_max=10.0, optimizer_eps=0.01)
# Dopamine's C51 (c51.gin): DQN's schedule with Adam. Dopamine counts the target period in agent
# steps (8 000), this loop in gradient steps: 8 000 / 4 = 2 000.
ATARI = dict(batch_size=32, total_steps=50_000_000, learning_starts=20_000, train_freq=4, gradient_steps=1,
             buffer_size=1_000_000, optimizer="adam", lr=2.5e-4, optimizer_eps=0.0003125, lr_schedule="constant",
             gamma=0.99, target_tau=0.0, target_update=2_000, end_epsilon=0.01, exploration_steps=250_000,
             max_grad_norm=0.0, v_min=-10.0, v_max=10.0, clip_rewards=True, eval_every=250_000,
             eval_epsilon=0.001)


def env_defaults(env_id: str) -> Config:
    """The defaults for ``env_id``: MinAtar's for ``MinAtar/*``, Atari's for ``ALE/*``, else classic
    control's (``Config()``'s)."""
    family = MINATAR if env_id.startswith("MinAtar/") else ATARI if is_atari(env_id) else {}
    return Config(env_id=env_id, **family)


class MinAtarNetwork(nn.Module):
    """Conv(3x3, 16, stride 1) -> FC 128 -> FC outputs, ReLU (MinAtar's and the paper's Table 3)."""

    def __init__(self, in_channels: int, outputs: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 16, kernel_size=3, stride=1)
        self.fc = nn.Linear(16 * 8 * 8, 128)
        self.out = nn.Linear(128, outputs)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        x = obs.float().movedim(-1, -3)  # MinAtar observations are [..., 10, 10, C] booleans
        x = torch.relu(self.conv(x)).flatten(-3)
        return self.out(torch.relu(self.fc(x)))


def make_network(cfg: Config, env) -> nn.Module:
    """Logits ``[..., atoms, actions]`` (the layout TorchRL's distributional actor reads): the Nature-DQN
    network on Atari, the MinAtar network on MinAtar, a two-layer ReLU MLP elsewhere, with
    ``atoms * actions`` outputs."""
    n_actions = int(env.action_space.n)
    if is_atari(cfg.env_id):
        torso = NatureCNN(env.observation_space.shape[0], cfg.atoms * n_actions)
    elif cfg.env_id.startswith("MinAtar/"):
        torso = MinAtarNetwork(env.observation_space.shape[-1], cfg.atoms * n_actions)
    else:
        torso = MLP(in_features=env.observation_space.shape[0], out_features=cfg.atoms * n_actions,
                    num_cells=[cfg.hidden, cfg.hidden], activation_class=nn.ReLU)
    return nn.Sequential(torso, nn.Unflatten(-1, (cfg.atoms, n_actions)))


def build_c51(cfg: Config, env, device: torch.device):
    """The distributional actor over ``atoms`` atoms, its C51 loss (with a delayed target copy), and
    the expected Q-values ``sum_k softmax(z)_k * support_k``."""
    support = torch.linspace(cfg.v_min, cfg.v_max, cfg.atoms, device=device)
    network = make_network(cfg, env).to(device)
    actor = DistributionalQValueActor(network, in_keys=["observation"], support=support, action_space="categorical")
    loss_module = C51Loss(actor, gamma=cfg.gamma, delay_value=True)

    def q_values(obs: torch.Tensor) -> torch.Tensor:
        return (torch.softmax(network(obs), dim=-2) * support.unsqueeze(-1)).sum(-2)

    return loss_module, q_values


def linear_epsilon(cfg: Config, step: int) -> float:
    frac = min(step / cfg.exploration_steps, 1.0)
    return cfg.start_epsilon + frac * (cfg.end_epsilon - cfg.start_epsilon)


def main(cfg: Config) -> dict:
    device = resolve_device(cfg.device)
    torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    env = make_env(cfg.env_id, cfg.seed)
    loss_module, q_values = build_c51(cfg, env, device)
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
        data = replay.downsample(data)  # LaBER: score the m*B rows with ||softmax(z) - m||, keep B
        return weighted_loss(data)["loss"], data

    # zero_grad, objective, backward, clip, step, target update; two fullgraph graphs with --compile.
    update = make_update(objective, optimizer, target_updater, max_grad_norm=cfg.max_grad_norm or None,
                         compile=cfg.compile)
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
    loop = TrainingLoop(cfg, "c51", env, replay.buffer,
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
                replay.after_update(data)  # PER: the per-sample cross-entropy; GER: the exact gradient norms

        if loop.end_step(step, obs):
            break
    return loop.close()


if __name__ == "__main__":
    main(cli(env_defaults, Config.env_id))
