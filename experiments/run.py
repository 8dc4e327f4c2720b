"""Hydra entry point: ``python -m experiments.run [overrides]`` (``-m`` for sweeps).

    python -m experiments.run                                  # Adam, seed 0, paper settings
    python -m experiments.run accel=aadl_ma seed=3 train.epochs=200
    python -m experiments.run -m +paper=fig1                   # Fig. 1: 3 variants x 20 seeds
    python -m experiments.run -m accel=aadl accel.history=5,10,20 seed=0,1,2 output.name=sweep_m

Each run validates its config (before anything is created), skips itself when a complete
run of the same config and seed exists (``output.overwrite=true`` reruns it), and writes a
self-describing run directory (experiments/results.py). Multirun jobs go to the joblib
launcher, one process per core, each with one torch thread and no progress bar.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from experiments.config import CONFIG_DIR, CONFIG_NAME, ConfigError, ValidatedRun, validate
from experiments.data import DatasetError
from experiments.results import (
    METRICS_FILE,
    MetricsWriter,
    RunDirectory,
    constant_columns,
    now,
    run_metadata,
    run_path,
)

log = logging.getLogger("experiments.run")
# Progress lines go to the run's log file always and to the console only in single runs: a
# sweep's console would otherwise interleave ten lines per run from every worker.
progress_log = logging.getLogger("experiments.progress")
# The run's log file gets INFO lines even where nobody configured logging (in-process use).
for _logger in (log, progress_log):
    _logger.setLevel(logging.INFO)

#: How many progress lines a run writes to its log (the CSV has every evaluation).
LOG_LINES = 10


def interactive_terminal() -> bool:
    """Whether a progress bar has someone to show it to: stderr is a terminal, not under CI."""
    return sys.stderr.isatty() and not os.environ.get("CI")


@dataclass(frozen=True)
class RunOutcome:
    path: Path
    status: str  # "completed", "skipped" (already complete) or "busy" (another process runs it)


def execute(cfg: DictConfig, *, worker: bool = False) -> RunOutcome:
    """Validate, then run one config (one seed) into its run directory.

    ``worker`` marks a multirun job: one torch thread (the launcher runs one job per core)
    and no progress bar. Raises ConfigError or DatasetError before anything is written.
    """
    import torch

    from experiments.training import resolve_device

    run = validate(cfg)
    settings = run.config
    directory = RunDirectory(run_path(run))
    if directory.is_complete() and not settings.output.overwrite:
        log.info("%s is complete; skipping it (output.overwrite=true reruns it)", directory.path)
        return RunOutcome(directory.path, "skipped")

    threads = settings.train.threads or (1 if worker else None)
    if threads:
        torch.set_num_threads(threads)
    device = resolve_device(settings.train.device)
    # Loads and checks the data, so a missing or wrong file fails before the directory exists.
    problem = run.problem_class(
        run.problem_config, data_root=Path(settings.data.root), seed=settings.seed, device=device
    )
    progress = settings.train.progress
    if progress is None:
        progress = not worker and interactive_terminal()

    with directory.claim() as claimed:
        if not claimed:
            log.info("%s is being run by another process; skipping it", directory.path)
            return RunOutcome(directory.path, "busy")
        if directory.is_complete() and not settings.output.overwrite:  # finished meanwhile
            return RunOutcome(directory.path, "skipped")
        _train_into(directory, run, problem, progress=progress, worker=worker, device=str(device))
    return RunOutcome(directory.path, "completed")


def _train_into(directory: RunDirectory, run: ValidatedRun, problem: Any, *, progress: bool, worker: bool, device: str) -> None:
    """Write the run directory: config and metadata, metrics while training, then COMPLETE."""
    from experiments.training import train

    meta = run_metadata(run, device)
    meta["notes"] = problem.notes()
    directory.start(OmegaConf.to_yaml(OmegaConf.create(run.resolved)), meta)
    log_every = max(1, run.budget // LOG_LINES)
    unit = problem.budget_unit
    seed = run.config.seed

    def record(row: dict[str, Any]) -> None:
        writer.write(row)
        done = row["epoch"] if row["epoch"] is not None else row["step"]
        if done % log_every == 0 or done == run.budget:
            progress_log.info(
                "%s %d/%d  train_loss %.4e  val_loss %.4e  lr %.2e  AA %d/%d  MA %d  %.1fs",
                unit, done, run.budget, row["train_loss"], row["val_loss"], row["lr"],
                row["aa_accepted"], row["aa_attempts"], row["averages_applied"], row["wall_time"],
            )

    progress_log.propagate = not worker
    with directory.log_to_file(log, progress_log), MetricsWriter(directory.file(METRICS_FILE), constant_columns(run)) as writer:
        log.info("run %s seed %d -> %s", run.variant, seed, directory.path)
        for note in meta["notes"]:
            log.info(note)
        try:
            final = train(problem, run, on_evaluation=record, progress=progress)
        except BaseException as error:  # KeyboardInterrupt too: say why the run is incomplete
            directory.write_meta({**meta, "status": "failed", "error": repr(error), "ended": now()})
            raise
    directory.write_meta({**meta, "status": "complete", "ended": now(), "final": final})
    directory.mark_complete()
    log.info("done %s seed %d: val_loss %.4e after %.1fs", run.variant, seed, final["val_loss"], final["wall_time"])


@hydra.main(config_path=str(CONFIG_DIR), config_name=CONFIG_NAME, version_base="1.3")
def main(cfg: DictConfig) -> None:
    worker = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        execute(cfg, worker=worker)
    except (ConfigError, DatasetError) as error:
        if worker:
            raise  # the launcher reports the failed job with its overrides
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
