"""A results bundle: the finished runs' small files, compact enough to commit, that the claims
report reads as it reads the runs themselves.

    python -m experiments.analysis.bundle [--runs results/runs] [--out results/bundle]

The runs behind a committed report are git-ignored (checkpoints and models are large), so
the report could not be regenerated from the repository. The bundle keeps what the report
and the figures read and nothing else: for every run directory under ``--runs`` (finished,
unfinished or damaged, so the counts of left-out runs agree), its ``meta.json`` (the
provenance: commit and dirty flag of each segment, start and end dates, host, torch's kernel
level, budget, seed group), ``metrics.csv`` (the curves), ``COMPLETE`` and ``config.yaml``,
at its path under ``--runs``, in ``runs.tar.gz``; ``summary.csv.gz`` lists one row per run
(its status, configuration, provenance and final metrics) for a reader without this code;
``bundle.json`` records the root the runs were read from. Both archives are written with
fixed times and owners, so the same runs give the same bytes.

``python -m experiments.report --runs results/bundle`` (any directory holding a bundle) reads
it through :func:`opened`, which unpacks it into a temporary directory; the report names the
recorded root, so its text is the one the runs themselves give. ``--unpack BUNDLE --runs DIR``
writes the run directories back under an empty DIR for every other reader (the figures:
``python -m experiments.figures fig1 --results DIR/graduate_admissions/fig1``).
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Iterator

import pandas as pd

from experiments.analysis import aggregate

ARCHIVE = "runs.tar.gz"
SUMMARY = "summary.csv.gz"
MANIFEST = "bundle.json"
#: The files of a run directory a reader needs (aggregate.RUN_FILES).
KEPT = aggregate.RUN_FILES


class BundleError(Exception):
    """A bundle cannot be written or read (the message says why)."""


def is_bundle(path: Path | str) -> bool:
    return (Path(path) / ARCHIVE).is_file() and (Path(path) / MANIFEST).is_file()


def _gzip(data: bytes) -> bytes:
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0, compresslevel=9) as handle:
        handle.write(data)
    return buffer.getvalue()


def write(runs: Path | str, out: Path | str) -> list[Path]:
    """The bundle of every run directory under ``runs``, written into ``out``; returns the
    files written."""
    runs, out = Path(runs), Path(out)
    if not runs.is_dir():
        raise BundleError(f"--runs {runs}: no such directory")
    found = aggregate.find_run_dirs(runs)
    if not found:
        raise BundleError(f"--runs {runs}: no run directories there")
    tar_bytes = io.BytesIO()
    rows = []
    with tarfile.open(fileobj=tar_bytes, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for directory in found:
            relative = directory.relative_to(runs) if directory.is_relative_to(runs) else Path(directory.name)
            for name in KEPT:
                path = directory / name
                if not path.is_file():
                    continue
                data = path.read_bytes()
                info = tarfile.TarInfo(str(relative / name))
                info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
                archive.addfile(info, io.BytesIO(data))
            rows.append(_summary_row(directory, relative))
    out.mkdir(parents=True, exist_ok=True)
    files = {ARCHIVE: _gzip(tar_bytes.getvalue()),
             SUMMARY: _gzip(pd.DataFrame(rows).to_csv(index=False).encode()),
             MANIFEST: (json.dumps({"root": str(runs), "runs": len(found)}, indent=2) + "\n").encode()}
    written = []
    for name, data in files.items():
        path = out / name
        temporary = path.with_name(f".{name}.tmp")
        temporary.write_bytes(data)
        temporary.replace(path)
        written.append(path)
    return written


def _summary_row(directory: Path, relative: Path) -> dict:
    """One run's status, configuration, provenance and final metrics, as flat columns."""
    row: dict = {"run": str(relative), "kind": aggregate.check_run(directory).kind}
    try:
        meta = aggregate.read_meta(directory)
    except (aggregate.ResultsError, OSError, ValueError):
        return row
    git = meta.get("git") or {}
    budget = meta.get("budget") or {}
    row.update({key: meta.get(key) for key in ("status", "experiment", "variant", "method", "seed", "config_id", "host",
                                                  "cpu_capability", "gpu_model", "started", "ended")})
    row.update({"commit": git.get("commit"), "dirty": git.get("dirty"), "budget_unit": budget.get("unit"),
                "budget_total": budget.get("total"), "seed_group": json.dumps(meta.get("seed_group")),
                "resumed": len(meta.get("resumed") or ())})
    final = meta.get("final") if isinstance(meta.get("final"), dict) else {}
    row.update({f"final_{key}": value for key, value in final.items() if key.startswith(("val_", "train_")) or key == "step"})
    return row


@contextlib.contextmanager
def opened(path: Path | str) -> Iterator[tuple[Path, str | None]]:
    """(a directory of run directories, the root to name it by): ``path`` itself where it
    is a run tree (None), else its bundle unpacked into a temporary directory and the root
    the bundle was made from."""
    path = Path(path)
    if not is_bundle(path):
        yield path, None
        return
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        with tempfile.TemporaryDirectory(prefix="aadl-bundle-") as directory:
            with tarfile.open(path / ARCHIVE, mode="r:gz") as archive:
                archive.extractall(directory, filter="data")
            yield Path(directory), str(manifest["root"])
    except (OSError, tarfile.TarError, ValueError, KeyError) as error:
        raise BundleError(f"{path}: not a readable results bundle ({error})") from None


def unpack(bundle: Path | str, runs: Path | str) -> int:
    """The bundle's run directories written under ``runs`` (which must not hold runs yet:
    nothing is overwritten), as they lay under the root they were bundled from, so that
    every reader (figures, status, the report) reads them as it read the originals. Returns
    the number of run directories."""
    bundle, runs = Path(bundle), Path(runs)
    if not is_bundle(bundle):
        raise BundleError(f"{bundle}: not a results bundle (no {ARCHIVE} and {MANIFEST})")
    if runs.exists() and aggregate.find_run_dirs(runs):
        raise BundleError(f"--runs {runs}: already holds run directories; unpack into an empty or new folder")
    runs.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(bundle / ARCHIVE, mode="r:gz") as archive:
            archive.extractall(runs, filter="data")
    except (OSError, tarfile.TarError) as error:
        raise BundleError(f"{bundle}: not a readable results bundle ({error})") from None
    return len(aggregate.find_run_dirs(runs))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.analysis.bundle", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, default=Path("results/runs"), help="output root to bundle, or to unpack into (default: results/runs)")
    parser.add_argument("--out", type=Path, default=Path("results/bundle"), help="bundle directory (default: results/bundle)")
    parser.add_argument("--unpack", type=Path, metavar="BUNDLE", help="write BUNDLE's run directories under --runs instead")
    args = parser.parse_args(argv)
    try:
        if args.unpack is not None:
            print(f"unpacked {unpack(args.unpack, args.runs)} run directories into {args.runs}")
            return 0
        written = write(args.runs, args.out)
    except (BundleError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path} ({path.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
