"""``python -m experiments.gradient_study``: how close each sampler's distribution is to the optimal one, on
the whole replay buffer, with exact per-sample gradient norms (issue 30, item 4; the LaBER paper's App. H and
Fig. 1, columns 1-2, measured where a CPU cannot).

    python -m experiments.gradient_study --out $OUT/gradient-study     # the study (GPU machine, 5-6 min)
    python -m experiments.gradient_study --page-only --out <results> --page docs/results/gradient-study.md

It trains the project's DQN (``agents/dqn.py``, MinAtar/Breakout-v1) twice from the same seed, once with PER
and once with GER, each in its own process (the two in parallel), stops each at the checkpoint steps
(``--stop-after``, then ``--resume``), and at each checkpoint measures, on every row of the stored buffer:

* ``g_i = ||grad_theta l_i||``, the exact per-sample gradient norm of the DQN loss (Huber, Double DQN, the
  target computed once per row) over every parameter of the Q-network
  (:func:`torchsample.grad_norm_scores`, ``"exact"``: :func:`torchsample.gradnorms.exact_grad_norms`);
* ``s_i``, LaBER's surrogate on the same target (``"output"``: ``min(|delta_i|, 1)``) and ``|delta_i|``,
  PER's priority formula, now (:func:`torchsample.td_error`).

Each sampling distribution ``P`` over the ``n`` rows is scored as an importance-sampled, one-draw estimate
``G = g_I / (n P(I))``, ``I ~ P``, of the buffer's mean gradient (App. C; full correction, beta = 1):

* second moment ``M(P) = E[G^T G] = (1/n^2) sum_i g_i^2 / P(i)`` (:func:`torchsample.diagnostics.second_moment`);
  its variance is ``M(P) - ||g_bar||^2``, the same offset for every unbiased ``P``: comparing ``M`` compares
  variances;
* the optimal distribution ``P*(i) = g_i / sum_j g_j`` and its ``M* = (1/n^2) (sum_i g_i)^2``, the minimum;
  uniform's ``M = (1/n) sum_i g_i^2``; ``ratio = M(P) / M* >= 1``;
* ``TV(P, P*) = sum_i |P(i) - P*(i)|`` in ``[0, 2]`` (App. H's definition; :func:`torchsample.diagnostics.tv_distance`).

The whole-buffer schemes (:func:`whole_buffer`): ``uniform``; ``per`` (PER's stored sum-tree entries, what
it draws from: ``(|delta| + eps)^alpha`` from the update that last drew each row, max priority for rows never
drawn), ``per-fresh`` (the same formula on today's ``|delta|``: staleness removed, alpha kept); ``ger`` (GER's
stored ``(g + eps)^alpha``), ``ger-fresh`` (today's); ``output-buffer`` (``s_i + eps`` on the whole buffer,
LaBER's surrogate without a large batch: the limit ``m -> inf``). ``per``/``per-fresh`` are measured in the
PER run, ``ger``/``ger-fresh`` in the GER run, the rest in both.

LaBER-mean at ``m`` (:func:`laber`): a large batch ``L`` of ``N = m B`` rows drawn uniformly with replacement,
``P_L(i) = (s_i + eps) / sum_{j in L} (s_j + eps)`` inside it. Averaged over ``K`` large batches:
``M_laber = E_L[(1/N^2) sum_{i in L} g_i^2 / P_L(i)]``, which is exactly the second moment of LaBER's
two-stage estimate of the buffer's mean gradient (draw ``L``, then ``i ~ P_L``), so ``M_laber / M*``
(``ratio_to_buffer_optimum``) sits on the whole-buffer schemes' scale. Beside it, per large batch: the optimum
inside ``L``, ``M*_L = (1/N^2) (sum_{i in L} g_i)^2``, ``ratio = E_L[M_L] / E_L[M*_L]``, and ``TV(P_L, P*_L)``
averaged (a distance between distributions over ``N`` rows, not comparable with the whole buffer's TVs).
``laber-exact`` draws in proportion to ``g_i`` itself: the best any surrogate can do at that ``m``.

The two claims, and what would support or contradict each, are fixed on the page (:data:`DESIGN`) before any
run. Results: one CSV per run and checkpoint (``<run>-step<k>.csv``, written as each finishes, so a run stopped
at the time limit keeps what finished) and the page, rewritten after each.
"""

from __future__ import annotations

import csv
import inspect
import math
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import tyro
from torch import Tensor

from experiments.markdown import markdown_table
from torchsample import LaBER, grad_norm_scores
from torchsample.diagnostics import second_moment, tv_distance
from torchsample.scoring import score_rows
from torchsample.surrogates import td_error
from torchsample.views import critic_of

RUNS = ("per", "ger")
MS = (1, 2, 4, 8, 16, 32)
STEPS = (25_000, 50_000, 100_000)
# What the agents' LaBER adds to every surrogate priority: torchsample.LaBER's default eps.
LABER_EPS = inspect.signature(LaBER).parameters["eps"].default
COLUMNS = [
    "run",
    "step",
    "rows",
    "scheme",
    "m",
    "second_moment",
    "second_moment_se",
    "optimal_second_moment",
    "ratio",
    "ratio_to_buffer_optimum",
    "ratio_to_buffer_optimum_se",
    "tv",
    "tv_se",
    "large_batches",
    "eval_return",
]
GPU_COMMAND = (
    "GPU_CMD='python3 -m experiments.gradient_study --out $OUT/gradient-study --work /tmp/gradient-study' "
    "bash .gpu/suite.sh"
)


@dataclass
class Config:
    """The study's sizes; the defaults are the GPU run's (5-6 minutes on one H100/H200, estimated: the page)."""

    out: Path = Path("runs/gradient-study")
    """results: one CSV per run and checkpoint, and the page (gradient-study.md)"""
    work: Optional[Path] = None
    """the training runs' folders and checkpoints (about 100 MB a run; default: a temporary folder)"""
    env_id: str = "MinAtar/Breakout-v1"
    """the environment (agents/dqn.py's MinAtar defaults, with the overrides below)"""
    runs: tuple[str, ...] = RUNS
    """the samplers that train the buffers; the stored priorities of PER and GER come from their own runs"""
    steps: tuple[int, ...] = STEPS
    """the checkpoints (env steps); the last is the run's total"""
    buffer_size: int = 100_000
    """replay capacity: the late checkpoint's buffer is full"""
    train_freq: int = 4
    """env steps between gradient steps (MinAtar's own is 1; 4 fits 100k steps in the GPU budget)"""
    seed: int = 0
    """the agents' seed (both runs) and the large batches' draw"""
    device: str = "auto"
    """the agents' and the analysis's device"""
    agent_args: str = "--eval-episodes 5"
    """more arguments for agents.dqn (both runs), e.g. '--cudagraphs'"""
    ms: tuple[int, ...] = MS
    """LaBER's m values (large batch m * batch-size)"""
    large_batches: int = 20_000
    """large batches LaBER's figures average over, per m"""
    chunk: int = 8192
    """rows per pass of the exact gradient norms"""
    page: Optional[Path] = None
    """where the page goes (default: <out>/gradient-study.md)"""
    page_only: bool = False
    """write the page from the CSVs in --out, and run nothing"""


# ---------------------------------------------------------------------------------------------
# The measures


def whole_buffer(norms: Tensor, priorities: Tensor) -> dict[str, float]:
    """A sampling distribution over the whole buffer, ``P = priorities / sum(priorities)``, against the optimal
    one, ``P* = norms / sum(norms)``:

        ``M(P) = (1/n^2) sum_i g_i^2 / P(i)``,  ``M* = (1/n^2) (sum_i g_i)^2``,  ``ratio = M(P) / M*``,
        ``TV = sum_i |P(i) - P*(i)|``

    Args:
        norms: ``[n]`` exact per-sample gradient norms ``g_i``.
        priorities: ``[n]`` the scheme's priorities (any non-negative scale).

    Returns:
        ``second_moment``, ``optimal_second_moment``, ``ratio``, ``ratio_to_buffer_optimum`` (the same), ``tv``.

    Examples:
        The paper's counter-example (App. C): norms 10 and 5, |TD| 1 and 4.

        >>> import torch
        >>> out = whole_buffer(torch.tensor([10.0, 5.0]), torch.tensor([1.0, 4.0]))
        >>> {k: round(v, 4) for k, v in out.items()}  # doctest: +NORMALIZE_WHITESPACE
        {'second_moment': 132.8125, 'optimal_second_moment': 56.25, 'ratio': 2.3611,
         'ratio_to_buffer_optimum': 2.3611, 'tv': 0.9333}
        >>> whole_buffer(torch.tensor([10.0, 5.0]), torch.ones(2))["second_moment"]   # uniform: mean g^2
        62.5
    """
    norms = norms.double()
    moment = second_moment(norms, priorities).item()
    optimum = second_moment(norms, norms).item()
    ratio = moment / optimum if optimum > 0 else float("nan")
    return {
        "second_moment": moment,
        "optimal_second_moment": optimum,
        "ratio": ratio,
        "ratio_to_buffer_optimum": ratio,
        "tv": tv_distance(priorities.double(), norms).item(),
    }


def laber(
    norms: Tensor,
    surrogate: Tensor,
    m: int,
    batch_size: int,
    large_batches: int,
    generator: torch.Generator,
    eps: float = LABER_EPS,
) -> dict[str, float]:
    """LaBER-mean at ``m`` over a buffer: ``K = large_batches`` large batches ``L`` of ``N = m * batch_size``
    rows drawn uniformly with replacement; inside each, ``P_L(i) = (s_i + eps) / sum_{j in L} (s_j + eps)``
    and ``P*_L(i) = g_i / sum_{j in L} g_j``:

        ``M_L = (1/N^2) sum_{i in L} g_i^2 / P_L(i)``,  ``M*_L = (1/N^2) (sum_{i in L} g_i)^2``,
        ``second_moment = mean_L M_L`` (LaBER's two-stage estimate's second moment, K -> inf),
        ``ratio = mean_L M_L / mean_L M*_L``,  ``ratio_to_buffer_optimum = mean_L M_L / M*`` (the whole
        buffer's ``M* = (1/n^2) (sum_i g_i)^2``),  ``tv = mean_L sum_{i in L} |P_L(i) - P*_L(i)|``

    with the standard errors of the means over ``L`` (``*_se``).

    Args:
        norms: ``[n]`` exact per-sample gradient norms of the buffer's rows.
        surrogate: ``[n]`` LaBER's surrogate of each row (``norms`` itself: exact-gradient LaBER).
        m, batch_size: the large batch is ``m * batch_size`` rows.
        large_batches: ``K``.
        generator: the generator the large batches are drawn with, on the device they are computed on.
        eps: added to each surrogate priority, as LaBER does (1e-6).

    Examples:
        With the exact norms as the surrogate (and no eps), LaBER reaches the optimum of each large batch:

        >>> import torch
        >>> g = torch.rand(1000, generator=torch.Generator().manual_seed(0))
        >>> out = laber(g, g, m=4, batch_size=8, large_batches=100, generator=torch.Generator().manual_seed(1), eps=0)
        >>> round(out["ratio"], 6), round(out["tv"], 6), out["ratio_to_buffer_optimum"] > 1
        (1.0, 0.0, True)
    """
    if m < 1 or batch_size < 1 or large_batches < 1:
        raise ValueError(f"m, batch_size and large_batches must be >= 1, got {m}, {batch_size}, {large_batches}")
    device = generator.device
    norms, surrogate = norms.double().to(device), surrogate.double().to(device)
    n, per_chunk = m * batch_size, max(1, _CHUNK_ELEMENTS // (m * batch_size))
    moments, optima, tvs = [], [], []
    for start in range(0, large_batches, per_chunk):
        rows = min(per_chunk, large_batches - start)
        index = torch.randint(len(norms), (rows, n), generator=generator, device=device)
        g, p = norms[index], surrogate[index] + eps
        moments.append(second_moment(g, p))
        optima.append(second_moment(g, g))
        tvs.append(tv_distance(p, g))
    moments, optima, tvs = torch.cat(moments), torch.cat(optima), torch.cat(tvs)
    buffer_optimum = second_moment(norms, norms).item()
    moment = moments.mean().item()
    moment_se = _se(moments)
    return {
        "second_moment": moment,
        "second_moment_se": moment_se,
        "optimal_second_moment": optima.mean().item(),
        "ratio": moment / optima.mean().item(),
        "ratio_to_buffer_optimum": moment / buffer_optimum,
        "ratio_to_buffer_optimum_se": moment_se / buffer_optimum,
        "tv": tvs.mean().item(),
        "tv_se": _se(tvs),
        "large_batches": large_batches,
    }


_CHUNK_ELEMENTS = 1 << 22  # large-batch rows drawn at once: 32 MB a float64 temporary


def _se(values: Tensor) -> float:
    return (values.std() / math.sqrt(len(values))).item() if len(values) > 1 else float("nan")


def buffer_scores(loss_module, rb, chunk: int = 8192) -> dict[str, Tensor]:
    """Every stored row's exact gradient norm ``g_i`` (``"exact"``), LaBER's surrogate ``s_i = min(|delta_i|, 1)``
    (``"output"``) and ``|delta_i| = |q_i - y_i|`` (``"td_error"``), on one TD target ``y_i`` per row, by the
    library (:func:`torchsample.scoring.score_rows`, :func:`torchsample.grad_norm_scores`), ``chunk`` rows at a
    time, through the buffer's transform. Float64 on the CPU.

    Examples:
        >>> import torch
        >>> from agents import dqn
        >>> from agents.envs import make_env, to_tensordict
        >>> from torchrl.data import LazyTensorStorage, TensorDictReplayBuffer
        >>> env = make_env("CartPole-v1", 0)
        >>> loss_module, _ = dqn.build_dqn(dqn.Config(loss="l2"), env, torch.device("cpu"))
        >>> rb = TensorDictReplayBuffer(storage=LazyTensorStorage(50))
        >>> rows = [to_tensordict(torch.randn(4), i % 2, 1.0, torch.randn(4), False, False, "cpu") for i in range(20)]
        >>> _ = rb.extend(torch.stack(rows))
        >>> scores = buffer_scores(loss_module, rb, chunk=8)
        >>> bool(torch.allclose(scores["output"], 2 * scores["td_error"]))   # l2: ||dl/dq|| = 2 |delta|
        True
        >>> bool((scores["exact"] >= scores["output"] * (1 - 1e-5)).all())    # the ladder's order
        True
    """
    critic = critic_of(loss_module)
    out: dict[str, list[Tensor]] = {"exact": [], "output": [], "td_error": []}
    storage = rb.storage
    for start in range(0, len(storage), chunk):
        index = torch.arange(start, min(start + chunk, len(storage)))
        rows = rb.transform(storage[index])
        scores = score_rows(critic, rows, "output")
        out["output"].append(scores.norms)
        out["td_error"].append(td_error(scores.pred, scores.target))
        out["exact"].append(grad_norm_scores(loss_module, rows, "exact", target=scores.target))
    return {k: torch.cat(v).double().cpu() for k, v in out.items()}


def stored_priorities(sampler, rows: int) -> Tensor:
    """What a PER (or GER) sampler draws the first ``rows`` rows in proportion to: its sum-tree entries,
    ``(p_i + eps)^alpha`` with ``p_i`` the priority its last update wrote (TorchRL's ``PrioritizedSampler``).

    Examples:
        >>> import torch
        >>> from torchrl.data import PrioritizedSampler
        >>> sampler = PrioritizedSampler(10, alpha=0.5, beta=1.0, eps=0.0)
        >>> sampler.update_priority(torch.arange(3), torch.tensor([1.0, 4.0, 9.0]))
        >>> stored_priorities(sampler, 3)
        tensor([1., 2., 3.], dtype=torch.float64)
    """
    device = getattr(sampler, "device", torch.device("cpu"))  # torchrl 0.14 keeps a CUDA tree beside CUDA storage
    index = torch.arange(rows, device=device)
    return torch.as_tensor(sampler._sum_tree[index]).double().cpu()


def measure(
    run: str,
    scores: dict[str, Tensor],
    stored: Optional[Tensor],
    *,
    alpha: float,
    per_eps: float,
    ms: tuple[int, ...],
    batch_size: int,
    large_batches: int,
    seed: int,
    device: torch.device | str = "cpu",
) -> list[dict]:
    """The CSV rows of one checkpoint of ``run``: :func:`whole_buffer` for ``uniform``, ``output-buffer``
    (``s + 1e-6``), the run's stored priorities (``per`` or ``ger``: ``stored``) and their fresh counterpart
    (``(|delta| + eps)^alpha`` or ``(g + eps)^alpha`` now), then :func:`laber` at each ``m`` with the surrogate
    (``laber``) and with the exact norms (``laber-exact``), each ``m`` on its own draw from ``seed``, on ``device``.

    Examples:
        >>> import torch
        >>> g = torch.rand(500, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        >>> scores = {"exact": g, "output": g.clamp(max=0.5), "td_error": g}
        >>> rows = measure("uniform", scores, None, alpha=0.6, per_eps=1e-8, ms=(1, 4), batch_size=8,
        ...                large_batches=50, seed=0)
        >>> [(r["scheme"], r["m"]) for r in rows]  # doctest: +NORMALIZE_WHITESPACE
        [('uniform', ''), ('output-buffer', ''), ('laber', 1), ('laber-exact', 1), ('laber', 4), ('laber-exact', 4)]
    """
    norms = scores["exact"]
    schemes = {"uniform": torch.ones_like(norms), "output-buffer": scores["output"] + LABER_EPS}
    if run in ("per", "ger") and stored is not None:
        fresh = scores["td_error"] if run == "per" else norms
        schemes[run] = stored
        schemes[f"{run}-fresh"] = (fresh + per_eps) ** alpha
    rows = [{"scheme": name, "m": "", **whole_buffer(norms, p)} for name, p in schemes.items()]
    for m in ms:
        for name, surrogate in (("laber", scores["output"]), ("laber-exact", norms)):
            generator = torch.Generator(device=device).manual_seed(seed * 1000 + m)  # both: the same large batches
            eps = LABER_EPS if name == "laber" else 0.0
            rows.append(
                {"scheme": name, "m": m, **laber(norms, surrogate, m, batch_size, large_batches, generator, eps)}
            )
    return [{"run": run, "rows": len(norms), **row} for row in rows]


# ---------------------------------------------------------------------------------------------
# The runs


def agent_args(cfg: Config, sampler: str, run_dir: Path) -> list[str]:
    """The command line of ``agents.dqn`` for one run (``--stop-after`` and ``--resume`` added per segment).

    Examples:
        >>> " ".join(agent_args(Config(), "per", Path("w/per")))  # doctest: +NORMALIZE_WHITESPACE
        '--env-id MinAtar/Breakout-v1 --sampler per --seed 0 --total-steps 100000 --buffer-size 100000
         --train-freq 4 --device auto --eval-every 25000 --out w/per --no-progress --eval-episodes 5'
    """
    return [
        *("--env-id", cfg.env_id, "--sampler", sampler, "--seed", str(cfg.seed)),
        *("--total-steps", str(cfg.steps[-1]), "--buffer-size", str(cfg.buffer_size)),
        *("--train-freq", str(cfg.train_freq), "--device", cfg.device, "--eval-every", str(cfg.steps[0])),
        *("--out", str(run_dir), "--no-progress", *shlex.split(cfg.agent_args)),
    ]


def train_to(cfg: Config, work: Path, step: int) -> dict[str, subprocess.Popen]:
    """Starts every run's next segment, up to ``step`` (a process per run, in parallel); :func:`wait` ends them."""
    procs = {}
    for run in cfg.runs:
        run_dir = work / run
        run_dir.mkdir(parents=True, exist_ok=True)
        args = [*agent_args(cfg, run, run_dir), "--stop-after", str(step), "--resume"]
        with open(run_dir / f"segment-{step}.log", "w") as log:  # the child keeps its own handle
            procs[run] = subprocess.Popen(
                [sys.executable, "-m", "agents.dqn", *args], stdout=log, stderr=subprocess.STDOUT
            )
    return procs


def wait(procs: dict[str, subprocess.Popen], work: Path, step: int, started: float) -> None:
    """Waits for :func:`train_to`'s processes, and keeps a copy of each checkpoint (the next segment replaces it)."""
    for run, proc in procs.items():
        rc = proc.wait()
        if rc != 0:
            tail = (work / run / f"segment-{step}.log").read_text()[-3000:]
            raise RuntimeError(f"agents.dqn ({run}, to step {step}) exited with {rc}:\n{tail}")
        snapshot = work / "snapshots" / f"{run}-step{step}"
        shutil.rmtree(snapshot, ignore_errors=True)
        shutil.copytree(work / run / "checkpoint", snapshot)
    print(f"[gradient_study] runs at step {step} after {time.time() - started:.0f} s", flush=True)


def analyse(cfg: Config, work: Path, run: str, step: int) -> list[dict]:
    """:func:`measure` on the checkpoint of ``run`` at ``step`` (the copy :func:`wait` kept), loaded as the agent
    resumes it; returns the CSV rows and deletes the copy."""
    from agents import dqn
    from agents.checkpoints import load_checkpoint
    from agents.config import cli
    from agents.devices import resolve_device
    from agents.envs import make_env
    from agents.replay import make_replay

    agent_cfg = cli(dqn.env_defaults, cfg.env_id, agent_args(cfg, run, work / run))
    device, env = resolve_device(agent_cfg.device), make_env(cfg.env_id, cfg.seed)
    loss_module, _ = dqn.build_dqn(agent_cfg, env, device)
    rb, _ = make_replay(agent_cfg, loss_module, env, device)
    snapshot = work / "snapshots" / f"{run}-step{step}"
    load_checkpoint(snapshot, modules={"loss": loss_module}, buffer=rb)
    scores = buffer_scores(loss_module, rb, cfg.chunk)
    prioritized = hasattr(rb.sampler, "_sum_tree")
    stored = stored_priorities(rb.sampler, len(rb.storage)) if prioritized else None
    rows = measure(
        run,
        scores,
        stored,
        alpha=rb.sampler._alpha if prioritized else 1.0,
        per_eps=rb.sampler._eps if prioritized else 0.0,
        ms=cfg.ms,
        batch_size=agent_cfg.batch_size,
        large_batches=cfg.large_batches,
        seed=cfg.seed * 1_000_003 + step,
        device=device,
    )
    shutil.rmtree(snapshot, ignore_errors=True)
    eval_return = _last_eval(work / run / "eval.csv", step)
    return [{**row, "step": step, "eval_return": eval_return} for row in rows]


def _last_eval(path: Path, step: int) -> float:
    if not path.exists():
        return float("nan")
    with open(path) as f:
        evals = [(int(r["step"]), float(r["eval_return"])) for r in csv.DictReader(f)]
    done = [ret for s, ret in evals if s <= step]
    return done[-1] if done else float("nan")


def write_csv(rows: list[dict], path: Path) -> None:
    """``rows`` as a CSV with :data:`COLUMNS`, written whole then renamed (a killed run leaves no half file).

    Examples:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "per-step1.csv"
        >>> write_csv([{"run": "per", "step": 1, "scheme": "uniform", "ratio": 1.5}], path)
        >>> read_csvs(path.parent)[0]["ratio"]
        1.5
    """
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS, restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    tmp.replace(path)


def read_csvs(folder: Path) -> list[dict]:
    """Every row of the study's CSVs in ``folder`` (``<run>-step<k>.csv``), numbers as numbers (empty: NaN, or
    ``""`` for ``m`` on whole-buffer rows)."""
    rows = []
    for path in sorted(Path(folder).glob("*-step*.csv")):
        with open(path) as f:
            for row in csv.DictReader(f):
                out = {}
                for k, v in row.items():
                    if k in ("run", "scheme"):
                        out[k] = v
                    elif k in ("step", "rows", "m", "large_batches"):
                        out[k] = int(v) if v else ""
                    else:
                        out[k] = float(v) if v else float("nan")
                rows.append(out)
    return rows


# ---------------------------------------------------------------------------------------------
# The page

DESIGN = """## The design, fixed before any run

**What is measured.** Two DQN runs on MinAtar/Breakout-v1 from the same seed (`agents/dqn.py` with the
project's MinAtar defaults, but `--train-freq 4` and 100k steps, so that a full 100k-row buffer is generated
inside the GPU budget): one trained with PER, one with GER (alpha 0.6, beta 0.4 -> 1). Each stops at 25k, 50k
and 100k steps (early, mid and late *of this run*: all three are early in the paper's 5M-step sense), and at
each, on every row of the stored buffer (25k, 50k, 100k rows), the study computes the exact per-sample gradient
norm `g_i = ||grad_theta l_i||` of the DQN loss (Huber, Double DQN; one TD target per row; ghost norms,
`torchsample.grad_norm_scores(..., "exact")`), LaBER's surrogate `s_i = min(|delta_i|, 1)` (the library's
`"output"` rung on the same target) and `|delta_i|`.

**Formulas.** A sampling distribution `P` over the `n` rows gives the one-draw importance-sampled estimate
`G = g_I / (n P(I))`, `I ~ P`, of the buffer's mean gradient (App. C, full correction):

- second moment `M(P) = E[G^T G] = (1/n^2) sum_i g_i^2 / P(i)`; its variance is `M(P) - ||g_bar||^2`, the same
  offset for every unbiased `P`, so a lower `M` is a lower variance;
- the optimal distribution `P*(i) = g_i / sum_j g_j`, `M* = (1/n^2) (sum_i g_i)^2`; uniform's `M` is
  `(1/n) sum_i g_i^2`; `ratio = M(P) / M* >= 1`;
- total variation `TV(P, P*) = sum_i |P(i) - P*(i)|`, in [0, 2] (App. H).

Whole-buffer schemes: `uniform`; `per`, PER's stored sum-tree entries `(|delta| + eps)^alpha`, each from the
update that last drew the row (max priority for rows never drawn), which is what PER samples from; `per-fresh`,
the same formula on today's `|delta|` (staleness removed, alpha kept); `ger`, GER's stored `(g + eps)^alpha`;
`ger-fresh`, today's; `output-buffer`, `s_i + 1e-6` over the whole buffer (LaBER's surrogate without a large
batch, its `m -> inf` limit). `per`, `per-fresh` come from the PER run, `ger`, `ger-fresh` from the GER run, the
others from both. GER's column is therefore GER's own buffer and network, not the PER run's.

LaBER-mean at m in {1, 2, 4, 8, 16, 32} (B = 32): 20 000 large batches `L` of `N = mB` rows drawn uniformly
with replacement; inside each, `P_L(i) = (s_i + 1e-6) / sum_{j in L} (s_j + 1e-6)`. `M_laber = mean_L (1/N^2)
sum_{i in L} g_i^2 / P_L(i)` is the second moment of LaBER's two-stage estimate of the buffer's mean gradient,
so `M_laber / M*` (`ratio_to_buffer_optimum`, with its Monte Carlo standard error) is on the whole-buffer scale.
Also reported: the optimum inside each large batch, `M*_L = (1/N^2)(sum_{i in L} g_i)^2`, `ratio = mean M_L /
mean M*_L`, and `TV(P_L, P*_L)` averaged (over N rows, so not comparable with whole-buffer TVs).
`laber-exact` draws in proportion to `g_i` inside `L`: the best any surrogate reaches at that m.

A comparison "A below B" holds when B - A exceeds twice the standard error of the difference (whole-buffer
figures are exact; LaBER's carry their Monte Carlo error). Three checkpoints in each run.

**Claim 1, "up-to-date priorities are what matters"** (Table 1: GER is exact but outdated, LaBER approximate
but up to date).
- *Supported* if at all three checkpoints: LaBER-mean m = 4 below `ger` (GER run) and below `per` (PER run) in
  `ratio_to_buffer_optimum`, and staleness costs: `ger-fresh` below `ger` and `per-fresh` below `per`.
- *Contradicted* if `ger` is at or below LaBER-mean m = 4 at two or more checkpoints (exact but stale beats
  approximate but fresh), or if stored priorities are at or below their fresh counterparts at two or more
  checkpoints in both runs (staleness does not cost).
- Otherwise *mixed*.

**Claim 2, "the larger m the better"** (Fig. 1, column 2), on LaBER-mean's `ratio_to_buffer_optimum`.
- *Supported* if, in both runs and at all three checkpoints, m = 32 is below m = 4 and m = 4 below m = 1, and no
  m is above the next smaller one.
- *Contradicted* if, in either run, m = 32 is at or above m = 4 at two or more checkpoints.
- Otherwise *mixed*. `laber-exact`'s figures (which must fall with m: `E[(mean_L g)^2]` shrinks with N) and
  `output-buffer` (the limit) say whether a failure comes from the large batch or from the surrogate.
  TV against m is described, not tested.

**What it cannot show.** One seed, one game, 100k steps; a statement about the sampling distributions'
variance, not about returns; PER's actual update (beta < 1, weights over their maximum) is rescaled and
biased, which `M` does not measure. The GPU machine has torchrl 0.11.1; torchrl 0.14's `default_priority`
says that earlier versions transformed a new row's priority twice (`((p + eps)^alpha + eps)^alpha`,
under-prioritising rows never drawn). Whichever 0.11.1 does, `per` and `ger` are read from its sum tree: what
that PER draws from.
"""


def page(folder: Optional[Path]) -> str:
    """The page: the design (:data:`DESIGN`), the command, and the results from the CSVs in ``folder`` (none:
    "not yet run"), with the claims' verdicts (:func:`verdicts`).

    Examples:
        >>> page(None).splitlines()[2]
        '**Status: not yet run: needs a GPU machine.**'
    """
    rows = read_csvs(folder) if folder is not None and Path(folder).exists() else []
    done = sorted({(r["run"], r["step"]) for r in rows})
    expected = len(RUNS) * len(STEPS)
    lines = ["# Gradient study: the whole buffer's exact gradient norms (issue 30, item 4)", ""]
    if not rows:
        lines += ["**Status: not yet run: needs a GPU machine.**"]
    else:
        status = "complete" if len(done) >= expected else "partial"
        lines += [
            f"**Status: {status}**, {len(done)} of {expected} checkpoints: "
            + ", ".join(f"{run} at {step}" for run, step in done)
            + "."
        ]
    lines += [
        "",
        "The paper's App. H and Fig. 1 (columns 1-2) asked how far each sampler's distribution is from the "
        "optimal one; the paper could measure it only inside LaBER's large batch. This study measures it on the "
        "whole replay buffer, for uniform, PER's and GER's stored priorities and LaBER-mean at six values of m. "
        "Written by `experiments/gradient_study.py`; every formula is also in its docstring.",
        "",
        "- **Command** (GPU machine, from the project root; `.gpu/` written here first by "
        "`../shared/gpu/prepare.sh` and carried there, `../shared/gpu/README.md`; one command, limit 600 s):",
        "",
        f"  ```bash\n  {GPU_COMMAND}\n  ```",
        "",
        "  Results go to `$OUT/gradient-study/`: `<run>-step<k>.csv` as each checkpoint finishes, and this page; "
        "the log (`$OUT/gpu.log`) gives each segment's and each analysis's wall time.",
        "  Expected device time 5-6 minutes, estimated, not measured: per env step about 0.7 ms (0.44 ms on one "
        "CPU core without updates in the replication's PER runs, plus the greedy forward on the GPU), per PER "
        "update 5.7 ms (the H200's eager figure, `../shared/gpu/results-2026-12-04`), GER about 3 ms more for its "
        "exact norms; 100k steps and 24k updates a run, the two runs in parallel, each analysis overlapping the "
        "next segment; three process starts of about 10 s.",
        "- **This page**: `python -m experiments.gradient_study --page-only --out <results> "
        "--page docs/results/gradient-study.md`.",
        "",
        DESIGN,
    ]
    if rows:
        lines += _results(rows)
    return "\n".join(lines).rstrip() + "\n"


def _fmt(value, se=None, digits=3) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "-"
    text = f"{value:.{digits}f}"
    return text if se is None or math.isnan(se) else f"{text} ± {se:.{digits}f}"


def _results(rows: list[dict]) -> list[str]:
    lines = ["## Results", ""]
    for run in RUNS:
        for step in sorted({r["step"] for r in rows if r["run"] == run}):
            here = [r for r in rows if r["run"] == run and r["step"] == step]
            lines += [
                f"**{run} run, step {step}** ({here[0]['rows']} rows; greedy return "
                f"{_fmt(here[0]['eval_return'], digits=1)}):",
                "",
            ]
            table = [
                [
                    r["scheme"],
                    str(r["m"]),
                    f"{r['second_moment']:.4g}",
                    f"{r['optimal_second_moment']:.4g}",
                    _fmt(r["ratio"]),
                    _fmt(r["ratio_to_buffer_optimum"], r["ratio_to_buffer_optimum_se"]),
                    _fmt(r["tv"], r["tv_se"]),
                ]
                for r in here
            ]
            header = ["scheme", "m", "M", "M* (own scope)", "ratio", "M / M* (buffer)", "TV to P* (own scope)"]
            lines += [*markdown_table(header, table), ""]
    result = verdicts(rows)
    lines += ["## Verdicts (the design's rules, applied by the generator)", ""]
    lines += [f"- **Claim 1** (up-to-date priorities): **{result['claim 1']}**."]
    lines += [f"- **Claim 2** (the larger m the better): **{result['claim 2']}**."]
    lines += ["", *[f"  - {note}" for note in result["notes"]], ""]
    return lines


def below(a: dict, b: dict) -> bool:
    """Whether row ``a``'s ``ratio_to_buffer_optimum`` is below ``b``'s by more than twice the standard error of
    their difference: ``b - a > 2 sqrt(se_a^2 + se_b^2)`` (whole-buffer rows have no error: se = 0).

    Examples:
        >>> below({"ratio_to_buffer_optimum": 1.1, "ratio_to_buffer_optimum_se": 0.01},
        ...       {"ratio_to_buffer_optimum": 1.2, "ratio_to_buffer_optimum_se": float("nan")})
        True
        >>> below({"ratio_to_buffer_optimum": 1.1, "ratio_to_buffer_optimum_se": 0.06},
        ...       {"ratio_to_buffer_optimum": 1.2, "ratio_to_buffer_optimum_se": 0.0})
        False
    """

    def se(row):
        value = row.get("ratio_to_buffer_optimum_se", float("nan"))
        return 0.0 if value == "" or math.isnan(value) else value

    gap = b["ratio_to_buffer_optimum"] - a["ratio_to_buffer_optimum"]
    return gap > 2 * math.sqrt(se(a) ** 2 + se(b) ** 2)


def verdicts(rows: list[dict]) -> dict:
    """The design's two verdicts from the CSV rows (:data:`DESIGN`; "A below B": :func:`below`):
    ``{"claim 1": ..., "claim 2": ..., "notes": [...]}``, each ``supported``, ``contradicted``, ``mixed`` or
    ``incomplete`` (fewer than the three checkpoints of both runs).

    Examples:
        >>> verdicts([])["claim 1"]
        'incomplete'
    """
    at = {(r["run"], r["step"], r["scheme"], r["m"]): r for r in rows}
    steps = {run: sorted({r["step"] for r in rows if r["run"] == run}) for run in RUNS}
    try:
        if any(len(steps[run]) < len(STEPS) for run in RUNS):
            raise KeyError("checkpoints")
        return _verdicts(at, steps)
    except KeyError:
        return {"claim 1": "incomplete", "claim 2": "incomplete", "notes": ["not every row the design's rules read"]}


def _verdicts(at: dict, steps: dict) -> dict:
    notes = []
    # Claim 1
    laber_beats, fresh_beats = {}, {}
    for run in RUNS:
        laber_beats[run] = [below(at[run, s, "laber", 4], at[run, s, run, ""]) for s in steps[run]]
        fresh_beats[run] = [below(at[run, s, f"{run}-fresh", ""], at[run, s, run, ""]) for s in steps[run]]
        notes.append(
            f"{run} run: LaBER-mean m=4 below stored {run} at {sum(laber_beats[run])} of {len(STEPS)} "
            f"checkpoints; {run}-fresh below stored {run} at {sum(fresh_beats[run])}"
        )
    ger_not_worse = sum(not below(at["ger", s, "laber", 4], at["ger", s, "ger", ""]) for s in steps["ger"])
    staleness_free = all(sum(fresh_beats[run]) <= len(STEPS) - 2 for run in RUNS)
    if all(all(laber_beats[run]) and all(fresh_beats[run]) for run in RUNS):
        claim1 = "supported"
    elif ger_not_worse >= 2 or staleness_free:
        claim1 = "contradicted"
    else:
        claim1 = "mixed"
    # Claim 2
    monotone, flipped = True, False
    for run in RUNS:
        ms = sorted(m for r, s, scheme, m in at if r == run and scheme == "laber" and s == steps[run][0])
        reversals = 0
        for s in steps[run]:
            curve = [at[run, s, "laber", m] for m in ms]
            ok = below(at[run, s, "laber", 32], at[run, s, "laber", 4]) and below(
                at[run, s, "laber", 4], at[run, s, "laber", 1]
            )
            ok = ok and not any(below(curve[i], curve[i + 1]) for i in range(len(curve) - 1))
            monotone = monotone and ok
            reversals += not below(at[run, s, "laber", 32], at[run, s, "laber", 4])
        flipped = flipped or reversals >= 2
        notes.append(f"{run} run: m=32 not below m=4 at {reversals} of {len(STEPS)} checkpoints")
    claim2 = "supported" if monotone else "contradicted" if flipped else "mixed"
    return {"claim 1": claim1, "claim 2": claim2, "notes": notes}


# ---------------------------------------------------------------------------------------------
# The study


def main(cfg: Config) -> list[Path]:
    """Trains the runs segment by segment and analyses each checkpoint while the next segment trains; writes
    each checkpoint's CSV, and the page after each; returns the CSVs' paths. ``--page-only``: the page alone."""
    cfg.out.mkdir(parents=True, exist_ok=True)
    page_path = cfg.page or cfg.out / "gradient-study.md"
    if cfg.page_only:
        page_path.write_text(page(cfg.out))
        return sorted(cfg.out.glob("*-step*.csv"))
    if list(cfg.steps) != sorted(set(cfg.steps)) or cfg.steps[0] < 1:
        raise ValueError(f"--steps must be increasing positive step counts, got {cfg.steps}")
    work = cfg.work or Path(tempfile.mkdtemp(prefix="gradient-study-"))
    started, written, following = time.time(), [], None
    try:
        wait(train_to(cfg, work, cfg.steps[0]), work, cfg.steps[0], started)
        for k, step in enumerate(cfg.steps):
            following = train_to(cfg, work, cfg.steps[k + 1]) if k + 1 < len(cfg.steps) else None
            for run in cfg.runs:
                path, t0 = cfg.out / f"{run}-step{step}.csv", time.time()
                write_csv(analyse(cfg, work, run, step), path)
                written.append(path)
                page_path.write_text(page(cfg.out))
                now = time.time()
                print(
                    f"[gradient_study] {path.name} after {now - started:.0f} s (analysis {now - t0:.1f} s)", flush=True
                )
            if following is not None:
                wait(following, work, cfg.steps[k + 1], started)
                following = None
    finally:
        for proc in (following or {}).values():  # an analysis failed: stop the segment it overlapped
            proc.terminate()
    if cfg.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return written


if __name__ == "__main__":
    main(tyro.cli(Config))
