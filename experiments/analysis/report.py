"""The claims report: every claim of the seed paper, measured on the runs, with a verdict.

    python -m experiments.report                      # results/report.md + a figure per claim beside it
    python -m experiments.report --runs DIR --out FILE
    python -m experiments.report --readme             # also rewrites the README's summary block

Reads the complete runs under ``--runs`` (default results/runs): the paper presets' run
directories, the p sweep's, the large-batch study's, and any run of the seed methods
(backward SGD, EXTRAP-SGD) wherever it is. Writes the report (Markdown: the runs' commits,
dates and machines, the verdict rule with each claim's margin and its reason, the
multiplicity adjustment, a summary with the contract's and the authors' algorithm's
verdicts side by side, each claim with its rows, arms and figure, how often the moving
average's criterion fires, time to target and cost per step for every configuration, and
the runs read) and ``report_<claim>.png`` beside it.

A wrong tree never overwrites a report or the README: a ``--runs`` that does not exist, or
where no run matches any claim, is an error; so is a tree holding none of some claim's
runs, unless ``--allow-missing`` (then those claims are "not run" with the command that
makes them); ``--readme`` never turns a measured row of the README into "not run" unless
``--allow-missing``. What is measured and the rule are in :mod:`experiments.analysis.claims`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from experiments.analysis import aggregate, bundle, claims
from experiments.analysis.claims import ALGORITHM_NAMES, ClaimResult, Context, MeasureRow, Study
from experiments.analysis.figures import DEFAULT_OUTPUT_ROOT, REPO_ROOT, STYLE
from experiments.errors import RunError, check_writable_directory

DEFAULT_REPORT = Path("results/report.md")
README = REPO_ROOT / "README.md"
FIGURE_PREFIX = "report_"

README_BEGIN = "<!-- claims-report:begin (python -m experiments.report --readme writes this block) -->"
README_END = "<!-- claims-report:end -->"
README_SECTION = "## What the reproduction shows"
#: How a block made under an earlier verdict rule, not yet regenerated, begins (the next
#: ``--readme`` replaces it with the current rule's).
STALE_BLOCK = "**Made under an earlier verdict rule:**"

VERDICT_COLOURS = {"reproduced": "tab:green", "not reproduced": "tab:red", "inconclusive": "tab:orange", claims.CONTEXT: "0.45"}


class ReportError(Exception):
    """The README's block markers are malformed, or the runs cannot make a report (the message says how)."""


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------


class Report:
    """Everything the report shows, measured once."""

    def __init__(self, runs: Path | str, shown: str | None = None):
        """The claims on the runs under ``runs``, named ``shown`` where given (a results
        bundle unpacked into a temporary directory names the root it was made from)."""
        self.tree = Path(runs)
        self.runs = Path(shown) if shown is not None else self.tree
        context = Context(self.tree)
        self.claims: list[ClaimResult] = claims.evaluate_all(context)
        self.family_size = context.family_size
        self.criterion: list[MeasureRow] = claims.criterion_rates(context)
        self.switches: list[MeasureRow] = claims.algorithm_switches(context)
        self.targets: list[MeasureRow] = claims.targets(context)
        self.studies: list[Study] = context.all_studies()

    def counts(self) -> Counter:
        return Counter(result.verdict for result in self.claims)

    def not_run(self) -> list[ClaimResult]:
        """The claims none of whose algorithms has runs."""
        return [r for r in self.claims if all(v == "not run" for v, _ in r.verdicts.values())]

    def figures(self) -> dict[str, Figure]:
        """claim key -> its figure, for the claims with a measured effect."""
        drawn = {}
        for result in self.claims:
            figure = claim_figure(result)
            if figure is not None:
                drawn[result.claim.key] = figure
        return drawn

    def write(self, out: Path | str) -> list[Path]:
        """The report at ``out`` and its figures beside it (a figure of a claim no longer
        measured is removed, so none is left that the report does not show)."""
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        figures = self.figures()
        written = []
        for result in self.claims:
            path = out.parent / f"{FIGURE_PREFIX}{result.claim.key}.png"
            if result.claim.key in figures:
                figures[result.claim.key].savefig(path, dpi=110)
                written.append(path)
            elif path.exists():
                path.unlink()
        out.write_text(self.markdown({key: f"{FIGURE_PREFIX}{key}.png" for key in figures}))
        return [out, *written]

    # -- Markdown ------------------------------------------------------------------------------

    def markdown(self, figures: dict[str, str]) -> str:
        lines = [
            "# Claims report",
            "",
            f"The seed paper's claims (and two of its neighbours'), measured on the complete runs under "
            f"`{self.runs}` by `python -m experiments.report` (this file is generated: rerun it after new runs; "
            "`--readme` also rewrites the README's summary).",
            "",
        ]
        lines += self._provenance_section()
        lines += ["## Verdict rule", "", claims.RULE, ""]
        lines += self._margins_section()
        lines += [f"Multiplicity: this report judges {self.family_size} counted row{'s' if self.family_size != 1 else ''} "
                  f"as one family (Holm, family-wise error {claims.ALPHA:g}); each row's level is in its table. "
                  "Ratios compare final values of the last evaluation row (never an earlier, better one).", ""]
        lines += self._summary_section()
        for title, chosen in self._groups():
            lines += [f"## {title}", ""]
            for result in chosen:
                lines += self._claim_section(result, figures.get(result.claim.key))
        lines += self._switches_section() + self._criterion_section() + self._targets_section() + self._runs_section()
        text = "\n".join(lines).rstrip() + "\n"
        return text.replace(str(self.tree), str(self.runs)) if self.tree != self.runs else text

    def _groups(self) -> list[tuple[str, list[ClaimResult]]]:
        """The claims by source: the seed paper's experiments, its attributions tested by a
        control, its motivating arguments; then the neighbouring papers'."""
        seed = [r for r in self.claims if r.claim.source == claims.SEED_PAPER]
        groups = [
            ("Claims of the seed paper: its experiments", [r for r in seed if r.claim.kind == "experiment"]),
            ("Claims of the seed paper: attributions its figures do not test", [r for r in seed if r.claim.kind == "attribution"]),
            ("Claims of the seed paper: motivating arguments", [r for r in seed if r.claim.kind == "motivating argument"]),
            ("Claims of neighbouring papers", [r for r in self.claims if r.claim.source != claims.SEED_PAPER]),
        ]
        return [(title, chosen) for title, chosen in groups if chosen]

    def _provenance_section(self) -> list[str]:
        lines = ["## The runs this report rests on", ""]
        finished = [study for study in self.studies if study.ran]
        if not finished:
            return lines + [f"No finished runs under `{self.runs}`.", ""]
        lines += ["| directory | commits (runs) | dates | hosts (runs) | CPU kernels (runs) |", "| --- | --- | --- | --- | --- |"]
        for study in finished:
            seen = study.provenance()
            lines.append(f"| `{study.path}` | " + " | ".join(", ".join(seen[k]) for k in ("commits", "dates", "hosts", "kernels")) + " |")
        notes = [f"`{study.path}`: {note}" for study in finished for note in aggregate.provenance_notes(study.results)]
        lines += [""] + [f"- {note}" for note in notes]
        return lines + ([""] if notes else [])

    def _margins_section(self) -> list[str]:
        lines = ["Each claim's smallest effect of interest (its margin) and why:", "",
                 "| claim | claimed region | margin: why |", "| --- | --- | --- |"]
        for result in self.claims:
            claim = result.claim
            lines.append(f"| {claim.section}: {claim.statement} | {claim.region} | {claim.margin} |")
        return lines + [""]

    def _summary_section(self) -> list[str]:
        lines = ["## Summary", "",
                 f"| | claim | measured effect [95% CI] | seeds | {ALGORITHM_NAMES['contract']} | {ALGORITHM_NAMES['reference_code']} |",
                 "| --- | --- | --- | --- | --- | --- |"]
        for result in self.claims:
            contract, reference = (_verdict_cell(result, a) for a in ("contract", "reference_code")) if result.claim.reference_command \
                else (_verdict_cell(result, ""), "-")
            lines.append(f"| {result.claim.section} | {_statement(result)} | {_headline(result)} | {_seeds(result)} | "
                         f"{contract} | {reference} |")
        counts = self.counts()
        lines += ["", ", ".join(f"{counts[v]} {v}" for v in claims.VERDICTS if counts[v]) + f" ({ALGORITHM_NAMES['contract']}).", ""]
        return lines

    def _claim_section(self, result: ClaimResult, figure: str | None) -> list[str]:
        claim = result.claim
        lines = [f"### {claim.section}: {claim.statement}", ""]
        if claim.kind != "experiment":
            lines.append(f"- Kind: {claims.KINDS[claim.kind]}.")
        if claim.source != claims.SEED_PAPER:
            lines.append(f"- Source: {claim.source}.")
        for algorithm in claim.algorithms:
            decided, reason = result.verdicts.get(algorithm, (result.verdict, result.reason))
            name = f" ({ALGORITHM_NAMES[algorithm]})" if algorithm else ""
            lines.append(f"- **Verdict{name}: {decided}**{' (' + result.proxy + ')' if result.proxy and algorithm != 'reference_code' else ''} ({reason}).")
        lines += [f"- Effect: {claim.measure}. Claimed: {claim.region}; margin: {claim.margin}.",
                  f"- Runs: {_code(result.source) if result.source else 'none'}; made by `{claim.command}`"
                  + (f" and `{claim.reference_command}`." if claim.reference_command else ".")]
        lines += [f"- Note: {note}" for note in result.notes]
        if result.rows:
            lines += ["", "| comparison | effect [95% CI] | level: interval | seeds | verdict | configurations (good, diverged runs) |",
                      "| --- | --- | --- | --- | --- | --- |"]
            for row in result.rows:
                effect = str(row.effect) if row.effect is not None else "n/a"
                lines.append(f"| {row.comparison} | {effect} | {_level(row)} | {_row_seeds(row)} | {row.verdict} | "
                             f"{'; '.join(map(str, row.arms))} |")
        if figure:
            lines += ["", f"![{claim.key}]({figure})"]
        return lines + [""]
    def _switches_section(self) -> list[str]:
        lines = ["## What separates the two algorithms", "",
                 "Per figure, the contract's AADL+MA with the authors' averaging criterion and/or window, one switch at "
                 "a time (`+paper=<figure>_switches`), and the authors' AADL+MA itself (`+paper=<figure>_reference`), "
                 "each against the contract's AADL+MA of the figure, paired by seed: the final val_loss ratio (mean "
                 "[95% CI]), and how often the average is applied and AA's points kept. The authors' column "
                 "construction and warm-up have no switch in the contract's wrapper: what the switches leave of the "
                 "gap between the two algorithms is theirs. Measured, not judged.", ""]
        if not self.switches:
            return lines + [f"No runs of the authors' algorithm or of the switches under `{self.runs}` "
                            f"(`{claims.RUN} +paper=fig1_reference` and `+paper=fig1_switches` make Fig. 1's).", ""]
        return lines + _table(self.switches) + [""]

    def _criterion_section(self) -> list[str]:
        lines = ["## How often the Eq. 16 criterion fires", "",
                 "Per configuration with the AADL counters (metrics.csv's cumulative `averages_applied`, "
                 "`aa_attempts`, `aa_accepted` in the last row): moving averages applied per optimizer "
                 "step, and AA points the safeguard kept per AA step attempted; mean [95% CI] over good "
                 "seeds. The paper states no rate: these are measured, not judged.", ""]
        if not self.criterion:
            return lines + [f"No runs with these counters under `{self.runs}` (`{claims.RUN} +paper=fig1` makes some).", ""]
        return lines + _table(self.criterion) + [""]

    def _targets_section(self) -> list[str]:
        lines = ["## Time to target and cost per step", "",
                 "As AlgoPerf reports time to target: per run directory, the target is the median final "
                 "val_loss of the base optimizer's runs of the same settings (of the first configuration "
                 "where there is no base optimizer); steps and seconds until the first evaluation at or "
                 "below it, median over good seeds, a run that never reaches it counting as infinite; "
                 "seconds per step (wall_time over steps, evaluations included), mean [95% CI], and over "
                 "the reference's (paired by seed).", ""]
        if not self.targets:
            return lines + [f"No complete runs under `{self.runs}`.", ""]
        return lines + _table(self.targets) + [""]

    def _runs_section(self) -> list[str]:
        lines = ["## Runs read", ""]
        if not self.studies:
            return lines + [f"No run directories under `{self.runs}`.", ""]
        lines += ["| directory | good | diverged | incomplete | damaged |", "| --- | --- | --- | --- | --- |"]
        for study in self.studies:
            lines.append(f"| `{study.path}` | " + " | ".join(str(study.counts.get(k, 0)) for k in claims.RUN_KINDS) + " |")
        return lines + ["", "Only good runs are in the numbers; the others are counted here and in each claim's configurations.", ""]

    # -- the README block ------------------------------------------------------------------------

    def readme_block(self, report_path: Path, readme: Path) -> str:
        """The README's summary: one line per claim, each algorithm's verdict, and where the report is."""
        try:
            link = os.path.relpath(report_path, readme.parent)
        except ValueError:  # another drive
            link = str(report_path)
        lines = [f"Generated from [the claims report]({link}) (`python -m experiments.report --readme`) on the runs "
                 f"under `{self.runs}`; the report states the verdict rule, each claim's margin and the runs' commits "
                 "and machines.", "",
                 f"| claim | measured | {ALGORITHM_NAMES['contract']} | {ALGORITHM_NAMES['reference_code']} |", "| --- | --- | --- | --- |"]
        for result in self.claims:
            headline = result.headline
            if result.verdict == "not run":
                measured = f"run `{result.claim.command}`"
            elif headline is not None:
                measured = f"{headline.effect} ({_row_seeds(headline)})"
            else:
                measured = "n/a"
            if result.claim.reference_command:
                contract, reference = (result.verdicts[a][0] for a in ("contract", "reference_code"))
            else:
                contract, reference = result.verdict, "-"
            lines.append(f"| {result.claim.section}: {result.claim.statement} | {measured} | {contract} | {reference} |")
        return "\n".join(lines)


def _verdicts_text(result: ClaimResult) -> str:
    """Each algorithm's verdict in a line (the claim's alone where it compares no AADL algorithm)."""
    if not result.claim.reference_command:
        return f"verdict: {result.verdict}"
    return "; ".join(f"{ALGORITHM_NAMES[a]}: {result.verdicts[a][0]}" for a in claims.ALGORITHMS)


def _statement(result: ClaimResult) -> str:
    text = result.claim.statement
    if result.claim.kind != "experiment":
        text += f" *({result.claim.kind})*"
    if result.incomplete:
        text += " *(preset not complete)*"
    return text


def _verdict_cell(result: ClaimResult, algorithm: str) -> str:
    decided = result.verdicts.get(algorithm, (result.verdict, ""))[0]
    proxy = " (CPU proxy)" if result.proxy and algorithm != "reference_code" and decided != "not run" else ""
    return f"**{decided}**{proxy}"


def _level(row: claims.Row) -> str:
    """The level a counted row's interval was judged at, and that interval where it differs from 95%."""
    if not row.counted or row.effect is None:
        return "-"
    if row.fixed:
        return "(premise)"
    if not row.family:
        return "- (too few seeds)" if row.effect.n < claims.MIN_SEEDS else "-"
    adjusted = row.adjusted_interval()
    if adjusted is None:
        return f"{row.level:.3g}"
    return f"{row.level:.3g}: [{claims._num(adjusted[0])}, {claims._num(adjusted[1])}]"


def _headline(result: ClaimResult) -> str:
    if result.verdict == "not run":
        return f"not run: `{result.claim.command}`"
    row = result.headline
    if row is None:
        return "n/a"
    more = sum(1 for r in result.rows if r.counted and r.algorithm == row.algorithm) - 1
    return f"{row.effect}" + (f" (and {more} more row{'s' if more > 1 else ''})" if more > 0 else "")


def _seeds(result: ClaimResult) -> str:
    row = result.headline
    return _row_seeds(row) if row is not None else "-"


def _row_seeds(row: claims.Row) -> str:
    if row.effect is None:
        return "-"
    return f"{row.effect.n} {'paired' if row.effect.paired else 'unpaired'}"



def _code(text: str) -> str:
    return ", ".join(f"`{part}`" for part in text.split(", "))


def _table(rows: Sequence[MeasureRow]) -> list[str]:
    columns = list(rows[0].values)
    out = ["| directory | configuration | " + " | ".join(columns) + " |", "| " + " | ".join(["---"] * (len(columns) + 2)) + " |"]
    for row in rows:
        out.append(f"| `{row.study}` | {row.label} | " + " | ".join(row.values[c] for c in columns) + " |")
    return out


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def claim_figure(result: ClaimResult) -> Figure | None:
    """Each measured row's effect with its 95% interval (a dot per seed where paired), over
    the claimed region shaded; None when nothing was measured."""
    rows = [row for row in result.rows if row.effect is not None and np.isfinite(row.effect.estimate)]
    if not rows:
        return None
    claim = result.claim
    log = claim.log_scale
    values = [v for row in rows for v in (row.effect.estimate, row.effect.low, row.effect.high, *row.effect.per_seed) if np.isfinite(v)]
    values += [b for b in (claim.region.low, claim.region.high) if np.isfinite(b) and (b > 0 or not log)]
    values = [v for v in values if v > 0] if log else values
    low, high = min(values), max(values)
    if log:
        low, high = low / 1.6, high * 1.6
    else:
        pad = 0.08 * (high - low) or 1.0
        low, high = low - pad, high + pad
    with matplotlib.rc_context(STYLE):
        figure = Figure(figsize=(9.0, 2.2 + 0.6 * len(rows)), layout="constrained")
        axes = figure.add_subplot()
        axes.axvspan(max(claim.region.low, low), min(claim.region.high, high), color="tab:green", alpha=0.12,
                     label=f"claimed: {claim.region}")
        for bound in (claim.region.low, claim.region.high):
            if np.isfinite(bound) and low < bound < high:
                axes.axvline(bound, color="tab:green", linestyle="--", linewidth=1)
        rng = np.random.default_rng(0)  # fixed jitter: the same figure from the same runs
        for index, row in enumerate(rows):
            effect, colour = row.effect, VERDICT_COLOURS.get(row.verdict, "0.3")
            if effect.per_seed:
                seeds = np.asarray(effect.per_seed)
                axes.scatter(seeds, index + rng.uniform(-0.15, 0.15, len(seeds)), s=10, color="0.55", alpha=0.6, zorder=2)
            error = None
            if np.isfinite(effect.low) and np.isfinite(effect.high):
                error = [[effect.estimate - effect.low], [effect.high - effect.estimate]]
            axes.errorbar([effect.estimate], [index], xerr=error, fmt="o", color=colour, capsize=5, markersize=7, zorder=3)
        names = [row.comparison + ("" if row.counted else f" {claims.CONTEXT}") for row in rows]
        axes.set_yticks(range(len(rows)), [textwrap.fill(name, 42) for name in names], fontsize=9)
        axes.set_ylim(len(rows) - 0.5, -0.5)
        if log:
            axes.set_xscale("log")
        axes.set_xlim(low, high)
        axes.set_xlabel("effect: mean and 95% CI over seeds (grey: one seed each)", fontsize=10)
        figure.suptitle(textwrap.fill(f"{claim.section}: {claim.statement}", 90) + f"\n{_verdicts_text(result)}", fontsize=11)
        axes.legend(loc="best", fontsize=8)
    return figure




# --------------------------------------------------------------------------------------------
# The README block
# --------------------------------------------------------------------------------------------


def replace_block(text: str, block: str) -> str:
    """``text`` with what lies between README_BEGIN and README_END replaced by ``block``; a
    text without the markers gets a section holding them at its end."""
    begins, ends = text.count(README_BEGIN), text.count(README_END)
    if begins == ends == 0:
        return text.rstrip("\n") + f"\n\n{README_SECTION}\n\n{README_BEGIN}\n{block}\n{README_END}\n"
    if begins != 1 or ends != 1:
        raise ReportError(f"the README holds {begins} begin and {ends} end markers of the claims block; it needs one of each")
    head, rest = text.split(README_BEGIN)
    old, tail = rest.split(README_END)
    if README_END in head:
        raise ReportError("the README's claims block ends before it begins")
    return f"{head}{README_BEGIN}\n{block}\n{README_END}{tail}"


def read_block(text: str) -> str:
    """What lies between the markers (without them); ReportError if they are not one pair."""
    if text.count(README_BEGIN) != 1 or text.count(README_END) != 1:
        raise ReportError("the README does not hold one claims block")
    return text.split(README_BEGIN)[1].split(README_END)[0].strip("\n")




# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def readme_rows(block: str) -> dict[str, list[str]]:
    """The README block's rows by their first cell (the claim), cells stripped."""
    rows = {}
    for line in block.splitlines():
        if line.startswith("| ") and not line.startswith("| ---"):
            cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
            rows[cells[0]] = cells
    return rows


def check_readme(report: Report, readme_text: str) -> list[str]:
    """The claims the README shows as measured that this report would show as not run."""
    try:
        old = readme_rows(read_block(readme_text))
    except ReportError:
        return []
    lost = []
    for result in report.not_run():
        name = f"{result.claim.section}: {result.claim.statement}"
        cells = old.get(name)
        if cells and len(cells) > 1 and not cells[1].startswith("run `"):
            lost.append(name)
    return lost


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, default=DEFAULT_OUTPUT_ROOT, help=f"output root to read (default: {DEFAULT_OUTPUT_ROOT})")
    parser.add_argument("--out", type=Path, default=DEFAULT_REPORT, help=f"report file; figures go beside it (default: {DEFAULT_REPORT})")
    parser.add_argument("--readme", type=Path, nargs="?", const=README, default=None,
                        help="also rewrite the claims block of this README (default when given bare: the repository's)")
    parser.add_argument("--allow-missing", action="store_true",
                        help="report claims whose runs are absent as not run (and let --readme show them so) instead of refusing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")

    def fail(message: str) -> int:
        print(f"error: {message}", file=sys.stderr)
        return 1

    # Every check comes before anything is written: a wrong tree loses nothing.
    if not args.runs.is_dir():
        return fail(f"--runs {args.runs}: no such directory (the output root of python -m experiments.run, e.g. results/runs, "
                    "or a results bundle)")
    try:
        check_writable_directory(args.out.parent, "--out", given=args.out)
    except RunError as error:
        return fail(str(error).removeprefix("error: "))
    readme = ""
    if args.readme is not None:  # a README whose block cannot be replaced stops before any work
        readme = args.readme.read_text() if args.readme.exists() else ""
        try:
            replace_block(readme, "")
        except ReportError as error:
            return fail(f"{args.readme}: {error}")
    try:
        with bundle.opened(args.runs) as (tree, shown):
            return _report(args, readme, Report(tree, shown), fail)
    except bundle.BundleError as error:
        return fail(str(error))


def _report(args: argparse.Namespace, readme: str, report: Report, fail: Callable[[str], int]) -> int:
    """Check ``report`` against what it would replace, then write it (and the README block)."""
    missing = report.not_run()
    if len(missing) == len(report.claims):
        return fail(f"--runs {args.runs}: no run there matches any claim (expected e.g. "
                    f"{args.runs / 'graduate_admissions' / 'fig1'}); nothing written")
    if missing and not args.allow_missing:
        return fail(f"--runs {args.runs} holds no runs for {len(missing)} claim(s) "
                    f"({', '.join(r.claim.key for r in missing)}); run them or pass --allow-missing to report them as not run; "
                    "nothing written")
    if args.readme is not None and not args.allow_missing:
        lost = check_readme(report, readme)
        if lost:
            return fail(f"{args.readme}: would replace measured rows with \"not run\" ({'; '.join(lost)}); "
                        "pass --allow-missing to do so; nothing written")
    for path in report.write(args.out):
        print(f"wrote {path}")
    if args.readme is not None:
        args.readme.write_text(replace_block(readme, report.readme_block(args.out, args.readme)))
        print(f"wrote {args.readme} (claims block)")
    counts = report.counts()
    print(f"{len(report.claims)} claims: " + ", ".join(f"{counts[v]} {v}" for v in claims.VERDICTS if counts[v]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
