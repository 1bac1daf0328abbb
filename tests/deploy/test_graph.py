"""Exact QDQ rewrites (one quantize per tensor and scale, INT8 Concat) and quantized norm inputs in the export:
ONNX Runtime's outputs before and after are compared bit for bit; node counts are counted in the files."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
from torch import nn

from mqb.deploy.export import NORM_INPUT_PREFIX, export_onnx
from mqb.quant import QuantRecipe, calibrate, quantize
from tests.deploy import SHAPE, IdentityResidual, ResidualConcat, deploy_recipe, small_net, volume

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def _calibrated(net: nn.Module, include: tuple[str, ...] = ("conv", "conv_transpose")) -> nn.Module:
    torch.manual_seed(0)
    quantize(net, deploy_recipe(include=include))
    calibrate(net, [volume(100 + i, (2, *SHAPE[1:])) for i in range(2)])
    return net.eval()


def _ops(path) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def _run(path, x: torch.Tensor, optimize: bool = True) -> np.ndarray:
    """ONNX Runtime's output; ``optimize=False`` runs the graph as written (no fusions into integer kernels, whose
    requantization rounds differently), which is how two graphs are compared for exact equality."""
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"image": x.numpy()})[0]


def test_shared_quantization_is_exact_and_removes_duplicates(tmp_path) -> None:
    torch.manual_seed(0)
    net = _calibrated(ResidualConcat())
    plain = export_onnx(net, volume(0), tmp_path / "plain.onnx", share_quantization=False)
    shared = export_onnx(net, volume(0), tmp_path / "shared.onnx")
    # conv and shortcut read `skip` with one calibrated range: one chain instead of two. The Concat's chain moves
    # onto its two inputs; the copy on `skip` is merged with the conv's chain too when their ranges are equal
    # (max|cat(skip, y)| == max|skip|).
    assert torch.equal(net.conv.input_quantizer.amax, net.shortcut.input_quantizer.amax)
    same_as_skip = bool(torch.equal(net.head.input_quantizer.amax, net.conv.input_quantizer.amax))
    assert plain.graph_rewrites == {}
    assert shared.graph_rewrites == {
        "merged_qdq": 1 + same_as_skip,
        "quantized_concats": 1,
        "dropped_requantization": 0,
    }
    before, after = _ops(plain.path), _ops(shared.path)
    assert before["QuantizeLinear"] == 4  # the inputs of stem, conv, shortcut and head
    assert after["QuantizeLinear"] == 4 - 1 + 1 - same_as_skip
    graph = onnx.load(str(shared.path)).graph
    producer = {o: n for n in graph.node for o in n.output}
    concat = next(n for n in graph.node if n.op_type == "Concat")
    assert [producer[i].op_type for i in concat.input] == ["DequantizeLinear", "DequantizeLinear"]
    x = volume(7, (2, *SHAPE[1:]))
    np.testing.assert_array_equal(_run(shared.path, x, optimize=False), _run(plain.path, x, optimize=False))
    with torch.no_grad():
        reference = net(x).numpy()
    step = np.abs(reference).max() / 127
    assert (np.abs(_run(shared.path, x) - reference) <= step).mean() >= 0.99


def test_chains_with_different_scales_are_not_merged(tmp_path) -> None:
    net = _calibrated(ResidualConcat())
    with torch.no_grad():  # a different range on the shortcut's input: its chain is not the conv's any more
        net.shortcut.input_quantizer.amax.mul_(2)
    result = export_onnx(net, volume(0), tmp_path / "different.onnx")
    same_as_skip = bool(torch.equal(net.head.input_quantizer.amax, net.conv.input_quantizer.amax))
    assert result.graph_rewrites["merged_qdq"] == same_as_skip  # only the Concat's copy on `skip`, if equal
    x = volume(7, (2, *SHAPE[1:]))
    plain = export_onnx(net, volume(0), tmp_path / "plain.onnx", share_quantization=False)
    np.testing.assert_array_equal(_run(result.path, x, optimize=False), _run(plain.path, x, optimize=False))


def test_norm_input_is_exported_as_int8_qdq_before_the_norm(tmp_path) -> None:
    net = _calibrated(small_net(), include=("conv", "conv_transpose", "norm"))
    result = export_onnx(net, volume(0), tmp_path / "norm.onnx", strict=True)
    rows = {r.name: r for r in result.layers}
    assert rows["1"].mode == "int8-input" and rows["1"].weight is None
    graph = onnx.load(str(result.path)).graph
    nodes = {n.name: n for n in graph.node}
    norm = nodes[rows["1"].onnx_node]
    assert norm.op_type == "InstanceNormalization"
    dq = nodes[NORM_INPUT_PREFIX + "1"]
    assert norm.input[0] == dq.output[0]
    scale = next(i for i in graph.initializer if i.name == dq.input[1])
    expected = float(net[1].input_quantizer.amax) / 127
    assert onnx.numpy_helper.to_array(scale).item() == pytest.approx(expected, rel=1e-7)
    assert rows["1"].activation_scale == pytest.approx(expected, rel=1e-7)
    x = volume(7, (2, *SHAPE[1:]))
    with torch.no_grad():
        reference = net(x).numpy()
    step = np.abs(reference).max() / 127
    assert (np.abs(_run(result.path, x) - reference) <= step).mean() >= 0.99


@pytest.mark.parametrize("tensor_quantizers", [False, True])
def test_openvino_runs_the_quantized_norm_on_int8(tmp_path, tensor_quantizers: bool) -> None:
    """Also when the conv's output is a tensor quantizer and the norm's own chain is dropped as a requantization:
    the report still finds the norm."""
    pytest.importorskip("openvino")
    from mqb.deploy.report import openvino_nodes, runtime_report
    from mqb.deploy.runtimes import OpenVINORuntime
    from mqb.quant.methods import SharedInputRanges

    net = _calibrated(small_net(), include=("conv", "conv_transpose", "norm"))
    outputs = []
    if tensor_quantizers:  # every producer here has one quantized reader: conv 0 -> norm 1, 2 -> 3, 4 -> 5, 5 -> 6
        calib = [volume(100 + i, (2, *SHAPE[1:])) for i in range(2)]
        outputs = SharedInputRanges(quantize_tensors=True).apply(net, batches=lambda: calib).outputs
        assert outputs == ["0", "2", "4", "5"]
    result = export_onnx(net, volume(0), tmp_path / "norm.onnx", strict=True)
    assert result.graph_rewrites["dropped_requantization"] == len(outputs)  # each reader's chain repeats one
    x = volume(7)
    runtime = OpenVINORuntime(result.path, precision="f32", shape=tuple(x.shape), perf_count=True)
    with torch.no_grad():
        reference = net(x).numpy()
    step = np.abs(reference).max() / 127
    assert (np.abs(runtime(x.numpy()) - reference) <= step).mean() >= 0.99
    report = runtime_report("openvino", result.layers, openvino_nodes(runtime.compiled))
    norm = next(r for r in report["layers"] if r["layer"] == "1")
    assert norm["export_mode"] == "int8-input" and norm["runtime_type"] == "MVN"
    assert report["unmatched"] == []


def test_tensor_quantizer_exports_one_chain_that_the_add_reads_too(tmp_path) -> None:
    """A quantized producer output (mqb.quant.output) read by a conv and a float Add: the conv's own chain is a
    requantization of the same grid, dropped without changing a value; the Add reads the DequantizeLinear."""
    from mqb.quant.methods import SharedInputRanges

    torch.manual_seed(0)
    net = quantize(IdentityResidual().eval(), QuantRecipe.from_precision("w8a8", granularity="deploy"))
    calib = [volume(100 + i, (2, 1, 8, 8, 8)) for i in range(2)]
    calibrate(net, calib)
    SharedInputRanges(quantize_tensors=True).apply(net, batches=lambda: calib)
    x = volume(7, (2, 1, 8, 8, 8))
    shared = export_onnx(net, x, tmp_path / "shared.onnx")
    plain = export_onnx(net, x, tmp_path / "plain.onnx", share_quantization=False)
    assert shared.tensor_quantizers == ["act"] and shared.graph_rewrites["dropped_requantization"] == 1
    graph = onnx.load(str(shared.path)).graph
    relu = next(n for n in graph.node if n.op_type == "Relu")
    (reader,) = [n for n in graph.node if relu.output[0] in n.input]  # one chain on the ReLU output
    add = next(n for n in graph.node if n.op_type == "Add")
    producer = {o: n for n in graph.node for o in n.output}
    assert reader.op_type == "Clip" and {producer[i].op_type for i in add.input} == {"DequantizeLinear", "Conv"}
    np.testing.assert_array_equal(_run(shared.path, x, optimize=False), _run(plain.path, x, optimize=False))
    with torch.no_grad():
        reference = net(x).numpy()
    step = np.abs(reference).max() / 127
    assert (np.abs(_run(shared.path, x) - reference) <= step).mean() >= 0.99
