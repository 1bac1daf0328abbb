"""``quant.kernel``: a setting of the eval schema, checked with a clear error, and no part of a record's id."""

from __future__ import annotations

import copy

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import open_dict

from mqb.config import QUANT_KERNELS, QuantSettings, check_quant_settings, compose_eval
from mqb.quant import KERNELS
from mqb.results import config_id


def test_the_schema_has_quant_kernel_auto_by_default():
    cfg = compose_eval()
    assert cfg.quant.kernel == QuantSettings().kernel == "auto"
    check_quant_settings(cfg.quant)
    assert QUANT_KERNELS == KERNELS  # the config's copy (no torch import when composing) and the engine's agree


def test_a_wrong_kernel_is_refused_naming_the_key_and_the_choices():
    cfg = compose_eval(["quant.kernel=fused"])
    with pytest.raises(ValueError, match=r"quant.kernel='fused' is invalid; valid: 'auto', 'eager', 'compiled'"):
        check_quant_settings(cfg.quant)
    with pytest.raises(ConfigCompositionException, match="quant.kernal"):  # a typo fails when composing
        compose_eval(["quant.kernal=eager"])


def test_quant_settings_do_not_change_the_record_id():
    """Every kernel computes the same bits, so records made before the setting existed keep their ids
    (``quant`` is one of ``mqb.results.VOLATILE_KEYS``)."""
    cfg = compose_eval()
    without = copy.deepcopy(cfg)
    with open_dict(without):
        without.pop("quant")
    assert config_id(cfg) == config_id(without), "add 'quant' to mqb.results.VOLATILE_KEYS"
    for kernel in ("eager", "compiled"):
        assert config_id(compose_eval([f"quant.kernel={kernel}"])) == config_id(cfg)
    assert config_id(compose_eval(["precision=w4a4"])) != config_id(cfg)  # the id still sees what matters
