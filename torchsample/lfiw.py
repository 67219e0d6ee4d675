"""``torchsample.lfiw``: experience replay with likelihood-free importance weights (LFIW).

Sinha, Song, Garg and Ermon, "Experience Replay with Likelihood-free Importance Weights" (L4DC 2022,
arXiv:2006.13169), Algorithm 1. The critic's TD loss should weigh each transition by how likely the
current policy is to visit it, ``d^pi(s, a) / d^D(s, a)``. LFIW estimates that ratio without any
likelihood: every transition goes to a small *fast* buffer ``D_f`` (recent, close to on-policy) and
to the usual large *slow* buffer ``D_s``; a network ``w_psi(s, a) >= 0`` learns ``d^{D_f} / d^{D_s}``
by minimising a variational bound on an f-divergence (Nguyen, Wainwright and Jordan, 2010):

    ``L_w(psi) = E_{D_s}[ f*(f'(w_psi(s, a))) ] - E_{D_f}[ f'(w_psi(s, a)) ]``

which is ``-D_f(D_f || D_s)`` at its minimum ``w_psi = d^{D_f} / d^{D_s}``. The critic then trains
on slow-buffer rows with the self-normalised, tempered weights

    ``w~(s, a) = w_psi(s, a)^(1/T) / E_{D_s}[ w_psi^(1/T) ]``

and with weight 1 until the slow buffer holds more than ``threshold`` transitions.

The parts: :class:`FastSlowReplay` (the two buffers), :class:`RatioNetwork` (``w_psi``),
:func:`f_divergence_loss` with the f's of :data:`F_DIVERGENCES`, :func:`self_normalized_weights`,
:func:`ratio_stats` (mean, spread, effective sample size), and :class:`LFIW`, the module that trains
``w_psi`` and writes ``w~`` into ``"priority_weight"`` for :class:`torchsample.LaBERLoss`.
``docs/lfiw.md`` says which values come from the paper and which are ours.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple, Optional

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase
from torch import Tensor, nn
from torchrl.data import LazyTensorStorage, TensorDictReplayBuffer
from torchrl.data.replay_buffers.samplers import Sampler
from torchrl.modules import MLP

__all__ = [
    "FDivergence",
    "F_DIVERGENCES",
    "f_divergence_loss",
    "self_normalized_weights",
    "ratio_stats",
    "RatioNetwork",
    "FastSlowReplay",
    "LFIW",
]

_LOG2 = math.log(2.0)


class FDivergence(NamedTuple):
    """One f-divergence ``D_f(P || Q) = E_Q[f(dP/dQ)]``, with what the variational bound needs.

    Lemma 1 of the paper (Nguyen et al., 2010): for ``w >= 0``,
    ``D_f(P || Q) >= E_P[f'(w)] - E_Q[f*(f'(w))]``, with equality at ``w = dP/dQ``;
    ``f*(t) = sup_u (t u - f(u))`` is the convex conjugate. Pointwise, ``q f*(f'(w)) - p f'(w)`` has
    derivative ``f''(w) (q w - p)`` in ``w`` (because ``(f*)'(f'(w)) = w``): its minimum is at
    ``w = p / q`` for every strictly convex ``f``, which is why minimising :func:`f_divergence_loss`
    recovers the ratio.

    ======  ================================  ====================  ===================  ===================
    name    ``f(u)``                          ``f'(u)``             ``f*(t)``            ``f*(f'(w))``
    ======  ================================  ====================  ===================  ===================
    ``js``  ``u log u - (u+1) log((u+1)/2)``  ``log(2u / (1+u))``   ``-log(2 - e^t)``    ``log((1+w) / 2)``
    ``kl``  ``u log u``                       ``1 + log u``         ``e^(t-1)``          ``w``
    ======  ================================  ====================  ===================  ===================

    ``js`` is f-GAN's Jensen-Shannon (Nowozin et al., 2016), ``D_f = 2 JSD(P, Q)``; its ``f'``
    stays below ``log 2``, so the fast-buffer term is bounded, and with ``c = w / (1 + w)`` its
    objective is the cross-entropy of a classifier ``c`` telling fast rows (label 1) from slow rows
    (label 0), minus ``2 log 2``: the classifier-based "likelihood-free importance weighting" of
    Grover, Song et al. (2019). ``kl`` gives ``KL(P || Q)``; its ``f'(w) = 1 + log w`` is unbounded
    below. ``f*`` of ``js`` is finite for ``t < log 2`` only.

    Attributes:
        name: ``"js"`` or ``"kl"``.
        f: the convex generator, ``f(1) = 0``.
        f_prime: its derivative ``f'``.
        conjugate: its convex conjugate ``f*``.
        conjugate_of_prime: ``f*(f'(w))`` in closed form (the composition of the two above loses
            precision for large ``w``: ``js`` subtracts two numbers close to 2).

    Examples:
        >>> import torch
        >>> from torchsample.lfiw import F_DIVERGENCES
        >>> js = F_DIVERGENCES["js"]
        >>> w = torch.tensor([0.5, 1.0, 3.0])
        >>> js.f_prime(torch.tensor(1.0)), js.f(torch.tensor(1.0))     # f'(1) = log 1 = 0, f(1) = 0
        (tensor(0.), tensor(0.))
        >>> torch.allclose(js.conjugate(js.f_prime(w)), js.conjugate_of_prime(w))
        True
    """

    name: str
    f: Callable[[Tensor], Tensor]
    f_prime: Callable[[Tensor], Tensor]
    conjugate: Callable[[Tensor], Tensor]
    conjugate_of_prime: Callable[[Tensor], Tensor]


F_DIVERGENCES = {
    "js": FDivergence(
        "js",
        f=lambda u: torch.xlogy(u, u) - (u + 1) * (torch.log1p(u) - _LOG2),
        f_prime=lambda u: _LOG2 + torch.log(u) - torch.log1p(u),
        conjugate=lambda t: -torch.log(2 - torch.exp(t)),
        conjugate_of_prime=lambda w: torch.log1p(w) - _LOG2,
    ),
    "kl": FDivergence(
        "kl",
        f=lambda u: torch.xlogy(u, u),
        f_prime=lambda u: 1 + torch.log(u),
        conjugate=lambda t: torch.exp(t - 1),
        conjugate_of_prime=lambda w: w,
    ),
}
"""The f's :class:`LFIW` knows, by name (see :class:`FDivergence` for the formulas)."""


def _divergence(f: str) -> FDivergence:
    if f not in F_DIVERGENCES:
        raise ValueError(f"f must be one of {tuple(F_DIVERGENCES)}, got {f!r}")
    return F_DIVERGENCES[f]


def _check_temperature(temperature: float) -> float:
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not math.isfinite(temperature)
        or temperature <= 0
    ):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return float(temperature)


def f_divergence_loss(ratio_slow: Tensor, ratio_fast: Tensor, f: str = "js") -> Tensor:
    """The density-ratio objective ``L_w = mean(f*(f'(w_slow))) - mean(f'(w_fast))`` (Eq. 10).

    ``ratio_slow`` is ``w_psi`` on rows of the slow buffer (``Q`` of :class:`FDivergence`),
    ``ratio_fast`` on rows of the fast buffer (``P``). Minimised over ``w_psi``, it reaches
    ``-D_f(P || Q)`` at ``w_psi = dP/dQ``; ``-L_w`` is a lower bound on ``D_f(P || Q)``, worth logging.

    * ``js``: ``L_w = mean(log((1 + w_s) / 2)) - mean(log(2 w_f / (1 + w_f)))``
    * ``kl``: ``L_w = mean(w_s) - mean(1 + log w_f)``

    Ratios are floored at the smallest normal float before the logarithms (a softplus output can
    underflow to 0).

    Args:
        ratio_slow: ``[..., N_s]`` non-negative ratios of slow-buffer rows.
        ratio_fast: ``[..., N_f]`` non-negative ratios of fast-buffer rows.
        f: ``"js"`` (default) or ``"kl"``.

    Returns:
        ``[...]``, the means taken over the last dimension (a scalar for ``[N]`` inputs),
        differentiable in both inputs.

    Examples:
        >>> import torch
        >>> from torchsample.lfiw import f_divergence_loss
        >>> ones = torch.ones(4)                 # w = 1: P and Q judged equal, D_f bound 0
        >>> f_divergence_loss(ones, ones), f_divergence_loss(ones, ones, "kl")
        (tensor(0.), tensor(0.))
        >>> f_divergence_loss(torch.tensor([0.5, 0.5]), torch.tensor([2.0, 2.0]), "kl")   # 0.5 - (1 + log 2)
        tensor(-1.1931)
    """
    divergence = _divergence(f)
    for name, ratio in (("ratio_slow", ratio_slow), ("ratio_fast", ratio_fast)):
        if ratio.dim() == 0 or ratio.shape[-1] == 0:
            raise ValueError(f"{name} is empty: the objective needs rows from both buffers")
    tiny = torch.finfo(ratio_slow.dtype).tiny
    slow_term = divergence.conjugate_of_prime(ratio_slow.clamp_min(tiny)).mean(-1)
    fast_term = divergence.f_prime(ratio_fast.clamp_min(tiny)).mean(-1)
    return slow_term - fast_term


def self_normalized_weights(ratio: Tensor, temperature: float = 1.0) -> Tensor:
    """``w~_i = w_i^(1/T) / mean_j(w_j^(1/T))`` over the last dimension (Eq. 11).

    The mean over a uniform batch of the slow buffer estimates ``E_{D_s}[w^(1/T)]``, so the weights
    average exactly 1 over that batch. ``T = 1`` keeps the ratio's shape; a larger ``T`` flattens it
    towards uniform weights (less variance, more bias). Computed as ``n * softmax(log(w) / T)``,
    which neither overflows nor divides by zero; ratios are floored at the smallest normal float.

    Args:
        ratio: ``[..., N]`` non-negative ratios ``w_psi`` of slow-buffer rows.
        temperature: ``T > 0``.

    Examples:
        >>> import torch
        >>> from torchsample.lfiw import self_normalized_weights
        >>> w = torch.tensor([1.0, 4.0, 16.0, 3.0])
        >>> self_normalized_weights(w)                       # w / mean(w), mean(w) = 6
        tensor([0.1667, 0.6667, 2.6667, 0.5000])
        >>> self_normalized_weights(w, temperature=2.0)      # sqrt(w) / mean(sqrt(w)), mean = 2.183
        tensor([0.4581, 0.9162, 1.8323, 0.7934])
    """
    temperature = _check_temperature(temperature)
    if ratio.dim() == 0 or ratio.shape[-1] == 0:
        raise ValueError(f"ratio must have at least one element in its last dimension, got shape {tuple(ratio.shape)}")
    log_ratio = ratio.clamp_min(torch.finfo(ratio.dtype).tiny).log()
    return torch.softmax(log_ratio / temperature, dim=-1) * ratio.shape[-1]


def ratio_stats(ratio: Tensor, temperature: float = 1.0) -> dict[str, Tensor]:
    """What to log of the ratio: its mean and spread, and the effective sample size of its weights.

    * ``ratio_mean``, ``ratio_std``: of ``w_psi`` on a slow batch. ``E_{D_s}[d^{D_f} / d^{D_s}] = 1``,
      so a mean far from 1 says the ratio network is off; the std says how far from uniform it is.
    * ``ess``: ``(sum_i w~_i)^2 / (n sum_i w~_i^2)`` of the weights :class:`LFIW` applies
      (``w~ = w^(1/T)`` up to a constant, which ESS ignores): 1 for uniform weights, ``k / n`` when
      ``k`` rows carry all the weight equally.

    Returns 0-d tensors (no host synchronisation: call ``.item()`` when logging).

    Args:
        ratio: ``[N]`` ratios of slow-buffer rows.
        temperature: ``T`` of the weights whose ESS is reported.

    Examples:
        >>> import torch
        >>> from torchsample.lfiw import ratio_stats
        >>> stats = ratio_stats(torch.tensor([1.0, 1.0, 0.0, 0.0]))    # two rows carry the weight
        >>> {k: round(v.item(), 4) for k, v in stats.items()}
        {'ratio_mean': 0.5, 'ratio_std': 0.5774, 'ess': 0.5}
    """
    weight = self_normalized_weights(ratio.detach(), temperature)
    ess = weight.sum().square() / (weight.numel() * weight.square().sum())
    ratio = ratio.detach()
    return {"ratio_mean": ratio.mean(), "ratio_std": ratio.std(), "ess": ess}


class RatioNetwork(nn.Module):
    """The density-ratio network ``w_psi(x) = softplus(MLP(x)) >= 0``, ``x`` state and action concatenated.

    The paper forces ``w_psi >= 0`` "via activation functions" without naming one; softplus is
    ours: smooth, strictly positive where not underflowing (``f'`` takes ``log w``), and with a
    gradient everywhere (a ReLU output would stall at ``w = 0``, where ``log w = -inf``). The last
    layer starts with weights scaled by 0.1 and bias ``log(e - 1)``, so that ``w_psi`` starts close
    to 1, uniform weights.

    Args:
        in_features: width of ``x`` (observation size + action size for SAC/TD3).
        num_cells: hidden widths; ``(256, 256)`` (ours: the SAC/TD3 critics' size; not in the paper).
        activation_class: hidden activation (``nn.ReLU``).

    Examples:
        >>> import torch
        >>> from torchsample.lfiw import RatioNetwork
        >>> net = RatioNetwork(in_features=6, num_cells=(32, 32))
        >>> w = net(torch.randn(5, 6))
        >>> w.shape, bool((w > 0).all()), bool(((w - 1).abs() < 0.5).all())
        (torch.Size([5]), True, True)
    """

    def __init__(
        self, in_features: int, num_cells: Sequence[int] = (256, 256), activation_class: type[nn.Module] = nn.ReLU
    ) -> None:
        super().__init__()
        if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
            raise ValueError(f"in_features must be an int >= 1, got {in_features!r}")
        self.mlp = MLP(
            in_features=in_features, out_features=1, num_cells=list(num_cells), activation_class=activation_class
        )
        last = [m for m in self.mlp.modules() if isinstance(m, nn.Linear)][-1]
        with torch.no_grad():
            last.weight.mul_(0.1)
            last.bias.fill_(math.log(math.expm1(1.0)))  # softplus(log(e - 1)) = 1

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.softplus(self.mlp(x)).squeeze(-1)


class FastSlowReplay:
    """LFIW's two buffers, both fed by every transition: a small fast one and the usual slow one.

    Two TorchRL ``TensorDictReplayBuffer`` s, each on a ``LazyTensorStorage`` with TorchRL's default
    round-robin writer (first in, first out) and uniform ``RandomSampler`` (with replacement): the
    fast buffer holds the last ``fast_size`` transitions, the slow one the last ``slow_size``.
    TorchRL 0.14's ``StalenessAwareSampler`` could draw the recent rows from the slow storage alone
    (a step counter as ``policy_version``, ``max_staleness=fast_size - 1``, constant weights), but it
    reweighs the whole storage at every draw: 16 ms for 256 rows of a 10^6-row storage, against
    0.8 ms from a separate 10^4-row buffer (one CPU thread, measured); the copy costs
    ``fast_size / slow_size`` more memory (1% with the defaults).

    The rows each buffer returns carry their own storage ``"index"``. :meth:`sample_slow` and
    :meth:`sample_fast` draw uniformly from the storages (what the ratio network trains on, Eq. 10);
    ``slow.sample()`` draws the critics' rows through the slow buffer's own ``sampler`` (uniform, or a
    :class:`torchsample.LaBERSampler` whose ``transform`` is the :class:`LFIW` module: the weights of the
    large batch, then LaBER's down-sample).

    Args:
        fast_size: capacity of ``D_f`` (10^4, ours: the paper's value is not in our source).
        slow_size: capacity of ``D_s`` (10^6, the usual SAC/TD3 buffer). Algorithm 1 keeps
            ``|D_f| < |D_s|``: ``fast_size`` must be smaller.
        device: where both storages live (``"cpu"``, TorchRL's default; ``"auto"``: that of the
            first data written).
        sampler: the slow buffer's sampler (default uniform, with replacement).
        batch_size: the slow buffer's batch size (``slow.sample()`` without an argument).

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from torchsample.lfiw import FastSlowReplay
        >>> replay = FastSlowReplay(fast_size=4, slow_size=16)
        >>> replay.extend(TensorDict({"step": torch.arange(10)}, [10]))
        >>> len(replay.fast), len(replay.slow)
        (4, 10)
        >>> sorted(replay.fast[:]["step"].tolist())           # the 4 most recent
        [6, 7, 8, 9]
        >>> replay.add(TensorDict({"step": torch.tensor(10)}, []))     # one transition, as agents add them
        >>> sorted(replay.fast[:]["step"].tolist()), len(replay.slow)
        ([7, 8, 9, 10], 11)
        >>> replay.sample_slow(32).batch_size, replay.sample_fast(8).batch_size
        (torch.Size([32]), torch.Size([8]))
    """

    def __init__(
        self,
        fast_size: int = 10_000,
        slow_size: int = 1_000_000,
        *,
        device: torch.device | str = "cpu",
        sampler: Optional[Sampler] = None,
        batch_size: Optional[int] = None,
    ) -> None:
        for name, size in (("fast_size", fast_size), ("slow_size", slow_size)):
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ValueError(f"{name} must be an int >= 1, got {size!r}")
        if fast_size >= slow_size:
            raise ValueError(
                f"fast_size must be smaller than slow_size (|D_f| < |D_s|, Algorithm 1), "
                f"got fast_size={fast_size}, slow_size={slow_size}"
            )
        self.fast_size, self.slow_size = fast_size, slow_size
        self.fast = TensorDictReplayBuffer(storage=LazyTensorStorage(fast_size, device=device))
        self.slow = TensorDictReplayBuffer(
            storage=LazyTensorStorage(slow_size, device=device), sampler=sampler, batch_size=batch_size
        )

    def extend(self, data: TensorDictBase) -> None:
        """Write the transitions ``data`` (one batch dimension) to both buffers."""
        self.slow.extend(data)
        self.fast.extend(data)

    def add(self, transition: TensorDictBase) -> None:
        """Write one transition (no batch dimension) to both buffers."""
        self.slow.add(transition)
        self.fast.add(transition)

    def sample_slow(self, n: int) -> TensorDictBase:
        """``n`` rows of the slow buffer's storage, uniform with replacement (whatever its sampler)."""
        return self._uniform(self.slow, "slow", n)

    def sample_fast(self, n: int) -> TensorDictBase:
        """``n`` rows of the fast buffer, uniform with replacement."""
        return self._uniform(self.fast, "fast", n)

    @staticmethod
    def _uniform(buffer: TensorDictReplayBuffer, name: str, n: int) -> TensorDictBase:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        if len(buffer) == 0:
            raise ValueError(f"the {name} buffer is empty: extend() the replay before sampling it")
        index = torch.randint(len(buffer), (n,))
        return buffer.storage[index].set("index", index.to(buffer.storage.device))

    def state_dict(self) -> dict:
        """Both buffers' TorchRL state (storage, sampler, writer)."""
        return {"fast": self.fast.state_dict(), "slow": self.slow.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.fast.load_state_dict(state_dict["fast"])
        self.slow.load_state_dict(state_dict["slow"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(fast={len(self.fast)}/{self.fast_size}, slow={len(self.slow)}/{self.slow_size})"


class LFIW(TensorDictModuleBase):
    """Likelihood-free importance weights (Sinha et al.): ``w~`` of slow-buffer rows in ``"priority_weight"``.

    ``lfiw(slow_batch)`` computes ``w_psi(s, a)`` for every row of a batch drawn uniformly from the
    slow buffer and writes ``w~ = w^(1/T) / mean_batch(w^(1/T))`` (:func:`self_normalized_weights`)
    into ``"priority_weight"``, times the weight already there, where there is one; until the slow
    buffer holds more than ``threshold`` transitions it writes 1 (Algorithm 1's else branch: no
    re-weighting). :class:`torchsample.LaBERLoss` then computes the critic loss
    ``mean_i(w~_i * l_i)`` (Eq. 12). ``lfiw.update(slow_batch, fast_batch)`` takes one optimiser
    step on :func:`f_divergence_loss` (Eq. 10).

    With LaBER (LFIW-LaBER): weigh the *large* batch, then down-sample it,
    ``LaBER(loss, batch_size=B)(lfiw(replay.sample_slow(m * B)))``. LaBER multiplies the kept rows'
    ``"priority_weight"`` into its own, row by row, so each kept row carries
    ``w_LaBER * w~``; and ``E_{D_s}`` in ``w~`` is estimated on the uniform large batch. The other
    order would normalise ``w~`` over rows that LaBER drew in proportion to their TD errors, not
    from ``D_s``, and is refused: the batch must have one batch dimension. The product is an
    unbiased estimate of the large batch's ``mean(w~ l)`` (LaBER's weights correct for any
    per-row quantity), though LaBER's priorities, ``|TD|`` alone, ignore ``w~``.

    The ratio network is a submodule (in ``state_dict``); the optimiser (``lfiw.optimizer``) is not.

    Args:
        ratio_net: ``w_psi``, a module from ``[N, D]`` features to ``[N]`` (or ``[N, 1]``)
            non-negative ratios, e.g. :class:`RatioNetwork`.
        f: ``"js"`` (default) or ``"kl"`` (:data:`F_DIVERGENCES`).
        temperature: ``T > 0`` (5.0; ours: the value is not in our source of the paper, see
            ``docs/lfiw.md``). ``T = 1`` applies the estimated ratio as it is.
        replay: the :class:`FastSlowReplay` whose slow buffer's size ``threshold`` refers to.
            Without one, every call re-weights.
        threshold: re-weight once ``len(replay.slow) > threshold`` (default ``replay.fast_size``:
            until then the slow buffer holds hardly more than the fast one and the true ratio is
            close to 1; the paper gives no value). Needs ``replay``.
        in_keys: the keys whose values, flattened per row and concatenated, are ``w_psi``'s input
            (TorchRL's ``("observation", "action")``).
        weight_key: where the weight goes (``"priority_weight"``, the key TorchRL's losses and
            :class:`torchsample.LaBERLoss` read).
        optimizer: a ``torch.optim.Optimizer`` over ``ratio_net``'s parameters, or ``None`` for
            ``Adam(lr=lr)``.
        lr: Adam's learning rate (3e-4, ours: the SAC/TD3 default).

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from torchsample.lfiw import LFIW, FastSlowReplay, RatioNetwork
        >>> _ = torch.manual_seed(0)
        >>> replay = FastSlowReplay(fast_size=50, slow_size=1000)
        >>> replay.extend(TensorDict({"observation": torch.randn(200, 3), "action": torch.rand(200, 1)}, [200]))
        >>> lfiw = LFIW(RatioNetwork(4, num_cells=(16,)), replay=replay, temperature=5.0)
        >>> lfiw.active                                       # 200 rows > threshold = fast_size = 50
        True
        >>> loss = lfiw.update(replay.sample_slow(64), replay.sample_fast(64))
        >>> batch = lfiw(replay.sample_slow(64))
        >>> batch["priority_weight"].shape, round(batch["priority_weight"].mean().item(), 4)
        (torch.Size([64]), 1.0)
        >>> sorted(lfiw.stats(batch))
        ['ess', 'ratio_mean', 'ratio_std']
    """

    def __init__(
        self,
        ratio_net: nn.Module,
        *,
        f: str = "js",
        temperature: float = 5.0,
        replay: Optional[FastSlowReplay] = None,
        threshold: Optional[int] = None,
        in_keys: Sequence = ("observation", "action"),
        weight_key: str = "priority_weight",
        optimizer: Optional[torch.optim.Optimizer] = None,
        lr: float = 3e-4,
    ) -> None:
        super().__init__()
        if not isinstance(ratio_net, nn.Module):
            raise TypeError(f"ratio_net must be an nn.Module, got {type(ratio_net).__name__}")
        _divergence(f)
        if replay is not None and not isinstance(replay, FastSlowReplay):
            raise TypeError(f"replay must be a FastSlowReplay or None, got {type(replay).__name__}")
        if threshold is not None:
            if replay is None:
                raise ValueError("threshold counts the rows of replay.slow: pass replay= with it")
            if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 0:
                raise ValueError(f"threshold must be an int >= 0, got {threshold!r}")
        if len(in_keys) == 0:
            raise ValueError("in_keys must name at least one key")
        self.ratio_net = ratio_net
        self.f = f
        self.temperature = _check_temperature(temperature)
        self.replay = replay
        self.threshold = threshold if threshold is not None or replay is None else replay.fast_size
        self.in_keys = list(in_keys)
        self.out_keys = [weight_key]
        self.weight_key = weight_key
        self.optimizer = optimizer if optimizer is not None else torch.optim.Adam(ratio_net.parameters(), lr=lr)

    @property
    def active(self) -> bool:
        """Whether the slow buffer has passed the threshold, so that :meth:`forward` re-weights."""
        return self.replay is None or len(self.replay.slow) > self.threshold

    def ratio(self, batch: TensorDictBase) -> Tensor:
        """``w_psi`` of every row of ``batch``: ``[*batch_size]``, with gradient."""
        features = torch.cat([batch.get(key).reshape(*batch.batch_size, -1) for key in self.in_keys], -1)
        dtype = next(self.ratio_net.parameters(), torch.empty(0)).dtype
        ratio = self.ratio_net(features.to(dtype))
        return ratio.reshape(batch.batch_size)

    def forward(self, batch: TensorDictBase) -> TensorDictBase:
        """Writes ``w~`` (times any weight already there) into ``batch[weight_key]``; returns ``batch``."""
        if batch.batch_dims != 1:
            raise ValueError(
                f"LFIW weighs a uniform batch of the slow buffer with one batch dimension, got batch_size="
                f"{tuple(batch.batch_size)}; with LaBER, call LFIW on the large batch before LaBER"
            )
        if batch.batch_size[0] == 0:
            raise ValueError("LFIW got an empty batch: the slow buffer holds no data")
        prior = batch.get(self.weight_key, None)
        if self.active:
            with torch.no_grad():
                weight = self_normalized_weights(self.ratio(batch), self.temperature)
        else:
            weight = torch.ones(batch.batch_size, device=batch.get(self.in_keys[0]).device)
        batch.set(self.weight_key, weight if prior is None else weight * prior.to(weight.dtype))
        return batch

    def update(self, slow_batch: TensorDictBase, fast_batch: TensorDictBase) -> Tensor:
        """One optimiser step of ``w_psi`` on :func:`f_divergence_loss`; returns the loss (detached).

        Algorithm 1 trains ``w_psi`` only once the slow buffer passes the threshold: the caller
        gates (``if lfiw.active: lfiw.update(...)``). ``-loss`` is a lower bound on
        ``D_f(D_f || D_s)``: it grows as the fast buffer drifts from the slow one.
        """
        for name, batch in (("slow_batch", slow_batch), ("fast_batch", fast_batch)):
            if batch.batch_size.numel() == 0:  # (TensorDict.numel() of a [0] batch is 1)
                raise ValueError(f"{name} is empty: update() needs rows of both buffers")
        loss = f_divergence_loss(self.ratio(slow_batch).reshape(-1), self.ratio(fast_batch).reshape(-1), self.f)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def stats(self, slow_batch: TensorDictBase) -> dict[str, Tensor]:
        """:func:`ratio_stats` of ``w_psi`` on ``slow_batch`` (one forward, no gradient)."""
        with torch.no_grad():
            return ratio_stats(self.ratio(slow_batch).reshape(-1), self.temperature)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(f={self.f!r}, temperature={self.temperature}, threshold={self.threshold}, "
            f"in_keys={self.in_keys}, weight_key={self.weight_key!r})"
        )
