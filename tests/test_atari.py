"""Atari (``ALE/*``) for DQN and C51: the preprocessing on a real ROM (ale-py ships them), the
Nature-DQN network, the replay layout that stores 2 of a transition's 8 frames (re-stacked exactly,
saved with the buffer, 4x smaller per transition), the Dopamine defaults, and each agent a few
hundred steps with each sampler."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from torchrl.data import LazyTensorStorage, TensorDictReplayBuffer
from torchrl.objectives import HardUpdate

from tests.conftest import AGENT_DEPS, require  # noqa: E402

require(*AGENT_DEPS + ("ale_py", "cv2"))
from agents import c51, dqn, networks  # noqa: E402
from agents.config import cli  # noqa: E402
from agents.envs import make_env, to_tensordict  # noqa: E402
from tests.test_agents import read_csv, run_agent

FRAME = 84 * 84  # bytes of one grey frame
NAIVE_FRAMES = 2 * 4 * FRAME  # "observation" and ("next", "observation"), 4 frames each: 56 448 bytes


def test_preprocessing_on_a_real_rom():
    env = make_env("ALE/Breakout-v5", seed=0)
    ale = env.unwrapped.ale
    assert ale.getFloat("repeat_action_probability") == pytest.approx(0.25)  # sticky actions, ALE v5
    assert env.unwrapped._frameskip == 1  # AtariPreprocessing skips, not the ALE env as well
    obs, _ = env.reset(seed=0)
    assert obs.shape == (4, 84, 84) and obs.dtype == np.uint8
    assert env.observation_space.shape == (4, 84, 84) and env.action_space.n == 4
    lives, life_lost, steps, frames = ale.lives(), False, 0, ale.getEpisodeFrameNumber()
    while True:
        next_obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
        steps += 1
        # frame skip 4: 4 emulator frames per step (the skip stops early on the frame that ends the game)
        assert ale.getEpisodeFrameNumber() - frames == 4 or (terminated and ale.getEpisodeFrameNumber() - frames < 4)
        frames = ale.getEpisodeFrameNumber()
        np.testing.assert_array_equal(next_obs[:3], obs[1:])  # the stack shifts by one frame
        assert 0 <= reward <= 7  # Breakout's bricks give 1, 4 or 7
        if info["lives"] < lives and info["lives"] > 0:
            life_lost = True
            assert not terminated, "a lost life must not end the episode (Dopamine, Machado et al.)"
        lives, obs = info["lives"], next_obs
        if terminated or truncated:
            break
        assert steps < 5_000, "a random Breakout game ends within a few hundred steps"
    assert life_lost and terminated and info["lives"] == 0
    env.close()


def test_nature_network_has_the_papers_shape():
    net = networks.NatureCNN(4, 6)
    # conv 4->32 8x8, 32->64 4x4, 64->64 3x3, FC 3136->512, 512->6: Mnih et al.'s 1.69M parameters
    expected = (4 * 32 * 64 + 32) + (32 * 64 * 16 + 64) + (64 * 64 * 9 + 64) + (3136 * 512 + 512) + (512 * 6 + 6)
    assert sum(p.numel() for p in net.parameters()) == expected
    frames = torch.randint(0, 256, (5, 4, 84, 84), dtype=torch.uint8)
    out = net(frames)
    assert out.shape == (5, 6)
    torch.testing.assert_close(net(frames[0]), out[0])  # one observation without a batch dimension
    torch.testing.assert_close(out, net(frames.float()))  # /255 inside: uint8 and float frames agree


def _breakout_replay(sampler: str, buffer_size: int, steps: int, restack: bool = True):
    """A replay buffer filled from ``steps`` random Breakout steps, and the transitions written in order."""
    env = make_env("ALE/Breakout-v5", seed=0)
    loss_module, _ = dqn.build_dqn(dqn.env_defaults("ALE/Breakout-v5"), env, torch.device("cpu"))
    HardUpdate(loss_module, value_network_update_interval=2_000)
    if restack:  # the agent's buffer, which re-stacks Atari frames
        cfg = dataclasses.replace(
            dqn.env_defaults("ALE/Breakout-v5"), sampler=sampler, buffer_size=buffer_size, batch_size=8, m=4
        )
        replay, _ = dqn.make_replay(cfg, loss_module, env, torch.device("cpu"))
    else:  # every stack stored whole
        replay = TensorDictReplayBuffer(storage=LazyTensorStorage(buffer_size), batch_size=8)
    written = []
    obs, _ = env.reset(seed=0)
    for _ in range(steps):
        action = env.action_space.sample()
        next_obs, reward, terminated, truncated, _ = env.step(action)
        replay.add(to_tensordict(obs, action, reward, next_obs, terminated, truncated, torch.device("cpu")))
        written.append((obs, next_obs))
        obs = env.reset()[0] if terminated or truncated else next_obs
    env.close()
    return replay, loss_module, written


def _assert_restacked_exactly(replay, written, batch) -> int:
    """Every drawn row's stacks equal the ones written; returns how many rows could not be checked
    (the oldest rows of a full ring buffer, whose earlier frames were overwritten)."""
    oldest = len(written) - len(replay)
    skipped = 0
    for i in range(batch.shape[0]):
        write_count, episode_step = int(batch["write_count"][i]), int(batch["episode_step"][i])
        if write_count - min(episode_step, 3) < oldest:
            skipped += 1
            continue
        obs, next_obs = written[write_count]
        np.testing.assert_array_equal(batch["observation"][i].numpy(), obs)
        np.testing.assert_array_equal(batch["next", "observation"][i].numpy(), next_obs)
    return skipped


@pytest.mark.filterwarnings("ignore:Got conflicting batch_sizes")  # one large draw
def test_frame_stack_replay_rebuilds_the_stacks_exactly_across_episodes_and_wrap_around():
    # 1 500 random steps: about 8 episodes; a 600-row buffer wraps around twice.
    replay, _, written = _breakout_replay("uniform", buffer_size=600, steps=1_500)
    assert len(replay) == 600
    batch = replay.sample(4_000)
    assert batch["observation"].shape == (4_000, 4, 84, 84) and batch["observation"].dtype == torch.uint8
    skipped = _assert_restacked_exactly(replay, written, batch)
    assert skipped <= 4_000 * 3 / 600 * 3  # at most the 3 oldest rows (expected 20 of 4 000 draws)
    assert (batch["episode_step"] == 0).any() and (batch["episode_step"] >= 3).any()


@pytest.mark.parametrize("sampler", ["per", "laber-mean"])
def test_per_and_laber_run_on_the_restacked_atari_batch(sampler, monkeypatch):
    torch.manual_seed(0)
    replay, loss_module, written = _breakout_replay(sampler, buffer_size=1_000, steps=300)
    scored = []
    if sampler == "laber-mean":  # LaBER scores the m*B rows after the buffer re-stacked them
        select = replay.sampler.laber.selection
        monkeypatch.setattr(
            replay.sampler.laber, "selection", lambda large, *a, **k: scored.append(large) or select(large, *a, **k)
        )
    batch = replay.sample()
    assert batch.shape == (8,) and batch["observation"].shape == (8, 4, 84, 84)
    assert _assert_restacked_exactly(replay, written, batch) == 0  # nothing overwritten yet
    if sampler == "laber-mean":
        (large,) = scored
        assert large.shape == (32,) and large["observation"].shape == (32, 4, 84, 84)
        assert _assert_restacked_exactly(replay, written, large) == 0
    loss = loss_module(batch)["loss"]
    assert torch.isfinite(loss)
    if sampler == "per":
        replay.update_tensordict_priority(batch.set("td_error", torch.rand(8) + 0.1))  # new priorities by index


@pytest.mark.filterwarnings("ignore:Got conflicting batch_sizes")  # one large draw
def test_frame_stack_replay_state_is_saved_with_the_buffer(tmp_path):
    replay, _, written = _breakout_replay("uniform", buffer_size=300, steps=400)
    replay.dumps(tmp_path / "buffer")
    restored, _, _ = _breakout_replay("uniform", buffer_size=300, steps=1)
    restored.loads(tmp_path / "buffer")
    original, loaded = replay._transform[0], restored._transform[0]
    assert int(loaded.written) == int(original.written) == 400
    assert int(loaded.episode_step) == int(original.episode_step)
    torch.testing.assert_close(loaded.last_next_obs, original.last_next_obs)
    batch = restored.sample(500)
    _assert_restacked_exactly(restored, written, batch)


def bytes_per_transition(buffer) -> int:
    """Bytes one row of ``buffer``'s storage takes (every stored tensor, ``"index"`` included)."""
    row = buffer.storage[0]
    return sum(t.numel() * t.element_size() for t in row.values(include_nested=True, leaves_only=True))


def test_memory_per_transition():
    """The naive layout stores both 4-frame stacks (56 448 bytes of frames); ours the two newest
    frames (14 112) and two int64 counters. The figures docs/agents.md quotes."""
    naive, _, _ = _breakout_replay("uniform", buffer_size=100, steps=10, restack=False)
    ours, _, _ = _breakout_replay("uniform", buffer_size=100, steps=10)
    # The rest of a row, the same in both: action (int64), reward (float32), terminated/truncated/done, index.
    rest = 8 + 4 + 3 + 8
    assert bytes_per_transition(naive) == NAIVE_FRAMES + rest == 56_471
    assert bytes_per_transition(ours) == 2 * FRAME + 2 * 8 + rest == 14_151
    row = ours.storage[0]
    assert row["frame"].dtype == torch.uint8 and "observation" not in row.keys()
    assert bytes_per_transition(naive) / bytes_per_transition(ours) > 3.99


# Dopamine's dqn.gin / c51.gin and the LaBER paper's Table 2 (docs/agents.md says which is which).
DOPAMINE = dict(
    batch_size=32,
    learning_starts=20_000,
    train_freq=4,
    gradient_steps=1,
    buffer_size=1_000_000,
    lr=2.5e-4,
    gamma=0.99,
    lr_schedule="constant",
    target_tau=0.0,
    target_update=2_000,
    end_epsilon=0.01,
    exploration_steps=250_000,
    max_grad_norm=0.0,
    clip_rewards=True,
    eval_epsilon=0.001,
    total_steps=50_000_000,
)


@pytest.mark.parametrize(
    "algo, expected",
    [
        ("dqn", {**DOPAMINE, "optimizer": "rmsprop", "optimizer_eps": 1e-5, "double_dqn": False, "loss": "huber"}),
        (
            "c51",
            {**DOPAMINE, "optimizer": "adam", "optimizer_eps": 0.0003125, "atoms": 51, "v_min": -10.0, "v_max": 10.0},
        ),
    ],
)
def test_atari_defaults_are_dopamines(algo, expected):
    agent = {"dqn": dqn, "c51": c51}[algo]
    cfg = cli(agent.env_defaults, agent.Config.env_id, ["--env-id", "ALE/Pong-v5"])
    assert {name: getattr(cfg, name) for name in expected} == expected
    # Other families keep theirs.
    assert agent.env_defaults("MinAtar/Breakout-v1").optimizer_eps == 0.01
    assert agent.env_defaults("CartPole-v1").clip_rewards is False


# Pong, not Breakout: an untrained greedy Breakout agent that never presses FIRE plays all 27 000
# steps of an evaluation episode; Pong's opponent ends the game within about a thousand.
TINY = [
    "--env-id",
    "ALE/Pong-v5",
    "--total-steps",
    "300",
    "--learning-starts",
    "100",
    "--buffer-size",
    "1000",
    "--train-freq",
    "4",
    "--batch-size",
    "8",
    "--eval-every",
    "300",
    "--eval-episodes",
    "1",
]


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["uniform", "per", "laber-mean", "large-batch"])
@pytest.mark.parametrize("algo", ["dqn", "c51"])
def test_agent_runs_on_atari_with_each_sampler(algo, sampler, tmp_path):
    run_agent(algo, *TINY, "--sampler", sampler, "--keep-buffer", "--out", str(tmp_path))
    evals = read_csv(tmp_path / "eval.csv")
    assert len(evals) == 1 and evals[0]["step"] == "300"
    returns = [float(evals[0]["eval_return"])]
    if (tmp_path / "train.csv").exists():  # 300 steps rarely end a Pong game (a random one takes about 800)
        returns += [float(r["episode_return"]) for r in read_csv(tmp_path / "train.csv")]
    assert all(math.isfinite(r) and -21 <= r <= 21 for r in returns), returns  # a Pong game ends at 21 points
    config = dict(line.split("=", 1) for line in (tmp_path / "config.txt").read_text().splitlines())
    assert config["clip_rewards"] == "True" and config["optimizer"] == ("rmsprop" if algo == "dqn" else "adam")
    assert (tmp_path / "checkpoint" / "state.pt").exists()
    assert (tmp_path / "checkpoint" / "buffer" / "transform.t").exists()  # the re-stacking state (--keep-buffer)
