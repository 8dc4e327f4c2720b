"""Exact solutions of the two Burgers problems (see docs/burgers.md).

burgers2d
    u_t + u u_x - nu u_xx = 0 on x in [-1, 1], t in [0, 1], u(x, 0) = -sin(pi x),
    u(+-1, t) = 0. The Hopf-Cole transformation gives (Basdevant et al. 1986)

        u(x, t) = - int sin(pi y) F(y) e^{-z^2} dz / int F(y) e^{-z^2} dz,
        y = x - 2 sqrt(nu t) z,   F(y) = exp(-cos(pi y) / (2 pi nu)),

    evaluated here with Gauss-Hermite quadrature. F spans e^{+-1/(2 pi nu)} (e^{+-50} at the
    paper's nu = 0.01/pi, overflow for smaller nu), so the integrals are formed as a
    log-sum-exp: normalised weights p_k ~ w_k F(y_k) shifted by their largest log, which
    turns u and u_x into expectations under p (no overflow, no cancellation of large terms).
    100 nodes reproduce the classical benchmark max_t |u_x(0, t)| = 152.00516 at
    t = 1.6037/pi and agree with 1,000 nodes to 1e-14 over the domain; 8 nodes are off by
    0.41 near the shock.

burgers100d (manufactured)
    u(x, t) = e^{-t} prod_{i=1}^{d} (x_i^m - 1) on [-1, 1]^d x [0, 1], with the forcing
    f = u_t + u sum_i u_{x_i} - nu sum_i u_{x_i x_i} that makes it solve the PDE. m = 2 is the
    paper's Eq. 22; m = 100 is an order-one variant (see :data:`SOLUTION_EXPONENTS`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.special import roots_hermite
from torch import Tensor

NU_PAPER = 0.01 / math.pi
MIN_QUADRATURE_NODES = 100  # fewer is not converged near the shock (8 nodes: off by 0.41)

#: Classical benchmark (Basdevant et al. 1986): the steepest slope of the 2d solution, at x=0.
BENCHMARK_MAX_SLOPE = 152.00516
BENCHMARK_MAX_SLOPE_TIME = 1.6037 / math.pi


# --------------------------------------------------------------------------------------------
# burgers2d: Hopf-Cole with Gauss-Hermite quadrature
# --------------------------------------------------------------------------------------------


def burgers2d(x, t, *, nu: float = NU_PAPER, nodes: int = MIN_QUADRATURE_NODES) -> np.ndarray:
    """u(x, t) of the 2d problem; ``x`` and ``t`` broadcast against each other."""
    return burgers2d_with_slope(x, t, nu=nu, nodes=nodes)[0]


def burgers2d_with_slope(
    x, t, *, nu: float = NU_PAPER, nodes: int = MIN_QUADRATURE_NODES
) -> tuple[np.ndarray, np.ndarray]:
    """(u, u_x) of the 2d problem at broadcast ``x``, ``t``.

    With p_k the normalised quadrature weights, s_k = sin(pi y_k), c_k = cos(pi y_k):
    u = -E[s] and, differentiating the quotient in x (dF/dx = F s / (2 nu)),
    u_x = -pi E[c] - Var[s] / (2 nu).
    """
    if nu <= 0:
        raise ValueError(f"nu must be > 0, got {nu!r}")
    if nodes < MIN_QUADRATURE_NODES:
        raise ValueError(f"nodes must be >= {MIN_QUADRATURE_NODES}, got {nodes!r}")
    if np.any(np.asarray(t) < 0):
        raise ValueError("t must be >= 0")
    z, log_w = _hermite_rule(nodes)
    x, t = np.broadcast_arrays(np.asarray(x, dtype=np.float64), np.asarray(t, dtype=np.float64))
    y = x[..., None] - 2.0 * np.sqrt(nu * t)[..., None] * z
    log_weights = log_w - np.cos(np.pi * y) / (2.0 * np.pi * nu)
    p = np.exp(log_weights - log_weights.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    s, c = np.sin(np.pi * y), np.cos(np.pi * y)
    mean_s = (p * s).sum(axis=-1)
    var_s = (p * (s - mean_s[..., None]) ** 2).sum(axis=-1)
    return -mean_s, -np.pi * (p * c).sum(axis=-1) - var_s / (2.0 * nu)


@functools.lru_cache(maxsize=8)
def _hermite_rule(nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and log-weights of the Gauss-Hermite rule for weight e^{-z^2}.

    scipy's rule stays accurate beyond numpy's hermgauss, whose weights overflow from about
    400 nodes; weights that underflow to 0 get log -inf and drop out of the sum.
    """
    z, w = roots_hermite(nodes)
    with np.errstate(divide="ignore"):
        return z, np.log(w)


@functools.lru_cache(maxsize=8)
def burgers2d_on_grid(
    n_x: int, n_t: int, *, nu: float = NU_PAPER, nodes: int = MIN_QUADRATURE_NODES
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, t, u) on the grid x = linspace(-1, 1, n_x), t = linspace(0, 1, n_t); u is (n_t, n_x).

    Cached (every seed of a run family evaluates on the same grid); the arrays are read-only.
    """
    x = np.linspace(-1.0, 1.0, n_x)
    t = np.linspace(0.0, 1.0, n_t)
    # One time row at a time keeps the (points x nodes) temporaries small.
    u = np.stack([burgers2d(x, t_row, nu=nu, nodes=nodes) for t_row in t])
    for array in (x, t, u):
        array.setflags(write=False)
    return x, t, u


# --------------------------------------------------------------------------------------------
# burgers100d: the manufactured product solution and its forcing
# --------------------------------------------------------------------------------------------

#: ``problem.solution_scale`` -> exponent m of u = e^{-t} prod (x_i^m - 1).
#: paper: Eq. 22 (m = 2): |u| ~ 1e-27 at typical points of [-1, 1]^99 (median 3e-27).
#: unit: m = 100: RMS 0.31, median 0.19, max 0.99 over the domain; still a polynomial that
#: vanishes on every face, with a boundary layer of width ~1/m.
SOLUTION_EXPONENTS = {"paper": 2, "unit": 100}


@dataclass(frozen=True)
class ProductSolution:
    """u(x, t) = e^{-t} prod_i (x_i^m - 1) for points (N, d + 1) whose last column is t.

    Computed in float64 and returned in the points' dtype: at m = 2 the product of 99
    factors is ~1e-27 and its float32 factors would lose digits.
    """

    exponent: int = 2

    def __post_init__(self):
        if self.exponent < 2 or self.exponent % 2:
            # an odd power does not vanish at x_i = -1
            raise ValueError(f"exponent must be an even integer >= 2, got {self.exponent!r}")

    def value(self, points: Tensor) -> Tensor:
        x, decay = self._split(points)
        return (decay * torch.prod(x**self.exponent - 1, dim=1)).to(points.dtype)

    def derivatives(self, points: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(u_t, grad_x u (N, d), diagonal of the spatial Hessian (N, d)), in float64."""
        x, decay = self._split(points)
        m = self.exponent
        # prod over j != i, without dividing by factors that vanish on the boundary
        others = decay[:, None] * _products_without_each(x**m - 1)
        u = decay * torch.prod(x**m - 1, dim=1)
        return -u, m * x ** (m - 1) * others, m * (m - 1) * x ** (m - 2) * others

    def forcing(self, points: Tensor, nu: float) -> Tensor:
        """f = u_t + u sum_i u_{x_i} - nu sum_i u_{x_i x_i}."""
        u = self.value(points.double()).double()
        u_t, gradient, hessian_diagonal = self.derivatives(points)
        f = u_t + u * gradient.sum(dim=1) - nu * hessian_diagonal.sum(dim=1)
        return f.to(points.dtype)

    @staticmethod
    def _split(points: Tensor) -> tuple[Tensor, Tensor]:
        points = points.double()
        return points[:, :-1], torch.exp(-points[:, -1])


def _products_without_each(factors: Tensor) -> Tensor:
    """(N, d) -> (N, d): entry i is the product of every factor of its row but the i-th."""
    ones = torch.ones_like(factors[:, :1])
    before = torch.cumprod(torch.cat([ones, factors[:, :-1]], dim=1), dim=1)
    after = torch.cat([factors[:, 1:], ones], dim=1).flip(1).cumprod(dim=1).flip(1)
    return before * after
