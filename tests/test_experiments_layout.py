"""The harness's interfaces are real: a method registered only here runs through run ->
metrics.csv -> figures; every config of every group composes; the AADL config section is
the library's settings, names and defaults alike."""

from __future__ import annotations

import dataclasses

import pandas as pd
import pytest
import torch

from conftest import CONFIG_DIR
from experiments.errors import ConfigError, require
from experiments.methods import METHODS
from experiments.methods.base import Method
from experiments.run import execute
from experiments.validation import validate


@dataclasses.dataclass
class ScaledStepSettings:
    scale: float = 0.5

    def __post_init__(self) -> None:
        require(0 < self.scale <= 2, "scale", "must be in (0, 2]", self.scale)


class ScaledStepOptimizer:
    """The base step, scaled: w <- w + scale * (G(w) - w)."""

    def __init__(self, base: torch.optim.Optimizer, scale: float):
        self.base, self.scale, self.steps = base, scale, 0
        self.param_groups = base.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self) -> None:
        params = [p for group in self.param_groups for p in group["params"]]
        before = [p.clone() for p in params]
        self.base.step()
        for p, old in zip(params, before):
            p.copy_(old + self.scale * (p - old))
        self.steps += 1


class ScaledStep(Method):
    name = "scaled_step"
    counters = ("scaled_steps",)
    Settings = ScaledStepSettings

    @property
    def legend_order(self) -> int:
        return 5

    def label(self, base_label: str) -> str:
        return f"{base_label}+scaled"

    def wrap(self, base, model):
        return ScaledStepOptimizer(base, self.settings.scale)

    def counter_values(self, optimizer) -> dict[str, int]:
        return {"scaled_steps": optimizer.steps}


@pytest.fixture
def toy_method():
    METHODS.register(ScaledStep.name, ScaledStep)
    yield ScaledStep
    METHODS.unregister(ScaledStep.name)


def test_a_method_registered_in_a_test_runs_through_run_metrics_and_figures(toy_method, compose, data_root, tmp_path):
    from experiments.analysis.figures import curves_report

    root = tmp_path / "runs"
    common = (f"data.root={data_root}", f"output.root={root}", "train.epochs=3", "output.name=toy")
    for seed in (0, 1):
        plain = execute(compose(*common, f"seed={seed}"))
        toy = execute(compose(*common, f"seed={seed}", "method.name=scaled_step", "method.scaled_step.scale=0.25"))
        assert (plain.status, toy.status) == ("completed", "completed")
    metrics = pd.read_csv(toy.path / "metrics.csv")
    assert set(metrics["variant"]) == {"Adam+scaled"} and set(metrics["method"]) == {"scaled_step"}
    assert set(metrics["scale"]) == {0.25} and metrics["scaled_steps"].tolist() == [0, 10, 20, 30]
    assert list(metrics.columns)[-1] == "scaled_steps"

    report = curves_report(root / "graduate_admissions" / "toy")
    assert report.results.labels == ["Adam", "Adam+scaled"]  # baseline first, by legend order
    row = report.summary.set_index("label").loc["Adam+scaled"]
    assert row["runs"] == 2 and row["final_mean"] == pytest.approx(metrics["val_loss"].iloc[-1], rel=2)
    assert report.summary.attrs["baseline"] == "Adam"


def test_a_registered_methods_settings_are_checked_and_overridable_without_plus(toy_method, compose):
    run = validate(compose("method.name=scaled_step", "method.scaled_step.scale=2"))
    assert run.method.settings.scale == 2 and run.identity["method.scaled_step.scale"] == 2
    with pytest.raises(ConfigError) as error:
        validate(compose("method.name=scaled_step", "method.scaled_step.scale=3"))
    assert error.value.key == "method.scaled_step.scale"


def test_the_aadl_section_is_the_librarys_settings_with_its_defaults(compose):
    from aadl import SETTING_NAMES, AndersonSettings

    run = validate(compose("experiment=burgers2d", "method=aadl"))
    assert tuple(run.resolved["method"]["aadl"]) == SETTING_NAMES
    node = METHODS.get("aadl").config_node()
    assert [f.name for f in dataclasses.fields(node)] == list(SETTING_NAMES)
    assert {f.name: f.default for f in dataclasses.fields(node)} == AndersonSettings().as_dict()
    # What the composed config holds where no experiment sets a value is the library's default.
    assert compose("method=aadl").method.aadl.regularization == AndersonSettings().regularization


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


#: What a method that refuses the paper's base optimizer or schedule needs on every experiment.
METHOD_OVERRIDES = {"bsgd": ("optimizer.name=sgd", "optimizer.nesterov=false", "optimizer.momentum=0", "optimizer.weight_decay=0",
                             "schedule.milestones=[]", "schedule.every=null", "schedule.warmup=0")}


@pytest.mark.parametrize("method", _options("method"))
@pytest.mark.parametrize("experiment", _options("experiment"))
def test_every_method_and_experiment_config_composes_and_validates(compose, method, experiment, data_for):
    run = validate(compose(f"experiment={experiment}", f"method={method}", *METHOD_OVERRIDES.get(method, ()), *data_for(experiment)))
    assert run.config.experiment == experiment


@pytest.mark.parametrize("launcher", ["local", "submitit_slurm", "submitit_local", *_options("hydra/launcher")])
def test_every_launcher_config_composes_with_every_paper_preset(compose, launcher):
    for preset in _options("paper"):
        cfg = compose(f"+paper={preset}", f"hydra/launcher={launcher}", return_hydra_config=True)
        assert cfg.hydra.launcher._target_
        if launcher == "local":
            assert cfg.hydra.launcher.n_jobs == -1
        else:
            assert "n_jobs" not in cfg.hydra.launcher or launcher == "local"
