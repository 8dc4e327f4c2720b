"""Paper figures and sweep tables from run directories.

    python -m experiments.figures fig1                         # results/runs/graduate_admissions/fig1
    python -m experiments.figures curves DIR [--metric val_loss] [--threshold 0.005]
    python -m experiments.figures sweep DIR [--metric val_loss]

Each command writes ``<name>.png`` and ``<name>.pdf`` plus a summary table as CSV (numbers)
and Markdown (``mean [95% CI]``) into ``--out`` (default results/figures) and prints the
table. The notebooks call the same functions (``figure_report``).

Figures are built with matplotlib's object API (``Figure``, not pyplot) and rendered by
Agg, so nothing here depends on a display or on the global pyplot state.
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from experiments import aggregate
from experiments.aggregate import Results, ResultsError

DEFAULT_OUTPUT_ROOT = Path("results/runs")
DEFAULT_FIGURE_DIR = Path("results/figures")
REPO_ROOT = Path(__file__).resolve().parents[1]

#: Legend colours by variant suffix, the same in every figure.
VARIANT_COLOURS = {0: "tab:blue", 1: "tab:orange", 2: "tab:green"}

STYLE = {
    "font.size": 13,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "lines.linewidth": 2.0,
    "legend.frameon": False,
}


@dataclass(frozen=True)
class FigureSpec:
    """A paper figure: where its runs are and how to draw them."""

    experiment: str
    run_name: str  # output.name of the preset that produces the runs
    title: str
    metric: str = "val_loss"
    x: str = "epoch"
    ylabel: str = "validation MSE"
    threshold: float | None = None  # for the "epochs to reach" column

    def results_dir(self, output_root: Path | str = DEFAULT_OUTPUT_ROOT) -> Path:
        return Path(output_root) / self.experiment / self.run_name


FIGURES: dict[str, FigureSpec] = {
    "fig1": FigureSpec(
        experiment="graduate_admissions",
        run_name="fig1",
        title="Graduate admissions (paper Fig. 1)",
        # Just above the best validation MSE every variant reaches (about 4.0e-3, mean of
        # the per-seed minima at the paper's settings): how soon each one gets near it.
        threshold=4.5e-3,
    ),
}


@dataclass
class Report:
    results: Results
    curves: pd.DataFrame
    summary: pd.DataFrame
    figure: Figure

    def png(self) -> bytes:
        buffer = io.BytesIO()
        self.figure.savefig(buffer, format="png", dpi=110)
        return buffer.getvalue()

    @property
    def summary_markdown(self) -> str:
        return aggregate.to_markdown(aggregate.format_summary(self.summary))

    def save(self, out_dir: Path | str, name: str) -> list[Path]:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = [out_dir / f"{name}.png", out_dir / f"{name}.pdf", out_dir / f"{name}_summary.csv", out_dir / f"{name}_summary.md"]
        for path in paths[:2]:
            self.figure.savefig(path, dpi=150)
        self.summary.to_csv(paths[2], index=False)
        paths[3].write_text(self.summary_markdown)
        return paths

    def publish(self, out_dir: Path | str, name: str) -> None:
        """Save (see ``save``), then print the files written and the summary table."""
        for path in self.save(out_dir, name):
            print(f"wrote {path}")
        print()
        print(self.summary_markdown)


def default_results_dir(figure: str) -> Path:
    """Where ``python -m experiments.run -m +paper=<figure>`` writes, from the repository root."""
    return REPO_ROOT / FIGURES[figure].results_dir()


def figure_report(figure: str, results_dir: Path | str | None = None) -> Report:
    """A named paper figure (``FIGURES``) from its runs."""
    spec = FIGURES[figure]
    return curves_report(
        results_dir if results_dir is not None else spec.results_dir(),
        metric=spec.metric,
        x=spec.x,
        threshold=spec.threshold,
        title=spec.title,
        ylabel=spec.ylabel,
    )


def curves_report(
    results_dir: Path | str,
    *,
    metric: str = "val_loss",
    x: str | None = None,
    threshold: float | None = None,
    title: str | None = None,
    ylabel: str | None = None,
) -> Report:
    """Mean curves with CI bands of ``metric`` for every configuration under ``results_dir``."""
    results = aggregate.load_results(results_dir)
    x = x or _default_x(results)
    curve_table = aggregate.curves(results, metric, x)
    table = aggregate.summary(results, metric, x, threshold)
    seeds = int(results.runs.groupby("label").size().max())
    figure = plot_curves(
        curve_table,
        labels=results.labels,
        x=x,
        ylabel=ylabel or metric,
        title=title or str(results_dir),
        note=f"mean and 95% CI over {seeds} seed{'s' if seeds != 1 else ''}",
    )
    return Report(results, curve_table, table, figure)


def sweep_report(results_dir: Path | str, *, metric: str = "val_loss", x: str | None = None) -> Report:
    """Final ``metric`` (mean and CI over seeds) per hyperparameter combination."""
    results = aggregate.load_results(results_dir)
    x = x or _default_x(results)
    table = aggregate.summary(results, metric, x)
    figure = plot_sweep(table, results.varying, ylabel=f"final {metric}", title=str(results_dir))
    return Report(results, aggregate.curves(results, metric, x), table, figure)


def _new_figure() -> tuple[Figure, matplotlib.axes.Axes]:
    figure = Figure(figsize=(7, 4.5), layout="tight")
    return figure, figure.add_subplot()


def plot_curves(curve_table: pd.DataFrame, *, labels: list[str], x: str, ylabel: str, title: str, note: str) -> Figure:
    with matplotlib.rc_context(STYLE):
        figure, axes = _new_figure()
        for index, label in enumerate(labels):
            line = curve_table[curve_table.label == label]
            colour = _colour(label, index)
            xs = line[x].to_numpy(float)
            axes.plot(xs, line["mean"].to_numpy(float), color=colour, label=label)
            axes.fill_between(xs, line["low"].to_numpy(float), line["high"].to_numpy(float), color=colour, alpha=0.25, linewidth=0)
        axes.set_yscale("log")
        # A t interval can reach below zero (a few seeds spiking); on a log axis its band
        # would then stretch the axis down by decades. Clip bands at half the lowest mean.
        positive = curve_table["mean"][curve_table["mean"] > 0]
        if len(positive):
            axes.set_ylim(bottom=0.5 * positive.min())
        axes.set_xlabel(f"{x}s" if x in ("epoch", "step") else x)
        axes.set_ylabel(ylabel)
        axes.set_title(f"{title}\n{note}", fontsize=12)
        axes.legend()
    return figure


def plot_sweep(table: pd.DataFrame, varying: list[str], *, ylabel: str, title: str) -> Figure:
    """With one numeric swept key: the final metric against it, one line per variant (a
    variant the key does not apply to, such as the base optimizer, is a dashed level).
    Otherwise: one error bar per configuration."""
    numeric = [k for k in varying if pd.api.types.is_numeric_dtype(table[k])]
    with matplotlib.rc_context(STYLE):
        figure, axes = _new_figure()
        if len(varying) == 1 and numeric:
            key = numeric[0]
            for index, (variant, group) in enumerate(table.groupby("variant", sort=False)):
                colour = _colour(variant, index)
                swept = group[group[key].notna()].sort_values(key)
                if len(swept):
                    axes.errorbar(swept[key].to_numpy(float), swept["final_mean"].to_numpy(float), yerr=_error_bars(swept), marker="o", capsize=4, color=colour, label=variant)
                for mean in group[group[key].isna()]["final_mean"]:
                    axes.axhline(mean, color=colour, linestyle="--", label=variant)
            values = table[key].dropna().to_numpy(float)
            if len(values) and values.min() > 0 and values.max() / values.min() >= 20:
                axes.set_xscale("log")
            axes.set_xlabel(key.removeprefix("accel."))
            axes.set_ylabel(ylabel)
            axes.set_yscale("log")
            axes.legend()
        else:
            positions = np.arange(len(table))
            axes.errorbar(table["final_mean"].to_numpy(float), positions, xerr=_error_bars(table), fmt="o", capsize=4)
            axes.set_yticks(positions, table["label"])
            axes.invert_yaxis()
            axes.set_xlabel(ylabel)
            axes.set_xscale("log")
        axes.set_title(f"{title}\nmean and 95% CI over seeds", fontsize=12)
    return figure


def _error_bars(table: pd.DataFrame) -> np.ndarray:
    low = (table["final_mean"] - table["final_low"]).fillna(0).to_numpy()
    high = (table["final_high"] - table["final_mean"]).fillna(0).to_numpy()
    return np.vstack([low, high])


def _colour(label: str, index: int) -> str:
    variant = label.split(" (")[0]
    return VARIANT_COLOURS.get(variant.count("+"), f"C{index}")


def _default_x(results: Results) -> str:
    """Epochs where the problem counts epochs, optimizer steps otherwise."""
    return "epoch" if results.metrics["epoch"].notna().any() else "step"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.figures", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in FIGURES:
        sub = commands.add_parser(name, help=f"paper figure {name} ({FIGURES[name].title})")
        sub.add_argument("--results", type=Path, help=f"runs to read (default: {FIGURES[name].results_dir()})")
    curves_cmd = commands.add_parser("curves", help="mean curves with CI bands for any results directory")
    sweep_cmd = commands.add_parser("sweep", help="final metric per hyperparameter combination")
    for sub in (curves_cmd, sweep_cmd):
        sub.add_argument("results", type=Path, help="directory holding run directories (any depth)")
        sub.add_argument("--metric", default="val_loss", help="metrics.csv column (default: val_loss)")
        sub.add_argument("--x", choices=("epoch", "step"), help="x axis (default: epoch where defined)")
        sub.add_argument("--name", help="output file stem (default: the results directory's name)")
    curves_cmd.add_argument("--threshold", type=float, help="also report the x at which the metric first reaches this")
    for sub in commands.choices.values():
        sub.add_argument("--out", type=Path, default=DEFAULT_FIGURE_DIR, help=f"output directory (default: {DEFAULT_FIGURE_DIR})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    try:
        if args.command in FIGURES:
            report, name = figure_report(args.command, args.results), args.command
        elif args.command == "curves":
            report = curves_report(args.results, metric=args.metric, x=args.x, threshold=args.threshold)
            name = args.name or args.results.name
        else:
            report = sweep_report(args.results, metric=args.metric, x=args.x)
            name = args.name or f"{args.results.name}_sweep"
    except ResultsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    report.publish(args.out, name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
