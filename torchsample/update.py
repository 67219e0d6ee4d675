"""One training update, optionally compiled: ``objective -> backward -> optimizer step -> target update``.

Under ``torch.compile`` the update is two ``fullgraph=True`` graphs with the backward between them:

* the objective (surrogate forward on the large batch, the LaBER op, the loss), and
* the optimizer step and the target-network update.

``Tensor.backward()`` itself is not traced by dynamo in torch 2.14 (``trace_autograd_ops`` is off
by default and, switched on, failed here on TorchRL's losses); it runs the backward graph that
AOTAutograd compiled with the objective. ``Optimizer.step`` graph-breaks on purpose around its
``no_grad`` switch (pytorch/pytorch#104053), so the step graph calls the unwrapped step inside
``torch.no_grad()``: the same arithmetic, no break.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch
from torch import Tensor
from torchrl.objectives import HardUpdate

__all__ = ["make_update"]


def _unwrapped_step(optimizer: torch.optim.Optimizer) -> Callable[[], Any]:
    step = type(optimizer).step
    while hasattr(step, "__wrapped__"):  # the profiling and no_grad wrappers, each a graph break
        step = step.__wrapped__
    return lambda: step(optimizer)


def make_update(
    objective: Callable[..., tuple[Tensor, Any]],
    optimizer: torch.optim.Optimizer,
    target_updater: Optional[Any] = None,
    *,
    max_grad_norm: Optional[float] = None,
    compile: bool = False,
) -> Callable[..., tuple[Tensor, Any]]:
    """Build ``update(*args) -> (loss, aux)`` from ``objective(*args) -> (loss, aux)``.

    ``update`` zeroes the gradients, evaluates ``objective``, back-propagates ``loss``, clips the
    gradient norm to ``max_grad_norm`` (if given), steps ``optimizer`` and then ``target_updater``
    (a TorchRL ``SoftUpdate``/``HardUpdate``, if given). With ``compile=True`` the objective and the
    step are each compiled with ``fullgraph=True``: a graph break is an error, not a slowdown. A
    ``SoftUpdate`` is part of the step graph; a ``HardUpdate`` (a copy every K steps) runs eagerly.

    Examples:
        >>> import torch
        >>> net = torch.nn.Linear(3, 1)
        >>> opt = torch.optim.Adam(net.parameters(), lr=0.1)
        >>> update = make_update(lambda x: (net(x).square().mean(), None), opt)
        >>> loss, _ = update(torch.ones(4, 3))
        >>> loss.requires_grad
        False
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    raw_step = _unwrapped_step(optimizer)
    # HardUpdate counts steps in a Python int, which dynamo would specialise on (a recompile per
    # value, measured: the compiled DQN update ran 3.8x slower): it stays outside the graph.
    target_in_graph = target_updater is not None and not isinstance(target_updater, HardUpdate)

    def apply() -> None:
        with torch.no_grad():
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            raw_step()
        if target_in_graph:
            target_updater.step()

    # The two graphs, before compilation: what torch._dynamo.explain can inspect.
    graphs = (objective, apply)
    if compile:
        objective = torch.compile(objective, fullgraph=True)
        apply = torch.compile(apply, fullgraph=True)

    def update(*args):
        optimizer.zero_grad(set_to_none=True)
        loss, aux = objective(*args)
        loss.backward()
        apply()
        if target_updater is not None and not target_in_graph:
            target_updater.step()
        return loss.detach(), aux

    update.graphs = graphs
    return update
