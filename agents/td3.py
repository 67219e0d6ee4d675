"""TD3 (Fujimoto et al., 2018) with a choice of replay sampler: uniform, PER, GER, LaBER, LFIW or a large batch.

One file, top to bottom: config, networks, loss, replay buffer, update, loop. The buffer samples through
``torchsample.LaBERSampler`` (``m * B`` rows scored by each critic, ``B`` kept per critic), PER or GER;
LFIW's two buffers and its ratio network's step are in the loop (``torchsample.lfiw``). A deterministic tanh actor
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
from typing import Literal

import numpy as np
import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModule, TensorDictSequential
from torch import nn
from torchrl.data import Bounded, LazyTensorStorage, PrioritizedSampler, RandomSampler, TensorDictReplayBuffer
from torchrl.modules import MLP, TanhModule, ValueOperator
from torchrl.objectives import SoftUpdate, TD3Loss

from agents.common import (
    ACTOR_CRITIC_SAMPLERS,
    PER_ALPHA,
    PER_BETA,
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
from torchsample import (
    GERLaBERSampler,
    GERSampler,
    LaBER,
    LaBERLoss,
    LaBERSampler,
    PrioritizedLaBERSampler,
    make_update,
)
from torchsample.lfiw import LFIW, FastSlowReplay, RatioNetwork
from torchsample.sampler import LaBERDraw


@dataclass
class Config(RunOptions):
    """TD3. The defaults shown are those of --env-id's family: Pendulum-v1, or MuJoCo for any other id
    (python -m agents.td3 --env-id HalfCheetah-v5 --help)."""

    env_id: str = "Pendulum-v1"
    """gymnasium id with a Box action space: Pendulum-v1, HalfCheetah-v5, Hopper-v5, ..."""
    sampler: Literal[ACTOR_CRITIC_SAMPLERS] = "laber-mean"  # type: ignore[valid-type]
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
    batch_size: int = 100
    """rows per gradient step"""
    total_steps: int = 15_000
    """environment steps"""
    learning_starts: int = 1_000
    """random-action steps that fill the buffer before learning"""
    buffer_size: int = 1_000_000
    """replay capacity (transitions)"""
    lr: float = 1e-3
    """Adam learning rate of critics and actor"""
    adam_eps: float = 1e-5
    """Adam epsilon"""
    gamma: float = 0.99
    """discount factor"""
    n_step: int = 1
    """n-step returns: the buffer stores k-step transitions (TorchRL's MultiStepTransform; k = n except at an
    episode's end) and the target bootstraps with gamma ** k (1: one-step targets)"""
    tau: float = 0.005
    """Polyak factor of the target actor and critics, at every actor update"""
    hidden: tuple[int, ...] = (400, 300)
    """hidden layers of actor and critics"""
    loss: Literal["l2", "huber"] = "l2"
    """critic loss; LaBER's surrogate follows it"""
    policy_noise: float = 0.2
    """std of the target-policy smoothing noise, in units of the action bound"""
    noise_clip: float = 0.5
    """clip of the target-policy smoothing noise, in units of the action bound"""
    exploration_noise: float = 0.1
    """std of the Gaussian exploration noise, in units of the action bound"""
    policy_delay: int = 2
    """critic updates per actor and target-network update"""
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
    out: Path = Path("runs/td3")
    """run folder: eval.csv, train.csv, config.txt, checkpoint/"""


# MuJoCo bodies (HalfCheetah, Hopper, ...): the TD3 paper's Table 5 (Config's defaults are Pendulum's).
MUJOCO = dict(total_steps=1_000_000)


def env_defaults(env_id: str) -> Config:
    """The defaults for ``env_id``: Pendulum's (``Config()``'s) for ``Pendulum*``, else MuJoCo's."""
    return Config(env_id=env_id, **({} if env_id.startswith("Pendulum") else MUJOCO))


def action_spec(env, device) -> Bounded:
    space = env.action_space
    return Bounded(torch.as_tensor(space.low), torch.as_tensor(space.high), space.shape, device=device)


def make_critic(cfg: Config, env, device) -> ValueOperator:
    """Q(s, a): an MLP on the concatenated observation and action; TD3Loss vmaps the twin copies."""
    in_features = env.observation_space.shape[0] + env.action_space.shape[0]
    return ValueOperator(
        MLP(in_features=in_features, out_features=1, num_cells=list(cfg.hidden), activation_class=nn.ReLU),
        in_keys=["observation", "action"],
    ).to(device)


def build_td3(cfg: Config, env, device: torch.device):
    """Deterministic tanh actor scaled to the action bounds, twin critics, TD3Loss."""
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


def make_replay(cfg: Config, loss_module: TD3Loss, env, device: torch.device):
    """The replay buffer of ``--sampler``; with ``--compile`` or ``--cudagraphs``, the LaBER module the update
    calls; with LFIW, its module and two buffers (``torchsample.lfiw``): ``(rb, laber, lfiw, fast_slow)``.

    TorchRL's samplers draw the rows: uniformly, PER's ``PrioritizedSampler`` or GER's
    ``torchsample.GERSampler``. LaBER keeps ``B`` of ``m * B`` drawn rows per critic, through
    ``torchsample.LaBERSampler`` inside ``rb.sample()``, or, for a compiled update, inside it (docs/gpu.md).
    LFIW draws the critics' rows from its slow buffer and weighs them (before LaBER keeps ``B``: the
    sampler's ``transform``); ``rb`` is then that slow buffer.
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
        laber = LaBER(
            loss_module,
            batch_size=cfg.batch_size,
            weighting=choice.weighting,
            surrogate=cfg.surrogate,
            critics=cfg.critics,
        )
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
    if not choice.lfiw:
        rb = TensorDictReplayBuffer(
            storage=LazyTensorStorage(cfg.buffer_size, device=device), sampler=sampler, batch_size=rows
        )
        add_n_step(rb, cfg.n_step, cfg.gamma)  # --n-step: TorchRL's MultiStepTransform on the buffer
        return rb, laber, None, None
    if cfg.n_step != 1:
        raise ValueError("--n-step with LFIW: its fast and slow buffers store one-step transitions")
    fast_slow = FastSlowReplay(cfg.lfiw_fast_size, cfg.buffer_size, device=device, sampler=sampler, batch_size=rows)
    features = env.observation_space.shape[0] + env.action_space.shape[0]  # w_psi(s, a)
    lfiw = LFIW(RatioNetwork(features).to(device), replay=fast_slow, f=cfg.lfiw_f, temperature=cfg.lfiw_temperature)
    if isinstance(sampler, LaBERDraw):  # w~ normalised over the large batch, then LaBER keeps B (docs/lfiw.md)
        sampler.transform = lfiw
    return fast_slow.slow, laber, lfiw, fast_slow


def lfiw_log(lfiw: LFIW, fast_slow: FastSlowReplay, ratio_loss: torch.Tensor, rows: int) -> dict[str, float]:
    """What lfiw.csv records: the ratio's mean, spread and effective sample size on ``rows`` uniform rows of the
    slow buffer, as many as w~ is normalised over (drawn on a forked RNG: logging does not change the run), its
    last loss (Eq. 10; minus it bounds ``D_f(fast || slow)`` from below) and the slow buffer's size."""
    with torch.random.fork_rng(devices=[]):
        stats = {key: value.item() for key, value in lfiw.stats(fast_slow.sample_slow(rows)).items()}
    return {**stats, "ratio_loss": ratio_loss.item(), "slow_size": len(fast_slow.slow)}


def main(cfg: Config) -> dict:
    device = resolve_device(cfg.device)
    torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    env = make_env(cfg.env_id, cfg.seed)
    loss_module, actor = build_td3(cfg, env, device)
    # Critics weighted (the paper's estimator), each on its own rows with LaBER; actor on uniform rows.
    weighted_loss = LaBERLoss(loss_module)
    optimizer = torch.optim.Adam(
        loss_module.parameters(),
        lr=torch.tensor(cfg.lr, device=device),
        eps=cfg.adam_eps,
        capturable=device.type == "cuda",
    )
    target_updater = SoftUpdate(loss_module, tau=cfg.tau)

    # The replay buffer: B rows per critic per update, drawn through LaBER (m*B scored by each critic, B kept),
    # PER or GER, or uniformly; with LFIW from its slow buffer, weighted (Sinha et al., Alg. 1).
    rb, laber, lfiw, fast_slow = make_replay(cfg, loss_module, env, device)

    def objective(data, with_actor: bool):
        if laber is not None:  # a compiled update: LaBER keeps B rows per critic of the m*B inside it
            data = laber(data)
        total, _ = weighted_loss.value_loss(data)
        if with_actor:  # left out, the actor's parameters get no gradient and Adam skips them
            total = total + weighted_loss.actor_loss(data)[0]
        return total, data

    # zero_grad, objective, backward, step; two fullgraph graphs with --compile. The target networks
    # move with the actor, every policy_delay steps (Fujimoto et al., Alg. 1), outside the update.
    update = make_update(objective, optimizer, compile=cfg.compile)
    if cfg.cudagraphs:
        from tensordict.nn import CudaGraphModule

        update = CudaGraphModule(update, warmup=5)

    low, high = env.action_space.low, env.action_space.high

    @torch.no_grad()
    def policy(obs: np.ndarray, explore: bool = False) -> np.ndarray:
        """The actor's action, plus Gaussian noise when exploring."""
        action = actor(TensorDict({"observation": torch.as_tensor(obs, dtype=torch.float32, device=device)}))["action"]
        action = action.cpu().numpy()
        if explore and cfg.exploration_noise > 0:
            action = action + np.random.normal(0.0, cfg.exploration_noise * high, size=action.shape)
        return np.clip(action, low, high).astype(np.float32)

    # Episode returns, evaluations, checkpoints (--resume, --stop-after), the progress bar.
    lfiw_state = (
        {} if lfiw is None else {"lfiw": lfiw, "lfiw_optimizer": lfiw.optimizer, "lfiw_fast_buffer": fast_slow.fast}
    )
    loop = TrainingLoop(
        cfg,
        "td3",
        env,
        rb,
        {"loss": loss_module, "optimizer": optimizer, "target_updater": target_updater, **lfiw_state},
        policy,
        burn_in=cfg.learning_starts + 200,
        bar_every=500,
        recent=5,
        diagnose=lambda: (
            diagnostics(loss_module, rb, cfg.diagnostics_rows or cfg.m * cfg.batch_size, cfg.batch_size)
            if optimizer.state
            else {}
        ),
    )  # from the 1st update
    env, obs = loop.env, loop.obs
    for step in loop.steps():
        action = env.action_space.sample() if step < cfg.learning_starts else policy(obs, explore=True)
        next_obs, reward, terminated, truncated, _ = env.step(action)
        transition = to_tensordict(
            obs.astype(np.float32),
            np.asarray(action, dtype=np.float32),
            reward,
            next_obs.astype(np.float32),
            terminated,
            truncated,
            device,
        )
        (rb if fast_slow is None else fast_slow).add(transition)  # LFIW: to the fast and the slow buffer
        obs = loop.record(step, next_obs, reward, terminated or truncated)

        if step >= cfg.learning_starts:
            prioritized = isinstance(rb.sampler, PrioritizedSampler)  # PER, GER (and with LaBER over them)
            if prioritized:  # PER's importance exponent, annealed to 1 (Schaul et al.)
                rb.sampler.beta = PER_BETA + (1.0 - PER_BETA) * step / cfg.total_steps
            if lfiw is not None and lfiw.active:  # Alg. 1: past the threshold, w_psi takes a step (Eq. 10) first
                ratio_loss = lfiw.update(fast_slow.sample_slow(cfg.batch_size), fast_slow.sample_fast(cfg.batch_size))
            data = rb.sample()  # with LFIW and LaBERSampler, w~ weighs the large batch before LaBER keeps B rows
            if lfiw is not None and not isinstance(rb.sampler, LaBERDraw):
                data = lfiw(data)  # Eq. 11-12: the critics' rows weighted by w~, normalised over them
            with_actor = step % cfg.policy_delay == 0
            _, data = update(data, with_actor)
            if with_actor:
                target_updater.step()
            if prioritized:  # the rows' new priorities: PER's largest |TD| over the critics, GER's exact norms
                rb.sampler.update_from(data) if cfg.sampler.startswith("ger") else rb.update_priority(
                    data["index"], data["td_error"]
                )
            if lfiw is not None and lfiw.active and (step + 1) % cfg.lfiw_log_every == 0:
                rows = cfg.m * cfg.batch_size if "laber" in cfg.sampler else rb.batch_size  # w~'s normaliser
                loop.logger.log("lfiw", step + 1, **lfiw_log(lfiw, fast_slow, ratio_loss, rows))

        if loop.end_step(step, obs):
            break
    return loop.close()


if __name__ == "__main__":
    main(cli(env_defaults, Config.env_id))
