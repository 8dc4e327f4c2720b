"""Checkpoints of a training run: atomic files that ``torch.load(weights_only=True)`` reads.

A checkpoint holds the whole :class:`experiments.training.TrainingState` (model, optimizer
with the method's state, position in the budget and within the unit, loss accumulators),
the problem's data-order state, every RNG (Python, numpy, torch, CUDA), the metrics rows
written so far and what it was made for (config_id, world size, rank). It is written to a
temporary file, fsynced and renamed, so a kill at any moment leaves either the previous
checkpoint or the new one, never half of one. Everything is checked before anything is
restored, and a checkpoint from another config or world size is refused naming what differs.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from experiments.errors import HarnessError

FORMAT = 1
DIRECTORY = "checkpoints"
_NAME = re.compile(r"step-(\d+)(?:-rank(\d+))?\.pt$")


class CheckpointError(HarnessError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


def checkpoint_path(run_dir: Path, step: int, rank: int | None = None) -> Path:
    suffix = "" if rank is None else f"-rank{rank}"
    return Path(run_dir) / DIRECTORY / f"step-{step:09d}{suffix}.pt"


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
    """Write ``payload`` atomically: temp file, fsync, rename, fsync of the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp")
    with open(temp, "wb") as handle:
        torch.save({"format": FORMAT, **payload}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def prune(run_dir: Path, keep: int, rank: int | None = None) -> None:
    """Delete all but the newest ``keep`` checkpoints of this rank."""
    for old in list_checkpoints(run_dir, rank)[:-keep]:
        old.unlink(missing_ok=True)


def load(path: Path, *, expected: dict[str, Any]) -> dict[str, Any]:
    """Read a checkpoint and check it was made for ``expected`` (config_id, world_size, rank)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many kinds for a damaged file
        raise CheckpointError(
            f"{path}: cannot be read as a checkpoint ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
            "delete it to resume from the one before, or rerun with output.overwrite=true"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: not a checkpoint of format {FORMAT} (found {payload.get('format') if isinstance(payload, dict) else type(payload).__name__}); "
            "rerun with output.overwrite=true"
        )
    differs = [f"{key} {payload.get(key)!r} (this run: {value!r})" for key, value in expected.items() if payload.get(key) != value]
    if differs:
        raise CheckpointError(
            f"{path}: made for a different run: " + ", ".join(differs)
            + "; a sharded history cannot be re-sharded onto another world size: resume with the same "
            "number of processes, or rerun with output.overwrite=true"
        )
    return payload


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
