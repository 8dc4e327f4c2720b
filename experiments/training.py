"""The one training loop every problem shares.

The problem supplies data, model, loss and evaluation; this module builds the base optimizer
and the AADL wrapper from the config, applies the learning-rate schedule per budget unit,
runs the steps and hands one row of metrics per evaluation to a callback.
"""

from __future__ import annotations

import bisect
import math
import time
from typing import Any, Callable, Iterable

import torch
from tqdm.auto import tqdm

from experiments.config import BASE_OPTIMIZERS, AccelConfig, OptimizerConfig, ScheduleConfig, ValidatedRun
from experiments.problems.base import Problem
from experiments.results import AA_COUNTERS


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_base_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    spec = BASE_OPTIMIZERS[cfg.name]
    options: dict[str, Any] = {name: getattr(cfg, name) for name in spec.options}
    if "betas" in options:
        options["betas"] = tuple(options["betas"])
    return getattr(torch.optim, spec.torch_class)(params, **options)


def build_optimizer(model: torch.nn.Module, opt_cfg: OptimizerConfig, accel: AccelConfig) -> torch.optim.Optimizer:
    """The base optimizer, wrapped in ``aadl.AndersonAcceleration`` when ``accel.enabled``."""
    base = build_base_optimizer(model.parameters(), opt_cfg)
    if not accel.enabled:
        return base
    from aadl import AndersonAcceleration

    return AndersonAcceleration(base, **accel.settings())


def scheduled_lr(unit_index: int, base_lr: float, schedule: ScheduleConfig) -> float:
    """Learning rate for the budget unit with 0-based index ``unit_index`` (see ScheduleConfig).

    With ``milestones: [1000]`` units 0..999 (epochs 1..1000) use ``base_lr`` and unit
    1000 onwards ``gamma * base_lr``, like ``torch.optim.lr_scheduler.MultiStepLR``.
    """
    if schedule.every is not None:
        decays = unit_index // schedule.every
    else:
        decays = bisect.bisect_right(schedule.milestones, unit_index)
    lr = base_lr * schedule.gamma**decays
    if unit_index < schedule.warmup:
        if schedule.warmup_mode == "constant":
            return schedule.warmup_start_lr
        return schedule.warmup_start_lr + (lr - schedule.warmup_start_lr) * unit_index / schedule.warmup
    return lr


def train(
    problem: Problem,
    run: ValidatedRun,
    *,
    on_evaluation: Callable[[dict[str, Any]], None],
    progress: bool = False,
) -> dict[str, Any]:
    """Train one seed; call ``on_evaluation(row)`` before the first step, every
    ``train.eval_every`` budget units and after the last one. Returns the last row.

    A row holds step (optimizer steps so far), epoch (None for iteration budgets),
    train_loss (mean minibatch loss since the previous row, each taken before its step;
    NaN in the first row), the problem's metrics, lr, wall_time (seconds since training
    started, evaluations included) and the wrapper's counters.
    """
    cfg = run.config
    epoch_budget = problem.budget_unit == "epoch"
    torch.manual_seed(cfg.seed)  # the same initial weights for every variant of a seed
    model = problem.build_model()
    optimizer = build_optimizer(model, cfg.optimizer, cfg.accel)
    accelerated = cfg.accel.enabled

    def counters() -> dict[str, int]:
        if not accelerated:
            return dict.fromkeys(AA_COUNTERS, 0)
        stats = optimizer.stats.as_dict()
        return {name: int(stats[name]) for name in AA_COUNTERS}

    steps = 0
    loss_sum, loss_count = 0.0, 0
    started = time.perf_counter()
    last_row: dict[str, Any] = {}
    bar = tqdm(total=run.budget, unit=problem.budget_unit, disable=not progress, mininterval=0.5, dynamic_ncols=True)

    def evaluate(unit: int, lr: float) -> None:
        nonlocal loss_sum, loss_count, last_row
        model.eval()
        metrics = problem.evaluate(model)
        model.train()
        last_row = {
            "step": steps,
            "epoch": unit if epoch_budget else None,
            "train_loss": loss_sum / loss_count if loss_count else math.nan,
            **metrics,
            "lr": lr,
            "wall_time": time.perf_counter() - started,
            **counters(),
        }
        loss_sum, loss_count = 0.0, 0
        on_evaluation(last_row)
        bar.set_postfix(val_loss=f"{metrics['val_loss']:.3e}", refresh=False)

    with bar:
        evaluate(0, scheduled_lr(0, cfg.optimizer.lr, cfg.schedule))
        for unit in range(1, run.budget + 1):
            lr = scheduled_lr(unit - 1, cfg.optimizer.lr, cfg.schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr
            for batch in problem.batches(unit):
                loss = problem.loss(model, batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if accelerated:
                    # The safeguard compares losses at candidate points: loss only, no
                    # backward (the wrapper calls it under torch.no_grad()).
                    optimizer.step(lambda batch=batch: problem.loss(model, batch))
                else:
                    optimizer.step()
                loss_sum += loss.item()
                loss_count += 1
                steps += 1
            if unit % cfg.train.eval_every == 0 or unit == run.budget:
                evaluate(unit, lr)
            bar.update(1)
    return last_row
