"""Shared fixtures: the data root, Hydra composition, and synthetic run directories."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import os

import pytest

from experiments.compose import CONFIG_DIR  # noqa: F401  (tests import it from here)

REPO_ROOT = Path(__file__).resolve().parents[1]
# Tests never download: they read the data beside the checkout, in ../shared/data. Every
# config a test composes (and every process it starts) finds it there unless it says otherwise:
# a run's identity holds the checksum of its data, so validation reads the file.
SHARED_DATA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data"
os.environ.setdefault("AADL_DATA_ROOT", str(SHARED_DATA_ROOT))


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The shared data root; skips the test where ../shared/data is not beside the checkout."""
    from experiments.problems.graduate_admissions.data import GRADUATE_ADMISSIONS

    if not GRADUATE_ADMISSIONS.path(SHARED_DATA_ROOT).is_file():
        if os.environ.get("CI"):  # CI always has ../shared: a missing file there is a failure
            pytest.fail(f"missing {GRADUATE_ADMISSIONS.path(SHARED_DATA_ROOT)}")
        pytest.skip(f"needs {GRADUATE_ADMISSIONS.path(SHARED_DATA_ROOT)} (../shared/data beside the checkout)")
    return SHARED_DATA_ROOT


@pytest.fixture
def compose() -> Callable[..., object]:
    """``compose(*overrides)``: the config ``python -m experiments.run <overrides>`` would get."""
    from experiments.compose import compose as compose_config

    return compose_config


@pytest.fixture
def write_run() -> Callable[..., Path]:
    """``write_run(root, variant=..., seed=..., val_loss=[...])`` writes a run directory in
    the harness's format with the given validation curve (one value per epoch from 0), as
    the real driver would, without training anything. ``complete=False`` leaves it as an
    interrupted run; ``identity`` adds config keys (e.g. {"accel.history": 5}); ``metrics``
    adds the problem's own columns (e.g. {"val_rel_l2": [...]}); ``unit="iteration"``
    writes an iteration-budgeted run (empty epoch column, 10 steps between rows)."""
    from experiments.config import ACCEL_HYPERPARAMETERS, config_digest
    from experiments.results import METRICS_FILE, MetricsWriter, RunDirectory

    def _write_run(
        root: Path,
        *,
        variant: str,
        seed: int,
        val_loss: Sequence[float],
        identity: dict | None = None,
        complete: bool = True,
        experiment: str = "graduate_admissions",
        name: str = "synthetic",
        metrics: dict[str, Sequence[float]] | None = None,
        unit: str = "epoch",
    ) -> Path:
        full_identity = {
            "experiment": experiment,
            "accel.enabled": "+AADL" in variant,
            "accel.average": variant.endswith("+MA"),
            **(identity or {}),
        }
        config_id = config_digest(full_identity)
        directory = RunDirectory(Path(root) / experiment / name / f"{variant}-{config_id}" / f"seed={seed}")
        meta = {"status": "running", "variant": variant, "seed": seed, "config_id": config_id, "identity": full_identity}
        directory.start("synthetic: true\n", meta)
        constants = {
            "experiment": experiment,
            "variant": variant,
            "optimizer": "adam",
            "seed": seed,
            "config_id": config_id,
            **{name: full_identity.get(f"accel.{name}") for name in ACCEL_HYPERPARAMETERS},
        }
        with MetricsWriter(directory.file(METRICS_FILE), constants) as writer:
            for epoch, value in enumerate(val_loss):
                writer.write(
                    {
                        "step": 10 * epoch,
                        "epoch": epoch if unit == "epoch" else None,
                        "train_loss": value,
                        "val_loss": value,
                        **{column: values[epoch] for column, values in (metrics or {}).items()},
                        "lr": 0.02,
                        "wall_time": 0.01 * epoch,
                        "aa_attempts": 0,
                        "aa_accepted": 0,
                        "averages_applied": 0,
                    }
                )
        if complete:
            directory.write_meta({**meta, "status": "complete"})
            directory.mark_complete()
        return directory.path

    return _write_run


#: A small Fig. 1-like results set: validation curves (epochs 0-4) per variant and seed.
FIG1_SYNTHETIC = {
    "Adam": {0: [1.0, 0.5, 0.1, 0.05, 0.04], 1: [1.0, 0.6, 0.2, 0.06, 0.05], 2: [1.0, 0.4, 0.15, 0.07, 0.06]},
    "Adam+AADL": {0: [1.0, 0.3, 0.05, 0.02, 0.02], 1: [1.0, 0.35, 0.06, 0.03, 0.025], 2: [1.0, 0.25, 0.04, 0.02, 0.03]},
    "Adam+AADL+MA": {0: [1.0, 0.2, 0.02, 0.01, 0.008], 1: [1.0, 0.25, 0.03, 0.012, 0.01], 2: [1.0, 0.15, 0.025, 0.011, 0.012]},
}


@pytest.fixture
def fig1_synthetic(tmp_path: Path, write_run) -> Path:
    """A results directory holding FIG1_SYNTHETIC as complete runs; returns its root."""
    root = tmp_path / "runs"
    for variant, seeds in FIG1_SYNTHETIC.items():
        for seed, curve in seeds.items():
            write_run(root, variant=variant, seed=seed, val_loss=curve)
    return root


#: The config keys of each paper preset's runs that decide which caveats its figure carries.
PRESET_IDENTITY = {
    "fig1": {},
    "fig2": {"problem.activation": "relu"},
    "fig3": {"problem.activation": "relu", "problem.solution_scale": "paper"},
}


@pytest.fixture
def paper_synthetic(tmp_path: Path, write_run) -> Callable[[str], Path]:
    """``paper_synthetic(figure)``: FIG1_SYNTHETIC's curves written as the runs of a paper
    figure's preset (its experiment, budget unit, identity keys and extra metrics, each
    extra metric 10x the validation loss); returns the results root."""
    from experiments.analysis.figures import FIGURES

    def _make(figure: str) -> Path:
        spec = FIGURES[figure]
        root = tmp_path / figure
        for variant, seeds in FIG1_SYNTHETIC.items():
            for seed, curve in seeds.items():
                write_run(
                    root, variant=variant, seed=seed, val_loss=curve, experiment=spec.experiment,
                    identity=PRESET_IDENTITY[figure], unit="epoch" if spec.x == "epoch" else "iteration",
                    metrics={metric: [10 * value for value in curve] for metric in spec.also},
                )
        return root

    return _make
