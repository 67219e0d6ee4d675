"""agents.distributed on a one-node Ray cluster (loopback only, 2 CPUs, shared by the tests and always shut
down): the script runs end to end, the rows LaBER keeps are the remote storage's rows at their "index" with
the paper's weights, PER's priorities arrive at the remote sampler, and a collector that dies loses nothing
it wrote while the learner goes on."""

import os
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")

from tests.conftest import AGENT_DEPS, require  # noqa: E402
from tests.setups import assert_relatively_close, recomputed_rtol  # noqa: E402

require(*AGENT_DEPS)
from agents import distributed  # noqa: E402

# One Ray cluster at a time on a machine: under pytest-xdist every test here runs in one worker
# (make test passes --dist loadgroup).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
# Small networks and batches: the tests check what moves where, not learning.
CFG = distributed.Config(
    batch_size=16,
    m=4,
    hidden=32,
    buffer_size=4096,
    chunk=64,
    learning_starts=256,
    eval_episodes=1,
    log_every=1e9,
    collector_cpus=0.5,
)
ROW_KEYS = [
    "observation",
    "action",
    ("next", "observation"),
    ("next", "reward"),
    ("next", "terminated"),
    ("next", "done"),
]


def test_the_script_starts_its_own_cluster_trains_and_stops():
    """``python -m agents.distributed`` on its own loopback cluster (this test runs before the shared one)."""
    cmd = [
        sys.executable,
        "-m",
        "agents.distributed",
        "--sampler",
        "laber-mean",
        "--collectors",
        "2",
        "--total-steps",
        "800",
        "--learning-starts",
        "256",
        "--batch-size",
        "16",
        "--hidden",
        "32",
        "--eval-episodes",
        "1",
    ]
    proc = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=170, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert "done: 800 steps, 272 updates" in proc.stdout  # (800 - 256) * 0.5 updates
    assert "final greedy evaluation return" in proc.stdout


def test_the_cluster_stops_on_error_and_the_environment_is_restored():
    """(Before the shared cluster starts.) An error inside ``ray_cluster`` still shuts Ray down."""
    before = {name: os.environ.get(name) for name in distributed.LOCAL_ENV}
    with pytest.raises(ZeroDivisionError):
        with distributed.ray_cluster(None, num_cpus=1):
            assert ray.is_initialized()
            raise ZeroDivisionError  # an error inside the block
    assert not ray.is_initialized()
    assert {name: os.environ.get(name) for name in distributed.LOCAL_ENV} == before


@pytest.fixture(scope="module")
def cluster():
    with distributed.ray_cluster(None, num_cpus=2):
        assert all(node["NodeManagerAddress"] == "127.0.0.1" for node in ray.nodes())
        yield
    assert not ray.is_initialized()


@pytest.fixture(scope="module")
def collectors(cluster):
    """Two collector actors (starting one costs seconds: the tests share them)."""
    actors = distributed.start_collectors(CFG, 2)
    yield actors
    for actor in actors:
        ray.kill(actor)


def fill(replay, actors, steps: int) -> None:
    """Each actor writes ``steps`` random-action transitions to ``replay`` (a Ray buffer)."""
    weights = distributed.q_network(4, 2, CFG.hidden).state_dict()
    ray.get([actor.collect.remote(weights, 1.0, steps, replay.client()) for actor in actors])


@pytest.fixture(scope="module")
def uniform(collectors):
    replay = distributed.make_replay(replace(CFG, sampler="laber-mean"))
    fill(replay, collectors, 256)
    yield replay
    replay.close()


def test_a_second_cluster_is_refused_and_the_first_survives(cluster):
    with pytest.raises(RuntimeError, match="already initialised"):
        with distributed.ray_cluster(None):
            pass
    assert ray.is_initialized()


def huber_priority(network, rows, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``min(|q - y|, 1) + 1e-6`` before any update (target network = online network, so the Double DQN
    target is ``r + gamma * (1 - terminated) * max_a Q(s', a)``), with the rounding tolerance of a
    weight built from it."""
    with torch.no_grad():
        q = network(rows["observation"]).gather(-1, rows["action"].unsqueeze(-1)).squeeze(-1)
        next_q = network(rows["next", "observation"]).max(-1).values
        alive = (~rows["next", "terminated"].squeeze(-1)).float()
        y = rows["next", "reward"].squeeze(-1) + gamma * alive * next_q
    p = (q - y).abs().clamp(max=1.0) + 1e-6
    return p, recomputed_rtol(q, y, p)


def test_laber_keeps_rows_of_the_remote_storage_with_the_papers_weights(uniform):
    cfg = replace(CFG, sampler="laber-mean")
    learner = distributed.Learner(cfg, 4, 2, uniform, device=CPU)
    large = uniform.sample(cfg.m * cfg.batch_size)
    assert large.batch_size == (cfg.m * cfg.batch_size,)
    kept = learner.laber(large)
    assert kept.batch_size == (cfg.batch_size,)
    assert set(kept["index"].tolist()) <= set(large["index"].tolist())
    stored = uniform[kept["index"]]  # read back from the buffer actor's storage
    for key in ROW_KEYS:
        assert torch.equal(kept[key], stored[key]), key
    # LaBER-mean: w_i = mean_{j in large}(p_j) / p_i, p the Huber surrogate of each row.
    p_large, _ = huber_priority(learner.network, large, cfg.gamma)
    p_kept, rtol = huber_priority(learner.network, kept, cfg.gamma)
    assert_relatively_close(kept["priority_weight"], p_large.mean() / p_kept, rtol)


@pytest.mark.parametrize("sampler", ["laber-mean", "laber-max", "uniform"])
def test_the_learner_updates_from_the_ray_buffer(uniform, sampler):
    learner = distributed.Learner(replace(CFG, sampler=sampler), 4, 2, uniform, device=CPU, prefetch=True)
    before = [p.clone() for p in learner.network.parameters()]
    for _ in range(3):
        batch = learner.step()
    learner.close()
    assert batch.batch_size == (CFG.batch_size,)
    assert any(not torch.equal(a, b) for a, b in zip(before, learner.network.parameters()))


def test_per_priorities_arrive_at_the_remote_sampler(collectors):
    cfg = replace(CFG, sampler="per")
    replay = distributed.make_replay(cfg)
    try:
        fill(replay, collectors[:1], 256)
        with pytest.raises(ValueError, match="prefetch"):
            distributed.Learner(cfg, 4, 2, replay, device=CPU, prefetch=True)
        batch = distributed.Learner(cfg, 4, 2, replay, device=CPU).step()
        tree = replay.state_dict()["_sampler"]["_sum_tree"]  # the remote sampler's (p + eps)^alpha
        index, td_error = batch["index"], batch["td_error"]
        values, counts = index.unique(return_counts=True)
        once = torch.isin(index, values[counts == 1])  # a repeated row keeps one of its |TD|s
        assert once.sum() > 0
        sent = (td_error[once] + 1e-8) ** cfg.per_alpha
        torch.testing.assert_close(torch.as_tensor(tree[index[once]]), sent)
        # Priorities chosen here, sent through TorchRL's Ray client, read back from the actor.
        index, priority = torch.arange(0, 250, 7), torch.linspace(0.5, 3.0, 36)
        replay.update_priority(index, priority)
        tree = replay.state_dict()["_sampler"]["_sum_tree"]
        torch.testing.assert_close(torch.as_tensor(tree[index]), (priority + 1e-8) ** cfg.per_alpha)
    finally:
        replay.close()


def test_a_dead_collector_loses_nothing_it_wrote_and_the_learner_goes_on(collectors):
    cfg = replace(CFG, sampler="laber-mean", total_steps=3200, updates_per_step=0.25, max_lead=512)
    replay = distributed.make_replay(cfg)
    victim = distributed.start_collectors(cfg, 1)[0]
    result, logs = {}, []
    run = threading.Thread(
        target=lambda: result.update(distributed.train(cfg, replay, [victim, collectors[1]], log=logs.append))
    )
    try:
        run.start()
        deadline = time.monotonic() + 90
        while len(replay) < 640 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(replay) >= 640, "the collectors wrote too little in 90 s"
        ray.kill(victim)
        written = len(replay)
        run.join(timeout=120)
        assert not run.is_alive(), "train() did not finish after a collector died"
        assert result["lost_collectors"] == 1, logs
        assert any("collector lost" in line for line in logs)
        assert len(replay) >= max(written, result["steps"])  # nothing written was lost
        assert result["steps"] > written  # the other collector went on writing
        # The learner consumed every step it was given at its replay ratio, after the loss too.
        assert result["updates"] >= (result["steps"] - cfg.learning_starts) * cfg.updates_per_step
        learner = distributed.Learner(cfg, 4, 2, replay, device=CPU)
        before = [p.clone() for p in learner.network.parameters()]
        learner.step()
        assert any(not torch.equal(a, b) for a, b in zip(before, learner.network.parameters()))
    finally:
        run.join(timeout=30)
        ray.kill(victim)
        replay.close()
