"""Hydra entry point: ``python -m experiments.run [overrides]`` (``-m`` for sweeps).

    python -m experiments.run                                  # Adam, seed 0, paper settings
    python -m experiments.run method=aadl_ma seed=3 train.epochs=200
    python -m experiments.run -m +paper=fig1                   # Fig. 1: 3 variants x 20 seeds
    python -m experiments.run -m method=aadl method.aadl.history=5,10,20 seed=0,1,2 output.name=sweep_m

Each run validates its config (before anything is created), skips itself when a finished
run of the same config and seed exists (``output.overwrite=true`` reruns it into a sibling
directory and swaps it in once complete), checks the machine (output writable, free disk,
the requested device, the method's memory), then writes a self-describing run directory
(experiments/results.py). A multirun validates every job before the first one starts; its
jobs go to the configured launcher (``hydra/launcher=local``: one process per core, each
with one torch thread and no progress bar). SIGTERM, SIGUSR1, SIGUSR2 or SIGINT (recorded
from the process's first instant: experiments/stopping.py) stops a run between two steps,
saves a checkpoint, records the run as preempted and exits with status 75 (PREEMPTED_EXIT,
for batch scripts to requeue on); rerunning the same command resumes it from its newest
checkpoint (``checkpoint.every`` adds periodic ones, which a kill -9 needs). A signal to a
sweep, or to any one of its workers, stops every running job so, and the sweep exits 75.
"""

from __future__ import annotations

if __name__ == "__main__":
    # python -m experiments.run: stop signals are recorded before the heavy imports below,
    # and the module runs under its own name (a class defined in __main__ would be a second
    # copy that never catches the one the other modules raise).
    from experiments.stopping import command_line

    raise SystemExit(command_line(lambda: __import__("experiments.run", fromlist=["main"]).main()))

import errno
import logging
import os
import shutil
import signal
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from experiments.atomic import write_atomically
from experiments.compose import CONFIG_DIR, CONFIG_NAME, expand_sweep, sweep_overrides
from experiments.errors import ConfigError, DatasetError, HarnessError, RunError, check_writable_directory
from experiments import stopping
# The signals that stop a run, its exit status when they did, and its exception (one class
# for every module: experiments/stopping.py).
from experiments.stopping import PREEMPTED_EXIT, STOP_SIGNALS, RunPreempted
from experiments.results import (
    FINAL_MODEL_FILE,
    METRICS_FILE,
    MetricsWriter,
    RunDirectory,
    constant_columns,
    now,
    record_resumption,
    run_metadata,
)
from experiments.validation import ValidatedRun, validate
from experiments.world import WorldError

from experiments.compose import register_settings_nodes

register_settings_nodes()  # before @hydra.main composes: every method and problem setting is overridable

log = logging.getLogger("experiments.run")
# Progress lines go to the run's log file always and to the console only in single runs: a
# sweep's console would otherwise interleave ten lines per run from every worker.
progress_log = logging.getLogger("experiments.progress")
# The run's log file gets INFO lines even where nobody configured logging (in-process use).
for _logger in (log, progress_log):
    _logger.setLevel(logging.INFO)

#: How many progress lines a run writes to its log (the CSV has every evaluation).
LOG_LINES = 10
#: A run does not start with less free space than this where it writes.
MIN_FREE_BYTES = 64 * 2**20


def interactive_terminal() -> bool:
    """Whether a progress bar has someone to show it to: stderr is a terminal, not under CI."""
    return sys.stderr.isatty() and not os.environ.get("CI")


@dataclass(frozen=True)
class RunOutcome:
    path: Path
    # "completed", "diverged", "skipped" (already finished) or "busy" (another process runs it)
    status: str


@dataclass(frozen=True)
class Ranks:
    """The processes that train one run together (experiments.world found them)."""

    world_size: int = 1
    rank: int = 0
    launcher: str = "single"
    backend: Optional[str] = None
    hosts: tuple[str, ...] = ()
    device: Optional[str] = None  # the device the launcher gave this rank, if any
    threads: Optional[int] = None  # torch threads per rank where train.threads is unset

    @property
    def main(self) -> bool:
        return self.rank == 0


def execute(cfg: DictConfig, *, worker: bool = False, ranks: Ranks = Ranks()) -> RunOutcome:
    """Validate, check the machine, then run one config (one seed) into its run directory.

    ``worker`` marks a multirun job: one torch thread (the launcher runs one job per core)
    and no progress bar. ``ranks``: the processes training this run together (rank 0
    writes the run directory; every rank writes its own checkpoints). Raises ConfigError,
    DatasetError or RunError before anything is written, and RunPreempted when a signal
    stopped the run (after its checkpoint).

    A config with ``train.seed_group`` of several seeds trains them batched in this process
    (experiments/seed_groups.py) and returns a list: one RunOutcome per seed.
    """
    import torch

    from experiments import checkpoint
    from experiments.parallel import DataParallel
    from experiments.training import build_state, resolve_device

    parallel = DataParallel(ranks.world_size, ranks.rank)
    run = validate(cfg)
    if run.config.train.seed_group is not None:
        from experiments.seed_groups import execute_group, member_config

        if len(run.config.train.seed_group) > 1:
            return execute_group(cfg, worker=worker, ranks=ranks)
        run = validate(member_config(cfg, run.config.seed))  # a group of one is a single run
    settings = run.config
    final = RunDirectory(run.path)

    def decide() -> dict[str, Any]:
        """Rank 0's view of the run directory, which every rank then follows."""
        if final.is_complete() and not settings.output.overwrite:
            return {"action": "skipped"}
        try:
            check_output(Path(settings.output.root))
        except RunError as error:
            return {"action": "error", "message": str(error)}
        return {"action": "run", "overwrite": final.is_complete()}

    decision = parallel.broadcast(decide() if ranks.main else None)
    if decision["action"] == "error":
        raise RunError(decision["message"])
    if decision["action"] == "skipped":
        log.info("%s is finished; skipping it (output.overwrite=true reruns it)", final.path)
        return RunOutcome(final.path, "skipped")
    # Retraining a finished run goes to a sibling, swapped in once it is complete.
    target = final.overwrite_sibling if decision["overwrite"] else final

    device = torch.device(ranks.device) if ranks.device else resolve_device(settings.train.device)
    check_devices(device, run)
    threads = torch_threads(settings, worker, ranks, run.problem_class)
    if threads:
        torch.set_num_threads(threads)
    # Loads and checks the data, so a missing or wrong file fails before the directory exists.
    problem = run.problem_class(
        run.problem_config, data_root=Path(settings.data.root), seed=settings.seed, device=device
    )
    try:
        state = build_state(problem, run)
    except MemoryError as error:
        raise RunError(f"not enough memory for this run: {error}") from None
    progress = settings.train.progress
    if progress is None:
        progress = not worker and ranks.main and interactive_terminal()

    with (target.claim() if ranks.main else _held()) as claimed:
        finished = target is final and final.is_complete()  # finished meanwhile
        status = parallel.broadcast({"claimed": claimed, "finished": finished} if ranks.main else None)
        if not status["claimed"]:
            log.info("%s is being run by another process; skipping it", target.path)
            return RunOutcome(target.path, "busy")
        if status["finished"]:
            return RunOutcome(final.path, "skipped")
        # The newest step every rank holds an intact copy of (verified), or a refusal on every rank.
        resume, notes = checkpoint.resume(
            target.path, expected=checkpoint_identity(run, ranks), rank=_rank_suffix(ranks), parallel=parallel
        )
        for note in notes:
            log.warning(note)
        outcome = _train_into(
            target, run, problem, state, resume=resume, progress=progress, worker=worker, device=str(device),
            ranks=ranks, parallel=parallel,
        )
    if target is not final and ranks.main:
        target.replace(final)
    return RunOutcome(final.path, outcome)


@contextmanager
def _held() -> Iterator[bool]:
    yield True  # ranks other than 0 follow rank 0's lock


def torch_threads(settings: Any, worker: bool, ranks: Ranks, problem_class: type) -> Optional[int]:
    """torch's intra-op threads for this process (None: torch's default, one per core).

    ``train.threads`` where set. Otherwise by process count: 1 in a multirun worker (the
    launcher runs one process per core; a seed group too); for one of several ranks its
    share of the node's cores (experiments.world.default_threads); and for a single
    process the experiment's choice, its problem's ``threads`` attribute (the small
    networks of Figs. 1-3 say 1: a second thread only contends with other processes;
    docs/burgers.md, "Benchmark"), else torch's default (the image networks use every core)."""
    if settings.train.threads:
        return settings.train.threads
    if worker:
        return 1
    if ranks.threads:
        return ranks.threads
    return problem_class.threads


def _rank_suffix(ranks: Ranks) -> Optional[int]:
    """The rank in checkpoint file names: none for a single process."""
    return ranks.rank if ranks.world_size > 1 else None


def checkpoint_identity(run: ValidatedRun, ranks: Ranks = Ranks()) -> dict[str, Any]:
    """What a checkpoint must have been made for to be resumed by ``run`` on ``ranks``."""
    return {"config_id": run.config_id, "seed": run.config.seed, "world_size": ranks.world_size, "rank": ranks.rank}


def check_output(root: Path) -> None:
    """Raise RunError unless runs can be written under ``root`` with room to spare."""
    existing = check_writable_directory(root, "output.root")
    free = shutil.disk_usage(existing).free
    if free < MIN_FREE_BYTES:
        raise RunError(
            f"output.root={root}: only {free / 2**20:.1f} MiB free on the disk of {existing}, "
            f"a run needs at least {MIN_FREE_BYTES / 2**20:.0f} MiB; free some space or choose "
            "another disk with output.root=<dir>"
        )


def check_devices(device: Any, run: ValidatedRun) -> None:
    """Raise RunError unless every device the run asks for exists here: the training device
    (``device``, from train.device or the launcher) and each of the method's device
    settings (``Method.devices``, e.g. method.aadl.history_device)."""
    import torch

    check_device(device, run.config.train.device)
    for key, requested in run.method.devices().items():
        check_device(torch.device(requested), requested, key)


def check_device(device: Any, requested: str, key: str = "train.device") -> None:
    import torch

    if device.type == "cuda":
        if not torch.cuda.is_available():
            where = ", or train.device=auto to take a GPU where there is one" if key == "train.device" else ""
            raise RunError(
                f"{key}={requested}: no CUDA device is available here "
                f"(torch.cuda.is_available() is False); use {key}=cpu{where}"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RunError(
                f"{key}={requested}: this machine has {torch.cuda.device_count()} CUDA "
                f"device(s), numbered from 0"
            )


@contextmanager
def stop_on_signals() -> Iterator[Any]:
    """While the block runs, a stop signal (STOP_SIGNALS) only sets a flag; the returned
    callable gives the signal's name once one arrived (the loop stops between two steps).
    In a process that records its signals from the start (the command line, a sweep's
    worker), that record is the flag: a signal that came while Python started counts."""
    if stopping.recording():
        yield stopping.arrived
        return
    arrived: list[str] = []

    def handler(signum: int, frame: Any) -> None:
        arrived.append(signal.Signals(signum).name)

    try:
        previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    except ValueError:  # not the main thread: the caller's handlers stay in charge
        yield lambda: None
        return
    try:
        yield lambda: arrived[0] if arrived else None
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _train_into(
    directory: RunDirectory, run: ValidatedRun, problem: Any, state: Any, *, resume: Optional[dict[str, Any]],
    progress: bool, worker: bool, device: str, ranks: Ranks = Ranks(), parallel: Any = None,
) -> str:
    """Write the run directory: config and metadata, metrics while training (with
    checkpoints), then COMPLETE. ``resume`` is the checkpoint to continue from. Returns
    "completed" or "diverged"."""
    import torch

    from experiments import checkpoint
    from experiments.training import TrainingStopped, train

    cfg = run.config
    log_every = max(1, run.budget // LOG_LINES)
    unit = problem.budget_unit
    seed = cfg.seed
    counters = run.method.counters
    rows: list[dict[str, Any]] = []

    def record(row: dict[str, Any]) -> None:
        writer.write(row)
        rows.append(row)
        done = row["epoch"] if row["epoch"] is not None else row["step"]
        if done % log_every == 0 or done == run.budget:
            counted = "".join(f"  {name} {row[name]}" for name in counters)
            progress_log.info(
                "%s %d/%d  train_loss %.4e  val_loss %.4e  lr %.2e%s  %.1fs",
                unit, done, run.budget, row["train_loss"], row["val_loss"], row["lr"], counted, row["wall_time"],
            )

    suffix = _rank_suffix(ranks)
    main = ranks.main

    def save_checkpoint() -> None:
        payload = {**checkpoint_identity(run, ranks), "state": state.state_dict(problem), "rng": checkpoint.capture_rng(), "rows": list(rows)}
        checkpoint.save(checkpoint.checkpoint_path(directory.path, state.step, suffix), payload)
        checkpoint.prune(directory.path, cfg.checkpoint.keep, suffix)

    if not main:  # only rank 0 writes the run directory; the others train and checkpoint
        return _train_follower(directory, run, problem, state, resume, save_checkpoint, parallel)
    hardware_changed = None
    if resume is None:
        meta = run_metadata(run, device)
        meta["notes"] = problem.notes()
        meta.update(world_size=ranks.world_size, launcher=ranks.launcher, backend=ranks.backend, hosts=list(ranks.hosts))
    else:
        meta = {**directory.read_meta(), "status": "running"}
        hardware_changed = record_resumption(meta, resume["state"]["step"], device)
    progress_log.propagate = not worker
    try:
        if resume is None:
            directory.start(OmegaConf.to_yaml(OmegaConf.create(run.resolved)), meta)
        else:
            directory.write_meta(meta)
        with directory.log_to_file(log, progress_log), MetricsWriter(
            directory.file(METRICS_FILE), constant_columns(run), counters
        ) as writer:
            if resume is None:
                log.info("run %s seed %d -> %s", run.variant, seed, directory.path)
                for note in meta["notes"]:
                    log.info(note)
            else:
                state.load_state_dict(resume["state"], problem)
                for row in resume["rows"]:  # the metrics as they stood at the checkpoint
                    writer.write(row)
                    rows.append(row)
                checkpoint.restore_rng(resume["rng"])
                log.info("resumed %s seed %d at step %d from its checkpoint -> %s", run.variant, seed, state.step, directory.path)
                if hardware_changed:
                    log.warning(hardware_changed)
            try:
                with stop_on_signals() as should_stop:
                    result = train(
                        problem, run, state, on_evaluation=record, progress=progress, should_stop=should_stop,
                        save_checkpoint=save_checkpoint, checkpoint_every=cfg.checkpoint.every,
                        **({"parallel": parallel} if parallel is not None else {}),
                    )
            except TrainingStopped as stopped:
                _record_end(directory, meta, "preempted", signal=stopped.reason)
                log.warning("preempted by %s at step %d: %s", stopped.reason, state.step, directory.path)
                raise RunPreempted(str(directory.path), stopped.reason, state.step) from None
            except BaseException as error:  # say why the run is incomplete
                _record_end(directory, meta, "failed", error=repr(error))
                raise
        outcome = "diverged" if result.diverged else "complete"
        write_atomically(directory.file(FINAL_MODEL_FILE), lambda handle: torch.save(state.model.state_dict(), handle))
        _record_end(directory, meta, outcome, final=result.last_row, diverged=result.diverged)
        directory.mark_finished(outcome, writer.rows, writer.last_step)
        if parallel is not None:
            parallel.broadcast(None)  # every rank's last checkpoint is written: all can go
        shutil.rmtree(directory.path / checkpoint.DIRECTORY, ignore_errors=True)
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            raise RunError(f"cannot write the run directory {directory.path}: {error.strerror}; it is left incomplete") from None
        raise
    if result.diverged:
        where = result.diverged
        log.warning(
            "diverged %s seed %d: non-finite %s at step %d; recorded as diverged (never averaged into results)",
            run.variant, seed, where["quantity"], where["step"],
        )
        return "diverged"
    log.info("done %s seed %d: val_loss %.4e after %.1fs", run.variant, seed, result.last_row["val_loss"], result.last_row["wall_time"])
    return "completed"


def _train_follower(directory, run, problem, state, resume, save_checkpoint, parallel) -> str:
    """A rank other than 0: the same training, writing only its own checkpoints."""
    from experiments import checkpoint
    from experiments.training import TrainingStopped, train

    if resume is not None:
        state.load_state_dict(resume["state"], problem)
        checkpoint.restore_rng(resume["rng"])
    progress_log.propagate = False
    try:
        with stop_on_signals() as should_stop:
            result = train(
                problem, run, state, on_evaluation=lambda row: None, should_stop=should_stop,
                save_checkpoint=save_checkpoint, checkpoint_every=run.config.checkpoint.every, parallel=parallel,
            )
    except TrainingStopped as stopped:
        raise RunPreempted(str(directory.path), stopped.reason, state.step) from None
    parallel.broadcast(None)  # rank 0 deletes the checkpoints once every rank is done
    return "diverged" if result.diverged else "completed"


def _record_end(directory: RunDirectory, meta: dict[str, Any], status: str, **fields: Any) -> None:
    """Record how the run ended; where even that write fails (a full disk), say so in the
    log instead of hiding the first error."""
    meta.update(status=status, ended=now(), **{k: v for k, v in fields.items() if v is not None})
    try:
        directory.write_meta(meta)
    except OSError as error:
        if status == "complete":
            raise
        log.error("could not record status %r in %s: %s", status, directory.path, error)


# --------------------------------------------------------------------------------------------
# Multirun: validate the whole sweep first; stop the workers with the parent
# --------------------------------------------------------------------------------------------


class ValidateSweep(Callback):
    """Hydra callback: before a multirun launches anything, compose and validate every job
    (a bad value in any job stops the sweep, naming the job and the key), and make a stop
    signal stop the sweep: every running job checkpoints, the parent exits 75."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from experiments.seed_groups import group_sweep, seed_groups

        _refuse_sweep_on_ranks()
        if stopping.arrived():
            print(f"sweep stopped by {stopping.arrived()} before it started: nothing was run; rerun the same command", file=sys.stderr)
            sys.exit(PREEMPTED_EXIT)
        overrides = list(config.hydra.overrides.task)
        jobs = sweep_overrides(overrides)
        runs = []
        validated: dict[tuple[str, ...], ValidatedRun] = {}
        for index, job in enumerate(jobs):
            try:
                runs.append(_validate_job(job, validated))
            except (ConfigError, DatasetError) as error:
                print(f"error: job {index} of {len(jobs)} ({' '.join(job)}): {error}", file=sys.stderr)
                sys.exit(2)
        if "submitit" not in str(config.hydra.launcher.get("_target_", "")):
            # The jobs run on this machine: an unwritable output root stops the sweep here, in
            # one line, rather than in every worker.
            for root in sorted({run.config.output.root for run in runs}):
                try:
                    check_writable_directory(root, "output.root")
                except RunError as error:
                    print(f"error: {error}", file=sys.stderr)
                    sys.exit(2)
        try:
            groups = seed_groups(jobs, runs)
        except ConfigError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)
        if groups is None:
            print(f"[experiments.run] {len(jobs)} job(s) validated", file=sys.stderr)
        else:
            # Each job now trains one group of seeds batched (train.batch_seeds=1: one per run).
            group_sweep(config, groups)
            processes = len(jobs) // sum(len(group) for group in groups) * len(groups)
            print(
                f"[experiments.run] {len(jobs)} run(s) validated; seeds batched "
                f"{runs[0].config.train.batch_seeds} per process: {processes} job(s)",
                file=sys.stderr,
            )
        _stop_workers_with_parent(config)


def _refuse_sweep_on_ranks() -> None:
    """A multirun started by a launcher of several ranks would run one whole copy of the
    sweep per rank (each a world of one): refuse it in one line."""
    from experiments.world import world_info_from_env

    try:
        info = world_info_from_env()
    except WorldError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    if info.world_size > 1:
        print(
            f"error: a multirun (-m) cannot run on {info.world_size} ranks ({info.launcher}, rank {info.rank}): "
            "each rank would run its own copy of the whole sweep; start the sweep without the launcher, "
            "or launch one run (no -m) per torchrun/srun/mpirun",
            file=sys.stderr,
        )
        sys.exit(2)


def _validate_job(job: list[str], validated: dict[tuple[str, ...], ValidatedRun]) -> ValidatedRun:
    """One job of a sweep, validated. The jobs that differ only in their seed are composed
    and validated once (composing and validating is the slow part of a sweep's start, and a
    figure has 60 jobs); each seed is then that run with its seed, as
    experiments.seed_groups.member_run derives the members of a group."""
    from experiments.seed_groups import member_run

    seedless = tuple(o for o in job if not o.startswith("seed="))
    seeds = [o.removeprefix("seed=") for o in job if o.startswith("seed=")]
    if len(seeds) != 1 or not seeds[0].isdigit():
        return validate(expand_sweep(job)[0])
    if seedless not in validated:
        validated[seedless] = validate(expand_sweep(job)[0])
    first = validated[seedless]
    if first.config.train.seed_group is not None:
        return validate(expand_sweep(job)[0])
    return member_run(first, int(seeds[0]))


def _stop_workers_with_parent(config: DictConfig) -> None:
    """A stop signal to the sweep's process. Workers on this machine (joblib): each running
    job gets SIGTERM, checkpoints and records its run as preempted, jobs not started are
    left, and the parent exits 75 once the launcher returns (experiments/stopping.py).
    Jobs elsewhere (submitit): the parent stops waiting for them and exits 128+signal."""
    launcher = str(OmegaConf.select(config, "hydra.launcher._target_", default="") or "")
    if "joblib" in launcher:
        stopping.start_sweep(Path(str(config.hydra.sweep.dir)) / ".aadl-stop")
        return
    import psutil

    def handler(signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        children = psutil.Process().children(recursive=True)
        for child in children:
            try:
                child.send_signal(signal.SIGTERM)
            except psutil.Error:
                pass
        psutil.wait_procs(children, timeout=10)
        print(f"sweep stopped by {name}: this process stopped waiting; jobs already submitted go on", file=sys.stderr)
        os._exit(128 + signum)

    for sig in STOP_SIGNALS:
        signal.signal(sig, handler)


def start_ranks(requested_device: str) -> tuple[Ranks, Any]:
    """The processes a launcher (torchrun, srun, mpirun, jsrun) started for this run, with
    their process group set up; one process and no group without a launcher."""
    from experiments.world import default_threads, init_distributed, world_info_from_env

    info = world_info_from_env()
    if info.world_size == 1:
        return Ranks(), None
    context = init_distributed(info, device=requested_device)
    ranks = Ranks(
        world_size=context.world_size, rank=context.rank, launcher=context.launcher, backend=context.backend,
        hosts=tuple(context.hosts), device=str(context.device), threads=default_threads(info),
    )
    return ranks, context


@hydra.main(config_path=str(CONFIG_DIR), config_name=CONFIG_NAME, version_base="1.3")
def main(cfg: DictConfig) -> None:
    worker = HydraConfig.get().mode == RunMode.MULTIRUN
    if worker:
        try:
            stopping.record_signals()  # a worker outlives its job: a signal between two jobs is kept
        except ValueError:  # not the main thread: the launcher's handlers stay in charge
            pass
        stopped = stopping.sweep_stopping()
        if stopped:
            print(f"not started (the sweep is stopping on {stopped}): {' '.join(HydraConfig.get().overrides.task)}", file=sys.stderr, flush=True)
            return
    elif stopping.arrived():
        print(f"preempted by {stopping.arrived()} before the run started: nothing was written; rerun the same command", file=sys.stderr)
        sys.exit(PREEMPTED_EXIT)
    context = None
    try:
        ranks, context = (Ranks(), None) if worker else start_ranks(str(cfg.train.device))
        if not ranks.main:
            for logger in (log, progress_log):
                logger.propagate = False  # rank 0 speaks for the run
        execute(cfg, worker=worker, ranks=ranks)
    except RunPreempted as stopped:
        print(f"{stopped}", file=sys.stderr, flush=True)
        if worker and stopping.in_sweep_worker():
            # The parent (told when the signal came) stops the other jobs and exits 75 once
            # each has checkpointed; a worker that exited here would break the pool.
            return
        if worker:
            os._exit(PREEMPTED_EXIT)  # a submitit job: its status is the job's
        sys.exit(PREEMPTED_EXIT)
    except (HarnessError, WorldError) as error:
        if worker:
            raise  # the launcher reports the failed job with its overrides
        sys.exit(f"error: {error}")
    finally:
        if context is not None:
            context.close()

