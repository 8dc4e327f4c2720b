"""The wrapper's iterates equal a dense transcription of the contract, step by step."""

import numpy as np
import pytest
import torch

from aadl import AndersonAcceleration
from aadl_problems import LogisticProblem, quadratic, run_wrapper
from aadl_reference import reference_aadl

SETTINGS = {
    "m5 p1 q1": dict(history=5),
    "m3 p2 q1 beta0.5 lam": dict(history=3, frequency=2, relaxation=0.5, regularization=1e-3),
    "m4 p3 q2 beta0.7 warmup": dict(history=4, frequency=3, store_every=2, relaxation=0.7, warmup=3),
    "m2 p1 q3 (accelerate without storing)": dict(history=2, frequency=1, store_every=3),
    "paper_eq6 beta0.5": dict(history=5, relaxation=0.5, mixing="paper_eq6"),
    "safeguard none": dict(history=4, safeguard="none", relaxation=0.9),
    "qr solver": dict(history=5, frequency=2, solver="qr", relaxation=0.6),
    "average residual": dict(history=4, average=True, average_threshold=1e-3),
    "average reference_code t3": dict(
        history=4, average=True, average_window=3, average_criterion="reference_code",
        average_threshold=0.05,
    ),
}


@pytest.mark.parametrize("settings", SETTINGS.values(), ids=SETTINGS.keys())
def test_iterates_match_reference_transcription(settings):
    problem = LogisticProblem(seed=1)
    steps = 30
    ours, opt = run_wrapper(problem, steps, **settings)
    expected, counts = reference_aadl(
        problem.w0, problem.base_step_np, problem.loss_np, steps,
        **{k: v for k, v in settings.items() if k != "solver"},
    )
    for k, (a, b) in enumerate(zip(ours, expected), start=1):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10, err_msg=f"step {k}")
    stats = opt.stats.as_dict()
    assert {key: stats[key] for key in counts} == counts
    assert stats["steps"] == steps
    assert counts["aa_attempts"] > 0


def test_reference_counts_are_nontrivial():
    """The settings above exercise acceptance, rejection and averaging at least once."""
    problem = LogisticProblem(seed=1)
    totals = {"accepted": 0, "rejected": 0, "averages": 0}
    for settings in SETTINGS.values():
        _, c = reference_aadl(
            problem.w0, problem.base_step_np, problem.loss_np, 30,
            **{k: v for k, v in settings.items() if k != "solver"},
        )
        totals["accepted"] += c["aa_accepted"]
        totals["rejected"] += c["aa_attempts"] - c["aa_accepted"]
        totals["averages"] += c["averages_applied"]
    assert all(v > 0 for v in totals.values()), totals


@pytest.mark.parametrize("solver", ["gram", "qr"])
def test_linear_fixed_point_reaches_minimiser_in_n_plus_2_steps(solver):
    """On a linear fixed-point map AA(m >= n) is GMRES: exact after n + 2 steps.

    (Exact arithmetic needs n + 1. The Krylov basis AA builds is ill-conditioned, so in
    float64 the last digits arrive a step or two later the wider the spectrum: with
    condition 5 the error at n + 2 is ~1e-11, with 50 it is ~1e-6 and ~1e-14 one step
    later; a dense lstsq transcription of the contract shows the same digits.)"""
    n = 20
    Q, b, w_star, largest = quadratic(n, condition=5.0)
    w = torch.zeros(n, dtype=torch.float64, requires_grad=True)
    opt = AndersonAcceleration(
        torch.optim.SGD([w], lr=1.0 / largest), history=n, safeguard="none", solver=solver
    )
    plain = torch.zeros(n, dtype=torch.float64, requires_grad=True)
    sgd = torch.optim.SGD([plain], lr=1.0 / largest)
    for _ in range(n + 2):
        for x, o in ((w, opt), (plain, sgd)):
            o.zero_grad()
            (0.5 * x @ Q @ x - b @ x).backward()
            o.step()
    error = float((w.detach() - w_star).norm() / w_star.norm())
    plain_error = float((plain.detach() - w_star).norm() / w_star.norm())
    assert error < 1e-8
    assert plain_error > 1e-3  # five orders of magnitude from the AA iterate


def test_no_closure_keeps_aa_steps_and_warns_once():
    problem = LogisticProblem(seed=2)
    with pytest.warns(UserWarning, match="needs a closure") as record:
        ours, opt = run_wrapper(problem, 6, closure=False, history=3)
    assert len([w for w in record if "needs a closure" in str(w.message)]) == 1
    expected, counts = reference_aadl(problem.w0, problem.base_step_np, None, 6, history=3)
    np.testing.assert_allclose(ours[-1], expected[-1], rtol=1e-9)
    assert opt.stats.aa_accepted == opt.stats.aa_attempts == counts["aa_attempts"] == 5
