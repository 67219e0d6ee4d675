"""Run one TorchRL sota script in this process and record each call of its ``timeit("rb - sample")`` and
``timeit("update")`` blocks (TorchRL's own timers in the script), then write them and the outcome as JSON.

    python tools/torchrl_scripts_check/runner.py SCRIPT.py OUT.json [hydra overrides ...]

The script runs as ``python SCRIPT.py overrides`` would run it (its folder first on ``sys.path``, hydra
reading the config beside it); only TorchRL's timer is observed. ``"error"`` holds the traceback of an
exception that ended the run (``HYDRA_FULL_ERROR=1``, so hydra re-raises it).
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import time
import traceback


def main(script: str, out: str, overrides: list[str]) -> int:
    from torchrl._utils import timeit

    calls: dict[str, list[float]] = {"rb - sample": [], "update": []}
    record = timeit._record.__func__

    def observed(cls, name, elapsed):
        if name in calls:
            calls[name].append(elapsed)
        return record(cls, name, elapsed)

    timeit._record = classmethod(observed)
    os.environ["HYDRA_FULL_ERROR"] = "1"
    script = os.path.abspath(script)
    sys.path.insert(0, os.path.dirname(script))
    sys.argv = [script, *overrides]
    error, start = None, time.perf_counter()
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:  # hydra exits on a bad config
        if e.code not in (0, None):
            error = f"SystemExit({e.code})"
    except BaseException:
        error = traceback.format_exc()
    result = {
        "ok": error is None,
        "error": error,
        "wall_s": time.perf_counter() - start,
        "sample_s": calls["rb - sample"],
        "update_s": calls["update"],
    }
    with open(out, "w") as f:
        json.dump(result, f)
    if error:
        print(error, file=sys.stderr)
    return 0 if error is None else 1


if __name__ == "__main__":
    code = main(sys.argv[1], sys.argv[2], sys.argv[3:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # leftover collector/prefetch threads must not keep a finished run alive
