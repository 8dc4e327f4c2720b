"""What a method's ``step`` is given: the current batch and the operations on it.

The training loop draws a batch and hands a :class:`StepContext` to ``Method.step``; the
method decides how many gradients it takes, at which points and on which batches
(AADL: one gradient and a loss-only closure; EXTRAP-SGD: a local gradient without the
all-reduce, then an averaged one; backward SGD: earlier batches replayed). Everything that
touches ranks, mixed precision or BatchNorm buffers is done here, once, for every method.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from aadl.closure import frozen_buffers
from experiments.parallel import DataParallel
from experiments.problems.base import Problem

#: ``train.precision`` (experiments.schema.PRECISIONS) -> the autocast dtype (None: none).
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Precision:
    """Autocast and, for fp16, loss scaling (torch.amp.GradScaler), shared by every step."""

    name: str = "fp32"
    device_type: str = "cpu"
    scaler: Optional[torch.amp.GradScaler] = None

    @classmethod
    def build(cls, name: str, device: torch.device) -> "Precision":
        scaler = torch.amp.GradScaler(device.type) if name == "fp16" else None
        return cls(name, device.type, scaler)

    def autocast(self) -> contextlib.AbstractContextManager:
        dtype = AUTOCAST_DTYPES[self.name]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=dtype)


class StepContext:
    """One step's batch (this rank's part of it) and what a method may do with it."""

    def __init__(
        self,
        *,
        problem: Problem,
        net: torch.nn.Module,
        model: torch.nn.Module,
        optimizer: Any,
        parallel: DataParallel,
        batch: Any,
        unit: int,
        index: int,
        unit_data_state: Optional[dict[str, Any]],
        precision: Precision = Precision(),
    ):
        self.problem, self.net, self.model = problem, net, model
        self.optimizer, self.parallel, self.precision = optimizer, parallel, precision
        self.batch = batch
        self.unit, self.index = unit, index  # budget unit (from 1) and batch index in it
        self.unit_data_state = unit_data_state  # the problem's data state before this unit

    def backward(self, batch: Any = None, *, sync: bool = True) -> torch.Tensor:
        """Zero the gradients, compute the loss on ``batch`` (default: this step's) and run
        backward; ``sync=False`` leaves each rank with its own local gradient (DDP's
        ``no_sync``, no all-reduce). Returns the unscaled loss."""
        batch = self.batch if batch is None else batch
        self.optimizer.zero_grad(set_to_none=True)
        local_only = not sync and isinstance(self.net, torch.nn.parallel.DistributedDataParallel)
        with self.net.no_sync() if local_only else contextlib.nullcontext():
            with self.precision.autocast():
                loss = self.problem.loss(self.net, batch)
            scaler = self.precision.scaler
            (scaler.scale(loss) if scaler is not None else loss).backward()
        if sync:
            self.parallel.after_backward(self.net)
        return loss

    def loss_closure(self, batch: Any = None) -> Callable[[], torch.Tensor]:
        """A loss-only closure at the current parameters (AADL's safeguard), which leaves
        BatchNorm running statistics and other buffers as they were."""
        batch = self.batch if batch is None else batch

        def closure() -> torch.Tensor:
            with frozen_buffers(self.model), self.precision.autocast():
                return self.problem.loss(self.net, batch)

        return closure

    def optimizer_step(self, closure: Optional[Callable[[], torch.Tensor]] = None) -> None:
        """``optimizer.step`` through the loss scaler when there is one (a step whose
        gradients are not finite is skipped, and the scale lowered)."""
        args = () if closure is None else (closure,)
        scaler = self.precision.scaler
        if scaler is None:
            self.optimizer.step(*args)
        else:
            scaler.step(self.optimizer, *args)
            scaler.update()

    def replay(self, unit: int, index: int, unit_data_state: Optional[dict[str, Any]]) -> Any:
        """This rank's part of batch ``index`` of budget unit ``unit``, drawn again from the
        problem's data state before that unit: bit-identical to the batch the loop drew."""
        live = self.problem.state_dict()
        try:
            self.problem.load_state_dict(unit_data_state or {})
            for batch in self.problem.batches_from(unit, index):  # skips by index where it can
                return self.parallel.local_batch(batch, self.problem)
        finally:
            self.problem.load_state_dict(live)
        raise IndexError(f"unit {unit} has no batch {index}")
