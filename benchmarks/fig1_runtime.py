"""Time the whole Fig. 1 preset at the paper's settings on this machine.

    python benchmarks/fig1_runtime.py                      # 60 runs, then the figure
    python benchmarks/fig1_runtime.py -- train.epochs=100  # a quick look (extra overrides)

Runs ``python -m experiments.run -m +paper=fig1 output.overwrite=true`` (every run is
redone, so the time is the whole figure's: process start-up, data loading, training and
writing results), in parallel with the joblib launcher (one process per core unless
``--jobs``), then draws the figure from those runs. Prints runs per minute, the total time,
the mean training time of one run per variant, and the figure's summary table.
The sweep's console output goes to ``<figures>/fig1_runtime.log``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from experiments.analysis import figures
from experiments.analysis.aggregate import find_runs
from experiments.schema import DEFAULT_OUTPUT_ROOT


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-root", type=Path, default=Path(DEFAULT_OUTPUT_ROOT), help=f"output.root for the runs (default: {DEFAULT_OUTPUT_ROOT})")
    parser.add_argument("--figures", type=Path, default=Path("results/figures"), help="where the figure and log go (default: results/figures)")
    parser.add_argument("--jobs", type=int, help="parallel processes (default: one per core)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides, after --")
    args = parser.parse_args(argv)

    command = [sys.executable, "-m", "experiments.run", "-m", "+paper=fig1", "output.overwrite=true", f"output.root={args.output_root}"]
    if args.jobs:
        command.append(f"hydra.launcher.n_jobs={args.jobs}")
    command += args.overrides
    args.figures.mkdir(parents=True, exist_ok=True)
    log_path = args.figures / "fig1_runtime.log"
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} before the start")
    print("command:", " ".join(command[1:]))

    started = time.time()
    with open(log_path, "w") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "CI": "1"})
    elapsed = time.time() - started
    if done.returncode != 0:
        print(f"the sweep failed (exit {done.returncode}); see {log_path}", file=sys.stderr)
        return done.returncode

    results_dir = figures.FIGURES["fig1"].results_dir(args.output_root)
    complete, _ = find_runs(results_dir)
    fresh = [path for path in complete if (path / "COMPLETE").stat().st_mtime >= started]
    print(f"runs: {len(fresh)} in {elapsed / 60:.2f} min ({elapsed:.0f} s) -> {len(fresh) / (elapsed / 60):.2f} runs/minute")
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")

    report = figures.figure_report("fig1", results_dir)
    training_time = report.results.metrics.groupby(["label", "run"])["wall_time"].max().groupby("label").mean()
    for label in report.results.labels:
        print(f"  {label}: {training_time[label]:.1f} s of training per run (one core)")
    report.publish(args.figures, "fig1")
    return 0


if __name__ == "__main__":
    sys.exit(main())
