"""The structured config of ``python -m experiments.run``: one dataclass per section.

Hydra composes ``configs/`` on top of :class:`RunConfig` (registered as ``run_schema``), so
a value of the wrong type is rejected while composing, with the key named. Ranges are
checked by ``experiments.validation``; the ``problem`` and ``method`` sections are free-form
here and checked against the chosen problem's and method's own settings there.

This module imports neither torch nor aadl: analysis code reads configs too, and
``import torch`` costs seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


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
    # false: no weight decay on 1-d parameters (BatchNorm weights and biases, every bias),
    # the usual choice for large-batch ResNet training; true: decay on every parameter.
    decay_norm_and_bias: bool = True
    # torch's implementation switches (null: torch's default). They do not change the
    # algorithm; ``fused`` is about twice as fast for the small MLPs of this suite on CPU.
    foreach: Optional[bool] = None
    fused: Optional[bool] = None


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

#: ``train.precision``: fp32 (no autocast), bf16 autocast, fp16 autocast with loss scaling.
PRECISIONS = ("fp32", "bf16", "fp16")


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
    # Stop a run whose loss or parameters become non-finite and record it as diverged
    # (false: train the whole budget anyway; the run still counts as diverged).
    stop_on_divergence: bool = True
    # Autocast of the loss: fp32 (none), bf16, or fp16 with loss scaling (GradScaler).
    precision: str = "fp32"
    # Seeds of a multirun trained together in one process as one batched model, each into
    # its own run directory (experiments/batching.py); 1: one run per process. A single
    # run trains its own seed whatever this says.
    batch_seeds: int = 1
    # The seeds this process trains batched (a multirun sets it from batch_seeds; seed
    # must be its first); null: seed alone.
    seed_group: Optional[List[int]] = None


@dataclass
class DataConfig:
    # Relative paths are taken from the working directory (Hydra does not chdir here).
    root: str = "${oc.env:AADL_DATA_ROOT,data}"


@dataclass
class CheckpointConfig:
    """When a run saves its whole state (experiments/checkpoint.py). A signal (SIGTERM,
    SIGUSR1, SIGINT) always saves one; rerunning the same command resumes from the newest."""

    every: Optional[int] = None  # budget units between checkpoints; null: only on a signal
    keep: int = 2  # newest checkpoints kept while the run goes on (all deleted once it is finished)


#: Where runs go unless ``output.root`` says otherwise (relative to the working directory).
DEFAULT_OUTPUT_ROOT = "results/runs"


@dataclass
class OutputConfig:
    root: str = DEFAULT_OUTPUT_ROOT
    name: str = "default"  # groups runs: <root>/<experiment>/<name>/...
    overwrite: bool = False  # rerun runs that are already complete


@dataclass
class RunConfig:
    experiment: str = MISSING
    seed: int = 0
    problem: Dict[str, Any] = field(default_factory=dict)  # checked against Problem.Config
    # {"name": <registered method>, <method name>: {its settings}, ...}; see experiments.methods
    method: Dict[str, Any] = field(default_factory=lambda: {"name": "none"})
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


#: Budget unit -> the ``train`` key that holds the budget.
BUDGET_KEYS = {"epoch": "epochs", "iteration": "iterations"}

SCHEMA_NAME = "run_schema"
ConfigStore.instance().store(name=SCHEMA_NAME, node=RunConfig)
