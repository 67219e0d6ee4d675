"""SAC (Haarnoja et al., 2018) with a choice of replay sampler: uniform, PER, GER, LaBER, LFIW or a large batch.

Top to bottom: config, actor, loss, then ``main``: the replay buffer and its sampler, the update, and the
loop; the critic network, the replay (LFIW's buffers too) and the loop SAC and TD3 share are
``agents/actor_critic.py``'s (``agents/dqn.py``'s docstring says why). The buffer samples through
``torchsample.LaBERSampler`` (``m * B`` rows scored by each critic, ``B`` kept per critic), PER or GER;
LFIW's two buffers and its ratio network's step are in the loop (``torchsample.lfiw``).
TorchRL's ``SACLoss`` (twin
critics, automatic temperature) wrapped by :class:`torchsample.LaBERLoss`: with LaBER each critic is
trained on its own down-sampled rows, weighted, and the actor and temperature on uniform rows of the
large batch (Lahire et al., 2022, Sec. 3.4). Where each default comes from: ``docs/agents.md``.

    python -m agents.sac --env-id Pendulum-v1 --sampler laber-mean
    python -m agents.sac --env-id HalfCheetah-v5 --sampler laber-mean   # 1M steps
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tensordict import TensorDict
from tensordict.nn import NormalParamExtractor, TensorDictModule
from torch import nn
from torchrl.envs.utils import ExplorationType, set_exploration_type
from torchrl.modules import MLP, ProbabilisticActor, TanhNormal
from torchrl.objectives import SACLoss, SoftUpdate

from agents import actor_critic
from agents.actor_critic import action_spec, make_critic, make_replay
from agents.config import cli
from agents.envs import start_run
from torchsample import LaBERLoss, make_update


@dataclass
class Config(actor_critic.ActorCriticConfig):
    """SAC. The defaults shown are those of --env-id's family: Pendulum-v1, or MuJoCo for any other id
    (python -m agents.sac --env-id HalfCheetah-v5 --help)."""

    # SAC's options are the shared ones (agents/actor_critic.py's ActorCriticConfig): batch 256, FC 256-256.
    out: Path = Path("runs/sac")
    """run folder: eval.csv, train.csv, config.txt, checkpoint/"""


def env_defaults(env_id: str) -> Config:
    """The defaults for ``env_id``: Pendulum's (``Config()``'s) for ``Pendulum*``, else MuJoCo's.

    Examples:
        >>> env_defaults("Pendulum-v1").total_steps, env_defaults("HalfCheetah-v5").total_steps
        (15000, 1000000)
    """
    return Config(env_id=env_id, **({} if env_id.startswith("Pendulum") else actor_critic.MUJOCO))


# ALGO LOGIC: the stochastic actor and TorchRL's SAC loss
def build_sac(cfg: Config, env, device: torch.device):
    """TanhNormal actor, twin critics, SACLoss with a learned temperature (target entropy -dim(A)).

    Examples:
        >>> from agents.envs import make_env
        >>> loss_module, actor = build_sac(Config(hidden=(8,)), make_env("Pendulum-v1", 0), torch.device("cpu"))
        >>> actor(TensorDict({"observation": torch.zeros(3)}))["action"].shape
        torch.Size([1])
    """
    spec = action_spec(env, device)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    net = nn.Sequential(
        MLP(in_features=obs_dim, out_features=2 * act_dim, num_cells=list(cfg.hidden), activation_class=nn.ReLU),
        NormalParamExtractor(),
    )
    actor = ProbabilisticActor(
        TensorDictModule(net, in_keys=["observation"], out_keys=["loc", "scale"]),
        in_keys=["loc", "scale"],
        spec=spec,
        distribution_class=TanhNormal,
        distribution_kwargs={"low": spec.space.low, "high": spec.space.high},
        return_log_prob=True,
    ).to(device)
    loss_module = SACLoss(
        actor,
        make_critic(cfg, env, device),
        num_qvalue_nets=2,
        action_spec=spec,
        loss_function="l2" if cfg.loss == "l2" else "smooth_l1",
    )
    loss_module.make_value_estimator(gamma=cfg.gamma)
    return loss_module, actor


def main(cfg: Config) -> dict:
    """Trains SAC as ``cfg`` says and returns ``{"final_eval", "wall_time"}`` (``agents/actor_critic.py``'s loop)."""
    device, env = start_run(cfg)
    loss_module, actor = build_sac(cfg, env, device)

    # ALGO LOGIC: the replay buffer: B rows per critic per update, drawn through LaBER (m*B scored by each critic,
    # B kept), PER or GER, or uniformly; with LFIW from its slow buffer, weighted (Sinha et al., Alg. 1).
    replay_parts = make_replay(cfg, loss_module, env, device)  # (rb, laber, lfiw, fast_slow)
    laber = replay_parts[1]  # a compiled update's LaBER (None: LaBER, if asked, runs in rb.sample())

    # ALGO LOGIC: the update. Critics weighted (the paper's estimator), each on its own rows with LaBER; actor
    # and temperature on uniform rows.
    weighted_loss = LaBERLoss(loss_module)

    def objective(data):
        if laber is not None:  # a compiled update: LaBER keeps B rows per critic of the m*B inside it
            data = laber(data)
        losses = weighted_loss(data)
        return losses["loss_qvalue"] + losses["loss_actor"] + losses["loss_alpha"], data

    optimizer = actor_critic.make_optimizer(cfg, loss_module, device)
    target_updater = SoftUpdate(loss_module, tau=cfg.tau)
    # zero_grad, objective, backward, step, target critics; two fullgraph graphs with --compile.
    update = make_update(objective, optimizer, target_updater, compile=cfg.compile)
    if cfg.cudagraphs:
        from tensordict.nn import CudaGraphModule

        update = CudaGraphModule(update, warmup=5)

    def learn(data, step: int):
        return update(data)[1]

    low, high = env.action_space.low, env.action_space.high

    @torch.no_grad()
    def policy(obs: np.ndarray, explore: bool = False) -> np.ndarray:
        """A sample of the policy when exploring, its mode when evaluating."""
        with set_exploration_type(ExplorationType.RANDOM if explore else ExplorationType.DETERMINISTIC):
            action = actor(TensorDict({"observation": torch.as_tensor(obs, dtype=torch.float32, device=device)}))[
                "action"
            ]
        return np.clip(action.cpu().numpy(), low, high).astype(np.float32)

    # One update per step after learning-starts, evaluations and checkpoints (of these modules' state).
    state = {"loss": loss_module, "optimizer": optimizer, "target_updater": target_updater}
    return actor_critic.train(cfg, "sac", env, device, policy, learn, replay_parts, state)


if __name__ == "__main__":
    main(cli(env_defaults, Config.env_id))
