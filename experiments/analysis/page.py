"""One self-contained HTML page of a campaign: the claims report, every figure, and for each
figure what it rests on (runs, seeds, budgets, code versions, hosts, kernel levels, dates).

    python -m experiments.analysis.page --report results/report.md --runs results/runs \\
        --figures results/figures --presets fig1 fig2 --out results/report.html

The workflow's last rule (workflow/Snakefile). Images are embedded (base64), so the page can be
mailed or attached to a ticket as one file. On load the page counts its images that decoded
and its tables into ``<body data-figures=N data-tables=M>``, which the tests read from a real
browser (headless Chromium) to check that the page renders, not only that it was written.
"""

from __future__ import annotations

import argparse
import base64
import html
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from experiments.analysis import aggregate
from experiments.atomic import write_atomically

#: Counts what rendered: images that decoded and tables, as body attributes.
_RENDER_CHECK = """<script>
window.addEventListener("load", function () {
  var images = Array.prototype.filter.call(document.images, function (i) { return i.complete && i.naturalWidth > 0; });
  document.body.setAttribute("data-figures", String(images.length));
  document.body.setAttribute("data-tables", String(document.getElementsByTagName("table").length));
});
</script>"""

_STYLE = """<style>
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 75em; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.5em; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
figure { margin: 2em 0; border-top: 2px solid #ddd; padding-top: 1em; }
figure img, .report img { max-width: 100%; }
code { background: #f5f5f5; padding: 0 0.2em; }
</style>"""


class PageError(Exception):
    """A missing input of the page, in one line."""


@dataclass(frozen=True)
class Provenance:
    """What one preset's figure rests on, read from its runs' meta.json."""

    runs: Counter          # kind ("good", "diverged", "incomplete", "damaged") -> count
    seeds: list[int]
    budgets: list[str]
    code: list[str]        # "commit" or "commit+dirty", every segment's
    hosts: list[str]
    kernels: list[str]     # cpu_capability / gpu_model, every segment's
    dates: tuple[str, str] | None  # first start, last end

    def rows(self) -> list[tuple[str, str]]:
        runs = ", ".join(f"{count} {kind}" for kind, count in sorted(self.runs.items()))
        return [
            ("runs", runs or "none"),
            ("seeds", _compact(self.seeds)),
            ("budgets", ", ".join(self.budgets) or "-"),
            ("code versions", ", ".join(self.code) or "-"),
            ("hosts", ", ".join(self.hosts) or "-"),
            ("kernel levels", ", ".join(self.kernels) or "-"),
            ("dates", " to ".join(self.dates) if self.dates else "-"),
        ]


def _compact(seeds: Sequence[int]) -> str:
    from experiments.seed_groups import compact_seeds

    return compact_seeds(sorted(set(seeds))) or "-"


def _code_text(git: object) -> str | None:
    if not isinstance(git, dict) or not git.get("commit"):
        return None
    return f"{str(git['commit'])[:12]}{'+dirty' if git.get('dirty') else ''}"


def provenance(folder: Path) -> Provenance:
    """Every run directory under ``folder``, classified as the figures classify it."""
    kinds: Counter = Counter()
    seeds, budgets, code, hosts, kernels, starts, ends = [], set(), set(), set(), set(), [], []
    for directory in aggregate.find_run_dirs(folder) if folder.is_dir() else []:
        check = aggregate.check_run(directory)
        kinds[check.kind] += 1
        meta = check.meta or {}
        if not meta:
            continue
        if isinstance(meta.get("seed"), int):
            seeds.append(meta["seed"])
        budget = meta.get("budget") or {}
        if budget.get("total"):
            budgets.add(f"{budget['total']:,} {budget.get('unit', '')}s")
        for segment in [meta, *(meta.get("resumed") or [])]:
            if _code_text(segment.get("git")):
                code.add(_code_text(segment.get("git")))
            if segment.get("host"):
                hosts.add(str(segment["host"]))
            for key in ("cpu_capability", "gpu_model"):
                if segment.get(key):
                    kernels.add(str(segment[key]))
        if meta.get("started"):
            starts.append(str(meta["started"]))
        if meta.get("ended"):
            ends.append(str(meta["ended"]))
    dates = (min(starts), max(ends or starts)) if starts else None
    return Provenance(kinds, seeds, sorted(budgets), sorted(code), sorted(hosts), sorted(kernels), dates)


def preset_folder(preset: str) -> Path:
    """``<experiment>/<output.name>`` of a paper preset: where its runs are under an output root."""
    from experiments.compose import compose

    config = compose(f"+paper={preset}")
    return Path(str(config.experiment)) / str(config.output.name)


def _image(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def _markdown(text: str, base: Path) -> str:
    """Markdown to HTML (tables included), with the images it names embedded from ``base``."""
    import markdown

    body = markdown.markdown(text, extensions=["tables", "fenced_code"])

    def embed(match: re.Match) -> str:
        source = html.unescape(match.group(2))
        path = (base / source) if not source.startswith(("http:", "https:", "data:")) else None
        if path is None or not path.is_file():
            return match.group(0)
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        return f'{match.group(1)}data:image/png;base64,{data}{match.group(3)}'

    return re.sub(r'(<img[^>]*\bsrc=")([^"]+)(")', embed, body)


def _table(rows: Sequence[tuple[str, str]]) -> str:
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<table class=\"provenance\">{cells}</table>"


def build(report: Path, runs: Path, figures: Path, presets: Sequence[str]) -> str:
    """The page's HTML."""
    from experiments.analysis.figures import FIGURES

    if not report.is_file():
        raise PageError(f"no report at {report}: run python -m experiments.report first")
    sections = []
    for preset in presets:
        image = figures / f"{preset}.png"
        if not image.is_file():
            raise PageError(f"no figure {image}: run python -m experiments.figures first")
        folder = runs / preset_folder(preset)
        summary = figures / f"{preset}_summary.md"
        title = FIGURES[preset].title if preset in FIGURES else preset
        parts = [f"<figure id=\"{html.escape(preset)}\"><h2>{html.escape(title)}</h2>", _image(image), "<figcaption>"]
        if summary.is_file():
            parts.append(_markdown(summary.read_text(), figures))
        parts.append(f"<h3>What this figure rests on</h3><p>runs under <code>{html.escape(str(folder))}</code></p>")
        parts.append(_table(provenance(folder).rows()))
        parts.append("</figcaption></figure>")
        sections.append("".join(parts))
    claims = _markdown(report.read_text(), report.parent)
    return "\n".join([
        "<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">",
        "<title>AADL reproduction: claims and figures</title>", _STYLE, "</head><body>",
        "<h1>AADL reproduction: claims and figures</h1>",
        f"<p>Runs read from <code>{html.escape(str(runs))}</code>; the claims report is "
        f"<code>{html.escape(str(report))}</code>, shown in full below the figures.</p>",
        *sections,
        f"<section class=\"report\">{claims}</section>",
        _RENDER_CHECK, "</body></html>",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.analysis.page", description=__doc__.split("\n\n")[0])
    parser.add_argument("--report", type=Path, required=True, help="the claims report (python -m experiments.report)")
    parser.add_argument("--runs", type=Path, required=True, help="the output root the runs are under")
    parser.add_argument("--figures", type=Path, required=True, help="the folder of the figures (python -m experiments.figures)")
    parser.add_argument("--presets", nargs="+", required=True, help="the presets whose figures the page shows")
    parser.add_argument("--out", type=Path, required=True, help="the page to write")
    args = parser.parse_args(argv)
    try:
        page = build(args.report, args.runs, args.figures, args.presets)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(args.out, page)
    except (PageError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
