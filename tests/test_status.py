"""python -m experiments.status: a preset's expected runs, classified by the figures' reader."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.status import expected_runs, main, preset_campaign
from run_trees import write_run

REPO = Path(__file__).resolve().parent.parent
#: A 3-seed fig2 at a 20-iteration budget (the status of any sweep is read the same way).
OVERRIDES = ["seed=0,1,2", "train.iterations=20"]


@pytest.fixture(scope="module")
def expected(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return root, expected_runs("fig2", [*OVERRIDES, f"output.root={root}"])


def place(path: Path, variant: str, seed: int, **kwargs) -> Path:
    """A synthetic run (tests/run_trees) moved to where the harness would write it."""
    made = write_run(path.parent.parent.parent / "synthetic", variant=variant, seed=seed, val_loss=[1.0, 0.5, 0.25],
                     experiment="burgers2d", unit="iteration", **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(made, path)
    return path


@pytest.fixture(scope="module")
def partial(expected):
    """Seeds 0-1 of every variant written, seed 2 missing; then by hand: one preempted, one
    failed, one damaged, one still running."""
    root, runs = expected
    paths = {}
    for variant, seed, path in runs:
        if seed == 2:
            continue
        short = variant.replace("Adam", "")
        kwargs = {}
        if (short, seed) == ("", 1):
            kwargs = {"complete": False, "status": "preempted"}
        elif (short, seed) == ("+AADL", 1):
            kwargs = {"complete": False, "status": "failed"}
        elif (short, seed) == ("+AADL+MA", 1):
            kwargs = {"complete": False, "status": "running"}
        elif (short, seed) == ("+AADL+MA", 0):
            kwargs = {"truncate": 1}
        paths[short, seed] = place(Path(path), variant, seed, **kwargs)
    (paths["+AADL", 1] / "run.log").write_text("step 10\nRuntimeError: CUDA out of memory\n")
    # The preempted seed trained in a seed group: its checkpoint is the group's.
    group = paths["", 1].parent / ".seed-groups" / "seeds=0-1" / "checkpoints"
    group.mkdir(parents=True)
    (group / "step-000000010.pt").write_bytes(b"")
    return root, runs, paths


def test_expected_runs_are_the_sweeps_jobs(expected):
    from experiments.compose import preset_sweep

    root, runs = expected
    variants = {variant for variant, _, _ in runs}
    assert {"Adam", "Adam+AADL", "Adam+AADL+MA"} <= variants and len(variants) == len(preset_sweep("fig2")["method"])
    assert sorted(seed for _, seed, _ in runs) == sorted([0, 1, 2] * len(variants))
    for variant, seed, path in runs:
        assert Path(path).parts[-4:-2] == ("burgers2d", "fig2") and Path(path).name == f"seed={seed}"
        assert Path(path).parent.name.startswith(f"{variant}-") and str(path).startswith(str(root))


def test_counts_of_a_partial_preset_equal_those_by_hand(partial):
    root, _, paths = partial
    campaign = preset_campaign("fig2", [*OVERRIDES, f"output.root={root}"])
    totals = {variant: dict(counts) for variant, counts in campaign.totals().items()
              if variant in ("Adam", "Adam+AADL", "Adam+AADL+MA")}
    others = {variant: dict(counts) for variant, counts in campaign.totals().items() if variant not in totals}
    assert all(counts == {"complete": 2, "missing": 1} for counts in others.values())
    assert totals == {
        "Adam": {"complete": 1, "preempted": 1, "missing": 1},
        "Adam+AADL": {"complete": 1, "failed": 1, "missing": 1},
        "Adam+AADL+MA": {"damaged": 1, "running": 1, "missing": 1},
    }
    failed = next(run for run in campaign.runs if run.state == "failed")
    assert failed.detail == "RuntimeError: CUDA out of memory" and failed.host == "synthetic"
    preempted = next(run for run in campaign.runs if run.state == "preempted")
    assert (preempted.step, preempted.checkpoint) == (20, 10)
    # Preempted, failed and missing are rerun; damaged (needs a look) and running are not.
    assert campaign.rerun_seeds() == [1, 2] and not campaign.complete


def test_cli_table_missing_and_json_and_exit_status(partial, capsys):
    root = partial[0]
    args = ["fig2", *OVERRIDES, f"output.root={root}"]
    assert main(args) == 1
    table = capsys.readouterr().out
    done = 2 + 2 * (len({run[0] for run in partial[1]}) - 3)
    assert f"fig2: {done}/{len(partial[1])} runs complete" in table and "failed      Adam+AADL seed=1" in table
    assert main([*args, "--missing"]) == 1
    assert capsys.readouterr().out.splitlines() == ["SEEDS=1-2", f"+paper=fig2 train.iterations=20 output.root={root} seed=1,2"]
    assert main([*args, "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data[0]["rerun_seeds"] == [1, 2] and data[0]["totals"]["Adam"]["missing"] == 1
    # A folder: the runs found, nothing called missing.
    assert main([str(root / "burgers2d")]) == 1
    assert "missing" not in capsys.readouterr().out


def test_complete_preset_exits_zero(expected, tmp_path):
    _, runs = expected
    root = tmp_path / "done"
    for variant, seed, path in expected_runs("fig2", ["seed=0,1", "train.iterations=20", f"output.root={root}"]):
        place(Path(path), variant, seed)
    assert main(["fig2", "seed=0,1", "train.iterations=20", f"output.root={root}", "--missing"]) == 0


def test_bad_input_is_one_line_and_status_2():
    result = subprocess.run([sys.executable, "-m", "experiments.status", "fig9"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "fig2" in result.stderr


@pytest.mark.parametrize("tool, output, job, expected", [
    ("squeue", "echo 'slurm_load_jobs error: Invalid job id specified' >&2; exit 1", {"SLURM_JOB_ID": "41"}, "lost"),
    ("squeue", "echo RUNNING", {"SLURM_ARRAY_JOB_ID": "40", "SLURM_ARRAY_TASK_ID": "3", "SLURM_JOB_ID": "43"}, "running"),
    ("bjobs", "echo 'Job <77[4]> is not found'", {"LSB_JOBID": "77", "LSB_JOBINDEX": "4"}, "lost"),
    ("bjobs", "echo EXIT", {"LSB_JOBID": "78"}, "lost"),
    ("bjobs", "echo RUN", {"LSB_JOBID": "79"}, "running"),
])
def test_a_running_run_whose_job_has_ended_is_lost(tmp_path, monkeypatch, tool, output, job, expected):
    """A run killed without recording it (node failure, kill -9) still says running; the
    scheduler's queue tells it apart from one that runs, and it is listed for a rerun."""
    from experiments.status import run_state

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / tool).write_text(f"#!/bin/bash\necho \"$@\" >>{tmp_path / 'asked'}\n{output}\n")
    (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    path = write_run(tmp_path / "runs", variant="Adam", seed=0, val_loss=[1.0, 0.5], complete=False, status="running")
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps({**meta, "job": job}))
    state = run_state(path)
    assert state.state == expected, state
    asked = (tmp_path / "asked").read_text()
    assert ("40_3" in asked) if "SLURM_ARRAY_JOB_ID" in job else True
    assert ("77[4]" in asked) if job.get("LSB_JOBINDEX") else True
