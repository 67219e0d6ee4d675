"""The command line every agent shares: :class:`RunOptions` (how a run is executed) and :func:`cli`
(a Config whose defaults are those of ``--env-id``'s family, parsed by tyro)."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Optional, TypeVar

import tyro

C = TypeVar("C")


@dataclass
class RunOptions:
    """How a run is executed, the same for every agent (each agent's Config adds its own fields)."""

    seed: int = 0
    """seeds python, numpy, torch and the environment"""
    device: str = "auto"
    """auto (CUDA when present), cpu or cuda"""
    compile: bool = False
    """torch.compile the update (two fullgraph graphs, see torchsample.make_update)"""
    cudagraphs: bool = False
    """capture the update in a CUDA graph (CUDA only)"""
    threads: int = 1
    """torch CPU threads (1 lets experiments.compare run one process per core)"""
    checkpoint_every: int = 0
    """steps between checkpoints (0: only at the end)"""
    keep_buffer: bool = False
    """keep the replay buffer in the final checkpoint too (the buffer of a finished run is left out unless asked:
    81 MB per MinAtar run; checkpoints a run may resume from keep it)"""
    stop_after: int = 0
    """stop (after writing a checkpoint) at this step, as a preempted job would (0: run to the end)"""
    resume: bool = False
    """continue from <out>/checkpoint exactly where it stopped (buffer, optimizer, sampler, RNGs)"""
    progress: bool = True
    """show a progress bar"""
    diagnostics_every: int = 0
    """steps between diagnostics of the critic on --diagnostics-rows rows drawn uniformly from the buffer, to
    <out>/diagnostics.csv: App. H's total variation of each surrogate (and uniform) to the exact gradient
    norms', App. C's second moments, the gradient norm and variance, srank, dormant fraction
    (torchsample.diagnostics.critic_diagnostics; costs a backward per row-batch, so steps/s drops; 0: off)"""
    diagnostics_rows: int = 0
    """rows the diagnostics draw (0: m * batch-size, the large batch LaBER scores). A fixed count makes
    srank, the dormant fraction and the TVs comparable across batch sizes (srank is bounded by it)"""
    logger: Literal["csv", "tensorboard", "wandb"] = "csv"
    """TorchRL logger that also receives every scalar, under <out>/<logger>/ (wandb offline, no network);
    <out>/train.csv and <out>/eval.csv are written whichever is chosen"""


def cli(env_defaults: Callable[[str], C], default_env_id: str, args: Optional[Sequence[str]] = None) -> C:
    """Parse ``args`` (the command line when None) into a Config whose defaults are those of
    ``--env-id``'s family (``default_env_id``'s when ``--env-id`` is not given).

    ``env_defaults(env_id)`` gives an agent's Config for ``env_id`` (e.g. DQN's MinAtar values for
    ``MinAtar/*``). ``--env-id`` is read first, so ``--help`` shows the values a run will use:
    ``python -m agents.dqn --env-id MinAtar/Breakout-v1 --help``.

    Examples:
        >>> from agents import dqn
        >>> cfg = cli(dqn.env_defaults, "CartPole-v1", ["--env-id", "MinAtar/Breakout-v1", "--lr", "3e-4"])
        >>> cfg.batch_size, cfg.optimizer, cfg.lr
        (32, 'rmsprop', 0.0003)
    """
    # tyro builds its parser, --help included, from one default instance: the family must be known first.
    peek = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    peek.add_argument("--env-id", "--env_id", default=default_env_id)
    env_id = peek.parse_known_args(args)[0].env_id
    defaults = env_defaults(env_id)
    return tyro.cli(type(defaults), default=defaults, args=args)
