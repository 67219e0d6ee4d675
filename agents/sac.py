"""SAC (Haarnoja et al., 2018) with a choice of replay sampler: uniform, PER, LaBER or a large batch.

One file, top to bottom: config, networks, loss, update, loop. TorchRL's ``SACLoss`` (twin critics,
automatic temperature) wrapped by :class:`torchsample.LaBERLoss`: with LaBER each critic is trained
on its own down-sampled rows, weighted, and the actor and temperature on uniform rows of the large
batch (Lahire et al., 2022, Sec. 3.4). ``agents/td3.py`` reuses this loop with TD3's networks.

    python -m agents.sac --env-id Pendulum-v1 --sampler laber-mean
    python -m agents.sac --env-id HalfCheetah-v5 --sampler laber-mean --total-steps 1000000
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
import tyro
from tensordict.nn import NormalParamExtractor, TensorDictModule
from torch import nn
from torchrl.data import Bounded
from torchrl.envs.utils import ExplorationType, set_exploration_type
from torchrl.modules import MLP, ProbabilisticActor, TanhNormal, ValueOperator
from torchrl.objectives import SACLoss, SoftUpdate
from tqdm import tqdm

from agents.common import (
    Checkpointer, Logger, RunOptions, StepTimer, anneal_per_beta, evaluate, make_buffer, make_env, resolve_device,
    seed_everything, to_tensordict,
)
from torchsample import LaBER, LaBERLoss, make_update


@dataclass
class Config(RunOptions):
    env_id: str = "Pendulum-v1"
    """gymnasium id with a Box action space: Pendulum-v1, HalfCheetah-v5, Hopper-v5, ..."""
    sampler: Literal["uniform", "per", "laber-mean", "laber-lazy", "laber-max", "large-batch"] = "laber-mean"
    """how training rows are drawn from the buffer (large-batch: uniform with m * batch-size rows)"""
    m: int = 4
    """LaBER's large batch is m * batch-size rows, scored and down-sampled to batch-size"""
    critics: Literal["independent", "joint"] = "independent"
    """LaBER with twin critics: one down-sample per critic (the paper's) or one from sqrt(sum p_c^2)"""
    batch_size: int = 256
    """rows per gradient step (the paper's Table 4)"""
    total_steps: Optional[int] = None
    """environment steps (None: 15k on Pendulum, 1M on MuJoCo)"""
    learning_starts: int = 1_000
    """random-action steps that fill the buffer before learning"""
    buffer_size: int = 1_000_000
    """replay capacity (transitions)"""
    lr: float = 1e-3
    """Adam learning rate of critics, actor and temperature (Table 4)"""
    adam_eps: float = 1e-5
    """Adam epsilon (Table 4)"""
    gamma: float = 0.99
    """discount factor"""
    tau: float = 0.005
    """Polyak factor of the target critics"""
    hidden: tuple[int, ...] = (256, 256)
    """hidden layers of actor and critics"""
    loss: Literal["l2", "huber"] = "l2"
    """critic loss; LaBER's surrogate follows it"""
    eval_every: int = 5_000
    """steps between deterministic evaluations"""
    eval_episodes: int = 5
    """episodes per evaluation"""
    out: Path = Path("runs/sac")
    """run folder: eval.csv, train.csv, config.txt, checkpoint/"""


def with_env_defaults(cfg):
    mujoco = not cfg.env_id.startswith("Pendulum")
    return replace(cfg, total_steps=cfg.total_steps or (1_000_000 if mujoco else 15_000))


def action_spec(env, device) -> Bounded:
    space = env.action_space
    return Bounded(torch.as_tensor(space.low), torch.as_tensor(space.high), space.shape, device=device)


def make_critic(cfg, env, device) -> ValueOperator:
    """Q(s, a): an MLP on the concatenated observation and action; TorchRL vmaps the twin copies."""
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


def main(cfg: Config, build=build_sac, name: str = "sac", actor_every: int = 1, exploration_noise: float = 0.0) -> dict:
    """Train; TD3 passes its own ``build``, a delayed actor (``actor_every``) and Gaussian exploration."""
    cfg = with_env_defaults(cfg)
    device = resolve_device(cfg.device)
    torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    env = make_env(cfg.env_id, cfg.seed)
    loss_module, actor = build(cfg, env, device)
    # Critics weighted (paper's estimator), each on its own rows with LaBER; actor on uniform rows.
    weighted_loss = LaBERLoss(loss_module)
    optimizer = torch.optim.Adam(loss_module.parameters(), lr=torch.tensor(cfg.lr, device=device), eps=cfg.adam_eps,
                                 capturable=device.type == "cuda")
    target_updater = SoftUpdate(loss_module, tau=cfg.tau)

    buffer = make_buffer(cfg.sampler, buffer_size=cfg.buffer_size, batch_size=cfg.batch_size, m=cfg.m, device=device)
    laber = (LaBER(loss_module, batch_size=cfg.batch_size, weighting=cfg.sampler.split("-")[1], critics=cfg.critics)
             if cfg.sampler.startswith("laber") else None)

    def objective(data, with_actor: bool):
        if laber is not None:
            data = laber(data)
        losses = weighted_loss(data)
        total = losses["loss_qvalue"]
        if with_actor:  # left out, the actor's parameters get no gradient and Adam skips them
            total = total + losses["loss_actor"] + losses.get("loss_alpha", torch.zeros((), device=device))
        return total, data

    # SAC moves its target critics every step; TD3 with its actor, every policy_delay steps (Fujimoto et al., Alg. 1).
    update = make_update(objective, optimizer, target_updater if actor_every == 1 else None, compile=cfg.compile)
    if cfg.cudagraphs:
        from tensordict.nn import CudaGraphModule

        update = CudaGraphModule(update, warmup=5)

    low, high = env.action_space.low, env.action_space.high

    @torch.no_grad()
    def policy(obs: np.ndarray, explore: bool = False) -> np.ndarray:
        mode = ExplorationType.RANDOM if explore and exploration_noise == 0 else ExplorationType.DETERMINISTIC
        with set_exploration_type(mode):
            action = actor(observation=torch.as_tensor(obs, dtype=torch.float32, device=device))
        action = (action[0] if isinstance(action, tuple) else action).cpu().numpy()
        if explore and exploration_noise > 0:
            action = action + np.random.normal(0.0, exploration_noise * high, size=action.shape)
        return np.clip(action, low, high).astype(np.float32)

    logger = Logger(cfg.out, cfg)
    checkpoints = Checkpointer(cfg, cfg.out, {"loss": loss_module, "optimizer": optimizer, "target_updater": target_updater},
                               buffer, cfg.total_steps)
    start_step, env, loop = checkpoints.resume(env, cfg.seed)
    obs, episode_return, episode_returns = loop["obs"], loop["episode_return"], loop["episode_returns"]

    timer, t_start, last_eval = StepTimer(burn_in=cfg.learning_starts + 200), time.time(), float("nan")
    bar = tqdm(range(start_step, cfg.total_steps), initial=start_step, total=cfg.total_steps, disable=not cfg.progress,
               mininterval=1.0, desc=f"{name} {cfg.sampler} {cfg.env_id}")
    for step in bar:
        action = env.action_space.sample() if step < cfg.learning_starts else policy(obs, explore=True)
        next_obs, reward, terminated, truncated, _ = env.step(action)
        buffer.add(to_tensordict(obs.astype(np.float32), np.asarray(action, dtype=np.float32), reward,
                                 next_obs.astype(np.float32), terminated, truncated, device))
        episode_return += float(reward)
        obs = next_obs
        if terminated or truncated:
            episode_returns.append(episode_return)
            logger.log("train", step + 1, episode_return=episode_return)
            obs, episode_return = env.reset()[0], 0.0

        if step >= cfg.learning_starts:
            anneal_per_beta(buffer, step / cfg.total_steps)
            with_actor = step % actor_every == 0
            _, data = update(buffer.sample(), with_actor)
            if with_actor and actor_every > 1:
                target_updater.step()
            if cfg.sampler == "per":
                buffer.update_priority(data["index"], data["td_error"])  # |TD| of the most wrong critic

        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.total_steps:
            last_eval = evaluate(cfg.env_id, policy, cfg.eval_episodes, seed=10_000 + cfg.seed)
            logger.log("eval", step + 1, eval_return=last_eval, wall_time=time.time() - t_start, steps_per_s=timer.rate(step))
        if checkpoints.after_step(step + 1, env, obs=obs, episode_return=episode_return, episode_returns=episode_returns):
            return {"final_eval": last_eval, "wall_time": time.time() - t_start, "stopped_at": step + 1}
        if step % 500 == 0 or step + 1 == cfg.total_steps:  # the final bar shows the final figures
            recent = np.mean(episode_returns[-5:]) if episode_returns else float("nan")
            bar.set_postfix(ret=f"{recent:.1f}", eval=f"{last_eval:.1f}", sps=f"{timer.rate(step):.0f}")
        timer.rate(step)
    env.close()
    return {"final_eval": last_eval, "wall_time": time.time() - t_start}


if __name__ == "__main__":
    main(tyro.cli(Config))
