"""Atari for the DQN and C51 agents: the environment as Dopamine preprocesses it and a replay layout
that stores each frame once or twice instead of eight times (the Nature-DQN network is in
:mod:`agents.networks`).

* :func:`make_atari_env`: ALE v5 with sticky actions (p = 0.25), gymnasium's ``AtariPreprocessing``
  (frame skip 4 with a max over the last two frames, 84x84 grey, up to 30 no-op starts, no terminal
  on life loss) and ``FrameStackObservation`` (4 frames): observations ``[4, 84, 84]`` uint8.
* :class:`FrameStackReplay`: a replay-buffer transform that writes only the newest frame of
  ``"observation"`` and of ``("next", "observation")`` and rebuilds both stacks when a batch is
  drawn, so samplers, LaBER and the losses see ordinary ``[4, 84, 84]`` observations.

Where the settings come from: ``docs/agents.md``.
"""

from __future__ import annotations

import gymnasium as gym
import torch
from tensordict import TensorDictBase
from torchrl.envs.transforms import Transform

FRAMES = 4
"""frames per observation (the stack)"""


def is_atari(env_id: str) -> bool:
    return env_id.startswith("ALE/")


def make_atari_env(env_id: str) -> gym.Env:
    """``ALE/<Game>-v5`` preprocessed as Machado et al. (2018) and Dopamine: observations ``[4, 84, 84]`` uint8.

    The ALE env runs every frame (``frameskip=1``) so that ``AtariPreprocessing`` can skip 4 and
    max-pool the last two (the flicker fix of Mnih et al.); sticky actions (``repeat_action_probability``
    0.25, ALE v5's default, written out here) act on every emulator frame. Episodes end at game over
    (not at a lost life) or after 108 000 frames (27 000 agent steps, ALE v5's and Dopamine's cap).

    Examples:
        >>> env = make_atari_env("ALE/Pong-v5")
        >>> obs, _ = env.reset(seed=0)
        >>> obs.shape, obs.dtype.name
        ((4, 84, 84), 'uint8')
    """
    import ale_py

    gym.register_envs(ale_py)
    env = gym.make(env_id, frameskip=1, repeat_action_probability=0.25, full_action_space=False)
    env = gym.wrappers.AtariPreprocessing(
        env, noop_max=30, frame_skip=4, screen_size=84, terminal_on_life_loss=False, grayscale_obs=True, scale_obs=False
    )
    return gym.wrappers.FrameStackObservation(env, FRAMES)


class FrameStackReplay(Transform):
    """Store each transition's two newest frames, rebuild its two 4-frame stacks when it is drawn.

    Consecutive stacks of one episode share 3 of their 4 frames, and ``obs[t+1] == next_obs[t]``:
    stored whole, a transition holds 8 frames (56 448 bytes) of which 2 are new. On write
    (``buffer.add``, TorchRL's inverse transform), the row keeps ``"frame"`` (the newest frame of
    ``"observation"``), ``("next", "frame")`` (of ``("next", "observation")``), its ``"episode_step"``
    (rows since the episode began) and ``"write_count"`` (rows written before it). On sample, row
    ``i``'s older frames are the ``"frame"`` of rows ``i-1, i-2, i-3`` of the same episode; before
    the episode's first row the first frame repeats, as ``FrameStackObservation`` pads at reset.
    A row whose predecessor was already overwritten (the oldest rows of a full ring buffer) is
    recognised by ``"write_count"`` and padded the same way.

    An episode continues when the new ``"observation"`` is the previous ``("next", "observation")``
    and the previous transition was not done; so a resumed run whose env did not pickle starts a
    new episode here too. The transform's state (that previous stack, the counters) is saved with
    the buffer (``buffer.dumps``).

    Args:
        storage: the buffer's storage (the transform reads the neighbouring rows' frames there).
        obs_shape: one observation's shape, ``(4, 84, 84)`` for Atari.

    Examples:
        >>> from torchrl.data import LazyTensorStorage, TensorDictReplayBuffer
        >>> from tensordict import TensorDict
        >>> buffer = TensorDictReplayBuffer(storage=LazyTensorStorage(100), batch_size=2)
        >>> _ = buffer.append_transform(FrameStackReplay(buffer.storage, (4, 84, 84)))
        >>> frames = torch.arange(10, dtype=torch.uint8)[:, None, None].expand(10, 84, 84)
        >>> stack = lambda t: frames[[max(t - j, 0) for j in (3, 2, 1, 0)]]  # reset padding
        >>> for t in range(5):
        ...     _ = buffer.add(TensorDict({"observation": stack(t), ("next", "observation"): stack(t + 1),
        ...                                ("next", "done"): torch.tensor([False])}, []))
        >>> row = buffer.storage[4]
        >>> row["frame"].shape, "observation" in row.keys()
        (torch.Size([84, 84]), False)
        >>> batch = buffer.sample()
        >>> t = batch["index"][0].item()
        >>> torch.equal(batch["observation"][0], stack(t)), torch.equal(batch["next", "observation"][0], stack(t + 1))
        (True, True)
    """

    def __init__(self, storage, obs_shape: tuple[int, ...]) -> None:
        super().__init__(in_keys=[], out_keys=[])
        self.storage = storage
        # Written with the buffer's checkpoint (buffer.dumps saves the transforms' state_dict).
        self.register_buffer("written", torch.zeros((), dtype=torch.long))
        self.register_buffer("episode_step", torch.zeros((), dtype=torch.long))
        self.register_buffer("last_done", torch.ones((), dtype=torch.bool))
        self.register_buffer("last_next_obs", torch.zeros(obs_shape, dtype=torch.uint8))

    def _inv_call(self, tensordict: TensorDictBase) -> TensorDictBase:
        obs, next_obs = tensordict["observation"], tensordict["next", "observation"]
        continues = not self.last_done and torch.equal(self.last_next_obs, obs.to(self.last_next_obs.device))
        self.episode_step.fill_(self.episode_step + 1 if continues else 0)
        row = tensordict.exclude("observation", ("next", "observation"))
        row["frame"], row["next", "frame"] = obs[-1], next_obs[-1]
        row["episode_step"], row["write_count"] = self.episode_step.clone(), self.written.clone()
        self.written += 1
        self.last_done.fill_(bool(tensordict["next", "done"].any()))
        self.last_next_obs.copy_(next_obs)
        return row

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        rows = self.storage[:]  # a view of the written rows, no copy
        frames, write_count = rows["frame"], rows["write_count"]
        index, step, written = tensordict["index"], tensordict["episode_step"], tensordict["write_count"]
        source, stack = index, [tensordict["frame"]]
        for back in range(1, FRAMES):
            earlier = (index - back) % len(rows)
            same_episode = (back <= step) & (write_count[earlier] == written - back)
            source = torch.where(same_episode, earlier, source)  # else: repeat the episode's first frame
            stack.insert(0, frames[source])
        obs = torch.stack(stack, dim=-3)
        tensordict["observation"] = obs
        next_frame = tensordict["next", "frame"].unsqueeze(-3)
        tensordict["next", "observation"] = torch.cat([obs[..., 1:, :, :], next_frame], dim=-3)
        return tensordict
