"""What every AA wrapper shares (aadl.base): which base optimizers can be wrapped, one
wrapper per base optimizer, checkpoints checked per parameter shape, the settings a variant
cannot honour, and a library without import cycles."""

from __future__ import annotations

import ast
import gc
from pathlib import Path

import pytest
import torch

from aadl import AndersonAcceleration, BatchedAndersonAcceleration, validate_settings

AADL_DIR = Path(__file__).resolve().parents[1] / "aadl"


def _params(*shapes: tuple[int, ...], seed: int = 0) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*shape, generator=generator)) for shape in shapes]


def _one_line(error: BaseException) -> str:
    message = str(error)
    assert "\n" not in message
    return message


# -- which base optimizers can be wrapped --------------------------------------------


@pytest.mark.parametrize("variant", ["contract", "reference_code"])
def test_lbfgs_is_refused_in_one_line_saying_why(variant):
    base = torch.optim.LBFGS(_params((5,)), lr=0.1)
    with pytest.raises(TypeError) as caught:
        AndersonAcceleration(base, variant=variant)
    message = _one_line(caught.value)
    assert "LBFGS cannot be wrapped" in message and "closure" in message


def test_an_optimizer_whose_step_needs_a_closure_is_refused_whatever_its_class():
    class LineSearch(torch.optim.SGD):
        def step(self, closure):  # a closure is required, as LBFGS's is
            return super().step(closure)

    with pytest.raises(TypeError, match="LineSearch cannot be wrapped"):
        AndersonAcceleration(LineSearch(_params((5,)), lr=0.1))


@pytest.mark.parametrize("variant", ["contract", "reference_code"])
def test_two_wrappers_cannot_share_one_base_optimizer(variant):
    base = torch.optim.Adam(_params((6,)), lr=0.1)
    first = AndersonAcceleration(base, variant=variant)
    with pytest.raises(ValueError) as caught:
        AndersonAcceleration(base, variant=variant)
    assert "already wrapped" in _one_line(caught.value)
    with pytest.raises(ValueError, match="already wrapped"):
        BatchedAndersonAcceleration(base, seeds=6)
    assert first.optimizer is base
    del first, caught
    gc.collect()
    AndersonAcceleration(base, variant=variant)  # the first wrapper is gone: wrapping again is fine


def test_a_refused_construction_does_not_claim_the_base_optimizer():
    base = torch.optim.Adam(_params((6,)), lr=0.1)
    with pytest.raises(ValueError):
        AndersonAcceleration(base, history=0)
    AndersonAcceleration(base)


# -- checkpoints of another parameter layout --------------------------------------------


def _stepped(opt, params):
    for _ in range(3):
        opt.zero_grad()
        sum((p * p).sum() for p in params).backward()
        opt.step()


@pytest.mark.parametrize("variant", ["contract", "reference_code"])
def test_a_state_of_permuted_parameters_of_the_same_size_is_refused(variant):
    saved_params = _params((3, 4), (4,))
    saver = AndersonAcceleration(torch.optim.Adam(saved_params, lr=0.1), history=3, safeguard="none", variant=variant)
    _stepped(saver, saved_params)
    state = saver.state_dict()

    params = _params((4,), (3, 4), seed=1)  # 16 numbers either way, another layout
    loader = AndersonAcceleration(torch.optim.Adam(params, lr=0.1), history=3, safeguard="none", variant=variant)
    _stepped(loader, params)
    before = {k: v.clone() for k, v in loader.optimizer.state[params[0]].items()}
    with pytest.raises(ValueError) as caught:
        loader.load_state_dict(state)
    message = _one_line(caught.value)
    assert "parameter 0 has shape (3, 4) in the checkpoint and (4,) here" in message
    after = loader.optimizer.state[params[0]]
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing was loaded
    _stepped(loader, params)  # and it still steps


def test_a_batched_state_of_permuted_parameters_is_refused():
    def build(shapes):
        params = [torch.nn.Parameter(torch.randn(2, *shape)) for shape in shapes]
        return BatchedAndersonAcceleration(torch.optim.Adam(params, lr=0.1), seeds=2, history=3, safeguard="none"), params

    saver, saved_params = build([(3, 4), (4,)])
    _stepped(saver, saved_params)
    loader, params = build([(4,), (3, 4)])
    with pytest.raises(ValueError, match=r"parameter 0 has shape \(3, 4\) in the checkpoint and \(4,\) here"):
        loader.load_state_dict(saver.state_dict())


def test_a_checkpoint_without_shapes_still_loads():
    """Checkpoints written before the shapes were recorded are checked by size, as then."""
    params = _params((3, 4), (4,))
    opt = AndersonAcceleration(torch.optim.Adam(params, lr=0.1), history=3, safeguard="none")
    _stepped(opt, params)
    state = opt.state_dict()
    del state["anderson"]["shapes"]
    opt.load_state_dict(state)


# -- the settings a variant cannot honour ----------------------------------------------


def test_the_authors_variant_refuses_the_residual_criterion_naming_it():
    with pytest.raises(ValueError) as caught:
        validate_settings(variant="reference_code", average=True, average_criterion="residual")
    message = _one_line(caught.value)
    assert "average_criterion='residual'" in message and "'reference_code'" in message


def test_each_variant_defaults_to_its_own_criterion():
    assert validate_settings().average_criterion == "residual"
    assert validate_settings(variant="reference_code").average_criterion == "reference_code"
    assert validate_settings(average_criterion="reference_code").average_criterion == "reference_code"


def test_the_harness_refuses_the_residual_criterion_under_the_authors_variant(compose, data_root):
    from experiments.errors import ConfigError
    from experiments.validation import validate

    with pytest.raises(ConfigError) as caught:
        validate(compose("method=aadl_ma", "method.aadl.variant=reference_code",
                         "method.aadl.average_criterion=residual"))
    assert "method.aadl.average_criterion" in str(caught.value)
    plain = validate(compose("method=aadl_ma", "method.aadl.variant=reference_code"))
    spelt = validate(compose("method=aadl_ma", "method.aadl.variant=reference_code",
                             "method.aadl.average_criterion=reference_code"))
    assert plain.config_id == spelt.config_id  # one configuration, one identity


# -- the library's import graph --------------------------------------------------------


def _imports(path: Path) -> set[str]:
    """aadl modules that ``path`` imports, at any depth of its code (lazy imports count)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("aadl."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("aadl."))
    return found


def test_the_library_has_no_import_cycle():
    modules = {p.stem for p in AADL_DIR.glob("*.py") if p.stem != "__init__"}
    graph = {m: _imports(AADL_DIR / f"{m}.py") & modules for m in modules}
    assert "reference_variant" not in graph["base"] and "optimizer" not in graph["reference_variant"]
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                pytest.fail("import cycle: " + " -> ".join([*path, module, target]))
            if target not in state:
                visit(target, [*path, module])
        state[module] = "done"

    for module in sorted(modules):
        if module not in state:
            visit(module, [])
