"""LFIW: the f-divergence objective and its optimum, the ratio network on two Gaussians, the
self-normalised weights, the two buffers, the threshold, and the composition with LaBER."""

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from scipy.stats import entropy, spearmanr
from tensordict import TensorDict
from torch import nn

from tests.setups import LOSSES, batch, total_loss
from torchsample import LaBER, LaBERLoss, pred_and_target
from torchsample.lfiw import (
    F_DIVERGENCES,
    LFIW,
    FastSlowReplay,
    RatioNetwork,
    f_divergence_loss,
    ratio_stats,
    self_normalized_weights,
)

FS = sorted(F_DIVERGENCES)
EPS32 = torch.finfo(torch.float32).eps


class ExpOfFirst(nn.Module):
    """A ratio network with a known output: ``w(x) = exp(x_0)``."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(()))  # gives LFIW's optimiser something to hold

    def forward(self, x):
        return x[..., 0].exp()


def gaussian_rows(mean, std, n, generator):
    """``n`` rows of (observation, action) drawn from ``N(mean, std^2 I)`` in 2-D."""
    x = mean + std * torch.randn(n, 2, generator=generator)
    return TensorDict({"observation": x[:, :1], "action": x[:, 1:]}, [n])


# ---------------------------------------------------------------------------------------------
# The f's: formulas, conjugates, and the optimum of the objective


@pytest.mark.parametrize("f", FS)
def test_f_prime_is_the_derivative_of_f_and_f_of_one_is_zero(f):
    div = F_DIVERGENCES[f]
    u = torch.logspace(-3, 3, 61, dtype=torch.float64).requires_grad_()
    (grad,) = torch.autograd.grad(div.f(u).sum(), u)
    torch.testing.assert_close(grad, div.f_prime(u.detach()))
    assert div.f(torch.tensor(1.0, dtype=torch.float64)).abs() < 1e-15


@pytest.mark.parametrize("f", FS)
def test_conjugate_is_the_numerical_legendre_transform(f):
    """``f*(t) = sup_u (t u - f(u))``, taken on a log grid of ``u``, matches the closed forms."""
    div = F_DIVERGENCES[f]
    u = torch.logspace(-4, 3, 200_001, dtype=torch.float64)
    h = math.log(10) * 7 / 200_000  # relative spacing of the grid
    w = torch.tensor([0.05, 0.3, 1.0, 2.5, 20.0], dtype=torch.float64)  # the maximisers u* = w
    t = div.f_prime(w)
    numeric = (t[:, None] * u - div.f(u)).amax(1)
    # The grid misses the sup by at most f''(u*) (u* h)^2 / 2 (u* within h of a grid point):
    # f''(u) = 1/u for kl, 1/(u (1 + u)) for js, both <= 1/u.
    bound = w * h**2 / 2 + 1e-12
    assert ((div.conjugate(t) - numeric).abs() <= bound).all()
    torch.testing.assert_close(div.conjugate(t), div.conjugate_of_prime(w))


def test_js_objective_is_the_cross_entropy_of_a_fast_vs_slow_classifier():
    """With c = w / (1 + w): L_w(js) = BCE(c(fast rows), 1) + BCE(c(slow rows), 0) - 2 log 2."""
    g = torch.Generator().manual_seed(4)
    w_slow, w_fast = torch.rand(50, generator=g) * 4, torch.rand(70, generator=g) * 4
    bce = nn.functional.binary_cross_entropy
    c_slow, c_fast = w_slow / (1 + w_slow), w_fast / (1 + w_fast)
    expected = bce(c_fast, torch.ones(70)) + bce(c_slow, torch.zeros(50)) - 2 * math.log(2)
    torch.testing.assert_close(f_divergence_loss(w_slow, w_fast, "js"), expected)


# Two discrete distributions on 5 points, in twentieths: P (fast) and Q (slow).
P_COUNTS, Q_COUNTS = [2, 4, 6, 5, 3], [6, 5, 4, 3, 2]


def discrete_objective(f, w):
    """``L_w`` of ``f_divergence_loss`` with P and Q as 20 equally likely atoms each (exact
    expectations), for each row of ``w``: ``[..., 5]`` ratios -> ``[...]``."""
    p_atoms = torch.repeat_interleave(torch.arange(5), torch.tensor(P_COUNTS))
    q_atoms = torch.repeat_interleave(torch.arange(5), torch.tensor(Q_COUNTS))
    return f_divergence_loss(w[..., q_atoms], w[..., p_atoms], f)


@pytest.mark.parametrize("f", FS)
def test_objective_is_minimised_at_the_true_ratio_on_a_discrete_case(f):
    """Pointwise ``q f*(f'(w)) - p f'(w)`` has derivative ``f''(w) (q w - p)``: its argmin is ``p / q``,
    and the minimum is ``-D_f(P || Q)`` (``KL(P || Q)`` for kl, ``2 JSD(P, Q)`` for js)."""
    p = np.array(P_COUNTS) / 20
    q = np.array(Q_COUNTS) / 20
    ratio = torch.tensor(p / q)
    # The minimum value, against scipy's divergences.
    divergence = entropy(p, q) if f == "kl" else 2 * jensenshannon(p, q) ** 2
    at_ratio = discrete_objective(f, ratio)
    assert abs(at_ratio.item() + divergence) < 1e-12
    # A stationary point: the gradient vanishes at p / q.
    w = ratio.clone().requires_grad_()
    (grad,) = torch.autograd.grad(discrete_objective(f, w), w)
    assert grad.abs().max() < 1e-12
    # The argmin over a log grid of each coordinate (the others at p / q) is a grid neighbour of p / q.
    grid = torch.logspace(-2, 2, 4001, dtype=torch.float64)
    step = math.log(10) * 4 / 4000
    for x in range(5):
        candidates = ratio.repeat(len(grid), 1)
        candidates[:, x] = grid
        best = grid[discrete_objective(f, candidates).argmin()]
        assert abs(math.log(best) - math.log(ratio[x])) <= step
    # And any other w is worse: the objective is above its value at p / q.
    others = ratio * torch.exp(0.3 * torch.randn(1000, 5, dtype=torch.float64))
    assert (discrete_objective(f, others) > at_ratio).all()


# ---------------------------------------------------------------------------------------------
# The ratio network learns p_fast / p_slow


@pytest.mark.parametrize("f", FS)
def test_ratio_network_recovers_the_density_ratio_of_two_gaussians(f):
    """fast = N((0.5, -0.5), 0.6^2 I), slow = N(0, I): the trained w_psi ranks a grid as p_fast/p_slow does."""
    g = torch.Generator().manual_seed(0)
    mean_fast, std_fast, mean_slow, std_slow = torch.tensor([0.5, -0.5]), 0.6, torch.zeros(2), 1.0
    torch.manual_seed(0)
    lfiw = LFIW(RatioNetwork(2, num_cells=(64, 64)), f=f, lr=3e-3)
    for _ in range(200):
        lfiw.update(gaussian_rows(mean_slow, std_slow, 256, g), gaussian_rows(mean_fast, std_fast, 256, g))
    axis = torch.linspace(-2, 2, 21)  # the slow density's bulk, +-2 std
    grid = torch.cartesian_prod(axis, axis)

    def log_density(x, mean, std):
        return -((x - mean) ** 2).sum(-1) / (2 * std**2) - 2 * math.log(std)

    true_ratio = (log_density(grid, mean_fast, std_fast) - log_density(grid, mean_slow, std_slow)).exp()
    rows = TensorDict({"observation": grid[:, :1], "action": grid[:, 1:]}, [len(grid)])
    with torch.no_grad():
        learned = lfiw.ratio(rows)
    assert spearmanr(learned.numpy(), true_ratio.numpy()).statistic >= 0.95


# ---------------------------------------------------------------------------------------------
# Self-normalised weights, temperature, statistics


def test_self_normalized_weights_average_one_and_temper_the_ratio():
    g = torch.Generator().manual_seed(1)
    ratio = torch.rand(4096, generator=g) * 10
    for temperature in (0.5, 1.0, 5.0):
        w = self_normalized_weights(ratio, temperature)
        # A sum of n softmax terms: rounding error at most n * eps.
        assert abs(w.mean().item() - 1) <= len(w) * EPS32
        # Proportional to ratio^(1/T): the ratio of two weights is that of the ratios to the 1/T.
        torch.testing.assert_close(w[1:] / w[0], (ratio[1:] / ratio[0]) ** (1 / temperature), rtol=1e-4, atol=0)
    # T -> infinity flattens to uniform weights; T = 1 is w / mean(w).
    torch.testing.assert_close(self_normalized_weights(ratio, 1e9), torch.ones(4096))
    torch.testing.assert_close(self_normalized_weights(ratio), ratio / ratio.mean())
    # A zero ratio (floored at the smallest normal float) gives a weight of about 0, all-zero
    # ratios uniform weights (no 0 / 0).
    assert self_normalized_weights(torch.tensor([0.0, 2.0]))[0] < 1e-30
    torch.testing.assert_close(self_normalized_weights(torch.zeros(3)), torch.ones(3))


def test_ratio_stats():
    stats = ratio_stats(torch.full((10,), 3.0))
    assert stats["ratio_mean"] == 3 and stats["ratio_std"] == 0 and abs(stats["ess"] - 1) < 1e-6
    ratio = torch.rand(100, generator=torch.Generator().manual_seed(2)) + 0.1
    stats = ratio_stats(ratio, temperature=2.0)
    w = ratio.sqrt()
    torch.testing.assert_close(stats["ess"], w.sum() ** 2 / (100 * (w**2).sum()))
    torch.testing.assert_close(stats["ratio_std"], ratio.std())


def test_lfiw_weights_a_slow_batch_by_the_formula_and_multiplies_a_prior_weight():
    lfiw = LFIW(ExpOfFirst(), temperature=2.0)
    rows = batch(64, continuous=True)  # observation [64, 4], action [64, 2]
    prior = torch.rand(64) + 0.5
    rows["priority_weight"] = prior.clone()
    out = lfiw(rows)
    tempered = (rows["observation"][:, 0] / 2).exp()  # exp(x_0)^(1/T)
    torch.testing.assert_close(out["priority_weight"], prior * tempered / tempered.mean())
    plain = lfiw(batch(64, continuous=True))
    assert abs(plain["priority_weight"].mean().item() - 1) <= 64 * EPS32
    assert sorted(lfiw.stats(plain)) == ["ess", "ratio_mean", "ratio_std"]


def test_update_lowers_the_objective():
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    lfiw = LFIW(RatioNetwork(2, num_cells=(32,)), lr=1e-2)
    slow, fast = gaussian_rows(torch.zeros(2), 1.0, 512, g), gaussian_rows(torch.ones(2), 0.5, 512, g)
    before = f_divergence_loss(lfiw.ratio(slow), lfiw.ratio(fast)).item()
    losses = [lfiw.update(slow, fast) for _ in range(50)]
    assert losses[0].item() == pytest.approx(before) and losses[-1] < before
    assert all(loss.requires_grad is False for loss in losses)


# ---------------------------------------------------------------------------------------------
# The two buffers and the threshold


def steps(start, stop):
    n = stop - start
    return TensorDict(
        {"step": torch.arange(start, stop), "observation": torch.randn(n, 4), "action": torch.rand(n, 2)}, [n]
    )


def test_fast_buffer_holds_the_most_recent_transitions_and_slow_all():
    replay = FastSlowReplay(fast_size=8, slow_size=32)
    for start in range(0, 40, 5):  # 40 transitions, 5 at a time
        replay.extend(steps(start, start + 5))
    assert sorted(replay.fast[:]["step"].tolist()) == list(range(32, 40))
    assert sorted(replay.slow[:]["step"].tolist()) == list(range(8, 40))
    fast = replay.sample_fast(1000)
    assert fast.batch_size == (1000,) and (fast["step"] >= 32).all()
    # Uniform over the 8 rows: each count is Binomial(1000, 1/8); 5 std covers every one.
    counts = torch.bincount(fast["step"] - 32, minlength=8).float()
    assert ((counts - 125).abs() <= 5 * math.sqrt(1000 / 8 * 7 / 8)).all()
    assert replay.sample_slow(64)["step"].min() >= 8


def test_replay_state_dict_round_trip():
    replay = FastSlowReplay(fast_size=4, slow_size=16)
    replay.extend(steps(0, 10))
    copy = FastSlowReplay(fast_size=4, slow_size=16)
    copy.load_state_dict(replay.state_dict())
    assert len(copy.fast) == 4 and len(copy.slow) == 10
    torch.testing.assert_close(copy.fast[:]["step"], replay.fast[:]["step"])
    torch.testing.assert_close(copy.slow[:]["observation"], replay.slow[:]["observation"])
    copy.extend(steps(10, 11))  # the writers' positions came along: the oldest fast row goes
    assert sorted(copy.fast[:]["step"].tolist()) == [7, 8, 9, 10]


def test_no_reweighting_until_the_slow_buffer_passes_the_threshold():
    replay = FastSlowReplay(fast_size=8, slow_size=64)
    lfiw = LFIW(ExpOfFirst(), replay=replay)
    assert lfiw.threshold == 8  # default: the fast buffer's size
    replay.extend(steps(0, 8))
    assert not lfiw.active
    rows = replay.sample_slow(16)
    prior = torch.rand(16)
    rows["priority_weight"] = prior.clone()
    torch.testing.assert_close(lfiw(rows)["priority_weight"], prior)  # times 1
    assert (lfiw(replay.sample_slow(16))["priority_weight"] == 1).all()
    replay.extend(steps(8, 9))
    assert lfiw.active and lfiw(replay.sample_slow(16))["priority_weight"].std() > 0
    late = LFIW(ExpOfFirst(), replay=replay, threshold=20)
    assert not late.active


# ---------------------------------------------------------------------------------------------
# Composition with LaBER and LaBERLoss


@pytest.mark.parametrize("name", ["sac", "td3"])
def test_lfiw_then_laber_multiplies_the_weights_row_by_row(name):
    """LFIW on the large batch, then LaBER: each kept row carries w_LaBER * w~ of that row."""
    loss = LOSSES[name]()
    large = batch(128, continuous=True)
    large["position"] = torch.arange(128)
    lfiw = LFIW(ExpOfFirst(), temperature=1.0)
    weighted = lfiw(large.clone())
    lfiw_weight = weighted["priority_weight"]
    assert lfiw_weight.std() > 0.5  # weights that differ per row
    torch.manual_seed(5)  # the targets are stochastic (next-action sample, target noise)
    out = LaBER(loss, batch_size=16, generator=torch.Generator().manual_seed(0))(weighted)
    torch.manual_seed(5)
    kept = LaBER(loss, batch_size=16, generator=torch.Generator().manual_seed(0)).selection(large)
    assert out.batch_size == (16, 3)  # [B, 1 + C]: independent twin critics
    torch.testing.assert_close(out["position"], kept.index)
    torch.testing.assert_close(out["priority_weight"], kept.weight * lfiw_weight[kept.index])
    losses = LaBERLoss(loss)(out)
    total_loss(losses).backward()
    # The other order (LFIW on LaBER's [B, 1 + C] rows) would normalise over non-uniform rows.
    with pytest.raises(ValueError, match="large batch before LaBER"):
        lfiw(out)


def test_laber_loss_reduces_the_critic_loss_with_the_lfiw_weights():
    """On a [B] batch: loss_qvalue = sum_c mean_i(w~_i (q_c,i - y_i)^2)."""
    loss = LOSSES["td3"]()
    rows = LFIW(ExpOfFirst(), temperature=3.0)(batch(64, continuous=True))
    torch.manual_seed(7)
    value = LaBERLoss(loss)(rows.clone())["loss_qvalue"]
    torch.manual_seed(7)
    with torch.no_grad():
        pred, target = pred_and_target(loss, rows)
    expected = (rows["priority_weight"] * (pred - target) ** 2).mean(-1).sum()
    torch.testing.assert_close(value, expected)


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("temperature", [0, -1.0, float("nan"), float("inf"), True])
def test_bad_temperature(temperature):
    with pytest.raises(ValueError, match="temperature"):
        LFIW(ExpOfFirst(), temperature=temperature)
    with pytest.raises(ValueError, match="temperature"):
        self_normalized_weights(torch.ones(3), temperature)


def test_bad_arguments():
    with pytest.raises(ValueError, match="f must be one of"):
        LFIW(ExpOfFirst(), f="hellinger")
    with pytest.raises(ValueError, match="f must be one of"):
        f_divergence_loss(torch.ones(2), torch.ones(2), f="chi2")
    with pytest.raises(ValueError, match="fast_size must be smaller than slow_size"):
        FastSlowReplay(fast_size=100, slow_size=10)
    with pytest.raises(ValueError, match="fast_size must be smaller than slow_size"):
        FastSlowReplay(fast_size=10, slow_size=10)
    with pytest.raises(ValueError, match="fast_size"):
        FastSlowReplay(fast_size=0, slow_size=10)
    with pytest.raises(ValueError, match="threshold"):
        LFIW(ExpOfFirst(), threshold=10)  # without a replay to count
    with pytest.raises(ValueError, match="threshold"):
        LFIW(ExpOfFirst(), replay=FastSlowReplay(2, 4), threshold=-1)
    with pytest.raises(TypeError, match="ratio_net"):
        LFIW(lambda x: x)


def test_empty_buffers_and_batches():
    replay = FastSlowReplay(fast_size=4, slow_size=16)
    with pytest.raises(ValueError, match="fast buffer is empty"):
        replay.sample_fast(8)
    with pytest.raises(ValueError, match="slow buffer is empty"):
        replay.sample_slow(8)
    replay.extend(steps(0, 5))
    with pytest.raises(ValueError, match="n must be"):
        replay.sample_fast(0)
    lfiw = LFIW(RatioNetwork(6, num_cells=(8,)))
    with pytest.raises(ValueError, match="fast_batch is empty"):
        lfiw.update(replay.sample_slow(8), replay.sample_fast(8)[:0])
    with pytest.raises(ValueError, match="ratio_fast is empty"):
        f_divergence_loss(torch.ones(3), torch.ones(0))
    with pytest.raises(ValueError, match="empty batch"):
        lfiw(replay.sample_slow(8)[:0])
