"""The AA history: a preallocated ring buffer of m columns and its Gram matrix.

Column j holds, for one stored pair of consecutive stored iterates,

* ``dR_j = r_k - r_s``                      (difference of fixed-point residuals), and
* ``X_j  = dW_j + c dR_j``                  with ``dW_j = w_k - w_s``,

where ``c`` is the mixing's weight of ``dR`` (``beta`` for Walker-Ni mixing, 1 for the
paper's Eq. 6). Keeping ``dW + c dR`` instead of ``dW`` is exact algebra, not an
approximation: the mixing ``w_AA = w_k + beta r_k - (dW + beta dR) g`` then reads
``X`` once instead of ``dW`` and ``dR``, so one AA step reads the history once
(dR for the dot products, X for the mixing), the least a step can read.

Columns are filled in slot order 0, 1, ..., m-1 and then overwrite the oldest. The
least-squares problem does not depend on the order of its columns, so coefficients are
kept in slot order and never reshuffled.
"""

from __future__ import annotations

import torch

import numpy as np

from .kernels import row_dots, row_dots_and_square


class AndersonHistory:
    def __init__(self, capacity: int, length: int, dtype: torch.dtype, device: torch.device):
        self.capacity = capacity
        # Zero-initialised: sharded buffers rely on zero padding rows.
        self.X = torch.zeros(capacity, length, dtype=dtype, device=device)
        self.dR = torch.zeros(capacity, length, dtype=dtype, device=device)
        # dR^T dR over this rank's rows (the full product unless sharded), float64.
        self.gram = torch.zeros(capacity, capacity, dtype=torch.float64, device=device)
        # dR^T r_s, r_s the stored residual: lets the next append get its Gram column
        # from the same pass that computes dR^T r_k (see append).
        self.stored_dots = torch.zeros(capacity, dtype=torch.float64, device=device)
        self.count = 0  # columns held
        self.next_slot = 0  # slot the next column goes to
        # The m x m bookkeeping is a handful of tiny operations per append: on the CPU
        # they go through numpy views of the same memory (a torch call's dispatch costs
        # more than the arithmetic at this size).
        self._make_views()

    def _make_views(self) -> None:
        on_cpu = self.gram.device.type == "cpu"
        self._gram_array = self.gram.numpy() if on_cpu else None
        self._stored_dots_array = self.stored_dots.numpy() if on_cpu else None
        numpy_rows = on_cpu and self.dR.device.type == "cpu" and self.dR.dtype in (torch.float32, torch.float64)
        # (X, dR) as numpy views, for the lean path's direct calls of the compiled loops.
        self.arrays = (self.X.numpy(), self.dR.numpy()) if numpy_rows else None

    def __getstate__(self) -> dict:
        # A copy's numpy views must be of the copy's tensors, not copies of their own.
        return {k: v for k, v in self.__dict__.items() if k not in ("_gram_array", "_stored_dots_array", "arrays")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._make_views()

    def __len__(self) -> int:
        return self.count

    def open_slot(self) -> int:
        """The slot the next column is written to (the oldest once full)."""
        return self.next_slot

    def append(self, slot: int, residual: torch.Tensor) -> torch.Tensor:
        """Make the column just written at ``slot`` (``dR[slot] = r_k - r_s``) part of the
        history; ``residual`` is r_k, which becomes the stored residual. Returns
        ``dR^T r_k`` over the held columns (float64, slot order).

        One pass over dR gives ``b = dR^T r_k`` and the diagonal entry ``|dR_new|^2``. The
        rest of the new Gram column follows without a second pass:
        ``dR_j . dR_new = dR_j . r_k - dR_j . r_s = b_j - (dR^T r_s)_j``, the second term
        kept from the previous append. The dot products are exact-product
        float64 sums (aadl.kernels), so the subtraction loses nothing the float32 column
        still had.
        """
        self.count = min(self.count + 1, self.capacity)
        self.next_slot = (slot + 1) % self.capacity
        b, square = row_dots_and_square(self.dR[: self.count], residual, slot)
        if self._gram_array is None or b.device.type != "cpu":
            self._update_gram(slot, b, square, self.gram, self.stored_dots)
        else:
            self._update_gram(slot, b.numpy(), float(square), self._gram_array, self._stored_dots_array)
        return b

    def held_after_append(self) -> int:
        return min(self.count + 1, self.capacity)

    def append_dots(self, slot: int, total: np.ndarray) -> torch.Tensor:
        """``append`` given its one pass's result, float64 ``(dR[:held] . r_k,
        |dR[slot]|^2)`` over the columns held after it (computed by a fused pass,
        ``aadl.kernels.compiled_store_arrays``); CPU histories only."""
        self.count = self.held_after_append()
        self.next_slot = (slot + 1) % self.capacity
        b = total[:-1]
        self._update_gram(slot, b, float(total[-1]), self._gram_array, self._stored_dots_array)
        return torch.from_numpy(b)

    def _update_gram(self, slot: int, b, square, gram, stored_dots) -> None:
        """The new Gram column from b = dR^T r_k and |dR_new|^2 (see ``append``)."""
        held = self.count
        new_column = b - stored_dots[:held]
        new_column[slot] = square
        gram[slot, :held] = new_column
        gram[:held, slot] = new_column
        stored_dots[:held] = b

    def dots(self, vector: torch.Tensor) -> torch.Tensor:
        """``dR^T vector`` over the held columns (float64, slot order)."""
        return row_dots(self.dR[: self.count], [vector])[:, 0]

    def active(self) -> slice:
        return slice(0, self.count)

    def reweight_mixing(self, old_weight: float, new_weight: float) -> None:
        """Re-express X for a new dR weight (a checkpoint resumed with another beta)."""
        if old_weight != new_weight and self.count:
            self.X[: self.count].add_(self.dR[: self.count], alpha=new_weight - old_weight)

    # -- checkpointing --------------------------------------------------------------

    def state_dict(self) -> dict:
        h = self.count
        return {
            "count": h,
            "next_slot": self.next_slot,
            "X": self.X[:h],
            "dR": self.dR[:h],
            "gram": self.gram[:h, :h],
            "stored_dots": self.stored_dots[:h],
        }

    def load_state_dict(self, state: dict) -> None:
        h = int(state["count"])
        if h > self.capacity:
            raise ValueError(
                f"AndersonAcceleration.load_state_dict: the checkpoint holds {h} history columns "
                f"but history={self.capacity}; resume with history >= {h}"
            )
        for name in ("X", "dR"):
            saved = state[name]
            if tuple(saved.shape) != (h, self.X.shape[1]):
                raise ValueError(
                    f"AndersonAcceleration.load_state_dict: history '{name}' has shape "
                    f"{tuple(saved.shape)}, expected ({h}, {self.X.shape[1]}) for this model"
                )
        self.X.zero_()
        self.dR.zero_()
        self.gram.zero_()
        self.stored_dots.zero_()
        self.X[:h].copy_(state["X"])
        self.dR[:h].copy_(state["dR"])
        self.gram[:h, :h].copy_(state["gram"])
        self.stored_dots[:h].copy_(state["stored_dots"])
        self.count = h
        # Slots [0, h) are live; a history that is not full appends after them, whatever
        # capacity it was saved with.
        self.next_slot = h if h < self.capacity else int(state["next_slot"]) % self.capacity
