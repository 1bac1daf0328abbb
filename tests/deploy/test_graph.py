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
from tests.deploy import SHAPE, IdentityResidual, InPlaceNormAct, ResidualConcat, deploy_recipe, small_net, volume

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
    from mqb.deploy.layer_precision import openvino_nodes, runtime_report
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


@pytest.mark.parametrize("in_place_writers", [True, False])
def test_output_quantizer_after_an_in_place_activation_exports_one_chain(tmp_path, in_place_writers: bool) -> None:
    """conv -> InstanceNorm -> LeakyReLU(inplace=True) -> conv + identity Add (nnU-Net's order): the export writes
    the output quantizer after the LeakyReLU, the one chain both the conv and the Add read (the conv's own chain is
    a requantization of that grid, dropped), nothing between the norm and the LeakyReLU, and computes what mqb
    simulates. Placement v1 (``in_place_writers=False``) wrote a second chain on the norm's output."""
    from mqb.quant.methods import SharedInputRanges

    torch.manual_seed(0)
    net = _calibrated(InPlaceNormAct().eval(), include=("conv", "norm"))
    calib = [volume(100 + i, (2, *SHAPE[1:])) for i in range(2)]
    SharedInputRanges(output_quantizers=True, in_place_writers=in_place_writers).apply(net, batches=lambda: calib)
    x = volume(7, (2, *SHAPE[1:]))
    result = export_onnx(net, x, tmp_path / "inplace.onnx", strict=True)
    assert result.tensor_quantizers == (["stem", "act"] if in_place_writers else ["stem", "norm"])
    graph = onnx.load(str(result.path)).graph
    producer = {o: n for n in graph.node for o in n.output}
    act = next(n for n in graph.node if n.op_type == "LeakyRelu")
    readers = [n for n in graph.node if act.output[0] in n.input]
    add = next(n for n in graph.node if n.op_type == "Add")
    if in_place_writers:
        assert producer[act.input[0]].op_type == "InstanceNormalization"  # the norm's output is not quantized
        assert len(readers) == 1 and readers[0].op_type in ("Clip", "QuantizeLinear")
        assert {producer[i].op_type for i in add.input} == {"DequantizeLinear", "Conv"}
    else:
        assert producer[act.input[0]].op_type == "DequantizeLinear"  # a chain on the norm's output
        assert "LeakyRelu" in {producer[i].op_type for i in add.input}  # and the Add read the float activation
    with torch.no_grad():
        reference = net(x).numpy()
    step = np.abs(reference).max() / 127
    assert (np.abs(_run(result.path, x, optimize=False) - reference) <= step).mean() >= 0.999
    assert (np.abs(_run(result.path, x) - reference) <= step).mean() >= 0.99


_UNET_SCRIPT = r"""
import json, sys, numpy as np, torch
from torch import nn
from mqb.deploy.export import export_onnx
from mqb.deploy.isa import int8_isa
from mqb.deploy.layer_precision import openvino_nodes, runtime_report
from mqb.deploy.runtimes import OpenVINORuntime, openvino_exactness
from mqb.quant import calibrate, quantize
from mqb.quant.methods import SharedInputRanges
from tests.deploy import deploy_recipe, volume

class UNetLike(nn.Module):  # an nnU-Net in small: conv -> IN -> LeakyReLU (in place, as nnU-Net's), a strided stage,
    def __init__(self):       # ConvTranspose, skip Concat
        super().__init__()
        def block(i, o, stride=1):
            return nn.Sequential(nn.Conv3d(i, o, 3, stride, 1), nn.InstanceNorm3d(o, affine=True),
                                 nn.LeakyReLU(0.01, inplace=True))
        self.enc0, self.enc1, self.up = block(1, 16), block(16, 32, 2), nn.ConvTranspose3d(32, 16, 2, 2)
        self.dec, self.head = block(32, 16), nn.Conv3d(16, 3, 1)
    def forward(self, x):
        skip = self.enc0(x)
        return self.head(self.dec(torch.cat([self.up(self.enc1(skip)), skip], 1)))

torch.manual_seed(0)
net = UNetLike().eval()
shape = (1, 1, 16, 16, 16)
calib = [volume(100 + i, (2, *shape[1:])) for i in range(2)]
quantize(net, deploy_recipe(include=("conv", "conv_transpose", "norm")))
calibrate(net, calib)
SharedInputRanges(output_quantizers=True).apply(net, batches=lambda: calib)
exact = openvino_exactness()
result = export_onnx(net, volume(0, shape), sys.argv[1] + "/unet.onnx", strict=True, int8_concat=exact["int8_concat"])
x = volume(7, shape)
with torch.no_grad():
    ref = net(x).numpy()
rt = OpenVINORuntime(result.path, shape=shape, perf_count=True)
got = rt(x.numpy())
nodes = openvino_nodes(rt.compiled)
report = runtime_report("openvino", result.layers, nodes)
# the conservative graph: Q/DQ as OpenVINO's ONNX reader builds them, the Concat in float
plain = export_onnx(net, volume(0, shape), sys.argv[1] + "/plain.onnx", strict=True, int8_concat=False)
conservative = OpenVINORuntime(plain.path, shape=shape, fake_quantize=False)(x.numpy())
step = np.abs(ref).max() / 127
print(json.dumps({
    "isa": int8_isa().as_dict(), "exact": exact, "rewrites": result.graph_rewrites, "fake_quantized": rt.fake_quantized,
    "vs_conservative": float(np.abs(got - conservative).max() / step),
    "within_step": float((np.abs(got - ref) <= step).mean()),
    "conservative_within_step": float((np.abs(conservative - ref) <= step).mean()),
    "argmax": float((got.argmax(1) == ref.argmax(1)).mean()),
    "nodes": [[n.type, n.precision, n.name] for n in nodes],
    "layers": {r["layer"]: [r["export_mode"], r["runtime_type"], r["runtime_precision"]] for r in report["layers"]},
}))
"""


@pytest.mark.parametrize("cap", [None, "AVX2"])
def test_openvino_runs_the_deploy_graph_like_nncf_and_exactly(tmp_path, cap: str | None) -> None:
    """An nnU-Net in small, exported as ``experiment=int8_deploy`` deploys it, run by mqb's OpenVINO runtime (QDQ
    pairs in NNCF's FakeQuantize form) on this CPU and on its AVX2 kernels (``ONEDNN_MAX_CPU_ISA=AVX2``, 7-bit
    weights): the skip Concat joins INT8 tensors, no quantize runs as a float node of its own except the network
    input's (each is fused into the convolution / MVN / ConvTranspose that writes the tensor, as for NNCF's own
    INT8), every quantized conv and norm reads INT8 on VNNI / AMX, and the output equals mqb's fake quantization up
    to float rounding: the same as the conservative graph (Q/DQ pairs as OpenVINO's ONNX reader builds them, the
    Concat in float) within a hundredth of an INT8 output step. (Both differ from mqb's fake quantization by a few
    steps here, float rounding at a quantizer amplified by the InstanceNorm of an untrained 16^3 network.)"""
    pytest.importorskip("openvino")
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from mqb.deploy.isa import int8_isa

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    env.pop("ONEDNN_MAX_CPU_ISA", None)
    env.pop("DNNL_MAX_CPU_ISA", None)
    if cap:
        env["ONEDNN_MAX_CPU_ISA"] = cap
    done = subprocess.run([sys.executable, "-c", _UNET_SCRIPT, str(tmp_path)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    x86 = int8_isa().hardware != "other"
    if cap:
        assert out["isa"]["dot"] == ("saturating" if x86 else out["isa"]["hardware"])
    assert out["vs_conservative"] <= 0.01, out["vs_conservative"]
    assert out["within_step"] >= 0.95 and out["argmax"] >= 0.99, out
    assert out["fake_quantized"] > 0
    if not x86:
        return
    assert out["exact"]["int8_concat"] and out["rewrites"]["quantized_concats"] == 1, out["exact"]
    nodes = out["nodes"]
    concats = [n for n in nodes if n[0] == "Concatenation"]
    assert concats and all(n[1] in ("u8", "i8") for n in concats), concats
    float_quantizers = [n for n in nodes if n[0] in ("FakeQuantize", "Subgraph") and n[1] not in ("u8", "i8")]
    assert len(float_quantizers) <= 1, float_quantizers  # the image's, as in NNCF's INT8
    layers = out["layers"]
    assert all(mode in ("int8", "int8-input") for mode, _, _ in layers.values()), layers
    if out["isa"]["dot"] in ("vnni", "amx"):
        assert all(precision in ("u8", "i8") for _, _, precision in layers.values()), layers
    else:  # the AVX2 kernels: every conv INT8; OpenVINO runs the ConvTranspose in f32 there (NNCF's INT8 too)
        assert all(p in ("u8", "i8") for name, (_, _, p) in layers.items() if name != "up"), layers


class _ConcatThenUp(nn.Module):
    """A MONAI-UNet-style up step: ``ConvTranspose(cat(skip, y))``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.conv = nn.Conv3d(1, 8, 3, padding=1), nn.Conv3d(8, 8, 3, padding=1)
        self.up = nn.ConvTranspose3d(16, 4, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = torch.relu(self.stem(x))
        return self.up(torch.cat([skip, torch.relu(self.conv(skip))], dim=1))


def test_a_concat_read_by_a_listed_op_stays_float(tmp_path) -> None:
    """``float_concat_before=("ConvTranspose",)`` keeps a Concat that only a ConvTranspose reads in float (OpenVINO
    runs that ConvTranspose in INT8 then, the faster kernel on VNNI / AMX); the values are the same either way."""
    net = _calibrated(_ConcatThenUp())
    moved = export_onnx(net, volume(0), tmp_path / "moved.onnx")
    kept = export_onnx(net, volume(0), tmp_path / "kept.onnx", float_concat_before=("ConvTranspose",))
    assert moved.graph_rewrites["quantized_concats"] == 1 and kept.graph_rewrites["quantized_concats"] == 0
    graph = onnx.load(str(kept.path)).graph
    producer = {o: n for n in graph.node for o in n.output}
    concat = next(n for n in graph.node if n.op_type == "Concat")
    assert "DequantizeLinear" not in {producer[i].op_type for i in concat.input if i in producer}
    x = volume(7, (2, *SHAPE[1:]))
    np.testing.assert_array_equal(_run(kept.path, x, optimize=False), _run(moved.path, x, optimize=False))
