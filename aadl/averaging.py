"""Moving average of the last t iterates with the paper's adaptive criterion (Eqs. 15-16).

The buffer holds post-step parameters (never averaged ones), as a ring of t rows.
"""

from __future__ import annotations

import torch

from .kernels import max_entry_spread, row_mean


class IterateAverage:
    def __init__(
        self,
        window: int,
        length: int,
        valid_length: int,
        threshold: float,
        criterion: str,
        dtype: torch.dtype,
        device: torch.device,
    ):
        self.window = window
        self.threshold = threshold
        self.criterion = criterion
        self.valid_length = valid_length  # rows this rank owns; the rest is padding
        self.buffer = torch.zeros(window, length, dtype=dtype, device=device)
        self.count = 0
        self.next_slot = 0

    @property
    def full(self) -> bool:
        return self.count == self.window

    def push_slot(self) -> torch.Tensor:
        """The row to write the current iterate into; it counts as pushed."""
        row = self.buffer[self.next_slot]
        self.next_slot = (self.next_slot + 1) % self.window
        self.count = min(self.count + 1, self.window)
        return row

    def statistics(self) -> tuple[float, float]:
        """Local (spread, reference) of the criterion, to be max-reduced over shards.

        ``residual`` (paper, Eq. 16): (max_j population std_j, max_j |r_k|_j is supplied
        by the caller), so this returns (max std, 0). ``reference_code`` (the authors'
        code): (max_j std_j with Bessel's correction, max_j mean_j).
        """
        rows = self.buffer[:, : self.valid_length]
        if self.criterion == "residual":
            spread, _ = max_entry_spread(rows, correction=0)
            return spread, 0.0
        return max_entry_spread(rows, correction=1)

    def decide(self, spread: float, reference: float, residual_max: float) -> bool:
        """Whether to average, from the globally reduced statistics."""
        if self.criterion == "residual":
            return spread > self.threshold * residual_max
        return reference != 0 and spread / reference > self.threshold

    def mean_into(self, out: torch.Tensor) -> torch.Tensor:
        return row_mean(self.buffer, out)

    def state_dict(self) -> dict:
        return {"count": self.count, "next_slot": self.next_slot, "buffer": self.buffer[: self.count]}

    def load_state_dict(self, state: dict) -> None:
        count = int(state["count"])
        saved = state["buffer"]
        if count > self.window or tuple(saved.shape) != (count, self.buffer.shape[1]):
            raise ValueError(
                "AndersonAcceleration.load_state_dict: the moving-average buffer has shape "
                f"{tuple(saved.shape)}, expected at most ({self.window}, {self.buffer.shape[1]})"
            )
        self.buffer.zero_()
        self.buffer[:count].copy_(saved)
        self.count = count
        self.next_slot = count % self.window if count < self.window else int(state["next_slot"]) % self.window
