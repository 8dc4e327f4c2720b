"""The paper as jobs: what ``workflow/Snakefile`` runs, and the plan a user reads first.

    python -m experiments.plan [PRESET ...] [--quick] [--site NAME]   # jobs, runs, estimated hours
    python -m experiments.plan --mark MARKER RUN_DIR ...              # the workflow: check a job's runs, write its marker

A job is one process: one seed group of one configuration of a paper preset
(``configs/paper/<preset>.yaml``), cut exactly as the preset's multirun cuts it
(``train.batch_seeds`` seeds per process, in seed order; one seed per job where the preset
runs one process per run). Its command is a single ``python -m experiments.run`` with the
group's overrides, so a job killed or preempted and started again resumes from its own
checkpoints, as any run of the harness does.

A job's completion marker is written only after every one of its runs is finished
(``complete`` or ``diverged``: a diverged run is a result) as the figures classify it
(``experiments.analysis.aggregate.check_run``). A workflow engine declares the marker, never
the run directories, as the job's output: an engine that deletes the outputs of a failed
job then deletes nothing a retried job resumes from.

Estimated cost comes from runs already finished under the output root (the wall time in
their metrics.csv) where a configuration has one, else from ``workflow/costs.yaml``, the
committed measurements of ``benchmarks/``; the table says which.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from experiments.errors import ConfigError, DatasetError, HarnessError

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKFLOW_DIR = REPO_ROOT / "workflow"
WORKFLOW_CONFIG = WORKFLOW_DIR / "config.yaml"
COSTS_FILE = WORKFLOW_DIR / "costs.yaml"

log = logging.getLogger("experiments.plan")


@dataclass(frozen=True)
class Job:
    """One process of a preset: a seed group of one configuration."""

    preset: str
    id: str                      # "<variant>-<config_id>-seeds=<seeds>": unique in its preset, no shell specials
    variant: str
    config_id: str
    overrides: tuple[str, ...]   # for ``python -m experiments.run``
    seeds: tuple[int, ...]
    runs: tuple[Path, ...]       # each seed's run directory
    experiment: str
    budget: int
    budget_unit: str
    device: str                  # train.device: auto, cpu or cuda

    def command(self, python: str = sys.executable) -> str:
        return " ".join([shlex.quote(python), "-m", "experiments.run", *map(shlex.quote, self.overrides)])

    def finished(self) -> bool:
        return all(_finished(run) for run in self.runs)


@dataclass(frozen=True)
class Campaign:
    """The presets a workflow runs and where it writes: the full paper, or the quick one
    (a few seeds on tiny budgets, written under ``results/quick`` so it never mixes with
    the paper's runs or overwrites the committed report)."""

    presets: tuple[str, ...]
    quick: bool = False
    overrides: dict[str, tuple[str, ...]] = field(default_factory=dict)  # preset -> extra overrides
    root: Path = REPO_ROOT / "results"
    device: str | None = None    # train.device of every job (None: the presets' own, cpu)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Campaign":
        """From the workflow's config (``workflow/config.yaml`` plus ``--config`` values)."""
        quick = _flag(config.get("quick", False), "quick")
        if quick:
            table = config.get("quick_presets") or {}
            if not isinstance(table, dict) or not table:
                raise ConfigError("quick_presets", "a mapping preset -> list of overrides (workflow/config.yaml)")
            presets = tuple(str(name) for name in table)
            overrides = {str(name): tuple(str(o) for o in (extra or ())) for name, extra in table.items()}
            root = REPO_ROOT / str(config.get("quick_root", "results/quick"))
        else:
            presets = tuple(str(name) for name in config.get("presets") or ())
            overrides = {name: () for name in presets}
            root = REPO_ROOT / str(config.get("root", "results"))
        only = config.get("only")
        if only is not None:
            only = [str(name) for name in (only if isinstance(only, (list, tuple)) else [only])]
            unknown = [name for name in only if name not in presets]
            if unknown:
                raise ConfigError("only", f"{unknown[0]!r} is not a preset of this campaign ({', '.join(presets)})")
            presets = tuple(name for name in presets if name in only)
        if not presets:
            raise ConfigError("presets", "at least one paper preset (configs/paper/<name>.yaml)")
        device = config.get("device")
        if device is not None and not re.fullmatch(r"cpu|auto|cuda(:\d+)?", str(device)):
            raise ConfigError("device", f"null (the presets' own), cpu, auto, cuda or cuda:N, got {device!r}")
        known = sorted(path.stem for path in (REPO_ROOT / "configs" / "paper").glob("*.yaml"))
        for name in presets:
            if name not in known:
                raise ConfigError("presets", f"no configs/paper/{name}.yaml; known presets: {', '.join(known)}")
        return cls(presets, quick, overrides, root, None if device is None else str(device))

    @property
    def runs_root(self) -> Path:
        """``output.root`` of every run: results/runs (the harness's default) for the paper."""
        return self.root / "runs"

    @property
    def figures_dir(self) -> Path:
        return self.root / "figures"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def page(self) -> Path:
        return self.root / "report.html"

    @property
    def markers(self) -> Path:
        return self.root / "workflow"

    def marker(self, job: Job) -> Path:
        return self.markers / job.preset / f"{job.id}.done"

    def extra(self, preset: str) -> tuple[str, ...]:
        root = () if self.runs_root == REPO_ROOT / "results" / "runs" else (f"output.root={self.runs_root}",)
        device = () if self.device is None else (f"train.device={self.device}",)
        return (*root, *device, *self.overrides.get(preset, ()))

    def jobs(self, preset: str) -> list[Job]:
        return preset_jobs(preset, self.extra(preset))


def _flag(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "yes"):
        return True
    if str(value).lower() in ("false", "0", "no"):
        return False
    raise ConfigError(key, f"true or false, got {value!r}")


def preset_jobs(preset: str, extra: Sequence[str] = ()) -> list[Job]:
    """The jobs of ``python -m experiments.run -m +paper=<preset> <extra>``, one per process,
    in the preset's launch order."""
    from experiments.compose import compose, sweep_overrides
    from experiments.seed_groups import compact_seeds, member_run
    from experiments.validation import validate

    axes: dict[tuple[str, ...], list[int]] = {}
    for job in sweep_overrides([f"+paper={preset}", *extra]):
        seeds = [o for o in job if o.startswith("seed=")]
        if len(seeds) != 1:
            raise ConfigError("seed", f"preset {preset}: every job needs one seed=..., got {seeds}")
        axes.setdefault(tuple(o for o in job if not o.startswith("seed=")), []).append(int(seeds[0].split("=", 1)[1]))
    jobs = []
    for fixed, seeds in axes.items():
        first = validate(compose(*fixed, f"seed={seeds[0]}"))
        size = first.config.train.batch_seeds
        for start in range(0, len(seeds), size):
            group = seeds[start : start + size]
            grouping = (f"train.seed_group=[{','.join(map(str, group))}]",) if len(group) > 1 else ()
            jobs.append(Job(
                preset=preset,
                id=f"{_file_safe(first.variant)}-{first.config_id}-seeds={compact_seeds(group)}",
                variant=first.variant,
                config_id=first.config_id,
                overrides=(*fixed, *grouping, f"seed={group[0]}"),
                seeds=tuple(group),
                runs=tuple(member_run(first, seed).path for seed in group),
                experiment=first.config.experiment,
                budget=first.budget,
                budget_unit=first.problem_class.budget_unit,
                device=str(first.config.train.device),
            ))
    return jobs


def _file_safe(variant: str) -> str:
    """A variant label as a job id's part that needs no shell quoting ("Adam+AADL(ref)+MA" ->
    "Adam+AADL.ref+MA"): executors put job ids into file names and commands unquoted."""
    return re.sub(r"[^A-Za-z0-9+.=-]+", ".", variant.replace(")", "")).strip(".")


def _finished(run: Path) -> bool:
    """Complete or diverged, as the figures read it; a damaged or unfinished run is not."""
    from experiments.analysis.aggregate import check_run

    if not (run / "COMPLETE").is_file():
        return False
    return check_run(run).kind in ("good", "diverged")


# -- cost -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    seconds: float | None  # wall time of one job, on the machine the source measured
    source: str            # "runs": finished runs under the output root; else the costs file's source


def _measured_seconds(job: Job) -> float | None:
    """Median final wall time of this configuration's finished runs (a seed group's lanes
    share one clock, so a member's wall time is its group's)."""
    from experiments.analysis.aggregate import check_run

    times = []
    for directory in job.runs[0].parent.glob("seed=*"):
        if not (directory / "COMPLETE").is_file():
            continue
        check = check_run(directory)
        if check.kind == "good" and check.metrics is not None and "wall_time" in check.metrics:
            times.append(float(check.metrics["wall_time"].iloc[-1]))
    return statistics.median(times) if times else None


def load_costs(path: Path = COSTS_FILE) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(str(path), "a mapping preset -> {variant: seconds per job}")
    return data


def estimate(job: Job, costs: dict[str, Any]) -> Estimate:
    measured = _measured_seconds(job)
    if measured is not None:
        return Estimate(measured, "runs")
    entry = (costs.get("presets") or {}).get(job.preset) or {}
    seconds = (entry.get("seconds_per_job") or {}).get(job.variant)
    if seconds is None or entry.get("seeds_per_job") not in (None, len(job.seeds)) or entry.get("budget") not in (None, job.budget):
        return Estimate(None, "none")
    return Estimate(float(seconds), str(costs.get("source", COSTS_FILE.name)))


def runtime_minutes(job: Job, limit_minutes: int, costs: dict[str, Any]) -> int:
    """A job's time request: three times its estimate (at least 10 minutes), within the site's
    limit; the limit itself where nothing estimates the job. A job that still runs out is
    retried and resumes from its checkpoint."""
    seconds = estimate(job, costs).seconds
    if seconds is None:
        return limit_minutes
    return int(min(limit_minutes, max(10, -(-3 * seconds // 60))))


@dataclass
class PresetPlan:
    preset: str
    jobs: list[Job]
    todo: list[Job]
    estimates: list[Estimate]

    @property
    def runs(self) -> int:
        return sum(len(job.seeds) for job in self.jobs)

    def core_hours(self, cores_per_job: int = 1) -> float | None:
        """Estimated core-hours of the jobs left to run (None where any lacks an estimate)."""
        seconds = [e.seconds for job, e in zip(self.jobs, self.estimates) if job in self.todo]
        if any(s is None for s in seconds):
            return None
        return sum(seconds) * cores_per_job / 3600

    def sources(self) -> str:
        return ", ".join(sorted({e.source for job, e in zip(self.jobs, self.estimates) if job in self.todo})) or "-"


def plan(campaign: Campaign, presets: Sequence[str] | None = None) -> list[PresetPlan]:
    costs = load_costs()
    plans = []
    for preset in presets or campaign.presets:
        jobs = campaign.jobs(preset)
        todo = [job for job in jobs if not job.finished()]
        plans.append(PresetPlan(preset, jobs, todo, [estimate(job, costs) for job in jobs]))
    return plans


def plan_table(plans: Sequence[PresetPlan], cores: int) -> str:
    """The plan as Markdown: jobs and runs per preset, what is left, and its estimated cost."""
    lines = [
        "| preset | jobs | runs | jobs left | est. core-hours left | est. wall time here | estimate from |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    total = 0.0
    unknown = False
    for p in plans:
        hours = p.core_hours()
        if hours is None:
            unknown = unknown or bool(p.todo)
            hours_text = wall = "no estimate" if p.todo else "0"
        else:
            total += hours
            hours_text = f"{hours:.2f}"
            wall = _duration(hours * 3600 / max(1, min(cores, len(p.todo) or 1)))
        lines.append(f"| {p.preset} | {len(p.jobs)} | {p.runs} | {len(p.todo)} | {hours_text} | {wall} | {p.sources()} |")
    total_text = f"{total:.2f}" + (" + unestimated jobs" if unknown else "") if total or not unknown else "no estimate"
    lines.append(f"| all | {sum(len(p.jobs) for p in plans)} | {sum(p.runs for p in plans)} | "
                 f"{sum(len(p.todo) for p in plans)} | {total_text} | | |")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    minutes = seconds / 60
    return f"{minutes:.1f} min" if minutes < 120 else f"{minutes / 60:.1f} h"


# -- the job marker ---------------------------------------------------------------------------


def mark(marker: Path, runs: Sequence[Path], job: str = "") -> None:
    """Write ``marker`` if every run directory in ``runs`` is finished; a RunError otherwise
    (the engine then counts the job as failed and retries it: it resumes)."""
    from experiments.analysis.aggregate import check_run
    from experiments.errors import RunError
    from experiments.atomic import write_atomically

    unfinished = [str(run) for run in runs if not _finished(Path(run))]
    if unfinished:
        raise RunError(f"job {job or marker.stem}: {len(unfinished)} of {len(runs)} run(s) not finished, e.g. {unfinished[0]}")
    record = {"job": job or marker.stem, "runs": {str(run): check_run(run).kind for run in runs}}
    marker.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(marker, json.dumps(record, indent=1) + "\n")


# -- command line ---------------------------------------------------------------------------


def workflow_config(quick: bool, configfile: Path | None = None) -> dict[str, Any]:
    """workflow/config.yaml, updated by ``configfile`` (as snakemake's --configfile), then ``quick``."""
    config = yaml.safe_load(WORKFLOW_CONFIG.read_text()) or {}
    if configfile is not None:
        if not configfile.is_file():
            raise ConfigError("--configfile", f"no file {configfile}")
        config.update(yaml.safe_load(configfile.read_text()) or {})
    config["quick"] = quick or bool(config.get("quick"))
    return config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("presets", nargs="*", help="presets to plan (default: the workflow's, workflow/config.yaml)")
    parser.add_argument("--quick", action="store_true", help="the quick campaign (workflow/config.yaml quick_presets)")
    parser.add_argument("--site", help="configs/site/<name>.yaml: its cores and GPUs (default: $AADL_SITE, else local)")
    parser.add_argument("--json", action="store_true", help="every job (id, overrides, seeds, finished) as JSON")
    parser.add_argument("--configfile", type=Path, help="a YAML file updating workflow/config.yaml (as snakemake's)")
    parser.add_argument("--mark", nargs="+", metavar="PATH", type=Path,
                        help="(the workflow) MARKER RUN_DIR...: check that the runs are finished, then write the marker")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        if args.mark:
            if len(args.mark) < 2:
                raise ConfigError("--mark", "a marker file and at least one run directory")
            mark(args.mark[0], args.mark[1:])
            return 0
        campaign = Campaign.from_config(workflow_config(args.quick, args.configfile))
        from experiments.site import load_site

        site = load_site(args.site)
        plans = plan(campaign, args.presets or None)
    except (HarnessError, DatasetError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([{"preset": p.preset, "jobs": [{"id": j.id, "overrides": list(j.overrides), "seeds": list(j.seeds),
                                                         "finished": j not in p.todo} for j in p.jobs]} for p in plans], indent=1))
        return 0
    cores = (site.cpus_per_node or 1) if site.scheduler != "local" else (os.cpu_count() or 1)
    print(f"{'quick' if campaign.quick else 'paper'} campaign, site {site.name} ({site.scheduler}), runs under {campaign.runs_root}")
    print(plan_table(plans, cores))
    costs = load_costs()
    if costs.get("note"):
        print(f"Estimates from {costs.get('source')}: {costs['note']}")
    if site.gpus_per_node:
        print("GPU-hours: no GPU measurement is committed yet (benchmarks/device_check.py on the site's GPU gives one);"
              " the core-hours above are those of the machine each estimate names.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
