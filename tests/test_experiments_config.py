"""Config composition for every preset, and bad values rejected with the key named."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException

from conftest import CONFIG_DIR
from experiments.compose import preset_sweep
from experiments.errors import ConfigError
from experiments.validation import validate

EXPERIMENT_CONFIGS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
PAPER_PRESETS = sorted(p.stem for p in (CONFIG_DIR / "paper").glob("*.yaml"))


def test_default_config_is_the_papers_graduate_admissions_setup(compose):
    run = validate(compose())
    cfg = run.config
    assert (cfg.experiment, run.variant, run.budget) == ("graduate_admissions", "Adam", cfg.train.epochs)
    assert cfg.optimizer.name == "adam" and cfg.optimizer.lr == 0.02
    assert cfg.schedule.milestones == [1000] and cfg.schedule.gamma == pytest.approx(0.2)
    assert run.problem_config.batch_size == 40 and run.problem_config.hidden_layers == 3
    assert run.problem_config.width == 64 and run.problem_config.activation == "relu"
    assert cfg.train.epochs > 1000, "the paper drops the learning rate at epoch 1,000"
    # The paper's p, q, m, beta, eps for Fig. 1.
    accel = validate(compose("method=aadl")).method.settings
    assert (accel.frequency, accel.store_every, accel.history) == (1, 1, 10)
    assert (accel.relaxation, accel.average_threshold) == (0.1, 0.1)


@pytest.mark.parametrize(
    "choice, variant, average",
    [("none", "Adam", False), ("aadl", "Adam+AADL", False), ("aadl_ma", "Adam+AADL+MA", True)],
)
def test_method_group_selects_the_variant(compose, choice, variant, average):
    run = validate(compose(f"method={choice}"))
    assert run.variant == variant
    assert run.method.name == ("none" if choice == "none" else "aadl")
    assert run.method.baseline is (choice == "none")
    if choice != "none":
        assert run.method.settings.average is average


@pytest.mark.parametrize("experiment", EXPERIMENT_CONFIGS)
@pytest.mark.parametrize("accel", ["none", "aadl", "aadl_ma"])
def test_every_experiment_composes_and_validates(compose, experiment, accel, data_for):
    run = validate(compose(f"experiment={experiment}", f"method={accel}", *data_for(experiment)))
    assert run.config.experiment == experiment
    assert run.budget >= 1


@pytest.mark.parametrize("preset", PAPER_PRESETS)
def test_every_paper_preset_composes_and_validates(compose, preset, data_for):
    cfg = compose(f"+paper={preset}", return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    # A figure's variants and the averaging-only control, or the authors' algorithm's (a
    # <preset>_reference companion); a one-method study (p_sweep) sets it in its defaults.
    methods = {"aadl_ma_ref", "aadl_ref", "ma_ref"} if preset.endswith("_reference") else {"none", "aadl", "aadl_ma", "ma"}
    if "method" in params:
        assert set(params["method"].split(",")) == methods
    assert "seed" in params
    for method in sorted(methods) if "method" in params else [None]:
        validate(compose(f"+paper={preset}", *([f"method={method}"] if method else []), *data_for(cfg.experiment)))


def test_fig1_preset_sweeps_three_variants_over_seeds_0_to_19_in_parallel(compose):
    cfg = compose("+paper=fig1", return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert sorted(params["method"].split(",")) == ["aadl", "aadl_ma", "ma", "none"] and params["seed"] == "range(0,20)"
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher")
    assert cfg.hydra.launcher.n_jobs == -1  # one process per core
    assert cfg.output.name == "fig1" and cfg.experiment == "graduate_admissions"


@pytest.mark.parametrize(
    "name, value",
    [("history", 20), ("frequency", 5), ("store_every", 5), ("relaxation", 0.5), ("regularization", 1e-6),
     ("warmup", 3), ("average_window", 4), ("average_threshold", 0.2), ("average_criterion", "reference_code"),
     ("safeguard", "none"), ("solver", "qr"), ("mixing", "paper_eq6"), ("distributed", "sharded"),
     ("history_device", "cpu")],
)
def test_every_contract_hyperparameter_is_overridable(compose, name, value):
    run = validate(compose("method=aadl_ma", f"method.aadl.{name}={value}"))
    assert getattr(run.method.settings, name) == value  # what the wrapper receives
    assert run.resolved["method"]["aadl"][name] == value


@pytest.mark.parametrize(
    "override, key",
    [
        ("method.aadl.history=0", "method.aadl.history"),
        ("method.aadl.frequency=0", "method.aadl.frequency"),
        ("method.aadl.relaxation=1.5", "method.aadl.relaxation"),
        ("method.aadl.relaxation=0", "method.aadl.relaxation"),
        ("method.aadl.regularization=-1", "method.aadl.regularization"),
        ("method.aadl.average_threshold=0", "method.aadl.average_threshold"),
        ("method.aadl.average_window=1", "method.aadl.average_window"),
        ("method.aadl.solver=svd", "method.aadl.solver"),
        ("method.aadl.safeguard=maybe", "method.aadl.safeguard"),
        ("seed=-1", "seed"),
        ("train.epochs=0", "train.epochs"),
        ("train.iterations=100", "train.iterations"),
        ("train.eval_every=0", "train.eval_every"),
        ("train.device=tpu", "train.device"),
        ("optimizer.name=rmsprop", "optimizer.name"),
        ("optimizer.lr=-0.1", "optimizer.lr"),
        ("optimizer.momentum=0.9", "optimizer.momentum"),  # does not apply to Adam
        ("optimizer.betas=[0.9,1.5]", "optimizer.betas"),
        ("schedule.gamma=0", "schedule.gamma"),
        ("schedule.milestones=[500,100]", "schedule.milestones"),
        ("schedule.every=500", "schedule.every"),  # combined with milestones
        ("schedule.warmup_mode=cosine", "schedule.warmup_mode"),
        ("problem.batch_size=0", "problem.batch_size"),
        ("problem.activation=gelu", "problem.activation"),
        ("problem.validation_fraction=1.0", "problem.validation_fraction"),
        ("+problem.depth=3", "problem.depth"),
    ],
)
def test_out_of_range_values_are_rejected_naming_the_key(compose, override, key):
    with pytest.raises(ConfigError) as error:
        validate(compose("method=aadl_ma", override))
    assert error.value.key == key
    assert str(error.value).startswith(f"{key}: ")


@pytest.mark.parametrize(
    "override, named",
    [("method.aadl.histroy=3", "method.aadl.histroy"), ("method.aadl.history=abc", "method.aadl.history"), ("train.epoch=5", "train.epoch"),
     ("problem.width=wide", "problem.width"), ("problem.widht=8", "problem.widht")],
)
def test_typos_and_wrong_types_are_rejected_while_composing(compose, override, named):
    with pytest.raises(ConfigCompositionException) as error:
        compose(override)
    assert named in str(error.value) + str(error.value.__cause__)


def test_sgd_with_nesterov_momentum_and_warmup_is_expressible(compose):
    """The ImageNet row of the paper table: SGD Nesterov 0.9, warm-up, /10 at 30, 60, 80."""
    run = validate(
        compose(
            "optimizer.name=sgd", "optimizer.lr=0.98", "optimizer.momentum=0.9", "optimizer.nesterov=true",
            "optimizer.weight_decay=5e-5", "schedule.milestones=[30,60,80]", "schedule.gamma=0.1",
            "schedule.warmup=5", "schedule.warmup_start_lr=0.05", "method=aadl",
        )
    )
    assert run.variant == "SGD+AADL"


def test_run_identity_ignores_seed_and_paths_but_not_hyperparameters(compose):
    base = validate(compose("method=aadl"))
    assert validate(compose("method=aadl", "seed=7", "output.root=/elsewhere", "train.threads=2")).config_id == base.config_id
    assert validate(compose("method=aadl", "method.aadl.history=5")).config_id != base.config_id
    assert validate(compose("method=aadl", "train.epochs=10")).config_id != base.config_id
    # The settings of a method the run does not use do not change what runs.
    plain = validate(compose("method=none"))
    assert validate(compose("method=none", "method.aadl.history=5")).config_id == plain.config_id


def test_data_root_defaults_to_the_environment_variable(compose, monkeypatch):
    monkeypatch.setenv("AADL_DATA_ROOT", "/from/env")
    assert compose().data.root == "/from/env"
    assert compose("data.root=/explicit").data.root == "/explicit"
    monkeypatch.delenv("AADL_DATA_ROOT")
    assert compose().data.root == "data"
    assert validate(compose("experiment=burgers2d")).config.data.root == "data"  # reads no data


@pytest.mark.parametrize(
    "preset, experiment, network, lr, every, gamma, p_q_m",
    [
        ("fig2", "burgers2d", (8, 20), 0.01, 500, 0.2, (10, 5, 5)),
        ("fig3", "burgers100d", (4, 50), 0.05, 1000, 0.5, (1, 1, 20)),
    ],
)
def test_burgers_presets_carry_the_papers_settings(compose, preset, experiment, network, lr, every, gamma, p_q_m):
    """The settings table of ../shared/spec/aadl-algorithm.md, three variants x seeds 0-19."""
    cfg = compose(f"+paper={preset}", return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert sorted(params["method"].split(",")) == ["aadl", "aadl_ma", "ma", "none"] and params["seed"] == "range(0,20)"
    assert cfg.output.name == preset
    for method in ("none", "aadl", "aadl_ma"):
        run = validate(compose(f"+paper={preset}", f"method={method}"))
        settings, problem = run.config, run.problem_config
        assert settings.experiment == experiment and run.problem_class.budget_unit == "iteration"
        assert (problem.depth, problem.width, problem.activation) == (*network, "relu")
        assert (settings.optimizer.name, settings.optimizer.lr) == ("adam", lr)
        assert (settings.schedule.every, settings.schedule.gamma) == (every, gamma)
        aadl = run.resolved["method"]["aadl"]  # the paper's settings, for both AADL variants
        assert (aadl["frequency"], aadl["store_every"], aadl["history"]) == p_q_m
        assert (aadl["relaxation"], aadl["average_threshold"]) == (1.0, 0.1)
        # The budget spans whole learning-rate stages and every curve has ~200-300 points.
        assert settings.train.iterations % every == 0 and settings.train.epochs is None
        assert 200 <= settings.train.iterations // settings.train.eval_every <= 500
    assert validate(compose(f"+paper={preset}")).problem_config.resample_every == 500


def test_preset_sweep_lists_what_a_preset_runs():
    sweep = preset_sweep("fig2")
    assert sweep["method"] == ["aadl_ma", "aadl", "ma", "none"] and sweep["seed"] == [str(s) for s in range(20)]


@pytest.mark.parametrize("override", ["problem.width=0", "problem.activation=gelu", "problem.resample_every=-1"])
def test_burgers_problem_values_out_of_range_are_config_errors(compose, override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as error:
        validate(compose("experiment=burgers2d", override))
    assert error.value.key == key and str(error.value).startswith(f"{key}: ")


@pytest.mark.parametrize("figure", sorted(__import__("experiments.analysis.figures", fromlist=["FIGURES"]).FIGURES))
def test_each_paper_figure_reads_its_facts_from_its_preset(compose, figure):
    """The figure code, the tests' synthetic runs and the benchmarks take a figure's
    experiment, run directory and caveat keys from one place; the preset agrees."""
    from experiments.analysis.figures import FIGURES
    from run_trees import PRESET_IDENTITY

    spec = FIGURES[figure]
    cfg = compose(f"+paper={spec.preset}")
    assert (spec.experiment, spec.run_name) == (cfg.experiment, cfg.output.name)
    identity = validate(cfg).identity
    assert all(identity[key] == value for key, value in PRESET_IDENTITY[figure].items())
