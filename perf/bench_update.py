"""Time per training update, by sampler: uniform (B), large batch (m*B), TorchRL's PER (B), LaBER-mean.

    python -m perf.bench_update --quick              # CPU: DQN models eager, plus the compiled DQN CartPole pair
    python -m perf.bench_update --full               # every model x sampler, eager and compiled (+ CUDA graphs on CUDA)
    python -m perf.bench_update --device cuda        # CUDA: DQN MinAtar net and SAC MuJoCo MLP, eager, compiled and
                                                     #   compiled + CUDA graph (what `make gpu-check` runs)

One update = sample from the buffer, (LaBER: surrogate forward on m*B rows, down-sample), loss,
backward, optimizer step, target update (PER: + ``update_priority``). It is the agents' update:
the agents' networks and losses (``agents/``), :class:`torchsample.LaBERLoss` and
:func:`torchsample.make_update`. Modes: ``eager``; ``compiled`` (``make_update(compile=True)``);
``cudagraph``, the compiled update captured by ``tensordict.nn.CudaGraphModule`` (CUDA only; the
buffer's sample is copied into the graph's input, PER's ``update_priority`` and DQN's hard target
copy run outside it). The samplers of one model and mode are timed interleaved, 10 updates at a
time (``perf/common.py``); medians over many updates after a warm-up; ratios are against the
uniform-B update of the same model and mode, measured in the same run. On CUDA the times are
absolute (with the device name); on CPU quote the ratios.

Where an environment cannot be made (MuJoCo is not installed on the GPU machine), or with
``--synthetic``, the buffers hold random transitions of the environment's sizes: the networks and
the update are the same, and the update's cost does not depend on the values.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import traceback
import warnings
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from torchrl.data import LazyTensorStorage, PrioritizedSampler, TensorDictReplayBuffer  # noqa: E402
from torchrl.objectives import HardUpdate, SoftUpdate  # noqa: E402

from agents import dqn, sac, td3  # noqa: E402
from agents.envs import make_env, to_tensordict  # noqa: E402
from agents.replay import PER_ALPHA, PER_BETA  # noqa: E402
from perf.common import RESULTS, describe, environment, resolve_device, time_interleaved, write_csv
from torchsample import LaBER, LaBERLoss, LaBERSampler, make_update  # noqa: E402

M = 4
MODELS = {
    # name: (agent module, config, discrete)
    "dqn-cartpole": (dqn, dqn.env_defaults("CartPole-v1"), True),
    "dqn-minatar": (dqn, dqn.env_defaults("MinAtar/Breakout-v1"), True),
    "sac-halfcheetah": (sac, sac.env_defaults("HalfCheetah-v5"), False),
    "td3-halfcheetah": (td3, td3.env_defaults("HalfCheetah-v5"), False),
}
# The spaces of environments a machine may lack (MuJoCo): (observation size, action size), actions in [-1, 1].
SPACES = {"HalfCheetah-v5": (17, 6), "Hopper-v5": (11, 3), "Walker2d-v5": (17, 6), "Ant-v5": (105, 8)}
# "laber-sampler": LaBER-mean through TorchRL's sampler extension point (LaBERSampler), where the buffer
# gathers the kept rows a second time; "laber-mean" calls LaBER on the large batch the buffer returns.
SAMPLERS = ["uniform", "large-batch", "per", "laber-mean", "laber-sampler"]
MODES = ["eager", "compiled", "cudagraph"]
COLUMNS = ["model", "mode", "sampler", "median_ms", "vs_uniform", "vs_per", "vs_large-batch", "vs_laber-mean", "note"]


class RandomTransitions(gym.Env):
    """An environment with the given spaces that returns random observations and rewards."""

    def __init__(self, observation_space: gym.Space, action_space: gym.Space) -> None:
        self.observation_space, self.action_space = observation_space, action_space

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        if seed is not None:
            self.observation_space.seed(seed)
        return self.observation_space.sample(), {}

    def step(self, action):
        terminated = bool(self.np_random.random() < 0.01)
        return self.observation_space.sample(), float(self.np_random.normal()), terminated, False, {}


def env_for(env_id: str, synthetic: bool) -> tuple[gym.Env, str]:
    """The environment (or a stand-in of its sizes) and a note saying which."""
    try:
        env = make_env(env_id, 0)
    except Exception as err:  # e.g. gymnasium's DependencyNotInstalled where MuJoCo is missing
        if env_id not in SPACES:
            raise
        obs, act = SPACES[env_id]
        stand_in = RandomTransitions(
            gym.spaces.Box(-np.inf, np.inf, (obs,), np.float64), gym.spaces.Box(-1.0, 1.0, (act,), np.float32)
        )
        print(
            f"  {env_id} unavailable ({type(err).__name__}: {str(err)[:120]}): random transitions of its sizes "
            f"(observation {obs}, action {act})",
            flush=True,
        )
        return stand_in, "synthetic transitions"
    if synthetic:
        return RandomTransitions(env.observation_space, env.action_space), "synthetic transitions"
    return env, ""


def fill(buffer, env, n: int, device) -> None:
    """``n`` transitions from random actions (rows as the agents store them: float observations in float32)."""
    as_stored = lambda x: x.astype(np.float32) if np.issubdtype(np.asarray(x).dtype, np.floating) else x  # noqa: E731
    obs, _ = env.reset(seed=0)
    env.action_space.seed(0)
    rows = []
    for _ in range(n):
        action = env.action_space.sample()
        next_obs, reward, terminated, truncated, _ = env.step(action)
        rows.append(to_tensordict(as_stored(obs), action, reward, as_stored(next_obs), terminated, truncated, device))
        obs = env.reset()[0] if terminated or truncated else next_obs
    buffer.extend(torch.stack(rows))


def build_updates(model: str, sampler: str, modes: list[str], device, synthetic: bool) -> tuple[dict, str]:
    """``{mode: one_update}`` for one model and sampler (all modes share networks and buffer), and a note."""
    agent, cfg, discrete = MODELS[model]
    if discrete:
        env, note = env_for(cfg.env_id, synthetic)
        loss_module, _ = dqn.build_dqn(cfg, env, device)
        target = HardUpdate(loss_module, value_network_update_interval=cfg.target_update)
    else:
        env, note = env_for(cfg.env_id, synthetic)
        loss_module, _ = (sac.build_sac if agent is sac else td3.build_td3)(cfg, env, device)
        target = SoftUpdate(loss_module, tau=cfg.tau)
    rows = M * cfg.batch_size if sampler in ("large-batch", "laber-mean") else cfg.batch_size
    if sampler == "laber-sampler":
        draw = LaBERSampler(LaBER(loss_module, batch_size=cfg.batch_size), m=M)
    elif sampler == "per":
        draw = PrioritizedSampler(100_000, alpha=PER_ALPHA, beta=PER_BETA)
    else:
        draw = None  # uniform
    buffer = TensorDictReplayBuffer(storage=LazyTensorStorage(100_000, device=device), batch_size=rows, sampler=draw)
    fill(buffer, env, 5_000, device)
    if sampler == "per":  # TorchRL 0.14 puts the tree beside CUDA storage when its extension has CUDA kernels
        note = "; ".join(filter(None, [note, f"PER sum-tree on {getattr(buffer.sampler, 'device', '?')}"]))
    laber = LaBER(loss_module, batch_size=cfg.batch_size) if sampler == "laber-mean" else None
    weighted = LaBERLoss(loss_module)

    def objective(data):
        if laber is not None:
            data = laber(data)
        losses = weighted(data)
        return sum(v for k, v in losses.items() if k.startswith("loss")), data

    optimizer = torch.optim.Adam(
        loss_module.parameters(), lr=torch.tensor(1e-4, device=device), capturable=device.type == "cuda"
    )
    # A hard target copy counts updates in Python: it runs after the update, outside any graph.
    hard = isinstance(target, HardUpdate)
    eager = make_update(objective, optimizer, None if hard else target, compile=False)
    compiled = (
        make_update(objective, optimizer, None if hard else target, compile=True) if set(modes) - {"eager"} else None
    )

    def tensors_out(update):  # what the steps after the update read: tensors only, as a CUDA graph returns them
        def step(data):
            loss, out = update(data)
            return (loss, out["index"], out["td_error"]) if sampler == "per" else (loss,)

        return step

    def one_update(step):
        def run() -> None:
            outputs = step(buffer.sample())
            if hard:
                target.step()
            if sampler == "per":
                buffer.update_priority(outputs[1], outputs[2])

        return run

    updates = {}
    if "eager" in modes:
        updates["eager"] = one_update(tensors_out(eager))
    if "compiled" in modes:
        updates["compiled"] = one_update(tensors_out(compiled))
    if "cudagraph" in modes:
        from tensordict.nn import CudaGraphModule

        updates["cudagraph"] = one_update(CudaGraphModule(tensors_out(compiled), warmup=5))
    return updates, note


def warm(fns: dict, calls: int, label: str) -> dict:
    """Run each update ``calls`` times (compiles, CUDA-graph capture); drop and report those that fail."""
    working = {}
    for name, fn in fns.items():
        try:
            for _ in range(calls):
                fn()
            working[name] = fn
        except Exception as err:
            print(f"  FAILED {label} {name}: {type(err).__name__}: {str(err)[:300]}", flush=True)
            traceback.print_exc(limit=-3)
    return working


def cases_for(args, device) -> list[tuple[str, str, str]]:
    """(model, mode, sampler) cases, in print order."""
    if args.models or args.modes:
        models = args.models or (["dqn-minatar", "sac-halfcheetah"] if device.type == "cuda" else ["dqn-cartpole"])
        modes = args.modes or (MODES if device.type == "cuda" else ["eager"])
        return [(m, mode, s) for m in models for mode in modes for s in SAMPLERS]
    if args.full:
        modes = MODES if device.type == "cuda" else ["eager", "compiled"]
        return [(m, mode, s) for m in MODELS for mode in modes for s in SAMPLERS]
    if device.type == "cuda":  # sized for `make gpu-check`: compile only what the targets compare
        # The rows that matter first (issue 29): DQN eager, compiled, graphed, each with uniform, PER,
        # LaBERSampler and functional LaBER; then SAC. A run stopped at its limit keeps the first ones.
        compared = ["uniform", "per", "laber-sampler", "laber-mean"]
        return [
            (m, mode, s)
            for m in ("dqn-minatar", "sac-halfcheetah")
            for mode in MODES
            for s in (compared + ["large-batch"] if mode == "eager" else compared)
        ]
    cases = [(m, "eager", s) for m in ("dqn-cartpole", "dqn-minatar") for s in SAMPLERS]
    return cases + [("dqn-cartpole", "compiled", s) for s in ("uniform", "laber-mean", "laber-sampler")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--quick",
        action="store_true",
        help="CPU: DQN models eager + compiled DQN CartPole (default); "
        "CUDA: DQN MinAtar and SAC HalfCheetah, eager, compiled and CUDA graph (default)",
    )
    size.add_argument("--full", action="store_true", help="every model x sampler x mode")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), help="only these models (every sampler)")
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=MODES,
        help="only these modes (cudagraph without CUDA runs the update as is: a smoke test)",
    )
    parser.add_argument("--iterations", type=int, default=None, help="timed updates per case")
    parser.add_argument("--synthetic", action="store_true", help="random transitions instead of env steps")
    parser.add_argument(
        "--compile-budget",
        type=float,
        default=None,
        help="seconds to spend compiling and capturing (warm-ups of compiled and graphed updates); once spent, "
        "the later compiled cases are not measured (reported, not a failure). Default: no cap",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="CSV path (default runs/perf/update_<device>.csv, or perf/results/ with UPDATE_RESULTS=1)",
    )
    args = parser.parse_args()
    device = resolve_device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_update: --device cuda, but torch sees no CUDA device: nothing to measure.")
        return
    torch.set_num_threads(1)
    logging.getLogger("torchrl").setLevel(logging.WARNING)  # one "Initialized LazyTensorStorage" line per buffer
    warnings.filterwarnings("ignore", message=".*Overriding environment")  # MinAtar registers its ids on each make_env
    iterations = args.iterations or (1000 if args.full else 300)
    cases = cases_for(args, device)
    env = environment(device)
    out = args.out or RESULTS / f"update_{device.type}.csv"
    print(f"{describe(env)}\nmedian of {iterations} updates after warm-up, m = {M}, samplers interleaved\n", flush=True)

    # Every (model, sampler) compiles its own objective and step (same code, other closures): let dynamo keep them all.
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit, 64)
    medians, notes, rows, updates = {}, {}, [], {}
    compile_seconds, over_budget = 0.0, []
    # Groups in case order (CUDA: DQN eager, compiled, graphed, then SAC): a run cut short by a time limit
    # keeps the first. A model's updates are built just before its first group.
    for model, mode in dict.fromkeys((m, mode) for m, mode, _ in cases):
        for sampler in dict.fromkeys(s for m, _, s in cases if m == model):
            if (model, sampler) not in updates and (model, sampler) not in notes:
                build(model, sampler, [md for m, md, s in cases if m == model and s == sampler], updates, notes, args)
        samplers = [s for m, md, s in cases if m == model and md == mode and (model, s) in updates]
        if mode != "eager" and args.compile_budget is not None and compile_seconds >= args.compile_budget:
            over_budget += [(model, mode, s) for s in samplers]
            print(
                f"{model} {mode}: not compiled, the compile budget of {args.compile_budget:.0f} s is spent", flush=True
            )
            continue
        start = time.perf_counter()
        fns = warm({s: updates[model, s][mode] for s in samplers}, 30 if mode != "eager" else 20, f"{model} {mode}")
        if mode != "eager":
            compile_seconds += time.perf_counter() - start
            print(f"  {model} {mode}: warm-up (compiles, capture) {time.perf_counter() - start:.0f} s", flush=True)
        if not fns:
            continue
        try:
            timings = time_interleaved(
                fns,
                samples=iterations,
                warmup=2,
                device=device,
                samples_per_turn=10,
                progress=f"{model} {mode}: timing {', '.join(fns)}",
            )
        except Exception as err:
            print(f"  FAILED timing {model} {mode}: {type(err).__name__}: {str(err)[:300]}", flush=True)
            continue
        for s, t in timings.items():
            medians[model, mode, s] = t.median
        rows += report(model, mode, list(fns), medians, notes)
        rows.sort(key=lambda r: (list(MODELS).index(r["model"]), MODES.index(r["mode"]), SAMPLERS.index(r["sampler"])))
        write_csv(out, rows, COLUMNS, env)  # after each group: a run cut short keeps what it measured
    if ("dqn-cartpole", "compiled", "laber-mean") in medians and ("dqn-cartpole", "eager", "laber-mean") in medians:
        speedup = medians["dqn-cartpole", "eager", "laber-mean"] / medians["dqn-cartpole", "compiled", "laber-mean"]
        print(f"\nCompiled LaBER-mean update vs eager (dqn-cartpole): {speedup:.2f}x faster")
    print(f"CSV: {out}")
    missing = [c for c in cases if c not in medians and c not in over_budget]
    if over_budget:
        print(f"not compiled (compile budget, {len(over_budget)}): " + ", ".join(" ".join(c) for c in over_budget))
    if missing:
        print(f"not measured ({len(missing)}): " + ", ".join(" ".join(c) for c in missing))
    if any(sampler != "per" for _, _, sampler in missing):
        sys.exit(1)  # a failure, not TorchRL's PER being unavailable


def build(model: str, sampler: str, modes: list[str], updates: dict, notes: dict, args) -> None:
    """``updates[model, sampler]`` (and its note), or a printed failure (TorchRL's PER may be unavailable)."""
    print(f"building {model} {sampler} ({', '.join(modes)}) ...", flush=True)
    torch.manual_seed(0)
    try:
        updates[model, sampler], notes[model, sampler] = build_updates(
            model, sampler, modes, resolve_device(args.device), args.synthetic
        )
    except Exception as err:  # keep going; the exit status says so (TorchRL's PER aside, see below)
        # TorchRL's compiled sum-tree loads only with the torch it was built for (0.14.1: torch 2.14).
        notes[model, sampler] = f"build failed: {type(err).__name__}"
        print(
            f"  {'skipped' if sampler == 'per' else 'FAILED'} {model} {sampler}: {type(err).__name__}: "
            f"{str(err)[:300]}",
            flush=True,
        )
        if sampler != "per":
            traceback.print_exc(limit=-3)


def report(model: str, mode: str, samplers: list[str], medians: dict, notes: dict) -> list[dict]:
    """Print a model and mode's table rows; return its CSV rows."""
    print("\n| model | mode | sampler | median (ms) | vs uniform B | vs PER | vs large batch | vs laber-mean |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    rows = []
    for sampler in samplers:
        ms = medians[model, mode, sampler] * 1e3
        ratio = {
            peer: medians[model, mode, sampler] / medians[model, mode, peer]
            for peer in ("uniform", "per", "large-batch", "laber-mean")
            if (model, mode, peer) in medians
        }
        cell = lambda peer: f"{ratio[peer]:.2f}" if peer in ratio else "-"  # noqa: E731
        print(
            f"| {model} | {mode} | {sampler} | {ms:.2f} | {cell('uniform')} | {cell('per')} | {cell('large-batch')} "
            f"| {cell('laber-mean')} |",
            flush=True,
        )
        rows.append(
            {
                "model": model,
                "mode": mode,
                "sampler": sampler,
                "median_ms": ms,
                **{f"vs_{k}": v for k, v in ratio.items()},
                "note": notes.get((model, sampler), ""),
            }
        )
    print()
    return rows


if __name__ == "__main__":
    main()
