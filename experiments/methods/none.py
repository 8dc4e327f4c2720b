"""The base optimizer alone (``method=none``): the baseline of every comparison."""

from __future__ import annotations

from typing import Any

from experiments.methods.base import Method


class BaseOptimizer(Method):
    name = "none"

    @property
    def baseline(self) -> bool:
        return True

    @property
    def legend_order(self) -> int:
        return 0

    def label(self, base_label: str) -> str:
        return base_label

    def wrap(self, base: Any, model: Any) -> Any:
        return base
