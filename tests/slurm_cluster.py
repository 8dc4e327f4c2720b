"""A small client for the real single-node Slurm that ``bash .ci/slurm start`` runs.

Plain functions over the Slurm commands (``sbatch``, ``squeue``, ``scontrol``, ``scancel``):

* ``available() -> bool``: the controller answers and a node is idle, allocated or mixed.
* ``submit(script, *, env=None, cwd=None, extra_args=()) -> str``: ``sbatch --parsable``; the
  job id.
* ``wait(job_id, timeout=60.0) -> JobEnd``: polls until the job has ended; its state and exit
  code, read from ``scontrol show job`` (there is no accounting, so ``sacct`` does not work).
* ``job_info(job_id) -> dict[str, str]``: ``scontrol show job`` parsed into a dict.
* ``cancel(job_id, signal=None, *, batch=False)``: ``scancel`` (with ``--signal``).

The fixture ``slurm`` gives a ``Cluster`` that offers the same calls and cancels the jobs it
submitted that are still queued or running when the test ends. Where no cluster answers it fails
the test under CI (``CI`` set: CI must start the service, never skip for want of it) and skips it
elsewhere. Test modules import it explicitly::

    from slurm_cluster import slurm  # noqa: F401  (the fixture)
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence, Union

import pytest

STATE_DIR = Path(os.environ.get("AADL_SLURM_DIR", "/tmp/aadl-slurm"))
DEFAULT_CONF = Path("/etc/slurm/slurm.conf")
NOT_UP = "no Slurm cluster answers: run `bash .ci/slurm start` first (it was not run, or it failed)"

# States in which a job is over; anything else (PENDING, RUNNING, COMPLETING, REQUEUED,
# SUSPENDED, ...) is still on its way.
FINAL_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "PREEMPTED",
        "OUT_OF_MEMORY",
        "BOOT_FAIL",
        "DEADLINE",
        "SPECIAL_EXIT",
    }
)
_COMMAND_TIMEOUT = 30.0
_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9_:/]*=")


class SlurmError(RuntimeError):
    """A Slurm command failed, or a job did not end in time."""


def _environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    # Slurm's commands need a config: the default path, or the state directory's copy.
    if "SLURM_CONF" not in env and not DEFAULT_CONF.is_file() and (STATE_DIR / "slurm.conf").is_file():
        env["SLURM_CONF"] = str(STATE_DIR / "slurm.conf")
    if extra:
        env.update({str(key): str(value) for key, value in extra.items()})
    return env


def _run(args: Sequence[str], *, input: str | None = None, env: Mapping[str, str] | None = None,
         cwd: str | os.PathLike | None = None, check: bool = True) -> subprocess.CompletedProcess:
    try:
        result = subprocess.run(
            list(args), input=input, env=env or _environment(), cwd=cwd, capture_output=True,
            text=True, timeout=_COMMAND_TIMEOUT,
        )
    except FileNotFoundError as error:
        raise SlurmError(f"{args[0]} not found: {NOT_UP}") from error
    except subprocess.TimeoutExpired as error:
        raise SlurmError(f"{' '.join(args)} did not answer in {_COMMAND_TIMEOUT:.0f}s") from error
    if check and result.returncode != 0:
        raise SlurmError(f"{' '.join(args)} exited {result.returncode}: {result.stderr.strip()}")
    return result


def available() -> bool:
    """True iff the controller answers and some node is idle, allocated or mixed."""
    try:
        result = _run(["sinfo", "-h", "-o", "%t"], check=False)
    except SlurmError:
        return False
    states = result.stdout.split()
    return result.returncode == 0 and any(state in ("idle", "alloc", "mix") for state in states)


def submit(
    script: Union[str, os.PathLike],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
    extra_args: Iterable[str] = (),
) -> str:
    """Submits a batch job with ``sbatch --parsable``; returns its job id.

    ``script`` is a path (a ``PathLike``, or a ``str`` of one line that does not start with
    ``#!``) or the script's text (a ``str`` starting with ``#!`` or of several lines; given
    without a ``#!`` line it gets ``#!/bin/bash``). ``env`` adds variables to this process's
    environment, which sbatch passes on to the job whole. ``cwd`` is where sbatch runs, so
    the job's working directory (and where relative ``-o`` paths land). ``extra_args`` go to
    sbatch before the script (``("-o", str(tmp_path / "%j.out"))``, ``("-n", "2")``, ...).
    """
    args = ["sbatch", "--parsable", *map(str, extra_args)]
    text: str | None = None
    if isinstance(script, os.PathLike) or ("\n" not in script and not script.startswith("#!")):
        args.append(os.fspath(script))
    else:
        text = script if script.startswith("#!") else "#!/bin/bash\n" + script
    result = _run(args, input=text, env=_environment(env), cwd=cwd)
    job_id = result.stdout.strip().split(";")[0]
    if not job_id.isdigit():
        raise SlurmError(f"sbatch printed no job id: {result.stdout!r} {result.stderr!r}")
    return job_id


def job_info(job_id: str | int) -> dict[str, str]:
    """``scontrol show job -o JOB`` as a dict (``JobState``, ``ExitCode``, ``Reason``, ``StdOut``,
    ``RestartCnt``, ...). For a job array, or a het job, the first record."""
    result = _run(["scontrol", "show", "job", "-o", str(job_id)])
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    if not lines:
        raise SlurmError(f"scontrol knows no job {job_id}")
    return parse_record(lines[0])


def parse_record(line: str) -> dict[str, str]:
    """One ``scontrol show -o`` record (``Key=value Key=value ...``) as a dict; a word without a
    ``Key=`` of its own continues the previous value (values may hold spaces)."""
    info: dict[str, str] = {}
    key = None
    for word in line.split():
        if _KEY.match(word):
            key, _, value = word.partition("=")
            info[key] = value
        elif key is not None:
            info[key] += " " + word
    return info


@dataclass(frozen=True)
class JobEnd:
    """How a job ended: ``state`` (``COMPLETED``, ``FAILED``, ``CANCELLED``, ...), the exit code
    and signal of its batch script (``ExitCode=3:0`` gives 3 and 0), and the full record."""

    job_id: str
    state: str
    exit_code: int
    signal: int
    info: dict = field(repr=False, compare=False)


def _state(info: Mapping[str, str]) -> str:
    # "CANCELLED by 0" is one state; keep its first word.
    return info.get("JobState", "").split()[0] if info.get("JobState") else ""


def wait(job_id: str | int, timeout: float = 60.0, *, poll: float = 0.2) -> JobEnd:
    """Waits until the job has ended (polling ``squeue``, then ``scontrol``); its ``JobEnd``.
    Raises ``SlurmError`` after ``timeout`` seconds with the job's last record."""
    deadline = time.monotonic() + timeout
    while True:
        queued = _run(["squeue", "-h", "-j", str(job_id), "-o", "%T"], check=False)
        states = queued.stdout.split()
        if queued.returncode != 0 or not states or all(state in FINAL_STATES for state in states):
            info = job_info(job_id)
            state = _state(info)
            if state in FINAL_STATES:
                code, _, signal = info.get("ExitCode", "0:0").partition(":")
                return JobEnd(str(job_id), state, int(code or 0), int(signal or 0), info)
        if time.monotonic() >= deadline:
            try:
                last = job_info(job_id)
            except SlurmError as error:
                last = {"error": str(error)}
            raise SlurmError(f"job {job_id} not over after {timeout:.0f}s: {last}")
        time.sleep(poll)


def cancel(job_id: str | int, signal: str | None = None, *, batch: bool = False) -> None:
    """``scancel`` the job; with ``signal`` (``"USR1"``), sends it instead of ending the job: to
    its steps and its batch script with every process of it (``--full``), or to the batch
    script's process alone (``batch=True``, ``--batch``). By default scancel's signal reaches
    the srun steps only, not the batch script."""
    args = ["scancel"]
    if signal is not None:
        args += [f"--signal={signal}", "--batch" if batch else "--full"]
    _run([*args, str(job_id)])


class Cluster:
    """The module's calls, remembering the jobs submitted through it so that they can be
    cancelled at the end of the test."""

    available = staticmethod(available)
    job_info = staticmethod(job_info)
    wait = staticmethod(wait)
    cancel = staticmethod(cancel)

    def __init__(self) -> None:
        self.jobs: list[str] = []

    def submit(self, script: Union[str, os.PathLike], **kwargs) -> str:
        job_id = submit(script, **kwargs)
        self.jobs.append(job_id)
        return job_id

    def cancel_unfinished(self) -> None:
        for job_id in self.jobs:
            try:
                if _state(job_info(job_id)) not in FINAL_STATES:
                    cancel(job_id)
            except SlurmError:
                pass


_UNAVAILABLE: list[bool] = []  # set once no cluster answered: later tests do not wait again


def require_cluster() -> None:
    """Fails (under CI) or skips (elsewhere) unless a cluster answers."""
    if _UNAVAILABLE or not available():
        _UNAVAILABLE.append(True)
        if os.environ.get("CI"):
            pytest.fail(NOT_UP)
        pytest.skip(NOT_UP)


@pytest.fixture
def slurm():
    """A ``Cluster`` for the running test cluster; cancels this test's unfinished jobs after it."""
    require_cluster()
    cluster = Cluster()
    yield cluster
    cluster.cancel_unfinished()
