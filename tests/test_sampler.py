"""LaBERSampler: LaBER on TorchRL's sampler extension point, in TensorDictReplayBuffer."""

import pytest
import torch
from tensordict import TensorDict
from torchrl.data import LazyTensorStorage, PrioritizedSampler, RandomSampler, SliceSampler, TensorDictReplayBuffer

from tests.conftest import DEVICES
from tests.setups import CONTINUOUS, LOSSES, assert_relatively_close, batch, dqn_loss, recomputed_rtol, total_loss
from torchsample import LaBER, LaBERLoss, LaBERSampler, PrioritizedLaBERSampler, pred_and_target
from torchsample.critics import TARGET


class RecordingSampler(PrioritizedLaBERSampler):
    """PER-LaBER that keeps its last large batch (indices and PER weights)."""

    def _draw_large(self, storage, n):
        index, info = super()._draw_large(storage, n)
        self.last = (index, info)
        return index, info


def buffer(name, sampler, *, n=200, b=16, device="cpu"):
    rb = TensorDictReplayBuffer(storage=LazyTensorStorage(1000, device=device), sampler=sampler, batch_size=b)
    rb.extend(batch(n, continuous=CONTINUOUS[name], device=device))
    return rb


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["dqn", "c51", "sac", "td3"])
def test_sample_is_rows_of_the_storage_with_weights_and_targets(device, name):
    loss = LOSSES[name](device=device)
    laber = LaBER(loss, batch_size=16, critics="joint", generator=torch.Generator(device).manual_seed(0))
    rb = buffer(name, LaBERSampler(laber, m=4), device=device)
    sample = rb.sample()
    assert type(sample) is TensorDict and sample.batch_size == (16,)
    stored = rb.storage[sample["index"]]
    for key in ("observation", "action", ("next", "observation"), ("next", "reward")):
        torch.testing.assert_close(sample[key], stored[key])
    assert (sample["priority_weight"] > 0).all()
    # The stored target is what the loss computes for these rows (DQN and C51: deterministic).
    if name in ("dqn", "c51"):
        torch.testing.assert_close(sample[TARGET], pred_and_target(loss, stored)[1])
    losses = LaBERLoss(loss)(sample)
    assert all(torch.isfinite(v).all() for v in losses.values())


def test_weights_are_laber_times_per_for_each_kept_row():
    loss = dqn_loss()
    sampler = RecordingSampler(LaBER(loss, batch_size=16), 1000, alpha=0.6, beta=0.4, m=4)
    rb = buffer("dqn", sampler)
    rb.update_priority(torch.arange(200), torch.rand(200) * 5)  # PER weights that differ per row
    sample = rb.sample()
    large_index, info = sampler.last
    assert large_index.shape == (64,) and torch.as_tensor(info["priority_weight"]).std() > 0
    # LaBER's weight of a row is mean(p)/p of its priority in the large batch; PER's is per row.
    large = rb.storage[large_index]
    with torch.no_grad():
        pred, target = pred_and_target(loss, large)
    p = (pred - target).abs() + 1e-6  # the l2 surrogate, eps included
    rtol = recomputed_rtol(pred, target, p)
    row = {int(i): j for j, i in enumerate(large_index)}
    kept = torch.tensor([row[i] for i in sample["index"].tolist()])
    expected = (p.mean() / p[kept]) * torch.as_tensor(info["priority_weight"])[kept]
    assert_relatively_close(sample["priority_weight"], expected, rtol[kept])


def test_update_priority_reaches_the_inner_sampler():
    loss = dqn_loss()
    sampler = PrioritizedLaBERSampler(LaBER(loss, batch_size=16), 1000, alpha=0.6, beta=0.4)
    rb = buffer("dqn", sampler)
    weighted = LaBERLoss(loss)
    for _ in range(3):
        sample = rb.sample()
        weighted(sample)["loss"].backward()
        rb.update_priority(sample["index"], sample["td_error"])
    for i, p in zip(sample["index"].tolist(), sample["td_error"].tolist()):
        assert sampler._sum_tree[i] == pytest.approx((p + sampler._eps) ** 0.6, rel=1e-4)


@pytest.mark.parametrize("name", ["sac", "td3"])
def test_independent_critics_through_the_buffer(name):
    loss = LOSSES[name]()
    sampler = PrioritizedLaBERSampler(LaBER(loss, batch_size=16), 1000, alpha=0.6, beta=0.4)
    rb = buffer(name, sampler)
    sample = rb.sample()
    assert sample.batch_size == (16, 3)
    stored = rb.storage[sample["index"].reshape(-1)].reshape(16, 3)
    torch.testing.assert_close(sample["observation"], stored["observation"])
    losses = LaBERLoss(loss)(sample)
    total_loss(losses).backward()
    rb.update_priority(sample["index"], sample["td_error"])  # [B, 1 + C], flattened for PER
    # A row drawn twice had two stochastic targets (SAC's action sample, TD3's noise): either may land.
    written = {}
    for i, p in zip(sample["index"].reshape(-1).tolist(), sample["td_error"].reshape(-1).tolist()):
        written.setdefault(i, []).append((p + sampler._eps) ** 0.6)
    for i, candidates in written.items():
        assert min(abs(sampler._sum_tree[i] - c) / c for c in candidates) < 1e-4


def test_state_dict_and_dumps_round_trip(tmp_path):
    loss = dqn_loss()

    def make():
        return buffer("dqn", PrioritizedLaBERSampler(LaBER(loss, batch_size=16), 1000, 0.6, 0.4), n=1)

    rb = buffer("dqn", PrioritizedLaBERSampler(LaBER(loss, batch_size=16), 1000, 0.6, 0.4))
    rb.update_priority(torch.arange(200), torch.linspace(0.1, 5, 200))
    state = rb.state_dict()
    assert "value_network" not in str(state)  # the loss's networks are not the buffer's
    rb.dumps(tmp_path / "rb")
    for restore in ("load_state_dict", "loads"):
        fresh = make()
        fresh.load_state_dict(state) if restore == "load_state_dict" else fresh.loads(tmp_path / "rb")
        assert len(fresh) == 200 and fresh.sample().batch_size == (16,)
        tree, fresh_tree = rb.sampler._sum_tree, fresh.sampler._sum_tree
        assert [fresh_tree[i] for i in range(200)] == pytest.approx([tree[i] for i in range(200)])


def test_bad_arguments():
    laber = LaBER(dqn_loss(), batch_size=8)
    with pytest.raises(TypeError, match="laber"):
        LaBERSampler(dqn_loss())
    with pytest.raises(ValueError, match="m must"):
        LaBERSampler(laber, m=0)
    with pytest.raises(TypeError, match="inner"):
        LaBERSampler(laber, inner="per")
    with pytest.raises(TypeError, match=r"PrioritizedLaBERSampler\(laber, max_capacity"):
        LaBERSampler(laber, inner=PrioritizedSampler(1000, 0.6, 0.4))
    with pytest.raises(TypeError, match="sub-trajectories"):
        LaBERSampler(laber, inner=SliceSampler(num_slices=2))
    with pytest.raises(TypeError, match="transform"):
        LaBERSampler(laber, transform=3)
    assert isinstance(LaBERSampler(laber).inner, RandomSampler)


def test_transform_prepares_the_large_batch_before_scoring():
    loss = dqn_loss()
    seen = []

    def scale(td):
        seen.append(td.batch_size)
        return td.set("observation", td["observation"] * 0)

    rb = buffer("dqn", LaBERSampler(LaBER(loss, batch_size=8), m=2, transform=scale), b=8)
    rb.sample()
    assert seen == [torch.Size([16])]


def test_a_weight_the_transform_writes_multiplies_labers():
    """LFIW weighs the large batch before LaBER keeps B (``lfiw-laber-mean``): the kept rows carry both."""

    def weigh(td):
        return td.set("priority_weight", td["index"].float() + 1)  # a weight that differs per storage row

    sampler = LaBERSampler(LaBER(dqn_loss(), batch_size=8), m=4, transform=weigh)
    rb = TensorDictReplayBuffer(
        storage=LazyTensorStorage(1000), sampler=sampler, batch_size=8, generator=torch.Generator().manual_seed(0)
    )
    rb.extend(batch(200))
    state = rb._rng.get_state()
    weighted = rb.sample()
    rb._rng.set_state(state)
    sampler.transform = lambda td: td  # the same draw, without the transform's weight
    plain = rb.sample()
    assert torch.equal(weighted["index"], plain["index"])
    torch.testing.assert_close(weighted["priority_weight"], plain["priority_weight"] * (plain["index"].float() + 1))
