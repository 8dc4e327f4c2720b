"""Every experiment under real launchers: the same ``python -m experiments.run`` started
by torchrun or mpirun on 2 gloo ranks trains what 1 process trains (to 1e-6), with both
AADL layouts; only rank 0 writes the run directory, which records the ranks; a 2-rank run
stopped by a signal checkpoints every rank and resumes bit for bit."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import REPO_ROOT, lines_of
from experiments.run import PREEMPTED_EXIT, execute
from slurm_cluster import slurm  # noqa: F401  (the fixture)

pytestmark = pytest.mark.distributed

VENV_BIN = Path(sys.executable).parent
GRADUATE_FULL_BATCH = ("problem.batch_size=400", "train.epochs=6")
BURGERS = ("experiment=burgers2d", "train.iterations=12", "train.eval_every=3", "method.aadl.frequency=2", "method.aadl.store_every=1")


def launcher_command(launcher: str) -> list[str]:
    if launcher == "torchrun":
        return [str(VENV_BIN / "torchrun"), "--standalone", "--nproc-per-node=2", "-m", "experiments.run"]
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        pytest.fail("mpirun is not installed: run .ci/system-packages (Debian's Open MPI)")
    return [mpirun, "--allow-run-as-root", "--oversubscribe", "-np", "2", sys.executable, "-m", "experiments.run"]


def launch(launcher: str, overrides, root: Path, **popen) -> subprocess.CompletedProcess:
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "CI": "1"}
    command = [*launcher_command(launcher), *overrides, f"output.root={root}", f"hydra.run.dir={root / 'hydra'}"]
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


def wait_for_lines(root: Path, lines: int, timeout: float = 120) -> None:
    """Wait until the run's metrics.csv under ``root`` has ``lines`` lines (header included),
    or ``timeout`` seconds; the caller then checks what the run did."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        files = list(root.rglob("metrics.csv"))
        if files and lines_of(files[0]) >= lines:
            return
        time.sleep(0.05)


def single(compose, overrides, root: Path) -> Path:
    return execute(compose(*overrides, f"output.root={root}", "train.threads=1")).path


@pytest.mark.parametrize(
    "launcher, problem, layout",
    [
        ("torchrun", GRADUATE_FULL_BATCH, "replicated"),
        ("torchrun", GRADUATE_FULL_BATCH, "sharded"),
        ("torchrun", BURGERS, "replicated"),
        ("mpirun", GRADUATE_FULL_BATCH, "sharded"),
        ("mpirun", BURGERS, "sharded"),
    ],
    ids=["torchrun-graduate-replicated", "torchrun-graduate-sharded", "torchrun-burgers-replicated",
         "mpirun-graduate-sharded", "mpirun-burgers-sharded"],
)
def test_two_ranks_train_what_one_process_trains(compose, tmp_path, launcher, problem, layout):
    overrides = ("method=aadl_ma", f"method.aadl.distributed={layout}", *problem)
    reference = single(compose, overrides, tmp_path / "one")
    done = launch(launcher, overrides, tmp_path / "two")
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    (path,) = list((tmp_path / "two").rglob("seed=0"))
    assert path.relative_to(tmp_path / "two") == reference.relative_to(tmp_path / "one")  # same identity
    one, two = pd.read_csv(reference / "metrics.csv"), pd.read_csv(path / "metrics.csv")
    assert len(one) == len(two)
    for column in ("train_loss", "val_loss"):
        np.testing.assert_allclose(two[column], one[column], rtol=1e-6, atol=1e-9, equal_nan=True)
    assert (two[["aa_attempts", "aa_accepted", "averages_applied"]] == one[["aa_attempts", "aa_accepted", "averages_applied"]]).all().all()
    meta = json.loads((path / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["backend"] == "gloo" and len(meta["hosts"]) == 2
    assert meta["launcher"] == ("torchrun" if launcher == "torchrun" else "openmpi")
    assert not list(path.glob("*rank1*")) and not (path / "checkpoints").exists()


def test_a_signal_to_two_ranks_checkpoints_both_and_the_rerun_resumes_bit_for_bit(compose, tmp_path):
    overrides = ("method=aadl_ma", "method.aadl.distributed=sharded", "problem.batch_size=200", "train.epochs=40")
    reference_root = tmp_path / "reference"
    done = launch("torchrun", overrides, reference_root)
    assert done.returncode == 0, done.stderr[-3000:]

    root = tmp_path / "stopped"
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "CI": "1"}
    command = [*launcher_command("torchrun"), *overrides, f"output.root={root}", f"hydra.run.dir={root / 'h'}"]
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_lines(root, 6)
    process.send_signal(signal.SIGTERM)  # torchrun passes it to both ranks
    _, stderr = process.communicate(timeout=120)
    (path,) = list(root.rglob("seed=0"))
    meta = json.loads((path / "meta.json").read_text())
    if meta["status"] == "complete":
        pytest.skip("the run finished before the signal arrived")
    assert meta["status"] == "preempted", stderr[-3000:]
    names = sorted(p.name for p in (path / "checkpoints").iterdir())
    assert any("rank0" in n for n in names) and any("rank1" in n for n in names)
    done = launch("torchrun", overrides, root)
    assert done.returncode == 0, done.stderr[-3000:]
    (reference,) = list(reference_root.rglob("seed=0"))
    left, right = pd.read_csv(reference / "metrics.csv"), pd.read_csv(path / "metrics.csv")
    pd.testing.assert_frame_equal(left.drop(columns="wall_time"), right.drop(columns="wall_time"), check_exact=True)


def test_kill_9_of_two_ranks_then_rerun_is_bit_identical(tmp_path):
    overrides = ("method=aadl_ma", "method.aadl.distributed=sharded", "problem.batch_size=200", "train.epochs=30", "checkpoint.every=2")
    reference_root = tmp_path / "reference"
    assert launch("torchrun", overrides, reference_root).returncode == 0
    root = tmp_path / "killed"
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "CI": "1"}
    command = [*launcher_command("torchrun"), *overrides, f"output.root={root}", f"hydra.run.dir={root / 'h'}"]
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_lines(root, 10)
    import psutil

    # The launcher and both ranks at once (torchrun starts its workers in sessions of their own).
    family = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    for member in family:
        member.send_signal(signal.SIGKILL)
    psutil.wait_procs(family, timeout=30)
    process.wait()
    (path,) = list(root.rglob("seed=0"))
    if (path / "COMPLETE").exists():
        pytest.skip("the run finished before the kill")
    done = launch("torchrun", overrides, root)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((path / "meta.json").read_text()).get("resumed")
    (reference,) = list(reference_root.rglob("seed=0"))
    left, right = pd.read_csv(reference / "metrics.csv"), pd.read_csv(path / "metrics.csv")
    pd.testing.assert_frame_equal(left.drop(columns="wall_time"), right.drop(columns="wall_time"), check_exact=True)


@pytest.mark.slurm
def test_srun_inside_sbatch_trains_what_one_process_trains(compose, tmp_path, slurm):  # noqa: F811
    """Two srun tasks of a real Slurm job (``srun --mpi=pmix``: no OMPI_* variables) are one run."""
    import shlex

    overrides = ("method=aadl_ma", "method.aadl.distributed=sharded", *GRADUATE_FULL_BATCH)
    reference = single(compose, overrides, tmp_path / "one")
    root = tmp_path / "two"
    arguments = " ".join(shlex.quote(a) for a in (*overrides, f"output.root={root}", f"hydra.run.dir={root / 'h'}"))
    script = f"""#!/bin/bash
#SBATCH -n 2
#SBATCH -t 5
cd {shlex.quote(str(REPO_ROOT))}
export OMP_NUM_THREADS=1 CI=1
srun --mpi=pmix -n 2 {shlex.quote(sys.executable)} -m experiments.run {arguments}
"""
    job = slurm.submit(script, cwd=tmp_path, extra_args=("-o", str(tmp_path / "job.out")))
    end = slurm.wait(job, timeout=240)
    log = (tmp_path / "job.out").read_text() if (tmp_path / "job.out").exists() else ""
    assert (end.state, end.exit_code) == ("COMPLETED", 0), log[-3000:]
    (path,) = list(root.rglob("seed=0"))
    one, two = pd.read_csv(reference / "metrics.csv"), pd.read_csv(path / "metrics.csv")
    np.testing.assert_allclose(two["val_loss"], one["val_loss"], rtol=1e-6)
    meta = json.loads((path / "meta.json").read_text())
    assert (meta["world_size"], meta["launcher"]) == (2, "slurm")


@pytest.mark.slurm
def test_scancel_signal_usr1_checkpoints_the_job_and_marks_it_preempted(tmp_path, slurm):  # noqa: F811
    import shlex

    root = tmp_path / "runs"
    arguments = " ".join(shlex.quote(a) for a in ("method=aadl", "train.epochs=100000", f"output.root={root}", f"hydra.run.dir={root / 'h'}"))
    script = f"""#!/bin/bash
#SBATCH -n 1
#SBATCH -t 5
cd {shlex.quote(str(REPO_ROOT))}
export OMP_NUM_THREADS=1 CI=1
exec {shlex.quote(sys.executable)} -m experiments.run {arguments}
"""
    job = slurm.submit(script, cwd=tmp_path, extra_args=("-o", str(tmp_path / "job.out")))
    wait_for_lines(root, 3)
    slurm.cancel(job, "USR1")
    end = slurm.wait(job, timeout=120)
    assert end.exit_code == PREEMPTED_EXIT, (tmp_path / "job.out").read_text()[-3000:]
    (path,) = list(root.rglob("seed=0"))
    assert json.loads((path / "meta.json").read_text())["status"] == "preempted"
    assert list((path / "checkpoints").glob("step-*.pt"))
    assert "preempted by SIGUSR1" in (tmp_path / "job.out").read_text()


def test_a_checkpoint_of_another_world_size_is_refused_naming_it(compose, tmp_path, monkeypatch):
    """A 1-process checkpoint is not resumed by 2 ranks (the sharded history and the
    per-rank RNGs do not re-shard): the run stops with a message naming world_size."""
    from experiments import run as run_module

    overrides = ("method=aadl_ma", *GRADUATE_FULL_BATCH)
    calls = {"n": 0}
    from contextlib import contextmanager

    @contextmanager
    def stop_at_third_step():
        def should_stop():
            calls["n"] += 1
            return "SIGTERM" if calls["n"] == 3 else None

        yield should_stop

    monkeypatch.setattr(run_module, "stop_on_signals", stop_at_third_step)
    with pytest.raises(run_module.RunPreempted):
        execute(compose(*overrides, f"output.root={tmp_path}"))
    monkeypatch.undo()
    done = launch("torchrun", overrides, tmp_path)
    assert done.returncode == 1
    assert "made for a different run: world_size 1 (this run: 2)" in done.stderr
