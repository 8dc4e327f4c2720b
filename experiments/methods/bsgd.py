"""Backward SGD (``method=bsgd``): Dherin et al., "Training in reverse" (arXiv 2502.01557).

With the batch maps T_k(w) = w - h grad L_{B_k}(w) of a constant learning rate h, forward
(ordinary) SGD is w_n = T_n o ... o T_1 (w_0) and backward SGD is

    w~_n = T_1 o T_2 o ... o T_n (w_0):

every iterate restarts from w_0 and applies the newest batch first and the oldest last, so
iterate n costs n gradients and N iterates N(N + 1) / 2. Near a minimum the backward
iterates converge (the newest batch enters through the most contracted map) where forward
SGD keeps fluctuating at the scale of h.

What is stored is w_0 and the batch sequence, never a batch: the key of batch k is its
(budget unit, index in the unit), and the problem's data state at the start of each unit
is kept once per unit; ``StepContext.replay`` draws batch k again bit-identically from it.
The model's parameters after step n are w~_n. The forward iterate is kept beside it (one
more gradient per step, the same batches) for the ``forward_step_norm`` column.

``window: W`` is this project's variant, not the paper's: T_{n-W+1} o ... o T_n (newest
first) applied to the forward iterate W steps back, so W + 1 gradients per step (the last W
forward iterates are kept). With W >= n it is exact backward SGD; W = 1 is forward SGD.

Costs and limits: docs/methods.md ("Backward SGD").
"""

from __future__ import annotations

import copy
import logging
import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Optional

import torch

from experiments.errors import ConfigError, require
from experiments.methods.base import Method
from experiments.schema import BUDGET_KEYS

#: A run whose budget needs more gradients than this gets a one-line warning in its log.
GRADIENT_WARNING = 50_000

#: What the run's log file receives (a child of experiments.run's logger).
log = logging.getLogger("experiments.run.bsgd")

STATE_FORMAT = 1


@dataclass
class BSGDSettings:
    """``method.bsgd``. ``window: null`` is the paper's exact backward SGD; an integer W is
    this project's windowed variant (W + 1 gradients per step)."""

    window: Optional[int] = None

    def __post_init__(self) -> None:
        require(
            self.window is None or (isinstance(self.window, int) and not isinstance(self.window, bool) and self.window >= 1),
            "window",
            "must be null (exact backward SGD) or an integer >= 1",
            self.window,
        )


def planned_gradients(steps: int, window: Optional[int] = None) -> int:
    """Gradient evaluations of ``steps`` steps: 1 (forward) + min(n, W) (backward) at step n."""
    if window is None or window >= steps:
        return steps + steps * (steps + 1) // 2
    return steps + window * (window + 1) // 2 + (steps - window) * window


def _snapshot(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


@torch.no_grad()
def _distance(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """||a - b|| over every parameter, in float64, left on the device (no host sync)."""
    parts = [torch.linalg.vector_norm((x - y).double()) for x, y in zip(a, b)]
    return torch.linalg.vector_norm(torch.stack(parts))


class BackwardSGD:
    """The optimizer ``method=bsgd`` steps: w_0, the batch keys, the forward iterates and the
    counters, all in ``state_dict``. The steps themselves are :meth:`advance`, which needs
    the step's :class:`experiments.step.StepContext` (to take gradients and replay batches),
    so ``step()`` is refused.

    The base optimizer must be plain SGD (momentum, Nesterov and weight decay 0:
    ``BSGD.check``); it supplies the parameter groups, whose ``lr`` is h, and its
    ``zero_grad``. The maps are applied here, as ``p -= lr * grad`` (torch's SGD step).
    """

    def __init__(self, base: torch.optim.Optimizer, window: Optional[int] = None):
        BSGDSettings(window)
        self.base, self.window = base, window
        self.initial: Optional[list[torch.Tensor]] = None  # w_0, taken at the first step
        # w_{max(0, n-W+1)} .. w_n after step n, so forward[0] is W steps back at step n + 1
        # (window None: w_n only).
        self.forward: deque[list[torch.Tensor]] = deque(maxlen=window or 1)
        self.keys: list[tuple[int, int]] = []  # (unit, index) of the batches still replayed
        self.data_states: dict[int, dict[str, Any]] = {}  # unit -> the problem's state before it
        self.gradients = 0
        self.forward_step_norm: Optional[torch.Tensor] = None
        self.backward_step_norm: Optional[torch.Tensor] = None

    # -- what the training loop and checkpoints use -------------------------------------------

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # a property: load_state_dict rebinds the base's
        return self.base.param_groups

    @property
    def state(self) -> Any:
        return self.base.state

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Any = None) -> None:
        raise RuntimeError(
            "BackwardSGD is stepped by method=bsgd's step (BackwardSGD.advance), which replays "
            "earlier batches through the step's context; it has no step() of its own"
        )

    def state_dict(self) -> dict[str, Any]:
        norm = lambda value: None if value is None else float(value)  # noqa: E731
        return {
            "format": STATE_FORMAT,
            "base": self.base.state_dict(),
            "window": self.window,
            "initial": self.initial,
            "forward": list(self.forward),
            "keys": [list(key) for key in self.keys],
            "data_states": dict(self.data_states),
            "gradients": self.gradients,
            "forward_step_norm": norm(self.forward_step_norm),
            "backward_step_norm": norm(self.backward_step_norm),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT or state["window"] != self.window:
            raise ValueError(
                f"BackwardSGD.load_state_dict: state of format {state.get('format')} with window "
                f"{state.get('window')}, this optimizer has format {STATE_FORMAT} and window {self.window}"
            )
        self.base.load_state_dict(state["base"])
        params = self._params()

        def placed(tensors: Optional[list[torch.Tensor]]) -> Optional[list[torch.Tensor]]:
            if tensors is None:
                return None
            return [t.to(device=p.device, dtype=p.dtype).clone() for t, p in zip(tensors, params)]

        self.initial = placed(state["initial"])
        self.forward = deque((placed(w) for w in state["forward"]), maxlen=self.window or 1)
        self.keys = [(int(unit), int(index)) for unit, index in state["keys"]]
        self.data_states = dict(state["data_states"])
        self.gradients = int(state["gradients"])
        device = params[0].device
        norm = lambda value: None if value is None else torch.tensor(value, dtype=torch.float64, device=device)  # noqa: E731
        self.forward_step_norm = norm(state["forward_step_norm"])
        self.backward_step_norm = norm(state["backward_step_norm"])

    # -- the step -----------------------------------------------------------------------------

    @torch.no_grad()
    def _load(self, point: list[torch.Tensor]) -> None:
        for p, value in zip(self._params(), point):
            p.copy_(value)

    def _apply_map(self, context: Any, batch: Any) -> None:
        """The parameters w -> T(w) = w - lr * grad L_batch(w), the gradient averaged over
        ranks (context.backward); a parameter without a gradient stays (zero gradient)."""
        context.backward(batch)
        self.gradients += 1
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.add_(p.grad, alpha=-group["lr"])

    def _remember(self, unit: int, index: int, unit_data_state: Optional[dict[str, Any]]) -> None:
        if unit not in self.data_states:
            # A copy: the key must keep meaning this batch whatever the problem does later.
            self.data_states[unit] = copy.deepcopy(unit_data_state or {})
        self.keys.append((unit, index))
        if self.window is not None and len(self.keys) > self.window:
            del self.keys[: len(self.keys) - self.window]
            live = {unit for unit, _ in self.keys}
            for old in [u for u in self.data_states if u not in live]:
                del self.data_states[old]

    def advance(self, context: Any) -> torch.Tensor:
        """Step n on ``context.batch``: the forward iterate w_{n-1} -> w_n, then the model's
        parameters w~_{n-1} -> w~_n (from w_0, or from w_{n-W} with a window, through the
        stored batches newest first). Returns the batch's loss at w~_{n-1} (the row's
        train_loss; one forward pass more)."""
        params = self._params()
        with torch.no_grad():
            loss = context.loss_closure()()
            previous = _snapshot(params)  # w~_{n-1}
        if self.initial is None:  # the first step: the parameters are w_0 (after any broadcast)
            self.initial = _snapshot(params)
            self.forward.append(self.initial)
        self._remember(context.unit, context.index, context.unit_data_state)
        start = self.initial if self.window is None else self.forward[0]

        self._load(self.forward[-1])
        self._apply_map(context, context.batch)
        forward = _snapshot(params)
        self.forward_step_norm = _distance(forward, self.forward[-1])

        self._load(start)
        newest = len(self.keys) - 1
        for position in range(newest, -1, -1):
            unit, index = self.keys[position]
            batch = context.batch if position == newest else context.replay(unit, index, self.data_states[unit])
            self._apply_map(context, batch)
        self.forward.append(forward)
        self.backward_step_norm = _distance(params, previous)
        return loss


class BSGD(Method):
    name = "bsgd"
    # Per row: gradients so far, and ||w_n - w_{n-1}||, ||w~_n - w~_{n-1}|| at the row's last step.
    counters = ("gradients", "forward_step_norm", "backward_step_norm")
    Settings = BSGDSettings

    def __init__(self, settings: BSGDSettings):
        super().__init__(settings)
        self._budget: Optional[tuple[str, int]] = None  # (unit, total), from check()
        self._cost_checked = False
        self._previous_key: Optional[tuple[int, int]] = None

    @property
    def legend_order(self) -> int:
        return 3

    def label(self, base_label: str) -> str:
        window = self.settings.window
        return base_label + ("+BSGD" if window is None else f"+BSGD(W={window})")

    def check(self, run: Any, problem_class: type, problem_config: Any) -> None:
        opt, schedule = run.optimizer, run.schedule
        why = "backward SGD composes plain SGD maps w - h grad L(w) (the paper's setting)"
        require(opt.name == "sgd", "optimizer.name", f"must be sgd for method=bsgd: {why}", opt.name)
        require(not opt.nesterov, "optimizer.nesterov", f"must be false for method=bsgd: {why}", opt.nesterov)
        require(opt.momentum == 0, "optimizer.momentum", f"must be 0 for method=bsgd: {why}", opt.momentum)
        require(opt.weight_decay == 0, "optimizer.weight_decay", f"must be 0 for method=bsgd: {why}", opt.weight_decay)
        constant = "for method=bsgd: backward SGD needs one constant learning rate h"
        require(schedule.warmup == 0, "schedule.warmup", f"must be 0 {constant}", schedule.warmup)
        require(not schedule.milestones or schedule.gamma == 1, "schedule.milestones", f"must be [] {constant}", schedule.milestones)
        require(schedule.every is None or schedule.gamma == 1, "schedule.every", f"must be null {constant}", schedule.every)
        require(
            run.train.precision != "fp16",
            "train.precision",
            "must be fp32 or bf16 for method=bsgd (fp16's loss scaling would skip and rescale replayed maps)",
            run.train.precision,
        )
        unit = problem_class.budget_unit
        self._budget = (unit, getattr(run.train, BUDGET_KEYS[unit]))

    def wrap(self, base: Any, model: Any) -> BackwardSGD:
        dropout = [type(m).__name__ for m in model.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd)]
        if dropout:
            raise ConfigError(
                "method.name",
                f"bsgd replays batches bit-identically, but the model has {dropout[0]} layers, whose "
                "masks come from the global RNG and would differ on every replay",
            )
        return BackwardSGD(base, self.settings.window)

    def step(self, optimizer: BackwardSGD, context: Any) -> torch.Tensor:
        self._warn_cost(context)
        return optimizer.advance(context)

    def _warn_cost(self, context: Any) -> None:
        """Once per run, as soon as the steps per unit are known (at the first step of an
        iteration budget, at the second unit's first of an epoch budget): a warning when
        the whole budget needs more than GRADIENT_WARNING gradients."""
        if self._cost_checked or self._budget is None:
            return
        unit, total = self._budget
        if unit == "iteration":
            per_unit = 1
        elif context.index == 0 and self._previous_key and self._previous_key[0] == context.unit - 1:
            per_unit = self._previous_key[1] + 1
        else:
            self._previous_key = (context.unit, context.index)
            return
        self._cost_checked = True
        steps = total * per_unit
        gradients = planned_gradients(steps, self.settings.window)
        if gradients > GRADIENT_WARNING:
            log.warning(
                "method=bsgd: %d steps will take %s gradient evaluations (iterate n costs n + 1 here); "
                "method.bsgd.window=W bounds a step to W + 1",
                steps, f"{gradients:,}",
            )

    def counter_values(self, optimizer: BackwardSGD) -> dict[str, float]:
        value = lambda norm: math.nan if norm is None else float(norm)  # noqa: E731
        return {
            "gradients": optimizer.gradients,
            "forward_step_norm": value(optimizer.forward_step_norm),
            "backward_step_norm": value(optimizer.backward_step_norm),
        }
