"""Checkpoints and resume: a run killed (kill -9) or stopped by a signal at any moment and
rerun with the same command ends bit for bit where an uninterrupted run ends; damaged or
foreign checkpoints are refused with a clear message."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import REPO_ROOT, lines_of
from experiments import checkpoint, run as run_module
from experiments.checkpoint import CheckpointError
from experiments.results import FINAL_MODEL_FILE, RunDirectory
from experiments.run import RunPreempted, execute

GRADUATE = ("method=aadl_ma", "train.epochs=8", "checkpoint.every=1")
BURGERS = ("experiment=burgers2d", "method=aadl_ma", "train.iterations=30", "train.eval_every=2", "checkpoint.every=4",
           "method.aadl.frequency=2", "method.aadl.store_every=1")


def assert_same_run(a: Path, b: Path) -> None:
    """Same metrics (but for the clock) and the same final parameters, bit for bit."""
    left, right = pd.read_csv(a / "metrics.csv"), pd.read_csv(b / "metrics.csv")
    pd.testing.assert_frame_equal(left.drop(columns="wall_time"), right.drop(columns="wall_time"), check_exact=True)
    pa = torch.load(a / FINAL_MODEL_FILE, weights_only=True)
    pb = torch.load(b / FINAL_MODEL_FILE, weights_only=True)
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)


def cli(*overrides: str, root: Path) -> list[str]:
    return [sys.executable, "-m", "experiments.run", *overrides, f"output.root={root}", f"hydra.run.dir={root / 'hydra'}"]


def kill_after(command: list[str], rows: int, root: Path) -> None:
    """Start ``command`` and SIGKILL it once its metrics.csv has ``rows`` data rows."""
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and process.poll() is None:
            files = list(root.rglob("metrics.csv"))
            if files and lines_of(files[0]) - 1 >= rows:
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"the run never reached {rows} rows (exit {process.returncode})")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()


@pytest.mark.parametrize("overrides", [GRADUATE, BURGERS], ids=["graduate_admissions", "burgers2d"])
def test_kill_9_at_several_moments_then_rerun_is_bit_identical(overrides, tmp_path):
    reference = execute_cli(overrides, tmp_path / "reference")
    root = tmp_path / "killed"
    for rows in (2, 4):  # killed twice, at different points, resumed each time
        kill_after(cli(*overrides, root=root), rows, root)
    done = subprocess.run(cli(*overrides, root=root), cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    resumed = next(root.rglob("seed=0"))
    meta = json.loads((resumed / "meta.json").read_text())
    assert meta["status"] == "complete" and len(meta.get("resumed", [])) >= 1
    assert not (resumed / checkpoint.DIRECTORY).exists()  # deleted once finished
    assert_same_run(reference, resumed)


def execute_cli(overrides, root: Path) -> Path:
    done = subprocess.run(cli(*overrides, root=root), cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return next(root.rglob("seed=0"))


def stop_at_step(monkeypatch, step: int) -> None:
    """Make the loop see a signal once ``step`` steps are done (what SIGUSR1 does, on cue)."""
    from contextlib import contextmanager

    @contextmanager
    def fake_signals():
        state = {"calls": 0}

        def should_stop():
            state["calls"] += 1
            return "SIGUSR1" if state["calls"] == step else None

        yield should_stop

    monkeypatch.setattr(run_module, "stop_on_signals", fake_signals)


@pytest.mark.parametrize("step", [7, 25])  # inside epoch 1 and inside epoch 3 (10 steps an epoch)
def test_a_signal_inside_an_epoch_checkpoints_there_and_the_resumed_run_is_bit_identical(compose, data_root, tmp_path, monkeypatch, step):
    overrides = ("method=aadl_ma", "train.epochs=4", f"data.root={data_root}")
    reference = execute(compose(*overrides, f"output.root={tmp_path / 'a'}")).path
    stop_at_step(monkeypatch, step)
    with pytest.raises(RunPreempted) as stopped:
        execute(compose(*overrides, f"output.root={tmp_path / 'b'}"))
    assert stopped.value.step == step
    run_dir = Path(stopped.value.path)
    assert json.loads((run_dir / "meta.json").read_text())["status"] == "preempted"
    assert [p.name for p in checkpoint.list_checkpoints(run_dir)] == [f"step-{step:09d}.pt"]
    monkeypatch.undo()
    outcome = execute(compose(*overrides, f"output.root={tmp_path / 'b'}"))
    assert outcome.status == "completed" and RunDirectory(outcome.path).is_complete()
    assert_same_run(reference, outcome.path)


def test_old_checkpoints_are_pruned_to_checkpoint_keep(compose, data_root, tmp_path, monkeypatch):
    stop_at_step(monkeypatch, 45)
    with pytest.raises(RunPreempted) as stopped:
        execute(compose("train.epochs=6", "checkpoint.every=1", "checkpoint.keep=2", f"output.root={tmp_path}"))
    names = [p.name for p in checkpoint.list_checkpoints(Path(stopped.value.path))]
    assert names == ["step-000000040.pt", "step-000000045.pt"]


def _preempted_run(compose, tmp_path, monkeypatch, *overrides) -> Path:
    stop_at_step(monkeypatch, 12)
    with pytest.raises(RunPreempted) as stopped:
        execute(compose("train.epochs=3", f"output.root={tmp_path}", *overrides))
    monkeypatch.undo()
    return Path(stopped.value.path)


def test_a_damaged_checkpoint_is_refused_naming_the_file(compose, tmp_path, monkeypatch):
    run_dir = _preempted_run(compose, tmp_path, monkeypatch)
    (saved,) = checkpoint.list_checkpoints(run_dir)
    saved.write_bytes(saved.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f"no intact checkpoint to resume from \\({saved.name}: BadZipFile"):
        execute(compose("train.epochs=3", f"output.root={tmp_path}"))
    assert saved.exists()  # nothing deleted: the user decides


def test_a_checkpoint_of_another_config_is_refused_naming_what_differs(compose, tmp_path, monkeypatch):
    theirs = _preempted_run(compose, tmp_path, monkeypatch, "method=aadl")
    mine = _preempted_run(compose, tmp_path, monkeypatch, "method=aadl_ma")
    for old in checkpoint.list_checkpoints(mine):
        old.unlink()
    (foreign,) = checkpoint.list_checkpoints(theirs)
    shutil.copy(foreign, mine / checkpoint.DIRECTORY / foreign.name)
    with pytest.raises(CheckpointError, match="made for a different run: config_id"):
        execute(compose("train.epochs=3", f"output.root={tmp_path}", "method=aadl_ma"))


def test_a_run_resumed_on_other_cpu_kernels_says_it_is_no_longer_bit_for_bit(compose, tmp_path, monkeypatch):
    run_dir = _preempted_run(compose, tmp_path, monkeypatch)
    here = torch.backends.cpu.get_cpu_capability()
    meta_path = run_dir / "meta.json"
    started_on = {**json.loads(meta_path.read_text()), "cpu_capability": "VSX"}  # as if begun on a POWER node
    meta_path.write_text(json.dumps(started_on))
    outcome = execute(compose("train.epochs=3", f"output.root={tmp_path}"))
    assert outcome.status == "completed"
    meta = json.loads(meta_path.read_text())
    assert meta["cpu_capability"] == "VSX" and meta["resumed"][-1]["cpu_capability"] == here
    assert meta["resumed"][-1]["step"] == 12
    log = (run_dir / "run.log").read_text()
    assert f"resumed at step 12 on other hardware (cpu_capability 'VSX' -> '{here}')" in log
    assert "not bit for bit" in log


def test_a_run_resumed_on_the_same_kernels_warns_nothing(compose, tmp_path, monkeypatch):
    run_dir = _preempted_run(compose, tmp_path, monkeypatch)
    execute(compose("train.epochs=3", f"output.root={tmp_path}"))
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["resumed"][-1]["cpu_capability"] == meta["cpu_capability"]
    assert "other hardware" not in (run_dir / "run.log").read_text()


def test_checkpoints_load_with_weights_only(compose, tmp_path, monkeypatch):
    run_dir = _preempted_run(compose, tmp_path, monkeypatch, "method=aadl_ma")
    (saved,) = checkpoint.list_checkpoints(run_dir)
    payload = torch.load(saved, weights_only=True)
    assert payload["state"]["step"] == 12 and len(payload["rows"]) == 2
    assert "anderson" in payload["state"]["optimizer"]  # the whole AADL state
