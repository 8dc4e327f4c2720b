"""Registry of problems: experiment name -> "module:Class", imported only when used.

Adding a problem is one line here plus its package and ``configs/experiment/<name>.yaml``.
Each problem's ``Config`` is also Hydra's node for ``problem`` when that experiment is
chosen (:func:`register_settings_nodes`), so ``problem.<field>=...`` needs no ``+`` and is
type-checked while composing, as method settings are.
"""

from __future__ import annotations

from experiments.registry import Registry

PROBLEMS = Registry(
    "experiment",
    {
        "graduate_admissions": "experiments.problems.graduate_admissions.problem:GraduateAdmissions",
        "burgers2d": "experiments.problems.burgers.problem:Burgers2D",
        "burgers100d": "experiments.problems.burgers.problem:Burgers100D",
        "imagenet_resnet50": "experiments.problems.images.problem:ImageNetResNet50",
        "fashion_resnet": "experiments.problems.images.problem:FashionResNet",
        "mean_estimation": "experiments.problems.mean_estimation.problem:MeanEstimation",
    },
)


#: The ConfigStore group of the problems' settings nodes: ``problem_settings/<experiment>``
#: (``configs/config.yaml`` composes the chosen experiment's into ``problem``).
SETTINGS_GROUP = "problem_settings"


def register_settings_nodes() -> None:
    """Store every registered problem's ``Config`` as ``problem_settings/<experiment>`` in
    Hydra's ConfigStore. Called before each composition, so a problem registered at run
    time (a test's toy problem) is included; one that cannot be imported is left out, and
    validation names it when it is chosen."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for name in PROBLEMS.names():
        try:
            node = PROBLEMS.get(name).Config
        except ImportError:
            continue
        store.store(group=SETTINGS_GROUP, name=name, node=node)


def problem_class(name: str) -> type:
    """The Problem subclass registered as ``name`` (see :meth:`Registry.get`)."""
    return PROBLEMS.get(name)
