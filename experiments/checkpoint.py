"""Checkpoints of a training run: verified files that ``torch.load(weights_only=True)`` reads.

A checkpoint holds the whole :class:`experiments.training.TrainingState` (model, optimizer
with the method's state, position in the budget and within the unit, loss accumulators),
the problem's data-order state, every RNG (Python, numpy, torch, CUDA), the metrics rows
written so far and what it was made for (config_id, world size, rank). It is written by
:func:`experiments.atomic.write_atomically`, so a kill at any moment leaves either the
previous checkpoint or the new one, never half of one.

Nothing is restored from bytes that were not verified. A checkpoint is torch's zip archive,
in which every record (the pickle and each tensor's storage) carries the CRC-32 of its
content; torch does not check them when it loads, :func:`verify` does, with Python's
zipfile, before anything is read (a flipped byte, a truncated or empty file all fail it).
Checkpoints of every harness version carry these CRCs, so older ones are verified alike.
:func:`resume` picks the newest step of which every rank holds an intact copy: damaged
copies are set aside (renamed ``*.damaged``) and copies of steps that not every rank
holds intact are deleted, each named in one warning line; where checkpoints exist but none
can be resumed, every rank raises the same one-line CheckpointError naming what to do. A
checkpoint from another config or world size is refused naming what differs.
"""

from __future__ import annotations

import random
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from experiments.atomic import write_atomically
from experiments.errors import HarnessError

FORMAT = 1
DIRECTORY = "checkpoints"
#: Appended to the name of a damaged checkpoint that a run fell back from.
DAMAGED_SUFFIX = ".damaged"
_NAME = re.compile(r"step-(\d+)(?:-rank(\d+))?\.pt$")


class CheckpointError(HarnessError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


def checkpoint_path(run_dir: Path, step: int, rank: int | None = None) -> Path:
    suffix = "" if rank is None else f"-rank{rank}"
    return Path(run_dir) / DIRECTORY / f"step-{step:09d}{suffix}.pt"


def step_of(path: Path) -> int:
    match = _NAME.match(Path(path).name)
    if match is None:
        raise ValueError(f"{path} is not named as a checkpoint (step-<step>[-rank<r>].pt)")
    return int(match.group(1))


def list_checkpoints(run_dir: Path, rank: int | None = None) -> list[Path]:
    """This rank's checkpoints of the run, oldest first."""
    folder = Path(run_dir) / DIRECTORY
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _NAME.match(path.name)
        if match and (match.group(2) is None) == (rank is None) and (rank is None or int(match.group(2)) == rank):
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def any_checkpoints(run_dir: Path) -> list[Path]:
    """Every checkpoint file of the run, whatever rank or world size wrote it."""
    folder = Path(run_dir) / DIRECTORY
    return sorted(p for p in folder.glob("step-*.pt") if _NAME.match(p.name)) if folder.is_dir() else []


def save(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` atomically, with the CRC-32 of every record that :func:`verify` checks."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda handle: _save_with_crcs({"format": FORMAT, **payload}, handle))


def _save_with_crcs(payload: dict[str, Any], handle: Any) -> None:
    # torch lets a process switch the CRCs off (set_crc32_options); a checkpoint always has them.
    serialization = torch.serialization
    if not hasattr(serialization, "get_crc32_options") or serialization.get_crc32_options():
        torch.save(payload, handle)
        return
    serialization.set_crc32_options(True)
    try:
        torch.save(payload, handle)
    finally:
        serialization.set_crc32_options(False)


def prune(run_dir: Path, keep: int, rank: int | None = None) -> None:
    """Delete all but the newest ``keep`` checkpoints of this rank."""
    for old in list_checkpoints(run_dir, rank)[:-keep]:
        old.unlink(missing_ok=True)


def verify(path: Path) -> Optional[str]:
    """None where ``path`` is a whole torch archive every record of which matches its
    CRC-32; else what is wrong with it, in a few words."""
    try:
        if Path(path).stat().st_size == 0:
            return "empty file (0 bytes)"
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
            if not any(record.filename.endswith("/data.pkl") for record in records):
                return "no data.pkl record: not a torch checkpoint"
            for record in records:
                with archive.open(record) as content:  # zipfile checks the CRC-32 at the end
                    while content.read(1 << 22):
                        pass
    except Exception as error:  # zipfile raises BadZipFile, EOFError, OSError, struct.error...
        return _one_line(error)
    return None


def load(path: Path, *, expected: dict[str, Any], verified: bool = False) -> dict[str, Any]:
    """Read a checkpoint (verified first unless ``verified``) and check it was made for
    ``expected`` (config_id, world_size, rank...)."""
    start_again = f"delete {path.parent} to train this run from the start"
    damage = None if verified else verify(path)
    if damage is not None:
        raise CheckpointError(f"{path}: damaged ({damage}); {start_again}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # intact, yet torch cannot read it: another harness or torch
        raise CheckpointError(f"{path}: cannot be read as a checkpoint ({_one_line(error)}); {start_again}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{path}: not a checkpoint of format {FORMAT} (found {found}); {start_again}")
    differs = [f"{key} {payload.get(key)!r} (this run: {value!r})" for key, value in expected.items() if payload.get(key) != value]
    if differs:
        advice = start_again
        if payload.get("world_size") != expected.get("world_size", payload.get("world_size")):
            # The sharded history and each rank's RNGs do not re-shard onto another world size.
            advice = f"resume it with {payload.get('world_size')} process(es), as it was started, or {start_again}"
        raise CheckpointError(f"{path}: made for a different run: " + ", ".join(differs) + f"; {advice}")
    return payload


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__


# -- choosing the checkpoint to resume from --------------------------------------------------


@dataclass(frozen=True)
class ResumePlan:
    """What :func:`plan_resume` decided from every rank's report (index = rank)."""

    step: Optional[int]  # the newest step of which every rank holds an intact copy
    damaged: list[tuple[int, int, str]] = field(default_factory=list)  # (step, rank, why)
    orphans: list[tuple[int, int]] = field(default_factory=list)  # intact copies of unusable steps


def scan(run_dir: Path, rank: int | None = None) -> dict[int, Optional[str]]:
    """This rank's checkpoints: step -> None where the copy is intact, else why not."""
    return {step_of(path): verify(path) for path in list_checkpoints(run_dir, rank)}


def plan_resume(reports: Sequence[dict[int, Optional[str]]]) -> ResumePlan:
    """The newest step that every rank's report holds intact; the damaged copies; the
    intact copies of every other step (a rank killed between two ranks' renames, or a step
    another rank's copy of which is damaged), which nothing can resume from."""
    intact = [{step for step, damage in report.items() if damage is None} for report in reports]
    usable = set.intersection(*intact) if intact else set()
    damaged = [(step, rank, damage) for rank, report in enumerate(reports) for step, damage in sorted(report.items()) if damage]
    orphans = [(step, rank) for rank, steps in enumerate(intact) for step in sorted(steps - usable)]
    return ResumePlan(max(usable) if usable else None, damaged, orphans)


def resume(
    run_dir: Path, *, expected: dict[str, Any], rank: int | None = None, parallel: Any = None,
) -> tuple[Optional[dict[str, Any]], list[str]]:
    """The checkpoint this rank resumes ``run_dir`` from (None: start from step 0) and the
    warning lines to log, one per damaged copy set aside and per unusable step deleted.

    ``rank``: this process's rank in the file names (None for one process); ``parallel``
    (with ``all_gather`` and ``broadcast``) makes every rank verify its own copies and
    follow rank 0's decision, so the ranks resume from the same step or all raise the same
    CheckpointError. ``expected`` is what the checkpoint must have been made for."""
    gather = parallel.all_gather if parallel is not None else (lambda value: [value])
    broadcast = parallel.broadcast if parallel is not None else (lambda value: value)
    reports = gather(scan(run_dir, rank))
    names = [None] if rank is None else list(range(len(reports)))  # the rank part of the file names
    decision = broadcast(_decide(Path(run_dir), reports, names, expected) if rank in (None, 0) else None)
    if decision["error"]:
        raise CheckpointError(decision["error"])
    payload = None
    if decision["step"] is not None:
        try:
            payload, error = load(checkpoint_path(run_dir, decision["step"], rank), expected=expected, verified=True), None
        except CheckpointError as refused:
            error = str(refused)
        errors = [message for message in gather(error) if message]
        if errors:  # refused before anything is moved
            raise CheckpointError(errors[0])
    mine = names.index(rank)
    for step, owner, _ in decision["damaged"]:
        if owner == mine:
            path = checkpoint_path(run_dir, step, rank)
            path.replace(path.with_name(path.name + DAMAGED_SUFFIX))
    for step, owner in decision["orphans"]:
        if owner == mine:
            checkpoint_path(run_dir, step, rank).unlink(missing_ok=True)
    return payload, decision["notes"]


def _decide(run_dir: Path, reports: list[dict[int, Optional[str]]], names: list[Optional[int]], expected: dict[str, Any]) -> dict[str, Any]:
    """Rank 0's decision from every rank's report (see :func:`resume`)."""
    plan = plan_resume(reports)
    folder = run_dir / DIRECTORY
    start_again = f"delete {folder} to train this run from the start"
    decision: dict[str, Any] = {"step": plan.step, "error": None, "damaged": [], "orphans": [], "notes": []}
    ours = {checkpoint_path(run_dir, step, names[rank]) for rank, report in enumerate(reports) for step in report}
    # Files no rank of this run would write (another world size), and the intact copies of
    # unusable steps when nothing else is left, are checked for what they were made for
    # first: a run of another world size is refused, never restarted over its checkpoints.
    suspects = [path for path in any_checkpoints(run_dir) if path not in ours]
    if plan.step is None:
        suspects += [checkpoint_path(run_dir, step, names[rank]) for step, rank in plan.orphans]
    identity = {key: value for key, value in expected.items() if key != "rank"}
    for path in sorted(suspects, key=step_of, reverse=True):
        if verify(path) is None:
            try:
                load(path, expected=identity, verified=True)
            except CheckpointError as refused:
                decision["error"] = str(refused)
                return decision
            break
    if plan.step is None and plan.damaged:
        listed = "; ".join(f"{checkpoint_path(run_dir, step, names[rank]).name}: {why}" for step, rank, why in plan.damaged)
        decision["error"] = f"{folder}: no intact checkpoint to resume from ({listed}); {start_again}"
        return decision
    target = f"resuming from step {plan.step}" if plan.step is not None else "starting from step 0"
    for step, rank, why in plan.damaged:
        path = checkpoint_path(run_dir, step, names[rank])
        decision["notes"].append(f"{path}: damaged ({why}); set aside as {path.name}{DAMAGED_SUFFIX}, {target}")
    for step in sorted({step for step, _ in plan.orphans}):
        holders = [names[rank] for orphan, rank in plan.orphans if orphan == step]
        missing = [names[rank] for rank, report in enumerate(reports) if report.get(step, "missing") is not None]
        decision["notes"].append(
            f"{folder}: step {step} has no intact copy of rank(s) {', '.join(map(str, missing))}; "
            f"deleted the copies of rank(s) {', '.join(map(str, holders))}, {target}"
        )
    decision["damaged"] = plan.damaged
    decision["orphans"] = plan.orphans
    return decision


# -- random number generators ------------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    """Every RNG state as tensors and plain values (what weights_only loading accepts)."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    version, state, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": version, "state": list(state), "gauss": gauss},
    }


def restore_rng(saved: dict[str, Any]) -> None:
    torch.set_rng_state(saved["torch"])
    if saved["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda"])
    n = saved["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["position"], n["has_gauss"], n["cached"]))
    p = saved["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
