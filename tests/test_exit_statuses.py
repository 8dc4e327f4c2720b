"""Preempted means exit status 75 for every way a run is started (experiments/stopping.py):
a signal while Python starts, a seed group, a batched multirun worker, one signalled
worker of a sweep, torchrun through python -m experiments.torchrun (and its ranks ending
when the agent is killed), mpirun, the wrapper in an srun step of the real Slurm, and a
multirun under several ranks refused in one line. Real processes: python -m
experiments.run, Hydra's joblib workers, torchrun and mpirun with gloo, sbatch/srun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import REPO_ROOT, lines_of
from experiments.stopping import PREEMPTED_EXIT
from experiments.torchrun import job_status
from slurm_cluster import slurm  # noqa: F401  (the fixture)

ENV = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "CI": "1"}
LONG = ("train.epochs=100000",)


def _start(*arguments: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", *arguments], cwd=REPO_ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _catches(pid: int, sig: int) -> bool:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    except OSError:
        pass
    return False


def _wait_for_runs(root: Path, count: int, timeout: float = 90) -> list[Path]:
    """The ``count`` metrics.csv files under ``root`` once each has rows."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        files = sorted(root.rglob("metrics.csv")) if root.exists() else []
        if len(files) >= count and all(lines_of(f) >= 3 for f in files[:count]):
            return files
        time.sleep(0.1)
    raise AssertionError(f"no {count} run(s) with rows under {root}")


def _status(run: Path) -> str:
    return json.loads((run / "meta.json").read_text())["status"]


@pytest.fixture
def end_all():
    """Kills whatever a test started and left running (its processes, by id)."""
    started: list[psutil.Process] = []
    yield started.append
    for process in started:
        try:
            family = [process, *process.children(recursive=True)]
        except psutil.Error:
            continue
        for member in family:
            try:
                member.kill()
            except psutil.Error:
                pass


def test_a_signal_while_python_starts_ends_as_a_preemption_with_nothing_written(data_root, tmp_path, end_all):
    runs = tmp_path / "runs"
    process = _start("experiments.run", *LONG, f"output.root={runs}", f"hydra.run.dir={tmp_path / 'h'}")
    end_all(psutil.Process(process.pid))  # a failed assertion must not leave a 100,000-epoch run behind
    deadline = time.monotonic() + 30
    while not _catches(process.pid, signal.SIGUSR1) and time.monotonic() < deadline:
        time.sleep(0.005)
    assert not runs.exists(), "the handler came only once the run had started"
    process.send_signal(signal.SIGUSR1)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == PREEMPTED_EXIT, stderr[-3000:]
    assert "preempted by SIGUSR1 before the run started" in stderr and "Traceback" not in stderr
    assert not runs.exists()


def test_a_preempted_seed_group_exits_75_and_records_every_seed(data_root, tmp_path, end_all):
    runs = tmp_path / "runs"
    process = _start("experiments.run", "train.seed_group=[0,1]", *LONG, f"output.root={runs}", f"hydra.run.dir={tmp_path / 'h'}")
    end_all(psutil.Process(process.pid))
    _wait_for_runs(runs, 2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == PREEMPTED_EXIT, stderr[-3000:]
    assert "Traceback" not in stderr and "preempted by SIGTERM" in stderr
    members = sorted(runs.rglob("seed=*"))
    assert [m.name for m in members] == ["seed=0", "seed=1"]
    assert all(_status(m) == "preempted" for m in members)
    assert list(runs.rglob(".seed-groups/*/checkpoints/step-*.pt"))


def _worker_running_a_job(parent: subprocess.Popen) -> list[psutil.Process]:
    return [c for c in psutil.Process(parent.pid).children(recursive=True) if _catches(c.pid, signal.SIGUSR1)]


@pytest.mark.parametrize(
    "sweep, runs_expected",
    [(("method=aadl_ma", "seed=0,1"), 2), (("seed=0,1", "train.batch_seeds=2"), 2)],
    ids=["one-run-per-worker", "seed-group-worker"],
)
def test_usr1_to_one_worker_stops_the_sweep_every_run_checkpoints_and_the_sweep_exits_75(data_root, tmp_path, sweep, runs_expected, end_all):
    runs = tmp_path / "runs"
    process = _start("experiments.run", "-m", *sweep, *LONG, f"output.root={runs}", f"hydra.sweep.dir={tmp_path / 'h'}")
    end_all(psutil.Process(process.pid))
    _wait_for_runs(runs, runs_expected)
    workers = _worker_running_a_job(process)
    assert workers
    everyone = psutil.Process(process.pid).children(recursive=True)
    workers[0].send_signal(signal.SIGUSR1)  # a scheduler that signals one process of the job
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == PREEMPTED_EXIT, stderr[-3000:]
    assert "Traceback" not in stderr and "TerminatedWorkerError" not in stderr, stderr[-3000:]
    assert "sweep stopped by SIGUSR1" in stderr
    members = sorted(runs.rglob("seed=*"))
    assert len(members) == runs_expected
    for member in members:
        assert _status(member) == "preempted", member
    checkpoints = list(runs.rglob("step-*.pt"))
    assert checkpoints and (len(checkpoints) >= runs_expected or ".seed-groups" in str(checkpoints[0]))
    _, alive = psutil.wait_procs(everyone, timeout=30)
    assert not alive, f"workers outlived the sweep: {alive}"


@pytest.mark.slow  # the whole-family test below covers a jobless worker in the default run
def test_usr1_to_an_idle_worker_stops_the_sweep_too(data_root, tmp_path, end_all):
    runs = tmp_path / "runs"
    process = _start("experiments.run", "-m", "train.epochs=1,100000", f"output.root={runs}", f"hydra.sweep.dir={tmp_path / 'h'}")
    end_all(psutil.Process(process.pid))
    deadline = time.monotonic() + 120
    busy: list[Path] = []
    while time.monotonic() < deadline:
        done = list(runs.rglob("COMPLETE")) if runs.exists() else []
        busy = [log for log in runs.rglob("run.log") if not (log.parent / "COMPLETE").exists()] if done else []
        if busy:
            break
        time.sleep(0.1)
    (busy_log,) = busy
    _wait_for_runs(busy_log.parent, 1)

    workers = _worker_running_a_job(process)
    assert len(workers) == 2, workers
    time.sleep(3)  # the finished job's worker writes its results and returns them
    before = [sum(w.cpu_times()[:2]) for w in workers]
    time.sleep(3)
    spent = [sum(w.cpu_times()[:2]) - b for w, b in zip(workers, before)]
    idle = [workers[spent.index(min(spent))]]
    assert min(spent) < max(spent) / 3, spent  # one trains, the other waits for a job
    idle[0].send_signal(signal.SIGUSR1)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == PREEMPTED_EXIT, stderr[-3000:]
    assert _status(busy_log.parent) == "preempted" and "Traceback" not in stderr


def test_a_signal_to_every_process_of_a_sweep_at_once_stops_it_cleanly(data_root, tmp_path, end_all):
    """What a scheduler's signal to a whole job step does: the parent, the worker running the
    one job and the worker that never got a job (joblib starts one per core) all get it."""
    runs = tmp_path / "runs"
    process = _start("experiments.run", "-m", "seed=0", *LONG, f"output.root={runs}", f"hydra.sweep.dir={tmp_path / 'h'}")
    end_all(psutil.Process(process.pid))
    (metrics,) = _wait_for_runs(runs, 1)
    family = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    for member in family:
        member.send_signal(signal.SIGUSR1)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == PREEMPTED_EXIT, stderr[-3000:]
    assert "Traceback" not in stderr and "TerminatedWorkerError" not in stderr, stderr[-3000:]
    assert _status(metrics.parent) == "preempted"
    _, alive = psutil.wait_procs(family[1:], timeout=30)
    assert not alive, f"workers outlived the sweep: {alive}"


def test_a_multirun_under_several_ranks_is_refused_in_one_line(data_root, tmp_path):
    env = {**ENV, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "experiments.run", "-m", "seed=0,1", "train.epochs=1", f"output.root={tmp_path / 'runs'}",
         f"hydra.sweep.dir={tmp_path / 'h'}"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("error: a multirun (-m) cannot run on 2 ranks (torchrun, rank 0)"), done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "torchrun, ranks, expected",
    [(0, [0, 0], 0), (1, [75, 75], 75), (-9, [75, 75], 75), (1, [75, None], 1), (1, [75, 1], 1), (1, [], 1), (-10, [], 138)],
)
def test_the_torchrun_wrapper_exits_75_only_when_every_rank_was_preempted(torchrun, ranks, expected):
    assert job_status(torchrun, ranks) == expected


# -- real torchrun ---------------------------------------------------------------------------

TWO_RANKS = ("--standalone", "--nproc-per-node=2", "-m", "experiments.run", "problem.batch_size=200", "method=aadl_ma", *LONG)


@pytest.mark.distributed
def test_usr1_to_the_torchrun_wrapper_checkpoints_both_ranks_and_exits_75(data_root, tmp_path, end_all):
    root = tmp_path / "runs"
    process = _start("experiments.torchrun", *TWO_RANKS, f"output.root={root}", f"hydra.run.dir={root / 'h'}")
    end_all(psutil.Process(process.pid))
    (metrics,) = _wait_for_runs(root, 1, timeout=120)
    process.send_signal(signal.SIGUSR1)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == PREEMPTED_EXIT, stderr[-3000:]
    run = metrics.parent
    assert _status(run) == "preempted"
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert any("rank0" in n for n in names) and any("rank1" in n for n in names), names


@pytest.mark.distributed
def test_kill_9_of_torchrun_alone_ends_its_ranks_as_preempted(data_root, tmp_path, end_all):
    root = tmp_path / "runs"
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "torchrun"), *TWO_RANKS, f"output.root={root}", f"hydra.run.dir={root / 'h'}"],
        cwd=REPO_ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    agent = psutil.Process(process.pid)
    end_all(agent)
    (metrics,) = _wait_for_runs(root, 1, timeout=120)
    ranks = agent.children(recursive=True)
    for rank in ranks:
        end_all(rank)
    agent.kill()
    process.wait()
    _, alive = psutil.wait_procs(ranks, timeout=60)
    assert not alive, "the ranks trained on after their agent was killed"
    run = metrics.parent
    assert _status(run) == "preempted"
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert any("rank0" in n for n in names) and any("rank1" in n for n in names), names


@pytest.mark.slow  # the same refusal as the test above with torchrun's variables, through torchrun itself
@pytest.mark.distributed
def test_a_multirun_under_torchrun_is_refused_and_runs_nothing(data_root, tmp_path):
    done = subprocess.run(
        [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node=2", "-m", "experiments.run", "-m",
         "seed=0,1", "train.epochs=1", f"output.root={tmp_path / 'runs'}", f"hydra.sweep.dir={tmp_path / 'h'}"],
        cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=180,
    )
    assert done.returncode != 0
    assert "error: a multirun (-m) cannot run on 2 ranks (torchrun" in done.stderr, done.stderr[-3000:]
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow  # docs/distributed.md's mpirun row
@pytest.mark.distributed
def test_usr1_to_mpirun_checkpoints_both_ranks_and_mpirun_exits_75(data_root, tmp_path, end_all):
    import shutil

    mpirun = shutil.which("mpirun")
    if mpirun is None:
        pytest.fail("mpirun is not installed: run .ci/system-packages (Debian's Open MPI)")
    root = tmp_path / "runs"
    process = subprocess.Popen(
        [mpirun, "--allow-run-as-root", "--oversubscribe", "-np", "2", sys.executable, "-m", "experiments.run", *TWO_RANKS[4:],
         f"output.root={root}", f"hydra.run.dir={root / 'h'}"],
        cwd=REPO_ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    end_all(psutil.Process(process.pid))
    (metrics,) = _wait_for_runs(root, 1, timeout=120)
    process.send_signal(signal.SIGUSR1)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == PREEMPTED_EXIT, stderr[-3000:]
    assert _status(metrics.parent) == "preempted"


@pytest.mark.slow  # docs/distributed.md's srun + wrapper command
@pytest.mark.slurm
@pytest.mark.distributed
def test_the_torchrun_wrapper_in_an_srun_step_ends_the_job_75_on_scancel_usr1(data_root, tmp_path, slurm):  # noqa: F811
    import shlex

    root = tmp_path / "runs"
    arguments = " ".join(shlex.quote(a) for a in (*TWO_RANKS, f"output.root={root}", f"hydra.run.dir={root / 'h'}"))
    script = f"""#!/bin/bash
#SBATCH -n 1
#SBATCH -c 2
#SBATCH -t 5
cd {shlex.quote(str(REPO_ROOT))}
export OMP_NUM_THREADS=1 CI=1 GLOO_SOCKET_IFNAME=lo
trap 'echo batch shell got USR1' USR1
rc=0
srun -n 1 -c 2 {shlex.quote(sys.executable)} -m experiments.torchrun {arguments} || rc=$?
echo "srun exited $rc"
exit $rc
"""
    job = slurm.submit(script, cwd=tmp_path, extra_args=("-o", str(tmp_path / "job.out")))
    (metrics,) = _wait_for_runs(root, 1, timeout=180)
    slurm.cancel(job, "USR1")
    end = slurm.wait(job, timeout=180)
    log = (tmp_path / "job.out").read_text()
    assert end.exit_code == PREEMPTED_EXIT and "srun exited 75" in log, log[-3000:]
    assert _status(metrics.parent) == "preempted"
    names = sorted(p.name for p in (metrics.parent / "checkpoints").iterdir())
    assert any("rank0" in n for n in names) and any("rank1" in n for n in names), names
