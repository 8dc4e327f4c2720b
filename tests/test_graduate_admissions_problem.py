"""The graduate-admissions problem: split, standardisation, batches, model and metrics."""

from __future__ import annotations

import pytest
import torch

from experiments.problems import problem_class
from experiments.problems.graduate_admissions.problem import GraduateAdmissions, GraduateAdmissionsConfig

CPU = torch.device("cpu")


def make(data_root, seed=0, **config) -> GraduateAdmissions:
    return GraduateAdmissions(GraduateAdmissionsConfig(**config), data_root=data_root, seed=seed, device=CPU)


def rows(tensor: torch.Tensor) -> set[tuple[float, ...]]:
    return {tuple(row.tolist()) for row in tensor}


def test_registered_under_its_experiment_name():
    assert problem_class("graduate_admissions") is GraduateAdmissions
    assert GraduateAdmissions.budget_unit == "epoch"


def test_split_is_80_20_disjoint_and_fixed_by_split_seed_not_run_seed(data_root):
    a, b = make(data_root, seed=0), make(data_root, seed=5)
    assert (len(a.y_train), len(a.y_val)) == (400, 100)
    assert rows(a.x_train).isdisjoint(rows(a.x_val))
    assert torch.equal(a.x_val, b.x_val) and torch.equal(a.y_val, b.y_val)
    other = make(data_root, split_seed=1)
    assert not torch.equal(torch.sort(a.y_val).values, torch.sort(other.y_val).values)


def test_features_are_standardised_on_the_training_split_only(data_root):
    problem = make(data_root)
    torch.testing.assert_close(problem.x_train.mean(0), torch.zeros(7), atol=1e-5, rtol=0)
    torch.testing.assert_close(problem.x_train.std(0, unbiased=False), torch.ones(7), atol=1e-5, rtol=0)
    # The validation rows were transformed with the training statistics, not their own.
    assert problem.x_val.mean(0).abs().max() > 1e-3
    # The target keeps its units (chance of admission in [0, 1]).
    assert 0.3 < problem.y_train.min() and problem.y_train.max() < 1


def test_an_epoch_is_one_shuffled_pass_in_batches_of_40(data_root):
    problem = make(data_root, seed=1)
    batches = list(problem.batches(1))
    assert [len(target) for _, target in batches] == [40] * 10
    seen = torch.cat([features for features, _ in batches])
    assert rows(seen) == rows(problem.x_train) and len(seen) == 400
    first_order = torch.cat([target for _, target in batches])
    second_order = torch.cat([target for _, target in problem.batches(2)])
    assert not torch.equal(first_order, second_order)  # reshuffled every epoch
    again = torch.cat([target for _, target in make(data_root, seed=1).batches(1)])
    assert torch.equal(first_order, again)  # and reproducibly per seed


def test_model_is_the_papers_mlp(data_root):
    model = make(data_root).build_model()
    linear = [m for m in model if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linear] == [(7, 64), (64, 64), (64, 64), (64, 1)]
    assert sum(isinstance(m, torch.nn.ReLU) for m in model) == 3
    assert sum(p.numel() for p in model.parameters()) == 8897


def test_validation_mse_is_over_the_whole_split(data_root):
    problem = make(data_root)
    torch.manual_seed(0)
    model = problem.build_model()
    with torch.no_grad():
        errors = (model(problem.x_val).squeeze(-1) - problem.y_val) ** 2
    metrics = problem.evaluate(model)
    assert metrics["val_loss"] == pytest.approx(errors.mean().item(), rel=1e-6)
    assert metrics["val_r2"] == pytest.approx(1 - errors.mean().item() / problem.y_val.var(unbiased=False).item(), rel=1e-6)


def test_loss_works_without_gradients_for_the_safeguard_closure(data_root):
    problem = make(data_root)
    model = problem.build_model()
    batch = next(iter(problem.batches(1)))
    with torch.no_grad():
        closure_loss = problem.loss(model, batch)
    loss = problem.loss(model, batch)
    assert closure_loss.item() == pytest.approx(loss.item()) and loss.requires_grad


def test_notes_describe_split_and_data(data_root):
    notes = make(data_root).notes()
    assert any("400 training / 100 validation" in line for line in notes)
    assert not any("WARNING" in line for line in notes)
