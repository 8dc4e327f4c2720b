"""The burgers2d and burgers100d problems: config, sampling, loss, evaluation."""

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from experiments.problems.burgers.problem import (
    Burgers2D,
    Burgers2DConfig,
    Burgers100D,
    Burgers100DConfig,
)

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")

CPU = torch.device("cpu")


def make(problem_class, seed=0, **overrides):
    return problem_class(
        problem_class.Config(**overrides), data_root=Path("."), seed=seed, device=CPU
    )


def exact_as_model(solution):
    """The manufactured solution, callable like a network: (N, d + 1) -> (N, 1)."""
    return lambda points: solution.value(points)[:, None]


# --------------------------------------------------------------------------------------------
# the 100d manufactured solution solves the PDE as the training loss computes it
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["func", "loop"])
@pytest.mark.parametrize("scale", ["paper", "unit"])
def test_exact_100d_solution_and_forcing_satisfy_the_residual_code(scale, method):
    problem = make(Burgers100D, solution_scale=scale, derivatives=method)
    points = problem.batches(1)[0].collocation_points[:64].double()
    operator = problem.pde_operator(exact_as_model(problem.solution), points)
    forcing = problem.solution.forcing(points, problem.cfg.nu)
    # Relative to the size of the PDE's terms: at the paper's scale they are all ~1e-27.
    u_t, gradient, second = problem.solution.derivatives(points)
    u = problem.solution.value(points)
    size = u_t.abs() + (u * gradient.sum(1)).abs() + problem.cfg.nu * second.sum(1).abs()
    assert torch.all((operator - forcing).abs() <= 1e-5 * size)


def test_exact_100d_model_scores_zero_and_a_zero_model_scores_one():
    problem = make(Burgers100D, solution_scale="unit", spatial_dims=9, n_eval=500)
    exact = problem.evaluate(exact_as_model(problem.solution))
    assert exact["val_rel_l2"] < 1e-6 and exact["val_mse_u"] < 1e-12
    zero = problem.evaluate(lambda points: torch.zeros(len(points), 1))
    assert zero["val_rel_l2"] == pytest.approx(1.0)


def test_relu_network_drops_the_viscous_term():
    problem = make(Burgers2D, activation="relu")
    model = problem.build_model()
    points = problem.batches(1)[0].collocation_points
    assert torch.equal(
        problem.pde_operator(model, points),
        make(Burgers2D, activation="relu", nu=1.0).pde_operator(model, points),
    )


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------


def test_defaults_are_the_papers_setup():
    two, hundred = Burgers2DConfig(), Burgers100DConfig()
    for cfg in (two, hundred):
        assert (cfg.n_boundary, cfg.n_collocation, cfg.val_fraction) == (400, 4000, 0.2)
        assert cfg.nu == pytest.approx(0.01 / math.pi)
        assert cfg.activation == "relu"
    assert (two.width, two.depth) == (20, 8) and (
        hundred.width,
        hundred.depth,
        hundred.spatial_dims,
    ) == (50, 4, 99)
    assert hundred.solution_scale == "paper"
    shapes = [tuple(linear.weight.shape) for linear in make(Burgers2D).build_model().linears]
    assert shapes == [(20, 2)] + [(20, 20)] * 7 + [(1, 20)]


@pytest.mark.parametrize(
    "config_class, field, value",
    [
        (Burgers2DConfig, "activation", "sigmoid"),
        (Burgers2DConfig, "nu", 0.0),
        (Burgers2DConfig, "width", 0),
        (Burgers2DConfig, "n_collocation", 0),
        (Burgers2DConfig, "initial_fraction", 1.5),
        (Burgers2DConfig, "val_fraction", 0.0),
        (Burgers2DConfig, "val_fraction", 0.001),
        (Burgers2DConfig, "resample_every", -1),
        (Burgers2DConfig, "derivatives", "hessian"),
        (Burgers2DConfig, "quadrature_nodes", 8),
        (Burgers2DConfig, "grid_t", 1),
        (Burgers100DConfig, "solution_scale", "huge"),
        (Burgers100DConfig, "spatial_dims", 0),
        (Burgers100DConfig, "n_eval", 0),
    ],
)
def test_invalid_values_name_the_field(config_class, field, value):
    with pytest.raises(ValueError, match=rf"^problem\.{field}: .*got {value!r}"):
        config_class(**{field: value})


def test_omegaconf_sections_are_accepted_and_checked():
    schema = OmegaConf.structured(Burgers100DConfig)
    section = OmegaConf.create({"activation": "tanh", "solution_scale": "unit"})
    problem = Burgers100D(OmegaConf.merge(schema, section), data_root=Path("."), seed=0, device=CPU)
    assert problem.cfg == Burgers100DConfig(activation="tanh", solution_scale="unit")
    with pytest.raises(ValueError, match=r"^problem\.resample_every: "):
        OmegaConf.to_object(OmegaConf.merge(schema, {"resample_every": -5}))


# --------------------------------------------------------------------------------------------
# sampling
# --------------------------------------------------------------------------------------------


def test_batch_sizes_faces_and_data():
    problem = make(Burgers2D)
    (batch,) = problem.batches(1)
    assert batch.data_points.shape == (400, 2) and batch.collocation_points.shape == (4000, 2)
    initial = batch.data_points[:, 1] == 0
    assert initial.sum() == 200
    torch.testing.assert_close(
        batch.data_values[initial], -torch.sin(math.pi * batch.data_points[initial, 0])
    )
    assert torch.all(batch.data_points[~initial, 0].abs() == 1) and torch.all(
        batch.data_values[~initial] == 0
    )
    x, t = batch.collocation_points.unbind(1)
    assert x.abs().max() <= 1 and 0 <= t.min() and t.max() <= 1
    validation = problem._validation
    assert validation.data_points.shape == (80, 2) and validation.collocation_points.shape == (
        800,
        2,
    )


def test_100d_lateral_points_lie_on_one_face_and_carry_zero_data():
    problem = make(Burgers100D, solution_scale="unit")
    (batch,) = problem.batches(1)
    lateral = batch.data_points[:, -1] != 0
    on_face = batch.data_points[lateral, :-1].abs() == 1
    assert torch.all(on_face.sum(1) == 1)
    assert torch.all(batch.data_values[lateral] == 0)
    assert batch.data_values[~lateral].abs().median() > 0.01  # order-one initial data
    torch.testing.assert_close(
        batch.forcing, problem.solution.forcing(batch.collocation_points, problem.cfg.nu)
    )


def test_points_are_redrawn_every_resample_every_iterations_and_depend_on_the_seed():
    problem = make(Burgers2D, resample_every=3)
    first = problem.batches(1)[0]
    assert problem.batches(3)[0] is first  # iterations 1, 2, 3
    redrawn = problem.batches(4)[0]
    assert not torch.equal(redrawn.collocation_points, first.collocation_points)
    # deterministic given the seed (and independent of the order of calls)
    again = make(Burgers2D, resample_every=3)
    assert torch.equal(again.batches(6)[0].collocation_points, redrawn.collocation_points)
    assert torch.equal(again.batches(2)[0].collocation_points, first.collocation_points)
    other_seed = make(Burgers2D, seed=1, resample_every=3)
    assert not torch.equal(other_seed.batches(1)[0].collocation_points, first.collocation_points)


def test_redraws_start_with_the_learning_rate_stages_of_the_same_length():
    """The training loop runs iterations 1..budget; iteration u has schedule stage (u-1)//500."""
    from experiments.schema import ScheduleConfig
    from experiments.training import scheduled_lr

    problem = make(Burgers2D, resample_every=500, n_collocation=10)
    schedule = ScheduleConfig(every=500, gamma=0.2)
    for first, last in ((1, 500), (501, 1000)):
        assert problem.batches(last)[0] is problem.batches(first)[0]
        assert scheduled_lr(last - 1, 0.01, schedule) == scheduled_lr(first - 1, 0.01, schedule)
    redrawn = problem.batches(501)[0].collocation_points
    assert not torch.equal(redrawn, problem.batches(500)[0].collocation_points)
    with pytest.raises(ValueError, match="numbered from 1"):
        problem.batches(0)


def test_resample_every_zero_draws_once():
    problem = make(Burgers2D, resample_every=0)
    assert problem.batches(10_000)[0] is problem.batches(1)[0]


def test_model_depends_on_the_seed_only():
    torch.manual_seed(123)
    a = make(Burgers100D, seed=4).build_model()
    torch.manual_seed(456)
    b = make(Burgers100D, seed=4).build_model()
    c = make(Burgers100D, seed=5).build_model()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a.linears[0].weight, c.linears[0].weight)


# --------------------------------------------------------------------------------------------
# loss and evaluation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("problem_class", [Burgers2D, Burgers100D])
@pytest.mark.parametrize("method", ["auto", "loop"])
def test_loss_works_under_no_grad_with_the_same_value(problem_class, method):
    problem = make(problem_class, activation="tanh", derivatives=method, n_collocation=200)
    model = problem.build_model()
    (batch,) = problem.batches(1)
    loss = problem.loss(model, batch)
    assert loss.grad_fn is not None
    with torch.no_grad():
        quiet = problem.loss(model, batch)
    assert quiet.grad_fn is None
    torch.testing.assert_close(quiet, loss.detach(), rtol=1e-5, atol=0)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_evaluate_reports_the_papers_loss_and_the_relative_error():
    problem = make(Burgers2D, activation="tanh", grid_x=64, grid_t=11)
    model = problem.build_model()
    metrics = problem.evaluate(model)
    assert set(metrics) == {"val_loss", "val_mse_u", "val_mse_f", "val_rel_l2"}
    assert metrics["val_loss"] == pytest.approx(metrics["val_mse_u"] + metrics["val_mse_f"])
    assert metrics["val_loss"] == pytest.approx(
        problem.loss(model, problem._validation).item(), rel=1e-6
    )
    assert 0 < metrics["val_rel_l2"] < 10


def test_training_reduces_the_2d_loss():
    problem = make(Burgers2D, activation="tanh", n_collocation=500)
    model = problem.build_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = problem.evaluate(model)
    for unit in range(1, 61):
        (batch,) = problem.batches(unit)
        optimizer.zero_grad()
        problem.loss(model, batch).backward()
        optimizer.step()
    after = problem.evaluate(model)
    assert after["val_loss"] < 0.5 * before["val_loss"]
    assert after["val_rel_l2"] < before["val_rel_l2"]


def test_notes_carry_the_caveats():
    relu_2d = " ".join(make(Burgers2D).notes())
    assert "second derivative is zero almost everywhere" in relu_2d
    assert "zero almost everywhere" not in " ".join(make(Burgers2D, activation="tanh").notes())
    paper = " ".join(make(Burgers100D).notes())
    assert "1e-27" in paper and "solution_scale=unit" in paper
    assert "1e-27" not in " ".join(make(Burgers100D, solution_scale="unit").notes())


# --------------------------------------------------------------------------------------------
# input-derivative modes (problem.derivatives)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize("problem_class", [Burgers2D, Burgers100D])
def test_reverse_and_forward_mode_give_the_same_loss_and_gradients(problem_class, activation):
    # float32 as the runs train: the modes differ only in rounding. (Reverse mode's 99
    # Laplacian passes are slow: the 100d tanh case takes fewer points.)
    points = 40 if (problem_class, activation) == (Burgers100D, "tanh") else 1000
    losses, gradients = {}, {}
    for mode in ("reverse", "forward"):
        problem = make(problem_class, activation=activation, derivatives=mode, n_collocation=points)
        model = problem.build_model()
        (batch,) = problem.batches(1)
        loss = problem.loss(model, batch)
        losses[mode] = loss.item()
        gradients[mode] = torch.autograd.grad(loss, list(model.parameters()))
        with torch.no_grad():  # the safeguard's evaluation: the same value without a graph
            assert problem.loss(model, batch).item() == pytest.approx(losses[mode], rel=1e-6)
    assert losses["reverse"] == pytest.approx(losses["forward"], rel=1e-6)
    for reverse, forward in zip(gradients["reverse"], gradients["forward"], strict=True):
        torch.testing.assert_close(reverse, forward, rtol=1e-4, atol=1e-6 * forward.abs().max().item())


@pytest.mark.parametrize(
    ("problem_class", "activation", "expected"),
    [(Burgers2D, "relu", "reverse"), (Burgers2D, "tanh", "reverse"), (Burgers100D, "relu", "reverse"), (Burgers100D, "tanh", "forward")],
)
def test_auto_picks_the_mode_with_fewer_flops(problem_class, activation, expected):
    from experiments.problems.burgers.pinn import iteration_flops

    problem = make(problem_class, activation=activation)
    counts = {m: iteration_flops(*problem._derivative_shape(), m) for m in ("reverse", "forward")}
    assert problem.derivative_method == expected == min(counts, key=counts.get)
    assert f"input derivatives: {expected} mode (problem.derivatives=auto)" in " ".join(problem.notes())
    assert make(problem_class, activation=activation, derivatives="forward").derivative_method == "forward"


def test_auto_resolves_under_no_grad_too():
    # The first loss of a run may be the step-0 evaluation, under torch.no_grad().
    problem = make(Burgers2D, activation="tanh", n_collocation=50, n_boundary=10)
    with torch.no_grad():
        problem.loss(problem.build_model(), problem.batches(1)[0])
    assert problem.derivative_method == "reverse"


def test_forward_mode_is_what_the_problem_computed_before_reverse_mode():
    # problem.derivatives=forward keeps the earlier runs' arithmetic: the forward Laplacian.
    from experiments.problems.burgers.pinn import forward_laplacian

    problem = make(Burgers2D, derivatives="forward")
    model = problem.build_model()
    points = problem.batches(1)[0].collocation_points
    d = forward_laplacian(model, points, problem._directions, range(1))
    expected = d.directional[:, 1] + d.value * d.directional[:, 0] - problem.cfg.nu * d.laplacian
    assert torch.equal(problem.pde_operator(model, points), expected)
