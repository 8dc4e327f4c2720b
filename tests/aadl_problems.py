"""Small deterministic problems shared by the library's tests."""

from __future__ import annotations

import numpy as np
import torch


class LogisticProblem:
    """Full-batch L2-regularised logistic regression over a joint vector w that is split
    into two parameters (a 3x4 matrix and an 8-vector), so the flattening order matters.

    Its gradient step is a smooth nonlinear fixed-point map, evaluated identically in
    torch (for the wrapper) and numpy (for the reference transcription).
    """

    shapes = ((3, 4), (8,))
    n = 20

    def __init__(self, seed: int = 0, samples: int = 60, lr: float = 2.0, mu: float = 1e-2):
        rng = np.random.default_rng(seed)
        self.A = rng.standard_normal((samples, self.n))
        self.y = (rng.random(samples) < 0.5).astype(np.float64)
        self.lr, self.mu = lr, mu
        self.w0 = 0.1 * rng.standard_normal(self.n)

    # numpy side (reference)
    def loss_np(self, w: np.ndarray) -> float:
        z = self.A @ w
        return float(np.mean(np.logaddexp(0.0, z) - self.y * z) + 0.5 * self.mu * w @ w)

    def grad_np(self, w: np.ndarray) -> np.ndarray:
        z = self.A @ w
        return self.A.T @ (1.0 / (1.0 + np.exp(-z)) - self.y) / len(self.y) + self.mu * w

    def base_step_np(self, w: np.ndarray) -> np.ndarray:
        return w - self.lr * self.grad_np(w)

    # torch side (wrapper)
    def parameters(self, dtype=torch.float64) -> list[torch.Tensor]:
        flat = torch.tensor(self.w0, dtype=dtype)
        params, offset = [], 0
        for shape in self.shapes:
            size = int(np.prod(shape))
            params.append(flat[offset : offset + size].reshape(shape).clone().requires_grad_())
            offset += size
        return params

    def loss(self, params: list[torch.Tensor]) -> torch.Tensor:
        w = torch.cat([p.reshape(-1) for p in params])
        A = torch.as_tensor(self.A, dtype=w.dtype)
        y = torch.as_tensor(self.y, dtype=w.dtype)
        z = A @ w
        return torch.mean(torch.nn.functional.softplus(z) - y * z) + 0.5 * self.mu * (w @ w)


def flat(params) -> np.ndarray:
    return torch.cat([p.detach().reshape(-1) for p in params]).double().numpy()


def run_wrapper(problem: LogisticProblem, steps: int, closure: bool = True, **settings):
    """Run AndersonAcceleration(SGD) on ``problem``; return iterates and the optimizer."""
    from aadl import AndersonAcceleration

    params = problem.parameters()
    opt = AndersonAcceleration(torch.optim.SGD(params, lr=problem.lr), **settings)
    trajectory = []
    for _ in range(steps):
        opt.zero_grad()
        problem.loss(params).backward()
        opt.step((lambda: problem.loss(params)) if closure else None)
        trajectory.append(flat(params))
    return trajectory, opt


def quadratic(n: int, seed: int = 0, condition: float = 100.0):
    """A strongly convex quadratic 0.5 w^T Q w - b^T w with known eigenvalues."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    eigenvalues = torch.logspace(0, np.log10(condition), n, dtype=torch.float64)
    Q = q @ torch.diag(eigenvalues) @ q.T
    b = torch.randn(n, generator=gen, dtype=torch.float64)
    return Q, b, torch.linalg.solve(Q, b), float(eigenvalues.max())
