"""Backward SGD (method=bsgd) on mean estimation, where every iterate has a closed form:
forward and backward iterates equal their formulas, the windowed variant with W >= n is
exact backward SGD, replayed batches are bit-identical on every replayable problem, a
resumed run is bit-identical, settings other than the paper's are refused naming the key,
and whole runs complete with the step norms the method is about (backward decays
geometrically, forward plateaus)."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import REPO_ROOT
from experiments.errors import ConfigError
from experiments.methods import bsgd
from experiments.methods.bsgd import BackwardSGD, planned_gradients
from experiments.parallel import DataParallel
from experiments.problems.mean_estimation.problem import MeanEstimation, MeanEstimationConfig
from experiments.step import StepContext
from experiments.training import build_state, train
from experiments.validation import validate

H = 0.1  # the learning rate of every closed-form test
MEAN = ("experiment=mean_estimation", f"optimizer.lr={H}", "problem.dims=2", "problem.initial=3.0")


def trajectory(compose, *overrides: str) -> tuple[MeanEstimation, torch.Tensor, torch.Tensor, list[dict]]:
    """(problem, w after steps 0..n as rows, forward iterates 0..n, metrics rows) of one
    mean-estimation run trained in this process (eval_every=1: a row per step)."""
    run = validate(compose(*MEAN, "train.eval_every=1", *overrides))
    problem = run.problem_class(run.problem_config, data_root=Path("."), seed=run.config.seed, device=torch.device("cpu"))
    state = build_state(problem, run)
    model, optimizer = state.model, state.optimizer
    parameters, forward, rows = [], [], []

    def on_evaluation(row: dict) -> None:
        parameters.append(model.w.detach().clone())
        is_bsgd = isinstance(optimizer, BackwardSGD) and optimizer.forward
        forward.append(optimizer.forward[-1][0].clone() if is_bsgd else model.w.detach().clone())
        rows.append(row)

    train(problem, run, state, on_evaluation=on_evaluation)
    return problem, torch.stack(parameters), torch.stack(forward), rows


def forward_closed_form(w0: float, x: torch.Tensor, h: float) -> torch.Tensor:
    """w_n = (1-h)^n w_0 + h sum_k (1-h)^(n-k) x_k for n = 0..len(x)."""
    out = [torch.full_like(x[0], w0)]
    for n in range(1, len(x) + 1):
        k = torch.arange(1, n + 1, dtype=torch.float64)
        out.append((1 - h) ** n * w0 + h * ((1 - h) ** (n - k))[:, None].mul(x[:n]).sum(0))
    return torch.stack(out)


def backward_closed_form(w0: float, x: torch.Tensor, h: float) -> torch.Tensor:
    """w~_n = (1-h)^n w_0 + h sum_k (1-h)^(k-1) x_k for n = 0..len(x)."""
    out = [torch.full_like(x[0], w0)]
    for n in range(1, len(x) + 1):
        k = torch.arange(1, n + 1, dtype=torch.float64)
        out.append((1 - h) ** n * w0 + h * ((1 - h) ** (k - 1))[:, None].mul(x[:n]).sum(0))
    return torch.stack(out)


# -- closed forms --------------------------------------------------------------------------


def test_forward_and_backward_iterates_equal_their_closed_forms(compose):
    n = 30
    problem, backward, forward, rows = trajectory(compose, "method=bsgd", f"train.iterations={n}")
    x = problem.samples(n)
    torch.testing.assert_close(forward, forward_closed_form(3.0, x, H), rtol=0, atol=1e-13)
    torch.testing.assert_close(backward, backward_closed_form(3.0, x, H), rtol=0, atol=1e-13)
    # The two orders differ (the same batches, other weights), and the columns say what moved.
    assert (backward[-1] - forward[-1]).abs().max() > 1e-2
    for step in range(1, n + 1):
        row = rows[step]
        assert row["gradients"] == planned_gradients(step) == step + step * (step + 1) // 2
        assert row["forward_step_norm"] == pytest.approx(float(torch.linalg.vector_norm(forward[step] - forward[step - 1])), rel=1e-12)
        assert row["backward_step_norm"] == pytest.approx(float(torch.linalg.vector_norm(backward[step] - backward[step - 1])), rel=1e-12)
        # train_loss: the batch's loss at the backward iterate before the step.
        assert row["train_loss"] == pytest.approx(0.5 * float((backward[step - 1] - x[step - 1]).square().sum()), rel=1e-12)
    assert math.isnan(rows[0]["forward_step_norm"]) and rows[0]["gradients"] == 0


def test_the_forward_iterate_is_plain_sgd_bit_for_bit(compose):
    _, _, forward, _ = trajectory(compose, "method=bsgd", "train.iterations=25")
    _, sgd, _, _ = trajectory(compose, "method=none", "optimizer.name=sgd", "train.iterations=25")
    assert torch.equal(forward, sgd)


@pytest.mark.parametrize("window", [20, 35])
def test_a_window_covering_the_run_is_exact_backward_sgd_bit_for_bit(compose, window):
    exact = trajectory(compose, "method=bsgd", "train.iterations=20")
    windowed = trajectory(compose, "method=bsgd", "train.iterations=20", f"method.bsgd.window={window}")
    assert torch.equal(exact[1], windowed[1]) and torch.equal(exact[2], windowed[2])
    assert [r["gradients"] for r in exact[3]] == [r["gradients"] for r in windowed[3]]


def test_a_short_window_restarts_from_the_forward_iterate_w_steps_back(compose):
    n, window = 24, 5
    problem, windowed, forward, rows = trajectory(compose, "method=bsgd", f"train.iterations={n}", f"method.bsgd.window={window}")
    x = problem.samples(n)
    w = forward_closed_form(3.0, x, H)
    torch.testing.assert_close(forward, w, rtol=0, atol=1e-13)
    for step in range(1, n + 1):
        # T_{n-W+1} o ... o T_n (w_{n-W}): batch n first, batch n-W+1 last.
        back = min(step, window)
        expected = w[step - back].clone()
        for k in range(step, step - back, -1):
            expected = expected - H * (expected - x[k - 1])
        torch.testing.assert_close(windowed[step], expected, rtol=0, atol=1e-13)
        assert rows[step]["gradients"] == planned_gradients(step, window)
    # W = 1 is forward SGD itself.
    _, one, forward_one, _ = trajectory(compose, "method=bsgd", f"train.iterations={n}", "method.bsgd.window=1")
    assert torch.equal(one, forward_one)


def test_the_optimizer_keeps_w0_and_keys_never_batches(compose):
    run = validate(compose(*MEAN, "method=bsgd", "train.iterations=12", "method.bsgd.window=4"))
    problem = run.problem_class(run.problem_config, data_root=Path("."), seed=0, device=torch.device("cpu"))
    state = build_state(problem, run)
    train(problem, run, state, on_evaluation=lambda row: None)
    saved = state.optimizer.state_dict()
    assert saved["keys"] == [[9, 0], [10, 0], [11, 0], [12, 0]]  # the last W batches, by (unit, index)
    assert sorted(saved["data_states"]) == [9, 10, 11, 12] and len(saved["forward"]) == 4
    assert torch.equal(saved["initial"][0], torch.full((2,), 3.0, dtype=torch.float64))


# -- replay ----------------------------------------------------------------------------------


def _as_tensors(batch) -> list[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, (tuple, list)):
        return list(batch)
    return [getattr(batch, f.name) for f in fields(batch)]


def _same_batch(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(_as_tensors(a), _as_tensors(b), strict=True))


def _problems(name: str, data_root: Path | None):
    if name == "mean_estimation":
        make = lambda: MeanEstimation(MeanEstimationConfig(dims=3, batch_size=2), data_root=Path("."), seed=4, device="cpu")  # noqa: E731
        return make, 6
    if name == "graduate_admissions":
        from experiments.problems.graduate_admissions.problem import GraduateAdmissions, GraduateAdmissionsConfig

        config = GraduateAdmissionsConfig(batch_size=120, hidden_layers=1, width=4)
        return (lambda: GraduateAdmissions(config, data_root=data_root, seed=4, device=torch.device("cpu"))), 3
    from experiments.problems.burgers.problem import Burgers2D, Burgers2DConfig

    config = Burgers2DConfig(n_boundary=10, n_collocation=20, resample_every=2, width=4, depth=1)
    return (lambda: Burgers2D(config, data_root=Path("."), seed=4, device="cpu")), 7


@pytest.mark.parametrize("name", ["mean_estimation", "graduate_admissions", "burgers2d"])
def test_replay_draws_every_earlier_batch_bit_identically_and_leaves_the_live_order(name, request):
    data_root = request.getfixturevalue("data_root") if name == "graduate_admissions" else None
    make, units = _problems(name, data_root)
    reference = make()
    expected = {(u, i): b for u in range(1, units + 1) for i, b in enumerate(reference.batches(u))}

    live = make()
    model = live.build_model()
    seen: list[tuple[int, int]] = []
    states: dict[int, dict] = {}
    for unit in range(1, units + 1):
        states[unit] = live.state_dict()
        for index, batch in enumerate(live.batches(unit)):  # replays happen inside the live pass
            assert _same_batch(batch, expected[unit, index])
            seen.append((unit, index))
            context = StepContext(problem=live, net=model, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                  parallel=DataParallel(), batch=batch, unit=unit, index=index, unit_data_state=states[unit])
            for key in reversed(seen):  # newest first, as backward SGD replays them
                assert _same_batch(context.replay(key[0], key[1], states[key[0]]), expected[key])


# -- checkpoints ---------------------------------------------------------------------------


@pytest.mark.parametrize("window", ["null", "3"])
def test_a_run_stopped_inside_an_epoch_resumes_bit_identically(compose, data_root, tmp_path, monkeypatch, window):
    from test_experiments_resume import assert_same_run, stop_at_step

    from experiments.run import RunPreempted, execute

    overrides = ("method=bsgd", "optimizer.name=sgd", "optimizer.lr=0.01", "schedule.milestones=[]", "train.epochs=2",
                 "problem.hidden_layers=1", "problem.width=8", f"method.bsgd.window={window}", f"data.root={data_root}")
    reference = execute(compose(*overrides, f"output.root={tmp_path / 'a'}")).path
    stop_at_step(monkeypatch, 13)  # inside epoch 2 (10 batches an epoch)
    with pytest.raises(RunPreempted):
        execute(compose(*overrides, f"output.root={tmp_path / 'b'}"))
    monkeypatch.undo()
    resumed = execute(compose(*overrides, f"output.root={tmp_path / 'b'}"))
    assert resumed.status == "completed"
    assert_same_run(reference, resumed.path)  # the step-norm and gradient columns included


def test_the_state_dict_round_trips_through_weights_only_loading(compose, tmp_path):
    run = validate(compose(*MEAN, "method=bsgd", "train.iterations=5"))
    problem = run.problem_class(run.problem_config, data_root=Path("."), seed=0, device=torch.device("cpu"))
    state = build_state(problem, run)
    train(problem, run, state, on_evaluation=lambda row: None)
    torch.save(state.optimizer.state_dict(), tmp_path / "opt.pt")
    fresh = build_state(problem, run).optimizer
    fresh.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    assert fresh.keys == state.optimizer.keys and fresh.gradients == state.optimizer.gradients == planned_gradients(5)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(fresh.forward, state.optimizer.forward))
    with pytest.raises(ValueError, match="window"):
        BackwardSGD(torch.optim.SGD(state.model.parameters(), lr=H), window=2).load_state_dict(state.optimizer.state_dict())


# -- settings ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, key",
    [
        (("optimizer.name=adam",), "optimizer.name"),
        (("optimizer.momentum=0.9",), "optimizer.momentum"),
        (("optimizer.momentum=0.9", "optimizer.nesterov=true"), "optimizer.nesterov"),
        (("optimizer.weight_decay=1e-4",), "optimizer.weight_decay"),
        (("schedule.milestones=[50]",), "schedule.milestones"),
        (("schedule.every=50",), "schedule.every"),
        (("schedule.warmup=5",), "schedule.warmup"),
        (("train.precision=fp16",), "train.precision"),
        (("method.bsgd.window=0",), "method.bsgd.window"),
    ],
)
def test_anything_but_plain_constant_lr_sgd_is_refused_naming_the_key(compose, overrides, key):
    with pytest.raises(ConfigError) as error:
        validate(compose("experiment=mean_estimation", "method=bsgd", *overrides))
    assert error.value.key == key


def test_label_legend_and_a_constant_schedule_written_with_gamma_one(compose):
    run = validate(compose("experiment=mean_estimation", "method=bsgd", "schedule.milestones=[50]", "schedule.gamma=1"))
    assert (run.variant, run.method.legend_order) == ("SGD+BSGD", 3)
    windowed = validate(compose("experiment=mean_estimation", "method=bsgd", "method.bsgd.window=8"))
    assert windowed.variant == "SGD+BSGD(W=8)" and windowed.identity["method.bsgd.window"] == 8


def test_a_model_with_dropout_is_refused():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.1))
    with pytest.raises(ConfigError, match="Dropout"):
        bsgd.BSGD(bsgd.BSGDSettings()).wrap(torch.optim.SGD(model.parameters(), lr=0.1), model)


def test_a_budget_beyond_the_warning_threshold_is_logged_once_with_the_window_advice(compose, data_root, caplog):
    assert planned_gradients(314) < bsgd.GRADIENT_WARNING < planned_gradients(315)
    assert planned_gradients(1000, window=10) == 1000 + 55 + 990 * 10
    caplog.set_level(logging.WARNING, logger="experiments.run.bsgd")
    method = validate(compose("experiment=mean_estimation", "method=bsgd", "train.iterations=400")).method
    method._warn_cost(SimpleNamespace(unit=1, index=0))
    method._warn_cost(SimpleNamespace(unit=2, index=0))
    assert len(caplog.records) == 1 and "80,600 gradient" in caplog.text and "method.bsgd.window" in caplog.text
    caplog.clear()
    quiet = validate(compose("experiment=mean_estimation", "method=bsgd", "train.iterations=400", "method.bsgd.window=50")).method
    quiet._warn_cost(SimpleNamespace(unit=1, index=0))
    assert not caplog.records
    # An epoch budget: known once the first epoch's batches are counted (10 here).
    epochs = validate(compose("method=bsgd", "optimizer.name=sgd", "schedule.milestones=[]", "train.epochs=100")).method
    for index in range(10):
        epochs._warn_cost(SimpleNamespace(unit=1, index=index))
    assert not caplog.records
    epochs._warn_cost(SimpleNamespace(unit=2, index=0))
    assert "1000 steps" in caplog.text and f"{planned_gradients(1000):,}" in caplog.text


def test_the_cost_warning_reaches_the_runs_log(compose, tmp_path, monkeypatch):
    from experiments.run import execute

    monkeypatch.setattr(bsgd, "GRADIENT_WARNING", 10)
    outcome = execute(compose("experiment=mean_estimation", "method=bsgd", "train.iterations=5", f"output.root={tmp_path}"))
    lines = [line for line in (outcome.path / "run.log").read_text().splitlines() if "gradient evaluations" in line]
    assert len(lines) == 1 and "WARNING" in lines[0] and f"5 steps will take {planned_gradients(5)}" in lines[0]


# -- whole runs ----------------------------------------------------------------------------


def test_the_command_line_run_is_complete_and_backward_settles_where_forward_fluctuates(tmp_path):
    """200 iterations of constant-lr SGD on mean estimation (20,300 gradients, ~15 s)."""
    root = tmp_path / "runs"
    command = [sys.executable, "-m", "experiments.run", "experiment=mean_estimation", "method=bsgd", "optimizer.name=sgd",
               "optimizer.lr=0.1", "train.iterations=200", f"output.root={root}", f"hydra.run.dir={tmp_path / 'hydra'}"]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    run_dir = next(root.rglob("seed=0"))
    assert {"COMPLETE", "config.yaml", "meta.json", "metrics.csv", "model.pt", "run.log"} <= {p.name for p in run_dir.iterdir()}
    meta = json.loads((run_dir / "meta.json").read_text())
    assert (meta["status"], meta["variant"], meta["legend_order"]) == ("complete", "SGD+BSGD", 3)
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert len(metrics) == 201 and list(metrics.columns[-3:]) == list(bsgd.BSGD.counters)
    assert metrics["gradients"].iloc[-1] == planned_gradients(200)

    late = metrics.iloc[101:]
    backward, forward = late["backward_step_norm"].to_numpy(), late["forward_step_norm"].to_numpy()
    # Backward: ||w~_n - w~_{n-1}|| = h (1-h)^(n-1) |x_n - w_0|, geometric in n at rate 1-h.
    slope = np.polyfit(late["step"], np.log(backward), 1)[0]
    assert slope == pytest.approx(math.log(1 - 0.1), rel=0.1)
    assert backward[-10:].max() < 1e-8
    # Forward: h |x_n - w_{n-1}|, of the order of h * std at every step, no trend.
    assert 0.03 < np.median(forward) < 0.3
    assert np.median(forward[:50]) / np.median(forward[50:]) == pytest.approx(1, abs=0.6)
    distance = metrics["distance_to_mean"].to_numpy()
    # The backward iterate has settled at its limit (moves ~1e-7 in 50 steps, forward ~1e-1 per step).
    assert np.ptp(distance[-50:]) < 1e-6


def test_graduate_admissions_and_burgers_run_with_bsgd(compose, data_root, tmp_path):
    from experiments.run import execute

    graduate = execute(compose("method=bsgd", "optimizer.name=sgd", "optimizer.lr=0.01", "schedule.milestones=[]",
                               "train.epochs=2", "problem.hidden_layers=1", "problem.width=8", f"data.root={data_root}",
                               f"output.root={tmp_path}"))
    burgers = execute(compose("experiment=burgers2d", "method=bsgd", "optimizer.name=sgd", "optimizer.lr=0.01",
                              "schedule.every=null", "train.iterations=6", "train.eval_every=2", "problem.n_boundary=20",
                              "problem.n_collocation=40", "problem.resample_every=2", "problem.grid_x=8", "problem.grid_t=3",
                              f"output.root={tmp_path}"))
    for outcome, steps in ((graduate, 20), (burgers, 6)):
        assert outcome.status == "completed" and (outcome.path / "COMPLETE").is_file()
        metrics = pd.read_csv(outcome.path / "metrics.csv")
        assert metrics["gradients"].iloc[-1] == planned_gradients(steps)
        assert np.isfinite(metrics[["forward_step_norm", "backward_step_norm", "val_loss"]].iloc[1:].to_numpy()).all()
        assert set(metrics["variant"]) == {"SGD+BSGD"}


@pytest.mark.slow  # about 45 s here (three processes importing torch); run with -m slow
@pytest.mark.distributed
def test_two_ranks_average_every_gradient_replayed_batches_included(compose, tmp_path):
    """torchrun on 2 gloo ranks, 2 samples a batch (one a rank): the same iterates and step
    norms as one process taking both samples, to rounding."""
    import os

    overrides = ("experiment=mean_estimation", "method=bsgd", "problem.batch_size=2", "problem.dims=3", "train.iterations=12")
    one = execute_here(compose, overrides, tmp_path / "one")
    root = tmp_path / "two"
    command = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node=2", "-m", "experiments.run",
               *overrides, f"output.root={root}", f"hydra.run.dir={root / 'hydra'}"]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    (path,) = list(root.rglob("seed=0"))
    assert json.loads((path / "meta.json").read_text())["world_size"] == 2
    a, b = pd.read_csv(one / "metrics.csv"), pd.read_csv(path / "metrics.csv")
    assert (a["gradients"] == b["gradients"]).all()
    for column in ("val_loss", "distance_to_mean", "train_loss", "forward_step_norm", "backward_step_norm"):
        np.testing.assert_allclose(b[column], a[column], rtol=1e-12, atol=1e-15, equal_nan=True)


def execute_here(compose, overrides, root: Path) -> Path:
    from experiments.run import execute

    return execute(compose(*overrides, f"output.root={root}")).path
