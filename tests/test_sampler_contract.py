"""LaBERSampler keeps TorchRL's Sampler contract (issue 21): what a user of TorchRL's own samplers does
with a buffer works with LaBER (and PER-LaBER, GER-LaBER) in it, or fails with a message that says why.

Each test is one of the cases a session met running TorchRL's replay-buffer tests with LaBERSampler
wrapping the uniform and the prioritized sampler: storages, the buffer's generator, priority updates
from tensordicts, storages that already hold data, iteration, schedulers, plain-tensor data,
LaBER as a transform, pickling and prefetching.
"""

import copy
import pickle

import numpy as np
import pytest
import torch
from tensordict import TensorDict, tensorclass
from torchrl.data import (
    LazyMemmapStorage,
    LazyTensorStorage,
    ListStorage,
    PrioritizedSampler,
    RandomSampler,
    ReplayBuffer,
    SamplerWithoutReplacement,
    TensorDictReplayBuffer,
    TensorStorage,
)
from torchrl.data.replay_buffers.scheduler import LinearScheduler

from tests.setups import batch, dqn_loss, td3_loss
from torchsample import GERLaBERSampler, GERSampler, LaBER, LaBERSampler, PrioritizedLaBERSampler, grad_norm_scores

B, M, ROWS = 8, 4, 200


def laber_sampler(inner=None, loss=None):
    return LaBERSampler(LaBER(loss or dqn_loss(), batch_size=B), m=M, inner=inner)


def per_laber(capacity=1000, loss=None):
    return PrioritizedLaBERSampler(LaBER(loss or dqn_loss(), batch_size=B), capacity, alpha=0.7, beta=0.5, m=M)


def sampler_of(prioritized):
    return per_laber() if prioritized else laber_sampler()


def filled(sampler, storage=None, rows=ROWS, **kwargs):
    rb = TensorDictReplayBuffer(
        storage=storage if storage is not None else LazyTensorStorage(1000), sampler=sampler, batch_size=B, **kwargs
    )
    rb.extend(batch(rows))
    return rb


def rows_of(sample):
    return sample["index"].tolist()


# ---------------------------------------------------------------------------------------------
# 1. Storages


@pytest.mark.parametrize(
    "make_storage",
    [
        lambda tmp: ListStorage(1000),
        lambda tmp: LazyTensorStorage(1000),
        lambda tmp: LazyMemmapStorage(1000, scratch_dir=tmp),
    ],
    ids=["ListStorage", "LazyTensorStorage", "LazyMemmapStorage"],
)
@pytest.mark.parametrize("prioritized", [False, True], ids=["laber", "per-laber"])
def test_every_storage_samples(make_storage, prioritized, tmp_path):
    """``ListStorage``, TorchRL's default, crashed: its rows come back as a list."""
    rb = filled(sampler_of(prioritized), make_storage(tmp_path))
    sample = rb.sample()
    assert sample.batch_size == (B,) and (sample["priority_weight"] > 0).all()
    stored = (
        torch.stack([rb.storage[i] for i in rows_of(sample)])
        if isinstance(rb.storage, ListStorage)
        else rb.storage[sample["index"]]
    )
    torch.testing.assert_close(sample["observation"], stored["observation"])


def test_plain_tensor_or_pytree_rows_are_refused_with_a_clear_error():
    rb = ReplayBuffer(storage=LazyTensorStorage(100), sampler=laber_sampler(), batch_size=B)
    rb.extend(torch.randn(50, 4))
    with pytest.raises(TypeError, match="LaBER scores TensorDict rows"):
        rb.sample()
    rb = ReplayBuffer(storage=ListStorage(100), sampler=laber_sampler(), batch_size=B)
    rb.extend([(torch.randn(4), torch.randn(1)) for _ in range(50)])
    with pytest.raises(TypeError, match="LaBER scores TensorDict rows"):
        rb.sample()


@tensorclass
class Transitions:
    observation: torch.Tensor
    action: torch.Tensor
    next: TensorDict


@pytest.mark.parametrize("list_storage", [False, True], ids=["LazyTensorStorage", "ListStorage"])
def test_tensorclass_rows_are_scored_as_their_fields(list_storage):
    """A tensorclass wraps a TensorDict: LaBER scores its fields (the draw equals the TensorDict's)."""
    rows, loss = batch(ROWS), dqn_loss()
    data = Transitions(observation=rows["observation"], action=rows["action"], next=rows["next"], batch_size=[ROWS])
    storage = ListStorage(1000) if list_storage else LazyTensorStorage(1000)
    rb = ReplayBuffer(
        storage=storage, sampler=laber_sampler(loss=loss), batch_size=B, generator=torch.Generator().manual_seed(1)
    )
    rb.extend([data[i] for i in range(ROWS)] if list_storage else data)
    twin = ReplayBuffer(
        storage=LazyTensorStorage(1000),
        sampler=laber_sampler(loss=loss),
        batch_size=B,
        generator=torch.Generator().manual_seed(1),
    )
    twin.extend(rows)
    sample, info = rb.sample(return_info=True)
    expected, expected_info = twin.sample(return_info=True)
    assert type(sample) is Transitions
    torch.testing.assert_close(sample.observation, expected["observation"])
    torch.testing.assert_close(info["priority_weight"], expected_info["priority_weight"])


def test_trajectory_rows_are_refused_with_a_clear_error():
    """LaBER draws transitions: a storage whose rows are trajectories is refused with a message that says
    so (not a shape error from inside the scoring)."""
    trajectories = batch(6 * 4).reshape(6, 4)
    rb = ReplayBuffer(storage=LazyTensorStorage(100), sampler=laber_sampler(), batch_size=B)
    rb.extend(trajectories)  # 6 rows of [4] steps each
    with pytest.raises(ValueError, match=r"one transition per storage row.*\(4,\)"):
        rb.sample()


@pytest.mark.parametrize("prioritized", [False, True], ids=["laber", "per-laber"])
def test_a_two_dimensional_storage_is_sampled_by_transition(prioritized):
    """``LazyTensorStorage(..., ndim=2)`` keeps a collector's ``[T, num_envs]`` batches whole: the draw is
    over its transitions, and the index comes back as TorchRL's samplers give it there (one coordinate per
    dimension), so the rows, priorities and LaBER's weights line up."""
    loss = td3_loss()
    sampler = per_laber(loss=loss) if prioritized else laber_sampler(loss=loss)
    rb = TensorDictReplayBuffer(storage=LazyTensorStorage(1000, ndim=2), sampler=sampler, batch_size=B)
    rb.extend(batch(50 * 4, continuous=True).reshape(50, 4))  # 50 steps of 4 environments
    sample = rb.sample()
    assert sample.batch_size == (B, 3) and sample["index"].shape == (B, 3, 2)  # [B, 1 + C], (step, env)
    stored = rb.storage[tuple(sample["index"].reshape(-1, 2).unbind(-1))].reshape(B, 3)
    torch.testing.assert_close(sample["observation"], stored["observation"])
    assert (sample["priority_weight"] > 0).all() and (sample["priority_weight"][:, 0] == 1).all()
    if prioritized:
        # Each cell's coordinates get its priority. Flat: on a storage with ndim > 1 TorchRL's update_priority
        # transposes a 2-D priority (its [envs, T] layout), which would pair the cells with other rows.
        rb.update_priority(sample["index"].reshape(-1, 2), sample["td_error"].reshape(-1))
        # A cell drawn twice gets the last of its priorities, as update_priority writes them in order.
        last = dict(zip(map(tuple, sample["index"].reshape(-1, 2).tolist()), sample["td_error"].reshape(-1).tolist()))
        shape = tuple(rb.storage.shape)  # the tree is over the storage's rows, raveled
        leaves = torch.tensor([sampler._sum_tree[int(np.ravel_multi_index(cell, shape))] for cell in last])
        expected = torch.tensor([(p + sampler._eps) ** 0.7 for p in last.values()])
        torch.testing.assert_close(leaves, expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# 2. The buffer's generator


@pytest.mark.parametrize("prioritized", [False, True], ids=["laber", "per-laber"])
def test_the_buffers_generator_decides_the_rows(prioritized):
    """Two buffers with the same seed give the same rows; a restored generator state repeats a sample.
    (Not with prefetch: two threads then race for the generator, for TorchRL's own samplers too.)"""
    prefetch = None

    def run(seed):
        torch.manual_seed(0)  # the same networks
        rb = filled(
            sampler_of(prioritized),
            generator=torch.Generator().manual_seed(seed),
            prefetch=prefetch,
        )
        return [rows_of(rb.sample()) for _ in range(4)]

    assert run(1) == run(1)
    assert run(1) != run(2)
    rb = filled(sampler_of(prioritized), generator=torch.Generator().manual_seed(3))
    state = rb._rng.get_state()
    first = rows_of(rb.sample())
    rb._rng.set_state(state)
    assert rows_of(rb.sample()) == first


@pytest.mark.parametrize("prioritized", [False, True], ids=["laber", "per-laber"])
def test_prefetched_batches_are_laber_batches(prioritized):
    rb = filled(sampler_of(prioritized), prefetch=3)
    for _ in range(5):
        sample = rb.sample()
        assert sample.batch_size == (B,) and (sample["priority_weight"] > 0).all() and "target_value" in sample.keys()


# ---------------------------------------------------------------------------------------------
# 3., 4. Priorities under PER-LaBER


def tree(sampler):
    return torch.tensor([sampler._sum_tree[i] for i in range(ROWS)])


def test_a_per_laber_sampler_is_a_prioritized_sampler_to_torchrl():
    assert isinstance(per_laber(), PrioritizedSampler) and not isinstance(laber_sampler(), PrioritizedSampler)
    with pytest.raises(TypeError, match="PrioritizedLaBERSampler"):
        laber_sampler(PrioritizedSampler(1000, alpha=0.7, beta=0.5))


def test_tensordict_priority_updates_reach_the_inner_tree():
    """``rb.update_tensordict_priority(sample)`` and ``rb.add`` of a row with a priority did nothing:
    TorchRL checks ``isinstance(sampler, PrioritizedSampler)`` first."""
    rb = filled(per_laber())
    before = tree(rb.sampler)
    sample = rb.sample()
    sample["td_error"] = torch.full((B,), 7.0)
    rb.update_tensordict_priority(sample)
    after = tree(rb.sampler)
    changed = (after != before).nonzero().flatten().tolist()
    assert sorted(set(changed)) == sorted(set(rows_of(sample)))
    torch.testing.assert_close(after[sample["index"]], torch.full((B,), (7.0 + rb.sampler._eps) ** 0.7))
    row = batch(1)[0]
    row["td_error"] = torch.tensor(3.0)
    index = rb.add(row)
    assert rb.sampler._sum_tree[int(index)] == pytest.approx((3.0 + rb.sampler._eps) ** 0.7, rel=1e-5)


@pytest.mark.parametrize("storage", ["lazy", "full"])
def test_a_new_per_laber_sampler_over_a_storage_with_data_samples(storage):
    """The rows already in a storage get PER's default priority when the buffer is made (``non-positive
    p_sum`` before), for a storage filled by another buffer and for a ``TensorStorage`` made full."""
    if storage == "lazy":
        store = LazyTensorStorage(1000)
        filled(RandomSampler(), store)
    else:
        store = TensorStorage(batch(ROWS), max_size=ROWS)
    rb = TensorDictReplayBuffer(storage=store, sampler=per_laber(ROWS if storage == "full" else 1000), batch_size=B)
    assert rb.sample().batch_size == (B,)
    assert tree(rb.sampler).min() > 0


def test_scheduler_reaches_pers_beta_and_alpha():
    rb = filled(per_laber())
    scheduler = LinearScheduler(rb, param_name="beta", final_value=1.0, num_steps=2)
    scheduler.step()
    assert rb.sampler.beta == pytest.approx(0.75)
    rb.sampler.alpha = 0.5
    assert rb.sampler.alpha == 0.5


def test_flat_and_twin_critic_priority_updates():
    """``[B, 1 + C]`` batches of independent twin critics update each row's own priority with
    ``rb.update_priority(batch["index"], batch["td_error"])``. TorchRL's ``update_tensordict_priority``
    reduces a 2-D batch to its first column (the actor's rows would get the critics' priorities, and the
    critics' rows none): that call is refused with the one that works, not taken silently."""
    rb = TensorDictReplayBuffer(storage=LazyTensorStorage(1000), sampler=per_laber(loss=td3_loss()), batch_size=B)
    rb.extend(batch(ROWS, continuous=True))
    sample = rb.sample()
    assert sample.batch_size == (B, 3)
    with pytest.raises(ValueError, match=r"rb.update_priority\(batch\['index'\], batch\['td_error'\]\)"):
        rb.update_tensordict_priority(sample)
    assert (tree(rb.sampler) == 1.0).all()  # nothing written by the refused call
    rb.update_priority(sample["index"], sample["td_error"])
    after = tree(rb.sampler)
    assert set((after != 1.0).nonzero().flatten().tolist()) == set(sample["index"].flatten().tolist())
    # A row drawn in several cells gets the last cell's priority, as update_priority writes them in order.
    last = dict(zip(sample["index"].flatten().tolist(), sample["td_error"].flatten().tolist()))
    expected = torch.tensor([(p + rb.sampler._eps) ** 0.7 for p in last.values()])
    torch.testing.assert_close(after[list(last)], expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# 5. Iteration


def test_iterating_twice_with_an_inner_sampler_without_replacement():
    """``list(rb); list(rb)``: TorchRL resets ``ran_out`` between passes, which had no setter."""
    rb = filled(laber_sampler(SamplerWithoutReplacement()), rows=64)
    first, second = list(rb), list(rb)
    assert len(first) == len(second) == 64 // (M * B)
    assert all(b.batch_size == (B,) for b in first + second)


# ---------------------------------------------------------------------------------------------
# 8. LaBER as a transform


def test_laber_as_a_transform_of_a_buffer_names_the_sampler():
    for rb in (
        TensorDictReplayBuffer(storage=LazyTensorStorage(1000), batch_size=M * B),
        ReplayBuffer(storage=LazyTensorStorage(1000), batch_size=M * B),
    ):
        with pytest.raises(TypeError, match="LaBERSampler"):
            rb.append_transform(LaBER(dqn_loss(), batch_size=B))
    with pytest.raises(TypeError, match="LaBERSampler"):
        TensorDictReplayBuffer(
            storage=LazyTensorStorage(1000), batch_size=M * B, transform=LaBER(dqn_loss(), batch_size=B)
        ).extend(batch(ROWS))


# ---------------------------------------------------------------------------------------------
# 9. Pickling leaves the networks behind; state round-trips


@pytest.mark.parametrize("prioritized", [False, True], ids=["laber", "per-laber"])
def test_a_pickled_buffer_keeps_its_state_and_asks_for_its_networks(prioritized):
    rb = filled(sampler_of(prioritized))
    if prioritized:
        rb.update_priority(torch.arange(ROWS), torch.rand(ROWS) * 5)
    for clone in (pickle.loads(pickle.dumps(rb)), copy.deepcopy(rb)):
        assert "detached" in repr(clone.sampler)
        with pytest.raises(RuntimeError, match="attach"):
            clone.sample()
        clone.sampler.attach(rb.sampler.laber)  # the live LaBER module, whose networks train
        assert clone.sample().batch_size == (B,)
        if prioritized:
            torch.testing.assert_close(tree(clone.sampler), tree(rb.sampler))


def test_state_dict_round_trips_through_a_fresh_per_laber_buffer():
    rb = filled(per_laber())
    rb.update_priority(torch.arange(ROWS), torch.rand(ROWS) * 5)
    fresh = TensorDictReplayBuffer(storage=LazyTensorStorage(1000), sampler=per_laber(), batch_size=B)
    fresh.load_state_dict(rb.state_dict())
    torch.testing.assert_close(tree(fresh.sampler), tree(rb.sampler))


# ---------------------------------------------------------------------------------------------
# 12. GER and GER-LaBER on the sampler extension point


@pytest.mark.parametrize("laber", [False, True], ids=["ger", "ger-laber"])
def test_ger_priorities_are_the_exact_gradient_norms_of_the_rows_used(laber):
    loss = dqn_loss()
    if laber:
        ger = GERLaBERSampler(LaBER(loss, batch_size=B), 1000, alpha=1.0, beta=0.4, eps=0.0, m=M)
    else:
        ger = GERSampler(loss, 1000, alpha=1.0, beta=0.4, eps=0.0)
    rb = filled(ger)
    sample = rb.sample()
    written = rb.sampler.update_from(sample)
    expected = grad_norm_scores(loss, sample, "exact")
    torch.testing.assert_close(written, expected)
    torch.testing.assert_close(
        torch.tensor([ger._sum_tree[i] for i in rows_of(sample)]), expected, rtol=1e-5, atol=1e-7
    )
    assert "detached" not in repr(rb.sampler)
    with pytest.raises(RuntimeError, match="attach"):
        pickle.loads(pickle.dumps(ger)).priorities(sample)


def test_ger_over_twin_critics_is_the_norm_over_both():
    loss = td3_loss()
    loss.policy_noise = 0.0  # a deterministic target, to compare
    ger = GERSampler(loss, 1000, alpha=1.0, beta=0.4, eps=0.0)
    rb = TensorDictReplayBuffer(storage=LazyTensorStorage(1000), sampler=ger, batch_size=B)
    rb.extend(batch(ROWS, continuous=True))
    sample = rb.sample()
    torch.testing.assert_close(ger.update_from(sample), grad_norm_scores(loss, sample, "exact").square().sum(0).sqrt())
