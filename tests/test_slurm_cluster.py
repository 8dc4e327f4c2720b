"""The single-node Slurm of ``.ci/slurm`` runs real jobs: an srun step of two ranks, a failing
job's exit code, and a signal sent with scancel reaching the batch script's Python process."""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

import pytest

from slurm_cluster import slurm  # noqa: F401  (the fixture)

pytestmark = pytest.mark.slurm

PYTHON = sys.executable  # the venv's python: the job inherits nothing else of this process


def _log_args(tmp_path: Path) -> tuple[str, ...]:
    return ("-o", str(tmp_path / "slurm-%j.out"))


def _log(tmp_path: Path, job_id: str) -> str:
    path = tmp_path / f"slurm-{job_id}.out"
    return path.read_text() if path.exists() else "(no log)"


def _wait_for(path: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


RANK_SCRIPT = """\
import json, os, pathlib
keys = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_ID", "PMIX_RANK")
out = pathlib.Path(os.environ["AADL_RANK_DIR"]) / f"rank{os.environ['SLURM_PROCID']}.json"
out.write_text(json.dumps({key: os.environ.get(key) for key in keys}))
"""


def test_srun_pmix_step_runs_two_ranks(slurm, tmp_path):  # noqa: F811
    (tmp_path / "rank.py").write_text(RANK_SCRIPT)
    script = f"""#!/bin/bash
#SBATCH -n 2
#SBATCH -t 5
srun --mpi=pmix -n 2 {shlex.quote(PYTHON)} {shlex.quote(str(tmp_path / "rank.py"))}
"""
    job_id = slurm.submit(script, env={"AADL_RANK_DIR": str(tmp_path)}, cwd=tmp_path,
                          extra_args=_log_args(tmp_path))
    end = slurm.wait(job_id, timeout=60)
    assert (end.state, end.exit_code, end.signal) == ("COMPLETED", 0, 0), _log(tmp_path, job_id)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [rank["SLURM_PROCID"] for rank in ranks] == ["0", "1"]
    assert [rank["SLURM_NTASKS"] for rank in ranks] == ["2", "2"]
    assert sorted(rank["SLURM_LOCALID"] for rank in ranks) == ["0", "1"]  # one node: local = global
    assert {rank["SLURM_JOB_ID"] for rank in ranks} == {job_id}
    assert end.info["NumTasks"] == "2"


def test_failing_job_reports_exit_code(slurm, tmp_path):  # noqa: F811
    job_id = slurm.submit("#!/bin/bash\necho failing on purpose\nexit 3\n", cwd=tmp_path,
                          extra_args=_log_args(tmp_path))
    end = slurm.wait(job_id, timeout=60)
    assert (end.state, end.exit_code, end.signal) == ("FAILED", 3, 0), _log(tmp_path, job_id)
    assert end.info["ExitCode"] == "3:0"
    assert slurm.job_info(job_id)["JobState"] == "FAILED"
    assert "failing on purpose" in _log(tmp_path, job_id)


SIGNAL_PROGRAM = """\
import os, pathlib, signal, sys, time
out = pathlib.Path(sys.argv[1])
def on_usr1(signum, frame):
    (out / "usr1").write_text(str(os.getpid()))
    sys.exit(0)
signal.signal(signal.SIGUSR1, on_usr1)
(out / "ready").write_text(str(os.getpid()))
for _ in range(600):
    time.sleep(0.1)
sys.exit(5)
"""


def test_scancel_signal_reaches_exec_python(slurm, tmp_path):  # noqa: F811
    script = f"""#!/bin/bash
#SBATCH -t 5
exec {shlex.quote(PYTHON)} -c {shlex.quote(SIGNAL_PROGRAM)} {shlex.quote(str(tmp_path))}
"""
    job_id = slurm.submit(script, cwd=tmp_path, extra_args=_log_args(tmp_path))
    assert _wait_for(tmp_path / "ready", 45), f"job {job_id} never started: {slurm.job_info(job_id)}"
    assert slurm.job_info(job_id)["JobState"] == "RUNNING"
    slurm.cancel(job_id, "USR1")  # scancel --signal=USR1 --full: the batch script's processes too
    end = slurm.wait(job_id, timeout=30)
    assert (end.state, end.exit_code) == ("COMPLETED", 0), _log(tmp_path, job_id)
    # The handler ran in the very process that started (exec: no shell in between).
    assert (tmp_path / "usr1").read_text() == (tmp_path / "ready").read_text()
