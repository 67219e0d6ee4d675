"""The whole LaBER update compiles with ``fullgraph=True`` for DQN, C51, SAC and TD3.

The update is two graphs with the backward between them (see :mod:`torchsample.update`): the
objective (surrogate forward on the large batch, the LaBER op, the weighted loss) and the step
(optimizer, target-network update). Each must have zero graph breaks.
"""

import pytest
import torch
from torchrl.objectives import SoftUpdate

from tests.setups import CONTINUOUS, LOSSES, batch, total_loss
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
    """On a fixed draw, with SGD, the compiled update moves the parameters exactly as the eager one.

    The surrogate puts all the mass on one row (``eps=0``), so both draw it ``B`` times whatever
    their random streams (inductor has its own); SGD's step is the gradient itself, so a wrong loss
    or weight shows (Adam's first steps move every parameter by about ``lr`` whatever the loss).
    """
    large = batch(64)
    large["mass"] = torch.zeros(64).index_fill_(0, torch.tensor([5]), 1.0)
    params = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        loss = LOSSES["dqn"]()
        laber = LaBER(loss, batch_size=8, eps=0.0, prediction=lambda td: (td["mass"], torch.zeros_like(td["mass"])))
        weighted = LaBERLoss(loss)

        def objective(large):
            rows = laber(large)
            return weighted(rows)["loss"], rows["observation"]

        update = make_update(objective, torch.optim.SGD(loss.parameters(), lr=0.5), compile=compiled)
        for _ in range(3):
            _, observations = update(large)
            torch.testing.assert_close(observations, large["observation"][5].expand(8, -1))
        params[compiled] = torch.cat([p.detach().flatten() for p in loss.parameters()])
    torch.manual_seed(0)
    initial = torch.cat([p.detach().flatten() for p in LOSSES["dqn"]().parameters()])
    assert (params[False] - initial).abs().max() > 1e-3  # the steps moved something
    torch.testing.assert_close(params[True], params[False], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("surrogate", ["output", "last-layer"])
@pytest.mark.parametrize("name", ["dqn", "sac"])
def test_compiled_selection_returns_the_eager_types_and_keys(name, surrogate):
    torch._dynamo.reset()
    loss = LOSSES[name]()
    laber = LaBER(loss, batch_size=8, surrogate=surrogate)
    large = batch(32, continuous=CONTINUOUS[name])
    eager, compiled = laber(large), torch.compile(laber, fullgraph=True)(large)
    assert type(compiled) is type(eager)
    assert compiled.batch_size == eager.batch_size
    assert sorted(map(str, compiled.keys(True, True))) == sorted(map(str, eager.keys(True, True)))


@pytest.mark.parametrize("name", ["dqn", "td3"])
def test_compiled_last_layer_update_has_no_graph_break(name):
    """The last-layer rung's hook is registered at construction and records only while LaBER scores:
    TorchRL's vmapped critics in the training forward leave no batched tensor behind (with the hook
    recording on every forward, the compile failed: "Cannot access storage of BatchedTensorImpl")."""
    torch._dynamo.reset()
    loss = LOSSES[name]()
    laber, weighted = LaBER(loss, batch_size=8, surrogate="last-layer"), LaBERLoss(loss)

    def objective(large):
        return total_loss(weighted(laber(large))), None

    update = make_update(objective, torch.optim.SGD(loss.parameters(), lr=0.1), compile=True)  # fullgraph=True
    initial = torch.cat([p.detach().flatten() for p in loss.parameters()])
    for _ in range(2):
        update(batch(32, continuous=CONTINUOUS[name]))
    moved = torch.cat([p.detach().flatten() for p in loss.parameters()])
    assert torch.isfinite(moved).all() and (moved - initial).abs().max() > 0
