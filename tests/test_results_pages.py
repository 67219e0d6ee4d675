"""Every results table that names its per-run data recomputes from it (issue 30, item 2).

A page marks a table with a line ``Per-run data: [name.csv](path/name.csv)`` just above it: the compact CSV
of the runs' evaluation curves (:mod:`experiments.export`), whose ``.json`` sidecar names the env and whose
``runs/name/`` folder beside it keeps each run's ``args.json``, ``config.txt`` and ``eval.csv`` (and
``diagnostics.csv`` where it wrote one). Two layouts are read, both ``experiments.compare``'s: a one-task
table (``sampler | runs | ...``, the CSV ``sampler,seed,step,return``) and a batch-size sweep's (``batch size |
sampler | runs | ...``, the CSV with ``batch_size`` first, the runs kept as ``bs<k>/<sampler>/seed<j>/``); a
page may leave columns out. Three checks:

- **By hand, from the CSV**: every row's run count, mean, IQM, optimality gap and P(> uniform) (against
  uniform at the same batch size) of the final evaluations are numpy's on the CSV, not through
  ``experiments``' statistics (which go through rliable). The wall time and steps/s of each row are the
  means of the kept runs' last ``eval.csv`` rows, a sweep's gradient steps their ``config.txt``'s, and any
  other column of a sweep is the mean of the kept runs' last ``diagnostics.csv`` value of that name.
- **Through the command's own code**, for the demo's table (README's main job): the table
  ``experiments.compare --reuse`` writes from the kept runs (the runs reused, 5000 bootstrap resamples as on
  the pages) is the page's, CIs included, digit for digit. Only one table: rliable's bootstrap takes about 10
  s a table here, and the CIs of the others come from the same code on the same kind of files.
- **One study**: the CSV is what ``experiments.export`` writes from the kept runs, sidecar arguments included.

A diagnostics table (``diagnostic | median [min, max]``, the App. H and App. C measurements pooled over every
run, as ``experiments.compare`` writes ``diagnostics.md``) is marked ``Per-run diagnostics: [name.csv](...)``:
each of its rows is recomputed by hand from the kept runs' ``diagnostics.csv`` files, as is the count of
measurements where last-layer sampling was closer to exact sampling than the output surrogate's, where the
page states it (``N of M measurements``) in the line just below the table.
"""

import csv
import json
import re
from pathlib import Path
from typing import Optional

import numpy as np
import pytest

from tests.conftest import require

require("rliable", "pandas", "tyro")
from experiments import export, reports, stats  # noqa: E402
from experiments.runs import Run, read_config, read_eval  # noqa: E402
from tests.test_replication import iqm_by_hand, p_by_hand  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([*(ROOT / "docs" / "results").glob("*.md"), ROOT / "docs" / "lfiw.md"])
MARK = re.compile(r"^Per-run data: \[[^\]]+\]\(([^)]+\.csv)\)")
DIAGNOSTICS_MARK = re.compile(r"^Per-run diagnostics: \[[^\]]+\]\(([^)]+\.csv)\)")


def marked_tables(page: Path, mark: re.Pattern = MARK) -> list[tuple[Path, list[str], list[list[str]], str]]:
    """``(csv, header, rows, next line)`` of every table marked with ``mark`` on ``page``: the first table after
    the mark, its cells stripped, and the first non-blank line after it ("" at the end of the page)."""
    lines, found = page.read_text().splitlines(), []
    for i, line in enumerate(lines):
        m = mark.match(line)
        if not m:
            continue
        start = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("| "))
        end = next((j for j in range(start, len(lines)) if not lines[j].startswith("|")), len(lines))
        table = [[c.strip() for c in row.strip("|").split("|")] for row in lines[start:end]]
        after = next((line for line in lines[end:] if line.strip()), "")
        found.append(((page.parent / m.group(1)).resolve(), table[0], table[2:], after))
    return found


CASES = [(page, *t[:3]) for page in PAGES for t in marked_tables(page)]
DIAGNOSTICS = [(page, *t) for page in PAGES for t in marked_tables(page, DIAGNOSTICS_MARK)]


def case_id(case) -> str:
    return f"{case[0].name}:{case[1].stem}"


def point(cell: str) -> str:
    """The point estimate of a ``point [low, high]`` cell."""
    return cell.split(" [")[0]


Key = tuple[Optional[int], str]  # (batch size, None outside a sweep; sampler)


def kept_runs(kept: Path) -> dict[Key, list[Path]]:
    """``{(batch size, sampler): [each kept run's folder, by seed]}``."""
    out: dict[Key, list[Path]] = {}
    for sampler, _, batch_size, folder in export.run_folders(kept):
        out.setdefault((batch_size, sampler), []).append(folder)
    return out


def last_row(path: Path) -> dict[str, str]:
    """The last row of a CSV file, read with the csv module."""
    with path.open() as f:
        return list(csv.DictReader(f))[-1]


def gradient_steps_by_hand(config: dict[str, str]) -> int:
    """A run's updates from its ``config.txt``: DQN's ``gradient_steps`` at every ``train_freq``-th step from
    ``learning_starts`` on (its config has ``train_freq``), SAC's and TD3's one a step from there."""
    total, starts = int(config["total_steps"]), int(config["learning_starts"])
    if "train_freq" not in config:
        return total - starts
    freq = int(config["train_freq"])
    return (total // freq - starts // freq) * int(config["gradient_steps"])


def finals(path: Path) -> dict[Key, list[float]]:
    """``{(batch size, sampler): [final return of each run]}`` straight from the CSV: each run's row with the
    largest step."""
    by_run: dict[tuple[Optional[int], str, int], tuple[int, float]] = {}
    header, *rows = path.read_text().splitlines()
    assert header in ("sampler,seed,step,return", "batch_size,sampler,seed,step,return"), f"{path.name}: {header}"
    for line in rows:
        *batch_size, sampler, seed, step, value = line.split(",")
        key = (int(batch_size[0]) if batch_size else None, sampler, int(seed))
        if key not in by_run or int(step) > by_run[key][0]:
            by_run[key] = (int(step), float(value))
    out: dict[Key, list[float]] = {}
    for (batch_size, sampler, _), (_, value) in sorted(by_run.items(), key=lambda kv: (kv[0][0] or 0, *kv[0][1:])):
        out.setdefault((batch_size, sampler), []).append(value)
    return out


def test_the_pages_mark_their_tables():
    """The pages whose runs are committed say so; a mark that points at nothing fails here, not silently."""
    marked = {page.name for page, *_ in CASES}
    assert {"compare.md", "lfiw.md", "continuous.md", "small-batch.md", "ladder.md"} <= marked, marked
    assert "ladder.md" in {page.name for page, *_ in DIAGNOSTICS}
    for page, path, *_ in DIAGNOSTICS:
        assert (path.parent / "runs" / path.stem).is_dir(), f"{page.name}: {path.stem}'s runs are not kept"
    for page, path, header, rows in CASES:
        assert path.exists(), f"{page.name} marks a table with {path}, which is not in the repository"
        assert header[:2] == ["sampler", "runs"] or header[:3] == ["batch size", "sampler", "runs"], (
            f"{page.name}: the mark of {path.name} is not above a table of experiments.compare's"
        )
        assert rows, f"{page.name}: the table marked with {path.name} has no rows"


# The columns a table may have besides the key's; any other column of a sweep's is a diagnostic.
KNOWN = {"runs", "mean [95% CI]", "IQM [95% CI]", "optimality gap [95% CI]", "P(> uniform) [95% CI]"}
KNOWN |= {"wall time (s)", "steps/s", "gradient steps"}


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_a_marked_table_is_its_csv_by_hand(case):
    page, path, header, rows = case
    meta = json.loads(path.with_suffix(".json").read_text())
    assert not meta["left_out"], f"{path.name}: unfinished runs were left out of the study: {meta['left_out']}"
    (env_id,) = meta["env_ids"]
    scores, kept = finals(path), kept_runs(path.parent / "runs" / path.stem)
    sweep = header[0] == "batch size"
    keys = [(int(r[0]), r[1]) if sweep else (None, r[0]) for r in rows]
    assert set(keys) == set(scores), f"{page.name}: the table's rows are not the CSV's runs"
    column = {name: i for i, name in enumerate(header)}
    for key, row in zip(keys, rows):
        cell = {name: row[i] for name, i in column.items()}
        mine, folders = scores[key], kept[key]
        assert cell["runs"] == str(len(mine))
        if "mean [95% CI]" in cell:
            assert point(cell["mean [95% CI]"]) == f"{np.mean(mine):.1f}"
        assert point(cell["IQM [95% CI]"]) == f"{iqm_by_hand(mine):.1f}"
        if "optimality gap [95% CI]" in cell:
            low, high = stats.SCORE_RANGES[env_id]
            gap = 1 - np.mean(np.minimum((np.asarray(mine) - low) / (high - low), 1.0))
            assert point(cell["optimality gap [95% CI]"]) == f"{gap:.2f}"
        if "P(> uniform) [95% CI]" in cell and key[1] != "uniform":
            uniform = scores[(key[0], "uniform")]
            assert point(cell["P(> uniform) [95% CI]"]) == f"{p_by_hand(mine, uniform):.2f}"
        last = [last_row(f / "eval.csv") for f in folders]
        assert [float(r["eval_return"]) for r in last] == mine, "the kept runs are not the CSV's"
        if "wall time (s)" in cell:
            assert cell["wall time (s)"] == f"{np.mean([float(r['wall_time']) for r in last]):.0f}"
        if "steps/s" in cell:
            assert cell["steps/s"] == f"{np.mean([float(r['steps_per_s']) for r in last]):.0f}"
        if "gradient steps" in cell:
            steps = {gradient_steps_by_hand(read_config(f)) for f in folders}
            assert [cell["gradient steps"]] == [str(s) for s in steps], steps
        for name in set(cell) - KNOWN - {"batch size", "sampler"}:
            values = [float(last_row(f / "diagnostics.csv")[name]) for f in folders]
            assert cell[name] == f"{np.mean(values):.4g}", f"{name} of {key}"


@pytest.mark.parametrize("case", [c for c in CASES if c[1].stem == "demo"], ids=case_id)
def test_the_demo_table_is_what_its_command_writes_from_the_kept_runs(case, tmp_path):
    page, path, header, rows = case
    kept = path.parent / "runs" / path.stem
    assert kept.is_dir(), f"{path.name}: its runs' files are not kept in {kept}"
    (env_id,) = json.loads(path.with_suffix(".json").read_text())["env_ids"]
    # As experiments.runs.launch keeps a finished run under --reuse: exit code 0, its eval.csv's wall time.
    runs = [
        Run(sampler, seed, folder, returncode=0, wall_time=float(read_eval(folder)["wall_time"][-1]), reused=True)
        for sampler, seed, _, folder in export.run_folders(kept)
    ]
    samplers = [r[0] for r in rows]
    table = reports.write_tables(tmp_path, "t", env_id, stats.summarise(runs, samplers, env_id, 5000), runs)
    written = [line for line in table.splitlines() if line.startswith("| ")]
    assert written[0] == "| " + " | ".join(header) + " |"
    assert sorted(written[2:]) == sorted("| " + " | ".join(r) + " |" for r in rows)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_a_marked_csv_is_the_export_of_its_kept_runs(case, tmp_path):
    """The CSV and the kept run files are one study: exporting the kept runs writes the committed CSV."""
    _, path, _, _ = case
    meta = export.export(path.parent / "runs" / path.stem, tmp_path / path.name)
    assert (tmp_path / path.name).read_text() == path.read_text()
    assert meta["arguments"] == json.loads(path.with_suffix(".json").read_text())["arguments"]


def pooled_diagnostics(kept: Path) -> dict[str, np.ndarray]:
    """Every kept run's ``diagnostics.csv`` columns, concatenated over runs (empty cells as NaN)."""
    pooled: dict[str, list[float]] = {}
    for *_, folder in export.run_folders(kept):
        with (folder / "diagnostics.csv").open() as f:
            for row in csv.DictReader(f):
                for name, value in row.items():
                    pooled.setdefault(name, []).append(float(value) if value else float("nan"))
    return {name: np.asarray(values) for name, values in pooled.items()}


@pytest.mark.parametrize("case", DIAGNOSTICS, ids=case_id)
def test_a_marked_diagnostics_table_is_its_kept_runs_by_hand(case):
    page, path, header, rows, after = case
    assert header == ["diagnostic", "median [min, max]"], f"{page.name}: {header}"
    pooled = pooled_diagnostics(path.parent / "runs" / path.stem)
    assert rows, f"{page.name}: the diagnostics table of {path.name} has no rows"
    for name, cell in rows:
        key, _, ratio = name.partition(" / ")
        assert ratio in ("", "ideal"), f"{page.name}: {name} is not a diagnostic or a ratio to exact sampling's"
        values = pooled[key] / pooled["second_moment/ideal"] if ratio == "ideal" else pooled[key]
        values = values[np.isfinite(values)]
        assert cell == f"{np.median(values):.3g} [{values.min():.3g}, {values.max():.3g}]", f"{page.name}: {name}"
    closer = re.search(r"(\d+) of (\d+) measurements", after)
    if closer:
        n = len(pooled["step"])
        assert closer.groups() == (str(int(np.sum(pooled["tv/last-layer"] < pooled["tv/output"]))), str(n))
