"""Calling the user's loss closure, with errors that say what the closure got wrong.

AndersonAcceleration's closure is not torch.optim's: it only computes the loss (the
caller has already run backward at w_k) and it is called under ``torch.no_grad()`` by the
safeguard. The two usual mistakes, a closure that returns nothing and a torch-style
closure that runs backward, otherwise fail deep inside the step with messages
(``float() argument ... NoneType``, ``element 0 of tensors does not require grad``) that
point nowhere near the closure.
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

CONTRACT = (
    "AndersonAcceleration's closure is a loss-only closure, called under torch.no_grad() at "
    "the plain and at the AA point: it must only compute and return the loss (a scalar "
    "tensor or a number); backward() is the caller's, done before step(), e.g. "
    "`opt.zero_grad(); loss_fn().backward(); opt.step(loss_fn)`"
)
# Autograd's message for backward() or autograd.grad() on a tensor made under no_grad.
_BACKWARD_UNDER_NO_GRAD = "does not require grad"


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor of shape {tuple(value.shape)}"
    return "None" if value is None else f"a {type(value).__name__}"


def _is_scalar_loss(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and not value.is_complex()
    if isinstance(value, np.ndarray):
        return value.size == 1 and np.isrealobj(value)
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def evaluate_loss(closure: Callable[[], Any]) -> Any:
    """``closure()``, checked to be a scalar loss; the value is returned unchanged."""
    try:
        loss = closure()
    except RuntimeError as error:
        if _BACKWARD_UNDER_NO_GRAD in str(error):
            raise RuntimeError(
                f"AndersonAcceleration: the closure failed with '{error}', which is what "
                f"backward() raises under torch.no_grad(): {CONTRACT}"
            ) from error
        raise
    if not _is_scalar_loss(loss):
        raise TypeError(f"AndersonAcceleration: the closure returned {_describe(loss)}; {CONTRACT}")
    return loss


@contextlib.contextmanager
def frozen_buffers(module: torch.nn.Module) -> Iterator[None]:
    """Run a loss-only closure without changing ``module``'s buffers.

    A network with BatchNorm in training mode updates its running statistics on every
    forward pass, so each safeguard evaluation (two per AA step) would count as a training
    batch, at the plain and at the AA point. The buffers are copied before and restored
    after: the closure still normalises with the batch's own statistics, as training does.
    """
    saved = [(buffer, buffer.detach().clone()) for buffer in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)
