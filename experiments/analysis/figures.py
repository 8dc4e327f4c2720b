"""Paper figures and sweep tables from run directories.

    python -m experiments.figures fig1                         # results/runs/graduate_admissions/fig1
    python -m experiments.figures fig2                         # results/runs/burgers2d/fig2
    python -m experiments.figures fig3                         # results/runs/burgers100d/fig3
    python -m experiments.figures curves DIR [--metric val_loss] [--threshold 0.005]
    python -m experiments.figures sweep DIR [--metric val_loss]

Each command writes ``<name>.png`` and ``<name>.pdf`` plus a summary table as CSV (numbers)
and Markdown (``mean [95% CI]``) into ``--out`` (default results/figures) and prints the
table. The notebooks call the same functions (``figure_report``).

Only good runs are drawn (see ``aggregate``): a damaged or incomplete run is named in a
warning and left out, and the figure is drawn from the rest; the caption says how many
seeds of each configuration diverged, how many runs were left out, which seeds and
variants are missing (a paper figure: of its preset's; otherwise of those any run found
has) and how runs of several code versions or kernel levels were kept apart (``--pool``
pools them, and the caption says so). A paper figure drawn from runs shorter than its
preset's budget says so in its title ("30 of 1,500 epochs"). The command exits with 1 and
one line of explanation only when no run is usable.

Figures are built with matplotlib's object API (``Figure``, not pyplot) and rendered by
Agg, so nothing here depends on a display or on the global pyplot state.
"""

from __future__ import annotations

import argparse
import functools
import io
import logging
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from experiments.analysis import aggregate
from experiments.analysis.aggregate import Results, ResultsError
from experiments.errors import RunError, check_writable_directory
from experiments.schema import DEFAULT_OUTPUT_ROOT as RUNS_ROOT

DEFAULT_OUTPUT_ROOT = Path(RUNS_ROOT)
DEFAULT_FIGURE_DIR = Path("results/figures")
REPO_ROOT = Path(__file__).resolve().parents[2]

#: Colours by the method's legend_order (meta.json), so that a method has the same colour
#: in every figure: the base optimizer alone, +AADL, +AADL+MA; other orders cycle "C<n>".
LEGEND_COLOURS = {0: "tab:blue", 1: "tab:orange", 2: "tab:green"}
#: Line styles of the configurations that share a colour (a sweep of one method).
LINE_STYLES = ("-", "--", ":", "-.")

STYLE = {
    "font.size": 13,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "lines.linewidth": 2.0,
    "legend.frameon": False,
}


@dataclass(frozen=True)
class Caveat:
    """A caption line a figure carries when some of its runs have config ``key == value``:
    what a reader must know to read the curves (e.g. what the paper's ReLU does to a PINN)."""

    key: str  # a flattened config key, e.g. "problem.activation"
    value: Any
    text: str

    def applies(self, results: Results) -> bool:
        runs = results.runs
        return self.key in runs and bool((runs[self.key] == self.value).any())


@dataclass(frozen=True)
class FigureSpec:
    """A paper figure: how to draw it. Where its runs are comes from its preset,
    ``configs/paper/<preset>.yaml`` (its experiment and ``output.name``), the one place that
    says what the figure runs; tests and benchmarks read both from here."""

    preset: str  # configs/paper/<preset>.yaml
    title: str
    metric: str = "val_loss"
    x: str = "epoch"
    xlabel: str | None = None  # default: the x column's name, plural
    ylabel: str = "validation MSE"
    threshold: float | None = None  # for the "epochs to reach" column
    also: tuple[str, ...] = ()  # metrics whose final value the summary shows beside ``metric``
    caveats: tuple[Caveat, ...] = ()

    @property
    def experiment(self) -> str:
        return _preset(self.preset)[0]

    @property
    def run_name(self) -> str:
        """``output.name`` of the preset's runs."""
        return _preset(self.preset)[1]

    def results_dir(self, output_root: Path | str = DEFAULT_OUTPUT_ROOT) -> Path:
        return Path(output_root) / self.experiment / self.run_name


PRESET_DIR = REPO_ROOT / "configs" / "paper"


@functools.cache
def _preset(name: str) -> tuple[str, str]:
    """(experiment, output.name) of a paper preset, read from its YAML without composing
    (composition imports the methods, and with them torch)."""
    from omegaconf import OmegaConf

    preset = OmegaConf.load(PRESET_DIR / f"{name}.yaml")
    experiment = next(entry["override /experiment"] for entry in preset.defaults if "override /experiment" in entry)
    return experiment, preset.output.name


RELU_PINN = Caveat(
    "problem.activation",
    "relu",
    "ReLU, as in the paper: the network's second derivatives are zero, so the viscous term "
    "drops out of the PDE residual it is trained on (problem.activation=tanh keeps it).",
)
PAPER_SCALE_100D = Caveat(
    "problem.solution_scale",
    "paper",
    "The paper's 100d solution e^-t prod_i (x_i^2 - 1) is ~1e-27 at typical points of "
    "[-1, 1]^99, so a network that outputs zero already scores a tiny val_loss (a mean of "
    "squares over the validation points, set by their few largest terms, not by a typical "
    "point): a small val_loss does not mean that u is learnt; val_rel_l2 = ||u_net - u|| / ||u|| "
    "says whether it is.",
)

FIGURES: dict[str, FigureSpec] = {
    "fig1": FigureSpec(
        preset="fig1",
        title="Graduate admissions (paper Fig. 1)",
        # Just above the best validation MSE every variant reaches (about 4.0e-3, mean of
        # the per-seed minima at the paper's settings): how soon each one gets near it.
        threshold=4.5e-3,
    ),
    "fig2": FigureSpec(
        preset="fig2",
        title="Burgers 2d PINN (paper Fig. 2)",
        x="step",  # one optimizer step per iteration
        xlabel="iterations",
        also=("val_rel_l2",),
        caveats=(RELU_PINN,),
    ),
    "fig3": FigureSpec(
        preset="fig3",
        title="Burgers 100d PINN (paper Fig. 3)",
        x="step",
        xlabel="iterations",
        also=("val_rel_l2",),
        caveats=(PAPER_SCALE_100D, RELU_PINN),
    ),
}


@dataclass
class Report:
    results: Results
    curves: pd.DataFrame
    summary: pd.DataFrame
    figure: Figure
    notes: list[str] = field(default_factory=list)  # caveats, shown under the table and figure

    def png(self) -> bytes:
        buffer = io.BytesIO()
        self.figure.savefig(buffer, format="png", dpi=110)
        return buffer.getvalue()

    @property
    def summary_markdown(self) -> str:
        table = aggregate.to_markdown(aggregate.format_summary(self.summary))
        return table + "".join(f"\nNote: {note}\n" for note in self.notes)

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


@dataclass(frozen=True)
class PresetPlan:
    """What a paper preset runs: its budget, its variants (labels) and its seeds."""

    unit: str  # "epoch" or "iteration"
    total: int
    variants: tuple[str, ...]
    seeds: tuple[int, ...]


@functools.cache
def preset_plan(preset: str) -> PresetPlan | None:
    """The plan of ``configs/paper/<preset>.yaml``, from the config each of its method
    choices composes to (this imports the harness's config, and with it torch: only paper
    figures ask). None, with one warning line, where the preset does not compose."""
    try:
        from omegaconf import OmegaConf

        from experiments.compose import compose, preset_sweep
        from experiments.methods import METHODS
        from experiments.optimizers import BASE_OPTIMIZERS

        sweep = preset_sweep(preset)
        variants, budget = [], None
        for choice in sweep.get("method", [None]):
            cfg = compose(f"+paper={preset}", *([f"method={choice}"] if choice else []))
            section = OmegaConf.to_container(cfg.method, resolve=True)
            name = section["name"]
            method = METHODS.get(name).from_config(section.get(name) or {}, f"method.{name}.")
            variants.append(method.label(BASE_OPTIMIZERS[cfg.optimizer.name].label))
            budget = ("epoch", cfg.train.epochs) if cfg.train.epochs is not None else ("iteration", cfg.train.iterations)
        seeds = tuple(int(seed) for seed in sweep.get("seed", []))
        return PresetPlan(budget[0], int(budget[1]), tuple(variants), seeds)
    except Exception as error:  # a figure is still drawn; it cannot say what it lacks
        logging.getLogger(__name__).warning(
            "preset %s does not compose (%s: %s): the figure cannot say which seeds, variants or budget it lacks",
            preset, type(error).__name__, error,
        )
        return None


def budget_text(results: Results, labels: Sequence[str], unit: str, total: int) -> str | None:
    """"30 of 1,500 epochs" where the runs drawn trained less than ``total`` units, "3,000
    epochs (the preset's: 1,500)" where other than it; None where all trained ``total``."""
    totals = sorted({results.budgets[label][1] for label in labels if results.budgets.get(label, (unit,))[0] == unit})
    if not totals or totals == [total]:
        return None
    done = f"{totals[0]:,}" if len(totals) == 1 else f"{totals[0]:,}-{totals[-1]:,}"
    if totals[-1] < total:
        return f"{done} of {total:,} {unit}s"
    return f"{done} {unit}s (the preset's: {total:,})"


def default_results_dir(figure: str) -> Path:
    """Where ``python -m experiments.run -m +paper=<figure>`` writes, from the repository root."""
    return REPO_ROOT / FIGURES[figure].results_dir()


def figure_report(
    figure: str, results: Path | str | Results | None = None, *, title: str | None = None, pool: Sequence[str] = ()
) -> Report:
    """A named paper figure (``FIGURES``) from its runs: a results directory (default: where
    its preset writes) or runs already loaded (e.g. a subset, as the demo does). Its title
    says where the runs trained less than the preset's budget; from a directory, its caption
    names the preset's variants and seeds that are missing (runs given as loaded are a
    chosen subset: only seeds missing among them are named)."""
    spec = FIGURES[figure]
    plan = preset_plan(spec.preset)
    return curves_report(
        results if results is not None else spec.results_dir(),
        metric=spec.metric,
        x=spec.x,
        threshold=spec.threshold,
        title=title or spec.title,
        xlabel=spec.xlabel,
        ylabel=spec.ylabel,
        also=spec.also,
        caveats=spec.caveats,
        pool=pool,
        budget=(plan.unit, plan.total) if plan else None,
        seeds=plan.seeds if plan and not isinstance(results, Results) else None,
        variants=plan.variants if plan and not isinstance(results, Results) else (),
    )


def curves_report(
    results: Path | str | Results,
    *,
    metric: str = "val_loss",
    x: str | None = None,
    threshold: float | None = None,
    title: str | None = None,
    xlabel: str | None = None,
    ylabel: str | None = None,
    also: Sequence[str] = (),
    caveats: Sequence[Caveat] = (),
    pool: Sequence[str] = (),
    budget: tuple[str, int] | None = None,
    seeds: Sequence[int] | None = None,
    variants: Sequence[str] = (),
) -> Report:
    """Mean curves with CI bands of ``metric`` for every configuration of ``results`` (a
    directory, read with ``aggregate.load_results`` pooling ``pool``, or runs already
    loaded). ``budget`` (unit, total): the title says where the runs drawn trained other
    than that; ``seeds`` and ``variants``: what the caption names as missing where absent
    (besides seeds other runs have)."""
    source = results
    if not isinstance(results, Results):
        results = aggregate.load_results(results, pool=pool)
    x = x or _default_x(results)
    curve_table = aggregate.curves(results, metric, x)
    table = aggregate.summary(results, metric, x, threshold, also=also)
    notes = [caveat.text for caveat in caveats if caveat.applies(results)]
    notes += aggregate.coverage_notes(results, seeds, variants) + _single_seed_notes(table)
    notes += aggregate.left_out_notes(results, table)
    # Runs whose final value is not finite are in the summary's diverged count, not drawn.
    drawn = set(table.loc[table["runs"] > 0, "label"])
    if not drawn:
        raise ResultsError(f"no good run in {source} has a finite final {metric}: nothing to draw")
    title = title or str(source)
    short = budget_text(results, sorted(drawn), *budget) if budget else None
    if short:
        title = f"{title}: {short}"
    figure = plot_curves(
        curve_table[curve_table["label"].isin(drawn)],
        labels=[label for label in results.labels if label in drawn],
        x=x,
        xlabel=xlabel,
        ylabel=ylabel or metric,
        title=title,
        note=f"mean and 95% CI over {_seed_counts(table)}",
        caption=notes,
        orders=results.legend_orders,
    )
    return Report(results, curve_table, table, figure, notes)


def sweep_report(results_dir: Path | str, *, metric: str = "val_loss", x: str | None = None, pool: Sequence[str] = ()) -> Report:
    """Final ``metric`` (mean and CI over seeds) per hyperparameter combination."""
    results = aggregate.load_results(results_dir, pool=pool)
    x = x or _default_x(results)
    table = aggregate.summary(results, metric, x)
    notes = aggregate.coverage_notes(results) + _single_seed_notes(table) + aggregate.left_out_notes(results, table)
    figure = plot_sweep(table, results.varying, ylabel=f"final {metric}", title=str(results_dir), caption=notes,
                        orders=dict(zip(results.configurations["variant"], results.configurations["legend_order"])))
    return Report(results, aggregate.curves(results, metric, x), table, figure, notes)


def _single_seed_notes(table: pd.DataFrame) -> list[str]:
    """A configuration resting on one seed has a mean and no interval: say which."""
    single = table.loc[table["runs"] == 1, "label"].tolist()
    return [f"One seed only, no interval: {', '.join(single)}."] if single else []


def _seed_counts(table: pd.DataFrame) -> str:
    """"3 seeds", or "18-20 seeds" where configurations rest on different numbers of runs."""
    counts = table.loc[table["runs"] > 0, "runs"]
    low, high = int(counts.min()), int(counts.max())
    return (f"{low}" if low == high else f"{low}-{high}") + f" seed{'s' if high != 1 else ''}"


FIGURE_SIZE = (7.0, 4.5)  # inches, without a caption
CAPTION_WIDTH = 100  # characters per caption line
CAPTION_LINE_HEIGHT = 0.17  # inches per caption line


def _new_figure(caption: Sequence[str] = ()) -> tuple[Figure, matplotlib.axes.Axes]:
    """A figure with one axes and, below it, ``caption`` (one wrapped paragraph per entry)."""
    lines = [line for paragraph in caption for line in textwrap.wrap(paragraph, CAPTION_WIDTH)]
    width, height = FIGURE_SIZE
    caption_height = CAPTION_LINE_HEIGHT * (len(lines) + 1) if lines else 0.0
    figure = Figure(figsize=(width, height + caption_height), layout="tight")
    if lines:
        bottom = caption_height / (height + caption_height)
        figure.get_layout_engine().set(rect=(0, bottom, 1, 1))  # keep the axes above it
        figure.text(0.02, 0.5 * CAPTION_LINE_HEIGHT / (height + caption_height), "\n".join(lines), fontsize=8, va="bottom")
    return figure, figure.add_subplot()


def plot_curves(
    curve_table: pd.DataFrame,
    *,
    labels: list[str],
    x: str,
    ylabel: str,
    title: str,
    note: str,
    xlabel: str | None = None,
    caption: Sequence[str] = (),
    orders: Mapping[str, int] | None = None,
) -> Figure:
    """Mean curves with CI bands, one per label; ``orders`` (label -> legend_order, default
    the labels' positions) chooses colours, so a method keeps its colour across figures."""
    orders = orders or {label: index for index, label in enumerate(labels)}
    with matplotlib.rc_context(STYLE):
        figure, axes = _new_figure(caption)
        shared: dict[int, int] = {}  # legend_order -> configurations drawn in its colour so far
        for label in labels:
            line = curve_table[curve_table.label == label]
            order = orders[label]
            style = LINE_STYLES[shared.get(order, 0) % len(LINE_STYLES)]
            shared[order] = shared.get(order, 0) + 1
            colour = legend_colour(order)
            xs = line[x].to_numpy(float)
            axes.plot(xs, line["mean"].to_numpy(float), color=colour, linestyle=style, label=label)
            axes.fill_between(xs, line["low"].to_numpy(float), line["high"].to_numpy(float), color=colour, alpha=0.25, linewidth=0)
        axes.set_yscale("log")
        # A t interval can reach below zero (a few seeds spiking); on a log axis its band
        # would then stretch the axis down by decades. Clip bands at half the lowest mean.
        positive = curve_table["mean"][curve_table["mean"] > 0]
        if len(positive):
            axes.set_ylim(bottom=0.5 * positive.min())
        axes.set_xlabel(xlabel or (f"{x}s" if x in ("epoch", "step") else x))
        axes.set_ylabel(ylabel)
        axes.set_title(f"{title}\n{note}", fontsize=12)
        axes.legend()
    return figure


def plot_sweep(
    table: pd.DataFrame,
    varying: list[str],
    *,
    ylabel: str,
    title: str,
    caption: Sequence[str] = (),
    orders: Mapping[str, int] | None = None,
) -> Figure:
    """With one numeric swept key: the final metric against it, one line per variant (a
    variant the key does not apply to, such as the base optimizer, is a dashed level).
    Otherwise: one error bar per configuration. ``orders``: variant -> legend_order."""
    numeric = [k for k in varying if pd.api.types.is_numeric_dtype(table[k])]
    with matplotlib.rc_context(STYLE):
        figure, axes = _new_figure(caption)
        if len(varying) == 1 and numeric:
            key = numeric[0]
            for index, (variant, group) in enumerate(table.groupby("variant", sort=False)):
                colour = legend_colour((orders or {}).get(variant, index))
                swept = group[group[key].notna()].sort_values(key)
                if len(swept):
                    axes.errorbar(swept[key].to_numpy(float), swept["final_mean"].to_numpy(float), yerr=_error_bars(swept), marker="o", capsize=4, color=colour, label=variant)
                for mean in group[group[key].isna()]["final_mean"]:
                    axes.axhline(mean, color=colour, linestyle="--", label=variant)
            values = table[key].dropna().to_numpy(float)
            if len(values) and values.min() > 0 and values.max() / values.min() >= 20:
                axes.set_xscale("log")
            axes.set_xlabel(aggregate.label_key(key))
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


def legend_colour(order: int) -> str:
    """The colour of a method by its legend_order: the same in every figure."""
    return LEGEND_COLOURS.get(order, f"C{order % 10}")


def _default_x(results: Results) -> str:
    """Epochs where the problem counts epochs, optimizer steps otherwise."""
    return "epoch" if results.metrics["epoch"].notna().any() else "step"


def _paper_figure(figure: str, results_dir: Path | None, pool: Sequence[str] = ()) -> Report:
    """``figure_report``, with an error that names the preset making the missing runs."""
    try:
        return figure_report(figure, results_dir, pool=pool)
    except ResultsError as error:
        raise ResultsError(f"{error} -m +paper={figure}") from None


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
        sub.add_argument(
            "--pool", default="", metavar="code,kernels",
            help="pool runs of several code versions and/or kernel levels (code, kernels, all); by default they are kept apart, labelled",
        )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    try:
        check_writable_directory(args.out, "--out")
        pool = aggregate.check_pool(args.pool)
        if args.command in FIGURES:
            report, name = _paper_figure(args.command, args.results, pool), args.command
        elif args.command == "curves":
            report = curves_report(args.results, metric=args.metric, x=args.x, threshold=args.threshold, pool=pool)
            name = args.name or args.results.name
        else:
            report = sweep_report(args.results, metric=args.metric, x=args.x, pool=pool)
            name = args.name or f"{args.results.name}_sweep"
    except (ResultsError, RunError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    report.publish(args.out, name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
