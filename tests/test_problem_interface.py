"""The problem interface is declared where a newcomer looks for it: every hook the harness
reads on a problem is an attribute or method of ``experiments.problems.base.Problem`` with
its default and a docstring, and the harness reads them as plain attributes (no
``getattr(problem, "hook", default)`` that only the caller's default documents)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from experiments.problems.base import Problem

EXPERIMENTS = REPO_ROOT / "experiments"
BASE = EXPERIMENTS / "problems" / "base.py"

#: The optional hooks and the defaults that say "not used" (the harness's behaviour without them).
HOOK_DEFAULTS = {
    "datasets": (),
    "ddp": True,
    "threads": None,
    "pure_loss": False,
    "samples_per_step": None,
    "step_context": None,
    "batched_loss": None,
    "batched_evaluate": None,
}
#: Hooks that are methods with a default body.
HOOK_METHODS = ("input_identity", "batching_refused", "batches_from", "local_batch", "state_dict", "load_state_dict", "notes")
#: The harness modules that read hooks on a problem, and the names a problem goes by in them.
READERS = ("training.py", "step.py", "parallel.py", "run.py", "batching.py", "seed_groups.py", "validation.py", "methods")
PROBLEM_NAMES = {"problem", "problem_cls", "problem_class"}
#: What the training loop reads only on a seed group's problem (experiments.batching.SeedGroupProblem).
SEED_GROUP_ONLY = {"evaluate_lanes", "counter_values"}


def _sources(*names: str) -> list[Path]:
    paths: list[Path] = []
    for name in names:
        path = EXPERIMENTS / name
        paths.extend(sorted(path.rglob("*.py")) if path.is_dir() else [path])
    return paths


def _declared(name: str) -> bool:
    return any(name in vars(cls) or name in getattr(cls, "__annotations__", {}) for cls in Problem.__mro__)


def _names_a_problem(node: ast.expr) -> bool:
    """``problem``, ``problem_cls``, ``self.problem``, ``self.problems[0]`` and the like."""
    while isinstance(node, ast.Subscript):
        node = node.value
    name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""
    return name.lstrip("_") in {"problem", "problems", "problem_cls", "problem_class"}


def test_no_problem_hook_is_looked_up_with_getattr_or_hasattr():
    hooks = {name for name in dir(Problem) if not name.startswith("_")} | set(Problem.__annotations__)
    found = []
    for path in _sources("."):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")):
                continue
            target, attribute = node.args[0], node.args[1] if len(node.args) > 1 else None
            literal = attribute.value if isinstance(attribute, ast.Constant) else None
            if _names_a_problem(target) or literal in hooks:
                found.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert not found, "declare the hook on Problem and read it as an attribute:\n" + "\n".join(found)


@pytest.mark.parametrize("name, default", HOOK_DEFAULTS.items())
def test_every_optional_hook_is_declared_on_problem_with_its_default(name, default):
    assert name in vars(Problem), f"Problem does not declare {name}"
    assert getattr(Problem, name) == default


def test_the_default_hook_methods_say_not_used():
    assert Problem.batching_refused(object()) is None  # every setting batches
    assert Problem.input_identity(object(), Path(".")) == {}  # no data files


def test_every_hook_has_a_docstring():
    (problem,) = [node for node in ast.parse(BASE.read_text()).body if isinstance(node, ast.ClassDef) and node.name == "Problem"]
    documented, body = set(), problem.body
    for node, following in zip(body, [*body[1:], None]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant) and isinstance(following.value.value, str):
                documented.add(node.target.id)
        elif isinstance(node, ast.FunctionDef) and ast.get_docstring(node):
            documented.add(node.name)
    missing = (set(HOOK_DEFAULTS) | set(HOOK_METHODS)) - documented
    assert not missing, f"hooks without a docstring on Problem: {sorted(missing)}"


def test_every_attribute_the_harness_reads_on_a_problem_is_declared():
    from experiments.batching import SeedGroupProblem

    undeclared = []
    for path in _sources(*READERS):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Attribute) or not isinstance(node.ctx, ast.Load):
                continue
            base = node.value
            reads_problem = (isinstance(base, ast.Name) and base.id in PROBLEM_NAMES) or (
                isinstance(base, ast.Attribute) and base.attr in {"problem", "_problem", "problem_class"}
            )
            if not reads_problem:
                continue
            if node.attr in SEED_GROUP_ONLY:
                assert hasattr(SeedGroupProblem, node.attr), node.attr
            elif not _declared(node.attr):
                undeclared.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert not undeclared, "read on a problem but not declared on Problem:\n" + "\n".join(undeclared)
