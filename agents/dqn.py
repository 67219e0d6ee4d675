"""DQN with a choice of replay sampler: uniform, PER, LaBER (mean/lazy/max) or a large batch.

One file, top to bottom: config, network, buffer and sampler, update, loop. The LaBER down-sample is
``torchsample.LaBER``, a TorchRL replay-buffer transform; PER is TorchRL's ``PrioritizedSampler``.

    python -m agents.dqn --env-id CartPole-v1 --sampler laber-mean
    python -m agents.dqn --env-id MinAtar/Breakout-v1 --sampler laber-mean   # the paper's setting
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
import tyro
from torch import nn
from torchrl.modules import MLP, QValueActor
from torchrl.objectives import DQNLoss, HardUpdate, SoftUpdate
from tqdm import tqdm

from agents.common import (
    Checkpointer, Logger, RunOptions, StepTimer, anneal_per_beta, evaluate, make_buffer, make_env, resolve_device,
    seed_everything, to_tensordict,
)
from torchsample import LaBER, LaBERLoss, make_update


@dataclass
class Config(RunOptions):
    env_id: str = "CartPole-v1"
    """gymnasium id: CartPole-v1, Acrobot-v1, or MinAtar/{Breakout,Asterix,Freeway,Seaquest,SpaceInvaders}-v1"""
    sampler: Literal["uniform", "per", "laber-mean", "laber-lazy", "laber-max", "large-batch"] = "laber-mean"
    """how training rows are drawn from the buffer (large-batch: uniform with m * batch-size rows)"""
    m: int = 4
    """LaBER's large batch is m * batch-size rows, scored and down-sampled to batch-size"""
    batch_size: Optional[int] = None
    """rows per gradient step (None: 64 on classic control, 32 on MinAtar, as in the paper)"""
    total_steps: Optional[int] = None
    """environment steps (None: 40k on classic control, 5M on MinAtar)"""
    learning_starts: Optional[int] = None
    """steps that fill the buffer before learning (None: 1000 classic control, 5000 MinAtar)"""
    train_freq: Optional[int] = None
    """environment steps between training phases (None: 256 classic control, 1 MinAtar)"""
    gradient_steps: Optional[int] = None
    """gradient steps per training phase (None: 128 classic control, 1 MinAtar)"""
    buffer_size: int = 100_000
    """replay capacity (transitions)"""
    lr: Optional[float] = None
    """learning rate (None: Adam 2.3e-3 on classic control; RMSProp 1e-4, centered, as MinAtar's Table 3)"""
    gamma: Optional[float] = None
    """discount factor (None: 0.98 classic control, 0.99 MinAtar)"""
    lr_schedule: Optional[Literal["constant", "linear"]] = None
    """learning-rate schedule; linear decays to 0 at the end (None: linear classic control, constant MinAtar)"""
    target_update: Optional[int] = None
    """gradient steps between hard target-network copies, when target-tau is 0 (None: 128 classic control,
    1000 MinAtar)"""
    target_tau: Optional[float] = None
    """Polyak factor of a soft target update after every gradient step; 0: hard copies every target-update
    steps instead (None: 0.005 classic control, 0 MinAtar)"""
    start_epsilon: float = 1.0
    """initial exploration rate"""
    end_epsilon: Optional[float] = None
    """final exploration rate (None: 0.04 classic control, 0.1 MinAtar)"""
    exploration_steps: Optional[int] = None
    """steps over which epsilon decays linearly from the start (None: 8k classic control, 100k MinAtar)"""
    max_grad_norm: float = 10.0
    """gradient-norm clipping (10, as Stable-Baselines3's DQN)"""
    double_dqn: bool = True
    """Double DQN targets (van Hasselt et al.): the online network picks the next action"""
    loss: Literal["l2", "huber"] = "huber"
    """TD loss; LaBER's surrogate follows it (|delta| for l2, min(|delta|, 1) for huber)"""
    hidden: int = 256
    """width of the two hidden layers of the classic-control MLP"""
    eval_every: int = 5_000
    """steps between deterministic (greedy) evaluations"""
    eval_episodes: int = 10
    """episodes per evaluation"""
    out: Path = Path("runs/dqn")
    """run folder: eval.csv, train.csv, config.txt, checkpoint/"""


def with_env_defaults(cfg: Config) -> Config:
    """Fill the None fields from the env family's defaults.

    MinAtar: the paper's Table 3 (MinAtar's own DQN). Classic control: Stable-Baselines3 zoo's tuned
    CartPole DQN (training phases of 128 gradient steps every 256 env steps) with gamma 0.98, a
    linearly decaying learning rate and a soft target update (tau 0.005 per gradient step). Measured
    here with LaBER-mean, seeds 0-2, 50k steps, final greedy returns: soft targets 500/420/433; hard
    copies once per phase 500/280 (seeds 0-1), without Double DQN 500/118/500, lr 1e-3 139/107;
    gamma 0.99 with a constant rate 107/500; updating every env step oscillated between 100 and 500
    (8 settings). DQN on CartPole typically reaches 500 and then partly forgets it; soft targets made
    the late drops smallest.
    """
    minatar = cfg.env_id.startswith("MinAtar/")
    defaults = dict(
        batch_size=32 if minatar else 64,
        total_steps=5_000_000 if minatar else 50_000,
        learning_starts=5_000 if minatar else 1_000,
        train_freq=1 if minatar else 256,
        gradient_steps=1 if minatar else 128,
        lr=1e-4 if minatar else 2.3e-3,
        target_update=1000 if minatar else 128,
        target_tau=0.0 if minatar else 0.005,
        end_epsilon=0.1 if minatar else 0.04,
        exploration_steps=100_000 if minatar else 8_000,
        gamma=0.99 if minatar else 0.98,
        lr_schedule="constant" if minatar else "linear",
    )
    return replace(cfg, **{k: v for k, v in defaults.items() if getattr(cfg, k) is None})


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


def make_q_network(cfg: Config, env, outputs_per_action: int = 1) -> nn.Module:
    """The MinAtar network on MinAtar, a two-layer ReLU MLP elsewhere; ``n_actions * outputs_per_action`` outputs."""
    out = env.action_space.n * outputs_per_action
    if cfg.env_id.startswith("MinAtar/"):
        return MinAtarQNetwork(env.observation_space.shape[-1], out)
    return MLP(in_features=env.observation_space.shape[0], out_features=out, num_cells=[cfg.hidden, cfg.hidden],
               activation_class=nn.ReLU)


def build_dqn(cfg: Config, env, device: torch.device):
    """TorchRL's DQNLoss with a delayed (target) copy of the Q-network; and the greedy Q-values."""
    q_network = make_q_network(cfg, env).to(device)
    actor = QValueActor(q_network, in_keys=["observation"], action_space="categorical")
    loss_module = DQNLoss(actor, loss_function="l2" if cfg.loss == "l2" else "smooth_l1", delay_value=True,
                          action_space="categorical", double_dqn=cfg.double_dqn)
    loss_module.make_value_estimator(gamma=cfg.gamma)
    return loss_module, q_network


def main(cfg: Config, build=build_dqn, name: str = "dqn") -> dict:
    """Train; ``build(cfg, env, device) -> (loss_module, q_values)`` picks the loss (C51 reuses this)."""
    cfg = with_env_defaults(cfg)
    device = resolve_device(cfg.device)
    torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    env = make_env(cfg.env_id, cfg.seed)
    loss_module, q_values = build(cfg, env, device)
    # The paper's estimator mean(w * l), with LaBER's or PER's weights (1 when there are none).
    weighted_loss = LaBERLoss(loss_module)
    target_updater = (SoftUpdate(loss_module, tau=cfg.target_tau) if cfg.target_tau > 0
                      else HardUpdate(loss_module, value_network_update_interval=cfg.target_update))
    # A tensor learning rate can change without recompiling a compiled update.
    lr = torch.tensor(cfg.lr, device=device)
    if cfg.env_id.startswith("MinAtar/"):
        optimizer = torch.optim.RMSprop(loss_module.parameters(), lr=lr, alpha=0.95, centered=True, eps=0.01)
    else:
        optimizer = torch.optim.Adam(loss_module.parameters(), lr=lr, capturable=device.type == "cuda")

    # The sampler: the buffer draws B rows (uniform, per) or m*B rows (large-batch, laber-*).
    buffer = make_buffer(cfg.sampler, buffer_size=cfg.buffer_size, batch_size=cfg.batch_size, m=cfg.m, device=device)
    laber = (LaBER(loss_module, batch_size=cfg.batch_size, weighting=cfg.sampler.split("-")[1])
             if cfg.sampler.startswith("laber") else None)

    def objective(data):
        if laber is not None:
            data = laber(data)  # score the m*B rows with the loss's own networks, keep B of them
        return weighted_loss(data)["loss"], data

    # zero_grad, objective, backward, clip, step, target update; two fullgraph graphs with --compile.
    update = make_update(objective, optimizer, target_updater, max_grad_norm=cfg.max_grad_norm, compile=cfg.compile)
    if cfg.cudagraphs:
        from tensordict.nn import CudaGraphModule

        update = CudaGraphModule(update, warmup=5)

    @torch.no_grad()
    def greedy(obs: np.ndarray) -> int:
        return int(q_values(torch.as_tensor(obs, device=device).unsqueeze(0)).argmax(-1).item())

    logger = Logger(cfg.out, cfg)
    checkpoints = Checkpointer(cfg, cfg.out, {"loss": loss_module, "optimizer": optimizer, "target_updater": target_updater},
                               buffer, cfg.total_steps)
    start_step, env, loop = checkpoints.resume(env, cfg.seed)
    obs, episode_return, episode_returns = loop["obs"], loop["episode_return"], loop["episode_returns"]

    timer, t_start, last_eval = StepTimer(burn_in=cfg.learning_starts + 500), time.time(), float("nan")
    bar = tqdm(range(start_step, cfg.total_steps), initial=start_step, total=cfg.total_steps, disable=not cfg.progress,
               mininterval=1.0, desc=f"{name} {cfg.sampler} {cfg.env_id}")
    for step in bar:
        epsilon = linear_epsilon(cfg, step)
        if step < cfg.learning_starts or np.random.random() < epsilon:
            action = env.action_space.sample()
        else:
            action = greedy(obs)
        next_obs, reward, terminated, truncated, _ = env.step(action)
        buffer.add(to_tensordict(obs, action, reward, next_obs, terminated, truncated, device))
        episode_return += float(reward)
        obs = next_obs
        if terminated or truncated:
            episode_returns.append(episode_return)
            logger.log("train", step + 1, episode_return=episode_return, epsilon=epsilon)
            obs, episode_return = env.reset()[0], 0.0

        if step >= cfg.learning_starts and (step + 1) % cfg.train_freq == 0:
            anneal_per_beta(buffer, step / cfg.total_steps)
            if cfg.lr_schedule == "linear":
                optimizer.param_groups[0]["lr"].fill_(cfg.lr * (1.0 - step / cfg.total_steps))
            for _ in range(cfg.gradient_steps):
                loss, data = update(buffer.sample())
                if cfg.sampler == "per":
                    buffer.update_priority(data["index"], data["td_error"])  # |TD|, PER's priority

        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.total_steps:
            last_eval = evaluate(cfg.env_id, greedy, cfg.eval_episodes, seed=10_000 + cfg.seed)
            logger.log("eval", step + 1, eval_return=last_eval, wall_time=time.time() - t_start, steps_per_s=timer.rate(step))
        if checkpoints.after_step(step + 1, env, obs=obs, episode_return=episode_return, episode_returns=episode_returns):
            return {"final_eval": last_eval, "wall_time": time.time() - t_start, "stopped_at": step + 1}
        if step % 1000 == 0 or step + 1 == cfg.total_steps:  # the final bar shows the final figures
            recent = np.mean(episode_returns[-10:]) if episode_returns else float("nan")
            bar.set_postfix(ret=f"{recent:.1f}", eval=f"{last_eval:.1f}", sps=f"{timer.rate(step):.0f}")
        timer.rate(step)
    env.close()
    return {"final_eval": last_eval, "wall_time": time.time() - t_start}


def linear_epsilon(cfg: Config, step: int) -> float:
    frac = min(step / cfg.exploration_steps, 1.0)
    return cfg.start_epsilon + frac * (cfg.end_epsilon - cfg.start_epsilon)


if __name__ == "__main__":
    main(tyro.cli(Config))
