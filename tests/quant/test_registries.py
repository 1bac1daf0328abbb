"""One registry per extension point (quant modules, formats, observers, precision presets) and one vocabulary
(scheme vs granularity, output quantizers, shared ranges as a method step), with record ids unchanged."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from mqb.config import CONF_DIR, compose_eval
from mqb.pipeline import build_methods, build_recipe, method_label
from mqb.quant import (
    LayerRule,
    QuantAttention,
    QuantModule,
    QuantRecipe,
    QuantSpec,
    TensorQuantizer,
    calibrate,
    dequantize,
    quantize,
    quantized_layers,
    realizability,
    register_quant_module,
    set_kernel,
    summarize,
)
from mqb.quant.fake_quant import fake_quant_symmetric, quantize_dequantize
from mqb.quant.formats import FORMATS, Format, MiniFloat, register_format, round_minifloat, safe_scale
from mqb.quant.granularity import GRANULARITIES, Granularity, register_granularity
from mqb.quant.layers import LayerInfo, QuantLinear
from mqb.quant.methods import SharedInputRanges
from mqb.quant.observers import OBSERVERS, ObserverEntry, register_observer
from mqb.quant.registry import QUANT_MODULES, describe
from mqb.quant.schemes import SCHEMES, LayerGranularity
from mqb.quant.spec import FORMAT_BITS, PRECISIONS, PRESETS, precision_config_yaml
from mqb.results import config_id


# -- quant modules ---------------------------------------------------------------------------------------------
class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.num_heads = 1
        self.hidden_size = 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v


class _MyLinear(nn.Linear):
    pass


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = _Attention()
        self.head = _MyLinear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(x))


def test_one_quant_module_registry_for_layers_and_attention() -> None:
    for float_cls, quant_cls in QUANT_MODULES.items():
        assert (
            issubclass(quant_cls, QuantModule)
            and issubclass(quant_cls, float_cls)
            and quant_cls.float_class is float_cls
        )

    @register_quant_module(_Attention)
    class QuantMyAttention(QuantAttention, _Attention):
        pass

    class QuantMyLinear(QuantLinear, _MyLinear):
        float_class = _MyLinear

    register_quant_module(_MyLinear, QuantMyLinear)
    try:
        assert QuantMyAttention.float_class is _Attention
        assert describe("attn", _Attention()).kind == "attention" and describe("h", _MyLinear(2, 3)).kind == "linear"
        torch.manual_seed(0)
        net, x = _Net().eval(), torch.randn(2, 5, 8)
        reference = net(x)
        quantize(net, QuantRecipe.from_precision("w8a8", scheme="per_tensor", attention=True))
        kinds = {name: type(m) for name, m in quantized_layers(net)}
        assert kinds == {"attn": QuantMyAttention, "attn.qkv": kinds["attn.qkv"], "head": QuantMyLinear}
        calibrate(net, [x])
        assert set_kernel(net, "eager") >= 1 and net.attn.kernel == "eager"
        assert torch.allclose(net(x), reference, atol=0.1) and not torch.equal(net(x), reference)
        assert sorted(dequantize(net)) == ["attn", "attn.qkv", "head"]
        assert type(net.attn) is _Attention and type(net.head) is _MyLinear and torch.equal(net(x), reference)
        with pytest.raises(TypeError, match="must subclass mqb.quant.QuantModule"):
            register_quant_module(nn.Conv3d, nn.Conv3d)  # type: ignore[arg-type]
    finally:
        QUANT_MODULES.pop(_Attention, None)
        QUANT_MODULES.pop(_MyLinear, None)


# -- formats and observers -------------------------------------------------------------------------------------
E5M2 = MiniFloat("e5m2", exponent_bits=5, mantissa_bits=2, max_value=57344.0)


def _e5m2_scales(amax: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, None]:
    return safe_scale(amax / E5M2.max_value), None


def _e5m2_quantize(x: torch.Tensor, spec: QuantSpec, scale: torch.Tensor, reciprocal: None) -> torch.Tensor:
    return round_minifloat(x / scale, E5M2) * scale


def test_a_new_format_is_one_entry_and_one_registration() -> None:
    """FP8 E5M2 added from outside: validation, eager fake quantization, realizability and the views follow."""
    register_format(Format("fp8_e5m2", label="fp8e5", bits=8, scales=_e5m2_scales, quantize_scaled=_e5m2_quantize,
                           kernel="fp8-kernel", kernel_reason="FP8 tensor cores"))  # fmt: skip
    try:
        spec = QuantSpec(bits=4, format="fp8_e5m2")
        assert spec.bits == 8 and FORMAT_BITS["fp8_e5m2"] == 8 and not spec.is_block_format
        x = torch.randn(4, 16)
        scale = x.abs().amax() / E5M2.max_value
        assert torch.equal(quantize_dequantize(x, spec), round_minifloat(x / scale, E5M2) * scale)
        info = LayerInfo("fc", "linear", "Linear", (), 16, 16)
        assert realizability(info, spec, spec).status == "fp8-kernel"
        with pytest.raises(ValueError, match="symmetric=False is only supported for format='int'"):
            QuantSpec(format="fp8_e5m2", symmetric=False)
        with pytest.raises(ValueError, match="observer='entropy' needs format='int'"):
            QuantSpec(format="fp8_e5m2", observer="entropy")
    finally:
        FORMATS.pop("fp8_e5m2", None)
    with pytest.raises(ValueError, match="not a known format"):
        QuantSpec(format="fp8_e5m2")


def _per_slice_dims(x: torch.Tensor, axis: int | None) -> tuple[int, ...]:
    return (1, *range(3, x.ndim))  # one scale per (n, d): a 2D slice of a 3D volume


def test_a_new_granularity_is_one_registration() -> None:
    """A tensor granularity added from outside: validation, fake quantization, layers (through a scheme that names
    it) and realizability follow."""
    register_granularity(Granularity("per_slice", _per_slice_dims, dynamic_only=True, activations=("conv",)))
    SCHEMES["slices"] = lambda info: LayerGranularity("per_channel", "per_slice")
    try:
        spec = QuantSpec(granularity="per_slice")
        assert spec.dynamic and spec.short() == "int8 per_slice dynamic"
        x = torch.randn(2, 3, 4, 5, 6)
        expected = fake_quant_symmetric(x, x.abs().amax(dim=(1, 3, 4), keepdim=True), spec)
        assert torch.equal(quantize_dequantize(x, spec), expected)
        net = quantize(nn.Sequential(nn.Conv3d(3, 4, 3)).eval(), QuantRecipe.from_precision("w8a8", scheme="slices"))
        assert net[0].activation_spec.granularity == "per_slice" and net(x).shape == (2, 4, 2, 3, 4)
        (row,) = summarize(net).rows
        assert row.realizability.status == "simulation-only"
        assert row.realizability.reason == "per_slice activations are not supported by any kernel"
        with pytest.raises(ValueError, match="activation granularity 'per_slice' is invalid for a linear layer"):
            quantize(nn.Sequential(nn.Linear(4, 4)), QuantRecipe.from_precision("w8a8", scheme="slices"))
    finally:
        GRANULARITIES.pop("per_slice", None)
        SCHEMES.pop("slices", None)


class _TwiceMax:
    def __init__(self) -> None:
        self.amax: torch.Tensor | None = None

    def update(self, rows: torch.Tensor) -> None:
        amax = rows.abs().amax(dim=1)
        self.amax = amax if self.amax is None else torch.maximum(self.amax, amax)

    def compute(self) -> dict[str, torch.Tensor]:
        assert self.amax is not None
        return {"amax": 2 * self.amax}


def test_a_new_observer_is_one_registration() -> None:
    register_observer(ObserverEntry("twice_max", lambda spec, quant_fn: _TwiceMax()))
    try:
        quantizer = TensorQuantizer(QuantSpec(observer="twice_max"))
        quantizer.begin_calibration()
        quantizer(torch.tensor([1.0, -3.0]))
        quantizer.end_calibration()
        assert float(quantizer.amax) == 6.0
        with pytest.raises(ValueError, match="asymmetric specs use 'minmax'"):
            QuantSpec(observer="twice_max", symmetric=False)
    finally:
        OBSERVERS.pop("twice_max", None)


# -- precision presets -----------------------------------------------------------------------------------------
def test_precision_presets_have_one_source() -> None:
    """``conf/precision/`` is written from ``mqb.quant.spec.PRESETS`` (``python -m mqb.config``), and every preset
    composes from the command line with the engine's specs."""
    files = {p.stem: p.read_text() for p in (CONF_DIR / "precision").glob("*.yaml")}
    assert set(files) == set(PRESETS), "conf/precision and PRESETS differ: edit PRESETS, run python -m mqb.config"
    for name, preset in PRESETS.items():
        assert files[name] == precision_config_yaml(preset), f"conf/precision/{name}.yaml: run python -m mqb.config"
        cfg = compose_eval([f"precision={name}"])
        recipe = build_recipe(cfg)
        assert cfg.precision.compute_dtype == preset.compute_dtype
        if name in PRECISIONS:
            assert recipe is not None and (recipe.weight, recipe.activation) == (preset.weight, preset.activation)
        else:
            assert recipe is None
    assert {"w4a16", "w2a16"} <= set(PRECISIONS)


# -- vocabulary and record ids ---------------------------------------------------------------------------------
#: ids computed before the vocabulary change (commit de5e2a5): old and new spellings must keep them
GOLDEN_IDS = [
    ([], "c4372911b955c7fa"),
    (["precision=w4a4"], "72b10257901276a5"),
    (["precision=w4a4", "granularity=adaptive"], "0aa19699f53cf2a0"),
    (["precision=w8a8", "granularity=per_voxel", "method=smoothquant"], "df28789296543143"),
    (["precision=fp32"], "d6d2890786651117"),
    (["precision=nvfp4", "granularity=per_group"], "bd9c019948d55861"),
    (["precision=w4a16"], "31b53b47c2ff832f"),
    (["precision=w2a16", "granularity=per_tensor", "method=gptq"], "350f23adc1ac3d72"),
    (["precision=mxfp4", "method=rotation", "calibration=percentile"], "cb1199074ea16609"),
    (["model=unetr", "precision=w8a8", "method.attention=true", "granularity=deploy"], "0337dcb2e293e4b2"),
    (
        ["precision=w8a8", "method.rules=[{select: conv1x3x3, precision: w4a4, granularity: per_tensor}]"],
        "5fe53ec249259767",
    ),
    (["experiment=int8_deploy"], "5cf5be296250e868"),
    # the deprecated spellings and the new ones
    (["precision=w8a8", "calibration.shared_ranges=true"], "793e08ff4d76d033"),
    (["precision=w8a8", "method.shared_ranges=true"], "793e08ff4d76d033"),
    (["precision=w8a8", "calibration.tensor_quantizers=true"], "5e1da8b849b324eb"),
    (["precision=w8a8", "method.output_quantizers=true"], "5e1da8b849b324eb"),
    (["precision=w8a8", "calibration.shared_ranges=true", "calibration.tensor_quantizers=true"], "675309129e0940b4"),
    (["precision=w8a8", "method.shared_ranges=true", "method.output_quantizers=true"], "675309129e0940b4"),
    (["precision=w8a8", "calibration.shared_ranges=true", "method.output_quantizers=true"], "675309129e0940b4"),
]


@pytest.mark.parametrize(
    ("overrides", "expected"), GOLDEN_IDS, ids=lambda v: " ".join(v) if isinstance(v, list) else ""
)
def test_record_ids_are_unchanged(overrides: list[str], expected: str) -> None:
    assert config_id(compose_eval(overrides)) == expected


def test_shared_ranges_are_a_method_step_under_both_spellings() -> None:
    new = compose_eval(["precision=w8a8", "method=smoothquant", "method.shared_ranges=true",
                        "method.output_quantizers=true"])  # fmt: skip
    old = compose_eval(["precision=w8a8", "method=smoothquant", "calibration.shared_ranges=true",
                        "calibration.tensor_quantizers=true"])  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        steps = build_methods(new)
        label = method_label(new)
    with pytest.warns(
        FutureWarning, match="calibration.tensor_quantizers is deprecated: write method.output_quantizers"
    ):
        old_steps = build_methods(old)
    assert method_label(old) == label == "smoothquant+shared_ranges+tensor_quantizers"
    for built in (steps, old_steps):
        assert [type(m).__name__ for m in built] == ["SharedInputRanges", "SmoothQuant"]
        assert built[0].output_quantizers and built[0].quantize_tensors
    assert not build_methods(compose_eval(["precision=w8a8"]))


def test_the_layer_level_choice_is_the_scheme() -> None:
    recipe = build_recipe(compose_eval(["precision=w4a4", "granularity=adaptive",
                                        "method.rules=[{select: conv1x3x3, granularity: per_tensor}]"]))  # fmt: skip
    assert recipe is not None and recipe.scheme == "adaptive" and recipe.rules[0].scheme == "per_tensor"
    with pytest.warns(DeprecationWarning, match=r"QuantRecipe\(granularity=...\) is deprecated"):
        old = QuantRecipe.from_precision("w4a4", granularity="adaptive")
    assert old == QuantRecipe.from_precision("w4a4", scheme="adaptive") and old.granularity == "adaptive"
    with pytest.warns(DeprecationWarning):
        assert LayerRule("conv", granularity="deploy") == LayerRule("conv", scheme="deploy")
    with pytest.warns(DeprecationWarning):
        assert SharedInputRanges(quantize_tensors=True).output_quantizers
