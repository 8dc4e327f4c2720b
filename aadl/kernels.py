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
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

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


def map_blocks(length: int, device: torch.device, work: Callable[[int, int], _T]) -> list[_T]:
    """``[work(lo, hi) for each row block]`` in block order, on CPU spread over threads."""
    size = block_size(device)
    bounds = [(lo, min(length, lo + size)) for lo in range(0, length, size)] or [(0, 0)]
    wanted = BLOCK_WORKERS if BLOCK_WORKERS is not None else torch.get_num_threads()
    workers = min(wanted, len(bounds)) if device.type == "cpu" else 1
    if workers <= 1:
        return [work(lo, hi) for lo, hi in bounds]
    per = -(-len(bounds) // workers)
    chunks = [bounds[i : i + per] for i in range(0, len(bounds), per)]
    futures = [_executor(workers).submit(lambda c=c: [work(lo, hi) for lo, hi in c]) for c in chunks]
    return [r for f in futures for r in f.result()]


def _as_float64(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.to(torch.float64)


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


def row_dots(rows: torch.Tensor, vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``rows @ stack(vectors).T`` as float64: (h, k) dot products of h rows with k vectors."""
    h, length = rows.shape

    def work(lo: int, hi: int) -> torch.Tensor:
        block = rows[:, lo:hi]
        if block.dtype != torch.float64:
            block = _thread_scratch(block.shape, torch.float64, block.device).copy_(block)
        return torch.stack([torch.mv(block, _as_float64(v[lo:hi])) for v in vectors], dim=1)

    partials = map_blocks(length, rows.device, work)
    total = torch.zeros(h, len(vectors), dtype=torch.float64, device=rows.device)
    for p in partials:
        total += p
    return total


def mix(
    out: torch.Tensor,
    base: torch.Tensor,
    rows: torch.Tensor,
    coefficients: torch.Tensor,
    shift: torch.Tensor | None = None,
    shift_weight: float = 0.0,
) -> torch.Tensor:
    """``out = base + shift_weight * shift - rows.T @ coefficients`` in one pass.

    Returns the float64 sum of ``out``: finite exactly when every entry is (a sum of
    float32 numbers cannot overflow in float64), so no separate scan is needed.
    """
    coefficients = coefficients.to(device=rows.device, dtype=rows.dtype)
    use_shift = shift is not None and shift_weight != 0.0

    def work(lo: int, hi: int) -> torch.Tensor:
        piece = out[lo:hi]
        torch.addmv(base[lo:hi], rows[:, lo:hi].T, coefficients, alpha=-1, out=piece)
        if use_shift:
            piece.add_(shift[lo:hi], alpha=shift_weight)
        return piece.sum(dtype=torch.float64)

    return torch.stack(map_blocks(out.numel(), out.device, work)).sum()


def streaming_r_factor(rows: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """R factor (float64, (h+1) x (h+1)) of the n x (h+1) matrix ``[rows.T, vector]``.

    A tall-skinny QR: each block is factorised stacked under the running R, so no n x h
    matrix is ever materialised and the factorisation is done in float64.
    """
    h = rows.shape[0]

    def work(lo: int, hi: int) -> torch.Tensor:
        # Filled row by row (contiguous copies) into this thread's reused float64 scratch;
        # its transpose is the column-major block LAPACK works on. A fresh concatenation
        # and its float64 copy per block cost 25% more.
        block = _thread_scratch((h + 1, hi - lo), torch.float64, rows.device)
        block[:h].copy_(rows[:, lo:hi])
        block[h].copy_(vector[lo:hi])
        return torch.linalg.qr(block.T, mode="r").R

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
        block = buffer[:, lo:hi]
        mean = block.mean(dim=0)
        deviations = torch.sub(block, mean, out=_thread_scratch(block.shape, block.dtype, block.device))
        squares = deviations.mul_(deviations).sum(dim=0)
        return torch.stack([squares.max() / (count - correction), mean.max()]).to(torch.float64)

    stats = torch.stack(map_blocks(buffer.shape[1], buffer.device, work)).max(dim=0).values
    return float(stats[0].clamp_min(0).sqrt()), float(stats[1])


def row_mean(buffer: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = buffer.mean(dim=0)`` without an n-sized temporary."""

    def work(lo: int, hi: int) -> None:
        torch.mean(buffer[:, lo:hi], dim=0, out=out[lo:hi])

    map_blocks(buffer.shape[1], buffer.device, work)
    return out
