"""C51 (Bellemare et al., 2017) with a choice of replay sampler: the DQN agent with a distributional head.

The loop, the samplers and the defaults are ``agents/dqn.py``'s; this file swaps the Q-network for
one that outputs ``atoms`` logits per action and the loss for :class:`torchsample.C51Loss`
(TorchRL's ``DistributionalDQNLoss``, compile-friendly). LaBER's surrogate for C51 is
``||softmax(z_i) - m_i||_2``, the norm of the cross-entropy's gradient w.r.t. the logits
(Lahire et al., 2022, App. D).

    python -m agents.c51 --env-id CartPole-v1 --sampler laber-mean
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import tyro
from torch import nn
from torchrl.modules import DistributionalQValueActor

from agents import dqn
from torchsample import C51Loss


@dataclass
class Config(dqn.Config):
    """C51: every DQN option (``--loss`` does not apply: C51 minimises a cross-entropy), plus the support."""

    out: Path = Path("runs/c51")
    """run folder: eval.csv, train.csv, config.txt, checkpoint/"""
    atoms: int = 51
    """atoms of the return distribution"""
    v_min: Optional[float] = None
    """lowest atom (None: 0 on classic control, -10 on MinAtar)"""
    v_max: Optional[float] = None
    """highest atom (None: 1 / (1 - gamma) on classic control, 10 on MinAtar)"""


def build_c51(cfg: Config, env, device: torch.device):
    """A distributional Q-network over ``atoms`` atoms, its C51 loss, and the expected Q-values."""
    minatar = cfg.env_id.startswith("MinAtar/")
    v_min = cfg.v_min if cfg.v_min is not None else (-10.0 if minatar else 0.0)
    v_max = cfg.v_max if cfg.v_max is not None else (10.0 if minatar else 1.0 / (1.0 - cfg.gamma))
    support = torch.linspace(v_min, v_max, cfg.atoms, device=device)
    n_actions = int(env.action_space.n)
    # [..., atoms * actions] -> [..., atoms, actions], the layout TorchRL's distributional actor reads.
    network = nn.Sequential(dqn.make_q_network(cfg, env, outputs_per_action=cfg.atoms),
                            nn.Unflatten(-1, (cfg.atoms, n_actions))).to(device)
    actor = DistributionalQValueActor(network, in_keys=["observation"], support=support, action_space="categorical")
    loss_module = C51Loss(actor, gamma=cfg.gamma, delay_value=True)

    def q_values(obs: torch.Tensor) -> torch.Tensor:
        return (torch.softmax(network(obs), dim=-2) * support.unsqueeze(-1)).sum(-2)

    return loss_module, q_values


def main(cfg: Config) -> dict:
    return dqn.main(cfg, build=build_c51, name="c51")


if __name__ == "__main__":
    main(tyro.cli(Config))
