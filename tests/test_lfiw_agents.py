"""LFIW in the agents (``--sampler lfiw``, ``lfiw-laber-mean``, built by ``agents.common.Replay``): the
critics' loss sees the self-normalised LFIW weights of the rows it trains on (times LaBER's with
LaBER), the ratio network learns only past the threshold, and DQN and C51 refuse LFIW."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torchrl.objectives import SoftUpdate

import torchsample.losses
from tests.conftest import AGENT_DEPS, require  # noqa: E402

require(*AGENT_DEPS)
from agents import c51, common, dqn, sac, td3  # noqa: E402
from torchsample import LaBERLoss

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
ACTOR_CRITIC = {"sac": (sac, sac.build_sac), "td3": (td3, td3.build_td3)}
B, M, FAST = 16, 4, 50


def pendulum_replay(algo: str, sampler: str, rows: int, temperature: float = 1.0):
    """A Replay on a small SAC or TD3 loss, filled with ``rows`` random Pendulum transitions."""
    agent, build = ACTOR_CRITIC[algo]
    env = common.make_env("Pendulum-v1", 0)
    loss_module, _ = build(agent.Config(hidden=(32, 32)), env, CPU)
    SoftUpdate(loss_module, tau=0.005)  # the agent's target updater (without one TorchRL warns)
    replay = common.Replay(sampler, loss_module, buffer_size=1_000, batch_size=B, m=M, device=CPU,
                           ratio_features=3 + 1,  # Pendulum: cos, sin, angular velocity; torque
                           lfiw_fast_size=FAST, lfiw_temperature=temperature)
    obs, _ = env.reset(seed=0)
    for _ in range(rows):
        action = env.action_space.sample()
        next_obs, reward, terminated, truncated, _ = env.step(action)
        replay.add(common.to_tensordict(obs, action, reward, next_obs, terminated, truncated, CPU))
        obs = env.reset()[0] if terminated or truncated else next_obs
    return replay, loss_module


def ratio_of(replay, rows) -> torch.Tensor:
    """``w_psi(s, a)`` of ``rows``, from the ratio network itself (not through LFIW)."""
    with torch.no_grad():
        return replay.lfiw.ratio_net(torch.cat([rows["observation"], rows["action"]], -1))


@pytest.mark.parametrize("sampler", ["lfiw", "lfiw-laber-mean"])
@pytest.mark.parametrize("algo", list(ACTOR_CRITIC))
def test_the_critics_loss_sees_the_lfiw_weights(algo, sampler, monkeypatch):
    """On a real batch, the weights LaBERLoss reduces the critics' TD losses with are
    ``w~ = w^(1/T) / mean_batch(w^(1/T))`` of each row (Eq. 11-12), the mean over the rows drawn from the
    slow buffer (all m * B of them with LaBER), times LaBER's weight of the row for lfiw-laber-mean."""
    temperature = 2.0
    replay, loss_module = pendulum_replay(algo, sampler, rows=200, temperature=temperature)
    # A ratio network far from its near-uniform start, so that wrong weights cannot pass for right ones.
    last = [layer for layer in replay.lfiw.ratio_net.modules() if isinstance(layer, nn.Linear)][-1]
    with torch.no_grad():
        last.weight.normal_(0.0, 1.0)
    seen = []

    def recording_weighted_mean(per_sample, weight, estimator="paper"):
        seen.append(weight)
        return weighted_mean(per_sample, weight, estimator)

    weighted_mean = torchsample.losses.weighted_mean
    monkeypatch.setattr(torchsample.losses, "weighted_mean", recording_weighted_mean)

    large = replay.sample(progress=0.5)  # one ratio step (active: 200 > FAST rows), then the weights
    assert large.batch_size == torch.Size([M * B if sampler == "lfiw-laber-mean" else B])
    w = ratio_of(replay, large).pow(1.0 / temperature)
    expected = w / w.mean()
    assert expected.std() > 0.1  # weights far from uniform
    torch.testing.assert_close(large["priority_weight"], expected)

    rng = torch.get_rng_state()
    if sampler == "lfiw-laber-mean":
        laber = replay.laber.selection(large)
        torch.set_rng_state(rng)  # the same draw again, through Replay as the agent calls it
    batch = replay.downsample(large)
    LaBERLoss(loss_module)(batch)
    (critic_weight,) = [weight for weight in seen if weight is not None]  # the critics', once; the actor's: none
    if sampler == "lfiw":
        assert batch is large
        torch.testing.assert_close(critic_weight, expected)
    else:
        # [B, 1 + C]: column 1 + c holds critic c's rows; the loss sees them as [C, B].
        assert torch.equal(batch["index"], large["index"][laber.index])
        assert laber.weight[:, 1:].std() > 0.05  # LaBER's weights are not all 1 either
        torch.testing.assert_close(critic_weight, (laber.weight * expected[laber.index])[:, 1:].T)


def test_the_ratio_network_learns_and_weighs_only_past_the_threshold():
    """Algorithm 1's else branch: until the slow buffer holds more than the fast buffer's size, no
    ratio step and weight 1; from the next transition on, a step per draw and weights that vary."""
    replay, _ = pendulum_replay("sac", "lfiw", rows=FAST)
    params = [p.detach().clone() for p in replay.lfiw.ratio_net.parameters()]
    batch = replay.sample(progress=0.0)
    assert torch.equal(batch["priority_weight"], torch.ones(B))
    assert all(torch.equal(a, b) for a, b in zip(params, replay.lfiw.ratio_net.parameters()))
    assert replay.lfiw_stats() == {}  # nothing to log yet
    env = common.make_env("Pendulum-v1", 1)
    obs, _ = env.reset(seed=1)
    action = env.action_space.sample()
    next_obs, reward, terminated, truncated, _ = env.step(action)
    replay.add(common.to_tensordict(obs, action, reward, next_obs, terminated, truncated, CPU))
    batch = replay.sample(progress=0.0)
    assert not all(torch.equal(a, b) for a, b in zip(params, replay.lfiw.ratio_net.parameters()))
    assert not torch.equal(batch["priority_weight"], torch.ones(B))
    stats = replay.lfiw_stats()
    assert set(stats) == {"ratio_mean", "ratio_std", "ess", "ratio_loss", "slow_size"} and stats["slow_size"] == FAST + 1


@pytest.mark.parametrize("algo", ["dqn", "c51"])
def test_value_based_agents_refuse_lfiw(algo):
    agent = {"dqn": dqn, "c51": c51}[algo]
    loss_module, _ = getattr(agent, f"build_{algo}")(agent.Config(), common.make_env("CartPole-v1", 0), CPU)
    for sampler in ("lfiw", "lfiw-laber-mean"):
        with pytest.raises(ValueError, match=f"--sampler {sampler}: LFIW re-weights the critic of an actor-critic"):
            common.Replay(sampler, loss_module, buffer_size=100, batch_size=8, m=4, device=CPU, ratio_features=5)


def test_dqn_command_line_refuses_lfiw_with_the_reason(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "agents.dqn", "--no-progress", "--sampler", "lfiw", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    assert "LFIW re-weights the critic of an actor-critic agent" in proc.stderr and "agents.sac" in proc.stderr


def test_lfiw_needs_a_fast_buffer_smaller_than_the_slow_one():
    _, loss_module = pendulum_replay("sac", "uniform", rows=0)
    with pytest.raises(ValueError, match="fast_size must be smaller than slow_size"):
        common.Replay("lfiw", loss_module, buffer_size=100, batch_size=8, m=4, device=CPU, ratio_features=4,
                      lfiw_fast_size=100)  # --lfiw-fast-size must stay below --buffer-size


@pytest.mark.parametrize("algo", list(ACTOR_CRITIC))
def test_help_shows_the_lfiw_options(algo, capsys):
    agent = ACTOR_CRITIC[algo][0]
    with pytest.raises(SystemExit):
        common.cli(agent.env_defaults, agent.Config.env_id, ["--help"])
    text = " ".join(re.sub("[│╭╮╰╯─]", " ", capsys.readouterr().out).split())
    for option, default in [("--lfiw-fast-size", "10000"), ("--lfiw-temperature", "5.0"), ("--lfiw-f", "js"),
                            ("--lfiw-log-every", "1000")]:
        shown = text[text.index(f"{option} "):]
        assert f"(default: {default})" in shown[:400], shown[:400]
