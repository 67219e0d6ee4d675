"""torchsample: which transitions a deep-RL agent learns from.

LaBER (Large Batch Experience Replay, Lahire et al., ICML 2022) for TorchRL: draw a large batch
uniformly, score each transition with a cheap surrogate of its gradient norm, and down-sample the
training batch in proportion to it, with importance weights.

The ops (:func:`laber_downsample`, :func:`laber_select`, the surrogates and weights) need torch
alone (and triton on CUDA); the TorchRL parts (:class:`LaBER`, :class:`LaBERSampler`,
:class:`LaBERLoss`, :class:`GERSampler`, :class:`C51Loss`, :func:`grad_norm_scores`, :func:`make_update`) import torchrl
when first used.

The surrogate ladder (``surrogate=`` of :class:`LaBER`, :func:`laber_select` and
:func:`grad_norm_scores`): ``"output"``, ``"last-layer"``, ``"exact"`` (:data:`SURROGATES`); the
loss whose output gradient is scored (``loss=``): :data:`LOSS_KINDS`.
"""

from __future__ import annotations

import importlib

from .codes import LOSS_KINDS, SURROGATES, WEIGHTINGS, LossKind, Surrogate, Weighting
from .ops import LaBERSample, laber_downsample, laber_select
from .surrogates import critic_priorities, output_gradient, td_error
from .weights import importance_weights

# name -> module, imported on first access (PEP 562): these need torchrl and tensordict.
_TORCHRL_PARTS = {
    "LaBER": "transform",
    "LaBERSampler": "sampler",
    "GERSampler": "sampler",
    "PrioritizedLaBERSampler": "sampler",
    "GERLaBERSampler": "sampler",
    "LaBERLoss": "losses",
    "C51Loss": "c51",
    "categorical_projection": "c51",
    "pred_and_target": "views",
    "critic_of": "views",
    "grad_norm_scores": "scoring",
    "make_update": "update",
    "LFIW": "lfiw",
    "FastSlowReplay": "lfiw",
    "RatioNetwork": "lfiw",
}

__all__ = [
    "LaBER",
    "LaBERSampler",
    "GERSampler",
    "PrioritizedLaBERSampler",
    "GERLaBERSampler",
    "LaBERLoss",
    "C51Loss",
    "categorical_projection",
    "pred_and_target",
    "critic_of",
    "grad_norm_scores",
    "make_update",
    "LFIW",
    "FastSlowReplay",
    "RatioNetwork",
    "LaBERSample",
    "laber_downsample",
    "laber_select",
    "critic_priorities",
    "output_gradient",
    "td_error",
    "importance_weights",
    "Surrogate",
    "LossKind",
    "Weighting",
    "SURROGATES",
    "LOSS_KINDS",
    "WEIGHTINGS",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    module = _TORCHRL_PARTS.get(name)
    if module is None:
        raise AttributeError(f"module 'torchsample' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
