"""TD3 (Fujimoto et al., 2018) with a choice of replay sampler: uniform, PER, GER, LaBER, LFIW or a large batch.

Top to bottom: config, actor, loss, then ``main``: the replay buffer and its sampler, the update, and the
loop; the critic network, the replay (LFIW's buffers too) and the loop SAC and TD3 share are
``agents/actor_critic.py``'s (``agents/dqn.py``'s docstring says why). The buffer samples through
``torchsample.LaBERSampler`` (``m * B`` rows scored by each critic, ``B`` kept per critic), PER or GER;
LFIW's two buffers and its ratio network's step are in the loop (``torchsample.lfiw``).
A deterministic tanh actor
explores with Gaussian noise; TorchRL's ``TD3Loss`` trains twin critics on a target smoothed with
clipped noise, wrapped by :class:`torchsample.LaBERLoss`: with LaBER each critic is trained on its
own down-sampled rows, weighted, and the actor on uniform rows of the large batch (Lahire et al.,
2022, Sec. 3.4). The actor and the target networks move every ``policy_delay`` critic updates.
Where each default comes from: ``docs/agents.md``.

    python -m agents.td3 --env-id Pendulum-v1 --sampler laber-mean
    python -m agents.td3 --env-id HalfCheetah-v5 --sampler laber-mean   # 1M steps
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModule, TensorDictSequential
from torch import nn
from torchrl.modules import MLP, TanhModule
from torchrl.objectives import SoftUpdate, TD3Loss

from agents import actor_critic
from agents.actor_critic import action_spec, make_critic, make_replay
from agents.config import cli
from agents.envs import start_run
from torchsample import LaBERLoss, make_update


@dataclass
class Config(actor_critic.ActorCriticConfig):
    """TD3. The defaults shown are those of --env-id's family: Pendulum-v1, or MuJoCo for any other id
    (python -m agents.td3 --env-id HalfCheetah-v5 --help)."""

    # ALGO LOGIC: TD3's own options and values (the rest: agents/actor_critic.py's ActorCriticConfig)
    batch_size: int = 100
    """rows per gradient step"""
    hidden: tuple[int, ...] = (400, 300)
    """hidden layers of actor and critics"""
    policy_noise: float = 0.2
    """std of the target-policy smoothing noise, in units of the action bound"""
    noise_clip: float = 0.5
    """clip of the target-policy smoothing noise, in units of the action bound"""
    exploration_noise: float = 0.1
    """std of the Gaussian exploration noise, in units of the action bound"""
    policy_delay: int = 2
    """critic updates per actor and target-network update"""
    out: Path = Path("runs/td3")
    """run folder: eval.csv, train.csv, config.txt, checkpoint/"""


def env_defaults(env_id: str) -> Config:
    """The defaults for ``env_id``: Pendulum's (``Config()``'s) for ``Pendulum*``, else MuJoCo's.

    Examples:
        >>> env_defaults("Pendulum-v1").total_steps, env_defaults("Hopper-v5").total_steps
        (15000, 1000000)
    """
    return Config(env_id=env_id, **({} if env_id.startswith("Pendulum") else actor_critic.MUJOCO))


# ALGO LOGIC: the deterministic actor and TorchRL's TD3 loss
def build_td3(cfg: Config, env, device: torch.device):
    """Deterministic tanh actor scaled to the action bounds, twin critics, TD3Loss.

    Examples:
        >>> from agents.envs import make_env
        >>> loss_module, actor = build_td3(Config(hidden=(8,)), make_env("Pendulum-v1", 0), torch.device("cpu"))
        >>> actor(TensorDict({"observation": torch.zeros(3)}))["action"].shape
        torch.Size([1])
    """
    spec = action_spec(env, device)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    net = TensorDictModule(
        MLP(in_features=obs_dim, out_features=act_dim, num_cells=list(cfg.hidden), activation_class=nn.ReLU),
        in_keys=["observation"],
        out_keys=["param"],
    )
    actor = TensorDictSequential(net, TanhModule(in_keys=["param"], out_keys=["action"], spec=spec)).to(device)
    bound = float(spec.space.high.max())
    loss_module = TD3Loss(
        actor,
        make_critic(cfg, env, device),
        action_spec=spec,
        num_qvalue_nets=2,
        policy_noise=cfg.policy_noise * bound,
        noise_clip=cfg.noise_clip * bound,
        loss_function="l2" if cfg.loss == "l2" else "smooth_l1",
    )
    loss_module.make_value_estimator(gamma=cfg.gamma)
    return loss_module, actor


def main(cfg: Config) -> dict:
    """Trains TD3 as ``cfg`` says and returns ``{"final_eval", "wall_time"}`` (``agents/actor_critic.py``'s loop)."""
    device, env = start_run(cfg)
    loss_module, actor = build_td3(cfg, env, device)

    # ALGO LOGIC: the replay buffer: B rows per critic per update, drawn through LaBER (m*B scored by each critic,
    # B kept), PER or GER, or uniformly; with LFIW from its slow buffer, weighted (Sinha et al., Alg. 1).
    replay_parts = make_replay(cfg, loss_module, env, device)  # (rb, laber, lfiw, fast_slow)
    laber = replay_parts[1]  # a compiled update's LaBER (None: LaBER, if asked, runs in rb.sample())

    # ALGO LOGIC: the update. Critics weighted (the paper's estimator), each on its own rows with LaBER; the
    # actor on uniform rows, every policy_delay critic updates.
    weighted_loss = LaBERLoss(loss_module)

    def objective(data, with_actor: bool):
        if laber is not None:  # a compiled update: LaBER keeps B rows per critic of the m*B inside it
            data = laber(data)
        total, _ = weighted_loss.value_loss(data)
        if with_actor:  # left out, the actor's parameters get no gradient and Adam skips them
            total = total + weighted_loss.actor_loss(data)[0]
        return total, data

    optimizer = actor_critic.make_optimizer(cfg, loss_module, device)
    target_updater = SoftUpdate(loss_module, tau=cfg.tau)
    # zero_grad, objective, backward, step; two fullgraph graphs with --compile. The target networks
    # move with the actor, every policy_delay steps (Fujimoto et al., Alg. 1), outside the update.
    update = make_update(objective, optimizer, compile=cfg.compile)
    if cfg.cudagraphs:
        from tensordict.nn import CudaGraphModule

        update = CudaGraphModule(update, warmup=5)

    def learn(data, step: int):
        with_actor = step % cfg.policy_delay == 0
        _, data = update(data, with_actor)
        if with_actor:
            target_updater.step()
        return data

    low, high = env.action_space.low, env.action_space.high

    @torch.no_grad()
    def policy(obs: np.ndarray, explore: bool = False) -> np.ndarray:
        """The actor's action, plus Gaussian noise when exploring."""
        action = actor(TensorDict({"observation": torch.as_tensor(obs, dtype=torch.float32, device=device)}))["action"]
        action = action.cpu().numpy()
        if explore and cfg.exploration_noise > 0:
            action = action + np.random.normal(0.0, cfg.exploration_noise * high, size=action.shape)
        return np.clip(action, low, high).astype(np.float32)

    # One update per step after learning-starts, evaluations and checkpoints (of these modules' state).
    state = {"loss": loss_module, "optimizer": optimizer, "target_updater": target_updater}
    return actor_critic.train(cfg, "td3", env, device, policy, learn, replay_parts, state)


if __name__ == "__main__":
    main(cli(env_defaults, Config.env_id))
