"""Reading complete runs and summarising them over seeds (mean and Student-t 95% CI).

Runs are grouped by configuration (``config_id``): the runs of one configuration differ
only by seed. Each group is labelled by its variant plus the config keys that differ
between the variant's configurations, e.g. "Adam+AADL (history=5)", so one function
serves a paper figure (three variants, one configuration each) and a sweep alike.
Values that are not finite (a diverged run) are left out of means and intervals; the
summary's ``runs`` column says how many seeds each number rests on.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from experiments.results import META_FILE, METRICS_COLUMNS, METRICS_FILE, RunDirectory

log = logging.getLogger(__name__)

CONFIDENCE = 0.95


class ResultsError(Exception):
    """A results directory holds nothing usable, or a file breaks the metrics schema."""


@dataclass
class Results:
    metrics: pd.DataFrame  # every row of every complete run, plus "run" and "label"
    runs: pd.DataFrame  # one row per complete run: run, label, variant, seed, config_id, identity keys
    varying: list[str]  # identity keys that tell the configurations of a variant apart
    incomplete: list[Path] = field(default_factory=list)

    @property
    def labels(self) -> list[str]:
        """Configuration labels in legend order (``runs`` is sorted that way)."""
        return list(dict.fromkeys(self.runs["label"]))


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """Mean and two-sided Student-t confidence interval of the finite ``values``.

    ``(mean, low, high)`` with ``high - mean = t_{(1+c)/2, n-1} * s / sqrt(n)``, ``s`` the
    sample standard deviation (ddof=1). With one value the interval is (nan, nan); with
    none everything is nan.
    """
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return (np.nan, np.nan, np.nan)
    mean = float(v.mean())
    half = _half_width(v.std(ddof=1) if len(v) > 1 else np.nan, len(v), confidence)
    return (mean, mean - half, mean + half)


def _half_width(std: np.ndarray | float, n: np.ndarray | int, confidence: float) -> np.ndarray | float:
    n = np.asarray(n, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        t = stats.t.ppf((1 + confidence) / 2, np.where(n > 1, n - 1, np.nan))
        return t * np.asarray(std) / np.sqrt(n)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def find_runs(root: Path | str) -> tuple[list[Path], list[Path]]:
    """(complete, incomplete) run directories under ``root`` (any depth)."""
    complete, incomplete = [], []
    for meta in sorted(Path(root).rglob(META_FILE)):
        (complete if RunDirectory(meta.parent).is_complete() else incomplete).append(meta.parent)
    return complete, incomplete


def load_results(root: Path | str) -> Results:
    """Every complete run under ``root``; incomplete ones are listed and never read."""
    complete, incomplete = find_runs(root)
    if incomplete:
        log.warning("ignoring %d incomplete run(s) under %s, e.g. %s", len(incomplete), root, incomplete[0])
    if not complete:
        raise ResultsError(
            f"no complete runs under {root}"
            + (f" ({len(incomplete)} incomplete)" if incomplete else "")
            + "; run them first with python -m experiments.run"
        )
    return load_runs(complete, incomplete=incomplete)


def load_runs(complete: Sequence[Path], *, incomplete: Sequence[Path] = ()) -> Results:
    """The given complete run directories (e.g. the runs one command just made, without
    the other configurations stored beside them); ``incomplete`` is only recorded."""
    if not complete:
        raise ResultsError("no runs given")
    records, seen = [], set()
    for path in map(Path, complete):
        record = _run_record(path)
        key = (record["config_id"], record["seed"])
        if key in seen:
            # The same configuration and seed stored twice (e.g. under two output names)
            # would count one seed twice.
            log.warning("ignoring %s: a duplicate of another run of the same config and seed", path)
            continue
        seen.add(key)
        records.append(record)
    runs = pd.DataFrame(records)
    varying = _varying_keys(runs)
    # Legend order: base optimizer, +AADL, +AADL+MA; within a variant by the swept values.
    records.sort(key=lambda r: (_variant_order(r["variant"]), *(_sort_key(r.get(k)) for k in varying), r["seed"]))
    runs = pd.DataFrame(records)
    runs["label"] = [_label(record, varying) for record in records]
    metrics = pd.concat([_read_metrics(Path(path)) for path in runs["run"]], ignore_index=True)
    metrics = metrics.merge(runs[["run", "label"]], on="run")
    return Results(metrics=metrics, runs=runs, varying=varying, incomplete=list(incomplete))


RUN_FIELDS = ("run", "variant", "seed", "config_id")  # the other columns of Results.runs are identity keys


def _run_record(path: Path) -> dict:
    meta = json.loads((path / META_FILE).read_text())
    return {
        "run": str(path),
        "variant": meta["variant"],
        "seed": meta["seed"],
        "config_id": meta["config_id"],
        # Lists (betas, milestones) are compared and shown as JSON text.
        **{key: json.dumps(value) if isinstance(value, list) else value for key, value in meta["identity"].items()},
    }


def _read_metrics(path: Path) -> pd.DataFrame:
    file = path / METRICS_FILE
    frame = pd.read_csv(file)
    missing = [c for c in METRICS_COLUMNS if c not in frame.columns]
    if missing:
        raise ResultsError(f"{file}: missing column(s) {missing}; is it from another version of the harness?")
    frame["run"] = str(path)
    return frame


def _varying_keys(runs: pd.DataFrame) -> list[str]:
    """Identity keys with more than one value among some variant's configurations."""
    identity = [c for c in runs.columns if c not in RUN_FIELDS]
    configs = runs.drop_duplicates("config_id")
    varying = []
    for key in identity:
        per_variant = configs.groupby("variant")[key].nunique(dropna=False)
        if (per_variant > 1).any():
            varying.append(key)
    return varying


def _label(run: dict, varying: list[str]) -> str:
    parts = [f"{key.removeprefix('accel.')}={run[key]}" for key in varying if key in run and not _missing(run[key])]
    return run["variant"] + (f" ({', '.join(parts)})" if parts else "")


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def _sort_key(value: object) -> tuple:
    """Missing values first, then numbers by value, then anything else as text."""
    if _missing(value):
        return (0, 0.0, "")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (1, float(value), "")
    return (2, 0.0, str(value))


def _variant_order(variant: str) -> int:
    """Base optimizer first, then +AADL, then +AADL+MA (the paper's legend order)."""
    return variant.count("+")


# --------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------


def curves(results: Results, metric: str = "val_loss", x: str = "epoch") -> pd.DataFrame:
    """Per label and ``x``: runs, mean and CI of ``metric`` over seeds (finite values)."""
    frame = results.metrics[["label", x, metric]].copy()
    frame.loc[~np.isfinite(frame[metric]), metric] = np.nan
    grouped = frame.groupby(["label", x], sort=True)[metric]
    out = grouped.agg(runs="count", mean="mean", std="std").reset_index()
    half = _half_width(out["std"].to_numpy(), out["runs"].to_numpy(), CONFIDENCE)
    out["low"], out["high"] = out["mean"] - half, out["mean"] + half
    return out.drop(columns="std")


def per_run(results: Results, metric: str = "val_loss", x: str = "epoch", threshold: float | None = None) -> pd.DataFrame:
    """One row per run: final and best ``metric`` and, given a threshold, the first ``x``
    at which ``metric <= threshold`` (NaN if never)."""
    frame = results.metrics.sort_values(["run", "step"])
    grouped = frame.groupby("run", sort=False)
    out = pd.DataFrame({"final": grouped[metric].last(), "best": grouped[metric].min()})
    if threshold is not None:
        reached = frame[frame[metric] <= threshold].groupby("run", sort=False)[x].first()
        out["reach"] = reached.reindex(out.index)
    return out.join(results.runs.set_index("run")[["label", "variant", "seed", *results.varying]])


def baseline_label(results: Results) -> str | None:
    """The label of the only configuration without acceleration, if there is exactly one."""
    plain = results.runs[results.runs["accel.enabled"] == False]["label"].unique()  # noqa: E712
    return plain[0] if len(plain) == 1 else None


def summary(
    results: Results,
    metric: str = "val_loss",
    x: str = "epoch",
    threshold: float | None = None,
    baseline: str | None = None,
    also: Sequence[str] = (),
) -> pd.DataFrame:
    """One row per configuration: final and best ``metric`` (mean, CI), ``x`` to reach
    ``threshold`` (mean, CI over the runs that reach it, and how many did), the ratio
    of the baseline's final ``metric`` to this configuration's, and the final value
    (mean, CI) of each metric in ``also`` (e.g. val_rel_l2 beside a PINN's val_loss).

    The ratio is paired by seed: the geometric mean of the per-seed ratios, with its CI
    taken in log space (ratios are skewed; logs are not), so > 1 means lower than baseline.
    """
    runs = per_run(results, metric, x, threshold)
    also_runs = {name: per_run(results, name, x) for name in also}
    baseline = baseline if baseline is not None else baseline_label(results)
    baseline_final = runs[runs.label == baseline].set_index("seed")["final"]
    rows = []
    for label in results.labels:
        group = runs[runs.label == label]
        row: dict = {"label": label, "variant": group.variant.iloc[0]}
        row.update({key: group[key].iloc[0] for key in results.varying})
        row["runs"] = int(np.isfinite(group.final).sum())
        row.update(_interval_columns("final", t_interval(group.final)))
        row.update(_interval_columns("best", t_interval(group.best)))
        if threshold is not None:
            row.update(_interval_columns(f"{x}s_to_threshold", t_interval(group.reach)))
            row["reached_threshold"] = f"{int(group.reach.notna().sum())}/{len(group)}"
        if baseline is not None:
            ratios = baseline_final.reindex(group.seed).to_numpy() / group.final.to_numpy()
            row.update(_interval_columns("baseline_ratio", np.exp(t_interval(np.log(ratios)))))
        for name, other in also_runs.items():
            row.update(_interval_columns(f"final_{name}", t_interval(other.final[other.label == label])))
        rows.append(row)
    table = pd.DataFrame(rows)
    table.attrs.update(metric=metric, x=x, threshold=threshold, baseline=baseline, also=list(also))
    return table


def _interval_columns(stem: str, interval: Sequence[float]) -> dict[str, float]:
    return dict(zip((f"{stem}_mean", f"{stem}_low", f"{stem}_high"), map(float, interval)))


# --------------------------------------------------------------------------------------------
# Presentation
# --------------------------------------------------------------------------------------------


def format_summary(table: pd.DataFrame) -> pd.DataFrame:
    """The summary for reading: ``mean [low, high]`` text under descriptive headers.
    The CSV keeps the numbers, one column each."""
    metric = table.attrs.get("metric", "metric")
    x = table.attrs.get("x", "epoch")
    out = pd.DataFrame({"configuration": table["label"], "seeds": table["runs"]})
    out[f"final {metric}"] = _intervals(table, "final")
    for name in table.attrs.get("also", []):  # next to the main metric: read together
        out[f"final {name}"] = _intervals(table, f"final_{name}")
    out[f"best {metric}"] = _intervals(table, "best")
    reach = f"{x}s_to_threshold"
    if f"{reach}_mean" in table:
        out[f"{x}s to {metric} <= {_cell(table.attrs.get('threshold'))}"] = _intervals(table, reach)
        out["reached"] = table["reached_threshold"]
    if "baseline_ratio_mean" in table:
        out[f"final {metric} of {table.attrs.get('baseline', 'baseline')} / this"] = _intervals(table, "baseline_ratio")
    return out


def _intervals(table: pd.DataFrame, stem: str) -> list[str]:
    return [
        _format_interval(m, lo, hi)
        for m, lo, hi in zip(table[f"{stem}_mean"], table[f"{stem}_low"], table[f"{stem}_high"])
    ]


def to_markdown(frame: pd.DataFrame) -> str:
    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "| " + " | ".join("---" for _ in frame.columns) + " |"
    body = ["| " + " | ".join(_cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body]) + "\n"


def _format_interval(mean: float, low: float, high: float) -> str:
    if not np.isfinite(mean):
        return "n/a"
    if not np.isfinite(low):
        return f"{mean:.4g}"
    return f"{mean:.4g} [{low:.4g}, {high:.4g}]"


def _cell(value: object) -> str:
    if isinstance(value, float):
        return "n/a" if np.isnan(value) else f"{value:.4g}"
    return str(value)
