"""``BatchedAndersonAcceleration``: S independent AADL runs of one model, stepped as one.

Seed studies train S copies of a small model that differ only in their initialisation
and data. Stacked along a leading dimension of size S (``torch.func.stack_module_state``,
or batched layers whose weights have shape (S, ...)), the copies run as one batched model
and an elementwise base optimizer (Adam, SGD with momentum) steps all of them in one call.
This wrapper does the same for Anderson acceleration: seed s's joint vector is the
concatenation of every parameter's ``[s]`` slice, and each seed follows the contract
(``shared/spec/aadl-algorithm.md``) on its own, exactly as ``aadl.AndersonAcceleration``
would on that seed alone. What is shared is only what the contract makes equal for every
seed: the schedule (storage, acceleration and averaging happen on the same steps), hence
the ring buffer's fill and slot order. Everything that depends on the data is per seed:
the history's columns, Gram matrices, coefficients, the safeguard's decision, the moving
average's decision and the counters.

Every pass over n rows is one batched operation over the (S, n) block; the S small solves
are one batched ``torch.linalg`` call. Per step the host waits on the device once, for the
solves' inputs (the S Gram systems, moved to the CPU as in ``aadl.solvers``); the
safeguard and averaging decisions are taken on the device, so they need no wait.

Numerics are the single wrapper's. The passes over n rows run the same arithmetic per
seed; on the CPU with numba they are the single wrapper's own compiled loops, called per
seed from one compiled loop over the seeds, so a seed's dot products and mixed point are
bitwise the single run's. The small solves are one batched LAPACK call, whose last bits
can differ from one call per system (MKL's batched routines are not bitwise one call per
matrix): float32 coefficients almost never notice (the tests' float32 runs are bitwise
equal), float64 ones carry the difference, which AA on a network may amplify over many
steps (see docs/library.md, "Batched seeds").
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.optim import Optimizer

from . import kernels, solvers
from .base import STATS_FIELDS, AccelerationBase, AccelerationStats
from .checkpoint import base_optimizer_name, incompatible_settings, shape_mismatch
from .closure import _BACKWARD_UNDER_NO_GRAD
from .distributed import process_group_active
from .flat import ParameterVector
from .hyperparameters import AndersonSettings
from .memory import device_capacity, format_bytes, is_allocation_failure, pool_size

BATCHED_STATE_FORMAT = 1
_STATE_KEY = "batched_anderson"
_foreach_copy = getattr(torch, "_foreach_copy_", None)
_cpu_loops = kernels._compiled  # aadl.cpu_kernels, or None without numba

CLOSURE_CONTRACT = (
    "BatchedAndersonAcceleration's closure is a loss-only closure, called under "
    "torch.no_grad() at the plain and at the AA points: it must only compute and return one "
    "loss per seed, a tensor of shape (seeds,); backward() is the caller's, done before step()"
)


def _fail(message: str) -> ValueError:
    return ValueError("BatchedAndersonAcceleration: " + message)


# -- the S joint vectors ------------------------------------------------------------


class SeedRows:
    """The (S, n) block whose row s is seed s's joint vector: the concatenation of every
    parameter's ``[s]`` slice, flattened, in order. Copied in and out of the parameters
    one parameter at a time (never one seed at a time)."""

    def __init__(self, params: Sequence[torch.Tensor], seeds: int):
        if not params:
            raise _fail("the base optimizer holds no parameter that requires grad")
        ParameterVector(params)  # one dtype, one device, a supported floating-point dtype
        for index, p in enumerate(params):
            if p.ndim == 0 or p.shape[0] != seeds:
                raise _fail(
                    f"parameter {index} has shape {tuple(p.shape)}; every parameter must be "
                    f"stacked along a leading dimension of size seeds={seeds} "
                    "(torch.func.stack_module_state, or batched layers with weights of shape (S, ...))"
                )
        self.params = list(params)
        self.seeds = seeds
        self.dtype = params[0].dtype
        self.device = params[0].device
        self.sizes = [p[0].numel() for p in params]
        self.n = sum(self.sizes)
        self._views_cache: dict[int, tuple[torch.Tensor, list[torch.Tensor]]] = {}

    def same_parameters(self, params: Sequence[torch.Tensor]) -> bool:
        return len(params) == len(self.params) and all(a is b for a, b in zip(params, self.params))

    def gather(self, out: torch.Tensor) -> torch.Tensor:
        """Copy the parameters into ``out`` (S, n)."""
        if out.device == self.device:
            torch.cat([p.reshape(self.seeds, -1) for p in self.params], dim=1, out=out)
        else:
            for p, view in zip(self.params, self._views(out)):
                view.copy_(p)
        return out

    def scatter(self, block: torch.Tensor) -> None:
        """Set every parameter from ``block`` (S, n)."""
        views = self._views(block)
        if _foreach_copy is not None and block.device == self.device:
            _foreach_copy(self.params, views)
        else:
            for p, view in zip(self.params, views):
                p.copy_(view)

    def _views(self, block: torch.Tensor) -> list[torch.Tensor]:
        cached = self._views_cache.get(id(block))
        if cached is not None and cached[0] is block:
            return cached[1]
        views, offset = [], 0
        for p, size in zip(self.params, self.sizes):
            views.append(block[:, offset : offset + size].view(p.shape))
            offset += size
        self._views_cache[id(block)] = (block, views)
        return views


# -- the passes over the (S, n) block ---------------------------------------------------
# Each is aadl.kernels' pass for one seed, run for all seeds in one call. On the CPU with
# numba they are the single wrapper's own compiled loops (aadl.cpu_kernels), called per
# seed from one compiled loop over the seeds and on the same row blocks, so a seed's dot
# products and mixed point are bitwise those of AndersonAcceleration on that seed; the
# seeds are spread over the kernels' worker threads. Elsewhere (GPUs, bfloat16, no numba)
# they are batched torch operations.

if _cpu_loops is not None:

    @_cpu_loops._compiled
    def _seeds_dots(rows, h, vectors, starts, stops, square_row, partials, first, last):  # pragma: no cover
        for s in range(first, last):
            _cpu_loops.block_dots(rows[s], h, vectors[s], starts, stops, square_row, partials[s])

    @_cpu_loops._compiled
    def _seeds_mix(out, base, rows, h, coefficients, shift, weight, starts, stops, sums, first, last):  # pragma: no cover
        for s in range(first, last):
            _cpu_loops.block_mix(
                out[s], base[s], rows[s], h, coefficients[s], shift[s], weight, starts, stops, sums[s]
            )


def _compiled_route(rows: torch.Tensor, *blocks: torch.Tensor) -> bool:
    """Whether the compiled loops apply: contiguous CPU float32/float64 tensors of one dtype."""
    if _cpu_loops is None or rows.device.type != "cpu" or rows.dtype not in (torch.float32, torch.float64):
        return False
    if any(t.device.type != "cpu" or t.dtype != rows.dtype or not t.is_contiguous() for t in (rows, *blocks)):
        return False
    return kernels.compiled_loops_enabled()


_BLOCK_BOUNDS: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}


def _cpu_block_bounds(length: int) -> tuple[np.ndarray, np.ndarray]:
    """The single wrapper's CPU row blocks (aadl.kernels), as start and stop arrays (read
    only; kept per length and block size, since every pass of every step asks again)."""
    size = kernels.CPU_BLOCK
    cached = _BLOCK_BOUNDS.get((length, size))
    if cached is not None:
        return cached
    bounds = [(lo, min(length, lo + size)) for lo in range(0, length, size)] or [(0, 0)]
    bounds = np.asarray(bounds, dtype=np.int64)
    starts, stops = np.ascontiguousarray(bounds[:, 0]), np.ascontiguousarray(bounds[:, 1])
    starts.flags.writeable = stops.flags.writeable = False
    _BLOCK_BOUNDS[length, size] = starts, stops
    return starts, stops


def _over_seeds(seeds: int, length: int, work: Callable[[int, int], None]) -> None:
    """``work(first, last)`` over ranges of seeds, spread over the kernels' CPU worker
    threads when there is at least a row block of work per thread (a thread hand-off
    costs more than a small pass)."""
    groups = min(seeds, -(-seeds * length // kernels.CPU_BLOCK))
    if groups <= 1:
        work(0, seeds)
        return
    edges = [seeds * g // groups for g in range(groups + 1)]
    kernels._map_chunks(groups, torch.device("cpu"), lambda a, b: work(edges[a], edges[b]))


def _torch_rows_per_block(seeds: int, device: torch.device) -> int:
    return max(1024, kernels.block_size(device) // seeds)


def batched_dots(rows: torch.Tensor, h: int, vector: torch.Tensor, square_row: int = -1) -> torch.Tensor:
    """(S, h + 1) float64: ``rows[s, :h] @ vector[s]`` and, last, ``|rows[s, square_row]|^2``
    (0 when ``square_row < 0``), as exact-product float64 sums; ``rows`` (S, m, n)."""
    seeds, _, length = rows.shape
    if _compiled_route(rows, vector):
        starts, stops = _cpu_block_bounds(length)
        partials = np.zeros((seeds, len(starts), h + 1))
        r, v = rows.numpy(), vector.numpy()
        blocks = (starts, stops)
        _over_seeds(seeds, length, lambda a, b: _seeds_dots(r, h, v, *blocks, square_row, partials, a, b))
        return torch.from_numpy(partials.sum(axis=1))
    total = torch.zeros(seeds, h + 1, dtype=torch.float64, device=rows.device)
    step = _torch_rows_per_block(seeds, rows.device)
    for lo in range(0, length, step):  # row blocks, never seeds
        hi = min(length, lo + step)
        block = torch.empty(seeds, h + 1, hi - lo, dtype=torch.float64, device=rows.device)
        block[:, :h].copy_(rows[:, :h, lo:hi])
        block[:, h].copy_(vector[:, lo:hi])
        total[:, :h] += torch.bmm(block[:, :h], block[:, h:].transpose(1, 2))[:, :, 0]
        if square_row >= 0:
            own = block[:, square_row]
            total[:, h] += (own * own).sum(dim=1)
    return total


def batched_mix(
    out: torch.Tensor,
    base: torch.Tensor,
    rows: torch.Tensor,
    h: int,
    coefficients: torch.Tensor,
    shift: torch.Tensor,
    shift_weight: float,
) -> torch.Tensor:
    """``out[s] = base[s] + shift_weight * shift[s] - rows[s, :h].T @ coefficients[s]``
    (``aadl.kernels.mix`` per seed); returns which seeds' points are finite, (S,) bool."""
    seeds, _, length = rows.shape
    coefficients = coefficients.to(device=rows.device, dtype=rows.dtype).contiguous()
    use_shift = shift_weight != 0.0
    if _compiled_route(rows, out, base, shift):
        starts, stops = _cpu_block_bounds(length)
        sums = np.zeros((seeds, len(starts)))
        o, w, r, c = out.numpy(), base.numpy(), rows.numpy(), coefficients.numpy()
        s = shift.numpy() if use_shift else w
        weight = np.array([shift_weight if use_shift else 0.0], dtype=o.dtype)
        blocks = (starts, stops)
        _over_seeds(seeds, length, lambda a, b: _seeds_mix(o, w, r, h, c, s, weight, *blocks, sums, a, b))
        finite = torch.from_numpy(np.isfinite(sums.sum(axis=1)))
        if not bool(finite.all()):  # an overflowing sum of finite entries: check exactly
            unsure = (~finite).nonzero().squeeze(1)
            finite[unsure] = torch.isfinite(out[unsure]).flatten(1).all(dim=1)
        return finite
    torch.baddbmm(base.unsqueeze(1), coefficients.unsqueeze(1), rows[:, :h], alpha=-1.0, out=out.unsqueeze(1))
    if use_shift:
        out.add_(shift, alpha=shift_weight)
    return torch.isfinite(out).all(dim=1)


# -- the S histories ----------------------------------------------------------------


class BatchedHistory:
    """S ring buffers of m columns (``aadl.history`` per seed) and their Gram matrices.

    Every seed stores on the same steps, so one count and one slot order serve all of
    them. ``X`` and ``dR`` (S, m, n) are in the parameters' dtype, as in the single
    history; the Gram update is history.py's: one pass gives ``dR^T r_k`` and
    ``|dR_new|^2``, and the rest of the new column is ``dR^T r_k - dR^T r_s``, the second
    term kept from the previous append.
    """

    def __init__(self, seeds: int, capacity: int, length: int, dtype: torch.dtype, device: torch.device):
        self.seeds, self.capacity, self.length = seeds, capacity, length
        self.X = torch.zeros(seeds, capacity, length, dtype=dtype, device=device)
        self.dR = torch.zeros(seeds, capacity, length, dtype=dtype, device=device)
        self.gram = torch.zeros(seeds, capacity, capacity, dtype=torch.float64, device=device)
        self.stored_dots = torch.zeros(seeds, capacity, dtype=torch.float64, device=device)
        self.count = 0
        self.next_slot = 0

    def __len__(self) -> int:
        return self.count

    def open_slot(self) -> int:
        return self.next_slot

    def append(self, slot: int, residual: torch.Tensor) -> torch.Tensor:
        """Make the columns just written at ``slot`` part of the history; ``residual`` (S, n)
        is r_k, which becomes the stored residual. Returns ``dR^T r_k`` (S, h), float64."""
        self.count = min(self.count + 1, self.capacity)
        self.next_slot = (slot + 1) % self.capacity
        held = self.count
        total = batched_dots(self.dR, held, residual, slot).to(self.gram.device)
        b = total[:, :held]
        new_column = b - self.stored_dots[:, :held]
        new_column[:, slot] = total[:, held]
        self.gram[:, slot, :held] = new_column
        self.gram[:, :held, slot] = new_column
        self.stored_dots[:, :held] = b
        return b

    def dots(self, residual: torch.Tensor) -> torch.Tensor:
        """``dR^T residual`` over the held columns, (S, h) float64."""
        return batched_dots(self.dR, self.count, residual)[:, : self.count].to(self.gram.device)

    def reweight_mixing(self, old_weight: float, new_weight: float) -> None:
        """Re-express X for a new dR weight (a checkpoint resumed with another beta)."""
        if old_weight != new_weight and self.count:
            h = self.count
            self.X[:, :h].add_(self.dR[:, :h], alpha=new_weight - old_weight)

    def state_dict(self) -> dict:
        h = self.count
        return {
            "count": h,
            "next_slot": self.next_slot,
            "X": self.X[:, :h],
            "dR": self.dR[:, :h],
            "gram": self.gram[:, :h, :h],
            "stored_dots": self.stored_dots[:, :h],
        }

    def expected_shapes(self, h: int) -> dict[str, tuple[int, ...]]:
        s, n = self.seeds, self.length
        return {"X": (s, h, n), "dR": (s, h, n), "gram": (s, h, h), "stored_dots": (s, h)}

    def load_state_dict(self, state: dict) -> None:
        """Load a state already checked by the wrapper (count and shapes)."""
        h = int(state["count"])
        for buffer in (self.X, self.dR, self.gram, self.stored_dots):
            buffer.zero_()
        self.X[:, :h].copy_(state["X"])
        self.dR[:, :h].copy_(state["dR"])
        self.gram[:, :h, :h].copy_(state["gram"])
        self.stored_dots[:, :h].copy_(state["stored_dots"])
        self.count = h
        self.next_slot = h if h < self.capacity else int(state["next_slot"]) % self.capacity


# -- the S small solves (aadl.solvers, batched) ----------------------------------------


def solve_normal_equations_batched(
    gram: torch.Tensor, rhs: torch.Tensor, regularization: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``aadl.solvers.solve_normal_equations`` for S systems at once, on the CPU in float64.

    ``gram`` (S, h, h), ``rhs`` (S, h). Returns (coefficients (S, h), condition (S,),
    trusted (S,) bool): where ``trusted`` is False the single solver returns None (a
    non-finite system, a non-positive eigenvalue or a condition number above
    ``aadl.solvers.GRAM_MAX_CONDITION``) and the caller falls back to QR for that seed."""
    seeds, h = rhs.shape
    eye = torch.eye(h, dtype=torch.float64)
    system = gram.detach().to("cpu", torch.float64) + regularization * eye
    finite = torch.isfinite(system).flatten(1).all(dim=1)
    eigenvalues, eigenvectors = torch.linalg.eigh(torch.where(finite[:, None, None], system, eye))
    smallest, largest = eigenvalues[:, 0], eigenvalues[:, -1]
    ratio = largest / smallest
    trusted = finite & (smallest > 0) & (largest > 0) & ~(ratio > solvers.GRAM_MAX_CONDITION)
    projected = eigenvectors.transpose(1, 2) @ rhs.detach().to("cpu", torch.float64).unsqueeze(-1)
    coefficients = (eigenvectors @ (projected / eigenvalues.unsqueeze(-1))).squeeze(-1)
    return coefficients, ratio.clamp_min(0).sqrt(), trusted


def r_factors_batched(rows: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """R factors (F, h+1, h+1) float64 of the F matrices ``[rows[f].T, residual[f]]``, each
    n x (h+1): ``aadl.kernels.streaming_r_factor`` for F seeds (each row block factorised
    by one batched geqrf, the blocks' factors combined by one batched QR); seeds are taken
    a few at a time so that a block's float64 copy stays near 64 MB."""
    count, h, length = rows.shape
    width = h + 1
    size = kernels.block_size(rows.device)
    per_call = max(1, (1 << 23) // (min(size, max(length, 1)) * width))
    results = []
    for first in range(0, count, per_call):
        chosen = slice(first, min(count, first + per_call))
        factors = []
        for lo in range(0, max(length, 1), size):
            hi = min(length, lo + size)
            block = rows.new_empty(chosen.stop - chosen.start, width, hi - lo, dtype=torch.float64)
            block[:, :h].copy_(rows[chosen, :, lo:hi])
            block[:, h].copy_(residual[chosen, lo:hi])
            factored, _ = torch.geqrf(block.transpose(1, 2))  # column-major blocks, as LAPACK wants
            factors.append(factored[:, :width].triu())
        r_factor = torch.linalg.qr(torch.cat(factors, dim=1), mode="r").R
        if r_factor.shape[1] < width:  # fewer rows than columns so far: pad to a square factor
            padding = r_factor.new_zeros(r_factor.shape[0], width - r_factor.shape[1], width)
            r_factor = torch.cat([r_factor, padding], dim=1)
        results.append(r_factor)
    return torch.cat(results)


def solve_r_factors_batched(
    r_factor: torch.Tensor, regularization: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``aadl.solvers.solve_r_factor`` for F factors at once: (coefficients (F, h),
    condition (F,)); a non-finite factor gives NaN coefficients and an infinite condition."""
    r_factor = r_factor.detach().to("cpu", torch.float64)
    count, width = r_factor.shape[0], r_factor.shape[2]
    h = width - 1
    if regularization > 0:
        penalty = torch.zeros(count, h, width, dtype=torch.float64)
        penalty[:, :, :h] = math.sqrt(regularization) * torch.eye(h, dtype=torch.float64)
        r_factor = torch.linalg.qr(torch.cat([r_factor, penalty], dim=1), mode="r").R
    finite = torch.isfinite(r_factor).flatten(1).all(dim=1)
    eye = torch.eye(h, dtype=torch.float64)
    matrix = torch.where(finite[:, None, None], r_factor[:, :h, :h], eye)
    rhs = torch.where(finite[:, None], r_factor[:, :h, h], 0.0)
    u, singular, vh = torch.linalg.svd(matrix)
    largest, smallest = singular[:, 0], singular[:, -1]
    keep = (singular > solvers.RANK_TOLERANCE * largest.unsqueeze(-1)) & (largest > 0).unsqueeze(-1)
    inverse = torch.where(keep, 1.0 / singular.clamp_min(1e-300), torch.zeros_like(singular))
    projected = inverse * (u.transpose(1, 2) @ rhs.unsqueeze(-1)).squeeze(-1)
    coefficients = (vh.transpose(1, 2) @ projected.unsqueeze(-1)).squeeze(-1)
    condition = torch.where(smallest > 0, largest / smallest, torch.full_like(largest, math.inf))
    coefficients = torch.where(finite[:, None], coefficients, math.nan)
    condition = torch.where(finite, condition, math.inf)
    return coefficients, condition


# -- the S moving averages ------------------------------------------------------------


class BatchedAverage:
    """S windows of the last t iterates (``aadl.averaging`` per seed). Every seed pushes
    on every step, so one count and one slot serve all; the criterion is decided per seed,
    on the device."""

    def __init__(self, seeds, window, length, threshold, criterion, dtype, device):
        self.window, self.threshold, self.criterion = window, threshold, criterion
        self.buffer = torch.zeros(seeds, window, length, dtype=dtype, device=device)
        self._deviations = torch.zeros_like(self.buffer)  # the criterion's scratch
        self._squares = torch.zeros(seeds, length, dtype=dtype, device=device)
        self.mean = torch.zeros(seeds, length, dtype=dtype, device=device)
        self.count = 0
        self.next_slot = 0

    @property
    def full(self) -> bool:
        return self.count == self.window

    def push(self, iterate: torch.Tensor) -> None:
        self.buffer[:, self.next_slot].copy_(iterate)
        self.next_slot = (self.next_slot + 1) % self.window
        self.count = min(self.count + 1, self.window)

    def decide(self, residual: torch.Tensor) -> torch.Tensor:
        """Which seeds average (S,) bool, the window's means left in ``self.mean``.
        Per seed the arithmetic of ``aadl.kernels.max_entry_spread`` and
        ``IterateAverage.decide``: the criterion in the parameters' dtype, then float64."""
        torch.mean(self.buffer, dim=1, out=self.mean)
        deviations = torch.sub(self.buffer, self.mean.unsqueeze(1), out=self._deviations)
        torch.sum(deviations.mul_(deviations), dim=1, out=self._squares)
        correction = 0 if self.criterion == "residual" else 1
        variance = self._squares.amax(dim=1) / (self.window - correction)
        spread = variance.to(torch.float64).clamp_min(0).sqrt()
        if self.criterion == "residual":
            residual_max = residual.abs().amax(dim=1).to(torch.float64)
            return spread > self.threshold * residual_max
        reference = self.mean.amax(dim=1).to(torch.float64)
        return (reference != 0) & (spread / reference > self.threshold)

    def state_dict(self) -> dict:
        return {"count": self.count, "next_slot": self.next_slot, "buffer": self.buffer[:, : self.count]}

    def load_state_dict(self, state: dict) -> None:
        count = int(state["count"])
        self.buffer.zero_()
        self.buffer[:, :count].copy_(state["buffer"])
        self.count = count
        self.next_slot = count % self.window if count < self.window else int(state["next_slot"]) % self.window


# -- counters ---------------------------------------------------------------------------

_INTEGER_COUNTERS = ("steps", "aa_attempts", "aa_accepted", "averages_applied", "qr_fallbacks")


class BatchedAccelerationStats:
    """``AccelerationStats`` per seed: every field a tensor of S values.

    ``aa_accepted`` and ``averages_applied`` live on the history's device (the decisions
    are taken there, without a host wait); the others on the CPU. ``as_dict()`` gives
    lists of S Python numbers, ``for_seed(s)`` the single wrapper's dict for seed s.
    """

    def __init__(self, seeds: int, device: torch.device):
        self.seeds = seeds
        cpu = torch.device("cpu")
        for name in STATS_FIELDS:
            where = device if name in ("aa_accepted", "averages_applied") else cpu
            if name in _INTEGER_COUNTERS:
                setattr(self, name, torch.zeros(seeds, dtype=torch.int64, device=where))
            else:
                setattr(self, name, torch.full((seeds,), math.nan, dtype=torch.float64, device=where))

    def as_dict(self) -> dict[str, list]:
        return {name: getattr(self, name).tolist() for name in STATS_FIELDS}

    def for_seed(self, seed: int) -> dict[str, Any]:
        if not 0 <= seed < self.seeds:
            raise IndexError(f"BatchedAndersonAcceleration: seed {seed} out of range 0..{self.seeds - 1}")
        values = {name: getattr(self, name)[seed].item() for name in STATS_FIELDS}
        return AccelerationStats(**values).as_dict()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in STATS_FIELDS}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name in STATS_FIELDS:
            current = getattr(self, name)
            current.copy_(torch.as_tensor(state[name]).to(current.device, current.dtype))


# -- memory ---------------------------------------------------------------------------


def batched_memory_bytes(seeds: int, n: int, dtype: torch.dtype, settings: AndersonSettings) -> int:
    """Bytes BatchedAndersonAcceleration allocates for S seeds of n parameters each: S
    times the single wrapper's history (X and dR, the float64 Gram matrix and stored dot
    products) and pool of n-vectors and, when averaging, the window plus the criterion's
    scratch (as large again) and the mean (one n-vector). Not counted, as for the single
    wrapper: the base optimizer's state and the passes' block scratch."""
    size, m = dtype.itemsize, settings.history
    per_seed = 2 * m * n * size + 8 * (m * m + m) + pool_size(settings) * n * size
    if settings.average:
        per_seed += (2 * settings.window + 2) * n * size
    return seeds * per_seed


# -- the wrapper ----------------------------------------------------------------------


class BatchedAndersonAcceleration(AccelerationBase):
    """Anderson acceleration of S independent copies of a model, stacked along a leading
    dimension of size S, as one ``torch.optim`` optimizer.

    Seed s's iterates are those of ``aadl.AndersonAcceleration`` on the [s] slices alone
    (same settings, same validation); see ``docs/library.md``, "Batched seeds". The base
    optimizer must act elementwise (Adam, AdamW, SGD with momentum, ...), so that one step
    over the stacked parameters is S independent steps.

    Args:
        optimizer: the base optimizer over the stacked parameters (param_groups shared).
        seeds: S, the size of every parameter's leading dimension.
        **settings: ``aadl.AndersonAcceleration``'s hyperparameters, checked by
            ``aadl.validate_settings``; ``distributed`` must be ``replicated`` on one
            process.

    ``step(closure)``: the closure returns one loss per seed, a tensor of shape (S,);
    seed s keeps its AA point iff its own loss there is strictly lower. ``step`` returns
    the (S,) losses at the points kept when the safeguard ran, else ``None``.
    """

    _name = "BatchedAndersonAcceleration"

    def __init__(self, optimizer: Optimizer, *, seeds: int, **settings: Any):
        if isinstance(optimizer, torch.optim.LBFGS):
            raise TypeError(
                "BatchedAndersonAcceleration: torch.optim.LBFGS couples every entry (line search, "
                "two-loop recursion) and cannot step S seeds as one; use an elementwise base optimizer"
            )
        if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
            raise _fail(f"seeds={seeds!r} is invalid; valid: an integer >= 1")
        self._start(optimizer, settings)
        self.seeds = seeds
        self._build(self._trainable_parameters())
        self._claim()

    @staticmethod
    def _unsupported(settings: AndersonSettings) -> str | None:
        """Why these settings cannot run batched, or None."""
        variant = getattr(settings, "variant", "contract")
        if variant != "contract":
            return (
                f"variant={variant!r} is not supported batched; valid: 'contract' (use "
                "aadl.AndersonAcceleration per seed for the authors' code's variant)"
            )
        if settings.distributed != "replicated":
            return (
                f"distributed={settings.distributed!r} is not supported batched; valid: "
                "'replicated' (the seeds of one process are the batch; shard seeds over processes instead)"
            )
        if process_group_active() and torch.distributed.get_world_size() > 1:
            return (
                "torch.distributed is initialised with several ranks; seed-batched AA runs in one "
                "process (give each process its own seeds)"
            )
        return None

    # -- setup --------------------------------------------------------------------------

    def _build(self, params: list[torch.Tensor]) -> None:
        """Allocate every buffer for these parameters (history emptied); all or nothing."""
        s = self.settings
        rows = SeedRows(params, self.seeds)
        device = torch.device(s.history_device) if s.history_device else rows.device
        seeds, n, dtype = self.seeds, rows.n, rows.dtype
        needed = batched_memory_bytes(seeds, n, dtype, s)
        capacity = device_capacity(device)
        advice = f"lower history (m={s.history}), average_window or seeds (S={seeds})"
        if capacity is not None and needed > capacity:
            raise MemoryError(
                f"BatchedAndersonAcceleration: the AA buffers for {seeds} seeds of n={n} "
                f"{str(dtype).removeprefix('torch.')} parameters need {needed} bytes "
                f"({format_bytes(needed)}) on {device}, which has {format_bytes(capacity)} in all; {advice}"
            )
        try:
            pool = [torch.zeros(seeds, n, dtype=dtype, device=device) for _ in range(pool_size(s))]
            history = BatchedHistory(seeds, s.history, n, dtype, device)
            average = (
                BatchedAverage(seeds, s.window, n, s.average_threshold, s.average_criterion, dtype, device)
                if s.average
                else None
            )
            stats = BatchedAccelerationStats(seeds, device)
        except (RuntimeError, MemoryError) as error:
            if not is_allocation_failure(error):
                raise
            raise MemoryError(
                f"BatchedAndersonAcceleration: the AA buffers for {seeds} seeds of n={n} parameters "
                f"need {needed} bytes ({format_bytes(needed)}) on {device}; {advice}"
            ) from error
        previous = getattr(self, "stats", None)
        if previous is not None:  # a rebuild keeps the counters
            stats.load_state_dict(previous.state_dict())
        self._rows, self._device = rows, device
        self._pool, self._history, self._average, self.stats = pool, history, average, stats
        self._stored: tuple[torch.Tensor, torch.Tensor] | None = None  # (u_s, r_s)
        self._steps = int(stats.steps[0])

    def _sync_parameters(self) -> None:
        params = self._trainable_parameters()
        if not self._rows.same_parameters(params):
            held = len(self._history) or self._stored is not None
            self._build(params)
            if held:
                warnings.warn(
                    "BatchedAndersonAcceleration: the set of trainable parameters changed; "
                    "the AA histories and moving averages are reset",
                    stacklevel=3,
                )

    def _free_buffer(self, *in_use: torch.Tensor | None) -> torch.Tensor:
        for buffer in self._pool:
            if not any(buffer is used for used in in_use):
                return buffer
        self._pool.append(torch.zeros_like(self._pool[0]))
        return self._pool[-1]

    @property
    def n(self) -> int:
        """Parameters per seed."""
        return self._rows.n

    def stats_for(self, seed: int) -> dict[str, Any]:
        """Seed ``seed``'s counters, as ``AndersonAcceleration.stats.as_dict()`` gives them."""
        return self.stats.for_seed(seed)

    # -- one step ----------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """One base step over the stacked parameters plus, on schedule, storage,
        acceleration (per-seed safeguard) and averaging (per-seed criterion).

        ``closure`` only computes the S losses (no backward; called under
        ``torch.no_grad()``). Returns the (S,) losses at the points kept when the
        safeguard ran, otherwise ``None``. If the closure fails at the AA points, the step
        is completed as for rejected candidates (every seed at w_k + r_k, moving averages
        updated) before the error is raised."""
        s = self.settings
        self._sync_parameters()
        self._closure_error = None
        k = self._steps + 1
        store = k > s.warmup and k % s.store_every == 0
        accelerate = k % s.frequency == 0 and (len(self._history) > 0 or (store and self._stored is not None))
        needs_residual = store or accelerate or self._average is not None
        stored_u, stored_r = self._stored if self._stored is not None else (None, None)

        if needs_residual:
            w_before = self._rows.gather(self._free_buffer(stored_u, stored_r))
        self.optimizer.step()
        self._steps = k
        self.stats.steps.fill_(k)
        if not needs_residual:
            return None
        w_after = self._rows.gather(self._free_buffer(stored_u, stored_r, w_before))
        residual = torch.sub(w_after, w_before, out=w_before)

        rhs = self._store(w_after, residual) if store else None
        current, loss = w_after, None
        if accelerate:
            current, loss = self._accelerate(closure, w_after, residual, rhs)
        try:
            if self._average is not None:
                self._update_average(residual, current)
        finally:
            error, self._closure_error = self._closure_error, None
        if error is not None:
            raise error
        return loss

    def _store(self, w_after: torch.Tensor, residual: torch.Tensor) -> torch.Tensor | None:
        """Append (dW, dR) from the stored pairs, then store (w_k, r_k) as u = w + c r."""
        history, c = self._history, self._dr_weight
        previous = self._stored
        if previous is not None:
            stored_u, stored_r = previous
            slot = history.open_slot()
            # Computed in the parameters' dtype, written as float64 (exactly the
            # single wrapper's float32 column, converted).
            torch.sub(residual, stored_r, out=history.dR[:, slot])
        if c == 1.0:
            u = w_after
        else:
            in_use = (previous[0],) if previous is not None else ()
            u = torch.add(w_after, residual, alpha=c - 1.0, out=self._free_buffer(*in_use, w_after, residual))
        self._stored = (u, residual)
        if previous is None:
            return None
        torch.sub(u, stored_u, out=history.X[:, slot])
        return history.append(slot, residual)

    def _accelerate(self, closure, w_after: torch.Tensor, residual: torch.Tensor, rhs: torch.Tensor | None):
        """Returns (the (S, n) block the parameters now hold, the losses or None)."""
        s, history, stats = self.settings, self._history, self.stats
        stats.aa_attempts += 1
        if rhs is None:
            rhs = history.dots(residual)
        g, condition, fallbacks = self._solve(rhs, residual)  # on the CPU
        stats.qr_fallbacks += fallbacks
        stats.last_g_norm.copy_(torch.linalg.vector_norm(g, dim=1))
        stats.last_condition.copy_(condition)
        finite_g = torch.isfinite(g).all(dim=1)

        # w_AA = w_k + beta r_k - (dW + beta dR) g = w_after + (beta - 1) r_k - X g' with
        # g' = g (Walker-Ni, X = dW + beta dR) or beta g (Eq. 6, X = dW + dR). A seed whose
        # g is not finite mixes with g' = 0 (its point is discarded below).
        beta = s.relaxation
        coefficients = torch.where(finite_g[:, None], g if s.mixing == "walker_ni" else beta * g, 0.0)
        if self._device.type != "cpu":  # one small asynchronous copy; the host never waits on it
            packed = torch.cat([coefficients, finite_g[:, None].to(torch.float64)], dim=1).pin_memory()
            packed = packed.to(self._device, non_blocking=True)
            coefficients, finite_g = packed[:, :-1], packed[:, -1] > 0
        candidate = self._free_buffer(*(self._stored or ()), w_after, residual)
        finite_point = batched_mix(
            candidate, w_after, history.X, len(history), coefficients, residual, beta - 1.0
        )
        valid = finite_g & finite_point.to(finite_g.device)

        if s.safeguard == "loss" and closure is None and not self._warned_no_closure:
            warnings.warn(
                "BatchedAndersonAcceleration: safeguard='loss' needs a closure that returns the "
                "losses; without one every finite AA step is kept unchecked",
                stacklevel=3,
            )
            self._warned_no_closure = True
        if s.safeguard != "loss" or closure is None:
            kept = candidate if self._uniform(valid) is True else torch.where(valid[:, None], candidate, w_after, out=candidate)
            self._rows.scatter(kept)
            stats.aa_accepted += valid
            return kept, None

        plain = self._evaluate_losses(closure)  # the parameters are at w_after
        trial = candidate if self._uniform(valid) is True else torch.where(valid[:, None], candidate, w_after, out=candidate)
        self._rows.scatter(trial)
        try:
            accelerated = self._evaluate_losses(closure)
        except BaseException as error:
            self._closure_error = error  # raised by step() once the step is complete
            accelerated = torch.full_like(plain, math.nan)
        here = self._device
        accept = valid & (accelerated.to(here, torch.float64) < plain.to(here, torch.float64))
        uniform = self._uniform(accept)
        if uniform is True:  # the parameters already hold every seed's trial point
            kept = trial
        elif uniform is False:
            kept = w_after
            self._rows.scatter(kept)
        else:
            kept = torch.where(accept[:, None], trial, w_after, out=candidate)
            self._rows.scatter(kept)
        stats.aa_accepted += accept
        return kept, torch.where(accept.to(plain.device), accelerated, plain)

    def _solve(self, rhs: torch.Tensor, residual: torch.Tensor):
        """(g (S, h), condition (S,), fallbacks (S,) int64), on the CPU, float64."""
        s, history = self.settings, self._history
        h = len(history)
        if s.solver == "gram":
            # The step's one host wait: both inputs in one transfer.
            packed = torch.cat([history.gram[:, :h, :h].reshape(self.seeds, -1), rhs], dim=1).cpu()
            gram, b = packed[:, : h * h].view(self.seeds, h, h), packed[:, h * h :]
            g, condition, trusted = solve_normal_equations_batched(gram, b, s.regularization)
            fallback = ~trusted
            if not bool(fallback.any()):
                return g, condition, fallback.to(torch.int64)
            chosen = fallback.nonzero().squeeze(1)
            index = chosen.to(history.dR.device)
            r_factor = r_factors_batched(history.dR[index, :h], residual[index])
        else:
            fallback = torch.zeros(self.seeds, dtype=torch.bool)
            chosen = torch.arange(self.seeds)
            g = torch.empty(self.seeds, h, dtype=torch.float64)
            condition = torch.empty(self.seeds, dtype=torch.float64)
            r_factor = r_factors_batched(history.dR[:, :h], residual)
        by_qr, qr_condition = solve_r_factors_batched(r_factor, s.regularization)
        g[chosen], condition[chosen] = by_qr, qr_condition
        return g, condition, fallback.to(torch.int64)

    #: Skip the (S, n) selects and copies a per-seed decision does not need when every seed
    #: decided alike (the same values either way; benchmarks/batched_aa.py turns it off to compare).
    lean_selects: bool = True

    def _uniform(self, decided: torch.Tensor) -> bool | None:
        """True if every seed's decision is yes, False if every one is no, None if they differ
        or reading them would make the host wait on a device."""
        if not self.lean_selects or decided.device.type != "cpu":
            return None
        if bool(decided.all()):
            return True
        return False if not bool(decided.any()) else None

    def _evaluate_losses(self, closure: Callable[[], Any]) -> torch.Tensor:
        """``closure()``, checked to be S real losses; returned as a (S,) tensor."""
        try:
            losses = closure()
        except RuntimeError as error:
            if _BACKWARD_UNDER_NO_GRAD in str(error):
                raise RuntimeError(
                    f"BatchedAndersonAcceleration: the closure failed with '{error}', which is what "
                    f"backward() raises under torch.no_grad(): {CLOSURE_CONTRACT}"
                ) from error
            raise
        if isinstance(losses, (np.ndarray, list, tuple)):
            try:
                losses = torch.as_tensor(np.asarray(losses, dtype=np.float64))
            except (TypeError, ValueError):
                pass
        if (
            not isinstance(losses, torch.Tensor)
            or tuple(losses.shape) != (self.seeds,)
            or losses.is_complex()
            or losses.dtype == torch.bool
        ):
            shown = (
                f"a {str(losses.dtype).removeprefix('torch.')} tensor of shape {tuple(losses.shape)}"
                if isinstance(losses, torch.Tensor)
                else ("None" if losses is None else f"a {type(losses).__name__}")
            )
            raise TypeError(
                f"BatchedAndersonAcceleration: the closure returned {shown}, expected a real tensor of "
                f"shape ({self.seeds},); {CLOSURE_CONTRACT}"
            )
        return losses.detach()

    def _update_average(self, residual: torch.Tensor, current: torch.Tensor) -> None:
        average = self._average
        average.push(current)  # the parameters as they now stand
        if not average.full:
            return
        fire = average.decide(residual)
        if self._uniform(fire) is not False:  # where no seed averages, the parameters hold current
            self._rows.scatter(torch.where(fire[:, None], average.mean, current, out=average.mean))
        self.stats.averages_applied += fire

    # -- checkpointing -----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state and all of the wrapper's, per seed; tensors are
        references, as in ``torch.optim``."""
        stored = None if self._stored is None else {"u": self._stored[0], "r": self._stored[1]}
        return {
            "base": self.optimizer.state_dict(),
            _STATE_KEY: {
                "format": BATCHED_STATE_FORMAT,
                "seeds": self.seeds,
                "n": self.n,
                "shapes": [shape[1:] for shape in self.parameter_shapes()],
                "settings": self.settings.as_dict(),
                "dtype": str(self._rows.dtype),
                "base_optimizer": base_optimizer_name(self.optimizer),
                "stats": self.stats.state_dict(),
                "history": self._history.state_dict(),
                "stored": stored,
                "average": None if self._average is None else self._average.state_dict(),
                "warned_no_closure": self._warned_no_closure,
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state saved by :meth:`state_dict`. Everything is checked first (format,
        keys, seeds, n, the settings that bind a checkpoint as in ``aadl.checkpoint``, the
        base optimizer's class, the dtype, every shape), so a refused checkpoint leaves
        this optimizer as it was."""
        where = "BatchedAndersonAcceleration.load_state_dict: "
        if isinstance(state_dict, dict) and set(state_dict) == {"base", "anderson"}:
            raise ValueError(
                where + "this is a single AndersonAcceleration checkpoint (keys 'base' and 'anderson'); "
                f"a batched one has keys 'base' and '{_STATE_KEY}'"
            )
        if not isinstance(state_dict, dict) or set(state_dict) != {"base", _STATE_KEY}:
            got = f"; got keys {sorted(map(str, state_dict))}" if isinstance(state_dict, dict) else ""
            raise ValueError(
                where + f"expects a dict with keys 'base' and '{_STATE_KEY}' (from "
                f"BatchedAndersonAcceleration.state_dict()){got}"
            )
        saved = state_dict[_STATE_KEY]
        if not isinstance(saved, dict) or saved.get("format") != BATCHED_STATE_FORMAT:
            found = saved.get("format") if isinstance(saved, dict) else None
            raise ValueError(
                where + f"unsupported state format {found!r}; this version reads {BATCHED_STATE_FORMAT}"
            )
        missing = self._missing_keys(state_dict)
        if missing:
            raise ValueError(where + "the checkpoint is incomplete, missing " + ", ".join(missing))
        self._sync_parameters()
        sizes = [
            (key, saved[key], here) for key, here in (("seeds", self.seeds), ("n", self.n)) if saved[key] != here
        ]
        if sizes:
            raise ValueError(
                where + "the checkpoint was saved for "
                + ", ".join(f"{key}={there}" for key, there, _ in sizes)
                + " but this optimizer has "
                + ", ".join(f"{key}={here}" for key, _, here in sizes)
            )
        current = {
            "settings": self.settings.as_dict(),
            "dtype": str(self._rows.dtype),
            "base_optimizer": base_optimizer_name(self.optimizer),
        }
        differing = incompatible_settings(saved, current)
        if differing:
            raise ValueError(
                where + "the checkpoint's state cannot be carried over to these settings: " + "; ".join(differing)
            )
        mismatch = shape_mismatch([shape[1:] for shape in self.parameter_shapes()], saved.get("shapes"))
        if mismatch:
            raise ValueError(where + mismatch)
        shape_errors = self._shape_errors(saved)
        if shape_errors:
            raise ValueError(where + "; ".join(shape_errors))

        s, seeds, n, dtype = self.settings, self.seeds, self.n, self._rows.dtype
        history = BatchedHistory(seeds, s.history, n, dtype, self._device)
        history.load_state_dict(saved["history"])
        average = None
        if self._average is not None:
            average = BatchedAverage(
                seeds, s.window, n, s.average_threshold, s.average_criterion, dtype, self._device
            )
            if saved["average"] is not None:
                average.load_state_dict(saved["average"])
        stats = BatchedAccelerationStats(seeds, self._device)
        stats.load_state_dict(saved["stats"])
        self.optimizer.load_state_dict(state_dict["base"])

        self._history, self._average, self.stats = history, average, stats
        self._steps = int(stats.steps[0])
        self._stored = None
        if saved["stored"] is not None:
            u, r = self._pool[0], self._pool[1]
            u.copy_(saved["stored"]["u"])
            r.copy_(saved["stored"]["r"])
            self._stored = (u, r)
        old = saved["settings"]
        old_weight = old["relaxation"] if old["mixing"] == "walker_ni" else 1.0
        if old_weight != self._dr_weight:
            history.reweight_mixing(old_weight, self._dr_weight)
            if self._stored is not None:
                self._stored[0].add_(self._stored[1], alpha=self._dr_weight - old_weight)
        self._warned_no_closure = bool(saved["warned_no_closure"])

    @staticmethod
    def _missing_keys(state: dict) -> list[str]:
        required = {
            "base": ("state", "param_groups"),
            _STATE_KEY: (
                "format", "seeds", "n", "settings", "dtype", "base_optimizer", "stats", "history",
                "stored", "average", "warned_no_closure",
            ),
        }
        parts = {
            "settings": (("history", "relaxation", "mixing", "average", "average_window"), False),
            "stats": (STATS_FIELDS, False),
            "history": (("count", "next_slot", "X", "dR", "gram", "stored_dots"), False),
            "stored": (("u", "r"), True),
            "average": (("count", "next_slot", "buffer"), True),
        }
        missing: list[str] = []
        for top, keys in required.items():
            part = state[top]
            if not isinstance(part, dict):
                missing.append(f"{top} (a dict, got {type(part).__name__})")
                continue
            missing.extend(f"{top}.{key}" for key in keys if key not in part)
        saved = state[_STATE_KEY]
        if isinstance(saved, dict):
            for key, (keys, optional) in parts.items():
                if key not in saved or (optional and saved[key] is None):
                    continue
                if not isinstance(saved[key], dict):
                    missing.append(f"{_STATE_KEY}.{key} (a dict, got {type(saved[key]).__name__})")
                    continue
                missing.extend(f"{_STATE_KEY}.{key}.{name}" for name in keys if name not in saved[key])
        return missing

    def _shape_errors(self, saved: dict) -> list[str]:
        """Every saved tensor whose shape does not fit this optimizer."""
        seeds, n, s = self.seeds, self.n, self.settings
        errors = []

        def check(name: str, value: Any, expected: tuple[int, ...]) -> None:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else None
            if shape != expected:
                errors.append(f"{name} has shape {shape}, expected {expected}")

        h = int(saved["history"]["count"])
        if not 0 <= h <= s.history:
            errors.append(f"the checkpoint holds {h} history columns but history={s.history}")
        else:
            for name, expected in self._history.expected_shapes(h).items():
                check(f"history '{name}'", saved["history"][name], expected)
        if saved["stored"] is not None:
            for name in ("u", "r"):
                check(f"stored '{name}'", saved["stored"][name], (seeds, n))
        if self._average is not None and saved["average"] is not None:
            count = int(saved["average"]["count"])
            if not 0 <= count <= s.window:
                errors.append(f"the moving-average window holds {count} iterates, at most {s.window} here")
            else:
                check("moving-average buffer", saved["average"]["buffer"], (seeds, count, n))
        for name in STATS_FIELDS:
            check(f"stats '{name}'", saved["stats"][name], (seeds,))
        if not errors and len(set(saved["stats"]["steps"].tolist())) > 1:
            errors.append("stats 'steps' differ between seeds; the seeds of one batch step together")
        return errors

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in self.settings.as_dict().items())
        name = type(self.optimizer).__name__
        return f"BatchedAndersonAcceleration({name}, seeds={self.seeds}, n={self.n}, {settings})"
