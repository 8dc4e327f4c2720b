"""The joint parameter vector w: copying parameters to and from flat buffers.

Anderson acceleration acts on one flat vector holding every parameter the base optimizer
updates. The parameters stay where the model keeps them (we never re-point ``p.data``, which
would break DDP buckets, ``torch.compile`` and FSDP); instead rows of w are copied between
the parameters and preallocated flat buffers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

_foreach_copy = getattr(torch, "_foreach_copy_", None)

# float16 is refused: its range (smallest normal 6e-5) underflows small gradients and
# steps, torch's Adam divides by zero on pure-float16 weights (its eps=1e-8 is 0 there),
# and a float32 history could repair neither. bfloat16 has float32's range.
# docs/library.md, "Parameter dtypes", has the reasons and the measurements.
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
FLOAT16_ADVICE = (
    "AndersonAcceleration: float16 parameters are not supported: float16's range (smallest "
    "normal 6e-5) underflows small gradients and steps, and torch's Adam, whose eps=1e-8 is 0 "
    "in float16, divides by zero on pure-float16 weights; keep float32 master weights and run the forward "
    "under torch.autocast(device_type, dtype=torch.float16) with torch.amp.GradScaler, or "
    "use bfloat16 parameters"
)


class ParameterVector:
    """Rows ``[start, stop)`` of the concatenation of ``params`` (flattened, in order)."""

    def __init__(self, params: Sequence[torch.Tensor], start: int = 0, stop: int | None = None):
        if not params:
            raise ValueError(
                "AndersonAcceleration: the base optimizer holds no parameter that requires grad"
            )
        dtypes = {p.dtype for p in params}
        devices = {p.device for p in params}
        if len(dtypes) > 1 or len(devices) > 1:
            raise ValueError(
                "AndersonAcceleration acts on one joint vector, so every parameter must share "
                f"one dtype and device; got dtypes {sorted(map(str, dtypes))} and devices "
                f"{sorted(map(str, devices))}"
            )
        if not params[0].is_floating_point():
            raise ValueError(f"AndersonAcceleration needs floating-point parameters, got {params[0].dtype}")
        if params[0].dtype == torch.float16:
            raise ValueError(FLOAT16_ADVICE)
        if params[0].dtype not in SUPPORTED_DTYPES:
            raise ValueError(
                f"AndersonAcceleration: {params[0].dtype} parameters are not supported; "
                "supported: float32, float64, bfloat16"
            )
        self.params = list(params)
        self.dtype = params[0].dtype
        self.device = params[0].device
        self.n = sum(p.numel() for p in params)
        self.start = start
        self.stop = self.n if stop is None else stop
        # (param, first row in the param, last row, first row in the local buffer)
        self._pieces = []
        offset = 0
        for p in self.params:
            lo, hi = max(offset, self.start), min(offset + p.numel(), self.stop)
            if lo < hi:
                self._pieces.append((p, lo - offset, hi - offset, lo - self.start))
            offset += p.numel()
        self._whole = self.start == 0 and self.stop == self.n
        self._all_contiguous = all(p.is_contiguous() for p in self.params)
        # Scatter sources are a few long-lived buffers: keep their per-parameter views.
        self._views_cache: dict[int, tuple[torch.Tensor, list[torch.Tensor]]] = {}
        # CPU float32/float64: numpy views of the parameters, made on first use (None:
        # not applicable). A numpy copy of a small tensor costs a fraction of a torch op's
        # dispatch, which is most of a gather at small n.
        self._arrays: list[np.ndarray] | None = None
        self._arrays_checked = False
        self._pointers: list[int] = []

    def __getstate__(self) -> dict:
        # A copy's numpy views must be of the copy's parameters: made again on first use.
        return {**self.__dict__, "_arrays": None, "_arrays_checked": False, "_pointers": []}

    def same_parameters(self, params: Sequence[torch.Tensor]) -> bool:
        return len(params) == len(self.params) and all(a is b for a, b in zip(params, self.params))

    def _parameter_arrays(self) -> list[np.ndarray] | None:
        """1-d numpy views of the parameters, or None where numpy cannot serve (not the
        whole vector, not contiguous CPU float32/float64, or a parameter's storage was
        re-pointed since: ``p.data = ...`` moves ``data_ptr``, and the views keep the old
        storage alive, so an equal pointer is the same memory)."""
        if not self._arrays_checked:
            self._arrays_checked = True
            if (
                self._whole
                and self._all_contiguous
                and self.device.type == "cpu"
                and self.dtype in (torch.float32, torch.float64)
                and all(p.dtype == self.dtype and p.device == self.device for p in self.params)
            ):
                self._arrays = [p.detach().numpy().reshape(-1) for p in self.params]
                self._pointers = [p.data_ptr() for p in self.params]
        arrays = self._arrays
        if arrays is None:
            return None
        for p, pointer in zip(self.params, self._pointers):
            if p.data_ptr() != pointer or not p.is_contiguous():
                self._all_contiguous = all(q.is_contiguous() for q in self.params)
                self._arrays, self._arrays_checked = None, False  # rebuilt for the new storage
                return self._parameter_arrays()
        return arrays

    def gather_array(self, out: np.ndarray) -> bool:
        """Copy w into the numpy array ``out`` (the numpy view of a CPU buffer); False,
        copying nothing, where the numpy views do not apply (then use ``gather``)."""
        arrays = self._parameter_arrays()
        if arrays is None:
            return False
        np.concatenate(arrays, out=out[: self.n])
        return True

    def scatter_array(self, full: np.ndarray) -> bool:
        """Set every parameter from ``full[:n]`` (numpy); False, setting nothing, where the
        numpy views do not apply (then use ``scatter``)."""
        arrays = self._parameter_arrays()
        if arrays is None:
            return False
        offset = 0
        for array in arrays:
            size = array.shape[0]
            array[:] = full[offset : offset + size]
            offset += size
        return True

    def gather(self, out: torch.Tensor) -> torch.Tensor:
        """Copy the owned rows of w into ``out[: stop - start]``."""
        length = self.stop - self.start
        if self._whole and self._all_contiguous and out.device == self.device:
            torch.cat([p.view(-1) for p in self.params], out=out[:length])
            return out
        for p, lo, hi, at in self._pieces:
            out[at : at + hi - lo].copy_(p.reshape(-1)[lo:hi] if p.is_contiguous() else p.flatten()[lo:hi])
        return out

    def scatter(self, full: torch.Tensor) -> None:
        """Set every parameter from ``full[:n]``, a flat vector of the whole of w."""
        views = self._views(full)
        if _foreach_copy is not None and full.device == self.device:
            _foreach_copy(self.params, views)
        else:
            for p, v in zip(self.params, views):
                p.copy_(v)

    def _views(self, full: torch.Tensor) -> list[torch.Tensor]:
        cached = self._views_cache.get(id(full))
        if cached is not None and cached[0] is full:
            return cached[1]
        views, offset = [], 0
        for p in self.params:
            views.append(full[offset : offset + p.numel()].view(p.shape))
            offset += p.numel()
        self._views_cache[id(full)] = (full, views)
        return views
