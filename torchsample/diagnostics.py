"""Diagnostics: how good a sampler is, and what shape the network is in.

From the LaBER paper (Lahire et al., 2022):

* :func:`tv_distance` (App. H): the distance between a surrogate's sampling distribution and the one
  of the exact per-sample gradient norms, on the same large batch;
* :func:`second_moment` (App. C): ``E_{i~P}[G_i^T G_i]`` of the importance-weighted gradient estimate,
  for any sampling distribution ``P``; uniform, ideal (``P ∝ ||g_i||``) and surrogate sampling side by
  side with :func:`sampling_diagnostics`.

From the small-batch thesis (Obando-Ceron, seed ``001``, Sec. 2.2.2.2, Fig. 2.22), which tracks agents
by their gradient norm, the effective rank of their features and their dormant neurons:

* :func:`srank` (Kumar et al., 2021, ``delta = 0.01``);
* :func:`dormant_fraction` (Sokar et al., 2023);
* :func:`grad_norm`.

Priorities (any non-negative scale) are turned into a sampling distribution by
:func:`sampling_distribution`: ``P(i) = p_i / sum_j p_j``, uniform when every ``p_i`` is zero, as the
samplers of :mod:`torchsample.ops` draw.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "sampling_distribution",
    "tv_distance",
    "second_moment",
    "sampling_diagnostics",
    "srank",
    "dormant_fraction",
    "DORMANT_TAU",
    "grad_norm",
    "critic_diagnostics",
]

# Sokar et al. (2023)'s threshold for DQN (see dormant_fraction); the thesis states none of its own.
DORMANT_TAU = 0.025


def sampling_distribution(priorities: Tensor) -> Tensor:
    """``P(i) = p_i / sum_j p_j`` over the last dimension; uniform for a row of zeros.

    Args:
        priorities: ``[..., N]``, finite and non-negative (``eps`` included or not, as sampled).

    Returns:
        ``[..., N]`` float (float32 for lower precisions), rows summing to 1.

    Examples:
        >>> import torch
        >>> sampling_distribution(torch.tensor([[1.0, 3.0], [0.0, 0.0]]))
        tensor([[0.2500, 0.7500],
                [0.5000, 0.5000]])
    """
    return _distribution("priorities", priorities)


def tv_distance(p: Tensor, q: Tensor) -> Tensor:
    """Total-variation distance between two sampling distributions, as the paper's App. H defines it:

        ``delta(P, Q) = sum_i |P(i) - Q(i)|``,  in ``[0, 2]``

    (twice the textbook ``sup_A |P(A) - Q(A)|``; the paper's histograms use this one). ``p`` and ``q``
    are priorities, normalised here (:func:`sampling_distribution`); for App. H's figure, ``q`` the
    exact per-sample gradient norms of the large batch and ``p`` a surrogate's priorities or
    ``torch.ones_like(q)`` (uniform).

    Args:
        p, q: ``[..., N]`` priorities, broadcastable (``[C, N]`` for twin critics).

    Returns:
        ``[...]`` distances.

    Examples:
        >>> import torch
        >>> tv_distance(torch.tensor([1.0, 1.0]), torch.tensor([3.0, 1.0]))   # (.5, .5) vs (.75, .25)
        tensor(0.5000)
        >>> tv_distance(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]))   # disjoint supports
        tensor(2.)
    """
    return (_distribution("p", p) - _distribution("q", q)).abs().sum(-1)


def second_moment(grads: Tensor, priorities: Tensor) -> Tensor:
    """Second moment of the importance-weighted gradient estimate under sampling distribution ``P``
    (the paper's App. C):

        ``G_i = g_i / (N P(i))``,  ``E_{i~P}[G_i^T G_i] = (1 / N^2) sum_i ||g_i||^2 / P(i)``

    where ``g_i`` is sample ``i``'s gradient on the large batch of ``N``. ``G_i`` is unbiased for the
    large-batch mean gradient ``g_bar`` where ``P(i) > 0`` for every ``g_i != 0``, and its variance is
    this second moment minus ``||g_bar||^2``, the same for every ``P``: comparing second moments
    compares variances. It depends on the norms ``||g_i||`` alone. Uniform sampling gives
    ``(1/N) sum_i ||g_i||^2``, the ideal ``P ∝ ||g_i||`` the minimum ``(1/N^2) (sum_i ||g_i||)^2``;
    a sample that ``P`` never draws but whose gradient is not zero gives ``inf`` (a biased estimate).
    A minibatch of ``B`` i.i.d. draws divides the variance by ``B``.

    Args:
        grads: ``[..., N]`` per-sample gradient norms, or ``[..., N, D]`` per-sample gradients
            (flattened, e.g. from :func:`torchsample.gradnorms.per_sample_grads`).
        priorities: ``[..., N]`` sampling priorities, normalised here (:func:`sampling_distribution`),
            with the leading dimensions of ``grads`` (``torch.ones_like(norms)`` for uniform).

    Returns:
        ``[...]`` float64 second moments.

    Examples:
        The paper's counter-example (N = 2; gradient norms 10 and 5, ``|delta|`` 1 and 4):

        >>> import torch
        >>> norms = torch.tensor([10.0, 5.0], dtype=torch.float64)
        >>> second_moment(norms, torch.ones(2))            # uniform
        tensor(62.5000, dtype=torch.float64)
        >>> second_moment(norms, norms)                    # ideal, P ∝ ||g_i||
        tensor(56.2500, dtype=torch.float64)
        >>> second_moment(norms, torch.tensor([1.0, 4.0]))  # |delta|: worse than uniform
        tensor(132.8125, dtype=torch.float64)
    """
    if not isinstance(grads, Tensor):
        raise TypeError(f"grads must be a tensor, got {type(grads).__name__}")
    if not isinstance(priorities, Tensor):
        raise TypeError(f"priorities must be a tensor, got {type(priorities).__name__}")
    prob = _distribution("priorities", priorities.double())
    if grads.dim() == prob.dim() + 1:
        sq = grads.detach().double().square().sum(-1)
    elif grads.dim() == prob.dim():
        sq = grads.detach().double().square()
    else:
        raise ValueError(
            f"grads must be [..., N] norms or [..., N, D] gradients with priorities [..., N], "
            f"got {tuple(grads.shape)} and {tuple(priorities.shape)}"
        )
    if sq.shape[-1] != prob.shape[-1]:
        raise ValueError(f"grads and priorities must have the same N, got {sq.shape[-1]} and {prob.shape[-1]}")
    terms = torch.where(sq > 0, sq / prob, 0.0)  # x / 0 = inf where P never draws a non-zero gradient
    return terms.sum(-1) / prob.shape[-1] ** 2


def sampling_diagnostics(grad_norms: Tensor, priorities: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """App. H and App. C for several samplers on one large batch, ready to log.

    For uniform, ideal (``P ∝ grad_norms``) and each named priority vector: ``tv/<name>``, the
    :func:`tv_distance` to the ideal distribution (0 for ``ideal``, left out), and
    ``second_moment/<name>``, the :func:`second_moment` of its importance-weighted gradient estimate.

    Args:
        grad_norms: ``[..., N]`` exact per-sample gradient norms of the large batch
            (:func:`torchsample.gradnorms.exact_grad_norms`).
        priorities: name -> ``[..., N]`` priorities, e.g. ``{"output": ..., "last-layer": ...}``.

    Returns:
        name -> ``[...]`` tensor.

    Examples:
        >>> import torch
        >>> out = sampling_diagnostics(torch.tensor([10.0, 5.0]), {"output": torch.tensor([1.0, 4.0])})
        >>> {k: round(v.item(), 4) for k, v in out.items()}  # doctest: +NORMALIZE_WHITESPACE
        {'tv/uniform': 0.3333, 'second_moment/uniform': 62.5, 'second_moment/ideal': 56.25,
         'tv/output': 0.9333, 'second_moment/output': 132.8125}
    """
    out = {
        "tv/uniform": tv_distance(torch.ones_like(grad_norms), grad_norms),
        "second_moment/uniform": second_moment(grad_norms, torch.ones_like(grad_norms)),
        "second_moment/ideal": second_moment(grad_norms, grad_norms),
    }
    for name, p in priorities.items():
        out[f"tv/{name}"] = tv_distance(p, grad_norms)
        out[f"second_moment/{name}"] = second_moment(grad_norms, p)
    return out


def srank(features: Tensor, delta: float = 0.01) -> Tensor:
    """Effective rank of a feature matrix (Kumar et al., 2021, "Implicit under-parameterization"), as
    the thesis measures it (``delta = 0.01``, its footnote 6):

        ``srank_delta(Phi) = min { k : sum_{i<=k} sigma_i / sum_{i<=d} sigma_i >= 1 - delta }``

    with ``sigma_1 >= ... >= sigma_d`` the singular values of ``Phi`` (``N`` rows of ``d`` features):
    the number of directions that carry ``1 - delta`` of the spectrum. 0 for an all-zero matrix.

    Args:
        features: ``[..., N, d]``, e.g. the penultimate features of a batch
            (:func:`torchsample.gradnorms.capture_last_layer_input`).
        delta: the threshold, in ``[0, 1)``.

    Returns:
        ``[...]`` int64.

    Examples:
        >>> import torch
        >>> srank(torch.diag(torch.tensor([10.0, 5.0, 1.0, 0.1])))   # 16 / 16.1 >= 0.99
        tensor(3)
        >>> srank(torch.diag(torch.tensor([10.0, 5.0, 1.0, 0.1])), delta=0.001)
        tensor(4)
    """
    if not isinstance(features, Tensor) or features.dim() < 2:
        raise ValueError("srank: features must be a [..., N, d] tensor")
    if not 0 <= delta < 1:
        raise ValueError(f"srank: delta must be in [0, 1), got {delta}")
    sigma = torch.linalg.svdvals(features.detach().double())
    cumulative = sigma.cumsum(-1)
    total = cumulative[..., -1:]
    # A small relative tolerance keeps delta = 0 (the full rank) from missing by round-off.
    reached = cumulative >= (1 - delta) * total * (1 - 1e-12)
    return torch.where(total.squeeze(-1) > 0, reached.int().argmax(-1) + 1, 0)


def dormant_fraction(activations: Tensor | Sequence[Tensor], tau: float = DORMANT_TAU) -> Tensor:
    """Fraction of ``tau``-dormant neurons (Sokar et al., 2023, "The dormant neuron phenomenon in deep
    reinforcement learning", Def. 3.1). Neuron ``j`` of a layer with ``H`` neurons scores

        ``s_j = E_x |a_j(x)| / ((1/H) sum_k E_x |a_k(x)|)``

    (its mean absolute activation over the batch, over the layer's average) and is dormant when
    ``s_j <= tau``. A convolution channel is one neuron (averaged over positions too); a silent layer
    is all dormant. With several layers, the fraction of all their neurons (each layer normalised by
    its own average), as Sokar et al.'s code pools them, output layer excluded.

    ``tau``: the thesis (seed ``001``, Fig. 2.22) reports dormant neurons after Sokar et al. without
    stating its threshold. The default, 0.025, is Sokar et al.'s for DQN at its default replay ratio
    (their ReDo hyper-parameters; 0.1 in their other settings); ``tau = 0`` counts only neurons that
    never fire (their code's default, ``dead_neurons_threshold=0.0`` in ``dopamine/labs/redo``).

    Args:
        activations: a layer's post-activation outputs on a batch, neurons along dim 1: ``[N, H]``,
            or ``[N, C, *spatial]`` for a convolution; or a sequence of such, one per hidden layer.
        tau: the threshold.

    Returns:
        A 0-dim float tensor in ``[0, 1]``.

    Examples:
        >>> import torch
        >>> a = torch.tensor([[0.0, 1.0, 2.0, 0.02],
        ...                   [0.0, 3.0, 2.0, 0.0]])        # means 0, 2, 2, 0.01; layer mean 1.0025
        >>> dormant_fraction(a)                            # scores 0, 2.0, 2.0, 0.00998
        tensor(0.5000)
        >>> dormant_fraction(a, tau=0.0)                   # only the silent neuron
        tensor(0.2500)
    """
    layers = [activations] if isinstance(activations, Tensor) else list(activations)
    if not layers:
        raise ValueError("dormant_fraction: no activations")
    if tau < 0:
        raise ValueError(f"dormant_fraction: tau must be >= 0, got {tau}")
    dormant, total = 0, 0
    for a in layers:
        if not isinstance(a, Tensor) or a.dim() < 2:
            raise ValueError("dormant_fraction: each activation must be a [N, H] or [N, C, *spatial] tensor")
        a = a.detach().float().abs()
        per_neuron = a.transpose(0, 1).reshape(a.shape[1], -1).mean(-1)
        layer_mean = per_neuron.mean()
        score = per_neuron / layer_mean if layer_mean > 0 else torch.zeros_like(per_neuron)
        dormant += int((score <= tau).sum())
        total += per_neuron.numel()
    return torch.tensor(dormant / total)


def grad_norm(parameters: Iterable[Tensor] | nn.Module) -> Tensor:
    """The gradient norm of one update, ``||grad_theta L||_2 = sqrt(sum_p ||p.grad||^2)``, over the
    parameters that have a gradient (what ``clip_grad_norm_`` returns before clipping); 0 if none.

    Call after ``backward()`` and before ``optimizer.zero_grad()``.

    Args:
        parameters: a module or an iterable of parameters.

    Examples:
        >>> import torch
        >>> net = torch.nn.Linear(2, 1)
        >>> net(torch.tensor([[3.0, 4.0]])).sum().backward()    # grads: weight (3, 4), bias 1
        >>> grad_norm(net)
        tensor(5.0990)
    """
    if isinstance(parameters, nn.Module):
        parameters = parameters.parameters()
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    return torch.nn.utils.get_total_norm(grads)


def critic_diagnostics(loss: nn.Module, large, batch_size: int) -> dict[str, float]:
    """Everything above, for a TorchRL loss's critic on one large batch, as floats ready to log.

    On the ``N`` rows of ``large``, with one TD target per row shared by every rung
    (:func:`torchsample.grad_norm_scores`):

    * ``tv/uniform``, ``tv/output``, ``tv/last-layer`` (App. H): :func:`tv_distance` of each
      sampling distribution to the exact per-sample gradient norms';
    * ``second_moment/{uniform,ideal,output,last-layer}`` (App. C): :func:`second_moment`;
    * ``grad_norm``: ``||g_bar||``, the norm of the large batch's mean gradient ``g_bar = mean_i g_i``;
    * ``grad_variance``: ``(mean_i ||g_i||^2 - ||g_bar||^2) / B``, the trace of the covariance of
      the mean gradient of ``B = batch_size`` rows drawn uniformly with replacement (the gradient
      variance the small-batch thesis tracks, for the batch the agent trains on);
    * ``srank`` and ``dormant_fraction`` of the penultimate features (:func:`srank`,
      :func:`dormant_fraction`; the last hidden layer only, as the features are what the last
      linear layer reads).

    Twin critics (SAC, TD3): each figure is the mean over the critics.

    Args:
        loss: a TorchRL loss with a :class:`torchsample.critics.Critic` view (DQN, C51, SAC, TD3).
        large: ``[N]`` transitions, e.g. ``m * B`` rows drawn uniformly from the buffer.
        batch_size: ``B``, the agent's training batch.

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from torchrl.modules import MLP, QValueActor
        >>> from torchrl.objectives import DQNLoss
        >>> net = MLP(in_features=4, out_features=2, num_cells=[16])
        >>> loss = DQNLoss(QValueActor(net, in_keys=["observation"], action_space="categorical"),
        ...                delay_value=True, action_space="categorical")
        >>> loss.make_value_estimator(gamma=0.99)
        >>> large = TensorDict({"observation": torch.randn(64, 4), "action": torch.randint(2, (64,)),
        ...     ("next", "observation"): torch.randn(64, 4), ("next", "reward"): torch.randn(64, 1),
        ...     ("next", "done"): torch.zeros(64, 1, dtype=torch.bool),
        ...     ("next", "terminated"): torch.zeros(64, 1, dtype=torch.bool)}, [64])
        >>> out = critic_diagnostics(loss, large, batch_size=16)
        >>> sorted(out)  # doctest: +NORMALIZE_WHITESPACE
        ['dormant_fraction', 'grad_norm', 'grad_variance', 'second_moment/ideal', 'second_moment/last-layer',
         'second_moment/output', 'second_moment/uniform', 'srank', 'tv/last-layer', 'tv/output', 'tv/uniform']
        >>> out["tv/last-layer"] <= 1 and out["grad_variance"] >= 0
        True
    """
    from .scoring import score_rows
    from .views import critic_of  # torchrl loads with the losses, not with this module

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"critic_diagnostics: batch_size must be an int >= 1, got {batch_size!r}")
    critic = critic_of(loss)
    target = critic.target(large)
    scores = {name: score_rows(critic, large, name, target=target) for name in ("exact", "output", "last-layer")}
    exact = scores["exact"].norms
    out = sampling_diagnostics(exact, {name: scores[name].norms for name in ("output", "last-layer")})

    # The mean gradient of each critic: one backward of the mean per-sample loss over its parameters.
    leaves = [p for p in critic.params.values(True, True) if p.requires_grad]
    with torch.enable_grad():
        pred = critic.prediction(large)
        per_sample = critic.per_sample_loss(pred, target.expand_as(pred) if target.dim() < pred.dim() else target)
        grads = torch.autograd.grad(per_sample.mean(-1).sum(), leaves, allow_unused=True)
    grads = [g for g in grads if g is not None]
    twin = exact.dim() == 2  # stacked [C, ...] parameters: critic c's gradient is slice c
    mean_sq = torch.stack([g.flatten(1 if twin else 0).square().sum(-1) for g in grads]).sum(0).double()
    out["grad_norm"] = mean_sq.sqrt()
    out["grad_variance"] = (exact.double().square().mean(-1) - mean_sq).clamp_min(0) / batch_size

    features = scores["last-layer"].features
    out["srank"] = srank(features).double()
    feature_rows = features if twin else features.unsqueeze(0)
    out["dormant_fraction"] = torch.stack([dormant_fraction(h) for h in feature_rows])
    return {name: float(value.double().mean()) for name, value in sorted(out.items())}


def _distribution(name: str, p: Tensor) -> Tensor:
    """:func:`sampling_distribution`, with errors that name the argument: NaN, inf or negative values."""
    if not isinstance(p, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(p).__name__}")
    if p.dim() < 1 or p.shape[-1] == 0:
        raise ValueError(f"{name} must be [..., N] with N >= 1, got shape {tuple(p.shape)}")
    p = p.detach()
    if not p.is_floating_point() or p.dtype in (torch.float16, torch.bfloat16):
        p = p.float()
    if not torch.isfinite(p).all():
        raise ValueError(f"{name} contain NaN or inf")
    if (p < 0).any():
        raise ValueError(f"{name} contain negative values")
    total = p.sum(-1, keepdim=True)
    return torch.where(total > 0, p / total.clamp_min(torch.finfo(p.dtype).tiny), 1.0 / p.shape[-1])
