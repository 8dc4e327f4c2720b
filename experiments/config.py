"""Structured configs (dataclasses) for ``python -m experiments.run`` and their validation.

Hydra composes ``configs/`` on top of :class:`RunConfig`, so a misspelt key or a value of the
wrong type is rejected by OmegaConf while composing, with the key named. Ranges are checked
by :func:`validate`, which the driver calls before it creates anything on disk. The Anderson
hyperparameters are checked by the library itself (``aadl.validate_settings``) so that the
valid ranges live in one place only.

This module imports neither torch nor aadl at import time: the figure and aggregation code
uses it too, and ``import torch`` costs seconds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """An invalid configuration value; the message starts with the dotted config key."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}")


def require(ok: bool, key: str, message: str, value: Any) -> None:
    """Raise :class:`ConfigError` for ``key`` unless ``ok``; ``message`` states the valid range."""
    if not ok:
        raise ConfigError(key, f"{message}, got {value!r}")


# --------------------------------------------------------------------------------------------
# The schema
# --------------------------------------------------------------------------------------------


@dataclass
class AccelConfig:
    """The ``accel`` section: whether to wrap the base optimizer, and every hyperparameter of
    the AADL contract (``../shared/spec/aadl-algorithm.md``) under the contract's name.

    Defaults are the library's defaults; each experiment config sets the paper's values.
    """

    enabled: bool = False
    history: int = 10
    frequency: int = 1
    store_every: int = 1
    relaxation: float = 1.0
    regularization: float = 0.0
    warmup: int = 0
    average: bool = False
    average_window: Optional[int] = None
    average_threshold: float = 0.1
    average_criterion: str = "residual"
    safeguard: str = "loss"
    solver: str = "gram"
    mixing: str = "walker_ni"
    distributed: str = "replicated"

    def settings(self) -> dict[str, Any]:
        """Keyword arguments for ``aadl.AndersonAcceleration`` / ``aadl.validate_settings``."""
        return {name: getattr(self, name) for name in ACCEL_HYPERPARAMETERS}


#: The contract's hyperparameter names, in the order they appear in ``metrics.csv``.
ACCEL_HYPERPARAMETERS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(AccelConfig) if f.name != "enabled"
)


@dataclass
class OptimizerConfig:
    """The base optimizer. Options that do not apply to ``name`` must keep their default."""

    name: str = "adam"
    lr: float = 1e-3
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    # torch's implementation switches (null: torch's default). They do not change the
    # algorithm; ``fused`` is about twice as fast for the small MLPs of this suite on CPU.
    foreach: Optional[bool] = None
    fused: Optional[bool] = None


@dataclass(frozen=True)
class BaseOptimizerSpec:
    label: str  # the variant's name in results and legends
    torch_class: str  # attribute of torch.optim
    options: tuple[str, ...]  # OptimizerConfig fields passed to the torch class


BASE_OPTIMIZERS: dict[str, BaseOptimizerSpec] = {
    "adam": BaseOptimizerSpec(
        "Adam", "Adam", ("lr", "betas", "eps", "weight_decay", "foreach", "fused")
    ),
    "sgd": BaseOptimizerSpec(
        "SGD", "SGD", ("lr", "momentum", "nesterov", "weight_decay", "foreach", "fused")
    ),
}


@dataclass
class ScheduleConfig:
    """Learning-rate schedule in the problem's budget unit (epochs or iterations).

    The rate used during unit ``u`` (counted from 0) is ``optimizer.lr`` times
    ``gamma ** (number of milestones <= u)`` (or ``gamma ** (u // every)``), preceded by
    ``warmup`` units that start at ``warmup_start_lr`` and either ramp linearly to the
    scheduled rate (``warmup_mode: linear``) or hold it (``constant``).
    """

    milestones: List[int] = field(default_factory=list)
    every: Optional[int] = None
    gamma: float = 0.1
    warmup: int = 0
    warmup_start_lr: float = 0.0
    warmup_mode: str = "linear"


WARMUP_MODES = ("linear", "constant")


@dataclass
class TrainConfig:
    """Budget and loop options. Set ``epochs`` or ``iterations``, whichever is the problem's
    budget unit; validation runs every ``eval_every`` units and after the last one."""

    epochs: Optional[int] = None
    iterations: Optional[int] = None
    eval_every: int = 1
    progress: Optional[bool] = None  # null: a bar only in an interactive single run, not under CI
    device: str = "cpu"  # cpu | cuda | cuda:N | auto
    threads: Optional[int] = None  # torch intra-op threads; null: 1 in multirun workers


@dataclass
class DataConfig:
    # Relative paths are taken from the working directory (Hydra does not chdir here).
    root: str = "${oc.env:AADL_DATA_ROOT,data}"


@dataclass
class OutputConfig:
    root: str = "results/runs"
    name: str = "default"  # groups runs: <root>/<experiment>/<name>/...
    overwrite: bool = False  # rerun runs that are already complete


@dataclass
class RunConfig:
    experiment: str = MISSING
    seed: int = 0
    problem: Dict[str, Any] = field(default_factory=dict)  # checked against Problem.Config
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    accel: AccelConfig = field(default_factory=AccelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


SCHEMA_NAME = "run_schema"
ConfigStore.instance().store(name=SCHEMA_NAME, node=RunConfig)

#: The Hydra config tree of ``python -m experiments.run``.
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIG_NAME = "config"

#: Budget unit -> the ``train`` key that holds the budget.
BUDGET_KEYS = {"epoch": "epochs", "iteration": "iterations"}

#: Keys that say where or how a run is stored or shown, not what it computes; they are left
#: out of the run's identity, so changing them does not make it a different experiment.
NON_IDENTITY_KEYS = ("seed", "data.root", "output.", "train.progress", "train.threads")


# --------------------------------------------------------------------------------------------
# Composition outside the command line
# --------------------------------------------------------------------------------------------


def compose(*overrides: str, return_hydra_config: bool = False) -> DictConfig:
    """The config ``python -m experiments.run <overrides>`` would run, through Hydra's
    compose API (for programs that drive the harness: the demo, benchmarks, tests).

    A sweep (``a=1,2``) is not expanded here: see :func:`preset_sweep`.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(CONFIG_NAME, overrides=list(overrides), return_hydra_config=return_hydra_config)


def preset_sweep(preset: str) -> dict[str, list[str]]:
    """The values a paper preset (``configs/paper/<preset>.yaml``) sweeps, in its order:
    ``preset_sweep("fig2")["accel"] == ["aadl_ma", "aadl", "none"]``, ``["seed"]`` the
    seeds as text."""
    params = compose(f"+paper={preset}", return_hydra_config=True).hydra.sweeper.params
    parsed = OverridesParser.create().parse_overrides([f"{key}={value}" for key, value in params.items()])
    return {override.key_or_group: list(override.sweep_string_iterator()) for override in parsed}


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ValidatedRun:
    """A checked configuration, ready to run."""

    config: RunConfig
    problem_class: type  # a subclass of experiments.problems.base.Problem
    problem_config: Any  # an instance of problem_class.Config
    variant: str  # e.g. "Adam", "Adam+AADL", "Adam+AADL+MA"
    resolved: dict[str, Any]  # the whole config as plain data (written to config.yaml)
    identity: dict[str, Any]  # flat config that defines the experiment (see NON_IDENTITY_KEYS)
    config_id: str  # short digest of ``identity``

    @property
    def budget(self) -> int:
        unit = self.problem_class.budget_unit
        return getattr(self.config.train, BUDGET_KEYS[unit])


def validate(cfg: DictConfig) -> ValidatedRun:
    """Check a composed config completely, without side effects; raise :class:`ConfigError`."""
    from experiments.problems import problem_class  # lazy: keeps this module import-light

    try:
        run: RunConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), cfg))
    except OmegaConfBaseException as error:
        raise _config_error(error, prefix="") from None
    require(run.seed >= 0, "seed", "must be an integer >= 0", run.seed)
    try:
        problem_cls = problem_class(run.experiment)
    except (KeyError, ImportError) as error:
        raise ConfigError("experiment", error.args[0]) from None
    problem_config = _validate_problem(problem_cls, cfg.problem)
    _validate_train(run.train, problem_cls)
    _validate_optimizer(run.optimizer)
    _validate_schedule(run.schedule)
    _validate_accel(run.accel)
    resolved = resolved_config(run, problem_config)
    identity = run_identity(resolved)
    return ValidatedRun(
        config=run,
        problem_class=problem_cls,
        problem_config=problem_config,
        variant=variant_label(run.optimizer.name, run.accel),
        resolved=resolved,
        identity=identity,
        config_id=config_digest(identity),
    )


def variant_label(optimizer_name: str, accel: AccelConfig) -> str:
    """The variant's name in results and legends: "Adam", "Adam+AADL" or "Adam+AADL+MA"."""
    label = BASE_OPTIMIZERS[optimizer_name].label
    if accel.enabled:
        label += "+AADL+MA" if accel.average else "+AADL"
    return label


def resolved_config(run: RunConfig, problem_config: Any) -> dict[str, Any]:
    """The whole config as plain data, with the problem's defaults filled in."""
    resolved = dataclasses.asdict(run)
    resolved["problem"] = dataclasses.asdict(problem_config)
    return resolved


def run_identity(resolved: dict[str, Any]) -> dict[str, Any]:
    """The flattened config minus :data:`NON_IDENTITY_KEYS`; without acceleration the
    Anderson hyperparameters are dropped too, since they do not affect such a run."""
    ignored = NON_IDENTITY_KEYS
    if not resolved["accel"]["enabled"]:
        ignored += tuple(f"accel.{name}" for name in ACCEL_HYPERPARAMETERS)
    return {
        key: value
        for key, value in flatten(resolved).items()
        if not any(key == k or (k.endswith(".") and key.startswith(k)) for k in ignored)
    }


def config_digest(identity: dict[str, Any]) -> str:
    blob = json.dumps(identity, sort_keys=True, default=str).encode()
    return hashlib.sha1(blob).hexdigest()[:8]


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists are kept as values."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat


def _config_error(error: OmegaConfBaseException, prefix: str) -> ConfigError:
    key = getattr(error, "full_key", None) or getattr(error, "key", None) or "config"
    message = getattr(error, "msg", None) or str(error)
    # OmegaConf appends its own "full_key: ... object_type=..." lines; the first line says it.
    return ConfigError(f"{prefix}{key}", message.splitlines()[0])


def _validate_problem(problem_cls: type, section: Any) -> Any:
    """Merge the ``problem`` section into the problem's Config dataclass: unknown keys and
    wrong types are rejected by OmegaConf; the dataclass's ``__post_init__`` checks ranges."""
    schema = OmegaConf.structured(problem_cls.Config)
    try:
        return OmegaConf.to_object(OmegaConf.merge(schema, section))
    except OmegaConfBaseException as error:
        raise _config_error(error, prefix="problem.") from None


def _validate_train(train: TrainConfig, problem_cls: type) -> None:
    unit = problem_cls.budget_unit
    budget_key = BUDGET_KEYS[unit]
    for key in BUDGET_KEYS.values():
        value = getattr(train, key)
        if key == budget_key:
            require(
                value is not None and value >= 1,
                f"train.{key}",
                f"{problem_cls.name} is budgeted in {unit}s: set an integer >= 1",
                value,
            )
        else:
            require(
                value is None,
                f"train.{key}",
                f"does not apply to {problem_cls.name}, whose budget is train.{budget_key}; "
                "leave it null",
                value,
            )
    require(train.eval_every >= 1, "train.eval_every", "must be an integer >= 1", train.eval_every)
    require(
        train.threads is None or train.threads >= 1,
        "train.threads",
        "must be null or an integer >= 1",
        train.threads,
    )
    require(
        re.fullmatch(r"cpu|auto|cuda(:\d+)?", train.device) is not None,
        "train.device",
        "must be cpu, cuda, cuda:<index> or auto",
        train.device,
    )


def _validate_optimizer(opt: OptimizerConfig) -> None:
    require(opt.name in BASE_OPTIMIZERS, "optimizer.name", f"must be one of {sorted(BASE_OPTIMIZERS)}", opt.name)
    require(opt.lr > 0, "optimizer.lr", "must be > 0", opt.lr)
    require(opt.weight_decay >= 0, "optimizer.weight_decay", "must be >= 0", opt.weight_decay)
    require(opt.eps > 0, "optimizer.eps", "must be > 0", opt.eps)
    require(opt.momentum >= 0, "optimizer.momentum", "must be >= 0", opt.momentum)
    require(
        len(opt.betas) == 2 and all(0 <= b < 1 for b in opt.betas),
        "optimizer.betas",
        "must be two numbers in [0, 1)",
        opt.betas,
    )
    require(
        not opt.nesterov or opt.momentum > 0,
        "optimizer.nesterov",
        "needs optimizer.momentum > 0",
        opt.nesterov,
    )
    # An option the chosen optimizer ignores would silently not do what the user asked.
    applicable = BASE_OPTIMIZERS[opt.name].options
    for f in dataclasses.fields(OptimizerConfig):
        if f.name in applicable or f.name == "name":
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        require(
            getattr(opt, f.name) == default,
            f"optimizer.{f.name}",
            f"does not apply to optimizer.name={opt.name}; leave it at {default!r}",
            getattr(opt, f.name),
        )


def _validate_schedule(schedule: ScheduleConfig) -> None:
    milestones = schedule.milestones
    require(
        all(m >= 1 for m in milestones) and all(a < b for a, b in zip(milestones, milestones[1:])),
        "schedule.milestones",
        "must be strictly increasing integers >= 1",
        milestones,
    )
    require(
        schedule.every is None or schedule.every >= 1,
        "schedule.every",
        "must be null or an integer >= 1",
        schedule.every,
    )
    require(
        not (milestones and schedule.every is not None),
        "schedule.every",
        "cannot be combined with schedule.milestones; set one of them",
        schedule.every,
    )
    require(0 < schedule.gamma <= 1, "schedule.gamma", "must be in (0, 1]", schedule.gamma)
    require(schedule.warmup >= 0, "schedule.warmup", "must be an integer >= 0", schedule.warmup)
    require(
        schedule.warmup_start_lr >= 0,
        "schedule.warmup_start_lr",
        "must be >= 0",
        schedule.warmup_start_lr,
    )
    require(
        schedule.warmup_mode in WARMUP_MODES,
        "schedule.warmup_mode",
        f"must be one of {list(WARMUP_MODES)}",
        schedule.warmup_mode,
    )


def _validate_accel(accel: AccelConfig) -> None:
    """Delegate the ranges to the library and name the config key in its error."""
    from aadl import validate_settings

    try:
        validate_settings(**accel.settings())
    except ValueError as error:
        message = str(error)
        # The library names the offending parameter; when its message mentions several
        # (e.g. a default derived from another one), the first mentioned is the subject.
        # \b does not stop inside "average_window", so "average" cannot match there.
        positions = {
            match.start(): name
            for name in ACCEL_HYPERPARAMETERS
            if (match := re.search(rf"\b{name}\b", message))
        }
        key = f"accel.{positions[min(positions)]}" if positions else "accel"
        raise ConfigError(key, message) from None
