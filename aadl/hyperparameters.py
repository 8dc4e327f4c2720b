"""AADL hyperparameters: names, defaults and valid ranges (the contract's table).

This module is the one place that knows the valid ranges, and which settings each variant
can honour (:data:`VARIANT_LIMITS`). The optimizer and the experiment configs both call
:func:`validate_settings`, so a bad value fails with the same message whether it comes from
Python code or from a Hydra override, before a run starts.
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
#: The averaging criterion ``average_criterion=None`` stands for: each variant's own.
DEFAULT_CRITERION = {"contract": "residual", "reference_code": "reference_code"}


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
    average_criterion: str | None = None  # None: the variant's own (DEFAULT_CRITERION)
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
        average_criterion=(
            DEFAULT_CRITERION.get(s["variant"], "residual")
            if s["average_criterion"] is None
            else _choice("average_criterion", s["average_criterion"], AVERAGE_CRITERIA)
        ),
        safeguard=_choice("safeguard", s["safeguard"], SAFEGUARDS),
        solver=_choice("solver", s["solver"], SOLVERS),
        mixing=_choice("mixing", s["mixing"], MIXINGS),
        distributed=_choice("distributed", s["distributed"], DISTRIBUTED_LAYOUTS),
        history_device=_device("history_device", s["history_device"]),
        variant=_choice("variant", s["variant"], VARIANTS),
    )
    _check_variant_limits(settings_checked)
    return settings_checked


#: The settings a variant cannot honour: variant -> setting -> (the values it runs, given the
#: other settings; why). Any other value is refused, naming the setting, rather than run as
#: something else under a name (and a run identity) of its own.
VARIANT_LIMITS: dict[str, dict[str, tuple[Any, str]]] = {
    "contract": {},
    "reference_code": {
        "distributed": (lambda s: ("replicated",), "the authors' code has no sharded layout"),
        "mixing": (lambda s: ("walker_ni",), "the authors' code mixes as Walker-Ni"),
        "average_window": (
            lambda s: (None, s.history + 2),
            "its window is the history depth, history + 2",
        ),
        "average_threshold": (lambda s: (REFERENCE_CODE_THRESHOLD,), "the authors' code fixes it"),
        "average_criterion": (
            lambda s: ("reference_code",),
            "the authors' code averages by its own criterion; None picks it",
        ),
    },
}


def _check_variant_limits(s: AndersonSettings) -> None:
    under = f"under variant={s.variant!r}"
    for name, (allowed, why) in VARIANT_LIMITS[s.variant].items():
        values = allowed(s)
        if getattr(s, name) not in values:
            valid = " or ".join(repr(v) for v in values)
            raise _fail(name, getattr(s, name), f"{valid} {under} ({why})")


def variant_of(settings: dict) -> str:
    """The variant a saved settings dict was made with (older checkpoints: the contract)."""
    return settings.get("variant", "contract") if isinstance(settings, dict) else "contract"
