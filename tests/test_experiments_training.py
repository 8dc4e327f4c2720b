"""Learning-rate schedules and base optimizers built from the config."""

from __future__ import annotations

import pytest
import torch

from experiments.schema import OptimizerConfig, ScheduleConfig
from experiments.optimizers import build_base_optimizer
from experiments.training import scheduled_lr


def lrs(schedule: ScheduleConfig, base_lr: float, units: list[int]) -> list[float]:
    return [scheduled_lr(u, base_lr, schedule) for u in units]


def test_fig1_schedule_drops_to_4e_3_after_epoch_1000():
    schedule = ScheduleConfig(milestones=[1000], gamma=0.2)
    # unit index 999 is epoch 1,000 (still 0.02); index 1000 is epoch 1,001.
    assert lrs(schedule, 0.02, [0, 999, 1000, 1499]) == pytest.approx([0.02, 0.02, 0.004, 0.004])


def test_burgers_schedules_decay_every_n_iterations():
    assert lrs(ScheduleConfig(every=500, gamma=0.2), 0.01, [0, 499, 500, 1000]) == pytest.approx([0.01, 0.01, 0.002, 0.0004])
    assert lrs(ScheduleConfig(every=1000, gamma=0.5), 0.05, [999, 1000, 2500]) == pytest.approx([0.05, 0.025, 0.0125])


def test_imagenet_schedule_warms_up_linearly_then_divides_by_10_at_30_60_80():
    schedule = ScheduleConfig(milestones=[30, 60, 80], gamma=0.1, warmup=5, warmup_start_lr=0.05)
    got = lrs(schedule, 0.98, [0, 1, 4, 5, 29, 30, 60, 80, 89])
    expected = [0.05, 0.05 + 0.93 / 5, 0.05 + 4 * 0.93 / 5, 0.98, 0.98, 0.098, 0.0098, 0.00098, 0.00098]
    assert got == pytest.approx(expected)


def test_constant_warmup_holds_the_start_rate():
    schedule = ScheduleConfig(warmup=5, warmup_start_lr=0.05, warmup_mode="constant")
    assert lrs(schedule, 0.98, [0, 4, 5]) == pytest.approx([0.05, 0.05, 0.98])


def test_sgd_nesterov_gets_its_options():
    model = torch.nn.Linear(2, 1)
    cfg = OptimizerConfig(name="sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    opt = build_base_optimizer(model.parameters(), cfg)
    group = opt.param_groups[0]
    assert isinstance(opt, torch.optim.SGD)
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (0.1, 0.9, True, 1e-4)


def test_adam_gets_its_options():
    opt = build_base_optimizer(torch.nn.Linear(2, 1).parameters(), OptimizerConfig(lr=0.02, betas=[0.8, 0.99]))
    assert isinstance(opt, torch.optim.Adam)
    assert opt.param_groups[0]["betas"] == (0.8, 0.99) and opt.param_groups[0]["lr"] == 0.02
