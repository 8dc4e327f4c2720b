"""Checking a composed config completely, without side effects, before anything runs.

:func:`validate` turns a composed config into a :class:`ValidatedRun`: every section is
checked against its owner's rules (the schema's types, the problem's and the method's own
settings, the base optimizer's table), every key that reached the config must be one that
something reads (a ``+key`` typo is an error naming the nearest known key), and the run's
identity includes the checksums of its input data. Checks of the machine (GPU present,
memory, disk) belong to the run itself, not here: a sweep is validated where it is
submitted, which need not be where it runs.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from experiments.errors import ConfigError, require, unknown_key
from experiments.identity import config_digest, flatten, run_identity, run_path
from experiments.methods import METHODS
from experiments.methods.base import Method
from experiments.optimizers import BASE_OPTIMIZERS, validate_optimizer
from experiments.problems import PROBLEMS
from experiments.ranges import check_reals
from experiments.schema import BUDGET_KEYS, PRECISIONS, WARMUP_MODES, RunConfig, ScheduleConfig, TrainConfig


@dataclass(frozen=True)
class ValidatedRun:
    """A checked configuration, ready to run."""

    config: RunConfig
    problem_class: type  # a subclass of experiments.problems.base.Problem
    problem_config: Any  # an instance of problem_class.Config
    method: Method
    variant: str  # e.g. "Adam", "Adam+AADL", "Adam+AADL+MA"
    resolved: dict[str, Any]  # the whole config as plain data (written to config.yaml)
    identity: dict[str, Any]  # flat config that defines the experiment (experiments.identity)
    config_id: str  # short digest of ``identity``

    @property
    def budget(self) -> int:
        return getattr(self.config.train, BUDGET_KEYS[self.problem_class.budget_unit])

    @property
    def path(self) -> Path:
        cfg = self.config
        return run_path(cfg.output.root, cfg.experiment, cfg.output.name, self.variant, self.config_id, cfg.seed)


def validate(cfg: DictConfig) -> ValidatedRun:
    """Check a composed config completely; raise ConfigError (or DatasetError for the data)."""
    # As plain data: the free-form sections (problem, method) are checked by their owners,
    # not by the typed nodes composition used for them.
    plain = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    plain.pop("hydra", None)
    _reject_unknown_sections(plain)
    try:
        run: RunConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), plain))
    except OmegaConfBaseException as error:
        raise _config_error(error) from None
    require(run.seed >= 0, "seed", "must be an integer >= 0", run.seed)
    try:
        problem_cls = PROBLEMS.get(run.experiment)
    except (KeyError, ImportError) as error:
        raise ConfigError("experiment", error.args[0]) from None
    problem_config = _section(problem_cls.Config, run.problem, "problem.")
    check_reals(problem_config, "problem.")
    method, method_sections = _validate_method(run.method)
    _validate_train(run.train, problem_cls)
    _validate_seed_group(run)
    validate_optimizer(run.optimizer)
    check_reals(run.schedule, "schedule.")
    _validate_schedule(run.schedule)
    _validate_output(run.output)
    require(
        not (run.train.precision == "fp16" and run.optimizer.name == "sgd" and run.optimizer.fused),
        "optimizer.fused",
        "fused SGD mishandles the fp16 loss scaler's skipped steps (on CPU its parameters can "
        "reach 1e14 after one); set optimizer.fused=null with train.precision=fp16",
        run.optimizer.fused,
    )
    method.check(run, problem_cls, problem_config)
    if run.train.batch_seeds > 1 or len(run.train.seed_group or ()) > 1:
        from experiments.batching import check_batchable  # imports torch: only when batching

        check_batchable(run, problem_cls, problem_config, method)
    require(run.checkpoint.every is None or run.checkpoint.every >= 1, "checkpoint.every", "must be null or an integer >= 1", run.checkpoint.every)
    require(run.checkpoint.keep >= 1, "checkpoint.keep", "must be an integer >= 1", run.checkpoint.keep)

    resolved = dataclasses.asdict(run)
    resolved["problem"] = dataclasses.asdict(problem_config)
    resolved["method"] = method_sections
    _reject_unread_keys(cfg, resolved)
    data = problem_cls.input_identity(problem_config, Path(run.data.root))
    identity = run_identity(resolved, data)
    return ValidatedRun(
        config=run,
        problem_class=problem_cls,
        problem_config=problem_config,
        method=method,
        variant=method.label(BASE_OPTIMIZERS[run.optimizer.name].label),
        resolved=resolved,
        identity=identity,
        config_id=config_digest(identity),
    )


def _validate_method(section: dict[str, Any]) -> tuple[Method, dict[str, Any]]:
    """The chosen method, and the whole ``method`` section resolved: every method's block
    is checked (the experiment configs carry the paper's settings for each), only the chosen
    one is used."""
    name = section.get("name")
    if name not in METHODS:
        raise ConfigError("method.name", f"{name!r} is not a registered method; registered: {METHODS.names()}")
    resolved: dict[str, Any] = {"name": name}
    chosen = None
    for key in sorted(set(section) - {"name"} | {name}):
        if key not in METHODS:
            raise unknown_key(f"method.{key}", [f"method.{k}" for k in ("name", *METHODS.names())])
        block = section.get(key) or {}
        if not isinstance(block, dict):
            raise ConfigError(f"method.{key}", f"must be a mapping of {key}'s settings, got {block!r}")
        try:
            method_cls = METHODS.get(key)
        except ImportError as error:
            raise ConfigError(f"method.{key}", str(error)) from None
        method = method_cls.from_config(block, f"method.{key}.")
        if dataclasses.is_dataclass(method.settings):
            check_reals(method.settings, f"method.{key}.")
        for device_key, device in method.devices().items():
            _check_device_name(device_key, device, auto=False)
        resolved[key] = method.settings_dict()
        if key == name:
            chosen = method
    return chosen, resolved


def _reject_unread_keys(cfg: DictConfig, resolved: dict[str, Any]) -> None:
    """Every key of the composed config must be one the run reads, whatever prefix (``+``,
    ``++``) put it there: an ignored key would run the untouched config under the user's
    name for another one."""
    given = OmegaConf.to_container(cfg, resolve=False)
    given.pop("hydra", None)
    known = flatten(resolved)
    for key in flatten(given):
        if key not in known and not any(k.startswith(f"{key}.") for k in known):
            raise unknown_key(key, known)


#: Sections renamed since an earlier release: the message says what to write instead.
RENAMED = {"accel": "the accel group is now method: method=aadl (or aadl_ma, none) and method.aadl.<setting>=..."}


def _reject_unknown_sections(plain: DictConfig) -> None:
    sections = {f.name for f in dataclasses.fields(RunConfig)}
    for section in plain:
        if section not in sections:
            given = flatten(OmegaConf.to_container(plain, resolve=False))
            key = next(k for k in given if k == section or k.startswith(f"{section}."))
            error = unknown_key(key, [k for k in given if not k.startswith(f"{section}.")])
            if section in RENAMED:
                raise ConfigError(key, f"{error.detail}; {RENAMED[section]}")
            raise error


def _config_error(error: OmegaConfBaseException, prefix: str = "") -> ConfigError:
    key = getattr(error, "full_key", None) or getattr(error, "key", None) or "config"
    message = getattr(error, "msg", None) or str(error)
    if isinstance(error, ConfigKeyError) and not prefix:  # a key the schema does not have
        schema = OmegaConf.to_container(OmegaConf.structured(RunConfig), resolve=False)
        return unknown_key(str(key), flatten(schema))
    # OmegaConf appends its own "full_key: ... object_type=..." lines; the first line says it.
    return ConfigError(f"{prefix}{key}", message.splitlines()[0])


def _section(schema: type, section: Any, prefix: str) -> Any:
    """Merge a free-form section into its owner's dataclass: unknown keys and wrong types
    are rejected by OmegaConf; the dataclass's ``__post_init__`` checks ranges."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), section))
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or getattr(error, "key", None)
        if key and "not in" in str(error):
            known = [f.name for f in dataclasses.fields(schema)]
            raise unknown_key(f"{prefix}{key}", [f"{prefix}{k}" for k in known]) from None
        raise _config_error(error, prefix) from None


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
        train.batch_seeds >= 1,
        "train.batch_seeds",
        "must be an integer >= 1 (1: one run per process)",
        train.batch_seeds,
    )
    require(
        train.precision in PRECISIONS,
        "train.precision",
        f"must be one of {list(PRECISIONS)}",
        train.precision,
    )
    _check_device_name("train.device", train.device, auto=True)


def _check_device_name(key: str, device: str, *, auto: bool) -> None:
    """The one rule for every device setting (``train.device``, a method's ``Method.devices``);
    whether the device exists is the run's check (experiments.run.check_devices)."""
    pattern = r"cpu|auto|cuda(:\d+)?" if auto else r"cpu|cuda(:\d+)?"
    require(
        isinstance(device, str) and re.fullmatch(pattern, device) is not None,
        key,
        f"must be cpu, cuda, cuda:<index>{' or auto' if auto else ''}",
        device,
    )


def _validate_output(output: Any) -> None:
    """``output.name`` becomes one directory under ``<root>/<experiment>/``: a separator or
    ``..`` would write outside ``output.root``, and a hidden name runs every reader skips."""
    name = output.name
    require(
        bool(name) and name not in (".", "..") and not name.startswith(".")
        and not any(c in name for c in ("/", "\\", "\0")),
        "output.name",
        "must be one directory name: not empty, not starting with '.', without '/' or '\\'",
        name,
    )


def _validate_seed_group(run: RunConfig) -> None:
    """``train.seed_group``: distinct seeds >= 0, the first of them ``seed``."""
    group = run.train.seed_group
    if group is None:
        return
    require(
        len(group) >= 1 and all(s >= 0 for s in group) and len(set(group)) == len(group),
        "train.seed_group",
        "must be null or a list of distinct integers >= 0",
        group,
    )
    require(
        run.seed == group[0],
        "seed",
        f"must be train.seed_group's first seed ({group[0]}) when train.seed_group is set",
        run.seed,
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
    require(schedule.warmup >= 0, "schedule.warmup", "must be an integer >= 0", schedule.warmup)
    require(
        schedule.warmup_mode in WARMUP_MODES,
        "schedule.warmup_mode",
        f"must be one of {list(WARMUP_MODES)}",
        schedule.warmup_mode,
    )
