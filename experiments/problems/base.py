"""The interface every problem implements (see docs/architecture.md).

A problem is one module plus one config file. It owns data, model, loss and evaluation for
one seed; the training loop (experiments/training.py) owns optimisation, schedules, logging
and results.
"""

from __future__ import annotations

import abc
import itertools
from pathlib import Path
from typing import Any, ClassVar, Iterable

import torch

#: "epoch": the budget is ``train.epochs`` and one unit is a shuffled pass over the training
#: set; "iteration": the budget is ``train.iterations`` and one unit is exactly one batch.
BUDGET_UNITS = ("epoch", "iteration")


class Problem(abc.ABC):
    name: ClassVar[str]  # experiment name, e.g. "graduate_admissions"
    budget_unit: ClassVar[str]  # one of BUDGET_UNITS
    Config: ClassVar[type]  # dataclass for this problem's ``problem.*`` config section
    datasets: ClassVar[tuple[Any, ...]] = ()  # experiments.problems.tabular.TabularDataset files it reads
    # Whether the loss goes through the model's forward, so that DistributedDataParallel can
    # average the gradients (experiments/parallel.py); otherwise one all-reduce does.
    ddp: ClassVar[bool] = True

    @classmethod
    def input_identity(cls, cfg: Any, data_root: Path) -> dict[str, str]:
        """Checksums of the input data, by identity key (``data.<name>.sha256``): part of
        the run's identity, so runs on other data never pass for runs on this data. Raises
        DatasetError where a file is missing or wrong, before any run directory exists."""
        return {}

    def __init__(self, cfg: Any, *, data_root: Path, seed: int, device: torch.device):
        self.cfg = cfg
        self.data_root = Path(data_root)
        self.seed = seed
        self.device = device

    @abc.abstractmethod
    def build_model(self) -> torch.nn.Module:
        """A freshly initialised model on ``self.device`` (the caller seeds torch first)."""

    @abc.abstractmethod
    def batches(self, unit: int) -> Iterable[Any]:
        """Batches of budget unit number ``unit`` (the training loop calls 1, 2, ..., budget):
        a shuffled pass over the training set for "epoch", exactly one batch for "iteration"."""

    @abc.abstractmethod
    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        """Scalar training loss; must also work under torch.no_grad() (safeguard closure)."""

    @abc.abstractmethod
    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Validation metrics; always contains "val_loss"."""

    def batches_from(self, unit: int, skip: int) -> Iterable[Any]:
        """The batches of ``unit`` after the first ``skip`` (a run resumed inside a unit,
        with the data state of the unit's start restored). The default draws and drops the
        skipped ones; a problem whose batches are costly to draw (images) skips by index."""
        return itertools.islice(self.batches(unit), skip, None)

    def local_batch(self, batch: Any, rank: int, world_size: int) -> Any:
        """This rank's part of a global batch: rank's chunk of every tensor along dim 0 (a
        tensor, or a tuple or list of them). Equal chunks make the mean of the ranks' mean
        losses the global batch's mean loss; otherwise the ranks weigh equally."""
        if isinstance(batch, torch.Tensor):
            return torch.tensor_split(batch, world_size)[rank]
        if isinstance(batch, (tuple, list)):
            return type(batch)(self.local_batch(part, rank, world_size) for part in batch)
        raise TypeError(f"{type(self).__name__}.local_batch: cannot split a {type(batch).__name__}; override local_batch")

    def state_dict(self) -> dict[str, Any]:
        """The data-order state that ``batches`` advances (e.g. a shuffling generator), for
        checkpoints; tensors and plain values only. Stateless problems keep the default."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def notes(self) -> list[str]:
        """Lines written to the run's log and metadata (e.g. the ReLU caveat)."""
        return []
