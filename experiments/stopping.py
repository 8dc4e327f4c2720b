"""How a run stops on a signal, and the exit status a scheduler reads from it.

Preempted means exit status 75 (``PREEMPTED_EXIT``, EX_TEMPFAIL) for every way a run is
started: a single run, a seed group, a multirun's parent, the ranks of torchrun, srun or
mpirun, and ``python -m experiments.torchrun`` (torchrun itself exits 1 for any failed
rank). The batch scripts requeue on 75.

This module imports only the standard library (and experiments.errors), because
``python -m experiments.run`` calls :func:`command_line` before it imports hydra or torch:
a signal that Slurm or LSF sends while Python starts (seconds, on a shared file system)
must be recorded, not kill the process with 128+signal and no checkpoint. It also owns
:class:`RunPreempted`, so that every module raises and catches one class: the entry point
runs ``experiments.run`` under its own name, never as ``__main__``, where a second copy of
each class would not catch the first (a preempted seed group used to exit 1).

The pieces, in the order a process meets them:

* :func:`record_signals`: from then on a stop signal only records its name; the training
  loop reads it (:func:`arrived`) between two steps, checkpoints and raises RunPreempted.
* :func:`end_with_parent`: a rank started by torchrun gets SIGTERM when its agent dies
  (Linux parent-death signal), so ``kill -9`` of torchrun ends its ranks as preempted
  instead of leaving them training.
* rank status files: under ``python -m experiments.torchrun`` each rank writes the status
  it exits with (:data:`RANK_STATUS_ENV`), so the wrapper can exit 75 where torchrun says 1.
* a sweep (``-m`` with the joblib launcher): its parent passes a stop to every worker
  that is running a run (:func:`stop_sweep_workers`), a worker that got the signal itself,
  busy or idle, passes it to the parent (:func:`notify_sweep`), jobs not yet started do
  not start (:func:`sweep_stopping`), and the parent exits 75 once every worker has
  checkpointed.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Optional

from experiments.errors import HarnessError

#: The signals that stop a run between two steps and checkpoint it: SIGTERM (scancel,
#: kill, torchrun's forwarding), SIGUSR1 (Slurm's --signal, LSF's -wa), SIGUSR2 (LSF's
#: run-limit warning), SIGINT (Ctrl-C).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)
#: The exit status of a run stopped by a signal after saving its checkpoint (EX_TEMPFAIL).
PREEMPTED_EXIT = 75
#: Where a rank writes the status it exits with (set by python -m experiments.torchrun).
RANK_STATUS_ENV = "AADL_RANK_STATUS_DIR"
#: "<host>:<pid>" of a joblib sweep's parent, and the file that says the sweep is stopping.
SWEEP_PARENT_ENV = "AADL_SWEEP_PARENT"
SWEEP_STOP_ENV = "AADL_SWEEP_STOP_FILE"


class RunPreempted(HarnessError):
    """A run stopped by a signal after saving a checkpoint; rerunning resumes it."""

    def __init__(self, path: str, signal_name: str, step: int):
        self.path, self.signal_name, self.step = path, signal_name, step
        super().__init__(
            f"preempted by {signal_name}: {path} (checkpoint at step {step}; rerun the same command to resume)"
        )

    def __reduce__(self):
        return (type(self), (self.path, self.signal_name, self.step))


# -- recording signals ---------------------------------------------------------------------

_arrived: list[str] = []
_recording = False
_tell_sweep = False


def _record(signum: int, frame: Any) -> None:
    _arrived.append(signal.Signals(signum).name)
    if _tell_sweep and len(_arrived) == 1:
        notify_sweep(_arrived[0])


def record_signals() -> None:
    """From now on, for the rest of this process, a stop signal only records its name.

    For processes that exist to train (the command line, a sweep's worker): a signal
    between two runs of a worker, or while Python starts, is kept for the next check. A
    sweep's worker also passes the first one to the sweep's parent, whether it is running
    a job or waiting for one (a scheduler may signal any one process of the job)."""
    global _recording, _tell_sweep
    _tell_sweep = in_sweep_worker()
    for sig in STOP_SIGNALS:
        signal.signal(sig, _record)
    _recording = True
    if hasattr(signal, "pthread_sigmask"):  # a sweep's worker is born with them blocked
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def recording() -> bool:
    """Whether :func:`record_signals` is in charge of this process's stop signals."""
    return _recording


def arrived() -> Optional[str]:
    """The name of the first stop signal recorded, or None."""
    return _arrived[0] if _arrived else None


# -- torchrun: ranks that end with their agent, and the status they end with -------------

_PR_SET_PDEATHSIG = 1


def end_with_parent(environ: Optional[dict] = None) -> bool:
    """Under torchrun, ask Linux for SIGTERM when this rank's parent (the agent) dies.

    torchrun starts its ranks in sessions of their own, so nothing else reaches them when
    the agent is killed with SIGKILL: they would train on, unwatched. With the signal they
    checkpoint and exit 75 like any preempted run. Returns whether it was set."""
    environ = os.environ if environ is None else environ
    if not environ.get("TORCHELASTIC_RUN_ID") or not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent:  # the agent died before the request: act as if now
        os.kill(os.getpid(), signal.SIGTERM)
    return True


def _rank_status_path(environ: Optional[dict] = None) -> Optional[Path]:
    environ = os.environ if environ is None else environ
    folder = environ.get(RANK_STATUS_ENV)
    if not folder:
        return None
    return Path(folder) / f"rank-{environ.get('RANK', '0')}.json"


def _write_json(path: Path, payload: dict) -> None:
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(json.dumps(payload))
    os.replace(temp, path)


def exit_code(error: SystemExit) -> int:
    """The status a process ends with for ``sys.exit(error.code)``."""
    if error.code is None:
        return 0
    return error.code if isinstance(error.code, int) else 1


# -- sweeps --------------------------------------------------------------------------------

_sweep_stopped: list[str] = []


def _this_process() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def start_sweep(stop_file: Path) -> None:
    """In a multirun's parent, before its launcher starts workers: tell them (through the
    environment they inherit) who the parent is and which file says the sweep stops, and
    make a stop signal stop the sweep instead of the parent alone."""
    try:
        stop_file.unlink(missing_ok=True)  # from an earlier sweep into the same folder
    except OSError:
        pass
    os.environ[SWEEP_PARENT_ENV] = _this_process()
    os.environ[SWEEP_STOP_ENV] = str(stop_file)

    lock = threading.RLock()  # the handler may run again inside itself (main thread)

    def stop(signum: int) -> None:
        with lock:
            if _sweep_stopped:
                return  # the workers were told; each tells this process once more when it stops
            name = signal.Signals(signum).name
            print(f"sweep stopping on {name}: every running job checkpoints; jobs not started are left", file=sys.stderr, flush=True)
            _sweep_stopped.append(name)
            try:
                stop_file.parent.mkdir(parents=True, exist_ok=True)
                stop_file.write_text(name)
            except OSError:
                pass  # the workers running now are still told below
            stop_sweep_workers()

    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda signum, frame: stop(signum))
    if hasattr(signal, "pthread_sigmask"):
        # Workers started from now on inherit the stop signals blocked: a worker that has
        # no job yet holds one pending (record_signals unblocks it with its first job)
        # instead of dying of it and breaking the pool, as a signal to every process of a
        # job step would. This process takes them in a thread of its own.
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)

        def wait() -> None:
            while True:
                stop(signal.sigwait(STOP_SIGNALS))

        threading.Thread(target=wait, name="aadl-sweep-signals", daemon=True).start()


def sweep_stopped() -> Optional[str]:
    """In a multirun's parent: the signal that stopped the sweep, or None."""
    return _sweep_stopped[0] if _sweep_stopped else None


def _catches(pid: int, sig: int) -> Optional[bool]:
    """Whether process ``pid`` has a handler for ``sig`` (Linux /proc), None if unknown."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    except (OSError, ValueError, IndexError):
        return None
    return None


def stop_sweep_workers() -> None:
    """SIGTERM to each worker of this process that is ready for it (it records stop
    signals: it runs or has run a job). A worker still starting would die of it and take
    the pool down with it; it reads the stop file before its first job instead."""
    import psutil

    for child in psutil.Process().children(recursive=True):
        if _catches(child.pid, signal.SIGTERM) is False:
            continue  # a resource tracker, or a worker that has not started a job
        try:
            child.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass


def in_sweep_worker() -> bool:
    """Whether this process is a worker of a sweep whose parent is this process's parent
    (the joblib launcher); a submitit job on another node is not."""
    return os.environ.get(SWEEP_PARENT_ENV) == f"{socket.gethostname()}:{os.getppid()}"


def sweep_stopping_file() -> Optional[str]:
    """In a sweep's worker: the signal named by the parent's stop file, or None."""
    stop_file = os.environ.get(SWEEP_STOP_ENV)
    if not stop_file or not in_sweep_worker():
        return None
    try:
        return Path(stop_file).read_text().strip() or "SIGTERM"
    except OSError:
        return None


def sweep_stopping() -> Optional[str]:
    """In a sweep's worker: the signal that stops the sweep (this process's own, or the
    parent's stop file), or None."""
    return arrived() or sweep_stopping_file()


def notify_sweep(signal_name: str) -> None:
    """In a sweep's worker that a signal reached: pass it to the parent, which stops the
    other workers, unless the parent's stop file says it knows."""
    if in_sweep_worker() and not sweep_stopping_file():
        try:
            os.kill(os.getppid(), signal.Signals[signal_name])
        except (KeyError, OSError):
            pass


# -- the command line ----------------------------------------------------------------------


def command_line(main: Callable[[], Any]) -> int:
    """Run ``main`` (imported lazily by the caller) as ``python -m experiments.run``:
    signals recorded from the first instant, the torchrun agent watched, the exit status
    written where python -m experiments.torchrun reads it. Returns the exit status."""
    record_signals()
    end_with_parent()
    status_file = _rank_status_path()
    if status_file is not None:
        try:
            _write_json(status_file, {"pid": os.getpid(), "status": None})
        except OSError:
            status_file = None
    code = 1
    try:
        main()
        code = 0
        stopped = sweep_stopped()
        if stopped:
            print(
                f"sweep stopped by {stopped}: its running jobs checkpointed and are recorded as preempted; "
                "rerun the same command to finish it", file=sys.stderr, flush=True,
            )
            code = PREEMPTED_EXIT
    except SystemExit as error:
        code = exit_code(error)
        if not isinstance(error.code, (int, type(None))):
            print(error.code, file=sys.stderr, flush=True)
    finally:
        if status_file is not None:
            try:
                _write_json(status_file, {"pid": os.getpid(), "status": code})
            except OSError:
                pass
    return code
