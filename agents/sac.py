"""SAC (Haarnoja et al., 2018) with a choice of replay sampler: uniform, PER, LaBER, LFIW or a large batch.

One file, top to bottom: config, networks, loss, sampler, update, loop. TorchRL's ``SACLoss`` (twin
critics, automatic temperature) wrapped by :class:`torchsample.LaBERLoss`: with LaBER each critic is
trained on its own down-sampled rows, weighted, and the actor and temperature on uniform rows of the
large batch (Lahire et al., 2022, Sec. 3.4). Where each default comes from: ``docs/agents.md``.

    python -m agents.sac --env-id Pendulum-v1 --sampler laber-mean
    python -m agents.sac --env-id HalfCheetah-v5 --sampler laber-mean   # 1M steps
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tensordict import TensorDict
from tensordict.nn import NormalParamExtractor, TensorDictModule
from torch import nn
from torchrl.data import Bounded
from torchrl.envs.utils import ExplorationType, set_exploration_type
from torchrl.modules import MLP, ProbabilisticActor, TanhNormal, ValueOperator
from torchrl.objectives import SACLoss, SoftUpdate

from agents.common import (
    Replay, RunOptions, SamplerName, TrainingLoop, cli, make_env, resolve_device, seed_everything, to_tensordict,
)
from torchsample import LaBERLoss, make_update


@dataclass
class Config(RunOptions):
    """SAC. The defaults shown are those of --env-id's family: Pendulum-v1, or MuJoCo for any other id
    (python -m agents.sac --env-id HalfCheetah-v5 --help)."""

    env_id: str = "Pendulum-v1"
    """gymnasium id with a Box action space: Pendulum-v1, HalfCheetah-v5, Hopper-v5, ..."""
    sampler: SamplerName = "laber-mean"
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
    """Adam learning rate of critics, actor and temperature"""
    adam_eps: float = 1e-5
    """Adam epsilon"""
    gamma: float = 0.99
    """discount factor"""
    tau: float = 0.005
    """Polyak factor of the target critics, after every gradient step"""
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
    out: Path = Path("runs/sac")
    """run folder: eval.csv, train.csv, config.txt, checkpoint/"""


# MuJoCo bodies (HalfCheetah, Hopper, ...): the paper's Table 4 (Config's defaults are Pendulum's).
MUJOCO = dict(total_steps=1_000_000)


def env_defaults(env_id: str) -> Config:
    """The defaults for ``env_id``: Pendulum's (``Config()``'s) for ``Pendulum*``, else MuJoCo's."""
    return Config(env_id=env_id, **({} if env_id.startswith("Pendulum") else MUJOCO))


def action_spec(env, device) -> Bounded:
    space = env.action_space
    return Bounded(torch.as_tensor(space.low), torch.as_tensor(space.high), space.shape, device=device)


def make_critic(cfg: Config, env, device) -> ValueOperator:
    """Q(s, a): an MLP on the concatenated observation and action; SACLoss vmaps the twin copies."""
    in_features = env.observation_space.shape[0] + env.action_space.shape[0]
    return ValueOperator(MLP(in_features=in_features, out_features=1, num_cells=list(cfg.hidden), activation_class=nn.ReLU),
                         in_keys=["observation", "action"]).to(device)


def build_sac(cfg: Config, env, device: torch.device):
    """TanhNormal actor, twin critics, SACLoss with a learned temperature (target entropy -dim(A))."""
    spec = action_spec(env, device)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    net = nn.Sequential(MLP(in_features=obs_dim, out_features=2 * act_dim, num_cells=list(cfg.hidden), activation_class=nn.ReLU),
                        NormalParamExtractor())
    actor = ProbabilisticActor(TensorDictModule(net, in_keys=["observation"], out_keys=["loc", "scale"]),
                               in_keys=["loc", "scale"], spec=spec, distribution_class=TanhNormal,
                               distribution_kwargs={"low": spec.space.low, "high": spec.space.high},
                               return_log_prob=True).to(device)
    loss_module = SACLoss(actor, make_critic(cfg, env, device), num_qvalue_nets=2, action_spec=spec,
                          loss_function="l2" if cfg.loss == "l2" else "smooth_l1")
    loss_module.make_value_estimator(gamma=cfg.gamma)
    return loss_module, actor


def main(cfg: Config) -> dict:
    device = resolve_device(cfg.device)
    torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    env = make_env(cfg.env_id, cfg.seed)
    loss_module, actor = build_sac(cfg, env, device)
    # Critics weighted (the paper's estimator), each on its own rows with LaBER; actor on uniform rows.
    weighted_loss = LaBERLoss(loss_module)
    optimizer = torch.optim.Adam(loss_module.parameters(), lr=torch.tensor(cfg.lr, device=device), eps=cfg.adam_eps,
                                 capturable=device.type == "cuda")
    target_updater = SoftUpdate(loss_module, tau=cfg.tau)

    # The sampler: the buffer draws B rows (uniform, per, lfiw) or m*B rows (large-batch, *laber-*); LFIW
    # draws from its slow buffer and weighs the rows for the critics (Sinha et al., Alg. 1).
    replay = Replay(cfg.sampler, loss_module, buffer_size=cfg.buffer_size, batch_size=cfg.batch_size, m=cfg.m,
                    surrogate=cfg.surrogate, device=device, critics=cfg.critics, lfiw_fast_size=cfg.lfiw_fast_size,
                    lfiw_temperature=cfg.lfiw_temperature, lfiw_f=cfg.lfiw_f, diagnostics_rows=cfg.diagnostics_rows,
                    ratio_features=env.observation_space.shape[0] + env.action_space.shape[0])  # w_psi(s, a)

    def objective(data):
        data = replay.downsample(data)  # LaBER: B rows per critic, scored by that critic's surrogate
        losses = weighted_loss(data)
        return losses["loss_qvalue"] + losses["loss_actor"] + losses["loss_alpha"], data

    # zero_grad, objective, backward, step, target critics; two fullgraph graphs with --compile.
    update = make_update(objective, optimizer, target_updater, compile=cfg.compile)
    if cfg.cudagraphs:
        from tensordict.nn import CudaGraphModule

        update = CudaGraphModule(update, warmup=5)

    low, high = env.action_space.low, env.action_space.high

    @torch.no_grad()
    def policy(obs: np.ndarray, explore: bool = False) -> np.ndarray:
        """A sample of the policy when exploring, its mode when evaluating."""
        with set_exploration_type(ExplorationType.RANDOM if explore else ExplorationType.DETERMINISTIC):
            action = actor(TensorDict({"observation": torch.as_tensor(obs, dtype=torch.float32, device=device)}))["action"]
        return np.clip(action.cpu().numpy(), low, high).astype(np.float32)

    # Episode returns, evaluations, checkpoints (--resume, --stop-after), the progress bar.
    loop = TrainingLoop(cfg, "sac", env, replay.buffer,
                        {"loss": loss_module, "optimizer": optimizer, "target_updater": target_updater,
                         **replay.checkpoint_modules()}, policy,
                        burn_in=cfg.learning_starts + 200, bar_every=500, recent=5,
                        diagnose=replay.diagnostics)
    env, obs = loop.env, loop.obs
    for step in loop.steps():
        action = env.action_space.sample() if step < cfg.learning_starts else policy(obs, explore=True)
        next_obs, reward, terminated, truncated, _ = env.step(action)
        replay.add(to_tensordict(obs.astype(np.float32), np.asarray(action, dtype=np.float32), reward,
                                 next_obs.astype(np.float32), terminated, truncated, device))
        obs = loop.record(step, next_obs, reward, terminated or truncated)

        if step >= cfg.learning_starts:
            _, data = update(replay.sample(progress=step / cfg.total_steps))
            replay.after_update(data)  # PER: the larger of the critics' |TD|; GER: the exact gradient norms
            if (step + 1) % cfg.lfiw_log_every == 0 and (ratio := replay.lfiw_stats()):  # {} before the threshold
                loop.logger.log("lfiw", step + 1, **ratio)

        if loop.end_step(step, obs):
            break
    return loop.close()


if __name__ == "__main__":
    main(cli(env_defaults, Config.env_id))
