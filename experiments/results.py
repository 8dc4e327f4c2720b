"""Self-describing run directories and the tidy ``metrics.csv`` schema (the writer side).

One directory per run (one config, one seed)::

    <output.root>/<experiment>/<output.name>/<variant>-<config_id>/seed=<seed>/
        config.yaml   the resolved config (problem and method defaults filled in)
        meta.json     identity, status, method, budget and expected rows, git commit and
                      dirty flag, host, processor (model and torch's CPU kernel level, GPU
                      model), the scheduler's job ids, versions, device, start/end time,
                      problem notes; one ``resumed`` entry per later segment (step, time,
                      host, commit, job ids, processor)
        metrics.csv   one row per evaluation (columns: see MetricsWriter)
        run.log       the run's log
        checkpoints/  while it runs: the newest checkpoints (experiments/checkpoint.py)
        model.pt      the final model's state_dict, written when it finishes
        COMPLETE      written last, by an atomic rename: the outcome ("complete" or
                      "diverged"), the number of metrics rows and the last step, so a
                      reader can check the metrics against it

``status`` in meta.json is one of :data:`STATUSES`. A directory without ``COMPLETE`` is an
interrupted or running run: aggregation lists it and never reads it, and the next run of
that config starts it again. A process running a config holds an exclusive lock on
``.lock`` in its directory, so two processes given the same config and seed never write
the same directory: the second one skips it. ``output.overwrite=true`` trains into a
sibling directory and swaps it in by rename only once it is complete, so an interrupted
overwrite keeps the previous result.
"""

from __future__ import annotations

import csv
import errno
import fcntl
import functools
import json
import logging
import os
import platform
import shutil
import socket
import subprocess
import sys
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from experiments.atomic import write_atomically


CONFIG_FILE = "config.yaml"
META_FILE = "meta.json"
METRICS_FILE = "metrics.csv"
LOG_FILE = "run.log"
COMPLETE_FILE = "COMPLETE"
LOCK_FILE = ".lock"
#: The trained model's state_dict, written when the run finishes.
FINAL_MODEL_FILE = "model.pt"
#: The sibling an overwrite trains into (``seed=3`` -> ``seed=3.overwrite``).
OVERWRITE_SUFFIX = ".overwrite"

#: meta.json ``status``: finished ("complete", "diverged": COMPLETE exists) or not.
STATUSES = ("running", "complete", "diverged", "failed", "interrupted", "preempted")
#: The outcomes a COMPLETE marker records.
OUTCOMES = ("complete", "diverged")

IDENTITY_COLUMNS = ("experiment", "variant", "method", "optimizer", "seed", "config_id")
PROGRESS_COLUMNS = ("step", "epoch", "train_loss", "val_loss")
TRAILING_COLUMNS = ("lr", "wall_time")
#: Columns measured in seconds, which differ between two runs of the same config (a resumed
#: run's rows equal an uninterrupted run's except these).
TIMING_COLUMNS = ("wall_time", "samples_per_second")

REPO_ROOT = Path(__file__).resolve().parents[1]


def expected_rows(budget: int, eval_every: int) -> int:
    """Rows of a run that trains its whole budget: before the first unit, every
    ``eval_every`` units and after the last one."""
    return 1 + budget // eval_every + (1 if budget % eval_every else 0)


class MetricsWriter:
    """Appends rows to metrics.csv, flushing each so a crash keeps what was measured.

    Columns: the run's constants (IDENTITY_COLUMNS, then the method's hyperparameters),
    PROGRESS_COLUMNS, the problem's metrics, TRAILING_COLUMNS, then the method's counters
    (every row key not named so far, in the first row's order)."""

    def __init__(self, path: Path, constants: dict[str, Any], counters: tuple[str, ...] = ()):
        self._path = path
        self._constants = constants
        self._counters = counters
        self._file = None
        self._writer: csv.DictWriter | None = None
        self.rows = 0
        self.last_step: int | None = None

    def write(self, row: dict[str, Any]) -> None:
        if self._writer is None:
            named = PROGRESS_COLUMNS + TRAILING_COLUMNS + self._counters
            extra = [k for k in row if k not in named]
            columns = [*self._constants, *PROGRESS_COLUMNS, *extra, *TRAILING_COLUMNS, *self._counters]
            self._file = open(self._path, "w", newline="")
            self._writer = csv.DictWriter(self._file, fieldnames=columns)  # unknown keys raise
            self._writer.writeheader()
        self._writer.writerow({**self._constants, **row})
        self._file.flush()
        self.rows += 1
        self.last_step = row["step"]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

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
        """Whether the run finished (complete or diverged): rerunning it would only repeat it."""
        return self.file(COMPLETE_FILE).is_file()

    @property
    def overwrite_sibling(self) -> "RunDirectory":
        return RunDirectory(self.path.with_name(self.path.name + OVERWRITE_SUFFIX))

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
        """Empty the directory of a previous, unfinished attempt and record what is about to run."""
        for name in (COMPLETE_FILE, METRICS_FILE, LOG_FILE, META_FILE, CONFIG_FILE, FINAL_MODEL_FILE):
            self.file(name).unlink(missing_ok=True)
        self.path.mkdir(parents=True, exist_ok=True)
        self.file(CONFIG_FILE).write_text(config_yaml)
        self.write_meta(meta)

    def read_meta(self) -> dict[str, Any]:
        return json.loads(self.file(META_FILE).read_text())

    def write_meta(self, meta: dict[str, Any]) -> None:
        write_atomically(self.file(META_FILE), json.dumps(meta, indent=2, default=str) + "\n")

    def mark_finished(self, outcome: str, rows: int, last_step: int) -> None:
        """Write COMPLETE: what a reader checks metrics.csv against."""
        assert outcome in OUTCOMES, outcome
        marker = {"outcome": outcome, "rows": rows, "last_step": last_step, "ended": now()}
        write_atomically(self.file(COMPLETE_FILE), json.dumps(marker) + "\n")

    def replace(self, target: "RunDirectory") -> None:
        """Move this finished directory to ``target``'s place, deleting what was there only
        after the move: at every moment one complete copy exists."""
        old = target.path.with_name(target.path.name + ".replaced")
        shutil.rmtree(old, ignore_errors=True)
        if target.path.exists():
            os.replace(target.path, old)
        os.replace(self.path, target.path)
        shutil.rmtree(old, ignore_errors=True)

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


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """The processor's name as the OS gives it (x86's "model name", POWER's "cpu"), else
    whatever Python's platform module knows (may be empty). Read once per process: a seed
    group writes one meta.json per seed."""
    try:
        with open("/proc/cpuinfo") as info:
            fields = dict(line.split(":", 1) for line in info if ":" in line)
    except OSError:
        fields = {}
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    return fields.get("model name") or fields.get("cpu") or platform.processor()


#: The batch scheduler's job ids a run records per segment (Slurm's job and array element,
#: LSF's job and array index), so a run can be traced to the job that ran it.
JOB_VARIABLES = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "LSB_JOBID", "LSB_JOBINDEX")


def scheduler_job(environ: Any = None) -> dict[str, str]:
    """The scheduler job ids set in the environment (``JOB_VARIABLES``); {} outside a job."""
    environ = os.environ if environ is None else environ
    return {name: environ[name] for name in JOB_VARIABLES if environ.get(name)}


def hardware(device: str) -> dict[str, Any]:
    """What the numbers of a run depend on beyond code, config and versions: torch picks
    its CPU kernels by the instruction set it finds (``cpu_capability``: AVX2, AVX512, ...),
    and kernels of different vector widths sum in different orders, so bit-for-bit reruns
    hold on one capability, not across them (docs/experiments.md)."""
    import torch

    found: dict[str, Any] = {"cpu_model": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if device.startswith("cuda") and torch.cuda.is_available():
        found["gpu_model"] = torch.cuda.get_device_name(torch.device(device))
    return found


def run_metadata(run: Any, device: str) -> dict[str, Any]:
    """What a reader needs to trust or reproduce the run, written before training starts
    (``run`` is an experiments.validation.ValidatedRun)."""
    import torch  # only runs import this module's writer side; figures never get here

    cfg = run.config
    return {
        "status": "running",
        "experiment": cfg.experiment,
        "variant": run.variant,
        "method": run.method.name,
        "legend_order": run.method.legend_order,
        "baseline": run.method.baseline,
        "seed": cfg.seed,
        "config_id": run.config_id,
        "identity": run.identity,
        "budget": {"unit": run.problem_class.budget_unit, "total": run.budget, "eval_every": cfg.train.eval_every},
        "expected_rows": expected_rows(run.budget, cfg.train.eval_every),
        "git": git_state(REPO_ROOT),
        "job": scheduler_job(),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "device": device,
        **hardware(device),
        "torch_threads": torch.get_num_threads(),
        "argv": sys.argv,
        "started": now(),
    }


def record_resumption(meta: dict[str, Any], step: int, device: str) -> str | None:
    """Append this resumption (step, time, host, code version, job ids and hardware) to
    ``meta["resumed"]``; returns a warning where the code version (commit or dirty flag) or
    the hardware's kernels differ from those the run started on (a job requeued after a
    pull, or landing on another node type): from here on the run is not what an
    uninterrupted run gives, and the analysis keeps it apart (aggregate.provenance)."""
    here = hardware(device)
    code = git_state(REPO_ROOT)
    meta.setdefault("resumed", []).append(
        {"step": step, "at": now(), "host": socket.gethostname(), "git": code, "job": scheduler_job(), **here}
    )
    warnings = []
    started = meta.get("git")
    if isinstance(started, dict) and (started.get("commit"), started.get("dirty")) != (code["commit"], code["dirty"]):
        warnings.append(
            f"resumed at step {step} under another code version ({_code_text(started)} -> {_code_text(code)}): "
            "the rest of this run is not what one code version gives; the analysis keeps it apart from "
            "runs of either version"
        )
    changed = [
        f"{key} {meta[key]!r} -> {here[key]!r}"
        for key in ("cpu_capability", "gpu_model")
        if key in meta and key in here and meta[key] != here[key]
    ]
    if changed:
        warnings.append(
            f"resumed at step {step} on other hardware ({', '.join(changed)}): torch's kernels there round "
            "differently, so the rest of this run is not bit for bit what an uninterrupted run gives"
        )
    return "; ".join(warnings) or None


def _code_text(git: dict[str, Any]) -> str:
    commit = git.get("commit")
    return f"{commit[:8] if commit else 'unknown commit'}{' (dirty)' if git.get('dirty') else ''}"


def constant_columns(run: Any) -> dict[str, Any]:
    """The columns that are the same in every row of a run."""
    cfg = run.config
    hyperparameters = run.method.hyperparameters()
    clash = sorted(set(hyperparameters) & set(IDENTITY_COLUMNS))
    if clash:  # a method's column would overwrite the run's label or identity
        raise ValueError(f"method {run.method.name}: hyperparameters() names identity column(s) {clash}; rename them")
    return {
        "experiment": cfg.experiment,
        "variant": run.variant,
        "method": run.method.name,
        "optimizer": cfg.optimizer.name,
        "seed": cfg.seed,
        "config_id": run.config_id,
        **hyperparameters,
    }


def git_state(repo: Path) -> dict[str, Any]:
    """Commit and dirty flag of ``repo``; None where git or a commit is not available.
    Read once per process: the code a process runs is what it imported when it started,
    whatever is committed or edited while it trains (and a seed group asks once per seed)."""
    return dict(_git_state(str(repo)))


@functools.lru_cache(maxsize=None)
def _git_state(repo: str) -> tuple[tuple[str, Any], ...]:

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return (("commit", commit), ("dirty", None if status is None else bool(status)))


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")

