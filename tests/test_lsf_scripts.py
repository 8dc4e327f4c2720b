"""lsf/ddp.lsf and lsf/seed_array.lsf against fake bsub/jsrun that record their arguments and
environment (no LSF can be installed here): a resubmitted job computes its own MASTER_ADDR
and stages its data again instead of inheriting the old allocation's; a packed seed array
runs its seeds over the node's resource sets, passes SIGUSR2 (the -W run limit) and USR1 on,
starts no further seed, and resubmits what is left; DRY_RUN prints the staging lines."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from test_batch_scripts import dry_run, script_env

FAKE_BSUB = """#!/bin/bash
# Records one submission: arguments, environment, the script on stdin.
n=$(ls "$FAKE_DIR"/bsub-*.json 2>/dev/null | wc -l)
python3 - "$FAKE_DIR/bsub-$n.json" "$@" <<'PY'
import json, os, sys
json.dump({"args": sys.argv[2:], "env": dict(os.environ)}, open(sys.argv[1], "w"))
PY
cat >"$FAKE_DIR/bsub-$n.stdin"
echo "Job <$((900 + n))> is submitted to queue <batch>."
"""

FAKE_JSRUN = r"""#!/bin/bash
# Records each step (arguments, MASTER_ADDR, AADL_DATA_ROOT). A training step either exits
# $FAKE_RUN_EXIT at once or, with FAKE_RUN_WAIT=1, runs until a signal and exits 75.
n=$(date +%s%N)
printf '%s\n' "MASTER_ADDR=${MASTER_ADDR:-} AADL_DATA_ROOT=${AADL_DATA_ROOT:-} $*" >"$FAKE_DIR/jsrun-$n.txt"
case " $* " in
    *" experiments.run "*) ;;
    *) exit 0 ;;
esac
if [[ "${FAKE_RUN_WAIT:-0}" == 1 ]]; then
    for sig in USR1 USR2 TERM; do trap "echo $sig >>\"\$FAKE_DIR/signals\"; exit 75" "$sig"; done
    sleep 60 >/dev/null 2>&1 &  # must not hold the job's output open once this step ends
    wait
fi
exit "${FAKE_RUN_EXIT:-0}"
"""


@pytest.fixture
def fakes(tmp_path):
    bin_dir, record = tmp_path / "bin", tmp_path / "record"
    bin_dir.mkdir(), record.mkdir()
    for name, text in (("bsub", FAKE_BSUB), ("jsrun", FAKE_JSRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir, record


def submissions(record: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted(record.glob("bsub-*.json"))]


def steps(record: Path) -> list[str]:
    return [path.read_text().strip() for path in sorted(record.glob("jsrun-*.txt"))]


def test_ddp_lsf_resubmission_recomputes_master_addr_and_stages_again(fakes, tmp_path):
    bin_dir, record = fakes
    hosts = tmp_path / "hosts"
    hosts.write_text("batch1\nh41n01\nh41n01\nh41n02\n")
    data, stage = tmp_path / "project-data", tmp_path / "nvme"
    data.mkdir()
    env = script_env(
        PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_DIR=str(record), FAKE_RUN_EXIT="75", LSB_JOBID="501",
        LSB_DJOB_HOSTFILE=str(hosts), AADL_REPO=str(REPO_ROOT), ACCOUNT="abc123", NODES="2", STAGE_DATA="1",
        STAGE_DIR=str(stage), LOG_DIR=str(tmp_path / "logs"),
        # What a job resubmitted by the older script inherited: the previous job's values.
        MASTER_ADDR="old-host", AADL_DATA_ROOT=str(data),
    )
    result = subprocess.run(["bash", str(REPO_ROOT / "lsf/ddp.lsf")], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 75, result.stdout + result.stderr
    run = [line for line in steps(record) if "experiments.run" in line]
    assert run and run[0].startswith(f"MASTER_ADDR=h41n01 AADL_DATA_ROOT={stage} "), run
    assert any(f"cp -r {data}/. {stage}/" in line for line in steps(record))
    (again,) = submissions(record)
    assert "MASTER_ADDR" not in again["env"], again["env"].get("MASTER_ADDR")  # the new job computes its own
    assert again["env"]["AADL_DATA_ROOT"] == str(data)  # stage from the source again, not the old NVMe
    assert again["env"]["AADL_RESUBMITS"] == "1" and again["env"]["AADL_SUBMIT"] == "0"
    assert again["args"][again["args"].index("-P") + 1] == "abc123"


def test_ddp_lsf_user_master_addr_is_kept_across_resubmission(fakes, tmp_path):
    bin_dir, record = fakes
    env = script_env(PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_DIR=str(record), ACCOUNT="abc123",
                     MASTER_ADDR="chosen-host", LOG_DIR=str(tmp_path / "logs"))
    subprocess.run(["bash", str(REPO_ROOT / "lsf/ddp.lsf")], env=env, check=True, capture_output=True, timeout=60)
    (first,) = submissions(record)
    assert first["env"]["AADL_MASTER_ADDR"] == "chosen-host" and "MASTER_ADDR" not in first["env"]


def test_ddp_lsf_dry_run_prints_the_staging_lines(tmp_path):
    lines = dry_run("lsf/ddp.lsf", STAGE_DATA="1", AADL_DATA_ROOT="/proj/data", STAGE_DIR="/mnt/bb/u/data", NODES="2")
    assert lines[1] == ["jsrun", "-n", "2", "-r", "1", "-a", "1", "-c", "1", "mkdir", "-p", "/mnt/bb/u/data"]
    assert lines[2] == ["jsrun", "-n", "2", "-r", "1", "-a", "1", "-c", "1", "cp", "-r", "/proj/data/.", "/mnt/bb/u/data/"]
    assert lines[3] == ["export", "AADL_DATA_ROOT=/mnt/bb/u/data"] and lines[4][0] == "jsrun"


def test_summit_site_lines(tmp_path):
    bsub, jsrun, note = dry_run("lsf/seed_array.lsf", SITE="summit", MEMBERWORK=str(tmp_path), ACCOUNT="abc123")
    assert bsub[:4] == ["bsub", "-J", "aadl-fig2", "-nnodes"] and "-P" in bsub and bsub[bsub.index("-W") + 1] == "120"
    assert jsrun[:9] == ["jsrun", "-n", "1", "-a", "1", "-c", "7", "-g", "0"]
    assert jsrun[-1] == f"output.root={tmp_path}/aadl/results"
    assert note[-4:] == ["6", "at", "a", "time"]  # 42 cores / 7 per seed: 6 seeds at a time on one node
    _, jsrun, note = dry_run("lsf/seed_array.lsf", SITE="summit", MEMBERWORK=str(tmp_path), NODES="2", GPUS="2", CORES="3")
    assert note[-4] == "6" and jsrun[8] == "2"  # two GPUs per seed: 3 per node of 6, on 2 nodes


def test_seed_array_lsf_one_element_per_seed(tmp_path):
    bsub, jsrun = dry_run("lsf/seed_array.lsf", PACK="0", SEEDS="0-2,7", ACCOUNT="abc123", LOG_DIR="/l")
    assert bsub[1:3] == ["-J", "aadl-fig2[1-3,8]"] and bsub[bsub.index("-o") + 1] == "/l/%J_%I.out"
    assert "seed=$((LSB_JOBINDEX-1))" in jsrun


def run_packed_until_signal(fakes, tmp_path, **variables) -> tuple[str, int, Path]:
    """A packed seed array of 4 seeds, 2 at a time, stopped by SIGUSR2 once 2 have started."""
    bin_dir, record = fakes
    env = script_env(
        PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_DIR=str(record), FAKE_RUN_WAIT="1", LSB_JOBID="602",
        AADL_REPO=str(REPO_ROOT), ACCOUNT="abc123", SEEDS="0-3", SLOTS="2", CORES="7", PACK="1",
        OVERRIDES=f"method=none seed=0,1,2,3 output.root={tmp_path / 'runs'}", LOG_DIR=str(tmp_path / "logs"), **variables,
    )
    job = subprocess.Popen(["bash", str(REPO_ROOT / "lsf/seed_array.lsf")], env=env, cwd=tmp_path,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    while len(steps(record)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.5)  # a third seed would start here if the slots were not respected
    started = steps(record)
    assert len(started) == 2 and all("-c 7 -g 0 -b packed:7" in line for line in started), started
    assert sorted(line.split("seed=")[1].split()[0] for line in started) == ["0", "1"]
    job.send_signal(signal.SIGUSR2)  # what LSF sends at the -W run limit
    out, _ = job.communicate(timeout=120)
    assert (record / "signals").read_text().split() == ["USR2", "USR2"], out  # both running seeds were told
    assert len(steps(record)) == 2, out  # seeds 2 and 3 never started
    return out, job.returncode, record


def test_packed_seed_array_runs_seeds_over_slots_and_passes_usr2_on(fakes, tmp_path):
    out, returncode, record = run_packed_until_signal(fakes, tmp_path, MAX_RESUBMITS="0")
    assert returncode == 75 and "not resubmitting" in out, out
    assert submissions(record) == []


def test_packed_seed_array_resubmits_what_experiments_status_lists(fakes, tmp_path):
    out, returncode, record = run_packed_until_signal(fakes, tmp_path)
    assert returncode == 75, out
    (again,) = submissions(record)
    assert again["env"]["SEEDS"] == "0-3" and again["env"]["AADL_RESUBMITS"] == "1", out
    assert "resubmitting seeds 0-3 of fig2" in out
