"""trainer.fp32_precision (FP32 means FP32) and trainer.accelerator (auto by default)."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from mqb.config import TrainerSettings
from mqb.devices import FP32_PRECISIONS, apply_fp32_precision, device_info, float32_arithmetic, fp32_precision_state


def _raw_switches() -> list[tuple[object, str]]:
    owners = (torch.backends.cuda.matmul, torch.backends.cudnn.conv, torch.backends.cudnn.rnn,
              getattr(torch.backends.mkldnn, "matmul", None))  # fmt: skip
    return [(o, "fp32_precision") for o in owners if o is not None and hasattr(o, "fp32_precision")]


@pytest.fixture
def restore_tf32():
    """Put the process-wide float32 state back as it was: the legacy global matmul precision and cuDNN flag
    (through their setters, which also move the new switches), then the new switches themselves."""
    switches = _raw_switches()
    saved = [getattr(o, a) for o, a in switches]
    matmul, cudnn = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    yield
    torch.set_float32_matmul_precision(matmul)
    torch.backends.cudnn.allow_tf32 = cudnn
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


def _legacy() -> tuple[str, bool, bool]:
    """What the legacy getters say (Lightning reads the first when it sets up a CUDA device)."""
    return (torch.get_float32_matmul_precision(), bool(torch.backends.cuda.matmul.allow_tf32),
            bool(torch.backends.cudnn.allow_tf32))  # fmt: skip


@pytest.mark.parametrize("order", [("tf32", "ieee"), ("ieee", "tf32")])
def test_the_legacy_getters_stay_readable_and_agree(restore_tf32, order) -> None:
    """Setting only the new switches left the legacy global state behind, and reading it then raised "mix of the
    legacy and new APIs" (``trainer.fp32_precision=tf32`` crashed Lightning's CUDA setup)."""
    for setting in order:
        apply_fp32_precision(setting)
        if setting == "tf32":
            assert _legacy() == ("high", True, True)
        else:
            assert _legacy() == ("highest", False, False)
        onednn = getattr(torch.backends.mkldnn, "matmul", None)
        if onednn is not None and hasattr(onednn, "fp32_precision"):  # the CPU's matmul stays IEEE
            assert onednn.fp32_precision == "ieee"


@pytest.mark.parametrize("setting", FP32_PRECISIONS)
@pytest.mark.parametrize("before", [None, *FP32_PRECISIONS])
def test_float32_arithmetic_restores_everything(restore_tf32, setting, before) -> None:
    if before is not None:
        apply_fp32_precision(before)
    switches = _raw_switches()
    saved, legacy = [getattr(o, a) for o, a in switches], _legacy()
    with float32_arithmetic(setting) as state:
        assert state == fp32_precision_state(setting)
        assert _legacy() == (("high", True, True) if setting == "tf32" else ("highest", False, False))
    assert [getattr(o, a) for o, a in switches] == saved
    assert _legacy() == legacy


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
