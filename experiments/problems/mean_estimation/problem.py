"""Mean estimation: minimise E[(w - x)^2 / 2] over w from samples x ~ N(mean, std^2 I).

The training loss of a batch is ``mean over its samples of ||w - x_i||^2 / 2`` (the model's
one parameter ``w``, a vector of ``problem.dims`` entries), so its gradient is ``w - mean of
the batch`` and every SGD-like method has iterates in closed form: with constant learning
rate h and one sample per iteration, forward SGD gives

    w_n = (1 - h)^n w_0 + h sum_k (1 - h)^(n - k) x_k,

which keeps fluctuating around the mean (variance h std^2 / (2 - h) per coordinate).

API, kept small because tests of several methods use it:

- ``budget_unit = "iteration"``; ``batches(u)`` is one batch, a ``(batch_size, dims)``
  tensor, drawn from a numpy PCG64 generator seeded by the run seed. Its ``state_dict()``
  (plain ints, about 100 bytes) is what ``batches`` advances, so a batch is drawn again
  bit-identically from the state before it (``StepContext.replay``).
- ``samples(n)``: the first ``n`` training samples of this seed as a float64 ``(n, dims)``
  tensor (batch_size = 1: sample k is iteration k's batch), without touching the live state.
- ``evaluate``: ``val_loss`` = mean of ``||w - x||^2 / 2`` over a fixed validation sample
  (the same for every seed), and ``distance_to_mean`` = ``||w - mean||``.
- The model (:class:`MeanModel`) starts at ``problem.initial`` in every coordinate, not at
  random, so w_0 is known to the formulas.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from experiments.errors import require
from experiments.ranges import check_reals
from experiments.problems.base import Problem

#: ``problem.dtype`` -> the parameter and sample dtype (float64: formulas hold to ~1e-15).
DTYPES = {"float64": torch.float64, "float32": torch.float32}

#: The validation sample's seed stream: the same points for every run seed.
_VALIDATION_STREAM = 1


@dataclass
class MeanEstimationConfig:
    dims: int = 1  # entries of w
    mean: float = 1.0  # every coordinate of the distribution's mean
    std: float = 1.0  # per-coordinate standard deviation of a sample
    initial: float = 0.0  # every coordinate of w_0
    batch_size: int = 1  # samples per iteration
    n_validation: int = 1000  # size of the fixed validation sample
    dtype: str = "float64"

    def __post_init__(self) -> None:
        require(self.dims >= 1, "problem.dims", "must be an integer >= 1", self.dims)
        check_reals(self, "problem.")  # mean, std, initial: experiments.ranges
        require(self.batch_size >= 1, "problem.batch_size", "must be an integer >= 1", self.batch_size)
        require(self.n_validation >= 1, "problem.n_validation", "must be an integer >= 1", self.n_validation)
        require(self.dtype in DTYPES, "problem.dtype", f"must be one of {sorted(DTYPES)}", self.dtype)


class MeanModel(torch.nn.Module):
    """One parameter ``w``; ``forward(x)`` is the residual ``w - x`` (through forward, so
    DistributedDataParallel averages the gradient)."""

    def __init__(self, dims: int, initial: float, dtype: torch.dtype):
        super().__init__()
        self.w = torch.nn.Parameter(torch.full((dims,), float(initial), dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w - x


def _generator(seed: int, stream: int = 0) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, stream])))


class MeanEstimation(Problem):
    name = "mean_estimation"
    budget_unit = "iteration"
    Config = MeanEstimationConfig

    def __init__(self, cfg: MeanEstimationConfig, *, data_root: Path, seed: int, device: torch.device):
        super().__init__(cfg, data_root=data_root, seed=seed, device=torch.device(device))
        self.dtype = DTYPES[cfg.dtype]
        self._training = _generator(seed)
        self.x_val = self._draw(_generator(0, _VALIDATION_STREAM), cfg.n_validation)
        self.true_mean = torch.full((cfg.dims,), cfg.mean, dtype=self.dtype, device=self.device)

    def _draw(self, generator: np.random.Generator, n: int) -> torch.Tensor:
        cfg = self.cfg
        x = cfg.mean + cfg.std * generator.standard_normal((n, cfg.dims))
        return torch.as_tensor(x, dtype=self.dtype, device=self.device)

    def samples(self, n: int) -> torch.Tensor:
        """The first ``n`` training samples of this seed, float64 on the CPU (one per
        iteration when batch_size is 1); the live generator is left as it is."""
        cfg = self.cfg
        return torch.as_tensor(cfg.mean + cfg.std * _generator(self.seed).standard_normal((n, cfg.dims)))

    def build_model(self) -> MeanModel:
        return MeanModel(self.cfg.dims, self.cfg.initial, self.dtype).to(self.device)

    def batches(self, unit: int) -> list[torch.Tensor]:
        return [self._draw(self._training, self.cfg.batch_size)]

    def loss(self, model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return 0.5 * model(batch).square().sum(dim=-1).mean()

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        w = model.w
        return {
            "val_loss": float(0.5 * (w - self.x_val).square().sum(dim=-1).mean()),
            "distance_to_mean": float(torch.linalg.vector_norm(w - self.true_mean)),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"training": self._training.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._training.bit_generator.state = state["training"]

    def notes(self) -> list[str]:
        cfg = self.cfg
        return [
            f"mean estimation: loss ||w - x||^2 / 2, x ~ N({cfg.mean:g}, {cfg.std:g}^2 I) in {cfg.dims} "
            f"dimension(s), {cfg.batch_size} sample(s) per iteration, w_0 = {cfg.initial:g}, "
            f"validation on {cfg.n_validation} fixed samples ({cfg.dtype})"
        ]
