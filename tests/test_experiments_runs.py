"""Short real runs through the driver: run directories, metrics.csv schema, completeness,
skipping, determinism, and interrupted runs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch
import yaml

from conftest import REPO_ROOT
from experiments.analysis.aggregate import load_results
from aadl import SETTING_NAMES
from experiments.methods.aadl import COUNTERS
from experiments.problems.graduate_admissions.problem import GraduateAdmissions
from experiments.results import COMPLETE_FILE, IDENTITY_COLUMNS, PROGRESS_COLUMNS, TRAILING_COLUMNS, RunDirectory
from experiments.run import execute
from experiments.validation import validate

EPOCHS = 3


@pytest.fixture
def short_run(compose, data_root, tmp_path):
    """``short_run(*overrides)``: a 3-epoch graduate-admissions run under tmp_path."""

    def _run(*overrides: str, worker: bool = False):
        cfg = compose(f"train.epochs={EPOCHS}", f"data.root={data_root}", f"output.root={tmp_path / 'runs'}", *overrides)
        return execute(cfg, worker=worker)

    return _run


def read_metrics(path) -> pd.DataFrame:
    return pd.read_csv(path / "metrics.csv")


def expected_columns(method: str, problem_metrics: list[str]) -> list[str]:
    """metrics.csv's columns: the common ones, and AADL's settings and counters where it runs."""
    aadl = method != "none"
    settings = [("aadl_variant" if name == "variant" else name) for name in SETTING_NAMES]
    return [
        *IDENTITY_COLUMNS, *(settings if aadl else ()), *PROGRESS_COLUMNS, *problem_metrics,
        *TRAILING_COLUMNS, *(COUNTERS if aadl else ()),
    ]


@pytest.mark.parametrize("accel, variant", [("none", "Adam"), ("aadl", "Adam+AADL"), ("aadl_ma", "Adam+AADL+MA")])
def test_short_run_writes_a_complete_schema_valid_run_directory(short_run, tmp_path, accel, variant):
    outcome = short_run(f"method={accel}", "seed=3")
    path = outcome.path
    assert outcome.status == "completed"
    assert path.relative_to(tmp_path / "runs").parts[:2] == ("graduate_admissions", "default")
    assert path.parent.name.startswith(f"{variant}-") and path.name == "seed=3"
    assert RunDirectory(path).is_complete()

    metrics = read_metrics(path)
    # Schema: the common columns, the method's own, and the problem's metric before lr.
    assert list(metrics.columns) == expected_columns(accel, ["val_r2"])
    # One row per evaluation: before training, then after every epoch.
    assert metrics["epoch"].tolist() == list(range(EPOCHS + 1))
    assert metrics["step"].tolist() == [10 * e for e in range(EPOCHS + 1)]  # 400 rows / batch 40
    assert set(metrics["experiment"]) == {"graduate_admissions"} and set(metrics["variant"]) == {variant}
    assert set(metrics["seed"]) == {3} and set(metrics["lr"]) == {0.02}
    assert math.isnan(metrics["train_loss"][0]) and metrics["train_loss"][1:].gt(0).all()
    assert metrics["val_loss"].gt(0).all() and metrics["val_loss"].iloc[-1] < metrics["val_loss"].iloc[0]
    assert metrics["wall_time"].is_monotonic_increasing
    assert set(metrics["method"]) == {"none" if accel == "none" else "aadl"}
    if accel != "none":
        for counter in COUNTERS:
            assert metrics[counter].is_monotonic_increasing and metrics[counter].iloc[0] == 0
        first = metrics.iloc[0]
        assert (first.history, first.frequency, first.store_every, first.relaxation, first.average_threshold) == (10, 1, 1, 0.1, 0.1)
        assert bool(first.average) is (accel == "aadl_ma")
        assert metrics["aa_attempts"].iloc[-1] > 0
        assert metrics["aa_accepted"].iloc[-1] <= metrics["aa_attempts"].iloc[-1]
        if accel == "aadl":
            assert metrics["averages_applied"].eq(0).all()

    config = yaml.safe_load((path / "config.yaml").read_text())
    assert config["train"]["epochs"] == EPOCHS and config["seed"] == 3
    assert config["problem"]["batch_size"] == 40 and config["method"]["name"] == ("none" if accel == "none" else "aadl")
    assert config["method"]["aadl"]["average"] is (accel == "aadl_ma")
    meta = json.loads((path / "meta.json").read_text())
    assert meta["status"] == "complete" and meta["variant"] == variant
    assert (meta["method"], meta["baseline"], meta["legend_order"]) == (
        {"none": ("none", True, 0), "aadl": ("aadl", False, 1), "aadl_ma": ("aadl", False, 2)}[accel]
    )
    assert meta["budget"] == {"unit": "epoch", "total": EPOCHS, "eval_every": 1} and meta["expected_rows"] == EPOCHS + 1
    assert json.loads((path / COMPLETE_FILE).read_text())["rows"] == EPOCHS + 1
    assert {"commit", "dirty"} <= set(meta["git"]) and meta["torch"] and meta["host"] and meta["started"] <= meta["ended"]
    # The kernels torch chose: reruns are bit-for-bit on one CPU capability, not across them.
    assert meta["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and "cpu_model" in meta
    assert "gpu_model" not in meta
    assert any("400 training / 100 validation" in line for line in meta["notes"])
    assert meta["final"]["val_loss"] == pytest.approx(metrics["val_loss"].iloc[-1])
    log = (path / "run.log").read_text()
    assert "400 training / 100 validation" in log and f"epoch {EPOCHS}/{EPOCHS}" in log


def test_every_variant_starts_from_the_same_weights_for_a_seed(short_run):
    first_rows = [read_metrics(short_run(f"method={a}").path)["val_loss"][0] for a in ("none", "aadl", "aadl_ma")]
    assert first_rows[0] == first_rows[1] == first_rows[2]
    assert read_metrics(short_run("seed=1").path)["val_loss"][0] != first_rows[0]


def test_rerun_skips_a_complete_run_and_overwrite_reproduces_it(short_run):
    first = short_run("method=aadl")
    before = (first.path / "metrics.csv").stat().st_mtime_ns
    again = short_run("method=aadl")
    assert (again.status, again.path) == ("skipped", first.path)
    assert (first.path / "metrics.csv").stat().st_mtime_ns == before
    values = read_metrics(first.path)
    redo = short_run("method=aadl", "output.overwrite=true")
    assert redo.status == "completed" and redo.path == first.path
    rerun = read_metrics(first.path)
    # Bit-for-bit the same training on CPU; only the timing differs.
    pd.testing.assert_frame_equal(values.drop(columns="wall_time"), rerun.drop(columns="wall_time"))


def test_interrupted_run_is_never_read_as_complete_and_is_redone(short_run, tmp_path, monkeypatch):
    short_run("method=none")  # one complete run beside the interrupted one

    evaluate = GraduateAdmissions.evaluate
    calls = {"n": 0}

    def evaluate_then_interrupt(self, model):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return evaluate(self, model)

    monkeypatch.setattr(GraduateAdmissions, "evaluate", evaluate_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        short_run("method=aadl")
    monkeypatch.undo()

    interrupted = next((tmp_path / "runs").rglob("Adam+AADL-*/seed=0"))
    assert not (interrupted / COMPLETE_FILE).exists()
    assert len(read_metrics(interrupted)) == 2  # what was measured is kept for inspection
    meta = json.loads((interrupted / "meta.json").read_text())
    assert meta["status"] == "failed" and "KeyboardInterrupt" in meta["error"]

    results = load_results(tmp_path / "runs")
    assert results.runs["variant"].tolist() == ["Adam"]
    assert set(results.metrics["variant"]) == {"Adam"}
    assert [(issue.path, issue.reason) for issue in results.incomplete] == [(interrupted, "failed")]

    redo = short_run("method=aadl")  # not skipped: it starts again from scratch
    assert redo.status == "completed" and redo.path == interrupted
    assert len(read_metrics(interrupted)) == EPOCHS + 1


def test_missing_data_fails_before_any_run_directory_exists(compose, tmp_path):
    from experiments.errors import DatasetError

    cfg = compose("train.epochs=1", f"data.root={tmp_path / 'nowhere'}", f"output.root={tmp_path / 'runs'}")
    with pytest.raises(DatasetError, match="download graduate_admissions"):
        execute(cfg)
    assert not (tmp_path / "runs").exists()


def test_eval_every_evaluates_every_n_units_and_after_the_last(short_run):
    metrics = read_metrics(short_run("train.epochs=5", "train.eval_every=2").path)
    assert metrics["epoch"].tolist() == [0, 2, 4, 5]


def test_cli_runs_the_fig1_preset_in_parallel_workers(data_root, tmp_path):
    """The real command line: preset, joblib launcher, one torch thread per worker."""
    env = {**os.environ, "AADL_DATA_ROOT": str(data_root), "CI": "1"}
    command = [
        sys.executable, "-m", "experiments.run", "-m", "+paper=fig1", "seed=0", "train.epochs=2",
        f"output.root={tmp_path / 'runs'}", f"hydra.sweep.dir={tmp_path / 'hydra'}",
    ]
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = sorted((tmp_path / "runs" / "graduate_admissions" / "fig1").glob("*/seed=0"))
    # The paper's three variants and the averaging-only control (method ma).
    assert sorted(p.parent.name.split("-")[0] for p in runs) == ["Adam", "Adam+AADL", "Adam+AADL+MA", "Adam+MA"]
    for path in runs:
        meta = json.loads((path / "meta.json").read_text())
        assert RunDirectory(path).is_complete() and meta["torch_threads"] == 1


def test_cli_rejects_a_bad_value_naming_the_key_before_running(data_root, tmp_path):
    env = {**os.environ, "AADL_DATA_ROOT": str(data_root)}
    command = [sys.executable, "-m", "experiments.run", "method=aadl", "method.aadl.relaxation=2", f"output.root={tmp_path}", f"hydra.run.dir={tmp_path / 'hydra'}"]
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "method.aadl.relaxation" in done.stderr and "0 < relaxation <= 1" in done.stderr
    assert not (tmp_path / "graduate_admissions").exists()


def test_a_run_held_by_another_process_is_left_alone(compose, data_root, tmp_path):
    cfg = compose("train.epochs=1", f"data.root={data_root}", f"output.root={tmp_path / 'runs'}")
    directory = RunDirectory(validate(cfg).path)
    with directory.claim() as claimed:  # what a concurrent process running this config holds
        assert claimed
        outcome = execute(cfg)
        assert outcome.status == "busy" and not (directory.path / "metrics.csv").exists()
    assert execute(cfg).status == "completed"  # once released, it runs


BURGERS_ITERATIONS = 4


@pytest.mark.parametrize("experiment", ["burgers2d", "burgers100d"])
@pytest.mark.parametrize("accel", ["none", "aadl_ma"])
def test_short_burgers_run_writes_complete_schema_valid_metrics(compose, tmp_path, experiment, accel):
    cfg = compose(
        f"experiment={experiment}", f"method={accel}", f"train.iterations={BURGERS_ITERATIONS}",
        "train.eval_every=2", f"output.root={tmp_path}",
    )
    outcome = execute(cfg)
    assert outcome.status == "completed" and RunDirectory(outcome.path).is_complete()
    metrics = read_metrics(outcome.path)
    problem_metrics = ["val_mse_u", "val_mse_f", "val_rel_l2"]
    assert list(metrics.columns) == expected_columns(accel, problem_metrics)
    # Iteration budget: one step per iteration, rows at 0, 2, 4, no epochs.
    assert metrics["step"].tolist() == [0, 2, 4] and metrics["epoch"].isna().all()
    assert metrics["val_loss"].to_numpy() == pytest.approx((metrics["val_mse_u"] + metrics["val_mse_f"]).to_numpy(), rel=1e-5)
    assert (metrics["val_rel_l2"] > 0).all() and metrics[problem_metrics].notna().all().all()
    assert set(metrics["lr"]) == {cfg.optimizer.lr}
    if accel == "aadl_ma":
        first = metrics.iloc[0]
        paper = cfg.method.aadl
        assert (first.frequency, first.store_every, first.history) == (paper.frequency, paper.store_every, paper.history)
    meta = json.loads((outcome.path / "meta.json").read_text())
    assert meta["status"] == "complete" and meta["final"]["val_rel_l2"] == pytest.approx(metrics["val_rel_l2"].iloc[-1])
    notes = " ".join(meta["notes"])
    assert "activation=relu" in notes and ("1e-27" in notes) is (experiment == "burgers100d")
    assert f"iteration {BURGERS_ITERATIONS}/{BURGERS_ITERATIONS}" in (outcome.path / "run.log").read_text()


def test_cli_runs_the_fig3_preset_and_its_figure_reports_the_relative_error(tmp_path):
    """The real command line for a Burgers preset (no data needed), then its figure."""
    from experiments.analysis.figures import figure_report

    env = {**os.environ, "CI": "1"}
    command = [
        sys.executable, "-m", "experiments.run", "-m", "+paper=fig3", "seed=0,1", "train.iterations=2",
        "train.eval_every=1", f"output.root={tmp_path / 'runs'}", f"hydra.sweep.dir={tmp_path / 'hydra'}",
    ]
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = figure_report("fig3", tmp_path / "runs" / "burgers100d" / "fig3")
    assert sorted(report.results.labels) == ["Adam", "Adam+AADL", "Adam+AADL+MA", "Adam+MA"] and len(report.results.runs) == 8
    assert report.summary["final_val_rel_l2_mean"].gt(0).all()
    assert "1e-27" in report.summary_markdown
