"""README's "Porting a TorchRL script" swap, as text edits on TorchRL's own scripts (applied at run time).

Each edit replaces a piece of text that must occur exactly once in the file: a script that changed
under it fails loudly with :class:`SwapError` (file and missing text named), never a half-applied swap.
Nothing here imports torch; ``tests/test_torchrl_scripts_check.py`` runs it on fixture text.

    python tools/torchrl_scripts_check/swap.py SCRIPTS_DIR   # patch a copy of sota-implementations/ in place
"""

from __future__ import annotations

import difflib
import sys
from dataclasses import dataclass
from pathlib import Path


class SwapError(ValueError):
    """A line the swap expects is missing (or not unique) in a TorchRL script."""


@dataclass(frozen=True)
class Edit:
    old: str
    new: str


def _insert_after(anchor: str, text: str) -> Edit:
    return Edit(anchor, anchor + text)


def _buffer_edits(indent: str) -> list[Edit]:
    """sac/utils.py's and td3/utils.py's make_replay_buffer (td3's sits one level deeper, in a ``with``)."""
    i, j = indent, indent + "    "
    return [
        Edit(
            f"{i}if prb:\n{j}replay_buffer = TensorDictPrioritizedReplayBuffer(\n{j}    alpha=0.7,\n{j}    beta=0.5,\n",
            f"{i}if prb:\n{j}replay_buffer = TensorDictReplayBuffer(\n"
            f"{j}    sampler=PrioritizedLaBERSampler(\n"
            f"{j}        LaBER(loss_module, batch_size), buffer_size, alpha=0.7, beta=0.5, m=4\n"
            f"{j}    ),\n",
        ),
        Edit(
            f"{i}else:\n{j}replay_buffer = TensorDictReplayBuffer(\n",
            f"{i}else:\n{j}replay_buffer = TensorDictReplayBuffer(\n"
            f"{j}    sampler=LaBERSampler(LaBER(loss_module, batch_size), m=4),\n",
        ),
    ]


IMPORT_LABER = _insert_after(
    "from torchrl.record import VideoRecorder\n",
    "from torchsample import LaBER, LaBERSampler, PrioritizedLaBERSampler\n",
)
# PER-LaBER's batches are [B, 1 + C] for twin critics: each cell's priority, which update_priority(batch) (the
# scripts' call, which TorchRL's own PER buffer refuses too) cannot give.
PRIORITY_UPDATE = Edit(
    "replay_buffer.update_priority(sampled_tensordict)\n",
    'replay_buffer.update_priority(sampled_tensordict["index"], sampled_tensordict["td_error"])\n',
)
# The script passes its loss to make_replay_buffer and wraps it once for the update.
SCRIPT_EDITS = [
    _insert_after(
        "from torchrl.record.loggers import generate_exp_name, get_logger\n", "from torchsample import LaBERLoss\n"
    ),
    _insert_after(
        "    loss_module, target_net_updater = make_loss_module(cfg, model)\n",
        "    laber_loss = LaBERLoss(loss_module)\n",
    ),
    _insert_after("    replay_buffer = make_replay_buffer(\n", "        loss_module=loss_module,\n"),
]

DQN_BUFFER = """    replay_buffer = TensorDictReplayBuffer(
        pin_memory=False,
        storage=LazyTensorStorage(max_size=cfg.buffer.buffer_size, device=device),
"""

SWAPS: dict[str, list[Edit]] = {
    # The loss first, then the buffer whose sampler scores with it.
    "dqn/dqn_cartpole.py": [
        _insert_after(
            "from torchrl.objectives import DQNLoss, HardUpdate\n",
            "from torchsample import LaBER, LaBERLoss, LaBERSampler\n",
        ),
        Edit(
            "    # Create the replay buffer\n" + DQN_BUFFER + "        batch_size=cfg.buffer.batch_size,\n    )\n\n",
            "",
        ),
        _insert_after(
            "        loss_module, value_network_update_interval=cfg.loss.hard_update_freq\n    )\n",
            "\n    # Create the replay buffer\n"
            + DQN_BUFFER
            + "        sampler=LaBERSampler(\n"
            + "            LaBER(loss_module, cfg.buffer.batch_size), m=4, compile=cfg.compile.compile\n"
            + "        ),\n"
            + "        batch_size=cfg.buffer.batch_size,\n    )\n    laber_loss = LaBERLoss(loss_module)\n",
        ),
        Edit(
            "        loss_td = loss_module(sampled_tensordict)\n", "        loss_td = laber_loss(sampled_tensordict)\n"
        ),
    ],
    "sac/utils.py": [
        Edit("    TensorDictPrioritizedReplayBuffer,\n", ""),
        IMPORT_LABER,
        Edit("    shared: bool = False,\n):\n", "    shared: bool = False,\n    loss_module=None,\n):\n"),
        *_buffer_edits("    "),
    ],
    "sac/sac.py": [
        *SCRIPT_EDITS,
        Edit(
            "        loss_td = loss_module(sampled_tensordict)\n", "        loss_td = laber_loss(sampled_tensordict)\n"
        ),
        PRIORITY_UPDATE,
    ],
    "td3/utils.py": [
        Edit(
            "from torchrl.data import TensorDictPrioritizedReplayBuffer, TensorDictReplayBuffer\n",
            "from torchrl.data import TensorDictReplayBuffer\n",
        ),
        IMPORT_LABER,
        Edit("    compile: bool = False,\n):\n", "    compile: bool = False,\n    loss_module=None,\n):\n"),
        *_buffer_edits("        "),
    ],
    "td3/td3.py": [
        *SCRIPT_EDITS,
        Edit(
            "        q_loss, *_ = loss_module.value_loss(sampled_tensordict)\n",
            "        q_loss, *_ = laber_loss.value_loss(sampled_tensordict)\n",
        ),
        Edit(
            "            actor_loss, *_ = loss_module.actor_loss(sampled_tensordict)\n",
            "            actor_loss, *_ = laber_loss.actor_loss(sampled_tensordict)\n",
        ),
        PRIORITY_UPDATE,
    ],
}
SCRIPTS = {"dqn": ["dqn/dqn_cartpole.py"], "sac": ["sac/sac.py", "sac/utils.py"], "td3": ["td3/td3.py", "td3/utils.py"]}


def apply(text: str, edits: list[Edit], name: str = "<text>") -> str:
    """``text`` with every edit applied in order; :class:`SwapError` if an edit's text is not there exactly once."""
    for edit in edits:
        count = text.count(edit.old)
        if count != 1:
            where = "missing" if count == 0 else f"found {count} times, expected once"
            raise SwapError(f"{name}: the swap expects this text ({where}):\n{edit.old}")
        text = text.replace(edit.old, edit.new)
    return text


def diff(before: str, after: str, name: str, context: int = 1) -> str:
    return "".join(
        difflib.unified_diff(before.splitlines(True), after.splitlines(True), f"a/{name}", f"b/{name}", n=context)
    )


def changed_lines(before: str, after: str) -> tuple[int, int]:
    """(lines added, lines removed) by the swap."""
    added = removed = 0
    for line in difflib.unified_diff(before.splitlines(), after.splitlines(), lineterm="", n=0):
        if line.startswith("+") and not line.startswith("+++"):
            added += 1
        elif line.startswith("-") and not line.startswith("---"):
            removed += 1
    return added, removed


def swap_tree(root: Path, script: str) -> dict[str, str]:
    """Apply the swap of ``script`` ("dqn", "sac", "td3") to the files under ``root`` (a copy of
    sota-implementations/), in place; returns each file's unified diff. Nothing is written unless every
    edit of every file applies."""
    patched = {}
    for name in SCRIPTS[script]:
        before = (root / name).read_text()
        patched[name] = (before, apply(before, SWAPS[name], name))
    for name, (_, after) in patched.items():
        (root / name).write_text(after)
    return {name: diff(before, after, name) for name, (before, after) in patched.items()}


if __name__ == "__main__":
    for script in SCRIPTS:
        for text in swap_tree(Path(sys.argv[1]), script).values():
            print(text)
