"""The environments the agents run on, and what a transition looks like in the buffer: :func:`make_env`
(gymnasium, MinAtar registered on demand, Atari preprocessed), :func:`to_tensordict` (TorchRL's layout),
:func:`evaluate` (a policy's mean return), :func:`seed_everything` and :func:`start_run` (a run's device,
threads, seeds and env)."""

from __future__ import annotations

import random
from collections.abc import Callable

import gymnasium as gym
import numpy as np
import torch
from tensordict import TensorDict

from agents.devices import resolve_device


def seed_everything(seed: int) -> None:
    """Seeds python's, numpy's and torch's global generators (the env is seeded by :func:`make_env`).

    Examples:
        >>> seed_everything(0); a = torch.rand(1); seed_everything(0)
        >>> torch.equal(a, torch.rand(1))
        True
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_env(env_id: str, seed: int) -> gym.Env:
    """A gymnasium env; ``MinAtar/*`` ids are registered on demand, ``ALE/*`` ids come preprocessed
    (``agents.atari.make_atari_env``: 84x84 grey, 4 frames, frame skip 4, sticky actions).

    Examples:
        >>> make_env("CartPole-v1", seed=0).observation_space.shape
        (4,)
    """
    if env_id.startswith("ALE/"):
        from agents.atari import make_atari_env  # ale-py and OpenCV only for Atari runs

        env = make_atari_env(env_id)
    else:
        if env_id.startswith("MinAtar/"):
            import minatar.gym

            minatar.gym.register_envs()
        env = gym.make(env_id)
    env.reset(seed=seed)
    env.action_space.seed(seed)
    return env


def to_tensordict(obs, action, reward, next_obs, terminated, truncated, device) -> TensorDict:
    """One transition in TorchRL's layout (``("next", ...)`` keys), batch size ``[]``.

    Examples:
        >>> td = to_tensordict([0.0, 1.0], 1, 1.0, [1.0, 2.0], False, False, "cpu")
        >>> td["next", "reward"], td["next", "done"]
        (tensor([1.]), tensor([False]))
    """
    return TensorDict(
        {
            "observation": torch.as_tensor(obs, device=device),
            "action": torch.as_tensor(action, device=device),
            ("next", "observation"): torch.as_tensor(next_obs, device=device),
            ("next", "reward"): torch.as_tensor([reward], dtype=torch.float32, device=device),
            ("next", "terminated"): torch.as_tensor([terminated], device=device),
            ("next", "truncated"): torch.as_tensor([truncated], device=device),
            ("next", "done"): torch.as_tensor([terminated or truncated], device=device),
        },
        batch_size=[],
        device=device,
    )


def evaluate(env_id: str, policy: Callable[[np.ndarray], np.ndarray], episodes: int, seed: int) -> float:
    """Mean undiscounted return of ``policy`` (deterministic) over ``episodes`` fresh episodes.

    Examples:
        >>> evaluate("CartPole-v1", lambda obs: 0, episodes=2, seed=0) < 20  # always pushing left falls fast
        True
    """
    env = make_env(env_id, seed)
    returns = []
    for episode in range(episodes):
        obs, _ = env.reset(seed=seed + episode)
        done, total = False, 0.0
        while not done:
            obs, reward, terminated, truncated, _ = env.step(policy(obs))
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    env.close()
    return float(np.mean(returns))


def start_run(cfg) -> tuple[torch.device, gym.Env]:
    """A run's first lines, the same in every agent: its device (``--device``), torch's CPU threads
    (``--threads``), the seeded generators and the seeded env.

    Examples:
        >>> from agents.config import RunOptions
        >>> cfg = RunOptions(device="cpu")
        >>> cfg.env_id = "CartPole-v1"
        >>> device, env = start_run(cfg)
        >>> device, env.spec.id
        (device(type='cpu'), 'CartPole-v1')
    """
    device = resolve_device(cfg.device)
    torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    return device, make_env(cfg.env_id, cfg.seed)
