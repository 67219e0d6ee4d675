"""Where a run's numbers go: ``<out>/{train,eval,diagnostics,lfiw}.csv`` (the wide tables
``experiments/`` reads, written with pandas) and one of TorchRL's loggers (``--logger csv|tensorboard|wandb``),
with the shims that let torchrl 0.11's loggers take the same calls as 0.14's."""

from __future__ import annotations

import inspect
import os
import secrets
import shutil
from dataclasses import asdict
from pathlib import Path

import pandas as pd

# csv.writer's line ending, which the files have always had: eval.csv stays byte-compatible with the runs
# experiments/ already holds (a study may resume into a folder written before pandas wrote these files).
LINE_END = "\r\n"


def make_torchrl_logger(kind: str, log_dir: Path, exp_name: str, fresh: bool = True):
    """TorchRL's ``CSVLogger``, ``TensorboardLogger`` or ``WandbLogger`` (``kind``) writing under ``log_dir``.

    A ``fresh`` run replaces what an earlier run of the same name left: the CSV and TensorBoard
    loggers' ``<log_dir>/<exp_name>/`` is emptied (else both runs' points would mix in one curve); a
    resumed run (``fresh=False``) adds to it.

    wandb runs offline: ``WANDB_MODE=offline`` is set before ``wandb.init`` reads it, so no login and
    no network; ``wandb sync <log_dir>/wandb/offline-run-*`` uploads the run later. The run's wandb id
    is kept in ``<log_dir>/run_id``, so a ``--resume``d run logs to the same wandb run (a second
    offline folder with the same id, which ``wandb sync`` appends) instead of starting another; a
    fresh run draws a new id (earlier offline runs stay, as runs of their own).

    Examples:
        >>> import tempfile
        >>> log_dir = Path(tempfile.mkdtemp())
        >>> sink = make_torchrl_logger("csv", log_dir, "demo")
        >>> log_scalars(sink, {"eval/eval_return": 9.0}, step=100)
        >>> close_logger(sink)
        >>> (log_dir / "demo" / "scalars" / "eval" / "eval_return.csv").read_text().splitlines()
        ['100,9.0']
    """
    from torchrl.record.loggers import CSVLogger, TensorboardLogger, WandbLogger

    if kind in ("csv", "tensorboard") and fresh:
        shutil.rmtree(Path(log_dir) / exp_name, ignore_errors=True)
    if kind == "csv":
        return CSVLogger(exp_name, log_dir=str(log_dir))
    if kind == "tensorboard":
        return TensorboardLogger(exp_name, log_dir=str(log_dir))
    if kind == "wandb":
        os.environ["WANDB_MODE"] = "offline"
        id_file = Path(log_dir) / "run_id"
        if fresh or not id_file.exists():
            id_file.parent.mkdir(parents=True, exist_ok=True)
            id_file.write_text(secrets.token_hex(4))  # wandb's id form: 8 lower-case letters and digits
        options = {"mode": "offline"}
        if "log_env_packages" in inspect.signature(WandbLogger.__init__).parameters:  # torchrl >= 0.12
            options["log_env_packages"] = False  # else it lists every installed package in the run
        return WandbLogger(
            exp_name,
            offline=True,
            save_dir=str(log_dir),
            id=id_file.read_text().strip(),
            project="torchsample",
            **options,
        )
    raise ValueError(f"logger must be one of csv, tensorboard, wandb, got {kind!r}")


def log_scalars(sink, scalars: dict[str, float], step: int) -> None:
    """``scalars`` to a TorchRL logger at ``step``: one ``log_metrics`` call where the logger has it
    (torchrl 0.14), else ``log_scalar`` per key (torchrl 0.11 has no ``log_metrics``)."""
    log_metrics = getattr(sink, "log_metrics", None)
    if log_metrics is not None:
        log_metrics(scalars, step=step)
        return
    for key, value in scalars.items():
        sink.log_scalar(key, value, step=step)


def close_logger(sink) -> None:
    """Flush and close a TorchRL logger: ``close()`` where it has one (torchrl 0.14); torchrl 0.11's
    loggers have none, so their writer is closed directly (wandb's run finished, TensorBoard's
    ``SummaryWriter`` closed; its CSV files are flushed at every write)."""
    close = getattr(sink, "close", None)
    if close is not None:
        close()
        return
    experiment = getattr(sink, "experiment", None)
    for method in ("finish", "close"):
        if callable(getattr(experiment, method, None)):
            getattr(experiment, method)()
            return


class Logger:
    """Appends rows to ``<run_dir>/<name>.csv`` and sends the same scalars to TorchRL's logger
    ``config.logger`` (``"<name>/<key>"`` at ``step``), under ``<run_dir>/<config.logger>/``.

    The wide CSV files (one row per call, columns ``step,<key>,...``; ``name`` one of :attr:`FILES`)
    are what ``experiments.compare`` reads; TorchRL's ``CSVLogger`` writes one two-column file per scalar
    without a header, so it is the extra sink here, not a replacement.

    A run that starts at ``start_step`` 0 replaces the files an earlier run left in ``run_dir`` (they
    would otherwise carry both runs' rows); a run resumed from a checkpoint at ``start_step`` keeps
    their rows up to that step and drops the later ones, which the interrupted run wrote after its
    last checkpoint and the resumed run writes again.

    Examples:
        >>> import tempfile
        >>> run_dir = Path(tempfile.mkdtemp())
        >>> from agents.config import RunOptions
        >>> logger = Logger(run_dir, RunOptions(logger="csv"), exp_name="demo")
        >>> logger.log("eval", 100, eval_return=1.5)
        >>> logger.close()
        >>> (run_dir / "eval.csv").read_text().splitlines()
        ['step,eval_return', '100,1.5']
        >>> (run_dir / "csv" / "demo" / "scalars" / "eval" / "eval_return.csv").read_text().splitlines()
        ['100,1.5']
    """

    FILES = ("train", "eval", "diagnostics", "lfiw")

    def __init__(self, run_dir: Path, config, exp_name: str = "run", start_step: int = 0) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for name in self.FILES:
            self._keep_rows_until(self.run_dir / f"{name}.csv", start_step)
        (self.run_dir / "config.txt").write_text("\n".join(f"{k}={v}" for k, v in asdict(config).items()) + "\n")
        self.kind = config.logger
        self.sink = make_torchrl_logger(config.logger, self.run_dir / config.logger, exp_name, fresh=start_step == 0)
        if config.logger == "wandb":  # the run's config beside its curves on the dashboard
            self.sink.log_hparams({k: str(v) for k, v in asdict(config).items()})

    @staticmethod
    def _keep_rows_until(path: Path, step: int) -> None:
        if not path.exists():
            return
        if step == 0:
            path.unlink()
            return
        if path.stat().st_size == 0:  # an interrupted run may have left the file empty
            return
        rows = pd.read_csv(path, dtype=str, keep_default_na=False)  # as text: the kept rows stay byte for byte
        rows[rows["step"].astype(float) <= step].to_csv(path, index=False, lineterminator=LINE_END)

    def log(self, name: str, step: int, **values: float) -> None:
        if name not in self.FILES:
            raise ValueError(f"Logger writes {', '.join(f'{n}.csv' for n in self.FILES)}; got {name!r}")
        path = self.run_dir / f"{name}.csv"
        row = pd.DataFrame([{"step": step, **values}])
        row.to_csv(path, mode="a", header=not path.exists(), index=False, na_rep="nan", lineterminator=LINE_END)
        log_scalars(self.sink, {f"{name}/{key}": float(value) for key, value in values.items()}, step)

    def close(self) -> None:
        """Flush and close the TorchRL logger; with wandb, every logged scalar is in the offline run's
        ``.wandb`` file when this returns."""
        close_logger(self.sink)
        if self.kind == "wandb":
            # finish() returns once wandb's service has the exit record, but the service closes the run's
            # file after that, on its own thread: a reader right after once saw only the file's header
            # (a CI-style test on a loaded machine). teardown() waits for the service to stop.
            import wandb

            wandb.teardown()
