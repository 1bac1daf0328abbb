"""Tensor quantizers (a quantizer on a producer's output): the residual Add of an identity shortcut reads the
quantized tensor, checked against a hand-written fake quantization of the float activations."""

from __future__ import annotations

import copy

import torch
from torch import nn

from mqb.quant import QuantRecipe, calibrate, dequantize, quantize
from mqb.quant.methods import SharedInputRanges
from mqb.quant.output import OUTPUT_QUANTIZER, output_quantizers
from tests.deploy import IdentityResidual


def _calib() -> list[torch.Tensor]:
    return [torch.randn(2, 1, 8, 8, 8, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]


def _fake_quant(x: torch.Tensor, amax: float) -> torch.Tensor:
    scale = torch.tensor(amax / 127)
    return torch.clamp(torch.round(x / scale), -127, 127) * scale


def _nets(outputs: bool) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    float_net = IdentityResidual().eval()
    net = quantize(copy.deepcopy(float_net), QuantRecipe.from_precision("w8a8", scheme="deploy"))
    calibrate(net, _calib())
    report = SharedInputRanges(output_quantizers=outputs).apply(net, batches=_calib)
    assert report.outputs == (["act"] if outputs else [])
    return float_net, net


def test_the_add_reads_the_quantized_tensor() -> None:
    float_net, net = _nets(outputs=True)
    with torch.no_grad():
        amax = max(float(float_net.act(float_net.stem(x)).abs().max()) for x in _calib())  # the conv's input range
        assert float(net.act.mqb_output_quantizer.amax) == float(net.conv.input_quantizer.amax)
        assert abs(float(net.conv.input_quantizer.amax) - amax) <= 1e-6 * amax
        x = torch.randn(1, 1, 8, 8, 8, generator=torch.Generator().manual_seed(3))
        y = torch.relu(net.stem(x))  # the quantized stem (tested elsewhere); its output in float
        yq = _fake_quant(y, amax)
        wq = net.conv.weight_quantizer(net.conv.weight)
        expected = nn.functional.conv3d(yq, wq, net.conv.bias, padding=1) + yq
        torch.testing.assert_close(net(x), expected, rtol=1e-5, atol=1e-5)
        _, plain = _nets(outputs=False)
        y_float = plain.act(plain.stem(x))
        assert not torch.allclose(plain(x), expected, atol=1e-6)  # without it the Add reads the float tensor
        torch.testing.assert_close(plain(x), nn.functional.conv3d(yq, wq, plain.conv.bias, padding=1) + y_float,
                                   rtol=1e-5, atol=1e-5)  # fmt: skip


def test_dequantizing_a_reader_removes_its_tensor_quantizer() -> None:
    float_net, net = _nets(outputs=True)
    dequantize(net, ["name:conv"])
    assert list(output_quantizers(net)) == [] and net.act._forward_hooks == {}
    dequantize(net)
    x = _calib()[0]
    with torch.no_grad():
        torch.testing.assert_close(net(x), float_net(x), rtol=0, atol=0)


def test_a_copy_uses_its_own_tensor_quantizer() -> None:
    _, net = _nets(outputs=True)
    copied = copy.deepcopy(net)
    x = _calib()[0]
    with torch.no_grad():
        before = net(x)
        copied.act._modules[OUTPUT_QUANTIZER].amax.mul_(0.5)
        assert not torch.allclose(copied(x), before)
        torch.testing.assert_close(net(x), before, rtol=0, atol=0)


def test_output_quantizers_found_when_the_forward_calls_the_network_per_patch() -> None:
    """A sliding-window forward runs every layer once per patch (a new tensor each time): the producer and its
    readers are still matched patch by patch."""
    torch.manual_seed(0)
    net = quantize(IdentityResidual().eval(), QuantRecipe.from_precision("w8a8", scheme="deploy"))
    calibrate(net, _calib())

    def per_patch(model: torch.nn.Module, batch: torch.Tensor) -> list[torch.Tensor]:
        return [model(batch[..., :4]), model(batch[..., 4:])]

    report = SharedInputRanges(output_quantizers=True).apply(net, batches=_calib, forward=per_patch)
    assert report.outputs == ["act"]
