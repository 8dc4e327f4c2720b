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


class KeptForward:
    """The loss a safeguard evaluated last, with its graph, for the next step's backward.

    AADL's safeguard evaluates the loss at the plain point, then at the AA candidate; when the
    candidate is kept and the batch is unchanged, the next step's forward is that evaluation
    again. A problem whose loss is a pure function of the parameters and the batch (no random
    draws, no buffers changed; ``pure_loss = True``) gets its safeguard's later evaluations
    made with the graph kept, and the next backward on the same batch object uses it only if
    the parameters are what they were then, bit for bit, and no torch operation wrote them
    since (version counters: autograd refuses a graph whose saved tensors were written). The
    values are compared as well because AADL may write parameters through numpy, which no
    counter sees. The gradients are then those of a fresh forward bit for bit; only the
    forward's time is saved."""

    def __init__(self) -> None:
        self.loss: Optional[torch.Tensor] = None
        self.batch: Any = None
        self.parameters: list[tuple[torch.Tensor, int, torch.Tensor]] = []  # (p, version, value)

    def keep(self, loss: torch.Tensor, batch: Any, model: torch.nn.Module) -> None:
        self.loss, self.batch = loss, batch
        self.parameters = [(p, p._version, p.detach().clone()) for p in model.parameters()]

    def take(self, batch: Any, model: torch.nn.Module) -> Optional[torch.Tensor]:
        """The kept loss if it was evaluated on ``batch`` at the parameters as they are now;
        it is given out once (its graph is freed by the backward)."""
        loss, kept_batch, parameters = self.loss, self.batch, self.parameters
        self.loss, self.batch, self.parameters = None, None, []
        if loss is None or kept_batch is not batch:
            return None
        current = list(model.parameters())
        if len(current) != len(parameters) or any(
            p is not q or p._version != version or not torch.equal(p, value)
            for q, (p, version, value) in zip(current, parameters)
        ):
            return None
        return loss


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
        kept: Optional[KeptForward] = None,
    ):
        self.problem, self.net, self.model = problem, net, model
        self.optimizer, self.parallel, self.precision = optimizer, parallel, precision
        self.batch = batch
        self.unit, self.index = unit, index  # budget unit (from 1) and batch index in it
        self.unit_data_state = unit_data_state  # the problem's data state before this unit
        # The loop's KeptForward, where reusing a safeguard evaluation is exact: a pure loss,
        # one process, the model itself (no DDP), fp32.
        reusable = (
            problem.pure_loss and net is model and not parallel.active and precision.name == "fp32"
        )
        self.kept = kept if reusable else None

    def backward(self, batch: Any = None, *, sync: bool = True) -> torch.Tensor:
        """Zero the gradients, compute the loss on ``batch`` (default: this step's) and run
        backward; ``sync=False`` leaves each rank with its own local gradient (DDP's
        ``no_sync``, no all-reduce). Returns the unscaled loss."""
        batch = self.batch if batch is None else batch
        self.optimizer.zero_grad(set_to_none=True)
        kept = self.kept.take(batch, self.model) if self.kept is not None else None
        if kept is not None:
            kept.backward()
            return kept.detach()
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
        calls = 0

        def closure() -> torch.Tensor:
            nonlocal calls
            calls += 1
            # The first call is at the plain point, which a kept candidate leaves; later calls
            # keep their graph for the next step (KeptForward).
            if self.kept is not None and calls > 1:
                with torch.enable_grad():
                    loss = self.problem.loss(self.net, batch)
                self.kept.keep(loss, batch, self.model)
                return loss.detach()
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
