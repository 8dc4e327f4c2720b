"""Registry of optimisation methods: ``method.name`` -> "module:Class", imported when used.

Adding a method is one line here plus its module and ``configs/method/<choice>.yaml``
(docs/architecture.md, "Adding a method").
"""

from __future__ import annotations

import dataclasses
import functools

from experiments.registry import Registry

METHODS = Registry(
    "method",
    {
        "none": "experiments.methods.none:BaseOptimizer",
        "aadl": "experiments.methods.aadl:AADL",
        "bsgd": "experiments.methods.bsgd:BSGD",
        "extrap_sgd": "experiments.methods.extrap_sgd:ExtrapSGD",
        "ma": "experiments.methods.ma:MovingAverageOnly",
    },
)


#: The ConfigStore name of the node that holds every method's settings with their defaults.
SETTINGS_NODE = "method_settings"


def settings_node() -> type:
    """``{<method>: <its config_node>}`` for every registered method, as one dataclass;
    importable as ``experiments.methods.MethodSettings`` so that composed configs pickle
    (the demo sends them to worker processes)."""
    nodes = tuple((name, METHODS.get(name).config_node()) for name in METHODS.names())
    return _settings_node(tuple((name, node) for name, node in nodes if node is not None))


@functools.cache
def _settings_node(nodes: tuple[tuple[str, type], ...]) -> type:
    from experiments.methods.base import config_dataclass

    fields = [(name, node, dataclasses.field(default_factory=node)) for name, node in nodes]
    return config_dataclass("MethodSettings", fields, __name__)


def __getattr__(name: str) -> type:
    if name == "MethodSettings":
        return settings_node()
    raise AttributeError(name)


def register_settings_node() -> None:
    """Store ``{<method>: <its config_node>}`` for every registered method in Hydra's
    ConfigStore (``configs/config.yaml`` composes it into ``method``). Called before each
    composition, so a method registered at run time (a test's toy method) is included."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SETTINGS_NODE, node=settings_node())
