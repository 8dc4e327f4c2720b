"""``variant="reference_code"``: AADL as the authors' code runs it (ORNL/AADL, ``AADL/accelerate.py``).

The paper's figures were made with that code, whose mixing formula is the contract's but
whose history and moving average are built differently (docs/library.md, "The authors'
code", has each difference and the reason the contract differs). One call of ``step``:

1. the base optimizer's step;
2. with ``average``: the parameters are pushed into a window of the last ``history + 2``
   post-step iterates; from two iterates on (partial windows included), per parameter
   group, if ``max_j std_j / max_j mean_j > 0.1`` (std with Bessel's correction, the signed
   mean, IEEE division) the group's parameters are set to the window's mean;
3. every ``store_every`` steps the parameters as they now stand (the averaged point if
   step 2 averaged) are pushed into a ring of the last ``history + 2`` stored vectors x_j;
4. every ``frequency`` steps after ``warmup`` (the code's ``wait_iterations``), once three
   vectors are stored, per parameter group: with DX_j = x_{j+1} - x_j and
   dR_i = DX_{i+1} - DX_i, r = DX_last and w = x_{last-1},
   ``g = argmin ||r - dR g||^2 + lam ||g||^2`` and
   ``w_AA = w + beta r - (DX[:-1] + beta dR) g``. With a closure (and ``safeguard="loss"``)
   the loss at the parameters as they stand is compared with the loss at w_AA: strictly
   lower keeps w_AA and writes it over the newest stored vector, otherwise the group goes
   back to the newest stored vector. Without one, w_AA is applied and the ring is left as
   it was.

The ring holds vectors, not difference columns, because an accepted w_AA replaces the newest
vector and so rewrites the newest difference; the columns are formed at each acceleration
(O(m n) to form, O(m^2 n) for the Gram route's products), which the contract's
incremental history avoids. The class is the contract wrapper's sibling under
``aadl.base.AccelerationBase`` (which holds the constructor's checks, the shared groups and
the first checks of a checkpoint); ``AndersonAcceleration(..., variant="reference_code")``
returns one.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from . import kernels
from .base import STATS_FIELDS, AccelerationBase, AccelerationStats
from .checkpoint import STATE_FORMAT, base_optimizer_name, incompatible_settings, layout_mismatch
from .closure import evaluate_loss
from .distributed import RowLayout
from .flat import ParameterVector
from .hyperparameters import REFERENCE_CODE_THRESHOLD, AndersonSettings
from .memory import device_capacity, format_bytes, is_allocation_failure
from .solvers import LeastSquaresSolution, solve_normal_equations, solve_r_factor

_ANDERSON_KEYS = (
    "format", "settings", "layout", "dtype", "base_optimizer", "stats", "iterates", "average",
    "store_counter", "warned_no_closure",
)
_RING_KEYS = ("count", "next_slot", "buffer")


def depth(settings: AndersonSettings) -> int:
    """Vectors the code keeps (its ``history_depth``): m columns need m + 2 vectors."""
    return settings.history + 2


def memory_bytes(n: int, dtype: torch.dtype, settings: AndersonSettings) -> int:
    """Bytes this variant allocates for n parameters: the ring of stored vectors, the
    averaging window, m rows of dR scratch and three n-vectors."""
    rows = depth(settings) * (2 if settings.average else 1) + settings.history + 3
    return rows * n * dtype.itemsize


class IterateRing:
    """The last ``capacity`` n-vectors in a preallocated (capacity, n) buffer; the oldest
    is overwritten. Physical slot order is kept across checkpoints, so that sums over the
    filled rows round the same way after a resume."""

    def __init__(self, capacity: int, length: int, dtype: torch.dtype, device: torch.device):
        self.capacity = capacity
        self.buffer = torch.zeros(capacity, length, dtype=dtype, device=device)
        self.count = 0
        self.next_slot = 0

    def push_slot(self) -> torch.Tensor:
        """The row to write the next vector into; it counts as pushed."""
        row = self.buffer[self.next_slot]
        self.next_slot = (self.next_slot + 1) % self.capacity
        self.count = min(self.count + 1, self.capacity)
        return row

    def ordered(self) -> list[torch.Tensor]:
        """The held vectors, oldest first."""
        first = (self.next_slot - self.count) % self.capacity
        return [self.buffer[(first + i) % self.capacity] for i in range(self.count)]

    def newest(self) -> torch.Tensor:
        return self.buffer[(self.next_slot - 1) % self.capacity]

    def filled(self) -> torch.Tensor:
        """The held rows in slot order (rows 0..count-1: slots fill from 0, then all)."""
        return self.buffer[: self.count]

    def state_dict(self) -> dict:
        return {"count": self.count, "next_slot": self.next_slot, "buffer": self.buffer[: self.count]}

    def load_state_dict(self, state: dict, what: str) -> None:
        count, saved = int(state["count"]), state["buffer"]
        if not 0 <= count <= self.capacity or tuple(saved.shape) != (count, self.buffer.shape[1]):
            raise ValueError(
                f"AndersonAcceleration.load_state_dict: the {what} has shape {tuple(saved.shape)}, "
                f"expected at most ({self.capacity}, {self.buffer.shape[1]})"
            )
        self.buffer.zero_()
        self.buffer[:count].copy_(saved)
        self.count = count
        self.next_slot = count % self.capacity if count < self.capacity else int(state["next_slot"]) % self.capacity


def _write(params: list[torch.Tensor], source: torch.Tensor) -> None:
    """Set ``params`` from ``source``, the flat vector of exactly their rows."""
    offset = 0
    for p in params:
        p.copy_(source[offset : offset + p.numel()].view_as(p))
        offset += p.numel()


def _exceeds(spread: float, reference: float, threshold: float) -> bool:
    """``spread / reference > threshold`` as torch computes it: IEEE division, so a zero
    reference gives inf (averages) or nan (does not), a negative one never averages."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return bool(np.float64(spread) / np.float64(reference) > threshold)


@dataclasses.dataclass(frozen=True)
class _Group:
    """One parameter group's rows [start, stop) of the joint vector and its parameters:
    the authors' code accelerates and averages each group on its own."""

    start: int
    stop: int
    params: list[torch.Tensor] = dataclasses.field(compare=False)
    ids: tuple[int, ...] = ()  # the parameters' identities, for comparing partitions


class ReferenceCodeAcceleration(AccelerationBase):
    """``AndersonAcceleration(..., variant="reference_code")``; see the module docstring.

    Settings as in the contract, read the authors' way: ``history`` m (the code's
    ``history_depth`` is m + 2), ``frequency``, ``store_every``, ``relaxation``,
    ``regularization``, ``warmup`` (the code's ``wait_iterations``: accelerations only
    after it; storage is not delayed), ``safeguard`` (``none``: as without a closure),
    ``solver`` (``qr``: the code's ``anderson``, ``gram``: its ``anderson_normal_equation``),
    ``average``, ``history_device``. Under torch.distributed every rank holds everything
    and the two safeguard losses are averaged over ranks, so that replicas cannot part.
    """

    def __init__(self, optimizer, *, process_group=None, **settings: Any):
        settings.setdefault("variant", "reference_code")
        self._start(optimizer, settings)
        self.process_group = process_group
        self.stats = AccelerationStats()
        self._build(self._trainable_parameters())
        self._claim()

    @staticmethod
    def _unsupported(settings: AndersonSettings) -> str | None:
        if settings.variant != "reference_code":
            return f"variant={settings.variant!r}; ReferenceCodeAcceleration runs only 'reference_code'"
        return None

    # -- setup --------------------------------------------------------------------------

    def _groups(self) -> list[_Group]:
        groups, start = [], 0
        for group in self.param_groups:
            params = [p for p in group["params"] if p.requires_grad]
            size = sum(p.numel() for p in params)
            if size:
                groups.append(_Group(start, start + size, params, tuple(map(id, params))))
            start += size
        return groups

    def _build(self, params: list[torch.Tensor]) -> None:
        s = self.settings
        whole = ParameterVector(params)
        layout = RowLayout(whole.n, "replicated", whole.device, self.process_group)
        device = torch.device(s.history_device) if s.history_device else whole.device
        dtype, n = whole.dtype, whole.n
        needed, capacity = memory_bytes(n, dtype, s), device_capacity(device)
        if capacity is not None and needed > capacity:
            raise self._out_of_memory(n, dtype, device, needed)
        try:
            stored = IterateRing(depth(s), n, dtype, device)
            average = IterateRing(depth(s), n, dtype, device) if s.average else None
            rows = torch.zeros(s.history * n, dtype=dtype, device=device)  # dR, then the mixing's rows
            vectors = torch.zeros(3, n, dtype=dtype, device=device)  # r, a difference, w_AA / the mean
        except (RuntimeError, MemoryError) as error:
            if not is_allocation_failure(error):
                raise
            raise self._out_of_memory(n, dtype, device, needed) from error
        self._whole, self._layout = whole, layout
        self._group_rows = self._groups()
        self._stored, self._average = stored, average
        self._scratch_rows, self._vectors = rows, vectors
        self._store_counter = 0

    def _out_of_memory(self, n: int, dtype: torch.dtype, device: torch.device, needed: int) -> MemoryError:
        return MemoryError(
            f"AndersonAcceleration: variant='reference_code' needs {needed} bytes "
            f"({format_bytes(needed)}) on {device} for n={n} {str(dtype).removeprefix('torch.')} "
            f"parameters; lower history (m={self.settings.history}) or place the history elsewhere "
            "(history_device)"
        )

    def _sync_parameters(self) -> None:
        params = self._trainable_parameters()
        if self._whole.same_parameters(params) and self._groups() == self._group_rows:
            return
        held = self._stored.count or (self._average is not None and self._average.count)
        self._build(params)
        if held:
            warnings.warn(
                "AndersonAcceleration: the set of trainable parameters changed; "
                "the stored iterates and moving average are reset",
                stacklevel=3,
            )

    # -- one step ----------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """One base step, then the averaging, storage and acceleration of the authors'
        code (module docstring). Returns the closure's loss at the point kept when the
        safeguard ran (the last group's), otherwise ``None``."""
        s = self.settings
        self._sync_parameters()
        k = self.stats.steps + 1
        self.optimizer.step()
        self.stats.steps = k
        if self._average is not None:
            self._update_average()
        self._store_counter += 1
        if self._store_counter >= s.store_every:
            self._store_counter = 0
            self._whole.gather(self._stored.push_slot())
        if not (k > s.warmup and k % s.frequency == 0 and self._stored.count >= 3):
            return None
        checked = closure is not None and s.safeguard == "loss"
        if s.safeguard == "loss" and closure is None and not self._warned_no_closure:
            warnings.warn(
                "AndersonAcceleration: safeguard='loss' needs a closure that returns the loss; "
                "without one every AA step is kept unchecked",
                stacklevel=2,
            )
            self._warned_no_closure = True
        loss, error = None, None
        for group in self._group_rows:
            loss, failure = self._accelerate(group, closure if checked else None, failed=error is not None)
            error = error or failure
        if error is not None:  # the step is complete: every group decided, on every rank
            raise error
        return loss

    def _update_average(self) -> None:
        average = self._average
        self._whole.gather(average.push_slot())
        if average.count < 2:
            return  # the code's std of one iterate is nan: no average
        averaged = False
        for group in self._group_rows:
            rows = average.filled()[:, group.start : group.stop]
            spread, top = kernels.max_entry_spread(rows, correction=1)
            if _exceeds(spread, top, REFERENCE_CODE_THRESHOLD):
                mean = kernels.row_mean(rows, self._vectors[2, : group.stop - group.start])
                _write(group.params, mean)
                averaged = True
        self.stats.averages_applied += averaged

    def _accelerate(self, group: _Group, closure: Callable[[], Any] | None, failed: bool = False):
        """One group's acceleration; returns (the loss kept, or None; the closure's error,
        or None). After a failed closure (``failed``) the group's candidate is rejected
        without calling it again, but through the same loss all-reduce, so that ranks where
        it failed and ranks where it did not make the same collectives."""
        s, stats = self.settings, self.stats
        a, b = group.start, group.stop
        x = [vector[a:b] for vector in self._stored.ordered()]
        h, length = len(x) - 2, b - a
        dR = self._scratch_rows[: h * length].view(h, length)
        r, difference, candidate = (v[:length] for v in self._vectors)
        # Entry by entry as the code rounds it: DX = x[1:] - x[:-1], dR = DX[1:] - DX[:-1].
        for i in range(h):
            torch.sub(x[i + 2], x[i + 1], out=difference)
            torch.sub(x[i + 1], x[i], out=dR[i])
            torch.sub(difference, dR[i], out=dR[i])
        torch.sub(x[-1], x[-2], out=r)

        stats.aa_attempts += 1
        solution = self._solve(dR, r)
        g = solution.coefficients
        stats.last_g_norm = float(torch.linalg.vector_norm(g))
        stats.last_condition = solution.condition
        # The mixing's rows DX_i + beta dR_i, over dR in place (dR is no longer needed).
        for i in range(h):
            torch.sub(x[i + 1], x[i], out=difference)
            torch.add(difference, dR[i], alpha=s.relaxation, out=dR[i])
        kernels.mix(candidate, x[-2], dR, g, r, s.relaxation)  # w + beta r - rows^T g

        if closure is None:  # applied unchecked; the stored vectors stay as they were
            _write(group.params, candidate)
            stats.aa_accepted += 1
            return None, None
        plain_loss, aa_loss, error = math.nan, math.nan, None
        try:
            if not failed:
                plain_loss = evaluate_loss(closure)
                _write(group.params, candidate)
                aa_loss = evaluate_loss(closure)
        except BaseException as failure:
            error = failure
        plain, accelerated = self._mean_over_ranks(plain_loss, aa_loss)
        if error is None and not failed and accelerated < plain:  # nan compares false
            self._stored.newest()[a:b].copy_(candidate)
            stats.aa_accepted += 1
            return aa_loss, None
        _write(group.params, self._stored.newest()[a:b])  # never leave an unchecked point
        return plain_loss, error

    def _solve(self, dR: torch.Tensor, r: torch.Tensor) -> LeastSquaresSolution:
        s = self.settings
        if s.solver == "gram":
            h = dR.shape[0]
            gram = kernels.row_dots(dR, [dR[j] for j in range(h)])
            solution = solve_normal_equations(gram, kernels.row_dots(dR, [r])[:, 0], s.regularization)
            if solution is not None:
                return solution
            self.stats.qr_fallbacks += 1
        return solve_r_factor(kernels.streaming_r_factor(dR, r), s.regularization)

    # -- checkpointing -----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state and the variant's: the stored vectors, the averaging
        window, the storage counter and the counters (tensors are references)."""
        return {
            "base": self.optimizer.state_dict(),
            "anderson": {
                "format": STATE_FORMAT,
                "settings": self.settings.as_dict(),
                "layout": self._layout.describe(),
                "shapes": self.parameter_shapes(),
                "dtype": str(self._whole.dtype),
                "base_optimizer": base_optimizer_name(self.optimizer),
                "stats": self.stats.as_dict(),
                "iterates": self._stored.state_dict(),
                "average": None if self._average is None else self._average.state_dict(),
                "store_counter": self._store_counter,
                "warned_no_closure": self._warned_no_closure,
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state saved by :meth:`state_dict`; everything is checked first, so a
        refused checkpoint changes nothing. Binding: the variant, ``history``, ``average``,
        the base optimizer's class, the dtype, the model's size and every parameter's
        shape; the rest may change."""
        saved = self._saved_part(state_dict)
        stats_fields = STATS_FIELDS
        missing = [f"anderson.{key}" for key in _ANDERSON_KEYS if key not in saved]
        missing += [f"anderson.stats.{key}" for key in stats_fields if key not in saved.get("stats", {})]
        for part in ("iterates", "average"):
            ring = saved.get(part)
            if isinstance(ring, dict):
                missing += [f"anderson.{part}.{key}" for key in _RING_KEYS if key not in ring]
        if missing:
            raise ValueError(
                "AndersonAcceleration.load_state_dict: the checkpoint is incomplete, missing "
                + ", ".join(missing)
            )
        self._sync_parameters()
        # The window is the history depth here, so average_window binds nothing of its own.
        unwindowed = lambda settings: {**settings, "average_window": None}  # noqa: E731
        differing = incompatible_settings(
            {**saved, "settings": unwindowed(saved["settings"])},
            {
                "settings": unwindowed(self.settings.as_dict()),
                "dtype": str(self._whole.dtype),
                "base_optimizer": base_optimizer_name(self.optimizer),
            },
        )
        if differing:
            raise ValueError(
                "AndersonAcceleration.load_state_dict: the checkpoint's state cannot be carried "
                "over to these settings: " + "; ".join(differing)
            )
        layout_error = layout_mismatch(self._layout.describe(), saved["layout"])
        if layout_error:
            raise ValueError(layout_error)
        self._check_shapes(saved)
        buffer = self._stored.buffer
        stored = IterateRing(depth(self.settings), self._whole.n, buffer.dtype, buffer.device)
        stored.load_state_dict(saved["iterates"], "stored iterates")
        average = None
        if self._average is not None:
            average = IterateRing(depth(self.settings), self._whole.n, buffer.dtype, buffer.device)
            if saved["average"] is not None:
                average.load_state_dict(saved["average"], "moving-average window")
        self.optimizer.load_state_dict(state_dict["base"])

        self._stored, self._average = stored, average
        self._store_counter = int(saved["store_counter"])
        self.stats = AccelerationStats(**{name: saved["stats"][name] for name in stats_fields})
        self._warned_no_closure = bool(saved["warned_no_closure"])


__all__ = ["ReferenceCodeAcceleration", "depth", "memory_bytes"]
