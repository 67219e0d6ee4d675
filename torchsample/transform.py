"""``torchsample.LaBER``: which rows of a large batch LaBER keeps, as a TorchRL module.

``laber(large)`` scores every row of a large batch with the loss module's own networks (forward
only, no gradient), calls the fused op :func:`torchsample.laber_select` and returns the kept rows
with their importance weights in ``"priority_weight"``. :class:`torchsample.LaBERSampler` puts the
same selection on TorchRL's sampler extension point, so that a replay buffer samples with it.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
from tensordict import TensorDictBase
from torch import Tensor, nn
from torchrl.envs.transforms import Transform

from . import c51  # noqa: F401  (registers C51's Critic view)
from .codes import SURROGATES, WEIGHTINGS
from .ops import laber_downsample, laber_select
from .surrogates import td_priority
from .targets import TARGET, critic_of

__all__ = ["LaBER", "Selection", "CRITICS"]

CRITICS = ("independent", "joint")


class Selection(NamedTuple):
    """What LaBER keeps of a large batch of ``N`` rows.

    Attributes:
        index: int64 positions into the large batch: ``[B]``, or ``[B, 1 + C]`` for independent twin
            critics (column 0 the actor's uniform rows, column ``1 + c`` critic ``c``'s draws).
        weight: LaBER's importance weights, same shape (1 in the actor's column).
        target: the TD target of each kept row, same shape; ``None`` with a custom surrogate.
        td_error: ``[B, 1 + C]`` only: each kept row's largest ``|TD|`` over the critics, PER's
            priority (the update trains each critic on other rows, so LaBER computes it here).
    """

    index: Tensor
    weight: Tensor
    target: Optional[Tensor]
    td_error: Optional[Tensor]


class LaBER(Transform):
    """Large Batch Experience Replay (Lahire, Geist and Rachelson, ICML 2022): keep ``B`` rows of a large batch.

    LaBER scores each row of a large batch (``m * B`` rows drawn by the buffer) with a surrogate of
    its per-sample gradient norm, computed by one no-grad forward of the loss's own networks, and
    keeps ``B`` of them, drawn i.i.d. with probability ``p_i / sum_j p_j``, with importance weights
    (``weighting``: ``mean_j(p_j) / p_i`` by default) in ``"priority_weight"``. The surrogate
    follows the loss (:mod:`torchsample.targets`): ``|q - y|`` for ``DQNLoss(loss_function="l2")``,
    ``min(|q - y|, 1)`` for ``"smooth_l1"``, ``||softmax(z) - m||_2`` for C51, and one priority
    row per critic for ``SACLoss`` / ``TD3Loss``.

    Two ways to use it:

    * ``laber(large)``, the functional call, on a large batch (e.g. ``rb.sample()`` from a buffer of
      batch size ``m * B``): returns the kept rows, each with the ``"index"`` it had in ``large``
      (its storage index). Where ``large`` carries ``"priority_weight"`` (PER's, from a
      ``PrioritizedSampler``), the kept rows' PER weights multiply LaBER's (PER-LaBER).
    * ``TensorDictReplayBuffer(..., sampler=LaBERSampler(laber, m=4), batch_size=B)``: the buffer
      samples through LaBER (:class:`torchsample.LaBERSampler`).

    As a transform in a buffer (``rb.append_transform(laber)``), LaBER would shrink the batch that
    TorchRL's ``TensorDictReplayBuffer.sample`` then writes the large batch's ``"index"`` (and PER's
    weights) into, which TorchRL refuses; so on a buffer LaBER goes in as the sampler, above.

    Twin critics (``critics=``): ``"independent"`` (the paper's) draws ``B`` rows per critic from
    its own priorities and returns a ``[B, 1 + C]`` batch: column 0 holds ``B`` uniform rows of
    the large batch for the actor, column ``1 + c`` critic ``c``'s rows; ``"joint"`` draws one set
    of ``[B]`` rows from ``sqrt(sum_c p_c^2)``. :class:`torchsample.LaBERLoss` trains each critic on
    its rows, weighted, and the actor unweighted. The kept rows carry their TD target
    (``"target_value"``), which the update reuses, and, for ``[B, 1 + C]``, PER's ``"td_error"``.

    The transform holds the loss module without registering it: it stays out of ``state_dict``
    and out of ``eval()``. The call traces under ``torch.compile(fullgraph=True)``.

    Args:
        loss_module: the TorchRL loss whose critic is trained on the kept rows.
        batch_size: ``B``, rows kept (the large batch is e.g. ``4 * B`` rows).
        weighting: ``"mean"`` (default), ``"lazy"`` or ``"max"``.
        eps: added to every priority (1e-6).
        surrogate: ``None`` (follow the loss), or a callable ``td -> (pred, target)`` for any other
            loss; then ``surrogate_kind`` names the formula (``"l2"``, ``"huber"``, ``"categorical"``).
        critics: ``"independent"`` (default) or ``"joint"``, for losses with several critics.
        generator: a ``torch.Generator`` for reproducible draws (eager only). On CUDA it seeds the
            module's own kernel state (the buffer ``rng_state``, made on the loss's GPU) once.

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from torchrl.modules import QValueActor
        >>> from torchrl.objectives import DQNLoss
        >>> from torchsample import LaBER
        >>> actor = QValueActor(torch.nn.Linear(4, 2), in_keys=["observation"], action_space="categorical")
        >>> loss = DQNLoss(actor, loss_function="smooth_l1", delay_value=True, action_space="categorical")
        >>> loss.make_value_estimator(gamma=0.99)
        >>> large = TensorDict({"observation": torch.randn(128, 4), "action": torch.randint(2, (128,)),
        ...     ("next", "observation"): torch.randn(128, 4), ("next", "reward"): torch.randn(128, 1),
        ...     ("next", "done"): torch.zeros(128, 1, dtype=torch.bool),
        ...     ("next", "terminated"): torch.zeros(128, 1, dtype=torch.bool)}, [128])
        >>> batch = LaBER(loss, batch_size=32)(large)
        >>> batch.batch_size, batch["priority_weight"].shape, batch["target_value"].shape
        (torch.Size([32]), torch.Size([32]), torch.Size([32]))
    """

    def __init__(
        self,
        loss_module: nn.Module,
        batch_size: int,
        *,
        weighting: str = "mean",
        eps: float = 1e-6,
        surrogate: Optional[Callable[[TensorDictBase], tuple[Tensor, Tensor]]] = None,
        surrogate_kind: str = "l2",
        critics: str = "independent",
        generator: Optional[torch.Generator] = None,
    ) -> None:
        super().__init__()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        if critics not in CRITICS:
            raise ValueError(f"critics must be one of {CRITICS}, got {critics!r}")
        if surrogate is not None and not callable(surrogate):
            raise TypeError(f"surrogate must be a callable td -> (pred, target) or None, got {type(surrogate).__name__}")
        if surrogate_kind not in SURROGATES:
            raise ValueError(f"surrogate_kind must be one of {SURROGATES}, got {surrogate_kind!r}")
        # Held outside nn.Module's registry: not a submodule, so not in state_dict() nor eval().
        self.__dict__["_loss_module"] = loss_module
        self.__dict__["_generator"] = generator
        if surrogate is None:
            critic = critic_of(loss_module)
            self.__dict__["_critic"] = critic
            self.kind = critic.surrogate
        else:
            self.kind = surrogate_kind
        self.__dict__["_surrogate"] = surrogate
        self.batch_size = batch_size
        self.weighting = weighting
        self.eps = eps
        self.critics = critics
        # The fused kernel's random state, a buffer of this module, made here (eagerly) on the
        # loss's GPU: CUDA graph trees accept in-place updates of buffers, and a state first made
        # inside a compiled call would be traced into the graph. None on CPU (multinomial draws).
        device = next(iter(loss_module.parameters()), torch.empty(0)).device
        if device.type == "cuda":
            from .kernels.laber import new_rng_state  # triton is needed on CUDA only

            self.register_buffer("rng_state", new_rng_state(device, generator))
        else:
            self.register_buffer("rng_state", None)

    @property
    def loss_module(self) -> nn.Module:
        return self.__dict__["_loss_module"]

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        return self.select(tensordict)

    # A Compose calls forward; an env would call _call: both select.
    def _call(self, tensordict: TensorDictBase) -> TensorDictBase:
        return self.select(tensordict)

    def _inv_call(self, tensordict: TensorDictBase) -> TensorDictBase:
        return tensordict  # writing to the buffer is untouched

    def select(self, large: TensorDictBase) -> TensorDictBase:
        """The rows LaBER keeps from the large batch ``large``, with their weights (see the class doc).

        ``[B]`` rows, or ``[B, 1 + C]`` for twin critics drawn independently. ``"priority_weight"``
        is LaBER's weight times the row's own (PER's, when a ``PrioritizedSampler`` drew ``large``).
        """
        kept = self.selection(large)
        out = large[kept.index]
        weight_key, priority_key = self._keys
        prior = out.get(weight_key, None)
        out.set(weight_key, kept.weight if prior is None else kept.weight * prior.to(kept.weight.dtype))
        if kept.target is not None:
            out.set(TARGET, kept.target)
        if kept.td_error is not None:
            out.set(priority_key, kept.td_error)
        return out

    def selection(self, large: TensorDictBase, batch_size: Optional[int] = None) -> Selection:
        """Which rows of ``large`` LaBER keeps (positions into it), their weights and targets.

        ``batch_size`` overrides ``B`` (:class:`torchsample.LaBERSampler` passes the buffer's).
        """
        if large.batch_dims != 1:
            raise ValueError(f"LaBER expects a large batch with one batch dimension, got batch_size={tuple(large.batch_size)}")
        N = large.batch_size[0]
        if N == 0:
            raise ValueError("LaBER got an empty large batch: the buffer holds no data")
        B = self.batch_size if batch_size is None else batch_size
        generator = self.__dict__["_generator"]
        surrogate = self.__dict__["_surrogate"]
        with torch.no_grad():
            if surrogate is None:
                critic = self.__dict__["_critic"]
                pred, target = critic.prediction(large), critic.target(large)
            else:
                pred, target = surrogate(large)
        options = dict(weighting=self.weighting, eps=self.eps)
        if self.rng_state is not None and self.rng_state.device == pred.device:
            options["rng_state"] = self.rng_state  # seeded from generator, if any, at construction
        else:
            options["generator"] = generator
        # The kept rows carry their TD target, so that the update does not compute it again.
        keep_target = surrogate is None and target.dim() == 1
        several = self.kind != "categorical" and pred.dim() == 2 and pred.shape[0] > 1
        if not several:
            drawn = laber_select(pred, target, B, surrogate=self.kind, **options)
            return Selection(drawn.index, drawn.weight, target[drawn.index] if surrogate is None else None, None)
        shared_target = target.expand_as(pred) if target.dim() == 1 else target
        if self.critics == "joint":
            per_critic = td_priority(pred, shared_target, loss="huber" if self.kind == "huber" else "l2")
            drawn = laber_downsample(per_critic.square().sum(0).sqrt(), B, **options)
            return Selection(drawn.index, drawn.weight, target[drawn.index] if keep_target else None, None)
        drawn = laber_select(pred, shared_target, B, surrogate=self.kind, **options)  # [C, B]
        # Column 0: the actor's rows, uniform over the large batch; column 1 + c: critic c's rows.
        uniform = torch.randint(N, (B, 1), device=pred.device, generator=generator)
        index = torch.cat([uniform, drawn.index.T], 1)
        weight = torch.cat([torch.ones_like(drawn.weight[:1].T), drawn.weight.T], 1)
        # PER's priority of every kept row: its largest |TD| over the critics, before this update.
        td_error = (pred - shared_target).abs().amax(0)[index]
        return Selection(index, weight, target[index] if keep_target else None, td_error)

    @property
    def _keys(self) -> tuple:
        keys = getattr(self.loss_module, "tensor_keys", None)
        return ("priority_weight", "td_error") if keys is None else (keys.priority_weight, keys.priority)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(batch_size={self.batch_size}, weighting={self.weighting!r}, "
                f"surrogate={self.kind!r}, critics={self.critics!r}, eps={self.eps})")
