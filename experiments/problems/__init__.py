"""Registry of problems: experiment name -> "module:Class", imported only when used.

Adding a problem is one line here plus its module and ``configs/experiment/<name>.yaml``.
"""

from __future__ import annotations

import importlib

PROBLEMS: dict[str, str] = {
    "graduate_admissions": "experiments.problems.graduate_admissions.problem:GraduateAdmissions",
    "burgers2d": "experiments.problems.burgers.problem:Burgers2D",
    "burgers100d": "experiments.problems.burgers.problem:Burgers100D",
}


def problem_class(name: str) -> type:
    """The Problem subclass registered as ``name``.

    Raises KeyError for an unknown name and ImportError when its module cannot be imported.
    """
    try:
        target = PROBLEMS[name]
    except KeyError:
        raise KeyError(f"unknown experiment {name!r}; registered: {sorted(PROBLEMS)}") from None
    module_name, _, class_name = target.partition(":")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as error:
        raise ImportError(f"experiment {name!r} is registered as {target!r}, which cannot be imported: {error}") from error
