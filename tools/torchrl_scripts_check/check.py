"""TorchRL's own DQN, SAC and TD3 scripts, as shipped and with README's LaBER swap: docs/results/torchrl-scripts.md.

    python tools/torchrl_scripts_check/check.py --rl PATH/TO/pytorch-rl [--commit REV] [--scripts dqn sac td3]

``--rl`` is a checkout of pytorch/rl (a work tree, or a bare git directory with ``--commit``, default
``HEAD``). ``sota-implementations/{dqn,sac,td3}`` are copied into a temporary folder; a second copy gets
the swap (``swap.py``: edits applied at run time, nothing of TorchRL's is kept in this project). Each
script then runs as shipped (prefetch, compile code paths, networks, batch sizes) with a short budget
(hydra overrides: fewer frames, one environment, CPU, no logger, no evaluation), eager and with
``compile.compile=true``, without and with the swap, one after the other in the same sitting.
Updates/s is TorchRL's own timers in the script, ``rb.sample()`` plus the update: one over the median per
update, over the second half of the updates (the first half is warm-up: compilation, the prefetch queue
filling). ``--report-only`` rewrites the page from the runs' JSON and logs in ``--logs`` without running.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
from swap import SCRIPTS, SwapError, changed_lines, swap_tree  # noqa: E402

FOLDERS = ["dqn", "sac", "td3"]
# Short budgets; everything else as the script's config.yaml ships it.
ENTRY = {"dqn": "dqn/dqn_cartpole.py", "sac": "sac/sac.py", "td3": "td3/td3.py"}
COMMON_CONTINUOUS = [
    "collector.total_frames=1200",
    "collector.init_random_frames=400",
    "collector.frames_per_batch=200",  # utd_ratio 1: 200 updates a batch, 1000 in all
    "collector.env_per_collector=1",
    "collector.device=cpu",
    "network.device=cpu",
    "logger.backend=",
    "logger.eval_iter=100000000",
]
OVERRIDES = {
    "dqn": [
        "device=cpu",
        "logger.backend=",
        "collector.total_frames=4000",
        "collector.init_random_frames=1000",  # 100 updates per 1000 frames: 300 in all
        "logger.test_interval=100000000",
    ],
    "sac": COMMON_CONTINUOUS,
    "td3": COMMON_CONTINUOUS,
}
MODES = {
    "eager": ["compile.compile=false"],
    "compiled": ["compile.compile=true"],
    # The scripts' prioritized buffer (replay_buffer.prb=1), SAC and TD3 only: PER-LaBER after the swap.
    "prb": ["compile.compile=false", "replay_buffer.prb=1"],
}
LABELS = {"eager": "eager", "compiled": "compiled", "prb": "eager, `replay_buffer.prb=1`"}
HAS_PRB = {"sac", "td3"}


def materialise(rl: Path, commit: str, into: Path) -> str:
    """Copy sota-implementations/{dqn,sac,td3} of the checkout into ``into``; returns the commit's short hash."""
    paths = [f"sota-implementations/{f}" for f in FOLDERS]
    if (rl / "sota-implementations").is_dir():
        for p in paths:
            shutil.copytree(rl / p, into / p)
        rev = subprocess.run(["git", "-C", str(rl), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        return rev.stdout.strip() or "(not a git work tree)"
    git = ["git", f"--git-dir={rl}"]
    archive = subprocess.run([*git, "archive", commit, *paths], capture_output=True, check=True).stdout
    tarfile.open(fileobj=BytesIO(archive)).extractall(into, filter="data")
    return subprocess.run(
        [*git, "rev-parse", "--short", commit], capture_output=True, text=True, check=True
    ).stdout.strip()


def run(entry: Path, overrides: list[str], out: Path, timeout: int) -> dict:
    """One script run in a fresh process (its own hydra folder); the runner's JSON plus the log's tail."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HYDRA_FULL_ERROR="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, str(HERE / "runner.py"), str(entry), str(out.with_suffix(".json"))]
    cmd += [*overrides, f"hydra.run.dir={out.parent / ('hydra-' + out.name)}"]
    with open(out.with_suffix(".log"), "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            return {"ok": False, "error": f"timed out after {timeout} s", "sample_s": [], "update_s": []}
    return load(out, proc.returncode)


def load(out: Path, returncode: Optional[int] = None) -> dict:
    """A finished run's result (runner's JSON) and torch.compile's give-ups from its log."""
    try:
        result = json.loads(out.with_suffix(".json").read_text())
        result["notes"] = dynamo_warnings(out.with_suffix(".log").read_text())
        return result
    except FileNotFoundError:
        log = out.with_suffix(".log")
        tail = log.read_text()[-3000:] if log.exists() else "(no log: not run)"
        return {
            "ok": False,
            "error": f"exit {returncode}, no result; log tail:\n{tail}",
            "sample_s": [],
            "update_s": [],
        }


def dynamo_warnings(log: str) -> list[str]:
    """torch.compile's give-ups in a run's log: a function that hit the recompile limit runs eagerly from then on."""
    notes, lines = [], log.splitlines()
    for i, line in enumerate(lines):
        if "hit config.recompile_limit" in line:
            block = [line[line.index("torch._dynamo hit") :]]  # after any progress bar on the same line
            block += [re.sub(r"^[WE]\d{4} .*?\] \[[^\]]*\]\s*", "", x).strip() for x in lines[i + 1 : i + 3]]
            notes.append(short_paths("; ".join(block)))
    return notes


def updates_per_s(result: dict) -> tuple[float, int]:
    """(updates/s, updates timed): one over the median of sample + update time over the second half of the
    updates (the median, as the machine may be shared: a stall elsewhere does not move it)."""
    sample, update = result["sample_s"], result["update_s"]
    n = min(len(sample), len(update))
    if n < 2:
        return float("nan"), 0
    return 1.0 / statistics.median(sample[i] + update[i] for i in range(n // 2, n)), n - n // 2


def short_paths(text: str) -> str:
    """Paths relative to the temporary copy, site-packages or this project."""
    text = re.sub(r"[^\s\"(]*/sota-implementations/", "", text)
    text = text.replace(sysconfig.get_paths()["purelib"] + "/", "").replace(str(ROOT) + "/", "")
    return text


def head(error: str, lines: int = 12) -> str:
    """The traceback's last frames and message: where it broke and why."""
    text = error.strip().splitlines()
    return short_paths("\n".join(text[-lines:]))


def versions() -> str:
    import tensordict
    import torch
    import torchrl

    return f"torch {torch.__version__}, torchrl {torchrl.__version__}, tensordict {tensordict.__version__}"


def torchsample_commit() -> str:
    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "torchsample"], capture_output=True, text=True
    )
    return rev.stdout.strip() + (" with uncommitted changes under torchsample/" if dirty.stdout.strip() else "")


def works(result: dict) -> str:
    return ("yes" if not result.get("notes") else "yes, compile gave up") if result["ok"] else "**no**"


def fmt(x: float) -> str:
    return "-" if x != x else f"{x:.0f}" if x >= 100 else f"{x:.1f}"


def report(rows: list[dict], diffs: dict, meta: dict) -> str:
    out = [
        "# TorchRL's DQN, SAC and TD3 scripts with LaBER swapped in",
        "",
        f"- **Command**: `{meta['command']}`",
        f"- **Measured**: {meta['date']}, torchsample {meta['torchsample']}, {meta['versions']}; TorchRL's "
        f"`sota-implementations/` at pytorch/rl {meta['rl']}; one CPU thread (`OMP_NUM_THREADS=1`), "
        f"{meta['machine']}.",
        "- **What runs**: each script as shipped, then with README's swap "
        "([Porting a TorchRL script](../../README.md#porting-a-torchrl-script); the diffs below, applied at run time "
        "by `tools/torchrl_scripts_check/swap.py`), eager and with `compile.compile=true` (SAC and TD3 also eager with "
        "`replay_buffer.prb=1`, PER-LaBER after the swap), one after the other. "
        "Prefetch as shipped: SAC `prefetch=3` in both modes, TD3 `prefetch=3` eager and 0 compiled (its "
        "`make_replay_buffer` turns it off under compile), DQN none. Short budgets: "
        + "; ".join(f"{s.upper()} `{' '.join(OVERRIDES[s])}`" for s in meta["scripts"])
        + ".",
        '- **Updates/s**: TorchRL\'s own `timeit` blocks in the script, `rb.sample()` (`"rb - sample"`) plus the '
        'update (`"update"`): one over the median per update, over the second half of the updates (the first is '
        "warm-up: compilation, the prefetch queue). Uniform is the script as shipped (TorchRL's `RandomSampler`).",
        "",
        "| script | lines changed by the swap | mode | works as shipped | works with LaBER | uniform updates/s "
        "| LaBER updates/s | LaBER / uniform |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        ratio = "-" if r["ratio"] != r["ratio"] else f"{r['ratio']:.2f}"
        out.append(
            f"| {r['script']} | {r['lines']} | {r['mode']} | {r['uniform_ok']} | {r['laber_ok']} | {fmt(r['uniform'])} "
            f"| {fmt(r['laber'])} | {ratio} |"
        )
    noted = [r for r in rows if r["notes"]]
    if noted:
        out += ["", "## torch.compile gave up", ""]
        if any("_composite_lp_aggregate" in n or "_interaction_type" in n for r in noted for _, n in r["notes"]):
            out += [
                "A guard on tensordict's process-wide modes (`set_composite_lp_aggregate`, `set_interaction_type` / "
                "`set_exploration_type`: one value for all threads, not thread-local) kept failing: the loss's "
                "target computation enters those context managers while LaBER scores a batch in a prefetch thread, "
                "so the main thread's compiled update sees them change and recompiles until the limit, then runs "
                "eagerly. The same modes are read by the collector's policy and the evaluation rollout.",
                "",
            ]
        for r in noted:
            for which, note in r["notes"]:
                out += [f"- **{r['script']}, {r['mode']}, {which}**: `{note}`"]
    errors = [r for r in rows if r["errors"]]
    if errors:
        out += ["", "## What broke", ""]
        for r in errors:
            for which, err in r["errors"]:
                out += [f"**{r['script']}, {r['mode']}, {which}**:", "", "```", head(err), "```", ""]
    out += ["", "## The swap, as applied", ""]
    for files in diffs.values():
        for name, text in files.items():
            out += [f"`{name}`:", "", "```diff", text.rstrip("\n"), "```", ""]
    return "\n".join(out).rstrip("\n") + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rl", required=True, type=Path, help="pytorch/rl: a work tree or a bare git directory")
    parser.add_argument("--commit", default="HEAD", help="the commit to take from a git directory")
    parser.add_argument("--scripts", nargs="+", default=list(SCRIPTS), choices=list(SCRIPTS))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--out", type=Path, default=ROOT / "docs/results/torchrl-scripts.md")
    parser.add_argument("--logs", type=Path, default=ROOT / "runs/torchrl-scripts", help="each run's log and JSON")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per run")
    parser.add_argument("--report-only", action="store_true", help="write the page from --logs, run nothing")
    parser.add_argument("--machine", default="a 2-core VM", help="said in the results page")
    args = parser.parse_args()

    args.logs.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="torchrl-scripts-"))
    try:
        rl = materialise(args.rl.resolve(), args.commit, work / "shipped")
        shutil.copytree(work / "shipped", work / "laber")
        rows, diffs = [], {}
        for script in args.scripts:
            swap_error = None
            try:
                diffs[script] = swap_tree(work / "laber/sota-implementations", script)
            except SwapError as e:
                swap_error = str(e)
            added = removed = 0
            for name in SCRIPTS[script]:
                a, r = changed_lines(
                    (work / "shipped/sota-implementations" / name).read_text(),
                    (work / "laber/sota-implementations" / name).read_text(),
                )
                added, removed = added + a, removed + r
            lines = f"+{added} -{removed} ({', '.join(Path(n).name for n in SCRIPTS[script])})"
            for mode in args.modes:
                if mode == "prb" and script not in HAS_PRB:
                    continue
                results = {}
                for variant in ("shipped", "laber"):
                    if variant == "laber" and swap_error:
                        results[variant] = {"ok": False, "error": swap_error, "sample_s": [], "update_s": []}
                        continue
                    entry = work / variant / "sota-implementations" / ENTRY[script]
                    tag = f"{script}-{mode}-{variant}"
                    print(f"{'loading' if args.report_only else 'running'} {tag} ...", flush=True)
                    if args.report_only:
                        results[variant] = load(args.logs / tag)
                    else:
                        results[variant] = run(entry, OVERRIDES[script] + MODES[mode], args.logs / tag, args.timeout)
                    ups, n = updates_per_s(results[variant])
                    print(f"  ok={results[variant]['ok']} updates/s={ups:.1f} over {n}", flush=True)
                uniform, laber = (updates_per_s(results[v])[0] for v in ("shipped", "laber"))
                rows.append(
                    {
                        "script": ENTRY[script],
                        "lines": lines,
                        "mode": LABELS[mode],
                        "uniform_ok": works(results["shipped"]),
                        "laber_ok": works(results["laber"]),
                        "uniform": uniform,
                        "laber": laber,
                        "ratio": laber / uniform,
                        "errors": [(v, results[v]["error"]) for v in ("shipped", "laber") if not results[v]["ok"]],
                        "notes": [(v, n) for v in ("shipped", "laber") for n in results[v].get("notes", [])],
                    }
                )
        command = "python tools/torchrl_scripts_check/check.py --rl PATH/TO/pytorch-rl"
        if not (args.rl / "sota-implementations").is_dir():
            command += f" --commit {rl}"
        if args.scripts != list(SCRIPTS):
            command += " --scripts " + " ".join(args.scripts)
        meta = {
            "command": command,
            "date": datetime.date.today().isoformat(),
            "torchsample": torchsample_commit(),
            "versions": versions(),
            "rl": rl,
            "machine": args.machine,
            "scripts": args.scripts,
        }
        args.out.write_text(report(rows, diffs, meta))
        print(f"wrote {args.out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
