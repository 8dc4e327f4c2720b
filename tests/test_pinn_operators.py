"""Input derivatives of PINNs: the fast methods equal the naive loop and analytic values."""

import math

import pytest
import torch

from experiments.problems.burgers import pinn
from experiments.problems.burgers.pinn import PinnMLP, input_derivatives

# torch.func's jvp loads TorchScript decompositions, which warn under torch >= 2.10.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")

FAST_METHODS = ["reverse", "forward", "func"]


def _points(n, dims, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return 2 * torch.rand(n, dims, generator=generator, dtype=torch.float64) - 1


def _burgers_directions(dims):
    """(sum of the spatial unit vectors, e_t) with t the last coordinate."""
    directions = torch.zeros(dims, 2, dtype=torch.float64)
    directions[:-1, 0] = 1
    directions[-1, 1] = 1
    return directions


def _mlp(in_features, width, depth, activation, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return PinnMLP(in_features, width, depth, activation, generator=generator).double()


# (in_features, width, depth, activation): 2d Burgers' shape; a Laplacian over more
# coordinates (11) than the first layer is wide (5), which takes the QR-compressed path; ReLU.
NETWORKS = [(2, 20, 8, "tanh"), (12, 5, 3, "tanh"), (12, 8, 2, "relu")]


@pytest.mark.parametrize("method", FAST_METHODS)
@pytest.mark.parametrize("shape", NETWORKS, ids=lambda s: f"{s[0]}-{s[2]}x{s[1]}-{s[3]}")
def test_fast_methods_equal_the_naive_loop(shape, method):
    model = _mlp(*shape)
    x = _points(33, shape[0])
    directions, dims = _burgers_directions(shape[0]), range(shape[0] - 1)
    expected = input_derivatives(model, x, directions, dims, "loop")
    actual = input_derivatives(model, x, directions, dims, method)
    for name, a, e in zip(expected._fields, actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("method", FAST_METHODS)
def test_parameter_gradients_of_a_residual_loss_equal_the_naive_loop(method):
    # Training differentiates the residual with respect to the weights: the fast methods must
    # give the same parameter gradients, not just the same values.
    model = _mlp(12, 5, 3, "tanh")
    x = _points(20, 12)
    directions, dims = _burgers_directions(12), range(11)

    def parameter_gradients(method):
        d = input_derivatives(model, x, directions, dims, method)
        loss = (
            (d.directional[:, 1] + d.value * d.directional[:, 0] - 0.1 * d.laplacian)
            .square()
            .mean()
        )
        return torch.autograd.grad(loss, list(model.parameters()))

    for actual, expected in zip(
        parameter_gradients(method), parameter_gradients("loop"), strict=True
    ):
        torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-12)


def test_forward_laplacian_is_exact_for_a_one_layer_network():
    # u = sum_j v_j tanh(w_j . x + b_j)  =>  Laplacian over coordinates D:
    # sum_j v_j tanh''(h_j) sum_{k in D} w_jk^2, with tanh'' = -2 tanh (1 - tanh^2).
    model = _mlp(6, 7, 1, "tanh")
    hidden, output = model.linears
    x = _points(9, 6)
    dims = [0, 2, 3]
    s = torch.tanh(hidden(x))
    expected = (-2 * s * (1 - s**2) * hidden.weight[:, dims].square().sum(1)) @ output.weight[0]
    actual = input_derivatives(model, x, _burgers_directions(6), dims, "forward").laplacian
    torch.testing.assert_close(actual, expected.detach(), rtol=1e-12, atol=1e-12)


KNOWN_FUNCTIONS = {
    # name: (u as (N, d) -> (N, 1), its Laplacian over the first d - 1 coordinates)
    "squared norm": (
        lambda x: x[:, :-1].square().sum(1, keepdim=True),
        lambda x: torch.full_like(x[:, 0], 2.0 * (x.shape[1] - 1)),
    ),
    "sine product": (
        lambda x: torch.prod(torch.sin(x[:, :-1]), 1, keepdim=True) * torch.exp(x[:, -1:]),
        lambda x: -(x.shape[1] - 1) * torch.prod(torch.sin(x[:, :-1]), 1) * torch.exp(x[:, -1]),
    ),
    "radial exponential": (
        lambda x: torch.exp(-x[:, :-1].square().sum(1, keepdim=True)),
        lambda x: (4 * x[:, :-1].square().sum(1) - 2 * (x.shape[1] - 1))
        * torch.exp(-x[:, :-1].square().sum(1)),
    ),
}


@pytest.mark.parametrize("method", ["func", "loop"])
@pytest.mark.parametrize("name", KNOWN_FUNCTIONS)
def test_laplacian_of_known_functions(name, method):
    function, laplacian = KNOWN_FUNCTIONS[name]
    x = _points(17, 10)
    actual = input_derivatives(function, x, _burgers_directions(10), range(9), method)
    torch.testing.assert_close(actual.laplacian, laplacian(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(actual.value, function(x)[:, 0])


def test_directional_derivatives_of_a_known_function():
    x = _points(5, 4)
    d = input_derivatives(
        KNOWN_FUNCTIONS["sine product"][0], x, _burgers_directions(4), range(3), "func"
    )
    sines, cosines, growth = torch.sin(x[:, :3]), torch.cos(x[:, :3]), torch.exp(x[:, 3])
    others = torch.stack([sines[:, [j for j in range(3) if j != i]].prod(1) for i in range(3)], 1)
    torch.testing.assert_close(d.directional[:, 0], (cosines * others).sum(1) * growth)
    torch.testing.assert_close(d.directional[:, 1], sines.prod(1) * growth)


@pytest.mark.parametrize("method", ["forward", "func", "loop"])
def test_no_graph_under_no_grad_and_a_graph_otherwise(method):
    model = _mlp(3, 6, 2, "tanh")
    x = _points(8, 3)
    args = (x, _burgers_directions(3), range(2), method)
    with torch.no_grad():
        quiet = input_derivatives(model, *args)
    assert not any(t.requires_grad for t in quiet)
    loud = input_derivatives(model, *args)
    assert all(t.requires_grad for t in loud[:2]) and loud.laplacian.requires_grad
    for a, b in zip(quiet, loud, strict=True):
        torch.testing.assert_close(a, b.detach())


def test_forward_method_gives_the_same_result_in_cache_sized_blocks(monkeypatch):
    model = _mlp(12, 5, 3, "tanh")
    x = _points(50, 12)
    args = (x, _burgers_directions(12), range(11), "forward")
    whole = input_derivatives(model, *args)
    monkeypatch.setattr(pinn, "_CPU_BLOCK_FLOATS", 7 * 5 * 4)  # 4 points per block
    for a, b in zip(input_derivatives(model, *args), whole, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-14)


def test_relu_network_has_zero_laplacian():
    model = _mlp(5, 8, 3, "relu")
    d = input_derivatives(model, _points(10, 5), _burgers_directions(5), range(4), "loop")
    assert torch.all(d.laplacian == 0)


def test_mlp_shape_and_initialisation():
    model = PinnMLP(100, 50, 4, "tanh", generator=torch.Generator().manual_seed(1))
    assert [tuple(linear.weight.shape) for linear in model.linears] == [
        (50, 100),
        (50, 50),
        (50, 50),
        (50, 50),
        (1, 50),
    ]
    assert all(torch.all(linear.bias == 0) for linear in model.linears)
    # Xavier normal: std = sqrt(2 / (fan_in + fan_out))
    assert model.linears[1].weight.std().item() == pytest.approx(math.sqrt(2 / 100), rel=0.1)
    again = PinnMLP(100, 50, 4, "tanh", generator=torch.Generator().manual_seed(1))
    assert all(
        torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters(), strict=True)
    )


def test_invalid_arguments_are_rejected():
    with pytest.raises(ValueError, match="activation must be one of"):
        PinnMLP(2, 4, 1, "sigmoid")
    with pytest.raises(ValueError, match="method must be one of"):
        input_derivatives(
            _mlp(2, 4, 1, "tanh"), _points(3, 2), _burgers_directions(2), [0], "hessian"
        )
    with pytest.raises(ValueError, match="needs a PinnMLP"):
        input_derivatives(
            torch.nn.Linear(2, 1).double(), _points(3, 2), _burgers_directions(2), [0], "forward"
        )


def test_the_benchmarks_matrix_product_floor_is_part_of_the_iteration_it_profiles(monkeypatch):
    """benchmarks/pinn_step.py's floor (the matrix products alone) must be a lower bound:
    a positive share of the iteration's profiled time, never more than all of it."""
    import importlib.util
    import sys
    from pathlib import Path

    from experiments.problems.burgers.problem import Burgers2D

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "pinn_step.py"
    spec = importlib.util.spec_from_file_location("pinn_step_benchmark", path)
    benchmark = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, benchmark)  # its dataclasses look it up
    spec.loader.exec_module(benchmark)
    problem = benchmark.make(Burgers2D, torch.device("cpu"), n_collocation=64, n_boundary=16, depth=2)
    step, products = benchmark.matrix_product_seconds(problem, steps=2)
    assert 0 < products < step
    presets = {preset.name: preset for preset in map(benchmark.Preset.load, benchmark.PRESET_NAMES)}
    assert presets["fig2"].activation == "relu" and presets["fig2"].budget == 2000


def _benchmark():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "pinn_step.py"
    spec = importlib.util.spec_from_file_location("pinn_step_benchmark", path)
    benchmark = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = benchmark  # its dataclasses look it up
    spec.loader.exec_module(benchmark)
    return benchmark


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_the_benchmarks_plain_autograd_peer_computes_the_projects_loss_with_its_flops(activation):
    """benchmarks/pinn_step.py's peer is the same PINN written plainly: the same loss on the
    same weights and points, and in reverse mode the project's iteration counts the peer's
    FLOPs (to 1%) and fewer than forward mode's (Burgers 2d)."""
    from experiments.problems.burgers.pinn import counted_flops
    from experiments.problems.burgers.problem import Burgers2D

    benchmark = _benchmark()
    problem = benchmark.make(Burgers2D, torch.device("cpu"), activation=activation, n_collocation=64, n_boundary=16)
    forward = benchmark.make(Burgers2D, torch.device("cpu"), activation=activation, n_collocation=64, n_boundary=16, derivatives="forward")
    model = problem.build_model()
    (batch,) = problem.batches(1)
    net = benchmark.plain_autograd_pinn(model)
    curvature = model.activation.has_curvature
    peer = benchmark.plain_autograd_loss(problem, net, batch, curvature)
    torch.testing.assert_close(peer, problem.loss(model, batch), rtol=1e-6, atol=0)
    flops = {
        "peer": counted_flops(lambda: benchmark.plain_autograd_loss(problem, net, batch, curvature).backward()),
        "reverse": counted_flops(lambda: problem.loss(model, batch).backward()),
        "forward": counted_flops(lambda: forward.loss(model, batch).backward()),
    }
    assert problem.derivative_method == "reverse"
    # (the project adds only the (N, 2) x (2, 2) product of the directional derivatives)
    assert flops["reverse"] == pytest.approx(flops["peer"], rel=0.01) and flops["reverse"] < flops["forward"]
    assert benchmark.gemm_gflops(64, 20, 20, 1) > 0
