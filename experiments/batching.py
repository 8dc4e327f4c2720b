"""Seed batching: S seeds of one configuration trained as one batched model in one process.

Seed studies train many copies of a small network that differ only in their seed; each is
far too small to keep a core busy, so one process per seed spends its time on overheads.
Here the S copies become one model whose every parameter is the S copies' parameters
stacked along a leading dimension (:class:`SeedStack`), the S seeds' batches are stacked
the same way, and the problem computes the S losses in one batched pass
(``Problem.batched_loss``). The base optimizers the harness offers are elementwise (Adam,
SGD with momentum), so one step over the stacked parameters is S independent steps, and
``aadl.BatchedAndersonAcceleration`` keeps every AA decision per seed. Each seed keeps
exactly what its single run has: its own problem instance (data order, points), its own
initialisation (``torch.manual_seed(seed)`` before its ``build_model``), the same schedule.
The one training loop (experiments/training.py) runs S lanes of :class:`SeedGroupProblem`
as it runs one problem; experiments/seed_groups.py writes each seed's run directory.

A problem opts in by defining::

    def batched_loss(self, model, tensors, batch) -> Tensor:
        '''The (S,) training losses of S copies of ``model`` (this seed's freshly built
        model, used for its structure only) whose parameters and buffers are ``tensors``
        (name -> stacked (S, ...) tensor, the names of model.named_parameters()) on
        ``batch`` (the S seeds' batches, stacked by stack_batches); lane s must equal
        loss(model with lane s's tensors, lane s's batch), under torch.no_grad() too.'''

and by drawing nothing from the global torch RNG while it trains (its data order comes
from its own generators), so that S seeds in one process see what S processes would.
:func:`lane_by_lane_loss` implements the hook from ``Problem.loss`` for any problem whose loss
depends on the seed only through the batch; :func:`stacked_linear` is nn.Linear for S lanes
with each lane's values exactly its single run's (what makes a batched run equal its single
runs, not only to rounding).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F

from experiments.errors import ConfigError
from experiments.optimizers import build_base_optimizer
from experiments.step import StepContext

#: The methods that can step S seeds as one (method.name -> how its optimizer is built):
#: the base optimizer alone, and AADL (and its averaging-only control, ma) through
#: aadl.BatchedAndersonAcceleration.
BATCHED_METHODS = ("none", "aadl", "ma")
#: The methods whose optimizer is aadl.BatchedAndersonAcceleration with their settings.
ANDERSON_METHODS = ("aadl", "ma")


def check_batchable(run: Any, problem_cls: type, problem_config: Any, method: Any) -> None:
    """Raise ConfigError, naming the key, unless ``run`` (a RunConfig) can train seeds batched.

    A problem may refuse settings it cannot batch with its classmethod
    ``Problem.batching_refused(problem_config) -> (key, why) | None``."""
    train = run.train
    key = "train.batch_seeds" if train.batch_seeds > 1 else "train.seed_group"
    value = train.batch_seeds if train.batch_seeds > 1 else train.seed_group
    advice = "set train.batch_seeds=1 to run one seed per process"
    if not callable(problem_cls.batched_loss):
        raise ConfigError(key, f"experiment {problem_cls.name} cannot train seeds batched (its problem has no batched_loss); {advice}, got {value!r}")
    reason = problem_cls.batching_refused(problem_config)
    if reason is not None:
        refused_key, why = reason
        raise ConfigError(refused_key, f"{why}; or {advice}, got {getattr(problem_config, refused_key.split('.')[-1], None)!r}")
    if method.name not in BATCHED_METHODS:
        raise ConfigError(key, f"method.name={method.name} cannot train seeds batched (batched methods: {', '.join(BATCHED_METHODS)}); {advice}, got {value!r}")
    if method.name in ANDERSON_METHODS:
        settings = method.settings
        variant = getattr(settings, "variant", "contract")
        if variant != "contract":
            raise ConfigError(f"method.{method.name}.variant", f"only variant=contract trains seeds batched; {advice}, got {variant!r}")
        if settings.distributed != "replicated":
            raise ConfigError(f"method.{method.name}.distributed", f"only distributed=replicated trains seeds batched; {advice}, got {settings.distributed!r}")
    if train.precision != "fp32":
        raise ConfigError("train.precision", f"seed-batched runs train in fp32 only; {advice} for {train.precision}, got {train.precision!r}")
    if not getattr(run.optimizer, "decay_norm_and_bias", True):
        # Stacking adds a dimension, so the 1-d parameters it exempts could not be told apart.
        raise ConfigError("optimizer.decay_norm_and_bias", f"false is not supported seed-batched; {advice}, got False")


# -- the stacked model -------------------------------------------------------------------


class SeedStack(torch.nn.Module):
    """S copies of one architecture as one module: every parameter and buffer of the copies
    stacked along a new leading dimension of size S, in the copies' own order, so that lane
    s's joint vector is laid out as its single run's."""

    def __init__(self, models: Sequence[torch.nn.Module]):
        super().__init__()
        first = models[0]
        self.lanes = len(models)
        self.parameter_names = [name for name, _ in first.named_parameters()]
        self.buffer_names = [name for name, _ in first.named_buffers()]
        own = [dict(m.named_parameters()) for m in models]
        self.stacked = torch.nn.ParameterList(
            torch.nn.Parameter(torch.stack([p[name].detach() for p in own]), requires_grad=own[0][name].requires_grad)
            for name in self.parameter_names
        )
        buffers = [dict(m.named_buffers()) for m in models]
        for index, name in enumerate(self.buffer_names):
            self.register_buffer(f"buffer{index}", torch.stack([b[name] for b in buffers]))

    def tensors(self) -> dict[str, torch.Tensor]:
        """Name (as in the copies' named_parameters / named_buffers) -> stacked tensor."""
        named = dict(zip(self.parameter_names, self.stacked))
        named.update((name, getattr(self, f"buffer{i}")) for i, name in enumerate(self.buffer_names))
        return named

    @torch.no_grad()
    def load_lane(self, lane: int, model: torch.nn.Module) -> torch.nn.Module:
        """Copy lane ``lane`` into ``model`` (one of the copies' architecture); returns it."""
        params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
        for name, tensor in self.tensors().items():
            (params.get(name) if name in params else buffers[name]).copy_(tensor[lane])
        return model

    def finite_lanes(self) -> list[bool]:
        """Whether each lane's parameters are all finite (one pass per tensor)."""
        finite = torch.ones(self.lanes, dtype=torch.bool, device=self.stacked[0].device)
        for p in self.stacked:
            finite &= torch.isfinite(p).flatten(1).all(dim=1)
        return finite.tolist()


# -- batches -----------------------------------------------------------------------------


def stack_batches(batches: Sequence[Any]) -> Any:
    """The S seeds' batches as one: tensors stacked along a new dim 0, through tuples, lists
    and dataclasses (e.g. the PINNs' PinnBatch)."""
    first = batches[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(list(batches))
    if isinstance(first, (tuple, list)):
        return type(first)(stack_batches(parts) for parts in zip(*batches, strict=True))
    if dataclasses.is_dataclass(first):
        return type(first)(*(stack_batches([getattr(b, f.name) for b in batches]) for f in dataclasses.fields(first)))
    raise TypeError(f"cannot stack batches of type {type(first).__name__}")


def _leaves(batch: Any) -> list[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, (tuple, list)):
        return [leaf for part in batch for leaf in _leaves(part)]
    if dataclasses.is_dataclass(batch):
        return [leaf for f in dataclasses.fields(batch) for leaf in _leaves(getattr(batch, f.name))]
    raise TypeError(f"cannot take the tensors of a {type(batch).__name__}")


def _rebuild(like: Any, leaves: Iterator[torch.Tensor]) -> Any:
    if isinstance(like, torch.Tensor):
        return next(leaves)
    if isinstance(like, (tuple, list)):
        return type(like)(_rebuild(part, leaves) for part in like)
    return type(like)(*(_rebuild(getattr(like, f.name), leaves) for f in dataclasses.fields(like)))


def lane_batches(batch: Any, lanes: int) -> list[Any]:
    """The inverse of :func:`stack_batches`: lane s's batch (views, no copy)."""
    leaves = [leaf.unbind(0) for leaf in _leaves(batch)]
    return [_rebuild(batch, iter([leaf[lane] for leaf in leaves])) for lane in range(lanes)]


# -- exact batched pieces for problems -----------------------------------------------------
#
# A batched run is held against its single runs to rounding, so a problem's batched loss
# should compute, per lane, exactly the single run's operations. Matrix products are where
# batching pays and where that is not automatic: torch's batched product and its backward
# choose other matrix orientations than nn.Linear's, and round differently.


class _StackedLinear(torch.autograd.Function):
    """``x @ weight.T + bias`` for S lanes at once, forward and backward computed in the
    orientations nn.Linear's single-lane kernels use (addmm; grad_x = g W, grad_W = g^T x,
    grad_b = sum over rows of g), so that each lane's values equal its single run's."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        x, weight = ctx.saved_tensors
        grad_x = torch.bmm(grad, weight) if ctx.needs_input_grad[0] else None
        grad_weight = torch.bmm(grad.transpose(1, 2), x) if ctx.needs_input_grad[1] else None
        grad_bias = grad.sum(1) if ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias


def stacked_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """nn.Linear for S lanes: x (S, B, in), weight (S, out, in), bias (S, out) -> (S, B, out),
    each lane equal to ``torch.nn.functional.linear`` of its slices. A layer with one output
    runs lane by lane: its single-lane product is a matrix-vector one, which no batched
    product reproduces."""
    if weight.shape[1] == 1:
        return torch.stack([F.linear(a, w, b) for a, w, b in zip(x.unbind(0), weight.unbind(0), bias.unbind(0))])
    return _StackedLinear.apply(x, weight, bias)


class _LossOf(torch.nn.Module):
    """``problem.loss(model, batch)`` as a module, so that torch.func.functional_call swaps
    the model's parameters for the whole loss, layers accessed directly included (the
    PINNs' forward Laplacian)."""

    def __init__(self, problem: Any, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self._problem = problem

    def forward(self, batch: Any) -> torch.Tensor:
        return self._problem.loss(self.model, batch)


def lane_by_lane_loss(problem: Any, model: torch.nn.Module, tensors: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
    """``Problem.batched_loss`` from ``problem.loss``, lane by lane: the single-seed loss on
    views of lane s's parameters and batch (exactly the single run's operations; gradients
    reach the stacked parameters through one unbind per tensor). For problems whose steps
    are large enough that batching the products would not pay."""
    wrapper = _LossOf(problem, model)
    lanes = next(iter(tensors.values())).shape[0]
    views = {f"model.{name}": tensor.unbind(0) for name, tensor in tensors.items()}
    losses = [
        torch.func.functional_call(wrapper, {name: view[lane] for name, view in views.items()}, (lane_batch,))
        for lane, lane_batch in enumerate(lane_batches(batch, lanes))
    ]
    return torch.stack(losses)


# -- the group as the loop's problem -----------------------------------------------------


class SeedGroupProblem:
    """The S seeds' problems as the training loop's one problem, with S lanes.

    ``batches_from`` yields the seeds' batches stacked, ``loss`` the (S,) losses,
    ``state_dict`` every seed's data order; ``evaluate_lanes`` loads each lane into that
    seed's own model and evaluates it with that seed's problem (per-seed metrics rows)."""

    def __init__(self, problems: Sequence[Any], models: Sequence[torch.nn.Module]):
        first = problems[0]
        self.problems, self.models = list(problems), list(models)
        self.lanes = len(self.problems)
        self.name, self.budget_unit = first.name, first.budget_unit
        self.samples_per_step = first.samples_per_step
        self.pure_loss = first.pure_loss  # experiments.step.KeptForward
        self.step_context = LaneStepContext
        self._stacked: Optional[tuple[tuple[Any, ...], Any]] = None  # (the lanes' batches, stacked)

    def _stack(self, batches: Sequence[Any]) -> Any:
        # Problems that draw their points once per stage hand out the same batch objects
        # step after step (the PINNs): stack them once. The cache holds the batches it was
        # made from, so their identities cannot be reused by new objects while it is compared.
        cached = self._stacked
        if cached is None or len(cached[0]) != len(batches) or any(a is not b for a, b in zip(cached[0], batches)):
            self._stacked = cached = (tuple(batches), stack_batches(batches))
        return cached[1]

    def batches(self, unit: int) -> Iterable[Any]:
        return self.batches_from(unit, 0)

    def batches_from(self, unit: int, skip: int) -> Iterator[Any]:
        for batches in zip(*(p.batches_from(unit, skip) for p in self.problems), strict=True):
            yield self._stack(batches)

    def loss(self, model: SeedStack, batch: Any) -> torch.Tensor:
        return self.problems[0].batched_loss(self.models[0], model.tensors(), batch)

    def evaluate_lanes(self, model: SeedStack, lanes: Sequence[int]) -> list[dict[str, float]]:
        """Each of ``lanes``' metrics: the problem's ``batched_evaluate(model, tensors)`` where
        it has one (for problems whose validation data is the same for every seed; equal to
        each seed's ``evaluate`` to rounding), else each lane's own problem and model."""
        batched = self.problems[0].batched_evaluate
        if batched is not None:
            tensors = model.tensors()
            if list(lanes) != list(range(self.lanes)):
                index = torch.tensor(list(lanes), device=model.stacked[0].device)
                tensors = {name: tensor.index_select(0, index) for name, tensor in tensors.items()}
            with torch.no_grad():
                return batched(self.models[0], tensors)
        metrics = []
        for lane in lanes:
            single = model.load_lane(lane, self.models[lane])
            single.eval()
            metrics.append(self.problems[lane].evaluate(single))
        return metrics

    def counter_values(self, method: Any, optimizer: Any, lane: int) -> dict[str, Any]:
        """Lane ``lane``'s values of the method's counters (the single run's counter_values)."""
        if not method.counters:
            return {}
        stats = optimizer.stats_for(lane)
        return {name: int(stats[name]) for name in method.counters}

    def lane_model_state(self, model: SeedStack, lane: int) -> dict[str, torch.Tensor]:
        """Lane ``lane`` as its single run's model.state_dict() (model.pt)."""
        return model.load_lane(lane, self.models[lane]).state_dict()

    def state_dict(self) -> dict[str, Any]:
        return {"lanes": [p.state_dict() for p in self.problems]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for problem, lane_state in zip(self.problems, state["lanes"], strict=True):
            problem.load_state_dict(lane_state)

    def notes(self) -> list[str]:
        return self.problems[0].notes()


class LaneStepContext(StepContext):
    """A StepContext whose loss is the (S,) lane losses: backward through their sum gives
    every lane its own gradient (the lanes share no parameter)."""

    def backward(self, batch: Any = None, *, sync: bool = True) -> torch.Tensor:
        batch = self.batch if batch is None else batch
        self.optimizer.zero_grad(set_to_none=True)
        kept = self.kept.take(batch, self.model) if self.kept is not None else None
        losses = kept if kept is not None else self.problem.loss(self.net, batch)
        losses.sum().backward()
        return losses.detach() if kept is not None else losses


def build_group(problems: Sequence[Any], runs: Sequence[Any]) -> tuple[SeedGroupProblem, Any]:
    """The group problem and its TrainingState: each seed's model built as its single run
    builds it (``torch.manual_seed(seed)``, then ``build_model``), then stacked; one base
    optimizer over the stacked parameters, wrapped as the method does for one seed."""
    from experiments.training import TrainingState

    models = []
    for problem, run in zip(problems, runs, strict=True):
        torch.manual_seed(run.config.seed)
        models.append(problem.build_model())
    stack = SeedStack(models)
    cfg, method = runs[0].config, runs[0].method
    base = build_base_optimizer(stack.parameters(), cfg.optimizer)
    if method.name in ANDERSON_METHODS:
        from aadl.batched import BatchedAndersonAcceleration

        optimizer = BatchedAndersonAcceleration(base, seeds=len(models), **method.settings.as_dict())
    elif method.name == "none":
        optimizer = base
    else:  # validation refuses these (check_batchable)
        raise ConfigError("method.name", f"{method.name} cannot train seeds batched")
    group = SeedGroupProblem(problems, models)
    return group, TrainingState(model=stack, optimizer=optimizer, lanes=len(models))
