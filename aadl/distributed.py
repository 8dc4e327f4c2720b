"""Where this rank's rows of the joint parameter vector live, and the collectives AA needs.

Only ``torch.distributed`` collectives are used, so the same code runs on gloo (CPU) and
NCCL (GPU). Without an initialised process group everything degenerates to one rank and no
collective is issued.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def process_group_active() -> bool:
    return dist.is_available() and dist.is_initialized()


class RowLayout:
    """Rows ``[start, stop)`` of the n-vector owned by this rank.

    ``replicated``: every rank owns all rows. ``sharded``: rank i owns one contiguous shard
    of ``ceil(n / P)`` rows (the last one shorter). Local buffers are allocated with the
    padded shard length and kept zero in the padding, so that every blocked kernel can run
    over the whole local buffer and the all-gather sees equal sizes on every rank.
    """

    def __init__(self, n: int, mode: str, device: torch.device, group=None):
        self.n = n
        self.group = group
        self.device = device
        if process_group_active():
            self.world_size = dist.get_world_size(group)
            self.rank = dist.get_rank(group)
        else:
            self.world_size, self.rank = 1, 0
        self.sharded = mode == "sharded" and self.world_size > 1
        if self.sharded:
            self.shard_length = -(-n // self.world_size)
            self.start = min(n, self.rank * self.shard_length)
            self.stop = min(n, self.start + self.shard_length)
        else:
            self.shard_length, self.start, self.stop = n, 0, n

    @property
    def local_length(self) -> int:
        """Rows actually owned; the buffers may be longer (zero padding)."""
        return self.stop - self.start

    @property
    def padded_length(self) -> int:
        return self.shard_length * (self.world_size if self.sharded else 1)

    def describe(self) -> dict:
        return {
            "world_size": self.world_size,
            "rank": self.rank,
            "sharded": self.sharded,
            "start": self.start,
            "stop": self.stop,
            "n": self.n,
        }

    # -- collectives -----------------------------------------------------------------

    def sum_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        """In-place sum of ``values`` over all ranks (no-op on one rank)."""
        if self.world_size > 1:
            dist.all_reduce(values, op=dist.ReduceOp.SUM, group=self.group)
        return values

    def sum_over_shards(self, values: torch.Tensor) -> torch.Tensor:
        """Sum of partial results computed on row shards; replicated ranks already hold
        the full sum, so nothing is communicated for them."""
        if self.sharded:
            dist.all_reduce(values, op=dist.ReduceOp.SUM, group=self.group)
        return values

    def max_over_shards(self, values: torch.Tensor) -> torch.Tensor:
        if self.sharded:
            dist.all_reduce(values, op=dist.ReduceOp.MAX, group=self.group)
        return values

    def gather_shards(self, local: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
        """All-gather every rank's padded shard into ``full`` (length ``padded_length``)."""
        if not self.sharded:
            raise RuntimeError("gather_shards is only meaningful for the sharded layout")
        # No try/except fallback here: a collective that failed on one rank and is retried
        # in another form would pair with a different collective on the others.
        # all_gather_single replaces all_gather_into_tensor (deprecated in torch 2.14).
        flat_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        flat_all_gather(full, local, group=self.group)
        return full

    def gather_small(self, local: torch.Tensor) -> torch.Tensor:
        """Stack a small per-rank tensor from every rank (rank order) along a new dim 0."""
        if not self.sharded:
            return local.unsqueeze(0)
        out = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(out, local.contiguous(), group=self.group)
        return torch.stack(out)
