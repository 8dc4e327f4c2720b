"""Registry of optimisation methods: ``method.name`` -> "module:Class", imported when used.

Adding a method is one line here plus its module and ``configs/method/<choice>.yaml``
(docs/architecture.md, "Adding a method").
"""

from __future__ import annotations

import dataclasses

from experiments.registry import Registry

METHODS = Registry(
    "method",
    {
        "none": "experiments.methods.none:BaseOptimizer",
        "aadl": "experiments.methods.aadl:AADL",
    },
)


#: The ConfigStore name of the node that holds every method's settings with their defaults.
SETTINGS_NODE = "method_settings"


def register_settings_node() -> None:
    """Store ``{<method>: <its config_node>}`` for every registered method in Hydra's
    ConfigStore (``configs/config.yaml`` composes it into ``method``). Called before each
    composition, so a method registered at run time (a test's toy method) is included."""
    from hydra.core.config_store import ConfigStore

    fields = []
    for name in METHODS.names():
        node = METHODS.get(name).config_node()
        if node is not None:
            fields.append((name, node, dataclasses.field(default_factory=node)))
    ConfigStore.instance().store(name=SETTINGS_NODE, node=dataclasses.make_dataclass("MethodSettings", fields))
