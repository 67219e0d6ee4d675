"""The whole LaBER update compiles with ``fullgraph=True`` for DQN, C51, SAC and TD3.

The update is two graphs with the backward between them (see :mod:`torchsample.update`): the
objective (surrogate forward on the large batch, the LaBER op, the weighted loss) and the step
(optimizer, target-network update). Each must have zero graph breaks.
"""
import pytest
import torch
from torchrl.objectives import SoftUpdate

from tests.setups import CONTINUOUS, LOSSES, batch
from torchsample import LaBER, LaBERLoss, make_update

pytestmark = pytest.mark.slow


def build(name, compile=False):
    loss = LOSSES[name]()
    laber = LaBER(loss, batch_size=8)
    weighted = LaBERLoss(loss)

    def objective(large):
        out = weighted(laber(large))
        return sum(value for key, value in out.items() if key.startswith("loss")), None

    optimizer = torch.optim.Adam(loss.parameters(), lr=torch.tensor(1e-3))
    return loss, make_update(objective, optimizer, SoftUpdate(loss, tau=0.05), max_grad_norm=10.0, compile=compile)


@pytest.mark.parametrize("name", ["dqn", "c51", "sac", "td3"])
def test_update_has_no_graph_break(name):
    torch._dynamo.reset()
    loss, update = build(name)
    large = batch(32, continuous=CONTINUOUS[name])
    update(large)  # eager first: lazy initialisations happen outside the trace
    objective, step = update.graphs
    for fn, args in [(objective, (large,)), (step, ())]:
        explanation = torch._dynamo.explain(fn)(*args)
        assert explanation.graph_break_count == 0, [str(b.reason)[:300] for b in explanation.break_reasons]
        assert explanation.graph_count == 1


def test_compiled_update_trains_like_eager():
    torch._dynamo.reset()
    large = batch(64)
    results = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        loss, update = build("dqn", compile=compiled)
        before = [p.detach().clone() for p in loss.parameters()]
        values = [update(large)[0] for _ in range(3)]
        moved = sum((p.detach() - b).abs().sum() for p, b in zip(loss.parameters(), before))
        results[compiled] = (torch.stack(values), moved)
    assert torch.isfinite(results[True][0]).all() and results[True][1] > 0
    # The draws differ (inductor has its own RNG), the scale of the update does not.
    assert results[True][1] == pytest.approx(results[False][1].item(), rel=0.5)
