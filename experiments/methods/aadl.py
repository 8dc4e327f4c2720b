"""Anderson acceleration (``method=aadl``, and ``method=aadl_ma`` with the moving average).

The settings are the library's own: ``method.aadl`` accepts exactly the keyword arguments of
``aadl.AndersonAcceleration`` (``aadl.SETTING_NAMES``), with the library's defaults and
ranges (``aadl.validate_settings``), so no name, default or range is repeated here.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import types
import typing
from typing import Any, Mapping, Optional

from experiments.errors import ConfigError, unknown_key
from experiments.methods.base import Method, config_dataclass

#: The wrapper's counters (keys of ``opt.stats.as_dict()``), cumulative, logged per row.
COUNTERS = ("aa_attempts", "aa_accepted", "averages_applied")


class AADL(Method):
    name = "aadl"
    closure = "loss"  # the safeguard compares losses at two points, without backward
    counters = COUNTERS

    @classmethod
    def config_node(cls) -> type:
        return _config_node()

    @classmethod
    def from_config(cls, section: Mapping[str, Any], prefix: str) -> "AADL":
        from aadl import SETTING_NAMES, validate_settings

        for key in section:
            if key not in SETTING_NAMES:
                raise unknown_key(f"{prefix}{key}", [f"{prefix}{name}" for name in SETTING_NAMES])
        try:
            return cls(validate_settings(**section))
        except ValueError as error:
            raise ConfigError(_named_setting(str(error), SETTING_NAMES, prefix), str(error)) from None

    def settings_dict(self) -> dict[str, Any]:
        return self.settings.as_dict()

    def hyperparameters(self) -> dict[str, Any]:
        # "variant" is the run's label column (e.g. Adam+AADL): the library's setting of
        # that name is written as aadl_variant.
        return {("aadl_variant" if k == "variant" else k): v for k, v in self.settings_dict().items()}

    @property
    def legend_order(self) -> int:
        return 2 if self.settings.average else 1

    def label(self, base_label: str) -> str:
        # The authors' variant gets its own label, so its runs never pool with the contract's.
        aadl = "+AADL(ref)" if self.settings.variant == "reference_code" else "+AADL"
        return base_label + aadl + ("+MA" if self.settings.average else "")

    def wrap(self, base: Any, model: Any) -> Any:
        from aadl import AndersonAcceleration

        return AndersonAcceleration(base, **self.settings.as_dict())

    def devices(self) -> dict[str, str]:
        device = self.settings.history_device
        return {} if device is None else {f"method.{self.name}.history_device": device}

    def counter_values(self, optimizer: Any) -> dict[str, int]:
        stats = optimizer.stats.as_dict()
        return {name: int(stats[name]) for name in COUNTERS}


@functools.cache
def _config_node() -> type:
    """``aadl.AndersonSettings`` itself, with ``X | None`` spelt ``Optional[X]`` for OmegaConf;
    importable as ``experiments.methods.aadl.AADLConfig`` so that composed configs pickle."""
    from aadl import AndersonSettings

    hints = typing.get_type_hints(AndersonSettings)
    fields = []
    for f in dataclasses.fields(AndersonSettings):
        kind = hints[f.name]
        if isinstance(kind, types.UnionType) and type(None) in kind.__args__:
            (kind,) = [arg for arg in kind.__args__ if arg is not type(None)]
            kind = Optional[kind]
        fields.append((f.name, kind, dataclasses.field(default=f.default)))
    return config_dataclass("AADLConfig", fields, __name__)


def __getattr__(name: str) -> Any:
    if name == "AADLConfig":
        return _config_node()
    raise AttributeError(name)


def _named_setting(message: str, names: tuple[str, ...], prefix: str) -> str:
    """The config key of the setting the library's message is about: the first one it
    mentions (a default derived from another setting mentions both)."""
    # \b does not stop inside "average_window", so "average" cannot match there.
    positions = {match.start(): name for name in names if (match := re.search(rf"\b{name}\b", message))}
    return f"{prefix}{positions[min(positions)]}" if positions else prefix.rstrip(".")
