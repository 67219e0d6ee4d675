"""LFIW in the agents (``--sampler lfiw``, ``lfiw-laber-mean``, built by ``agents.actor_critic.make_replay``): the
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
from agents import actor_critic, sac, td3  # noqa: E402
from agents.config import cli  # noqa: E402
from agents.envs import make_env, to_tensordict  # noqa: E402
from torchsample import LaBERLoss

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
ACTOR_CRITIC = {"sac": (sac, sac.build_sac), "td3": (td3, td3.build_td3)}
B, M, FAST = 16, 4, 50


def pendulum_replay(algo: str, sampler: str, rows: int, temperature: float = 1.0):
    """``(rb, lfiw, fast_slow, loss)`` of ``actor_critic.make_replay`` on a small SAC or TD3 loss, filled with
    ``rows`` random Pendulum transitions."""
    agent, build = ACTOR_CRITIC[algo]
    env = make_env("Pendulum-v1", 0)
    cfg = agent.Config(
        hidden=(32, 32),
        sampler=sampler,
        batch_size=B,
        m=M,
        buffer_size=1_000,
        lfiw_fast_size=FAST,
        lfiw_temperature=temperature,
    )
    loss_module, _ = build(cfg, env, CPU)
    SoftUpdate(loss_module, tau=0.005)  # the agent's target updater (without one TorchRL warns)
    rb, laber, lfiw, fast_slow = actor_critic.make_replay(cfg, loss_module, env, CPU)
    assert laber is None  # not compiled: LaBER samples through the buffer
    obs, _ = env.reset(seed=0)
    for _ in range(rows):
        action = env.action_space.sample()
        next_obs, reward, terminated, truncated, _ = env.step(action)
        fast_slow.add(to_tensordict(obs, action, reward, next_obs, terminated, truncated, CPU))
        obs = env.reset()[0] if terminated or truncated else next_obs
    return rb, lfiw, fast_slow, loss_module


def ratio_of(lfiw, rows) -> torch.Tensor:
    """``w_psi(s, a)`` of ``rows``, from the ratio network itself (not through LFIW)."""
    with torch.no_grad():
        return lfiw.ratio_net(torch.cat([rows["observation"], rows["action"]], -1))


@pytest.mark.parametrize("sampler", ["lfiw", "lfiw-laber-mean"])
@pytest.mark.parametrize("algo", list(ACTOR_CRITIC))
def test_the_critics_loss_sees_the_lfiw_weights(algo, sampler, monkeypatch):
    """On a real batch, the weights LaBERLoss reduces the critics' TD losses with are
    ``w~ = w^(1/T) / mean(w^(1/T))`` of each row (Eq. 11-12), the mean over the rows drawn from the slow
    buffer (all m * B of them with LaBER), times LaBER's weight of the row for lfiw-laber-mean."""
    temperature = 2.0
    rb, lfiw, fast_slow, loss_module = pendulum_replay(algo, sampler, rows=200, temperature=temperature)
    # A ratio network far from its near-uniform start, so that wrong weights cannot pass for right ones.
    last = [layer for layer in lfiw.ratio_net.modules() if isinstance(layer, nn.Linear)][-1]
    with torch.no_grad():
        last.weight.normal_(0.0, 1.0)
    seen, large_batches = [], []

    def recording_weighted_mean(per_sample, weight, estimator="paper"):
        seen.append(weight)
        return weighted_mean(per_sample, weight, estimator)

    weighted_mean = torchsample.losses.weighted_mean
    monkeypatch.setattr(torchsample.losses, "weighted_mean", recording_weighted_mean)
    assert lfiw.active  # 200 > FAST rows
    if sampler == "lfiw-laber-mean":  # the sampler weighs the large batch (its transform) before LaBER keeps B
        weigh, select, kept = rb.sampler.transform, rb.sampler.laber.selection, []
        rb.sampler.transform = lambda large: large_batches.append(weigh(large)) or large_batches[-1]
        rb.sampler.laber.selection = lambda *args, **kwargs: kept.append(select(*args, **kwargs)) or kept[-1]
        batch = rb.sample()
        (large,), (laber,) = large_batches, kept
        assert large.batch_size == torch.Size([M * B]) and batch.batch_size == torch.Size([B, 3])
    else:
        large = batch = lfiw(rb.sample())  # as the agent's loop weighs the rows
        assert batch.batch_size == torch.Size([B])
    w = ratio_of(lfiw, large).pow(1.0 / temperature)
    expected = w / w.mean()
    assert expected.std() > 0.1  # weights far from uniform
    torch.testing.assert_close(large["priority_weight"], expected)
    LaBERLoss(loss_module)(batch)
    (critic_weight,) = [weight for weight in seen if weight is not None]  # the critics', once; the actor's: none
    if sampler == "lfiw":
        torch.testing.assert_close(critic_weight, expected)
    else:
        # [B, 1 + C]: column 1 + c holds critic c's rows; the loss sees them as [C, B], LaBER's weight times w~.
        assert torch.equal(batch["index"], large["index"][laber.index])
        assert laber.weight[:, 1:].std() > 0.05  # LaBER's weights are not all 1 either
        torch.testing.assert_close(critic_weight, (laber.weight * expected[laber.index])[:, 1:].T)


def test_the_ratio_network_learns_and_weighs_only_past_the_threshold():
    """Algorithm 1's else branch: until the slow buffer holds more than the fast buffer's size, LFIW
    weighs nothing (weight 1) and the agent takes no ratio step; past it the weights vary, and
    ``lfiw_log`` gives what lfiw.csv records."""
    rb, lfiw, fast_slow, _ = pendulum_replay("sac", "lfiw", rows=FAST)
    assert not lfiw.active
    assert torch.equal(lfiw(rb.sample())["priority_weight"], torch.ones(B))
    env = make_env("Pendulum-v1", 1)
    obs, _ = env.reset(seed=1)
    action = env.action_space.sample()
    next_obs, reward, terminated, truncated, _ = env.step(action)
    fast_slow.add(to_tensordict(obs, action, reward, next_obs, terminated, truncated, CPU))
    assert lfiw.active
    params = [p.detach().clone() for p in lfiw.ratio_net.parameters()]
    ratio_loss = lfiw.update(fast_slow.sample_slow(B), fast_slow.sample_fast(B))
    assert not all(torch.equal(a, b) for a, b in zip(params, lfiw.ratio_net.parameters()))
    assert not torch.equal(lfiw(rb.sample())["priority_weight"], torch.ones(B))
    stats = actor_critic.lfiw_log(lfiw, fast_slow, ratio_loss, rows=B)
    assert (
        set(stats) == {"ratio_mean", "ratio_std", "ess", "ratio_loss", "slow_size"} and stats["slow_size"] == FAST + 1
    )


def test_dqn_command_line_refuses_lfiw_naming_the_choices(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "agents.dqn", "--no-progress", "--sampler", "lfiw", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode != 0
    text = " ".join(re.sub("[│╭╮╰╯─]", " ", proc.stderr).split())
    assert "lfiw" in text and "laber-mean" in text  # tyro lists DQN's choices, which do not include LFIW


def test_lfiw_needs_a_fast_buffer_smaller_than_the_slow_one():
    env = make_env("Pendulum-v1", 0)
    cfg = sac.Config(hidden=(32, 32), sampler="lfiw", buffer_size=100, lfiw_fast_size=100)
    loss_module, _ = sac.build_sac(cfg, env, CPU)
    with pytest.raises(ValueError, match="fast_size must be smaller than slow_size"):
        actor_critic.make_replay(cfg, loss_module, env, CPU)  # --lfiw-fast-size must stay below --buffer-size


@pytest.mark.parametrize("algo", list(ACTOR_CRITIC))
def test_help_shows_the_lfiw_options(algo, capsys):
    agent = ACTOR_CRITIC[algo][0]
    with pytest.raises(SystemExit):
        cli(agent.env_defaults, agent.Config.env_id, ["--help"])
    text = " ".join(re.sub("[│╭╮╰╯─]", " ", capsys.readouterr().out).split())
    for option, default in [
        ("--lfiw-fast-size", "10000"),
        ("--lfiw-temperature", "5.0"),
        ("--lfiw-f", "js"),
        ("--lfiw-log-every", "1000"),
    ]:
        shown = text[text.index(f"{option} ") :]
        assert f"(default: {default})" in shown[:400], shown[:400]
