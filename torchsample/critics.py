"""What each TorchRL loss predicts and is regressed on: one :class:`Critic` view per loss family.

LaBER reads a loss twice: :class:`torchsample.LaBER` scores the large batch with the loss's own
networks, target parameters and value estimator (no gradient), and :class:`torchsample.LaBERLoss`
trains on the kept rows, reusing the targets LaBER computed. Both go through the view that
:func:`torchsample.critic_of` returns, so the two passes cannot disagree:

=============================  ==============================  ===================================
loss                           ``prediction(td)``              ``target(td)``
=============================  ==============================  ===================================
``DQNLoss`` (Double DQN too)   ``q(s, a)``, ``[N]``            ``r + gamma * q'(s', a')``, ``[N]``
``DistributionalDQNLoss``      ``log p(s, a)``, ``[N, K]``     projected ``m``, ``[N, K]`` (C51)
``SACLoss`` / ``TD3Loss``      ``q_c(s, a)``, ``[C, N]``       soft / clipped twin-min, ``[N]``
=============================  ==============================  ===================================

The built-in views are registered in one place, :data:`torchsample.views.critic_of`'s table, above this module
(C51's view lives in :mod:`torchsample.c51` with its projection and loss); a user's loss gets LaBER
with ``critic_of.register(MyLoss, MyCritic)``, or through ``LaBER(loss, B, prediction=fn)``. Views
read the loss and never change it.

This module and :mod:`torchsample.c51` alone read TorchRL's private members: ``SACLoss._version``,
``SACLoss._compute_target_v2``, ``SACLoss._alpha_loss``, ``SACLoss._alpha``, ``SACLoss._vmap_qnetworkN0``,
``TD3Loss._vmap_qvalue_network00``, ``LossModule._make_vmap`` and
``torchrl.objectives.utils._vmap_func``. Checked against the TorchRL versions in
:data:`TORCHRL_CHECKED`.
"""

from __future__ import annotations

import copy
import inspect
from typing import Optional

import torch
from tensordict import TensorDictBase
from tensordict.nn import CompositeDistribution, TensorDictParams
from torch import Tensor, nn
from torchrl.envs.utils import step_mdp
from torchrl.objectives import DQNLoss, SACLoss, TD3Loss
from torchrl.objectives.utils import _vmap_func, distance_loss

from .gradnorms import LayerInputCapture, capture_last_layer_input, exact_grad_norms, last_linear
from .surrogates import td_error

__all__ = ["Critic", "private_copy", "swap_params", "TORCHRL_CHECKED", "TARGET"]

TORCHRL_CHECKED = ("0.11.1", "0.14.1")
TARGET = "target_value"  # the TD target LaBER computed for its surrogate, reused by the update

# Swapping parameters in without saving the module's state: with the state saved, dynamo breaks
# C51's objective graph into 7 ("Unexpected type of data placeholder op", torch 2.14, measured).
# tensordict 0.11 (the one that pairs with torch 2.11) has no such option.
_SWAP_OPTIONS = (
    {"preserve_module_state": False}
    if "preserve_module_state" in inspect.signature(TensorDictBase.to_module).parameters
    else {}
)


def swap_params(params: TensorDictBase, module: nn.Module):
    """``params.to_module(module)`` as a context manager: ``module`` runs with ``params``."""
    return params.to_module(module, **_SWAP_OPTIONS)


def private_copy(loss: nn.Module) -> nn.Module:
    """A copy of the TorchRL loss ``loss`` whose modules are its own and whose tensors are ``loss``'s.

    Every ``nn.Module`` is copied (structure, hooks, value estimator, vmapped callers); every
    parameter and buffer, every ``TensorDictParams`` (the loss's live and target parameters) and the
    loss's ``tensor_keys`` are the same objects as ``loss``'s. The copy reads the live values, which
    the optimizer and the target updater change in place, and whatever it swaps into a module to run
    it (``params.to_module(module)``, as TorchRL's losses and value estimators do) or registers on one
    (the last-layer rung's hook) lands on its own modules: a thread that scores rows with the copy
    never changes a module that the training thread is running (issue 28: TorchRL's prefetch threads).

    Examples:
        >>> import torch
        >>> from torchrl.modules import QValueActor
        >>> from torchrl.objectives import DQNLoss
        >>> actor = QValueActor(torch.nn.Linear(4, 2), in_keys=["observation"], action_space="categorical")
        >>> loss = DQNLoss(actor, delay_value=True, action_space="categorical")
        >>> mine = private_copy(loss)
        >>> mine.value_network is loss.value_network, mine.value_network_params is loss.value_network_params
        (False, True)
    """
    shared: dict[int, object] = {id(t): t for t in (*loss.parameters(), *loss.buffers())}
    shared.update((id(m), m) for m in loss.modules() if isinstance(m, TensorDictParams))
    keys = loss.__dict__.get("_tensor_keys")
    if keys is not None:  # set_keys() on the loss reaches the copy
        shared[id(keys)] = keys
    cache = loss.__dict__.get("_cache")
    if cache is not None:  # TorchRL's cached views of the parameters (detached, stacked): made anew, not copied
        shared[id(cache)] = {}
    mine = copy.deepcopy(loss, shared)
    if hasattr(type(mine), "_make_vmap"):
        # TorchRL's vmapped callers are closures over the networks, which a deep copy keeps as they are.
        try:
            mine._make_vmap()
        except NotImplementedError:
            pass
    return mine


class Critic:
    """How LaBER reads one family of TorchRL losses: what the critic predicts, what it is regressed
    on, its per-sample loss and the priority it hands to a ``PrioritizedSampler``.

    Attributes:
        loss: the wrapped TorchRL loss module (read, never changed).
        loss_kind: the formula of the loss gradient at the output (:mod:`torchsample.surrogates`):
            ``"l2"``, ``"huber"`` or ``"categorical"``.
        network: the module whose parameters the critic loss trains; ``params`` those parameters
            (stacked ``[C]`` for twin critics).
        num_critics: ``C``, the critics trained on the rows (1, or 2 for SAC/TD3's twins).
        loss_keys: the losses :class:`torchsample.LaBERLoss` returns for this family (it returns every other
            output of the wrapped loss too).
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

    @property
    def last_layer_bias(self) -> bool:
        """Whether the last ``nn.Linear`` of :attr:`network` has a bias (the last-layer rung's formula)."""
        return last_linear(self.network).bias is not None

    def prediction(self, td: TensorDictBase, params: TensorDictBase | None = None) -> Tensor:
        """The critic's output on the rows of ``td`` with ``params`` (default :attr:`params`), with its graph."""
        raise NotImplementedError

    def prediction_and_features(
        self, td: TensorDictBase, capture: LayerInputCapture | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(prediction, h)``: :meth:`prediction` and the input ``h`` (``[..., N, D]``) of :attr:`network`'s
        last ``nn.Linear`` in the same forward (:func:`torchsample.gradnorms.capture_last_layer_input`).

        ``capture``: an entered capture of that layer to record with (LaBER registers its hook once,
        outside any compiled region, where registering it is a graph break); default, one for this call.
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

    def target(self, td: TensorDictBase) -> Tensor:
        """What the critic is regressed on, without a graph."""
        raise NotImplementedError

    def per_sample_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        return distance_loss(pred, target, loss_function=self.loss.loss_function)

    def td_error(self, pred: Tensor, target: Tensor, per_sample: Optional[Tensor] = None) -> Tensor:
        """PER's priority: ``|TD|`` (:func:`torchsample.surrogates.td_error`; the largest over twin critics)."""
        return td_error(pred, target)

    def actor_loss(self, td: TensorDictBase) -> tuple[Tensor, dict[str, Tensor]]:
        """``(loss_actor, metadata)`` on the rows of ``td``, unweighted: a loss with an actor only."""
        raise TypeError(f"{type(self.loss).__name__} trains no actor: it has no actor_loss")

    def outputs(self, actor_metadata: dict[str, Tensor]) -> dict[str, Tensor]:
        """The wrapped loss's outputs beside its losses (SAC's ``"loss_alpha"``, ``"alpha"``, ``"entropy"``;
        TD3's ``"state_action_value_actor"``), from the actor loss's metadata."""
        return {}


def _check_features(features: Tensor, rows: torch.Size) -> Tensor:
    """The captured features, if they are one ``[..., N, D]`` row per prediction (the last layer
    sees each row once, through a 2-D input), where the last-layer formula is exact."""
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


def reduce_like(loss: nn.Module, per_sample: Tensor) -> Tensor:
    """``per_sample`` reduced as ``loss.reduction`` says (TorchRL's default ``"mean"``); a loss that
    reduced already returns a scalar, which stays as it is."""
    if per_sample.dim() == 0:
        return per_sample
    reduction = getattr(loss, "reduction", "mean")
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "none":
        return per_sample
    return per_sample.mean()


# ---------------------------------------------------------------------------------------------
# DQN


class DQNCritic(Critic):
    """``DQNLoss``: ``q(s, a)`` against the value estimator's target with the target parameters;
    with ``double_dqn=True`` the online network picks the next action."""

    forwards = (DQNLoss.forward,)

    def prediction(self, td: TensorDictBase, params: TensorDictBase | None = None) -> Tensor:
        loss = self.loss
        td_copy = td.clone(False)
        with swap_params(loss.value_network_params if params is None else params, loss.value_network):
            loss.value_network(td_copy)
        return gather_action(
            td_copy.get(loss.tensor_keys.action_value), td.get(loss.tensor_keys.action), loss.action_space
        )

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

    def __init__(self, loss: nn.Module) -> None:
        super().__init__(loss)
        # critic c on rows c, vmapped over the stacked parameters; kept by the view, not the loss.
        self._vmapped_rows = _vmap_func(loss.qvalue_network, (0, 0), randomness=loss.vmap_randomness)

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
        out = self._vmapped_rows(
            rows.select(*loss.qvalue_network.in_keys, strict=False),
            loss.qvalue_network_params if params is None else params,
        )
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
            return torch.stack(
                [
                    exact_grad_norms(
                        self.network, per_sample_loss, self.params[c], rows, target.detach(), method=method
                    )
                    for c in range(self.num_critics)
                ]
            )

    def actor_loss(self, td: TensorDictBase) -> tuple[Tensor, dict[str, Tensor]]:
        """TorchRL's own ``actor_loss`` on the rows of ``td`` (without their weights: the actor is not
        LaBER's), reduced as the loss's ``reduction`` says."""
        loss_actor, metadata = self.loss.actor_loss(td)
        return reduce_like(self.loss, loss_actor), metadata


class SACCritics(TwinCritics):
    """``SACLoss`` without a value network (SAC v2): the soft twin-min target."""

    loss_keys = ("loss_qvalue", "loss_actor", "loss_alpha")
    forwards = (SACLoss.forward,)

    def __init__(self, loss: SACLoss) -> None:
        if loss._version != 2:
            raise ValueError("LaBER composes with SACLoss without a value network (SAC v2)")
        super().__init__(loss)
        # SACLoss resolves its target entropy on first use, from the action spec, and caches it (its own
        # buffer, as its first eager call would); resolved inside torch.compile, building the spec breaks
        # the graph (torchrl 0.11: "setattr" on a Composite class). Resolved here, eagerly, once.
        _ = loss.target_entropy

    @torch.no_grad()
    def target(self, td: TensorDictBase) -> Tensor:
        """``SACLoss._compute_target_v2``'s soft twin-min target, ``r + gamma (min_c Q'_c(s', a') - alpha log
        pi(a' | s'))`` with ``a' ~ pi(. | s')`` by the loss's value estimator, computed without the context
        managers TorchRL wraps it in (``set_exploration_type``, ``set_composite_lp_aggregate``): those set
        tensordict's process-wide state, so entered from a prefetch thread they would switch the exploration
        mode of the collector or the evaluation running in the main thread. ``get_dist`` samples the same way
        under any mode (``det_part`` then ``build_dist_from_params``, as ``get_dist`` does inside its own
        ``set_interaction_type``). A composite action distribution, or ``skip_done_states``, goes through TorchRL's
        own."""
        loss = self.loss
        actor = loss.actor_network
        next_td = td.get("next").copy()
        with swap_params(loss.actor_network_params, actor):
            # get_dist would enter set_interaction_type (process-wide) around the distribution's parameters:
            # the deterministic part, then the distribution, are the same without it.
            dist = actor.build_dist_from_params(actor.det_part(next_td.copy()))
        if loss.skip_done_states or isinstance(dist, CompositeDistribution):
            return loss._compute_target_v2(td)
        if hasattr(dist, "rsample_and_log_prob"):  # TanhNormal (torchrl >= 0.14): the log-prob of the very draw
            action, log_prob = dist.rsample_and_log_prob()
        else:
            action = dist.rsample()
            log_prob = dist.log_prob(action)
        next_td.set(loss.tensor_keys.action, action)
        value = loss._vmap_qnetworkN0(next_td, loss.target_qvalue_network_params).get(
            loss.tensor_keys.state_action_value
        )
        if value.shape[-log_prob.dim() :] != log_prob.shape:
            log_prob = log_prob.unsqueeze(-1)
        td = td.clone(False)
        td.set(("next", loss.value_estimator.tensor_keys.value), (value - loss._alpha * log_prob).min(0)[0])
        return loss.value_estimator.value_estimate(td).squeeze(-1)

    def outputs(self, actor_metadata: dict[str, Tensor]) -> dict[str, Tensor]:
        """``SACLoss.forward``'s: the temperature's loss, the temperature and the policy's entropy."""
        log_prob = actor_metadata["log_prob"]
        return {
            "loss_alpha": reduce_like(self.loss, self.loss._alpha_loss(log_prob=log_prob)),
            "alpha": self.loss._alpha,
            "entropy": -log_prob.detach().mean(),
        }


class TD3Critics(TwinCritics):
    """``TD3Loss``: the target actor's action with clipped noise, twin-min target critics."""

    forwards = (TD3Loss.forward,)

    @torch.no_grad()
    def next_value(self, td: TensorDictBase) -> Tensor:
        """``[N]``: the twin-min target critics' value of the next state at the target actor's action with
        clipped smoothing noise, as ``TD3Loss.value_loss`` computes it (its ``"next_state_value"``)."""
        loss = self.loss
        keys = loss.tensor_keys
        next_td = step_mdp(td).select(*loss.actor_network.in_keys, strict=False)
        with swap_params(loss.target_actor_network_params, loss.actor_network):
            next_td = loss.actor_network(next_td)
        next_action = next_td.get(keys.action)
        noise = (torch.randn_like(next_action) * loss.policy_noise).clamp(-loss.noise_clip, loss.noise_clip)
        next_td.set(keys.action, (next_action + noise).clamp(loss.min_action, loss.max_action))
        rows = next_td.select(*loss.qvalue_network.in_keys, strict=False).expand(
            loss.num_qvalue_nets, *next_td.batch_size
        )
        next_q = loss._vmap_qvalue_network00(rows, loss.target_qvalue_network_params)
        return next_q.get(keys.state_action_value).squeeze(-1).min(0)[0]

    @torch.no_grad()
    def target(self, td: TensorDictBase) -> Tensor:
        # TD3Loss.value_loss's target: the loss's value estimator on the next state's twin-min value. Not by
        # calling value_loss: TorchRL wraps every loss method in set_exploration_type and set_recurrent_mode,
        # process-wide, which scoring in a prefetch thread must not enter (tests/test_prefetch_safety.py); the
        # test on plain rows holds this to TorchRL's own update (tests/test_td3_update.py).
        td = td.clone(False)
        td.set(("next", self.loss.tensor_keys.state_action_value), self.next_value(td).unsqueeze(-1))
        return self.loss.value_estimator.value_estimate(td).squeeze(-1)

    def outputs(self, actor_metadata: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"state_action_value_actor": actor_metadata["state_action_value_actor"]}
