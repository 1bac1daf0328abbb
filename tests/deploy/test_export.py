"""QDQ export: scales are mqb's, INT8 weights reproduce mqb's fake quantization, ONNX Runtime agrees with it."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from mqb.deploy.export import export_onnx, initializer_bytes, layer_export_mode
from mqb.deploy.isa import int8_isa
from mqb.quant import LayerRule, QuantRecipe, calibrate, quantize, quantized_layers
from tests.deploy import SHAPE, deployable, small_net, volume

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import numpy_helper  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):
    net = deployable(small_net())
    path = tmp_path_factory.mktemp("export") / "int8.onnx"
    result = export_onnx(net, volume(0), path)
    return net, result


def _graph(path):
    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            inits[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    producer = {o: n for n in model.graph.node for o in n.output}
    return model, inits, producer


def _run(path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"image": x.numpy()})[0]


def test_every_layer_exported_as_int8(exported) -> None:
    net, result = exported
    assert [r.name for r in result.layers] == [n for n, _ in quantized_layers(net)]
    assert {r.mode for r in result.layers} == {"int8"}
    assert all(r.onnx_node for r in result.layers)
    assert result.float_layers == []


def test_qdq_scales_are_mqb_scales(exported) -> None:
    """Scales in the file equal amax/127 recomputed from the weights (per output channel; amax/63 where this CPU
    needs the 7-bit overflow fix) and from the calibrated input ranges; the stored INT8 weights are round(w / S)."""
    net, result = exported
    model, inits, producer = _graph(result.path)
    nodes = {n.name: n for n in model.graph.node}
    for row in result.layers:
        layer = dict(net.named_modules())[row.name]
        conv = nodes[row.onnx_node]
        dq_w, dq_x = producer[conv.input[1]], producer[conv.input[0]]
        assert dq_w.op_type == dq_x.op_type == "DequantizeLinear"
        q_int8, w_scale = inits[dq_w.input[0]], inits[dq_w.input[1]]
        assert q_int8.dtype == np.int8
        axis = 1 if isinstance(layer, nn.ConvTranspose3d) else 0
        assert next(a.i for a in dq_w.attribute if a.name == "axis") == axis
        w = layer.weight.detach().double().numpy()
        other = tuple(d for d in range(w.ndim) if d != axis)
        qmax = 2 ** (layer.weight_quantizer.spec.bits - 1) - 1
        assert qmax == (63 if int8_isa().saturates else 127)
        np.testing.assert_allclose(w_scale, np.abs(w).max(axis=other) / qmax, rtol=1e-6)
        np.testing.assert_array_equal(w_scale, (layer.weight_quantizer.amax.reshape(-1) / qmax).numpy())
        shape = [1] * w.ndim
        shape[axis] = -1
        expected_q = np.clip(np.round(w / w_scale.reshape(shape)), -qmax, qmax)
        assert np.abs(q_int8).max() <= qmax
        assert np.abs(q_int8 - expected_q).max() <= 1  # float64 vs float32 rounding at .5 ties at most
        q_node = producer[dq_x.input[0]]
        assert q_node.op_type == "QuantizeLinear"
        x_scale = inits[q_node.input[1]]
        assert x_scale.shape == ()
        assert float(x_scale) == pytest.approx(float(layer.input_quantizer.amax) / 127, rel=1e-7)
        assert inits[q_node.input[2]].dtype == np.int8 and int(inits[q_node.input[2]]) == 0
        clip = producer[q_node.input[0]]  # mqb's narrow grid: -127..127
        assert clip.op_type == "Clip"
        assert float(inits[clip.input[1]]) == pytest.approx(-127 * float(x_scale), rel=1e-6)


def test_int8_weights_reproduce_fake_quant_exactly(exported) -> None:
    net, result = exported
    _, inits, _ = _graph(result.path)
    for row in result.layers:
        layer = dict(net.named_modules())[row.name]
        q = inits[f"{row.name}.weight_quantizer.qweight"].astype(np.float32)
        s = np.asarray(row.weight_scale, dtype=np.float32)
        axis = 1 if isinstance(layer, nn.ConvTranspose3d) else 0
        shape = [1] * q.ndim
        shape[axis] = -1
        with torch.no_grad():
            np.testing.assert_array_equal(q * s.reshape(shape), layer.weight_quantizer(layer.weight).numpy())


def test_onnxruntime_matches_fake_quant_within_one_step(exported) -> None:
    net, result = exported
    x = volume(7, (2, *SHAPE[1:]))
    with torch.no_grad():
        reference = net(x).numpy()
    out = _run(result.path, x)  # the batch axis is dynamic
    step = np.abs(reference).max() / 127
    assert (np.abs(out - reference) <= step).mean() >= 0.99


def test_narrow_range_matches_mqb_below_the_calibrated_range(tmp_path) -> None:
    """mqb clamps activations to -127 S; ONNX INT8 saturates at -128 S unless the exported Clip is there."""
    net = nn.Sequential(nn.Conv3d(1, 1, 1, bias=False)).eval()
    nn.init.ones_(net[0].weight)
    quantize(net, QuantRecipe.from_precision("w8a8", granularity="per_tensor"))
    calibrate(net, [torch.linspace(-1, 1, 8).reshape(1, 1, 2, 2, 2)])
    x = torch.full((1, 1, 2, 2, 2), -2.0)
    with torch.no_grad():
        reference = net(x).numpy()
    s = 1.0 / 127
    np.testing.assert_allclose(reference, -127 * s, rtol=1e-6)
    exact = export_onnx(net, x, tmp_path / "narrow.onnx")
    loose = export_onnx(net, x, tmp_path / "loose.onnx", narrow_range=False)
    np.testing.assert_allclose(_run(exact.path, x), reference, rtol=1e-6)
    np.testing.assert_allclose(_run(loose.path, x), -128 * s, rtol=1e-6)


def test_unsupported_layer_exports_in_float_and_says_so(tmp_path) -> None:
    net = deployable(small_net(), rules=(LayerRule("name:3", precision="w4a4"),))
    result = export_onnx(net, volume(0), tmp_path / "mixed.onnx")
    modes = {r.name: r for r in result.layers}
    assert modes["3"].mode == "float" and "INT4" in modes["3"].reason
    assert [r.name for r in result.float_layers] == ["3"]
    assert {modes[n].mode for n in ("0", "5", "6")} == {"int8"}
    model, inits, producer = _graph(result.path)
    conv = next(n for n in model.graph.node if n.name == modes["3"].onnx_node)
    assert conv.input[1] == "3.weight" and inits["3.weight"].dtype == np.float32  # float weight, no DQ
    assert conv.input[0] not in producer or producer[conv.input[0]].op_type != "DequantizeLinear"
    with pytest.raises(ValueError, match=r"3 \(weight is INT4"):
        export_onnx(net, volume(0), tmp_path / "strict.onnx", strict=True)
    with torch.no_grad():  # the float layer is the float layer: compare with the model where it is off
        net[3].quantizers_enabled = False
        reference = net(volume(7)).numpy()
    step = np.abs(reference).max() / 127
    assert (np.abs(_run(result.path, volume(7)) - reference) <= step).mean() >= 0.99


@pytest.mark.parametrize(
    ("spec_change", "reason"),
    [
        ({"granularity": "per_voxel"}, "dynamic"),
        ({"granularity": "per_channel"}, "activation granularity per_channel"),
        ({"format": "fp8_e4m3"}, "format fp8_e4m3"),
    ],
)
def test_export_mode_reasons(spec_change: dict, reason: str) -> None:
    net = nn.Sequential(nn.Conv3d(2, 4, 3)).eval()
    recipe = QuantRecipe.from_precision("w8a8", granularity="per_tensor")
    quantize(net, recipe)
    layer = net[0]
    new = layer.input_quantizer.spec.replace(**spec_change)
    layer.input_quantizer.spec = new
    mode, why = layer_export_mode(layer)
    assert mode == "float" and reason in why


def test_weight_only_layer_keeps_float_activations(tmp_path) -> None:
    net = small_net()
    quantize(net, QuantRecipe.from_precision("w8a16", granularity="per_channel"))
    result = export_onnx(net, volume(0), tmp_path / "w8a16.onnx")
    assert {r.mode for r in result.layers} == {"int8-weight-only"}
    model, _, _ = _graph(result.path)
    ops = [n.op_type for n in model.graph.node]
    assert "QuantizeLinear" not in ops and ops.count("DequantizeLinear") == len(result.layers)
    with torch.no_grad():
        reference = net(volume(3)).numpy()
    np.testing.assert_allclose(_run(result.path, volume(3)), reference, rtol=1e-4, atol=1e-5)


def test_method_extras_are_exported_as_float_ops(tmp_path) -> None:
    net = deployable(small_net())
    net[6].output_correction = torch.linspace(-0.5, 0.5, 4)
    result = export_onnx(net, volume(0), tmp_path / "corrected.onnx")
    assert {r.name: r.float_extras for r in result.layers}["6"] == ["output_correction"]
    with torch.no_grad():
        reference = net(volume(5)).numpy()
    step = np.abs(reference).max() / 127
    assert (np.abs(_run(result.path, volume(5)) - reference) <= step).mean() >= 0.99


def test_sizes_counted_by_hand(exported, tmp_path) -> None:
    """FP32 weights are 4 bytes per parameter; INT8 stores one byte per conv weight plus small float tensors."""
    net, result = exported
    fp32 = export_onnx(small_net(), volume(0), tmp_path / "fp32.onnx")
    params = list(small_net().parameters())
    assert fp32.weight_bytes == 4 * sum(p.numel() for p in params)
    conv_weights = sum(m.weight.numel() for _, m in quantized_layers(net))
    int8 = result.initializer_bytes["int8"]
    out_channels = sum(len(r.weight_scale) for r in result.layers)
    assert conv_weights <= int8 <= conv_weights + out_channels + len(result.layers)  # + int8 zero points
    biases_norm = sum(p.numel() for n, p in net.named_parameters() if not n.endswith("weight") or n.startswith("1."))
    floats = 4 * (biases_norm + out_channels + 3 * len(result.layers))  # + scales, activation scale / clip bounds
    assert result.initializer_bytes["float32"] == floats
    assert initializer_bytes(result.path) == result.initializer_bytes
    by_hand = 4 * sum(p.numel() for p in params) / (int8 + floats)
    assert fp32.weight_bytes / result.weight_bytes == pytest.approx(by_hand)
    assert result.file_bytes == result.path.stat().st_size


class _UpsampledConcatNorm(nn.Module):
    """MedFormer's decoder pattern: upsample to a size read from the skip tensor, concatenate, then an instance norm
    without affine parameters (tracing loses the channel count the exporter needs for it)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv3d(1, 4, 3, stride=2, padding=1)
        self.skip = nn.Conv3d(1, 2, 3, padding=1)
        self.norm = nn.InstanceNorm3d(6)
        self.head = nn.Conv3d(6, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.skip(x)
        up = nn.functional.interpolate(self.down(x), size=skip.shape[2:], mode="trilinear")
        return self.head(torch.relu(self.norm(torch.cat([up, skip], dim=1))))


def test_instance_norm_without_affine_exports_after_a_traced_concat(tmp_path) -> None:
    torch.manual_seed(0)
    net = _UpsampledConcatNorm().eval()
    x = volume(0)
    with pytest.raises(Exception, match="unknown channel size"), warnings.catch_warnings():  # the exporter alone
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (x,), str(tmp_path / "plain.onnx"), dynamo=False, input_names=["image"],
                          dynamic_axes={"image": {0: "batch"}})  # fmt: skip
    result = export_onnx(net, x, tmp_path / "net.onnx")
    assert net.norm.weight is None and net.norm.bias is None and not list(net.norm.parameters())  # put back
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        np.testing.assert_allclose(session.run(None, {"image": x.numpy()})[0], net(x).numpy(), rtol=0, atol=1e-5)
