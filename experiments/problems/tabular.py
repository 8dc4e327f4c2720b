"""Tabular data files a problem reads: what a valid copy holds, checked on load, fetched.

A problem declares its files as :class:`TabularDataset` values (``Problem.datasets``, e.g.
``experiments/problems/graduate_admissions/data.py``) and loads them with
:func:`load_table`; ``python -m experiments.data`` (the command line) downloads and
verifies them. Files live at ``<data root>/<data set name>/<file name>``. Loading checks
shape, column names and value ranges, and says which file is wrong, what is wrong and how
to get the right one. A download is verified further by a checksum of the parsed values, so
line endings and header spacing cannot change it but a different file cannot pass either.

This module sits below the problems and imports none of them (the command line, which lists
every problem's files, imports them).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from experiments.errors import DatasetError, HarnessError, check_writable_directory

#: What a download may be fetched from (``--url``).
URL_SCHEMES = ("https", "http", "ftp", "file")


@dataclass(frozen=True)
class TabularDataset:
    name: str  # directory under the data root, and the name on the command line
    filename: str
    title: str
    source: str  # where a person can get the file by hand
    urls: tuple[str, ...]  # public mirrors tried in order by `download`
    columns: tuple[str, ...]  # header names after stripping spaces, in file order
    dropped: tuple[str, ...]  # columns read but not used (e.g. a row number)
    target: str
    rows: int
    ranges: dict[str, tuple[float, float]]  # inclusive valid range per used column
    checksum: str  # values_checksum of the published file
    known_impostors: dict[int, str] = field(default_factory=dict)  # row count -> what it is

    @property
    def features(self) -> tuple[str, ...]:
        return tuple(c for c in self.columns if c not in self.dropped and c != self.target)

    def path(self, root: Path | str) -> Path:
        return Path(root) / self.name / self.filename




@dataclass(frozen=True)
class Table:
    features: np.ndarray  # float64, rows x len(spec.features)
    target: np.ndarray  # float64, rows
    path: Path
    checksum: str
    published: bool  # the values are those of the published file


def values_checksum(frame: pd.DataFrame, spec: TabularDataset) -> str:
    """SHA-256 of the used columns' values, each written with 6 decimals.

    Computed on parsed numbers, so CRLF/LF, header spacing and float formatting ("8" vs
    "8.0") do not change it; any changed, added, removed or reordered value does.
    """
    used = [c for c in spec.columns if c not in spec.dropped]
    text = "\n".join(",".join(f"{x:.6f}" for x in row) for row in frame[used].to_numpy(float))
    return hashlib.sha256(text.encode()).hexdigest()


def read_table(path: Path | str, spec: TabularDataset) -> pd.DataFrame:
    """Read and check ``path`` as ``spec``; raise :class:`DatasetError` naming what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise _dataset_error(spec, path, "the file does not exist")
    try:
        frame = pd.read_csv(path, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise _dataset_error(spec, path, f"it cannot be read as CSV ({error})") from None
    # The published file has trailing spaces in two headers ("LOR ", "Chance of Admit ").
    frame.columns = [str(c).strip() for c in frame.columns]

    missing = [c for c in spec.columns if c not in frame.columns]
    unexpected = [c for c in frame.columns if c not in spec.columns]
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"missing column(s) {missing}")
        if unexpected:
            problems.append(f"unexpected column(s) {unexpected}")
        raise _dataset_error(spec, path, "; ".join(problems))

    if len(frame) != spec.rows:
        what = f"it has {len(frame)} data rows, expected {spec.rows}"
        if len(frame) in spec.known_impostors:
            what += f": this looks like {spec.known_impostors[len(frame)]}"
        elif len(frame) < spec.rows:
            what += ": the file looks truncated"
        raise _dataset_error(spec, path, what)

    used = [c for c in spec.columns if c not in spec.dropped]
    numbers = frame[used].apply(pd.to_numeric, errors="coerce")
    bad = numbers.isna()
    if bad.to_numpy().any():
        row, column = next(zip(*np.nonzero(bad.to_numpy())))
        raise _dataset_error(
            spec,
            path,
            f"{int(bad.to_numpy().sum())} missing or non-numeric value(s), the first in "
            f"column {used[column]!r} of data row {row + 1}",
        )
    for column, (low, high) in spec.ranges.items():
        values = numbers[column]
        outside = values[(values < low) | (values > high)]
        if len(outside):
            raise _dataset_error(
                spec,
                path,
                f"column {column!r} has {len(outside)} value(s) outside [{low}, {high}], "
                f"e.g. {outside.iloc[0]!r} in data row {outside.index[0] + 1}",
            )
    frame[used] = numbers
    return frame


def load_table(root: Path | str, spec: TabularDataset) -> Table:
    """The checked features and target of ``spec`` under the data root ``root``."""
    path = spec.path(root)
    frame = read_table(path, spec)
    checksum = values_checksum(frame, spec)
    return Table(
        features=frame[list(spec.features)].to_numpy(np.float64),
        target=frame[spec.target].to_numpy(np.float64),
        path=path,
        checksum=checksum,
        published=checksum == spec.checksum,
    )


def download(spec: TabularDataset, root: Path | str, *, urls: tuple[str, ...] | None = None, force: bool = False) -> Path:
    """Fetch ``spec`` into ``root``, verified by row count, columns and checksum.

    An existing file that passes verification is kept unless ``force``. The file is written
    to a temporary name and renamed, so an interrupted download leaves nothing behind; it
    gets the mode the umask gives any new file, so other users of a shared data root can
    read it. Raises DatasetError (a URL that is not one, a root that cannot be written,
    every mirror failing) before anything is left behind.
    """
    for url in urls or ():
        check_url(url)
    target = spec.path(root)
    if target.exists() and not force:
        try:
            verify(spec, root)
            return target
        except DatasetError:
            pass  # replace a wrong or damaged file
    try:
        check_writable_directory(root, "--root")  # download's command line names it so
    except HarnessError as error:
        raise DatasetError(str(error)) from None
    failures = []
    for url in urls or spec.urls:
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                payload = response.read()
        except OSError as error:
            failures.append(f"{url}: {error}")
            continue
        temp = target.with_name(f".download-{os.getpid()}-{secrets.token_hex(4)}.csv")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            # os.open applies the umask to 0o666, as open() does; mkstemp would give 0o600.
            with os.fdopen(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as out:
                out.write(payload)
            _verify_file(spec, temp)
            os.replace(temp, target)
            return target
        except DatasetError as error:
            failures.append(f"{url}: {str(error).splitlines()[0]}")
        except OSError as error:
            raise DatasetError(f"cannot write {target}: {error.strerror or error}") from None
        finally:
            temp.unlink(missing_ok=True)
    raise DatasetError(
        f"could not download {spec.filename}:\n  " + "\n  ".join(failures)
        + f"\nDownload it by hand from {spec.source} and place it at {target}."
    )


def check_url(url: str) -> str:
    """Raise DatasetError unless ``url`` is an address ``download`` can fetch."""
    if urllib.parse.urlsplit(url).scheme not in URL_SCHEMES or "://" not in url:
        starts = ", ".join(f"{scheme}://" for scheme in URL_SCHEMES)
        raise DatasetError(f"--url {url!r}: not a URL; give an address starting {starts}")
    return url


def verify(spec: TabularDataset, root: Path | str) -> Path:
    """Check the file under ``root`` completely, checksum included; return its path."""
    path = spec.path(root)
    _verify_file(spec, path)
    return path


def _verify_file(spec: TabularDataset, path: Path) -> None:
    checksum = values_checksum(read_table(path, spec), spec)
    if checksum != spec.checksum:
        raise _dataset_error(
            spec, path, f"its values differ from the published file (checksum {checksum[:12]}...)"
        )


def _dataset_error(spec: TabularDataset, path: Path, what: str) -> DatasetError:
    root = path.parent.parent
    return DatasetError(
        f"{path}: {what}.\n"
        f"Expected {spec.title}: {spec.rows} data rows with columns {list(spec.columns)}.\n"
        f"Get it with:  python -m experiments.data download {spec.name} --root {root}\n"
        f"or download {spec.filename} from {spec.source} and place it at {path}.\n"
        "The data root is the config key data.root (default: $AADL_DATA_ROOT, else ./data)."
    )
