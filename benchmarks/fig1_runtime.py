"""Time a whole paper preset on this machine: seeds batched per process vs one process per run.

    python benchmarks/fig1_runtime.py                          # Fig. 1, 60 runs, both ways
    python benchmarks/fig1_runtime.py --modes batched          # only the preset as it is
    python benchmarks/fig1_runtime.py --figure fig2 --budgets 100 300   # Figs. 2, 3: extrapolated
    python benchmarks/fig1_runtime.py -- train.epochs=100      # extra overrides for every sweep

Each mode runs ``python -m experiments.run -m +paper=<figure> output.overwrite=true`` (every
run is redone, so the time is the whole figure's: process start-ups, data loading, training
and writing results) with the joblib launcher (one process per core unless ``--jobs``):
``batched`` with the preset's ``train.batch_seeds`` (or ``--batch-seeds``), ``single`` with
``train.batch_seeds=1``, one after the other in this invocation and into separate output
roots. The batched runs then draw the figure.

With ``--budgets B1 B2`` each mode runs the whole sweep twice, at budgets B1 and B2 (epochs
or iterations), and the wall time at the preset's budget is extrapolated on the line
through the two measurements (start-ups and set-up are the intercept, training the slope):
for presets too long to time whole here (Figs. 2 and 3). The output says which numbers
are measured and which extrapolated. Each sweep's console output goes to
``<figures>/<figure>_runtime_<mode>.log``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from experiments.analysis import figures
from experiments.analysis.aggregate import find_runs
from experiments.schema import DEFAULT_OUTPUT_ROOT

#: The issue's targets for a whole preset on the 2-core machine, in minutes.
TARGET_MINUTES = {"fig1": 2, "fig2": 4, "fig3": 12}
MODES = ("batched", "single")


@dataclass
class Timing:
    mode: str
    budget: int | None  # None: the preset's
    seconds: float
    runs: int
    load_before: float
    load_after: float


def preset_budget(figure: str) -> tuple[str, int]:
    """(train.epochs or train.iterations, the preset's value)."""
    from experiments.compose import compose
    from experiments.problems import PROBLEMS
    from experiments.schema import BUDGET_KEYS

    cfg = compose(f"+paper={figure}")
    key = BUDGET_KEYS[PROBLEMS.get(cfg.experiment).budget_unit]
    return key, int(cfg.train[key])


def sweep(figure: str, mode: str, budget: int | None, args: argparse.Namespace, budget_key: str) -> Timing:
    root = args.output_root / mode
    command = [sys.executable, "-m", "experiments.run", "-m", f"+paper={figure}", "output.overwrite=true", f"output.root={root}"]
    if mode == "single":
        command.append("train.batch_seeds=1")
    elif args.batch_seeds:
        command.append(f"train.batch_seeds={args.batch_seeds}")
    if budget is not None:
        command.append(f"train.{budget_key}={budget}")
    if args.jobs:
        command.append(f"hydra.launcher.n_jobs={args.jobs}")
    command += args.overrides
    log_path = args.figures / f"{figure}_runtime_{mode}.log"
    load_before = os.getloadavg()[0]
    print(f"  {mode}: {' '.join(command[1:])}", flush=True)
    started = time.time()
    with open(log_path, "a" if budget is not None else "w") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "CI": "1"})
    elapsed = time.time() - started
    if done.returncode != 0:
        raise SystemExit(f"the {mode} sweep failed (exit {done.returncode}); see {log_path}")
    complete, _ = find_runs(figures.FIGURES[figure].results_dir(root))
    fresh = [path for path in complete if (path / "COMPLETE").stat().st_mtime >= started]
    return Timing(mode, budget, elapsed, len(fresh), load_before, os.getloadavg()[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--figure", choices=sorted(TARGET_MINUTES), default="fig1", help="the paper preset (default: fig1)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, in order (default: {','.join(MODES)})")
    parser.add_argument("--batch-seeds", type=int, help="train.batch_seeds of the batched mode (default: the preset's)")
    parser.add_argument("--budgets", type=int, nargs=2, metavar=("B1", "B2"), help="time two budgets and extrapolate to the preset's")
    parser.add_argument("--output-root", type=Path, default=Path(DEFAULT_OUTPUT_ROOT) / "runtime", help="root of the modes' output roots")
    parser.add_argument("--figures", type=Path, default=Path("results/figures"), help="where the figure and logs go (default: results/figures)")
    parser.add_argument("--jobs", type=int, help="parallel processes (default: one per core)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides, after --")
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    if not modes or any(m not in MODES for m in modes):
        parser.error(f"--modes takes {', '.join(MODES)}")
    args.figures.mkdir(parents=True, exist_ok=True)
    figure = args.figure
    budget_key, full_budget = preset_budget(figure)
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} before the start")
    print(f"{figure}: train.{budget_key}={full_budget} at the preset's settings")

    results: dict[str, float] = {}
    for mode in modes:
        if args.budgets is None:
            timing = sweep(figure, mode, None, args, budget_key)
            results[mode] = timing.seconds
            print(
                f"{mode:>8}: {timing.runs} runs in {timing.seconds / 60:.2f} min ({timing.seconds:.0f} s, measured) -> "
                f"{timing.runs / (timing.seconds / 60):.1f} runs/minute; load average {timing.load_before:.2f} -> {timing.load_after:.2f}"
            )
            continue
        low, high = (sweep(figure, mode, budget, args, budget_key) for budget in sorted(args.budgets))
        slope = (high.seconds - low.seconds) / (high.budget - low.budget)
        intercept = low.seconds - slope * low.budget
        results[mode] = intercept + slope * full_budget
        for timing in (low, high):
            print(
                f"{mode:>8}: train.{budget_key}={timing.budget}: {timing.runs} runs in {timing.seconds:.0f} s (measured); "
                f"load average {timing.load_before:.2f} -> {timing.load_after:.2f}"
            )
        print(
            f"{mode:>8}: train.{budget_key}={full_budget}: {results[mode] / 60:.2f} min ({results[mode]:.0f} s, EXTRAPOLATED "
            f"on the line through the two: {intercept:.0f} s fixed + {slope * 1000:.1f} s per 1000 {budget_key})"
        )
    target = TARGET_MINUTES[figure] * 60
    for mode, seconds in results.items():
        verdict = "meets" if seconds <= target else f"misses by {seconds / target:.2f}x"
        print(f"{mode:>8}: {seconds / 60:.2f} min against the {TARGET_MINUTES[figure]}-minute target: {verdict}")
    if set(MODES) <= set(results):
        print(f"batched / single: {results['batched'] / results['single']:.2f} (speed-up {results['single'] / results['batched']:.2f}x)")

    if args.budgets is None and "batched" in results:
        results_dir = figures.FIGURES[figure].results_dir(args.output_root / "batched")
        figures.figure_report(figure, results_dir).publish(args.figures, figure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
