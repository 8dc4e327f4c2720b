"""The loss closure: clear errors for the usual mistakes, and a closure that fails at the
AA point never leaves the unchecked candidate in the parameters."""

import copy

import numpy as np
import pytest
import torch

from aadl import AndersonAcceleration

LR = 0.1


def make(seed=0, **settings):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = AndersonAcceleration(torch.optim.SGD(model.parameters(), lr=LR), history=3, **settings)
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(32, 4, generator=gen), torch.randn(32, 1, generator=gen)
    return model, opt, lambda: torch.nn.functional.mse_loss(model(x), y)


def step(opt, loss_fn, closure):
    opt.zero_grad()
    loss_fn().backward()
    return opt.step(closure)


def test_closure_returning_none_is_a_type_error_saying_what_it_must_return():
    _, opt, loss_fn = make()
    step(opt, loss_fn, loss_fn)  # k=1 stores the first pair; k=2 accelerates
    with pytest.raises(TypeError) as error:
        step(opt, loss_fn, lambda: None)
    message = str(error.value)
    assert message.startswith("AndersonAcceleration: the closure returned None")
    assert "must only compute and return the loss" in message
    assert "scalar tensor or a number" in message and "torch.no_grad()" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "value, shown",
    [(torch.ones(5), "shape (5,)"), ("0.5", "a str"), (True, "a bool"), ((1.0,), "a tuple")],
    ids=["vector", "str", "bool", "tuple"],
)
def test_closure_returning_no_scalar_is_a_type_error(value, shown):
    _, opt, loss_fn = make()
    step(opt, loss_fn, loss_fn)
    with pytest.raises(TypeError, match="closure returned .*" + shown.replace("(", r"\(").replace(")", r"\)")):
        step(opt, loss_fn, lambda: value)


@pytest.mark.parametrize(
    "make_value",
    [lambda loss: loss, lambda loss: float(loss), lambda loss: np.float32(loss), lambda loss: loss.reshape(1)],
    ids=["tensor", "float", "numpy", "one-element"],
)
def test_scalar_losses_of_every_kind_are_accepted(make_value):
    _, opt, loss_fn = make()
    for _ in range(4):
        step(opt, loss_fn, lambda: make_value(loss_fn()))
    assert opt.stats.aa_attempts == 3


def test_torch_style_closure_with_backward_is_explained():
    _, opt, loss_fn = make()

    def torch_style_closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    step(opt, loss_fn, loss_fn)
    with pytest.raises(RuntimeError) as error:
        step(opt, loss_fn, torch_style_closure)
    message = str(error.value)
    assert message.startswith("AndersonAcceleration: the closure failed with")
    assert "does not require grad" in message and "must only compute and return the loss" in message
    assert "backward() is the caller's, done before step()" in message
    assert isinstance(error.value.__cause__, RuntimeError)
    assert "does not require grad" in str(error.value.__cause__)


def test_other_errors_in_the_closure_pass_through_unchanged():
    _, opt, loss_fn = make()
    original = RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    def broken():
        raise original

    step(opt, loss_fn, loss_fn)
    with pytest.raises(RuntimeError) as error:
        step(opt, loss_fn, broken)
    assert error.value is original


class FailsAtTheAAPoint(Exception):
    pass


@pytest.mark.parametrize("failure", ["raises", "returns None"])
def test_closure_failing_at_the_aa_point_restores_the_plain_step(failure):
    """The plain step w_k + r_k is where the parameters stand when the safeguard cannot
    judge the candidate; the candidate must not survive the exception."""
    model, opt, loss_fn = make()
    for _ in range(3):
        step(opt, loss_fn, loss_fn)
    attempts, accepted = opt.stats.aa_attempts, opt.stats.aa_accepted
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:  # the second call of the step: at the AA candidate
            if failure == "raises":
                raise FailsAtTheAAPoint
            return None
        return loss_fn()

    opt.zero_grad()
    loss_fn().backward()
    with torch.no_grad():  # SGD's own update, done the same way: w_k + r_k
        expected = [torch.add(p, p.grad, alpha=-LR) for p in model.parameters()]
    with pytest.raises(FailsAtTheAAPoint if failure == "raises" else TypeError):
        opt.step(closure)
    assert len(calls) == 2
    for p, e in zip(model.parameters(), expected):
        assert torch.equal(p.detach(), e)
    # The attempt was made and not accepted; the step counts.
    assert opt.stats.steps == 4
    assert opt.stats.aa_attempts == attempts + 1 and opt.stats.aa_accepted == accepted
    # Training goes on from there as after a rejected candidate.
    for _ in range(3):
        step(opt, loss_fn, loss_fn)
    assert opt.stats.aa_attempts == attempts + 4


@pytest.mark.parametrize("average", [False, True], ids=["plain", "average"])
def test_a_failed_candidate_completes_the_step_as_a_rejected_one(average):
    """A failure at the AA point ends where a rejection would: same parameters, counters,
    history and moving average; only the error is added."""
    settings = dict(average=True, average_window=2, average_threshold=1e-6) if average else {}
    runs = []
    for failure in (False, True):
        model, opt, loss_fn = make(**settings)
        for _ in range(3):
            step(opt, loss_fn, loss_fn)
        calls = []

        def closure():
            calls.append(1)
            if len(calls) == 2:
                if failure:
                    raise FailsAtTheAAPoint
                return torch.tensor(float("inf"))  # rejected by the safeguard
            return loss_fn()

        try:
            step(opt, loss_fn, closure)
        except FailsAtTheAAPoint:
            assert failure
        else:
            assert not failure
        runs.append(([p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict())))
    (params_a, state_a), (params_b, state_b) = runs
    for a, b in zip(params_a, params_b):
        assert torch.equal(a, b)
    a, b = state_a["anderson"], state_b["anderson"]
    assert a["stats"] == b["stats"]
    assert torch.equal(a["history"]["X"], b["history"]["X"])
    if average:
        assert a["average"]["count"] == b["average"]["count"] == 2
        assert torch.equal(a["average"]["buffer"], b["average"]["buffer"])
        assert a["stats"]["averages_applied"] > 0


def test_the_error_is_raised_once():
    _, opt, loss_fn = make()
    for _ in range(3):
        step(opt, loss_fn, loss_fn)
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:
            raise FailsAtTheAAPoint
        return loss_fn()

    with pytest.raises(FailsAtTheAAPoint):
        step(opt, loss_fn, closure)
    step(opt, loss_fn, loss_fn)  # the next step does not raise it again


def test_frozen_buffers_keep_batchnorm_statistics_through_the_safeguard():
    """Two safeguard evaluations per AA step leave the running statistics as the training
    forward set them; without frozen_buffers they move (the test would see it)."""
    from aadl import AndersonAcceleration
    from aadl.closure import frozen_buffers

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))
    x, y = torch.randn(16, 3), torch.randn(16, 1)
    opt = AndersonAcceleration(torch.optim.SGD(model.parameters(), lr=0.1), history=3)

    def loss_fn():
        return torch.nn.functional.mse_loss(model(x), y)

    def frozen_closure():
        with frozen_buffers(model):
            return loss_fn()

    moved = False
    for _ in range(6):
        opt.zero_grad()
        loss_fn().backward()
        after_forward = [b.clone() for b in model.buffers()]
        opt.step(frozen_closure)
        assert all(torch.equal(a, b) for a, b in zip(after_forward, model.buffers()))
        moved |= opt.stats.aa_attempts > 0
    assert moved  # the closure did run at AA steps
    before = [b.clone() for b in model.buffers()]
    loss_fn()
    assert not all(torch.equal(a, b) for a, b in zip(before, model.buffers()))  # a plain forward moves them
