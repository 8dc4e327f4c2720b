"""LARS (experiments/lars.py): two steps equal You et al.'s update written out by hand, a
layer's step does not depend on the scale of its gradient, a zero layer takes the plain
SGD step, and optimizer.name=lars runs through the harness as the base "LARS"."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from experiments.lars import LARS
from experiments.run import execute
from experiments.validation import validate


def linear_loss_step(opt: LARS, w: torch.Tensor, v: torch.Tensor) -> None:
    """One step on L(w) = v . w, whose gradient is v everywhere."""
    opt.zero_grad()
    (w * v).sum().backward()
    opt.step()


@pytest.mark.parametrize("nesterov", [False, True])
def test_two_steps_equal_the_update_written_out(nesterov):
    lr, m, beta, eta = 0.5, 0.9, 0.1, 1e-3
    w = torch.tensor([3.0, 4.0], dtype=torch.float64, requires_grad=True)
    v = torch.tensor([0.6, 0.8], dtype=torch.float64) * 2.0  # ||g|| = 2
    opt = LARS([w], lr=lr, momentum=m, nesterov=nesterov, weight_decay=beta, trust_coefficient=eta)

    x, buf = [3.0, 4.0], None
    for _ in range(2):
        norm = math.hypot(*x)
        trust = eta * norm / (2.0 + beta * norm)
        d = [trust * (g + beta * xi) for g, xi in zip((1.2, 1.6), x)]
        buf = d if buf is None else [m * b + di for b, di in zip(buf, d)]
        step = [di + m * b for di, b in zip(d, buf)] if nesterov else buf
        x = [xi - lr * s for xi, s in zip(x, step)]
        linear_loss_step(opt, w, v)
        assert w.tolist() == pytest.approx(x, rel=1e-15, abs=0)


def test_a_layers_step_does_not_depend_on_its_gradients_scale():
    moved = []
    for scale in (1e-3, 1.0, 1e3):
        w = torch.tensor([1.0, -2.0, 2.0], dtype=torch.float64, requires_grad=True)
        linear_loss_step(LARS([w], lr=1.0, trust_coefficient=0.01), w, scale * torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64))
        moved.append(w.detach().clone())
    # lr * eta * ||w|| * g / ||g||: 0.01 * 3 along (1, 0, 1) / sqrt(2), whatever the scale.
    expected = torch.tensor([1.0, -2.0, 2.0], dtype=torch.float64) - 0.03 * torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64) / math.sqrt(2)
    for w in moved:
        torch.testing.assert_close(w, expected, rtol=1e-14, atol=1e-15)


def test_a_zero_layer_takes_the_plain_sgd_step():
    b = torch.zeros(3, dtype=torch.float64, requires_grad=True)  # a bias initialised to zero
    g = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    linear_loss_step(LARS([b], lr=0.1), b, g)
    torch.testing.assert_close(b.detach(), -0.1 * g, rtol=0, atol=0)


def test_lars_is_a_base_optimizer_of_the_harness(compose, data_root, tmp_path):
    lars = ("optimizer.name=lars", "optimizer.fused=null", "optimizer.momentum=0.9", "optimizer.lr=1.0", "train.epochs=2", "train.threads=1")
    assert validate(compose(*lars)).variant == "LARS"
    assert validate(compose("method=extrap_sgd", *lars)).variant == "LARS+EXTRAP"
    rows = pd.read_csv(execute(compose(*lars, f"output.root={tmp_path}")).path / "metrics.csv")
    assert rows["val_loss"].iloc[-1] < 0.5 * rows["val_loss"].iloc[0]  # it trains
