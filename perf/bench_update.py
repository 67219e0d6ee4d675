"""Time per training update, by sampler: uniform (B), large batch (m*B), TorchRL's PER (B), LaBER-mean.

    python perf/bench_update.py --quick    # DQN models eager, plus the compiled DQN CartPole pair
    python perf/bench_update.py --full     # every model x sampler, eager and compiled

One update = sample from the buffer, (LaBER: surrogate forward on m*B rows, down-sample), loss,
backward, optimizer step, target update (PER: + ``update_priority``). It is the agents' update:
the agents' networks and losses (``agents/``), :class:`torchsample.LaBERLoss` and
:func:`torchsample.make_update`. Medians over many updates after a warm-up; ratios are against the
uniform-B update of the same model and mode, measured in the same run. On CUDA the times are
absolute (with the device name); on CPU quote the ratios.
"""
from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the agents live beside the library
from torchrl.objectives import HardUpdate, SoftUpdate

from agents import dqn, sac, td3  # noqa: E402
from agents.common import make_buffer, make_env, to_tensordict  # noqa: E402
from torchsample import LaBER, LaBERLoss, make_update  # noqa: E402

M = 4
MODELS = {
    # name: (agent module, config, env id, discrete)
    "dqn-cartpole": (dqn, dqn.Config(env_id="CartPole-v1", batch_size=64), True),
    "dqn-minatar": (dqn, dqn.Config(env_id="MinAtar/Breakout-v1", batch_size=32), True),
    "sac-halfcheetah": (sac, sac.Config(env_id="HalfCheetah-v5"), False),
    "td3-halfcheetah": (td3, td3.Config(env_id="HalfCheetah-v5"), False),
}
SAMPLERS = ["uniform", "large-batch", "per", "laber-mean"]


def fill(buffer, env, n: int, device) -> None:
    """``n`` transitions from random actions in the real env (rows as the agents store them)."""
    obs, _ = env.reset(seed=0)
    rows = []
    for _ in range(n):
        action = env.action_space.sample()
        next_obs, reward, terminated, truncated, _ = env.step(action)
        rows.append(to_tensordict(obs, action, reward, next_obs, terminated, truncated, device))
        obs = env.reset()[0] if terminated or truncated else next_obs
    buffer.extend(torch.stack(rows))


def build_update(model: str, sampler: str, compile: bool, device):
    agent, cfg, discrete = MODELS[model]
    if discrete:
        cfg = dqn.with_env_defaults(cfg)
        env = make_env(cfg.env_id, 0)
        loss_module, _ = dqn.build_dqn(cfg, env, device)
        target = HardUpdate(loss_module, value_network_update_interval=cfg.target_update)
    else:
        cfg = sac.with_env_defaults(cfg)
        env = make_env(cfg.env_id, 0)
        loss_module, _ = (sac.build_sac if agent is sac else td3.build_td3)(cfg, env, device)
        target = SoftUpdate(loss_module, tau=cfg.tau)
    buffer = make_buffer(sampler, buffer_size=100_000, batch_size=cfg.batch_size, m=M, device=device)
    fill(buffer, env, 5_000, device)
    laber = LaBER(loss_module, batch_size=cfg.batch_size) if sampler == "laber-mean" else None
    weighted = LaBERLoss(loss_module)

    def objective(data):
        if laber is not None:
            data = laber(data)
        losses = weighted(data)
        return sum(v for k, v in losses.items() if k.startswith("loss")), data

    optimizer = torch.optim.Adam(loss_module.parameters(), lr=torch.tensor(1e-4, device=device),
                                 capturable=device.type == "cuda")
    update = make_update(objective, optimizer, target, compile=compile)

    def one_update():
        _, data = update(buffer.sample())
        if sampler == "per":
            buffer.update_priority(data["index"], data["td_error"])

    return one_update


def interleaved_medians(fns: dict, iterations: int, warmup: int, device, chunk: int = 10) -> dict:
    """Median seconds per update of each function, timed in alternating chunks of ``chunk``
    updates so that drifts of the machine (other load, frequency) hit every sampler alike."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(max(iterations // chunk, 1)):
        for name, fn in fns.items():
            for _ in range(chunk):
                sync()
                start = time.perf_counter()
                fn()
                sync()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="DQN models eager + compiled DQN CartPole (default)")
    mode.add_argument("--full", action="store_true", help="every model x sampler, eager and compiled")
    parser.add_argument("--iterations", type=int, default=None, help="timed updates per case")
    parser.add_argument("--out", type=Path, default=None, help="CSV path")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(1)
    iterations = args.iterations or (1000 if args.full else 300)
    if args.full:
        cases = [(m, s, c) for m in MODELS for c in (False, True) for s in SAMPLERS]
    else:
        cases = [(m, s, False) for m in ("dqn-cartpole", "dqn-minatar") for s in SAMPLERS]
        cases += [("dqn-cartpole", s, True) for s in ("uniform", "laber-mean")]
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU, 1 thread"
    print(f"{where}, torch {torch.__version__}, median of {iterations} updates after warm-up, m = {M}\n")
    print("| model | mode | sampler | median (ms) | vs uniform B | vs PER | vs large batch |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    medians = {}
    groups = {}
    for model, sampler, compiled in cases:  # one group per model and mode, timed interleaved
        groups.setdefault((model, compiled), []).append(sampler)
    for (model, compiled), samplers in groups.items():
        torch._dynamo.reset()
        torch.manual_seed(0)
        fns = {s: build_update(model, s, compiled, device) for s in samplers}
        for s, t in interleaved_medians(fns, iterations, 30 if compiled else 20, device).items():
            medians[model, compiled, s] = t
    rows = []
    for model, sampler, compiled in cases:
        ms = medians[model, compiled, sampler] * 1e3
        ratio = {peer: medians[model, compiled, sampler] / medians[model, compiled, peer]
                 for peer in ("uniform", "per", "large-batch") if (model, compiled, peer) in medians}
        fmt = lambda peer: f"{ratio[peer]:.2f}" if peer in ratio else "-"  # noqa: E731
        print(f"| {model} | {'compiled' if compiled else 'eager'} | {sampler} | {ms:.2f} | {fmt('uniform')} | "
              f"{fmt('per')} | {fmt('large-batch')} |", flush=True)
        rows.append({"device": where, "model": model, "mode": "compiled" if compiled else "eager", "sampler": sampler,
                     "median_ms": ms, **{f"vs_{k}": v for k, v in ratio.items()}})
    if ("dqn-cartpole", True, "laber-mean") in medians:
        speedup = medians["dqn-cartpole", False, "laber-mean"] / medians["dqn-cartpole", True, "laber-mean"]
        print(f"\nCompiled LaBER-mean update vs eager (dqn-cartpole): {speedup:.2f}x faster")
    out = args.out or Path("perf/results") / f"update_{device.type}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    keys = ["device", "model", "mode", "sampler", "median_ms", "vs_uniform", "vs_per", "vs_large-batch"]
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in keys})
    print(f"CSV: {out}")


if __name__ == "__main__":
    main()
