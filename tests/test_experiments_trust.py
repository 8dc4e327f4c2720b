"""The writer side of results that cannot be silently wrong: divergence, unknown keys, data
identity, overwrite that keeps the old run, a sweep validated before it starts, errors that
survive pickling, and one-line errors for a machine that cannot run the job."""

from __future__ import annotations

import errno
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from conftest import REPO_ROOT, lines_of
from experiments.errors import ConfigError, DatasetError, RunError
from experiments.problems.graduate_admissions.problem import GraduateAdmissions
from experiments.results import COMPLETE_FILE, MetricsWriter, RunDirectory
from experiments.run import PREEMPTED_EXIT, RunPreempted, execute
from experiments.validation import validate


@pytest.fixture
def run_in(compose, data_root, tmp_path):
    """``run_in(*overrides)``: execute a graduate-admissions config under tmp_path/runs."""

    def _run(*overrides: str, **kwargs):
        return execute(compose(f"data.root={data_root}", f"output.root={tmp_path / 'runs'}", *overrides), **kwargs)

    return _run


# -- 1. divergence ---------------------------------------------------------------------------


def test_a_diverging_run_stops_and_is_recorded_as_diverged_with_its_step(run_in):
    outcome = run_in("optimizer.name=sgd", "optimizer.lr=20", "train.epochs=50")
    assert outcome.status == "diverged"
    meta = json.loads((outcome.path / "meta.json").read_text())
    assert meta["status"] == "diverged" and meta["diverged"]["quantity"] == "train_loss"
    assert 1 <= meta["diverged"]["step"] <= 10  # within the first epoch of 10 steps
    marker = json.loads((outcome.path / COMPLETE_FILE).read_text())
    metrics = pd.read_csv(outcome.path / "metrics.csv")
    assert marker["outcome"] == "diverged" and marker["rows"] == len(metrics) == 2  # stopped early
    assert marker["last_step"] == metrics["step"].iloc[-1]
    # Finished: the same command does not train it again.
    assert run_in("optimizer.name=sgd", "optimizer.lr=20", "train.epochs=50").status == "skipped"


def test_without_stop_on_divergence_the_whole_budget_runs_and_the_run_still_counts_as_diverged(run_in):
    outcome = run_in("optimizer.name=sgd", "optimizer.lr=20", "train.epochs=3", "train.stop_on_divergence=false")
    assert outcome.status == "diverged"
    assert len(pd.read_csv(outcome.path / "metrics.csv")) == 4
    assert json.loads((outcome.path / "meta.json").read_text())["diverged"]["step"] <= 10


def test_non_finite_parameters_are_divergence_even_with_finite_losses(run_in, monkeypatch):
    from experiments import training

    original = training.TrainingState.record_loss

    def poison(self, loss):
        original(self, loss)
        if self.step == 13:
            with __import__("torch").no_grad():
                next(self.model.parameters())[0, 0] = float("inf")

    monkeypatch.setattr(training.TrainingState, "record_loss", poison)
    outcome = run_in("train.epochs=5")
    meta = json.loads((outcome.path / "meta.json").read_text())
    assert outcome.status == "diverged" and meta["diverged"]["quantity"] in ("parameters", "train_loss")


@pytest.mark.parametrize(
    "override", ["optimizer.lr=inf", "optimizer.eps=inf", "optimizer.weight_decay=nan", "schedule.warmup_start_lr=inf"]
)
def test_non_finite_optimizer_values_are_rejected(compose, override):
    with pytest.raises(ConfigError) as error:
        validate(compose(override))
    assert error.value.key == override.split("=")[0] and "finite" in str(error.value)


# -- 2. keys nothing reads -------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, key, nearest",
    [
        ("+method.aadl.histroy=3", "method.aadl.histroy", "method.aadl.history"),
        ("+train.epoch=5", "train.epoch", "train.epochs"),
        ("+foo=1", "foo", None),
        ("+problem.widht=8", "problem.widht", "problem.width"),
        ("++train.epoch=5", "train.epoch", "train.epochs"),
        ("+accel.history=3", "accel.history", "method.aadl.history"),
        ("+method.adl.history=3", "method.adl", "method.aadl"),
        ("+optimizer.learning_rate=1", "optimizer.learning_rate", None),
    ],
)
def test_a_key_nothing_reads_is_an_error_naming_it_and_the_nearest_known_one(compose, override, key, nearest):
    with pytest.raises(ConfigError) as error:
        validate(compose("method=aadl", override))
    assert error.value.key == key and "unknown key" in str(error.value)
    if nearest:
        assert f"did you mean '{nearest}" in str(error.value) or f"did you mean {nearest!r}" in str(error.value)


# -- 3. data identity ------------------------------------------------------------------------


def test_the_data_checksum_is_part_of_the_run_identity(compose, data_root, tmp_path):
    from experiments.problems.graduate_admissions.data import GRADUATE_ADMISSIONS as SPEC

    edited = tmp_path / "edited"
    (edited / SPEC.name).mkdir(parents=True)
    text = SPEC.path(data_root).read_text().splitlines()
    text[1] = text[1].replace(",337,", ",336,", 1)  # one GRE score
    SPEC.path(edited).write_text("\n".join(text) + "\n")
    real, other = validate(compose(f"data.root={data_root}")), validate(compose(f"data.root={edited}"))
    assert real.config_id != other.config_id and real.path != other.path
    key = "data.graduate_admissions.sha256"
    assert real.identity[key] == SPEC.checksum and other.identity[key] != SPEC.checksum


# -- overwrite keeps the old run until the new one is complete ---------------------------------


def test_an_interrupted_overwrite_keeps_the_previous_complete_run(run_in, monkeypatch):
    first = run_in("train.epochs=3")
    before = (first.path / "metrics.csv").read_text()
    evaluate = GraduateAdmissions.evaluate
    calls = {"n": 0}

    def fail_on_third(self, model):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("power cut")
        return evaluate(self, model)

    monkeypatch.setattr(GraduateAdmissions, "evaluate", fail_on_third)
    with pytest.raises(RuntimeError, match="power cut"):
        run_in("train.epochs=3", "output.overwrite=true")
    monkeypatch.undo()
    assert RunDirectory(first.path).is_complete() and (first.path / "metrics.csv").read_text() == before
    redo = run_in("train.epochs=3", "output.overwrite=true")
    assert redo.status == "completed" and redo.path == first.path
    assert not RunDirectory(first.path).overwrite_sibling.path.exists()
    assert sorted(p.name for p in first.path.parent.iterdir()) == ["seed=0"]


# -- errors that survive a launcher ----------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [ConfigError("method.aadl.history", "must be >= 1"), DatasetError("missing file"), RunError("no GPU"),
     RunPreempted("/runs/x", "SIGTERM", 12)],
)
def test_harness_errors_survive_pickling_with_their_message(error):
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error) and str(copy) == str(error)
    if isinstance(error, ConfigError):
        assert copy.key == error.key


def test_a_sweep_is_validated_before_any_job_runs(data_root, tmp_path):
    command = [
        sys.executable, "-m", "experiments.run", "-m", "method=aadl", "method.aadl.history=5,0", "train.epochs=2",
        f"output.root={tmp_path / 'runs'}", f"hydra.sweep.dir={tmp_path / 'hydra'}",
    ]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "method.aadl.history=0" in lines[0] and "history=0 is invalid" in lines[0]
    assert not (tmp_path / "runs").exists()  # the valid job did not run either


def test_an_error_raised_inside_a_worker_reaches_the_sweep_with_its_message(data_root, tmp_path):
    """A problem that only the job's machine can see (here: no GPU) is raised in the worker;
    the launcher must show its message, not an unpickling TypeError."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    command = [
        sys.executable, "-m", "experiments.run", "-m", "seed=0,1", "train.epochs=1", "train.device=cuda",
        f"output.root={tmp_path / 'runs'}", f"hydra.sweep.dir={tmp_path / 'hydra'}",
    ]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "train.device=cuda: no CUDA device is available" in done.stderr
    assert "missing 1 required positional argument" not in done.stderr


# -- the machine cannot run the job: one line, nothing half-written ---------------------------


def test_an_unwritable_output_root_is_one_line_before_anything_runs(compose, data_root, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(RunError, match="output.root=.*cannot write"):
        execute(compose(f"output.root={blocker / 'runs'}", "train.epochs=1"))
    command = [sys.executable, "-m", "experiments.run", "train.epochs=1", f"output.root={blocker / 'runs'}", f"hydra.run.dir={tmp_path / 'h'}"]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.strip().count("\n") == 0 and "cannot write" in done.stderr


def test_too_little_free_disk_is_refused_up_front(run_in, monkeypatch, tmp_path):
    import shutil

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1024))
    with pytest.raises(RunError, match="MiB free"):
        run_in("train.epochs=1")
    assert not (tmp_path / "runs").exists()


def test_a_disk_that_fills_during_the_run_gives_one_line_and_an_incomplete_run(run_in, monkeypatch, tmp_path):
    write = MetricsWriter.write

    def full_after_two_rows(self, row):
        if self.rows == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        write(self, row)

    monkeypatch.setattr(MetricsWriter, "write", full_after_two_rows)
    with pytest.raises(RunError, match="No space left on device"):
        run_in("train.epochs=3")
    run = next((tmp_path / "runs").rglob("seed=0"))
    assert not RunDirectory(run).is_complete()
    assert json.loads((run / "meta.json").read_text())["status"] == "failed"


def test_a_cuda_run_without_a_gpu_is_one_line(run_in, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    with pytest.raises(RunError, match="train.device=cuda: no CUDA device"):
        run_in("train.device=cuda", "train.epochs=1")
    assert not (tmp_path / "runs").exists()


# -- signals -------------------------------------------------------------------------------


def _wait_for_rows(root, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        files = list(root.rglob("metrics.csv")) if root.exists() else []
        if len(files) >= count and all(lines_of(f) >= 3 for f in files[:count]):
            return
        time.sleep(0.2)
    raise AssertionError(f"no {count} run(s) started under {root}")


def test_sigterm_stops_a_single_run_between_steps_and_records_it_preempted(data_root, tmp_path):
    command = [sys.executable, "-m", "experiments.run", "train.epochs=100000", "method=aadl", f"output.root={tmp_path / 'runs'}", f"hydra.run.dir={tmp_path / 'h'}"]
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_rows(tmp_path / "runs", 1)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == PREEMPTED_EXIT
    run = next((tmp_path / "runs").rglob("seed=0"))
    assert json.loads((run / "meta.json").read_text())["status"] == "preempted"
    assert f"preempted by SIGTERM: {run}" in stderr and "Traceback" not in stderr
    assert list((run / "checkpoints").glob("step-*.pt"))


def test_sigterm_to_a_sweep_stops_its_workers_and_marks_their_runs_preempted(data_root, tmp_path):
    import psutil

    command = [
        sys.executable, "-m", "experiments.run", "-m", "seed=0,1", "train.epochs=100000",
        f"output.root={tmp_path / 'runs'}", f"hydra.sweep.dir={tmp_path / 'h'}",
    ]
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_rows(tmp_path / "runs", 2, timeout=90)
    workers = psutil.Process(process.pid).children(recursive=True)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=90)
    assert process.returncode == PREEMPTED_EXIT, stderr[-3000:]
    gone, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, f"orphaned workers: {alive}"
    runs = sorted((tmp_path / "runs").rglob("seed=*"))
    assert len(runs) == 2
    for run in runs:
        assert json.loads((run / "meta.json").read_text())["status"] == "preempted"
        assert f"preempted by SIGTERM: {run}" in stderr
    assert "sweep stopped by SIGTERM" in stderr and "Traceback" not in stderr


def test_a_history_too_large_for_memory_is_one_line_before_the_run_directory_exists(run_in, tmp_path):
    with pytest.raises(RunError, match="not enough memory.*history"):
        run_in("method=aadl", "method.aadl.history=10000000", "train.epochs=1")
    assert not (tmp_path / "runs").exists()
