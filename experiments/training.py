"""The one training loop every problem and every method shares.

The problem supplies data, model, loss and evaluation; the method wraps the base optimizer
(experiments.methods). This module builds both from the config into a
:class:`TrainingState`, applies the learning-rate schedule per budget unit, runs the steps,
watches for divergence and hands one row of metrics per evaluation to a callback.

The same loop trains S seeds batched (experiments/batching.py): the problem is then a
``SeedGroupProblem`` with ``lanes`` = S, the state keeps one loss accumulator and one
divergence flag per lane, each lane gets its own rows, and a lane that diverges stops at
its own step (recorded and handed to ``on_lane_end``) while the others go on.
"""

from __future__ import annotations

import bisect
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from tqdm.auto import tqdm

from experiments.optimizers import build_base_optimizer
from experiments.parallel import DataParallel
from experiments.problems.base import Problem
from experiments.schema import ScheduleConfig
from experiments.step import KeptForward, Precision, StepContext

#: Steps between checks of the on-device divergence flag (one host sync each) between
#: evaluations, so a diverged run stops soon even when evaluations are far apart.
DIVERGENCE_CHECK_STEPS = 100


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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


@dataclass
class TrainingState:
    """Everything the loop changes while it trains: what a checkpoint has to hold."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    unit: int = 0  # budget units completed
    step: int = 0  # optimizer steps taken
    batch_in_unit: int = 0  # batches of unit ``unit + 1`` already taken
    # The problem's data-order state before unit ``unit + 1`` drew its batches: a run
    # resumed inside a unit draws them again and skips those already taken.
    unit_data_state: Optional[dict[str, Any]] = None
    # Sum and count of the minibatch losses since the last evaluation, kept on the device
    # so that a step needs no host synchronisation.
    loss_sum: Optional[torch.Tensor] = None
    loss_count: int = 0
    # The first step whose loss was not finite (-1: none), also kept on the device.
    first_nonfinite_step: Optional[torch.Tensor] = None
    elapsed: float = 0.0  # seconds of training before ``started``
    started: float = field(default_factory=time.perf_counter)
    # None: one run. S: S seeds batched, the accumulators above hold one value per lane.
    lanes: Optional[int] = None
    # Lanes that stopped (diverged) while the others go on; they are no longer written.
    lanes_ended: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        device = next(self.model.parameters()).device
        shape = () if self.lanes is None else (self.lanes,)
        if self.loss_sum is None:
            self.loss_sum = torch.zeros(shape, dtype=torch.float64, device=device)
        if self.first_nonfinite_step is None:
            self.first_nonfinite_step = torch.full(shape, -1, dtype=torch.int64, device=device)

    def record_loss(self, loss: torch.Tensor) -> None:
        loss = loss.detach()
        self.loss_sum += loss.to(torch.float64)
        self.loss_count += 1
        nonfinite = ~torch.isfinite(loss) & (self.first_nonfinite_step < 0)
        self.first_nonfinite_step.copy_(torch.where(nonfinite, self.step, self.first_nonfinite_step))

    def take_mean_loss(self) -> float:
        """The mean minibatch loss since the last call (NaN before any step), then reset."""
        mean = float(self.loss_sum) / self.loss_count if self.loss_count else math.nan
        self.loss_sum.zero_()
        self.loss_count = 0
        return mean

    def lane_mean_losses(self, lanes: list[int], *, reset: bool) -> list[float]:
        """Each lane's mean minibatch loss since the last reset (NaN before any step); a
        reset (every running lane evaluated) starts the next mean."""
        sums = self.loss_sum.tolist()
        means = [sums[lane] / self.loss_count if self.loss_count else math.nan for lane in lanes]
        if reset:
            self.loss_sum.zero_()
            self.loss_count = 0
        return means

    def wall_time(self) -> float:
        return self.elapsed + time.perf_counter() - self.started

    def state_dict(self, problem: Problem) -> dict[str, Any]:
        """What a checkpoint holds of the loop (the RNGs and metrics are the caller's)."""
        if self.batch_in_unit == 0:  # between units: the next unit starts from the state now
            self.unit_data_state = problem.state_dict()
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "unit": self.unit,
            "step": self.step,
            "batch_in_unit": self.batch_in_unit,
            "unit_data_state": self.unit_data_state,
            "loss_sum": self.loss_sum.detach().cpu(),
            "loss_count": self.loss_count,
            "first_nonfinite_step": self.first_nonfinite_step.cpu(),
            "elapsed": self.wall_time(),
            **({} if self.lanes is None else {"lanes": self.lanes, "lanes_ended": list(self.lanes_ended)}),
        }

    def load_state_dict(self, state: dict[str, Any], problem: Problem) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.unit, self.step, self.batch_in_unit = state["unit"], state["step"], state["batch_in_unit"]
        self.unit_data_state = state["unit_data_state"]
        problem.load_state_dict(self.unit_data_state)
        self.loss_sum.copy_(state["loss_sum"])
        self.loss_count = state["loss_count"]
        self.first_nonfinite_step.copy_(state["first_nonfinite_step"])
        self.elapsed, self.started = state["elapsed"], time.perf_counter()
        if self.lanes is not None:
            self.lanes_ended = sorted(set(self.lanes_ended) | set(state["lanes_ended"]))

    def divergence(
        self, lane: Optional[int] = None, unit: Optional[int] = None, finite: Optional[Callable[[], bool]] = None
    ) -> Optional[dict[str, Any]]:
        """Where the run (or lane ``lane``, whose parameters' finiteness ``finite`` tells)
        first went non-finite: a training loss, or else the parameters; ``unit`` is the
        budget unit it is reported in (default: the last one completed)."""
        unit = self.unit if unit is None else unit
        first = int(self.first_nonfinite_step if lane is None else self.first_nonfinite_step[lane])
        if first >= 0:
            return {"step": first, "unit": unit, "quantity": "train_loss"}
        if lane is None:
            parameters_finite = all(bool(torch.isfinite(p).all()) for p in self.model.parameters())
        else:
            parameters_finite = finite()
        if not parameters_finite:
            return {"step": self.step, "unit": unit, "quantity": "parameters"}
        return None


def build_state(problem: Problem, run: Any) -> TrainingState:
    """Model and optimizer for one seed; every variant of a seed starts from the same weights.

    Called before the run directory is written, so that a method that cannot allocate
    what it needs fails before anything is on disk."""
    cfg = run.config
    torch.manual_seed(cfg.seed)
    model = problem.build_model()
    base = build_base_optimizer(model.parameters(), cfg.optimizer)
    return TrainingState(model=model, optimizer=run.method.wrap(base, model))


class TrainingStopped(Exception):
    """Raised between two steps when ``should_stop`` says so (a signal arrived)."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)

    def __reduce__(self):
        return (type(self), (self.reason,))


@dataclass
class TrainingOutcome:
    last_row: dict[str, Any]
    diverged: Optional[dict[str, Any]]  # None, or {"step", "unit", "quantity"}


def train(
    problem: Problem,
    run: Any,
    state: TrainingState,
    *,
    on_evaluation: Callable[..., None],
    progress: bool = False,
    should_stop: Callable[[], Optional[str]] = lambda: None,
    save_checkpoint: Callable[[], None] = lambda: None,
    checkpoint_every: Optional[int] = None,
    parallel: DataParallel = DataParallel(),
    precision: Optional[Precision] = None,
    on_lane_end: Callable[[int, TrainingOutcome], None] = lambda lane, outcome: None,
) -> Any:
    """Train one seed from ``state``; call ``on_evaluation(row)`` before the first step,
    every ``train.eval_every`` budget units and after the last one.

    A row holds step (optimizer steps so far), epoch (None for iteration budgets),
    train_loss (mean minibatch loss since the previous row, each taken before its step;
    NaN in the first row), the problem's metrics, lr, wall_time (seconds since training
    started, evaluations included) and the method's counters.

    A non-finite training loss, parameter or validation loss is divergence: with
    ``train.stop_on_divergence`` the run stops at once (after an evaluation row), otherwise
    it goes on; either way the outcome records where it first happened.

    ``save_checkpoint`` is called every ``checkpoint_every`` units (after the evaluation)
    and, when ``should_stop`` reports a signal, between two steps before TrainingStopped is
    raised. A ``state`` restored from a checkpoint continues where it was saved, inside a
    unit too.

    With ``state.lanes`` = S (a seed group, experiments/batching.py) every lane is a run of
    its own: ``on_evaluation(row, lane)`` gets its rows, a lane that stops early (diverged)
    is handed to ``on_lane_end(lane, outcome)`` at that step and the others go on, and the
    return value is the S outcomes, one per lane (None for lanes ended before ``state``).
    """
    cfg = run.config
    method = run.method
    model, optimizer = state.model, state.optimizer
    net = parallel.wrap(model, problem)  # what the loss is computed with (DDP or the model)
    device = state.loss_sum.device
    if precision is None:
        precision = Precision.build(cfg.train.precision, device)
    batched = state.lanes is not None
    context_type = problem.step_context or StepContext
    kept = KeptForward()  # a safeguard's last evaluation, for the next step's backward

    def agreed_first_nonfinite() -> int:
        first = parallel.max_int(int(state.first_nonfinite_step), device)
        state.first_nonfinite_step.fill_(first)
        return first
    epoch_budget = problem.budget_unit == "epoch"
    lanes = list(range(state.lanes)) if batched else [None]
    diverged: dict[Optional[int], Optional[dict[str, Any]]] = {lane: None for lane in lanes}
    last_row: dict[Optional[int], dict[str, Any]] = {lane: {} for lane in lanes}
    outcomes: dict[Optional[int], TrainingOutcome] = {}
    bar = tqdm(total=run.budget, initial=state.unit, unit=problem.budget_unit, disable=not progress, mininterval=0.5, dynamic_ncols=True)

    def running() -> list[Optional[int]]:
        return [lane for lane in lanes if lane not in state.lanes_ended]

    samples_per_step = problem.samples_per_step
    since_row = {"step": state.step, "time": time.perf_counter()}  # training time only

    def throughput() -> dict[str, float]:
        """``samples_per_second`` of training since the previous row, for problems that
        say how many samples a step takes (NaN in the first row of a process)."""
        if samples_per_step is None:
            return {}
        steps, seconds = state.step - since_row["step"], time.perf_counter() - since_row["time"]
        return {"samples_per_second": steps * samples_per_step / seconds if steps else math.nan}

    def evaluate(lr: float, which: list[Optional[int]], unit: int) -> None:
        """Rows for the lanes ``which`` (all running lanes, or those stopping now inside
        unit ``unit``)."""
        speed = throughput()
        model.eval()
        if batched:
            metrics_of = problem.evaluate_lanes(model, which)
        else:
            metrics_of = [problem.evaluate(model)]  # every rank evaluates (its shard or all)
        model.train()
        parallel.mean_(state.loss_sum)
        if batched:
            train_losses = state.lane_mean_losses(which, reset=which == running())
        else:
            agreed_first_nonfinite()
            train_losses = [state.take_mean_loss()]
        finite_lanes: list[bool] = []

        def lane_finite(lane: int) -> bool:
            if not finite_lanes:
                finite_lanes.extend(model.finite_lanes())  # once per evaluation, for every lane
            return finite_lanes[lane]

        for lane, lane_metrics, train_loss in zip(which, metrics_of, train_losses):
            metrics = {**lane_metrics, **speed}
            row = {
                "step": state.step,
                "epoch": unit if epoch_budget else None,
                "train_loss": train_loss,
                **metrics,
                "lr": lr,
                "wall_time": state.wall_time(),
                **(problem.counter_values(method, optimizer, lane) if batched else method.counter_values(optimizer)),
            }
            last_row[lane] = row
            if diverged[lane] is None:
                diverged[lane] = state.divergence(lane, unit, (lambda: lane_finite(lane)) if batched else None)
                if diverged[lane] is None and not math.isfinite(metrics["val_loss"]):
                    diverged[lane] = {"step": state.step, "unit": unit, "quantity": "val_loss"}
            if batched:
                on_evaluation(row, lane)
            else:
                on_evaluation(row)
            bar.set_postfix(val_loss=f"{metrics['val_loss']:.3e}", refresh=False)
        since_row.update(step=state.step, time=time.perf_counter())

    def end_diverged_lanes() -> None:
        """A seed group's lanes that diverged stop here (a single run stops its loop)."""
        if not (batched and stopping):
            return
        for lane in running():
            if diverged[lane] is not None:
                state.lanes_ended.append(lane)
                outcomes[lane] = TrainingOutcome(last_row[lane], diverged[lane])
                on_lane_end(lane, outcomes[lane])

    stopping = cfg.train.stop_on_divergence
    with bar:
        if state.unit == 0 and state.batch_in_unit == 0:
            evaluate(scheduled_lr(0, cfg.optimizer.lr, cfg.schedule), running(), state.unit)
            end_diverged_lanes()
        while state.unit < run.budget and (running() if batched else not (stopping and diverged[None])):
            unit = state.unit + 1
            lr = scheduled_lr(unit - 1, cfg.optimizer.lr, cfg.schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr
            skip = state.batch_in_unit  # batches a resumed run took before its checkpoint
            if skip:
                problem.load_state_dict(state.unit_data_state)
            else:
                state.unit_data_state = problem.state_dict()
            nonfinite = False  # a non-finite loss seen at a periodic check
            for index, batch in enumerate(problem.batches_from(unit, skip), start=skip):
                context = context_type(
                    problem=problem, net=net, model=model, optimizer=optimizer, parallel=parallel,
                    batch=parallel.local_batch(batch, problem), unit=unit, index=index,
                    unit_data_state=state.unit_data_state, precision=precision, kept=kept,
                )
                loss = method.step(optimizer, context)
                state.record_loss(loss)
                state.step += 1
                state.batch_in_unit = index + 1
                reason = should_stop()
                if parallel.active and parallel.max_int(reason is not None, device):
                    reason = reason or "a signal to another rank"  # all ranks stop at this step
                if reason is not None:
                    save_checkpoint()
                    raise TrainingStopped(reason)
                if stopping and state.step % DIVERGENCE_CHECK_STEPS == 0:
                    if not batched:
                        if agreed_first_nonfinite() >= 0:
                            nonfinite = True
                            break
                        continue
                    firsts = state.first_nonfinite_step.tolist()
                    stopped = [lane for lane in running() if firsts[lane] >= 0]
                    if stopped:  # these lanes stop inside the unit, as their single runs would
                        evaluate(lr, stopped, unit)
                        end_diverged_lanes()
                        if not running():
                            break
            if not running():
                break
            state.unit, state.batch_in_unit = unit, 0
            if unit % cfg.train.eval_every == 0 or unit == run.budget or nonfinite:
                evaluate(lr, running(), state.unit)
                end_diverged_lanes()
            bar.update(1)
            if checkpoint_every and unit % checkpoint_every == 0 and unit < run.budget:
                save_checkpoint()
    if not batched:
        return TrainingOutcome(last_row[None], diverged[None])
    for lane in running():
        outcomes[lane] = TrainingOutcome(last_row[lane], diverged[lane])
        state.lanes_ended.append(lane)
        on_lane_end(lane, outcomes[lane])
    return [outcomes.get(lane) for lane in lanes]
