"""Self-describing run directories and the tidy ``metrics.csv`` schema.

One directory per run (one config, one seed)::

    <output.root>/<experiment>/<output.name>/<variant>-<config_id>/seed=<seed>/
        config.yaml   the resolved config (problem defaults filled in)
        meta.json     identity, status, git commit and dirty flag, host, versions, device,
                      start/end time, problem notes
        metrics.csv   one row per evaluation (columns: METRICS_COLUMNS + problem metrics)
        run.log       the run's log
        COMPLETE      written last, by an atomic rename: only then is the run complete

``config_id`` is a digest of the config minus where-and-how keys (seed, paths, progress
bar), so rerunning the same command finds the same directory and skips it when complete;
any other change (a hyperparameter, the epoch count) gives a new directory.
A directory without ``COMPLETE`` is an interrupted or running run: aggregation ignores it
and the next run of that config starts it again from scratch. A process running a config
holds an exclusive lock on ``.lock`` in its directory, so two processes given the same
config and seed (two sweeps at once, or a sweep that lists it twice) never write the same
directory: the second one skips it.
"""

from __future__ import annotations

import csv
import errno
import fcntl
import json
import logging
import os
import platform
import socket
import subprocess
import sys
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from experiments.config import ACCEL_HYPERPARAMETERS, ValidatedRun

CONFIG_FILE = "config.yaml"
META_FILE = "meta.json"
METRICS_FILE = "metrics.csv"
LOG_FILE = "run.log"
COMPLETE_FILE = "COMPLETE"
LOCK_FILE = ".lock"

#: The wrapper's counters (keys of ``opt.stats.as_dict()``), cumulative, logged per row.
AA_COUNTERS = ("aa_attempts", "aa_accepted", "averages_applied")

IDENTITY_COLUMNS = ("experiment", "variant", "optimizer", "seed", "config_id")
PROGRESS_COLUMNS = ("step", "epoch", "train_loss", "val_loss")
TRAILING_COLUMNS = ("lr", "wall_time", *AA_COUNTERS)
#: Every metrics.csv has these columns in this order, with the problem's own metrics
#: (e.g. val_r2) between PROGRESS_COLUMNS and TRAILING_COLUMNS. The Anderson
#: hyperparameters are empty for runs without acceleration.
METRICS_COLUMNS = IDENTITY_COLUMNS + ACCEL_HYPERPARAMETERS + PROGRESS_COLUMNS + TRAILING_COLUMNS

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_path(run: ValidatedRun) -> Path:
    cfg = run.config
    return (
        Path(cfg.output.root)
        / cfg.experiment
        / cfg.output.name
        / f"{run.variant}-{run.config_id}"
        / f"seed={cfg.seed}"
    )


def constant_columns(run: ValidatedRun) -> dict[str, Any]:
    """The columns that are the same in every row of a run."""
    cfg = run.config
    hyperparameters = cfg.accel.settings() if cfg.accel.enabled else dict.fromkeys(ACCEL_HYPERPARAMETERS)
    return {
        "experiment": cfg.experiment,
        "variant": run.variant,
        "optimizer": cfg.optimizer.name,
        "seed": cfg.seed,
        "config_id": run.config_id,
        **hyperparameters,
    }


class MetricsWriter:
    """Appends rows to metrics.csv, flushing each so a crash keeps what was measured."""

    def __init__(self, path: Path, constants: dict[str, Any]):
        self._path = path
        self._constants = constants
        self._file = None
        self._writer: csv.DictWriter | None = None

    def write(self, row: dict[str, Any]) -> None:
        if self._writer is None:
            extra = [k for k in row if k not in PROGRESS_COLUMNS + TRAILING_COLUMNS]
            columns = [*self._constants, *PROGRESS_COLUMNS, *extra, *TRAILING_COLUMNS]
            self._file = open(self._path, "w", newline="")
            self._writer = csv.DictWriter(self._file, fieldnames=columns)  # unknown keys raise
            self._writer.writeheader()
        self._writer.writerow({**self._constants, **row})
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RunDirectory:
    def __init__(self, path: Path | str):
        self.path = Path(path)

    def file(self, name: str) -> Path:
        return self.path / name

    def is_complete(self) -> bool:
        return self.file(COMPLETE_FILE).is_file()

    @contextmanager
    def claim(self) -> Iterator[bool]:
        """Hold the directory's lock for the block; yields False if another process holds it.

        flock is released by the kernel when the process dies, so a crash leaves no stale
        lock. Where the file system does not support locks the run goes ahead unlocked.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.file(LOCK_FILE), "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    yield False
                    return
                logging.getLogger(__name__).warning("cannot lock %s (%s); running unlocked", self.path, error)
            yield True

    def start(self, config_yaml: str, meta: dict[str, Any]) -> None:
        """Empty the directory of a previous attempt and record what is about to run."""
        # COMPLETE goes first: from here on, a crash leaves an incomplete run behind.
        for name in (COMPLETE_FILE, METRICS_FILE, LOG_FILE, META_FILE, CONFIG_FILE):
            self.file(name).unlink(missing_ok=True)
        self.path.mkdir(parents=True, exist_ok=True)
        self.file(CONFIG_FILE).write_text(config_yaml)
        self.write_meta(meta)

    def read_meta(self) -> dict[str, Any]:
        return json.loads(self.file(META_FILE).read_text())

    def write_meta(self, meta: dict[str, Any]) -> None:
        _write_atomically(self.file(META_FILE), json.dumps(meta, indent=2, default=str) + "\n")

    def mark_complete(self) -> None:
        _write_atomically(self.file(COMPLETE_FILE), now() + "\n")

    @contextmanager
    def log_to_file(self, *loggers: logging.Logger) -> Iterator[None]:
        """Copy what ``loggers`` log to the run's log file while the block runs."""
        handler = logging.FileHandler(self.file(LOG_FILE))
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        for logger in loggers:
            logger.addHandler(handler)
        try:
            yield
        finally:
            for logger in loggers:
                logger.removeHandler(handler)
            handler.close()


def run_metadata(run: ValidatedRun, device: str) -> dict[str, Any]:
    """What a reader needs to trust or reproduce the run, written before training starts."""
    import torch  # only runs import this module's writer side; figures never get here

    return {
        "status": "running",
        "experiment": run.config.experiment,
        "variant": run.variant,
        "seed": run.config.seed,
        "config_id": run.config_id,
        "identity": run.identity,
        "git": git_state(REPO_ROOT),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "argv": sys.argv,
        "started": now(),
    }


def git_state(repo: Path) -> dict[str, Any]:
    """Commit and dirty flag of ``repo``; None where git or a commit is not available."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _write_atomically(path: Path, text: str) -> None:
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(text)
    os.replace(temp, path)
