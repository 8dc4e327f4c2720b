"""The moving-average criterion and the loss safeguard on constructed sequences."""

import math

import numpy as np
import pytest
import torch

import aadl.optimizer as optimizer_module
from aadl import AndersonAcceleration
from aadl.solvers import LeastSquaresSolution
from aadl_problems import quadratic

NEVER = 10**9  # a frequency that never comes: averaging alone


class ScriptedSteps(torch.optim.Optimizer):
    """A base optimizer whose k-th step adds the k-th scripted increment: r_k is known."""

    def __init__(self, params, increments):
        super().__init__(params, {})
        self.increments = [torch.as_tensor(d, dtype=torch.float64) for d in increments]
        self.k = 0

    @torch.no_grad()
    def step(self, closure=None):
        (p,) = self.param_groups[0]["params"]
        p.add_(self.increments[self.k])
        self.k += 1


def scripted(increments, start, **settings):
    w = torch.tensor(start, dtype=torch.float64, requires_grad=True)
    opt = AndersonAcceleration(ScriptedSteps([w], increments), frequency=NEVER, average=True, **settings)
    values = []
    for _ in increments:
        opt.step()
        values.append(w.detach().clone().numpy())
    return np.array(values), opt


# Entry 0 climbs by 1 per step, entry 1 stays put. With t = 3 the first full buffer is
# [1, 2, 3]: population std sqrt(2/3) = 0.8165 against eps * max|r_3| = eps * 1.
@pytest.mark.parametrize("eps, fires", [(0.80, True), (0.82, False)])
def test_residual_criterion_fires_exactly_above_threshold(eps, fires):
    values, opt = scripted([[1.0, 0.0]] * 3, [0.0, 5.0], average_window=3, average_threshold=eps)
    assert opt.stats.averages_applied == int(fires)
    expected_last = [2.0, 5.0] if fires else [3.0, 5.0]  # the buffer mean, or the plain step
    np.testing.assert_allclose(values[-1], expected_last)
    np.testing.assert_allclose(values[:2], [[1.0, 5.0], [2.0, 5.0]])  # buffer not full yet


def test_residual_criterion_uses_the_current_residual():
    """Buffer [1, 1.5, 3.5] has population std sqrt(7/6) = 1.0801; the last step is
    r_3 = 2, so the criterion fires for eps < 0.54 and not above."""
    increments = [[1.0, 0.0], [0.5, 0.0], [2.0, 0.0]]
    _, opt = scripted(increments, [0.0, 0.0], average_window=3, average_threshold=0.53)
    assert opt.stats.averages_applied == 1
    _, opt = scripted(increments, [0.0, 0.0], average_window=3, average_threshold=0.55)
    assert opt.stats.averages_applied == 0


def test_buffer_holds_post_step_iterates_not_averaged_ones():
    """eps = 0.3: step 3 averages [1, 2, 3] -> 2; step 4 goes to 3 and its buffer is
    [2, 3, 3] (post-step values; 3, not the averaged 2, is kept), whose spread 0.471 > 0.3
    fires again: the parameters become 8/3. Had the averaged value been stored, the
    buffer would be [2, 2, 3] and the mean 7/3."""
    values, opt = scripted([[1.0]] * 4, [0.0], average_window=3, average_threshold=0.3)
    np.testing.assert_allclose(values[:, 0], [1.0, 2.0, 2.0, 8.0 / 3.0])
    assert opt.stats.averages_applied == 2


@pytest.mark.parametrize("eps, fires", [(0.09, True), (0.11, False)])
def test_reference_code_criterion(eps, fires):
    """Buffer [[1, 10], [2, 10], [3, 10]]: max sample std 1 over max mean 10 = 0.1."""
    _, opt = scripted(
        [[1.0, 0.0]] * 3, [0.0, 10.0], average_window=3, average_threshold=eps,
        average_criterion="reference_code",
    )
    assert opt.stats.averages_applied == int(fires)


def test_window_defaults_to_history():
    _, opt = scripted([[1.0]] * 4, [0.0], history=4, average_threshold=1e-3)
    assert opt.stats.averages_applied == 1  # first full buffer at step 4


# -- safeguard --------------------------------------------------------------------------


def safeguarded_run(closure_sign=1.0, steps=12, **settings):
    """SGD + AA on a quadratic where AA (m = 3 < n = 6) sometimes loses to the plain step.

    Records, per step, the losses the closure reported (plain point, then AA point),
    whether the step was accepted, the value step() returned and the loss afterwards."""
    Q, b, _, largest = quadratic(6, seed=3, condition=20.0)
    w = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    opt = AndersonAcceleration(torch.optim.SGD([w], lr=1.0 / largest), history=3, **settings)
    f = lambda: 0.5 * w @ Q @ w - b @ w  # noqa: E731
    calls = []
    closure = lambda: calls.append(closure_sign * float(f())) or closure_sign * f()  # noqa: E731
    records = []
    for _ in range(steps):
        opt.zero_grad()
        f().backward()
        calls.clear()
        accepted_before = opt.stats.aa_accepted
        returned = opt.step(closure)
        records.append(
            dict(
                losses=list(calls),
                accepted=opt.stats.aa_accepted > accepted_before,
                returned=None if returned is None else float(returned),
                after=closure_sign * float(f().detach()),
                w=w.detach().clone(),
            )
        )
    return records, opt


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_safeguard_keeps_the_aa_point_exactly_when_its_loss_is_lower(sign):
    """sign -1 reverses the closure, so the usual winners become losers."""
    records, opt = safeguarded_run(sign)
    assert records[0]["losses"] == [] and records[0]["returned"] is None  # no history yet
    outcomes = set()
    for r in records[1:]:
        plain, accelerated = r["losses"]
        assert r["accepted"] == (accelerated < plain)
        assert r["returned"] == pytest.approx(accelerated if r["accepted"] else plain, rel=1e-12)
        assert r["after"] == pytest.approx(r["returned"], rel=1e-12)  # loss at the kept point
        outcomes.add(r["accepted"])
    # Both branches ran (with the reversed closure AA's usual wins are all rejected).
    assert outcomes == ({True, False} if sign > 0 else {False})
    assert opt.stats.aa_attempts == len(records) - 1


def test_rejected_steps_leave_exactly_the_base_optimizer_step():
    """A closure that always reports +inf for the second point rejects every AA step;
    the iterates are then bitwise those of the base optimizer alone."""
    Q, b, _, largest = quadratic(6, seed=3, condition=20.0)

    def run(wrapped):
        w = torch.zeros(6, dtype=torch.float64, requires_grad=True)
        base = torch.optim.SGD([w], lr=1.0 / largest)
        opt = AndersonAcceleration(base, history=3) if wrapped else base
        count = {"n": 0}

        def closure():
            count["n"] += 1
            return 0.0 if count["n"] % 2 else math.inf

        for _ in range(6):
            opt.zero_grad()
            (0.5 * w @ Q @ w - b @ w).backward()
            opt.step(closure) if wrapped else opt.step()
        return w.detach(), opt

    (wrapped, opt), (plain, _) = run(True), run(False)
    assert opt.stats.aa_attempts == 5 and opt.stats.aa_accepted == 0
    assert torch.equal(wrapped, plain)


def test_non_finite_aa_loss_is_rejected():
    calls = {"n": 0}
    Q, b, _, largest = quadratic(6, seed=3, condition=20.0)
    w = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    opt = AndersonAcceleration(torch.optim.SGD([w], lr=1.0 / largest), history=3)

    def closure():  # plain point first, then the AA point: the AA point's loss is NaN
        calls["n"] += 1
        value = 0.5 * w @ Q @ w - b @ w
        return value if calls["n"] % 2 else value * math.nan

    for _ in range(5):
        opt.zero_grad()
        (0.5 * w @ Q @ w - b @ w).backward()
        opt.step(closure)
    assert opt.stats.aa_attempts == 4 and opt.stats.aa_accepted == 0
    assert torch.isfinite(w).all()


@pytest.mark.parametrize("bad", [math.nan, 1e300])
def test_non_finite_coefficients_or_candidate_are_rejected_without_a_closure(monkeypatch, bad):
    """NaN coefficients, or finite ones so large that w_AA overflows float32."""
    def poisoned(gram, rhs, lam):
        return LeastSquaresSolution(torch.full((gram.shape[0],), bad, dtype=torch.float64), 1.0, "gram")

    monkeypatch.setattr(optimizer_module, "solve_normal_equations", poisoned)
    w = torch.ones(4, requires_grad=True)
    opt = AndersonAcceleration(torch.optim.SGD([w], lr=0.1), history=2, safeguard="none")
    for _ in range(4):
        opt.zero_grad()
        (w**2).sum().backward()
        opt.step()
    assert opt.stats.aa_attempts == 3 and opt.stats.aa_accepted == 0
    assert torch.allclose(w.detach(), torch.full((4,), 0.8**4))  # four plain SGD steps


def test_an_equal_loss_is_not_strictly_lower_so_the_plain_step_is_kept():
    w = torch.ones(5, dtype=torch.float64, requires_grad=True)
    opt = AndersonAcceleration(torch.optim.SGD([w], lr=0.1), history=2)
    for _ in range(4):
        opt.zero_grad()
        (w**4).sum().backward()
        assert opt.step(lambda: torch.tensor(1.0)) in (None, 1.0)
    assert opt.stats.aa_attempts == 3 and opt.stats.aa_accepted == 0
