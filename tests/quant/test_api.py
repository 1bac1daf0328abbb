"""quantize / calibrate / dequantize on real layers: accuracy, granularity ordering, state, errors."""

import copy

import pytest
import torch
from torch import nn

from mqb.quant import (
    LayerRule,
    QuantRecipe,
    QuantSpec,
    apply_input_ranges,
    calibrate,
    collect_input_ranges,
    dequantize,
    fake_quantize,
    quantize,
    quantized_layers,
)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _uniform(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize(
    "layer,shape",
    [(nn.Conv3d(8, 16, 3, padding=1), (2, 8, 10, 10, 10)), (nn.Linear(64, 32), (4, 20, 64))],
)
def test_w8a8_per_channel_within_one_percent(layer, shape):
    torch.manual_seed(0)
    model = nn.Sequential(layer).eval()
    x = _uniform(*shape)
    with torch.no_grad():
        ref = model(x)
    quantize(model, QuantRecipe.from_precision("w8a8", scheme="per_channel"))
    calibrate(model, [_uniform(*shape, seed=1), x])
    with torch.no_grad():
        out = model(x)
    assert 0 < _rel(out, ref) < 0.01


def test_w4a4_granularity_ordering_on_spatial_outliers():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 16, 8, 8, 8, generator=g) * torch.logspace(0, 1, 16).reshape(1, 16, 1, 1, 1)
    hot = torch.randint(0, 512, (6,), generator=g)
    x.view(1, 16, -1)[:, :, hot] *= 40.0  # a few voxels with outliers in every channel
    errors = {}
    for scheme in ("per_tensor", "per_channel", "per_voxel"):
        model = nn.Sequential(nn.Conv3d(16, 16, 3, padding=1)).eval()
        with torch.no_grad():
            ref = model(x)
        quantize(model, QuantRecipe.from_precision("w4a4", scheme=scheme))
        calibrate(model, [x])
        with torch.no_grad():
            errors[scheme] = _rel(model(x), ref)
    assert errors["per_voxel"] < errors["per_channel"] < errors["per_tensor"], errors


def _toy() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv3d(2, 8, (1, 3, 3), padding=(0, 1, 1)),
        nn.InstanceNorm3d(8),
        nn.Conv3d(8, 8, 3, padding=1, groups=8),
        nn.Conv3d(8, 8, 1),
        nn.ConvTranspose3d(8, 4, 2, stride=2),
        nn.Conv3d(4, 3, 3, padding=1),
    ).eval()


def test_dequantize_restores_float_exactly_and_keeps_keys():
    model = _toy()
    x = torch.randn(1, 2, 4, 6, 6)
    with torch.no_grad():
        ref = model(x)
    float_keys = set(model.state_dict())
    quantize(model, QuantRecipe.from_precision("w4a4", scheme="adaptive"))
    calibrate(model, [x])
    assert float_keys <= set(model.state_dict())  # parameters keep their names
    assert type(model[0]).__name__ == "QuantConv3d" and isinstance(model[0], nn.Conv3d)
    with torch.no_grad():
        assert _rel(model(x), ref) > 1e-3
    assert sorted(dequantize(model, ["depthwise", "conv1x3x3"])) == ["0", "2"]
    assert type(model[0]) is nn.Conv3d and type(model[3]).__name__ == "QuantConv3d"
    dequantize(model)
    assert all(type(m) in (nn.Conv3d, nn.ConvTranspose3d, nn.InstanceNorm3d) for m in model)
    assert set(model.state_dict()) == float_keys
    with torch.no_grad():
        assert torch.equal(model(x), ref)


def test_quantized_state_dict_round_trip():
    x = torch.randn(1, 2, 4, 6, 6)
    a = quantize(_toy(), QuantRecipe.from_precision("w8a8", scheme="per_channel"))
    calibrate(a, [x])
    b = quantize(_toy(), QuantRecipe.from_precision("w8a8", scheme="per_channel"))
    b.load_state_dict(a.state_dict())  # strict: calibrated ranges included
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_conv_transpose_weights_are_per_output_channel_on_axis_1():
    model = quantize(_toy(), QuantRecipe.from_precision("w4a16", scheme="per_channel"))
    layer = model[4]
    with torch.no_grad():
        wq = layer.weight_quantizer(layer.weight)
    assert layer.weight.shape == (8, 4, 2, 2, 2)
    assert torch.equal(wq, fake_quantize(layer.weight.detach(), bits=4, granularity="per_channel", axis=1))


def test_weight_cache_follows_in_place_updates():
    model = quantize(nn.Sequential(nn.Linear(4, 4)), QuantRecipe.from_precision("w8a16"))
    x = torch.randn(2, 4)
    with torch.no_grad():
        first = model(x)
        model[0].weight.mul_(2.0)
        second = model(x)
    torch.testing.assert_close(second - model[0].bias, 2 * (first - model[0].bias), rtol=1e-5, atol=1e-5)


def test_uncalibrated_static_activation_names_the_layer():
    model = quantize(_toy(), QuantRecipe.from_precision("w8a8", scheme="per_tensor"))
    with pytest.raises(RuntimeError, match=r"0\.input uses static per_tensor scales but was never calibrated"):
        model(torch.randn(1, 2, 4, 6, 6))


def test_dynamic_only_model_needs_no_calibration():
    model = quantize(_toy(), QuantRecipe(activation=QuantSpec(bits=8, dynamic=True), granularity="per_tensor"))
    assert torch.isfinite(model(torch.randn(1, 2, 4, 6, 6))).all()


def test_errors_for_double_quantize_and_bad_dequantize():
    model = quantize(_toy(), QuantRecipe())
    with pytest.raises(ValueError, match="already quantized"):
        quantize(model, QuantRecipe())
    with pytest.raises(ValueError, match="selector 'linear' matches no quantized layer"):
        dequantize(model, ["linear"])
    with pytest.raises(ValueError, match="unknown layer selector 'convv'"):
        dequantize(model, "convv")
    with pytest.raises(ValueError, match="empty"):
        calibrate(model, [])


def test_inplace_false_leaves_the_original_alone():
    model = _toy()
    snapshot = copy.deepcopy(model.state_dict())
    q = quantize(model, QuantRecipe(), inplace=False)
    assert q is not model and not list(quantized_layers(model)) and len(list(quantized_layers(q))) == 5
    assert all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())


def test_selectors_include_exclude_and_rules():
    recipe = QuantRecipe.from_precision(
        "w4a4",
        scheme="adaptive",
        include=("conv", "conv_transpose"),
        exclude=("conv_transpose2x2x2",),
        rules=(LayerRule("conv1x3x3", precision="w8a8"), LayerRule("name:5", scheme="per_tensor")),
    )
    model = quantize(_toy(), recipe)
    layers = dict(quantized_layers(model))
    assert sorted(layers) == ["0", "2", "3", "5"]
    assert layers["0"].weight_spec.bits == 8 and layers["3"].weight_spec.bits == 4
    assert layers["3"].activation_spec.granularity == "per_voxel"  # 1x1x1 under adaptive
    assert layers["2"].activation_spec.granularity == "per_channel"  # depthwise
    assert layers["5"].activation_spec.granularity == "per_tensor"  # rule
    only_names = quantize(_toy(), QuantRecipe(include=("name:[03]",)))
    assert sorted(dict(quantized_layers(only_names))) == ["0", "3"]


@pytest.mark.parametrize("scheme", ["per_tensor", "per_channel", "adaptive"])
def test_collected_ranges_equal_calibration(scheme):
    batches = [torch.randn(1, 2, 4, 6, 6), torch.randn(1, 2, 4, 6, 6) * 3]
    ranges = collect_input_ranges(_toy(), batches)
    a = quantize(_toy(), QuantRecipe.from_precision("w4a4", scheme=scheme))
    calibrate(a, batches)
    b = quantize(_toy(), QuantRecipe.from_precision("w8a8", scheme=scheme))
    apply_input_ranges(b, ranges)
    for (name, la), (_, lb) in zip(quantized_layers(a), quantized_layers(b), strict=True):
        qa, qb = la.input_quantizer, lb.input_quantizer
        if qa.spec.dynamic:
            assert qb.amax is None
            continue
        assert qa.amax.shape == qb.amax.shape and torch.equal(qa.amax, qb.amax), name


def test_apply_ranges_refuses_other_observers():
    model = quantize(_toy(), QuantRecipe(activation=QuantSpec(bits=8, observer="percentile")))
    with pytest.raises(ValueError, match="static percentile ranges"):
        apply_input_ranges(model, collect_input_ranges(_toy(), [torch.randn(1, 2, 4, 6, 6)]))
