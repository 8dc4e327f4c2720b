"""One command, a short Fig. 2: Burgers 2d trained by Adam, Adam+AADL and Adam+AADL+MA.

    python -m experiments.demo                              # 5 seeds x 2,000 iterations, a few minutes on 2 cores
    python -m experiments.demo --seeds 2 --iterations 100   # a quick look
    python -m experiments.demo problem.activation=tanh      # any harness override (key=value)
    python -m experiments.demo --overwrite                  # train again instead of reusing

The runs are the Fig. 2 preset's (``configs/paper/fig2.yaml``: the paper's network, optimizer,
schedule and p, q, m, beta, epsilon) with fewer seeds, composed through Hydra and run by the
harness's own ``experiments.run.execute`` in worker processes, one per core with one torch
thread each. One progress bar covers every iteration of every run (in a terminal; elsewhere,
or under CI, a few progress lines). Then the summary table is printed and the figure written
by the same functions as ``python -m experiments.figures fig2``.

Runs go to ``results/runs/burgers2d/demo/``; complete ones are reused by the next call.
"""

from __future__ import annotations

import argparse
import csv
import multiprocessing
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig
from tqdm.auto import tqdm

from experiments.analysis import aggregate, figures
from experiments.compose import compose, preset_sweep
from experiments.errors import ConfigError, DatasetError, RunError, check_writable_directory
from experiments.results import LOG_FILE, METRICS_FILE, RunDirectory
from experiments.run import execute, interactive_terminal
from experiments.validation import ValidatedRun, validate

PRESET = "fig2"  # the paper figure the demo is a short version of
RUN_NAME = "demo"  # output.name: the demo's runs never mix with the full figure's
FIGURE_NAME = "fig2_demo"
#: 5 seeds x 3 variants at the preset's full 2,000 iterations (all four learning-rate stages):
#: a usable 95% interval in a few minutes on 2 cores (docs/burgers.md, "The demo", has the timings).
DEFAULT_SEEDS = 5
POLL_SECONDS = 0.5
PROGRESS_LINES = 5  # without a terminal: a line every 20%


@dataclass(frozen=True)
class DemoRun:
    config: DictConfig  # what the worker executes
    run: ValidatedRun

    @property
    def path(self) -> Path:
        return self.run.path

    @property
    def budget(self) -> int:
        return self.run.budget


# --------------------------------------------------------------------------------------------
# What to run
# --------------------------------------------------------------------------------------------


#: Preset variants the demo leaves out: the averaging-only control belongs to the claims
#: report's ablation, not to the README's five-minute comparison.
LEFT_OUT = ("ma",)


def demo_runs(seeds: int, overrides: Sequence[str], overwrite: bool) -> list[DemoRun]:
    """The preset's variants (in its order: slowest first) x seeds 0..seeds-1, composed as
    ``python -m experiments.run +paper=fig2 output.name=demo <overrides>`` would, and validated
    before anything runs (a bad override stops the demo naming its key)."""
    runs = []
    for variant in preset_sweep(PRESET)["method"]:
        if variant in LEFT_OUT:
            continue
        for seed in range(seeds):
            config = compose(
                f"+paper={PRESET}",
                f"method={variant}",
                f"seed={seed}",
                f"output.name={RUN_NAME}",
                f"output.overwrite={str(overwrite).lower()}",
                *overrides,
            )
            runs.append(DemoRun(config, validate(config)))
    return runs


def describe(runs: list[DemoRun], jobs: int) -> str:
    """What is about to run, from the composed config (so overrides show)."""
    cfg = runs[0].run.config
    problem = runs[0].run.problem_config
    accel = next(r.run.method.settings for r in runs if r.run.method.name == "aadl")
    seeds = len({r.run.config.seed for r in runs})
    variants = list(dict.fromkeys(r.run.variant for r in runs))
    return (
        f"Burgers 2d PINN, paper Fig. 2 settings: MLP 2-{problem.depth}x{problem.width}-1 "
        f"{problem.activation}, {cfg.optimizer.name} lr {cfg.optimizer.lr:g} "
        f"x{cfg.schedule.gamma:g} every {cfg.schedule.every} iterations; AADL p={accel.frequency} "
        f"q={accel.store_every} m={accel.history} beta={accel.relaxation:g} "
        f"eps={accel.average_threshold:g}\n"
        f"{len(variants)} variants ({', '.join(variants)}) x {seeds} seed{'s' if seeds != 1 else ''} x "
        f"{runs[0].budget:,} iterations = {len(runs)} runs, {jobs} at a time "
        "(one process per core, 1 torch thread each)"
    )


# --------------------------------------------------------------------------------------------
# Running them, with one progress display
# --------------------------------------------------------------------------------------------


def iterations_done(run: DemoRun, since: float) -> int:
    """Iterations a run has finished, from the last row of its metrics.csv (rows are flushed
    as they are written); a file older than ``since`` is a previous attempt's and counts 0."""
    metrics = run.path / METRICS_FILE
    try:
        if metrics.stat().st_mtime < since:
            return 0
        lines = metrics.read_text().splitlines()
    except FileNotFoundError:
        return 0
    if len(lines) < 2:
        return 0
    header, last = next(csv.reader(lines[:1])), next(csv.reader(lines[-1:]))
    return int(last[header.index("step")]) if len(last) == len(header) else 0


class Progress:
    """A bar over all iterations of all runs in a terminal; otherwise a line every 20%."""

    def __init__(self, total: int, interactive: bool):
        self.total = total
        self.started = time.monotonic()
        self.bar = tqdm(total=total, unit="it", dynamic_ncols=True, disable=not interactive, smoothing=0.1)
        self.interactive = interactive
        self.next_line = 1  # in fifths of the total

    def update(self, done: int, runs_done: int, runs: int) -> None:
        self.bar.set_postfix_str(f"runs {runs_done}/{runs}", refresh=False)
        self.bar.update(done - self.bar.n)  # through update(), so that tqdm's rate and ETA follow
        while not self.interactive and done * PROGRESS_LINES >= self.next_line * self.total:
            elapsed = tqdm.format_interval(time.monotonic() - self.started)
            print(f"  {100 * self.next_line // PROGRESS_LINES:3d}%  {done:,}/{self.total:,} iterations, "
                  f"{runs_done}/{runs} runs done, {elapsed} elapsed", flush=True)
            self.next_line += 1

    def close(self) -> None:
        self.bar.close()


class RunFailed(Exception):
    def __init__(self, run: DemoRun, error: BaseException):
        self.run, self.error = run, error
        super().__init__(f"{run.run.variant} seed {run.run.config.seed} failed: {error!r} (its log: {run.path / LOG_FILE})")


def train_all(pending: list[DemoRun], jobs: int, *, interactive: bool) -> None:
    """Run ``pending`` through ``experiments.run.execute`` in ``jobs`` worker processes
    (spawned: a fresh interpreter inherits no threads or torch state); raise RunFailed for
    the first run that fails, after cancelling those not started."""
    started = time.time()
    progress = Progress(sum(run.budget for run in pending), interactive)
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"))
    futures = [pool.submit(execute, run.config, worker=True) for run in pending]
    try:
        while True:
            finished, unfinished = wait(futures, timeout=POLL_SECONDS, return_when=FIRST_EXCEPTION)
            done = sum(run.budget if future.done() else iterations_done(run, started) for run, future in zip(pending, futures))
            progress.update(done, len(finished), len(futures))
            for run, future in zip(pending, futures):
                if future.done() and future.exception() is not None:
                    raise RunFailed(run, future.exception())
            if not unfinished:
                return
    finally:
        progress.close()
        pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def local_cores() -> int:
    """The cores this process may run on (fewer than the machine's under a CPU affinity mask)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.demo",
        description=__doc__.split("\n\n")[0],
        epilog="Full figures: python -m experiments.run -m +paper=fig2 (or fig3), then python -m experiments.figures fig2 (fig3).",
    )
    parser.add_argument("--seeds", type=int, default=DEFAULT_SEEDS, help=f"seeds 0..N-1 per variant (default {DEFAULT_SEEDS})")
    parser.add_argument("--iterations", type=int, help="iterations per run (default: the Fig. 2 preset's, 2,000)")
    parser.add_argument("--jobs", type=int, default=local_cores(), help="parallel worker processes (default: one per core)")
    parser.add_argument("--overwrite", action="store_true", help="train complete runs again instead of reusing them")
    parser.add_argument("--out", type=Path, default=figures.DEFAULT_FIGURE_DIR, help=f"figure and table directory (default {figures.DEFAULT_FIGURE_DIR})")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="Hydra overrides passed to every run, e.g. problem.activation=tanh")
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.jobs < 1:
        parser.error("--seeds and --jobs must be >= 1")
    if args.iterations is not None:
        args.overrides.insert(0, f"train.iterations={args.iterations}")  # a later override wins
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_writable_directory(args.out, "--out")  # before minutes of training, not after
        runs = demo_runs(args.seeds, args.overrides, args.overwrite)
    except (ConfigError, DatasetError, RunError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    pending = [run for run in runs if args.overwrite or not RunDirectory(run.path).is_complete()]
    jobs = min(args.jobs, len(pending) or args.jobs)
    print(describe(runs, jobs))
    if len(pending) < len(runs):
        print(f"reusing {len(runs) - len(pending)} complete run(s) from an earlier call (--overwrite trains them again)")
    if pending:
        started = time.monotonic()
        try:
            train_all(pending, jobs, interactive=interactive_terminal())
        except RunFailed as failure:
            print(f"error: {failure}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("\ninterrupted: the complete runs are kept and reused by the next call", file=sys.stderr)
            return 130
        print(f"trained {len(pending)} run(s) in {tqdm.format_interval(time.monotonic() - started)}")

    results = aggregate.load_runs([run.path for run in runs])
    title = f"Burgers 2d PINN: short run of paper Fig. 2 ({runs[0].budget:,} iterations)"
    report = figures.figure_report(PRESET, results, title=title)
    print()
    report.publish(args.out, FIGURE_NAME)
    print(f"\nruns: {runs[0].path.parents[1]} (reused by the next call)")
    seeds = len(preset_sweep(PRESET)["seed"])
    print(f"the full figures, {seeds} seeds each: python -m experiments.run -m +paper=fig2 (or fig3), "
          "then python -m experiments.figures fig2 (fig3); see docs/burgers.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
