"""Small dense solves of the AA least-squares problem

    g = argmin_g ||r - dR g||^2 + lam ||g||^2

from its h x h summaries. The n-sized passes that build the summaries live in
:mod:`aadl.kernels`; everything here is O(h^3) on h <= m numbers, done in float64 on the
CPU (one tiny transfer per acceleration on GPU runs).

Both solvers report the 2-norm condition number of the least-squares matrix
``[dR; sqrt(lam) I]``, so their estimates are comparable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

# The Gram route squares the condition number, cond(G) = cond(dR)^2, and the relative
# forward error of its coefficients is about u cond(G) (u: float64's unit roundoff), where
# QR's is about u cond(dR) plus the residual's term, which both routes share. The normal
# equations are trusted only while that estimate is at most GRAM_ERROR_BOUND, so where the
# gram route answers its coefficients agree with QR's to about that bound; past it the
# caller falls back to QR. Read at call time by every wrapper (tests lower it).
UNIT_ROUNDOFF = float(np.finfo(np.float64).eps) / 2
GRAM_ERROR_BOUND = 1e-9
GRAM_MAX_CONDITION = GRAM_ERROR_BOUND / UNIT_ROUNDOFF  # about 9.0e6


def gram_error_estimate(condition_of_gram: float) -> float:
    """Estimated relative forward error of the normal equations' coefficients."""
    return UNIT_ROUNDOFF * condition_of_gram
# Singular values below this fraction of the largest are treated as zero (minimum-norm
# solution): an exactly collinear history still yields finite coefficients.
RANK_TOLERANCE = 1e-13


@dataclass(frozen=True)
class LeastSquaresSolution:
    coefficients: torch.Tensor  # (h,) float64, on the CPU
    condition: float  # 2-norm condition number of [dR; sqrt(lam) I]
    method: str  # "gram" or "qr"


def solve_normal_equations(
    gram: torch.Tensor, rhs: torch.Tensor, regularization: float
) -> LeastSquaresSolution | None:
    """Solve ``(G + lam I) g = dR^T r``; ``None`` when too ill-conditioned to trust (the
    estimated forward error above ``GRAM_ERROR_BOUND``: cond(G) > ``GRAM_MAX_CONDITION``).

    On the CPU in numpy, the eigendecomposition by LAPACK's dsyevd called directly
    (scipy.linalg.lapack): on an m x m system a torch call's dispatch costs more than the
    arithmetic, and at small n this solve was the largest part of the wrapper's own work
    (40 us at m = 10 through torch, 15 us this way). Every path of the wrapper calls this one
    function, so results do not depend on the path."""
    system = _cpu_float64(gram)
    if regularization:
        system = system + regularization * np.eye(system.shape[0])
    if not np.isfinite(system).all():
        return None
    eigenvalues, eigenvectors, info = _lapack().dsyevd(system, compute_v=1)
    if info != 0:
        return None
    smallest, largest = float(eigenvalues[0]), float(eigenvalues[-1])
    if smallest <= 0 or largest <= 0 or largest / smallest > GRAM_MAX_CONDITION:
        return None
    projected = eigenvectors.T @ _cpu_float64(rhs)
    coefficients = eigenvectors @ (projected / eigenvalues)
    return LeastSquaresSolution(torch.from_numpy(coefficients), math.sqrt(largest / smallest), "gram")


def _lapack():
    """scipy's LAPACK wrappers, imported on the first solve (0.3 s of import time that a
    run without the gram solver never pays)."""
    from scipy.linalg import lapack

    return lapack


def _cpu_float64(values: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(values, np.ndarray):
        return values.astype(np.float64, copy=False)
    return values.detach().to("cpu", torch.float64).numpy()


def solve_r_factor(r_factor: torch.Tensor, regularization: float) -> LeastSquaresSolution:
    """Solve from the R factor of ``[dR, r]`` ((h+1) x (h+1), any row order of the QR)."""
    r_factor = r_factor.detach().to("cpu", torch.float64)
    h = r_factor.shape[1] - 1
    if regularization > 0:
        # QR of [[R11, z], [sqrt(lam) I, 0]] adds the Tikhonov rows without touching n.
        penalty = torch.zeros(h, h + 1, dtype=torch.float64)
        penalty[:, :h] = math.sqrt(regularization) * torch.eye(h, dtype=torch.float64)
        r_factor = torch.linalg.qr(torch.cat([r_factor, penalty]), mode="r").R
    matrix, rhs = r_factor[:h, :h], r_factor[:h, h]
    if not bool(torch.isfinite(r_factor).all()):
        return LeastSquaresSolution(torch.full((h,), math.nan, dtype=torch.float64), math.inf, "qr")
    u, singular, vh = torch.linalg.svd(matrix)
    largest = float(singular[0])
    keep = singular > RANK_TOLERANCE * largest if largest > 0 else torch.zeros_like(singular, dtype=torch.bool)
    inverse = torch.where(keep, 1.0 / singular.clamp_min(1e-300), torch.zeros_like(singular))
    coefficients = vh.T @ (inverse * (u.T @ rhs))
    smallest = float(singular[-1])
    condition = largest / smallest if smallest > 0 else math.inf
    return LeastSquaresSolution(coefficients, condition, "qr")
