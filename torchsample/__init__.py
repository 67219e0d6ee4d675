"""torchsample: which transitions a deep-RL agent learns from.

LaBER (Large Batch Experience Replay, Lahire et al., ICML 2022) for TorchRL: draw a large batch
uniformly, score each transition with a cheap surrogate of its gradient norm, and down-sample the
training batch in proportion to it, with importance weights.
"""
from .losses import C51Loss, LaBERLoss, categorical_projection, pred_and_target
from .ops import LaBERSample, laber_downsample, laber_select
from .transform import LaBER
from .update import make_update
from .surrogates import categorical_priority, td_priority
from .codes import SURROGATES, WEIGHTINGS, Surrogate, Weighting
from .weights import importance_weights

__all__ = [
    "LaBER",
    "LaBERLoss",
    "C51Loss",
    "categorical_projection",
    "pred_and_target",
    "make_update",
    "LaBERSample",
    "laber_downsample",
    "laber_select",
    "td_priority",
    "categorical_priority",
    "importance_weights",
    "WEIGHTINGS",
    "SURROGATES",
    "Surrogate",
    "Weighting",
]
__version__ = "0.1.0"
