"""Graduate admissions regression (the paper's Fig. 1): an MLP predicting the chance of
admission from 7 features, trained with MSE.

Data: ``<data root>/graduate_admissions/Admission_Predict_Ver1.1.csv`` (500 rows). A fixed
80/20 split (``problem.split_seed``, the same for every run seed) and features standardised
with the training split's mean and standard deviation; the target is left in its units, so
the validation MSE is comparable with the paper's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from experiments.problems.tabular import load_table
from experiments.errors import require
from experiments.ranges import check_reals
from experiments.problems.graduate_admissions.data import GRADUATE_ADMISSIONS
from experiments.problems.base import Problem

ACTIVATIONS = {"relu": torch.nn.ReLU, "tanh": torch.nn.Tanh}


@dataclass
class GraduateAdmissionsConfig:
    batch_size: int = 40
    validation_fraction: float = 0.2
    split_seed: int = 0  # fixes the train/validation split for every run seed
    hidden_layers: int = 3
    width: int = 64
    activation: str = "relu"

    def __post_init__(self) -> None:
        require(self.batch_size >= 1, "problem.batch_size", "must be an integer >= 1", self.batch_size)
        check_reals(self, "problem.")  # validation_fraction: experiments.ranges
        require(self.split_seed >= 0, "problem.split_seed", "must be an integer >= 0", self.split_seed)
        require(self.hidden_layers >= 1, "problem.hidden_layers", "must be an integer >= 1", self.hidden_layers)
        require(self.width >= 1, "problem.width", "must be an integer >= 1", self.width)
        require(
            self.activation in ACTIVATIONS,
            "problem.activation",
            f"must be one of {sorted(ACTIVATIONS)}",
            self.activation,
        )


class GraduateAdmissions(Problem):
    name = "graduate_admissions"
    budget_unit = "epoch"
    Config = GraduateAdmissionsConfig
    datasets = (GRADUATE_ADMISSIONS,)

    @classmethod
    def input_identity(cls, cfg: GraduateAdmissionsConfig, data_root: Path) -> dict[str, str]:
        # The checksum of the parsed values: line endings or header spacing cannot change
        # the results, any edited value can.
        return {f"data.{GRADUATE_ADMISSIONS.name}.sha256": load_table(data_root, GRADUATE_ADMISSIONS).checksum}

    def __init__(self, cfg: GraduateAdmissionsConfig, *, data_root: Path, seed: int, device: torch.device):
        super().__init__(cfg, data_root=data_root, seed=seed, device=device)
        table = load_table(data_root, GRADUATE_ADMISSIONS)
        self._table = table
        order = np.random.default_rng(cfg.split_seed).permutation(len(table.target))
        n_validation = int(round(cfg.validation_fraction * len(order)))
        train_rows, validation_rows = order[n_validation:], order[:n_validation]
        mean = table.features[train_rows].mean(axis=0)
        std = table.features[train_rows].std(axis=0)
        standardised = (table.features - mean) / std

        def as_tensor(array: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(array, dtype=torch.float32, device=device)

        self.x_train, self.y_train = as_tensor(standardised[train_rows]), as_tensor(table.target[train_rows])
        self.x_val, self.y_val = as_tensor(standardised[validation_rows]), as_tensor(table.target[validation_rows])
        # Shuffling has its own generator so that it depends on the run seed only.
        self._shuffle = torch.Generator(device="cpu").manual_seed(seed)

    def build_model(self) -> torch.nn.Module:
        layers: list[torch.nn.Module] = []
        width_in = self.x_train.shape[1]
        for _ in range(self.cfg.hidden_layers):
            layers += [torch.nn.Linear(width_in, self.cfg.width), ACTIVATIONS[self.cfg.activation]()]
            width_in = self.cfg.width
        layers.append(torch.nn.Linear(width_in, 1))
        return torch.nn.Sequential(*layers).to(self.device)

    def batches(self, unit: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(self.y_train), generator=self._shuffle).to(self.device)
        for start in range(0, len(order), self.cfg.batch_size):
            rows = order[start : start + self.cfg.batch_size]
            yield self.x_train[rows], self.y_train[rows]

    def state_dict(self) -> dict:
        return {"shuffle": self._shuffle.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self._shuffle.set_state(state["shuffle"])

    def loss(self, model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        features, target = batch
        return torch.nn.functional.mse_loss(model(features).squeeze(-1), target)

    def batched_loss(
        self, model: torch.nn.Module, tensors: dict[str, torch.Tensor], batch: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        """The (S,) losses of S stacked copies of the MLP (experiments/batching.py): every
        layer one batched product over the seeds, each seed's values exactly its single run's."""
        features, target = batch  # (S, B, features), (S, B)
        prediction = self._batched_forward(model, tensors, features)
        return torch.nn.functional.mse_loss(prediction, target, reduction="none").mean(dim=1)

    @torch.no_grad()
    def batched_evaluate(self, model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> list[dict[str, float]]:
        """:meth:`evaluate` of S stacked copies in one batched pass (the validation split is
        the same for every seed): one evaluation per epoch would otherwise cost a pass per seed."""
        lanes = next(iter(tensors.values())).shape[0]
        prediction = self._batched_forward(model, tensors, self.x_val.expand(lanes, *self.x_val.shape))
        target = self.y_val.expand(lanes, *self.y_val.shape)
        mse = torch.nn.functional.mse_loss(prediction, target, reduction="none").mean(dim=1).tolist()
        variance = torch.var(self.y_val, unbiased=False).item()
        return [{"val_loss": value, "val_r2": 1.0 - value / variance} for value in mse]

    @staticmethod
    def _batched_forward(model: torch.nn.Module, tensors: dict[str, torch.Tensor], features: torch.Tensor) -> torch.Tensor:
        from experiments.batching import stacked_linear

        hidden = features
        for name, layer in model.named_children():
            if isinstance(layer, torch.nn.Linear):
                hidden = stacked_linear(hidden, tensors[f"{name}.weight"], tensors[f"{name}.bias"])
            else:
                hidden = layer(hidden)  # the activations act elementwise
        return hidden.squeeze(-1)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        # The whole validation split in one batch: the MSE is over all of it, not a mean of
        # per-batch means.
        prediction = model(self.x_val).squeeze(-1)
        mse = torch.nn.functional.mse_loss(prediction, self.y_val).item()
        variance = torch.var(self.y_val, unbiased=False).item()
        return {"val_loss": mse, "val_r2": 1.0 - mse / variance}

    def notes(self) -> list[str]:
        notes = [
            f"graduate admissions: {len(self.y_train)} training / {len(self.y_val)} validation rows "
            f"(split seed {self.cfg.split_seed}), features standardised on the training split",
            f"data: {self._table.path} (values checksum {self._table.checksum[:12]})",
        ]
        if not self._table.published:
            notes.append(
                "WARNING: the data's values differ from the published file; results are not "
                "comparable with the paper (python -m experiments.data verify graduate_admissions)"
            )
        return notes
