"""slurm/seed_array.sbatch on the real single-node Slurm (``bash .ci/slurm start``):
elements that are signalled (by hand or by their time limit) checkpoint, requeue
themselves and end COMPLETED with the metrics of an uninterrupted run; a plain ``sbatch``
of the script works from any folder; ``experiments.status`` counts a partially finished
array, and ``RESUBMIT=1`` submits only the seeds it lists."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import REPO_ROOT, lines_of
from slurm_cluster import slurm  # noqa: F401  (the fixture)
from test_batch_scripts import PYTHON, array_states, script_env, submit_script

SCRIPT = str(REPO_ROOT / "slurm" / "seed_array.sbatch")
#: One variant (method=none replaces the preset's sweep) at a tiny budget.
TINY = "method=none train.eval_every=20"


def logs_of(folder: Path) -> str:
    return "\n".join(path.read_text(errors="replace") for path in sorted(folder.glob("*.out")))


def status(preset: str, *overrides: str, flag: str = "--json") -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "experiments.status", preset, *overrides, flag], cwd=REPO_ROOT,
                          env=script_env(), capture_output=True, text=True, timeout=120)


@pytest.mark.slurm
def test_plain_sbatch_from_another_folder_finds_the_repository(tmp_path, slurm):  # noqa: F811
    root, logs = tmp_path / "runs", tmp_path / "logs"
    logs.mkdir()
    job = slurm.submit(Path(SCRIPT), cwd=tmp_path, env=script_env(
        PRESET="fig2", OVERRIDES=f"{TINY} train.iterations=20 output.root={root}", LOG_DIR=str(logs)),
        extra_args=("--array=0", "--time=5", "--job-name=h6-anywhere", f"--output={logs}/%x-%A_%a.out"))
    slurm.wait(job, timeout=180)
    assert array_states(job) == ["COMPLETED"], logs_of(logs)[-3000:]
    (meta,) = root.rglob("meta.json")
    assert json.loads(meta.read_text())["status"] == "complete"


def reference_runs(tmp_path: Path, seeds: str, overrides: str) -> Path:
    """The same multirun as an element's, uninterrupted, on this machine."""
    reference = tmp_path / "reference"
    subprocess.run([PYTHON, "-m", "experiments.run", "-m", "+paper=fig2", f"seed={seeds}", "hydra/launcher=local",
                    "hydra.launcher.n_jobs=1", f"hydra.sweep.dir={tmp_path / 'sweep'}", *overrides.split(),
                    f"output.root={reference}"], cwd=REPO_ROOT, env=script_env(OMP_NUM_THREADS="1"),
                   check=True, capture_output=True, timeout=900)
    return reference


def assert_resumed_to_reference(root: Path, reference: Path, seeds: list[int], rows: int) -> None:
    for seed in seeds:
        (path,) = [p for p in root.rglob(f"seed={seed}") if p.is_dir()]
        (ref,) = [p for p in reference.rglob(f"seed={seed}") if p.is_dir()]
        meta = json.loads((path / "meta.json").read_text())
        assert meta["status"] == "complete" and meta.get("resumed"), (seed, meta.get("resumed"))
        left, right = pd.read_csv(ref / "metrics.csv"), pd.read_csv(path / "metrics.csv")
        assert len(left) == rows
        pd.testing.assert_frame_equal(left.drop(columns=["wall_time"]), right.drop(columns=["wall_time"]), check_exact=True)


@pytest.mark.slurm
def test_usr1_to_an_element_requeues_it_to_the_uninterrupted_metrics(tmp_path, slurm):  # noqa: F811
    overrides = f"{TINY} train.iterations=200"
    root, logs = tmp_path / "runs", tmp_path / "logs"
    job = submit_script(slurm, "slurm/seed_array.sbatch", PRESET="fig2", SEEDS="0", CPUS_PER_TASK="1", TIME="5",
                        JOB_NAME="h6-usr1", LOG_DIR=str(logs), OVERRIDES=f"{overrides} output.root={root}")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        files = list(root.rglob("metrics.csv"))
        if files and lines_of(files[0]) >= 3:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"the element wrote no metrics in 120 s: {logs_of(logs)[-3000:]}")
    # No srun step: the signal must go to the batch shell (--batch), which passes it on.
    subprocess.run(["scancel", "--batch", "--signal=USR1", f"{job}_0"], check=True, env=script_env())
    reference = reference_runs(tmp_path, "0", overrides)
    slurm.wait(job, timeout=300)
    log = logs_of(logs)
    assert array_states(job) == ["COMPLETED"], log[-4000:]
    assert "SIGUSR1: passing it to the run" in log and "the run exited 75" in log and "requeueing element" in log, log[-4000:]
    assert_resumed_to_reference(root, reference, [0], rows=11)


@pytest.mark.slurm
def test_a_one_minute_limit_requeues_elements_until_they_complete(tmp_path, slurm):  # noqa: F811
    # Long enough that no machine finishes within the first ~30 s of training (so the element
    # must requeue and resume), with requeues enough for a slow or loaded one.
    overrides = f"{TINY} train.iterations=6000"
    root, logs = tmp_path / "runs", tmp_path / "logs"
    # The warning 30 s before a 1-minute limit (Slurm may send it up to a minute early:
    # also before Python has started, which the batch shell turns into a requeue too).
    job = submit_script(slurm, "slurm/seed_array.sbatch", PRESET="fig2", SEEDS="0-1", CPUS_PER_TASK="1", TIME="1",
                        SIGNAL_SECONDS="30", MAX_REQUEUES="30", JOB_NAME="h6-limit", LOG_DIR=str(logs),
                        OVERRIDES=f"{overrides} output.root={root}")
    reference = reference_runs(tmp_path, "0,1", overrides)
    slurm.wait(job, timeout=1800)
    log = logs_of(logs)
    assert array_states(job) == ["COMPLETED"] * 2, log[-4000:]
    assert_resumed_to_reference(root, reference, [0, 1], rows=301)


@pytest.mark.slurm
def test_status_counts_a_partial_array_and_resubmit_runs_only_the_missing_seeds(tmp_path, slurm):  # noqa: F811
    overrides = [*TINY.split(), "train.iterations=20", f"output.root={tmp_path / 'runs'}"]
    logs = tmp_path / "logs"
    common = dict(PRESET="fig2", CPUS_PER_TASK="1", TIME="5", LOG_DIR=str(logs), OVERRIDES=" ".join(overrides))
    job = submit_script(slurm, "slurm/seed_array.sbatch", SEEDS="0-3", JOB_NAME="h6-partial", **common)
    subprocess.run(["scancel", f"{job}_2", f"{job}_3"], check=True, env=script_env())  # two elements killed
    slurm.wait(job, timeout=180)
    time.sleep(1)
    states = json.loads(status("fig2", "seed=0,1,2,3", *overrides).stdout)[0]
    by_seed = {run["seed"]: run["state"] for run in states["runs"]}
    assert by_seed[0] == by_seed[1] == "complete", states
    assert by_seed[2] in ("missing", "lost") and by_seed[3] in ("missing", "lost"), states
    assert states["rerun_seeds"] == [2, 3] and not states["complete"]
    assert status("fig2", "seed=0,1,2,3", *overrides, flag="--missing").returncode == 1
    finished = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("COMPLETE")}
    assert len(finished) == 2

    # RESUBMIT=1 asks experiments.status with the same preset and overrides; a seed= among
    # them narrows the preset's 20 seeds to these 4 (the elements run their own seed only).
    common["OVERRIDES"] += " seed=0,1,2,3"
    result = subprocess.run(["bash", SCRIPT], env=script_env(RESUBMIT="1", JOB_NAME="h6-resubmit", **common),
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    assert "resubmitting seeds 2-3 of fig2" in result.stderr
    again = result.stdout.strip().split(";")[0]
    slurm.jobs.append(again)
    slurm.wait(again, timeout=180)
    assert array_states(again) == ["COMPLETED"] * 2, logs_of(logs)[-3000:]
    assert sorted(p.read_text().split("element ")[1].split()[0] for p in logs.glob(f"h6-resubmit-{again}_*.out")) == ["2", "3"]
    assert status("fig2", "seed=0,1,2,3", *overrides, flag="--missing").returncode == 0
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in finished.items())  # seeds 0-1 untouched


@pytest.mark.slurm
def test_ddp_rank_killed_by_an_early_usr1_is_requeued_not_failed(tmp_path, slurm):  # noqa: F811
    # A stand-in for Python whose first attempt dies of USR1 as a rank does when the warning
    # arrives before its handler exists (srun then exits 138); the requeued attempt succeeds.
    python = tmp_path / "python"
    python.write_text(f"""#!/bin/bash
[[ "$1 $2" == "-m experiments.site" ]] && exec {PYTHON} "$@"
echo "attempt ${{SLURM_RESTART_COUNT:-0}}"
[[ "${{SLURM_RESTART_COUNT:-0}}" == 0 ]] && kill -USR1 $$
exit 0
""")
    python.chmod(0o755)
    logs = tmp_path / "logs"
    job = submit_script(slurm, "slurm/ddp.sbatch", GPUS_PER_NODE="0", CPUS_PER_TASK="1", TIME="5", JOB_NAME="h6-early",
                        LOG_DIR=str(logs), PYTHON=str(python))
    end = slurm.wait(job, timeout=240)
    log = logs_of(logs)
    assert (end.state, end.exit_code) == ("COMPLETED", 0), log
    assert "killed by USR1 while it started" in log and "attempt 1" in log, log


@pytest.mark.slurm
def test_element_signalled_before_python_handles_signals_is_requeued(tmp_path, slurm):  # noqa: F811
    # A stand-in for Python that has no handler yet (as while Python starts): the warning the
    # batch shell passes on kills it (128 + USR1); the element requeues instead of FAILED.
    python = tmp_path / "python"
    python.write_text(f"""#!/bin/bash
[[ "$1 $2" == "-m experiments.site" ]] && exec {PYTHON} "$@"
echo "attempt ${{SLURM_RESTART_COUNT:-0}}"
[[ "${{SLURM_RESTART_COUNT:-0}}" == 0 ]] && {{ touch {tmp_path / 'started'}; sleep 60; }}
exit 0
""")
    python.chmod(0o755)
    logs = tmp_path / "logs"
    job = submit_script(slurm, "slurm/seed_array.sbatch", SEEDS="0", CPUS_PER_TASK="1", TIME="5", JOB_NAME="h6-early-element",
                        LOG_DIR=str(logs), PYTHON=str(python))
    deadline = time.monotonic() + 120
    while not (tmp_path / "started").exists():
        assert time.monotonic() < deadline, logs_of(logs)
        time.sleep(0.2)
    subprocess.run(["scancel", "--batch", "--signal=USR1", f"{job}_0"], check=True, env=script_env())
    slurm.wait(job, timeout=240)
    log = logs_of(logs)
    assert array_states(job) == ["COMPLETED"], log
    assert "the run exited 138 (this shell got SIGUSR1)" in log and "requeueing element" in log and "attempt 1" in log, log
