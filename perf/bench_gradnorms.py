"""Cost of the sharper surrogates (torchsample.gradnorms) on CPU, one thread, against their peers in the
same run.

* ``last-layer`` (forward + ``||g|| sqrt(||h||^2 + 1)``) against ``output`` (forward + ``|q - y|``):
  the scoring of the large batch alone (both without a graph), and a whole LaBER update (target
  forward, scoring, down-sample of B = N / 4 rows, weighted forward + backward on them, Adam step);
  target <= 1.1x per update.
* ``exact`` by ghost norms against a plain forward + backward of the large batch (target <= 3x) and
  against ``torch.func.vmap(torch.func.grad(...))`` (target >= 5x faster).
* The library's own LaBER update at each rung, ``LaBER(loss, B, surrogate=...)`` then
  :class:`torchsample.LaBERLoss`, backward and an Adam step, on TorchRL's ``DQNLoss`` (the MinAtar
  network) and ``TD3Loss`` (MuJoCo-sized actor and twin critics): ``last-layer`` / ``output``
  (target <= 1.1x) and ``exact`` / ``output`` (exact-gradient LaBER's price).

On the MinAtar network (Conv2d(4->16, 3x3) + Linear(1024->128) + Linear(128->A)) and a MuJoCo-sized
critic (17 + 6 -> 256 -> 256 -> 1), large batches of 4*32 and 4*256 rows. Medians of per-call times
after a warm-up (perf/common.py's interleaved timer and CSV writer).

    python -m perf.bench_gradnorms [--quick]  # runs/perf/gradnorms_cpu{,_laber}.csv (UPDATE_RESULTS=1: perf/results/)
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call

from agents.networks import MinAtarNetwork
from perf.common import RESULTS, describe, environment, repeat, time_interleaved, write_csv
from torchsample import SURROGATES, LaBER, LaBERLoss
from torchsample.gradnorms import capture_last_layer_input, exact_grad_norms
from torchsample.surrogates import critic_priorities

ACTIONS = 6


def mujoco_critic() -> nn.Module:
    return nn.Sequential(nn.Linear(17 + 6, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 1))


def make_case(name: str, n: int, generator: torch.Generator):
    """``(net, x, action, target)``; ``action`` is None for the critic (one output)."""
    if name == "minatar":
        x = torch.rand(n, 10, 10, 4, generator=generator) < 0.2  # MinAtar's layout: [N, 10, 10, C] booleans
        action = torch.randint(ACTIONS, (n,), generator=generator)
        return MinAtarNetwork(4, ACTIONS), x, action, torch.randn(n, generator=generator)
    return mujoco_critic(), torch.randn(n, 23, generator=generator), None, torch.randn(n, generator=generator)


def predict(net: nn.Module, x: torch.Tensor, action) -> torch.Tensor:
    out = net(x)
    return out.squeeze(-1) if action is None else out.gather(-1, action.unsqueeze(-1)).squeeze(-1)


def make_update(net: nn.Module, x: torch.Tensor, action, y: torch.Tensor, scoring: str):
    """One LaBER-mean update on the large batch ``x`` (``N = 4 B``) of a plain-torch Q-network or critic:
    a target network's forward on the next states (here ``x`` again: the cost is what counts), the
    scoring, ``B`` draws with weights ``mean(p) / p_i``, the weighted squared TD loss, an Adam step."""
    target_net = copy.deepcopy(net).requires_grad_(False)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
    batch_size = x.shape[0] // 4

    def update():
        with torch.no_grad():
            next_q = target_net(x)
            target = y + 0.99 * (next_q.squeeze(-1) if action is None else next_q.amax(-1))
            if scoring == "output":
                priority = critic_priorities(predict(net, x, action), target)
            else:
                with capture_last_layer_input(net) as cap:
                    q = predict(net, x, action)
                priority = critic_priorities(q, target, features=cap.features)
            priority += 1e-6
            index = torch.multinomial(priority, batch_size, replacement=True)
            weight = priority.mean() / priority[index]
        rows_action = None if action is None else action[index]
        loss = (weight * (predict(net, x[index], rows_action) - target[index]) ** 2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return update


def ratio(times: dict, a: str, b: str) -> float:
    """``median(a) / median(b)``, both timed in the same interleaved run."""
    return times[a].median / times[b].median


def bench(name: str, n: int, quick: bool) -> dict:
    torch.manual_seed(0)
    net, x, action, y = make_case(name, n, torch.Generator().manual_seed(0))
    params = dict(net.named_parameters())

    def per_sample_loss(p, x, *rest):
        *action, y = rest
        q = functional_call(net, p, (x,))
        q = q.squeeze(-1) if not action else q.gather(-1, action[0].unsqueeze(-1)).squeeze(-1)
        return (q - y) ** 2

    inputs = (x, y) if action is None else (x, action, y)

    @torch.no_grad()
    def output():
        return critic_priorities(predict(net, x, action), y)

    @torch.no_grad()
    def last_layer():
        with capture_last_layer_input(net) as cap:
            q = predict(net, x, action)
        return critic_priorities(q, y, features=cap.features)

    def forward_backward():
        net.zero_grad(set_to_none=True)
        ((predict(net, x, action) - y) ** 2).mean().backward()

    def ghost():
        return exact_grad_norms(net, per_sample_loss, params, *inputs, method="ghost")

    def vmap_grad():
        return exact_grad_norms(net, per_sample_loss, params, *inputs, method="vmap")

    torch.testing.assert_close(ghost(), vmap_grad(), rtol=1e-3, atol=1e-5)  # the same numbers
    fast = {
        "output": output,
        "last_layer": last_layer,
        "update_output": make_update(net, x, action, y, "output"),
        "update_last_layer": make_update(net, x, action, y, "last-layer"),
        "fwd_bwd": forward_backward,
        "ghost": ghost,
    }
    number = 3 if quick else 10
    times = time_interleaved(
        {key: repeat(fn, number) for key, fn in fast.items()},
        samples=5 if quick else 31,
        warmup=1,
        device="cpu",
        progress=f"{name} N={n}",
    )
    slow = time_interleaved({"ghost": ghost, "vmap_grad": vmap_grad}, samples=3 if quick else 9, warmup=1, device="cpu")
    row = {"net": name, "N": n}
    row.update({f"{key}_ms": t.median * 1e3 for key, t in times.items()})
    row["vmap_grad_ms"] = slow["vmap_grad"].median * 1e3
    row["last_layer/output"] = ratio(times, "last_layer", "output")
    row["update: last_layer/output"] = ratio(times, "update_last_layer", "update_output")
    row["ghost/fwd_bwd"] = ratio(times, "ghost", "fwd_bwd")
    row["vmap_grad/ghost"] = ratio(slow, "vmap_grad", "ghost")
    return row


def torchrl_case(name: str, n: int, generator: torch.Generator):
    """``(loss, large)``: TorchRL's DQNLoss on the MinAtar network, or TD3Loss with MuJoCo-sized
    networks (HalfCheetah: 17 observations, 6 actions), and a large batch of ``n`` random transitions."""
    from tensordict import TensorDict
    from torchrl.data import Bounded
    from torchrl.modules import MLP, Actor, QValueActor, ValueOperator
    from torchrl.objectives import DQNLoss, TD3Loss

    terminated = torch.rand(n, 1, generator=generator) < 0.05
    rows = {
        ("next", "reward"): torch.randn(n, 1, generator=generator),
        ("next", "done"): terminated.clone(),
        ("next", "terminated"): terminated,
    }
    if name == "minatar":
        obs = lambda: torch.rand(n, 10, 10, 4, generator=generator) < 0.2  # noqa: E731
        actor = QValueActor(MinAtarNetwork(4, ACTIONS), in_keys=["observation"], action_space="categorical")
        loss = DQNLoss(actor, loss_function="l2", delay_value=True, action_space="categorical")
        rows["action"] = torch.randint(ACTIONS, (n,), generator=generator)
    else:
        obs = lambda: torch.randn(n, 17, generator=generator)  # noqa: E731
        spec = Bounded(-torch.ones(6), torch.ones(6), (6,))
        actor = Actor(
            nn.Sequential(nn.Linear(17, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 6), nn.Tanh()),
            in_keys=["observation"],
            spec=spec,
        )
        critic = MLP(in_features=17 + 6, out_features=1, num_cells=[256, 256])  # mujoco_critic's, on (s, a)
        loss = TD3Loss(actor, ValueOperator(critic, in_keys=["observation", "action"]), action_spec=spec)
        rows["action"] = torch.rand(n, 6, generator=generator) * 2 - 1
    loss.make_value_estimator(gamma=0.99)
    rows["observation"], rows[("next", "observation")] = obs(), obs()
    return loss, TensorDict(rows, [n])


def bench_laber(name: str, n: int, quick: bool) -> dict:
    """One LaBER update per rung through the library: selection of B = N / 4 rows, LaBERLoss on them,
    backward, Adam step; interleaved, each rung on its own copy of the loss."""
    torch.manual_seed(0)
    updates = {}
    for rung in SURROGATES:
        loss, large = torchrl_case(name, n, torch.Generator().manual_seed(0))
        laber, objective = LaBER(loss, n // 4, surrogate=rung), LaBERLoss(loss)
        optimizer = torch.optim.Adam(loss.parameters(), lr=1e-4)

        def update(laber=laber, objective=objective, optimizer=optimizer, large=large):
            losses = objective(laber(large))
            optimizer.zero_grad(set_to_none=True)
            sum(v for k, v in losses.items() if k.startswith("loss")).backward()
            optimizer.step()

        updates[rung] = update
    times = time_interleaved(
        {rung: repeat(fn, 2 if quick else 5) for rung, fn in updates.items()},
        samples=5 if quick else 21,
        warmup=1,
        device="cpu",
        progress=f"LaBER {name} N={n}",
    )
    row = {"loss": "DQNLoss (MinAtar)" if name == "minatar" else "TD3Loss (MuJoCo)", "N": n}
    row.update({f"{rung}_ms": times[rung].median * 1e3 for rung in SURROGATES})
    row["last-layer/output"] = ratio(times, "last-layer", "output")
    row["exact/output"] = ratio(times, "exact", "output")
    return row


def print_table(rows: list[dict], columns: list[str]) -> None:
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(f"{row[c]:.3g}" if isinstance(row[c], float) else str(row[c]) for c in columns) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: the figures we report)")
    parser.add_argument("--out", type=Path, default=RESULTS / "gradnorms_cpu.csv", help="CSV path")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = [bench(name, n, args.quick) for name in ("minatar", "mujoco-critic") for n in (4 * 32, 4 * 256)]
    laber_rows = [bench_laber(name, n, args.quick) for name in ("minatar", "mujoco") for n in (4 * 32, 4 * 256)]
    env = environment("cpu")
    print(describe(env))
    columns = [
        "net",
        "N",
        "output_ms",
        "last_layer_ms",
        "last_layer/output",
        "update_output_ms",
        "update_last_layer_ms",
        "update: last_layer/output",
        "fwd_bwd_ms",
        "ghost_ms",
        "ghost/fwd_bwd",
        "vmap_grad_ms",
        "vmap_grad/ghost",
    ]
    print_table(rows, columns)
    print("# targets: update: last_layer/output <= 1.1, ghost/fwd_bwd <= 3, vmap_grad/ghost >= 5")
    print(f"CSV: {write_csv(args.out, rows, columns, env)}")
    laber_columns = ["loss", "N", *(f"{rung}_ms" for rung in SURROGATES), "last-layer/output", "exact/output"]
    print_table(laber_rows, laber_columns)
    print("# LaBER's update through the library; target: last-layer/output <= 1.1")
    laber_out = args.out.with_name(f"{args.out.stem}_laber{args.out.suffix}")
    print(f"CSV: {write_csv(laber_out, laber_rows, laber_columns, env)}")


if __name__ == "__main__":
    main()
