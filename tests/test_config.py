"""Every config group choice composes (Hydra compose API) and builds what it describes."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from mqb.cli import check_group_choices
from mqb.config import CONF_DIR, register_configs
from mqb.pipeline import build_recipe
from mqb.quant import QuantRecipe
from mqb.results import config_id

register_configs()


def _choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="eval", overrides=list(overrides))


def test_groups_have_the_required_choices():
    assert {"fp32", "fp16", "bf16", "w8a8", "w4a4", "w4a8", "w8a16", "fp8", "mxfp4", "nvfp4"} <= set(
        _choices("precision")
    )
    assert {"per_tensor", "per_channel", "adaptive"} <= set(_choices("granularity"))
    assert {"unet", "unetr", "swinunetr_t", "swinunetr_s", "swinunetr_b", "segresnet"} <= set(_choices("model"))
    assert {"wandb", "csv", "none"} <= set(_choices("logger"))


@pytest.mark.parametrize("precision", _choices("precision"))
def test_precision_choices_build_recipes(precision):
    cfg = _compose(f"precision={precision}")
    recipe = build_recipe(cfg)
    if precision in ("fp32", "fp16", "bf16"):
        assert recipe is None
    else:
        assert isinstance(recipe, QuantRecipe)
        assert recipe.weight is not None


@pytest.mark.parametrize("granularity", _choices("granularity"))
@pytest.mark.parametrize("calibration", _choices("calibration"))
def test_granularity_and_calibration_choices(granularity, calibration):
    cfg = _compose(f"granularity={granularity}", f"calibration={calibration}")
    recipe = build_recipe(cfg)
    assert recipe.granularity == granularity and recipe.activation.observer == calibration


#: Configs small enough to run a 64^3 forward here.
SMALL_MODELS = {"unet", "segresnet", "swinunetr_t", "swinunetr_s", "medptq_unet", "segformer3d", "stunet_s"} | {
    m for m in _choices("model") if m.startswith("meshnet")
}


@pytest.mark.parametrize("model", [m for m in _choices("model") if m != "custom"])
def test_model_choices_instantiate_and_run(model):
    cfg = _compose(f"model={model}", "dataset.roi_size=[64,64,64]")
    if model not in SMALL_MODELS:  # built on the meta device; tests/models/ run each native model for real
        with torch.device("meta"):
            try:
                net = instantiate(cfg.model.net)
            except Exception:  # noqa: BLE001  (MONAI SwinUNETR computes drop-path rates with .item())
                net = None
        if net is None:
            net = instantiate(cfg.model.net)
        assert sum(p.numel() for p in net.parameters()) > 1e6
        return
    net = instantiate(cfg.model.net).eval()
    with torch.no_grad():
        out = net(torch.zeros(1, 1, 64, 64, 64))
    assert out.shape == (1, cfg.model.net.out_channels, 64, 64, 64)


@pytest.mark.parametrize("model,params", [("swinunetr_t", 4.1e6), ("swinunetr_s", 15.7e6), ("swinunetr_b", 62.2e6)])
def test_swinunetr_sizes_match_the_paper(model, params):
    cfg = _compose(
        f"model={model}",
        "dataset.num_classes=14",
        "dataset.class_names=[" + ",".join(f"c{i}" for i in range(14)) + "]",
    )
    n = sum(p.numel() for p in instantiate(cfg.model.net).parameters())
    assert abs(n - params) / params < 0.03


def test_experiment_presets_compose():
    for name in _choices("experiment"):
        cfg = _compose(f"experiment={name}")
        assert cfg.precision.name


def test_wrong_key_fails_at_composition():
    with pytest.raises(ConfigCompositionException, match="bitz"):
        _compose("precision.weight.bitz=3")
    with pytest.raises(ConfigCompositionException, match="w3a3"):
        _compose("precision=w3a3")


def test_our_message_for_a_wrong_group_choice():
    msgs = check_group_choices(["-m", "model=unetr,medformerx", "precision=w3a3", "seed=1", "hydra/launcher=basic"])
    assert len(msgs) == 2
    assert "unknown model 'medformerx'" in msgs[0] and "swinunetr_t" in msgs[0]
    assert "unknown precision 'w3a3'" in msgs[1] and "w4a4" in msgs[1]


def test_our_message_for_a_wrong_key():
    (msg,) = check_group_choices(["precision.weight.bitz=3", "precision.weight.bits=4", "model.net.foo=1"])
    assert "unknown key 'precision.weight.bitz'" in msg and "valid keys there: bits, dynamic, format" in msg
    (msg,) = check_group_choices(["eval.overlapp=0.5"])
    assert "eval has no 'overlapp'" in msg and "overlap" in msg
    # Hydra's own keys (launcher, sweeper) are Hydra's to check, not flagged as unknown mqb keys
    assert check_group_choices(["hydra.launcher.partition=a100", "hydra.sweeper.params.x=1"]) == []


def test_config_id_ignores_outputs_and_float_quant_keys():
    a = _compose("paths.output_dir=/tmp/a")
    b = _compose("paths.output_dir=/tmp/b", "resume=false", "logger=none")
    assert config_id(a) == config_id(b)
    assert config_id(a) != config_id(_compose("granularity=adaptive"))
    fp_a = _compose("precision=fp32", "granularity=adaptive")
    fp_b = _compose("precision=fp32", "granularity=per_tensor")
    assert config_id(fp_a) == config_id(fp_b)
    assert OmegaConf.select(a, "results_dir") == str(Path("/tmp/a") / "results")


def test_options_at_their_default_do_not_change_the_id_of_earlier_records():
    """``calibration.shared_ranges`` came after records existed: at its default the id is the id computed without
    the key (an earlier config), and switching it on gives another id."""
    a = _compose("precision=w8a8")
    earlier = OmegaConf.create(OmegaConf.to_container(a))  # untyped, so the key can be removed
    del earlier.calibration["shared_ranges"]
    assert config_id(a) == config_id(earlier)
    assert config_id(a) != config_id(_compose("precision=w8a8", "calibration.shared_ranges=true"))


@pytest.mark.parametrize("precision", ["w8a8", "fp32"])
def test_tf32_arithmetic_gets_its_own_id_and_ieee_keeps_the_earlier_one(precision):
    """``trainer`` is left out of the id, but ``trainer.fp32_precision=tf32`` changes the numbers: a TF32 record
    must not be taken for the IEEE one. At the default (ieee) the id is the one computed without the key, as
    records made before it had; the other trainer settings (device, progress) still leave the id alone."""
    ieee = _compose(f"precision={precision}")
    earlier = OmegaConf.create(OmegaConf.to_container(ieee))  # untyped, so the key can be removed
    del earlier.trainer["fp32_precision"]
    assert config_id(ieee) == config_id(earlier)
    assert config_id(ieee) == config_id(_compose(f"precision={precision}", "trainer.fp32_precision=ieee"))
    tf32 = _compose(f"precision={precision}", "trainer.fp32_precision=tf32")
    assert config_id(tf32) != config_id(ieee)
    assert config_id(tf32) == config_id(_compose(f"precision={precision}", "trainer.fp32_precision=tf32",
                                                 "trainer.accelerator=cpu", "trainer.progress=false"))  # fmt: skip


def test_custom_model_needs_a_target_and_passes_only_the_given_arguments():
    """model=custom is a template: no class, no leftover arguments of another model (README "Your own model")."""
    from mqb.pipeline import build_recipe

    cfg = _compose("model=custom")
    assert set(cfg.model.net) == {"_target_"}
    with pytest.raises(ValueError, match=r"model.net._target_ is not set: model=custom needs your network class"):
        build_recipe(cfg)
    cfg = _compose("model=custom", "model.net._target_=torch.nn.Conv3d", "+model.net.in_channels=1",
                   "+model.net.out_channels=2", "+model.net.kernel_size=1")  # fmt: skip
    net = instantiate(cfg.model.net)
    assert isinstance(net, torch.nn.Conv3d) and net.in_channels == 1 and net.out_channels == 2


def test_meshnet_runs_on_the_whole_volume_by_default_and_the_baseline_key_covers_model_code(tmp_path):
    """The model config owns its inference (MeshNet: one window, the whole volume, as brainchop runs it), and a
    user's edited model code gives another FP32 baseline key."""
    import sys

    from mqb.pipeline import baseline_key, inference_window

    cfg = _compose("model=meshnet_18cls", "dataset=brain_aseg_sample")
    dm = SimpleNamespace(roi_size=(96, 96, 96))
    assert inference_window(cfg, dm) == (-1, -1, -1)
    assert inference_window(_compose("model=unet"), dm) == (96, 96, 96)
    (tmp_path / "user_net.py").write_text("from torch import nn\nclass Net(nn.Conv3d):\n    pass\n")
    sys.path.insert(0, str(tmp_path))
    try:
        cfg = _compose("model=custom", "model.net._target_=user_net.Net", "+model.net.in_channels=1",
                       "+model.net.out_channels=2", "+model.net.kernel_size=1")  # fmt: skip
        before = baseline_key(cfg, None)
        (tmp_path / "user_net.py").write_text("from torch import nn\nclass Net(nn.Conv3d):\n    pass  # edited\n")
        assert baseline_key(cfg, None) != before
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("user_net", None)


def test_every_engine_precision_preset_is_a_config_choice_with_the_same_specs():
    """``mqb.quant.spec.PRECISIONS`` and ``conf/precision/`` name the same presets with the same specs."""
    from mqb.quant.spec import PRECISIONS

    assert set(PRECISIONS) <= set(_choices("precision"))
    for name, preset in PRECISIONS.items():
        recipe = build_recipe(_compose(f"precision={name}"))
        assert (recipe.weight, recipe.activation) == (preset.weight, preset.activation), name
