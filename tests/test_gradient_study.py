"""The gradient study (issue 30, item 4): its measures against identities worked by hand, the exact norms
against per-row autograd, and the whole pipeline (two tiny MinAtar runs stopped and resumed) writing its CSVs."""

from itertools import product
from pathlib import Path

import pytest
import torch

from tests.conftest import AGENT_DEPS, require  # noqa: E402

require(*AGENT_DEPS, "minatar")
from experiments import gradient_study as gs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def norms(n: int, seed: int = 0) -> torch.Tensor:
    """Heavy-tailed positive norms, as per-sample gradient norms are."""
    return torch.empty(n, dtype=torch.float64).exponential_(generator=torch.Generator().manual_seed(seed)) ** 2


def test_whole_buffer_identities_by_hand():
    g = norms(500)
    uniform = gs.whole_buffer(g, torch.ones_like(g))
    assert uniform["second_moment"] == pytest.approx((g**2).mean().item(), rel=1e-12)
    assert uniform["optimal_second_moment"] == pytest.approx(g.mean().item() ** 2, rel=1e-12)
    optimal = gs.whole_buffer(g, g)
    assert optimal["ratio"] == pytest.approx(1.0, rel=1e-12) and optimal["tv"] == pytest.approx(0.0, abs=1e-12)
    for seed in range(5):  # any distribution is at least the optimum
        p = torch.rand(500, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        out = gs.whole_buffer(g, p)
        assert out["ratio"] >= 1.0
        by_hand = (g**2 / (p / p.sum())).sum() / 500**2
        assert out["second_moment"] == pytest.approx(by_hand.item(), rel=1e-10)
        assert out["tv"] == pytest.approx((p / p.sum() - g / g.sum()).abs().sum().item(), rel=1e-10)


def test_laber_by_hand_on_its_own_draw():
    g, s = norms(300), norms(300, seed=1)
    m, b, k, seed = 2, 4, 40, 7
    out = gs.laber(g, s, m, b, k, torch.Generator().manual_seed(seed), eps=1e-6)
    index = torch.randint(300, (k, m * b), generator=torch.Generator().manual_seed(seed))
    moments, optima, tvs = [], [], []
    for row in index:
        gl, pl = g[row], (s[row] + 1e-6) / (s[row] + 1e-6).sum()
        moments.append(float((gl**2 / pl).sum()) / (m * b) ** 2)
        optima.append(float(gl.sum()) ** 2 / (m * b) ** 2)
        tvs.append(float((pl - gl / gl.sum()).abs().sum()))
    mean = sum(moments) / k
    assert out["second_moment"] == pytest.approx(mean, rel=1e-10)
    assert out["ratio"] == pytest.approx(mean / (sum(optima) / k), rel=1e-10)
    assert out["ratio_to_buffer_optimum"] == pytest.approx(mean / g.mean().item() ** 2, rel=1e-10)
    assert out["tv"] == pytest.approx(sum(tvs) / k, rel=1e-10)
    assert out["second_moment_se"] == pytest.approx(torch.tensor(moments).std().item() / k**0.5, rel=1e-6)


def test_laber_with_exact_norms_reaches_each_large_batch_optimum():
    g = norms(1000)
    for m in (1, 4, 32):
        out = gs.laber(g, g, m, 8, 200, torch.Generator().manual_seed(m), eps=0.0)
        assert out["ratio"] == pytest.approx(1.0, rel=1e-12) and out["tv"] == pytest.approx(0.0, abs=1e-12)


def test_laber_is_the_two_stage_estimators_second_moment():
    """n = 3 rows, B = 1, m = 2: the 9 ordered large batches, enumerated, give E_L[M_L] exactly; the Monte
    Carlo mean must be within 4 standard errors of it."""
    g, s = torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64), torch.tensor([3.0, 1.0, 2.0], dtype=torch.float64)
    exact = 0.0
    for i, j in product(range(3), repeat=2):
        pl = s[[i, j]] / s[[i, j]].sum()
        exact += float((g[[i, j]] ** 2 / pl).sum()) / 4 / 9
    out = gs.laber(g, s, 2, 1, 50_000, torch.Generator().manual_seed(0), eps=0.0)
    assert abs(out["second_moment"] - exact) < 4 * out["second_moment_se"]
    # m = 1, B = 1: the large batch is one uniform row, kept: uniform sampling, M = mean g^2.
    one = gs.laber(g, s, 1, 1, 50_000, torch.Generator().manual_seed(1), eps=0.0)
    assert abs(one["second_moment"] - float((g**2).mean())) < 4 * one["second_moment_se"]
    assert one["tv"] == 0.0


def test_stored_priorities_are_what_per_draws_from():
    from torchrl.data import PrioritizedSampler

    sampler = PrioritizedSampler(100, alpha=0.6, beta=0.4, eps=1e-8)
    td = torch.tensor([0.5, 2.0, 0.0, 7.0])
    sampler.update_priority(torch.arange(4), td)
    stored = gs.stored_priorities(sampler, 4)
    assert torch.allclose(stored, (td.double() + 1e-8) ** 0.6, rtol=1e-6)


def test_buffer_scores_are_each_rows_own_gradient():
    """The exact norm of each row is the norm of autograd's gradient of DQNLoss on that row alone (Huber,
    Double DQN), and the output surrogate is min(|delta|, 1)."""
    from tensordict import TensorDict
    from torchrl.data import LazyTensorStorage, TensorDictReplayBuffer

    from agents import dqn
    from agents.envs import make_env

    loss_module, _ = dqn.build_dqn(dqn.Config(hidden=16), make_env("CartPole-v1", 0), torch.device("cpu"))
    n = 24
    rows = TensorDict(
        {
            "observation": torch.randn(n, 4),
            "action": torch.randint(2, (n,)),
            ("next", "observation"): torch.randn(n, 4),
            ("next", "reward"): torch.randn(n, 1) * 3,
            ("next", "done"): torch.rand(n, 1) < 0.2,
            ("next", "terminated"): torch.zeros(n, 1, dtype=torch.bool),
        },
        [n],
    )
    rows["next", "terminated"] = rows["next", "done"].clone()
    rb = TensorDictReplayBuffer(storage=LazyTensorStorage(n))
    rb.extend(rows)
    scores = gs.buffer_scores(loss_module, rb, chunk=10)
    params = list(loss_module.value_network_params.values(True, True))
    for i in range(n):
        loss = loss_module(rows[i : i + 1].clone())["loss"]
        grads = torch.autograd.grad(loss, params)
        by_hand = torch.sqrt(sum((grad.double() ** 2).sum() for grad in grads))
        assert scores["exact"][i].item() == pytest.approx(by_hand.item(), rel=1e-4)
    assert torch.allclose(scores["output"], scores["td_error"].clamp(max=1.0), rtol=1e-6)
    assert (scores["td_error"] > 1).any() and (scores["td_error"] < 1).any()  # both sides of Huber's kink


def rows_for(run: str, step: int, stored: float, fresh: float, laber: dict[int, float]) -> list[dict]:
    """One checkpoint's CSV rows, with ``ratio_to_buffer_optimum`` set (LaBER's with a standard error 0.001)."""
    out = [
        {"run": run, "step": step, "scheme": run, "m": "", "ratio_to_buffer_optimum": stored},
        {"run": run, "step": step, "scheme": f"{run}-fresh", "m": "", "ratio_to_buffer_optimum": fresh},
    ]
    for m, value in laber.items():
        out.append(
            {
                "run": run,
                "step": step,
                "scheme": "laber",
                "m": m,
                "ratio_to_buffer_optimum": value,
                "ratio_to_buffer_optimum_se": 0.001,
            }
        )
    return out


FALLING = {1: 1.5, 2: 1.4, 4: 1.3, 8: 1.25, 16: 1.22, 32: 1.2}


def test_verdicts_follow_the_design():
    supported = [r for run, step in product(gs.RUNS, gs.STEPS) for r in rows_for(run, step, 2.0, 1.5, FALLING)]
    assert gs.verdicts(supported)[("claim 1")] == "supported"
    assert gs.verdicts(supported)["claim 2"] == "supported"
    # GER's stored priorities beat LaBER m=4 at two checkpoints: exact-but-stale wins.
    ger_wins = [
        r
        for run, step in product(gs.RUNS, gs.STEPS)
        for r in rows_for(run, step, 1.1 if run == "ger" and step != gs.STEPS[0] else 2.0, 1.0, FALLING)
    ]
    assert gs.verdicts(ger_wins)["claim 1"] == "contradicted"
    # m = 32 above m = 4 in the PER run at every checkpoint: larger m is not better.
    rising = {**FALLING, 32: 1.4}
    flipped = [
        r
        for run, step in product(gs.RUNS, gs.STEPS)
        for r in rows_for(run, step, 2.0, 1.5, rising if run == "per" else FALLING)
    ]
    assert gs.verdicts(flipped)["claim 2"] == "contradicted"
    # Within noise: m = 32 equal to m = 4 at one checkpoint only is neither.
    one_tie = [
        r
        for run, step in product(gs.RUNS, gs.STEPS)
        for r in rows_for(run, step, 2.0, 1.5, {**FALLING, 32: 1.3} if step == gs.STEPS[0] else FALLING)
    ]
    assert gs.verdicts(one_tie)["claim 2"] == "mixed"
    assert gs.verdicts(supported[: len(supported) // 2])["claim 1"] == "incomplete"


def test_the_pipeline_writes_each_checkpoints_csv(tmp_path):
    """Two tiny MinAtar/Breakout runs (PER and GER, in parallel; the study's default env), stopped at 200 steps
    and resumed to 400."""
    cfg = gs.Config(
        steps=(200, 400),
        buffer_size=1000,
        train_freq=50,
        device="cpu",
        agent_args="--learning-starts 100 --gradient-steps 2 --batch-size 8 --eval-episodes 1",
        ms=(1, 2),
        large_batches=30,
        out=tmp_path / "out",
        work=tmp_path / "work",
    )
    written = gs.main(cfg)
    assert [p.name for p in written] == ["per-step200.csv", "ger-step200.csv", "per-step400.csv", "ger-step400.csv"]
    rows = gs.read_csvs(cfg.out)
    for run, step in product(gs.RUNS, cfg.steps):
        here = {(r["scheme"], r["m"]): r for r in rows if r["run"] == run and r["step"] == step}
        assert set(here) == {
            ("uniform", ""),
            ("output-buffer", ""),
            (run, ""),
            (f"{run}-fresh", ""),
            *((s, m) for s in ("laber", "laber-exact") for m in cfg.ms),
        }
        assert {r["rows"] for r in here.values()} == {step}  # the whole buffer, not yet full
        whole = [r for (scheme, m), r in here.items() if m == ""]
        assert len({r["optimal_second_moment"] for r in whole}) == 1  # one optimum for the whole buffer
        assert all(r["ratio"] >= 1 - 1e-6 for r in whole)
        assert here[run, ""]["second_moment"] != pytest.approx(here[f"{run}-fresh", ""]["second_moment"])
        for m in cfg.ms:
            assert here["laber-exact", m]["ratio"] == pytest.approx(1.0, abs=1e-5)
            assert here["laber-exact", m]["tv"] == pytest.approx(0.0, abs=1e-6)
            assert here["laber", m]["ratio"] >= here["laber-exact", m]["ratio"] - 1e-6  # the same large batches
    state = torch.load(cfg.work / "per" / "checkpoint" / "state.pt", weights_only=False)
    assert state["step"] == 400  # resumed to the end
    text = (cfg.out / "gradient-study.md").read_text()
    assert "**Status: partial**" in text and "**ger run, step 400**" in text
    assert not (cfg.work / "snapshots" / "per-step400").exists()


def test_the_committed_page_is_the_design_alone():
    assert (ROOT / "docs/results/gradient-study.md").read_text() == gs.page(None)
