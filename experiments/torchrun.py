"""``python -m experiments.torchrun [torchrun options] -m experiments.run [overrides]``:
torchrun with signals and an exit status that a batch script can act on.

torchrun alone is not enough for preemption: it forwards only SIGTERM, SIGINT, SIGHUP and
SIGQUIT by default (Slurm's ``--signal=USR1`` kills the agent with status 138 while its
ranks train on), and it exits 1 when any rank fails, whatever the ranks exited with, so a
preempted job (every rank checkpointed and exited 75) looks failed and is not requeued.
This wrapper:

* runs ``torchrun --signals-to-handle=SIGTERM,SIGINT,SIGUSR1,SIGUSR2`` (a later
  ``--signals-to-handle`` on the command line wins) in a session of its own, and passes
  the first of those signals to it (a second copy to torchrun during its shutdown would
  cut the ranks' checkpoint short); torchrun passes it to the ranks and waits
  ``--shutdown-timeout`` seconds (default 30) before SIGKILL: raise it where a
  checkpoint takes longer;
* has each rank write the status it exits with (experiments.stopping.RANK_STATUS_ENV);
* exits 0 when torchrun did, 75 when every rank of this node exited 75 (preempted), and
  torchrun's own status otherwise.

Ranks end when their agent does (experiments.stopping.end_with_parent: parent-death
SIGTERM), and torchrun ends when this wrapper is killed, so ``kill -9`` of either still
ends in checkpoints. One wrapper per node, as torchrun is started (``srun --ntasks-per-node=1
python -m experiments.torchrun --nnodes=$NODES --rdzv-backend=c10d ...``); each node's
wrapper reports its own ranks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

from experiments.stopping import PREEMPTED_EXIT, RANK_STATUS_ENV, STOP_SIGNALS

#: The signals torchrun passes to its ranks under this wrapper.
HANDLED = "SIGTERM,SIGINT,SIGUSR1,SIGUSR2"
#: How long ranks still running after torchrun ended (its agent was killed) may take to
#: checkpoint and write their status.
RANK_WAIT_SECONDS = 120.0


def torchrun_command(argv: Sequence[str]) -> list[str]:
    """The torchrun command line for ``argv`` (the wrapper's arguments). The signals go
    first: a ``--signals-to-handle`` in ``argv`` comes later and wins."""
    return [sys.executable, "-m", "torch.distributed.run", f"--signals-to-handle={HANDLED}", *argv]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def rank_statuses(folder: Path, wait_s: float = RANK_WAIT_SECONDS) -> list[Optional[int]]:
    """The exit statuses the ranks wrote into ``folder`` (None: a rank that ended without
    writing one, e.g. killed), after waiting up to ``wait_s`` for ranks still running."""
    deadline = time.monotonic() + wait_s
    while True:
        records = []
        for path in sorted(folder.glob("rank-*.json")):
            try:
                records.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                records.append({"pid": None, "status": None})
        running = [r for r in records if r.get("status") is None and r.get("pid") and _alive(r["pid"])]
        if not running or time.monotonic() > deadline:
            return [r.get("status") for r in records]
        time.sleep(0.2)


def job_status(torchrun_status: int, ranks: list[Optional[int]]) -> int:
    """What the job exits with: 0 if torchrun succeeded, 75 if every rank here was
    preempted, otherwise torchrun's status (a signal's as 128+signal)."""
    if torchrun_status == 0:
        return 0
    if ranks and all(status == PREEMPTED_EXIT for status in ranks):
        return PREEMPTED_EXIT
    return 128 - torchrun_status if torchrun_status < 0 else torchrun_status


def _die_with_parent() -> None:
    from experiments.stopping import _PR_SET_PDEATHSIG

    try:
        import ctypes

        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stderr)
        return 0 if argv else 2
    with tempfile.TemporaryDirectory(prefix="aadl-ranks-") as folder:
        env = {**os.environ, RANK_STATUS_ENV: folder}
        linux = sys.platform.startswith("linux")
        process = subprocess.Popen(
            torchrun_command(argv), env=env, start_new_session=True, preexec_fn=_die_with_parent if linux else None,
        )

        forwarded: list[int] = []

        def forward(signum: int, frame: object) -> None:
            if forwarded:
                return  # torchrun is shutting down its ranks already
            forwarded.append(signum)
            try:
                process.send_signal(signum)
            except OSError:
                pass

        for sig in (*STOP_SIGNALS, signal.SIGHUP):
            signal.signal(sig, forward)
        status = process.wait()
        ranks = rank_statuses(Path(folder))
        result = job_status(status, ranks)
        if result == PREEMPTED_EXIT:
            print(
                f"experiments.torchrun: all {len(ranks)} rank(s) checkpointed and exited {PREEMPTED_EXIT} (preempted; "
                f"torchrun itself exited {status}): exiting {PREEMPTED_EXIT}, rerun the same command to resume",
                file=sys.stderr, flush=True,
            )
        return result


if __name__ == "__main__":
    sys.exit(main())
