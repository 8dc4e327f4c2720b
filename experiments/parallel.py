"""Data parallelism for the training loop: one run trained by P processes.

Every rank holds the whole model and takes its own part of each global batch
(``Problem.local_batch``), so the global batch is the configured one; gradients are
averaged over ranks, by DistributedDataParallel where the problem's loss goes through the
model's forward (``Problem.ddp``), or by one all-reduce of the flattened gradients where it
does not (the PINNs differentiate the network inside its layers, which DDP cannot see).
Decisions the loop takes (stop on a signal, divergence) are agreed on by all ranks, so
they all stop at the same step. With one process every method here is a no-op.
"""

from __future__ import annotations

from typing import Any

import torch


class DataParallel:
    def __init__(self, world_size: int = 1, rank: int = 0):
        self.world_size, self.rank = world_size, rank

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def wrap(self, model: torch.nn.Module, problem: Any) -> torch.nn.Module:
        """The module the loss is computed with: DDP(model), or ``model`` itself."""
        if not self.active:
            return model
        import torch.distributed as dist

        for tensor in [*model.parameters(), *model.buffers()]:  # every rank starts from rank 0's
            dist.broadcast(tensor.data, src=0)
        if problem.ddp:
            device = next(model.parameters()).device
            return torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )
        return model

    def local_batch(self, batch: Any, problem: Any) -> Any:
        return problem.local_batch(batch, self.rank, self.world_size) if self.active else batch

    def after_backward(self, net: torch.nn.Module) -> None:
        """Average the gradients over ranks where DDP does not."""
        if not self.active or isinstance(net, torch.nn.parallel.DistributedDataParallel):
            return
        import torch.distributed as dist

        grads = [p.grad for p in net.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def mean_(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` averaged over ranks, in place."""
        if self.active:
            import torch.distributed as dist

            dist.all_reduce(tensor)
            tensor /= self.world_size
        return tensor

    def max_int(self, value: int, device: torch.device) -> int:
        if not self.active:
            return value
        import torch.distributed as dist

        packed = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(packed, op=dist.ReduceOp.MAX)
        return int(packed)

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (a picklable object)."""
        if not self.active:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (a picklable object), in rank order, on every rank."""
        if not self.active:
            return [value]
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered
