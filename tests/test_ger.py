"""GER and GER-LaBER in the agents (``--sampler ger``, ``ger-laber-mean``, built by each agent's
``make_replay`` on ``torchsample.GERSampler``): after an update, PER's sum tree holds the exact
per-sample gradient norms of the rows the update used, measured one row at a time by autograd; and
``--diagnostics-every`` writes the diagnostics."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchrl.objectives import SoftUpdate

from tests.conftest import AGENT_DEPS, require  # noqa: E402

require(*AGENT_DEPS)
from agents import dqn, loop, sac  # noqa: E402
from agents.envs import make_env  # noqa: E402
from tests import setups
from tests.test_diagnostics import per_row_gradients
from torchsample import LaBERLoss
from torchsample.views import critic_of

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
B, M, ROWS = 8, 4, 400
AGENTS = {"dqn": dqn, "sac": sac}


def filled_replay(family: str, sampler: str):
    loss = setups.LOSSES[family]()
    SoftUpdate(loss, tau=0.005)  # the agents' target updater (without one TorchRL warns)
    agent = AGENTS[family]
    cfg = agent.Config(sampler=sampler, batch_size=B, m=M, buffer_size=1_000)
    env = make_env("Pendulum-v1" if family == "sac" else "CartPole-v1", 0)
    rb, *_ = agent.make_replay(cfg, loss, env, CPU)
    rb.extend(setups.batch(ROWS, continuous=setups.CONTINUOUS[family]))
    return rb, loss


@pytest.mark.parametrize("sampler", ["ger", "ger-laber-mean"])
@pytest.mark.parametrize("family", ["dqn", "sac"])
def test_ger_priorities_are_the_exact_gradient_norms_of_the_rows_used(family, sampler):
    rb, loss = filled_replay(family, sampler)
    optimizer = torch.optim.SGD(loss.parameters(), lr=0.1)
    batch = rb.sample()
    optimizer.zero_grad()
    losses = LaBERLoss(loss)(batch)
    sum(value for key, value in losses.items() if key.startswith("loss")).backward()
    optimizer.step()  # the priorities are measured with the parameters after the update

    rows = batch.reshape(-1)
    torch.manual_seed(3)  # SAC's target draws the next action: the same draw for the sampler and here
    rb.sampler.update_from(batch)  # what the agents call after each update
    torch.manual_seed(3)
    critic = critic_of(loss)
    target = critic.target(rows)
    # Over every critic parameter: the joint norm of the twin critics' per-row gradients.
    exact = per_row_gradients(critic, rows, target).square().sum((0, 2)).sqrt()

    ger = rb.sampler  # GER-LaBER is a GERSampler itself
    tree, alpha, eps = ger._sum_tree, ger._alpha, ger._eps
    index = rows["index"]
    # A row drawn twice (LaBER draws with replacement) keeps its last write, under SAC's random target
    # another value than the first: check the rows drawn once.
    once = [i for i in range(len(index)) if (index == index[i]).sum() == 1]
    assert len(once) >= 3
    for i in once:
        assert tree[int(index[i])] == pytest.approx((exact[i].item() + eps) ** alpha, rel=1e-3)
    untouched = sorted(set(range(ROWS)) - set(index.tolist()))[:5]
    assert all(tree[i] == pytest.approx(1.0) for i in untouched)  # new rows: the default priority


@pytest.mark.parametrize("batch_size, rows, drawn", [(2, 2 * M, 2 * M), (8, 8 * M, 8 * M), (2, 50, 50), (8, 50, 50)])
def test_diagnostics_draw_a_fixed_row_count_whatever_the_batch_size(monkeypatch, batch_size, rows, drawn):
    # The small-batch study compares srank and TVs across B: they must not be measured on m * B rows there.
    seen = []
    monkeypatch.setattr(loop, "critic_diagnostics", lambda loss, large, b: seen.append((large.numel(), b)) or {})
    rb, loss = filled_replay("dqn", "laber-mean")
    loop.diagnostics(loss, rb, rows, batch_size)
    assert seen == [(drawn, batch_size)]  # the gradient variance is still that of a batch of B


@pytest.mark.parametrize("rows", [-1, 0, 2.5, True])
def test_diagnostics_rows_must_be_a_count(rows):
    rb, loss = filled_replay("dqn", "uniform")
    with pytest.raises(ValueError, match="diagnostics rows must be an int >= 1"):
        loop.diagnostics(loss, rb, rows, 2)


def run_dqn(out: Path, *args: str) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "agents.dqn",
            "--env-id",
            "CartPole-v1",
            "--sampler",
            "laber-mean",
            "--total-steps",
            "600",
            "--learning-starts",
            "200",
            "--train-freq",
            "16",
            "--gradient-steps",
            "2",
            "--eval-every",
            "600",
            "--eval-episodes",
            "1",
            "--no-progress",
            "--out",
            str(out),
            *args,
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_diagnostics_every_writes_the_diagnostics_csv_and_leaves_the_run_as_it_was(tmp_path):
    out = tmp_path / "run"
    run_dqn(out, "--diagnostics-every", "200")
    run_dqn(tmp_path / "plain")
    # Forked RNG: the same episodes and evaluation as without diagnostics.
    for name in ("train.csv", "eval.csv"):
        with_diagnostics, plain = (list(csv.DictReader((d / name).open())) for d in (out, tmp_path / "plain"))
        drop = ("wall_time", "steps_per_s")
        assert [{k: v for k, v in r.items() if k not in drop} for r in with_diagnostics] == [
            {k: v for k, v in r.items() if k not in drop} for r in plain
        ]
    rows = list(csv.DictReader((out / "diagnostics.csv").open()))
    # None at step 200: the first update comes at step 207 (train-freq 16), and diagnostics wait for it.
    assert [row["step"] for row in rows] == ["400", "600"]
    for row in rows:
        assert 0 <= float(row["tv/output"]) <= 2 and 0 <= float(row["tv/last-layer"]) <= 2
        assert float(row["grad_variance"]) >= 0 and float(row["srank"]) >= 1
