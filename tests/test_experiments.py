"""Every paper-table preset composes for every point of its sweep, and names only layers that exist."""

import itertools
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate

from mqb.config import CONF_DIR, register_configs
from mqb.pipeline import build_methods, build_recipe, method_label
from mqb.quant import quantizable_layers
from mqb.quant.selectors import matches

register_configs()
TABLES = sorted(p.stem for p in (CONF_DIR / "experiment").glob("table*.yaml"))


def _sweep_points(name: str) -> list[list[str]]:
    """Points of the preset's ``hydra.sweeper.params`` (parsed by Hydra) that use every value of every axis at
    least once, every pair of the first two axes included (the full product takes minutes to compose)."""
    params = yaml.safe_load((CONF_DIR / "experiment" / f"{name}.yaml").read_text())["hydra"]["sweeper"]["params"]
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    axes = [[f"{o.key_or_group}={v}" for v in o.sweep_string_iterator()] for o in parsed]
    head = list(itertools.product(*axes[:2]))
    return [[*pair, *(axis[i % len(axis)] for axis in axes[2:])] for i, pair in enumerate(head)]


def test_all_paper_tables_have_presets():
    assert TABLES == ["table1", "table10", "table11", "table12", "table2", "table3", "table4"]


@pytest.mark.parametrize("name", TABLES)
def test_preset_composes_at_every_sweep_point(name):
    points = _sweep_points(name)
    assert len(points) >= 2
    layer_names: dict[str, set[str]] = {}
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        configs = [compose("eval", overrides=[f"experiment={name}", "paths.data_root=/data", *p]) for p in points]
    for cfg in configs:
        assert cfg.dataset.root == f"/data/{cfg.dataset.name}"
        recipe, methods = build_recipe(cfg), build_methods(cfg)
        assert (recipe is None) == (cfg.precision.name == "fp32")
        selectors = [s for s in [*cfg.method.exclude, *cfg.method.layers] if s.startswith("name:")]
        if not selectors:
            continue
        if cfg.model.name not in layer_names:
            with torch.device("meta"):
                net = instantiate(cfg.model.net)
            layer_names[cfg.model.name] = {i.name for i in quantizable_layers(net)}
        for selector in selectors:
            hits = [n for n in layer_names[cfg.model.name] if matches(selector, _info(n))]
            assert hits, f"{name}: {selector} names no layer of {cfg.model.name}"
        assert all(list(m.layers) == list(cfg.method.layers) for m in methods)


def _info(name: str):
    from mqb.quant.layers import LayerInfo

    return LayerInfo(name, "conv", "Conv3d", (3, 3, 3), 1, 1, 1)


def test_headline_is_the_design_card_command():
    text = (CONF_DIR / "experiment" / "headline.yaml").read_text()
    assert "model: unetr,medformer" in text and "/precision: w4a4" in text and "/granularity: adaptive" in text
    assert Path(CONF_DIR / "model" / "medformer.yaml").is_file()


def test_int8_deploy_preset_quantizes_every_conv_and_instance_norm_input() -> None:
    """``experiment=int8_deploy`` on nnU-Net: per-channel INT8 weights, per-tensor activations, and one quantized
    input per InstanceNorm3d (counted in the network, not taken from the recipe)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("eval", overrides=["experiment=int8_deploy", "model=nnunet"])
    recipe = build_recipe(cfg)
    assert recipe is not None and recipe.granularity == "deploy"
    with torch.device("meta"):
        net = instantiate(cfg.model.net)
    plans = [p for info in quantizable_layers(net) if (p := recipe.plan(info)) is not None]
    norms = [n for n, m in net.named_modules() if isinstance(m, torch.nn.InstanceNorm3d)]
    convs = [n for n, m in net.named_modules() if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d))]
    assert sorted(p.info.name for p in plans if p.info.kind == "norm") == sorted(norms)
    assert sorted(p.info.name for p in plans if p.info.kind != "norm") == sorted(convs)
    assert {p.activation.granularity for p in plans} == {"per_tensor"}
    assert {p.weight.granularity for p in plans if p.weight is not None} == {"per_channel"}
    assert all(p.weight is None for p in plans if p.info.kind == "norm")


def test_method_label_names_extra_layer_kinds() -> None:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        plain = compose("eval", overrides=["precision=w8a8"])
        deploy = compose("eval", overrides=["experiment=int8_deploy", "method=smoothquant"])
    assert method_label(plain) == "rtn"
    assert method_label(deploy) == "smoothquant+norm+shared_ranges+tensor_quantizers"
    steps = build_methods(deploy)  # shared ranges first: before post-calibration methods measure anything
    assert [type(m).__name__ for m in steps] == ["SharedInputRanges", "SmoothQuant"] and steps[0].quantize_tensors
    assert build_methods(plain) == []
