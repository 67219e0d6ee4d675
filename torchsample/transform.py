"""``torchsample.LaBER``: which rows of a large batch LaBER keeps, as a TorchRL module.

``laber(large)`` scores every row of a large batch with the loss module's own networks at a rung of
the surrogate ladder (``"output"`` and ``"last-layer"``: one forward, no gradient, then the fused op
:func:`torchsample.laber_select`; ``"exact"``: ghost norms, then :func:`torchsample.laber_downsample`)
and returns the kept rows with their importance weights in ``"priority_weight"``.
:class:`torchsample.LaBERSampler` puts the same selection on TorchRL's sampler extension point, so
that a replay buffer samples with it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import NamedTuple, Optional

import torch
from tensordict import TensorDictBase
from tensordict.utils import NestedKey
from torch import Tensor, nn
from torchrl.envs.transforms import Transform

from .codes import LOSS_KINDS, SURROGATES, WEIGHTINGS
from .critics import TARGET, Critic
from .gradnorms import capture_last_layer_input
from .ops import LaBERSample, laber_downsample, laber_select
from .scoring import score_rows
from .surrogates import critic_priorities, joint_norm, td_error
from .views import PrivateCritic

__all__ = ["LaBER", "Keys", "CRITICS"]

CRITICS = ("independent", "joint")


class Keys(NamedTuple):
    """The tensordict keys LaBER writes, the loss module's own (``loss.tensor_keys``) where it has them."""

    weight: NestedKey = "priority_weight"  # LaBER's importance weight (times the row's own)
    priority: NestedKey = "td_error"  # PER's priority of the kept rows (twin critics, [B, 1 + C])
    target: NestedKey = TARGET  # the TD target LaBER computed, reused by LaBERLoss


class LaBER(Transform):
    """Large Batch Experience Replay (Lahire, Geist and Rachelson, ICML 2022): keep ``B`` rows of a large batch.

    LaBER scores each row of a large batch (``m * B`` rows drawn by the buffer) with its per-sample
    gradient norm, or a surrogate of it, computed with the loss's own networks, and keeps ``B`` of
    them, drawn i.i.d. with probability ``p_i / sum_j p_j``, with importance weights
    (``weighting``: ``mean_j(p_j) / p_i`` by default) in ``"priority_weight"``. The rung of the
    ladder (``surrogate``, :func:`torchsample.grad_norm_scores`):

    * ``"output"`` (default; the paper's): the gradient norm at the network's output, one no-grad
      forward. It follows the loss (:mod:`torchsample.surrogates`, :mod:`torchsample.critics`):
      ``2 |q - y|`` for ``DQNLoss(loss_function="l2")``, ``min(|q - y|, 1)`` for ``"smooth_l1"``,
      ``||softmax(z) - m||_2`` for C51, one priority row per critic for ``SACLoss`` / ``TD3Loss``;
    * ``"last-layer"``: that times ``sqrt(||h_i||^2 + 1)`` (``||h_i||`` for a last layer without
      bias), ``h_i`` the input of the last ``nn.Linear`` in the same forward: the exact gradient norm
      with respect to the last layer's parameters (App. C: most of the per-sample variation is there);
    * ``"exact"`` (exact-gradient LaBER): the gradient norm over every parameter of the critic, by
      ghost norms (one forward and one backward of the large batch, grad enabled locally).

    Two ways to use it:

    * ``laber(large)``, the functional call, on a large batch (e.g. ``rb.sample()`` from a buffer of
      batch size ``m * B``): returns the kept rows, each with the ``"index"`` it had in ``large``
      (its storage index). Where ``large`` carries ``"priority_weight"`` (PER's, from a
      ``PrioritizedSampler``), the kept rows' PER weights multiply LaBER's (PER-LaBER).
    * ``TensorDictReplayBuffer(..., sampler=LaBERSampler(laber, m=4), batch_size=B)``: the buffer
      samples through LaBER (:class:`torchsample.LaBERSampler`).

    LaBER is not a transform of a buffer or an environment (``rb.append_transform(laber)``,
    ``Compose(laber)``, ``TransformedEnv(env, laber)`` raise a ``TypeError``): it keeps fewer rows than it
    is given, which breaks what TorchRL does with the sample after its transforms; on a buffer LaBER goes
    in as the sampler, above.

    Twin critics (``critics=``): ``"independent"`` (the paper's) draws ``B`` rows per critic from
    its own priorities and returns a ``[B, 1 + C]`` batch: column 0 holds ``B`` uniform rows of
    the large batch for the actor, column ``1 + c`` critic ``c``'s rows; ``"joint"`` draws one set
    of ``[B]`` rows from ``sqrt(sum_c p_c^2)``. :class:`torchsample.LaBERLoss` trains each critic on
    its rows, weighted, and the actor unweighted. The kept rows carry their TD target
    (``"target_value"``), which the update reuses, and, for ``[B, 1 + C]``, PER's ``"td_error"``.

    The transform holds the loss module without registering it: it stays out of ``state_dict``
    and out of ``eval()``. The call traces under ``torch.compile(fullgraph=True)`` for the output
    and last-layer rungs (the last layer's forward hook is registered once, here); ``"exact"``
    registers hooks and runs a backward inside the call, which breaks the graph.

    Args:
        loss_module: the TorchRL loss whose critic is trained on the kept rows.
        batch_size: ``B``, rows kept (the large batch is e.g. ``4 * B`` rows).
        weighting: ``"mean"`` (default), ``"lazy"`` or ``"max"``.
        eps: added to every priority (1e-6).
        surrogate: ``"output"`` (default), ``"last-layer"`` or ``"exact"``.
        prediction: ``None`` (the loss's own, :func:`torchsample.critic_of`), or a callable
            ``td -> (pred, target)`` for any other loss, ``td -> (pred, target, features)`` with
            ``surrogate="last-layer"``; not with ``"exact"``, which needs the network.
        loss: with ``prediction``: the formula of the loss's output gradient, ``"l2"`` (default),
            ``"huber"`` or ``"categorical"``; without, it follows the loss module.
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
        >>> exact = LaBER(loss, batch_size=32, surrogate="exact")   # exact-gradient LaBER
        >>> exact
        LaBER(batch_size=32, surrogate='exact', loss='huber', weighting='mean', critics='independent', eps=1e-06)
        >>> exact(large).batch_size
        torch.Size([32])
    """

    def __init__(
        self,
        loss_module: nn.Module,
        batch_size: int,
        *,
        weighting: str = "mean",
        eps: float = 1e-6,
        surrogate: str = "output",
        prediction: Optional[Callable[[TensorDictBase], tuple[Tensor, ...]]] = None,
        loss: Optional[str] = None,
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
        if surrogate not in SURROGATES:
            raise ValueError(f"surrogate must be one of {SURROGATES}, got {surrogate!r}")
        if prediction is not None and not callable(prediction):
            raise TypeError(
                f"prediction must be a callable td -> (pred, target) or None, got {type(prediction).__name__}"
            )
        if loss is not None and loss not in LOSS_KINDS:
            raise ValueError(f"loss must be one of {LOSS_KINDS}, got {loss!r}")
        if prediction is None and loss is not None:
            raise ValueError("loss= names the formula of a custom prediction=; without one it follows the loss module")
        if prediction is not None and surrogate == "exact":
            raise ValueError("surrogate='exact' needs the loss module's networks: it cannot score a custom prediction=")
        # Held outside nn.Module's registry: not a submodule, so not in state_dict() nor eval().
        self.__dict__["_loss_module"] = loss_module
        self.__dict__["_generator"] = generator
        if prediction is None:
            # Rows are scored with a private copy of the loss (its own modules, the live parameters): the
            # scoring may run in TorchRL's prefetch threads while the training thread runs the user's modules.
            private = PrivateCritic(loss_module)
            self.__dict__["_private"] = private
            self.loss_kind = private.view.loss_kind
            if surrogate == "last-layer":
                private.on_new_view(self._capture_last_layer)
        else:
            self.loss_kind = "l2" if loss is None else loss
        self.__dict__["_prediction"] = prediction
        self.surrogate = surrogate
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

    @property
    def _critic(self) -> Optional[Critic]:
        """The view LaBER scores with: of its private copy of the loss (None with a custom ``prediction``)."""
        private = self.__dict__.get("_private")
        return None if private is None else private.view

    def _capture_last_layer(self, critic: Critic) -> None:
        # The hook goes on the private copy's last layer, once per copy, so that the selection traces under
        # torch.compile(fullgraph=True); it records only while LaBER scores (Critic.prediction_and_features).
        capture = capture_last_layer_input(critic.network).__enter__()
        capture.recording = False
        self.__dict__["_capture"] = capture

    # LaBER keeps fewer rows than it is given: in a container's transforms (a replay buffer's, where
    # TorchRL's TensorDictReplayBuffer writes the large batch's "index" and weights into the sample after
    # its transforms ran and fails with "Failed to set the metadata"; an environment's, where it means
    # nothing) it would break what comes after it. Every container sets itself here (Transform's public
    # contract: Compose, TransformedEnv, a buffer's append_transform), so this is where it is refused.
    def set_container(self, container) -> None:
        raise TypeError(
            "LaBER is not a transform of a replay buffer or an environment: it keeps fewer rows than it is given, "
            "and TorchRL writes the large batch's index and weights into the sample after its transforms ran. "
            "Sample through LaBER instead: TensorDictReplayBuffer(..., sampler=torchsample.LaBERSampler(laber, m=4), "
            "batch_size=B), or call laber(large) on a large batch you drew"
        )

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        return self.select(tensordict)

    def select(self, large: TensorDictBase) -> TensorDictBase:
        """The rows LaBER keeps from the large batch ``large``, with their weights (see the class doc).

        ``[B]`` rows, or ``[B, 1 + C]`` for twin critics drawn independently. ``"priority_weight"``
        is LaBER's weight times the row's own (PER's, when a ``PrioritizedSampler`` drew ``large``).
        """
        kept = self.selection(large)
        out = large[kept.index]
        keys = self.keys
        prior = out.get(keys.weight, None)
        out.set(keys.weight, kept.weight if prior is None else kept.weight * prior.to(kept.weight.dtype))
        if kept.target is not None:
            out.set(keys.target, kept.target)
        if kept.td_error is not None:
            out.set(keys.priority, kept.td_error)
        return out

    def selection(
        self, large: TensorDictBase, batch_size: Optional[int] = None, generator: Optional[torch.Generator] = None
    ) -> LaBERSample:
        """Which rows of ``large`` LaBER keeps (positions into it), their weights and targets.

        ``batch_size`` overrides ``B`` and ``generator`` this module's random state
        (:class:`torchsample.LaBERSampler` passes the buffer's).
        """
        if not isinstance(large, TensorDictBase):
            raise TypeError(
                f"LaBER scores a TensorDict of transitions with the loss's networks, got {type(large).__name__}"
            )
        if large.batch_dims != 1:
            raise ValueError(
                f"LaBER expects a large batch with one batch dimension, got batch_size={tuple(large.batch_size)}"
            )
        N = large.batch_size[0]
        if N == 0:
            raise ValueError("LaBER got an empty large batch: the buffer holds no data")
        B = self.batch_size if batch_size is None else batch_size
        own_state = generator is None
        generator = self.__dict__["_generator"] if generator is None else generator
        custom = self.__dict__["_prediction"] is not None
        with torch.no_grad(), _scoring():
            pred, target, features, exact = self._score(large)
        options = dict(weighting=self.weighting, eps=self.eps)
        scores = pred if exact is None else exact
        if own_state and self.rng_state is not None and self.rng_state.device == scores.device:
            options["rng_state"] = self.rng_state  # seeded from generator, if any, at construction
        else:
            options["generator"] = generator
        # The kept rows carry their TD target, so that the update does not compute it again.
        keep_target = not custom and target.dim() == 1
        several = (exact is not None or self.loss_kind != "categorical") and scores.dim() == 2 and scores.shape[0] > 1
        if not several:
            drawn = self._draw(pred, target, features, exact, B, options)
            return LaBERSample(drawn.index, drawn.weight, drawn.priority, None if custom else target[drawn.index])
        shared_target = target.expand(scores.shape) if target.dim() == 1 else target
        if self.critics == "joint":
            # The norm over every critic's parameters: sqrt(sum_c p_c^2).
            joint = (
                joint_norm(exact)
                if exact is not None
                else critic_priorities(
                    pred, shared_target, self.loss_kind, features=features, bias=self._bias, reduce="norm"
                )
            )
            drawn = laber_downsample(joint, B, **options)
            return LaBERSample(drawn.index, drawn.weight, drawn.priority, target[drawn.index] if keep_target else None)
        drawn = self._draw(pred, shared_target, features, exact, B, options)  # [C, B]
        # Column 0: the actor's rows, uniform over the large batch; column 1 + c: critic c's rows.
        on = scores.device if generator is None else generator.device
        uniform = torch.randint(N, (B, 1), device=on, generator=generator).to(scores.device)
        index = torch.cat([uniform, drawn.index.T], 1)
        weight = torch.cat([torch.ones_like(drawn.weight[:1].T), drawn.weight.T], 1)
        if pred is None:  # "exact" scored without the critics' outputs; PER's priority needs them
            with torch.no_grad(), _scoring():
                pred = self._critic.prediction(large)
        # PER's priority of every kept row: its largest |TD| over the critics, before this update.
        return LaBERSample(
            index, weight, drawn.priority, target[index] if keep_target else None, td_error(pred, shared_target)[index]
        )

    def _score(self, large: TensorDictBase) -> tuple:
        """``(pred, target, features, exact)`` of the large batch for this rung: ``features`` for
        ``"last-layer"``, ``exact`` (the norms; ``pred`` is then ``None``) for ``"exact"``."""
        prediction = self.__dict__["_prediction"]
        if prediction is not None:
            out = prediction(large)
            if len(out) != (3 if self.surrogate == "last-layer" else 2):
                raise ValueError(
                    f"prediction must return (pred, target) for surrogate='output' and "
                    f"(pred, target, features) for 'last-layer', got {len(out)} values"
                )
            pred, target, *features = out
            return pred, target, features[0] if features else None, None
        scores = score_rows(self._critic, large, self.surrogate, capture=self.__dict__.get("_capture"), norms=False)
        return scores.pred, scores.target, scores.features, scores.norms  # norms: the "exact" rung's only

    def _draw(self, pred, target, features, exact, B: int, options: dict):
        if exact is not None:
            return laber_downsample(exact, B, **options)
        return laber_select(
            pred,
            target,
            B,
            loss=self.loss_kind,
            surrogate=self.surrogate,
            features=features,
            bias=self._bias,
            **options,
        )

    @property
    def _bias(self) -> bool:
        """Whether the last layer has a bias: only the last-layer rung's formula reads it, so only that rung
        looks for the layer (a critic without ``nn.Linear`` scores with the others); a custom
        ``prediction``'s last layer is assumed to have one."""
        critic = self._critic
        return True if critic is None or self.surrogate != "last-layer" else critic.last_layer_bias

    @property
    def keys(self) -> Keys:
        """Where the kept rows' weight, PER priority and TD target go: the loss module's
        ``tensor_keys.priority_weight`` and ``.priority`` where it has them."""
        keys = getattr(self.loss_module, "tensor_keys", None)
        return Keys() if keys is None else Keys(keys.priority_weight, keys.priority)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(batch_size={self.batch_size}, surrogate={self.surrogate!r}, "
            f"loss={self.loss_kind!r}, weighting={self.weighting!r}, critics={self.critics!r}, eps={self.eps})"
        )


_SCORING = threading.Lock()


def _scoring():
    """One eager scoring at a time: the private copy's modules are swapped into while it scores (two prefetch
    threads, or a prefetch thread and a functional call). A compiled call traces no lock, and runs alone."""
    return contextlib.nullcontext() if torch.compiler.is_compiling() else _SCORING
