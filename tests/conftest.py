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


def lines_of(path: Path) -> int:
    """Lines in ``path`` now, 0 where it is gone: a run that starts again (no usable
    checkpoint) removes its metrics.csv first, so a poller can see a file vanish."""
    try:
        return len(path.read_text().splitlines())
    except FileNotFoundError:
        return 0


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The shared data root; skips the test where ../shared/data is not beside the checkout."""
    from experiments.problems.graduate_admissions.data import GRADUATE_ADMISSIONS

    if not GRADUATE_ADMISSIONS.path(SHARED_DATA_ROOT).is_file():
        if os.environ.get("CI"):  # CI always has ../shared: a missing file there is a failure
            pytest.fail(f"missing {GRADUATE_ADMISSIONS.path(SHARED_DATA_ROOT)}")
        pytest.skip(f"needs {GRADUATE_ADMISSIONS.path(SHARED_DATA_ROOT)} (../shared/data beside the checkout)")
    return SHARED_DATA_ROOT


#: Experiments that read an image tree (docs/images.md). ImageNet cannot be had and the shared
#: data root holds no Fashion-MNIST tree: their configs validate against tiny stand-ins.
IMAGE_EXPERIMENTS = ("imagenet_resnet50", "fashion_resnet")
FASHION_SOURCE = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="session")
def image_data_root(tmp_path_factory) -> Path:
    """A data root with fashion_mnist/ (28x28, the fashion config's size) and imagenet1k/
    (64x64 Fashion-MNIST images in ImageNet's layout), 4 training and 2 validation images per
    class, built from Debian's dataset-fashion-mnist (a few seconds, once per session)."""
    from experiments.problems.images.fashion_mnist import build_tree

    if not FASHION_SOURCE.is_dir():
        if os.environ.get("CI"):  # .ci/system-packages installs it
            pytest.fail(f"missing {FASHION_SOURCE}: apt-get install dataset-fashion-mnist")
        pytest.skip(f"needs {FASHION_SOURCE} (apt-get install dataset-fashion-mnist)")
    root = tmp_path_factory.mktemp("images")
    build_tree(root / "fashion_mnist", train_per_class=4, val_per_class=2)
    build_tree(root / "imagenet1k", train_per_class=4, val_per_class=2, size=64)
    return root


@pytest.fixture
def data_for(request) -> Callable[[str], tuple[str, ...]]:
    """``data_for(experiment)``: the overrides that point ``experiment`` at test data (the
    image trees' stand-ins; nothing for the others, which read the shared data root)."""

    def overrides(experiment: str) -> tuple[str, ...]:
        if experiment not in IMAGE_EXPERIMENTS:
            return ()
        return (f"data.root={request.getfixturevalue('image_data_root')}",)

    return overrides


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
