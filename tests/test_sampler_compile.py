"""``LaBERSampler(..., compile=True)``: scoring and draw in one compiled graph (issue 28, item 3).

The compiled sample is the eager one's: rows of the storage, LaBER's weights of their priorities, the loss's
targets; and the graph has no break (a break would run the scoring eagerly again, in pieces).
"""

import pytest
import torch
from torchrl.data import LazyTensorStorage, TensorDictReplayBuffer

from tests.setups import CONTINUOUS, LOSSES, batch, total_loss
from torchsample import LaBER, LaBERLoss, LaBERSampler, pred_and_target
from torchsample.critics import TARGET

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", ["dqn", "td3"])
def test_compiled_sample_is_laber_on_the_stored_rows(name):
    torch._dynamo.reset()
    torch.manual_seed(0)
    loss = LOSSES[name]()
    sampler = LaBERSampler(LaBER(loss, batch_size=16, eps=0.0), m=4, compile=True)
    rb = TensorDictReplayBuffer(storage=LazyTensorStorage(500), sampler=sampler, batch_size=16)
    rb.extend(batch(500, continuous=CONTINUOUS[name]))
    sample = rb.sample()
    if name == "dqn":
        assert sample.batch_size == (16,)
        stored = rb.storage[sample["index"]]
        torch.testing.assert_close(sample["observation"], stored["observation"])
        q, y = pred_and_target(loss, stored)
        torch.testing.assert_close(sample[TARGET], y)  # DQN's target is deterministic
        # Every kept row's weight is mean(p) / p_i over the large batch: w_i p_i is one constant per sample.
        p = (q - y).abs()  # the l2 surrogate 2|q - y| up to its factor, eps = 0
        product = sample["priority_weight"] * p
        torch.testing.assert_close(product, product[:1].expand_as(product), rtol=1e-4, atol=1e-6)
    else:
        assert sample.batch_size == (16, 3)  # [B, 1 + C]
        stored = rb.storage[sample["index"].reshape(-1)].reshape(16, 3)
        torch.testing.assert_close(sample["observation"], stored["observation"])
        assert (sample["priority_weight"][:, 0] == 1).all() and (sample["priority_weight"] > 0).all()
    total_loss(LaBERLoss(loss)(sample)).backward()
    rb.sample()  # the second call reuses the graph


@pytest.mark.parametrize("name", ["dqn", "sac", "td3"])
def test_compiled_selection_has_no_graph_break(name):
    torch._dynamo.reset()
    loss = LOSSES[name]()
    laber = LaBER(loss, batch_size=8)
    large = batch(32, continuous=CONTINUOUS[name])
    laber.selection(large, 8)  # eager first: lazy initialisations happen outside the trace
    explanation = torch._dynamo.explain(lambda td: laber.selection(td, 8))(large)
    assert explanation.graph_break_count == 0, [str(b.reason)[:300] for b in explanation.break_reasons]
