"""experiments.world: launcher detection on recorded environments, host lists, ports,
devices, and real torchrun/mpirun launches that meet through init_distributed.

The environments marked "recorded" were dumped from real launches on Debian 12 (Slurm
22.05 with `srun` and `srun --mpi=pmix`, Open MPI 4.1.4 `mpirun`, MPICH 5.0 `mpiexec`,
torch 2.14 `torchrun`) and trimmed to the variables that matter; jsrun and PMIx-only ones
are written from the launchers' documentation (no LSF can be installed here).
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments import world
from experiments.world import (
    PORT_RANGE,
    WorldError,
    WorldInfo,
    default_threads,
    expand_nodelist,
    job_key,
    lsf_compute_hosts,
    port_from_job_id,
    rendezvous,
    world_info_from_env,
)

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("world_worker.py")

# -- recorded environments ---------------------------------------------------------------

TORCHRUN_RANK1 = {  # recorded: torchrun --standalone --nproc_per_node 2
    "GROUP_RANK": "0", "GROUP_WORLD_SIZE": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
    "MASTER_ADDR": "localhost", "MASTER_PORT": "46611", "OMP_NUM_THREADS": "1", "RANK": "1",
    "TORCHELASTIC_RUN_ID": "5b6d9b15-6f24-4d4a-b188-a8354e9b400f", "WORLD_SIZE": "2",
}
SBATCH_SHELL = {  # recorded: the batch script's own shell, sbatch -n 2
    "SLURM_CPUS_ON_NODE": "2", "SLURM_GTIDS": "0", "SLURM_JOBID": "1", "SLURM_JOB_CPUS_PER_NODE": "2",
    "SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "vm", "SLURM_JOB_NUM_NODES": "1", "SLURM_LOCALID": "0",
    "SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_NODELIST": "vm", "SLURM_NPROCS": "2",
    "SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_TASKS_PER_NODE": "2",
}
SRUN_RANK1 = {  # recorded: srun -n 2 inside sbatch -n 2
    "SLURM_CPUS_ON_NODE": "2", "SLURM_DISTRIBUTION": "block", "SLURM_GTIDS": "0,1", "SLURM_JOBID": "1",
    "SLURM_JOB_CPUS_PER_NODE": "2", "SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "vm", "SLURM_JOB_NUM_NODES": "1",
    "SLURM_LOCALID": "1", "SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_NODELIST": "vm", "SLURM_NPROCS": "2",
    "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_STEPID": "0", "SLURM_STEP_ID": "0",
    "SLURM_STEP_NODELIST": "vm", "SLURM_STEP_NUM_NODES": "1", "SLURM_STEP_NUM_TASKS": "2",
    "SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_TASKS_PER_NODE": "2",
}
SRUN_PMIX_RANK1 = {  # recorded: srun --mpi=pmix -n 2 (no OMPI_* variables at all)
    **SRUN_RANK1, "SLURM_STEPID": "1", "SLURM_STEP_ID": "1", "SLURM_MPI_TYPE": "pmix",
    "PMIX_NAMESPACE": "slurm.pmix.1.1", "PMIX_RANK": "1",
}
SRUN_ONE_OF_TWO = {  # recorded: srun -n 1 inside sbatch -n 2 (srun rewrites SLURM_NTASKS)
    **SRUN_RANK1, "SLURM_DISTRIBUTION": "cyclic", "SLURM_GTIDS": "0", "SLURM_LOCALID": "0", "SLURM_NPROCS": "1",
    "SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_STEPID": "2", "SLURM_STEP_ID": "2",
    "SLURM_STEP_NUM_TASKS": "1", "SLURM_STEP_TASKS_PER_NODE": "1", "SLURM_TASKS_PER_NODE": "1",
}
MPIRUN_RANK1 = {  # recorded: mpirun --allow-run-as-root --oversubscribe -np 2
    "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "OMPI_COMM_WORLD_NODE_RANK": "1",
    "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_MCA_ess_base_jobid": "1589248001",
    "OMPI_UNIVERSE_SIZE": "2", "PMIX_NAMESPACE": "1589248001", "PMIX_RANK": "1",
}
MPIRUN_IN_SBATCH_RANK1 = {  # recorded: mpirun -np 2 in an sbatch -n 2 script; note SLURM_PROCID=0
    **{k: v for k, v in SBATCH_SHELL.items()}, "SLURM_JOB_ID": "9", "SLURM_JOBID": "9",
    "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "OMPI_COMM_WORLD_NODE_RANK": "1",
    "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_MCA_ess_base_jobid": "1381302273",
    "PMIX_NAMESPACE": "1381302273", "PMIX_RANK": "1",
}
MPICH_RANK1 = {  # recorded: MPICH 5.0 mpiexec -n 2 (Hydra)
    "MPI_LOCALNRANKS": "2", "MPI_LOCALRANKID": "1", "PMI_HOSTNAME": "vm", "PMI_RANK": "1", "PMI_SIZE": "2",
}
JSRUN_RANK5 = {  # jsrun -n 12 -a 1 -g 1 on two Summit nodes (6 resource sets each), Spectrum MPI
    "JSM_NAMESPACE_RANK": "5", "JSM_NAMESPACE_SIZE": "12", "JSM_NAMESPACE_LOCAL_RANK": "5",
    "OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "12", "OMPI_COMM_WORLD_LOCAL_RANK": "5",
    "OMPI_COMM_WORLD_LOCAL_SIZE": "6", "PMIX_RANK": "5", "PMIX_NAMESPACE": "jsm.42.0",
    "CUDA_VISIBLE_DEVICES": "5", "LSB_JOBID": "1234567",
    "LSB_HOSTS": "batch3 " + " ".join(["a01n05"] * 42 + ["a01n06"] * 42),
}
PMIX_ONLY = {"PMIX_RANK": "3", "PMIX_NAMESPACE": "prterun-vm-1234@1"}


@pytest.mark.parametrize(
    "environ, expected",
    [
        pytest.param(TORCHRUN_RANK1, (1, 2, 1, 2, "torchrun"), id="torchrun"),
        pytest.param(SRUN_RANK1, (1, 2, 1, 2, "slurm"), id="srun-in-sbatch"),
        pytest.param(SRUN_PMIX_RANK1, (1, 2, 1, 2, "slurm"), id="srun-mpi-pmix"),
        pytest.param(SRUN_ONE_OF_TWO, (0, 1, 0, 1, "slurm"), id="srun-n1-in-sbatch-n2"),
        pytest.param(SBATCH_SHELL, (0, 1, 0, 1, "single"), id="sbatch-batch-shell"),
        pytest.param(MPIRUN_RANK1, (1, 2, 1, 2, "openmpi"), id="openmpi-mpirun"),
        pytest.param(MPIRUN_IN_SBATCH_RANK1, (1, 2, 1, 2, "openmpi"), id="mpirun-in-sbatch"),
        pytest.param(MPICH_RANK1, (1, 2, 1, 2, "mpich"), id="mpich"),
        pytest.param(JSRUN_RANK5, (5, 12, 5, 6, "jsrun"), id="jsrun-spectrum"),
        pytest.param({}, (0, 1, 0, 1, "single"), id="no-variables"),
    ],
)
def test_recorded_environments(environ, expected):
    info = world_info_from_env(environ)
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size, info.launcher) == expected
    assert all(environ[name] == value for name, value in info.variables)


def test_batch_shell_records_what_it_saw():
    """One process, but the message-facing variables show it sat in a Slurm batch shell."""
    info = world_info_from_env(SBATCH_SHELL)
    assert info.env == {"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}


def test_mpirun_across_slurm_nodes_is_not_read_as_srun():
    """On a second node, mpirun's daemon runs in an srun step: SLURM_PROCID is the node's
    index among the daemons, not the rank. Open MPI's variables must win."""
    remote_rank = {
        **SBATCH_SHELL, "SLURM_STEP_ID": "0", "SLURM_STEPID": "0", "SLURM_PROCID": "0",
        "SLURM_STEP_NUM_TASKS": "1", "SLURM_LOCALID": "0", "SLURM_STEP_NODELIST": "node02",
        "SLURM_JOB_NODELIST": "node[01-02]",
        "OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "OMPI_MCA_ess_base_jobid": "77",
    }
    info = world_info_from_env(remote_rank)
    assert (info.rank, info.world_size, info.launcher) == (3, 4, "openmpi")
    # Every rank derives the port from mpirun's job id, not from the step some ranks see.
    assert job_key(info, remote_rank) == "openmpi:77"


def test_slurm_multi_node_local_size_from_compressed_tasks_per_node():
    environ = {**SRUN_RANK1, "SLURM_PROCID": "4", "SLURM_STEP_NUM_TASKS": "5", "SLURM_NODEID": "2",
               "SLURM_LOCALID": "0", "SLURM_STEP_TASKS_PER_NODE": "2(x2),1"}
    info = world_info_from_env(environ)
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == (4, 5, 0, 1)
    assert not info.single_node


def test_pmix_only_asks_mpi_for_the_size(monkeypatch):
    monkeypatch.setattr(world, "_mpi_world", lambda: (3, 4, 1, 2))
    info = world_info_from_env(PMIX_ONLY)
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size, info.launcher) == (3, 4, 1, 2, "pmix")


def test_pmix_only_without_mpi_says_so(monkeypatch):
    def no_mpi():
        raise WorldError("mpi4py is needed here but cannot be used: No module named 'mpi4py'")

    monkeypatch.setattr(world, "_mpi_world", no_mpi)
    with pytest.raises(WorldError, match="PMIX_RANK names no world size") as caught:
        world_info_from_env(PMIX_ONLY)
    assert "PMIX_RANK=3" in str(caught.value)


def test_pmix_only_with_another_mpi_is_refused(monkeypatch):
    monkeypatch.setattr(world, "_mpi_world", lambda: (0, 1, 0, 1))  # a singleton
    with pytest.raises(WorldError, match="not the launcher's"):
        world_info_from_env(PMIX_ONLY)


@pytest.mark.parametrize(
    "environ, names",
    [
        pytest.param({"WORLD_SIZE": "4"}, ["RANK", "WORLD_SIZE=4"], id="size-without-rank"),
        pytest.param({"RANK": "1"}, ["WORLD_SIZE", "RANK=1"], id="rank-without-size"),
        pytest.param({"LOCAL_RANK": "0"}, ["LOCAL_RANK=0"], id="local-rank-alone"),
        pytest.param({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, ["RANK=2", "WORLD_SIZE=2"], id="rank-not-below-size"),
        pytest.param({"RANK": "one", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, ["RANK='one'"], id="not-an-integer"),
        pytest.param({"RANK": "-1", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, ["RANK=-1"], id="negative"),
        pytest.param({"RANK": "0", "WORLD_SIZE": "0", "LOCAL_RANK": "0"}, ["WORLD_SIZE=0"], id="empty-world"),
        pytest.param({"RANK": "1", "WORLD_SIZE": "2"}, ["LOCAL_RANK"], id="no-local-rank"),
        pytest.param({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"},
                     ["LOCAL_RANK=2", "LOCAL_WORLD_SIZE=2"], id="local-rank-not-below-local-size"),
        pytest.param({"OMPI_COMM_WORLD_SIZE": "2"}, ["OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE=2"], id="ompi-size-only"),
        pytest.param({"PMI_RANK": "3", "PMI_SIZE": "2", "MPI_LOCALRANKID": "0"}, ["PMI_RANK=3"], id="pmi-rank-too-big"),
        pytest.param({"SLURM_STEP_ID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0"}, ["SLURM_PROCID", "SLURM_STEP_ID=0"],
                     id="srun-step-without-procid"),
        pytest.param({**SRUN_RANK1, "SLURM_STEP_NUM_TASKS": "x"}, ["SLURM_STEP_NUM_TASKS"], id="srun-size-not-integer"),
        pytest.param({"JSM_NAMESPACE_RANK": "0"}, ["JSM_NAMESPACE_SIZE", "JSM_NAMESPACE_RANK=0"], id="jsrun-rank-only"),
    ],
)
def test_inconsistent_environments_raise_naming_what_was_read(environ, names):
    with pytest.raises(WorldError) as caught:
        world_info_from_env(environ)
    message = str(caught.value)
    for name in names:
        assert name in message


def test_world_error_survives_pickling():
    error = WorldError("rendezvous at 10.0.0.1:24001 timed out", [("SLURM_PROCID", "1"), ("SLURM_NTASKS", "2")])
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is WorldError
    assert (again.message, again.variables, str(again)) == (error.message, error.variables, str(error))
    assert "SLURM_PROCID=1" in str(again)
    with pytest.raises(WorldError):  # and one raised in a worker comes back whole
        raise pickle.loads(pickle.dumps(WorldError("x")))


def test_world_info_is_frozen():
    info = world_info_from_env(MPIRUN_RANK1)
    with pytest.raises(AttributeError):
        info.rank = 0  # type: ignore[misc]
    assert hash(info) == hash(world_info_from_env(dict(MPIRUN_RANK1)))


# -- host lists --------------------------------------------------------------------------

# Expected values are `scontrol show hostnames` output from Slurm 22.05.
@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("vm", ["vm"]),
        ("node[01-03,07],gpu5", ["node01", "node02", "node03", "node07", "gpu5"]),
        ("a[1-2]-b[3-4]", ["a1-b3", "a1-b4", "a2-b3", "a2-b4"]),
        ("rack[1-2]-n[01-02],login1", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02", "login1"]),
        ("x[9-11]", ["x9", "x10", "x11"]),
        ("c[098-101]", ["c098", "c099", "c100", "c101"]),
        ("n[1-2,5],m[3]", ["n1", "n2", "n5", "m3"]),
        ("c[1-3,2]", ["c1", "c2", "c3", "c2"]),
        ("", []),
        ("(null)", []),
    ],
)
def test_expand_nodelist_matches_scontrol(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["n[1-", "n1-2]", "n[3-1]", "n[a-b]", "n[[1]]", "n[1,,2]"])
def test_expand_nodelist_rejects_malformed(bad):
    with pytest.raises(WorldError):
        expand_nodelist(bad)


def test_lsf_hostfile_drops_the_batch_node(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("batch2\n" + "a01n01\n" * 42 + "a01n02\n" * 42)
    assert lsf_compute_hosts({"LSB_DJOB_HOSTFILE": str(hostfile)}) == ["a01n01", "a01n02"]


@pytest.mark.parametrize(
    "lsb_hosts, hosts",
    [
        ("batch3 a01n05 a01n05 a01n06 a01n06", ["a01n05", "a01n06"]),
        ("login1 c1 c1 c2 c2", ["c1", "c2"]),
        ("launch7 c1 c1 c2 c2", ["c1", "c2"]),  # one slot before multi-slot hosts: the launch node
        ("c1 c2 c3", ["c1", "c2", "c3"]),  # one slot each: all compute hosts
        ("c1 c1 c2 c2", ["c1", "c2"]),
        ("", []),
    ],
)
def test_lsf_hosts_rule(lsb_hosts, hosts):
    assert lsf_compute_hosts({"LSB_HOSTS": lsb_hosts}) == hosts


def test_lsf_unreadable_hostfile_is_an_error(tmp_path):
    with pytest.raises(WorldError, match="LSB_DJOB_HOSTFILE"):
        lsf_compute_hosts({"LSB_DJOB_HOSTFILE": str(tmp_path / "missing")})


# -- ports -------------------------------------------------------------------------------


def test_port_from_job_id_is_stable_in_range_and_never_29500():
    low, high = PORT_RANGE
    ports = [port_from_job_id(f"slurm:{job}.0") for job in range(20000)]
    assert all(low <= port <= high and port != 29500 for port in ports)
    assert ports == [port_from_job_id(f"slurm:{job}.0") for job in range(20000)]  # same on every rank
    assert len(set(ports)) > 8000  # spread over the range
    assert port_from_job_id("slurm:123.0") != port_from_job_id("slurm:124.0")
    assert port_from_job_id("slurm:123.0") != port_from_job_id("slurm:123.1")


@pytest.mark.parametrize(
    "environ, key",
    [
        (SRUN_RANK1, "slurm:1.0"),
        (SRUN_PMIX_RANK1, "slurm:1.1"),
        (MPIRUN_RANK1, "openmpi:1589248001"),
        (MPIRUN_IN_SBATCH_RANK1, "openmpi:1381302273"),
        (MPICH_RANK1, None),
        ({**MPICH_RANK1, "SLURM_JOB_ID": "55"}, "SLURM_JOB_ID:55"),
        ({**MPICH_RANK1, "PMI_JOBID": "55.3"}, "pmi:55.3"),
        (JSRUN_RANK5, "pmix:jsm.42.0"),
        ({k: v for k, v in JSRUN_RANK5.items() if k != "PMIX_NAMESPACE"}, "lsf:1234567[0]"),
        (TORCHRUN_RANK1, "torchrun:5b6d9b15-6f24-4d4a-b188-a8354e9b400f"),
    ],
)
def test_job_key_per_launcher(environ, key):
    assert job_key(world_info_from_env(environ), environ) == key


def test_rendezvous_prefers_master_variables():
    meeting = rendezvous(world_info_from_env(TORCHRUN_RANK1), TORCHRUN_RANK1)
    assert (meeting.addr, meeting.port, meeting.addr_from, meeting.port_from) == ("localhost", 46611, "MASTER_ADDR", "MASTER_PORT")


def test_rendezvous_srun_single_node_uses_loopback_and_job_port():
    meeting = rendezvous(world_info_from_env(SRUN_RANK1), SRUN_RANK1)
    assert (meeting.addr, meeting.port) == ("127.0.0.1", port_from_job_id("slurm:1.0"))


def test_rendezvous_srun_multi_node_uses_first_step_host():
    environ = {**SRUN_RANK1, "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_JOB_NODELIST": "gpu[06-08]",
               "SLURM_STEP_TASKS_PER_NODE": "1(x2)", "SLURM_STEP_NUM_TASKS": "2", "SLURM_LOCALID": "0",
               "SLURM_NODEID": "1", "SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "3"}
    meeting = rendezvous(world_info_from_env(environ), environ)
    assert (meeting.addr, meeting.port) == ("gpu07", port_from_job_id("slurm:4242.3"))
    assert meeting.addr_from == "first host of SLURM_STEP_NODELIST"


def test_rendezvous_mpi_broadcast(monkeypatch):
    calls = []

    def fake_broadcast(info, want_port):
        calls.append(want_port)
        return ("h1", "h1", "h2", "h2"), 24567

    monkeypatch.setattr(world, "_mpi_broadcast", fake_broadcast)
    environ = {**MPIRUN_RANK1, "OMPI_COMM_WORLD_SIZE": "4"}
    meeting = rendezvous(world_info_from_env(environ), environ)
    assert (meeting.addr, meeting.port, meeting.hosts, calls) == ("h1", 24567, ("h1", "h1", "h2", "h2"), [True])
    # Only the port missing: MPI is not needed, the job id gives it.
    with_addr = {**environ, "MASTER_ADDR": "h1"}
    meeting = rendezvous(world_info_from_env(with_addr), with_addr)
    assert (meeting.addr, meeting.port, calls) == ("h1", port_from_job_id("openmpi:1589248001"), [True])


def test_rendezvous_mpi_without_mpi4py_falls_back(monkeypatch):
    def broken(info, want_port):
        raise WorldError("mpi4py cannot be used: No module named 'mpi4py'")

    monkeypatch.setattr(world, "_mpi_broadcast", broken)
    # One node: loopback and mpirun's job id.
    meeting = rendezvous(world_info_from_env(MPIRUN_RANK1), MPIRUN_RANK1)
    assert (meeting.addr, meeting.port) == ("127.0.0.1", port_from_job_id("openmpi:1589248001"))
    # Summit: the first compute host of the LSF job.
    meeting = rendezvous(world_info_from_env(JSRUN_RANK5), JSRUN_RANK5)
    assert (meeting.addr, meeting.port) == ("a01n05", port_from_job_id("pmix:jsm.42.0"))
    # Several nodes, no allocation to read, no MPI: nothing to go on.
    environ = {**MPICH_RANK1, "PMI_SIZE": "4"}
    with pytest.raises(WorldError, match="mpi4py cannot be used") as caught:
        rendezvous(world_info_from_env(environ), environ)
    assert "PMI_RANK=1" in str(caught.value)


def test_rendezvous_single_process_picks_a_free_port():
    meeting = rendezvous(world_info_from_env({}), {})
    assert meeting.addr == "127.0.0.1" and 0 < meeting.port < 65536 and meeting.port != 29500


@pytest.mark.parametrize("port", ["http", "0", "70000"])
def test_rendezvous_rejects_bad_master_port(port):
    environ = {**SRUN_RANK1, "MASTER_PORT": port}
    with pytest.raises(WorldError, match="MASTER_PORT"):
        rendezvous(world_info_from_env(environ), environ)


# -- device, backend, threads ------------------------------------------------------------


def test_choose_device_on_cpu():
    import torch

    info = world_info_from_env(SRUN_RANK1)
    assert world.choose_device(info, "cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert world.choose_device(info, "auto") == torch.device("cpu")
        with pytest.raises(WorldError, match="no GPU"):
            world.choose_device(info, "cuda")
    with pytest.raises(ValueError):
        world.choose_device(info, "gpu")
    with pytest.raises(WorldError, match="all 2 ranks on one GPU"):
        world.choose_device(info, "cuda:1")
    assert world.choose_backend(torch.device("cpu")) == "gloo"


@pytest.mark.parametrize(
    "count, local_rank, expected",
    [(1, 5, "cuda:0"), (6, 5, "cuda:5"), (4, 1, "cuda:1"), (2, 3, None)],
    ids=["one-visible-gpu-per-rank", "all-node-gpus", "local-rank", "too-few-gpus"],
)
def test_choose_device_with_gpus(monkeypatch, count, local_rank, expected):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    info = WorldInfo(local_rank, 12, local_rank, 6, "jsrun")
    if expected is None:
        with pytest.raises(WorldError, match="no GPU of its own"):
            world.choose_device(info, "auto", {"CUDA_VISIBLE_DEVICES": "0,1"})
    else:
        assert str(world.choose_device(info, "auto", {})) == expected
        assert str(world.choose_device(info, "cuda", {})) == expected
    alone = WorldInfo(0, 1, 0, 1, "single")
    assert str(world.choose_device(alone, "cuda:1", {})) == "cuda:1"  # one process may pin a GPU


def test_default_threads(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    mpirun = world_info_from_env(MPIRUN_RANK1)  # 2 ranks on this node
    assert default_threads(mpirun, {}) == 4
    assert default_threads(mpirun, {"OMP_NUM_THREADS": "3"}) == 3
    assert default_threads(world_info_from_env(TORCHRUN_RANK1), TORCHRUN_RANK1) == 1  # torchrun's OMP_NUM_THREADS=1
    srun = world_info_from_env(SRUN_RANK1)
    assert default_threads(srun, {"SLURM_CPUS_PER_TASK": "3"}) == 3
    assert default_threads(world_info_from_env({}), {}) == 8
    crowded = WorldInfo(0, 16, 0, 16, "openmpi")
    assert default_threads(crowded, {}) == 1  # never 0
    unknown_local = WorldInfo(0, 4, 0, None, "jsrun")
    assert default_threads(unknown_local, {}) == 2  # shares by the world size


# -- init_distributed in this process ----------------------------------------------------


@pytest.fixture
def clean_environ():
    """init_distributed writes MASTER_*/RANK/... into os.environ: put it back afterwards."""
    saved = dict(os.environ)
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "GLOO_SOCKET_IFNAME"):
        os.environ.pop(name, None)
    yield os.environ
    os.environ.clear()
    os.environ.update(saved)


def test_single_process_creates_no_group(clean_environ):
    import torch.distributed as dist

    with world.init_distributed(world_info_from_env({}), device="cpu") as ctx:
        assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.launcher, ctx.is_main) == (0, 1, 0, "single", True)
        assert (ctx.distributed, ctx.backend, str(ctx.device), len(ctx.hosts)) == (False, None, "cpu", 1)
        assert not dist.is_initialized()
        assert "MASTER_PORT" not in os.environ
    ctx.close()  # a second close does nothing


def test_rendezvous_timeout_names_address_and_variables(clean_environ):
    """Rank 1 of 2 waits for a rank 0 that never comes: a WorldError within the timeout."""
    port = world.free_port()
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    info = world_info_from_env(SRUN_RANK1)
    started = time.monotonic()
    with pytest.raises(WorldError) as caught:
        world.init_distributed(info, device="cpu", timeout_s=1)
    elapsed = time.monotonic() - started
    message = str(caught.value)
    assert f"127.0.0.1:{port}" in message and "timed out after 1 s" in message
    assert "SLURM_PROCID=1" in message and f"MASTER_PORT={port}" in message
    assert elapsed < 30
    import torch.distributed as dist

    assert not dist.is_initialized()


def test_contradicting_rank_variable_is_refused(clean_environ):
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "23456", "RANK": "0"})
    with pytest.raises(WorldError, match="RANK=0 in the environment contradicts 1"):
        world.init_distributed(world_info_from_env(SRUN_RANK1), device="cpu", timeout_s=1)


def test_module_imports_only_the_standard_library():
    """Config and submission code import this without paying for torch or starting MPI."""
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('world_alone', {str(REPO / 'experiments' / 'world.py')!r})\n"
        "module = importlib.util.module_from_spec(spec); sys.modules['world_alone'] = module\n"
        "spec.loader.exec_module(module)\n"
        "module.world_info_from_env(); module.expand_nodelist('n[1-2]')\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'mpi4py'))\n"
        "assert not heavy, heavy\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


# -- real launches -----------------------------------------------------------------------

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                    "GLOO_SOCKET_IFNAME", "OMP_NUM_THREADS")
LAUNCH_PREFIXES = ("OMPI_", "PMI_", "PMIX_", "JSM_", "TORCHELASTIC_")


def _launch_env() -> dict[str, str]:
    """This process's environment without any launcher's variables (pytest itself may run
    under one), so that the child world is described by its own launcher only."""
    return {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES and not k.startswith(LAUNCH_PREFIXES)}


def _launch(command: list[str], out_dir: Path, timeout: int = 180) -> list[dict]:
    try:
        result = subprocess.run(command, cwd=REPO, env=_launch_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{command[0]} did not finish within {timeout} s\n{_logs(out_dir)}\n{exc.stdout}\n{exc.stderr}")
    if result.returncode != 0 or len(list(out_dir.glob("rank*.json"))) != 2:
        pytest.fail(
            f"{' '.join(command)} exited {result.returncode}\n--- stdout\n{result.stdout[-3000:]}\n"
            f"--- stderr\n{result.stderr[-3000:]}\n{_logs(out_dir)}"
        )
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(2)]


def _logs(out_dir: Path) -> str:
    parts = []
    for rank in range(2):
        path = out_dir / f"rank{rank}.log"
        text = path.read_text(errors="replace") if path.exists() else "(no log written)"
        parts.append(f"--- rank {rank} log (last 3000 characters)\n{text[-3000:]}")
    return "\n".join(parts)


def _check_world(results: list[dict], launcher: str) -> None:
    assert [r["rank"] for r in results] == [0, 1]
    assert [r["is_main"] for r in results] == [True, False]
    for r in results:
        assert (r["world_size"], r["local_world_size"], r["launcher"], r["backend"]) == (2, 2, launcher, "gloo")
        assert r["all_reduce"] == 3.0 and r["all_gather"] == [0, 1]
        assert r["threads"] >= 1
        assert r["master_port"] != 29500
        assert r["env"]["MASTER_PORT"] == str(r["master_port"])
    # Both ranks met at the same place and agree on who is where.
    assert results[0]["master_addr"] == results[1]["master_addr"]
    assert results[0]["master_port"] == results[1]["master_port"]
    assert results[0]["hosts"] == results[1]["hosts"]


def _mpirun() -> str:
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        pytest.fail("mpirun is not on PATH: install Open MPI with `bash .ci/system-packages` (Debian, root), "
                    "then `bash .ci/setup` to add mpi4py")
    version = subprocess.run([mpirun, "--version"], capture_output=True, text=True).stdout
    if "Open MPI" not in version:
        pytest.fail(f"these launches need Open MPI's mpirun, found: {version.strip()[:200]}")
    return mpirun


@pytest.mark.distributed
def test_torchrun_launch(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    results = _launch(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", str(WORKER), str(tmp_path)], tmp_path
    )
    _check_world(results, "torchrun")
    assert results[0]["port_from"] == "MASTER_PORT"  # torchrun --standalone chose it


@pytest.mark.distributed
@pytest.mark.parametrize("mpi4py", [True, False], ids=["mpi4py", "without-mpi4py"])
def test_mpirun_launch(tmp_path, mpi4py):
    mpirun = _mpirun()
    if mpi4py and importlib.util.find_spec("mpi4py") is None:
        pytest.fail("mpi4py is not installed: `bash .ci/setup` installs it (the `distributed` extra) where mpirun is on PATH")
    command = [mpirun, "--allow-run-as-root", "--oversubscribe", "-np", "2", sys.executable, str(WORKER), str(tmp_path)]
    results = _launch(command + ([] if mpi4py else ["--no-mpi4py"]), tmp_path)
    _check_world(results, "openmpi")
    assert all(r["mpi4py_loaded"] == mpi4py for r in results)
    if mpi4py:  # rank 0's host and a port it found free, broadcast with MPI
        assert results[0]["port_from"] == "free port on rank 0 via MPI"
    else:  # this node's loopback, and a port from mpirun's own job id
        assert results[0]["port_from"].startswith("derived from job id openmpi:")
        assert PORT_RANGE[0] <= results[0]["master_port"] <= PORT_RANGE[1]
