"""A safeguard's evaluation at a kept AA candidate serves as the next step's forward
(experiments.step.KeptForward) where that is exact: the runs are bit for bit those of the
path that evaluates again, with fewer loss evaluations."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from experiments.problems.burgers.problem import BurgersProblem
from experiments.results import FINAL_MODEL_FILE, TIMING_COLUMNS
from experiments.run import execute

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")

# p = 1 and no redraw for 16 iterations: a safeguard every step, the candidate often kept.
SMALL = (
    "experiment=burgers2d", "train.iterations=16", "train.eval_every=4", "problem.n_boundary=40",
    "problem.n_collocation=160", "problem.resample_every=8", "problem.grid_x=16", "problem.grid_t=5",
    "method.aadl.frequency=1", "method.aadl.store_every=1", "method.aadl.history=3", "train.threads=1",
)


def counted_run(compose, monkeypatch, root, *overrides, reuse: bool):
    """One run's directory and the number of loss evaluations it made."""
    calls = {"n": 0}
    loss = BurgersProblem.loss

    def counting(self, model, batch):
        calls["n"] += 1
        return loss(self, model, batch)

    with monkeypatch.context() as patch:
        patch.setattr(BurgersProblem, "loss", counting)
        patch.setattr(BurgersProblem, "pure_loss", reuse)
        outcome = execute(compose(*SMALL, *overrides, f"output.root={root}"))
    return outcome, calls["n"]


@pytest.mark.parametrize("derivatives", ["reverse", "forward"])
@pytest.mark.parametrize("method", ["method=aadl", "method=aadl_ma"])
def test_reusing_the_kept_candidates_forward_changes_no_bit(compose, monkeypatch, tmp_path, method, derivatives):
    runs = {}
    for reuse in (False, True):
        runs[reuse] = counted_run(compose, monkeypatch, tmp_path / str(reuse), method, f"problem.derivatives={derivatives}", reuse=reuse)
    (fresh, fresh_calls), (reused, reused_calls) = runs[False], runs[True]
    a, b = (pd.read_csv(o.path / "metrics.csv") for o in (fresh, reused))
    timing = [c for c in TIMING_COLUMNS if c in a]
    pd.testing.assert_frame_equal(a.drop(columns=timing), b.drop(columns=timing), check_exact=True)
    assert int(a["aa_accepted"].iloc[-1]) > 0
    pa, pb = (torch.load(o.path / FINAL_MODEL_FILE, weights_only=True) for o in (fresh, reused))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    # Each kept candidate on an unchanged batch saves one forward (never one across a redraw
    # or, with averaging, after an average wrote the parameters).
    assert reused_calls < fresh_calls
