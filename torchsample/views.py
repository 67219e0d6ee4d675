"""Which :class:`torchsample.critics.Critic` view reads a TorchRL loss: :func:`critic_of`, its registry of the
built-in views (DQN, C51, SAC, TD3) and of a user's (``critic_of.register``), and :class:`PrivateCritic`, the
view LaBER and GER score with, of a private copy of the loss.

It sits above the views it lists (:mod:`torchsample.critics`, :mod:`torchsample.c51`): they never import it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

from tensordict import TensorDictBase
from torch import Tensor, nn
from torchrl.objectives import DistributionalDQNLoss, DQNLoss, SACLoss, TD3Loss

from .c51 import C51Critic
from .critics import Critic, DQNCritic, SACCritics, TD3Critics, private_copy

__all__ = ["critic_of", "pred_and_target", "PrivateCritic"]


class _Registry:
    """:func:`critic_of`: the view of a loss, by the nearest class in its MRO that has one."""

    def __init__(self, built_in: dict[type, type[Critic]]) -> None:
        self._views: dict[type, type[Critic]] = dict(built_in)

    def register(self, loss_class: type, view: type[Critic] | None = None):
        """``critic_of.register(MyLoss, MyCritic)``, or ``@critic_of.register(MyLoss)`` on the view."""
        if not isinstance(loss_class, type):
            raise TypeError(f"register a loss class, got {loss_class!r}")

        def add(view: type[Critic]) -> type[Critic]:
            if not (isinstance(view, type) and issubclass(view, Critic)):
                raise TypeError(f"a view must be a torchsample.critics.Critic subclass, got {view!r}")
            self._views[loss_class] = view
            return view

        return add if view is None else add(view)

    def view_class(self, loss_class: type) -> type[Critic] | None:
        return next((self._views[cls] for cls in loss_class.__mro__ if cls in self._views), None)

    def __call__(self, loss: nn.Module) -> Critic:
        """The :class:`Critic` view of a TorchRL loss, by its class (the nearest registered base class).

        Examples:
            >>> import torch
            >>> from torchrl.modules import QValueActor
            >>> from torchrl.objectives import DQNLoss
            >>> actor = QValueActor(torch.nn.Linear(4, 2), in_keys=["observation"], action_space="categorical")
            >>> critic = critic_of(DQNLoss(actor, loss_function="smooth_l1", action_space="categorical"))
            >>> type(critic).__name__, critic.loss_kind, critic.num_critics
            ('DQNCritic', 'huber', 1)
        """
        view = self.view_class(type(loss))
        if view is None:
            raise TypeError(
                f"no built-in LaBER support for {type(loss).__name__}: pass prediction=callable(td) -> (pred, target) "
                "to LaBER, or register a view: torchsample.critic_of.register(YourLoss, YourCritic), YourCritic a "
                "torchsample.critics.Critic"
            )
        return view(loss)


def pred_and_target(loss: nn.Module, td: TensorDictBase) -> tuple[Tensor, Tensor]:
    """``(prediction, target)`` of ``loss`` on the rows of ``td`` (see the module's table).

    The prediction keeps its graph, the target has none. Wrap in ``torch.no_grad()`` for the
    surrogate alone.

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from torchrl.modules import QValueActor
        >>> from torchrl.objectives import DQNLoss
        >>> loss = DQNLoss(QValueActor(torch.nn.Linear(4, 2), in_keys=["observation"],
        ...                action_space="categorical"), delay_value=True, action_space="categorical")
        >>> loss.make_value_estimator(gamma=0.99)
        >>> td = TensorDict({"observation": torch.randn(8, 4), "action": torch.randint(2, (8,)),
        ...     ("next", "observation"): torch.randn(8, 4), ("next", "reward"): torch.randn(8, 1),
        ...     ("next", "done"): torch.zeros(8, 1, dtype=torch.bool),
        ...     ("next", "terminated"): torch.zeros(8, 1, dtype=torch.bool)}, [8])
        >>> q, y = pred_and_target(loss, td)
        >>> q.shape, y.shape
        (torch.Size([8]), torch.Size([8]))
    """
    critic = critic_of(loss)
    return critic.prediction(td), critic.target(td)


# Every built-in view, in one place.
critic_of = _Registry({DQNLoss: DQNCritic, DistributionalDQNLoss: C51Critic, SACLoss: SACCritics, TD3Loss: TD3Critics})


class PrivateCritic:
    """The :class:`Critic` view of a :func:`private_copy` of ``loss``, made again when the loss gets a new
    value estimator (``loss.make_value_estimator(...)`` after LaBER was built).

    ``PrivateCritic(loss).view`` is what LaBER and GER score rows with, in whatever thread samples.
    """

    def __init__(self, loss: nn.Module) -> None:
        self.loss = loss
        self._estimator = None
        self._view: Optional[Critic] = None
        self._hooks: list[Callable[[Critic], None]] = []

    @property
    def view(self) -> Critic:
        estimator = self.loss.__dict__.get("_value_estimator")
        if self._view is None or estimator is not self._estimator:
            self._estimator = estimator
            self._view = critic_of(private_copy(self.loss))
            for hook in self._hooks:
                hook(self._view)
        return self._view

    def on_new_view(self, hook: Callable[[Critic], None]) -> None:
        """Call ``hook(view)`` on the current view and on every one made later (LaBER's last-layer capture)."""
        self._hooks.append(hook)
        if self._view is not None:
            hook(self._view)
