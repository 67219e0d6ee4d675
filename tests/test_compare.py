"""``experiments.compare``: rliable's metrics on hand-made scores with known answers, the batch-size sweep's
table and plot (diagnostics where runs wrote them), the multi-task aggregation and its performance
profile, and real runs in subprocesses (a tiny sweep; a failed run reported, the others kept)."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import trim_mean

from tests.conftest import AGENT_DEPS, require  # noqa: E402

require(*AGENT_DEPS + ("rliable", "matplotlib", "pandas"))
from experiments import compare, reports, stats, sweep  # noqa: E402
from experiments import runs as run_module  # noqa: E402
from experiments.config import Config  # noqa: E402
from experiments.runs import Run, command, finished_run, gradient_steps  # noqa: E402
from tests.test_agents import DISCRETE, assert_returns_possible

ROOT = Path(__file__).resolve().parents[1]


def read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def fake_run(folder: Path, env_id: str, returns: list[float], diagnostics: list[dict] = (), **config) -> Path:
    """A run folder as an agent leaves it: eval.csv, config.txt and, if given, diagnostics.csv."""
    folder.mkdir(parents=True, exist_ok=True)
    steps = [300 * (i + 1) for i in range(len(returns))]
    rows = "".join(f"{s},{r},{s / 100},100.0\n" for s, r in zip(steps, returns))
    (folder / "eval.csv").write_text("step,eval_return,wall_time,steps_per_s\n" + rows)
    settings = {
        "env_id": env_id,
        "total_steps": 600,
        "learning_starts": 200,
        "train_freq": 20,
        "gradient_steps": 4,
        **config,
    }
    (folder / "config.txt").write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
    if diagnostics:
        keys = list(diagnostics[0])
        (folder / "diagnostics.csv").write_text(
            ",".join(keys) + "\n" + "".join(",".join(str(d[k]) for k in keys) + "\n" for d in diagnostics)
        )
    return folder


# ---------------------------------------------------------------------------------------------------
# The metrics


@pytest.mark.parametrize("runs, tasks", [(2, 1), (3, 1), (5, 1), (7, 3), (12, 2)], ids=lambda v: str(v))
def test_iqm_is_the_25_percent_trimmed_mean_of_all_scores(runs, tasks):
    rng = np.random.default_rng(runs * 10 + tasks)
    scores = rng.normal(100, 30, (runs, tasks)) * rng.choice([1, 1, 10], (runs, tasks))  # outliers to trim
    est = stats.interval_estimates({"s": scores}, ["mean", "iqm"], reps=300)["s"]
    assert est["iqm"][0] == pytest.approx(trim_mean(scores.ravel(), 0.25), rel=1e-12)
    assert est["mean"][0] == pytest.approx(scores.mean(), rel=1e-12)
    for point, low, high in est.values():
        assert low <= point <= high


def test_iqm_trims_a_quarter_at_each_end():
    # 8 scores: the IQM is the mean of the middle 4, whatever the outliers.
    scores = np.array([[-1e6], [1.0], [2.0], [3.0], [4.0], [5.0], [6.0], [1e6]])
    assert stats.interval_estimates({"s": scores}, ["iqm"], reps=100)["s"]["iqm"][0] == 3.5


def test_intervals_are_reproducible_and_leave_numpy_alone():
    scores = {"s": np.arange(10.0)[:, None]}
    np.random.seed(123)
    before = np.random.random()
    np.random.seed(123)
    first = stats.interval_estimates(scores, ["iqm"], reps=300)
    assert np.random.random() == before  # the global generator is restored
    assert stats.interval_estimates(scores, ["iqm"], reps=300) == first
    assert stats.interval_estimates(scores, ["iqm"], reps=300, seed=1) != first


def test_probability_of_improvement_of_a_sampler_over_itself_is_one_half():
    x = np.array([[10.0, -3.0], [20.0, -1.0], [30.0, -2.0]])
    p, low, high = stats.improvement_over({"uniform": x, "again": x.copy()}, "uniform", reps=300)["again"]
    assert p == 0.5 and low <= 0.5 <= high


def test_probability_of_improvement_counts_ties_as_one_half():
    # x = 1, 3, 3 against y = 2, 2: 1 < 2 twice, 3 > 2 four times -> 4 / 6.
    x, y = np.array([[1.0], [3.0], [3.0]]), np.array([[2.0], [2.0]])
    est = stats.improvement_over({"uniform": y, "x": x, "tie": np.array([[2.0]])}, "uniform", reps=300)
    assert est["x"][0] == pytest.approx(4 / 6)
    assert est["tie"] == (0.5, 0.5, 0.5)
    assert "uniform" not in est


def test_optimality_gap_on_normalised_returns():
    returns = np.array([[500.0], [250.0], [500.0], [0.0]])
    normalised = stats.normalise(returns, "CartPole-v1")
    gap = stats.interval_estimates({"s": normalised}, ["optimality_gap"], reps=300)["s"]["optimality_gap"]
    assert gap[0] == pytest.approx(1 - (1 + 0.5 + 1 + 0) / 4)
    assert stats.normalise(np.array([-500.0, 0.0]), "Acrobot-v1").tolist() == [0.0, 1.0]
    assert stats.normalise(np.array([1.0]), "MountainCar-v0") is None


@pytest.mark.parametrize(
    "total, start, freq, steps",
    [(600, 200, 20, 4), (50_000, 1_000, 256, 128), (1000, 0, 1, 1), (300, 100, 7, 3)],
    ids=lambda v: str(v),
)
def test_gradient_steps_counts_the_dqn_loop(total, start, freq, steps):
    # The condition of agents/dqn.py's and agents/c51.py's loop, step by step.
    expected = sum(steps for s in range(total) if s >= start and (s + 1) % freq == 0)
    config = {
        "total_steps": str(total),
        "learning_starts": str(start),
        "train_freq": str(freq),
        "gradient_steps": str(steps),
    }
    assert gradient_steps("dqn", config) == expected
    assert gradient_steps("dqn", {"total_steps": "10"}) is None


# ---------------------------------------------------------------------------------------------------
# The sweep's table and plot, from run folders written by hand


def sweep_of(tmp_path: Path, with_diagnostics: bool) -> tuple[Config, list[dict]]:
    cfg = Config(
        algo="dqn",
        env_id="CartPole-v1",
        samplers=["uniform", "laber-mean"],
        seeds=[0, 1],
        batch_sizes=[8, 16],
        out=tmp_path,
        bootstrap=200,
    )
    runs = []
    for b in cfg.batch_sizes:
        for i, s in enumerate(cfg.samplers):
            for k in cfg.seeds:
                diagnostics = (
                    [
                        {"step": 300, "grad_norm": 9.0, "srank": 1.0},
                        {"step": 600, "grad_norm": b + i + k, "srank": 10 * b},
                    ]
                    if with_diagnostics
                    else []
                )
                folder = fake_run(
                    tmp_path / f"bs{b}" / s / f"seed{k}",
                    "CartPole-v1",
                    [10.0, b + 10 * i + k],
                    diagnostics,
                    batch_size=b,
                )
                runs.append(Run(s, k, folder, batch_size=b, returncode=0, wall_time=b + i))
    rows_by_batch = {
        b: stats.summarise([r for r in runs if r.batch_size == b], cfg.samplers, cfg.env_id, 200)
        for b in cfg.batch_sizes
    }
    rows = sweep.sweep_rows(cfg, runs, rows_by_batch)
    sweep.write_sweep(cfg, rows)
    sweep.plot_sweep(cfg, rows)
    return cfg, rows


def test_sweep_table_reports_iqm_time_and_final_diagnostics(tmp_path):
    cfg, rows = sweep_of(tmp_path, with_diagnostics=True)
    assert [(r["batch_size"], r["sampler"]) for r in rows] == [
        (8, "uniform"),
        (8, "laber-mean"),
        (16, "uniform"),
        (16, "laber-mean"),
    ]
    table = (tmp_path / "sweep.md").read_text()
    assert (
        "| batch size | sampler | runs | gradient steps | IQM [95% CI] | P(> uniform) [95% CI] | wall time (s) "
        "| grad_norm | srank |" in table
    )
    # bs 16, laber-mean: finals 26, 27 (IQM of two keeps both), above both of uniform's (16, 17) at that batch
    # size, wall time 17, grad_norm (17 + 18) / 2, srank 160; uniform has no P of its own.
    assert "| 16 | laber-mean | 2 | 80 | 26.5 [26.0, 27.0] | 1.00 [1.00, 1.00] | 17 | 17.5 | 160 |" in table
    assert "| 16 | uniform | 2 | 80 | 16.5 [16.0, 17.0] | - | 16 | 16.5 | 160 |" in table
    csv_rows = read_csv(tmp_path / "sweep.csv")
    assert [float(r["grad_norm"]) for r in csv_rows] == [8.5, 9.5, 16.5, 17.5]
    assert {r["gradient_steps"] for r in csv_rows} == {"80"}
    assert float(csv_rows[1]["p_improve"]) == 1.0  # laber-mean's finals (18, 19) above uniform's (8, 9)
    assert (tmp_path / "sweep.png").stat().st_size > 10_000


def test_sweep_without_diagnostics_leaves_their_columns_out(tmp_path):
    _, rows = sweep_of(tmp_path, with_diagnostics=False)
    table = (tmp_path / "sweep.md").read_text()
    assert "| wall time (s) |\n" in table and "grad_norm" not in table and "no run wrote diagnostics.csv" in table
    assert list(read_csv(tmp_path / "sweep.csv")[0])[-1] == "p_improve_hi"


# ---------------------------------------------------------------------------------------------------
# Several tasks


def test_aggregate_over_tasks_writes_table_profiles_and_skips_an_unknown_task(tmp_path):
    finals = {
        "cartpole": ("CartPole-v1", {"uniform": [100.0, 500.0, 300.0], "laber-mean": [500.0, 450.0, 400.0]}),
        "acrobot": ("Acrobot-v1", {"uniform": [-100.0, -200.0, -90.0], "laber-mean": [-80.0, -85.0, -90.0]}),
        "mountaincar": ("MountainCar-v0", {"uniform": [-200.0] * 3, "laber-mean": [-110.0] * 3}),
    }
    for task, (env_id, by_sampler) in finals.items():
        for sampler, returns in by_sampler.items():
            for seed, value in enumerate(returns):
                fake_run(tmp_path / task / sampler / f"seed{seed}", env_id, [0.0, value])
    fake_run(tmp_path / "cartpole" / "per" / "seed0", "CartPole-v1", [0.0, 500.0])  # not in every task: left out
    out = tmp_path / "all"
    rows = compare.main(Config(aggregate=[tmp_path / t for t in finals], out=out, bootstrap=300))

    normalised = {
        s: np.array([[finals["cartpole"][1][s][k] / 500, (finals["acrobot"][1][s][k] + 500) / 500] for k in range(3)])
        for s in ("uniform", "laber-mean")
    }
    assert [r["sampler"] for r in rows] == ["laber-mean", "uniform"]  # sorted: no results.csv in the folders
    for row in rows:
        x = normalised[row["sampler"]]
        assert row["iqm"] == pytest.approx(trim_mean(x.ravel(), 0.25))
        assert row["mean"] == pytest.approx(x.mean())
        assert row["optimality_gap"] == pytest.approx(1 - np.minimum(x, 1).mean())
    # P(laber-mean > uniform) over all three tasks: CartPole 6.5/9 (a tie at 500), Acrobot 8.5/9 (one at -90),
    # MountainCar 1.
    assert rows[0]["p_improve"] == pytest.approx((6.5 / 9 + 8.5 / 9 + 1) / 3)
    table = (out / "aggregate.md").read_text()
    assert "left out (no score range): mountaincar" in table and "Samplers not in every task, left out: per" in table
    assert (out / "profiles.png").stat().st_size > 10_000 and (out / "aggregate.png").stat().st_size > 10_000
    assert read_csv(out / "aggregate.csv")[0]["tasks"] == "3"


# ---------------------------------------------------------------------------------------------------
# Real runs


def run_compare(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "experiments.compare", "--algo", "dqn", "--bootstrap", "200", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_compare_writes_table_and_plot_and_survives_a_failed_run(tmp_path):
    out = tmp_path / "cmp"
    run_compare(
        "--samplers",
        "laber-mean",
        "uniform",
        "no-such-sampler",
        "--seeds",
        "0",
        "1",
        "--out",
        str(out),
        "--extra=" + " ".join(DISCRETE[2:]),
    )
    table = (out / "results.md").read_text()
    assert "| laber-mean | 2 |" in table and "| uniform | 2 |" in table
    assert "| no-such-sampler | 0 (2 failed) |" in table and "Failed runs:" in table
    rows = read_csv(out / "results.csv")
    assert [r["sampler"] for r in rows] == ["laber-mean", "uniform", "no-such-sampler"]
    assert float(rows[0]["iqm_lo"]) <= float(rows[0]["iqm"]) <= float(rows[0]["iqm_hi"])
    assert 0 <= float(rows[0]["p_improve_lo"]) <= float(rows[0]["p_improve"]) <= float(rows[0]["p_improve_hi"]) <= 1
    for sampler in ("laber-mean", "uniform"):
        for seed in (0, 1):
            assert_returns_possible(out / sampler / f"seed{seed}", "CartPole-v1")
    assert (out / "curves.png").stat().st_size > 10_000


@pytest.mark.slow
def test_batch_size_sweep_runs_each_size_at_the_same_gradient_steps(tmp_path):
    out = tmp_path / "sweep"
    run_compare(
        "--env-id",
        "CartPole-v1",
        "--samplers",
        "uniform",
        "laber-mean",
        "--seeds",
        "0",
        "--batch-sizes",
        "8",
        "16",
        "--total-steps",
        "600",
        "--out",
        str(out),
        "--extra=--learning-starts 200 --eval-every 300 --eval-episodes 2 --train-freq 50 --gradient-steps 5",
    )
    for b in (8, 16):
        for sampler in ("uniform", "laber-mean"):
            config = (out / f"bs{b}" / sampler / "seed0" / "config.txt").read_text()
            assert f"batch_size={b}\n" in config and "total_steps=600\n" in config
            assert_returns_possible(out / f"bs{b}" / sampler / "seed0", "CartPole-v1")
        assert "| uniform | 1 |" in (out / f"bs{b}" / "results.md").read_text()
        assert (out / f"bs{b}" / "curves.png").exists()
    rows = read_csv(out / "sweep.csv")
    assert [(r["batch_size"], r["sampler"], r["runs"]) for r in rows] == [
        ("8", "uniform", "1"),
        ("8", "laber-mean", "1"),
        ("16", "uniform", "1"),
        ("16", "laber-mean", "1"),
    ]
    assert {r["gradient_steps"] for r in rows} == {str((600 // 50 - 200 // 50) * 5)}
    table = (out / "sweep.md").read_text()
    assert "| 16 | laber-mean | 1 | 40 |" in table and "WARNING" not in table
    assert (out / "sweep.png").stat().st_size > 10_000


def test_batch_sizes_refuse_a_batch_size_in_extra(tmp_path):
    with pytest.raises(ValueError, match="--batch-sizes"):
        compare.main(Config(batch_sizes=[8], extra="--batch-size 32", out=tmp_path))


def test_diagnostics_plot_from_the_runs_diagnostics_and_none_without(tmp_path):
    rows = [
        {
            "step": s,
            "tv/uniform": 1.0,
            "tv/output": 0.1,
            "tv/last-layer": 0.05,
            "grad_norm": 2.0,
            "grad_variance": 0.5,
            "srank": 40,
            "dormant_fraction": 0.2,
        }
        for s in (1000, 2000)
    ]
    runs = [
        Run(
            sampler,
            seed,
            fake_run(tmp_path / sampler / f"seed{seed}", "CartPole-v1", [10, 20], diagnostics=rows),
            returncode=0,
        )
        for sampler in ("uniform", "laber-mean")
        for seed in (0, 1)
    ]
    path = reports.plot_diagnostics(tmp_path, "DQN", runs, ["uniform", "laber-mean"])
    assert path == tmp_path / "diagnostics.png" and path.stat().st_size > 10_000
    bare = [Run("uniform", 0, fake_run(tmp_path / "bare", "CartPole-v1", [10, 20]), returncode=0)]
    assert reports.plot_diagnostics(tmp_path / "bare", "DQN", bare, ["uniform"]) is None


def test_diagnostics_table_pools_every_measurement(tmp_path):
    def rows(tv_out, tv_last, ideal):
        return [
            {
                "step": 1000 * (i + 1),
                "tv/uniform": 1.0,
                "tv/output": o,
                "tv/last-layer": last,
                "second_moment/uniform": 4.0 * m,
                "second_moment/ideal": m,
            }
            for i, (o, last, m) in enumerate(zip(tv_out, tv_last, ideal))
        ]

    two = rows([0.1, 0.3], [0.2, 0.2], [1, 2])
    runs = [
        Run("uniform", 0, fake_run(tmp_path / "a", "CartPole-v1", [1], two), returncode=0),
        Run("laber-mean", 0, fake_run(tmp_path / "b", "CartPole-v1", [1], rows([0.5], [0.4], [3])), returncode=0),
        Run("per", 0, fake_run(tmp_path / "c", "CartPole-v1", [1]), returncode=0),
    ]  # no diagnostics
    table = reports.diagnostics_table(tmp_path, "DQN", runs).read_text()
    assert "2 runs, 3 measurements" in table
    assert "| tv/output | 0.3 [0.1, 0.5] |" in table and "| tv/last-layer | 0.2 [0.2, 0.4] |" in table
    assert "| second_moment/ideal | 2 [1, 3] |" in table and "| second_moment/uniform / ideal | 4 [4, 4] |" in table
    assert "closer to exact sampling than output sampling: 2 of 3 measurements" in table
    assert reports.diagnostics_table(tmp_path, "DQN", runs[2:]) is None


# ---------------------------------------------------------------------------------------------------
# --reuse: finished runs are kept, the others launched


def launched_with(folder: Path, args: list[str]) -> None:
    """What experiments.runs.launch leaves beside a run: the arguments it was launched with."""
    (folder / "args.json").write_text(json.dumps(args))


def test_finished_run_matches_the_launched_arguments_and_needs_the_last_evaluation(tmp_path):
    """--reuse compares the run's args.json (issue 22: not a re-parse of config.txt), its folder and
    --resume aside, and needs eval.csv to reach total_steps."""
    args = [
        "--env-id",
        "CartPole-v1",
        "--seed",
        "3",
        "--out",
        str(tmp_path / "run"),
        "--no-progress",
        "--lr",
        "1e-3",
        "--hidden",
        "256",
        "256",
        "--total-steps",
        "600",
    ]
    folder = fake_run(tmp_path / "run", "CartPole-v1", [10.0, 20.0], seed=3)
    assert finished_run(args, folder) is None  # no args.json: an unknown run is rerun, never reused
    launched_with(folder, args)
    assert finished_run(args, folder) == pytest.approx(6.0)  # eval.csv's last wall time
    moved = [a if a != str(tmp_path / "run") else "/elsewhere" for a in args]
    assert finished_run(moved, folder) == pytest.approx(6.0)  # the same run, wherever it was written
    assert finished_run([*args, "--resume"], folder) == pytest.approx(6.0)
    assert finished_run(args[:-1] + ["900"], folder) is None  # another value
    assert finished_run(args + ["--hidden", "256"], folder) is None  # one more argument
    assert finished_run(args[:-2], folder) is None  # one argument fewer
    unfinished = fake_run(tmp_path / "short", "CartPole-v1", [10.0], seed=3)  # last evaluation at step 300 of 600
    launched_with(unfinished, ["--seed", "3"])
    assert finished_run(["--seed", "3"], unfinished) is None
    assert finished_run(["--seed", "3"], tmp_path / "missing") is None


def test_reuse_launches_only_the_runs_not_finished(tmp_path, monkeypatch):
    cfg = Config(samplers=["uniform"], seeds=[0, 1], total_steps=600, out=tmp_path, reuse=True, bootstrap=200)
    done = Run("uniform", 0, tmp_path / "uniform" / "seed0")
    fake_run(done.folder, "CartPole-v1", [100.0, 200.0])
    launched_with(done.folder, command(cfg, done)[3:])
    launched = []

    def run(cmd, **kwargs):
        launched.append(cmd)
        folder = Path(cmd[cmd.index("--out") + 1])
        fake_run(folder, "CartPole-v1", [50.0, 60.0], seed=1)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(run_module.subprocess, "run", run)
    rows = compare.main(cfg)
    assert [c[c.index("--seed") + 1] for c in launched] == ["1"]
    assert rows[0]["runs"] == 2 and rows[0]["mean"] == pytest.approx((200.0 + 60.0) / 2)
    # Kept and launched alike, a finished run's wall time is its eval.csv's (6 s each), not the process's.
    assert rows[0]["wall_time_s"] == pytest.approx(6.0)
    assert json.loads((tmp_path / "uniform" / "seed1" / "args.json").read_text()) == launched[0][3:]


def test_reuse_resumes_an_interrupted_run_from_its_checkpoint(tmp_path, monkeypatch):
    """A run with the same arguments, stopped before its last step with a checkpoint that holds its
    buffer, goes on with --resume; one with other arguments starts again."""
    cfg = Config(samplers=["uniform"], seeds=[0, 1], total_steps=600, out=tmp_path, reuse=True, bootstrap=200)
    for seed, other in [(0, False), (1, True)]:
        run = Run("uniform", seed, tmp_path / "uniform" / f"seed{seed}")
        args = command(cfg, run)[3:]
        fake_run(run.folder, "CartPole-v1", [100.0])  # eval at 300 of 600
        launched_with(run.folder, [*args, "--lr", "0.5"] if other else args)  # another run: not this one
        (run.folder / "checkpoint" / "buffer").mkdir(parents=True)
    launched = {}

    def run(cmd, **kwargs):
        folder = Path(cmd[cmd.index("--out") + 1])
        launched[folder.name] = cmd
        fake_run(folder, "CartPole-v1", [50.0, 60.0])
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(run_module.subprocess, "run", run)
    compare.main(cfg)
    assert launched["seed0"][-1] == "--resume" and "--resume" not in launched["seed1"]


def test_a_variant_entry_runs_its_sampler_with_its_arguments_under_its_label(tmp_path, monkeypatch):
    cfg = Config(
        samplers=["uniform", "last-layer=laber-mean --surrogate last-layer"],
        seeds=[0],
        total_steps=600,
        out=tmp_path,
        bootstrap=200,
    )
    launched = {}

    def run(cmd, **kwargs):
        folder = Path(cmd[cmd.index("--out") + 1])
        launched[folder.parent.name] = cmd
        fake_run(folder, "CartPole-v1", [50.0, 60.0])
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(run_module.subprocess, "run", run)
    rows = compare.main(cfg)
    assert [r["sampler"] for r in rows] == ["uniform", "last-layer"]
    cmd = " ".join(launched["last-layer"])
    assert "--sampler laber-mean --surrogate last-layer" in cmd and "--sampler uniform" in " ".join(launched["uniform"])
    assert "| last-layer | 1 |" in (tmp_path / "results.md").read_text()


@pytest.mark.parametrize("entries", [["a/b=per"], ["x=--m 4"], ["=per"], ["per", "per=uniform"]])
def test_bad_sampler_entries_are_refused(entries, tmp_path):
    with pytest.raises(ValueError, match="--samplers"):
        compare.main(Config(samplers=entries, out=tmp_path))
