"""DQN with a choice of replay sampler: uniform, PER, GER, LaBER (mean/lazy/max, over any of them) or a
large batch.

Top to bottom: config, network, loss, then ``main``: the replay buffer and its sampler, the objective, and
the update and loop (``agents/value_based.py``). The buffer samples through ``torchsample.LaBERSampler``: it
draws ``m * B`` rows, scores them with the loss's own networks and keeps ``B``; PER is TorchRL's
``PrioritizedSampler``, GER ``torchsample.GERSampler``. Where each default comes from: ``docs/agents.md``.

The shape, the same in the four agents: what is the algorithm's own (its options, network, loss, objective;
for SAC and TD3 the actor, exploration and update) is written in its file and marked ``# ALGO LOGIC``. What two
agents share word for word is written once beside them: ``agents/value_based.py`` for DQN and C51 (optimizer,
target network, the update's compile wiring, the epsilon-greedy loop), ``agents/actor_critic.py`` for SAC and
TD3 (critic, LFIW's buffers, the loop). ``agents/replay.py`` builds every agent's buffer and sampler from the
``--sampler`` name, in one branch per name, so that a new sampler is added once. The run's bookkeeping
(``config``: command line; ``loop``, ``logs``, ``checkpoints``, ``envs``, ``nstep``) is in modules a reader
need not open. Before, each agent held its loop and buffer whole, and DQN/C51 and SAC/TD3 were 130 and 250
lines of the same code under other names.

    python -m agents.dqn --env-id CartPole-v1 --sampler laber-mean
    python -m agents.dqn --env-id MinAtar/Breakout-v1 --sampler laber-mean   # the paper's setting
    python -m agents.dqn --env-id MinAtar/Breakout-v1 --help                 # MinAtar's defaults
    python -m agents.dqn --env-id ALE/Breakout-v5 --help                     # Atari: Dopamine's DQN
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from torchrl.modules import MLP, QValueActor
from torchrl.objectives import DQNLoss

from agents import value_based
from agents.atari import is_atari
from agents.config import cli
from agents.envs import start_run
from agents.networks import MinAtarNetwork, NatureCNN
from agents.replay import make_replay
from torchsample import LaBERLoss


@dataclass
class Config(value_based.ValueConfig):
    """DQN. The defaults shown are those of --env-id's family: classic control (CartPole-v1, Acrobot-v1),
    MinAtar (python -m agents.dqn --env-id MinAtar/Breakout-v1 --help) or Atari (--env-id ALE/Pong-v5)."""

    # ALGO LOGIC: DQN's own options (the rest: agents/value_based.py's ValueConfig)
    double_dqn: bool = True
    """Double DQN targets (van Hasselt et al.): the online network picks the next action"""
    loss: Literal["l2", "huber"] = "huber"
    """TD loss; LaBER's surrogate is its gradient at the output (2|delta| for l2, min(|delta|, 1) for huber)"""
    out: Path = Path("runs/dqn")
    """run folder: eval.csv, train.csv, config.txt, checkpoint/"""


# MinAtar's own DQN, the LaBER paper's Table 3 (Config's defaults are classic control's).
MINATAR = value_based.MINATAR
# Dopamine's DQN (dqn.gin), the LaBER paper's Table 2: centered RMSProp, no Double DQN.
ATARI = {**value_based.ATARI, "optimizer": "rmsprop", "optimizer_eps": 1e-5, "double_dqn": False}


def env_defaults(env_id: str) -> Config:
    """The defaults for ``env_id``: MinAtar's for ``MinAtar/*``, Atari's for ``ALE/*``, else classic
    control's (``Config()``'s).

    Examples:
        >>> env_defaults("MinAtar/Breakout-v1").batch_size, env_defaults("ALE/Pong-v5").optimizer
        (32, 'rmsprop')
    """
    family = MINATAR if env_id.startswith("MinAtar/") else ATARI if is_atari(env_id) else {}
    return Config(env_id=env_id, **family)


# ALGO LOGIC: the Q-network and TorchRL's DQN loss


def make_q_network(cfg: Config, env) -> nn.Module:
    """The Nature-DQN network on Atari, the MinAtar network on MinAtar, a two-layer ReLU MLP elsewhere;
    one output per action."""
    if is_atari(cfg.env_id):
        return NatureCNN(env.observation_space.shape[0], env.action_space.n)
    if cfg.env_id.startswith("MinAtar/"):
        return MinAtarNetwork(env.observation_space.shape[-1], env.action_space.n)
    return MLP(
        in_features=env.observation_space.shape[0],
        out_features=env.action_space.n,
        num_cells=[cfg.hidden, cfg.hidden],
        activation_class=nn.ReLU,
    )


def build_dqn(cfg: Config, env, device: torch.device):
    """TorchRL's DQNLoss with a delayed (target) copy of the Q-network; and the Q-network.

    Examples:
        >>> from agents.envs import make_env
        >>> loss_module, q_network = build_dqn(Config(), make_env("CartPole-v1", 0), torch.device("cpu"))
        >>> q_network(torch.zeros(1, 4)).shape
        torch.Size([1, 2])
    """
    q_network = make_q_network(cfg, env).to(device)
    actor = QValueActor(q_network, in_keys=["observation"], action_space="categorical")
    loss_module = DQNLoss(
        actor,
        loss_function="l2" if cfg.loss == "l2" else "smooth_l1",
        delay_value=True,
        action_space="categorical",
        double_dqn=cfg.double_dqn,
    )
    loss_module.make_value_estimator(gamma=cfg.gamma)
    return loss_module, q_network


def main(cfg: Config) -> dict:
    """Trains DQN as ``cfg`` says and returns ``{"final_eval", "wall_time"}`` (``agents/value_based.py``'s loop)."""
    device, env = start_run(cfg)
    loss_module, q_network = build_dqn(cfg, env, device)

    # ALGO LOGIC: the replay buffer: B rows per update, drawn through LaBER (m*B scored, B kept), PER or GER, or
    # uniformly (agents/replay.py builds the sampler --sampler names)
    rb, laber = make_replay(cfg, loss_module, env, device)

    # ALGO LOGIC: the update. The paper's estimator mean(w * l), with LaBER's or PER's weights (1 without).
    weighted_loss = LaBERLoss(loss_module)

    def objective(data):
        if laber is not None:  # a compiled update: LaBER keeps B of the m*B rows inside it
            data = laber(data)
        return weighted_loss(data)["loss"], data

    # The optimizer, the target network, the (compiled) update around the objective, and the loop: epsilon-greedy
    # acting, training phases, evaluations and checkpoints.
    return value_based.train(
        cfg, "dqn", env, device, loss_module=loss_module, objective=objective, q_values=q_network, rb=rb
    )


if __name__ == "__main__":
    main(cli(env_defaults, Config.env_id))
