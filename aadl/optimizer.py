"""``AndersonAcceleration``: stable Anderson acceleration wrapped around any torch optimizer.

The algorithm is specified in ``shared/spec/aadl-algorithm.md`` (the contract); the
section numbers in comments below refer to its "One call of step" list.

Memory: besides the preallocated history (2 m n numbers) and the optional moving-average
buffer (t n), the wrapper keeps a pool of n-vectors whose roles rotate from step to step
so that nothing is copied twice: the stored pair (u_s, r_s), the pre-step parameters that
become the residual r_k, the post-step parameters w_k + r_k and the AA candidate. Four
suffice whenever every acceleration step is also a storage step (p a multiple of q, as in
all the paper's settings); other schedules need five. All of it is allocated up front
(``aadl.memory`` says how much), so a run that does not fit fails at construction.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.optim import Optimizer

from . import kernels
from .averaging import IterateAverage
from .base import STATS_FIELDS, AccelerationBase, AccelerationStats
from .checkpoint import STATE_FORMAT, base_optimizer_name, incompatible_settings, layout_mismatch, missing_keys
from .closure import evaluate_loss
from .distributed import RowLayout
from .flat import ParameterVector
from .history import AndersonHistory
from .hyperparameters import AndersonSettings
from .memory import device_capacity, estimate_memory_bytes, is_allocation_failure, out_of_memory, pool_size
from .reference_variant import ReferenceCodeAcceleration
from .solvers import LeastSquaresSolution, solve_normal_equations, solve_r_factor

# The lean path (docs/library.md, "Memory and speed"): at n up to this many parameters on
# the CPU, one process, the step's n-sized copies and differences run as numpy operations
# on views of the same memory, whose dispatch costs a fraction of a torch call's; above it
# torch's intra-op threads pay for theirs. It changes the dispatch, never a result: the
# same IEEE operations on the same entries, bitwise (tests/test_aadl_lean_path.py).
LEAN_MAX_N = 1 << 16


class AndersonAcceleration(AccelerationBase):
    """Anderson acceleration (AADL) of any ``torch.optim`` optimizer.

    Each ``step()`` runs one step of the base optimizer, then (on the configured
    schedule) stores a history column, extrapolates with the Anderson mixing, checks the
    candidate against the loss, and optionally averages recent iterates. See
    ``docs/library.md`` for usage and ``shared/spec/aadl-algorithm.md`` for the
    algorithm.

    Args:
        optimizer: the base optimizer; its ``param_groups`` are shared, so an LR
            scheduler may be attached to either object.
        history: m, columns kept. frequency: p, steps between accelerations.
        store_every: q, steps between stored columns. relaxation: beta in (0, 1].
        regularization: Tikhonov lambda >= 0. warmup: plain steps before storing.
        average, average_window, average_threshold, average_criterion: the moving
            average (window t, default m; threshold epsilon; ``residual`` = Eq. 16 or
            ``reference_code``).
        safeguard: ``loss`` (keep the AA point only if the closure's loss drops) or
            ``none``. solver: ``gram`` or ``qr``. mixing: ``walker_ni`` or ``paper_eq6``.
        distributed: ``replicated`` (every rank holds the whole history) or
            ``sharded`` (each rank holds 1/P of its rows).
        history_device: where the history lives (default: the parameters' device).
        process_group: the ``torch.distributed`` group (default: the world).
        variant: ``contract`` (this class) or ``reference_code``, the authors' code's
            history and averaging: a ``aadl.reference_variant.ReferenceCodeAcceleration``,
            this class's sibling under ``aadl.base.AccelerationBase``, is returned.
    """

    def __new__(cls, *args: Any, **kwargs: Any):
        if cls is AndersonAcceleration and kwargs.get("variant") == "reference_code":
            # Not an instance of cls, so Python does not call this class's __init__ on it.
            return ReferenceCodeAcceleration(*args, **kwargs)
        return super().__new__(cls)

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        history: int = 10,
        frequency: int = 1,
        store_every: int = 1,
        relaxation: float = 1.0,
        regularization: float = 0.0,
        warmup: int = 0,
        average: bool = False,
        average_window: int | None = None,
        average_threshold: float = 0.1,
        average_criterion: str | None = None,
        safeguard: str = "loss",
        solver: str = "gram",
        mixing: str = "walker_ni",
        distributed: str = "replicated",
        history_device: str | torch.device | None = None,
        process_group=None,
        variant: str = "contract",
    ):
        # Check everything before a single buffer is allocated.
        self._start(optimizer, dict(
            history=history,
            frequency=frequency,
            store_every=store_every,
            relaxation=relaxation,
            regularization=regularization,
            warmup=warmup,
            average=average,
            average_window=average_window,
            average_threshold=average_threshold,
            average_criterion=average_criterion,
            safeguard=safeguard,
            solver=solver,
            mixing=mixing,
            distributed=distributed,
            history_device=history_device,
            variant=variant,
        ))
        self.process_group = process_group
        self.stats = AccelerationStats()
        self._build(self._trainable_parameters())
        self._claim()

    @staticmethod
    def _unsupported(settings: AndersonSettings) -> str | None:
        if settings.variant != "contract":  # only reachable by calling this class's __init__ directly
            return f"variant={settings.variant!r} is built by aadl.reference_variant.ReferenceCodeAcceleration"
        return None

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_lean", False)
        self.__dict__.setdefault("_numpy_copies", False)

    # -- setup --------------------------------------------------------------------------

    def _build(self, params: list[torch.Tensor]) -> None:
        """Allocate every buffer for the joint vector of ``params`` (history emptied).

        All or nothing: the buffers are assigned only once every one of them exists, so a
        failed rebuild leaves the optimizer as it was. Buffers that do not fit raise a
        one-line MemoryError naming the bytes and the setting to lower."""
        s = self.settings
        whole = ParameterVector(params)
        layout = RowLayout(whole.n, s.distributed, whole.device, self.process_group)
        if layout.sharded and whole.n < layout.world_size:
            raise ValueError(
                f"AndersonAcceleration: distributed='sharded' needs at least one parameter per "
                f"rank; n={whole.n} < world size {layout.world_size}"
            )
        device = torch.device(s.history_device) if s.history_device else whole.device
        length, dtype = layout.shard_length, whole.dtype
        # Refuse what can never fit before asking: on Linux an overcommitted CPU
        # allocation "succeeds" and the process is killed while it is zero-filled.
        capacity = device_capacity(device)
        if capacity is not None and estimate_memory_bytes(
            whole.n, dtype, s, world_size=layout.world_size
        ) > capacity:
            raise out_of_memory(whole.n, dtype, device, s, layout.world_size, capacity)
        try:
            pool = [torch.zeros(length, dtype=dtype, device=device) for _ in range(pool_size(s))]
            full = torch.zeros(layout.padded_length, dtype=dtype, device=device) if layout.sharded else None
            history = AndersonHistory(s.history, length, dtype, device)
            average = (
                IterateAverage(
                    s.window, length, layout.local_length, s.average_threshold,
                    s.average_criterion, dtype, device,
                )
                if s.average
                else None
            )
        except (RuntimeError, MemoryError) as error:
            if not is_allocation_failure(error):
                raise
            raise out_of_memory(whole.n, dtype, device, s, layout.world_size) from error
        self._whole = whole
        self._rows = ParameterVector(params, layout.start, layout.stop) if layout.sharded else whole
        self._layout = layout
        self._pool, self._full, self._history, self._average = pool, full, history, average
        self._stored: tuple[torch.Tensor, torch.Tensor] | None = None  # (u_s, r_s)
        # Copies between the parameters and the flat buffers go through numpy wherever
        # both are CPU float32/float64: a plain memcpy, 2-4x faster than torch.cat and
        # _foreach_copy_ at n = 12.8e6 on the 2-core machine, and at small n a fraction
        # of their dispatch.
        self._numpy_copies = (
            device.type == "cpu" and whole.device.type == "cpu" and dtype in (torch.float32, torch.float64)
        )
        self._lean = whole.n <= LEAN_MAX_N and layout.world_size == 1 and self._numpy_copies

    def _sync_parameters(self) -> None:
        params = self._trainable_parameters()
        if not self._whole.same_parameters(params):
            held = len(self._history) or self._stored is not None
            self._build(params)  # may fail, leaving everything as it was: warn after it
            if held:
                warnings.warn(
                    "AndersonAcceleration: the set of trainable parameters changed; "
                    "the AA history and moving average are reset",
                    stacklevel=3,
                )

    def _free_buffer(self, *in_use: torch.Tensor | None) -> torch.Tensor:
        for buffer in self._pool:
            for used in in_use:
                if buffer is used:
                    break
            else:
                return buffer
        # Beyond pool_size(): a checkpoint resumed with a longer warmup accelerates on
        # steps that store nothing. Grow once.
        self._pool.append(torch.zeros_like(self._pool[0]))
        return self._pool[-1]

    # -- one step ----------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """One base step plus, on schedule, storage, acceleration and averaging.

        ``closure`` only computes the loss (no backward; it is called under
        ``torch.no_grad()``) and is used by the safeguard. Returns the closure's loss at
        the point kept when the safeguard ran, otherwise ``None``. A closure that returns
        no scalar loss, or runs backward, fails with a message saying so (aadl.closure).
        If it fails at the AA point, the step is completed as for a rejected candidate
        (parameters at w_k + r_k, moving average updated) before the error is raised.
        """
        s = self.settings
        self._sync_parameters()
        self._closure_error = None  # one left by a step that failed otherwise is stale
        k = self.stats.steps + 1
        store = k > s.warmup and k % s.store_every == 0
        accelerate = k % s.frequency == 0 and (
            len(self._history) > 0 or (store and self._stored is not None)
        )
        needs_residual = store or accelerate or self._average is not None
        stored_u, stored_r = self._stored if self._stored is not None else (None, None)

        # 1. w_k, then 2. the base step and r_k = w_after - w_k.
        if needs_residual:
            w_before = self._gather(self._free_buffer(stored_u, stored_r))
        self.optimizer.step()
        self.stats.steps = k
        if not needs_residual:
            return None
        w_after = self._gather(self._free_buffer(stored_u, stored_r, w_before))
        if store and self._fused_passes():  # 2. and 3. in one pass over n
            residual, rhs = self._store_fused(w_after, w_before)
        else:
            residual = self._subtract(w_after, w_before, out=w_before)
            rhs = self._store(w_after, residual) if store else None  # 3.
        loss = self._accelerate(closure, w_after, residual, rhs) if accelerate else None  # 4.
        try:
            if self._average is not None:  # 5.
                self._update_average(residual)
        finally:
            error, self._closure_error = self._closure_error, None
        if error is not None:  # the closure failed at the AA point; the step is complete
            raise error
        return loss

    def _store(self, w_after: torch.Tensor, residual: torch.Tensor) -> torch.Tensor | None:
        """Append (dW, dR) from the stored pair, then store (w_k, r_k) as u = w + c r.

        Returns dR^T r_k when a column was appended (the Gram update computes it anyway)."""
        history, c = self._history, self._dr_weight
        previous = self._stored
        if previous is not None:
            stored_u, stored_r = previous
            slot = history.open_slot()
            self._subtract(residual, stored_r, out=history.dR[slot])  # dR = r_k - r_s
        # u_k = w_k + c r_k = w_after - (1 - c) r_k; with c = 1 that is w_after itself.
        if c == 1.0:
            u = w_after
        else:
            in_use = (previous[0],) if previous is not None else ()
            u = torch.add(w_after, residual, alpha=c - 1.0, out=self._free_buffer(*in_use, w_after, residual))
        self._stored = (u, residual)
        if previous is None:
            return None  # the first pair: nothing to difference yet (the history is empty)
        self._subtract(u, stored_u, out=history.X[slot])  # X = dW + c dR = u_k - u_s
        return history.append(slot, residual)

    def _store_fused(self, w_after: torch.Tensor, w_before: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``r_k = w_after - w_before`` (over ``w_before``) and ``_store`` in one compiled
        pass (aadl.cpu_kernels.block_store); returns (r_k, what ``_store`` returns)."""
        history, c = self._history, self._dr_weight
        previous = self._stored
        in_use = (previous[0],) if previous is not None else ()
        # u_k may take r_s's buffer: the loop reads r_s before it writes u_k.
        u = w_after if c == 1.0 else self._free_buffer(*in_use, w_after, w_before)
        X, dR = history.arrays
        if previous is None:
            slot, held, stored = -1, 0, (None, None)
        else:
            slot, held = history.open_slot(), history.held_after_append()
            stored = (previous[1].numpy(), previous[0].numpy())
        total = kernels.compiled_store_arrays(
            w_after.numpy(), w_before.numpy(), *stored, u.numpy(), c, dR, X, slot, held
        )
        self._stored = (u, w_before)
        if previous is None:
            return w_before, None
        return w_before, history.append_dots(slot, total)

    def _accelerate(
        self,
        closure: Callable[[], Any] | None,
        w_after: torch.Tensor,
        residual: torch.Tensor,
        rhs: torch.Tensor | None,
    ):
        s, history, stats = self.settings, self._history, self.stats
        stats.aa_attempts += 1
        if rhs is None:
            rhs = history.dots(residual)
        solution = self._solve(rhs, residual)
        g = solution.coefficients
        stats.last_g_norm = float(torch.linalg.vector_norm(g))
        stats.last_condition = solution.condition
        if not math.isfinite(stats.last_g_norm):
            return None  # rejected: parameters stay at w_k + r_k

        # w_AA = w_k + beta r_k - (dW + beta dR) g = w_after - (1 - beta) r_k - X g'
        # with g' = g (Walker-Ni, X = dW + beta dR) or beta g (Eq. 6, X = dW + dR).
        beta = s.relaxation
        coefficients = g if s.mixing == "walker_ni" else beta * g
        in_use = (*(self._stored or ()), w_after, residual)
        candidate = self._free_buffer(*in_use)
        if self._compiled_lean():  # the same loop as kernels.mix, called directly
            rows = history.arrays[0][: len(history)]
            total = kernels.compiled_mix_arrays(
                candidate.numpy(), w_after.numpy(), rows, coefficients.to(w_after.dtype).numpy(),
                residual.numpy(), beta - 1.0,
            )
        else:
            total = kernels.mix(
                candidate, w_after, history.X[history.active()], coefficients, residual, beta - 1.0
            )
        if not self._layout.sharded:
            if not math.isfinite(float(total)):
                return None
        else:
            # Shards agree on the number of shards holding a non-finite entry; summing the
            # shards' totals instead could overflow where every entry is finite.
            nonfinite_shards = (~torch.isfinite(total)).to(torch.float64).reshape(1)
            if float(self._layout.sum_over_shards(nonfinite_shards)) > 0:
                return None

        if s.safeguard == "loss" and closure is None and not self._warned_no_closure:
            warnings.warn(
                "AndersonAcceleration: safeguard='loss' needs a closure that returns the loss; "
                "without one every finite AA step is kept unchecked",
                stacklevel=3,
            )
            self._warned_no_closure = True
        if s.safeguard != "loss" or closure is None:
            self._write_parameters(candidate)
            stats.aa_accepted += 1
            return None

        plain_loss = evaluate_loss(closure)  # the parameters are at w_after = w_k + r_k
        self._write_parameters(candidate)
        try:
            aa_loss = evaluate_loss(closure)
        except BaseException as error:
            # Never leave the unchecked candidate in place: finish the step as for a
            # non-finite loss there (the other ranks' path, collectives included), and
            # let step() raise the error at its end.
            self._closure_error = error
            aa_loss = math.nan
        plain, accelerated = self._mean_over_ranks(plain_loss, aa_loss)
        if math.isfinite(accelerated) and accelerated < plain:
            stats.aa_accepted += 1
            return aa_loss
        self._write_parameters(w_after)
        return plain_loss

    def _solve(self, rhs: torch.Tensor, residual: torch.Tensor) -> LeastSquaresSolution:
        s, history, layout = self.settings, self._history, self._layout
        h = len(history)
        if s.solver == "gram":
            gram = history.gram[:h, :h]
            if layout.sharded:  # one all-reduce of h^2 + h numbers
                packed = layout.sum_over_shards(torch.cat([gram.reshape(-1), rhs]))
                gram, rhs = packed[: h * h].view(h, h), packed[h * h :]
            solution = solve_normal_equations(gram, rhs, s.regularization)
            if solution is not None:
                return solution
            self.stats.qr_fallbacks += 1
        r_factor = kernels.streaming_r_factor(history.dR[:h], residual)
        if layout.sharded:
            r_factor = kernels.combine_r_factors(list(layout.gather_small(r_factor)), h + 1)
        return solve_r_factor(r_factor, s.regularization)

    def _update_average(self, residual: torch.Tensor) -> None:
        average, layout = self._average, self._layout
        self._rows.gather(average.push_slot())  # the parameters as they now stand
        if not average.full:
            return
        spread, reference = average.statistics()
        residual_max = float(torch.linalg.vector_norm(residual, ord=math.inf))
        reduced = layout.max_over_shards(
            torch.tensor([spread, reference, residual_max], dtype=torch.float64, device=residual.device)
        )
        spread, reference, residual_max = (float(v) for v in reduced)
        if average.decide(spread, reference, residual_max):
            mean = average.mean_into(self._free_buffer(*(self._stored or ())))
            self._write_parameters(mean)
            self.stats.averages_applied += 1

    def _write_parameters(self, local: torch.Tensor) -> None:
        """Set the parameters from this rank's rows of w (all-gathered when sharded)."""
        if self._layout.sharded:
            local = self._layout.gather_shards(local, self._full)
        if self._numpy_copies and self._whole.scatter_array(local.numpy()):
            return
        self._whole.scatter(local)

    def _fused_passes(self) -> bool:
        """Whether the compiled loops are called directly on numpy views of the history and
        the pool (CPU float32/float64 buffers, numba enabled)."""
        return self._history.arrays is not None and kernels.compiled_loops_enabled()

    def _compiled_lean(self) -> bool:
        """Whether the lean path calls the compiled mixing directly."""
        return self._lean and self._fused_passes()

    def _gather(self, out: torch.Tensor) -> torch.Tensor:
        """This rank's rows of w, copied into ``out``."""
        if self._numpy_copies and self._rows.gather_array(out.numpy()):
            return out
        return self._rows.gather(out)

    def _subtract(self, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out = a - b`` (exactly rounded either way, so both dispatches agree bitwise)."""
        if self._lean:
            np.subtract(a.numpy(), b.numpy(), out=out.numpy())
            return out
        return torch.sub(a, b, out=out)

    # -- checkpointing -----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state and all of the wrapper's: history, Gram matrix,
        stored pair, moving-average buffer and counters. Tensors are references, as in
        ``torch.optim``; under ``sharded`` each rank saves its own rows."""
        stored = None if self._stored is None else {"u": self._stored[0], "r": self._stored[1]}
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
                "history": self._history.state_dict(),
                "stored": stored,
                "average": None if self._average is None else self._average.state_dict(),
                "warned_no_closure": self._warned_no_closure,
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state saved by :meth:`state_dict`. Everything is checked before
        anything is changed, so a bad checkpoint leaves this optimizer as it was: its
        format, every key (``aadl.checkpoint``), the settings whose state cannot be carried
        over (history, averaging and its window, the base optimizer's class, the dtype),
        the row layout, every parameter's shape and the sizes."""
        saved = self._saved_part(state_dict)
        stats_fields = STATS_FIELDS
        missing = missing_keys(state_dict, stats_fields)
        if missing:
            raise ValueError(
                "AndersonAcceleration.load_state_dict: the checkpoint is incomplete, missing "
                + ", ".join(missing)
            )
        self._sync_parameters()
        current = {
            "settings": self.settings.as_dict(),
            "dtype": str(self._whole.dtype),
            "base_optimizer": base_optimizer_name(self.optimizer),
        }
        differing = incompatible_settings(saved, current)
        if differing:
            raise ValueError(
                "AndersonAcceleration.load_state_dict: the checkpoint's state cannot be carried "
                "over to these settings: " + "; ".join(differing)
            )
        layout_error = layout_mismatch(self._layout.describe(), saved["layout"])
        if layout_error:
            raise ValueError(layout_error)
        self._check_shapes(saved)
        length = self._pool[0].numel()
        stored = saved["stored"]
        if stored is not None and any(tuple(stored[key].shape) != (length,) for key in ("u", "r")):
            raise ValueError(
                "AndersonAcceleration.load_state_dict: the stored pair does not match this "
                f"model's {length} rows"
            )
        # Build the new state on the side; commit only once every part has loaded.
        history = AndersonHistory(self.settings.history, length, self._whole.dtype, self._pool[0].device)
        history.load_state_dict(saved["history"])
        average = None
        if self._average is not None:
            average = IterateAverage(
                self._average.window, length, self._average.valid_length,
                self._average.threshold, self._average.criterion,
                self._whole.dtype, self._pool[0].device,
            )
            if saved["average"] is not None:
                average.load_state_dict(saved["average"])
        self.optimizer.load_state_dict(state_dict["base"])

        self._history, self._average = history, average
        self._stored = None
        if stored is not None:
            u, r = self._pool[0], self._pool[1]
            u.copy_(stored["u"])
            r.copy_(stored["r"])
            self._stored = (u, r)
        old = saved["settings"]
        old_weight = old["relaxation"] if old["mixing"] == "walker_ni" else 1.0
        if old_weight != self._dr_weight:  # X and u carry c; re-express them for this beta
            history.reweight_mixing(old_weight, self._dr_weight)
            if self._stored is not None:
                self._stored[0].add_(self._stored[1], alpha=self._dr_weight - old_weight)
        self.stats = AccelerationStats(**{name: saved["stats"][name] for name in stats_fields})
        self._warned_no_closure = bool(saved.get("warned_no_closure", False))
