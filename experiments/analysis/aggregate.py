"""Reading finished runs and summarising them over seeds (mean and Student-t 95% CI).

No figure or table may rest on a number the user did not get, so every run directory is
checked before anything is read from it, and sorted into one of four kinds:

- good: finished with outcome "complete", and its files agree with each other and with
  its budget. Only good runs enter means, intervals and paired ratios.
- diverged: finished with outcome "diverged" (a non-finite loss or parameters), or
  "complete" with a non-finite loss in its last row. Counted per configuration in every
  table (the ``diverged`` column), never averaged.
- incomplete: no COMPLETE marker (running, failed, interrupted, preempted).
- damaged: a file is missing, unreadable, or disagrees with another (metrics cut short,
  text in a numeric column, a run of an older harness).

Incomplete and damaged runs are left out, each named in one warning line with the reason.

Runs are grouped by configuration (``config_id`` and the identity recorded in meta.json):
the runs of one configuration differ only by seed. Each group is labelled by its variant
plus its method's keys that differ between the variant's configurations, e.g.
"Adam+AADL (history=5)", and any other key that differs at all (a learning rate; the data
file, as the data set and the start of its checksum), so one function serves a paper
figure (three variants, one configuration each) and a sweep alike, and runs on other data
or settings are never pooled or compared without a label saying so.

The same holds for what ran them (``provenance``): the code version (git commit and dirty
flag of every segment of a run: a run resumed under another commit has the set of its
segments' versions) and the kernel level (torch's ``cpu_capability``, and the GPU model
where there is one). Where finished runs differ in either, configurations are split by it
and labelled ("Adam (code=1a2b3c4d)"), one warning line names the split, and baselines
are paired within one code version and kernel level only; ``pool=("kernels",)`` (or
"code") pools across it instead, and the notes of every table and figure say so.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from scipy import stats

log = logging.getLogger(__name__)

CONFIDENCE = 0.95

# File names of a run directory. The writer (experiments.results) names the same files;
# they are repeated here so that reading results never imports the writer.
CONFIG_FILE = "config.yaml"
META_FILE = "meta.json"
METRICS_FILE = "metrics.csv"
COMPLETE_FILE = "COMPLETE"
#: A directory holding any of these is a run directory.
RUN_FILES = (META_FILE, METRICS_FILE, COMPLETE_FILE, CONFIG_FILE)

#: Columns every metrics.csv has. Defined by the reader, which checks them; the writer
#: (experiments.results) imports this tuple rather than keeping its own copy.
REQUIRED_COLUMNS = (
    "experiment", "variant", "method", "optimizer", "seed", "config_id",
    "step", "epoch", "train_loss", "val_loss", "lr", "wall_time",
)
#: Required columns that hold numbers (``epoch`` is empty for iteration budgets).
NUMERIC_COLUMNS = ("seed", "step", "epoch", "train_loss", "val_loss", "lr", "wall_time")
#: The outcomes a COMPLETE marker records.
OUTCOMES = ("complete", "diverged")
UNFINISHED = ("running", "failed", "interrupted", "preempted")
BUDGET_UNITS = ("epoch", "iteration")

OLDER_HARNESS = "written by an older version of the harness; rerun with output.overwrite=true"

#: Identity key prefixes that labels leave out: "method.aadl.history" reads "history".
LABEL_PREFIXES = ("accel.",)
DATA_KEY_SUFFIX = ".sha256"  # identity keys "data.<data set>.sha256"


class ResultsError(Exception):
    """A results directory holds nothing usable, or a request names what runs do not have."""


class DamagedRun(ResultsError):
    """A run directory's files break the format or disagree; the message is the reason."""


@dataclass(frozen=True)
class RunIssue:
    """A run left out of means and intervals, and why."""

    path: Path
    kind: str  # "diverged", "incomplete", "damaged"; "skipped" (not read), "mixed" (resumed under other code or kernels)
    reason: str
    label: str | None = None  # diverged runs: the configuration they count against
    seed: int | None = None
    variant: str | None = None  # where known (meta.json, else the directory's name)
    config_id: str | None = None

    def __str__(self) -> str:
        return f"{self.path}: {self.kind}: {self.reason}"


@dataclass
class Results:
    metrics: pd.DataFrame  # every row of every good run, plus "run" and "label"
    runs: pd.DataFrame  # one row per good run: RUN_FIELDS, "label", identity keys
    varying: list[str]  # identity keys that tell configurations apart
    configurations: pd.DataFrame  # one row per configuration in legend order: good or diverged runs
    diverged: list[RunIssue] = field(default_factory=list)
    incomplete: list[RunIssue] = field(default_factory=list)
    damaged: list[RunIssue] = field(default_factory=list)
    skipped: list[RunIssue] = field(default_factory=list)  # found by the walk, not read (links, loops)
    #: "code" / "kernels" -> {value: finished runs}, for each one whose finished runs differ.
    provenance: dict[str, dict[str, int]] = field(default_factory=dict)
    pooled: tuple[str, ...] = ()  # of PROVENANCE: pooled on request rather than split
    mixed: list[RunIssue] = field(default_factory=list)  # finished runs whose segments differ in code or kernels
    budgets: dict[str, tuple[str, int]] = field(default_factory=dict)  # label -> (unit, total) of its runs

    @property
    def labels(self) -> list[str]:
        """Configuration labels in legend order, including configurations whose every run
        diverged (they have a row in the summary, and no curve)."""
        return self.configurations["label"].tolist()

    @property
    def legend_orders(self) -> dict[str, int]:
        """label -> ``legend_order`` of its method (0: the base optimizer alone)."""
        return dict(zip(self.configurations["label"], self.configurations["legend_order"]))


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """Mean and two-sided Student-t confidence interval of the finite ``values``.

    ``(mean, low, high)`` with ``high - mean = t_{(1+c)/2, n-1} * s / sqrt(n)``, ``s`` the
    sample standard deviation (ddof=1). With one value the interval is (nan, nan); with
    none everything is nan. Callers pass the values of good runs only: dropping
    non-finite values here is not how diverged runs are kept out.
    """
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return (np.nan, np.nan, np.nan)
    mean = float(v.mean())
    half = _half_width(v.std(ddof=1) if len(v) > 1 else np.nan, len(v), confidence)
    return (mean, mean - half, mean + half)


def _half_width(std: np.ndarray | float, n: np.ndarray | int, confidence: float) -> np.ndarray | float:
    n = np.asarray(n, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        t = stats.t.ppf((1 + confidence) / 2, np.where(n > 1, n - 1, np.nan))
        return t * np.asarray(std) / np.sqrt(n)


# --------------------------------------------------------------------------------------------
# Reading one run directory
# --------------------------------------------------------------------------------------------


def read_complete_marker(path: Path | str) -> dict[str, Any]:
    """The COMPLETE marker of a finished run (``path``: the file or its run directory):
    ``{"outcome", "rows", "last_step", "ended"}``. Raises DamagedRun with the reason when
    it is unreadable, of the older format (a bare timestamp), or lacks a field."""
    path = Path(path)
    if path.is_dir():
        path = path / COMPLETE_FILE
    text = _read_text(path)
    if not text.strip():
        raise DamagedRun(f"{COMPLETE_FILE} is empty")
    try:
        marker = json.loads(text)
    except ValueError:
        if _is_timestamp(text.strip()):
            raise DamagedRun(OLDER_HARNESS) from None
        raise DamagedRun(f"{COMPLETE_FILE} is not valid JSON") from None
    if not isinstance(marker, dict):
        raise DamagedRun(f"{COMPLETE_FILE} holds {_json_kind(marker)}, not a JSON object")
    missing = [key for key in ("outcome", "rows", "last_step") if key not in marker]
    if missing:
        raise DamagedRun(f"{COMPLETE_FILE} lacks {', '.join(missing)}")
    if marker["outcome"] not in OUTCOMES:
        raise DamagedRun(f"{COMPLETE_FILE}: outcome {marker['outcome']!r} is none of {', '.join(OUTCOMES)}")
    for key in ("rows", "last_step"):
        if not _is_int(marker[key]) or marker[key] < 0:
            raise DamagedRun(f"{COMPLETE_FILE}: {key} is {marker[key]!r}, not a count")
    return marker


def read_meta(path: Path | str) -> dict[str, Any]:
    """meta.json of a run directory, as a dict with a ``status``; DamagedRun otherwise."""
    text = _read_text(Path(path) / META_FILE)
    try:
        meta = json.loads(text)
    except ValueError as error:
        line = f" (line {error.lineno})" if isinstance(error, json.JSONDecodeError) else ""
        raise DamagedRun(f"{META_FILE} is not valid JSON{line}") from None
    if not isinstance(meta, dict):
        raise DamagedRun(f"{META_FILE} holds {_json_kind(meta)}, not a JSON object")
    if not isinstance(meta.get("status"), str):
        raise DamagedRun(f"{META_FILE} has no status")
    return meta


def read_metrics(path: Path | str) -> pd.DataFrame:
    """metrics.csv of a run directory, numbers parsed; DamagedRun where it is missing,
    empty, header-only, ragged, lacks a required column or has text where numbers go.

    Parsed with the csv module and float() rather than pandas' inference, so that text in
    a numeric column is reported instead of turning the column into strings or NaN."""
    file = Path(path) / METRICS_FILE
    text = _read_text(file)
    if not text:
        raise DamagedRun(f"{METRICS_FILE} is empty (0 bytes)")
    try:
        rows = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as error:
        raise DamagedRun(f"{METRICS_FILE} is not CSV ({error})") from None
    header, body = rows[0], [row for row in rows[1:] if row]
    if not body:
        raise DamagedRun(f"{METRICS_FILE} has a header and no rows")
    if len(set(header)) != len(header):
        raise DamagedRun(f"{METRICS_FILE} names a column twice")
    missing = [column for column in REQUIRED_COLUMNS if column not in header]
    if "method" in missing:
        raise DamagedRun(OLDER_HARNESS)
    if missing:
        raise DamagedRun(f"{METRICS_FILE} lacks column(s) {', '.join(missing)}")
    for number, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise DamagedRun(f"{METRICS_FILE} line {number} has {len(row)} fields, the header {len(header)}")
    frame = pd.DataFrame(body, columns=header)
    after_step = header[header.index("step") + 1 :]
    for column in header:
        strict = column in NUMERIC_COLUMNS or column.startswith(("val_", "train_"))
        if strict or column in after_step:
            # Counts (seed, step, epoch, the method's counters) as integers where whole.
            whole = column in ("seed", "step", "epoch") or not strict
            values = _numbers(frame[column], column, strict, whole)
            if values is not None:
                frame[column] = values
    return frame


def _numbers(text: pd.Series, column: str, strict: bool, whole: bool) -> pd.Series | None:
    """``text`` as floats (empty cells NaN; int64 if ``whole`` and every value is whole).
    A cell that is not a number raises DamagedRun if ``strict``, else gives None (the
    column stays text: a column this module does not use)."""
    try:
        values = text.replace("", "nan").to_numpy(dtype=str).astype(float)
    except ValueError:
        if not strict:
            return None
        for index, cell in enumerate(text):
            try:
                float(cell or "nan")
            except ValueError:
                raise DamagedRun(f"{METRICS_FILE} line {index + 2}, column {column}: {cell!r} is not a number") from None
        raise
    if whole and np.isfinite(values).all() and (values == np.round(values)).all() and np.abs(values).max(initial=0) < 2**53:
        return pd.Series(values.astype(np.int64), index=text.index)
    return pd.Series(values, index=text.index)


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise DamagedRun(f"no {path.name}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DamagedRun(f"{path.name} is not UTF-8 text") from None
    except OSError as error:
        raise DamagedRun(f"{path.name} cannot be read ({error.strerror or error})") from None


def _is_timestamp(text: str) -> bool:
    try:
        datetime.fromisoformat(text)
    except ValueError:
        return False
    return "\n" not in text


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _json_kind(value: object) -> str:
    return {list: "a list", str: "a string", type(None): "null"}.get(type(value), "a number")


#: meta.json keys a finished run must have, and what each must be.
META_KEYS: dict[str, tuple[str, Any]] = {
    "experiment": ("text", lambda v: isinstance(v, str)),
    "variant": ("text", lambda v: isinstance(v, str) and v != ""),
    "method": ("text", lambda v: isinstance(v, str) and v != ""),
    "legend_order": ("an integer", _is_int),
    "baseline": ("true or false", lambda v: isinstance(v, bool)),
    "seed": ("an integer", _is_int),
    "config_id": ("text", lambda v: isinstance(v, str) and v != ""),
    "identity": ("an object", lambda v: isinstance(v, dict)),
    "budget": ("an object", lambda v: isinstance(v, dict)),
    "expected_rows": ("a positive integer", lambda v: _is_int(v) and v > 0),
}


def _check_meta(meta: dict[str, Any]) -> None:
    if "method" not in meta:
        raise DamagedRun(OLDER_HARNESS)
    missing = [key for key in META_KEYS if key not in meta]
    if missing:
        raise DamagedRun(f"{META_FILE} lacks {', '.join(missing)}")
    for key, (what, valid) in META_KEYS.items():
        if not valid(meta[key]):
            raise DamagedRun(f"{META_FILE}: {key} is {meta[key]!r}, not {what}")
    budget = meta["budget"]
    if budget.get("unit") not in BUDGET_UNITS:
        raise DamagedRun(f"{META_FILE}: budget unit {budget.get('unit')!r} is none of {', '.join(BUDGET_UNITS)}")
    for key in ("total", "eval_every"):
        if not (_is_int(budget.get(key)) and budget[key] > 0):
            raise DamagedRun(f"{META_FILE}: budget {key} is {budget.get(key)!r}, not a positive integer")


def _loss_columns(frame: pd.DataFrame) -> list[str]:
    """Columns whose last value must be finite in a run whose outcome is "complete"."""
    return [c for c in frame.columns if c in ("train_loss", "val_loss") or c.startswith("val_")]


@dataclass
class RunCheck:
    """What ``check_run`` found in one run directory."""

    path: Path
    kind: str  # "good", "diverged", "incomplete" or "damaged"
    reason: str = ""
    meta: dict[str, Any] | None = None
    metrics: pd.DataFrame | None = None


def check_run(path: Path | str) -> RunCheck:
    """Read and check one run directory; never raises for what its files hold."""
    path = Path(path)
    try:
        meta = read_meta(path)
        if not (path / COMPLETE_FILE).exists():
            status = meta["status"]
            reason = status if status in UNFINISHED else f"status {status!r}, but no {COMPLETE_FILE} marker"
            return RunCheck(path, "incomplete", reason, meta)
        marker = read_complete_marker(path)
        _check_meta(meta)
        if meta["status"] != marker["outcome"]:
            raise DamagedRun(f"{META_FILE} says {meta['status']!r}, {COMPLETE_FILE} says {marker['outcome']!r}")
        frame = read_metrics(path)
        kind, reason = _check_rows(frame, meta, marker)
    except DamagedRun as error:
        return RunCheck(path, "damaged", str(error))
    except (OSError, ValueError) as error:  # anything else a broken file system or file can raise
        return RunCheck(path, "damaged", f"cannot be read ({type(error).__name__}: {error})")
    return RunCheck(path, kind, reason, meta, frame)


def _check_rows(frame: pd.DataFrame, meta: dict[str, Any], marker: dict[str, Any]) -> tuple[str, str]:
    """("good" | "diverged", reason) for metrics that agree with meta.json and COMPLETE."""
    rows, steps = len(frame), frame["step"].to_numpy(float)
    if rows != marker["rows"]:
        raise DamagedRun(f"{COMPLETE_FILE} says {marker['rows']} rows, {METRICS_FILE} holds {rows}")
    if steps[-1] != marker["last_step"]:
        raise DamagedRun(f"{COMPLETE_FILE} says the last step is {marker['last_step']}, {METRICS_FILE} ends at step {_number(steps[-1])}")
    if not (np.diff(steps) > 0).all():
        raise DamagedRun(f"{METRICS_FILE}: steps do not increase from row to row")
    for column in ("seed", "config_id"):
        if set(frame[column].astype(str)) != {str(meta[column])}:
            raise DamagedRun(f"{METRICS_FILE} holds rows of another run ({column} other than {meta[column]})")
    budget, expected = meta["budget"], meta["expected_rows"]
    if rows > expected:
        raise DamagedRun(f"{METRICS_FILE} holds {rows} rows, more than the {expected} its budget gives")
    if marker["outcome"] == "diverged":
        where = meta.get("diverged")
        if isinstance(where, dict) and "step" in where:
            return "diverged", f"diverged at step {where['step']} ({where.get('quantity', 'loss')} not finite)"
        return "diverged", "diverged (stopped on a non-finite loss or parameters)"
    if rows != expected:
        raise DamagedRun(f"{METRICS_FILE} holds {rows} rows; the whole budget ({budget['total']} {budget['unit']}s) gives {expected}")
    unit = "epoch" if budget["unit"] == "epoch" else "step"  # iteration budgets: one step per iteration
    end = frame[unit].iloc[-1]
    if end != budget["total"]:
        raise DamagedRun(f"the last row is at {unit} {_number(end)}, not at the end of the budget ({budget['total']})")
    last = frame.iloc[-1]
    for column in _loss_columns(frame):
        if not math.isfinite(last[column]):
            return "diverged", f"finished, but its last {column} is {last[column]}"
    return "good", ""


def _number(value: float) -> str:
    return str(int(value)) if np.isfinite(value) and value == int(value) else str(value)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def find_run_dirs(root: Path | str) -> list[Path]:
    """Every run directory under ``root`` (any depth, ``root`` itself included), sorted.
    Links to directories are followed; what the walk skips (a directory reached a second
    time through a link, which is also how a loop of links ends; a broken link; a folder
    that cannot be read; run directories inside hidden folders) is named in one warning
    line each (``walk_run_dirs`` returns it)."""
    found, skipped = walk_run_dirs(root)
    for issue in skipped:
        log.warning("skipped %s", issue)
    return found


def walk_run_dirs(root: Path | str) -> tuple[list[Path], list[RunIssue]]:
    """(run directories, what was skipped and why) under ``root``, as ``find_run_dirs``
    walks it. Hidden folders (Hydra's .hydra) are not read; run directories found in one
    are named as skipped."""
    root = Path(root)
    found: list[Path] = []
    skipped: list[RunIssue] = []
    seen: dict[tuple[int, int], Path] = {}

    def unreadable(error: OSError) -> None:
        path = Path(error.filename) if error.filename else root
        skipped.append(RunIssue(path, "skipped", f"cannot be read ({error.strerror or error})"))

    try:
        top = root.stat()
    except OSError:
        return [], []
    seen[(top.st_dev, top.st_ino)] = root
    for directory, subdirectories, files in os.walk(root, onerror=unreadable, followlinks=True):
        here = Path(directory)
        kept = []
        for name in sorted(subdirectories):
            path = here / name
            if name.startswith("."):
                hidden = _hidden_runs(path)
                if hidden:
                    skipped.append(RunIssue(path, "skipped", f"a hidden folder holding {hidden} run director{'ies' if hidden > 1 else 'y'} (hidden folders are not read)"))
                continue
            try:
                info = path.stat()
            except OSError as error:
                skipped.append(RunIssue(path, "skipped", f"cannot be read ({error.strerror or error})"))
                continue
            key = (info.st_dev, info.st_ino)
            if key in seen:
                skipped.append(RunIssue(path, "skipped", f"the same folder as {seen[key]}, already read (a second link, or a loop of links)"))
                continue
            seen[key] = path
            kept.append(name)
        subdirectories[:] = kept
        for name in files:
            path = here / name
            if path.is_symlink() and not path.exists():
                skipped.append(RunIssue(path, "skipped", f"a broken link (to {os.readlink(path)})"))
        if any(name in files for name in RUN_FILES):
            found.append(here)
    return sorted(found), skipped


def _hidden_runs(folder: Path) -> int:
    """How many run directories a hidden folder holds (Hydra's own .hydra holds none)."""
    return sum(1 for _, _, files in os.walk(folder) if META_FILE in files or COMPLETE_FILE in files)


def find_runs(root: Path | str) -> tuple[list[Path], list[Path]]:
    """(finished, unfinished) run directories under ``root``: with and without a COMPLETE
    marker. Nothing is checked; ``load_results`` does that."""
    finished, unfinished = [], []
    for path in find_run_dirs(root):
        (finished if (path / COMPLETE_FILE).exists() else unfinished).append(path)
    return finished, unfinished


def load_results(root: Path | str, pool: Sequence[str] = ()) -> Results:
    """Every run under ``root``, checked: good runs are aggregated, diverged ones counted,
    incomplete and damaged ones left out with one warning line each. Runs of several code
    versions or kernel levels are split by them unless ``pool`` names them (``PROVENANCE``)."""
    pool = check_pool(pool)
    found, skipped = walk_run_dirs(root)
    for issue in skipped:
        log.warning("skipped %s", issue)
    return _collect([check_run(path) for path in found], f"under {root}", pool, skipped)


def load_runs(paths: Sequence[Path | str], pool: Sequence[str] = ()) -> Results:
    """Exactly the given run directories (e.g. the runs one command just made, without
    the other configurations stored beside them), checked as ``load_results`` does."""
    pool = check_pool(pool)
    if not paths:
        raise ResultsError("no runs given")
    return _collect([check_run(path) for path in paths], f"among the {len(paths)} given", pool)


# --------------------------------------------------------------------------------------------
# Provenance: the code and the kernels that made a run's numbers
# --------------------------------------------------------------------------------------------

#: What besides its config tells two runs' numbers apart: the code version that ran them and
#: torch's kernel level (CPU instruction set, GPU model). Also the names ``pool`` takes.
PROVENANCE = ("code", "kernels")
PROVENANCE_NAMES = {"code": "code versions", "kernels": "kernel levels"}
UNKNOWN = "unknown"


def check_pool(pool: Sequence[str] | str | None) -> tuple[str, ...]:
    """``pool`` as a tuple of PROVENANCE names ("code,kernels" and "all" accepted)."""
    if pool is None:
        return ()
    if isinstance(pool, str):
        pool = [part.strip() for part in pool.split(",") if part.strip()]
    names = []
    for name in pool:
        if name == "all":
            names += PROVENANCE
        elif name in PROVENANCE:
            names.append(name)
        else:
            raise ResultsError(f"pool: {name!r} is none of {', '.join(PROVENANCE)} or all")
    return tuple(dict.fromkeys(names))


def segments(meta: dict[str, Any]) -> list[dict[str, Any]]:
    """The segments of a run, first to last: the one meta.json itself describes (from step
    0) and one per ``resumed`` entry, each with what was recorded of it (``step``, ``host``,
    ``git``, ``job``: the scheduler's job ids, ``cpu_capability``, ``gpu_model``)."""
    keys = ("host", "git", "job", "cpu_capability", "gpu_model")
    first = {"step": 0, **{key: meta[key] for key in keys if key in meta}}
    resumed = meta.get("resumed")
    return [first, *(entry for entry in (resumed if isinstance(resumed, list) else []) if isinstance(entry, dict))]


def code_version(git: Any) -> str:
    """A segment's code version: the commit's first 8 hex digits, "-dirty" where tracked
    files differed from it; "unknown" where none was recorded (no git, a copy of the files)."""
    commit = git.get("commit") if isinstance(git, dict) else None
    if not isinstance(commit, str) or not commit:
        return UNKNOWN
    return commit[:8] + ("-dirty" if git.get("dirty") else "")


def kernel_level(segment: dict[str, Any]) -> str:
    """A segment's kernel level: torch's cpu_capability, and the GPU model where it ran on one."""
    cpu = segment.get("cpu_capability")
    parts = [cpu if isinstance(cpu, str) and cpu else UNKNOWN]
    if isinstance(segment.get("gpu_model"), str) and segment["gpu_model"]:
        parts.append(segment["gpu_model"])
    return " / ".join(parts)


def provenance(meta: dict[str, Any]) -> dict[str, str]:
    """{"code": ..., "kernels": ...} of a run: the rule every reader (figures, summaries, the
    claims report, status) uses to keep apart what other code or kernels computed. A run
    whose segments differ has the set of its segments' values ("1a2b3c4d & 5e6f7a8b"), so
    it pools with neither version's runs. Segments that recorded nothing (resumptions by an
    older harness, which recorded no commit) add nothing."""
    parts = segments(meta)
    codes = [code_version(part["git"]) for part in parts if "git" in part]
    kernels = [kernel_level(part) for part in parts if "cpu_capability" in part or "gpu_model" in part]
    return {
        "code": " & ".join(dict.fromkeys(codes)) or UNKNOWN,
        "kernels": " & ".join(dict.fromkeys(kernels)) or UNKNOWN,
    }


def provenance_notes(results: Results) -> list[str]:
    """Lines a table or figure carries about its runs' code versions and kernel levels:
    which split the configurations, which were pooled on request, which runs are mixed."""
    notes = []
    for key, counts in results.provenance.items():
        listed = ", ".join(f"{value} ({n} run{'s' if n != 1 else ''})" for value, n in counts.items())
        if key in results.pooled:
            notes.append(f"Pooled across {PROVENANCE_NAMES[key]} on request (pool={key}): {listed}.")
        else:
            notes.append(f"Runs of {len(counts)} {PROVENANCE_NAMES[key]} are kept apart (labels say {key}=...; pool={key} pools them): {listed}.")
    if results.mixed:
        notes.append(f"{len(results.mixed)} run{'s' if len(results.mixed) > 1 else ''} resumed under other code or kernels, kept apart as their own set of versions.")
    return notes


#: Columns of Results.runs besides "label" and the identity keys.
RUN_FIELDS = ("run", "variant", "method", "legend_order", "baseline", "seed", "config_id")


def _collect(checks: Sequence[RunCheck], where: str, pool: tuple[str, ...] = (), skipped: Sequence[RunIssue] = ()) -> Results:
    incomplete = [RunIssue(c.path, "incomplete", c.reason, **_whose(c)) for c in checks if c.kind == "incomplete"]
    damaged = [RunIssue(c.path, "damaged", c.reason, **_whose(c)) for c in checks if c.kind == "damaged"]
    for issue in damaged + incomplete:
        log.warning("left out %s", issue)
    finished = [_run_record(c) for c in checks if c.kind in ("good", "diverged")]
    # Split first: a seed run under two code versions is two runs, not two copies of one.
    provenance_counts, mixed = _split_by_provenance(finished, pool)
    records, seen = [], {}
    for record in finished:
        key = (record["_configuration"], record["seed"])
        if key in seen:
            # The same configuration and seed stored twice (e.g. under two output names)
            # would count one seed twice.
            log.warning("left out %s: a second copy of the run in %s (same config and seed)", record["run"], seen[key])
            continue
        seen[key] = record["run"]
        records.append(record)
    good = [r for r in records if r["_kind"] == "good"]
    if not good:
        counts = [f"{n} {kind}" for kind, n in (
            ("diverged", len(records) - len(good)), ("damaged", len(damaged)), ("incomplete", len(incomplete))
        ) if n]
        raise ResultsError(
            f"no complete runs {where}" + (f" ({', '.join(counts)})" if counts else "")
            + "; run them first with python -m experiments.run"
        )
    varying, everywhere = _varying_keys(pd.DataFrame([{k: v for k, v in r.items() if k != "_metrics"} for r in records]))
    # Legend order: the method's legend_order (base optimizer first), then the swept values.
    records.sort(key=lambda r: (r["legend_order"], r["variant"], *(_sort_key(r.get(k)) for k in varying), r["seed"]))
    labels = _labels(records, varying, everywhere)
    for record in records:
        record["label"] = labels[record["_configuration"]]
    diverged = []
    for record in records:
        if record["_kind"] == "diverged":
            diverged.append(RunIssue(Path(record["run"]), "diverged", record["_reason"], record["label"], record["seed"]))
            log.warning("not averaged: %s", diverged[-1])
    good = [r for r in records if r["_kind"] == "good"]
    runs = pd.DataFrame([{k: v for k, v in r.items() if not k.startswith("_")} for r in good])
    for key in pool:  # what each run was, where runs were pooled across it
        if key in provenance_counts:
            runs[key] = [r["_provenance"][key] for r in good]
    metrics = pd.concat([r["_metrics"].assign(run=r["run"], label=r["label"]) for r in good], ignore_index=True)
    return Results(metrics, runs, varying, _configurations(records), diverged, incomplete, damaged,
                   list(skipped), provenance_counts, tuple(k for k in pool if k in provenance_counts), mixed,
                   {r["label"]: r["_budget"] for r in records})


def _whose(check: RunCheck) -> dict[str, Any]:
    """Variant, config_id and seed of a run left out: from meta.json where it says, else from
    the directory's name (``<variant>-<config_id>/seed=<seed>``)."""
    meta = check.meta or {}
    variant, _, config_id = check.path.parent.name.rpartition("-")
    seed = check.path.name.removeprefix("seed=")
    found = {"variant": variant or None, "config_id": config_id or None, "seed": int(seed) if seed.isdigit() else None}
    for key, valid in (("variant", str), ("config_id", str), ("seed", int)):
        if isinstance(meta.get(key), valid) and not isinstance(meta.get(key), bool):
            found[key] = meta[key]
    return found


def _split_by_provenance(records: list[dict], pool: tuple[str, ...]) -> tuple[dict[str, dict[str, int]], list[RunIssue]]:
    """Give each record the provenance keys whose values differ among the finished runs
    (unless pooled), as part of its configuration; return the counts per value of each key
    that differs, and the runs whose segments differ. Logs one warning line per split."""
    found = {key: {} for key in PROVENANCE}
    mixed = []
    for record in records:
        for key, value in record["_provenance"].items():
            found[key][value] = found[key].get(value, 0) + 1
        if any(" & " in value for value in record["_provenance"].values()):
            mixed.append(RunIssue(Path(record["run"]), "mixed", ", ".join(f"{k}={v}" for k, v in record["_provenance"].items() if " & " in v)))
    differing = {key: dict(sorted(counts.items())) for key, counts in found.items() if len(counts) > 1}
    for key, counts in differing.items():
        listed = ", ".join(f"{value}: {n}" for value, n in counts.items())
        if key in pool:
            log.warning("pooled on request: runs of %d %s (%s)", len(counts), PROVENANCE_NAMES[key], listed)
            continue
        log.warning("runs of %d %s (%s) are kept apart: labels say %s=...; pool=%s pools them", len(counts), PROVENANCE_NAMES[key], listed, key, key)
        for record in records:
            record[key] = record["_provenance"][key]
            record["_configuration"] = (*record["_configuration"], f"{key}={record[key]}")
    for issue in mixed:
        log.warning("%s: resumed under other %s", issue.path, issue.reason)
    return differing, mixed


def _run_record(check: RunCheck) -> dict:
    meta = check.meta
    # Lists (betas, milestones) are compared and shown as JSON text.
    identity = {key: json.dumps(v) if isinstance(v, (list, dict)) else v for key, v in meta["identity"].items()}
    return {
        "run": str(check.path),
        **{name: meta[name] for name in RUN_FIELDS[1:]},
        **{key: value for key, value in identity.items() if key not in RUN_FIELDS},
        # Runs whose recorded identity differs are different configurations even if the
        # writer gave them one config_id: nothing is pooled that the files tell apart.
        "_configuration": (meta["config_id"], json.dumps(meta["identity"], sort_keys=True, default=str)),
        "_provenance": provenance(meta),
        "_budget": (meta["budget"]["unit"], meta["budget"]["total"]),
        "_kind": check.kind,
        "_reason": check.reason,
        "_metrics": check.metrics,
    }


def _identity_keys(frame: pd.DataFrame | dict) -> list[str]:
    """The identity keys among a frame's columns (or a record's keys)."""
    names = frame.columns if isinstance(frame, pd.DataFrame) else frame.keys()
    return [c for c in names if c not in (*RUN_FIELDS, *CONFIGURATION_COUNTS, "label") and not c.startswith("_")]


def _varying_keys(records: pd.DataFrame) -> tuple[list[str], list[str]]:
    """(varying, everywhere): identity keys that tell configurations apart. A method's own
    keys (``method.*``) count where they vary among one variant's configurations; any
    other key (the learning rate, the budget, the data file) where it varies among all of
    them, and is then shown in every label, so that no comparison across variants hides
    that the two ran on other data or settings."""
    configs = records.drop_duplicates("_configuration")
    varying, everywhere = [], []
    for key in _identity_keys(configs):
        if not key.startswith("method."):
            if configs[key].nunique(dropna=False) > 1:
                everywhere.append(key)
                varying.append(key)
        elif (configs.groupby("variant")[key].nunique(dropna=False) > 1).any():
            varying.append(key)
    return varying, everywhere


def _is_data_key(key: str) -> bool:
    return key.startswith("data.") and key.endswith(DATA_KEY_SUFFIX)


def label_key(key: str) -> str:
    """An identity key as a label shows it: "method.aadl.history" -> "history"."""
    parts = key.split(".")
    if parts[0] == "method" and len(parts) > 2:
        return ".".join(parts[2:])
    for prefix in LABEL_PREFIXES:
        key = key.removeprefix(prefix)
    return key


def _labels(records: list[dict], varying: list[str], everywhere: list[str]) -> dict[tuple, str]:
    """Configuration -> label: the variant, its method's keys that vary among its
    configurations, the other keys that vary at all, the data file where there are
    several. A label two configurations would share gets their config_id."""
    configs = pd.DataFrame([{k: r.get(k) for k in ("_configuration", "variant", *varying)} for r in records]).drop_duplicates("_configuration")
    own = {
        variant: [k for k in varying if k not in everywhere and group[k].nunique(dropna=False) > 1]
        for variant, group in configs.groupby("variant")
    }
    data_keys = [k for k in everywhere if _is_data_key(k)]
    labels: dict[tuple, str] = {}
    for record in records:
        if record["_configuration"] in labels:
            continue
        keys = own[record["variant"]] + [k for k in everywhere if k not in data_keys]
        parts = [f"{label_key(k)}={record[k]}" for k in keys if not _missing(record.get(k))]
        parts += [f"data: {k[len('data.'):-len(DATA_KEY_SUFFIX)]} {str(record[k])[:8]}" for k in data_keys if not _missing(record.get(k))]
        labels[record["_configuration"]] = record["variant"] + (f" ({', '.join(parts)})" if parts else "")
    counts = pd.Series(list(labels.values())).value_counts()
    for configuration, label in labels.items():
        if counts[label] > 1:
            labels[configuration] = f"{label} [config {configuration[0]}]"
    return labels


CONFIGURATION_COUNTS = ("seeds", "diverged")  # columns of Results.configurations


def _configurations(records: list[dict]) -> pd.DataFrame:
    rows: dict[str, dict] = {}
    for record in records:
        row = rows.setdefault(record["label"], {
            "label": record["label"],
            **{name: record[name] for name in ("variant", "method", "legend_order", "baseline", "config_id")},
            **{key: record[key] for key in _identity_keys(record)},
            **dict.fromkeys(CONFIGURATION_COUNTS, 0),
        })
        row["seeds" if record["_kind"] == "good" else "diverged"] += 1
    return pd.DataFrame(list(rows.values()))


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def _sort_key(value: object) -> tuple:
    """Missing values first, then numbers by value, then anything else as text."""
    if _missing(value):
        return (0, 0.0, "")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (1, float(value), "")
    return (2, 0.0, str(value))


# --------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------


def _require_numeric(results: Results, *columns: str) -> None:
    for column in columns:
        if column not in results.metrics:
            raise ResultsError(f"the runs' metrics have no column {column!r}; they have {', '.join(results.metrics.columns)}")
        if not pd.api.types.is_numeric_dtype(results.metrics[column]):
            raise ResultsError(f"metrics column {column!r} does not hold numbers")


def curves(results: Results, metric: str = "val_loss", x: str = "epoch") -> pd.DataFrame:
    """Per label and ``x``: runs, mean and CI of ``metric`` over the good runs (diverged
    runs are not in ``results.metrics``; a non-finite point, such as the first row's
    train_loss, is left out of its point and ``runs`` says so)."""
    _require_numeric(results, metric, x)
    frame = results.metrics[["label", x, metric]].copy()
    frame.loc[~np.isfinite(frame[metric]), metric] = np.nan
    grouped = frame.groupby(["label", x], sort=True)[metric]
    out = grouped.agg(runs="count", mean="mean", std="std").reset_index()
    half = _half_width(out["std"].to_numpy(), out["runs"].to_numpy(), CONFIDENCE)
    out["low"], out["high"] = out["mean"] - half, out["mean"] + half
    return out.drop(columns="std")


def per_run(results: Results, metric: str = "val_loss", x: str = "epoch", threshold: float | None = None) -> pd.DataFrame:
    """One row per good run: the last row's ``metric`` (as it is: never an earlier, finite
    one), the best finite ``metric`` and, given a threshold, the first ``x`` at which
    ``metric <= threshold`` (NaN if never)."""
    _require_numeric(results, metric, x)
    frame = results.metrics.sort_values(["run", "step"], kind="stable")
    last = frame.drop_duplicates("run", keep="last").set_index("run")[metric]
    best = frame[metric].where(np.isfinite(frame[metric])).groupby(frame["run"]).min()
    out = pd.DataFrame({"final": last, "best": best.reindex(last.index)})
    if threshold is not None:
        reached = frame[frame[metric] <= threshold].groupby("run", sort=False)[x].first()
        out["reach"] = reached.reindex(out.index)
    # reindex: a varying key only configurations without good runs have is not a column of runs.
    return out.join(results.runs.set_index("run").reindex(columns=["label", "variant", "seed", *results.varying]))


def baseline_label(results: Results) -> str | None:
    """The label of the only baseline configuration (``baseline: true`` in meta.json: the
    base optimizer alone), if there is exactly one."""
    plain = results.configurations[results.configurations["baseline"]]["label"].tolist()
    return plain[0] if len(plain) == 1 else None


def baselines(results: Results) -> dict[str, str]:
    """label -> the baseline configuration it is compared with. It must be on the same
    data (``data.*.sha256``), code version and kernel level (where runs are split by them);
    with several baseline configurations (e.g. one per learning rate) it is the one whose
    identity agrees on every key outside ``method.*``.
    Configurations without such a baseline get no ratio."""
    configs = results.configurations
    plain = configs[configs["baseline"]]
    keys = [k for k in _identity_keys(configs) if not k.startswith("method.")]
    # Within one code version and kernel level only, where runs are split by them.
    shared = keys if len(plain) > 1 else [k for k in keys if _is_data_key(k) or k in PROVENANCE]
    out = {}
    for _, config in configs.iterrows():
        matches = [b["label"] for _, b in plain.iterrows() if all(_same(config[k], b[k]) for k in shared)]
        if len(matches) == 1:
            out[config["label"]] = matches[0]
    return out


def _same(a: object, b: object) -> bool:
    return (_missing(a) and _missing(b)) or (not _missing(a) and not _missing(b) and a == b)


def summary(
    results: Results,
    metric: str = "val_loss",
    x: str = "epoch",
    threshold: float | None = None,
    baseline: str | None = None,
    also: Sequence[str] = (),
) -> pd.DataFrame:
    """One row per configuration: how many good runs it rests on (``runs``) and how many
    diverged (``diverged``); final and best ``metric`` (mean, CI), ``x`` to reach
    ``threshold`` (mean, CI over the runs that reach it, and how many did), the ratio of
    the baseline's final ``metric`` to this configuration's, and the final value (mean,
    CI) of each metric in ``also`` (e.g. val_rel_l2 beside a PINN's val_loss).

    Only good runs with finite final values of ``metric`` and of every ``also`` metric
    enter a row; the others are counted as diverged. The ratio is paired by seed: the
    geometric mean of the per-seed ratios over the seeds both configurations have, with
    its CI taken in log space (ratios are skewed; logs are not), so > 1 means lower than
    the baseline; ``baseline_pairs`` says how many seeds it rests on. Where code versions or
    kernel levels were pooled, a ``code``/``kernels`` column lists the values each row pools.
    """
    runs = per_run(results, metric, x, threshold)
    for name in also:
        runs[f"final_{name}"] = per_run(results, name, x)["final"]
    finals = runs[["final", *(f"final_{name}" for name in also)]].to_numpy(float)
    counted = runs[np.isfinite(finals).all(axis=1)]
    lost = runs[~np.isfinite(finals).all(axis=1)].groupby("label").size()
    if baseline is not None:
        if baseline not in results.labels:
            raise ResultsError(f"no configuration labelled {baseline!r}; there are {', '.join(results.labels)}")
        compared = dict.fromkeys(results.labels, baseline)
    else:
        compared = baselines(results)
    rows = []
    for _, config in results.configurations.iterrows():
        label = config["label"]
        group = counted[counted.label == label]
        row: dict = {"label": label, "variant": config["variant"]}
        row.update({key: config[key] for key in results.varying})
        for key in results.pooled:  # the values pooled in this row, so the CSV says it too
            row[key] = " + ".join(sorted(set(results.runs.loc[results.runs["label"] == label, key]))) + " (pooled)"
        row["runs"] = len(group)
        row["diverged"] = int(config["diverged"] + lost.get(label, 0))
        row.update(_interval_columns("final", t_interval(group.final)))
        row.update(_interval_columns("best", t_interval(group.best)))
        if threshold is not None:
            row.update(_interval_columns(f"{x}s_to_threshold", t_interval(group.reach)))
            row["reached_threshold"] = f"{int(group.reach.notna().sum())}/{len(group)}"
        if compared:
            base = counted[counted.label == compared.get(label)].set_index("seed")["final"]
            with np.errstate(invalid="ignore", divide="ignore"):
                logs = np.log(base.reindex(group.seed).to_numpy() / group.final.to_numpy())
            logs = logs[np.isfinite(logs)]  # seeds the baseline lacks (left out, diverged)
            row.update(_interval_columns("baseline_ratio", np.exp(t_interval(logs))))
            row["baseline_pairs"] = len(logs)
        for name in also:
            row.update(_interval_columns(f"final_{name}", t_interval(group[f"final_{name}"])))
        rows.append(row)
    table = pd.DataFrame(rows)
    targets = set(compared.values())
    shown = targets.pop() if len(targets) == 1 else ("the base optimizer" if targets else None)
    table.attrs.update(metric=metric, x=x, threshold=threshold, baseline=shown, also=list(also), pooled=list(results.pooled))
    return table


def _interval_columns(stem: str, interval: Sequence[float]) -> dict[str, float]:
    return dict(zip((f"{stem}_mean", f"{stem}_low", f"{stem}_high"), map(float, interval)))


# --------------------------------------------------------------------------------------------
# Presentation
# --------------------------------------------------------------------------------------------


def format_summary(table: pd.DataFrame) -> pd.DataFrame:
    """The summary for reading: ``mean [low, high]`` text under descriptive headers, and
    ``diverged`` as "k/N" (N: the good and diverged runs of the configuration). The CSV
    keeps the numbers, one column each."""
    metric = table.attrs.get("metric", "metric")
    x = table.attrs.get("x", "epoch")
    out = pd.DataFrame({"configuration": table["label"], "seeds": table["runs"]})
    out["diverged"] = [f"{d}/{n + d}" for n, d in zip(table["runs"], table["diverged"])]
    out[f"final {metric}"] = _intervals(table, "final")
    for name in table.attrs.get("also", []):  # next to the main metric: read together
        out[f"final {name}"] = _intervals(table, f"final_{name}")
    out[f"best {metric}"] = _intervals(table, "best")
    reach = f"{x}s_to_threshold"
    if f"{reach}_mean" in table:
        out[f"{x}s to {metric} <= {_cell(table.attrs.get('threshold'))}"] = _intervals(table, reach)
        out["reached"] = table["reached_threshold"]
    if "baseline_ratio_mean" in table:
        out[f"final {metric} of {table.attrs.get('baseline') or 'baseline'} / this"] = _intervals(table, "baseline_ratio")
    return out


def _intervals(table: pd.DataFrame, stem: str) -> list[str]:
    return [
        _format_interval(m, lo, hi)
        for m, lo, hi in zip(table[f"{stem}_mean"], table[f"{stem}_low"], table[f"{stem}_high"])
    ]


def to_markdown(frame: pd.DataFrame) -> str:
    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "| " + " | ".join("---" for _ in frame.columns) + " |"
    body = ["| " + " | ".join(_cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body]) + "\n"


def _format_interval(mean: float, low: float, high: float) -> str:
    if not np.isfinite(mean):
        return "n/a"
    if not np.isfinite(low):
        return f"{mean:.4g}"
    return f"{mean:.4g} [{low:.4g}, {high:.4g}]"


def _cell(value: object) -> str:
    if isinstance(value, float):
        return "n/a" if np.isnan(value) else f"{value:.4g}"
    return str(value)


def left_out_notes(results: Results, table: pd.DataFrame | None = None) -> list[str]:
    """Lines a figure or table carries about the runs it does not show: "k of N seeds
    diverged" per configuration (from ``table``'s counts where given), how many damaged
    and incomplete runs were left out and folders not read, and how code versions and
    kernel levels were split or pooled (``provenance_notes``)."""
    counts = table if table is not None else results.configurations.rename(columns={"seeds": "runs"})
    notes = [
        f"{label}: {d} of {n + d} seeds diverged (not in the means)"
        for label, n, d in zip(counts["label"], counts["runs"], counts["diverged"]) if d
    ]
    left = [f"{len(runs)} {kind}" for kind, runs in (("damaged", results.damaged), ("incomplete", results.incomplete)) if runs]
    if left:
        notes.append(f"Left out: {' and '.join(left)} run{'s' if len(results.damaged) + len(results.incomplete) > 1 else ''} (named in the warnings).")
    if results.skipped:
        notes.append(f"Not read: {len(results.skipped)} folder{'s' if len(results.skipped) > 1 else ''} (reached twice through links, broken links, unreadable, or hidden folders holding runs; named in the warnings).")
    return notes + provenance_notes(results)


def coverage_notes(results: Results, seeds: Sequence[int] | None = None, variants: Sequence[str] = ()) -> list[str]:
    """Lines naming what a partial sweep lacks: each configuration's missing seeds (of
    ``seeds`` and every seed any run found has, finished or not), with why (incomplete,
    damaged, or not run), and each variant without a finished run (of ``variants`` and
    those only unfinished or damaged runs have). Seeds a configuration ran under another
    code version or kernel level count as present (the split is noted apart)."""
    issues = results.incomplete + results.damaged
    expected = set(seeds or ()) | set(results.runs["seed"]) | {i.seed for i in results.diverged + issues if i.seed is not None}
    configs = results.configurations
    notes = []
    for config_id, group in configs.groupby("config_id", sort=False):
        labels = group["label"].tolist()
        have = set(results.runs.loc[results.runs["label"].isin(labels), "seed"]) | {i.seed for i in results.diverged if i.label in labels}
        lacking = sorted(expected - have)
        if lacking:
            why = {seed: next((i.kind for i in issues if i.config_id == config_id and i.seed == seed), "not run") for seed in lacking}
            notes.append(f"{labels[0] if len(labels) == 1 else _without_provenance(labels[0])}: {_seed_reasons(why)}")
    present = set(configs["variant"])
    for variant in dict.fromkeys([*variants, *(i.variant for i in issues if i.variant)]):
        if variant in present:
            continue
        why = {seed: "not run" for seed in expected}
        why.update({i.seed: i.kind for i in issues if i.variant == variant and i.seed is not None})
        notes.append(f"{variant}: no finished run ({_seed_reasons(why)})")
    return [f"Missing: {'; '.join(notes)}."] if notes else []


def _without_provenance(label: str) -> str:
    """A label without its code=/kernels= parts: "Adam (kernels=AVX2)" -> "Adam"."""
    label = re.sub(rf"(, )?\b({'|'.join(PROVENANCE)})=[^,)]*", "", label).replace("(, ", "(")
    return label.replace(" ()", "")


def _seed_reasons(why: dict[int, str]) -> str:
    """{seed: reason} as "seeds 3, 5-9 not run, seed 4 incomplete"."""
    parts = []
    for reason in dict.fromkeys(why[seed] for seed in sorted(why)):
        chosen = sorted(seed for seed in why if why[seed] == reason)
        parts.append(f"seed{'s' if len(chosen) > 1 else ''} {seed_ranges(chosen)} {reason}")
    return ", ".join(parts)


def seed_ranges(seeds: Sequence[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2, 5, 7-8"."""
    ranges: list[list[int]] = []
    for seed in sorted(set(seeds)):
        if ranges and seed == ranges[-1][1] + 1:
            ranges[-1][1] = seed
        else:
            ranges.append([seed, seed])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in ranges)
