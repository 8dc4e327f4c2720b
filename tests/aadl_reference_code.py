"""A direct, dense transcription of the authors' AADL (ORNL/AADL, ``AADL/accelerate.py``
and ``AADL/anderson_acceleration.py`` at commit 9765262), in numpy.

Written from reading that code, step for step in its order and with its data structures
(a deque of the last ``history_depth`` stored vectors per parameter group, the columns
re-formed from them at every acceleration, an averaging deque of the same depth), so that
``AndersonAcceleration(..., variant="reference_code")``, which keeps ring buffers and the
library's solvers and kernels, can be checked against it. Deliberately naive.

Mapping to the library's settings: ``history_depth = history + 2``,
``store_each_nth = store_every``, ``wait_iterations = warmup``, ``acceleration_type``
``anderson`` (QR least squares) = ``solver="qr"`` and ``anderson_normal_equation`` =
``solver="gram"``; ``loss=None`` is the code called without a closure.
"""

from __future__ import annotations

from collections import deque

import numpy as np


def anderson_step(X: np.ndarray, relaxation: float, regularization: float, normal_equations: bool) -> np.ndarray:
    """The code's extrapolation from the matrix X whose columns are the stored vectors,
    X[:, i + 1] standing for G(X[:, i]); returns the point replacing X[:, -1]."""
    DX = X[:, 1:] - X[:, :-1]
    DR = DX[:, 1:] - DX[:, :-1]
    rhs = DX[:, -1]
    h = DR.shape[1]
    if normal_equations:
        gamma = np.linalg.solve(DR.T @ DR + regularization * np.eye(h), DR.T @ rhs)
    elif regularization == 0.0:
        gamma = np.linalg.lstsq(DR, rhs, rcond=None)[0]
    else:
        A = np.vstack([DR, np.sqrt(regularization) * np.eye(h)])
        gamma = np.linalg.lstsq(A, np.concatenate([rhs, np.zeros(h)]), rcond=None)[0]
    extrapolated = X[:, -2] + DX[:, -1] - (DX[:, :-1] + DR) @ gamma
    if relaxation != 1:
        # The code's damping: the constrained combination alpha of X[:, :-1] with sum 1.
        alpha = np.zeros(h + 1)
        alpha[0] = gamma[0]
        alpha[1:-1] = gamma[1:] - gamma[:-1]
        alpha[-1] = 1 - gamma[-1]
        extrapolated = relaxation * extrapolated + (1 - relaxation) * X[:, :-1] @ alpha
    return extrapolated


def reference_code_aadl(
    w0: np.ndarray,
    base_step,
    loss,
    steps: int,
    *,
    groups=None,
    history=10,
    frequency=1,
    store_every=1,
    relaxation=1.0,
    regularization=0.0,
    warmup=0,
    average=False,
    solver="gram",
):
    """Iterates of the authors' AADL on the fixed-point map ``base_step`` (w -> w_after).

    ``groups``: the (start, stop) rows of each parameter group (default: one group).
    ``loss``: the closure (None: called without one). Returns the parameters after every
    step and the counters.
    """
    depth = history + 2
    w = np.array(w0, dtype=np.float64)
    groups = [(0, w.size)] if groups is None else groups
    acc_hist = [deque([], maxlen=depth) for _ in groups]
    avg_hist = [deque([], maxlen=depth) for _ in groups]
    store_counter = call_counter = 0
    counts = {"aa_attempts": 0, "aa_accepted": 0, "averages_applied": 0}
    trajectory = []
    for _ in range(steps):
        w = np.array(base_step(w), dtype=np.float64)
        if average:  # averaged_accelerated_step: the average comes first
            for (a, b), hist in zip(groups, avg_hist):
                hist.append(w[a:b].copy())
            averaged = False
            for (a, b), hist in zip(groups, avg_hist):
                X = np.stack(list(hist), axis=1)
                mean = X.mean(axis=1)
                with np.errstate(divide="ignore", invalid="ignore"):
                    std = X.std(axis=1, ddof=1) if X.shape[1] > 1 else np.full(X.shape[0], np.nan)
                    fire = np.max(std) / np.max(mean) > 0.1
                if fire:
                    w[a:b] = mean
                    averaged = True
            counts["averages_applied"] += averaged
        store_counter += 1
        if store_counter >= store_every:
            store_counter = 0
            for (a, b), hist in zip(groups, acc_hist):
                hist.append(w[a:b].copy())
        call_counter += 1
        if call_counter > warmup and call_counter % frequency == 0:
            for (a, b), hist in zip(groups, acc_hist):
                if len(hist) < 3:
                    continue
                counts["aa_attempts"] += 1
                acc = anderson_step(np.stack(list(hist), axis=1), relaxation, regularization, solver == "gram")
                if loss is not None:
                    orig_loss = loss(w)
                w[a:b] = acc
                if loss is None:
                    counts["aa_accepted"] += 1
                elif loss(w) < orig_loss:
                    hist.pop()
                    hist.append(acc.copy())
                    counts["aa_accepted"] += 1
                else:
                    w[a:b] = hist[-1]
        trajectory.append(w.copy())
    return trajectory, counts


class NumpyAdam:
    """torch.optim.Adam's update (defaults: betas 0.9, 0.999, eps 1e-8) as a fixed-point
    map w -> w_after, its moments carried from call to call like the optimizer's state."""

    def __init__(self, grad, lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.grad, self.lr, self.betas, self.eps = grad, lr, betas, eps
        self.m = self.v = None
        self.t = 0

    def __call__(self, w: np.ndarray) -> np.ndarray:
        g = self.grad(w)
        b1, b2 = self.betas
        if self.m is None:
            self.m, self.v = np.zeros_like(w), np.zeros_like(w)
        self.t += 1
        self.m = self.m + (1 - b1) * (g - self.m)
        self.v = self.v * b2 + (1 - b2) * g * g
        denom = np.sqrt(self.v) / np.sqrt(1 - b2**self.t) + self.eps
        return w - (self.lr / (1 - b1**self.t)) * self.m / denom
