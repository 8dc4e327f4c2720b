"""The interface every optimisation method implements (see docs/architecture.md).

A method is one module plus one config file (``configs/method/<choice>.yaml``). It owns its
settings (the ``method.<name>`` config section), its label and place in legends, how it
wraps the base optimizer, what closure its ``step`` needs and the counters it reports. The
training loop, the run directory, aggregation and figures know only this interface.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar, Mapping

from experiments.errors import ConfigError, unknown_key

#: What the default :meth:`Method.step` passes to ``optimizer.step``. "none": nothing;
#: "loss": a closure that only computes the batch's loss, called under ``torch.no_grad()``.
CLOSURE_KINDS = ("none", "loss")


def config_dataclass(name: str, fields: list, module: str) -> type:
    """A dataclass made at run time for Hydra's ConfigStore, named as ``module.name`` so that
    composed configs holding it can be pickled (the module must return it from ``__getattr__``)."""
    node = dataclasses.make_dataclass(name, fields)
    node.__module__ = module
    return node


class Method(abc.ABC):
    name: ClassVar[str]  # registry name, the value of ``method.name``
    closure: ClassVar[str] = "none"  # one of CLOSURE_KINDS
    # The method's metrics.csv columns, last in each row: cumulative counters and any
    # per-row quantities (counter_values gives their values).
    counters: ClassVar[tuple[str, ...]] = ()
    Settings: ClassVar[type | None] = None  # dataclass of ``method.<name>``, for the default from_config

    def __init__(self, settings: Any):
        self.settings = settings

    @classmethod
    def config_node(cls) -> type | None:
        """A dataclass of every setting with its default, composed into ``method.<name>`` so
        that each can be overridden without Hydra's ``+`` (None: the method has none)."""
        return cls.Settings

    @classmethod
    def from_config(cls, section: Mapping[str, Any], prefix: str) -> "Method":
        """The method built from its config section; raise :class:`ConfigError` naming the key
        (``prefix`` + field, e.g. ``method.aadl.history``). The default fills ``Settings``,
        whose ``__post_init__`` may check ranges with ``experiments.errors.require``."""
        if cls.Settings is None:
            if section:
                raise unknown_key(f"{prefix}{next(iter(section))}", ())
            return cls(None)
        known = [f.name for f in dataclasses.fields(cls.Settings)]
        for key in section:
            if key not in known:
                raise unknown_key(f"{prefix}{key}", [f"{prefix}{name}" for name in known])
        try:
            return cls(cls.Settings(**section))
        except ConfigError as error:
            if error.key.startswith(prefix):
                raise
            raise ConfigError(f"{prefix}{error.key}", error.detail) from None

    def settings_dict(self) -> dict[str, Any]:
        """The resolved settings (defaults filled in), as written to config.yaml."""
        return {} if self.settings is None else dataclasses.asdict(self.settings)

    def hyperparameters(self) -> dict[str, Any]:
        """Constant metrics.csv columns that say how this run was optimised."""
        return self.settings_dict()

    @property
    def baseline(self) -> bool:
        """Whether this is the base optimizer alone: the reference of every comparison."""
        return False

    @property
    @abc.abstractmethod
    def legend_order(self) -> int:
        """Position in legends and tables (0: the base optimizer alone)."""

    @abc.abstractmethod
    def label(self, base_label: str) -> str:
        """The variant's name in results and legends, e.g. "Adam+AADL" for base "Adam"."""

    @abc.abstractmethod
    def wrap(self, base: Any, model: Any) -> Any:
        """The optimizer the training loop steps: ``base`` itself or a wrapper around it."""

    def step(self, optimizer: Any, context: Any) -> Any:
        """One optimisation step on ``context.batch`` (an ``experiments.step.StepContext``);
        returns the batch's loss at the parameters before the step (the row's train_loss).
        The default: one gradient, then ``optimizer.step`` with the closure :attr:`closure`
        names. A method that takes other gradients (at other points, on other batches, or
        without the all-reduce) overrides this and uses the context's operations."""
        loss = context.backward()
        context.optimizer_step(context.loss_closure() if self.closure == "loss" else None)
        return loss

    def check(self, run: Any, problem_class: type, problem_config: Any) -> None:
        """Refuse, with a ConfigError naming the key, a base optimizer, problem or setting
        this method cannot run with; called by ``experiments.validation.validate`` with the
        typed config (``RunConfig``), the problem's class and its typed section."""

    def devices(self) -> dict[str, str]:
        """The devices this method's settings place tensors on, by config key (e.g.
        ``method.aadl.history_device``): the run checks that each exists on its machine, as
        it checks ``train.device``, before anything is written."""
        return {}

    def counter_values(self, optimizer: Any) -> dict[str, float]:
        """The current value of each of :attr:`counters`."""
        return {}
