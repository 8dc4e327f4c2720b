"""The seed paper's claims measured on finished runs, each with a verdict by one stated rule.

A claim names the runs it rests on (a preset's run directory, or any run of a method), an
effect computed per seed from those runs (a ratio of final losses, a difference of
oscillation, a share of the large-batch gap recovered), and the region of effect values
the paper claims. The effect's 95% Student-t interval over seeds decides (``verdict``):

- reproduced: the interval lies entirely inside the claimed region;
- not reproduced: it lies entirely outside (on the other side, or short of the claimed size);
- inconclusive: it crosses a boundary of the region, or the effect rests on fewer than
  ``MIN_SEEDS`` seeds (pairs, when paired), or a premise fails (no gap to recover);
- not run: the runs it needs are absent; the claim carries the command that makes them.

Only good runs enter an effect (``aggregate``); diverged runs are counted per configuration
and shown, incomplete and damaged ones counted per run directory. Effects are paired by
seed wherever the configurations compared share seeds (runs of one seed share their data
order and initialisation), and fall back to Welch's unpaired interval where they do not.

Nothing here writes files or imports torch: ``report`` renders what ``evaluate`` returns.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from experiments.analysis import aggregate
from experiments.analysis.aggregate import CONFIDENCE, Results, ResultsError
from experiments.analysis.figures import FIGURES, PRESET_DIR

#: Fewer good seeds (pairs, when paired) than this make a claim inconclusive, whatever its
#: interval: a t interval over 2-4 seeds is too dependent on their spread being typical.
MIN_SEEDS = 5
#: "Like" (AADL alone is like Adam): the ratio of final losses within a factor of 2.
LIKE_BAND = (0.5, 2.0)
#: "By an order of magnitude".
ORDER_OF_MAGNITUDE = 10.0
#: "About 10x the time": within a factor of 2 of 10.
ABOUT_TEN_TIMES = (5.0, 20.0)
#: Share of the base optimizer's large-batch gap that separates "recovers part of it"
#: from "does not recover it" (a tenth of the gap).
RECOVERY_MARGIN = 0.1
#: The oscillation measure reads the last half of a run's evaluation rows.
OSCILLATION_TAIL = 0.5
#: The step-norm comparison of backward and forward SGD reads the last quarter of the rows.
STEP_NORM_TAIL = 0.25

#: Columns a method writes (experiments/methods/*: its ``counters``).
FORWARD_NORM, BACKWARD_NORM = "forward_step_norm", "backward_step_norm"
AVERAGES, ATTEMPTS, ACCEPTED = "averages_applied", "aa_attempts", "aa_accepted"
#: Top-1 validation accuracy, by the names a classification problem may give it.
TOP1_COLUMNS = ("val_top1", "val_acc1", "val_top1_accuracy", "val_accuracy", "val_acc")

VERDICTS = ("reproduced", "not reproduced", "inconclusive", "not run")

RUN = "python -m experiments.run -m"

RULE = (
    f"Each claim is an effect measured per seed on good runs, with its 95% Student-t interval "
    f"over seeds (paired by seed where the configurations compared share seeds, Welch's "
    f"unpaired interval otherwise; ratios are geometric means with the interval taken in log "
    f"space), and a claimed region of effect values. **Reproduced**: the interval lies entirely "
    f"inside the claimed region. **Not reproduced**: it lies entirely outside it (the other "
    f"side, or short of the claimed size). **Inconclusive**: it crosses a boundary of the "
    f"region, or the effect rests on fewer than {MIN_SEEDS} seeds (pairs when paired), or a "
    f"premise fails. **Not run**: the runs are absent (the command that makes them is given). "
    f"A claim with several rows (one per problem or per setting) takes the verdict its rows "
    f"share, and is inconclusive where they differ; context rows are shown, not counted. "
    f"Diverged runs are never in the numbers: they are counted per configuration beside them, "
    f"as are the incomplete and damaged runs left out of each directory."
)


# --------------------------------------------------------------------------------------------
# Effects and the verdict rule
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Region:
    """The claimed values of an effect: the open interval (low, high)."""

    low: float = -math.inf
    high: float = math.inf

    def __str__(self) -> str:
        if math.isinf(self.high):
            return f"> {_num(self.low)}"
        if math.isinf(self.low):
            return f"< {_num(self.high)}"
        return f"in ({_num(self.low)}, {_num(self.high)})"


@dataclass(frozen=True)
class Effect:
    """An effect's estimate and 95% interval, and the seeds it rests on."""

    estimate: float
    low: float
    high: float
    n: int  # pairs when paired, else the smallest group's seeds
    paired: bool
    per_seed: tuple[float, ...] = ()  # the paired per-seed values (empty when unpaired)

    def scaled(self, factor: float) -> "Effect":
        values = sorted((self.low * factor, self.high * factor))
        return Effect(self.estimate * factor, values[0], values[1], self.n, self.paired, tuple(v * factor for v in self.per_seed))

    def __str__(self) -> str:
        return interval_text(self.estimate, self.low, self.high)


def contrast(terms: Sequence[tuple[float, pd.Series]], log: bool = False) -> Effect:
    """The effect ``sum_i c_i x_i`` of ``terms`` ``(c_i, x_i)``, each ``x_i`` a per-seed
    Series (index: seed). Paired when the series share at least ``min(MIN_SEEDS, smallest
    series)`` seeds (and at least 2): the per-seed contrasts over the shared seeds and
    their t interval. Otherwise unpaired: the contrast of the means with a Welch-
    Satterthwaite interval. ``log``: of the logarithms, reported back as a ratio
    (``exp``): ``contrast([(1, a), (-1, b)], log=True)`` is the geometric mean of a/b."""
    series = []
    for coefficient, values in terms:
        values = pd.Series(values, dtype=float)
        if log:
            with np.errstate(divide="ignore", invalid="ignore"):
                values = np.log(values.where(values > 0))
        series.append((float(coefficient), values[np.isfinite(values)]))
    common = sorted(set.intersection(*(set(values.index) for _, values in series))) if series else []
    smallest = min((len(values) for _, values in series), default=0)
    if len(common) >= 2 and len(common) >= min(MIN_SEEDS, smallest):
        per_seed = sum(c * values.groupby(level=0).first().reindex(common).to_numpy() for c, values in series)
        mean, low, high = aggregate.t_interval(per_seed, CONFIDENCE)
        effect = Effect(mean, low, high, len(common), True, tuple(map(float, per_seed)))
    else:
        effect = _welch(series)
    if log:
        return Effect(*(math.exp(v) if np.isfinite(v) else math.nan for v in (effect.estimate, effect.low, effect.high)),
                      effect.n, effect.paired, tuple(math.exp(v) for v in effect.per_seed))
    return effect


def _welch(series: Sequence[tuple[float, pd.Series]]) -> Effect:
    sizes = [len(values) for _, values in series]
    if not series or min(sizes) == 0:
        return Effect(math.nan, math.nan, math.nan, 0, False)
    estimate = float(sum(c * values.mean() for c, values in series))
    if min(sizes) < 2:
        return Effect(estimate, math.nan, math.nan, min(sizes), False)
    parts = [c * c * values.var(ddof=1) / len(values) for c, values in series]
    variance = sum(parts)
    if variance == 0:
        return Effect(estimate, estimate, estimate, min(sizes), False)
    dof = variance**2 / sum(part**2 / (len(values) - 1) for part, (_, values) in zip(parts, series))
    half = float(stats.t.ppf((1 + CONFIDENCE) / 2, dof) * math.sqrt(variance))
    return Effect(estimate, estimate - half, estimate + half, min(sizes), False)


def verdict(effect: Effect | None, region: Region, min_seeds: int = MIN_SEEDS) -> tuple[str, str]:
    """(verdict, reason) of one effect by the rule in :data:`RULE`."""
    if effect is None or effect.n == 0:
        return "inconclusive", "no good run to measure"
    if effect.n < min_seeds:
        return "inconclusive", f"rests on {effect.n} seed{'s' if effect.n != 1 else ''}, fewer than {min_seeds}"
    if not (np.isfinite(effect.low) and np.isfinite(effect.high)):
        return "inconclusive", "no finite interval"
    if region.low < effect.low and effect.high < region.high:
        return "reproduced", f"the interval lies inside the claimed region ({region})"
    if effect.high <= region.low or effect.low >= region.high:
        return "not reproduced", f"the interval lies outside the claimed region ({region})"
    return "inconclusive", f"the interval crosses a boundary of the claimed region ({region})"


def combine(rows: Sequence["Row"]) -> tuple[str, str]:
    """The verdict of a claim with several counted rows: the one they share, ignoring rows
    not run where others ran; inconclusive where they differ."""
    counted = [row for row in rows if row.counted]
    ran = [row for row in counted if row.verdict != "not run"] or counted
    if not ran:
        return "not run", "no runs"
    verdicts = {row.verdict for row in ran}
    if len(verdicts) == 1:
        (only,) = verdicts
        reasons = {row.reason for row in ran}
        shared = f": {ran[0].reason}" if len(reasons) == 1 else ""
        return only, ran[0].reason if len(ran) == 1 else f"all {len(ran)} rows {only}{shared}"
    counts = Counter(row.verdict for row in ran)
    return "inconclusive", "the rows differ: " + ", ".join(f"{n} {v}" for v, n in counts.items())


# --------------------------------------------------------------------------------------------
# Per-run measures
# --------------------------------------------------------------------------------------------


def oscillation(values: Sequence[float], tail: float = OSCILLATION_TAIL) -> float:
    """How much a curve oscillates: over its last ``tail`` share of rows (at least 2), the
    path length of log10(value) in excess of its net change, per evaluation interval,
    ``(sum |d_i| - |sum d_i|) / (k - 1)`` with ``d_i`` the successive differences of the k
    values. Zero for any monotone curve (a steady descent does not count as oscillation);
    1 for a curve jumping a decade up and down at every evaluation. In decades."""
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return math.nan
    k = max(2, math.ceil(tail * len(v)))
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.log10(np.maximum(v[-k:], np.finfo(float).tiny))
    steps = np.diff(logs)
    return float((np.abs(steps).sum() - abs(steps.sum())) / len(steps))


def time_to_target(rows: pd.DataFrame, target: float, metric: str = "val_loss") -> tuple[float, float]:
    """(steps, seconds) at the first row whose ``metric`` is at most ``target``, as AlgoPerf
    counts time to target; (inf, inf) for a run that never reaches it."""
    reached = rows[rows[metric] <= target]
    if reached.empty:
        return math.inf, math.inf
    first = reached.iloc[0]
    return float(first["step"]), float(first["wall_time"])


def cost_per_step(rows: pd.DataFrame) -> float:
    """Seconds per optimizer step over the whole run (evaluations included, as wall_time is)."""
    last = rows.iloc[-1]
    return float(last["wall_time"] / last["step"]) if last["step"] > 0 else math.nan


def tail_median(rows: pd.DataFrame, column: str, tail: float = STEP_NORM_TAIL) -> float:
    """Median of ``column`` over the last ``tail`` share of rows with a finite value."""
    values = rows[column].to_numpy(float)
    values = values[np.isfinite(values)]
    if not len(values):
        return math.nan
    return float(np.median(values[-max(1, math.ceil(tail * len(values))) :]))


def final(metric: str) -> Callable[[pd.DataFrame], float]:
    return lambda rows: float(rows[metric].iloc[-1])


def counter_rate(numerator: str, denominator: str) -> Callable[[pd.DataFrame], float]:
    """The last row's ``numerator / denominator`` (a column name or "step")."""
    def rate(rows: pd.DataFrame) -> float:
        last = rows.iloc[-1]
        below = float(last[denominator])
        return float(last[numerator]) / below if below > 0 else math.nan
    return rate


# --------------------------------------------------------------------------------------------
# Studies: the run directories claims read
# --------------------------------------------------------------------------------------------


RUN_KINDS = ("good", "diverged", "incomplete", "damaged")


@dataclass
class Study:
    """One run directory (``<root>/<experiment>/<output.name>``), loaded and counted."""

    path: Path
    results: Results | None
    counts: dict[str, int]  # RUN_KINDS -> runs

    @property
    def ran(self) -> bool:
        return self.results is not None

    def left_out(self) -> str:
        parts = [f"{self.counts[k]} {k}" for k in ("incomplete", "damaged") if self.counts.get(k)]
        return f"left out of {self.path}: {' and '.join(parts)} run(s)" if parts else ""


def load_study(path: Path) -> Study:
    path = Path(path)
    if not path.is_dir():
        return Study(path, None, dict.fromkeys(RUN_KINDS, 0))
    try:
        results = aggregate.load_results(path)
    except ResultsError:
        checks = Counter(aggregate.check_run(run).kind for run in aggregate.find_run_dirs(path))
        return Study(path, None, {kind: checks.get(kind, 0) for kind in RUN_KINDS})
    counts = {"good": len(results.runs), "diverged": len(results.diverged),
              "incomplete": len(results.incomplete), "damaged": len(results.damaged)}
    return Study(path, results, counts)


@dataclass(frozen=True)
class Preset:
    """Where a preset's runs go and what it sweeps, read from ``configs/paper/<name>.yaml``
    (without composing: composing imports torch); the defaults where the file is absent."""

    name: str
    experiment: str
    run_name: str
    swept: tuple[str, ...] = ()  # keys it sweeps besides method and seed

    @property
    def command(self) -> str:
        return f"{RUN} +paper={self.name}"

    def path(self, root: Path) -> Path:
        return Path(root) / self.experiment / self.run_name


def preset(name: str, experiment: str, run_name: str | None = None) -> Preset:
    file = PRESET_DIR / f"{name}.yaml"
    if not file.is_file():
        return Preset(name, experiment, run_name or name)
    from omegaconf import OmegaConf

    config = OmegaConf.to_container(OmegaConf.load(file))
    for entry in config.get("defaults", []):
        if isinstance(entry, dict) and "override /experiment" in entry:
            experiment = entry["override /experiment"]
    params = ((config.get("hydra") or {}).get("sweeper") or {}).get("params") or {}
    swept = tuple(str(key) for key in params if str(key) not in ("method", "seed"))
    return Preset(name, experiment, (config.get("output") or {}).get("name", run_name or name), swept)


class Context:
    """The runs under one output root, each directory loaded once."""

    def __init__(self, root: Path | str):
        self.root = Path(root)
        self._studies: dict[Path, Study] = {}

    def study(self, path: Path) -> Study:
        path = Path(path)
        if path not in self._studies:
            self._studies[path] = load_study(path)
        return self._studies[path]

    def all_studies(self) -> list[Study]:
        """Every ``<root>/<experiment>/<name>`` directory holding run directories."""
        if not self.root.is_dir():
            return []
        found = []
        for experiment in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for name in sorted(p for p in experiment.iterdir() if p.is_dir() and not p.name.startswith(".")):
                if aggregate.find_run_dirs(name):
                    found.append(self.study(name))
        return found


# --------------------------------------------------------------------------------------------
# Configurations and their per-seed values
# --------------------------------------------------------------------------------------------


def identity_columns(configs: pd.DataFrame) -> list[str]:
    return [c for c in configs.columns if c not in (*aggregate.RUN_FIELDS, *aggregate.CONFIGURATION_COUNTS, "label")]


def _key(value: Any) -> str:
    """A value as comparable text (NaN and None alike; numpy scalars as Python's)."""
    if isinstance(value, np.generic):
        value = value.item()
    return json.dumps(None if aggregate._missing(value) else value, default=str, sort_keys=True)


def settings_group(results: Results, exclude: Sequence[str] = ()) -> tuple[pd.DataFrame, list[str]]:
    """The configurations that share every identity key outside ``method.*`` (and
    ``exclude``): the one set with the most finished runs, so that a quick look stored beside
    a preset's runs (``train.epochs=200``) is left aside, not compared. Returns it and a note
    naming the configurations left aside."""
    configs = results.configurations
    keys = [k for k in identity_columns(configs) if not k.startswith("method.") and k not in exclude]
    groups = configs.groupby([configs[k].map(_key) for k in keys], sort=False, dropna=False) if keys else [((), configs)]
    ranked = sorted((group for _, group in groups), key=lambda g: -(g["seeds"].sum() + g["diverged"].sum()))
    chosen = ranked[0]
    aside = [label for group in ranked[1:] for label in group["label"]]
    notes = [f"other settings in this directory, not compared: {', '.join(aside)}"] if aside else []
    return chosen, notes


def per_seed(results: Results, label: str, measure: Callable[[pd.DataFrame], float]) -> pd.Series:
    """``measure`` of each good run of configuration ``label``, indexed by seed."""
    frame = results.metrics[results.metrics["label"] == label]
    values = {}
    for _, rows in frame.groupby("run", sort=False):
        rows = rows.sort_values("step", kind="stable")
        values[int(rows["seed"].iloc[0])] = measure(rows)
    return pd.Series(values, dtype=float).sort_index()


def require_columns(results: Results, *columns: str) -> None:
    missing = [c for c in columns if c not in results.metrics.columns]
    if missing:
        raise ResultsError(f"the runs have no column {', '.join(missing)}")


@dataclass(frozen=True)
class Arm:
    """A configuration an effect reads: its label and its run counts."""

    label: str
    good: int
    diverged: int

    def __str__(self) -> str:
        return f"{self.label}: {self.good} good" + (f", {self.diverged} diverged" if self.diverged else "")


def arm_of(config: pd.Series) -> Arm:
    return Arm(config["label"], int(config["seeds"]), int(config["diverged"]))


# --------------------------------------------------------------------------------------------
# Claims
# --------------------------------------------------------------------------------------------


class NotRun(Exception):
    """The runs a claim needs are absent; the message says which."""


class Unmeasurable(Exception):
    """The runs are there, but the effect cannot be measured on them (the reason)."""


@dataclass
class Row:
    """One measured comparison of a claim."""

    comparison: str
    effect: Effect | None
    verdict: str
    reason: str
    arms: list[Arm] = field(default_factory=list)
    counted: bool = True  # False: a context row, shown and not counted in the verdict
    source: str = ""  # the directory it was measured in


@dataclass(frozen=True)
class Claim:
    key: str  # file-name safe: the figure is report_<key>.png
    section: str  # "Fig. 1", "Seed methods", ...
    statement: str
    measure: str  # what the effect is, in words
    region: Region
    command: str  # what makes its runs
    log_scale: bool  # ratios: drawn on a log axis
    evaluate: Callable[[Context, "Claim"], tuple[list[Row], list[str], str]]


@dataclass
class ClaimResult:
    claim: Claim
    verdict: str
    reason: str
    rows: list[Row]
    notes: list[str]
    source: str

    @property
    def headline(self) -> Row | None:
        """The first counted row that was measured."""
        return next((row for row in self.rows if row.counted and row.effect is not None), None)


def evaluate(claim: Claim, context: Context) -> ClaimResult:
    try:
        rows, notes, source = claim.evaluate(context, claim)
    except NotRun as missing:
        return ClaimResult(claim, "not run", f"{missing}; run `{claim.command}`", [], [], "")
    except (Unmeasurable, ResultsError) as error:
        return ClaimResult(claim, "inconclusive", str(error), [], [], "")
    decided, reason = combine(rows)
    if decided == "not run":
        reason = f"{reason}; run `{claim.command}`"
    return ClaimResult(claim, decided, reason, rows, notes, source)


CONTEXT = "(context)"  # the verdict column of a row shown beside a claim, not counted


def measured(comparison: str, effect: Effect, region: Region, arms: list[Arm], counted: bool = True, source: str = "") -> Row:
    decided, reason = verdict(effect, region) if counted else (CONTEXT, "shown beside the claim, not counted")
    return Row(comparison, effect, decided, reason, arms, counted, source)


def _study_or_not_run(context: Context, path: Path) -> Study:
    study = context.study(path)
    if not study.ran:
        if study.counts.get("diverged"):
            raise Unmeasurable(f"every finished run in {path} diverged ({study.counts['diverged']})")
        raise NotRun(f"no complete runs in {path}")
    return study


def _by_order(group: pd.DataFrame, order: int, path: Path) -> pd.Series:
    """The one configuration of ``group`` whose method has ``legend_order`` ``order``."""
    found = group[group["legend_order"] == order]
    if found.empty:
        names = {0: "the base optimizer alone", 1: "+AADL", 2: "+AADL+MA"}
        raise NotRun(f"no complete runs of {names.get(order, f'legend_order {order}')} in {path}")
    if len(found) > 1:
        raise Unmeasurable(f"several configurations of one method in {path}: {', '.join(found['label'])}")
    return found.iloc[0]


def paired_ratio(context: Context, claim: Claim, *, preset_name: str, numerator: int, denominator: int, metric: str,
                 context_rows: Sequence[tuple[int, int, str]] = ()) -> tuple[list[Row], list[str], str]:
    """A paper figure's claim on the ratio of final ``metric`` of two methods (by
    legend_order: 0 base, 1 +AADL, 2 +AADL+MA), ``numerator`` over ``denominator``, so that
    > 1 means the denominator's is lower; ``context_rows`` (numerator, denominator, metric)
    are shown beside it."""
    spec = FIGURES[preset_name]
    path = spec.results_dir(context.root)
    study = _study_or_not_run(context, path)
    group, notes = settings_group(study.results)
    rows = []
    for top, bottom, name, counted in [(numerator, denominator, metric, True), *((a, b, m, False) for a, b, m in context_rows)]:
        try:
            a, b = _by_order(group, top, path), _by_order(group, bottom, path)
        except NotRun:
            if counted:
                raise
            continue  # context the runs cannot give is left out; the claim's own arms are required
        if not counted and name not in study.results.metrics.columns:
            continue
        try:
            require_columns(study.results, name)
        except ResultsError as error:
            raise Unmeasurable(str(error)) from None
        effect = contrast([(1, per_seed(study.results, a["label"], final(name))),
                           (-1, per_seed(study.results, b["label"], final(name)))], log=True)
        rows.append(measured(f"final {name}: {a['label']} / {b['label']}", effect, claim.region, [arm_of(a), arm_of(b)], counted, str(path)))
    notes += [caveat.text for caveat in spec.caveats if caveat.applies(study.results)]
    notes += [note for note in [study.left_out()] if note]
    return rows, notes, str(path)


def _fig3_oscillation(context: Context, claim: Claim) -> tuple[list[Row], list[str], str]:
    spec = FIGURES["fig3"]
    path = spec.results_dir(context.root)
    study = _study_or_not_run(context, path)
    group, notes = settings_group(study.results)
    ma = _by_order(group, 2, path)
    rows = []
    for order, counted in ((1, True), (0, False)):
        try:
            other = _by_order(group, order, path)
        except NotRun:
            if counted:
                raise
            continue
        measure = lambda rows_: oscillation(rows_[spec.metric].to_numpy(float))  # noqa: E731
        effect = contrast([(1, per_seed(study.results, other["label"], measure)), (-1, per_seed(study.results, ma["label"], measure))])
        rows.append(measured(f"oscillation of {spec.metric}: {other['label']} - {ma['label']}", effect, claim.region,
                             [arm_of(other), arm_of(ma)], counted, str(path)))
    notes += [caveat.text for caveat in spec.caveats if caveat.applies(study.results)]
    notes += [note for note in [study.left_out()] if note]
    return rows, notes, str(path)


# -- the large-batch study (Fig. 4) -----------------------------------------------------------

IMAGENET = ("fig4", "imagenet_resnet50", "fig4")
FASHION = ("fashion_gap", "fashion_resnet", "fashion_gap")


@dataclass
class GapStudy:
    """The runs of a small- vs large-batch study: per variant, the configuration at each end."""

    study: Study
    batch_key: str
    small: Any
    large: Any
    top1: str
    configs: pd.DataFrame  # the compared settings group
    base: str  # the base optimizer's variant
    notes: list[str]

    def config(self, variant: str, end: str) -> pd.Series | None:
        value = self.small if end == "small" else self.large
        found = self.configs[(self.configs["variant"] == variant) & (self.configs[self.batch_key].map(_key) == _key(value))]
        if len(found) > 1:
            raise Unmeasurable(f"several configurations of {variant} at {self.batch_key}={value}: {', '.join(found['label'])}")
        return None if found.empty else found.iloc[0]

    def values(self, variant: str, end: str, measure: Callable[[pd.DataFrame], float]) -> tuple[pd.Series, Arm]:
        config = self.config(variant, end)
        if config is None:
            raise NotRun(f"no complete runs of {variant} at {self.batch_key}={self.small if end == 'small' else self.large} in {self.study.path}")
        return per_seed(self.study.results, config["label"], measure), arm_of(config)

    def variants(self, order: int | None = None, method: str | None = None) -> list[str]:
        configs = self.configs
        if order is not None:
            configs = configs[configs["legend_order"] == order]
        if method is not None:
            configs = configs[configs["method"] == method]
        return list(dict.fromkeys(configs["variant"]))


def _batch_key(configs: pd.DataFrame, swept: Sequence[str]) -> str | None:
    """The identity key that sets the batch size: one the preset sweeps, else any that
    varies and names a batch."""
    varying = [k for k in identity_columns(configs) if not k.startswith("method.") and configs[k].map(_key).nunique() > 1]
    candidates = [k for k in swept if k in varying] or [k for k in varying if "batch" in k]
    named = [k for k in candidates if "batch" in k] or candidates
    return named[0] if named else None


def _top1(results: Results) -> str | None:
    columns = results.metrics.columns
    for name in TOP1_COLUMNS:
        if name in columns:
            return name
    return next((c for c in columns if c.startswith("val_") and ("top1" in c or "acc" in c)), None)


def gap_study(context: Context) -> GapStudy:
    """The large-batch study the Fig. 4 claims read: ImageNet's runs where they cover two
    batch sizes, else the Fashion-MNIST study's."""
    reasons = []
    for name, experiment, run_name in (IMAGENET, FASHION):
        source = preset(name, experiment, run_name)
        study = context.study(source.path(context.root))
        if not study.ran:
            reasons.append(f"no complete runs in {study.path}")
            continue
        configs = study.results.configurations
        key = _batch_key(configs, source.swept)
        top1 = _top1(study.results)
        if key is None or top1 is None:
            reasons.append(f"{study.path}: " + ("no batch-size key varies" if key is None else "no top-1 accuracy column"))
            continue
        # Keys that follow the batch size (a learning rate scaled with it) belong to it.
        follows = [k for k in identity_columns(configs) if k != key and not k.startswith("method.")
                   and configs.groupby(configs[key].map(_key))[k].agg(lambda v: v.map(_key).nunique()).max() == 1]
        group, notes = settings_group(study.results, exclude=[key, *follows])
        values = sorted(set(group[key].dropna()), key=aggregate._sort_key)
        base = group[group["baseline"].astype(bool)]
        if len(values) < 2 or base.empty:
            reasons.append(f"{study.path}: " + ("one batch size" if len(values) < 2 else "no base-optimizer runs"))
            continue
        if len(values) > 2:
            notes.append(f"{key} takes {len(values)} values; the smallest and the largest are compared")
        return GapStudy(study, key, values[0], values[-1], top1, group, base["variant"].iloc[0], notes + [n for n in [study.left_out()] if n])
    raise NotRun("; ".join(reasons))


def _gap_effect(gap: GapStudy, variant: str) -> tuple[Effect, Effect, list[Arm]]:
    """(share of the base optimizer's gap that ``variant`` recovers, the base's gap, arms)."""
    measure = final(gap.top1)
    (m_small, a1), (m_large, a2) = gap.values(variant, "small", measure), gap.values(variant, "large", measure)
    (b_small, a3), (b_large, a4) = gap.values(gap.base, "small", measure), gap.values(gap.base, "large", measure)
    base_gap = contrast([(1, b_large), (-1, b_small)])
    recovery = contrast([(1, m_large), (-1, m_small), (-1, b_large), (1, b_small)])
    share = recovery.scaled(1 / abs(base_gap.estimate)) if base_gap.estimate else recovery.scaled(math.nan)
    return share, base_gap, [a1, a2, a3, a4]


def _gap_rows(context: Context, claim: Claim, variants: Callable[[GapStudy], list[str]], what: str) -> tuple[list[Row], list[str], str]:
    gap = gap_study(context)
    chosen = variants(gap)
    if not chosen:
        raise NotRun(f"no complete runs of {what} in {gap.study.path}")
    rows, notes = [], list(gap.notes)
    for variant in chosen:
        share, base_gap, arms = _gap_effect(gap, variant)
        row = measured(f"share of {gap.base}'s gap recovered by {variant}", share, claim.region, arms, source=str(gap.study.path))
        if not (np.isfinite(base_gap.high) and base_gap.high < 0):
            row.verdict, row.reason = "inconclusive", f"no large-batch gap to recover: {gap.base}'s gap is {base_gap}"
        rows.append(row)
    notes.insert(0, _gap_note(gap))
    return rows, notes, str(gap.study.path)


def _gap_note(gap: GapStudy) -> str:
    """The gap of each variant, and each variant's large-batch accuracy against the base
    optimizer's: a gap can narrow because the small-batch accuracy fell, which the second
    part shows."""
    measure = final(gap.top1)
    base_large = gap.values(gap.base, "large", measure)[0]
    gaps, at_large = [], []
    for variant in gap.variants():
        try:
            large = gap.values(variant, "large", measure)[0]
            effect = contrast([(1, large), (-1, gap.values(variant, "small", measure)[0])])
        except NotRun:
            continue
        gaps.append(f"{variant} {effect} ({effect.n} seeds)")
        if variant != gap.base:
            versus = contrast([(1, large), (-1, base_large)])
            at_large.append(f"{variant} {versus}")
    note = (f"gap = final {gap.top1} at {gap.batch_key}={gap.large} minus at {gap.batch_key}={gap.small}, "
            f"per variant: " + "; ".join(gaps))
    if at_large:
        note += f"; final {gap.top1} at {gap.batch_key}={gap.large} minus {gap.base}'s there: " + "; ".join(at_large)
    return note


def _imagenet_cost(context: Context, claim: Claim) -> tuple[list[Row], list[str], str] | None:
    """The cost claim on ImageNet's runs at one batch size (the paper's setting), if any."""
    study = context.study(preset(*IMAGENET).path(context.root))
    if not study.ran:
        return None
    group, notes = settings_group(study.results)
    base, aadl = group[group["baseline"].astype(bool)], group[(group["method"] == "aadl") & (group["legend_order"] == 1)]
    if len(base) != 1 or len(aadl) != 1:
        return None
    base, aadl = base.iloc[0], aadl.iloc[0]
    effect = contrast([(1, per_seed(study.results, aadl["label"], cost_per_step)),
                       (-1, per_seed(study.results, base["label"], cost_per_step))], log=True)
    row = measured(f"seconds per step: {aadl['label']} / {base['label']}", effect, claim.region, [arm_of(aadl), arm_of(base)], source=str(study.path))
    return [row], notes + [n for n in [study.left_out()] if n], str(study.path)


def _fig4_cost(context: Context, claim: Claim) -> tuple[list[Row], list[str], str]:
    imagenet = _imagenet_cost(context, claim)
    if imagenet is not None:
        return imagenet
    gap = gap_study(context)
    rows = []
    for order, counted in ((1, True), (2, False)):
        for variant in gap.variants(order=order, method="aadl"):
            this, arm = gap.values(variant, "large", cost_per_step)
            base, base_arm = gap.values(gap.base, "large", cost_per_step)
            effect = contrast([(1, this), (-1, base)], log=True)
            rows.append(measured(f"seconds per step at {gap.batch_key}={gap.large}: {variant} / {gap.base}", effect, claim.region,
                                 [arm, base_arm], counted, str(gap.study.path)))
    if not any(row.counted for row in rows):
        raise NotRun(f"no complete runs of +AADL in {gap.study.path}")
    return rows, list(gap.notes), str(gap.study.path)


# -- the sweep over p ---------------------------------------------------------------------------

P_SWEEP = ("p_sweep", "graduate_admissions", "p_sweep")
FREQUENCY = "method.aadl.frequency"


def _p_sweep(context: Context, claim: Claim) -> tuple[list[Row], list[str], str]:
    source = preset(*P_SWEEP)
    path = source.path(context.root)
    study = _study_or_not_run(context, path)
    group, notes = settings_group(study.results)
    aadl = group[(group["method"] == "aadl") & (group["legend_order"] == 1)]
    if FREQUENCY not in aadl or aadl[FREQUENCY].isna().all():
        raise NotRun(f"no +AADL runs with {FREQUENCY} in {path}")
    if aadl[FREQUENCY].map(_key).duplicated().any():
        raise Unmeasurable(f"several +AADL configurations share a frequency in {path}: {', '.join(aadl['label'])}")
    ones = aadl[aadl[FREQUENCY] == 1]
    if ones.empty:
        raise NotRun(f"no +AADL runs with {FREQUENCY}=1 in {path}")
    one = ones.iloc[0]
    others = aadl[aadl[FREQUENCY] > 1].sort_values(FREQUENCY)
    if others.empty:
        raise NotRun(f"no +AADL runs with {FREQUENCY} > 1 in {path}")
    reference = per_seed(study.results, one["label"], final("val_loss"))
    rows = []
    for _, config in others.iterrows():
        effect = contrast([(1, reference), (-1, per_seed(study.results, config["label"], final("val_loss")))], log=True)
        rows.append(measured(f"final val_loss: p=1 / p={int(config[FREQUENCY])}", effect, claim.region, [arm_of(one), arm_of(config)], source=str(path)))
    return rows, notes + [n for n in [study.left_out()] if n], str(path)


# -- the seed methods -----------------------------------------------------------------------------


def _method_studies(context: Context, method: str) -> list[tuple[Study, pd.DataFrame]]:
    """(study, its configurations of ``method``) for every directory holding good runs of it."""
    found = []
    for study in context.all_studies():
        if study.ran:
            configs = study.results.configurations
            configs = configs[(configs["method"] == method) & (configs["seeds"] > 0)]
            if not configs.empty:
                found.append((study, configs))
    return found


def _bsgd(context: Context, claim: Claim) -> tuple[list[Row], list[str], str]:
    found = _method_studies(context, "bsgd")
    if not found:
        raise NotRun(f"no complete runs of method bsgd under {context.root}")
    rows, notes = [], []
    for study, configs in found:
        for _, config in configs.iterrows():
            arms = [arm_of(config)]
            try:
                require_columns(study.results, FORWARD_NORM, BACKWARD_NORM)
            except ResultsError as error:
                rows.append(Row(f"{config['label']} in {study.path}", None, "inconclusive", str(error), arms, source=str(study.path)))
                continue
            ratio = per_seed(study.results, config["label"], lambda r: tail_median(r, FORWARD_NORM) / tail_median(r, BACKWARD_NORM))
            effect = contrast([(1, ratio)], log=True)
            rows.append(measured(f"{FORWARD_NORM} / {BACKWARD_NORM}, {config['label']} ({study.path.parent.name})", effect,
                                 claim.region, arms, source=str(study.path)))
        notes += [n for n in [study.left_out()] if n]
    return rows, notes, ", ".join(str(study.path) for study, _ in found)


def _extrap(context: Context, claim: Claim) -> tuple[list[Row], list[str], str]:
    return _gap_rows(context, claim, lambda gap: gap.variants(method="extrap_sgd"), "method extrap_sgd")


# -- the list -----------------------------------------------------------------------------------


def _ratio_claim(preset_name: str, numerator: int, denominator: int, metric: str, context_rows=()):
    return lambda context, claim: paired_ratio(context, claim, preset_name=preset_name, numerator=numerator,
                                               denominator=denominator, metric=metric, context_rows=context_rows)


FASHION_COMMAND = f"{RUN} +paper=fashion_gap"
CLAIMS: tuple[Claim, ...] = (
    Claim("fig1-aadl-like-adam", "Fig. 1", "AADL alone performs like Adam",
          "Adam's final val_loss over Adam+AADL's, per seed (geometric mean)",
          Region(*LIKE_BAND), f"{RUN} +paper=fig1", True, _ratio_claim("fig1", 0, 1, "val_loss")),
    Claim("fig1-ma-tenfold", "Fig. 1", "AADL with the moving average lowers the final validation MSE by an order of magnitude",
          "Adam's final val_loss over Adam+AADL+MA's, per seed (geometric mean)",
          Region(ORDER_OF_MAGNITUDE), f"{RUN} +paper=fig1", True, _ratio_claim("fig1", 0, 2, "val_loss", [(1, 2, "val_loss")])),
    Claim("fig2-aadl-lowers-mse", "Fig. 2", "AADL lowers the validation MSE",
          "Adam's final val_loss over Adam+AADL's, per seed (geometric mean)",
          Region(1.0), f"{RUN} +paper=fig2", True, _ratio_claim("fig2", 0, 1, "val_loss", [(0, 2, "val_loss")])),
    Claim("fig2-ma-accuracy", "Fig. 2", "the moving average improves the final accuracy",
          "Adam+AADL's final val_rel_l2 (relative L2 error against the exact solution) over Adam+AADL+MA's",
          Region(1.0), f"{RUN} +paper=fig2", True, _ratio_claim("fig2", 1, 2, "val_rel_l2", [(0, 2, "val_rel_l2")])),
    Claim("fig3-aadl-no-gain", "Fig. 3", "AADL alone does not improve on Adam",
          f"Adam's final val_loss over Adam+AADL's (no gain: below the like band's upper end, {LIKE_BAND[1]:g})",
          Region(0.0, LIKE_BAND[1]), f"{RUN} +paper=fig3", True, _ratio_claim("fig3", 0, 1, "val_loss", [(0, 1, "val_rel_l2")])),
    Claim("fig3-ma-oscillation", "Fig. 3", "the moving average reduces the oscillations",
          f"oscillation of Adam+AADL minus that of Adam+AADL+MA, per seed; oscillation = over the last "
          f"{OSCILLATION_TAIL:.0%} of the evaluation rows, the path length of log10 val_loss beyond its net "
          f"change, per evaluation ((sum|d| - |sum d|)/(k-1), decades; 0 for a monotone curve)",
          Region(0.0), f"{RUN} +paper=fig3", False, _fig3_oscillation),
    Claim("fig4-aadl-cost", "Fig. 4", "AADL costs about 10x the time of the base optimizer",
          f"seconds per step (wall_time / steps, evaluations included) of +AADL over the base optimizer at the "
          f"large batch, per seed (geometric mean); about 10x = within a factor 2 of 10",
          Region(*ABOUT_TEN_TIMES), FASHION_COMMAND, True, _fig4_cost),
    Claim("fig4-aadl-gap", "Fig. 4", "AADL does not recover the large-batch generalization gap",
          f"share of the base optimizer's gap (final top-1 at the large batch minus at the small one) that "
          f"+AADL recovers: ((AADL_L - AADL_S) - (base_L - base_S)) / |base gap|; does not recover = less "
          f"than {RECOVERY_MARGIN:g} of it",
          Region(-math.inf, RECOVERY_MARGIN), FASHION_COMMAND, False,
          lambda context, claim: _gap_rows(context, claim, lambda gap: gap.variants(order=1, method="aadl"), "+AADL")),
    Claim("fig4-ma-gap", "Fig. 4", "the moving average partially recovers the large-batch gap",
          f"share of the base optimizer's gap that +AADL+MA recovers (as above); recovers part = more than "
          f"{RECOVERY_MARGIN:g} of it",
          Region(RECOVERY_MARGIN), FASHION_COMMAND, False,
          lambda context, claim: _gap_rows(context, claim, lambda gap: gap.variants(order=2, method="aadl"), "+AADL+MA")),
    Claim("p-sweep", "Alternating AA", "alternating AA (p > 1) beats p = 1",
          f"final val_loss of +AADL at p = 1 over that at each p > 1 ({FREQUENCY}), per seed (geometric mean); "
          f"one row per p",
          Region(1.0), f"{RUN} +paper=p_sweep", True, _p_sweep),
    Claim("bsgd-converges", "Seed methods", "backward SGD converges where forward SGD keeps fluctuating (constant lr, small batch)",
          f"median {FORWARD_NORM} over median {BACKWARD_NORM} over the last {STEP_NORM_TAIL:.0%} of the rows, per "
          f"seed (geometric mean); converges where the other fluctuates = backward's steps at least "
          f"{ORDER_OF_MAGNITUDE:g}x smaller; one row per problem",
          Region(ORDER_OF_MAGNITUDE), f"{RUN} experiment=mean_estimation method=bsgd 'seed=range(0,10)' output.name=bsgd",
          True, _bsgd),
    Claim("extrap-large-batch", "Seed methods", "EXTRAP-SGD keeps accuracy at larger batch sizes than the base optimizer",
          f"share of the base optimizer's large-batch gap that EXTRAP-SGD recovers (as for Fig. 4); more than "
          f"{RECOVERY_MARGIN:g} of it",
          Region(RECOVERY_MARGIN), f"{FASHION_COMMAND} method=extrap_sgd", False, _extrap),
)


def evaluate_all(context: Context, claims: Sequence[Claim] = CLAIMS) -> list[ClaimResult]:
    return [evaluate(claim, context) for claim in claims]


# --------------------------------------------------------------------------------------------
# Measures without a claimed size
# --------------------------------------------------------------------------------------------


@dataclass
class MeasureRow:
    study: str
    label: str
    values: dict[str, str]


def criterion_rates(context: Context) -> list[MeasureRow]:
    """How often the moving average's criterion (Eq. 16) fires and the safeguard accepts
    the AA point: per configuration with the counters, averages applied per step and
    accepted per attempted AA step (mean and interval over good seeds)."""
    rows = []
    for study in context.all_studies():
        if not study.ran or AVERAGES not in study.results.metrics.columns:
            continue
        for _, config in study.results.configurations.iterrows():
            frame = study.results.metrics[study.results.metrics["label"] == config["label"]]
            if frame.empty or frame[AVERAGES].isna().all():
                continue
            averages = per_seed(study.results, config["label"], counter_rate(AVERAGES, "step"))
            accepted = per_seed(study.results, config["label"], counter_rate(ACCEPTED, ATTEMPTS))
            rows.append(MeasureRow(str(study.path), config["label"], {
                "seeds": f"{int(config['seeds'])}" + (f" (+{int(config['diverged'])} diverged)" if config["diverged"] else ""),
                "averages applied per step": interval_text(*aggregate.t_interval(averages)),
                "AA points accepted per attempt": interval_text(*aggregate.t_interval(accepted)),
            }))
    return rows


def targets(context: Context) -> list[MeasureRow]:
    """Time to target per configuration of every directory, as AlgoPerf reports it: the
    target is the median final val_loss of the configuration's base optimizer (the first
    configuration where there is none); steps and seconds to the first evaluation at or
    below it, median over seeds (a run that never reaches it counts as infinite), how many
    reached it; and seconds per step (mean, and over the base optimizer's, paired)."""
    rows = []
    for study in context.all_studies():
        if not study.ran:
            continue
        results = study.results
        references = aggregate.baselines(results)
        first = results.configurations.loc[results.configurations["seeds"] > 0, "label"]
        for _, config in results.configurations.iterrows():
            label = config["label"]
            reference = references.get(label, first.iloc[0])
            finals = per_seed(results, reference, final("val_loss"))
            if finals.empty or config["seeds"] == 0:
                continue
            target = float(np.median(finals))
            reach = per_seed(results, label, lambda r: time_to_target(r, target)[0])
            seconds = per_seed(results, label, lambda r: time_to_target(r, target)[1])
            cost = per_seed(results, label, cost_per_step)
            ratio = contrast([(1, cost), (-1, per_seed(results, reference, cost_per_step))], log=True)
            rows.append(MeasureRow(str(study.path), label, {
                "target val_loss": f"{_num(target)} ({reference if reference != label else 'own'} median)",
                "steps to target (median)": _num(float(np.median(reach))),
                "seconds to target (median)": _num(float(np.median(seconds))),
                "reached": f"{int(np.isfinite(reach).sum())}/{len(reach)}",
                "seconds per step": interval_text(*aggregate.t_interval(cost)),
                "per step / reference's": str(ratio) if reference != label else "1",
            }))
    return rows


# --------------------------------------------------------------------------------------------
# Numbers as text
# --------------------------------------------------------------------------------------------


def _num(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.3g}"


def interval_text(mean: float, low: float, high: float) -> str:
    if not np.isfinite(mean):
        return "n/a"
    if not (np.isfinite(low) and np.isfinite(high)):
        return _num(mean)
    return f"{_num(mean)} [{_num(low)}, {_num(high)}]"
