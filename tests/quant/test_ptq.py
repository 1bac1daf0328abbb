"""mqb.quant.ptq: the one PTQ sequence (quantize -> transform methods -> calibrate -> post-calibration methods)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mqb.quant import QuantRecipe, calibrate, collect_input_ranges, ptq, quantize
from mqb.quant.methods import BiasCorrection, SmoothQuant, apply_methods


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(2, 8, 3, padding=1), nn.ReLU(), nn.Conv3d(8, 4, 1)).eval()


def _data() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(1, 2, 8, 8, 8, generator=gen) * torch.tensor([1.0, 20.0]).view(1, 2, 1, 1, 1) for _ in range(3)]


def _out(net: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return net(torch.randn(1, 2, 8, 8, 8, generator=torch.Generator().manual_seed(9)))


def test_ptq_is_the_manual_sequence_bit_for_bit() -> None:
    data, recipe = _data(), QuantRecipe.from_precision("w8a8", scheme="per_tensor")
    methods = [SmoothQuant(alpha=0.5), BiasCorrection()]
    manual = _net()
    ranges = collect_input_ranges(manual, data)
    quantize(manual, recipe)
    apply_methods(manual, methods, "transform", ranges=ranges)
    calibrate(manual, data)
    apply_methods(manual, methods, "post_calibration", batches=lambda: data)
    one_call = _net()
    report = ptq(one_call, recipe, lambda: data, methods=methods)
    assert torch.equal(_out(one_call), _out(manual))
    assert [r.method for r in report.methods] == ["smoothquant", "bias_correction"]
    assert report.calibration == "calibrated"  # a transform method: ranges must be recalibrated
    plain = _net()
    ptq(plain, recipe, lambda: data)
    assert not torch.equal(_out(one_call), _out(plain))  # the methods changed the model


def test_float_input_ranges_stand_in_for_calibration_only_where_exact() -> None:
    data = _data()
    calls: list[int] = []

    def provider():
        calls.append(1)
        return collect_input_ranges(_net(), data)

    minmax = QuantRecipe.from_precision("w8a8", scheme="per_channel")
    from_ranges, calibrated = _net(), _net()
    assert ptq(from_ranges, minmax, lambda: data, input_ranges=provider).calibration == "input_ranges"
    assert ptq(calibrated, minmax, lambda: data).calibration == "calibrated"
    assert calls == [1] and torch.equal(_out(from_ranges), _out(calibrated))
    percentile = QuantRecipe(activation=minmax.activation.replace(observer="percentile"), scheme="per_channel")
    assert ptq(_net(), percentile, lambda: data, input_ranges=provider).calibration == "calibrated"
    assert calls == [1]  # not needed, not loaded
    dynamic = QuantRecipe.from_precision("w8a8", scheme="per_voxel")
    assert ptq(_net(), dynamic, lambda: data, input_ranges=provider).calibration == "not_needed"


def test_the_model_is_quantized_in_place_and_a_copy_is_untouched() -> None:
    net = _net()
    before = copy.deepcopy(net)
    ptq(net, QuantRecipe.from_precision("w4a4", scheme="adaptive"), _data)
    assert type(net[0]).__name__ != type(before[0]).__name__
    assert not torch.equal(_out(net), _out(before))


def test_every_module_keeps_its_train_eval_flag() -> None:
    """A norm kept in training mode on purpose (instance statistics at inference) is run so during calibration and
    keeps its flag; a model in training mode is calibrated in eval mode and gets its flags back."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(), nn.Conv3d(4, 2, 1)).eval()
    net[1].train()  # batch statistics at inference, as the model's author runs it
    net[1].momentum = 0.0  # (running statistics untouched)
    data = _data()
    ranges = collect_input_ranges(net, data)
    assert [m.training for m in net.modules()] == [False, False, True, False, False]
    reference = copy.deepcopy(net)
    ptq(net, QuantRecipe.from_precision("w8a8", scheme="per_tensor"), lambda: data)
    flags = {name: m.training for name, m in net.named_modules()}
    assert [flags[n] for n in ("", "0", "1", "2", "3")] == [False, False, True, False, False]
    # the calibrated range of the last conv's input is what that conv sees with batch statistics
    with torch.no_grad():
        seen = max(float(reference[:3](x).abs().max()) for x in data)
        assert float(ranges["3"]["hi"].max()) == max(float(reference[:3](x).amax()) for x in data)
    assert float(net[3].input_quantizer.amax) == torch.tensor(seen).item()
    fresh = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.BatchNorm3d(4))  # training mode: eval for the pass
    before = fresh[1].running_mean.clone()
    ptq(fresh, QuantRecipe.from_precision("w8a8", scheme="per_tensor"), lambda: data)
    assert fresh.training and fresh[1].training and torch.equal(fresh[1].running_mean, before)


def test_a_nan_in_the_calibration_data_is_refused_with_the_quantizer_named() -> None:
    from mqb.quant.ptq import NonFiniteError

    data = _data()
    data[1] = data[1].clone()
    data[1][0, 0, 3, 3, 3] = float("nan")
    with pytest.raises(NonFiniteError, match=r"non-finite ranges in \d+ quantizers, first 0\.input_quantizer\.amax"):
        ptq(_net(), QuantRecipe.from_precision("w8a8", scheme="per_tensor"), lambda: data)
