"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package as an ImageFolder tree.

The package puts the four IDX files of Zalando's release (70,000 real 28x28 grey images in
10 classes) under ``/usr/share/datasets/fashion-mnist/``, gzipped. :func:`build_tree`
parses them (numpy, no download) and writes::

    <out>/train/<class>/<index>.png   images of the official training split
    <out>/val/<class>/<index>.png     images of the official test split
    <out>/manifest.json               arguments, source checksums, counts, tree checksum

so that the ImageNet pipeline (``experiments.problems.images.data``) reads it unchanged.
``<index>`` is the image's position in its official split (5 digits, so names sort
numerically), which keeps every file traceable to the source. Class folders are named
``<label>_<name>`` so that their sorted order is the label order.

Which images a subset holds depends only on (per-class count, seed): each class's indices
are permuted by a generator seeded from (seed, split, label) and the first ``n`` kept, so a
smaller subset is contained in a larger one of the same seed. The tree is written to a
hidden temporary directory beside ``<out>`` and renamed into place, so an interrupted build
leaves no partial tree; a second build with the same arguments and source is a no-op, one
with other arguments is refused unless ``overwrite``.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from experiments.errors import DatasetError, require

DEFAULT_SOURCE = Path("/usr/share/datasets/fashion-mnist")
INSTALL_HINT = "apt-get install dataset-fashion-mnist"
#: What the image problems append to a data error about this tree.
HOW_TO = "run python -m experiments.data fashion-mnist"
DEFAULT_NAME = "fashion_mnist"  # directory under the data root
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1

#: Folder names in label order (labels 0..9 of the release; sorted order = label order).
CLASSES = (
    "0_tshirt_top",
    "1_trouser",
    "2_pullover",
    "3_dress",
    "4_coat",
    "5_sandal",
    "6_shirt",
    "7_sneaker",
    "8_bag",
    "9_ankle_boot",
)
#: Per-channel pixel mean and standard deviation of the 60,000 training images (in [0, 1]),
#: measured on the package's files; the loaders give 3 equal channels (RGB of a grey image).
MEAN = (0.2860, 0.2860, 0.2860)
STD = (0.3530, 0.3530, 0.3530)

#: split -> (images file, labels file) of the release; each may also be gzipped (".gz").
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_SPLIT_CODES = {"train": 0, "val": 1}  # part of the selection seed
_IDX_UBYTE = 0x08  # IDX type code of unsigned bytes, the only one the release uses
_GZIP_MAGIC = b"\x1f\x8b"


def _source_error(path: Path, what: str) -> DatasetError:
    return DatasetError(
        f"{path}: {what}; Fashion-MNIST's IDX files come from Debian's package "
        f"({INSTALL_HINT}, into {DEFAULT_SOURCE}), or pass --source DIR holding them"
    )


def read_idx(path: Path | str, *, ndim: int) -> np.ndarray:
    """The unsigned-byte array of the IDX file ``path`` (gzipped or not), of ``ndim`` dims.

    IDX: two zero bytes, a type code (0x08: unsigned byte), the number of dimensions, each
    dimension as a big-endian int32, then the values in C order. The header and the exact
    payload size are checked, so a truncated, padded or foreign file is refused.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == _GZIP_MAGIC:
            raw = gzip.decompress(raw)
    except FileNotFoundError:
        raise _source_error(path, "the file does not exist") from None
    except (OSError, EOFError) as error:  # unreadable, or a damaged gzip stream
        raise _source_error(path, f"it cannot be read ({error})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise _source_error(path, f"not an IDX file (magic number {raw[:4].hex() or 'empty'})")
    if raw[2] != _IDX_UBYTE:
        raise _source_error(path, f"IDX type code 0x{raw[2]:02x}, expected 0x08 (unsigned bytes)")
    if raw[3] != ndim:
        raise _source_error(path, f"{raw[3]} dimension(s) in the IDX header, expected {ndim}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise _source_error(path, "the IDX header is truncated")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) + header
    if len(raw) != expected:
        raise _source_error(
            path, f"{len(raw)} bytes after decompression, the header {shape} needs {expected}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _source_file(source: Path, stem: str) -> Path:
    """The release's file ``stem`` in ``source``: gzipped as Debian ships it, or not."""
    for candidate in (source / f"{stem}.gz", source / stem):
        if candidate.is_file():
            return candidate
    return source / f"{stem}.gz"


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8, n x height x width
    labels: np.ndarray  # uint8, n, in 0..9
    checksum: str  # SHA-256 of the parsed values (shape included), independent of gzip


def read_split(source: Path | str, split: str) -> Split:
    """The checked images and labels of ``split`` ("train" or "val": the test split)."""
    source = Path(source)
    images_path, labels_path = (_source_file(source, stem) for stem in FILES[split])
    return _read_split_cached(str(images_path), str(labels_path), _stamp(images_path), _stamp(labels_path))


def _stamp(path: Path) -> tuple[int, int]:
    """(size, mtime) of ``path``: a changed file is parsed again, not taken from the cache."""
    try:
        stat = path.stat()
    except OSError:
        return (-1, -1)
    return (stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _read_split_cached(images_path: str, labels_path: str, *_stamps: Any) -> Split:
    images = read_idx(images_path, ndim=3)
    labels = read_idx(labels_path, ndim=1)
    if len(images) != len(labels):
        raise _source_error(
            Path(labels_path), f"{len(labels)} labels for the {len(images)} images of {images_path}"
        )
    if len(labels) and int(labels.max()) >= len(CLASSES):
        raise _source_error(Path(labels_path), f"label {int(labels.max())} outside 0..{len(CLASSES) - 1}")
    digest = hashlib.sha256()
    for array in (images, labels):
        digest.update(repr(array.shape).encode())
        digest.update(array.tobytes())
    return Split(images=images, labels=labels, checksum=digest.hexdigest())


def select(labels: np.ndarray, per_class: int | None, *, seed: int, split: str) -> np.ndarray:
    """Sorted indices of ``per_class`` images of each class (all where None).

    A function of (labels, per_class, seed, split) only; for one seed a smaller subset is
    contained in a larger one (each class's permutation is cut at ``per_class``).
    """
    chosen = []
    for label in range(len(CLASSES)):
        members = np.flatnonzero(labels == label)
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_SPLIT_CODES[split], label)))
        chosen.append(rng.permutation(members)[: len(members) if per_class is None else per_class])
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def encode_png(pixels: np.ndarray, size: int | None) -> bytes:
    """PNG bytes of one grey image, resized bilinearly to ``size`` x ``size`` if given."""
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(pixels))
    if size is not None and image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass(frozen=True)
class Tree:
    root: Path
    manifest: dict[str, Any]
    built: bool  # False: the tree was already there with the same arguments and source


def read_manifest(root: Path | str) -> dict[str, Any] | None:
    """The manifest of the tree at ``root``, or None where there is none (or not ours).
    ``manifest["tree_sha256"]`` identifies the tree's content (paths and PNG bytes)."""
    try:
        manifest = json.loads((Path(root) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("dataset") == "fashion-mnist" else None


def build_tree(
    out: Path | str,
    *,
    source: Path | str = DEFAULT_SOURCE,
    train_per_class: int | None = None,
    val_per_class: int | None = None,
    size: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> Tree:
    """Write (or find) the tree at ``out`` (see the module docstring).

    ``train_per_class`` / ``val_per_class``: images per class of each split (None: all,
    6,000 and 1,000); ``size``: side of the written images (None: the source's 28; other
    sizes are bilinear resizes, e.g. 32, or 224 for the ImageNet pipeline). Raises
    ConfigError for a value out of range, DatasetError for a bad source or a tree built
    otherwise (unless ``overwrite``).
    """
    out = Path(out)
    source = Path(source)
    require(isinstance(seed, int) and seed >= 0, "seed", "must be an integer >= 0", seed)
    require(size is None or (isinstance(size, int) and 1 <= size <= 4096), "size", "must be an integer in [1, 4096] (pixels)", size)
    splits = {split: read_split(source, split) for split in FILES}
    sides = {split.images.shape[1:] for split in splits.values()}
    if len(sides) != 1 or len(next(iter(sides))) != 2 or next(iter(sides))[0] != next(iter(sides))[1]:
        raise _source_error(source, f"image shapes {sorted(sides)} differ or are not square")
    native = int(next(iter(sides))[0])
    counts_wanted = {}
    for split, key, per_class in (("train", "train_per_class", train_per_class), ("val", "val_per_class", val_per_class)):
        available = np.bincount(splits[split].labels, minlength=len(CLASSES))
        fewest = int(available.min())
        require(
            per_class is None or (isinstance(per_class, int) and 1 <= per_class <= fewest),
            key,
            f"must be an integer in [1, {fewest}] (the images per class of the {split} split) or all",
            per_class,
        )
        # "All" and an explicit count of all images are the same tree.
        counts_wanted[key] = None if per_class is None or (available == per_class).all() else per_class
    arguments = {**counts_wanted, "size": size or native, "seed": seed}
    source_checksums = {split: data.checksum for split, data in splits.items()}

    existing = _existing(out, arguments, source_checksums, overwrite)
    if existing is not None:
        return existing

    out.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        manifest = _write(temp, splits, arguments, source_checksums, source)
        _move_into_place(temp, out, overwrite)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    if read_manifest(out) != manifest:  # another process won the rename with other arguments
        existing = _existing(out, arguments, source_checksums, overwrite=False)
        return existing if existing is not None else Tree(out, manifest, built=True)
    return Tree(out, manifest, built=True)


def _existing(out: Path, arguments: dict, source_checksums: dict, overwrite: bool) -> Tree | None:
    """The tree already at ``out`` if it is the one asked for; None if ``out`` is free (or
    may be replaced); DatasetError if it holds something else and ``overwrite`` is off."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return None
    manifest = read_manifest(out)
    if manifest is not None and manifest.get("arguments") == arguments and manifest.get("source") == source_checksums:
        damage = _damage(out, manifest)
        if damage is None:
            return Tree(out, manifest, built=False)
        if not overwrite:
            raise DatasetError(f"{out}: {damage}; rebuild it with --overwrite (build_tree(..., overwrite=True))")
        return None
    if overwrite:
        return None
    if manifest is None:
        what = "exists and is not a tree built by this command (no readable manifest.json)"
    elif manifest.get("arguments") != arguments:
        what = f"holds a tree built with {_describe(manifest.get('arguments'))}, not {_describe(arguments)}"
    else:
        what = "was built from other source files (their checksums differ)"
    raise DatasetError(
        f"{out} {what}: pass --overwrite to replace it, or --name NAME to build another tree beside it"
    )


def _describe(arguments: Any) -> str:
    if not isinstance(arguments, dict):
        return repr(arguments)
    return ", ".join(f"{key}={'all' if value is None else value}" for key, value in sorted(arguments.items()))


def _damage(out: Path, manifest: dict) -> str | None:
    """What differs between the files under ``out`` and the manifest's counts (None: none)."""
    for split, counts in manifest.get("counts", {}).items():
        for name, count in counts.items():
            folder = out / split / name
            found = sum(1 for entry in os.scandir(folder) if entry.name.endswith(".png")) if folder.is_dir() else 0
            if found != count:
                return f"{folder} holds {found} images, its manifest says {count} (files were removed or added)"
    return None


def _write(temp: Path, splits: dict[str, Split], arguments: dict, source_checksums: dict, source: Path) -> dict:
    size = arguments["size"]
    native = splits["train"].images.shape[1]
    tree = hashlib.sha256()
    counts: dict[str, dict[str, int]] = {}
    for split, data in splits.items():
        indices = select(data.labels, arguments[f"{split}_per_class"], seed=arguments["seed"], split=split)
        counts[split] = {name: 0 for name in CLASSES}
        for name in CLASSES:
            (temp / split / name).mkdir(parents=True)
        for index in indices:
            name = CLASSES[int(data.labels[index])]
            relative = f"{split}/{name}/{int(index):05d}.png"
            payload = encode_png(data.images[index], None if size == native else size)
            (temp / relative).write_bytes(payload)
            tree.update(f"{relative}\0{hashlib.sha256(payload).hexdigest()}\n".encode())
            counts[split][name] += 1
    manifest = {
        "dataset": "fashion-mnist",
        "format": MANIFEST_FORMAT,
        "arguments": arguments,
        "source": source_checksums,
        "source_dir": str(source),  # where it was read; not compared
        "classes": list(CLASSES),
        "counts": counts,
        "tree_sha256": tree.hexdigest(),
    }
    (temp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return json.loads((temp / MANIFEST).read_text())


def _move_into_place(temp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished tree to ``out``; an old tree (``overwrite``) is moved aside first
    and deleted after, so at no moment does ``out`` hold a mixture of the two."""
    aside = None
    if out.exists():
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        elif overwrite:
            aside = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            os.replace(out, aside / "tree")
    try:
        os.rename(temp, out)
    except OSError:
        if not out.exists():
            raise
        # Another build finished first: keep its tree (the caller compares manifests).
        shutil.rmtree(temp, ignore_errors=True)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
