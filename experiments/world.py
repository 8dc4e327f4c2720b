"""Which rank am I, and how do the ranks meet: one process-group start-up for every launcher.

The harness is started by torchrun on a workstation, by ``srun`` under Slurm, by ``jsrun``
under LSF (Summit), or by ``mpirun``/``mpiexec`` anywhere. Each launcher announces the
rank in its own environment variables and none but torchrun says where rank 0 listens.
This module reads them in one ordered search (:func:`world_info_from_env`), finds the
rendezvous address and port (:func:`rendezvous`), and starts ``torch.distributed``
(:func:`init_distributed`). The idea follows timm's ``world_info_from_env``; the code is
this project's own.

Only the standard library is imported at import time, so that config code, tests and the
Slurm/LSF submission side can import this module without torch. torch is imported by the
functions that need it, and mpi4py only where an MPI launcher started the ranks and
rank 0's address or a port has to be broadcast.

Launcher search order (the first that matches wins):

1. ``torchrun``: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (it also sets ``MASTER_*``).
   First, because torchrun is often run inside an ``srun``/``mpirun`` task, one per
   node, and then the outer launcher's variables describe the agents, not the workers.
2. ``jsrun``: ``JSM_NAMESPACE_RANK``/``SIZE``/``LOCAL_RANK``. Before Open MPI because
   Spectrum MPI under jsrun also sets ``OMPI_COMM_WORLD_*``.
3. ``openmpi``: ``OMPI_COMM_WORLD_RANK``/``SIZE``/``LOCAL_RANK`` (Open MPI, Spectrum MPI).
4. ``mpich``: ``PMI_RANK``, ``PMI_SIZE``, ``MPI_LOCALRANKID`` (MPICH/Intel MPI Hydra, any
   PMI-1 launcher).
5. ``slurm``: ``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``, ``SLURM_LOCALID``, trusted only
   inside an ``srun`` step (``SLURM_STEP_ID`` or ``SLURM_STEPID`` set). An ``sbatch`` batch
   shell also sets ``SLURM_PROCID=0`` and ``SLURM_NTASKS=<tasks of the job>`` but is one
   process: recorded on Slurm 22.05, it has no step id, so it falls through to "single".
   Inside a step, ``srun`` overwrites ``SLURM_NTASKS`` with the step's task count, but
   ``SLURM_STEP_NUM_TASKS`` is the step's count by definition: it is read first and
   ``SLURM_NTASKS`` is the fallback.
6. ``pmix``: ``PMIX_RANK`` alone (a PMIx launcher that names no size, e.g. PRRTE): the
   size and local rank come from MPI through mpi4py.
7. ``single``: none of the above; one process.

Why the MPI launchers come before Slurm, although ``srun --mpi=pmix`` sets no
``OMPI_COMM_WORLD_*``: that fact only says Slurm must be recognised without them. When an
MPI launcher's variables *are* present they are the truth, and Slurm's may describe
something else: ``mpirun`` inside an ``sbatch`` script passes the batch shell's
``SLURM_PROCID=0`` to every rank (recorded here), and on several nodes it starts its
daemons with ``srun``, so ranks on those nodes see an ``srun`` step whose ``SLURM_PROCID``
is a node index. Reading Slurm first would make several ranks rank 0.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import socket
import sys
from typing import Any, Callable, Iterable, Mapping

__all__ = [
    "LAUNCHERS",
    "MPI_LAUNCHERS",
    "PORT_RANGE",
    "DistributedContext",
    "Rendezvous",
    "WorldError",
    "WorldInfo",
    "choose_backend",
    "choose_device",
    "default_threads",
    "expand_nodelist",
    "free_port",
    "init_distributed",
    "job_key",
    "lsf_compute_hosts",
    "port_from_job_id",
    "rendezvous",
    "world_info_from_env",
]

LAUNCHERS = ("torchrun", "slurm", "jsrun", "openmpi", "mpich", "pmix", "single")
#: Launchers whose ranks can talk MPI, so rank 0's host and a free port can be broadcast.
MPI_LAUNCHERS = frozenset({"jsrun", "openmpi", "mpich", "pmix"})
#: Ports derived from a job id fall in this range (inclusive), never on torch's default.
PORT_RANGE = (20000, 29999)
_TORCH_DEFAULT_PORT = 29500
_LOCALHOST = "127.0.0.1"


class WorldError(RuntimeError):
    """The environment does not describe a usable world, or the ranks did not meet.

    ``variables`` holds the (name, value) pairs that were read, so that the message says
    what the launcher actually set. Pickles with its fields (exceptions cross process
    boundaries in submitit and joblib), which a plain ``__init__`` override would break.
    """

    def __init__(self, message: str, variables: Iterable[tuple[str, str]] = ()):
        self.message = message
        self.variables = tuple(variables)
        super().__init__(message, self.variables)

    def __reduce__(self):
        return (type(self), (self.message, self.variables))

    def __str__(self) -> str:
        if not self.variables:
            return f"{self.message} (no launcher variables were set)"
        read = ", ".join(f"{name}={value}" for name, value in self.variables)
        return f"{self.message} (read: {read})"


@dataclasses.dataclass(frozen=True)
class WorldInfo:
    """This process's place in the world, as its launcher described it.

    ``local_world_size`` is None where the launcher does not say how many ranks share
    this node. ``variables`` are the (name, value) pairs read, in the order read.
    """

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int | None
    launcher: str
    variables: tuple[tuple[str, str], ...] = ()

    @property
    def env(self) -> dict[str, str]:
        return dict(self.variables)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def single_node(self) -> bool:
        """True when every rank runs on this node (as far as the launcher says)."""
        return self.world_size == 1 or self.local_world_size == self.world_size


class _Reader:
    """Reads environment variables and remembers the ones that were set."""

    def __init__(self, environ: Mapping[str, str]):
        self.environ = environ
        self.read: dict[str, str] = {}

    def get(self, *names: str) -> str | None:
        """The first of ``names`` that is set (an empty value counts as unset)."""
        for name in names:
            value = self.environ.get(name)
            if value is not None and value.strip() != "":
                self.read[name] = value
                return value.strip()
        return None

    def has(self, *names: str) -> bool:
        return any(self.environ.get(name, "").strip() != "" for name in names)

    @property
    def variables(self) -> tuple[tuple[str, str], ...]:
        return tuple(self.read.items())

    def error(self, message: str) -> WorldError:
        return WorldError(message, self.variables)

    def integer(self, value: str | None, name: str, *, minimum: int = 0) -> int | None:
        if value is None:
            return None
        try:
            number = int(value)
        except ValueError:
            raise self.error(f"{name}={value!r} is not an integer") from None
        if number < minimum:
            raise self.error(f"{name}={number} is below {minimum}")
        return number


def _check(reader: _Reader, launcher: str, rank, size, local_rank, local_size) -> WorldInfo:
    if rank >= size:
        raise reader.error(f"{launcher}: rank {rank} is not below the world size {size}")
    if local_size is not None:
        if local_size > size:
            raise reader.error(f"{launcher}: {local_size} local ranks but a world of {size}")
        if local_rank >= local_size:
            raise reader.error(f"{launcher}: local rank {local_rank} is not below the local size {local_size}")
    return WorldInfo(rank, size, local_rank, local_size, launcher, reader.variables)


def _triple(reader: _Reader, launcher: str, rank_names, size_names, local_names, local_size_names) -> WorldInfo:
    """Rank, size, local rank (and local size, if set) from one launcher's variables."""
    rank_s, size_s = reader.get(*rank_names), reader.get(*size_names)
    local_s, local_size_s = reader.get(*local_names), reader.get(*local_size_names)
    if rank_s is None or size_s is None:
        missing = rank_names[0] if rank_s is None else size_names[0]
        raise reader.error(f"{launcher}: {missing} is not set beside the launcher's other variables")
    rank = reader.integer(rank_s, rank_names[0])
    size = reader.integer(size_s, size_names[0], minimum=1)
    local_size = reader.integer(local_size_s, local_size_names[0], minimum=1) if local_size_names else None
    if local_s is None:
        if size != 1:
            raise reader.error(f"{launcher}: {local_names[0]} is not set (needed to pick this rank's device)")
        local_s = "0"
    local_rank = reader.integer(local_s, local_names[0])
    return _check(reader, launcher, rank, size, local_rank, local_size)


def _slurm_tasks_on_node(tasks_per_node: str | None, node_id: int | None) -> int | None:
    """Entry ``node_id`` of Slurm's compressed ``SLURM_STEP_TASKS_PER_NODE`` ("2(x3),1")."""
    if tasks_per_node is None or node_id is None:
        return None
    counts: list[int] = []
    for item in tasks_per_node.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if match is None:
            return None
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts[node_id] if node_id < len(counts) else None


def _mpi_world() -> tuple[int, int, int, int]:
    """(rank, size, local rank, local size) from MPI itself; imports mpi4py (MPI_Init)."""
    try:
        from mpi4py import MPI
    except Exception as exc:  # ImportError, or RuntimeError "cannot load MPI library"
        raise WorldError(f"mpi4py is needed here but cannot be used: {exc}") from exc
    world = MPI.COMM_WORLD
    node = world.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return world.Get_rank(), world.Get_size(), node.Get_rank(), node.Get_size()
    finally:
        node.Free()


def world_info_from_env(environ: Mapping[str, str] | None = None) -> WorldInfo:
    """This process's rank, world size and local rank, from its launcher's variables.

    Reads ``environ`` (default ``os.environ``) in the order of the module docstring.
    Raises :class:`WorldError`, naming what was read, when the variables contradict each
    other (a size without a rank, rank >= size, a value that is not an integer). Only a
    PMIx-only environment, which carries no size, asks MPI (mpi4py).
    """
    env = _Reader(os.environ if environ is None else environ)

    if env.has("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        if not env.has("RANK", "WORLD_SIZE"):
            env.get("LOCAL_RANK")
            raise env.error("torchrun: LOCAL_RANK is set without RANK and WORLD_SIZE")
        return _triple(env, "torchrun", ("RANK",), ("WORLD_SIZE",), ("LOCAL_RANK",), ("LOCAL_WORLD_SIZE",))

    if env.has("JSM_NAMESPACE_RANK", "JSM_NAMESPACE_SIZE"):
        # jsrun is not known to export a local size; Spectrum MPI's OMPI variable is.
        return _triple(
            env, "jsrun", ("JSM_NAMESPACE_RANK",), ("JSM_NAMESPACE_SIZE",),
            ("JSM_NAMESPACE_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK"),
            ("JSM_NAMESPACE_LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE"),
        )

    if env.has("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"):
        return _triple(
            env, "openmpi", ("OMPI_COMM_WORLD_RANK",), ("OMPI_COMM_WORLD_SIZE",),
            ("OMPI_COMM_WORLD_LOCAL_RANK",), ("OMPI_COMM_WORLD_LOCAL_SIZE",),
        )

    if env.has("PMI_RANK", "PMI_SIZE"):
        return _triple(env, "mpich", ("PMI_RANK",), ("PMI_SIZE",), ("MPI_LOCALRANKID",), ("MPI_LOCALNRANKS",))

    if env.has("SLURM_STEP_ID", "SLURM_STEPID"):
        env.get("SLURM_STEP_ID", "SLURM_STEPID")
        env.get("SLURM_JOB_ID", "SLURM_JOBID")
        rank_s = env.get("SLURM_PROCID")
        size_s = env.get("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS")
        local_s = env.get("SLURM_LOCALID")
        if rank_s is None or size_s is None or local_s is None:
            raise env.error("slurm: an srun step without SLURM_PROCID, SLURM_STEP_NUM_TASKS/SLURM_NTASKS or SLURM_LOCALID")
        node_s = env.get("SLURM_NODEID")
        tasks_s = env.get("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE")
        rank = env.integer(rank_s, "SLURM_PROCID")
        size = env.integer(size_s, "SLURM_STEP_NUM_TASKS", minimum=1)
        local_rank = env.integer(local_s, "SLURM_LOCALID")
        node_id = env.integer(node_s, "SLURM_NODEID")
        return _check(env, "slurm", rank, size, local_rank, _slurm_tasks_on_node(tasks_s, node_id))

    if env.has("PMIX_RANK"):
        rank = env.integer(env.get("PMIX_RANK"), "PMIX_RANK")
        env.get("PMIX_NAMESPACE")
        try:
            mpi_rank, size, local_rank, local_size = _mpi_world()
        except WorldError as exc:
            raise env.error(f"pmix: PMIX_RANK names no world size and MPI cannot be asked ({exc.message})") from exc
        if mpi_rank != rank:
            raise env.error(f"pmix: MPI says rank {mpi_rank} of {size}: mpi4py's MPI is not the launcher's")
        return _check(env, "pmix", rank, size, local_rank, local_size)

    # One process. Note what was seen (e.g. an sbatch shell's SLURM_PROCID), for messages.
    env.get("SLURM_PROCID")
    env.get("SLURM_NTASKS")
    return WorldInfo(0, 1, 0, 1, "single", env.variables)


# -- hosts of the allocation ----------------------------------------------------------


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets: "a[1,2],b" -> ["a[1,2]", "b"]."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "[":
            depth += 1
            if depth > 1:
                raise WorldError(f"nested brackets in the Slurm host list {text!r}")
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise WorldError(f"unbalanced ']' in the Slurm host list {text!r}")
        elif char == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise WorldError(f"unbalanced '[' in the Slurm host list {text!r}")
    items.append(text[start:])
    return [item.strip() for item in items if item.strip()]


def _expand_ranges(spec: str, whole: str) -> list[str]:
    """ "01-03,07" -> ["01", "02", "03", "07"]; a range keeps the width of its lower end."""
    values = []
    for part in spec.split(","):
        part = part.strip()
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if match is None:
            raise WorldError(f"bad range {part!r} in the Slurm host list {whole!r}")
        low, high = match.group(1), match.group(2) or match.group(1)
        if int(high) < int(low):
            raise WorldError(f"descending range {part!r} in the Slurm host list {whole!r}")
        width = len(low)
        values.extend(str(number).zfill(width) for number in range(int(low), int(high) + 1))
    return values


def _expand_item(item: str, whole: str) -> list[str]:
    """One comma item with any number of bracket groups, expanded left to right
    ("a[1-2]-b[3-4]" -> a1-b3, a1-b4, a2-b3, a2-b4, as Slurm orders them)."""
    open_at = item.find("[")
    if open_at < 0:
        return [item]
    close_at = item.index("]", open_at)
    prefix, spec, rest = item[:open_at], item[open_at + 1:close_at], item[close_at + 1:]
    tails = _expand_item(rest, whole)
    return [prefix + value + tail for value in _expand_ranges(spec, whole) for tail in tails]


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed host list ("node[01-03,07],gpu5") as host names, in order.

    Pure Python, because ``scontrol show hostnames`` needs Slurm's commands and config on
    the compute node and costs a process start. Handles zero padding, comma lists inside
    brackets, several bracket groups in one name, and suffixes after a bracket.
    """
    if nodelist.strip() in ("", "(null)"):
        return []
    return [host for item in _split_top_level(nodelist.strip()) for host in _expand_item(item, nodelist)]


def lsf_compute_hosts(environ: Mapping[str, str] | None = None) -> list[str]:
    """The compute hosts of an LSF job, in order, without the batch/launch node.

    Reads the file named by ``LSB_DJOB_HOSTFILE`` (one host per line, repeated once per
    slot), else ``LSB_HOSTS`` (the same list, space separated; LSF leaves it unset for
    large jobs). The rule for dropping the batch node (on Summit the first entry, a
    "batchN" host with one slot, where jsrun itself runs):

    - hosts whose name starts with "batch" or "login" are dropped;
    - then the first entry is dropped when it occurs only once while some other host
      occurs more than once (a one-slot launch node in front of multi-slot compute
      nodes); when every host has one slot, nothing more is dropped, since then the first
      entry is as much a compute host as the others.
    """
    environ = os.environ if environ is None else environ
    entries: list[str] = []
    hostfile = environ.get("LSB_DJOB_HOSTFILE", "").strip()
    if hostfile:
        try:
            with open(hostfile, encoding="utf-8") as handle:
                entries = handle.read().split()
        except OSError as exc:
            raise WorldError(f"cannot read LSB_DJOB_HOSTFILE: {exc}", [("LSB_DJOB_HOSTFILE", hostfile)]) from exc
    if not entries:
        entries = environ.get("LSB_HOSTS", "").split()
    return _lsf_hosts_from_entries(entries)


def _lsf_hosts_from_entries(entries: list[str]) -> list[str]:
    entries = [entry for entry in entries if not entry.lower().startswith(("batch", "login"))]
    if not entries:
        return []
    counts: dict[str, int] = {}
    for entry in entries:
        counts[entry] = counts.get(entry, 0) + 1
    if counts[entries[0]] == 1 and any(count > 1 for count in counts.values()):
        entries = entries[1:]
    return list(dict.fromkeys(entries))


def _allocation_first_host(environ: Mapping[str, str]) -> tuple[str, str] | None:
    """(host, where from) for the first compute host of a Slurm or LSF allocation."""
    for name in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"):
        value = environ.get(name, "").strip()
        if value:
            hosts = expand_nodelist(value)
            if hosts:
                return hosts[0], name
    if environ.get("LSB_DJOB_HOSTFILE") or environ.get("LSB_HOSTS"):
        hosts = lsf_compute_hosts(environ)
        if hosts:
            return hosts[0], "LSB_DJOB_HOSTFILE" if environ.get("LSB_DJOB_HOSTFILE") else "LSB_HOSTS"
    return None


# -- ports ------------------------------------------------------------------------------


def port_from_job_id(job_id: str) -> int:
    """A port in :data:`PORT_RANGE`, never 29500, the same for every rank of the job.

    A hash rather than ``job_id % N``, so that consecutive job ids do not land on
    consecutive ports that a neighbour job's derived port could also hit.
    """
    low, high = PORT_RANGE
    digest = int.from_bytes(hashlib.sha256(job_id.encode("utf-8")).digest()[:8], "big")
    port = low + digest % (high - low)  # high - low slots: the range less one port
    return port + 1 if port >= _TORCH_DEFAULT_PORT else port


def job_key(info: WorldInfo, environ: Mapping[str, str] | None = None) -> str | None:
    """An id shared by all ranks of this launch and (as far as the launcher allows)
    different between launches running at the same time; None if there is none.

    Per launcher, so that every rank reads the same variables: under ``mpirun`` inside a
    Slurm job only some ranks sit in an ``srun`` step, so Slurm's step id is used only
    when Slurm itself launched the ranks. Slurm: job and step id (two ``srun`` steps of a
    job run side by side). Open MPI: its per-``mpirun`` job id. torchrun: its run id.
    Otherwise the batch job's id (``LSB_JOBID`` with the array index, ``SLURM_JOB_ID``,
    ``PBS_JOBID``, ``FLUX_JOB_ID``).
    """
    environ = os.environ if environ is None else environ

    def get(name: str) -> str:
        return environ.get(name, "").strip()

    if info.launcher == "slurm":
        job, step = get("SLURM_JOB_ID") or get("SLURM_JOBID"), get("SLURM_STEP_ID") or get("SLURM_STEPID")
        if job:
            return f"slurm:{job}.{step}"
    if info.launcher == "torchrun" and get("TORCHELASTIC_RUN_ID") not in ("", "none"):
        return f"torchrun:{get('TORCHELASTIC_RUN_ID')}"
    if info.launcher == "openmpi" and get("OMPI_MCA_ess_base_jobid"):
        return f"openmpi:{get('OMPI_MCA_ess_base_jobid')}"
    if info.launcher in ("openmpi", "jsrun", "pmix") and get("PMIX_NAMESPACE"):
        return f"pmix:{get('PMIX_NAMESPACE')}"
    if info.launcher == "mpich" and get("PMI_JOBID"):
        return f"pmi:{get('PMI_JOBID')}"
    if get("LSB_JOBID"):
        return f"lsf:{get('LSB_JOBID')}[{get('LSB_JOBINDEX') or '0'}]"
    for name in ("SLURM_JOB_ID", "SLURM_JOBID", "PBS_JOBID", "FLUX_JOB_ID"):
        if get(name):
            return f"{name}:{get(name)}"
    return None


def free_port() -> int:
    """A TCP port the OS says is free now (bind to port 0).

    Another process can take it before rank 0's store binds it; the window is short, and
    it is the same race torchrun --standalone runs.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


# -- rendezvous -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rendezvous:
    """Where rank 0's store listens, and where each half of that came from."""

    addr: str
    port: int
    addr_from: str
    port_from: str
    hosts: tuple[str, ...] | None = None  # every rank's host name, when MPI gathered them


def _mpi_broadcast(info: WorldInfo, want_port: bool) -> tuple[tuple[str, ...], int | None]:
    """All ranks' host names, and a free port picked by rank 0, through MPI."""
    try:
        from mpi4py import MPI
    except Exception as exc:  # ImportError, or RuntimeError "cannot load MPI library"
        raise WorldError(f"mpi4py cannot be used: {exc}", info.variables) from exc
    world = MPI.COMM_WORLD
    if (world.Get_rank(), world.Get_size()) != (info.rank, info.world_size):
        # Typically a wheel's MPI that is not the launcher's: each rank is a singleton.
        raise WorldError(
            f"MPI says rank {world.Get_rank()} of {world.Get_size()}, the launcher rank "
            f"{info.rank} of {info.world_size}: mpi4py is linked to another MPI than the one "
            "that launched the ranks (set MASTER_ADDR and MASTER_PORT, or rebuild mpi4py)",
            info.variables,
        )
    hosts = tuple(world.allgather(socket.gethostname()))
    port = world.bcast(free_port() if want_port and info.rank == 0 else None, root=0)
    return hosts, port


def rendezvous(info: WorldInfo, environ: Mapping[str, str] | None = None) -> Rendezvous:
    """Rank 0's address and port for ``env://``, the same on every rank.

    Address: ``MASTER_ADDR``; else, for an MPI launcher with a usable mpi4py, rank 0's
    host name gathered with MPI (127.0.0.1 when all ranks share it); else 127.0.0.1 when
    the launcher says all ranks are on this node; else the first compute host of the
    Slurm or LSF allocation. Port: ``MASTER_PORT``; else the free port rank 0 broadcast
    along with its address (MPI, unique per launch); else one derived from the job id
    (:func:`job_key`); else, for one process, any free port. Never a fixed 29500: a fixed
    port collides between launches on one machine (docs/distributed.md).
    """
    environ = os.environ if environ is None else environ
    addr = environ.get("MASTER_ADDR", "").strip() or None
    port_s = environ.get("MASTER_PORT", "").strip() or None
    variables = info.variables + tuple((name, environ[name]) for name in ("MASTER_ADDR", "MASTER_PORT") if environ.get(name))
    addr_from = "MASTER_ADDR" if addr else ""
    port: int | None = None
    port_from = ""
    if port_s is not None:
        try:
            port = int(port_s)
        except ValueError:
            raise WorldError(f"MASTER_PORT={port_s!r} is not an integer", variables) from None
        if not 0 < port < 65536:
            raise WorldError(f"MASTER_PORT={port} is not a TCP port", variables)
        port_from = "MASTER_PORT"
    hosts = None
    mpi_problem = ""

    if addr is None and info.launcher in MPI_LAUNCHERS and info.world_size > 1:
        try:
            hosts, mpi_port = _mpi_broadcast(info, want_port=port is None)
        except WorldError as exc:
            mpi_problem = exc.message
        else:
            addr = _LOCALHOST if len(set(hosts)) == 1 else hosts[0]
            addr_from = "rank 0's host name via MPI"
            if port is None:
                port, port_from = mpi_port, "free port on rank 0 via MPI"
    if addr is None and info.single_node:
        addr, addr_from = _LOCALHOST, "all ranks on this node"
    if addr is None:
        found = _allocation_first_host(environ)
        if found is not None:
            addr, addr_from = found[0], f"first host of {found[1]}"
    if addr is None:
        hint = f" ({mpi_problem})" if mpi_problem else ""
        raise WorldError(
            f"cannot tell where rank 0 listens: set MASTER_ADDR, or launch with an MPI that "
            f"mpi4py can use{hint}", variables,
        )

    if port is None:
        key = job_key(info, environ)
        if key is not None:
            port, port_from = port_from_job_id(key), f"derived from job id {key}"
        elif info.world_size == 1:
            port, port_from = free_port(), "free port (one process)"
        else:
            hint = f" ({mpi_problem})" if mpi_problem else ""
            raise WorldError(
                f"cannot choose a port all {info.world_size} ranks agree on: set MASTER_PORT, run "
                f"inside a batch job, or launch with an MPI that mpi4py can use{hint}", variables,
            )
    return Rendezvous(addr, port, addr_from, port_from, hosts)


# -- device, backend, threads -----------------------------------------------------------


def _visible_devices(environ: Mapping[str, str]) -> list[str] | None:
    value = environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    return [item.strip() for item in value.split(",") if item.strip()]


def choose_device(info: WorldInfo, requested: str = "auto", environ: Mapping[str, str] | None = None):
    """The torch device this rank should use: ``requested`` is "cpu", "cuda" or "auto"
    (or "cuda:N", the harness's single-process setting, refused for several ranks since
    it would put every rank on GPU N).

    "auto" means CUDA when torch sees a GPU, else CPU; "cuda" without a GPU is an error.
    On CUDA: ``cuda:0`` when this process sees exactly one GPU (jsrun -g 1, srun
    --gpus-per-task=1 give each rank its own through ``CUDA_VISIBLE_DEVICES``), else
    ``cuda:<local_rank>``, which must be below the number of visible GPUs (two ranks on
    one GPU would fail later inside NCCL, with a worse message).
    """
    import torch

    environ = os.environ if environ is None else environ
    pinned = re.fullmatch(r"cuda:(\d+)", requested)
    if pinned is not None:
        if info.world_size > 1:
            raise WorldError(
                f"device {requested!r} would put all {info.world_size} ranks on one GPU: "
                "use 'cuda' or 'auto' (each rank takes its local GPU)", info.variables,
            )
        if not torch.cuda.is_available():
            raise WorldError(f"device {requested!r} was requested but torch sees no GPU", info.variables)
        return torch.device(requested)
    if requested not in ("cpu", "cuda", "auto"):
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'auto', not {requested!r}")
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise WorldError("device 'cuda' was requested but torch sees no GPU", info.variables)
    count = torch.cuda.device_count()
    if count == 1:
        return torch.device("cuda", 0)
    if info.local_rank >= count:
        visible = _visible_devices(environ)
        raise WorldError(
            f"local rank {info.local_rank} has no GPU of its own: {count} visible "
            f"(CUDA_VISIBLE_DEVICES={','.join(visible) if visible is not None else 'unset'})",
            info.variables,
        )
    return torch.device("cuda", info.local_rank)


def choose_backend(device) -> str:
    """nccl for a CUDA device where torch has NCCL, gloo otherwise (CPU, or no NCCL)."""
    import torch.distributed as dist

    kind = device.type if hasattr(device, "type") else str(device).split(":")[0]
    return "nccl" if kind == "cuda" and dist.is_nccl_available() else "gloo"


def default_threads(info: WorldInfo, environ: Mapping[str, str] | None = None) -> int:
    """torch threads for this rank: the CPUs this process may run on, shared by the ranks
    on its node, at least 1.

    An explicit ``OMP_NUM_THREADS`` wins (torchrun sets 1). Under Slurm,
    ``SLURM_CPUS_PER_TASK`` is the per-rank budget where set. Otherwise the affinity
    mask's size divided by the local ranks; where the launcher does not say how many
    ranks share the node, by the world size, since oversubscribing is the costly mistake
    (docs/distributed.md). Caveat:
    when the launcher already bound each rank to its own cores, the mask is per rank and
    the division undercounts; set OMP_NUM_THREADS then.
    """
    environ = os.environ if environ is None else environ
    explicit = environ.get("OMP_NUM_THREADS", "").strip()
    if explicit.isdigit() and int(explicit) > 0:
        return int(explicit)
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    per_task = environ.get("SLURM_CPUS_PER_TASK", "").strip()
    if info.launcher == "slurm" and per_task.isdigit() and int(per_task) > 0:
        return max(1, min(cpus, int(per_task)))
    sharing = info.local_world_size or info.world_size
    return max(1, cpus // max(1, sharing))


# -- the process group ------------------------------------------------------------------


@dataclasses.dataclass
class DistributedContext:
    """The started world: where this rank is, and the process group to close.

    ``backend`` is None and ``distributed`` False when no group was created (one
    process). ``hosts`` lists every rank's host name in rank order.
    """

    info: WorldInfo
    device: Any
    backend: str | None
    master_addr: str | None
    master_port: int | None
    hosts: tuple[str, ...]
    distributed: bool
    rendezvous: Rendezvous | None = None
    _closed: bool = dataclasses.field(default=False, repr=False)

    rank = property(lambda self: self.info.rank)
    world_size = property(lambda self: self.info.world_size)
    local_rank = property(lambda self: self.info.local_rank)
    local_world_size = property(lambda self: self.info.local_world_size)
    launcher = property(lambda self: self.info.launcher)
    is_main = property(lambda self: self.info.rank == 0)

    def close(self) -> None:
        """Destroy the process group this context created (once; later calls do nothing)."""
        if self.distributed and not self._closed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        self._closed = True

    def __enter__(self) -> "DistributedContext":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _set_env(name: str, value: str, variables) -> None:
    current = os.environ.get(name, "").strip()
    if current and current != value:
        raise WorldError(f"{name}={current} in the environment contradicts {value}", variables)
    os.environ[name] = value


def init_distributed(
    info: WorldInfo | None = None,
    *,
    device: str = "auto",
    timeout_s: float = 300.0,
) -> DistributedContext:
    """Start ``torch.distributed`` for this rank, whatever launched it.

    ``info`` defaults to :func:`world_info_from_env`. A world of one process gets no
    process group at all (aadl treats "no group" as one rank): there is nothing to
    meet, and Hydra's joblib workers inside one ``srun`` task would otherwise all bind
    the same derived port. Otherwise: sets ``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``,
    ``WORLD_SIZE`` and ``LOCAL_RANK`` where missing (so ``env://`` and child code see
    them), pins gloo to loopback when all ranks are on this node and
    ``GLOO_SOCKET_IFNAME`` is unset (the host name need not resolve to a usable address
    in containers), and calls ``init_process_group`` with ``timeout_s``. A rendezvous
    that fails or times out raises :class:`WorldError` naming the variables read and the
    address:port waited for.
    """
    info = world_info_from_env() if info is None else info
    torch_device = choose_device(info, device)
    hostname = socket.gethostname()
    if info.world_size == 1:
        return DistributedContext(info, torch_device, None, None, None, (hostname,), False)

    import datetime

    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        raise WorldError("a torch.distributed process group is already initialised", info.variables)
    meeting = rendezvous(info)
    variables = info.variables + tuple((n, os.environ[n]) for n in ("MASTER_ADDR", "MASTER_PORT") if os.environ.get(n))
    for name, value in (
        ("MASTER_ADDR", meeting.addr), ("MASTER_PORT", str(meeting.port)), ("RANK", str(info.rank)),
        ("WORLD_SIZE", str(info.world_size)), ("LOCAL_RANK", str(info.local_rank)),
    ):
        _set_env(name, value, variables)
    backend = choose_backend(torch_device)
    if backend == "gloo" and info.single_node and sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
    where = f"{meeting.addr}:{meeting.port} (address: {meeting.addr_from}; port: {meeting.port_from})"
    dist_error = getattr(dist, "DistError", RuntimeError)
    try:
        dist.init_process_group(
            backend, init_method="env://", rank=info.rank, world_size=info.world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    except (dist_error, RuntimeError, OSError, ValueError) as exc:
        timed_out = "timed out" in str(exc).lower() or "timeout" in str(exc).lower()
        what = f"timed out after {timeout_s:g} s" if timed_out else "failed"
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WorldError(
            f"{info.launcher}: rank {info.rank} of {info.world_size}: rendezvous at {where} {what}: {first_line}",
            variables,
        ) from exc
    try:
        gathered: list = [None] * info.world_size
        dist.all_gather_object(gathered, hostname)
    except BaseException:
        dist.destroy_process_group()
        raise
    return DistributedContext(
        info, torch_device, backend, meeting.addr, meeting.port, tuple(gathered), True, meeting,
    )
