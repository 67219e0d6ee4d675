"""tools/torchrl_scripts_check/swap.py, README's swap for TorchRL's scripts, on fixture text shaped like the
scripts' lines (no pytorch/rl checkout, no network): it applies, gives valid Python, and fails loudly."""

import ast
import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("torchrl_scripts_swap", ROOT / "tools/torchrl_scripts_check/swap.py")
swap = sys.modules.setdefault(_spec.name, importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(swap)

DQN = """from torchrl.data import LazyTensorStorage, TensorDictReplayBuffer
from torchrl.objectives import DQNLoss, HardUpdate
from torchrl.record import VideoRecorder


def main(cfg):
    model = make_dqn_model(cfg.env.env_name, device=device)

    # Create the replay buffer
    replay_buffer = TensorDictReplayBuffer(
        pin_memory=False,
        storage=LazyTensorStorage(max_size=cfg.buffer.buffer_size, device=device),
        batch_size=cfg.buffer.batch_size,
    )

    # Create the loss module
    loss_module = DQNLoss(
        value_network=model,
        loss_function="l2",
        delay_value=True,
    )
    target_net_updater = HardUpdate(
        loss_module, value_network_update_interval=cfg.loss.hard_update_freq
    )

    def update(sampled_tensordict):
        loss_td = loss_module(sampled_tensordict)
        q_loss = loss_td["loss"]
        return q_loss.detach()
"""

TD3_UTILS = """from torchrl.data import TensorDictPrioritizedReplayBuffer, TensorDictReplayBuffer
from torchrl.record import VideoRecorder


def make_replay_buffer(
    batch_size: int,
    prb: bool = False,
    buffer_size: int = 1000000,
    compile: bool = False,
):
    with ctx as scratch_dir:
        if prb:
            replay_buffer = TensorDictPrioritizedReplayBuffer(
                alpha=0.7,
                beta=0.5,
                pin_memory=False,
                batch_size=batch_size,
            )
        else:
            replay_buffer = TensorDictReplayBuffer(
                pin_memory=False,
                batch_size=batch_size,
            )
        return replay_buffer
"""

TD3 = """from torchrl.record.loggers import generate_exp_name, get_logger


def main(cfg):
    loss_module, target_net_updater = make_loss_module(cfg, model)
    replay_buffer = make_replay_buffer(
        batch_size=cfg.optim.batch_size,
    )

    def update(sampled_tensordict, update_actor):
        q_loss, *_ = loss_module.value_loss(sampled_tensordict)
        if update_actor:
            actor_loss, *_ = loss_module.actor_loss(sampled_tensordict)
        if prb:
            replay_buffer.update_priority(sampled_tensordict)
        return q_loss
"""


def test_dqn_swap_builds_the_loss_before_the_buffer_and_wraps_it():
    out = swap.apply(DQN, swap.SWAPS["dqn/dqn_cartpole.py"], "dqn")
    ast.parse(out)
    assert "from torchsample import LaBER, LaBERLoss, LaBERSampler" in out
    assert out.index("loss_module = DQNLoss(") < out.index("replay_buffer = TensorDictReplayBuffer(")
    assert out.count("replay_buffer = TensorDictReplayBuffer(") == 1
    assert "LaBER(loss_module, cfg.buffer.batch_size), m=4, compile=cfg.compile.compile" in out
    assert "loss_td = laber_loss(sampled_tensordict)" in out and "loss_module(sampled_tensordict)" not in out
    assert swap.changed_lines(DQN, out) == (13, 8)


def test_td3_swap_keeps_the_split_update_and_turns_per_into_per_laber():
    utils = swap.apply(TD3_UTILS, swap.SWAPS["td3/utils.py"], "td3/utils.py")
    script = swap.apply(TD3, swap.SWAPS["td3/td3.py"], "td3/td3.py")
    ast.parse(utils), ast.parse(script)
    assert "TensorDictPrioritizedReplayBuffer" not in utils
    assert "LaBER(loss_module, batch_size), buffer_size, alpha=0.7, beta=0.5, m=4" in utils
    assert "sampler=PrioritizedLaBERSampler(" in utils and utils.count("sampler=LaBERSampler(") == 1
    assert "loss_module=None," in utils
    assert 'replay_buffer.update_priority(sampled_tensordict["index"], sampled_tensordict["td_error"])' in script
    assert "laber_loss.value_loss(sampled_tensordict)" in script
    assert "laber_loss.actor_loss(sampled_tensordict)" in script
    assert "loss_module=loss_module," in script and "laber_loss = LaBERLoss(loss_module)" in script


def test_a_missing_or_repeated_line_fails_loudly_and_names_it():
    changed = DQN.replace("        loss_td = loss_module(sampled_tensordict)\n", "        loss_td = loss_module(td)\n")
    with pytest.raises(swap.SwapError, match=r"dqn/dqn_cartpole.py: .*missing.*\n.*loss_td = loss_module\("):
        swap.apply(changed, swap.SWAPS["dqn/dqn_cartpole.py"], "dqn/dqn_cartpole.py")
    twice = TD3 + "        q_loss, *_ = loss_module.value_loss(sampled_tensordict)\n"
    with pytest.raises(swap.SwapError, match="found 2 times"):
        swap.apply(twice, swap.SWAPS["td3/td3.py"], "td3/td3.py")


def test_swap_tree_writes_nothing_unless_every_file_applies(tmp_path):
    (tmp_path / "td3").mkdir()
    (tmp_path / "td3/td3.py").write_text(TD3)
    (tmp_path / "td3/utils.py").write_text(TD3_UTILS.replace("    compile: bool = False,\n", ""))
    with pytest.raises(swap.SwapError, match="td3/utils.py"):
        swap.swap_tree(tmp_path, "td3")
    assert (tmp_path / "td3/td3.py").read_text() == TD3  # the script, which did apply, is left as it was

    (tmp_path / "td3/utils.py").write_text(TD3_UTILS)
    diffs = swap.swap_tree(tmp_path, "td3")
    assert set(diffs) == {"td3/td3.py", "td3/utils.py"}
    assert "+        q_loss, *_ = laber_loss.value_loss(sampled_tensordict)" in diffs["td3/td3.py"]


def test_readme_shows_the_swap_the_tool_applies():
    """Every line README's porting section adds is one the tool adds (README stays true to what was checked)."""
    section = (ROOT / "README.md").read_text().split("## Porting a TorchRL script", 1)[1].split("\n## ", 1)[0]
    lines = [line for block in re.findall(r"```diff\n(.*?)```", section, re.S) for line in block.splitlines()]
    added = [line[1:].strip() for line in lines if line.startswith("+") and not line.startswith("+++")]
    removed = [line[1:].strip() for line in lines if line.startswith("-") and not line.startswith("---")]
    assert added and removed, "README's porting section has no diff"
    new = {line.strip() for edits in swap.SWAPS.values() for e in edits for line in e.new.splitlines()}
    old = {line.strip() for edits in swap.SWAPS.values() for e in edits for line in e.old.splitlines()}
    assert [line for line in added if line not in new] == []
    assert [line for line in removed if line not in old] == []
    assert "tools/torchrl_scripts_check" in section and "docs/results/torchrl-scripts.md" in section
