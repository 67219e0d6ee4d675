"""C51 (Bellemare et al., 2017) with a choice of replay sampler: uniform, PER, GER, LaBER or a large batch.

One file, top to bottom: config, network, loss, replay buffer, update, loop. The buffer samples through
``torchsample.LaBERSampler`` (``m * B`` rows scored, ``B`` kept), PER or GER, as in ``agents/dqn.py``.
The Q-network outputs ``atoms`` logits per action, a distribution over returns on a fixed support; the loss is
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
from torchrl.data import LazyTensorStorage, PrioritizedSampler, RandomSampler, TensorDictReplayBuffer
from torchrl.modules import MLP, DistributionalQValueActor
from torchrl.objectives import HardUpdate, SoftUpdate

from agents.atari import FrameStackReplay, is_atari
from agents.common import (
    PER_ALPHA,
    PER_BETA,
    VALUE_SAMPLERS,
    RunOptions,
    TrainingLoop,
    add_n_step,
    cli,
    diagnostics,
    make_env,
    resolve_device,
    sampler_choice,
    seed_everything,
    to_tensordict,
)
from agents.networks import MinAtarNetwork, NatureCNN
from torchsample import (
    C51Loss,
    GERLaBERSampler,
    GERSampler,
    LaBER,
    LaBERLoss,
    LaBERSampler,
    PrioritizedLaBERSampler,
    make_update,
)
from torchsample.sampler import LaBERDraw


@dataclass
class Config(RunOptions):
    """C51. The defaults shown are those of --env-id's family: classic control (CartPole-v1, Acrobot-v1),
    MinAtar (python -m agents.c51 --env-id MinAtar/Breakout-v1 --help) or Atari (--env-id ALE/Pong-v5)."""

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
    """epsilon of the optimizer's denominator (MinAtar's RMSProp 0.01, Dopamine's Adam 0.0003125)"""
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
    v_min=-10.0,
    v_max=10.0,
    optimizer_eps=0.01,
)
# Dopamine's C51 (c51.gin): DQN's schedule with Adam. Dopamine counts the target period in agent
# steps (8 000), this loop in gradient steps: 8 000 / 4 = 2 000.
ATARI = dict(
    batch_size=32,
    total_steps=50_000_000,
    learning_starts=20_000,
    train_freq=4,
    gradient_steps=1,
    buffer_size=1_000_000,
    optimizer="adam",
    lr=2.5e-4,
    optimizer_eps=0.0003125,
    lr_schedule="constant",
    gamma=0.99,
    target_tau=0.0,
    target_update=2_000,
    end_epsilon=0.01,
    exploration_steps=250_000,
    max_grad_norm=0.0,
    v_min=-10.0,
    v_max=10.0,
    clip_rewards=True,
    eval_every=250_000,
    eval_epsilon=0.001,
)


def env_defaults(env_id: str) -> Config:
    """The defaults for ``env_id``: MinAtar's for ``MinAtar/*``, Atari's for ``ALE/*``, else classic
    control's (``Config()``'s)."""
    family = MINATAR if env_id.startswith("MinAtar/") else ATARI if is_atari(env_id) else {}
    return Config(env_id=env_id, **family)


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
    the expected Q-values ``sum_k softmax(z)_k * support_k``."""
    support = torch.linspace(cfg.v_min, cfg.v_max, cfg.atoms, device=device)
    network = make_network(cfg, env).to(device)
    actor = DistributionalQValueActor(network, in_keys=["observation"], support=support, action_space="categorical")
    loss_module = C51Loss(actor, gamma=cfg.gamma, delay_value=True)

    def q_values(obs: torch.Tensor) -> torch.Tensor:
        return (torch.softmax(network(obs), dim=-2) * support.unsqueeze(-1)).sum(-2)

    return loss_module, q_values


def make_replay(cfg: Config, loss_module: C51Loss, env, device: torch.device):
    """The replay buffer of ``--sampler`` and, with ``--compile`` or ``--cudagraphs``, the LaBER module the
    update calls.

    TorchRL's samplers draw the rows: uniformly, PER's ``PrioritizedSampler`` or GER's
    ``torchsample.GERSampler`` (PER with the rows' exact gradient norms). LaBER keeps ``B`` of ``m * B``
    drawn rows: through ``torchsample.LaBERSampler``, inside ``rb.sample()``; with a compiled update, the
    buffer draws ``m * B`` rows and the update calls LaBER on them, so that its scoring and draw are part
    of the compiled (and captured) step (docs/gpu.md). On Atari the buffer stores 2 of a transition's 8
    frames and re-stacks them when drawn (``agents/atari.py``), before LaBER scores the rows.
    """
    choice = sampler_choice(cfg.sampler)
    if choice.draw == "per":
        sampler = PrioritizedSampler(cfg.buffer_size, alpha=PER_ALPHA, beta=PER_BETA)
    elif choice.draw == "ger":
        sampler = GERSampler(loss_module, cfg.buffer_size, alpha=PER_ALPHA, beta=PER_BETA)
    else:
        sampler = RandomSampler()
    laber, rows = None, cfg.m * cfg.batch_size if choice.large_batch else cfg.batch_size
    if choice.weighting is not None:
        laber = LaBER(loss_module, batch_size=cfg.batch_size, weighting=choice.weighting, surrogate=cfg.surrogate)
        if cfg.compile or cfg.cudagraphs:
            rows = cfg.m * cfg.batch_size
        else:
            # PER-LaBER and GER-LaBER are PER samplers themselves (TorchRL hands them priorities); LaBER over a
            # uniform draw wraps TorchRL's RandomSampler.
            if choice.draw == "per":
                sampler = PrioritizedLaBERSampler(laber, cfg.buffer_size, PER_ALPHA, PER_BETA, m=cfg.m)
            elif choice.draw == "ger":
                sampler = GERLaBERSampler(laber, cfg.buffer_size, PER_ALPHA, PER_BETA, m=cfg.m)
            else:
                sampler = LaBERSampler(laber, m=cfg.m)
            laber = None
    rb = TensorDictReplayBuffer(
        storage=LazyTensorStorage(cfg.buffer_size, device=device), sampler=sampler, batch_size=rows
    )
    if is_atari(cfg.env_id):
        rb.append_transform(FrameStackReplay(rb.storage, env.observation_space.shape))
        if isinstance(sampler, LaBERDraw):
            sampler.transform = rb.transform
    add_n_step(rb, cfg.n_step, cfg.gamma)  # --n-step: TorchRL's MultiStepTransform (not with Atari's frames)
    return rb, laber


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
    target_updater = (
        SoftUpdate(loss_module, tau=cfg.target_tau)
        if cfg.target_tau > 0
        else HardUpdate(loss_module, value_network_update_interval=cfg.target_update)
    )
    # A tensor learning rate can change without recompiling a compiled update.
    lr = torch.tensor(cfg.lr, device=device)
    if cfg.optimizer == "rmsprop":
        optimizer = torch.optim.RMSprop(
            loss_module.parameters(), lr=lr, alpha=0.95, centered=True, eps=cfg.optimizer_eps
        )
    else:
        optimizer = torch.optim.Adam(
            loss_module.parameters(), lr=lr, eps=cfg.optimizer_eps, capturable=device.type == "cuda"
        )

    # The replay buffer: B rows per update, drawn through LaBER (m*B scored by ||softmax(z) - m||, B kept),
    # PER or GER, or uniformly.
    rb, laber = make_replay(cfg, loss_module, env, device)

    def objective(data):
        if laber is not None:  # a compiled update: LaBER keeps B of the m*B rows inside it
            data = laber(data)
        return weighted_loss(data)["loss"], data

    # zero_grad, objective, backward, clip, step, target update; two fullgraph graphs with --compile.
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
        "c51",
        env,
        rb,
        {"loss": loss_module, "optimizer": optimizer, "target_updater": target_updater},
        evaluation_policy,
        burn_in=cfg.learning_starts + 500,
        bar_every=1000,
        recent=10,
        diagnose=lambda: (
            diagnostics(loss_module, rb, cfg.diagnostics_rows or cfg.m * cfg.batch_size, cfg.batch_size)
            if optimizer.state
            else {}
        ),
    )  # from the 1st update
    env, obs = loop.env, loop.obs
    for step in loop.steps():
        epsilon = linear_epsilon(cfg, step)
        if step < cfg.learning_starts or np.random.random() < epsilon:
            action = env.action_space.sample()
        else:
            action = greedy(obs)
        next_obs, reward, terminated, truncated, _ = env.step(action)
        stored_reward = float(np.clip(reward, -1.0, 1.0)) if cfg.clip_rewards else reward
        rb.add(to_tensordict(obs, action, stored_reward, next_obs, terminated, truncated, device))
        obs = loop.record(step, next_obs, reward, terminated or truncated, epsilon=epsilon)

        if step >= cfg.learning_starts and (step + 1) % cfg.train_freq == 0:
            if cfg.lr_schedule == "linear":
                optimizer.param_groups[0]["lr"].fill_(cfg.lr * (1.0 - step / cfg.total_steps))
            prioritized = isinstance(rb.sampler, PrioritizedSampler)  # PER, GER (and with LaBER over them)
            if prioritized:  # PER's importance exponent, annealed to 1 (Schaul et al.)
                rb.sampler.beta = PER_BETA + (1.0 - PER_BETA) * step / cfg.total_steps
            for _ in range(cfg.gradient_steps):
                _, data = update(rb.sample())
                if prioritized:  # the rows' new priorities: the cross-entropy (the loss wrote it), GER's exact norms
                    rb.sampler.update_from(data) if cfg.sampler.startswith("ger") else rb.update_priority(
                        data["index"], data["td_error"]
                    )

        if loop.end_step(step, obs):
            break
    return loop.close()


if __name__ == "__main__":
    main(cli(env_defaults, Config.env_id))
