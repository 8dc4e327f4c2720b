"""The base optimizers a run can use: their table, validation and construction."""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any, Iterable

from experiments.errors import require
from experiments.ranges import check_reals
from experiments.lr_scaling import register_resolvers
from experiments.schema import OptimizerConfig

# optimizer.lr may be a rule of the global batch (${scaled_lr:...}, ${fig4_lr:...}):
# registered here, before validation (which imports this module) resolves a config.
register_resolvers()


@dataclass(frozen=True)
class BaseOptimizerSpec:
    label: str  # the variant's name in results and legends
    torch_class: str  # attribute of torch.optim, or "module:Class"
    options: tuple[str, ...]  # OptimizerConfig fields passed to the torch class


#: OptimizerConfig fields the harness applies itself, for every base optimizer.
HARNESS_OPTIONS = ("name", "decay_norm_and_bias")

BASE_OPTIMIZERS: dict[str, BaseOptimizerSpec] = {
    "adam": BaseOptimizerSpec(
        "Adam", "Adam", ("lr", "betas", "eps", "weight_decay", "foreach", "fused")
    ),
    "sgd": BaseOptimizerSpec(
        "SGD", "SGD", ("lr", "momentum", "nesterov", "weight_decay", "foreach", "fused")
    ),
    # The harness's own (experiments/lars.py): "module:Class" instead of a torch.optim name.
    "lars": BaseOptimizerSpec("LARS", "experiments.lars:LARS", ("lr", "momentum", "nesterov", "weight_decay")),
}


def validate_optimizer(opt: OptimizerConfig) -> None:
    """Raise ConfigError for a value out of range or an option ``name`` would ignore."""
    require(opt.name in BASE_OPTIMIZERS, "optimizer.name", f"must be one of {sorted(BASE_OPTIMIZERS)}", opt.name)
    # Each real value's interval is checked against experiments.ranges.FLOAT_RANGES.
    check_reals(opt, "optimizer.")
    require(len(opt.betas) == 2, "optimizer.betas", "must be two numbers in [0, 1)", opt.betas)
    require(
        not opt.nesterov or opt.momentum > 0,
        "optimizer.nesterov",
        "needs optimizer.momentum > 0",
        opt.nesterov,
    )
    require(
        opt.decay_norm_and_bias or opt.weight_decay > 0,
        "optimizer.decay_norm_and_bias",
        "false exempts 1-d parameters from weight decay, but optimizer.weight_decay is 0; leave it true",
        opt.decay_norm_and_bias,
    )
    # An option the chosen optimizer ignores would silently not do what the user asked.
    applicable = BASE_OPTIMIZERS[opt.name].options
    for f in dataclasses.fields(OptimizerConfig):
        if f.name in applicable or f.name in HARNESS_OPTIONS:
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        require(
            getattr(opt, f.name) == default,
            f"optimizer.{f.name}",
            f"does not apply to optimizer.name={opt.name}; leave it at {default!r}",
            getattr(opt, f.name),
        )


def build_base_optimizer(params: Iterable[Any], cfg: OptimizerConfig) -> Any:
    import torch

    spec = BASE_OPTIMIZERS[cfg.name]
    options: dict[str, Any] = {name: getattr(cfg, name) for name in spec.options}
    if "betas" in options:
        options["betas"] = tuple(options["betas"])
    if not cfg.decay_norm_and_bias:
        params = decay_groups(params)
    module, _, name = spec.torch_class.rpartition(":")
    optimizer_class = getattr(importlib.import_module(module) if module else torch.optim, name)
    return optimizer_class(params, **options)


def decay_groups(params: Iterable[Any]) -> list[dict[str, Any]]:
    """Two parameter groups: matrices and convolution kernels with the configured weight
    decay, 1-d parameters (normalisation scales and shifts, biases) without. The number of
    dimensions tells them apart, so the model's module types need not be known."""
    params = list(params)
    decayed = [p for p in params if p.ndim > 1]
    exempt = [p for p in params if p.ndim <= 1]
    return [group for group in ({"params": decayed}, {"params": exempt, "weight_decay": 0.0}) if group["params"]]
