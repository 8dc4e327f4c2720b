"""How many bytes the wrapper's buffers take, and a clear error when they do not fit.

AADL preallocates everything it needs (aadl.optimizer, ``_build``), so its memory is known
before a single buffer exists. :func:`estimate_memory_bytes` is that sum, usable before
building an optimizer (to size ``history`` for a model); the optimizer itself uses it to
refuse, in one line, a request that no allocation could satisfy, instead of dying in the
kernel's OOM killer halfway through zero-filling the history.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Mapping
from typing import Any

import torch

from .hyperparameters import AndersonSettings, validate_settings

GRAM_ELEMENT = 8  # the Gram matrix and dR^T r_s are float64, whatever the parameters' dtype
# torch.OutOfMemoryError is torch >= 2.5; torch.cuda's name for it is older.
_OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def pool_size(settings: AndersonSettings) -> int:
    """n-vectors in the rotating pool: four, five when some accelerating step stores
    nothing (p not a multiple of q), since the stored pair then stays in use beside the
    step's three vectors."""
    return 4 if settings.frequency % settings.store_every == 0 else 5


def _count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"AndersonAcceleration: {name}={value!r} is invalid; valid: an integer >= 1")
    return int(value)


def _element_size(element_size: int | torch.dtype) -> int:
    if isinstance(element_size, torch.dtype):
        return element_size.itemsize
    return _count("element_size", element_size)


def memory_components(
    n: int, element_size: int | torch.dtype, settings: AndersonSettings, world_size: int = 1
) -> dict[str, int]:
    """Bytes per buffer group on one rank, keyed by the setting that sizes it."""
    n, world_size, size = _count("n", n), _count("world_size", world_size), _element_size(element_size)
    if settings.variant == "reference_code":
        return _reference_code_components(n, size, settings)
    # The row layout of aadl.distributed.RowLayout: sharded ranks hold ceil(n / P) rows.
    sharded = settings.distributed == "sharded" and world_size > 1
    rows = -(-n // world_size) if sharded else n
    m = settings.history
    return {
        "history": 2 * m * rows * size + GRAM_ELEMENT * (m * m + m),  # X, dR; Gram, dR^T r_s
        "average_window": settings.window * rows * size if settings.average else 0,
        "pool": pool_size(settings) * rows * size,
        "sharded": world_size * rows * size if sharded else 0,  # the all-gathered full w
    }


def _reference_code_components(n: int, size: int, settings: AndersonSettings) -> dict[str, int]:
    """variant="reference_code" (aadl.reference_variant): every rank holds all n rows in a
    ring of m + 2 stored vectors, m rows of dR scratch and three n-vectors, plus a second
    ring of m + 2 iterates when averaging; no Gram matrix is kept. The same sum as
    ``aadl.reference_variant.memory_bytes``, by buffer."""
    m, depth = settings.history, settings.history + 2
    return {
        "history": (depth + m) * n * size,  # the stored vectors and the dR rows
        "average_window": depth * n * size if settings.average else 0,
        "pool": 3 * n * size,
        "sharded": 0,
    }


def estimate_memory_bytes(
    n: int,
    element_size: int | torch.dtype,
    settings: AndersonSettings | Mapping[str, Any] | None = None,
    *,
    world_size: int = 1,
) -> int:
    """Bytes AndersonAcceleration allocates, on one rank, for ``n`` parameters.

    ``element_size`` is the parameters' bytes per entry (or their ``torch.dtype``);
    ``settings`` is an ``AndersonSettings`` or a dict of hyperparameters (validated by
    :func:`aadl.validate_settings`), by default the defaults;
    ``world_size`` matters under ``distributed="sharded"``, which divides the rows. The
    sum covers the history (``2 m n`` entries plus the float64 ``m x m`` Gram matrix),
    the moving-average window (``t n``), the pool of n-vectors and, when sharded, the
    full-length buffer of the all-gather: everything the optimizer allocates, all on
    ``history_device``. Under ``variant="reference_code"`` it is that variant's buffers
    instead (``m + 2`` stored vectors, ``m`` rows of scratch and three n-vectors; ``m + 2``
    more when averaging), on every rank. Not counted: the base optimizer's own state and the kernels'
    block scratch, independent of n: up to m + 2 float64 rows of one block per worker
    thread (0.26 MB a row on CPU, 2 MB on GPU; 5.5 MB per thread at m = 20 on CPU).
    """
    if settings is None:
        settings = AndersonSettings()
    elif isinstance(settings, Mapping):
        settings = validate_settings(**settings)
    return sum(memory_components(n, element_size, settings, world_size).values())


def format_bytes(count: int) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} B"


def device_capacity(device: torch.device) -> int | None:
    """Total memory of ``device`` in bytes (physical RAM for the CPU), or None if unknown.

    Total, not free: a request above it can never be met, whatever else is freed first.
    """
    try:
        if device.type == "cuda":
            return torch.cuda.mem_get_info(device)[1]
        if device.type == "cpu":
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, RuntimeError, ValueError):
        pass  # no sysconf (Windows), or the device cannot say: rely on the allocator
    return None


def is_allocation_failure(error: BaseException) -> bool:
    """Whether ``error`` from creating a tensor means the memory was not there (rather
    than, say, an invalid device, which must surface as itself)."""
    if isinstance(error, (MemoryError, _OUT_OF_MEMORY)):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate" in text)


def out_of_memory(
    n: int,
    dtype: torch.dtype,
    device: torch.device,
    settings: AndersonSettings,
    world_size: int,
    capacity: int | None = None,
) -> MemoryError:
    """The one-line error for buffers that do not fit, naming the bytes and what to lower."""
    parts = memory_components(n, dtype, settings, world_size)
    total = sum(parts.values())
    biggest = max(("history", "average_window"), key=lambda name: parts[name])
    if parts[biggest] < parts["pool"] + parts["sharded"]:
        advice = "the model's n-vectors alone do not fit: place the history elsewhere (history_device)"
    elif biggest == "history":
        advice = f"lower history (m={settings.history})"
    else:
        advice = f"lower average_window (t={settings.window})"
    if settings.distributed == "replicated" and world_size > 1:
        advice += " or use distributed='sharded'"
    where = f"{device}" if capacity is None else f"{device}, which has {format_bytes(capacity)} in all"
    return MemoryError(
        f"AndersonAcceleration: the AA buffers for n={n} {str(dtype).removeprefix('torch.')} "
        f"parameters need {total} bytes ({format_bytes(total)}) on {where} (history "
        f"{parts['history']}, moving average {parts['average_window']}, n-vector pool {parts['pool']}"
        + (f", all-gather buffer {parts['sharded']}" if parts["sharded"] else "")
        + f" bytes); {advice}"
    )
