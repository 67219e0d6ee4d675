"""The surrogate ladder on a TorchRL loss: each row's gradient norm at a rung, through the loss's view.

===============  ==========================================================  ======================
``surrogate``    score of row ``i``                                           cost
===============  ==========================================================  ======================
``"output"``     ``||g_i||``, ``g_i = dl_i / d out_i``: ``2 |q_i - y_i|``     one forward
                 (l2, TorchRL's ``(q - y)^2``), ``min(|q_i - y_i|, 1)``
                 (smooth_l1), ``||softmax(z_i) - m_i||_2`` (C51)
``"last-layer"`` ``||g_i|| sqrt(||h_i||^2 + 1)`` (``||g_i|| ||h_i||`` for a    one forward
                 last layer without bias): the norm of the gradient with
                 respect to the last ``nn.Linear``, ``h_i`` its input
``"exact"``      ``||grad_theta l_i||`` over every parameter of the critic     forward + backward
                 (ghost norms for ``nn.Linear`` / ``nn.Conv2d``, else
                 ``vmap(grad)``)
===============  ==========================================================  ======================

The formulas are :mod:`torchsample.surrogates`'; the view (:mod:`torchsample.critics`) says what the
critic predicts and targets. Each rung equals ``torch.func``'s per-sample gradient norm of ``l_i``
over its parameters (the tests hold it to that), so the three are on one scale: ``output <=
last-layer <= exact``. :class:`torchsample.LaBER` draws from them, GER keeps ``"exact"`` as PER's
priorities, and the diagnostics compare each rung's sampling distribution to ``"exact"``'s.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from tensordict import TensorDictBase
from torch import Tensor, nn

from .codes import SURROGATES
from .critics import Critic
from .gradnorms import GRAD_NORM_METHODS, LayerInputCapture
from .surrogates import critic_priorities
from .views import critic_of

__all__ = ["Scores", "score_rows", "grad_norm_scores"]


class Scores(NamedTuple):
    """What a rung computes on a batch of rows.

    Attributes:
        pred: the critic's prediction (``[N]``, ``[C, N]``, ``[N, K]``); ``None`` for ``"exact"``.
        target: the TD target (``[N]``, ``[N, K]``), no graph.
        features: ``"last-layer"``: the last layer's input ``[..., N, D]``; else ``None``.
        norms: the rows' gradient norms at the rung, ``[N]`` or ``[C, N]``, float32, no graph
            (``None`` where the caller computes them itself: ``norms=False``).
    """

    pred: Optional[Tensor]
    target: Tensor
    features: Optional[Tensor]
    norms: Optional[Tensor]


def score_rows(
    critic: Critic,
    td: TensorDictBase,
    surrogate: str = "output",
    *,
    target: Optional[Tensor] = None,
    capture: Optional[LayerInputCapture] = None,
    method: str = "auto",
    norms: bool = True,
) -> Scores:
    """The rows of ``td`` at the rung ``surrogate``, with the prediction and target they came from.

    ``target`` (default ``critic.target(td)``): pass the same one to compare rungs, as SAC's and TD3's
    targets are random. ``capture``: an entered capture of the last layer (``"last-layer"``; see
    :meth:`torchsample.critics.Critic.prediction_and_features`). ``method``: ``"exact"``'s, as in
    :func:`torchsample.gradnorms.exact_grad_norms`. ``norms=False`` leaves the output and last-layer
    norms to the caller (:class:`torchsample.LaBER`: the fused op computes them with the draw).
    """
    if surrogate not in SURROGATES:
        raise ValueError(f"surrogate must be one of {SURROGATES}, got {surrogate!r}")
    if method not in GRAD_NORM_METHODS:
        raise ValueError(f"method must be one of {GRAD_NORM_METHODS}, got {method!r}")
    if target is None:
        target = critic.target(td)
    if surrogate == "exact":
        return Scores(None, target, None, critic.exact_grad_norms(td, target, method))
    with torch.no_grad():
        if surrogate == "last-layer":
            pred, features = critic.prediction_and_features(td, capture)
        else:
            pred, features = critic.prediction(td), None
        if not norms:
            return Scores(pred, target, features, None)
        return Scores(
            pred,
            target,
            features,
            critic_priorities(
                pred, target, critic.loss_kind, features=features, bias=features is None or critic.last_layer_bias
            ),
        )


def grad_norm_scores(
    loss: nn.Module,
    td: TensorDictBase,
    surrogate: str = "exact",
    *,
    target: Optional[Tensor] = None,
    method: str = "auto",
) -> Tensor:
    """Per-row gradient norms of a TorchRL loss's per-sample critic loss ``l_i``, at a rung of the ladder
    (the module's table).

    Twin critics (SAC, TD3): every critic on every row, ``[C, N]``. Their targets are random
    (SAC's next action, TD3's smoothing noise): pass the same ``target`` to compare rungs.

    Args:
        loss: a TorchRL loss with a :class:`torchsample.critics.Critic` view (``DQNLoss``,
            ``DistributionalDQNLoss`` / :class:`torchsample.C51Loss`, ``SACLoss``, ``TD3Loss``).
        td: ``[N]`` transitions (e.g. a large batch of ``4 * B``).
        surrogate: ``"exact"`` (default), ``"last-layer"`` or ``"output"``.
        target: the TD targets (``[N]``, or ``[N, K]`` for C51); default the critic's own.
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
    return score_rows(critic_of(loss), td, surrogate, target=target, method=method).norms
