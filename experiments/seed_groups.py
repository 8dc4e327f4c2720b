"""Seed groups: S seeds of one configuration trained batched in one process, each seed
writing its own run directory exactly as its single run would.

A multirun with ``train.batch_seeds=S`` (the paper presets set it) is regrouped before it
launches (:func:`group_sweep`, called by ``experiments.run.ValidateSweep``): its seed axis,
in order, is cut into groups of S, and each job trains one group, with overrides
``train.seed_group=[k, ..., k+S-1] seed=${train.seed_group.0}``. ``train.batch_seeds=1``
restores one process per run; a single run (no ``-m``) trains its own seed, whatever
batch_seeds says, unless it sets ``train.seed_group`` itself.

:func:`execute_group` runs one group. Each seed is validated as its single run
(``seed=s``, ``train.seed_group=null``: the config.yaml it writes), skipped when already
complete (``output.overwrite=true`` retrains it into a sibling swapped in at the end),
locked while it trains (a seed another process holds is left to it), and gets today's run
directory: config.yaml, meta.json (with ``seed_group``, the seeds it trained with),
metrics.csv, run.log, model.pt and COMPLETE, written as soon as that seed ends, so a seed
that diverges is finished at its own step while the others go on.

Checkpoints are one file per group, in a hidden folder of the variant's directory that
aggregation never reads::

    <variant>-<config_id>/.seed-groups/seeds=<seeds>/checkpoints/step-<step>.pt

holding the batched TrainingState (stacked model, batched optimizer, per-lane losses),
every seed's data order, the RNGs and every seed's rows. A rerun of the group resumes
from the newest one whose seeds include every seed still to train (seeds finished
meanwhile ride along unwritten), bit-identically; the folder is deleted once the group is
done. A seed trained alone later ignores it (and its own directory is restarted).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import shutil
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from experiments.errors import ConfigError, RunError
from experiments.results import FINAL_MODEL_FILE, METRICS_FILE, MetricsWriter, RunDirectory, constant_columns, record_resumption, run_metadata
from experiments.validation import ValidatedRun, validate

log = logging.getLogger("experiments.run")
progress_log = logging.getLogger("experiments.progress")

#: The hidden folder of a variant's directory that holds its groups' checkpoints.
GROUPS_DIRECTORY = ".seed-groups"


# -- naming groups -------------------------------------------------------------------------


def compact_seeds(seeds: Sequence[int]) -> str:
    """``[0, 1, 2, 3, 7, 9, 10]`` -> ``"0-3,7,9-10"`` (in the given order)."""
    parts: list[str] = []
    start = previous = None
    for seed in seeds:
        if previous is not None and seed == previous + 1:
            previous = seed
            continue
        if start is not None:
            parts.append(str(start) if start == previous else f"{start}-{previous}")
        start = previous = seed
    if start is not None:
        parts.append(str(start) if start == previous else f"{start}-{previous}")
    return ",".join(parts)


def parse_seeds(text: str) -> list[int]:
    """The inverse of :func:`compact_seeds`."""
    seeds: list[int] = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        seeds.extend(range(int(first), int(last or first) + 1))
    return seeds


def member_config(cfg: DictConfig, seed: int) -> DictConfig:
    """The config of seed ``seed`` of a group, as its single run has it."""
    member = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    member.pop("hydra", None)
    member.seed = seed
    member.train.seed_group = None
    return member


def member_run(group: ValidatedRun, seed: int) -> ValidatedRun:
    """``validate(member_config(cfg, seed))`` for the validated group ``group`` of ``cfg``,
    without validating again: only seed and train.seed_group differ, and neither is part
    of the identity (validation reads the data file each time, which adds up over seeds)."""
    config = dataclasses.replace(group.config, seed=seed, train=dataclasses.replace(group.config.train, seed_group=None))
    resolved = copy.deepcopy(group.resolved)
    resolved["seed"], resolved["train"]["seed_group"] = seed, None
    return dataclasses.replace(group, config=config, resolved=resolved)


# -- regrouping a multirun -----------------------------------------------------------------


def seed_groups(jobs: Sequence[Sequence[str]], runs: Sequence[ValidatedRun]) -> Optional[list[list[int]]]:
    """The groups the seed axis of a multirun (its ``jobs`` and their validated ``runs``)
    is cut into, or None where nothing is to be batched (batch_seeds 1, one seed, or groups
    given on the command line)."""
    sizes = sorted({run.config.train.batch_seeds for run in runs})
    if len(sizes) > 1:
        raise ConfigError("train.batch_seeds", f"one multirun batches seeds with one value; got {sizes}")
    size = sizes[0]
    if size == 1 or any(run.config.train.seed_group is not None for run in runs):
        return None
    seeds = list(dict.fromkeys(run.config.seed for run in runs))  # the seed axis, in order
    if len(seeds) == 1:
        return None
    seed_overrides = {override for job in jobs for override in job if override.startswith("seed=")}
    if len(seed_overrides) != len(seeds):  # seeds set some other way than one seed axis
        raise ConfigError("train.batch_seeds", f"batching needs the seeds swept as one axis (seed=...), got {sorted(seed_overrides)}")
    return [seeds[i : i + size] for i in range(0, len(seeds), size)]


def group_sweep(config: DictConfig, groups: list[list[int]]) -> None:
    """Rewrite the multirun ``config`` (Hydra's, before its sweeper starts) so that its seed
    axis becomes ``train.seed_group`` over ``groups``: one job per group."""
    choices = ",".join("[" + ",".join(str(seed) for seed in group) + "]" for group in groups)
    with read_write(config.hydra), open_dict(config.hydra):
        params = config.hydra.sweeper.get("params")
        if params is not None and "seed" in params:
            del params["seed"]
        task = [o for o in config.hydra.overrides.task if not o.startswith("seed=")]
        task += [f"train.seed_group={choices}", "seed=${train.seed_group.0}"]
        config.hydra.overrides.task = task


# -- running a group -----------------------------------------------------------------------


@dataclass
class _Member:
    """One seed of the group that this process trains and writes."""

    run: ValidatedRun
    final: RunDirectory
    target: RunDirectory
    lane: int = -1
    meta: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    writer: Optional[MetricsWriter] = None
    log: Optional[logging.Logger] = None
    progress: Optional[logging.Logger] = None
    hardware_changed: Optional[str] = None  # record_resumption's warning, logged once the log file is open
    done: bool = False

    @property
    def seed(self) -> int:
        return self.run.config.seed


def execute_group(cfg: DictConfig, *, worker: bool = False, ranks: Any = None) -> list[Any]:
    """Train the seeds of ``train.seed_group`` batched; one ``experiments.run.RunOutcome``
    per seed, in the group's order ("completed", "diverged", "skipped" or "busy").

    Raises ConfigError, DatasetError or RunError before anything is written, and
    RunPreempted (naming the group's checkpoint folder) when a signal stopped it."""
    import torch

    from experiments.run import RunOutcome, Ranks, check_devices, check_output, interactive_terminal, torch_threads
    from experiments.training import resolve_device

    ranks = ranks or Ranks()
    group_run = validate(cfg)
    settings = group_run.config
    seeds = list(settings.train.seed_group)
    if ranks.world_size > 1:
        raise RunError(
            f"train.seed_group={seeds}: a seed group trains in one process, not on {ranks.world_size} ranks; "
            "launch it without torchrun/srun/mpirun, or set train.batch_seeds=1"
        )
    runs = {seed: member_run(group_run, seed) for seed in seeds}
    outcomes: dict[int, Any] = {}
    pending = []
    for seed, run in runs.items():
        final = RunDirectory(run.path)
        if final.is_complete() and not settings.output.overwrite:
            log.info("%s is finished; skipping it (output.overwrite=true reruns it)", final.path)
            outcomes[seed] = RunOutcome(final.path, "skipped")
        else:
            pending.append(seed)
    if not pending:
        return [outcomes[seed] for seed in seeds]

    check_output(Path(settings.output.root))
    device = resolve_device(settings.train.device)
    check_devices(device, group_run)
    threads = torch_threads(settings, worker, ranks, group_run.problem_class)
    if threads:
        torch.set_num_threads(threads)
    problems: dict[int, Any] = {}

    def problem_of(seed: int) -> Any:
        if seed not in problems:  # loads and checks the data: fails before any directory exists
            run = runs[seed]
            problems[seed] = run.problem_class(run.problem_config, data_root=Path(settings.data.root), seed=seed, device=device)
        return problems[seed]

    for seed in pending:
        problem_of(seed)
    progress = settings.train.progress
    if progress is None:
        progress = not worker and interactive_terminal()

    replacements = []
    with ExitStack() as held:
        members: list[_Member] = []
        for seed in pending:
            final = RunDirectory(runs[seed].path)
            target = final.overwrite_sibling if final.is_complete() else final
            if not held.enter_context(target.claim()):
                log.info("%s is being run by another process; skipping it", target.path)
                outcomes[seed] = RunOutcome(target.path, "busy")
            elif target is final and final.is_complete():
                outcomes[seed] = RunOutcome(final.path, "skipped")  # finished meanwhile
            else:
                members.append(_Member(runs[seed], final, target))
        if members:
            statuses = _train_group(group_run, runs, members, problem_of, device=str(device), progress=progress, worker=worker)
            for member in members:
                outcomes[member.seed] = RunOutcome(member.final.path, statuses[member.seed])
                if member.target is not member.final:
                    replacements.append(member)
    for member in replacements:
        member.target.replace(member.final)
    return [outcomes[seed] for seed in seeds]


def _variant_directory(run: ValidatedRun) -> Path:
    return run.path.parent


def _find_checkpoint(variant_dir: Path, training: list[int], group: list[int]) -> Optional[tuple[list[int], Path]]:
    """(the lanes' seeds, the folder) of the smallest saved group with checkpoints that
    holds every seed of ``training`` and no seed outside ``group``; None where none does."""
    from experiments import checkpoint

    folder = variant_dir / GROUPS_DIRECTORY
    if not folder.is_dir():
        return None
    found = []
    for path in folder.iterdir():
        if not path.name.startswith("seeds="):
            continue
        try:
            lanes = parse_seeds(path.name.removeprefix("seeds="))
        except ValueError:
            continue
        saved = checkpoint.list_checkpoints(path)
        if saved and set(training) <= set(lanes) <= set(group):
            found.append((len(lanes), lanes, path))
    if not found:
        return None
    _, lanes, saved_folder = min(found, key=lambda item: item[0])
    return lanes, saved_folder


def _train_group(
    group_run: ValidatedRun, runs: dict[int, ValidatedRun], members: list[_Member], problem_of: Any, *,
    device: str, progress: bool, worker: bool,
) -> dict[int, str]:
    """Train the claimed ``members`` as one batch (resuming their group's checkpoint where
    one fits) and write their directories; returns each seed's "completed" or "diverged"."""
    import torch

    from experiments import checkpoint
    from experiments.batching import build_group
    from experiments.atomic import write_atomically
    from experiments.run import LOG_LINES, RunPreempted, _record_end, stop_on_signals
    from experiments.training import TrainingStopped, train

    cfg = group_run.config
    training = [m.seed for m in members]
    variant_dir = _variant_directory(runs[training[0]])
    expected = {"config_id": group_run.config_id, "world_size": 1, "rank": 0}
    resume = None
    found = _find_checkpoint(variant_dir, training, list(cfg.train.seed_group))
    lane_seeds = training
    if found is not None:
        lanes, saved_folder = found
        # The newest verified checkpoint of the group (damaged ones set aside), or a refusal.
        payload, notes = checkpoint.resume(saved_folder, expected={**expected, "seeds": lanes})
        for note in notes:
            log.warning(note)
        ended = {lanes[lane] for lane in payload["state"]["lanes_ended"]} if payload is not None else set()
        if payload is not None and (ended & set(training) or not set(training) <= set(payload["written"])):
            log.warning("%s does not hold every seed still to train as it left it; training the group from the start", saved_folder)
        elif payload is not None:
            lane_seeds, resume = lanes, payload
    folder = variant_dir / GROUPS_DIRECTORY / f"seeds={compact_seeds(lane_seeds)}"
    if resume is None:  # an unusable earlier attempt's checkpoints must not outrank this one's
        shutil.rmtree(folder, ignore_errors=True)
    by_seed = {m.seed: m for m in members}
    for lane, seed in enumerate(lane_seeds):
        if seed in by_seed:
            by_seed[seed].lane = lane
    by_lane = {m.lane: m for m in members}
    try:  # before any directory is written, as for a single run
        group, state = build_group([problem_of(seed) for seed in lane_seeds], [runs[seed] for seed in lane_seeds])
    except MemoryError as error:
        raise RunError(f"not enough memory for this group of {len(lane_seeds)} seeds: {error}; lower train.batch_seeds") from None
    lead = runs[lane_seeds[0]]
    counters = lead.method.counters
    unit = group.budget_unit
    log_every = max(1, lead.budget // LOG_LINES)

    def save_checkpoint() -> None:
        rows = [by_lane[lane].rows if lane in by_lane else [] for lane in range(len(lane_seeds))]
        payload = {
            **expected, "seeds": lane_seeds, "written": sorted(by_seed), "state": state.state_dict(group),
            "rng": checkpoint.capture_rng(), "rows": rows,
        }
        checkpoint.save(checkpoint.checkpoint_path(folder, state.step), payload)
        checkpoint.prune(folder, cfg.checkpoint.keep)

    def record(row: dict[str, Any], lane: int) -> None:
        member = by_lane.get(lane)
        if member is None:
            return  # a seed riding along from the checkpoint, finished elsewhere
        member.writer.write(row)
        member.rows.append(row)
        done = row["epoch"] if row["epoch"] is not None else row["step"]
        if done % log_every == 0 or done == lead.budget:
            counted = "".join(f"  {name} {row[name]}" for name in counters)
            member.progress.info(
                "%s %d/%d  train_loss %.4e  val_loss %.4e  lr %.2e%s  %.1fs",
                unit, done, lead.budget, row["train_loss"], row["val_loss"], row["lr"], counted, row["wall_time"],
            )

    statuses: dict[int, str] = {}

    def finish(lane: int, outcome: Any) -> None:
        member = by_lane.get(lane)
        if member is None:
            return
        directory, seed = member.target, member.seed
        status = "diverged" if outcome.diverged else "complete"
        write_atomically(directory.file(FINAL_MODEL_FILE), lambda handle: torch.save(group.lane_model_state(state.model, lane), handle))
        _record_end(directory, member.meta, status, final=outcome.last_row, diverged=outcome.diverged)
        directory.mark_finished(status, member.writer.rows, member.writer.last_step)
        shutil.rmtree(directory.path / checkpoint.DIRECTORY, ignore_errors=True)  # a single attempt's
        member.done = True
        if outcome.diverged:
            where = outcome.diverged
            member.log.warning(
                "diverged %s seed %d: non-finite %s at step %d; recorded as diverged (never averaged into results)",
                member.run.variant, seed, where["quantity"], where["step"],
            )
            statuses[seed] = "diverged"
        else:
            member.log.info("done %s seed %d: val_loss %.4e after %.1fs", member.run.variant, seed, outcome.last_row["val_loss"], outcome.last_row["wall_time"])
            statuses[seed] = "completed"

    progress_log.propagate = not worker
    with ExitStack() as files:
        for member in members:
            directory, run = member.target, member.run
            member.log = logging.getLogger(f"experiments.run.seed{member.seed}")
            member.progress = logging.getLogger(f"experiments.progress.seed{member.seed}")
            fresh = resume is None or not directory.file("meta.json").is_file()
            if fresh:
                member.meta = run_metadata(run, device)
                member.meta["notes"] = group.problems[member.lane].notes()
                member.meta.update(world_size=1, launcher="single", backend=None, hosts=[], seed_group=lane_seeds)
                directory.start(OmegaConf.to_yaml(OmegaConf.create(run.resolved)), member.meta)
            else:
                member.meta = {**directory.read_meta(), "status": "running"}
                member.hardware_changed = record_resumption(member.meta, resume["state"]["step"], device)
                directory.write_meta(member.meta)
            files.enter_context(directory.log_to_file(member.log, member.progress))
            member.writer = files.enter_context(MetricsWriter(directory.file(METRICS_FILE), constant_columns(run), counters))
            if resume is None:
                member.log.info("run %s seed %d (batched with seeds %s) -> %s", run.variant, member.seed, compact_seeds(lane_seeds), directory.path)
                for note in member.meta["notes"]:
                    member.log.info(note)
        if resume is not None:
            state.load_state_dict(resume["state"], group)
            for member in members:
                for row in resume["rows"][member.lane]:
                    member.writer.write(row)
                    member.rows.append(row)
            checkpoint.restore_rng(resume["rng"])
            for member in members:
                member.log.info("resumed %s seed %d at step %d from the group's checkpoint -> %s", member.run.variant, member.seed, state.step, member.target.path)
                if member.hardware_changed:
                    member.log.warning(member.hardware_changed)
        # Lanes of seeds finished elsewhere since the checkpoint ride along unwritten.
        state.lanes_ended = sorted(set(state.lanes_ended) | {lane for lane in range(len(lane_seeds)) if lane not in by_lane})
        try:
            with stop_on_signals() as should_stop:
                train(
                    group, lead, state, on_evaluation=record, progress=progress, should_stop=should_stop,
                    save_checkpoint=save_checkpoint, checkpoint_every=cfg.checkpoint.every, on_lane_end=finish,
                )
        except TrainingStopped as stopped:
            for member in members:
                if not member.done:
                    _record_end(member.target, member.meta, "preempted", signal=stopped.reason)
                    member.log.warning("preempted by %s at step %d: %s", stopped.reason, state.step, member.target.path)
            raise RunPreempted(str(folder), stopped.reason, state.step) from None
        except BaseException as error:
            for member in members:
                if not member.done:
                    _record_end(member.target, member.meta, "failed", error=repr(error))
            raise
    shutil.rmtree(folder, ignore_errors=True)
    try:
        folder.parent.rmdir()  # the last group of this variant
    except OSError:
        pass
    return statuses
