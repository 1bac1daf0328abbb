"""Tensor quantizers (a quantizer on a producer's output): the residual Add of an identity shortcut reads the
quantized tensor, checked against a hand-written fake quantization of the float activations."""

from __future__ import annotations

import copy

import torch
from torch import nn

from mqb.quant import QuantRecipe, calibrate, dequantize, quantize
from mqb.quant.methods import SharedInputRanges
from mqb.quant.output import OUTPUT_QUANTIZER, output_quantizers
from tests.deploy import IdentityResidual, InPlaceNormAct, SharedActResidual


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


def _norm_act_nets(in_place_writers: bool = True) -> tuple[nn.Module, nn.Module, list[str]]:
    torch.manual_seed(0)
    float_net = InPlaceNormAct().eval()
    recipe = QuantRecipe.from_precision("w8a8", scheme="deploy", include=("conv", "norm"))
    net = quantize(copy.deepcopy(float_net), recipe)
    calibrate(net, _calib())
    report = SharedInputRanges(output_quantizers=True, in_place_writers=in_place_writers).apply(net, batches=_calib)
    return float_net, net, report.outputs


def test_an_in_place_activation_carries_the_output_quantizer_and_the_conv_quantizes_once() -> None:
    """nnU-Net: conv -> InstanceNorm -> LeakyReLU(inplace=True) -> conv. The LeakyReLU rewrites the norm's output
    tensor, so the value the conv (and the Add) read is produced by the LeakyReLU: the output quantizer goes there,
    and the conv reads Q(LeakyReLU(norm)), quantized once, as NNCF places its FakeQuantize."""
    _, net, outputs = _norm_act_nets()
    assert outputs == ["stem", "act"]  # the stem writes what the norm reads; the LeakyReLU what conv and Add read
    assert float(net.act.mqb_output_quantizer.amax) == float(net.conv.input_quantizer.amax)
    x = torch.randn(1, 1, 8, 8, 8, generator=torch.Generator().manual_seed(3))
    amax = float(net.conv.input_quantizer.amax)
    with torch.no_grad():
        normed = net.norm(net.stem(x))  # the quantized stem (with its output quantizer) and the norm
        yq = _fake_quant(nn.functional.leaky_relu(normed, 0.01), amax)
        wq = net.conv.weight_quantizer(net.conv.weight)
        expected = nn.functional.conv3d(yq, wq, net.conv.bias, padding=1) + yq
        torch.testing.assert_close(net(x), expected, rtol=1e-5, atol=1e-5)
        # placement v1 quantized the norm's output before the activation rewrote it: the conv read
        # Q(LeakyReLU(Q(norm))) (a second quantization; not equal for negative values) and the Add a float value
        _, v1, v1_outputs = _norm_act_nets(in_place_writers=False)
        assert v1_outputs == ["stem", "norm"]
        nq = _fake_quant(normed, amax)
        y1 = nn.functional.leaky_relu(nq, 0.01)
        v1_expected = nn.functional.conv3d(_fake_quant(y1, amax), wq, net.conv.bias, padding=1) + y1
        torch.testing.assert_close(v1(x), v1_expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(v1(x), expected, atol=1e-6)


def test_leaky_relu_of_the_grid_is_not_the_grid_of_leaky_relu() -> None:
    """Why placement v2 changes what is simulated (and the record ids, ``mqb.results.OPTION_VERSIONS``):
    LeakyReLU(Q(x)) is off the grid for negative x, and Q(LeakyReLU(Q(x))) != Q(LeakyReLU(x)) near half steps of
    the scaled negative side and below -amax (clipped before the slope in v1, after it in v2)."""
    amax = 127.0  # step 1
    x = torch.tensor([-50.3, -160.0, -3.0, 7.4])
    once = _fake_quant(nn.functional.leaky_relu(x, 0.01), amax)
    twice = _fake_quant(nn.functional.leaky_relu(_fake_quant(x, amax), 0.01), amax)
    assert once.tolist() == [-1.0, -2.0, 0.0, 7.0] and twice.tolist() == [0.0, -1.0, 0.0, 7.0]


def test_a_module_called_at_two_places_gets_no_output_quantizer_and_a_function_write_none() -> None:
    """MONAI's UnetResBlock calls one in-place ``lrelu`` after each norm: its hook would quantize both calls with
    one call's range, so it gets no output quantizer (the convs quantize their own inputs, once). The second norm's
    output is rewritten by ``out += residual`` (a function, not a module): no quantizer on the norm either (v1 put
    one there, quantizing the value before the Add)."""
    torch.manual_seed(0)
    net = quantize(SharedActResidual().eval(), QuantRecipe.from_precision("w8a8", scheme="deploy",
                                                                          include=("conv", "norm")))  # fmt: skip
    calibrate(net, _calib())
    v1 = copy.deepcopy(net)
    report = SharedInputRanges(output_quantizers=True).apply(net, batches=_calib)
    assert report.outputs == ["stem", "conv1", "conv2"]
    report_v1 = SharedInputRanges(output_quantizers=True, in_place_writers=False).apply(v1, batches=_calib)
    assert report_v1.outputs == ["stem", "conv1", "norm1", "conv2", "norm2"]
    seen: dict[str, torch.Tensor] = {}
    net.head.register_forward_pre_hook(lambda m, args: seen.setdefault("head", args[0].clone()))
    x = _calib()[0]
    with torch.no_grad():
        net(x)
        residual = net.stem(x)
        out = net.norm1(net.conv1(residual))
        out = net.norm2(net.conv2(nn.functional.leaky_relu(out, 0.01)))
        torch.testing.assert_close(seen["head"], nn.functional.leaky_relu(out + residual, 0.01), rtol=0, atol=0)
