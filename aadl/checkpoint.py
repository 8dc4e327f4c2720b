"""What a checkpoint of AndersonAcceleration must hold, and which settings it binds.

``load_state_dict`` runs these checks before it changes anything, so that a checkpoint
that is incomplete, or was saved by an optimizer whose state means something else here,
fails with a message naming the key or the setting instead of loading into a run that
is then silently wrong.

Which settings bind a checkpoint (decided per setting):

* ``history`` (m): the ring's slot order and its oldest-first overwriting are laid out
  for m columns; another m would drop the wrong column once the ring wraps.
* ``average`` and, with averaging, the effective ``average_window`` (t): the window's
  buffer is the state; on -> off would silently discard it, off -> on start from nothing.
* the base optimizer's class: its state (Adam's moments, SGD's momentum) means nothing to
  another class, and torch's ``load_state_dict`` would accept it without a word.
* the parameters' dtype: the history's differences were rounded in the saved dtype.

Free to change: ``relaxation`` and ``mixing`` (the history is re-expressed for the new
weight of dR, see ``AndersonHistory.reweight_mixing``), and every setting that holds no
state: the schedule (frequency, store_every, warmup), regularization, the averaging
threshold and criterion, safeguard, solver (the Gram matrix is always kept), and
history_device. The row layout (n, world size, rank, sharded) binds too: the history's
rows are this rank's rows of the joint vector (``layout_mismatch``).
"""

from __future__ import annotations

from typing import Any

# 2: records the base optimizer's class; every key below is required.
STATE_FORMAT = 2

_TOP = ("base", "anderson")
_BASE = ("state", "param_groups")
_ANDERSON = (
    "format", "settings", "layout", "dtype", "base_optimizer", "stats", "history", "stored",
    "average", "warned_no_closure",
)
_SETTINGS = ("history", "relaxation", "mixing", "average", "average_window")
_LAYOUT = ("n", "world_size", "rank", "sharded")
_HISTORY = ("count", "next_slot", "X", "dR", "gram", "stored_dots")
_STORED = ("u", "r")
_AVERAGE = ("count", "next_slot", "buffer")


def base_optimizer_name(optimizer: Any) -> str:
    cls = type(optimizer)
    return f"{cls.__module__}.{cls.__qualname__}"


def format_error(saved: dict) -> str | None:
    """Why the ``anderson`` part's format cannot be read, or None."""
    found = saved.get("format")
    if found == STATE_FORMAT:
        return None
    if found == 1:
        return (
            "AndersonAcceleration.load_state_dict: this checkpoint has state format 1, written "
            "by an older aadl that did not record the base optimizer's class, so it cannot be "
            f"checked; this version reads format {STATE_FORMAT}. To resume from it, load only "
            "the base optimizer (opt.optimizer.load_state_dict(state['base'])): AA then starts "
            "a fresh history"
        )
    return (
        f"AndersonAcceleration.load_state_dict: unsupported state format {found!r}; this "
        f"version reads format {STATE_FORMAT}"
    )


def missing_keys(state: dict, stats_fields: tuple[str, ...]) -> list[str]:
    """Dotted paths of the keys a complete checkpoint has and ``state`` lacks."""
    missing: list[str] = []

    def need(part: Any, path: str, keys: tuple[str, ...], optional: bool = False) -> dict | None:
        if part is None and optional:
            return None
        if not isinstance(part, dict):
            missing.append(f"{path} (a dict, got {type(part).__name__})")
            return None
        missing.extend(f"{path}.{key}" for key in keys if key not in part)
        return part

    need(state["base"], "base", _BASE)
    anderson = need(state["anderson"], "anderson", _ANDERSON)
    if anderson is None:
        return missing
    for key, keys, optional in (
        ("settings", _SETTINGS, False),
        ("layout", _LAYOUT, False),
        ("stats", stats_fields, False),
        ("history", _HISTORY, False),
        ("stored", _STORED, True),
        ("average", _AVERAGE, True),
    ):
        if key in anderson:
            need(anderson[key], f"anderson.{key}", keys, optional)
    return missing


def _window(settings: dict) -> int | None:
    """The effective moving-average window t, or None without averaging."""
    if not settings["average"]:
        return None
    return settings["history"] if settings["average_window"] is None else settings["average_window"]


def incompatible_settings(saved: dict, here: dict) -> list[str]:
    """``name=<saved> in the checkpoint, name=<here> here`` for every binding setting that
    differs; ``saved`` and ``here`` are ``anderson`` parts of a state dict."""
    old, new = saved["settings"], here["settings"]
    pairs = [
        ("base_optimizer", saved["base_optimizer"], here["base_optimizer"]),
        ("dtype", saved["dtype"], here["dtype"]),
        ("history", old["history"], new["history"]),
        ("average", old["average"], new["average"]),
    ]
    if old["average"] and new["average"]:
        pairs.append(("average_window", _window(old), _window(new)))
    return [f"{name}={a!r} in the checkpoint, {name}={b!r} here" for name, a, b in pairs if a != b]


def layout_mismatch(here: dict, saved: dict) -> str | None:
    """Why a checkpoint saved for the row layout ``saved`` cannot load into one laid out as
    ``here`` (``RowLayout.describe()`` of each: n, world_size, rank, sharded), or None."""
    mismatched = [key for key in _LAYOUT if here[key] != saved[key]]
    if not mismatched:
        return None
    return (
        "AndersonAcceleration.load_state_dict: the checkpoint was saved for "
        + ", ".join(f"{key}={saved[key]}" for key in mismatched)
        + " but this optimizer has "
        + ", ".join(f"{key}={here[key]}" for key in mismatched)
    )


def shape_mismatch(here: list[list[int]], saved: list | None) -> str | None:
    """Why a checkpoint whose trainable parameters had the shapes ``saved`` cannot load into
    parameters shaped ``here``, or None (also None for a checkpoint that predates the
    record: it was checked by its total size only)."""
    if saved is None:
        return None
    saved = [list(shape) for shape in saved]
    if saved == here:
        return None
    if len(saved) != len(here):
        return (
            f"the checkpoint holds {len(saved)} trainable parameters, this optimizer {len(here)}; "
            "load it into the model it was saved from"
        )
    index = next(i for i, (a, b) in enumerate(zip(saved, here)) if a != b)
    return (
        f"parameter {index} has shape {tuple(saved[index])} in the checkpoint and {tuple(here[index])} "
        "here (same parameter count, another layout); load it into the model it was saved from"
    )
