"""``--logger csv|tensorboard|wandb``: every agent sends its scalars through TorchRL's logger of that
name, and ``<out>/train.csv`` / ``<out>/eval.csv`` (what ``experiments.compare`` reads) stay as they were.
Each sink is read back: TorchRL's CSV files, TensorBoard's event files (``EventAccumulator``) and
wandb's offline run (no network)."""

import csv
import os
import time
from pathlib import Path

import pytest
import torch
from torchrl.data import LazyTensorStorage, TensorDictReplayBuffer

from tests.conftest import AGENT_DEPS, has, require  # noqa: E402

require(*AGENT_DEPS)
from agents.config import RunOptions, cli  # noqa: E402
from agents.envs import make_env, to_tensordict  # noqa: E402
from agents.logs import Logger, make_torchrl_logger  # noqa: E402
from agents.loop import TrainingLoop  # noqa: E402
from tests.test_agents import AGENT_ARGS, AGENTS, DISCRETE, read_csv, run_agent

needs_tensorboard = pytest.mark.skipif(not has("tensorboard"), reason="needs tensorboard (the [loggers] extra)")
needs_wandb = pytest.mark.skipif(not has("wandb"), reason="needs wandb (the [loggers] extra)")
SINKS = ["csv", pytest.param("tensorboard", marks=needs_tensorboard), pytest.param("wandb", marks=needs_wandb)]


def _log_three_rows(run_dir: Path, logger: str, start_step: int = 0) -> None:
    log = Logger(run_dir, RunOptions(logger=logger), exp_name="demo", start_step=start_step)
    log.log("train", 10, episode_return=1.0, epsilon=0.5)
    log.log("eval", 20, eval_return=2.5, steps_per_s=float("nan"))
    log.log("train", 15, episode_return=3.0, epsilon=0.4)  # an earlier step than the eval row before it
    log.close()


def _tensorboard_scalars(log_dir: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = {p.parent for p in log_dir.rglob("events.out.tfevents.*")}
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


@pytest.mark.parametrize("logger", SINKS)
def test_the_wide_csv_files_are_the_same_whatever_the_logger(logger, tmp_path):
    _log_three_rows(tmp_path, logger)
    with (tmp_path / "train.csv").open() as f:
        rows = list(csv.reader(f))
    assert rows == [["step", "episode_return", "epsilon"], ["10", "1.0", "0.5"], ["15", "3.0", "0.4"]]
    assert (tmp_path / "eval.csv").read_text().splitlines() == ["step,eval_return,steps_per_s", "20,2.5,nan"]
    assert (tmp_path / "config.txt").read_text().splitlines()[-1] == f"logger={logger}"


def test_torchrl_csv_logger_writes_one_file_per_scalar(tmp_path):
    _log_three_rows(tmp_path, "csv")
    scalars = tmp_path / "csv" / "demo" / "scalars"
    assert (scalars / "train" / "episode_return.csv").read_text().splitlines() == ["10,1.0", "15,3.0"]
    assert (scalars / "eval" / "eval_return.csv").read_text().splitlines() == ["20,2.5"]


@needs_tensorboard
def test_tensorboard_event_files_hold_the_scalars(tmp_path):
    _log_three_rows(tmp_path, "tensorboard")
    scalars = _tensorboard_scalars(tmp_path / "tensorboard")
    assert scalars["train/episode_return"] == [(10, 1.0), (15, 3.0)]
    assert scalars["eval/eval_return"] == [(20, 2.5)]
    assert not (tmp_path / "csv").exists()


@needs_wandb
def test_wandb_runs_offline_under_the_run_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # the logger itself must keep wandb off the network
    monkeypatch.setenv("WANDB_API_KEY", "")
    _log_three_rows(tmp_path, "wandb")
    (run,) = (tmp_path / "wandb").rglob("offline-run-*")
    assert run.is_dir()
    (records,) = run.glob("run-*.wandb")
    data = records.read_bytes()
    for key in (b"train/episode_return", b"eval/eval_return", b"epsilon"):
        assert key in data, key
    assert os.environ["WANDB_MODE"] in ("offline", "dryrun")  # TorchRL re-sets it to "dryrun", wandb's old name


@needs_wandb
def test_a_closed_wandb_logger_has_written_every_scalar(tmp_path, monkeypatch):
    """wandb's ``finish()`` returns before its service has closed the run's file; ``Logger.close`` waits
    for it. Without that wait, 2 of 15 runs read right after ``close`` held only the file's header on a
    loaded 2-core machine, so ten runs here would all pass by luck about a quarter of the time."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "")
    for attempt in range(10):
        run_dir = tmp_path / str(attempt)
        log = Logger(run_dir, RunOptions(logger="wandb"), exp_name="demo")
        log.log("train", 10, episode_return=1.0)
        log.close()
        (records,) = (run_dir / "wandb").rglob("run-*.wandb")
        assert b"train/episode_return" in records.read_bytes(), attempt


def test_unknown_logger_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="logger must be one of csv, tensorboard, wandb"):
        make_torchrl_logger("mlflow", tmp_path, "demo")


@pytest.mark.slow
@pytest.mark.parametrize("logger", SINKS[1:])
def test_agent_logs_through_the_chosen_logger(logger, tmp_path):
    """A DQN run on CartPole: its eval.csv keeps its columns, and the chosen sink got the same values."""
    run_agent("dqn", *DISCRETE, "--sampler", "uniform", "--logger", logger, "--out", str(tmp_path))
    evals = read_csv(tmp_path / "eval.csv")
    assert list(evals[0]) == ["step", "eval_return", "wall_time", "steps_per_s"] and evals[0]["step"] == "300"
    train = read_csv(tmp_path / "train.csv")
    assert list(train[0]) == ["step", "episode_return", "epsilon"]
    if logger == "tensorboard":
        scalars = _tensorboard_scalars(tmp_path / "tensorboard")
        assert scalars["eval/eval_return"] == [(300, pytest.approx(float(evals[0]["eval_return"])))]
        assert [step for step, _ in scalars["train/episode_return"]] == [int(r["step"]) for r in train]
    else:
        (run,) = (tmp_path / "wandb").rglob("offline-run-*")
        assert b"eval/eval_return" in next(run.glob("run-*.wandb")).read_bytes()


@pytest.mark.parametrize("algo", list(AGENT_ARGS))
def test_every_agent_parses_the_logger_flag(algo, capsys):
    agent = AGENTS[algo]
    assert cli(agent.env_defaults, agent.Config.env_id, []).logger == "csv"  # the default
    assert cli(agent.env_defaults, agent.Config.env_id, ["--logger", "wandb"]).logger == "wandb"
    with pytest.raises(SystemExit):
        cli(agent.env_defaults, agent.Config.env_id, ["--logger", "mlflow"])


@needs_wandb
def test_a_resumed_run_logs_to_the_same_wandb_run_and_a_fresh_one_to_a_new_one(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "")

    def ids():  # from each offline run's run-<id>.wandb: two runs in one second name the second folder <id>-1
        return [p.stem.split("-", 1)[1] for p in sorted((tmp_path / "wandb").rglob("offline-run-*/run-*.wandb"))]

    _log_three_rows(tmp_path, "wandb")
    _log_three_rows(tmp_path, "wandb", start_step=12)  # what --resume does: a new Logger on the same run folder
    first, resumed = ids()
    assert first == resumed == (tmp_path / "wandb" / "run_id").read_text().strip()
    for run in (tmp_path / "wandb").rglob("offline-run-*"):
        assert (run / f"run-{first}.wandb").exists()
    _log_three_rows(tmp_path, "wandb")  # a fresh run in the same folder
    assert len(set(ids())) == 2 and ids().count(first) == 2


@pytest.mark.parametrize("logger", ["csv", "tensorboard"])
def test_a_fresh_run_replaces_an_earlier_runs_files_and_a_resumed_one_keeps_them_to_its_step(logger, tmp_path):
    _log_three_rows(tmp_path, logger)
    _log_three_rows(tmp_path, logger, start_step=12)  # resumed at 12: the rows at 10 stay, 15 and 20 are rewritten
    assert (tmp_path / "train.csv").read_text().splitlines() == [
        "step,episode_return,epsilon",
        "10,1.0,0.5",
        "10,1.0,0.5",
        "15,3.0,0.4",
    ]
    assert (tmp_path / "eval.csv").read_text().splitlines() == ["step,eval_return,steps_per_s", "20,2.5,nan"]
    _log_three_rows(tmp_path, logger)  # a fresh run: only its own rows, in the wide files and TorchRL's
    assert (tmp_path / "train.csv").read_text().splitlines() == [
        "step,episode_return,epsilon",
        "10,1.0,0.5",
        "15,3.0,0.4",
    ]
    if logger == "csv":
        scalars = tmp_path / "csv" / "demo" / "scalars"
        assert (scalars / "train" / "episode_return.csv").read_text().splitlines() == ["10,1.0", "15,3.0"]
    else:
        assert _tensorboard_scalars(tmp_path / "tensorboard")["train/episode_return"] == [(10, 1.0), (15, 3.0)]


def test_logger_refuses_a_file_it_does_not_own(tmp_path):
    log = Logger(tmp_path, RunOptions(logger="csv"), exp_name="demo")
    with pytest.raises(ValueError, match="got 'results'"):
        log.log("results", 1, x=1.0)
    log.close()


def test_a_resumed_runs_wall_time_counts_the_time_before_its_checkpoint(tmp_path):
    # Each step sleeps 10 ms: the wall time at step 40 is at least the 40 steps' sleeps, the 30 before
    # the checkpoint included, whatever else the machine does (a lower bound, so the test cannot flake).
    def run(**options) -> None:
        cfg = RunOptions(progress=False, **options)
        cfg.out, cfg.total_steps, cfg.eval_every, cfg.eval_episodes = tmp_path, 50, 20, 1
        cfg.env_id, cfg.sampler = "CartPole-v1", "uniform"
        buffer = TensorDictReplayBuffer(storage=LazyTensorStorage(100), batch_size=2)
        loop = TrainingLoop(
            cfg, "demo", make_env(cfg.env_id, 0), buffer, {}, lambda obs: 0, burn_in=10, bar_every=10, recent=5
        )
        obs = loop.obs
        for step in loop.steps():
            time.sleep(0.01)
            next_obs, reward, terminated, truncated, _ = loop.env.step(1)
            buffer.add(to_tensordict(obs, 1, reward, next_obs, terminated, truncated, torch.device("cpu")))
            obs = loop.record(step, next_obs, reward, terminated or truncated)
            if loop.end_step(step, obs):
                break
        loop.close()

    run(stop_after=30)
    run(resume=True)
    rows = {int(r["step"]): float(r["wall_time"]) for r in csv.DictReader((tmp_path / "eval.csv").open())}
    assert sorted(rows) == [20, 40, 50]
    assert rows[20] >= 0.2 and rows[40] >= 0.4 and rows[50] >= 0.5
