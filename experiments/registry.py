"""Name -> class registries for problems and methods, imported only when used.

An entry is ``"module:Class"`` text, so listing the names costs nothing and a problem's
heavy imports (torch, torchvision) happen only when that problem runs. Tests and plug-ins
add entries with :meth:`Registry.register` (a class or its ``"module:Class"``).
"""

from __future__ import annotations

import importlib
from typing import Generic, TypeVar, Union

from experiments.errors import did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, entries: dict[str, str]):
        self.kind = kind  # "experiment" or "method": the word used in messages
        self._entries: dict[str, Union[str, type]] = dict(entries)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def register(self, name: str, target: Union[str, type]) -> None:
        self._entries[name] = target

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def get(self, name: str) -> type:
        """The class registered as ``name``.

        Raises KeyError for an unknown name and ImportError when its module cannot be imported.
        """
        try:
            target = self._entries[name]
        except KeyError:
            raise KeyError(
                f"unknown {self.kind} {name!r}{did_you_mean(str(name), self._entries)}; registered: {self.names()}"
            ) from None
        if isinstance(target, type):
            return target
        module_name, _, class_name = target.partition(":")
        try:
            return getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as error:
            raise ImportError(
                f"{self.kind} {name!r} is registered as {target!r}, which cannot be imported: {error}"
            ) from error
