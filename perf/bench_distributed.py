"""The distributed learner (agents/distributed.py): updates/s and bytes moved per update, by where the buffer
lives and how it is sampled, with 1 and 2 collector actors writing while the learner trains.

    python -m perf.bench_distributed                       # about 2 minutes on 2 cores
    python -m perf.bench_distributed --seconds 1 --repeats 20

Setups, each the agent's learner (DQN, CartPole MLP 256x256, B = 64, Adam, soft target) on one CPU thread:

* ``laber-mean / ray``: ``m * B`` rows drawn uniformly from TorchRL's ``RayReplayBuffer`` (an actor), LaBER
  here; 8 draws per call and the next call in flight while the updates compute (``Learner(prefetch=True)``);
* ``laber-mean / local``: the same learner, the buffer a ``TensorDictReplayBuffer`` in the learner's process
  (the reference: the collectors' chunks come back to the learner, which writes them);
* ``per / ray``: TorchRL's ``PrioritizedSampler`` in the buffer actor, ``B`` rows per call and an
  ``update_priority`` call per update, each a blocking round trip (the baseline);
* ``per / local``: PER with the buffer in the learner's process (PER without the network).

The collectors are the agent's ``EnvCollector`` actors, paced as the agent paces them (at most ``max_lead``
steps ahead of a 0.5 replay ratio). Each setup is timed for ``--seconds`` after 3 warm-up updates, the setups
interleaved, ``--repeats`` rounds; the table gives the median. Bytes are the pickled size (protocol 5) of
what crosses to or from the buffer actor per update: the sampled TensorDict (rows, ``"index"``, PER's
weights), PER's ``(index, priority)`` payload; Ray adds a task header of its own to each call. ``ingest`` is
what the collectors send per update (to the buffer actor, or to the learner with a local buffer). Timed on
CPU: quote the ratios (``vs_local``: against the local buffer with the same sampler, m and collectors).
"""

from __future__ import annotations

import argparse
import pickle
import platform
import statistics
import time
import warnings
from dataclasses import replace
from pathlib import Path

import ray
import tensordict
import torch
import torchrl

from agents import distributed
from perf.common import RESULTS, environment, write_csv

COLUMNS = [
    "ray",
    "sampler",
    "buffer",
    "m",
    "collectors",
    "batch_size",
    "updates_per_s",
    "vs_local",
    "runs",
    "from_buffer_bytes_per_update",
    "to_buffer_bytes_per_update",
    "ingest_bytes_per_update",
    "prefetch",
]


def nbytes(obj) -> int:
    return len(pickle.dumps(obj, protocol=5))


class Setup:
    """One buffer and its learner; :meth:`run` trains for a window while the collectors write."""

    def __init__(self, cfg: distributed.Config, remote: bool, prefill: int, collectors: list) -> None:
        self.cfg, self.remote = cfg, remote
        self.replay = distributed.make_replay(cfg, remote=remote)
        self.client = self.replay.client() if remote else None  # local: the chunks come back here
        weights = distributed.q_network(4, 2, cfg.hidden).state_dict()
        for rows, _ in ray.get(
            [actor.collect.remote(weights, 1.0, prefill // len(collectors), self.client) for actor in collectors]
        ):
            self._write(rows)
        self.learner = distributed.Learner(
            cfg, 4, 2, self.replay, device=torch.device("cpu"), prefetch=remote and cfg.sampler != "per"
        )
        for _ in range(10):  # warm-up
            batch = self.learner.step()
        # One call returns draws_per_call draws: the bytes per update are one draw's.
        self.from_buffer = nbytes(self.replay.sample(self.learner.draw_size)) if remote else 0
        per = remote and cfg.sampler == "per"
        self.to_buffer = nbytes((batch["index"], batch["td_error"].detach())) if per else 0
        self.paced = {}  # collectors -> [steps launched, updates]: the agent's pacing, across windows

    def _write(self, rows) -> None:
        if not self.remote:  # the collector returned its rows (a Ray buffer: their count)
            self.replay.extend(rows)

    def run(self, collectors: list, seconds: float) -> float:
        """Updates/s over ``seconds``, the collectors kept ``max_lead`` steps ahead of a 0.5 replay ratio."""
        cfg = self.cfg
        weights = ray.put(self.learner.weights())
        launched, updates = self.paced.setdefault(len(collectors), [0, 0])
        pending, idle, done = {}, list(collectors), 0
        for _ in range(3):  # warm-up
            self.learner.step()
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0) if pending else ([], [])
            for ref in ready:
                idle.append(pending.pop(ref))
                self._write(ray.get(ref)[0])
            while idle and launched < (updates + done) / cfg.updates_per_step + cfg.max_lead:
                actor = idle.pop(0)
                pending[actor.collect.remote(weights, 0.1, cfg.chunk, self.client)] = actor
                launched += cfg.chunk
            self.learner.step()
            done += 1
        elapsed = time.perf_counter() - start
        for rows, _ in ray.get(list(pending)):  # the collectors finish their chunk
            self._write(rows)
        self.paced[len(collectors)] = [launched, updates + done]
        return done / elapsed

    def close(self) -> None:
        self.learner.close()
        if self.remote:
            self.replay.close()


def versions() -> dict:
    return dict(
        device=f"CPU ({platform.processor() or platform.machine()}), 1 learner thread",
        torch=torch.__version__,
        torchrl=torchrl.__version__,
        tensordict=tensordict.__version__,
        ray=ray.__version__,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--collectors", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seconds", type=float, default=0.5, help="timed window per setup and round")
    parser.add_argument("--repeats", type=int, default=10, help="rounds; the table gives the median")
    parser.add_argument("--prefill", type=int, default=4096, help="transitions in each buffer before timing")
    parser.add_argument("--out", type=Path, default=RESULTS / "distributed_cpu.csv")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    torch.set_num_threads(1)
    base = distributed.Config(collectors=max(args.collectors), collector_cpus=1.0, max_lead=256)
    rows = []
    with distributed.ray_cluster(None, num_cpus=2):
        collectors = distributed.start_collectors(base)
        setups = {}
        try:
            for m in args.m:
                for where in ("ray", "local"):
                    setups["laber-mean", where, m] = Setup(
                        replace(base, sampler="laber-mean", m=m), where == "ray", args.prefill, collectors
                    )
            for where in ("ray", "local"):
                setups["per", where, ""] = Setup(replace(base, sampler="per"), where == "ray", args.prefill, collectors)
            # What the collectors send per update at the agent's replay ratio (the same for every setup).
            chunk, _ = ray.get(
                collectors[0].collect.remote(distributed.q_network(4, 2, base.hidden).state_dict(), 0.1, base.chunk)
            )
            ingest = nbytes(chunk) / base.chunk / base.updates_per_step
            runs = {(key, n): [] for n in args.collectors for key in setups}
            for round_ in range(args.repeats):
                for key, n in runs:
                    runs[key, n].append(setups[key].run(collectors[:n], args.seconds))
                print(f"round {round_ + 1}/{args.repeats}", end="\r", flush=True)
            for ((sampler, where, m), n), rates in runs.items():
                setup = setups[sampler, where, m]
                rows.append(
                    dict(
                        **versions(),
                        sampler=sampler,
                        buffer=where,
                        m=m,
                        collectors=n,
                        batch_size=base.batch_size,
                        updates_per_s=statistics.median(rates),
                        runs=" ".join(f"{r:.0f}" for r in rates),
                        from_buffer_bytes_per_update=setup.from_buffer,
                        to_buffer_bytes_per_update=setup.to_buffer,
                        ingest_bytes_per_update=round(ingest),
                        prefetch=setup.learner.prefetch,
                    )
                )
        finally:
            for setup in setups.values():
                setup.close()
            for actor in collectors:
                ray.kill(actor)
    local = {(r["sampler"], r["m"], r["collectors"]): r["updates_per_s"] for r in rows if r["buffer"] == "local"}
    for r in rows:
        r["vs_local"] = r["updates_per_s"] / local[r["sampler"], r["m"], r["collectors"]]
    report(rows, args.out)


def report(rows: list[dict], out: Path) -> None:
    print(f"\n{rows[0]['device']}; torch {rows[0]['torch']}, torchrl {rows[0]['torchrl']}, ray {rows[0]['ray']}\n")
    print(
        "| sampler | buffer | m | collectors | updates/s | vs local | bytes from buffer / update "
        "| bytes to buffer / update | ingest bytes / update |"
    )
    print("| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in sorted(rows, key=lambda r: (r["collectors"], r["sampler"] == "per", str(r["m"]), r["buffer"])):
        print(
            f"| {r['sampler']} | {r['buffer']} | {r['m']} | {r['collectors']} | {r['updates_per_s']:.1f} "
            f"| {r['vs_local']:.2f} | {r['from_buffer_bytes_per_update']} | {r['to_buffer_bytes_per_update']} "
            f"| {r['ingest_bytes_per_update']} |"
        )
    by = {(r["sampler"], r["buffer"], r["m"], r["collectors"]): r["updates_per_s"] for r in rows}
    for n in sorted({r["collectors"] for r in rows}):
        laber = by.get(("laber-mean", "ray", 4, n))
        if laber:
            print(
                f"\n{n} collector(s): LaBER-mean m=4 over Ray {laber / by['laber-mean', 'local', 4, n]:.2f}x the "
                f"local buffer; PER over Ray {by['per', 'ray', '', n] / laber:.2f}x LaBER over Ray's updates/s"
            )
    print(f"\nwrote {write_csv(out, rows, COLUMNS, environment('cpu'))}")


if __name__ == "__main__":
    main()
