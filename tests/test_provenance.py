"""What a run records of where it ran (code version, scheduler job ids, per segment), and
what the readers make of it: runs of other code or kernels kept apart, symlinked run
directories read, skipped folders named."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from experiments.analysis import aggregate
from experiments.analysis.aggregate import ResultsError
from experiments.results import JOB_VARIABLES, git_state
from run_trees import FIG1_SYNTHETIC, write_fig1_synthetic, write_run

OTHER_COMMIT = "0badc0de" + "0" * 32


def run_command(root: Path) -> list[str]:
    return [sys.executable, "-m", "experiments.run", "method=none", "train.epochs=40", "checkpoint.every=1",
            f"output.root={root}", f"hydra.run.dir={root / 'hydra'}"]


def scheduler_env(**ids: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in JOB_VARIABLES}
    return {**env, **ids}


def test_a_real_run_records_its_job_ids_and_code_version_per_segment(tmp_path):
    """Started in a Slurm array element, killed, resumed in an LSF job after the code
    changed: meta.json names both jobs and both code versions, the log says the code
    changed, and the run's code version is the set of both."""
    first = subprocess.Popen(
        run_command(tmp_path), cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env=scheduler_env(SLURM_JOB_ID="4242", SLURM_ARRAY_JOB_ID="4240", SLURM_ARRAY_TASK_ID="2"),
    )
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and first.poll() is None and not list(tmp_path.rglob("checkpoints/*.pt")):
            time.sleep(0.05)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    (meta_path,) = tmp_path.rglob("meta.json")
    meta = json.loads(meta_path.read_text())
    assert meta["status"] == "running", "the first segment finished before it could be killed"
    assert meta["job"] == {"SLURM_JOB_ID": "4242", "SLURM_ARRAY_JOB_ID": "4240", "SLURM_ARRAY_TASK_ID": "2"}
    meta["git"] = {"commit": OTHER_COMMIT, "dirty": False}  # as if begun before a pull
    meta_path.write_text(json.dumps(meta))

    done = subprocess.run(run_command(tmp_path), cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                          env=scheduler_env(LSB_JOBID="777", LSB_JOBINDEX="3"))
    assert done.returncode == 0, done.stderr[-2000:]
    meta = json.loads(meta_path.read_text())
    assert meta["status"] == "complete"
    (resumed,) = meta["resumed"]
    assert resumed["job"] == {"LSB_JOBID": "777", "LSB_JOBINDEX": "3"}
    assert resumed["git"] == git_state(REPO_ROOT) and resumed["git"]["commit"]
    here = aggregate.code_version(resumed["git"])
    assert "resumed at step" in (meta_path.parent / "run.log").read_text()
    assert "under another code version (0badc0de ->" in (meta_path.parent / "run.log").read_text()
    assert aggregate.provenance(meta)["code"] == f"0badc0de & {here}"
    assert [segment["job"] for segment in aggregate.segments(meta)] == [
        {"SLURM_JOB_ID": "4242", "SLURM_ARRAY_JOB_ID": "4240", "SLURM_ARRAY_TASK_ID": "2"},
        {"LSB_JOBID": "777", "LSB_JOBINDEX": "3"},
    ]


def test_two_commits_and_two_kernel_levels_are_not_one_table_row(tmp_path, caplog):
    """The issue's case: seeds of two commits and of two cpu_capability values in one tree."""
    for seed in range(6):
        commit = "1a2b3c4d" + "a" * 32 if seed < 3 else "5e6f7a8b" + "b" * 32
        write_run(tmp_path, variant="Adam+AADL", seed=seed, val_loss=[1.0, 0.5, 0.1], commit=commit, dirty=False,
                  cpu_capability="AVX2" if seed % 3 else "AVX512")
        write_run(tmp_path, variant="Adam", seed=seed, val_loss=[1.0, 0.6, 0.2], commit=commit, dirty=False,
                  cpu_capability="AVX2" if seed % 3 else "AVX512")
    with caplog.at_level(logging.WARNING):
        results = aggregate.load_results(tmp_path)
    table = aggregate.summary(results)
    assert len(table) == 8 and set(table["runs"]) <= {1, 2}
    assert "Adam+AADL (code=1a2b3c4d, kernels=AVX2)" in results.labels
    assert any("runs of 2 code versions (1a2b3c4d: 6, 5e6f7a8b: 6) are kept apart" in r.message for r in caplog.records)
    # Paired with the baseline of the same code version and kernel level only.
    row = table.set_index("label").loc["Adam+AADL (code=5e6f7a8b, kernels=AVX512)"]
    assert row["baseline_pairs"] == 1

    pooled = aggregate.load_results(tmp_path, pool=["kernels"])
    assert sorted(pooled.labels) == ["Adam (code=1a2b3c4d)", "Adam (code=5e6f7a8b)", "Adam+AADL (code=1a2b3c4d)", "Adam+AADL (code=5e6f7a8b)"]
    notes = aggregate.left_out_notes(pooled)
    assert "Pooled across kernel levels on request (pool=kernels): AVX2 (8 runs), AVX512 (4 runs)." in notes
    everything = aggregate.summary(aggregate.load_results(tmp_path, pool="all"))
    assert everything.set_index("label")["runs"].to_dict() == {"Adam": 6, "Adam+AADL": 6}
    assert set(everything["kernels"]) == {"AVX2 + AVX512 (pooled)"}  # the CSV says it too
    assert set(everything["code"]) == {"1a2b3c4d + 5e6f7a8b (pooled)"}
    with pytest.raises(ResultsError, match="pool: 'commit' is none of code, kernels or all"):
        aggregate.load_results(tmp_path, pool=["commit"])
    # A seed any version ran is not missing; one no version finished is, named per variant.
    write_run(tmp_path, variant="Adam", seed=6, val_loss=[1.0, 0.6], complete=False, status="preempted")
    assert aggregate.coverage_notes(aggregate.load_results(tmp_path)) == ["Missing: Adam: seed 6 incomplete; Adam+AADL: seed 6 not run."]


def test_symlinked_run_directories_are_read_and_loops_named(tmp_path, caplog):
    """Seeds kept elsewhere and linked in count; a loop of links and a broken link are
    named, not followed for ever."""
    store, tree = tmp_path / "store", tmp_path / "tree"
    write_fig1_synthetic(store)
    write_fig1_synthetic(tree)
    name = next((tree / "graduate_admissions" / "synthetic").glob("Adam-*"))
    elsewhere = next((store / "graduate_admissions" / "synthetic").glob("Adam-*")) / "seed=2"
    (name / "seed=2").rename(tmp_path / "moved")
    (name / "seed=2").symlink_to(elsewhere)  # one seed linked in from another disk
    (tree / "graduate_admissions" / "loop").symlink_to(tree)  # a link back up the tree
    (tree / "dangling").symlink_to(tmp_path / "nowhere")
    with caplog.at_level(logging.WARNING):
        results = aggregate.load_results(tree)
    assert len(results.runs) == sum(len(seeds) for seeds in FIG1_SYNTHETIC.values())
    assert aggregate.summary(results).set_index("label").loc["Adam", "runs"] == 3
    reasons = {issue.path.name: issue.reason for issue in results.skipped}
    assert "already read" in reasons["loop"] and "broken link" in reasons["dangling"]
    assert sum("skipped" in r.message for r in caplog.records) == 2
    assert "Not read: 2 folders" in " ".join(aggregate.left_out_notes(results))


def test_run_directories_in_hidden_folders_are_named(tmp_path, caplog):
    write_fig1_synthetic(tmp_path)
    write_run(tmp_path / ".hidden", variant="Adam", seed=7, val_loss=[1.0, 0.5])
    with caplog.at_level(logging.WARNING):
        results = aggregate.load_results(tmp_path)
    (issue,) = results.skipped
    assert issue.path == tmp_path / ".hidden" and "hidden folder holding 1 run directory" in issue.reason


def test_the_batch_gap_table_refuses_runs_of_two_kernel_levels_unless_pooled(tmp_path, capsys):
    from experiments.analysis import batch_gap
    from run_trees import write_gap_study

    write_gap_study(tmp_path, {"SGD": (0.80, 0.70), "SGD+AADL": (0.82, 0.76)}, seeds=range(3),
                    methods={"SGD": ("none", 0)})
    for index, meta_path in enumerate(sorted(tmp_path.rglob("meta.json"))):
        meta = json.loads(meta_path.read_text())
        meta["cpu_capability"] = "AVX2" if index % 2 else "AVX512"
        meta_path.write_text(json.dumps(meta))
    with pytest.raises(ResultsError, match="several kernel levels AVX2, AVX512: a gap per variant pairs runs of one; pool them with --pool kernels"):
        batch_gap.gap_table(aggregate.load_results(tmp_path))
    pooled = batch_gap.gap_table(aggregate.load_results(tmp_path, pool=["kernels"]))
    assert pooled.set_index("variant")["seeds"].to_dict() == {"SGD": 3, "SGD+AADL": 3}


def test_every_run_of_a_seed_group_records_its_job(compose, data_root, tmp_path, monkeypatch):
    from experiments.run import execute

    for name in JOB_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "500")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    outcomes = execute(compose("method=none", "train.epochs=2", f"data.root={data_root}", f"output.root={tmp_path}",
                               "train.seed_group=[0,1]", "seed=0"))
    assert len(outcomes) == 2
    for outcome in outcomes:
        meta = json.loads((outcome.path / "meta.json").read_text())
        assert meta["job"] == {"SLURM_ARRAY_JOB_ID": "500", "SLURM_ARRAY_TASK_ID": "7"}
        assert meta["git"] == git_state(REPO_ROOT)
