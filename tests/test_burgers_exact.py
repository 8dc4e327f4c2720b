"""The exact solutions of the Burgers problems: PDE, initial/boundary data, the benchmark."""

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar

from experiments.problems.burgers.exact import (
    BENCHMARK_MAX_SLOPE,
    BENCHMARK_MAX_SLOPE_TIME,
    NU_PAPER,
    ProductSolution,
    _products_without_each,
    burgers2d,
    burgers2d_on_grid,
    burgers2d_with_slope,
)

# x values on both sides of the shock at x = 0, down to 0.001 from it.
OFFSETS = np.array([0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 0.6, 0.9])
X = np.concatenate([-OFFSETS[::-1], OFFSETS])[None, :]
T = np.array([0.05, 0.25, 0.5, BENCHMARK_MAX_SLOPE_TIME, 0.75, 1.0])[:, None]


def test_benchmark_slope_at_the_origin():
    _, slope = burgers2d_with_slope(0.0, BENCHMARK_MAX_SLOPE_TIME)
    assert round(float(-slope), 5) == BENCHMARK_MAX_SLOPE


def test_benchmark_slope_is_the_maximum_over_time():
    steepest = minimize_scalar(
        lambda t: burgers2d_with_slope(0.0, t)[1], bracket=(0.48, 0.51, 0.53), tol=1e-10
    )
    assert round(float(-steepest.fun), 5) == BENCHMARK_MAX_SLOPE
    assert steepest.x * math.pi == pytest.approx(1.6037, abs=5e-5)


def test_satisfies_the_pde_by_finite_differences():
    h = 1e-5  # truncation ~h^2 and quadrature noise ~1e-15/h^2 both stay below 1e-6
    u = burgers2d(X, T)
    u_t = (burgers2d(X, T + h) - burgers2d(X, T - h)) / (2 * h)
    u_x = (burgers2d(X + h, T) - burgers2d(X - h, T)) / (2 * h)
    u_xx = (burgers2d(X + h, T) - 2 * u + burgers2d(X - h, T)) / h**2
    residual = u_t + u * u_x - NU_PAPER * u_xx
    size = np.abs(u_t) + np.abs(u * u_x) + NU_PAPER * np.abs(u_xx)
    assert np.all(np.abs(residual) <= 1e-5 * size)


def test_slope_matches_finite_differences():
    h = 1e-5
    _, slope = burgers2d_with_slope(X, T)
    u_x = (burgers2d(X + h, T) - burgers2d(X - h, T)) / (2 * h)
    assert np.abs(slope - u_x).max() <= 1e-5 * np.abs(slope).max()


def test_initial_and_boundary_conditions():
    x = np.linspace(-1, 1, 101)
    t = np.linspace(0, 1, 51)
    np.testing.assert_allclose(burgers2d(x, 0.0), -np.sin(np.pi * x), atol=1e-15)
    np.testing.assert_allclose(burgers2d(-1.0, t), 0.0, atol=1e-12)
    np.testing.assert_allclose(burgers2d(1.0, t), 0.0, atol=1e-12)


def test_quadrature_is_converged_at_the_default_node_count():
    x = np.linspace(-1, 1, 401)[None, :]
    t = np.linspace(0, 1, 21)[:, None]
    np.testing.assert_allclose(burgers2d(x, t, nodes=100), burgers2d(x, t, nodes=400), atol=1e-12)


@pytest.mark.parametrize(
    "kwargs, message", [({"nodes": 8}, "nodes must be >= 100"), ({"nu": 0.0}, "nu must be > 0")]
)
def test_rejects_inaccurate_or_invalid_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        burgers2d(0.0, 0.5, **kwargs)


def test_grid_is_cached_and_read_only():
    x, t, u = burgers2d_on_grid(16, 5)
    assert burgers2d_on_grid(16, 5)[2] is u
    assert u.shape == (5, 16) and not u.flags.writeable
    np.testing.assert_allclose(u[3], burgers2d(x, t[3]))


# --------------------------------------------------------------------------------------------
# the manufactured 100d solution (its PDE residual is tested through the problem's code in
# test_burgers_problems.py)
# --------------------------------------------------------------------------------------------


def _points(n, dims, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = 2 * torch.rand(n, dims, generator=generator, dtype=torch.float64) - 1
    return torch.cat([x, torch.rand(n, 1, generator=generator, dtype=torch.float64)], dim=1)


@pytest.mark.parametrize("exponent", [2, 100])
def test_product_solution_derivatives_match_autograd(exponent):
    solution = ProductSolution(exponent)
    points = _points(16, 7).requires_grad_(True)
    u = solution.value(points)
    (gradient,) = torch.autograd.grad(u.sum(), points, create_graph=True)
    hessian_diagonal = torch.stack(
        [
            torch.autograd.grad(gradient[:, i].sum(), points, retain_graph=True)[0][:, i]
            for i in range(7)
        ],
        dim=1,
    )
    u_t, grad_x, second = solution.derivatives(points.detach())
    torch.testing.assert_close(u_t, gradient[:, -1].detach())
    torch.testing.assert_close(grad_x, gradient[:, :-1].detach())
    torch.testing.assert_close(second, hessian_diagonal)


def test_product_solution_vanishes_on_the_boundary_and_starts_from_the_product():
    solution = ProductSolution(2)
    points = _points(50, 99)
    assert torch.all(solution.value(points) != 0)
    points[:, 17] = -1.0
    assert torch.all(solution.value(points) == 0)
    start = _points(5, 3)
    start[:, -1] = 0
    torch.testing.assert_close(solution.value(start), torch.prod(start[:, :3] ** 2 - 1, dim=1))


def test_paper_solution_is_of_order_1e_minus_27_and_unit_of_order_one():
    points = _points(2000, 99)
    paper = ProductSolution(2).value(points).abs().median()
    unit = ProductSolution(100).value(points).abs()
    assert 1e-29 < paper < 1e-25
    assert 0.05 < unit.median() < 1 and unit.max() < 1


def test_products_without_each_is_exact_with_zero_factors():
    factors = torch.tensor([[2.0, 3.0, 0.0, 5.0], [1.5, -2.0, 4.0, 0.5]], dtype=torch.float64)
    expected = torch.stack(
        [torch.prod(torch.cat([row[:i], row[i + 1 :]])) for row in factors for i in range(4)]
    ).reshape(2, 4)
    torch.testing.assert_close(_products_without_each(factors), expected)


@pytest.mark.parametrize("exponent", [0, 3])
def test_product_solution_needs_an_even_exponent(exponent):
    with pytest.raises(ValueError, match="even integer >= 2"):
        ProductSolution(exponent)
