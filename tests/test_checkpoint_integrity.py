"""Checkpoint integrity: a damaged checkpoint (flipped bytes, truncated, empty) is never
resumed from. It is named in one line and the run falls back to the newest intact one,
ending bit for bit where an uninterrupted run ends; where none is left, the run refuses
in one line naming an action, and the action works. Ranks resume from the newest step of
which every rank holds an intact copy. Every file a reader trusts is written by one
atomic writer that fsyncs the file and its folder."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import REPO_ROOT, lines_of
from experiments import checkpoint, run as run_module
from experiments.checkpoint import CheckpointError
from experiments.results import FINAL_MODEL_FILE, TIMING_COLUMNS
from experiments.run import RunPreempted, execute

SINGLE = ("method=aadl_ma", "train.epochs=40", "checkpoint.every=5")
VENV_BIN = Path(sys.executable).parent


def flip_first_tensor(path: Path) -> None:
    """Flip 4 bytes in the middle of the first tensor's storage (record ``data/0``)."""
    with zipfile.ZipFile(path) as archive:
        (record,) = [r for r in archive.infolist() if r.filename.endswith("/data/0")]
    with open(path, "r+b") as handle:
        handle.seek(record.header_offset)
        header = handle.read(30)
        name_length, extra_length = struct.unpack("<HH", header[26:30])
        middle = record.header_offset + 30 + name_length + extra_length + record.file_size // 2
        handle.seek(middle)
        original = handle.read(4)
        handle.seek(middle)
        handle.write(bytes(b ^ 0xFF for b in original))


def cli(*overrides: str, root: Path) -> list[str]:
    return [sys.executable, "-m", "experiments.run", *overrides, f"output.root={root}", f"hydra.run.dir={root / 'hydra'}"]


def run_cli(*overrides: str, root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cli(*overrides, root=root), cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def assert_bit_identical(a: Path, b: Path) -> None:
    left, right = pd.read_csv(a / "metrics.csv"), pd.read_csv(b / "metrics.csv")
    timing = [c for c in TIMING_COLUMNS if c in left]
    pd.testing.assert_frame_equal(left.drop(columns=timing), right.drop(columns=timing), check_exact=True)
    pa, pb = (torch.load(p / FINAL_MODEL_FILE, weights_only=True) for p in (a, b))
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)


def stop_at_step(monkeypatch, step: int) -> None:
    """The loop sees a signal once ``step`` steps are done (as in test_experiments_resume.py)."""
    from contextlib import contextmanager

    @contextmanager
    def fake_signals():
        calls = {"n": 0}

        def should_stop():
            calls["n"] += 1
            return "SIGUSR1" if calls["n"] == step else None

        yield should_stop

    monkeypatch.setattr(run_module, "stop_on_signals", fake_signals)


def advised_folder(message: str) -> Path:
    match = re.search(r"delete (\S+) to train this run from the start", message)
    assert match, message
    return Path(match.group(1))


# -- a single run, as a user meets it ---------------------------------------------------------


def test_flipped_bytes_in_the_newest_checkpoint_fall_back_to_the_previous_one_bit_identically(tmp_path):
    reference = run_cli(*SINGLE, root=tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr[-2000:]
    root = tmp_path / "preempted"
    process = subprocess.Popen(cli(*SINGLE, root=root), cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        files = list(root.rglob("metrics.csv"))
        if files and lines_of(files[0]) - 1 >= 13:  # past the checkpoint of epoch 10
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == run_module.PREEMPTED_EXIT
    (run_dir,) = root.rglob("seed=0")
    *_, previous, newest = checkpoint.list_checkpoints(run_dir)
    flip_first_tensor(newest)

    resumed = run_cli(*SINGLE, root=root)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    output = resumed.stdout + resumed.stderr
    (line,) = [line for line in output.splitlines() if newest.name in line]
    assert "damaged" in line and "CRC" in line and f"resuming from step {checkpoint.step_of(previous)}" in line
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["status"] == "complete" and meta["resumed"][-1]["step"] == checkpoint.step_of(previous)
    assert_bit_identical(next((tmp_path / "reference").rglob("seed=0")), run_dir)


def _preempted(compose, root: Path, monkeypatch, step: int, *overrides: str) -> Path:
    stop_at_step(monkeypatch, step)
    with pytest.raises(RunPreempted) as stopped:
        execute(compose(*overrides, f"output.root={root}"))
    monkeypatch.undo()
    return Path(stopped.value.path)


def test_an_empty_newest_checkpoint_is_damaged_and_the_run_falls_back(compose, data_root, tmp_path, monkeypatch, caplog):
    overrides = ("method=aadl", "train.epochs=4", "checkpoint.every=1", f"data.root={data_root}")
    reference = execute(compose(*overrides, f"output.root={tmp_path / 'a'}")).path
    run_dir = _preempted(compose, tmp_path / "b", monkeypatch, 25, *overrides)
    previous, newest = checkpoint.list_checkpoints(run_dir)
    newest.write_bytes(b"")
    outcome = execute(compose(*overrides, f"output.root={tmp_path / 'b'}"))
    assert outcome.status == "completed"
    assert any(newest.name in r.message and "empty file (0 bytes)" in r.message for r in caplog.records)
    assert json.loads((run_dir / "meta.json").read_text())["resumed"][-1]["step"] == checkpoint.step_of(previous) == 20
    assert_bit_identical(reference, run_dir)


def test_no_intact_checkpoint_is_a_one_line_refusal_whose_advice_works(compose, data_root, tmp_path, monkeypatch):
    overrides = ("method=aadl", "train.epochs=3", "checkpoint.every=1", f"data.root={data_root}")
    reference = execute(compose(*overrides, f"output.root={tmp_path / 'a'}")).path
    run_dir = _preempted(compose, tmp_path / "b", monkeypatch, 15, *overrides)
    older, newest = checkpoint.list_checkpoints(run_dir)
    older.write_bytes(b"")  # what a full disk or a crash of the file system leaves
    flip_first_tensor(newest)

    refused = run_cli(*overrides, root=tmp_path / "b")
    assert refused.returncode == 1 and refused.stderr.strip().count("\n") == 0, refused.stderr[-3000:]
    message = refused.stderr.strip()
    assert "no intact checkpoint to resume from" in message and older.name in message and newest.name in message
    assert older.exists() and newest.exists()  # nothing moved: the user decides
    shutil.rmtree(advised_folder(message))  # the advised action
    assert execute(compose(*overrides, f"output.root={tmp_path / 'b'}")).status == "completed"
    assert_bit_identical(reference, run_dir)


@pytest.mark.parametrize("foreign", ["another config", "another format"])
def test_a_refused_checkpoint_names_an_action_that_works(compose, data_root, tmp_path, monkeypatch, foreign):
    overrides = ("train.epochs=3", f"data.root={data_root}")
    mine = _preempted(compose, tmp_path, monkeypatch, 12, *overrides, "method=aadl_ma")
    (saved,) = checkpoint.list_checkpoints(mine)
    if foreign == "another config":
        theirs = _preempted(compose, tmp_path, monkeypatch, 12, *overrides, "method=aadl")
        shutil.copy(checkpoint.list_checkpoints(theirs)[0], saved)
    else:
        torch.save({"format": 0, "state": {}}, saved)
    with pytest.raises(CheckpointError) as refused:
        execute(compose(*overrides, "method=aadl_ma", f"output.root={tmp_path}"))
    assert str(refused.value).count("\n") == 0 and saved.name in str(refused.value)
    assert "overwrite" not in str(refused.value)  # output.overwrite=true does not retrain an unfinished run
    shutil.rmtree(advised_folder(str(refused.value)))
    assert execute(compose(*overrides, "method=aadl_ma", f"output.root={tmp_path}")).status == "completed"


# -- seed groups ------------------------------------------------------------------------------


def test_a_damaged_group_checkpoint_falls_back_and_the_group_ends_bit_identically(compose, data_root, tmp_path, monkeypatch, caplog):
    overrides = ("method=aadl_ma", "train.epochs=3", "checkpoint.every=1", f"data.root={data_root}", "train.seed_group=[0,1,2]", "seed=0")
    reference = execute(compose(*overrides, f"output.root={tmp_path / 'a'}"))
    stop_at_step(monkeypatch, 15)
    with pytest.raises(RunPreempted) as stopped:
        execute(compose(*overrides, f"output.root={tmp_path / 'b'}"))
    monkeypatch.undo()
    folder = Path(stopped.value.path)
    previous, newest = checkpoint.list_checkpoints(folder)
    flip_first_tensor(newest)
    resumed = execute(compose(*overrides, f"output.root={tmp_path / 'b'}"))
    assert [o.status for o in resumed] == ["completed"] * 3
    assert any(newest.name in r.message and "damaged" in r.message for r in caplog.records)
    for before, after in zip(reference, resumed):
        assert json.loads((after.path / "meta.json").read_text())["resumed"][-1]["step"] == checkpoint.step_of(previous)
        assert_bit_identical(before.path, after.path)


def test_a_group_with_no_intact_checkpoint_refuses_and_its_advice_works(compose, data_root, tmp_path, monkeypatch):
    overrides = ("method=aadl", "train.epochs=2", f"data.root={data_root}", "train.seed_group=[0,1]", "seed=0", f"output.root={tmp_path}")
    stop_at_step(monkeypatch, 12)
    with pytest.raises(RunPreempted) as stopped:
        execute(compose(*overrides))
    monkeypatch.undo()
    (only,) = checkpoint.list_checkpoints(Path(stopped.value.path))
    only.write_bytes(only.read_bytes()[:1000])  # truncated
    with pytest.raises(CheckpointError, match="no intact checkpoint to resume from") as refused:
        execute(compose(*overrides))
    assert str(refused.value).count("\n") == 0 and only.name in str(refused.value)
    shutil.rmtree(advised_folder(str(refused.value)))
    assert [o.status for o in execute(compose(*overrides))] == ["completed"] * 2


# -- ranks ------------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_the_resume_step_is_the_newest_that_every_rank_holds_intact(world_size):
    generator = random.Random(world_size)
    for _ in range(200):
        steps = sorted(generator.sample(range(1, 40), 4))
        reports = [
            {step: generator.choice([None, None, None, "damaged"]) for step in steps if generator.random() < 0.85}
            for _ in range(world_size)
        ]
        plan = checkpoint.plan_resume(reports)
        intact_everywhere = [s for s in steps if all(r.get(s, "missing") is None for r in reports)]
        assert plan.step == (max(intact_everywhere) if intact_everywhere else None)
        assert sorted(plan.damaged) == sorted((s, rank, why) for rank, r in enumerate(reports) for s, why in r.items() if why)
        assert sorted(plan.orphans) == sorted(
            (s, rank) for rank, r in enumerate(reports) for s, why in r.items() if why is None and s not in intact_everywhere
        )


def torchrun(overrides, root: Path, **popen):
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "CI": "1"}
    command = [str(VENV_BIN / "torchrun"), "--standalone", "--nproc-per-node=2", "-m", "experiments.run",
               *overrides, f"output.root={root}", f"hydra.run.dir={root / 'hydra'}"]
    if popen:
        return subprocess.Popen(command, cwd=REPO_ROOT, env=env, **popen)
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.distributed
def test_two_ranks_out_of_step_resume_from_the_newest_step_both_hold(tmp_path):
    """kill -9 between the two ranks' renames leaves rank 0's newest step without a rank-1
    copy: the rerun resumes from the step both hold, prunes the orphan, and ends bit for bit."""
    import psutil

    overrides = ("method=aadl_ma", "method.aadl.distributed=sharded", "problem.batch_size=200", "train.epochs=30", "checkpoint.every=2",
                 "checkpoint.keep=3")
    reference = torchrun(overrides, tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr[-3000:]
    root = tmp_path / "killed"
    process = torchrun(overrides, root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        files = list(root.rglob("metrics.csv"))
        if files and lines_of(files[0]) >= 12:
            break
        time.sleep(0.05)
    family = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    for member in family:
        member.send_signal(signal.SIGKILL)
    psutil.wait_procs(family, timeout=30)
    process.wait()
    (run_dir,) = root.rglob("seed=0")
    if (run_dir / "COMPLETE").exists():
        pytest.skip("the run finished before the kill")
    def both() -> set[int]:
        return set.intersection(*(set(map(checkpoint.step_of, checkpoint.list_checkpoints(run_dir, r))) for r in (0, 1)))

    newest = max(both())
    checkpoint.checkpoint_path(run_dir, newest, 1).unlink()  # rank 1 never renamed it
    common = max(both())

    done = torchrun(overrides, root)
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    assert f"step {newest} has no intact copy of rank(s) 1; deleted the copies of rank(s) 0, resuming from step {common}" in output
    assert json.loads((run_dir / "meta.json").read_text())["resumed"][-1]["step"] == common
    (expected,) = (tmp_path / "reference").rglob("seed=0")
    left, right = pd.read_csv(expected / "metrics.csv"), pd.read_csv(run_dir / "metrics.csv")
    pd.testing.assert_frame_equal(left.drop(columns="wall_time"), right.drop(columns="wall_time"), check_exact=True)


@pytest.mark.distributed
@pytest.mark.parametrize("advice", ["resume with 1 process", "delete the folder"])
def test_a_checkpoint_of_another_world_size_is_refused_with_advice_that_works(compose, data_root, tmp_path, monkeypatch, advice):
    overrides = ("method=aadl_ma", "problem.batch_size=400", "train.epochs=6", f"data.root={data_root}")
    run_dir = _preempted(compose, tmp_path, monkeypatch, 3, *overrides)
    refused = torchrun(overrides, tmp_path)
    assert refused.returncode != 0
    lines = [line for line in refused.stderr.splitlines() if "made for a different run" in line]
    assert lines and all("world_size 1 (this run: 2)" in line and "resume it with 1 process(es)" in line for line in lines)
    if advice == "resume with 1 process":
        assert execute(compose(*overrides, f"output.root={tmp_path}")).status == "completed"
    else:
        shutil.rmtree(advised_folder(lines[0]))
        done = torchrun(overrides, tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        assert json.loads((run_dir / "meta.json").read_text())["world_size"] == 2


# -- one atomic writer ------------------------------------------------------------------------


def test_every_file_a_run_finishes_with_is_fsynced_with_its_folder(compose, data_root, tmp_path, monkeypatch):
    synced: list[str] = []
    fsync = os.fsync

    def recording(descriptor):
        synced.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        fsync(descriptor)

    monkeypatch.setattr(os, "fsync", recording)
    outcome = execute(compose("train.epochs=1", f"data.root={data_root}", f"output.root={tmp_path}"))
    run_dir = str(outcome.path)
    for name in (FINAL_MODEL_FILE, "meta.json", "COMPLETE"):
        assert f"{run_dir}/.{name}.tmp" in synced, name
        last_write = max(i for i, path in enumerate(synced) if path == f"{run_dir}/.{name}.tmp")
        assert run_dir in synced[last_write:], f"{name}: its folder is not fsynced after the rename"


@pytest.mark.parametrize("writer", ["meta.json", "checkpoint"])
def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, monkeypatch, writer):
    from experiments.results import RunDirectory

    if writer == "meta.json":
        target, write = tmp_path / "meta.json", lambda value: RunDirectory(tmp_path).write_meta({"value": value})
    else:
        target = checkpoint.checkpoint_path(tmp_path, 1)
        write = lambda value: checkpoint.save(target, {"value": torch.tensor(value)})  # noqa: E731
    write(1)
    before = target.read_bytes()

    def disk_full(descriptor):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError):
        write(2)
    assert target.read_bytes() == before and [p.name for p in target.parent.iterdir()] == [target.name]


def test_checkpoints_have_crcs_even_where_torch_was_told_to_skip_them(tmp_path):
    if not hasattr(torch.serialization, "set_crc32_options"):
        pytest.skip("this torch always writes CRCs")
    torch.serialization.set_crc32_options(False)
    try:
        checkpoint.save(tmp_path / "step-000000001.pt", {"state": {"w": torch.arange(10.0)}})
    finally:
        torch.serialization.set_crc32_options(True)
    path = tmp_path / "step-000000001.pt"
    assert checkpoint.verify(path) is None
    flip_first_tensor(path)
    assert "CRC" in checkpoint.verify(path)


def test_a_checkpoint_written_before_verification_existed_is_verified_alike(tmp_path):
    """The harness before this check wrote checkpoints with a plain torch.save: the same zip
    records with the same CRCs, so they are verified, not trusted blindly."""
    path = checkpoint.checkpoint_path(tmp_path, 7)
    path.parent.mkdir()
    torch.save({"format": checkpoint.FORMAT, "config_id": "x", "state": {"w": torch.arange(100.0)}}, path)
    assert checkpoint.verify(path) is None
    assert checkpoint.resume(tmp_path, expected={"config_id": "x"})[0]["state"]["w"].sum() == 4950
    flip_first_tensor(path)
    with pytest.raises(CheckpointError, match="no intact checkpoint to resume from .*CRC"):
        checkpoint.resume(tmp_path, expected={"config_id": "x"})
