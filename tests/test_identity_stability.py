"""Adding a setting must not orphan finished runs: at its neutral default it stays out of
the identity, so the Fig. 1 preset's config_ids are the ones earlier releases wrote (and
that results trees on users' clusters are named by)."""

from __future__ import annotations

import pytest

from experiments.identity import NEUTRAL_DEFAULTS
from experiments.validation import validate

#: config_id of +paper=fig1 per method, as written by the release before train.precision,
#: optimizer.decay_norm_and_bias and method.aadl.variant existed (same data file).
FIG1_CONFIG_IDS = {"none": "99519442", "aadl": "b6d9b41d", "aadl_ma": "81c090db"}


@pytest.mark.parametrize("method", sorted(FIG1_CONFIG_IDS))
def test_fig1_config_ids_are_those_of_the_earlier_release(compose, data_root, method):
    assert validate(compose("+paper=fig1", f"method={method}")).config_id == FIG1_CONFIG_IDS[method]


@pytest.mark.parametrize(
    "override",
    ["train.precision=bf16", "optimizer.decay_norm_and_bias=false", "method.aadl.variant=reference_code"],
)
def test_a_neutral_setting_at_another_value_is_a_new_identity(compose, data_root, override):
    key = override.split("=")[0]
    assert key in NEUTRAL_DEFAULTS
    common = ("method=aadl", "optimizer.weight_decay=0.001")  # decay_norm_and_bias needs decay
    base = validate(compose(*common))
    other = validate(compose(*common, override))
    assert other.config_id != base.config_id and other.identity[key] != NEUTRAL_DEFAULTS[key]


def test_the_authors_variant_has_its_own_label_and_column(compose, data_root):
    from experiments.results import constant_columns

    run = validate(compose("method=aadl_ma", "method.aadl.variant=reference_code"))
    columns = constant_columns(run)
    assert run.variant == columns["variant"] == "Adam+AADL(ref)+MA"
    assert columns["aadl_variant"] == "reference_code"
