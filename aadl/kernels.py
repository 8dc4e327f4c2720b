"""Memory-bound passes over the history, done in row blocks.

Every pass AA makes over n rows (dot products with the history, the mixing, the streaming
QR, the moving-average statistics) is split into row blocks:

* Dot products are exact-product float64 sums: each block is copied into a float64
  scratch buffer (a product of two float32 numbers is exact in float64) and reduced by a
  float64 matrix-vector product; block results are summed in float64. BLAS's float32 dot
  products would be cheaper but accumulate in float32 (~1e-6 relative on the positive sums
  of a Gram diagonal), and the Gram update subtracts dot products (aadl.history), which
  needs them exact.
* Block results are reduced in block order, so every result is bitwise identical
  whatever the number of worker threads.
* On CPU the blocks are spread over ``torch.get_num_threads()`` Python threads: MKL's
  matrix-vector product for this shape runs on one core, and splitting the rows recovers
  the memory bandwidth of all of them. Torch releases the GIL inside each call.
* Nothing is allocated per block: temporaries live in per-thread scratch buffers.
* On CPU, the dot products and the mixing run as the numba loops of
  ``aadl.cpu_kernels`` when numba is installed (``compiled_loops_enabled``): one read of
  each entry instead of a float64 copy and several torch operations per block. The torch
  versions below serve GPUs, other dtypes and machines without numba.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np
import torch

try:
    from . import cpu_kernels as _compiled
except ImportError:  # numba is not installed: the torch versions serve
    _compiled = None

CPU_BLOCK = 32768
CUDA_BLOCK = 1 << 18
# Worker threads for CPU block passes; None: torch.get_num_threads(). Env: AADL_BLOCK_WORKERS.
BLOCK_WORKERS: int | None = int(os.environ["AADL_BLOCK_WORKERS"]) if os.environ.get("AADL_BLOCK_WORKERS") else None

_T = TypeVar("_T")
_scratch = threading.local()
_pool: ThreadPoolExecutor | None = None
_pool_key: tuple[int, int] = (0, 0)  # (workers, pid): a forked child must not reuse dead threads
_pool_lock = threading.Lock()


def _executor(workers: int) -> ThreadPoolExecutor:
    global _pool, _pool_key
    with _pool_lock:
        key = (workers, os.getpid())
        if _pool is None or _pool_key != key:
            if _pool is not None and _pool_key[1] == key[1]:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(
                max_workers=workers, thread_name_prefix="aadl-blocks", initializer=_one_intra_op_thread
            )
            _pool_key = key
        return _pool


def _native_thread_setters() -> list[Callable[[int], object]]:
    """This thread's OpenMP and MKL thread-count setters, where torch ships them (the
    mixed-case MKL name is its C entry point, taking an int; the lower-case one is
    Fortran's, taking a pointer)."""
    import ctypes

    setters = []
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    # RTLD_NOLOAD: only the copies torch has loaded already; never a second OpenMP runtime.
    mode = getattr(os, "RTLD_NOLOAD", 0) | getattr(os, "RTLD_NOW", 0)
    for library, symbol in (("libgomp.so.1", "omp_set_num_threads"), ("libtorch_cpu.so", "MKL_Set_Num_Threads_Local")):
        try:
            setters.append(getattr(ctypes.CDLL(os.path.join(torch_lib, library), mode=mode), symbol))
        except (OSError, AttributeError):
            pass  # another build (no bundled libgomp, no MKL): nothing to pin
    return setters


def _one_intra_op_thread() -> None:
    """Pin a block worker's own torch/BLAS/LAPACK calls to one thread.

    Each worker already is one of the cores' threads; left alone, every MKL or OpenMP call
    in it would start a parallel region of torch.get_num_threads() threads, and with two
    workers on two cores they fight: the QR blocks ran 6x slower, the others up to 1.3x.
    Both settings are per thread (OpenMP's nthreads ICV, MKL's local count), so the
    caller's threads keep theirs.
    """
    torch.get_num_threads()  # torch's per-thread lazy init first: it would reset the count
    for setter in _native_thread_setters():
        setter(1)


def block_size(device: torch.device) -> int:
    return CPU_BLOCK if device.type == "cpu" else CUDA_BLOCK


def _block_bounds(length: int, device: torch.device) -> list[tuple[int, int]]:
    size = block_size(device)
    return [(lo, min(length, lo + size)) for lo in range(0, length, size)] or [(0, 0)]


def _map_chunks(count: int, device: torch.device, work: Callable[[int, int], _T]) -> list[_T]:
    """``work(first, last)`` over consecutive ranges of ``count`` blocks, one range per
    worker thread on CPU; results in range order."""
    wanted = BLOCK_WORKERS if BLOCK_WORKERS is not None else torch.get_num_threads()
    workers = min(wanted, count) if device.type == "cpu" else 1
    if workers <= 1:
        return [work(0, count)]
    per = -(-count // workers)
    ranges = [(first, min(count, first + per)) for first in range(0, count, per)]
    futures = [_executor(workers).submit(work, first, last) for first, last in ranges]
    return [f.result() for f in futures]


def map_blocks(length: int, device: torch.device, work: Callable[[int, int], _T]) -> list[_T]:
    """``[work(lo, hi) for each row block]`` in block order, on CPU spread over threads."""
    bounds = _block_bounds(length, device)
    chunks = _map_chunks(len(bounds), device, lambda first, last: [work(lo, hi) for lo, hi in bounds[first:last]])
    return [r for chunk in chunks for r in chunk]


def compiled_loops_enabled() -> bool:
    """Whether CPU passes use the numba loops of ``aadl.cpu_kernels``: when numba is
    installed, unless the environment says ``AADL_CPU_KERNELS=torch``."""
    choice = os.environ.get("AADL_CPU_KERNELS", "auto")
    if choice not in ("auto", "numba", "torch"):
        raise ValueError(f"AADL_CPU_KERNELS: 'auto', 'numba' or 'torch', got {choice!r}")
    if choice == "numba" and _compiled is None:
        raise ImportError("AADL_CPU_KERNELS=numba, but numba is not installed (pip install numba)")
    return _compiled is not None and choice != "torch"


def _compiled_applies(rows: torch.Tensor, *vectors: torch.Tensor) -> bool:
    """The numba loops take CPU float32/float64 rows with unit column stride and
    contiguous vectors of the same dtype."""
    if rows.device.type != "cpu" or rows.dtype not in (torch.float32, torch.float64) or rows.stride(-1) != 1:
        return False
    if any(v.device.type != "cpu" or v.dtype != rows.dtype or not v.is_contiguous() for v in vectors):
        return False
    return compiled_loops_enabled()


def _compiled_blocks(
    length: int, partial_shape: tuple[int, ...], work: Callable[[np.ndarray, np.ndarray, np.ndarray], None]
) -> np.ndarray:
    """Run ``work(starts, stops, partials)`` for each worker's range of CPU blocks, where
    ``partials`` is that range's part of a float64 array of one ``partial_shape`` result
    per block; returns the whole array, in block order."""
    starts, stops = _cpu_block_arrays(length)
    partials = np.zeros((len(starts), *partial_shape))
    _map_chunks(len(starts), torch.device("cpu"), lambda a, b: work(starts[a:b], stops[a:b], partials[a:b]))
    return partials


_block_arrays: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _cpu_block_arrays(length: int) -> tuple[np.ndarray, np.ndarray]:
    """(starts, stops) of the CPU row blocks of ``length`` rows, made once per length: a
    step at small n would otherwise spend more building them than in the loops."""
    arrays = _block_arrays.get(length)
    if arrays is None:
        bounds = np.asarray(_block_bounds(length, torch.device("cpu")), dtype=np.int64).reshape(-1, 2)
        arrays = np.ascontiguousarray(bounds[:, 0]), np.ascontiguousarray(bounds[:, 1])
        if len(_block_arrays) > 64:  # lengths are a few per model; never let it grow unbounded
            _block_arrays.clear()
        _block_arrays[length] = arrays
    return arrays


def _thread_scratch(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A per-thread buffer of the given shape: block temporaries are reused, not
    re-allocated (large CPU allocations are fresh mmaps, page-faulted on every use)."""
    numel = 1
    for size in shape:
        numel *= size
    cache = getattr(_scratch, "buffers", None)
    if cache is None:
        cache = _scratch.buffers = {}
    buffer = cache.get((dtype, device))
    if buffer is None or buffer.numel() < numel:
        buffer = cache[(dtype, device)] = torch.empty(numel, dtype=dtype, device=device)
    return buffer[:numel].view(tuple(shape))


def _float64_block(rows: torch.Tensor, vectors: Sequence[torch.Tensor], lo: int, hi: int) -> torch.Tensor:
    """Columns [lo, hi) of ``rows`` stacked over those of ``vectors``, as float64, in this
    thread's scratch: no per-block allocation (hundreds of 256 KB temporaries per pass
    fragment the worker threads' malloc arenas, ~1.4 n floats of resident memory at
    n = 25.6e6)."""
    h = rows.shape[0]
    block = _thread_scratch((h + len(vectors), hi - lo), torch.float64, rows.device)
    block[:h].copy_(rows[:, lo:hi])
    for i, v in enumerate(vectors):
        block[h + i].copy_(v[lo:hi])
    return block


def _sum_in_order(partials: Sequence[torch.Tensor]) -> torch.Tensor:
    total = torch.zeros_like(partials[0])
    for p in partials:
        total += p
    return total


def _compiled_dots(rows: torch.Tensor, vector: torch.Tensor, square_row: int) -> torch.Tensor:
    """(h + 1,) float64: rows @ vector, then |rows[square_row]|^2 (0 when square_row < 0)."""
    return torch.from_numpy(compiled_dots_arrays(rows.numpy(), vector.numpy(), square_row))


def compiled_dots_arrays(rows: np.ndarray, vector: np.ndarray, square_row: int) -> np.ndarray:
    """``_compiled_dots`` on numpy views the caller has checked (C-contiguous CPU
    float32/float64 of one dtype; ``compiled_loops_enabled()``): at small n the checks
    and conversions of the torch entry points cost more than the loop itself."""
    h, length = rows.shape

    def work(starts: np.ndarray, stops: np.ndarray, partials: np.ndarray) -> None:
        _compiled.block_dots(rows, h, vector, starts, stops, square_row, partials)

    return _compiled_blocks(length, (h + 1,), work).sum(axis=0)


def compiled_store_arrays(
    w_after: np.ndarray,
    w_before: np.ndarray,
    stored_r: np.ndarray | None,
    stored_u: np.ndarray | None,
    u_out: np.ndarray,
    dr_weight: float,
    rows_dr: np.ndarray,
    rows_x: np.ndarray,
    slot: int,
    held: int,
) -> np.ndarray:
    """``aadl.cpu_kernels.block_store`` over every block (checked numpy views, as
    ``compiled_dots_arrays``): r_k over ``w_before``, u_k into ``u_out`` (c != 1), and with
    a stored pair (``slot >= 0``) the new columns and, float64, ``(dR[:held] . r_k,
    |dR[slot]|^2)`` as ``compiled_dots_arrays(rows_dr[:held], r_k, slot)`` gives them."""
    length = w_after.shape[0]
    weight = np.array([dr_weight - 1.0], dtype=w_after.dtype)
    paired = slot >= 0
    r_s = stored_r if paired else w_after
    u_s = stored_u if paired else w_after

    def work(starts: np.ndarray, stops: np.ndarray, partials: np.ndarray) -> None:
        _compiled.block_store(
            w_after, w_before, r_s, u_s, u_out, weight, rows_dr, rows_x, slot, held, starts, stops, partials
        )

    return _compiled_blocks(length, (held + 1,), work).sum(axis=0)


def compiled_mix_arrays(
    out: np.ndarray,
    base: np.ndarray,
    rows: np.ndarray,
    coefficients: np.ndarray,
    shift: np.ndarray | None,
    shift_weight: float,
) -> float:
    """The compiled ``mix`` on checked numpy views (as ``compiled_dots_arrays``), with
    ``coefficients`` already in the rows' dtype; returns the float64 sum of ``out``
    (non-finite exactly when an entry is, or on an overflow: see ``mix``)."""
    h, length = rows.shape
    use_shift = shift is not None and shift_weight != 0.0
    shift_array = shift if use_shift else base
    weight = np.array([shift_weight if use_shift else 0.0], dtype=out.dtype)

    def work(starts: np.ndarray, stops: np.ndarray, sums: np.ndarray) -> None:
        _compiled.block_mix(out, base, rows, h, coefficients, shift_array, weight, starts, stops, sums)

    total = float(_compiled_blocks(length, (), work).sum())
    if not math.isfinite(total) and np.isfinite(out).all():
        return 0.0  # an overflow of the sum, every entry finite
    return total


def row_dots(rows: torch.Tensor, vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``rows @ stack(vectors).T`` as float64: (h, k) dot products of h rows with k vectors."""
    h = rows.shape[0]
    if _compiled_applies(rows, *vectors):
        return torch.stack([_compiled_dots(rows, v, -1)[:h] for v in vectors], dim=1)

    def work(lo: int, hi: int) -> torch.Tensor:
        block = _float64_block(rows, vectors, lo, hi)
        return torch.stack([torch.mv(block[:h], block[h + i]) for i in range(len(vectors))], dim=1)

    return _sum_in_order(map_blocks(rows.shape[1], rows.device, work))


def row_dots_and_square(rows: torch.Tensor, vector: torch.Tensor, row: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows @ vector, rows[row] . rows[row])`` as float64, in one pass over ``rows``.

    The Gram update needs both; the square comes from the float64 block already in cache,
    where a pass of its own would read the row from memory again (a tenth of the step at
    m = 20, most of it per-block overhead).
    """
    h = rows.shape[0]
    if _compiled_applies(rows, vector):
        total = _compiled_dots(rows, vector, row)
        return total[:-1], total[-1]

    def work(lo: int, hi: int) -> torch.Tensor:
        block = _float64_block(rows, [vector], lo, hi)
        own = block[row]
        return torch.cat([torch.mv(block[:h], block[h]), torch.dot(own, own).reshape(1)])

    total = _sum_in_order(map_blocks(rows.shape[1], rows.device, work))
    return total[:-1], total[-1]


def mix(
    out: torch.Tensor,
    base: torch.Tensor,
    rows: torch.Tensor,
    coefficients: torch.Tensor,
    shift: torch.Tensor | None = None,
    shift_weight: float = 0.0,
) -> torch.Tensor:
    """``out = base + shift_weight * shift - rows.T @ coefficients`` in one pass.

    Returns a float64 scalar that is finite exactly when every entry of ``out`` is (the
    sum of ``out`` unless that overflows), so no separate scan is needed. The torch version
    sums blocks in ``out``'s dtype: a float64 sum would allocate a float64 copy of every
    block, which fragments the worker threads' malloc arenas (~2 n floats of resident
    memory at n = 25.6e6); the numba loop sums each block in float64 as it goes. An
    infinite or NaN entry makes the sum non-finite; a non-finite sum of finite entries (an
    overflow: float32 block sums, or float64 parameters of order 1e300) is told apart by an
    exact check, on that rare path only.
    """
    coefficients = coefficients.to(device=rows.device, dtype=rows.dtype)
    use_shift = shift is not None and shift_weight != 0.0
    if _compiled_applies(rows, out, base, *((shift,) if use_shift else ())):
        total = compiled_mix_arrays(
            out.numpy(), base.numpy(), rows.numpy(), coefficients.contiguous().numpy(),
            shift.numpy() if use_shift else None, shift_weight,
        )
        return torch.tensor(total, dtype=torch.float64)
    else:

        def work(lo: int, hi: int) -> torch.Tensor:
            piece = out[lo:hi]
            torch.addmv(base[lo:hi], rows[:, lo:hi].T, coefficients, alpha=-1, out=piece)
            if use_shift:
                piece.add_(shift[lo:hi], alpha=shift_weight)
            return piece.sum()

        total = torch.stack(map_blocks(out.numel(), out.device, work)).to(torch.float64).sum()
    if not bool(torch.isfinite(total)) and _every_entry_finite(out):
        return torch.zeros((), dtype=torch.float64, device=out.device)
    return total


def _every_entry_finite(out: torch.Tensor) -> bool:
    """The exact check behind a non-finite sum (the rare overflow path of ``mix``)."""
    return all(bool(b) for b in map_blocks(out.numel(), out.device, lambda lo, hi: torch.isfinite(out[lo:hi]).all()))


def streaming_r_factor(rows: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """R factor (float64, (h+1) x (h+1)) of the n x (h+1) matrix ``[rows.T, vector]``.

    A tall-skinny QR: each block is factorised stacked under the running R, so no n x h
    matrix is ever materialised and the factorisation is done in float64.
    """
    h = rows.shape[0]

    def work(lo: int, hi: int) -> torch.Tensor:
        # Filled row by row (contiguous copies) into this thread's reused float64 scratch;
        # its transpose is the column-major block LAPACK works on, factorised in place by
        # geqrf (R is its upper triangle). torch.linalg.qr(mode="r") gives the same R
        # but copies each block (5 MB at m = 20) in the worker threads, which fragments
        # their malloc arenas: 20-40 n floats of resident memory at n = 25.6e6.
        block = _thread_scratch((h + 1, hi - lo), torch.float64, rows.device)
        block[:h].copy_(rows[:, lo:hi])
        block[h].copy_(vector[lo:hi])
        columns = block.T
        tau = torch.empty(min(hi - lo, h + 1), dtype=torch.float64, device=rows.device)
        factored, _ = torch.geqrf(columns, out=(columns, tau))
        return factored[: h + 1].triu()

    factors = map_blocks(rows.shape[1], rows.device, work)
    return combine_r_factors(factors, h + 1)


def combine_r_factors(factors: Sequence[torch.Tensor], width: int) -> torch.Tensor:
    """R factor of the row-stack of several R factors (each at most ``width`` columns)."""
    stacked = torch.cat(list(factors), dim=0)
    r = torch.linalg.qr(stacked, mode="r").R
    if r.shape[0] < width:  # fewer rows than columns so far: pad to a square factor
        r = torch.cat([r, r.new_zeros(width - r.shape[0], width)], dim=0)
    return r


def max_entry_spread(buffer: torch.Tensor, correction: int) -> tuple[float, float]:
    """Over a (t, n) buffer of iterates: (max_j std_j, max_j mean_j), std with the given
    Bessel correction (0: population)."""
    count = buffer.shape[0]

    def work(lo: int, hi: int) -> torch.Tensor:
        # Two passes (mean, then squared deviations): torch.var_mean over dim 0 is ~30x
        # slower on CPU for these short, wide blocks.
        # Every temporary lives in this thread's scratch (see _float64_block for why).
        block = buffer[:, lo:hi]
        scratch = _thread_scratch((count + 2, hi - lo), block.dtype, block.device)
        deviations, mean, squares = scratch[:count], scratch[count], scratch[count + 1]
        torch.mean(block, dim=0, out=mean)
        torch.sub(block, mean, out=deviations)
        torch.sum(deviations.mul_(deviations), dim=0, out=squares)
        return torch.stack([squares.max() / (count - correction), mean.max()]).to(torch.float64)

    stats = torch.stack(map_blocks(buffer.shape[1], buffer.device, work)).max(dim=0).values
    return float(stats[0].clamp_min(0).sqrt()), float(stats[1])


def row_mean(buffer: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = buffer.mean(dim=0)`` without an n-sized temporary."""

    def work(lo: int, hi: int) -> None:
        torch.mean(buffer[:, lo:hi], dim=0, out=out[lo:hi])

    map_blocks(buffer.shape[1], buffer.device, work)
    return out
