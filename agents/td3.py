"""TD3 (Fujimoto et al., 2018) with a choice of replay sampler: the SAC agent's loop with TD3's pieces.

A deterministic tanh actor with Gaussian exploration noise, TorchRL's ``TD3Loss`` (twin critics,
target-policy smoothing with clipped noise) and an actor and target networks updated every
``policy_delay`` critic updates, with the paper's Table 5 (400-300 networks, batch 100, Adam 1e-3). The loop, the samplers
and LaBER's twin-critic handling are ``agents/sac.py``'s.

    python -m agents.td3 --env-id Pendulum-v1 --sampler laber-mean
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import tyro
from tensordict.nn import TensorDictModule, TensorDictSequential
from torch import nn
from torchrl.modules import MLP, TanhModule
from torchrl.objectives import TD3Loss

from agents import sac


@dataclass
class Config(sac.Config):
    """TD3: every SAC option, with Table 5's sizes, plus the TD3-specific noises and delay."""

    batch_size: int = 100
    """rows per gradient step (the paper's Table 5)"""
    hidden: tuple[int, ...] = (400, 300)
    """hidden layers of actor and critics (Table 5)"""
    policy_noise: float = 0.2
    """std of the target-policy smoothing noise, in units of the action bound"""
    noise_clip: float = 0.5
    """clip of the target-policy smoothing noise"""
    exploration_noise: float = 0.1
    """std of the Gaussian exploration noise, in units of the action bound"""
    policy_delay: int = 2
    """critic updates per actor and target-network update"""
    out: Path = Path("runs/td3")
    """run folder: eval.csv, train.csv, config.txt, checkpoint/"""


def build_td3(cfg: Config, env, device: torch.device):
    """Deterministic tanh actor scaled to the action bounds, twin critics, TD3Loss."""
    spec = sac.action_spec(env, device)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    net = TensorDictModule(MLP(in_features=obs_dim, out_features=act_dim, num_cells=list(cfg.hidden), activation_class=nn.ReLU),
                           in_keys=["observation"], out_keys=["param"])
    actor = TensorDictSequential(net, TanhModule(in_keys=["param"], out_keys=["action"], spec=spec)).to(device)
    bound = float(spec.space.high.max())
    loss_module = TD3Loss(actor, sac.make_critic(cfg, env, device), action_spec=spec, num_qvalue_nets=2,
                          policy_noise=cfg.policy_noise * bound, noise_clip=cfg.noise_clip * bound,
                          loss_function="l2" if cfg.loss == "l2" else "smooth_l1")
    loss_module.make_value_estimator(gamma=cfg.gamma)
    return loss_module, actor


def main(cfg: Config) -> dict:
    return sac.main(cfg, build=build_td3, name="td3", actor_every=cfg.policy_delay, exploration_noise=cfg.exploration_noise)


if __name__ == "__main__":
    main(tyro.cli(Config))
