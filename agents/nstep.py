"""``--n-step``: TorchRL's ``MultiStepTransform`` on the replay buffer, as the agents write with it
(:class:`MultiStep`, :func:`add_n_step`; docs/agents.md, "n-step returns")."""

from __future__ import annotations

from tensordict import TensorDict
from torchrl.data import TensorDictReplayBuffer
from torchrl.envs import MultiStepTransform


class MultiStep(MultiStepTransform):
    """TorchRL's ``MultiStepTransform(n_steps, gamma)`` as the agents write with it (``--n-step``).

    On write, row ``t`` becomes the ``k``-step transition, ``k = min(n, steps left in its episode)``:
    ``("next", "reward") = sum_{j<k} gamma^j r_{t+j}``, the rest of ``"next"`` (observation, ``done``,
    ``terminated``, ``truncated``) that of step ``t + k - 1``, and ``"steps_to_next_obs" = k``; TorchRL's
    losses then regress on ``y = R_t^(k) + gamma^k (1 - terminated) Q'(s_{t+k})``, and so does LaBER, which
    reads the same rows. A row is written once its ``n`` successors are in (the last ``n`` wait). Three
    differences from the transform as TorchRL builds it, all on the writing side:

    * the done flags come from the window's end (``done_keys=[]``): TorchRL's default keeps row ``t``'s own,
      so the ``n - 1`` rows before a termination would bootstrap from the terminal observation;
    * ``rb.add`` of one transition (batch size ``[]``): ``TensorDictReplayBuffer.add`` hands it to the
      transform as it is, and the transform needs a time dimension;
    * the waiting transitions are saved with the buffer (``rb.dumps``, the checkpoint), so ``--resume``
      continues the window where it stopped.

    The transitions must arrive in order, one env's consecutive steps, ``("next", "done")`` set at every
    episode's end (termination or truncation), as the agents' loops add them.

    Examples:
        >>> import torch
        >>> from torchrl.data import LazyTensorStorage, TensorDictReplayBuffer
        >>> from agents.envs import to_tensordict
        >>> rb = TensorDictReplayBuffer(storage=LazyTensorStorage(10), transform=MultiStep(3, gamma=0.5))
        >>> for t in range(5):  # one episode of 5 steps, reward 1 each
        ...     _ = rb.add(to_tensordict([t], 0, 1.0, [t + 1], t == 4, False, "cpu"))
        >>> rb[:]["next", "reward"].squeeze(-1), rb[:]["steps_to_next_obs"]
        (tensor([1.7500, 1.7500]), tensor([3, 3]))
    """

    def __init__(self, n_steps: int, gamma: float) -> None:
        super().__init__(n_steps, gamma, done_keys=[])

    def _inv_call(self, tensordict):
        if tensordict.batch_dims == 0:  # one transition: a time dimension of one step
            out = super()._inv_call(tensordict.unsqueeze(0))
            return None if out is None else out.squeeze(0)
        return super()._inv_call(tensordict)

    def truncate(self) -> None:
        """End the episode whose steps wait here as a truncation (a resumed run whose env did not pickle
        starts a new one): they are written with the rewards of their own episode and bootstrap from its
        last observation."""
        if self._buffer is not None:
            for key in ("done", "truncated"):
                self._buffer["next", key][-1] = True

    def get_extra_state(self) -> dict:
        pending = self._buffer
        # Plain tensors: TorchRL's rb.loads reads the transform's state with torch.load(weights_only=True).
        return {
            "pending": None if pending is None else pending.to_dict(),
            "size": None if pending is None else list(pending.batch_size),
        }

    def set_extra_state(self, state: dict) -> None:
        pending = state["pending"]
        self._buffer = None if pending is None else TensorDict(pending, batch_size=state["size"])


def add_n_step(rb: TensorDictReplayBuffer, n_step: int, gamma: float) -> None:
    """``--n-step``: ``rb`` stores ``n_step``-step transitions (:class:`MultiStep`, discounted by the loss's
    ``gamma``); ``n_step=1`` leaves it as it is (one-step rows, today's runs unchanged).

    Examples:
        >>> from torchrl.data import LazyTensorStorage
        >>> rb = TensorDictReplayBuffer(storage=LazyTensorStorage(10))
        >>> add_n_step(rb, 3, gamma=0.99)
        >>> type(rb.transform[0]).__name__
        'MultiStep'
    """
    if isinstance(n_step, bool) or not isinstance(n_step, int) or n_step < 1:
        raise ValueError(f"--n-step must be an int >= 1, got {n_step!r}")
    if n_step == 1:
        return
    if len(rb.transform):
        # Atari's FrameStackReplay rebuilds a row's frame stacks from its neighbours in the storage.
        raise ValueError(f"--n-step {n_step} needs a buffer without a transform of its own, got {rb.transform}")
    rb.append_transform(MultiStep(n_step, gamma))
