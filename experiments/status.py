"""Where a campaign stands: ``python -m experiments.status [PRESET|DIR ...]``.

For a paper preset (``configs/paper/<name>.yaml``) the expected runs are its sweep's jobs
(every configuration x seed, composed and validated as ``-m +paper=<name>`` would run them);
each is found at its run directory and classified by the reader the figures use
(:func:`experiments.analysis.aggregate.check_run`), so a run this table calls complete is
exactly a run a figure averages. Unfinished runs are split by the status they recorded
(running, preempted, failed, interrupted); a run recorded as running whose Slurm or LSF job
has ended is ``lost`` (killed without a chance to record it: resume it). A folder
argument lists the runs found under it (nothing can be called missing there).

    python -m experiments.status fig2                  # table; exit 0 only when complete
    python -m experiments.status fig2 --missing        # SEEDS=3,7,12 and Hydra overrides
    python -m experiments.status fig2 --json           # the same, for scripts
    python -m experiments.status fig2 output.root=/scratch/runs   # overrides apply to the sweep

Exit status: 0 complete, 1 not complete (something to run or look at), 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from experiments.analysis.aggregate import (
    METRICS_FILE, RunCheck, check_run, find_run_dirs,
)
from experiments.seed_groups import compact_seeds

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs" / "paper"
#: States in table order. Those of RERUN are what ``--missing`` lists: a new job runs or
#: resumes them (finished seeds of the same job are skipped by the harness).
STATES = ("complete", "running", "preempted", "lost", "failed", "interrupted", "diverged", "damaged", "missing")
RERUN = ("missing", "preempted", "lost", "failed", "interrupted")
#: Exit statuses.
COMPLETE, INCOMPLETE, BAD_INPUT = 0, 1, 2


class StatusError(Exception):
    """Bad input: a name that is no preset or folder, a sweep that does not compose."""


@dataclass
class RunState:
    variant: str
    seed: int
    state: str                      # one of STATES
    path: str
    detail: str = ""                # the reason, the failed run's last log line
    host: str | None = None
    job: str | None = None          # "1234_5" (array job _ element), "1234", LSF "1234[5]"
    step: int | None = None         # last step in metrics.csv
    checkpoint: int | None = None   # newest checkpoint's step: where a rerun resumes


@dataclass
class Campaign:
    """One preset's (or folder's) runs."""

    name: str
    kind: str                                   # "preset" or "folder"
    overrides: list[str] = field(default_factory=list)
    runs: list[RunState] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return bool(self.runs) and all(run.state == "complete" for run in self.runs)

    def rerun_seeds(self) -> list[int]:
        return sorted({run.seed for run in self.runs if run.state in RERUN})

    def totals(self) -> dict[str, Counter]:
        totals: dict[str, Counter] = {}
        for run in self.runs:
            totals.setdefault(run.variant, Counter())[run.state] += 1
        return totals


# --------------------------------------------------------------------------------------------
# Expected runs of a preset
# --------------------------------------------------------------------------------------------


def expected_runs(preset: str, overrides: Sequence[str] = ()) -> list[tuple[str, int, Path]]:
    """(variant, seed, run directory) of every job of ``-m +paper=<preset> <overrides>``, in
    launch order. One configuration is validated once: the seed is not part of a run's
    identity, so its other seeds' directories differ only in ``seed=<n>``."""
    from experiments.compose import compose, sweep_overrides
    from experiments.errors import HarnessError
    from experiments.identity import run_path
    from experiments.validation import validate

    # Seed batching is not part of the identity; composing one seed per job keeps the
    # batching checks (which import the model code) out of a status query.
    jobs = sweep_overrides([f"+paper={preset}", *overrides, "train.batch_seeds=1"])
    found, validated = [], {}
    for job in jobs:
        seeds = [item for item in job if item.startswith("seed=")]
        seed = int(seeds[-1].split("=", 1)[1]) if seeds else None
        key = tuple(item for item in job if not item.startswith("seed="))
        try:
            if key not in validated:
                validated[key] = validate(compose(*job))
            run = validated[key]
        except HarnessError as error:
            raise StatusError(f"{preset}: {error}") from None
        cfg = run.config
        seed = cfg.seed if seed is None else seed
        found.append((run.variant, seed, run_path(cfg.output.root, cfg.experiment, cfg.output.name, run.variant, run.config_id, seed)))
    return found


# --------------------------------------------------------------------------------------------
# One run's state
# --------------------------------------------------------------------------------------------


def job_text(job: Any) -> str | None:
    """A run's recorded scheduler ids (results.scheduler_job) as one job id."""
    if not isinstance(job, dict):
        return None
    if job.get("SLURM_ARRAY_JOB_ID") and job.get("SLURM_ARRAY_TASK_ID"):
        return f"{job['SLURM_ARRAY_JOB_ID']}_{job['SLURM_ARRAY_TASK_ID']}"
    if job.get("SLURM_JOB_ID"):
        return str(job["SLURM_JOB_ID"])
    if job.get("LSB_JOBID"):
        index = job.get("LSB_JOBINDEX")
        return f"{job['LSB_JOBID']}[{index}]" if index and str(index) != "0" else str(job["LSB_JOBID"])
    return None


def _latest(meta: dict[str, Any], key: str) -> Any:
    """``key`` of the newest segment: the last resumption's, else the start's."""
    resumed = meta.get("resumed")
    if isinstance(resumed, list) and resumed and isinstance(resumed[-1], dict) and key in resumed[-1]:
        return resumed[-1][key]
    return meta.get(key)


def _last_step(path: Path) -> int | None:
    """The step of metrics.csv's last whole row (a running run may be writing one)."""
    try:
        lines = (path / METRICS_FILE).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    if len(lines) < 2:
        return None
    header = lines[0].split(",")
    if "step" not in header:
        return None
    for line in reversed(lines[1:]):
        cells = line.split(",")
        if len(cells) == len(header):
            try:
                return int(float(cells[header.index("step")]))
            except ValueError:
                return None
    return None


def _newest_checkpoint(path: Path, seed: int | None) -> int | None:
    """The step of the newest checkpoint a rerun would resume this run from: its own, else
    that of a seed group holding its seed (experiments/seed_groups.py)."""
    from experiments.checkpoint import any_checkpoints
    from experiments.seed_groups import GROUPS_DIRECTORY, parse_seeds

    found = any_checkpoints(path)
    if not found and seed is not None:
        for group in sorted((path.parent / GROUPS_DIRECTORY).glob("seeds=*")):
            try:
                members = parse_seeds(group.name.split("=", 1)[1])
            except ValueError:
                continue
            if seed in members:
                found += any_checkpoints(group)
        found.sort(key=lambda checkpoint: checkpoint.name)
    match = re.match(r"step-(\d+)", found[-1].name) if found else None
    return int(match.group(1)) if match else None


def _last_log_line(path: Path) -> str:
    try:
        lines = [line.strip() for line in (path / "run.log").read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


def _ask(command: list[str]) -> subprocess.CompletedProcess | None:
    if shutil.which(command[0]) is None:
        return None
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None


def job_active(job: Any) -> bool | None:
    """Whether the scheduler still has the job a run recorded (pending, running, requeued);
    None where it cannot tell (no squeue/bjobs here, no answer, no job recorded)."""
    if not isinstance(job, dict):
        return None
    if job.get("LSB_JOBID"):
        index = job.get("LSB_JOBINDEX")
        name = f"{job['LSB_JOBID']}[{index}]" if index and str(index) != "0" else str(job["LSB_JOBID"])
        result = _ask(["bjobs", "-noheader", "-o", "stat", name])
        if result is None:
            return None
        if "not found" in result.stdout + result.stderr:
            return False  # bjobs forgets finished jobs after a while
        states = result.stdout.split()
        return None if not states else not all(state in ("DONE", "EXIT") for state in states)
    name = job_text(job)
    if not name or not re.fullmatch(r"\d+(_\d+)?", name):
        return None
    result = _ask(["squeue", "-h", "-j", name, "-o", "%T"])
    if result is None:
        return None
    if result.returncode != 0:
        # squeue -j names a job it no longer knows with "Invalid job id specified".
        return False if "Invalid job id" in result.stderr else None
    return bool(result.stdout.strip())


def run_state(path: Path, variant: str | None = None, seed: int | None = None) -> RunState:
    """One run directory's state, from the figures' own check (check_run)."""
    if not path.exists():
        return RunState(variant or "?", -1 if seed is None else seed, "missing", str(path))
    check: RunCheck = check_run(path)
    meta = check.meta or {}
    variant = meta.get("variant") or variant or "?"
    seed = meta.get("seed") if isinstance(meta.get("seed"), int) else seed
    seed = -1 if seed is None else seed
    state = RunState(variant, seed, "", str(path), check.reason, _latest(meta, "host"), job_text(_latest(meta, "job")))
    if check.kind == "good":
        state.state = "complete"
    elif check.kind in ("diverged", "damaged"):
        state.state = check.kind
    else:
        status = meta.get("status")
        state.state = status if status in ("running", "preempted", "failed", "interrupted") else "damaged"
        state.step = _last_step(path)
        state.checkpoint = _newest_checkpoint(path, seed)
        if state.state == "failed":
            state.detail = _last_log_line(path) or check.reason
        elif state.state == "running" and job_active(_latest(meta, "job")) is False:
            state.state = "lost"
            state.detail = f"recorded as running, but job {state.job} has ended"
    if check.kind in ("good", "diverged") and check.metrics is not None and len(check.metrics):
        state.step = int(check.metrics["step"].iloc[-1])
    return state


# --------------------------------------------------------------------------------------------
# Campaigns
# --------------------------------------------------------------------------------------------


def preset_campaign(preset: str, overrides: Sequence[str] = ()) -> Campaign:
    campaign = Campaign(preset, "preset", list(overrides))
    for variant, seed, path in expected_runs(preset, overrides):
        campaign.runs.append(run_state(Path(path), variant, seed))
    return campaign


def folder_campaign(folder: Path) -> Campaign:
    campaign = Campaign(str(folder), "folder")
    for path in find_run_dirs(folder):
        if path.name.endswith((".overwrite", ".replaced")):
            continue  # an overwrite in progress: the run it replaces is listed
        campaign.runs.append(run_state(path))
    campaign.runs.sort(key=lambda run: (run.variant, run.seed))
    return campaign


def campaign_of(name: str, overrides: Sequence[str] = ()) -> Campaign:
    """A preset by name, else an existing folder; StatusError naming the valid ones."""
    if (PRESET_DIR / f"{name}.yaml").is_file():
        return preset_campaign(name, overrides)
    if Path(name).is_dir():
        if overrides:
            raise StatusError(f"{name}: overrides ({' '.join(overrides)}) apply to presets, not to a folder")
        return folder_campaign(Path(name))
    presets = sorted(path.stem for path in PRESET_DIR.glob("*.yaml"))
    raise StatusError(f"{name!r} is neither a preset ({', '.join(presets)}) nor a folder")


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def seeds_text(seeds: Sequence[int]) -> str:
    """3,7,12: a Hydra sweep's list (a Slurm --array list too)."""
    return ",".join(str(seed) for seed in seeds)


def missing_lines(campaign: Campaign) -> list[str]:
    """What is left, in the launchers' forms: the batch scripts' SEEDS and a multirun's overrides."""
    seeds = campaign.rerun_seeds()
    if campaign.kind != "preset" or not seeds:
        return [] if not seeds else [f"SEEDS={compact_seeds(seeds)}"]
    kept = [override for override in campaign.overrides if not override.lstrip("+~").startswith("seed=")]
    return [f"SEEDS={compact_seeds(seeds)}", " ".join([f"+paper={campaign.name}", *kept, f"seed={seeds_text(seeds)}"])]


def table(campaign: Campaign) -> str:
    totals = campaign.totals()
    states = [state for state in STATES if any(counts[state] for counts in totals.values())]
    lines = [f"{campaign.name}: {sum(totals[v]['complete'] for v in totals)}/{len(campaign.runs)} runs complete"]
    if not campaign.runs:
        return f"{campaign.name}: no runs found"
    header = ["variant", "seeds", *states]
    rows = [[variant, str(sum(counts.values())), *(str(counts[state]) for state in states)] for variant, counts in totals.items()]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines += ["  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in [header, *rows]]
    for run in campaign.runs:
        if run.state in ("complete", "missing"):
            continue
        facts = [f"step {run.step}" if run.step is not None else "",
                 f"checkpoint at step {run.checkpoint}" if run.checkpoint is not None else "",
                 f"host {run.host}" if run.host else "", f"job {run.job}" if run.job else ""]
        facts = ", ".join(fact for fact in facts if fact)
        detail = f": {run.detail}" if run.detail and run.detail != run.state else ""
        lines.append(f"  {run.state:<11} {run.variant} seed={run.seed} ({facts}){detail}" if facts
                     else f"  {run.state:<11} {run.variant} seed={run.seed}{detail}")
    missing = sorted({run.seed for run in campaign.runs if run.state == "missing"})
    if missing:
        lines.append(f"  missing     seeds {compact_seeds(missing)} (some variant has no run directory)")
    return "\n".join(lines)


def as_json(campaign: Campaign) -> dict[str, Any]:
    return {
        "name": campaign.name, "kind": campaign.kind, "overrides": campaign.overrides,
        "complete": campaign.complete, "rerun_seeds": campaign.rerun_seeds(),
        "totals": {variant: dict(counts) for variant, counts in campaign.totals().items()},
        "runs": [asdict(run) for run in campaign.runs],
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.status", description=__doc__.split("\n\n")[0],
                                     epilog="Exit status: 0 complete, 1 not complete, 2 bad input.")
    parser.add_argument("targets", nargs="+", metavar="PRESET|DIR|KEY=VALUE",
                        help="presets (configs/paper/<name>.yaml) or results folders; KEY=VALUE arguments are Hydra overrides for the presets")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--missing", action="store_true", help="print SEEDS=... and the multirun overrides of what is left")
    what.add_argument("--json", action="store_true", help="print the states as JSON")
    args = parser.parse_args(argv)
    overrides = [target for target in args.targets if "=" in target]
    names = [target for target in args.targets if "=" not in target]
    if not names:
        print("error: name a preset or a results folder", file=sys.stderr)
        return BAD_INPUT
    try:
        campaigns = [campaign_of(name, overrides) for name in names]
    except StatusError as error:
        print(f"error: {error}", file=sys.stderr)
        return BAD_INPUT
    if args.json:
        print(json.dumps([as_json(c) for c in campaigns], indent=2))
    elif args.missing:
        for campaign in campaigns:
            lines = missing_lines(campaign)
            damaged = [run for run in campaign.runs if run.state == "damaged"]
            for line in lines:
                print(line if len(campaigns) == 1 else f"{campaign.name}: {line}")
            if damaged:
                print(f"{campaign.name}: {len(damaged)} damaged run(s) not listed (python -m experiments.status {campaign.name} names them)",
                      file=sys.stderr)
    else:
        print("\n\n".join(table(c) for c in campaigns))
    return COMPLETE if all(c.complete for c in campaigns) else INCOMPLETE


if __name__ == "__main__":
    sys.exit(main())
