"""The interface every problem implements (see docs/architecture.md).

A problem is one module plus one config file. It owns data, model, loss and evaluation for
one seed; the training loop (experiments/training.py) owns optimisation, schedules, logging
and results.
"""

from __future__ import annotations

import abc
import itertools
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Optional

import torch

#: "epoch": the budget is ``train.epochs`` and one unit is a shuffled pass over the training
#: set; "iteration": the budget is ``train.iterations`` and one unit is exactly one batch.
BUDGET_UNITS = ("epoch", "iteration")


class Problem(abc.ABC):
    name: ClassVar[str]  # experiment name, e.g. "graduate_admissions"
    budget_unit: ClassVar[str]  # one of BUDGET_UNITS
    Config: ClassVar[type]  # dataclass for this problem's ``problem.*`` config section
    datasets: ClassVar[tuple[Any, ...]] = ()
    """The experiments.problems.tabular.TabularDataset files it reads, which
    ``python -m experiments.data`` downloads and verifies; () reads none."""

    ddp: ClassVar[bool] = True
    """Whether the loss goes through the model's forward, so that DistributedDataParallel can
    average the gradients (experiments/parallel.py); otherwise one all-reduce does."""

    # -- optional hooks: the harness reads each of these, and the defaults say "not used" ----

    threads: ClassVar[Optional[int]] = None
    """torch's intra-op threads for a single process where ``train.threads`` is unset
    (experiments.run.torch_threads); None leaves torch's default, one thread per core."""

    pure_loss: ClassVar[bool] = False
    """True where the loss is a function of the parameters and the batch alone (no random
    draws, no buffers changed), so that a safeguard's evaluation may serve as the next
    step's forward (experiments.step.KeptForward); False always recomputes it."""

    samples_per_step: Optional[int] = None
    """Samples one optimizer step takes over all ranks, for the ``samples_per_second``
    column of metrics.csv (experiments/training.py); None writes no such column."""

    step_context: ClassVar[Optional[type]] = None
    """The experiments.step.StepContext subclass the training loop hands to a method's
    step (a seed group's lanes use their own); None means StepContext itself."""

    batched_loss: ClassVar[Optional[Callable[..., torch.Tensor]]] = None
    """A method ``batched_loss(self, model, tensors, batch) -> Tensor``: the (S,) losses of
    S stacked copies of ``model`` whose parameters are ``tensors`` (name -> (S, ...)) on
    stacked batches, which lets seeds train batched (experiments/batching.py); None refuses
    ``train.batch_seeds`` and ``train.seed_group``."""

    batched_evaluate: ClassVar[Optional[Callable[..., list[dict[str, float]]]]] = None
    """A method ``batched_evaluate(self, model, tensors) -> list[dict]``: :meth:`evaluate`
    of S stacked copies in one pass, for a validation set every seed shares
    (experiments.batching.SeedGroupProblem.evaluate_lanes); None evaluates lane by lane."""

    @classmethod
    def input_identity(cls, cfg: Any, data_root: Path) -> dict[str, str]:
        """Checksums of the input data, by identity key (``data.<name>.sha256``): part of
        the run's identity, so runs on other data never pass for runs on this data. Raises
        DatasetError where a file is missing or wrong, before any run directory exists."""
        return {}

    @classmethod
    def batching_refused(cls, problem_config: Any) -> Optional[tuple[str, str]]:
        """``(key, why)`` where seeds cannot train batched with these ``problem.*`` settings,
        which experiments.batching.check_batchable raises as a ConfigError on ``key``; None
        (the default) refuses nothing."""
        return None

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
