"""trainer.fp32_precision (FP32 means FP32) and trainer.accelerator (auto by default)."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from mqb.config import TrainerSettings
from mqb.devices import FP32_PRECISIONS, apply_fp32_precision, device_info, fp32_precision_state


@pytest.fixture
def restore_tf32():
    """Put the process-wide float32 switches back as they were."""
    switches = [(o, "fp32_precision") for o in (torch.backends.cuda.matmul, torch.backends.cudnn.conv,
                                                 torch.backends.cudnn.rnn) if hasattr(o, "fp32_precision")]  # fmt: skip
    saved = [getattr(o, a) for o, a in switches]
    yield
    for (o, a), value in zip(switches, saved, strict=True):
        setattr(o, a, value)


def test_ieee_turns_tf32_off_everywhere_and_tf32_turns_it_on(restore_tf32) -> None:
    state = apply_fp32_precision("ieee")
    assert state == {"fp32_precision": "ieee", "tf32_matmul": False, "tf32_conv": False}
    if hasattr(torch.backends.cudnn.conv, "fp32_precision"):  # PyTorch >= 2.9: read back through torch itself
        assert torch.backends.cudnn.conv.fp32_precision == "ieee"
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
        assert torch.backends.cudnn.rnn.fp32_precision == "ieee"
    state = apply_fp32_precision("tf32")
    assert state["tf32_matmul"] and state["tf32_conv"]
    assert fp32_precision_state("tf32") == state


def test_a_bad_setting_names_the_key_and_the_valid_values() -> None:
    with pytest.raises(ValueError, match=r"trainer.fp32_precision='fp16' is invalid; valid: ieee, tf32"):
        apply_fp32_precision("fp16")
    assert FP32_PRECISIONS == ("ieee", "tf32")


def test_defaults_are_true_fp32_on_the_best_device() -> None:
    settings = OmegaConf.structured(TrainerSettings)
    assert settings.fp32_precision == "ieee" and settings.accelerator == "auto"


def test_device_info_names_the_device() -> None:
    assert device_info("cpu") == {"type": "cpu"}
    if torch.cuda.is_available():
        info = device_info("cuda")
        assert info["type"] == "cuda" and info["name"] == torch.cuda.get_device_name(0) and info["count"] >= 1
