"""The seed paper's claims measured on finished runs, each with a verdict by one stated rule.

A claim names the runs it rests on (a preset's run directory, or any run of a method), an
effect computed per seed from those runs (a ratio of final losses, a difference of
oscillation, a share of the large-batch gap recovered), and the region of effect values
the paper claims, bounded by the claim's smallest effect of interest (its margin, stated
with its reason: ``Claim.margin``). The verdict (``decide``) compares the effect's interval
with that region:

- reproduced: the interval lies entirely inside the claimed region (for a "like" claim:
  two one-sided tests against the equivalence margins);
- not reproduced: it lies entirely outside (the effect is smaller than the margin, or on
  the other side);
- inconclusive: it crosses a margin (with the number of seeds that would settle it at the
  observed spread), or the effect rests on fewer than ``MIN_SEEDS`` seeds, or a premise
  fails (no gap to recover, costs from a shared clock);
- not run: the runs are absent; the claim carries the command that makes them.

Multiplicity: every counted row of the report is one test of a family whose error rate
is held at ``ALPHA`` by Holm's step-down (``holm``); each row's interval is judged at its
adjusted level, which the report shows. Diverged runs are outcomes: in a claim on quality
each counts as a failure (scored as the worst final value of the runs compared), beside
the good runs' effect and each configuration's diverged rate with its own interval.
Claims on an AADL algorithm are measured for the contract's algorithm and the authors'
code (``variant=reference_code``) separately, each with its verdict.

Nothing here writes files or imports torch: ``report`` renders what ``evaluate`` returns.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from experiments.analysis import aggregate
from experiments.analysis.aggregate import CONFIDENCE, Results, ResultsError
from experiments.analysis.figures import FIGURES, PRESET_DIR

#: The family-wise error rate of the report's tests (Holm).
ALPHA = 1 - CONFIDENCE
#: Fewer good seeds (pairs, when paired) than this make a claim inconclusive, whatever its
#: interval: a t interval over 2-4 seeds is too dependent on their spread being typical.
MIN_SEEDS = 5
#: The smallest difference of two losses worth a word: a tenth of a decade (x1.26).
TENTH_OF_A_DECADE = 10**0.1
TENTH = "a tenth of a decade (x1.26)"
#: Why a tenth of a decade is the smallest effect of interest for a loss.
WHY_TENTH = "the paper's figures draw these losses on log axes spanning several decades, where curves closer than that are not told apart"
#: "By an order of magnitude".
ORDER_OF_MAGNITUDE = 10.0
#: "About 10x the time": within a factor of 2 of 10.
ABOUT_TEN_TIMES = (5.0, 20.0)
#: Share of the base optimizer's large-batch gap that separates "recovers part of it"
#: from "does not recover it" (a tenth of the gap).
RECOVERY_MARGIN = 0.1
#: Oscillation (decades per evaluation) worth a word: a tenth of a decade, as for losses.
OSCILLATION_MARGIN = 0.1
#: The oscillation measure reads the last half of a run's evaluation rows.
OSCILLATION_TAIL = 0.5
#: The step-norm comparison of backward and forward SGD reads the last quarter of the rows.
STEP_NORM_TAIL = 0.25
#: Seed estimates beyond this are reported as "more than".
MAX_SEEDS_ESTIMATE = 10_000

#: Columns a method writes (experiments/methods/*: its ``counters``).
FORWARD_NORM, BACKWARD_NORM = "forward_step_norm", "backward_step_norm"
AVERAGES, ATTEMPTS, ACCEPTED = "averages_applied", "aa_attempts", "aa_accepted"
#: Top-1 validation accuracy, by the names a classification problem may give it.
TOP1_COLUMNS = ("val_top1", "val_acc1", "val_top1_accuracy", "val_accuracy", "val_acc")

VERDICTS = ("reproduced", "not reproduced", "inconclusive", "not run")
#: The AADL algorithms each claim on AADL is measured for: the contract's and the authors' code's.
ALGORITHMS = ("contract", "reference_code")
ALGORITHM_NAMES = {"contract": "contract's algorithm", "reference_code": "authors' code"}

#: Where a claim comes from.
SEED_PAPER = "seed paper"
NEIGHBOURS = "neighbouring papers"
#: What kind of statement of its paper a claim is.
KINDS = {
    "experiment": "an experiment of the paper",
    "attribution": "the paper credits AADL+MA's gain to AA; it runs no averaging-only control",
    "motivating argument": "a motivating argument of the paper, not one of its experiments",
}

RUN = "python -m experiments.run -m"

RULE = (
    f"Each claim is an effect measured per seed, with its Student-t interval over seeds (paired by "
    f"seed where the configurations compared share seeds, Welch's unpaired interval otherwise; "
    f"ratios are geometric means with the interval taken in log space), and a claimed region bounded "
    f"by the claim's smallest effect of interest (its margin, stated with its reason beside each claim). "
    f"**Reproduced**: the interval lies entirely inside the claimed region (for a \"like\" claim this is "
    f"the two one-sided tests against the equivalence margins). **Not reproduced**: it lies entirely "
    f"outside (the effect is smaller than the margin, or on the other side). **Inconclusive**: it "
    f"crosses a margin (the row says about how many seeds would settle it if the observed spread and "
    f"effect held), or it rests on fewer than {MIN_SEEDS} seeds (pairs when paired), or a premise fails. "
    f"**Not run**: the runs are absent (the command that makes them is given). "
    f"**Multiplicity**: all counted rows of this report form one family, held at a family-wise error "
    f"rate of {ALPHA:.0%} by Holm's step-down: the row with the smallest p-value (two-sided, against "
    f"the nearer margin) is judged with its interval at level {ALPHA:g}/K, the next at {ALPHA:g}/(K-1), "
    f"and so on until one is not decided; it and every later row are judged at the level where Holm "
    f"stopped. Each row shows its level; the plain 95% interval is shown beside it. "
    f"**Diverged runs are outcomes**: in a claim on quality (final losses, oscillation), each diverged "
    f"run counts as a failure, scored as the worst final value of the runs compared, and the verdict "
    f"rests on that effect; the good runs' effect is shown beside it, and each configuration's diverged "
    f"rate with its 95% Clopper-Pearson interval. "
    f"**Costs** are read from runs that had a process to themselves: seed-batched runs share one clock "
    f"(their per-seed intervals would be artefacts), so a cost claim on them is inconclusive. "
    f"**Algorithms**: a claim on AADL is measured for the contract's algorithm and for the authors' "
    f"code (method.aadl.variant=reference_code) separately, each with its verdict; runs of several "
    f"configurations of one method are each reported, and the claim is decided only where they agree. "
    f"A claim with several rows takes the verdict its rows share; context rows are shown, not counted."
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
        if math.isinf(self.low) or (self.low == 0 and self.high > 0):
            return f"< {_num(self.high)}"
        return f"in ({_num(self.low)}, {_num(self.high)})"

    def bounds(self, log: bool) -> list[float]:
        """The finite boundaries on the analysis scale (log for ratios)."""
        found = []
        for bound in (self.low, self.high):
            if log:
                bound = math.log(bound) if bound > 0 else -math.inf
            if math.isfinite(bound):
                found.append(bound)
        return found


@dataclass(frozen=True)
class Effect:
    """An effect's estimate and 95% interval, the seeds it rests on, and what any other
    level's interval needs: its centre and standard error on the analysis scale (log for
    ratios), degrees of freedom, and the per-seed spread (``se = spread / sqrt(n)``)."""

    estimate: float
    low: float
    high: float
    n: int  # pairs when paired, else the smallest group's seeds
    paired: bool
    per_seed: tuple[float, ...] = ()  # the paired per-seed values (empty when unpaired)
    center: float = math.nan
    se: float = math.nan
    dof: float = math.nan
    spread: float = math.nan
    log: bool = False

    def scaled(self, factor: float) -> "Effect":
        values = sorted((self.low * factor, self.high * factor))
        return Effect(self.estimate * factor, values[0], values[1], self.n, self.paired,
                      tuple(v * factor for v in self.per_seed), self.center * factor, self.se * abs(factor),
                      self.dof, self.spread * abs(factor), self.log)

    def _out(self, value: float) -> float:
        return math.exp(value) if self.log and np.isfinite(value) else value

    def interval(self, confidence: float = CONFIDENCE) -> tuple[float, float]:
        """The two-sided interval at ``confidence``, in the effect's units."""
        if not (np.isfinite(self.se) and np.isfinite(self.dof)):
            return (self.low, self.high) if confidence == CONFIDENCE else (math.nan, math.nan)
        half = self.se * float(stats.t.ppf((1 + confidence) / 2, self.dof)) if self.se > 0 else 0.0
        return self._out(self.center - half), self._out(self.center + half)

    def p_value(self, region: Region) -> tuple[float, str]:
        """(two-sided p-value against the nearer margin, the verdict it argues for): twice
        the smaller of the one-sided p-values for "inside the region" (the larger of the
        tests against each finite bound) and "outside it". ``nan`` without a standard error."""
        if not (np.isfinite(self.center) and np.isfinite(self.se) and np.isfinite(self.dof)):
            return math.nan, "inconclusive"
        low, high = (b if not self.log else (math.log(b) if b > 0 else -math.inf) for b in (region.low, region.high))
        if self.se == 0:
            inside = low < self.center < high
            return 0.0, "reproduced" if inside else "not reproduced"
        t = stats.t(self.dof)
        above = lambda b: float(t.sf((self.center - b) / self.se))  # H0: effect <= b  # noqa: E731
        below = lambda b: float(t.cdf((self.center - b) / self.se))  # H0: effect >= b  # noqa: E731
        inside = max(above(low) if np.isfinite(low) else 0.0, below(high) if np.isfinite(high) else 0.0)
        outside = min(below(low) if np.isfinite(low) else 1.0, above(high) if np.isfinite(high) else 1.0)
        if inside <= outside:
            return min(1.0, 2 * inside), "reproduced"
        return min(1.0, 2 * outside), "not reproduced"

    def seeds_to_settle(self, region: Region, confidence: float) -> int | None:
        """About how many seeds would give an interval at ``confidence`` clear of the margin
        nearest the estimate, if the estimate and the per-seed spread stayed as observed
        (None: no number would, the estimate sits on the margin or there is no spread)."""
        bounds = region.bounds(self.log)
        if not bounds or not (np.isfinite(self.center) and np.isfinite(self.spread)) or self.spread <= 0:
            return None
        distance = min(abs(self.center - b) for b in bounds)
        if distance == 0:
            return None
        n = np.arange(2, MAX_SEEDS_ESTIMATE + 2)
        half = stats.t.ppf((1 + confidence) / 2, n - 1) * self.spread / np.sqrt(n)
        settled = n[half < distance]
        return int(settled[0]) if len(settled) else MAX_SEEDS_ESTIMATE + 1

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
        spread = float(np.std(per_seed, ddof=1))
        effect = Effect(mean, low, high, len(common), True, tuple(map(float, per_seed)),
                        mean, spread / math.sqrt(len(common)), len(common) - 1, spread)
    else:
        effect = _welch(series)
    if log:
        return replace(effect, estimate=_exp(effect.estimate), low=_exp(effect.low), high=_exp(effect.high),
                       per_seed=tuple(math.exp(v) for v in effect.per_seed), log=True)
    return effect


def _exp(value: float) -> float:
    return math.exp(value) if np.isfinite(value) else math.nan


def _welch(series: Sequence[tuple[float, pd.Series]]) -> Effect:
    sizes = [len(values) for _, values in series]
    if not series or min(sizes) == 0:
        return Effect(math.nan, math.nan, math.nan, 0, False)
    estimate = float(sum(c * values.mean() for c, values in series))
    if min(sizes) < 2:
        return Effect(estimate, math.nan, math.nan, min(sizes), False, center=estimate)
    parts = [c * c * values.var(ddof=1) / len(values) for c, values in series]
    variance = sum(parts)
    # Per-seed spread as if every group had n seeds: se(n) = spread / sqrt(n).
    spread = math.sqrt(sum(c * c * values.var(ddof=1) for c, values in series))
    if variance == 0:
        return Effect(estimate, estimate, estimate, min(sizes), False, center=estimate, se=0.0, dof=min(sizes) - 1, spread=0.0)
    dof = variance**2 / sum(part**2 / (len(values) - 1) for part, (_, values) in zip(parts, series))
    half = float(stats.t.ppf((1 + CONFIDENCE) / 2, dof) * math.sqrt(variance))
    return Effect(estimate, estimate - half, estimate + half, min(sizes), False, (), estimate, math.sqrt(variance), dof, spread)


def decide(effect: Effect | None, region: Region, confidence: float = CONFIDENCE, min_seeds: int = MIN_SEEDS) -> tuple[str, str]:
    """(verdict, reason) of one effect, its interval at ``confidence`` against ``region``."""
    if effect is None or effect.n == 0:
        return "inconclusive", "no good run to measure"
    if effect.n < min_seeds:
        return "inconclusive", (f"rests on {effect.n} seed{'s' if effect.n != 1 else ''}, fewer than {min_seeds}"
                                + _settle_text(effect, region, confidence, min_seeds))
    low, high = effect.interval(confidence)
    level = f"{100 * confidence:.4g}% interval" if confidence != CONFIDENCE else "interval"
    if not (np.isfinite(low) and np.isfinite(high)):
        return "inconclusive", "no finite interval"
    if region.low < low and high < region.high:
        return "reproduced", f"the {level} lies inside the claimed region ({region})"
    if high <= region.low or low >= region.high:
        return "not reproduced", f"the {level} lies outside the claimed region ({region})"
    return "inconclusive", f"the {level} crosses a margin of the claimed region ({region}){_settle_text(effect, region, confidence)}"


def _settle_text(effect: Effect, region: Region, confidence: float, at_least: int = 2) -> str:
    """"; about N seeds would settle it ..." from the observed spread ("" without one)."""
    if not np.isfinite(effect.spread):
        return ""
    settle = effect.seeds_to_settle(region, confidence)
    if settle is None:
        return "; no number of seeds would settle it at this estimate"
    if settle > MAX_SEEDS_ESTIMATE:
        return f"; more than {MAX_SEEDS_ESTIMATE:,} seeds would be needed at the observed spread"
    return f"; about {max(settle, at_least)} seeds would settle it at the observed spread"


def verdict(effect: Effect | None, region: Region, min_seeds: int = MIN_SEEDS) -> tuple[str, str]:
    """(verdict, reason) of one effect alone, its 95% interval against ``region``."""
    return decide(effect, region, CONFIDENCE, min_seeds)


def holm(rows: Sequence["Row"], alpha: float = ALPHA) -> int:
    """Judge the counted, measured rows as one family at family-wise error ``alpha``:
    Holm's step-down over their p-values against the margins, each row's interval at its
    adjusted level (``row.level``); rows whose verdict a premise fixed keep it. Returns K,
    the family's size."""
    family = [row for row in rows if row.counted and not row.fixed and row.effect is not None
              and row.effect.n >= MIN_SEEDS and np.isfinite(row.effect.p_value(row.region)[0])]
    ordered = sorted(family, key=lambda row: row.effect.p_value(row.region)[0])
    size, stopped = len(ordered), None
    for index, row in enumerate(ordered):
        level = alpha / (size - index) if stopped is None else stopped
        if stopped is None and row.effect.p_value(row.region)[0] > level:
            stopped = level
        row.level, row.family = level, True
        row.verdict, row.reason = decide(row.effect, row.region, 1 - level)
        if stopped is not None and row.verdict != "inconclusive":  # at the edge: the step-down has stopped
            row.verdict, row.reason = "inconclusive", f"Holm stopped before this row (p = {_num(row.effect.p_value(row.region)[0])} > {level:.3g})"
    return size


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


def diverged_rate(diverged: int, total: int) -> tuple[float, float, float]:
    """The share of runs that diverged and its 95% Clopper-Pearson interval."""
    if total == 0:
        return math.nan, math.nan, math.nan
    low = float(stats.beta.ppf(ALPHA / 2, diverged, total - diverged + 1)) if diverged else 0.0
    high = float(stats.beta.ppf(1 - ALPHA / 2, diverged + 1, total - diverged)) if diverged < total else 1.0
    return diverged / total, low, high
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

    @cached_property
    def metas(self) -> dict[str, dict]:
        """run directory -> meta.json, for every finished run (good and diverged)."""
        if self.results is None:
            return {}
        paths = list(self.results.runs["run"]) + [str(issue.path) for issue in self.results.diverged]
        found = {}
        for path in paths:
            try:
                found[str(path)] = aggregate.read_meta(Path(path))
            except (ResultsError, OSError, ValueError):
                continue
        return found

    def batched(self, labels: Sequence[str]) -> int:
        """How many good runs of ``labels`` trained seed-batched (several seeds, one process clock)."""
        runs = self.results.runs
        paths = runs.loc[runs["label"].isin(list(labels)), "run"]
        return sum(1 for path in paths if len(self.metas.get(str(path), {}).get("seed_group") or ()) > 1)

    def provenance(self) -> dict[str, list[str]]:
        """What the finished runs were made with: commits, dates, hosts, kernel levels."""
        commits, dates, hosts, kernels = Counter(), [], Counter(), Counter()
        for meta in self.metas.values():
            git = meta.get("git") or {}
            commit = git.get("commit")
            commits[(str(commit)[:10] if commit else "unknown") + ("+dirty" if git.get("dirty") else "")] += 1
            for key in ("started", "ended"):
                if isinstance(meta.get(key), str):
                    dates.append(meta[key][:10])
            hosts[str(meta.get("host", "unknown"))] += 1
            processor = meta.get("processor") if isinstance(meta.get("processor"), dict) else meta
            kernels[str(processor.get("cpu_capability") or "unknown")] += 1
        span = f"{min(dates)} to {max(dates)}" if dates else "unknown"
        counted = lambda c: [f"{k} ({n})" for k, n in sorted(c.items())]  # noqa: E731
        return {"commits": counted(commits), "dates": [span], "hosts": counted(hosts), "kernels": counted(kernels)}


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
    methods: tuple[str, ...] = ()  # the method choices it sweeps (configs/method/<choice>.yaml)
    expected: int | None = None  # runs of a complete preset

    @property
    def command(self) -> str:
        return f"{RUN} +paper={self.name}"

    def path(self, root: Path) -> Path:
        return Path(root) / self.experiment / self.run_name


def _sweep_size(value: Any) -> int:
    """How many values a sweeper parameter takes: ``a,b,c``, ``range(a,b[,s])`` or one."""
    text = str(value).strip()
    found = re.fullmatch(r"range\((-?\d+)\s*,\s*(-?\d+)(?:\s*,\s*(-?\d+))?\)", text)
    if found:
        start, stop, step = (int(g) if g else None for g in found.groups())
        return len(range(start, stop, step or 1))
    return len([part for part in text.split(",") if part.strip()])


def preset(name: str, experiment: str, run_name: str | None = None) -> Preset:
    file = PRESET_DIR / f"{name}.yaml"
    if not file.is_file():
        return Preset(name, experiment, run_name or name)
    from omegaconf import OmegaConf

    config = OmegaConf.to_container(OmegaConf.load(file))
    method = None
    for entry in config.get("defaults", []):
        if isinstance(entry, dict) and "override /experiment" in entry:
            experiment = entry["override /experiment"]
        if isinstance(entry, dict) and "override /method" in entry:
            method = entry["override /method"]
    params = ((config.get("hydra") or {}).get("sweeper") or {}).get("params") or {}
    swept = tuple(str(key) for key in params if str(key) not in ("method", "seed"))
    methods = tuple(str(params["method"]).replace(" ", "").split(",")) if "method" in params else ((method,) if method else ())
    expected = math.prod(_sweep_size(value) for key, value in params.items() if key != "train.batch_seeds") if params else None
    return Preset(name, experiment, (config.get("output") or {}).get("name", run_name or name), swept, methods, expected)


class Context:
    """The runs under one output root, each directory loaded once."""

    def __init__(self, root: Path | str):
        self.root = Path(root)
        self._studies: dict[Path, Study] = {}
        self.family_size = 0  # the rows Holm judged together (evaluate_all)

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
    return [c for c in configs.columns if c not in (*aggregate.RUN_FIELDS, *aggregate.CONFIGURATION_COUNTS, "label")
            and not str(c).startswith("_")]


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


def diverged_seeds(results: Results, label: str) -> list[int]:
    """The seeds of configuration ``label`` whose runs diverged."""
    return sorted({int(issue.seed) for issue in results.diverged if issue.label == label and issue.seed is not None})


def with_failures(values: dict[str, pd.Series], failed: dict[str, list[int]]) -> tuple[dict[str, pd.Series], float]:
    """Each arm's per-seed values (higher is worse) with its diverged seeds scored as the
    worst value of any run compared, and that value."""
    finite = [v for series in values.values() for v in series.to_numpy(float) if np.isfinite(v)]
    worst = max(finite) if finite else math.nan
    scored = {}
    for label, series in values.items():
        extra = pd.Series({seed: worst for seed in failed.get(label, ()) if seed not in series.index}, dtype=float)
        scored[label] = pd.concat([series, extra]).sort_index() if len(extra) else series
    return scored, worst


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
        if not self.diverged:
            return f"{self.label}: {self.good} good"
        rate, low, high = diverged_rate(self.diverged, self.good + self.diverged)
        return f"{self.label}: {self.good} good, {self.diverged} diverged (rate {rate:.0%} [{low:.0%}, {high:.0%}])"


def arm_of(config: pd.Series) -> Arm:
    return Arm(config["label"], int(config["seeds"]), int(config["diverged"]))


def algorithm_of(config: pd.Series) -> str:
    """The AADL algorithm a configuration runs: "contract", "reference_code", or "" for a
    method without one (the base optimizer, backward SGD, ...)."""
    method = config.get("method")
    if method not in ("aadl", "ma"):
        return ""
    value = config.get(f"method.{method}.variant")
    return "contract" if aggregate._missing(value) else str(value)


#: Which configurations a paired claim compares, by role: method name and legend order.
ROLES = {"base": (None, 0), "aadl": ("aadl", 1), "aadl_ma": ("aadl", 2), "ma": ("ma", None)}
ROLE_NAMES = {"base": "the base optimizer alone", "aadl": "+AADL", "aadl_ma": "+AADL+MA", "ma": "the averaging-only control (+MA)"}


def configs_of(group: pd.DataFrame, role: str, algorithm: str) -> pd.DataFrame:
    """The configurations of ``group`` in ``role`` for ``algorithm`` (the base optimizer's
    serve both algorithms)."""
    method, order = ROLES[role]
    if role == "base":
        return group[group["baseline"].astype(bool)]
    found = group[group["method"] == method]
    if order is not None:
        found = found[found["legend_order"] == order]
    return found[[algorithm_of(config) == algorithm for _, config in found.iterrows()]]


def _settings(config: pd.Series) -> dict[str, str]:
    """A configuration's method settings, without the method's name in the key."""
    method = config.get("method")
    prefix = f"method.{method}."
    return {k[len(prefix):]: _key(v) for k, v in config.items() if isinstance(k, str) and k.startswith(prefix) and not aggregate._missing(v)}


#: Settings in which compared configurations are meant to differ.
DEFINING = ("average", "warmup")


def compatible(a: pd.Series, b: pd.Series) -> bool:
    """Whether two configurations may be compared: the method settings both have agree
    (AADL+MA and the averaging-only control share AADL's settings but average and warmup)."""
    left, right = _settings(a), _settings(b)
    return all(left[k] == right[k] for k in set(left) & set(right) if k not in DEFINING)


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
    algorithm: str = ""  # "contract", "reference_code", or "" (no AADL algorithm compared)
    region: Region = field(default_factory=Region)
    level: float = ALPHA  # the (Holm-adjusted) level its interval is judged at
    family: bool = False  # judged in the report's Holm family (a counted row of at least MIN_SEEDS)
    fixed: bool = False  # its verdict was fixed by a premise, not by its interval
    proxy: str = ""  # what it stands in for, when it is a proxy for the paper's setting

    def adjusted_interval(self) -> tuple[float, float] | None:
        if self.effect is None or self.level == ALPHA:
            return None
        return self.effect.interval(1 - self.level)


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
    margin: str = ""  # the smallest effect of interest and why
    source: str = SEED_PAPER
    kind: str = "experiment"  # of KINDS
    reference_command: str = ""  # what makes the authors' algorithm's runs ("": not an AADL claim)
    preset: str = ""  # the paper preset whose completeness the claim depends on

    @property
    def algorithms(self) -> tuple[str, ...]:
        return ALGORITHMS if self.reference_command else ("",)

    def command_for(self, algorithm: str) -> str:
        return self.reference_command if algorithm == "reference_code" else self.command


@dataclass
class ClaimResult:
    claim: Claim
    verdict: str
    reason: str
    rows: list[Row]
    notes: list[str]
    source: str
    verdicts: dict[str, tuple[str, str]] = field(default_factory=dict)  # algorithm -> (verdict, reason)
    incomplete: str = ""  # the preset it rests on is not complete: how far it got

    @property
    def headline(self) -> Row | None:
        """The first counted row that was measured (of the contract's algorithm first)."""
        return next((row for row in self.rows if row.counted and row.effect is not None), None)

    def headline_of(self, algorithm: str) -> Row | None:
        return next((row for row in self.rows if row.counted and row.effect is not None and row.algorithm == algorithm), None)

    @property
    def proxy(self) -> str:
        return next((row.proxy for row in self.rows if row.counted and row.proxy), "")

    def decide(self) -> None:
        """The verdict of each algorithm from its rows (after ``holm``), and the claim's:
        the contract's algorithm's (or the only one)."""
        for algorithm in self.claim.algorithms:
            rows = [row for row in self.rows if row.algorithm == algorithm]
            if not rows:
                self.verdicts[algorithm] = ("not run", f"no runs of the {ALGORITHM_NAMES.get(algorithm, 'method')}; "
                                                       f"run `{self.claim.command_for(algorithm)}`")
                continue
            decided, reason = combine(rows)
            if decided == "not run":
                reason = f"{reason}; run `{self.claim.command_for(algorithm)}`"
            self.verdicts[algorithm] = (decided, reason)
        self.verdict, self.reason = self.verdicts[self.claim.algorithms[0]]


def evaluate(claim: Claim, context: Context) -> ClaimResult:
    """One claim on its own: every counted row judged at the plain 95% level (the report
    judges all claims together, ``evaluate_all``)."""
    result = _measure(claim, context)
    result.decide()
    return result


def _measure(claim: Claim, context: Context) -> ClaimResult:
    try:
        rows, notes, source = claim.evaluate(context, claim)
    except NotRun as missing:
        result = ClaimResult(claim, "not run", f"{missing}; run `{claim.command}`", [], [], "")
        result.verdicts = {a: ("not run", f"{missing}; run `{claim.command_for(a)}`") for a in claim.algorithms}
        return result
    except (Unmeasurable, ResultsError) as error:
        result = ClaimResult(claim, "inconclusive", str(error), [], [], "")
        result.verdicts = {a: ("inconclusive", str(error)) for a in claim.algorithms}
        return result
    result = ClaimResult(claim, "", "", rows, notes, source)
    result.incomplete = completeness(context, claim)
    if result.incomplete:
        result.notes.insert(0, result.incomplete)
    return result


def evaluate_all(context: Context, claims: Sequence[Claim] | None = None) -> list[ClaimResult]:
    """Every claim, their counted rows judged as one family (``holm``)."""
    results = [_measure(claim, context) for claim in (CLAIMS if claims is None else claims)]
    family_size = holm([row for result in results for row in result.rows])
    for result in results:
        result.decide()
    context.family_size = family_size
    return results


def completeness(context: Context, claim: Claim) -> str:
    """A line saying the claim's preset (and its reference companion, where it has runs)
    is not complete: finished runs (good or diverged) against what the preset sweeps."""
    if not claim.preset:
        return ""
    lines = []
    for name in (claim.preset, f"{claim.preset}_reference"):
        source = preset(name, "")
        if not (PRESET_DIR / f"{name}.yaml").is_file() or not source.expected:
            continue
        study = context.study(source.path(context.root))
        if not study.ran:
            continue
        configs = study.results.configurations
        reference = name.endswith("_reference")
        methods = _method_names(source.methods)
        mine = [_belongs(config, reference) and (not methods or config["method"] in methods) for _, config in configs.iterrows()]
        finished = int((configs.loc[mine, "seeds"] + configs.loc[mine, "diverged"]).sum()) if any(mine) else 0
        if reference and finished == 0:
            continue
        if finished < source.expected:
            lines.append(f"+paper={name} is not complete: {finished} of its {source.expected} runs finished "
                         f"(`python -m experiments.status {name}` lists the missing)")
    return "; ".join(lines)


def _method_names(choices: Sequence[str]) -> set[str]:
    """The methods (``method.name``) of a preset's method choices (configs/method/<choice>.yaml)."""
    from omegaconf import OmegaConf

    names = set()
    for choice in choices:
        file = PRESET_DIR.parent / "method" / f"{choice}.yaml"
        if file.is_file():
            names.add(str(OmegaConf.load(file).get("name", choice)))
        else:
            names.add(choice)
    return names


def _belongs(config: pd.Series, reference: bool) -> bool:
    """Whether a configuration is one a preset (or its reference companion) runs."""
    algorithm = algorithm_of(config)
    return algorithm == "reference_code" if reference else algorithm in ("", "contract")


CONTEXT = "(context)"  # the verdict column of a row shown beside a claim, not counted


def measured(comparison: str, effect: Effect, region: Region, arms: list[Arm], counted: bool = True, source: str = "",
             algorithm: str = "") -> Row:
    decided, reason = verdict(effect, region) if counted else (CONTEXT, "shown beside the claim, not counted")
    return Row(comparison, effect, decided, reason, arms, counted, source, algorithm, region)


def _study_or_not_run(context: Context, path: Path) -> Study:
    study = context.study(path)
    if not study.ran:
        if study.counts.get("diverged"):
            raise Unmeasurable(f"every finished run in {path} diverged ({study.counts['diverged']})")
        raise NotRun(f"no complete runs in {path}")
    return study


def _pairs(group: pd.DataFrame, top: str, bottom: str, algorithm: str) -> tuple[list[tuple[pd.Series, pd.Series]], str]:
    """The compatible (numerator, denominator) configurations of two roles for one
    algorithm, and a note naming them where a role has several configurations."""
    a, b = configs_of(group, top, algorithm), configs_of(group, bottom, algorithm)
    pairs = [(x, y) for _, x in a.iterrows() for _, y in b.iterrows() if compatible(x, y)]
    note = ""
    several = [role for role, found in ((top, a), (bottom, b)) if len(found) > 1]
    if several:
        names = "; ".join(f"{ROLE_NAMES[role]}: {', '.join((a if role == top else b)['label'])}" for role in several)
        note = f"several configurations of one method ({names}): each is reported, and the claim is decided only where they agree"
    if not a.empty and not b.empty and not pairs:
        raise Unmeasurable(f"no configuration of {ROLE_NAMES[top]} has the settings of one of {ROLE_NAMES[bottom]}: "
                           f"{', '.join(a['label'])} against {', '.join(b['label'])}")
    return pairs, note


def quality_rows(study: Study, pair: tuple[pd.Series, pd.Series], measure: Callable[[pd.DataFrame], float], name: str,
                 region: Region, counted: bool, algorithm: str, log: bool = True) -> list[Row]:
    """The effect of ``measure`` (higher is worse) of a pair, numerator minus denominator
    (or over it, ``log``). Without diverged runs: one row. With them: the counted row
    scores each diverged run as the worst value compared, and the good runs' row is shown
    beside it as context."""
    a, b = pair
    arms = [arm_of(a), arm_of(b)]
    values = {a["label"]: per_seed(study.results, a["label"], measure), b["label"]: per_seed(study.results, b["label"], measure)}
    failed = {label: diverged_seeds(study.results, label) for label in values}
    good = contrast([(1, values[a["label"]]), (-1, values[b["label"]])], log=log)
    path = str(study.path)
    if not any(failed.values()):
        return [measured(f"{name}: {a['label']} {'/' if log else '-'} {b['label']}", good, region, arms, counted, path, algorithm)]
    scored, worst = with_failures(values, failed)
    effect = contrast([(1, scored[a["label"]]), (-1, scored[b["label"]])], log=log)
    return [
        measured(f"{name}: {a['label']} {'/' if log else '-'} {b['label']}, diverged runs scored as failures ({_num(worst)})",
                 effect, region, arms, counted, path, algorithm),
        measured(f"{name}: {a['label']} {'/' if log else '-'} {b['label']}, good runs only", good, region, arms, False, path, algorithm),
    ]


def paired_ratio(context: Context, claim: Claim, *, preset_name: str, numerator: str, denominator: str, metric: str,
                 context_rows: Sequence[tuple[str, str, str]] = ()) -> tuple[list[Row], list[str], str]:
    """A paper figure's claim on the ratio of final ``metric`` of two roles (``ROLES``:
    base, aadl, aadl_ma, ma), ``numerator`` over ``denominator``, so that > 1 means the
    denominator's is lower, for each AADL algorithm with runs; ``context_rows``
    (numerator, denominator, metric) are shown beside it."""
    spec = FIGURES[preset_name]
    path = spec.results_dir(context.root)
    study = _study_or_not_run(context, path)
    group, notes = settings_group(study.results)
    rows = []
    for algorithm in ALGORITHMS:
        for top, bottom, name, counted in [(numerator, denominator, metric, True), *((a, b, m, False) for a, b, m in context_rows)]:
            pairs, note = _pairs(group, top, bottom, algorithm)
            if not pairs:
                continue  # this algorithm (or a context row's role) has no runs here
            if name not in study.results.metrics.columns:
                if not counted:
                    continue
                raise Unmeasurable(f"the runs have no column {name}")
            if note and counted and note not in notes:
                notes.append(note)
            for pair in pairs:
                rows += quality_rows(study, pair, final(name), f"final {name}", claim.region, counted, algorithm)
    if not any(row.counted for row in rows):
        missing = [ROLE_NAMES[r] for r in (numerator, denominator) if configs_of(group, r, "contract").empty]
        raise NotRun(f"no complete runs of {' or '.join(missing) or 'the compared configurations'} in {path}")
    notes += [caveat.text for caveat in spec.caveats if caveat.applies(study.results)]
    notes += [note for note in [study.left_out()] if note]
    return rows, notes, str(path)


def _fig3_oscillation(context: Context, claim: Claim) -> tuple[list[Row], list[str], str]:
    spec = FIGURES["fig3"]
    path = spec.results_dir(context.root)
    study = _study_or_not_run(context, path)
    group, notes = settings_group(study.results)
    measure = lambda rows_: oscillation(rows_[spec.metric].to_numpy(float))  # noqa: E731
    rows = []
    for algorithm in ALGORITHMS:
        for other, counted in (("aadl", True), ("base", False)):
            pairs, note = _pairs(group, other, "aadl_ma", algorithm)
            if note and counted:
                notes.append(note)
            for pair in pairs:
                rows += quality_rows(study, pair, measure, f"oscillation of {spec.metric}", claim.region, counted, algorithm, log=False)
    if not any(row.counted for row in rows):
        raise NotRun(f"no complete runs of +AADL and +AADL+MA in {path}")
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

    def algorithm(self, variant: str) -> str:
        """The AADL algorithm of a variant's configurations ("" for none)."""
        found = self.configs[self.configs["variant"] == variant]
        return algorithm_of(found.iloc[0]) if not found.empty else ""


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


def _gap_effect(gap: GapStudy, variant: str, failures: bool = False) -> tuple[Effect, Effect, list[Arm], bool]:
    """(share of the base optimizer's gap that ``variant`` recovers, the base's gap, arms,
    whether any run diverged). ``failures``: each diverged run scored as the lowest final
    top-1 of the runs compared (higher is better here)."""
    measure = final(gap.top1)
    ends = [(variant, "small"), (variant, "large"), (gap.base, "small"), (gap.base, "large")]
    read = [gap.values(name, end, measure) for name, end in ends]
    values = [series for series, _ in read]
    failed = [diverged_seeds(gap.study.results, gap.config(name, end)["label"]) for name, end in ends]
    if failures and any(failed):
        negated, _ = with_failures({str(i): -series for i, series in enumerate(values)}, {str(i): f for i, f in enumerate(failed)})
        values = [-negated[str(i)] for i in range(len(values))]
    m_small, m_large, b_small, b_large = values
    base_gap = contrast([(1, b_large), (-1, b_small)])
    recovery = contrast([(1, m_large), (-1, m_small), (-1, b_large), (1, b_small)])
    share = recovery.scaled(1 / abs(base_gap.estimate)) if base_gap.estimate else recovery.scaled(math.nan)
    return share, base_gap, [arm for _, arm in read], any(failed)


def _gap_rows(context: Context, claim: Claim, variants: Callable[[GapStudy], list[str]], what: str) -> tuple[list[Row], list[str], str]:
    gap = gap_study(context)
    chosen = variants(gap)
    if not chosen:
        raise NotRun(f"no complete runs of {what} in {gap.study.path}")
    rows, notes = [], list(gap.notes)
    algorithm = (lambda variant: gap.algorithm(variant)) if claim.reference_command else (lambda variant: "")  # noqa: E731
    for variant in chosen:
        share, base_gap, arms, diverged = _gap_effect(gap, variant, failures=True)
        name = f"share of {gap.base}'s gap recovered by {variant}"
        row = measured(name + (", diverged runs scored as failures" if diverged else ""), share, claim.region, arms,
                       source=str(gap.study.path), algorithm=algorithm(variant))
        if not (np.isfinite(base_gap.high) and base_gap.high < 0):
            row.verdict, row.reason = "inconclusive", f"no large-batch gap to recover: {gap.base}'s gap is {base_gap}"
            row.fixed = True
        rows.append(row)
        if diverged:
            good = _gap_effect(gap, variant)[0]
            rows.append(measured(f"{name}, good runs only", good, claim.region, arms, False, str(gap.study.path), algorithm(variant)))
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




SHARED_CLOCK = ("trained seed-batched: the seeds of a process share one clock, so their seconds per step are not "
                "theirs; measure cost on runs with train.batch_seeds=1 or with benchmarks/")


def _cost_row(study: Study, this: pd.Series, base: pd.Series, values: tuple[pd.Series, pd.Series], comparison: str,
              region: Region, counted: bool, algorithm: str, proxy: str) -> Row:
    effect = contrast([(1, values[0]), (-1, values[1])], log=True)
    row = measured(comparison, effect, region, [arm_of(this), arm_of(base)], counted, str(study.path), algorithm)
    row.proxy = proxy
    batched = study.batched([this["label"], base["label"]])
    if batched and counted:
        row.verdict, row.reason, row.fixed = "inconclusive", f"{batched} of the runs compared {SHARED_CLOCK}", True
    return row


def _imagenet_cost(context: Context, claim: Claim) -> tuple[list[Row], list[str], str] | None:
    """The cost claim on ImageNet's runs at one batch size (the paper's setting), if any."""
    study = context.study(preset(*IMAGENET).path(context.root))
    if not study.ran:
        return None
    group, notes = settings_group(study.results)
    rows = []
    for algorithm in ALGORITHMS:
        for this, base in _pairs(group, "aadl", "base", algorithm)[0]:
            values = (per_seed(study.results, this["label"], cost_per_step), per_seed(study.results, base["label"], cost_per_step))
            rows.append(_cost_row(study, this, base, values, f"seconds per step: {this['label']} / {base['label']}",
                                  claim.region, True, algorithm, ""))
    if not rows:
        return None
    return rows, notes + [n for n in [study.left_out()] if n], str(study.path)


PROXY = ("CPU proxy: Fashion-MNIST ResNet-18 with the AA step on the CPU beside the model, not the paper's "
         "ImageNet ResNet-50 on GPUs with host-side AA")


def _fig4_cost(context: Context, claim: Claim) -> tuple[list[Row], list[str], str]:
    imagenet = _imagenet_cost(context, claim)
    if imagenet is not None:
        return imagenet
    gap = gap_study(context)
    rows = []
    for order, counted in ((1, True), (2, False)):
        for variant in gap.variants(order=order, method="aadl"):
            this, base = gap.config(variant, "large"), gap.config(gap.base, "large")
            if this is None or base is None:
                continue
            values = (gap.values(variant, "large", cost_per_step)[0], gap.values(gap.base, "large", cost_per_step)[0])
            rows.append(_cost_row(gap.study, this, base, values, f"seconds per step at {gap.batch_key}={gap.large}: {variant} / {gap.base}",
                                  claim.region, counted, gap.algorithm(variant), PROXY))
    if not any(row.counted for row in rows):
        raise NotRun(f"no complete runs of +AADL in {gap.study.path}")
    return rows, [f"{PROXY}: it informs the claim, it does not test it", *gap.notes], str(gap.study.path)


# -- the sweep over p ---------------------------------------------------------------------------

P_SWEEP = ("p_sweep", "graduate_admissions", "p_sweep")
FREQUENCY = "frequency"


def _p_sweep(context: Context, claim: Claim) -> tuple[list[Row], list[str], str]:
    source = preset(*P_SWEEP)
    path = source.path(context.root)
    study = _study_or_not_run(context, path)
    group, notes = settings_group(study.results)
    rows = []
    for algorithm in ALGORITHMS:
        aadl = configs_of(group, "aadl", algorithm)
        if aadl.empty:
            continue
        frequency = aadl.apply(lambda config: _settings(config).get(FREQUENCY), axis=1)
        if frequency.isna().all():
            raise NotRun(f"no +AADL runs with method.aadl.{FREQUENCY} in {path}")
        if frequency.duplicated().any():
            raise Unmeasurable(f"several +AADL configurations share a frequency in {path}: {', '.join(aadl['label'])}")
        frequency = frequency.map(lambda text: int(json.loads(text)) if text is not None else None)
        ones = aadl[frequency == 1]
        if ones.empty:
            raise NotRun(f"no +AADL runs with method.aadl.{FREQUENCY}=1 in {path}")
        one = ones.iloc[0]
        for index in frequency[frequency > 1].sort_values().index:
            config, p = aadl.loc[index], int(frequency[index])
            made = quality_rows(study, (one, config), final("val_loss"), "final val_loss", claim.region, True, algorithm)
            for row in made:
                row.comparison = row.comparison.replace(f"{one['label']} / {config['label']}", f"p=1 / p={p}" + (
                    " (authors' code)" if algorithm == "reference_code" else ""))
            rows += made
    if not rows:
        raise NotRun(f"no +AADL runs with method.aadl.{FREQUENCY} > 1 in {path}")
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
                rows.append(Row(f"{config['label']} in {study.path}", None, "inconclusive", str(error), arms, source=str(study.path),
                                region=claim.region, fixed=True))
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


def _ratio_claim(preset_name: str, numerator: str, denominator: str, metric: str, context_rows=()):
    return lambda context, claim: paired_ratio(context, claim, preset_name=preset_name, numerator=numerator,
                                               denominator=denominator, metric=metric, context_rows=context_rows)


def _figure_claim(key: str, figure: str, statement: str, measure: str, region: Region, margin: str, evaluate, *,
                  log_scale: bool = True, kind: str = "experiment", preset_name: str | None = None) -> Claim:
    name = preset_name or figure
    return Claim(key, f"Fig. {figure[-1]}" if figure.startswith("fig") else figure, statement, measure, region,
                 f"{RUN} +paper={name}", log_scale, evaluate, margin, SEED_PAPER, kind, f"{RUN} +paper={name}_reference", name)


def _due_to_aa(figure: str, metric: str = "val_loss") -> Claim:
    return _figure_claim(
        f"{figure}-ma-due-to-aa", figure, "the gain of AADL+MA over the base optimizer is due to AA",
        f"the averaging-only control's (method=ma: AADL+MA's moving average and criterion, AA never firing) final "
        f"{metric} over AADL+MA's, per seed (geometric mean); beside it, the base optimizer's over each",
        Region(TENTH_OF_A_DECADE), f"AA must add at least {TENTH} to what the averaging alone gives: {WHY_TENTH}",
        _ratio_claim(figure, "ma", "aadl_ma", metric, [("base", "ma", metric), ("base", "aadl_ma", metric)]),
        kind="attribution")


FASHION_COMMAND = f"{RUN} +paper=fashion_gap"
LIKE = Region(1 / TENTH_OF_A_DECADE, TENTH_OF_A_DECADE)
GAP_MARGIN = f"a tenth of the base optimizer's gap ({RECOVERY_MARGIN:g}): the paper states no size; less is within what one seed of its figure could show"

CLAIMS: tuple[Claim, ...] = (
    _figure_claim("fig1-aadl-like-adam", "fig1", "AADL alone performs like Adam",
                  "Adam's final val_loss over Adam+AADL's, per seed (geometric mean)",
                  LIKE, f"equivalence within {TENTH} either way: {WHY_TENTH}", _ratio_claim("fig1", "base", "aadl", "val_loss")),
    _figure_claim("fig1-ma-tenfold", "fig1", "AADL with the moving average lowers the final validation MSE by an order of magnitude",
                  "Adam's final val_loss over Adam+AADL+MA's, per seed (geometric mean)",
                  Region(ORDER_OF_MAGNITUDE), "the claimed size itself, an order of magnitude (x10)",
                  _ratio_claim("fig1", "base", "aadl_ma", "val_loss", [("aadl", "aadl_ma", "val_loss")])),
    _due_to_aa("fig1"),
    _figure_claim("fig2-aadl-lowers-mse", "fig2", "AADL lowers the validation MSE",
                  "Adam's final val_loss over Adam+AADL's, per seed (geometric mean)",
                  Region(TENTH_OF_A_DECADE), f"a lower MSE by at least {TENTH}: {WHY_TENTH}",
                  _ratio_claim("fig2", "base", "aadl", "val_loss", [("base", "aadl_ma", "val_loss")])),
    _figure_claim("fig2-ma-accuracy", "fig2", "the moving average improves the final accuracy",
                  "Adam+AADL's final val_rel_l2 over Adam+AADL+MA's, per seed (geometric mean). Accuracy is read as "
                  "the relative L2 error against the exact solution (val_rel_l2), the accuracy of a PDE solution; "
                  "Fig. 2 itself plots the validation MSE, whose ratio is shown beside it",
                  Region(10**0.05), "the square root of the MSE margin (x1.12): val_rel_l2 is the square root of a "
                  f"normalised MSE, so this is the same smallest effect as the losses' {TENTH}",
                  _ratio_claim("fig2", "aadl", "aadl_ma", "val_rel_l2", [("aadl", "aadl_ma", "val_loss"), ("base", "aadl_ma", "val_rel_l2")])),
    _due_to_aa("fig2"),
    _figure_claim("fig3-aadl-no-gain", "fig3", "AADL alone does not improve on Adam",
                  "Adam's final val_loss over Adam+AADL's, per seed (geometric mean)",
                  Region(0.0, TENTH_OF_A_DECADE), f"no gain of {TENTH} or more: {WHY_TENTH}",
                  _ratio_claim("fig3", "base", "aadl", "val_loss", [("base", "aadl", "val_rel_l2")])),
    _figure_claim("fig3-ma-oscillation", "fig3", "the moving average reduces the oscillations",
                  f"oscillation of Adam+AADL minus that of Adam+AADL+MA, per seed; oscillation = over the last "
                  f"{OSCILLATION_TAIL:.0%} of the evaluation rows, the path length of log10 val_loss beyond its net "
                  f"change, per evaluation ((sum|d| - |sum d|)/(k-1), decades; 0 for a monotone curve)",
                  Region(OSCILLATION_MARGIN), f"{OSCILLATION_MARGIN:g} decades per evaluation, the loss margin's tenth of a decade",
                  _fig3_oscillation, log_scale=False),
    _due_to_aa("fig3"),
    _figure_claim("fig4-aadl-cost", "Fig. 4", "AADL costs about 10x the time of the base optimizer",
                  "seconds per step (wall_time / steps, evaluations included) of +AADL over the base optimizer at the "
                  "large batch, per seed (geometric mean), on runs with a process each",
                  Region(*ABOUT_TEN_TIMES), "within a factor 2 of 10: the paper gives one rounded number; this band "
                  "still reads as \"about 10x\" and excludes the 1-3x of a cheap wrapper",
                  _fig4_cost, preset_name="fashion_gap"),
    _figure_claim("fig4-aadl-gap", "Fig. 4", "AADL does not recover the large-batch generalization gap",
                  "share of the base optimizer's gap (final top-1 at the large batch minus at the small one) that "
                  "+AADL recovers: ((AADL_L - AADL_S) - (base_L - base_S)) / |base gap|",
                  Region(-math.inf, RECOVERY_MARGIN), GAP_MARGIN,
                  lambda context, claim: _gap_rows(context, claim, lambda gap: gap.variants(order=1, method="aadl"), "+AADL"),
                  log_scale=False, preset_name="fashion_gap"),
    _figure_claim("fig4-ma-gap", "Fig. 4", "the moving average partially recovers the large-batch gap",
                  "share of the base optimizer's gap that +AADL+MA recovers (as above)",
                  Region(RECOVERY_MARGIN), GAP_MARGIN,
                  lambda context, claim: _gap_rows(context, claim, lambda gap: gap.variants(order=2, method="aadl"), "+AADL+MA"),
                  log_scale=False, preset_name="fashion_gap"),
    _figure_claim("p-sweep", "Alternating AA", "alternating AA (p > 1) beats p = 1",
                  "final val_loss of +AADL at p = 1 over that at each p > 1 (method.aadl.frequency), per seed "
                  "(geometric mean); one row per p",
                  Region(TENTH_OF_A_DECADE), f"a lower MSE by at least {TENTH}: {WHY_TENTH}", _p_sweep,
                  kind="motivating argument", preset_name="p_sweep"),
    Claim("bsgd-converges", "Backward SGD", "backward SGD converges where forward SGD keeps fluctuating (constant lr, small batch)",
          f"median {FORWARD_NORM} over median {BACKWARD_NORM} over the last {STEP_NORM_TAIL:.0%} of the rows, per "
          f"seed (geometric mean); one row per problem",
          Region(ORDER_OF_MAGNITUDE), f"{RUN} experiment=mean_estimation method=bsgd 'seed=range(0,10)' output.name=bsgd",
          True, _bsgd, margin="backward's steps at least 10x smaller: converging against fluctuating is a "
          "difference in kind, not a few percent",
          source=NEIGHBOURS + ": Dherin et al., \"Training in reverse\" (backward SGD)"),
    Claim("extrap-large-batch", "EXTRAP-SGD", "EXTRAP-SGD keeps accuracy at larger batch sizes than the base optimizer",
          "share of the base optimizer's large-batch gap that EXTRAP-SGD recovers (as for Fig. 4)",
          Region(RECOVERY_MARGIN), f"{FASHION_COMMAND} method=extrap_sgd", False, _extrap, margin=GAP_MARGIN,
          source=NEIGHBOURS + ": Lin et al., ICML 2020 (EXTRAP-SGD)"),
)
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
    reached it; and seconds per step (mean, and over the base optimizer's, paired), not
    given for seed-batched runs, whose seeds share one process clock."""
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
            alone, shared = study.batched([label]), study.batched([label, reference])
            rows.append(MeasureRow(str(study.path), label, {
                "target val_loss": f"{_num(target)} ({reference if reference != label else 'own'} median)",
                "steps to target (median)": _num(float(np.median(reach))),
                "seconds to target (median)": _num(float(np.median(seconds))),
                "reached": f"{int(np.isfinite(reach).sum())}/{len(reach)}",
                "seconds per step": "n/a (seed-batched)" if alone else interval_text(*aggregate.t_interval(cost)),
                "per step / reference's": "n/a (seed-batched)" if shared else (str(ratio) if reference != label else "1"),
            }))
    return rows


#: The contract's settings that take the authors' code's choice (the rest has no switch).
SWITCHES = ("average_criterion", "average_window")


def algorithm_switches(context: Context) -> list[MeasureRow]:
    """What separates the two algorithms, one difference at a time: per figure, the
    contract's AADL+MA with the authors' averaging criterion and/or window (``+paper=<fig>_switches``)
    and the authors' AADL+MA itself, each against the contract's AADL+MA of the figure
    (paired by seed): the final val_loss ratio, how often averaging and AA's points are kept."""
    rows = []
    for figure in ("fig1", "fig2", "fig3"):
        spec = FIGURES[figure]
        main = context.study(spec.results_dir(context.root))
        if not main.ran:
            continue
        group, _ = settings_group(main.results)
        contract = configs_of(group, "aadl_ma", "contract")
        if contract.empty:
            continue
        base = contract.iloc[0]
        reference = per_seed(main.results, base["label"], final("val_loss"))
        candidates = [(main, config) for _, config in configs_of(group, "aadl_ma", "reference_code").iterrows()]
        switched = context.study(preset(f"{figure}_switches", spec.experiment).path(context.root))
        if switched.ran:
            candidates += [(switched, config) for _, config in switched.results.configurations.iterrows()
                           if config["method"] == "aadl" and config["legend_order"] == 2 and algorithm_of(config) == "contract"]
        if not candidates:
            continue
        for study, config in [(main, base), *candidates]:
            values = per_seed(study.results, config["label"], final("val_loss"))
            ratio = contrast([(1, values), (-1, reference)], log=True) if study is not main or config is not base else None
            averages = per_seed(study.results, config["label"], counter_rate(AVERAGES, "step"))
            accepted = per_seed(study.results, config["label"], counter_rate(ACCEPTED, ATTEMPTS))
            settings = _settings(config)
            rows.append(MeasureRow(str(study.path), config["label"], {
                "algorithm": ALGORITHM_NAMES.get(algorithm_of(config), ""),
                "switched": "-" if algorithm_of(config) == "reference_code" else
                            ", ".join(f"{k}={_plain(json.loads(settings[k]))}" for k in SWITCHES if k in settings) or "defaults",
                "seeds": str(int(config["seeds"])),
                f"final val_loss / {base['label']}'s": str(ratio) if ratio is not None else "1",
                "averages applied per step": interval_text(*aggregate.t_interval(averages)),
                "AA points accepted per attempt": interval_text(*aggregate.t_interval(accepted)),
            }))
    return rows


# --------------------------------------------------------------------------------------------
# Numbers as text
# --------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """A setting as written: a whole float (read back from a table) as an integer."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


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
