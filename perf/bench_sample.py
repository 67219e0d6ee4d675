"""``rb.sample()`` through :class:`torchsample.LaBERSampler` against its floor (issue 28, item 3).

LaBER's sample draws ``m * B`` rows, scores them with the loss's networks and keeps ``B``. No sampler can
do that for less than its **floor**: the inner sampler's draw of ``m * B`` rows (with the gather from the
storage) plus one no-grad forward of the scoring networks on them, called as plain modules on tensors
(DQN: the Q-network on ``s`` and ``s'`` and the target network on ``s'``, Double DQN; SAC and TD3: the
(target) actor on ``s'``, the two target critics on ``(s', a')``, the two critics on ``(s, a)``). Peers,
timed interleaved in one sitting, one thread:

* ``floor``: that, eager; ``floor-compiled``: the same forward under ``torch.compile``;
* ``laber``: ``rb.sample()`` with ``LaBERSampler(LaBER(loss, B), m=4)``; ``laber-compiled``: with
  ``compile=True`` (scoring and draw in one compiled graph);
* ``functional-compiled``: the path inside :func:`torchsample.make_update`: a uniform buffer's sample of
  ``m * B`` rows, then the compiled ``laber(large)``.

The target (issue 28) is ``laber / floor <= 1.3`` in each mode (eager against eager, compiled against
compiled). Sizes: DQN on CartPole (4 observations, 2 actions, two hidden layers of 256, B = 64), SAC and
TD3 on HalfCheetah (17 observations, 6 actions, 256 x 256, B = 256), m = 4.

    python -m perf.bench_sample            # writes runs/perf/sample_cpu.csv (perf/results with UPDATE_RESULTS=1)
"""

from __future__ import annotations

import argparse
import copy

import torch
from tensordict import TensorDict
from tensordict.nn import NormalParamExtractor, TensorDictModule
from torch import nn
from torchrl.data import Bounded, LazyTensorStorage, TensorDictReplayBuffer
from torchrl.modules import MLP, Actor, ProbabilisticActor, QValueActor, TanhNormal, ValueOperator
from torchrl.objectives import DQNLoss, SACLoss, TD3Loss

from perf.common import RESULTS, environment, fmt, time_interleaved, write_csv
from torchsample import LaBER, LaBERSampler

M, HIDDEN = 4, [256, 256]
SIZES = {"dqn": (4, 2, 64), "sac": (17, 6, 256), "td3": (17, 6, 256)}  # observations, actions, B
TARGET = 1.3
COLUMNS = ["algo", "mode", "batch_size", "m", "floor_ms", "laber_ms", "ratio", "functional_ms", "functional_ratio"]


def transitions(algo: str, n: int) -> TensorDict:
    obs, act, _ = SIZES[algo]
    g = torch.Generator().manual_seed(0)
    action = torch.rand(n, act, generator=g) * 2 - 1 if algo != "dqn" else torch.randint(act, (n,), generator=g)
    done = torch.rand(n, 1, generator=g) < 0.02
    return TensorDict(
        {
            "observation": torch.randn(n, obs, generator=g),
            "action": action,
            ("next", "observation"): torch.randn(n, obs, generator=g),
            ("next", "reward"): torch.randn(n, 1, generator=g),
            ("next", "done"): done,
            ("next", "terminated"): done.clone(),
        },
        [n],
    )


def build(algo: str):
    """``(loss, floor_forward)``: the TorchRL loss, and the scoring networks' forward on plain tensors."""
    obs, act, _ = SIZES[algo]
    if algo == "dqn":
        q = MLP(in_features=obs, out_features=act, num_cells=HIDDEN, activation_class=nn.ReLU)
        loss = DQNLoss(
            QValueActor(q, in_keys=["observation"], action_space="categorical"),
            loss_function="smooth_l1",
            delay_value=True,
            double_dqn=True,
            action_space="categorical",
        )
        loss.make_value_estimator(gamma=0.99)
        target = copy.deepcopy(q)

        def forward(large):
            return q(large["observation"]), q(large["next", "observation"]), target(large["next", "observation"])

        return loss, forward
    spec = Bounded(-torch.ones(act), torch.ones(act), (act,))
    critic = MLP(in_features=obs + act, out_features=1, num_cells=HIDDEN, activation_class=nn.ReLU)
    qvalue = ValueOperator(critic, in_keys=["observation", "action"])
    if algo == "sac":
        net = nn.Sequential(
            MLP(in_features=obs, out_features=2 * act, num_cells=HIDDEN, activation_class=nn.ReLU),
            NormalParamExtractor(),
        )
        policy = ProbabilisticActor(
            TensorDictModule(net, in_keys=["observation"], out_keys=["loc", "scale"]),
            in_keys=["loc", "scale"],
            spec=spec,
            distribution_class=TanhNormal,
            return_log_prob=True,
        )
        loss = SACLoss(policy, qvalue, num_qvalue_nets=2, action_spec=spec)
        actor_net = net[0]
    else:
        actor_net = nn.Sequential(
            MLP(in_features=obs, out_features=act, num_cells=HIDDEN, activation_class=nn.ReLU), nn.Tanh()
        )
        loss = TD3Loss(Actor(actor_net, in_keys=["observation"], spec=spec), qvalue, action_spec=spec)
    loss.make_value_estimator(gamma=0.99)
    critics = [copy.deepcopy(critic) for _ in range(4)]  # two critics, two target critics: the same cost

    def forward(large):
        a_next = actor_net(large["next", "observation"])[..., :act].tanh()
        next_in = torch.cat([large["next", "observation"], a_next], -1)
        now_in = torch.cat([large["observation"], large["action"]], -1)
        return [c(next_in) for c in critics[:2]] + [c(now_in) for c in critics[2:]]

    return loss, forward


def measure(algo: str, samples: int, warmup: int) -> list[dict]:
    torch.manual_seed(0)
    loss, forward = build(algo)
    B = SIZES[algo][2]
    data = transitions(algo, 100_000)

    def buffer(sampler=None, batch_size=B):
        rb = TensorDictReplayBuffer(storage=LazyTensorStorage(100_000), batch_size=batch_size, sampler=sampler)
        rb.extend(data)
        return rb

    uniform_large = buffer(batch_size=M * B)
    laber_rb = buffer(LaBERSampler(LaBER(loss, B), m=M))
    compiled_rb = buffer(LaBERSampler(LaBER(loss, B), m=M, compile=True))
    functional = torch.compile(LaBER(loss, B), dynamic=False)
    forward_compiled = torch.compile(forward, dynamic=False)

    @torch.no_grad()
    def floor(fn):
        return lambda: fn(uniform_large.sample())

    fns = {
        "floor": floor(forward),
        "floor-compiled": floor(forward_compiled),
        "laber": laber_rb.sample,
        "laber-compiled": compiled_rb.sample,
        "functional-compiled": lambda: functional(uniform_large.sample()),
    }
    t = time_interleaved(fns, samples=samples, warmup=warmup, device="cpu", progress=algo)
    ms = {k: v.median * 1e3 for k, v in t.items()}
    return [
        dict(algo=algo, mode="eager", batch_size=B, m=M, floor_ms=ms["floor"], laber_ms=ms["laber"]),
        dict(
            algo=algo,
            mode="compiled",
            batch_size=B,
            m=M,
            floor_ms=ms["floor-compiled"],
            laber_ms=ms["laber-compiled"],
            functional_ms=ms["functional-compiled"],
            functional_ratio=ms["functional-compiled"] / ms["floor-compiled"],
        ),
    ]


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algos", nargs="+", default=list(SIZES))
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for algo in args.algos:
        rows += measure(algo, args.samples, args.warmup)
        for row in rows:
            row["ratio"] = row["laber_ms"] / row["floor_ms"]
        path = write_csv(RESULTS / "sample_cpu.csv", rows, COLUMNS, environment("cpu"))
    print(f"rb.sample() against its floor (target <= {TARGET}x), median ms, one thread:")
    for r in rows:
        extra = (
            f", functional {fmt(r['functional_ms'], 3)} ({fmt(r['functional_ratio'], 2)}x)"
            if "functional_ms" in r
            else ""
        )
        print(
            f"  {r['algo']:4s} {r['mode']:8s} floor {fmt(r['floor_ms'], 3)}  laber {fmt(r['laber_ms'], 3)}"
            f"  ({fmt(r['ratio'], 2)}x){extra}"
        )
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
