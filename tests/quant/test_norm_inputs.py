"""Quantized norm inputs (selector ``norm``): opt-in, input-only, y = norm(Q(x)) checked against a hand-written
fake quantization fed to an untouched float norm."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mqb.quant import QuantRecipe, calibrate, dequantize, quantize, quantized_layers, summarize
from mqb.quant.methods import SmoothQuant
from mqb.quant.realizability import realizability

WITH_NORMS = ("conv", "conv_transpose", "norm")


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv3d(2, 8, 3, padding=1),
        nn.InstanceNorm3d(8, affine=True),
        nn.LeakyReLU(0.01),
        nn.Conv3d(8, 8, 3, padding=1),
        nn.GroupNorm(4, 8),
        nn.ReLU(),
        nn.Conv3d(8, 3, 1),
        nn.BatchNorm3d(3),
    ).eval()


def _data(seed: int) -> torch.Tensor:
    return torch.randn(2, 2, 8, 8, 8, generator=torch.Generator().manual_seed(seed))


def _fake_quant(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """Symmetric INT8 on mqb's narrow grid, written out: clamp(round(x / S), -127, 127) * S with S = amax / 127."""
    scale = amax / 127
    return torch.clamp(torch.round(x / scale), -127, 127) * scale


def test_norms_are_not_quantized_by_default() -> None:
    net = quantize(_net(), QuantRecipe.from_precision("w8a8", scheme="deploy"))
    assert [n for n, _ in quantized_layers(net)] == ["0", "3", "6"]


def test_norm_selector_quantizes_instance_and_group_norm_inputs_only() -> None:
    net = quantize(_net(), QuantRecipe.from_precision("w8a8", scheme="deploy", include=WITH_NORMS))
    layers = dict(quantized_layers(net))
    assert sorted(layers) == ["0", "1", "3", "4", "6"]  # BatchNorm (folded at inference) is never offered
    for name in ("1", "4"):
        assert layers[name].mqb_info.kind == "norm"
        assert layers[name].weight_quantizer is None
        assert layers[name].activation_spec.granularity == "per_tensor"
        assert isinstance(layers[name], (nn.InstanceNorm3d, nn.GroupNorm))


@pytest.mark.parametrize("granularity, per_channel", [("deploy", False), ("per_tensor", False), ("per_channel", True),
                                                      ("adaptive", True), ("per_group", False)])  # fmt: skip
def test_norm_output_is_float_norm_of_fake_quantized_input(granularity: str, per_channel: bool) -> None:
    float_net = _net()
    net = quantize(copy.deepcopy(float_net), QuantRecipe.from_precision("w8a8", scheme=granularity,
                                                                        include=("norm",)))  # fmt: skip
    calib = [_data(1), _data(2)]
    calibrate(net, calib)
    # the calibrated range of each norm input, recomputed by hand from the float network
    inputs: dict[str, list[torch.Tensor]] = {"1": [], "4": []}
    hooks = [float_net[int(n)].register_forward_pre_hook(lambda m, a, n=n: inputs[n].append(a[0])) for n in inputs]
    with torch.no_grad():
        for x in calib:
            float_net(x)
    for h in hooks:
        h.remove()
    x = _data(3)
    with torch.no_grad():
        amax1 = torch.stack([t.abs().amax(dim=(0, 2, 3, 4)) for t in inputs["1"]]).amax(0)
        if not per_channel:
            amax1 = amax1.max()
        amax1 = amax1.reshape(1, -1, 1, 1, 1) if per_channel else amax1
        expected = float_net[1](_fake_quant(float_net[0](x), amax1))
        torch.testing.assert_close(net[1](float_net[0](x)), expected, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(expected, float_net[1](float_net[0](x)), atol=1e-6)  # quantization did something


def test_dequantize_restores_the_float_norms() -> None:
    float_net = _net()
    net = quantize(copy.deepcopy(float_net), QuantRecipe.from_precision("w8a8", scheme="deploy",
                                                                        include=WITH_NORMS))  # fmt: skip
    calibrate(net, [_data(1)])
    dequantize(net)
    assert [type(m) for m in net] == [type(m) for m in float_net]
    with torch.no_grad():
        torch.testing.assert_close(net(_data(4)), float_net(_data(4)), rtol=0, atol=0)


def test_methods_skip_norm_inputs_with_the_reason() -> None:
    net = quantize(_net(), QuantRecipe.from_precision("w8a8", scheme="deploy", include=WITH_NORMS))
    _, report = SmoothQuant(layers=("all",)).partition(net, ranges={})
    assert "no weight" in report.skipped["1"] and "no weight" in report.skipped["4"]


def test_norm_inputs_are_realizable_on_integer_kernels() -> None:
    net = quantize(_net(), QuantRecipe.from_precision("w8a8", scheme="deploy", include=("norm",)))
    for _, layer in quantized_layers(net):
        verdict = realizability(layer.mqb_info, layer.weight_spec, layer.activation_spec)
        assert verdict.status == "integer-kernel" and "norm input" in verdict.reason


def test_summary_lists_norms_only_when_their_input_is_quantized() -> None:
    plain = summarize(quantize(_net(), QuantRecipe.from_precision("w8a8", scheme="deploy")))
    assert [r.info.name for r in plain.rows] == ["0", "3", "6"]
    with_norms = summarize(quantize(_net(), QuantRecipe.from_precision("w8a8", scheme="deploy", include=WITH_NORMS)))
    assert [(r.info.name, r.info.kind) for r in with_norms.rows if r.info.kind == "norm"] == [
        ("1", "norm"),
        ("4", "norm"),
    ]
