"""The integer codes of the surrogate ladder, the losses and the weightings, defined once.

Three names, three meanings:

* :class:`Surrogate`, the rung of the ladder: which per-sample gradient norm scores a row,
  ``"output"`` (the loss gradient at the network's output), ``"last-layer"`` (with respect to the
  last linear layer's weight and bias) or ``"exact"`` (with respect to every parameter);
* :class:`LossKind`, the formula of the loss gradient at the output: ``"l2"``, ``"huber"`` or
  ``"categorical"`` (C51's cross-entropy), or ready priorities;
* :class:`Weighting`, the importance weights.

The fused kernel branches on them as ``tl.constexpr``; the ops, the float32 reference and the tests
import them from here. The public API speaks in names (``surrogate="last-layer"``, ``loss="huber"``,
``weighting="max"``); ``.of(name)`` turns a name into its code, with a ``ValueError`` that lists the
choices.

Examples:
    >>> from torchsample.codes import LossKind, Surrogate, Weighting
    >>> Surrogate.of("last-layer"), LossKind.of("huber"), int(Weighting.of("max"))
    (<Surrogate.LAST_LAYER: 1>, <LossKind.HUBER: 2>, 2)
    >>> Surrogate.LAST_LAYER.label, LossKind.CATEGORICAL.label
    ('last-layer', 'categorical')
    >>> Surrogate.of("full")
    Traceback (most recent call last):
    ...
    ValueError: surrogate must be one of ('output', 'last-layer', 'exact'), got 'full'
"""

from __future__ import annotations

from enum import IntEnum

__all__ = [
    "Surrogate",
    "LossKind",
    "Weighting",
    "SURROGATES",
    "LOSS_KINDS",
    "WEIGHTINGS",
    "LOSS_CODES",
    "WEIGHTING_CODES",
]

# The keyword each enum's names are passed as, for the error messages.
_KEYWORDS = {"Surrogate": "surrogate", "LossKind": "loss", "Weighting": "weighting"}


class _Named(IntEnum):
    @property
    def label(self) -> str:
        """The name the public API uses (``"last-layer"``, ``"l2"``, ``"mean"``...)."""
        return self.name.lower().replace("_", "-")

    @classmethod
    def of(cls, label: str):
        """The code of ``label``; a ``ValueError`` that lists the choices otherwise.

        A lookup in a plain dict made at import: dynamo (torch 2.11) cannot trace iterating an
        Enum class, and the ops resolve codes inside ``torch.compile``d regions.
        """
        member = _MEMBERS[cls.__name__].get(label)
        if member is None:
            raise ValueError(f"{_KEYWORDS[cls.__name__]} must be one of {cls.labels()}, got {label!r}")
        return member

    @classmethod
    def labels(cls) -> tuple[str, ...]:
        return _LABELS[cls.__name__]


class Surrogate(_Named):
    """The rung of the ladder: the per-sample gradient norm a row is scored by."""

    OUTPUT = 0  # ||dl_i / d out_i||: |q - y|, min(|q - y|, delta), ||softmax(z) - m||
    LAST_LAYER = 1  # ||dl_i / d(W, b)|| of the last Linear: ||g_i|| sqrt(||h_i||^2 + 1)
    EXACT = 2  # ||dl_i / d theta|| over every parameter (ghost norms)


class LossKind(_Named):
    """What the kernel computes a row's output gradient norm from: ``p_i`` itself, or a loss's formula."""

    PRIORITY = 0  # ready priorities (laber_downsample)
    L2 = 1  # |pred - target|
    HUBER = 2  # min(|pred - target|, delta)
    CATEGORICAL = 3  # ||softmax(pred) - target||_2 over the atoms


class Weighting(_Named):
    """The importance weights of :mod:`torchsample.weights`."""

    MEAN = 0  # mean_j(p_j) / p_i
    LAZY = 1  # 1 / p_i
    MAX = 2  # min_{j in minibatch}(p_j) / p_i


# label -> member and the public labels of each enum, made once here (see _Named.of).
_MEMBERS: dict[str, dict[str, _Named]] = {
    Surrogate.__name__: {m.label: m for m in Surrogate},
    LossKind.__name__: {
        m.label: m for m in LossKind if m is not LossKind.PRIORITY
    },  # ready priorities: laber_downsample
    Weighting.__name__: {m.label: m for m in Weighting},
}
_LABELS = {name: tuple(members) for name, members in _MEMBERS.items()}

SURROGATES = Surrogate.labels()  # ("output", "last-layer", "exact")
LOSS_KINDS = LossKind.labels()  # ("l2", "huber", "categorical")
WEIGHTINGS = Weighting.labels()  # ("mean", "lazy", "max")
# Plain label -> int maps for the ops' hot path and traced regions.
LOSS_CODES = {label: int(member) for label, member in _MEMBERS[LossKind.__name__].items()}
WEIGHTING_CODES = {label: int(member) for label, member in _MEMBERS[Weighting.__name__].items()}
