"""The replay buffer and its sampler, built from a ``--sampler`` name, for every agent.

One name, one branch: :func:`make_sampler` reads the name and builds TorchRL's or torchsample's sampler for
it; :func:`make_replay` puts it under a ``TensorDictReplayBuffer`` (with Atari's frame re-stacking and
``--n-step`` when asked). After an update, :func:`feed_back` returns the rows' new priorities to a PER or
GER sampler, whose importance exponent :func:`anneal_beta` moves to 1 over the run. A new sampler is a
name in :data:`VALUE_SAMPLERS` and a branch in :func:`make_sampler` (docs/agents.md, "The samplers").
"""

from __future__ import annotations

from tensordict import TensorDictBase
from torchrl.data import LazyTensorStorage, PrioritizedSampler, RandomSampler, TensorDictReplayBuffer
from torchrl.data.replay_buffers import Sampler

from agents.atari import FrameStackReplay, is_atari
from agents.nstep import add_n_step
from torchsample import GERLaBERSampler, GERSampler, LaBER, LaBERSampler, PrioritizedLaBERSampler
from torchsample.sampler import LaBERDraw

# DQN's and C51's --sampler choices; SAC and TD3 add LFIW's (Sinha et al. re-weight an actor-critic's critics).
# PER-LaBER and GER-LaBER (the LaBER paper's): PER or GER draws the large batch, LaBER keeps B, the weights
# multiply. Exact-gradient LaBER is laber-mean with --surrogate exact.
VALUE_SAMPLERS = (
    "uniform",
    "per",
    "laber-mean",
    "laber-lazy",
    "laber-max",
    "large-batch",
    "per-laber-mean",
    "ger",
    "ger-laber-mean",
)
ACTOR_CRITIC_SAMPLERS = (*VALUE_SAMPLERS, "lfiw", "lfiw-laber-mean")
# PER's exponents (Schaul et al., proportional); beta is annealed to 1 over the run (anneal_beta).
PER_ALPHA, PER_BETA = 0.6, 0.4


def make_sampler(cfg, loss_module, **laber_options) -> tuple[Sampler, int, LaBER | None]:
    """``(sampler, rows per rb.sample(), laber)`` for ``cfg.sampler``.

    ``laber`` is None unless the update is compiled (``--compile``/``--cudagraphs``): then the buffer draws
    ``m * B`` rows and the update calls ``laber`` on them, so that LaBER's scoring and draw are part of the
    compiled (and captured) step (docs/gpu.md); eager, LaBER runs inside ``rb.sample()`` as the sampler.
    An ``lfiw`` name builds the sampler of the rest of the name (``lfiw``: uniform, ``lfiw-laber-mean``:
    LaBER), which draws from LFIW's slow buffer; LFIW's weights are the agent's (``agents/actor_critic.py``).
    ``laber_options`` go to :class:`torchsample.LaBER` (twin critics: ``critics=``).

    Examples:
        >>> from types import SimpleNamespace
        >>> cfg = SimpleNamespace(sampler="large-batch", batch_size=8, m=4, buffer_size=100)
        >>> sampler, rows, laber = make_sampler(cfg, loss_module=None)
        >>> type(sampler).__name__, rows, laber
        ('RandomSampler', 32, None)
    """
    name, batch, large = cfg.sampler, cfg.batch_size, cfg.m * cfg.batch_size
    if name not in ACTOR_CRITIC_SAMPLERS:
        raise ValueError(f"sampler must be one of {ACTOR_CRITIC_SAMPLERS}, got {name!r}")
    name = name.removeprefix("lfiw").removeprefix("-") or "uniform"  # LFIW weighs what this sampler draws
    per = dict(alpha=PER_ALPHA, beta=PER_BETA)
    if name == "uniform":
        return RandomSampler(), batch, None
    if name == "large-batch":  # the paper's fairness baseline: the update trains on all m * B uniform rows
        return RandomSampler(), large, None
    if name == "per":
        return PrioritizedSampler(cfg.buffer_size, **per), batch, None
    if name == "ger":  # PER with the rows' exact per-sample gradient norms as priorities
        return GERSampler(loss_module, cfg.buffer_size, **per), batch, None
    # LaBER: "laber-<weighting>" over a uniform draw, "per-laber-mean" and "ger-laber-mean" over PER's and GER's.
    draw, _, weighting = name.rpartition("laber-")
    laber = LaBER(loss_module, batch_size=batch, weighting=weighting, surrogate=cfg.surrogate, **laber_options)
    if cfg.compile or cfg.cudagraphs:
        if draw == "per-":
            return PrioritizedSampler(cfg.buffer_size, **per), large, laber
        if draw == "ger-":
            return GERSampler(loss_module, cfg.buffer_size, **per), large, laber
        return RandomSampler(), large, laber
    # PER-LaBER and GER-LaBER are PER samplers themselves (TorchRL hands them priorities).
    if draw == "per-":
        return PrioritizedLaBERSampler(laber, cfg.buffer_size, PER_ALPHA, PER_BETA, m=cfg.m), batch, None
    if draw == "ger-":
        return GERLaBERSampler(laber, cfg.buffer_size, PER_ALPHA, PER_BETA, m=cfg.m), batch, None
    return LaBERSampler(laber, m=cfg.m), batch, None


def make_replay(cfg, loss_module, env, device, **laber_options) -> tuple[TensorDictReplayBuffer, LaBER | None]:
    """The replay buffer of ``cfg.sampler`` (:func:`make_sampler`) and, for a compiled update, the LaBER module
    the update calls.

    On Atari the buffer stores 2 of a transition's 8 frames and re-stacks them when drawn
    (``agents/atari.py``), before LaBER scores the rows; ``--n-step`` puts TorchRL's ``MultiStepTransform``
    on it (``agents/nstep.py``).

    Examples:
        >>> import torch
        >>> from agents import dqn
        >>> from agents.envs import make_env
        >>> env, cfg = make_env("CartPole-v1", 0), dqn.Config(sampler="laber-mean", buffer_size=100)
        >>> loss_module, _ = dqn.build_dqn(cfg, env, torch.device("cpu"))
        >>> rb, laber = make_replay(cfg, loss_module, env, torch.device("cpu"))
        >>> type(rb.sampler).__name__, rb.batch_size, laber
        ('LaBERSampler', 64, None)
    """
    sampler, rows, laber = make_sampler(cfg, loss_module, **laber_options)
    rb = TensorDictReplayBuffer(
        storage=LazyTensorStorage(cfg.buffer_size, device=device), sampler=sampler, batch_size=rows
    )
    if is_atari(cfg.env_id):
        rb.append_transform(FrameStackReplay(rb.storage, env.observation_space.shape))
        if isinstance(sampler, LaBERDraw):  # LaBER scores the re-stacked rows
            sampler.transform = rb.transform
    add_n_step(rb, cfg.n_step, cfg.gamma)  # --n-step: TorchRL's MultiStepTransform (not with Atari's frames)
    return rb, laber


def anneal_beta(rb: TensorDictReplayBuffer, step: int, total_steps: int) -> bool:
    """PER's importance exponent at ``step``, annealed linearly from ``PER_BETA`` to 1 over the run (Schaul et
    al.), when ``rb`` samples by priority (PER, GER, and LaBER over them). True when it does.

    Examples:
        >>> rb = TensorDictReplayBuffer(storage=LazyTensorStorage(10), sampler=PrioritizedSampler(10, 0.6, 0.4))
        >>> anneal_beta(rb, step=50, total_steps=100), rb.sampler.beta
        (True, 0.7)
    """
    if not isinstance(rb.sampler, PrioritizedSampler):
        return False
    rb.sampler.beta = PER_BETA + (1.0 - PER_BETA) * step / total_steps
    return True


def feed_back(rb: TensorDictReplayBuffer, data: TensorDictBase) -> None:
    """The priorities of the rows an update used, back to the buffer's PER or GER sampler (call only when
    :func:`anneal_beta` says it samples by priority): GER's exact gradient norms (``update_from``), or
    PER's ``"td_error"`` that ``torchsample.LaBERLoss`` wrote (``|TD|``; the larger over twin critics;
    C51's cross-entropy).

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> rb = TensorDictReplayBuffer(storage=LazyTensorStorage(10), sampler=PrioritizedSampler(10, 1.0, 0.4))
        >>> _ = rb.extend(TensorDict({"x": torch.zeros(4)}, [4]))
        >>> feed_back(rb, TensorDict({"index": torch.tensor([1]), "td_error": torch.tensor([5.0])}, [1]))
        >>> round(rb.sampler._sum_tree[1], 3)
        5.0
    """
    if isinstance(rb.sampler, GERSampler):
        rb.sampler.update_from(data)
    else:
        rb.update_priority(data["index"], data["td_error"])
