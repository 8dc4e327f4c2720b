"""The paper as one workflow: workflow/Snakefile on a real Snakemake, locally, through the real
Slurm of .ci/slurm, and through a stand-in LSF that records what it would submit; the HTML
page checked in a real browser (headless Chromium)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import REPO_ROOT

from experiments.plan import Campaign, preset_jobs

SNAKEMAKE = Path(sys.executable).parent / "snakemake"
SNAKEFILE = REPO_ROOT / "workflow" / "Snakefile"
LSF_STANDIN = Path(__file__).resolve().parent / "lsf_standin"
TIMING = ("wall_time", "samples_per_second")


def snakemake(workdir: Path, *args: str, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """The real snakemake on the project's Snakefile, its bookkeeping (.snakemake/) in ``workdir``."""
    return subprocess.run(
        [str(SNAKEMAKE), "-s", str(SNAKEFILE), "--directory", str(workdir), *args],
        cwd=workdir, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout,
    )


def campaign_file(path: Path, root: Path, presets: dict[str, list[str]], **extra) -> Path:
    """A --configfile with a quick campaign of ``presets`` written under ``root`` (snakemake
    merges a --configfile's mappings into workflow/config.yaml's: ``only`` keeps the others out)."""
    path.write_text(yaml.safe_dump({"quick": True, "quick_root": str(root), "quick_presets": presets,
                                    "only": list(presets), **extra}))
    return path


def summary_rows(report: Path, prefix: str) -> list[str]:
    """The claims summary's rows of one figure, as written."""
    text = report.read_text()
    summary = text[text.index("## Summary"):]
    return [line for line in summary.splitlines() if line.startswith(f"| {prefix} |")]


def metrics_of(root: Path) -> dict[str, pd.DataFrame]:
    """Every run's metrics.csv under ``root`` without its timing columns, by run path relative to root."""
    found = {}
    for path in sorted(root.rglob("metrics.csv")):
        frame = pd.read_csv(path)
        found[str(path.parent.relative_to(root))] = frame.drop(columns=[c for c in TIMING if c in frame])
    return found


# -- the jobs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["fig1", "p_sweep", "fig1_reference"])
def test_jobs_cut_a_preset_as_its_multirun(preset, data_root):
    """One job per process of ``-m +paper=<preset>``: the seed axis cut in order into groups
    of train.batch_seeds per configuration, every run of the sweep in exactly one job."""
    from experiments.compose import sweep_overrides

    jobs = preset_jobs(preset)
    expected = {(tuple(o for o in job if not o.startswith("seed=")), o) for job in sweep_overrides([f"+paper={preset}"])
                for o in job if o.startswith("seed=")}
    got = []
    for job in jobs:
        size = int(next(o for o in job.overrides if o.startswith("train.batch_seeds=")).split("=")[1]) \
            if any(o.startswith("train.batch_seeds=") for o in job.overrides) else 1
        assert 1 <= len(job.seeds) <= size
        assert list(job.seeds) == sorted(job.seeds) and job.seeds == tuple(range(job.seeds[0], job.seeds[0] + len(job.seeds)))
        fixed = tuple(o for o in job.overrides if not o.startswith(("seed=", "train.seed_group=")))
        got += [(fixed, f"seed={seed}") for seed in job.seeds]
        assert len({run.parent for run in job.runs}) == 1 and len(set(job.runs)) == len(job.seeds)
    assert sorted(got) == sorted(expected)
    assert len({job.id for job in jobs}) == len(jobs)
    # Executors put job ids into file names and shell commands unquoted ("Adam+AADL(ref)+MA").
    assert all(re.fullmatch(r"[A-Za-z0-9+.=,-]+", job.id) for job in jobs), [job.id for job in jobs]


def test_campaign_config_errors_name_the_key():
    with pytest.raises(Exception, match="presets.*configs/paper/nope.yaml"):
        Campaign.from_config({"presets": ["nope"]})
    with pytest.raises(Exception, match="only.*'fig9' is not a preset of this campaign"):
        Campaign.from_config({"presets": ["fig1"], "only": ["fig9"]})
    assert Campaign.from_config({"presets": ["fig1", "fig2"], "only": ["fig2"]}).presets == ("fig2",)
    with pytest.raises(Exception, match="device.*cuda:N, got 'gpu'"):
        Campaign.from_config({"presets": ["fig1"], "device": "gpu"})
    with pytest.raises(Exception, match="quick.*true or false"):
        Campaign.from_config({"presets": ["fig1"], "quick": "maybe"})


# -- the quick campaign, locally --------------------------------------------------------------


QUICK = {"fig1": ["seed=0,1", "train.batch_seeds=2", "train.epochs=6"],
         "fig2": ["seed=0,1", "train.batch_seeds=2", "train.iterations=40"]}


@pytest.fixture(scope="module")
def quick(tmp_path_factory, data_root):
    """The quick workflow, run once to its page on this machine's cores (the default profile)."""
    work = tmp_path_factory.mktemp("workflow")
    root = work / "out"
    config = campaign_file(work / "campaign.yaml", root, QUICK)
    committed = {path: path.read_bytes() for path in (REPO_ROOT / "README.md", REPO_ROOT / "results" / "report.md")}
    done = snakemake(work, "--configfile", str(config), "--cores", "2")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    # The quick campaign never touches the committed report or the README block.
    assert {path: path.read_bytes() for path in committed} == committed
    return work, root, config


def test_quick_workflow_runs_every_job_to_figures_report_and_page(quick):
    work, root, _ = quick
    campaign = Campaign.from_config({"quick": True, "quick_root": str(root), "quick_presets": QUICK})
    for preset in QUICK:
        for job in campaign.jobs(preset):
            marker = json.loads(campaign.marker(job).read_text())
            assert set(marker["runs"]) == {str(run) for run in job.runs}
            assert set(marker["runs"].values()) <= {"good", "diverged"}
            assert all((run / "COMPLETE").is_file() for run in job.runs)
        assert (root / "figures" / f"{preset}.png").stat().st_size > 10_000
    report = (root / "report.md").read_text()
    assert "## Summary" in report and str(root / "runs") in report
    assert summary_rows(root / "report.md", "Fig. 1") and summary_rows(root / "report.md", "Fig. 2")


def test_a_rerun_does_nothing_and_an_unfinished_job_is_the_only_one_run_again(quick):
    """As after a campaign whose job failed before the end: its marker, the report and the
    page are missing; the rerun plans that job, its preset's figure, the report and the page."""
    work, root, config = quick
    again = snakemake(work, "--configfile", str(config), "--cores", "2", "--dry-run")
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr
    marker = next((root / "workflow" / "fig1").glob("*.done"))
    moved = [marker, root / "report.md", root / "report.html"]
    for path in moved:
        path.rename(path.with_name(path.name + ".kept"))
    try:
        plan = snakemake(work, "--configfile", str(config), "--cores", "2", "--dry-run")
        out = plan.stdout + plan.stderr
        assert plan.returncode == 0
        for rule, count in (("train", 1), ("figure", 1), ("report", 1), ("page", 1)):
            assert re.search(rf"^{rule}\s+{count}$", out, re.M), out[-2000:]  # fig1's figure only, not fig2's
    finally:
        for path in moved:
            path.with_name(path.name + ".kept").rename(path)


def test_plan_reads_the_recorded_costs_of_finished_runs(quick):
    _, root, config = quick
    shown = subprocess.run([sys.executable, "-m", "experiments.plan", "--configfile", str(config)], cwd=REPO_ROOT,
                           capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]] for line in shown.stdout.splitlines()
            if line.startswith("| fig")}
    for preset in QUICK:
        assert rows[preset][3] == "0"  # jobs left: none
        assert rows[preset][6] in ("runs", "-")


def test_the_page_renders_in_headless_chromium(quick, tmp_path):
    """A real browser opens the page: both figures decode, the tables are there, and the
    screenshot is not blank."""
    _, root, _ = quick
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.fail("no chromium on PATH: .ci/system-packages installs it (apt-get install chromium)")
    page = root / "report.html"
    common = [browser, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*common, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    body = re.search(r"<body[^>]*>", dom.stdout)
    assert body, dom.stderr[-2000:]
    figures = int(re.search(r'data-figures="(\d+)"', body.group(0)).group(1))
    tables = int(re.search(r'data-tables="(\d+)"', body.group(0)).group(1))
    assert figures >= len(QUICK)  # every figure decoded (the report's own figures come on top)
    assert tables >= 2 * len(QUICK) + 1  # per figure its summary and provenance, and the claims
    for preset in QUICK:
        assert f'id="{preset}"' in dom.stdout
    assert "What this figure rests on" in dom.stdout and "code versions" in dom.stdout
    shot = tmp_path / "page.png"
    subprocess.run([*common, f"--screenshot={shot}", "--window-size=1200,1600", page.as_uri()], capture_output=True, timeout=120)
    from matplotlib.image import imread

    pixels = imread(shot)
    assert pixels.shape[0] == 1600 and pixels.shape[1] == 1200
    assert np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0).shape[0] > 50  # text and curves, not a blank page


# -- the Slurm profile, on the real Slurm -----------------------------------------------------


def _squeue(comment_prefix: str) -> list[tuple[str, str, str]]:
    out = subprocess.run(["squeue", "-h", "-o", "%i|%T|%k"], capture_output=True, text=True).stdout
    return [tuple(line.split("|")) for line in out.splitlines() if line.split("|")[-1].startswith(comment_prefix)]


@pytest.mark.slurm
def test_slurm_profile_resumes_a_cancelled_job_and_matches_the_local_report(tmp_path, data_root):
    """The quick Fig. 1 campaign through the slurm profile (site ci_slurm): one train job is
    cancelled with scancel mid-run; the same command run again runs that job only, which
    resumes from the checkpoint its signal left; runs and report equal a local run's."""
    if subprocess.run(["bash", str(REPO_ROOT / ".ci" / "slurm"), "status"], capture_output=True).returncode != 0:
        pytest.fail("no Slurm: bash .ci/slurm start (CI starts it)")
    presets = {"fig1": ["seed=0,1", "train.batch_seeds=2", "train.epochs=400"]}
    local = tmp_path / "local"
    local.mkdir()
    local_done = snakemake(local, "--configfile", str(campaign_file(local / "c.yaml", local / "out", presets)), "--cores", "2")
    assert local_done.returncode == 0, local_done.stderr[-4000:]

    work = tmp_path / "slurm"
    work.mkdir()
    config = campaign_file(work / "c.yaml", work / "out", presets, site="ci_slurm")
    command = [str(SNAKEMAKE), "-s", str(SNAKEFILE), "--directory", str(work), "--configfile", str(config),
               "--profile", str(REPO_ROOT / "workflow" / "profiles" / "slurm"), "--retries", "0"]
    first = subprocess.Popen(command, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    cancelled = None
    deadline = time.monotonic() + 600
    try:
        while cancelled is None and time.monotonic() < deadline and first.poll() is None:
            for job_id, state, comment in _squeue("rule_train"):
                job = comment.rsplit("_", 1)[-1]  # rule_train_wildcards_<preset>_<job>; a job id holds no "_"
                metrics = list((work / "out" / "runs").glob(f"*/*/{job.split('-seeds=')[0]}/seed=*/metrics.csv"))
                if state == "RUNNING" and metrics and min(len(m.read_text().splitlines()) for m in metrics) > 20:
                    subprocess.run(["scancel", job_id], check=True)
                    cancelled = job
                    break
            time.sleep(0.3)
        output, _ = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
    assert cancelled, "no train job was caught running"
    assert first.returncode != 0, output[-3000:]  # the cancelled job failed the first pass

    second = subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=900)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-4000:]
    assert re.search(r"^train\s+1$", out, re.M), out[-3000:]  # only the cancelled job ran again
    resumed = [json.loads(p.read_text()) for p in (work / "out" / "runs").glob(f"*/*/{cancelled.split('-seeds=')[0]}/seed=*/meta.json")]
    assert resumed and all(meta.get("resumed") for meta in resumed), "the cancelled job started over instead of resuming"
    local_metrics, slurm_metrics = metrics_of(local / "out" / "runs"), metrics_of(work / "out" / "runs")
    assert local_metrics.keys() == slurm_metrics.keys()
    for run, frame in local_metrics.items():
        pd.testing.assert_frame_equal(frame, slurm_metrics[run], check_exact=True)
    assert summary_rows(work / "out" / "report.md", "Fig. 1") == summary_rows(local / "out" / "report.md", "Fig. 1")


# -- the LSF profile, through a stand-in ------------------------------------------------------


def test_lsf_profile_submits_with_the_site_settings(tmp_path, data_root):
    """Through stand-in bsub/bjobs (no LSF can run here): every train job is submitted with the
    site's project, queue, time limit, CPUs and GPU request, the site's setup runs before the
    job, and the workflow runs to its report."""
    state = tmp_path / "lsf"
    # device auto: a GPU where the job lands on one (the CPU here), so each job asks for a GPU.
    config = campaign_file(tmp_path / "c.yaml", tmp_path / "out", {"fig1": ["seed=0", "train.batch_seeds=1", "train.epochs=3"]},
                           site="summit", device="auto")
    env = {"PATH": f"{LSF_STANDIN}:{os.environ['PATH']}", "FAKE_LSF_DIR": str(state), "MEMBERWORK": str(tmp_path)}
    done = snakemake(tmp_path, "--configfile", str(config), "--profile", str(REPO_ROOT / "workflow" / "profiles" / "lsf"), env=env)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    calls = [json.loads(line) for line in (state / "calls.jsonl").read_text().splitlines()]
    submissions = [c["argv"] for c in calls if c["command"] == "bsub"]
    assert len(submissions) == 4  # fig1's four variants, one seed each; figures and report run locally
    from experiments.site import load_site

    summit = load_site("summit")
    for argv in submissions:
        words = " ".join(argv[:-1])
        assert f"-W {summit.time_minutes}" in words
        assert f"-n {summit.cpus_per_task}" in words
        assert "-gpu num=1" in words  # a GPU site, and the campaign runs on GPUs
        assert "-q batch" in words  # the site names no queue: the cluster's default
        command = argv[-1]
        assert "experiments.run" not in command or "module load open-ce" in command
    module_calls = [c["argv"] for c in calls if c["command"] == "module"]
    assert ["load", "open-ce"] in module_calls  # the site's setup ran before each job
    assert (tmp_path / "out" / "report.md").is_file()
