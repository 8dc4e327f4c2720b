"""The image trees' subcommands of ``python -m experiments.data``.

    python -m experiments.data fashion-mnist [--root R] [--name fashion_mnist]
        [--train-per-class N] [--val-per-class N] [--size S] [--seed K] [--source DIR] [--overwrite]
    python -m experiments.data verify-images NAME [--root R]

Both write or read ``<data root>/<name>/``; the data root is ``--root``, else
``$AADL_DATA_ROOT``, else ``data`` (as the config key ``data.root``). torch is imported only
by ``verify-images``, so building a tree starts quickly.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from experiments.errors import HarnessError, check_writable_directory


def _root_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", default=os.environ.get("AADL_DATA_ROOT", "data"), help="data root (default: $AADL_DATA_ROOT or ./data)")


def _count(text: str) -> int | None:
    return None if text == "all" else int(text)


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Register ``fashion-mnist`` and ``verify-images``; each sets ``run`` (args -> exit code)."""
    from experiments.problems.images import fashion_mnist as fm

    build = commands.add_parser("fashion-mnist", help="write Fashion-MNIST (Debian's dataset-fashion-mnist) as an ImageFolder tree")
    _root_argument(build)
    build.add_argument("--name", default=fm.DEFAULT_NAME, help=f"directory under the data root (default: {fm.DEFAULT_NAME})")
    build.add_argument("--train-per-class", type=_count, default=None, metavar="N", help="training images per class, from the official train split (default: all 6000)")
    build.add_argument("--val-per-class", type=_count, default=None, metavar="N", help="validation images per class, from the official test split (default: all 1000)")
    build.add_argument("--size", type=int, default=None, help="side of the written images in pixels, bilinear (default: 28, the source's)")
    build.add_argument("--seed", type=int, default=0, help="which images a subset holds (default: 0)")
    build.add_argument("--source", type=Path, default=fm.DEFAULT_SOURCE, help=f"directory of the IDX files (default: {fm.DEFAULT_SOURCE})")
    build.add_argument("--overwrite", action="store_true", help="replace a tree built with other arguments")
    build.set_defaults(run=_build)

    verify = commands.add_parser("verify-images", help="check an image tree's layout and decode every image once")
    verify.add_argument("name", help="directory under the data root, e.g. fashion_mnist or imagenet1k")
    _root_argument(verify)
    verify.set_defaults(run=_verify)


def _build(args: argparse.Namespace) -> int:
    from experiments.problems.images import fashion_mnist as fm

    out = Path(args.root) / args.name
    try:
        check_writable_directory(args.root, "--root")
        tree = fm.build_tree(
            out, source=args.source, train_per_class=args.train_per_class, val_per_class=args.val_per_class,
            size=args.size, seed=args.seed, overwrite=args.overwrite,
        )
    except HarnessError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    counts = {split: sum(c.values()) for split, c in tree.manifest["counts"].items()}
    state = "built" if tree.built else "already built with these arguments, unchanged"
    print(f"{tree.root}: {state} (train {counts['train']}, val {counts['val']} images of "
          f"{tree.manifest['arguments']['size']}x{tree.manifest['arguments']['size']} pixels)")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from experiments.problems.images import fashion_mnist as fm
    from experiments.problems.images.data import verify_images

    root = Path(args.root) / args.name
    how_to = fm.HOW_TO if fm.read_manifest(root) is not None else "see docs/images.md"
    try:
        count = verify_images(root, dataset=args.name, how_to=how_to)
    except HarnessError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{root}: ok ({count} images decoded)")
    return 0
