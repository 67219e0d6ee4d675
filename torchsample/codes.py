"""The integer codes of the surrogates and weightings, defined once.

The fused kernel branches on them as ``tl.constexpr``; the ops, the float32 reference and the tests
import them from here. The public API speaks in names (``surrogate="huber"``, ``weighting="max"``);
:func:`Surrogate.of` and :func:`Weighting.of` turn a name into its code.

Examples:
    >>> from torchsample.codes import Surrogate, Weighting
    >>> Surrogate.of("huber"), int(Weighting.of("max"))
    (<Surrogate.HUBER: 2>, 2)
    >>> Surrogate.CATEGORICAL.label
    'categorical'
"""
from __future__ import annotations

from enum import IntEnum

__all__ = ["Surrogate", "Weighting", "SURROGATES", "WEIGHTINGS"]


class _Named(IntEnum):
    @property
    def label(self) -> str:
        """The name the public API uses (``"l2"``, ``"mean"``...)."""
        return self.name.lower()

    @classmethod
    def of(cls, label: str):
        """The code of ``label``; a ``ValueError`` that lists the choices otherwise."""
        try:
            return cls[label.upper()]
        except (KeyError, AttributeError):
            raise ValueError(f"{cls.__name__.lower()} must be one of {cls.labels()}, got {label!r}") from None

    @classmethod
    def labels(cls) -> tuple[str, ...]:
        return tuple(member.label for member in cls)


class Surrogate(_Named):
    """What the kernel computes a priority from: ``p_i`` itself, or a surrogate of the gradient norm."""

    PRIORITY = 0  # ready priorities (laber_downsample)
    L2 = 1  # |pred - target|
    HUBER = 2  # min(|pred - target|, delta)
    CATEGORICAL = 3  # ||softmax(pred) - target||_2 over the atoms

    @classmethod
    def labels(cls) -> tuple[str, ...]:
        # The surrogates a caller may name; ready priorities go through laber_downsample.
        return tuple(member.label for member in cls if member is not cls.PRIORITY)


class Weighting(_Named):
    """The importance weights of :mod:`torchsample.weights`."""

    MEAN = 0  # mean_j(p_j) / p_i
    LAZY = 1  # 1 / p_i
    MAX = 2  # min_{j in minibatch}(p_j) / p_i


SURROGATES = Surrogate.labels()  # ("l2", "huber", "categorical")
WEIGHTINGS = Weighting.labels()  # ("mean", "lazy", "max")
