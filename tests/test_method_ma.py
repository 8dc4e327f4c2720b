"""The averaging-only control (method=ma): AADL+MA's moving average and criterion with AA
never firing, its settings read from method.aadl, seed-batchable, in every paper preset."""

from __future__ import annotations

import pandas as pd
import pytest
from omegaconf import OmegaConf

from aadl import SETTING_NAMES
from conftest import REPO_ROOT
from experiments.run import execute
from test_seed_batching import GROUP, PROBLEM_OVERRIDES, SEEDS, assert_equal_runs

PAPER_PRESETS = sorted(p.stem for p in (REPO_ROOT / "configs" / "paper").glob("*.yaml"))


def test_ma_reads_every_aadl_setting_and_only_fixes_average_and_warmup(compose):
    config = OmegaConf.load(REPO_ROOT / "configs" / "method" / "ma.yaml")
    assert {name: config.ma._get_node(name)._value() for name in SETTING_NAMES} == {
        name: f"${{method.aadl.{name}}}" for name in SETTING_NAMES}
    from experiments.validation import validate

    ma = validate(compose("experiment=burgers2d", "method=ma", "method.aadl.history=7", "method.aadl.average_threshold=0.3"))
    aadl_ma = validate(compose("experiment=burgers2d", "method=aadl_ma", "method.aadl.history=7", "method.aadl.average_threshold=0.3"))
    assert ma.variant == "Adam+MA" and aadl_ma.variant == "Adam+AADL+MA"
    differing = {k for k in SETTING_NAMES if getattr(ma.method.settings, k) != getattr(aadl_ma.method.settings, k)}
    assert differing == {"warmup"} and ma.method.settings.warmup > 10**18
    reference = validate(compose("experiment=burgers2d", "method=ma", "method.aadl.variant=reference_code"))
    assert reference.variant == "Adam+MA(ref)" and reference.method.settings.variant == "reference_code"


@pytest.mark.parametrize("problem", ["graduate_admissions", "burgers2d"])
def test_ma_averages_without_any_aa_step_and_trains_batched_as_its_single_runs(compose, data_root, tmp_path, problem):
    common = (*PROBLEM_OVERRIDES[problem], "method=ma", f"data.root={data_root}", "train.threads=1")
    group = execute(compose(*common, *GROUP, f"output.root={tmp_path / 'batched'}"))
    singles = [execute(compose(*common, f"seed={seed}", f"output.root={tmp_path / 'single'}")) for seed in SEEDS]
    for batched, single in zip(group, singles):
        assert_equal_runs(batched.path, single.path)
        last = pd.read_csv(single.path / "metrics.csv").iloc[-1]
        assert last["aa_attempts"] == 0 and last["aa_accepted"] == 0  # AA never fires
        assert last["averages_applied"] > 0  # the moving average does
    # The same seed with AADL+MA: the averaging is the same code, AA now fires too.
    aadl_ma = execute(compose(*common, "method=aadl_ma", f"seed={SEEDS[0]}", f"output.root={tmp_path / 'aadl_ma'}"))
    assert pd.read_csv(aadl_ma.path / "metrics.csv").iloc[-1]["aa_attempts"] > 0


@pytest.mark.parametrize("preset", [p for p in PAPER_PRESETS if not p.endswith(("_reference", "_switches"))])
def test_every_paper_preset_runs_the_averaging_only_control_and_has_the_authors_variant_beside_it(compose, preset):
    from experiments.compose import preset_sweep

    sweep, reference = preset_sweep(preset), preset_sweep(f"{preset}_reference")
    if preset != "p_sweep":  # the p sweep is AADL's alone
        assert sweep["method"] == ["aadl_ma", "aadl", "ma", "none"]
        assert reference["method"] == ["aadl_ma_ref", "aadl_ref", "ma_ref"]
    assert {k: v for k, v in reference.items() if k not in ("method", "train.batch_seeds")} == {
        k: v for k, v in sweep.items() if k not in ("method", "train.batch_seeds")}
    assert reference.get("train.batch_seeds", ["1"]) == ["1"]  # only the contract's variant batches seeds
    ours, theirs = (compose(f"+paper={name}") for name in (preset, f"{preset}_reference"))
    assert (ours.experiment, ours.output.name) == (theirs.experiment, theirs.output.name)  # one run directory
    if preset == "p_sweep":
        assert compose(f"+paper={preset}_reference").method.aadl.variant == "reference_code"
