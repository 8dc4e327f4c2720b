"""Data sets the problems read, checked on load, and a command to fetch them.

Each problem declares its files (``Problem.datasets``, e.g.
``experiments/problems/graduate_admissions/data.py``) with ``experiments.problems.tabular``,
which checks and fetches them; this module is their command line.

    python -m experiments.data download graduate_admissions --root data
    python -m experiments.data verify graduate_admissions --root data
    python -m experiments.data fashion-mnist --root data    (image trees: docs/images.md)
    python -m experiments.data verify-images fashion_mnist --root data

Files live at ``<data root>/<data set name>/<file name>``. The data root comes from the
config (``data.root``, default ``$AADL_DATA_ROOT`` or ``data``). Loading checks shape,
column names and value ranges, and says which file is wrong, what is wrong and how to get
the right one. A download is verified further by a checksum of the parsed values, so line
endings and header spacing cannot change it but a different file cannot pass either.
"""

from __future__ import annotations

import argparse
import os
import sys

from experiments.errors import DatasetError  # noqa: F401  (raised here; callers import it from here too)
# The checks and the download live below the problems (experiments.problems.tabular), which
# declare their files with them; this module, the command line, imports the problems.
from experiments.problems.tabular import (  # noqa: F401  (callers import them from here too)
    Table,
    TabularDataset,
    download,
    load_table,
    read_table,
    values_checksum,
    verify,
)


def datasets() -> dict[str, TabularDataset]:
    """Every data set a registered problem reads (``Problem.datasets``), by name."""
    from experiments.problems import PROBLEMS

    found: dict[str, TabularDataset] = {}
    for name in PROBLEMS.names():
        for spec in PROBLEMS.get(name).datasets:
            found[spec.name] = spec
    return found


def main(argv: list[str] | None = None) -> int:
    known = datasets()
    parser = argparse.ArgumentParser(prog="python -m experiments.data", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for command, help_text in (("download", "fetch and verify a data set"), ("verify", "check a data set already on disk")):
        sub = commands.add_parser(command, help=help_text)
        sub.add_argument("dataset", choices=sorted(known))
        sub.add_argument("--root", default=os.environ.get("AADL_DATA_ROOT", "data"), help="data root (default: $AADL_DATA_ROOT or ./data)")
        if command == "download":
            sub.add_argument("--url", action="append", help="fetch from this URL instead of the built-in mirrors (repeatable)")
            sub.add_argument("--force", action="store_true", help="download even if a verified file is present")
    from experiments.problems.images.commands import add_commands

    add_commands(commands)  # fashion-mnist, verify-images
    args = parser.parse_args(argv)
    if hasattr(args, "run"):
        return args.run(args)
    spec = known[args.dataset]
    try:
        if args.command == "download":
            path = download(spec, args.root, urls=tuple(args.url) if args.url else None, force=args.force)
        else:
            path = verify(spec, args.root)
    except DatasetError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{path}: ok ({spec.rows} rows, checksum verified)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
