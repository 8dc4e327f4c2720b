"""The harness's errors and the small checks that raise them.

Every error here carries a message a user can act on, and survives pickling: multirun
launchers (joblib, submitit) send a worker's exception to the parent process, where an
exception whose ``__init__`` takes other arguments than ``args`` cannot be rebuilt and
turns into an unrelated ``TypeError``. This module imports nothing from the harness, so
any module may use it.
"""

from __future__ import annotations

import difflib
import errno
import os
from pathlib import Path
from typing import Any, Iterable


class HarnessError(Exception):
    """Base class: an error whose message is the whole story (no traceback needed)."""


class ConfigError(HarnessError, ValueError):
    """An invalid configuration value; the message starts with the dotted config key."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.detail = message
        super().__init__(f"{key}: {message}")

    def __reduce__(self):
        return (type(self), (self.key, self.detail))


class DatasetError(HarnessError):
    """A data file is missing or is not the expected one; the message says how to fix it."""


class RunError(HarnessError):
    """The run cannot go ahead on this machine (output not writable, disk full, no GPU,
    not enough memory); the message names the cause and what to do."""


def require(ok: bool, key: str, message: str, value: Any) -> None:
    """Raise :class:`ConfigError` for ``key`` unless ``ok``; ``message`` states the valid range."""
    if not ok:
        raise ConfigError(key, f"{message}, got {value!r}")


def check_writable_directory(path: Path | str, option: str, given: Path | str | None = None) -> Path:
    """Raise :class:`RunError` naming ``option`` (and ``given``, its value where that is a
    file in ``path``) unless files can be created in the directory ``path``, or where it does
    not exist yet in its nearest existing ancestor, where it would be made; returns that
    directory. A command checks its output before its work, not after it."""
    path = Path(path)
    given = path if given is None else given
    existing = path.absolute()
    while not existing.exists():
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(existing))
        probe = existing / f".aadl-write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as error:
        raise RunError(
            f"{option}={given}: cannot write to {existing} ({error.strerror or error}); "
            f"choose a writable {'directory' if given == path else 'place'} for {option}"
        ) from None
    return existing


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """" (did you mean 'x'?)" for the closest of ``known`` to ``name``, else "": among the
    keys of the same section first (by their last part), then among all."""
    known = list(known)
    parent, _, leaf = name.rpartition(".")
    siblings = {k.rpartition(".")[2]: k for k in known if k.rpartition(".")[0] == parent}
    close = difflib.get_close_matches(leaf, list(siblings), n=1, cutoff=0.6)
    if close:
        return f" (did you mean {siblings[close[0]]!r}?)"
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown_key(key: str, known: Iterable[str]) -> ConfigError:
    """The error for a config key that nothing reads."""
    known = sorted(known)
    return ConfigError(key, f"unknown key{did_you_mean(key, known)}; a typo would otherwise be silently ignored")
