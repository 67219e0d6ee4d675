"""Diagnostics (torchsample.diagnostics) on hand-made cases with known answers."""

import math

import pytest
import torch
from torch import nn

from torchsample.diagnostics import (
    dormant_fraction,
    grad_norm,
    sampling_diagnostics,
    sampling_distribution,
    second_moment,
    srank,
    tv_distance,
)

# ---------------------------------------------------------------------------------------------
# App. H: total variation


def test_tv_distance_known_values():
    assert tv_distance(torch.tensor([1.0, 1.0]), torch.tensor([3.0, 1.0])).item() == pytest.approx(0.5)
    assert tv_distance(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 5.0])).item() == pytest.approx(2.0)
    assert tv_distance(torch.tensor([2.0, 6.0]), torch.tensor([1.0, 3.0])).item() == 0.0  # scale-free
    # 0.1, 0.2, 0.3, 0.4 against uniform: |.1-.25| + |.2-.25| + |.3-.25| + |.4-.25| = 0.4
    assert tv_distance(torch.arange(1.0, 5.0), torch.ones(4)).item() == pytest.approx(0.4)


def test_tv_distance_rows_broadcast_and_empty_rows():
    p = torch.tensor([[1.0, 3.0], [0.0, 0.0]])  # a row of zeros is sampled uniformly
    q = torch.tensor([1.0, 1.0])
    torch.testing.assert_close(tv_distance(p, q), torch.tensor([0.5, 0.0]))
    torch.testing.assert_close(tv_distance(q, p), tv_distance(p, q))


@pytest.mark.parametrize("bad, message", [(float("nan"), "NaN"), (float("inf"), "inf"), (-1.0, "negative")])
def test_tv_distance_refuses_bad_priorities_naming_the_argument(bad, message):
    with pytest.raises(ValueError, match=f"q contain.*{message}"):
        tv_distance(torch.ones(3), torch.tensor([1.0, bad, 1.0]))
    with pytest.raises(ValueError, match="N >= 1"):
        sampling_distribution(torch.ones(2, 0))


# ---------------------------------------------------------------------------------------------
# App. C: the second moment of the weighted gradient estimate


def counter_example(angle):
    """App. C: ``||grad Q(x_1)|| = 10``, ``|delta_1| = 1``; ``||grad Q(x_2)|| = 5/4``, ``|delta_2| = 4``.
    With the L2 loss ``delta^2 / 2``, ``g_i = delta_i grad Q(x_i)``: norms 10 and 5, whatever the
    directions (``angle`` between them)."""
    grad_q = torch.tensor([[10.0, 0.0], [1.25 * math.cos(angle), 1.25 * math.sin(angle)]], dtype=torch.float64)
    delta = torch.tensor([1.0, 4.0], dtype=torch.float64)
    return delta.unsqueeze(-1) * grad_q, delta


@pytest.mark.parametrize("angle", [0.0, math.pi / 2, 2.0], ids=["parallel", "orthogonal", "2rad"])
def test_second_moment_paper_counter_example(angle):
    g, delta = counter_example(angle)
    norms = torch.linalg.vector_norm(g, dim=-1)
    torch.testing.assert_close(norms, torch.tensor([10.0, 5.0], dtype=torch.float64))
    # The paper's distributions: p* = (2/3, 1/3) from the norms, p = (1/5, 4/5) from |delta|.
    torch.testing.assert_close(sampling_distribution(norms), torch.tensor([2 / 3, 1 / 3], dtype=torch.float64))
    torch.testing.assert_close(sampling_distribution(delta), torch.tensor([0.2, 0.8], dtype=torch.float64))
    for priorities, expected in [(torch.ones(2), 62.5), (norms, 56.25), (delta, 132.8125)]:
        assert second_moment(g, priorities).item() == pytest.approx(expected, rel=1e-12)
        assert second_moment(norms, priorities).item() == pytest.approx(expected, rel=1e-12)


def test_second_moment_is_the_expectation_of_the_weighted_estimate():
    g = torch.randn(7, 5, dtype=torch.float64)
    p = torch.rand(7, dtype=torch.float64) + 0.1
    prob = p / p.sum()
    weighted = g / (7 * prob).unsqueeze(-1)  # G_i
    torch.testing.assert_close((prob.unsqueeze(-1) * weighted).sum(0), g.mean(0))  # unbiased
    expected = (prob * weighted.square().sum(-1)).sum()
    torch.testing.assert_close(second_moment(g, p), expected)


def test_second_moment_ideal_is_the_minimum():
    norms = torch.rand(2, 50, dtype=torch.float64) * 3  # two critics
    ideal = second_moment(norms, norms)
    assert ideal.shape == (2,)
    torch.testing.assert_close(ideal, norms.sum(-1).square() / 50**2)
    torch.testing.assert_close(second_moment(norms, torch.ones(2, 50)), norms.square().mean(-1))
    for _ in range(20):
        assert (second_moment(norms, torch.rand(2, 50)) >= ideal * (1 - 1e-12)).all()


def test_second_moment_never_drawn_samples():
    assert second_moment(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 0.0])).item() == math.inf
    assert second_moment(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0])).item() == pytest.approx(0.25)
    with pytest.raises(ValueError, match="same N"):
        second_moment(torch.ones(3), torch.ones(4))
    with pytest.raises(ValueError, match=r"\[\.\.\., N\] norms"):
        second_moment(torch.ones(2, 3, 4), torch.ones(3))


def test_sampling_diagnostics():
    out = sampling_diagnostics(
        torch.tensor([10.0, 5.0]), {"output": torch.tensor([1.0, 4.0]), "exact": torch.tensor([2.0, 1.0])}
    )
    assert out["second_moment/uniform"].item() == pytest.approx(62.5)
    assert out["second_moment/ideal"].item() == pytest.approx(56.25)
    assert out["second_moment/output"].item() == pytest.approx(132.8125)
    assert out["tv/uniform"].item() == pytest.approx(1 / 3)
    assert out["tv/output"].item() == pytest.approx(2 * (2 / 3 - 0.2))
    assert out["tv/exact"].item() == pytest.approx(0.0, abs=1e-7)
    assert out["second_moment/exact"].item() == pytest.approx(56.25)


# ---------------------------------------------------------------------------------------------
# srank, dormant neurons, gradient norm (seed 001)


def with_singular_values(sigma, rows, seed=0):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, len(sigma), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(len(sigma), len(sigma), generator=g, dtype=torch.float64))
    return u @ torch.diag(torch.tensor(sigma, dtype=torch.float64)) @ v.T


@pytest.mark.parametrize(
    "sigma, delta, expected",
    [
        ([10.0, 5.0, 1.0, 0.1], 0.01, 3),  # 16 / 16.1 = 0.9938 >= 0.99 > 15 / 16.1
        ([10.0, 5.0, 1.0, 0.1], 0.001, 4),
        ([10.0, 5.0, 1.0, 0.1], 0.1, 2),  # 15 / 16.1 = 0.932 >= 0.9
        ([1.0] * 8, 0.01, 8),  # isotropic: every direction counts
        ([98.0, 1.5, 0.5, 0.0], 0.01, 2),  # 98 / 100 < 0.99 <= 99.5 / 100
    ],
)
def test_srank_known_spectra(sigma, delta, expected):
    features = with_singular_values(sigma, rows=32)
    assert srank(features, delta).item() == expected
    assert srank(features.float(), delta).item() == expected


def test_srank_exact_boundaries_in_float64():
    # On the boundary (99 / 100 = 1 - delta) and at delta = 0, the rank is exact in float64; a float32
    # matrix carries singular values of order 1e-7 that delta = 0 would count.
    assert srank(with_singular_values([99.0, 1.0, 0.0, 0.0], rows=32), 0.01).item() == 1
    assert srank(with_singular_values([3.0, 0.0, 0.0], rows=32), 0.0).item() == 1
    assert srank(with_singular_values([3.0, 1e-3, 0.0], rows=32), 0.0).item() == 2


def test_srank_batched_and_zero():
    features = torch.stack([with_singular_values([10.0, 5.0, 1.0, 0.1], 16), torch.zeros(16, 4, dtype=torch.float64)])
    torch.testing.assert_close(srank(features), torch.tensor([3, 0]))
    with pytest.raises(ValueError, match="delta"):
        srank(features, delta=1.0)


def test_dormant_fraction_hand_made():
    # Neuron means over the batch: 0, 2, 2, 0.01 -> layer mean 1.0025 -> scores 0, 1.995, 1.995, 0.00998.
    a = torch.tensor([[0.0, 1.0, 2.0, 0.02], [0.0, -3.0, 2.0, 0.0]])  # |activation|: the sign does not count
    assert dormant_fraction(a).item() == 0.5
    assert dormant_fraction(a, tau=0.0).item() == 0.25
    assert dormant_fraction(a, tau=0.009).item() == 0.25  # 0.00998 > 0.009
    assert dormant_fraction(a, tau=2.0).item() == 1.0
    assert dormant_fraction(a * 0.01).item() == 0.5  # scores are relative to the layer's mean


def test_dormant_fraction_conv_channels_and_layers():
    conv = torch.ones(5, 3, 4, 4)
    conv[:, 1] = 0.0  # a silent channel
    conv[:, 2, 0, 0] = 0.0  # one silent pixel does not make a channel dormant
    assert dormant_fraction(conv).item() == pytest.approx(1 / 3)
    dense = torch.tensor([[1.0, 0.0]])
    assert dormant_fraction([conv, dense]).item() == pytest.approx(2 / 5)  # pooled over 3 + 2 neurons
    assert dormant_fraction(torch.zeros(4, 6)).item() == 1.0  # a silent layer
    # Each layer is normalised by its own mean: scaling one layer changes nothing.
    assert dormant_fraction([conv * 100, dense]).item() == pytest.approx(2 / 5)
    with pytest.raises(ValueError, match="tau"):
        dormant_fraction(dense, tau=-0.1)
    with pytest.raises(ValueError, match=r"\[N, H\]"):
        dormant_fraction(torch.ones(3))


def test_grad_norm():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    assert grad_norm(net).item() == 0.0
    net(torch.randn(6, 3)).square().sum().backward()
    expected = math.sqrt(sum(p.grad.square().sum().item() for p in net.parameters()))
    assert grad_norm(net).item() == pytest.approx(expected, rel=1e-6)
    assert grad_norm(net.parameters()).item() == pytest.approx(expected, rel=1e-6)
    clipped = nn.utils.clip_grad_norm_(net.parameters(), max_norm=1e9)
    assert grad_norm(net).item() == pytest.approx(clipped.item(), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# All of it on a real critic: critic_diagnostics


def per_row_gradients(critic, large, target):
    """``[C, N, P]``: each row's gradient of its own loss over each critic's parameters, by autograd
    one row at a time (the slow, obvious reference)."""
    leaves = [p for p in critic.params.values(True, True) if p.requires_grad]
    rows = []
    for i in range(large.batch_size[0]):
        pred = critic.prediction(large[i : i + 1])
        loss = critic.per_sample_loss(pred, target[i : i + 1].expand_as(pred)).sum()
        grads = torch.autograd.grad(loss, leaves)
        rows.append(torch.cat([g.flatten(1) if pred.dim() == 2 else g.flatten().unsqueeze(0) for g in grads], -1))
    return torch.stack(rows, 1).double()


@pytest.mark.parametrize("family", ["dqn", "sac"])
def test_critic_diagnostics_against_per_row_gradients(family):
    from tests import setups
    from torchsample.diagnostics import critic_diagnostics
    from torchsample.views import critic_of

    loss = setups.dqn_loss("smooth_l1", double_dqn=True) if family == "dqn" else setups.sac_loss()
    large, B = setups.batch(48, continuous=family == "sac"), 8
    critic = critic_of(loss)
    torch.manual_seed(5)  # SAC's target draws the next action: the same draw in both
    target = critic.target(large)
    G = per_row_gradients(critic, large, target)  # [C, N, P]
    torch.manual_seed(5)
    out = critic_diagnostics(loss, large, batch_size=B)

    norms, g_bar = G.norm(dim=-1), G.mean(1)
    # The trace of the covariance of the mean of B uniform draws, from its definition.
    variance = (G - g_bar.unsqueeze(1)).square().sum(-1).mean(-1) / B
    assert out["grad_norm"] == pytest.approx(g_bar.norm(dim=-1).mean().item(), rel=1e-4)
    assert out["grad_variance"] == pytest.approx(variance.mean().item(), rel=1e-4)
    assert out["tv/uniform"] == pytest.approx(tv_distance(torch.ones_like(norms), norms).mean().item(), rel=1e-4)
    assert out["second_moment/ideal"] == pytest.approx(second_moment(norms, norms).mean().item(), rel=1e-4)
    # Output <= last-layer <= exact row by row, so last-layer's distribution is at least as close here.
    assert 0 <= out["tv/last-layer"] <= 2 and 0 <= out["tv/output"] <= 2
    assert 1 <= out["srank"] and 0 <= out["dormant_fraction"] <= 1


def test_critic_diagnostics_refuses_a_bad_batch_size():
    from tests import setups
    from torchsample.diagnostics import critic_diagnostics

    with pytest.raises(ValueError, match="batch_size"):
        critic_diagnostics(setups.dqn_loss(), setups.batch(8), batch_size=0)
