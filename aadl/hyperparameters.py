"""AADL hyperparameters: names, defaults and valid ranges (the contract's table).

This module is the one place that knows the valid ranges. The optimizer and the experiment
configs both call :func:`validate_settings`, so a bad value fails with the same message
whether it comes from Python code or from a Hydra override.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import torch

AVERAGE_CRITERIA = ("residual", "reference_code")
SAFEGUARDS = ("loss", "none")
SOLVERS = ("gram", "qr")
MIXINGS = ("walker_ni", "paper_eq6")
DISTRIBUTED_LAYOUTS = ("replicated", "sharded")
# contract: shared/spec/aadl-algorithm.md; reference_code: the authors' ORNL/AADL code
# (aadl.reference_variant, docs/library.md "The authors' code").
VARIANTS = ("contract", "reference_code")
# The authors' code fixes its moving-average threshold (AADL/accelerate.py).
REFERENCE_CODE_THRESHOLD = 0.1


@dataclasses.dataclass(frozen=True)
class AndersonSettings:
    """Validated hyperparameters of :class:`aadl.AndersonAcceleration`.

    Field names are the contract's; paper symbols in brackets.
    """

    history: int = 10  # [m] columns kept
    frequency: int = 1  # [p] steps between accelerations
    store_every: int = 1  # [q] steps between stored columns
    relaxation: float = 1.0  # [beta] damping of the mixing
    regularization: float = 0.0  # Tikhonov lambda (absolute)
    warmup: int = 0  # plain steps before storing starts
    average: bool = False  # moving average on/off
    average_window: int | None = None  # [t] iterates averaged; None means `history`
    average_threshold: float = 0.1  # [epsilon] of the averaging criterion
    average_criterion: str = "residual"
    safeguard: str = "loss"
    solver: str = "gram"
    mixing: str = "walker_ni"
    distributed: str = "replicated"
    history_device: str | None = None
    variant: str = "contract"  # or "reference_code": the authors' code's history and averaging

    @property
    def window(self) -> int:
        """The moving-average window t actually used (reference_code: its history depth)."""
        if self.variant == "reference_code":
            return self.history + 2
        return self.history if self.average_window is None else self.average_window

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SETTING_NAMES = tuple(f.name for f in dataclasses.fields(AndersonSettings))


def _fail(name: str, value: Any, valid: str) -> ValueError:
    return ValueError(f"AndersonAcceleration: {name}={value!r} is invalid; valid: {valid}")


def _integer(name: str, value: Any, minimum: int) -> int:
    # bool is an int subclass, but `history=True` is a bug, not a 1.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _fail(name, value, f"an integer >= {minimum}")
    if value < minimum:
        raise _fail(name, value, f"an integer >= {minimum}")
    return int(value)


def _real(name: str, value: Any, valid: str, accept) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _fail(name, value, valid)
    value = float(value)
    if not math.isfinite(value) or not accept(value):
        raise _fail(name, value, valid)
    return value


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise _fail(name, value, "one of " + ", ".join(repr(c) for c in choices))
    return value


def _device(name: str, value: Any) -> str | None:
    if value is None:
        return None
    try:
        return str(torch.device(value))
    except (RuntimeError, TypeError) as error:
        raise _fail(name, value, "None or a torch device such as 'cpu' or 'cuda:0'") from error


def validate_settings(**settings: Any) -> AndersonSettings:
    """Check AADL hyperparameters against the contract's table and return them validated.

    Raises ``ValueError`` naming the parameter, the value and the valid range, and
    ``TypeError`` for a name that is not a hyperparameter.
    """
    unknown = sorted(set(settings) - set(SETTING_NAMES))
    if unknown:
        raise TypeError(
            f"AndersonAcceleration: unknown hyperparameter(s) {unknown}; "
            f"valid names: {', '.join(SETTING_NAMES)}"
        )
    s = {**AndersonSettings().as_dict(), **settings}
    average = s["average"]
    if not isinstance(average, bool):
        raise _fail("average", average, "True or False")
    window = s["average_window"]
    if average and window is None and _integer("history", s["history"], 1) < 2:
        raise _fail(
            "average_window", window, "an integer >= 2 (it defaults to history, which is 1 here)"
        )
    settings_checked = AndersonSettings(
        history=_integer("history", s["history"], 1),
        frequency=_integer("frequency", s["frequency"], 1),
        store_every=_integer("store_every", s["store_every"], 1),
        relaxation=_real("relaxation", s["relaxation"], "0 < relaxation <= 1", lambda v: 0 < v <= 1),
        regularization=_real(
            "regularization", s["regularization"], "a finite number >= 0", lambda v: v >= 0
        ),
        warmup=_integer("warmup", s["warmup"], 0),
        average=average,
        average_window=None if window is None else _integer("average_window", window, 2),
        average_threshold=_real(
            "average_threshold", s["average_threshold"], "a finite number > 0", lambda v: v > 0
        ),
        average_criterion=_choice("average_criterion", s["average_criterion"], AVERAGE_CRITERIA),
        safeguard=_choice("safeguard", s["safeguard"], SAFEGUARDS),
        solver=_choice("solver", s["solver"], SOLVERS),
        mixing=_choice("mixing", s["mixing"], MIXINGS),
        distributed=_choice("distributed", s["distributed"], DISTRIBUTED_LAYOUTS),
        history_device=_device("history_device", s["history_device"]),
        variant=_choice("variant", s["variant"], VARIANTS),
    )
    if settings_checked.variant == "reference_code":
        _check_reference_code(settings_checked)
    return settings_checked


def _check_reference_code(s: AndersonSettings) -> None:
    """Refuse the settings the authors' code has no room for, rather than ignore them.

    Its moving-average window is its history depth and its threshold a constant, it mixes
    only as Walker-Ni, and it has no sharded layout. (``average_criterion`` is moot: the
    variant always uses the code's own criterion, and the default cannot be told apart
    from an explicit choice.)"""
    under = "under variant='reference_code'"
    if s.distributed != "replicated":
        raise _fail("distributed", s.distributed, f"'replicated' {under}")
    if s.mixing != "walker_ni":
        raise _fail("mixing", s.mixing, f"'walker_ni' {under} (the authors' code mixes as Walker-Ni)")
    depth = s.history + 2
    if s.average_window not in (None, depth):
        raise _fail(
            "average_window", s.average_window,
            f"None {under} (its window is the history depth, history + 2 = {depth})",
        )
    if s.average_threshold != REFERENCE_CODE_THRESHOLD:
        raise _fail(
            "average_threshold", s.average_threshold,
            f"{REFERENCE_CODE_THRESHOLD} {under} (the authors' code fixes it)",
        )


def variant_of(settings: dict) -> str:
    """The variant a saved settings dict was made with (older checkpoints: the contract)."""
    return settings.get("variant", "contract") if isinstance(settings, dict) else "contract"
