"""The valid interval of every real-valued setting of the harness, in one table.

Each float field of the run's sections (``optimizer``, ``schedule``), of every problem's
``Config`` and of every method's ``Settings`` has its interval here, by config key. Inside
it the arithmetic the setting enters stays finite: a value such as 1e300 passes a check for
"finite" but overflows float32 on the first step (``method.extrap_sgd.rho=1e300``), or
underflows to 0 where it divides (``optimizer.eps=1e-300``). ``experiments.validation``
checks every float field of a run against this table (:func:`check_reals`), so a value
outside is a one-line ConfigError naming the key and the interval; a problem or method
checks its own fields with the same call. ``tests/test_config_errors.py`` fails when a
float field of a registered problem or method is missing here.

AADL's own settings (``method.aadl.*``) are the library's, with their intervals in
``aadl.hyperparameters``. Integer settings keep their bounds where they are checked.
This module imports nothing from the harness but its errors.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any

from experiments.errors import ConfigError


@dataclass(frozen=True)
class Interval:
    """``[low, high]``, either end open where said."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


#: Largest learning rate (and warm-up start rate): times a gradient of 1e30 it stays finite
#: in float32.
MAX_LR = 1e6

#: Config key -> valid interval. A problem's fields are ``problem.<field>`` for every problem
#: that has that field (the same name means the same quantity).
FLOAT_RANGES: dict[str, Interval] = {
    "optimizer.lr": Interval(0, MAX_LR, low_open=True),
    "optimizer.betas": Interval(0, 1, high_open=True),  # each of the two
    # Below 1e-30 Adam's denominator sqrt(v) + eps can round to 0 in float32 (0 / 0).
    "optimizer.eps": Interval(1e-30, 1),
    "optimizer.momentum": Interval(0, 1),
    "optimizer.weight_decay": Interval(0, 1e3),
    "schedule.gamma": Interval(0, 1, low_open=True),
    "schedule.warmup_start_lr": Interval(0, MAX_LR),
    "method.extrap_sgd.rho": Interval(0, 1e3),
    "method.extrap_sgd.noise_std": Interval(0, 1e3, low_open=True),
    # The exact solutions are stable over this whole interval (exact.py works in log space).
    "problem.nu": Interval(1e-8, 1e3),
    "problem.initial_fraction": Interval(0, 1),
    "problem.val_fraction": Interval(0, 1, low_open=True),
    "problem.validation_fraction": Interval(0, 1, low_open=True, high_open=True),
    "problem.label_smoothing": Interval(0, 1, high_open=True),
    # Mean estimation: squared distances of these stay far from float32's 3e38.
    "problem.mean": Interval(-1e6, 1e6),
    "problem.std": Interval(0, 1e6),
    "problem.initial": Interval(-1e6, 1e6),
}


def real_fields(cls: type) -> list[str]:
    """The fields of dataclass ``cls`` that hold real numbers (float, Optional[float],
    a list or tuple of floats)."""
    hints = typing.get_type_hints(cls)
    found = []
    for f in dataclasses.fields(cls):
        kind = hints.get(f.name)
        parts = {kind, *typing.get_args(kind)}
        for arg in typing.get_args(kind):
            parts.update(typing.get_args(arg))
        if float in parts:
            found.append(f.name)
    return found


def check_reals(settings: Any, prefix: str) -> None:
    """Raise ConfigError (key ``prefix`` + field) for a real-valued field of the dataclass
    instance ``settings`` outside its interval in :data:`FLOAT_RANGES`; a field the table
    does not list (a user's own method or problem) must at least be finite."""
    for name in real_fields(type(settings)):
        key = f"{prefix}{name}"
        value = getattr(settings, name)
        values = value if isinstance(value, (list, tuple)) else [value]
        interval = FLOAT_RANGES.get(key)
        for item in values:
            if item is None:
                continue
            if interval is None:
                ok = isinstance(item, (int, float)) and not isinstance(item, bool) and math.isfinite(item)
                if not ok:
                    raise ConfigError(key, f"must be a finite number, got {value!r}")
            elif item not in interval:
                each = "each value " if isinstance(value, (list, tuple)) else ""
                raise ConfigError(key, f"{each}must be a finite number in {interval}, got {value!r}")
