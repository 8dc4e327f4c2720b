"""train.precision: its valid values, and the combination the harness refuses."""

from __future__ import annotations

import pytest

from experiments.errors import ConfigError
from experiments.validation import validate


def test_an_unknown_precision_is_refused_naming_the_key(compose):
    with pytest.raises(ConfigError, match=r"train\.precision.*fp32.*bf16.*fp16"):
        validate(compose("train.precision=fp64"))


def test_fp16_with_fused_sgd_is_refused(compose):
    overrides = ("optimizer.name=sgd", "optimizer.betas=[0.9,0.999]", "train.precision=fp16", "optimizer.fused=true")
    with pytest.raises(ConfigError, match=r"optimizer\.fused.*fused=null"):
        validate(compose(*overrides))
    assert validate(compose(*overrides[:-1], "optimizer.fused=null")).config.train.precision == "fp16"
