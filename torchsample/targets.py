"""What each TorchRL loss predicts and is regressed on: one registration per loss family.

LaBER reads a loss twice: :class:`torchsample.LaBER` scores the large batch with the loss's own
networks, target parameters and value estimator (no gradient), and :class:`torchsample.LaBERLoss`
trains on the kept rows, reusing the targets LaBER computed. Both go through the :class:`Critic`
view of the loss that :func:`critic_of` returns, so the two passes cannot disagree:

=============================  ==============================  ===================================
loss                           ``prediction(td)``              ``target(td)``
=============================  ==============================  ===================================
``DQNLoss`` (Double DQN too)   ``q(s, a)``, ``[N]``            ``r + gamma * q'(s', a')``, ``[N]``
``DistributionalDQNLoss``      ``log p(s, a)``, ``[N, K]``     projected ``m``, ``[N, K]`` (C51)
``SACLoss`` / ``TD3Loss``      ``q_c(s, a)``, ``[C, N]``       soft / clipped twin-min, ``[N]``
=============================  ==============================  ===================================

The same view scores rows at each rung of the surrogate ladder (:func:`grad_norm_scores`): the loss
gradient norm at the output, with respect to the last linear layer (features captured from the
prediction's own forward) or with respect to every parameter (ghost norms,
:func:`torchsample.gradnorms.exact_grad_norms`).

A family is one :class:`Critic` subclass registered with ``@critic_of.register(LossClass)``;
C51's lives in :mod:`torchsample.c51`, which registers itself, so this module never imports it
(importing any TorchRL part of ``torchsample`` imports it). A user's own loss gets LaBER the same
way, or through ``LaBER(loss, B, prediction=fn)``.

This module alone reads TorchRL's private members: ``SACLoss._version``, ``SACLoss._compute_target_v2``,
``SACLoss._alpha_loss``, ``TD3Loss._vmap_qvalue_network00`` and ``torchrl.objectives.utils._vmap_func``.
Checked against the TorchRL versions in :data:`TORCHRL_CHECKED`.
"""
from __future__ import annotations

import functools
import inspect

import torch
from tensordict import TensorDictBase
from torch import Tensor, nn
from torchrl.envs.utils import step_mdp
from torchrl.objectives import DQNLoss, SACLoss, TD3Loss
from torchrl.objectives.utils import _vmap_func, distance_loss

from .codes import Surrogate
from .gradnorms import (
    GRAD_NORM_METHODS,
    LayerInputCapture,
    capture_last_layer_input,
    exact_grad_norms,
    last_layer_norm,
    output_gradient,
)

__all__ = ["Critic", "critic_of", "pred_and_target", "grad_norm_scores", "swap_params", "TORCHRL_CHECKED", "TARGET"]

TORCHRL_CHECKED = ("0.14.1",)
TARGET = "target_value"  # the TD target LaBER computed for its surrogate, reused by the update

# Swapping parameters in without saving the module's state: with the state saved, dynamo breaks
# C51's objective graph into 7 ("Unexpected type of data placeholder op", torch 2.14, measured).
# tensordict 0.11 (the one that pairs with torch 2.11) has no such option.
_SWAP_OPTIONS = ({"preserve_module_state": False}
                 if "preserve_module_state" in inspect.signature(TensorDictBase.to_module).parameters else {})


def swap_params(params: TensorDictBase, module: nn.Module):
    """``params.to_module(module)`` as a context manager: ``module`` runs with ``params``."""
    return params.to_module(module, **_SWAP_OPTIONS)


class Critic:
    """How LaBER reads one family of TorchRL losses: what the critic predicts, what it is regressed
    on, its per-sample loss and the priority it hands to a ``PrioritizedSampler``.

    Attributes:
        loss: the wrapped TorchRL loss module.
        loss_kind: the formula of the loss gradient at the output (:mod:`torchsample.surrogates`):
            ``"l2"``, ``"huber"`` or ``"categorical"``.
        network: the module whose parameters the critic loss trains; ``params`` those parameters
            (stacked ``[C]`` for twin critics).
        num_critics: ``C``, the critics trained on the rows (1, or 2 for SAC/TD3's twins).
        loss_keys: the keys :class:`torchsample.LaBERLoss` returns for this family.
        forwards: the ``forward`` methods whose critic loss this view reproduces; a subclass of the
            loss with another ``forward`` is refused by :class:`torchsample.LaBERLoss`.
    """

    loss_keys: tuple[str, ...] = ("loss",)
    forwards: tuple = ()

    def __init__(self, loss: nn.Module) -> None:
        self.loss = loss

    @property
    def loss_kind(self) -> str:
        name = self.loss.loss_function
        if name == "l2":
            return "l2"
        if name == "smooth_l1":
            return "huber"
        raise ValueError(f"no LaBER priority for loss_function={name!r}; use 'l2' or 'smooth_l1', or pass prediction=")

    @property
    def num_critics(self) -> int:
        return 1

    @property
    def network(self) -> nn.Module:
        return self.loss.value_network

    @property
    def params(self) -> TensorDictBase:
        return self.loss.value_network_params

    def prediction(self, td: TensorDictBase, params: TensorDictBase | None = None) -> Tensor:
        """The critic's output on the rows of ``td`` with ``params`` (default :attr:`params`), with its graph."""
        raise NotImplementedError

    def prediction_and_features(self, td: TensorDictBase, capture: LayerInputCapture | None = None
                                ) -> tuple[Tensor, Tensor]:
        """``(prediction, h)``: :meth:`prediction` and the input ``h`` (``[..., N, D]``) of :attr:`network`'s
        last ``nn.Linear`` in the same forward (:func:`torchsample.gradnorms.capture_last_layer_input`).

        ``capture``: an entered capture of that layer to record with (LaBER registers its hook once,
        outside any compiled region: registering a hook inside ``torch.compile`` is a graph break,
        "setattr() on unsupported type", torch 2.14); default, one for this call.
        """
        if capture is None:
            with capture_last_layer_input(self.network) as cap:
                return self.prediction_and_features(td, cap)
        capture.recording = True
        pred, features = self._prediction_and_features(td, capture)
        capture.recording = False
        return pred, _check_features(features, pred.shape[:-1] if self.loss_kind == "categorical" else pred.shape)

    def _prediction_and_features(self, td: TensorDictBase, capture: LayerInputCapture) -> tuple[Tensor, Tensor]:
        pred = self.prediction(td)
        return pred, capture.pop()

    def exact_grad_norms(self, td: TensorDictBase, target: Tensor, method: str = "auto") -> Tensor:
        """``[N]``: ``||grad_theta l_i||`` over :attr:`params`, ``l_i`` the per-sample loss against ``target``
        (:func:`torchsample.gradnorms.exact_grad_norms`; grad enabled here, under ``no_grad`` too)."""
        def per_sample_loss(params, td, target):
            return self.per_sample_loss(self.prediction(td, params), target)

        with torch.enable_grad():
            return exact_grad_norms(self.network, per_sample_loss, self.params, td, target.detach(), method=method)

    def grad_norms(self, td: TensorDictBase, surrogate: str = "exact", *, target: Tensor | None = None,
                   method: str = "auto") -> Tensor:
        """:func:`grad_norm_scores` of this critic."""
        rung = Surrogate.of(surrogate)
        if method not in GRAD_NORM_METHODS:
            raise ValueError(f"method must be one of {GRAD_NORM_METHODS}, got {method!r}")
        if target is None:
            target = self.target(td)
        if rung is Surrogate.EXACT:
            return self.exact_grad_norms(td, target, method)
        with torch.no_grad():
            if rung is Surrogate.LAST_LAYER:
                pred, features = self.prediction_and_features(td)
            else:
                pred, features = self.prediction(td), None
            g = output_gradient(pred, target.expand_as(pred), self.loss_kind)
            norm = torch.linalg.vector_norm(g, dim=-1) if self.loss_kind == "categorical" else g.abs()
            return norm if features is None else last_layer_norm(norm, features)

    def target(self, td: TensorDictBase) -> Tensor:
        """What the critic is regressed on, without a graph."""
        raise NotImplementedError

    def per_sample_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        return distance_loss(pred, target, loss_function=self.loss.loss_function)

    def td_error(self, pred: Tensor, target: Tensor, per_sample: Tensor) -> Tensor:
        """PER's priority: ``|TD|`` (TorchRL's ``DQNLoss`` writes ``TD^2``; the PER paper uses ``|TD|``)."""
        return (pred - target).detach().abs()


@functools.singledispatch
def critic_of(loss: nn.Module) -> Critic:
    """The :class:`Critic` view of a TorchRL loss, by its class (the nearest registered base class).

    Examples:
        >>> import torch
        >>> from torchrl.modules import QValueActor
        >>> from torchrl.objectives import DQNLoss
        >>> actor = QValueActor(torch.nn.Linear(4, 2), in_keys=["observation"], action_space="categorical")
        >>> critic = critic_of(DQNLoss(actor, loss_function="smooth_l1", action_space="categorical"))
        >>> type(critic).__name__, critic.loss_kind, critic.num_critics
        ('DQNCritic', 'huber', 1)
    """
    raise TypeError(
        f"no built-in LaBER support for {type(loss).__name__}: pass prediction=callable(td) -> (pred, target) "
        "to LaBER, or register a torchsample.targets.Critic for it with @critic_of.register"
    )


def pred_and_target(loss: nn.Module, td: TensorDictBase) -> tuple[Tensor, Tensor]:
    """``(prediction, target)`` of ``loss`` on the rows of ``td`` (see the module's table).

    The prediction keeps its graph, the target has none. Wrap in ``torch.no_grad()`` for the
    surrogate alone.

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from torchrl.modules import QValueActor
        >>> from torchrl.objectives import DQNLoss
        >>> loss = DQNLoss(QValueActor(torch.nn.Linear(4, 2), in_keys=["observation"],
        ...                action_space="categorical"), delay_value=True, action_space="categorical")
        >>> loss.make_value_estimator(gamma=0.99)
        >>> td = TensorDict({"observation": torch.randn(8, 4), "action": torch.randint(2, (8,)),
        ...     ("next", "observation"): torch.randn(8, 4), ("next", "reward"): torch.randn(8, 1),
        ...     ("next", "done"): torch.zeros(8, 1, dtype=torch.bool),
        ...     ("next", "terminated"): torch.zeros(8, 1, dtype=torch.bool)}, [8])
        >>> q, y = pred_and_target(loss, td)
        >>> q.shape, y.shape
        (torch.Size([8]), torch.Size([8]))
    """
    critic = critic_of(loss)
    return critic.prediction(td), critic.target(td)


def grad_norm_scores(loss: nn.Module, td: TensorDictBase, surrogate: str = "exact", *, target: Tensor | None = None,
                     method: str = "auto") -> Tensor:
    """Per-row gradient norms of a TorchRL loss's per-sample critic loss ``l_i``, at a rung of the ladder.

    ===============  ==========================================================  ======================
    ``surrogate``    score of row ``i``                                           cost
    ===============  ==========================================================  ======================
    ``"output"``     ``||g_i||``, ``g_i = dl_i / d out_i``: ``2 |q_i - y_i|``     one forward
                     (l2, TorchRL's ``(q - y)^2``), ``min(|q_i - y_i|, 1)``
                     (smooth_l1), ``||softmax(z_i) - m_i||_2`` (C51)
    ``"last-layer"`` ``||g_i|| sqrt(||h_i||^2 + 1)``: the norm of the gradient      one forward
                     with respect to the last ``nn.Linear``'s weight and bias,
                     ``h_i`` its input in the same forward
    ``"exact"``      ``||grad_theta l_i||`` over every parameter of the critic     forward + backward
                     (ghost norms for ``nn.Linear`` / ``nn.Conv2d``, else
                     ``vmap(grad)``)
    ===============  ==========================================================  ======================

    Each rung equals ``torch.func``'s per-sample gradient norm of ``l_i`` over its parameters (the
    tests hold it to that), so the three are on one scale: ``output`` is at most ``last-layer``
    (the bias alone), which is at most ``exact``. What LaBER samples from with ``surrogate="output"``
    and ``"last-layer"`` (:func:`torchsample.laber_select`) is this up to the loss's constant factor
    (``|q - y|`` for the l2 loss), which does not change the draw. For the priorities of GER (PER
    with ``"exact"``) and the App. H diagnostics (the total variation of each rung's sampling
    distribution to ``"exact"``'s on the same large batch).

    Twin critics (SAC, TD3): every critic on every row, ``[C, N]``. Their targets are random
    (SAC's next action, TD3's smoothing noise): pass the same ``target`` to compare rungs.

    Args:
        loss: a TorchRL loss with a :class:`Critic` view (``DQNLoss``, ``DistributionalDQNLoss`` /
            :class:`torchsample.C51Loss`, ``SACLoss``, ``TD3Loss``).
        td: ``[N]`` transitions (e.g. a large batch of ``4 * B``).
        surrogate: ``"exact"`` (default), ``"last-layer"`` or ``"output"``.
        target: the TD targets (``[N]``, or ``[N, K]`` for C51); default ``critic_of(loss).target(td)``.
        method: for ``"exact"``: ``"auto"`` (ghost norms where every layer with parameters is a
            plain ``nn.Linear`` / ``nn.Conv2d``, else ``vmap(grad)``), ``"ghost"`` or ``"vmap"``.

    Returns:
        float32 ``[N]``, or ``[C, N]`` for twin critics, without a graph.

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from torchrl.modules import MLP, QValueActor
        >>> from torchrl.objectives import DQNLoss
        >>> from torchsample import grad_norm_scores
        >>> net = MLP(in_features=4, out_features=2, num_cells=[16])
        >>> loss = DQNLoss(QValueActor(net, in_keys=["observation"], action_space="categorical"),
        ...                delay_value=True, action_space="categorical")
        >>> loss.make_value_estimator(gamma=0.99)
        >>> td = TensorDict({"observation": torch.randn(8, 4), "action": torch.randint(2, (8,)),
        ...     ("next", "observation"): torch.randn(8, 4), ("next", "reward"): torch.randn(8, 1),
        ...     ("next", "done"): torch.zeros(8, 1, dtype=torch.bool),
        ...     ("next", "terminated"): torch.zeros(8, 1, dtype=torch.bool)}, [8])
        >>> output, last, exact = (grad_norm_scores(loss, td, s) for s in ("output", "last-layer", "exact"))
        >>> exact.shape, bool((output <= last).all()), bool((last <= exact * (1 + 1e-5)).all())
        (torch.Size([8]), True, True)
    """
    return critic_of(loss).grad_norms(td, surrogate, target=target, method=method)


def _check_features(features: Tensor, rows: torch.Size) -> Tensor:
    """The captured features, if they are one ``[..., N, D]`` row per prediction (the last layer
    sees each row once, through a 2-D input), where :func:`last_layer_norm` is exact."""
    if features.dim() != len(rows) + 1 or features.shape[:-1] != rows:
        raise ValueError(
            f"the last nn.Linear's input has shape {tuple(features.shape)}, not one feature row per transition "
            f"({tuple(rows)} + (D,)): the last-layer rung needs a last layer that sees each row once"
        )
    return features


def gather_action(values: Tensor, action: Tensor, action_space) -> Tensor:
    """``values[..., a]`` for categorical actions, ``(values * one_hot).sum(-1)`` otherwise."""
    if action_space == "categorical":
        if action.ndim != values.ndim:
            action = action.unsqueeze(-1)
        return values.gather(-1, action).squeeze(-1)
    return (values * action.to(values.dtype)).sum(-1)


# ---------------------------------------------------------------------------------------------
# DQN


@critic_of.register(DQNLoss)
class DQNCritic(Critic):
    """``DQNLoss``: ``q(s, a)`` against the value estimator's target with the target parameters;
    with ``double_dqn=True`` the online network picks the next action."""

    forwards = (DQNLoss.forward,)

    def prediction(self, td: TensorDictBase, params: TensorDictBase | None = None) -> Tensor:
        loss = self.loss
        td_copy = td.clone(False)
        with swap_params(loss.value_network_params if params is None else params, loss.value_network):
            loss.value_network(td_copy)
        return gather_action(td_copy.get(loss.tensor_keys.action_value), td.get(loss.tensor_keys.action),
                             loss.action_space)

    @torch.no_grad()
    def target(self, td: TensorDictBase) -> Tensor:
        loss = self.loss
        keys = loss.tensor_keys
        td_copy = td.clone(False)
        next_value = None
        if loss.double_dqn:
            next_td = step_mdp(td_copy, keep_other=False)
            next_td_target = next_td.clone(False)
            with swap_params(loss.value_network_params.data, loss.value_network):
                loss.value_network(next_td)
            with swap_params(loss.target_value_network_params, loss.value_network):
                loss.value_network(next_td_target)
            next_value = gather_action(
                next_td_target.get(keys.action_value), next_td.get(keys.action), loss.action_space
            ).unsqueeze(-1)
        return loss.value_estimator.value_estimate(
            td_copy, target_params=loss.target_value_network_params, next_value=next_value
        ).squeeze(-1)


# ---------------------------------------------------------------------------------------------
# Twin critics: SAC and TD3


class TwinCritics(Critic):
    """``C`` critics (``num_qvalue_nets``) regressed on one shared target; an actor trained against
    them. :meth:`prediction` runs every critic on the same rows, :meth:`rows_prediction` critic
    ``c`` on its own rows ``rows[c]`` (LaBER's independent down-samples)."""

    loss_keys = ("loss_qvalue", "loss_actor")

    @property
    def num_critics(self) -> int:
        return self.loss.num_qvalue_nets

    @property
    def network(self) -> nn.Module:
        return self.loss.qvalue_network

    @property
    def params(self) -> TensorDictBase:
        return self.loss.qvalue_network_params

    def prediction(self, td: TensorDictBase, params: TensorDictBase | None = None) -> Tensor:
        """``[C, N]``: every critic on the rows of ``td``; ``params`` stacked ``[C]`` (default :attr:`params`)."""
        rows = td.select(*self.loss.qvalue_network.in_keys, strict=False).expand(self.num_critics, *td.batch_size)
        return self.rows_prediction(rows, params)

    def rows_prediction(self, rows: TensorDictBase, params: TensorDictBase | None = None) -> Tensor:
        """``[C, B]``: critic ``c`` on ``rows[c]`` (vmapped over the critics' parameters and rows)."""
        loss = self.loss
        vmapped = loss.__dict__.get("_laber_vmap_qvalue_00")
        if vmapped is None:
            vmapped = _vmap_func(loss.qvalue_network, (0, 0), randomness=loss.vmap_randomness)
            loss.__dict__["_laber_vmap_qvalue_00"] = vmapped
        out = vmapped(rows.select(*loss.qvalue_network.in_keys, strict=False),
                      loss.qvalue_network_params if params is None else params)
        return out.get(loss.tensor_keys.state_action_value).squeeze(-1)

    def critic_prediction(self, td: TensorDictBase, params: TensorDictBase) -> Tensor:
        """``[N]``: one critic, ``params`` its own (``self.params[c]``), on the rows of ``td``, by a plain
        forward (the ghost norms' hooks see no ``vmap``)."""
        net = self.loss.qvalue_network
        with swap_params(params, net):
            out = net(td.select(*net.in_keys, strict=False))
        return out.get(self.loss.tensor_keys.state_action_value).squeeze(-1)

    def _prediction_and_features(self, td: TensorDictBase, capture: LayerInputCapture) -> tuple[Tensor, Tensor]:
        """``([C, N], [C, N, D])``: every critic on the rows of ``td`` and its last layer's input. TorchRL's
        vmapped forward would hide the features in the vmap (read outside, they are a dead wrapper), so
        they are read inside a vmap of our own, over the stacked parameters."""
        def one_critic(params, rows):
            return self.critic_prediction(rows, params), capture.pop()

        rows = td.select(*self.network.in_keys, strict=False)
        return torch.vmap(one_critic, (0, None), randomness=self.loss.vmap_randomness)(self.params, rows)

    def exact_grad_norms(self, td: TensorDictBase, target: Tensor, method: str = "auto") -> Tensor:
        """``[C, N]``: critic ``c``'s per-sample gradient norms over its own parameters, one critic at a time."""
        def per_sample_loss(params, td, target):
            return self.per_sample_loss(self.critic_prediction(td, params), target)

        rows = td.select(*self.network.in_keys, strict=False)
        with torch.enable_grad():
            return torch.stack([exact_grad_norms(self.network, per_sample_loss, self.params[c], rows, target.detach(),
                                                 method=method) for c in range(self.num_critics)])

    def actor_losses(self, td: TensorDictBase) -> dict[str, Tensor]:
        """The actor's (and SAC's temperature's) losses on the rows of ``td``, unweighted means."""
        loss_actor, _ = self.loss.actor_loss(td)
        return {"loss_actor": loss_actor.mean()}


@critic_of.register(SACLoss)
class SACCritics(TwinCritics):
    """``SACLoss`` without a value network (SAC v2): the soft twin-min target."""

    loss_keys = ("loss_qvalue", "loss_actor", "loss_alpha")
    forwards = (SACLoss.forward,)

    def __init__(self, loss: SACLoss) -> None:
        if loss._version != 2:
            raise ValueError("LaBER composes with SACLoss without a value network (SAC v2)")
        super().__init__(loss)

    @torch.no_grad()
    def target(self, td: TensorDictBase) -> Tensor:
        return self.loss._compute_target_v2(td)

    def actor_losses(self, td: TensorDictBase) -> dict[str, Tensor]:
        loss_actor, metadata = self.loss.actor_loss(td)
        return {"loss_actor": loss_actor.mean(),
                "loss_alpha": self.loss._alpha_loss(log_prob=metadata["log_prob"]).mean()}


@critic_of.register(TD3Loss)
class TD3Critics(TwinCritics):
    """``TD3Loss``: the target actor's action with clipped noise, twin-min target critics."""

    forwards = (TD3Loss.forward,)

    @torch.no_grad()
    def target(self, td: TensorDictBase) -> Tensor:
        # TD3Loss.value_loss's target, step for step.
        loss = self.loss
        keys = loss.tensor_keys
        td = td.clone(False)
        next_td = step_mdp(td).select(*loss.actor_network.in_keys, strict=False)
        with swap_params(loss.target_actor_network_params, loss.actor_network):
            next_td = loss.actor_network(next_td)
        next_action = next_td.get(keys.action)
        noise = (torch.randn_like(next_action) * loss.policy_noise).clamp(-loss.noise_clip, loss.noise_clip)
        next_td.set(keys.action, (next_action + noise).clamp(loss.min_action, loss.max_action))
        rows = next_td.select(*loss.qvalue_network.in_keys, strict=False).expand(loss.num_qvalue_nets, *next_td.batch_size)
        next_q = loss._vmap_qvalue_network00(rows, loss.target_qvalue_network_params)
        next_q = next_q.get(keys.state_action_value).squeeze(-1).min(0)[0]
        td.set(("next", keys.state_action_value), next_q.unsqueeze(-1))
        return loss.value_estimator.value_estimate(td).squeeze(-1)
