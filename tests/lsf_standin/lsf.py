#!/usr/bin/env python3
"""A stand-in for the LSF commands Snakemake's LSF executor calls (bsub, bjobs, bkill, badmin,
lsclusters, bhist) and for `module`: each records how it was called (arguments and the
environment) in $FAKE_LSF_DIR/calls.jsonl, and bsub really runs the job, detached, on this
machine, so that a workflow submitted through the stand-in runs to its end. No LSF exists here;
this checks what would be submitted, with which settings. Installed as one file under several
names (the links beside it)."""

import fnmatch
import json
import os
import subprocess
import sys
from pathlib import Path

STATE = Path(os.environ["FAKE_LSF_DIR"])
JOBS = STATE / "jobs"


def record(name: str, argv: list[str]) -> None:
    STATE.mkdir(parents=True, exist_ok=True)
    keep = {k: v for k, v in os.environ.items() if k.startswith(("AADL_", "SNAKEMAKE", "LSB_", "LSF_"))}
    with open(STATE / "calls.jsonl", "a") as calls:
        calls.write(json.dumps({"command": name, "argv": argv, "env": keep}) + "\n")


def bsub(argv: list[str]) -> int:
    options, command = argv[:-1], argv[-1]
    value = lambda flag: options[options.index(flag) + 1] if flag in options else None
    JOBS.mkdir(parents=True, exist_ok=True)
    job_id = str(len(list(JOBS.glob("*.name"))) + 1001)
    (JOBS / f"{job_id}.name").write_text(value("-J") or "")
    log = value("-o") or os.devnull
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    subprocess.Popen([sys.executable, __file__, "--run", job_id, value("-cwd") or os.getcwd(), log, command],
                     start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(f"Job <{job_id}> is submitted to queue <{value('-q') or 'batch'}>.")
    return 0


def run(job_id: str, cwd: str, log: str, command: str) -> int:
    env = {**os.environ, "LSB_JOBID": job_id}
    with open(log, "a") as out:
        status = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    (JOBS / f"{job_id}.status").write_text(str(status))
    return 0


def bjobs(argv: list[str]) -> int:
    pattern = argv[argv.index("-aJ") + 1] if "-aJ" in argv else "*"
    for name_file in sorted(JOBS.glob("*.name")):
        job_id = name_file.stem
        if not fnmatch.fnmatchcase(name_file.read_text(), pattern):
            continue
        status_file = JOBS / f"{job_id}.status"
        state = "RUN" if not status_file.exists() else ("DONE" if status_file.read_text().strip() == "0" else "EXIT")
        print(f"{job_id} {state}")
    return 0


def badmin(argv: list[str]) -> int:
    print("MBD configuration at Mon Dec  7 00:00:00 2026")
    print(f"    LSF_CONFDIR = {STATE / 'conf'}")
    print(f"    LSB_SHAREDIR = {STATE / 'share'}")
    params = STATE / "conf" / "lsbatch" / "standin" / "configdir" / "lsb.params"
    params.parent.mkdir(parents=True, exist_ok=True)
    params.write_text("Begin Parameters\nDEFAULT_QUEUE = batch\nEnd Parameters\n")
    return 0


def main() -> int:
    if sys.argv[1:2] == ["--run"]:
        return run(*sys.argv[2:6])
    name = Path(sys.argv[0]).name
    record(name, sys.argv[1:])
    if name == "bsub":
        return bsub(sys.argv[1:])
    if name == "bjobs":
        return bjobs(sys.argv[1:])
    if name == "badmin":
        return badmin(sys.argv[1:])
    if name == "lsclusters":
        print("CLUSTER_NAME   STATUS   MASTER_HOST   ADMIN")
        print("standin        ok       localhost     lsfadmin")
        return 0
    if name == "bhist":
        return 0  # no earlier jobs: no project to guess
    return 0  # bkill, module: recorded only


if __name__ == "__main__":
    sys.exit(main())
