"""Weights are stored once: a quantized model holds its float parameters plus scales, never a fake-quantized copy,
and computes what the float-copy implementation computed, to the bit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mqb.quant import QuantRecipe, calibrate, dequantize, fake_quantize, held_bytes, quantize
from mqb.quant.granularity import absmax
from mqb.quant.quantizer import WeightQuantizer


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv3d(2, 16, 3, padding=1)
        self.down = nn.Conv3d(16, 32, 3, stride=2, padding=1)
        self.point = nn.Conv3d(32, 32, 1)
        self.up = nn.ConvTranspose3d(32, 16, 2, stride=2)
        self.head = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.stem(x))
        z = self.up(F.relu(self.point(F.relu(self.down(y)))))
        return self.head((y + z).movedim(1, -1))


def data(n: int = 2, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 2, 8, 8, 8, generator=g) for _ in range(n)]


def quantized(precision: str, scheme: str) -> nn.Module:
    torch.manual_seed(0)
    model = quantize(Net().eval(), QuantRecipe.from_precision(precision, scheme=scheme))
    calibrate(model, data())
    return model


CONFIGS = [("w8a8", "per_channel"), ("w8a8", "adaptive"), ("w4a4", "per_tensor"), ("w4a16", "per_channel"),
           ("fp8", "per_channel"), ("mxfp4", "per_group"), ("nvfp4", "per_group")]  # fmt: skip


@pytest.mark.parametrize("precision,scheme", CONFIGS)
def test_a_quantized_model_holds_at_most_1_25x_the_float_bytes(precision, scheme):
    torch.manual_seed(0)
    float_bytes = held_bytes(Net())
    assert float_bytes == sum(p.numel() * 4 for p in Net().parameters())
    model = quantized(precision, scheme)
    with torch.inference_mode():
        for x in data(3, seed=1):
            model(x)
    ratio = held_bytes(model) / float_bytes
    assert ratio <= 1.25, f"{precision} {scheme}: {ratio:.3f}x the float model's bytes"


@pytest.mark.parametrize("precision,scheme", [("w8a8", "per_channel"), ("nvfp4", "per_group")])
def test_no_quantizer_keeps_a_weight_sized_tensor(precision, scheme):
    model = quantized(precision, scheme)
    with torch.inference_mode():
        model(data(1, seed=1)[0])
    for layer in (m for m in model.modules() if isinstance(getattr(m, "weight_quantizer", None), WeightQuantizer)):
        weight_bytes = layer.weight.numel() * 4
        for quantizer in (layer.weight_quantizer, layer.input_quantizer):
            assert held_bytes(quantizer) < weight_bytes / 2, quantizer.name  # scales only (a copy: >= 1x)


def _reference(model: nn.Module, precision: str, x: torch.Tensor) -> torch.Tensor:
    """``Net.forward`` with the fake quantization written out with the functional API (what the float-copy
    implementation computed): weights per output channel from themselves, inputs with their calibrated ranges."""

    def qw(layer: nn.Module, axis: int) -> torch.Tensor:
        if precision == "mxfp4":
            reduction = 1 if axis == 0 else 0
            return fake_quantize(layer.weight, granularity="per_group", axis=reduction, format="mxfp4")
        return fake_quantize(layer.weight, bits=8, granularity="per_channel", axis=axis)

    def qx(layer: nn.Module, v: torch.Tensor) -> torch.Tensor:
        q = layer.input_quantizer
        if precision == "mxfp4":
            return fake_quantize(v, granularity="per_group", axis=q.axis, format="mxfp4")
        if q.spec.dynamic:  # per-token (linear)
            return fake_quantize(v, bits=8, granularity="per_token")
        amax = q.amax.reshape(-1)
        scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))  # a dead channel keeps scale 1
        return torch.fake_quantize_per_channel_affine(
            v, scale, torch.zeros_like(scale, dtype=torch.int32), 1, -127, 127
        )

    m = model
    y = F.relu(F.conv3d(qx(m.stem, x), qw(m.stem, 0), m.stem.bias, padding=1))
    d = F.relu(F.conv3d(qx(m.down, y), qw(m.down, 0), m.down.bias, stride=2, padding=1))
    p = F.relu(F.conv3d(qx(m.point, d), qw(m.point, 0), m.point.bias))
    z = F.conv_transpose3d(qx(m.up, p), qw(m.up, 1), m.up.bias, stride=2)
    h = (y + z).movedim(1, -1)
    return F.linear(qx(m.head, h), qw(m.head, 0), m.head.bias)


@pytest.mark.parametrize("precision,scheme", [("w8a8", "per_channel"), ("mxfp4", "per_group")])
def test_outputs_are_those_of_the_fake_quantized_weights_bit_for_bit(precision, scheme):
    model = quantized(precision, scheme)
    x = data(1, seed=3)[0]
    with torch.inference_mode():
        first, second = model(x), model(x)
    assert torch.equal(first, second)
    assert torch.equal(first, _reference(model, precision, x))
    with torch.no_grad():  # a weight changed in place: the next forward quantizes the new weight with its new range
        model.down.weight.mul_(3.0)
        changed = model(x)
    assert not torch.equal(changed, first)
    assert torch.equal(changed, _reference(model, precision, x))


def test_static_weight_scales_are_kept_and_follow_the_range():
    model = quantized("w8a8", "per_channel")
    q: WeightQuantizer = model.stem.weight_quantizer
    with torch.inference_mode():
        model(data(1)[0])
    assert q._cache is not None
    scale = q._cache[1]
    assert torch.equal(scale, q.amax / 127)
    with torch.no_grad():
        model.stem.weight.mul_(2.0)
    with torch.inference_mode():
        model(data(1)[0])
    assert torch.equal(q._cache[1], q.amax / 127) and torch.equal(q.amax, absmax(model.stem.weight, "per_channel", 0))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.inference_mode():  # loading a state dict overwrites the ranges in place: the scales go
        q._load_from_state_dict(state, "stem.weight_quantizer.", {}, True, [], [], [])
    assert q._cache is None


def test_dequantize_gives_back_the_exact_float_weights_after_evaluation():
    torch.manual_seed(0)
    original = {k: v.clone() for k, v in Net().state_dict().items()}
    model = quantized("w4a4", "per_channel")
    with torch.inference_mode():
        for x in data(2, seed=2):
            model(x)
    dequantize(model)
    restored = model.state_dict()
    assert restored.keys() == original.keys()
    assert all(torch.equal(restored[k], original[k]) for k in original)
