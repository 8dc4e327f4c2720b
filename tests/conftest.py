"""Shared fixtures: the data root, Hydra composition, and synthetic run directories."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import os

import pytest

import run_trees
from run_trees import FIG1_SYNTHETIC, PRESET_IDENTITY  # noqa: F401  (tests import them from here)

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
    """``write_run(root, variant=..., seed=..., val_loss=[...], ...)``: a run directory in the
    harness's format, written with json and csv (``run_trees.write_run`` has the options:
    unfinished, diverged, truncated, short of its budget, on other data)."""
    return run_trees.write_run


@pytest.fixture
def fig1_synthetic(tmp_path: Path) -> Path:
    """A results directory holding FIG1_SYNTHETIC as complete runs; returns its root."""
    return run_trees.write_fig1_synthetic(tmp_path / "runs")


@pytest.fixture
def paper_synthetic(tmp_path: Path) -> Callable[[str], Path]:
    """``paper_synthetic(figure)``: FIG1_SYNTHETIC's curves written as the runs of a paper
    figure's preset (``run_trees.write_paper_synthetic``); returns the results root."""
    return lambda figure: run_trees.write_paper_synthetic(tmp_path / figure, figure)
