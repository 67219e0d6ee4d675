"""C51 (Bellemare et al., 2017) with a choice of replay sampler: uniform, PER, GER, LaBER or a large batch.

Top to bottom: config, network, loss, then ``main``: the replay buffer and its sampler, the objective, and
the update and loop, as in ``agents/dqn.py`` (whose docstring says why the loop DQN and C51 share is
``agents/value_based.py``'s and the buffer ``agents/replay.py``'s). The Q-network outputs ``atoms`` logits per
action, a distribution over returns on a fixed support; the loss is :class:`torchsample.C51Loss` (TorchRL's
``DistributionalDQNLoss``, compile-friendly): the cross-entropy to the target distribution projected onto the
support. LaBER's surrogate for C51 is ``||softmax(z_i) - m_i||_2``, the norm of the cross-entropy's gradient
w.r.t. the logits (Lahire et al., 2022, App. D). Where each default comes from: ``docs/agents.md``.

    python -m agents.c51 --env-id CartPole-v1 --sampler laber-mean
    python -m agents.c51 --env-id MinAtar/Breakout-v1 --help   # MinAtar's defaults
    python -m agents.c51 --env-id ALE/Breakout-v5 --help       # Atari: Dopamine's C51
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchrl.modules import MLP, DistributionalQValueActor

from agents import value_based
from agents.atari import is_atari
from agents.config import cli
from agents.envs import start_run
from agents.networks import MinAtarNetwork, NatureCNN
from agents.replay import make_replay
from torchsample import C51Loss, LaBERLoss


@dataclass
class Config(value_based.ValueConfig):
    """C51. The defaults shown are those of --env-id's family: classic control (CartPole-v1, Acrobot-v1),
    MinAtar (python -m agents.c51 --env-id MinAtar/Breakout-v1 --help) or Atari (--env-id ALE/Pong-v5)."""

    # ALGO LOGIC: C51's own options (the rest: agents/value_based.py's ValueConfig)
    atoms: int = 51
    """atoms of the return distribution"""
    v_min: float = 0.0
    """lowest atom (the support is atoms evenly spaced values from v-min to v-max)"""
    v_max: float = 50.0
    """highest atom"""
    out: Path = Path("runs/c51")
    """run folder: eval.csv, train.csv, config.txt, checkpoint/"""


# MinAtar's own DQN, the LaBER paper's Table 3, with the support of Bellemare et al.'s C51 (Config's
# defaults are classic control's).
MINATAR = {**value_based.MINATAR, "v_min": -10.0, "v_max": 10.0}
# Dopamine's C51 (c51.gin): DQN's schedule with Adam.
ATARI = {**value_based.ATARI, "optimizer": "adam", "optimizer_eps": 0.0003125, "v_min": -10.0, "v_max": 10.0}


def env_defaults(env_id: str) -> Config:
    """The defaults for ``env_id``: MinAtar's for ``MinAtar/*``, Atari's for ``ALE/*``, else classic
    control's (``Config()``'s).

    Examples:
        >>> env_defaults("MinAtar/Breakout-v1").v_max, env_defaults("ALE/Pong-v5").optimizer
        (10.0, 'adam')
    """
    family = MINATAR if env_id.startswith("MinAtar/") else ATARI if is_atari(env_id) else {}
    return Config(env_id=env_id, **family)


# ALGO LOGIC: the distributional Q-network and the C51 loss


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
        torso = MLP(
            in_features=env.observation_space.shape[0],
            out_features=cfg.atoms * n_actions,
            num_cells=[cfg.hidden, cfg.hidden],
            activation_class=nn.ReLU,
        )
    return nn.Sequential(torso, nn.Unflatten(-1, (cfg.atoms, n_actions)))


def build_c51(cfg: Config, env, device: torch.device):
    """The distributional actor over ``atoms`` atoms, its C51 loss (with a delayed target copy), and
    the expected Q-values ``sum_k softmax(z)_k * support_k``.

    Examples:
        >>> from agents.envs import make_env
        >>> loss_module, q_values = build_c51(Config(), make_env("CartPole-v1", 0), torch.device("cpu"))
        >>> q_values(torch.zeros(1, 4)).shape
        torch.Size([1, 2])
    """
    support = torch.linspace(cfg.v_min, cfg.v_max, cfg.atoms, device=device)
    network = make_network(cfg, env).to(device)
    actor = DistributionalQValueActor(network, in_keys=["observation"], support=support, action_space="categorical")
    loss_module = C51Loss(actor, gamma=cfg.gamma, delay_value=True)

    def q_values(obs: torch.Tensor) -> torch.Tensor:
        return (torch.softmax(network(obs), dim=-2) * support.unsqueeze(-1)).sum(-2)

    return loss_module, q_values


def main(cfg: Config) -> dict:
    """Trains C51 as ``cfg`` says and returns ``{"final_eval", "wall_time"}`` (``agents/value_based.py``'s loop)."""
    device, env = start_run(cfg)
    loss_module, q_values = build_c51(cfg, env, device)

    # ALGO LOGIC: the replay buffer: B rows per update, drawn through LaBER (m*B scored by ||softmax(z) - m||,
    # B kept), PER or GER, or uniformly (agents/replay.py builds the sampler --sampler names)
    rb, laber = make_replay(cfg, loss_module, env, device)

    # ALGO LOGIC: the update: mean(w * cross-entropy), with LaBER's or PER's weights (1 without).
    weighted_loss = LaBERLoss(loss_module)

    def objective(data):
        if laber is not None:  # a compiled update: LaBER keeps B of the m*B rows inside it
            data = laber(data)
        return weighted_loss(data)["loss"], data

    # The optimizer, the target network, the (compiled) update around the objective, and the loop: epsilon-greedy
    # acting, training phases, evaluations and checkpoints.
    return value_based.train(
        cfg, "c51", env, device, loss_module=loss_module, objective=objective, q_values=q_values, rb=rb
    )


if __name__ == "__main__":
    main(cli(env_defaults, Config.env_id))
