"""LARS, layer-wise adaptive rate scaling (You, Gitman and Ginsburg, "Large batch training of
convolutional networks", 2017): SGD with momentum whose step for each parameter tensor is
scaled by a trust ratio, so that every layer moves by about the same fraction of its norm
whatever its gradient's scale. The large-batch base optimizer of EXTRAP-SGD's paper
(``optimizer.name=lars``; docs/methods.md).

For each parameter tensor w with loss gradient g, weight decay beta, trust coefficient eta,
momentum m and learning rate lr:

    d = g + beta * w
    trust = eta * ||w|| / (||g|| + beta * ||w||)     (1 where ||w|| or ||g|| is 0)
    buf = m * buf + trust * d
    w = w - lr * (trust * d + m * buf if nesterov else buf)

The momentum buffer is torch.optim.SGD's (learning rate outside the buffer, no dampening),
so with trust = 1 this is SGD exactly; You et al. put the learning rate inside the buffer,
which differs only while the learning rate changes.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch
from torch.optim import Optimizer

#: You et al.'s trust coefficient eta.
TRUST_COEFFICIENT = 1e-3


class LARS(Optimizer):
    def __init__(self, params: Iterable[Any], lr: float, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0, trust_coefficient: float = TRUST_COEFFICIENT):
        if not lr > 0:
            raise ValueError(f"LARS: lr must be > 0, got {lr!r}")
        if momentum < 0 or weight_decay < 0:
            raise ValueError(f"LARS: momentum and weight_decay must be >= 0, got {momentum!r}, {weight_decay!r}")
        if nesterov and momentum <= 0:
            raise ValueError("LARS: nesterov needs momentum > 0")
        if not trust_coefficient > 0:
            raise ValueError(f"LARS: trust_coefficient must be > 0, got {trust_coefficient!r}")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient)
        super().__init__(params, defaults)

    @staticmethod
    def trust_ratio(w: torch.Tensor, g: torch.Tensor, weight_decay: float, trust_coefficient: float) -> torch.Tensor:
        """eta * ||w|| / (||g|| + beta * ||w||), or 1 where either norm is 0 (a zero layer,
        or one without gradient, is left to the plain learning rate)."""
        w_norm, g_norm = torch.linalg.vector_norm(w), torch.linalg.vector_norm(g)
        ratio = trust_coefficient * w_norm / (g_norm + weight_decay * w_norm)
        return torch.where((w_norm > 0) & (g_norm > 0), ratio, torch.ones_like(ratio))

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum, beta = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                direction = g.add(p, alpha=beta) if beta else g.clone()
                direction.mul_(self.trust_ratio(p, g, beta, group["trust_coefficient"]))
                if momentum:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = direction.clone()
                    else:
                        state["momentum_buffer"].mul_(momentum).add_(direction)
                    buffer = state["momentum_buffer"]
                    direction = direction.add(buffer, alpha=momentum) if group["nesterov"] else buffer
                p.add_(direction, alpha=-lr)
        return loss
