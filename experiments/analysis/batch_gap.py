"""The large-batch generalization gap per variant (``+paper=fashion_gap``, the Fig. 4 question).

    python -m experiments.analysis.batch_gap                       # results/runs/fashion_resnet/fashion_gap
    python -m experiments.analysis.batch_gap DIR [--metric val_top1] [--out results/figures]

For each variant (SGD, SGD+AADL, SGD+AADL+MA) the final ``metric`` (mean and 95% CI over
seeds) at the small and at the large global batch, the gap (large minus small, paired by
seed: the mean and t-interval of the per-seed differences), and how much of the baseline's
gap the variant closes (its gap minus the baseline's, paired by seed again). A positive
"closes" means a smaller gap than SGD alone. Writes ``<name>.md`` and ``<name>.csv`` with the
table and ``<name>.png``/``.pdf`` with the validation curves of every configuration.

The batch is told apart by ``problem.local_batch`` (``--key``); runs of one preset share
the world size, so it orders the global batches too. Only good runs count (aggregate).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from experiments.analysis import aggregate
from experiments.analysis.aggregate import Results, ResultsError

DEFAULT_RESULTS = Path("results/runs/fashion_resnet/fashion_gap")
DEFAULT_OUT = Path("results/figures")
BATCH_KEY = "problem.local_batch"


def gap_table(results: Results, metric: str = "val_top1", key: str = BATCH_KEY) -> pd.DataFrame:
    """One row per variant: final ``metric`` at the smallest and largest value of ``key``,
    the paired gap and the paired change of the gap against the baseline variant. Rows are
    per variant, so runs of several code versions or kernel levels are refused unless they
    were loaded pooled (``aggregate.load_results(..., pool=...)``)."""
    split = [key for key in results.provenance if key not in results.pooled]
    if split:
        listed = "; ".join(f"{aggregate.PROVENANCE_NAMES[k]} {', '.join(results.provenance[k])}" for k in split)
        raise ResultsError(f"the runs are of several {listed}: a gap per variant pairs runs of one; pool them with --pool {','.join(split)}")
    if key not in results.runs:
        raise ResultsError(f"the runs do not record {key}: not a batch-size study")
    finals = aggregate.per_run(results, metric)
    batches = sorted(finals[key].dropna().unique())
    if len(batches) < 2:
        raise ResultsError(f"the runs have one value of {key} ({batches}): a gap needs two")
    small, large = batches[0], batches[-1]
    finals = finals[np.isfinite(finals["final"].astype(float))]
    order = results.runs.drop_duplicates("variant").set_index("variant")["legend_order"].sort_values(kind="stable")
    by = {v: finals[finals.variant == v] for v in order.index}

    def seeds_of(variant: str, batch) -> pd.Series:
        group = by[variant]
        return group[group[key] == batch].set_index("seed")["final"].astype(float)

    gaps = {v: (seeds_of(v, large) - seeds_of(v, small)).dropna() for v in order.index}
    baseline = next((v for v in order.index if order[v] == 0), None)
    rows = []
    for variant in order.index:
        row = {"variant": variant, "seeds": len(gaps[variant])}
        for name, batch in (("small", small), ("large", large)):
            row.update(_interval(f"{name}_{metric}", seeds_of(variant, batch).to_numpy()))
        row.update(_interval("gap", gaps[variant].to_numpy()))
        if baseline is not None and variant != baseline:
            closes = (gaps[variant] - gaps[baseline]).dropna()
            row.update(_interval("closes", closes.to_numpy()))
        rows.append(row)
    table = pd.DataFrame(rows)
    table.attrs.update(metric=metric, key=key, small=small, large=large, baseline=baseline)
    return table


def _interval(stem: str, values: np.ndarray) -> dict[str, float]:
    mean, low, high = aggregate.t_interval(values)
    return {f"{stem}_mean": mean, f"{stem}_low": low, f"{stem}_high": high}


def _text(mean: float, low: float, high: float, percent: bool) -> str:
    scale = 100.0 if percent else 1.0
    if not np.isfinite(mean):
        return "n/a"
    if not np.isfinite(low):  # one seed: no interval
        return f"{scale * mean:.2f}" if percent else f"{mean:.4g}"
    return f"{scale * mean:.2f} [{scale * low:.2f}, {scale * high:.2f}]" if percent else f"{mean:.4g} [{low:.4g}, {high:.4g}]"


def to_markdown(table: pd.DataFrame) -> str:
    """The table for reading; accuracies (top-k metrics) in percentage points."""
    metric, key = table.attrs["metric"], table.attrs["key"]
    percent = "top" in metric
    unit = " (%)" if percent else ""
    out = pd.DataFrame({"variant": table["variant"], "seeds": table["seeds"]})
    for name in ("small", "large"):
        batch = table.attrs[name]
        out[f"final {metric}{unit}, {key}={batch}"] = [
            _text(*(r[f"{name}_{metric}_{s}"] for s in ("mean", "low", "high")), percent) for _, r in table.iterrows()
        ]
    out[f"gap: large - small{' (points)' if percent else ''}"] = [
        _text(r["gap_mean"], r["gap_low"], r["gap_high"], percent) for _, r in table.iterrows()
    ]
    if "closes_mean" in table:
        out[f"gap - {table.attrs['baseline']}'s gap"] = [
            _text(r["closes_mean"], r["closes_low"], r["closes_high"], percent) if np.isfinite(r["closes_mean"]) else ""
            for _, r in table.iterrows()
        ]
    return aggregate.to_markdown(out) + "\nPaired by seed; mean [95% t-interval].\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="?", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument("--metric", default="val_top1")
    parser.add_argument("--key", default=BATCH_KEY)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--name", default="fashion_gap")
    parser.add_argument("--pool", default="", metavar="code,kernels", help="pool runs of several code versions and/or kernel levels (code, kernels, all)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    from experiments.analysis.figures import curves_report

    try:
        results = aggregate.load_results(args.results, pool=aggregate.check_pool(args.pool))
        table = gap_table(results, args.metric, args.key)
        report = curves_report(results, metric=args.metric, x="epoch", title="Fashion-MNIST ResNet-18: small vs. large batch", ylabel=f"validation {args.metric}")
    except ResultsError as error:
        print(f"error: {error} (run python -m experiments.run -m +paper=fashion_gap first)", file=sys.stderr)
        return 1
    axes = report.figure.axes[0]  # accuracies: a linear axis (the curves' default is log, for losses)
    axes.set_yscale("linear")
    axes.set_ylim(0, 1)
    axes.legend(fontsize=8, loc="lower right")
    args.out.mkdir(parents=True, exist_ok=True)
    text = to_markdown(table)
    (args.out / f"{args.name}.md").write_text(text)
    table.to_csv(args.out / f"{args.name}.csv", index=False)
    for suffix in ("png", "pdf"):
        report.figure.savefig(args.out / f"{args.name}.{suffix}", dpi=150)
    print(text)
    print(f"wrote {args.out / args.name}.{{md,csv,png,pdf}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
