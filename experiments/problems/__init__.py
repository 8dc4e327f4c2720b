"""Registry of problems: experiment name -> "module:Class", imported only when used.

Adding a problem is one line here plus its package and ``configs/experiment/<name>.yaml``.
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


def problem_class(name: str) -> type:
    """The Problem subclass registered as ``name`` (see :meth:`Registry.get`)."""
    return PROBLEMS.get(name)
