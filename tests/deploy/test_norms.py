"""Axis-wise instance / group norms (mqb.deploy.norms): ONNX Runtime runs the rewritten graph as accurately as
torch, measured against torch in float64 (the truth) with torch's own float32 error as the yardstick."""

from __future__ import annotations

import collections
import gc
import hashlib
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from mqb.deploy.export import export_onnx
from mqb.deploy.norms import axiswise_norms, volume_view

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def _norm(kind: str) -> tuple[nn.Module, tuple[int, ...]]:
    """A norm with a non-trivial affine, and an input shape large enough for a float32 sum to lose digits."""
    torch.manual_seed(0)
    norm, shape = {
        "instance3d": (nn.InstanceNorm3d(4, affine=True), (2, 4, 40, 48, 56)),
        "instance3d_plain": (nn.InstanceNorm3d(3), (1, 3, 48, 48, 48)),
        "group": (nn.GroupNorm(2, 6), (1, 6, 32, 40, 48)),
        "instance2d": (nn.InstanceNorm2d(4, affine=True), (1, 4, 384, 320)),
    }[kind]
    if norm.weight is not None:
        with torch.no_grad():
            norm.weight.uniform_(0.5, 2.0)
            norm.bias.uniform_(-1.0, 1.0)
    return norm.eval(), shape


def _session(model) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("opset", [17, 18])  # ReduceMean's axes: an attribute up to 17, an input from 18
@pytest.mark.parametrize("kind", ["instance3d", "instance3d_plain", "group", "instance2d"])
def test_axiswise_norms_run_as_accurately_as_torch(tmp_path, kind: str, opset: int) -> None:
    norm, shape = _norm(kind)
    x = torch.rand(*shape) * 0.4 + 0.5  # a mean far from 0: a one-pass float32 sum of the volume loses digits
    with torch.no_grad():
        truth = norm.double()(x.double()).numpy()
        norm.float()
        torch_error = np.abs(norm(x).double().numpy() - truth).max()
    model = onnx.load(str(export_onnx(norm, x[:1], tmp_path / "n.onnx", opset=opset).path))
    assert collections.Counter(n.op_type for n in model.graph.node)["InstanceNormalization"] == 1

    assert axiswise_norms(model) == 1
    onnx.checker.check_model(model, full_check=True)
    ops = collections.Counter(n.op_type for n in model.graph.node)
    assert "InstanceNormalization" not in ops
    rank = len(shape) if kind != "group" else 5  # a group norm's [N, G, L] is viewed as [N, G, a, b, c]
    assert ops["ReduceMean"] == 2 * (rank - 2)  # mean and variance, one spatial axis each
    session = _session(model)
    y = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]  # the whole batch (dynamic batch kept)
    assert y.shape == truth.shape
    error = np.abs(y.astype(np.float64) - truth).max()
    # torch's float32 error is ~1e-6 here; a one-pass float32 sum over the volume is 10-100x that
    assert error <= 8 * torch_error, f"{kind}: axis-wise ONNX Runtime {error:.2e} vs torch float32 {torch_error:.2e}"


def test_volume_view_factors_a_length_into_three_short_axes() -> None:
    assert volume_view(3 * 32 * 40 * 48) == (64, 60, 48)
    assert volume_view(96**3) == (96, 96, 96)
    assert volume_view(12) == (3, 2, 2)
    assert volume_view(7) is None  # prime: nothing shorter
    for length in (30, 1000, 30030, 184320, 2**20):
        a, b, c = volume_view(length)
        assert a * b * c == length and c**3 <= length and max(a, b, c) < length


def test_axiswise_group_norm_leaves_a_prime_length_alone(tmp_path) -> None:
    norm = nn.GroupNorm(2, 2).eval()  # [1, 2, 7] -> InstanceNormalization over L = 7: no view
    x = torch.randn(1, 2, 7)
    model = onnx.load(str(export_onnx(norm, x, tmp_path / "g.onnx").path))
    before = model.SerializeToString()
    assert axiswise_norms(model) == 0
    assert model.SerializeToString() == before


def test_ort_runtime_rewrites_the_loaded_graph_not_the_file(tmp_path) -> None:
    from mqb.deploy.runtimes import OrtRuntime, runtime_from_spec

    norm, shape = _norm("instance3d")
    net = nn.Sequential(nn.Conv3d(4, 4, 3, padding=1), norm, nn.LeakyReLU(0.01), nn.Conv3d(4, 2, 1)).eval()
    x = torch.rand(1, *shape[1:])
    path = export_onnx(net, x, tmp_path / "net.onnx").path
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    accurate, as_written = OrtRuntime(path), OrtRuntime(path, axiswise_norms=False)
    assert (accurate.norms_rewritten, as_written.norms_rewritten) == (1, 0)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert runtime_from_spec(as_written.spec).norms_rewritten == 0
    # a memory measurement loads the rewritten copy as it is (ONNX Runtime's own memory, not the rewrite's)
    assert accurate.session_path != path and accurate.session_path.is_file() and as_written.session_path == path
    assert as_written.memory_spec == as_written.spec  # nothing rewritten: the runtime's own spec (TensorRT's too)
    copy = runtime_from_spec(accurate.memory_spec)
    assert copy.norms_rewritten == 0 and copy.session_path == accurate.session_path
    np.testing.assert_array_equal(copy(x.numpy()), accurate(x.numpy()))
    with torch.no_grad():
        truth = net.double()(x.double()).numpy()
        net.float()
        torch_error = np.abs(net(x).double().numpy() - truth).max()
    error = np.abs(accurate(x.numpy()).astype(np.float64) - truth).max()
    assert error <= 8 * torch_error
    folder = accurate.session_path.parent
    del accurate, copy
    gc.collect()
    assert not folder.exists()  # the rewritten copy goes with its runtime


def test_axiswise_norms_with_symbolic_spatial_sizes(tmp_path) -> None:
    """A file exported with dynamic D, H, W: the rank is enough, one graph serves every volume size."""
    norm, _ = _norm("instance3d")
    path = tmp_path / "dyn.onnx"
    with warnings.catch_warnings():  # the tracer's notes on InstanceNorm's Python-side checks
        warnings.simplefilter("ignore")
        torch.onnx.export(norm, (torch.rand(1, 4, 8, 8, 8),), str(path), input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "n", 2: "d", 3: "h", 4: "w"}}, dynamo=False)  # fmt: skip
    model = onnx.load(str(path))
    assert axiswise_norms(model) == 1
    session = _session(model)
    for shape in ((1, 4, 24, 32, 40), (2, 4, 40, 24, 8)):
        x = torch.rand(*shape) + 0.5
        with torch.no_grad():
            truth = norm.double()(x.double()).numpy()
            norm.float()
        np.testing.assert_allclose(session.run(None, {"x": x.numpy()})[0], truth, rtol=0, atol=2e-5)


@pytest.mark.parametrize("axiswise", [True, False])
def test_mqb_deploy_runs_onnx_runtime_as_deploy_axiswise_norms_says(tmp_path, axiswise: bool) -> None:
    from types import SimpleNamespace

    from mqb.config import compose_eval
    from mqb.deploy.__main__ import build_runtimes

    norm, shape = _norm("instance3d")
    x = torch.rand(1, *shape[1:])
    export = SimpleNamespace(path=export_onnx(norm, x, tmp_path / "n.onnx").path)
    cfg = compose_eval([f"deploy.axiswise_norms={str(axiswise).lower()}"])
    built = build_runtimes(SimpleNamespace(cfg=cfg, fp32=export, int8=export, example=x), ["onnxruntime"])
    assert {name: rt.graph_rewrites for name, rt in built.items()} == {
        name: ({"axiswise_norms": 1} if axiswise else {}) for name in ("onnxruntime fp32", "onnxruntime int8")
    }


def test_float64_norms_are_rewritten_in_float64(tmp_path) -> None:
    norm, shape = _norm("instance3d")
    norm = norm.double()
    x = torch.rand(1, *shape[1:], dtype=torch.float64) + 0.5
    model = onnx.load(str(export_onnx(norm, x, tmp_path / "d.onnx").path))
    assert axiswise_norms(model) == 1
    session = _session(model)
    with torch.no_grad():
        y = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        np.testing.assert_allclose(y, norm(x).numpy(), rtol=0, atol=1e-10)  # float32 would be ~1e-6 off


def test_onnx_runtime_layer_report_times_a_rewritten_norm_as_one_layer(tmp_path) -> None:
    """A quantized norm input (``experiment=int8_deploy``) run axis-wise: its row adds up its nodes' times."""
    from mqb.deploy.layer_precision import ort_nodes, runtime_report
    from mqb.deploy.runtimes import OrtRuntime
    from mqb.quant import calibrate, quantize
    from tests.deploy import InPlaceNormAct, deploy_recipe, volume

    net = quantize(InPlaceNormAct(), deploy_recipe(include=("conv", "norm")))
    calibrate(net, [volume(1), volume(2)])
    result = export_onnx(net.eval(), volume(0), tmp_path / "n.onnx")
    runtime = OrtRuntime(result.path, profile=True, profile_dir=tmp_path)
    runtime(volume(3).numpy())
    nodes = ort_nodes(runtime.end_profiling())
    (layer,) = [r for r in result.layers if r.mode == "int8-input"]
    parts = [n for n in nodes if n.name.startswith(layer.onnx_node + "/")]
    assert len(parts) >= 10 and runtime.norms_rewritten == 1  # 6 ReduceMean, Sub, Mul, Sqrt, ...
    (row,) = [r for r in runtime_report(runtime.name, result.layers, nodes)["layers"] if r["layer"] == layer.name]
    assert row["runtime_type"] == f"InstanceNormalization as {len(parts)} nodes (axis-wise)"
    assert row["time_us"] == pytest.approx(sum(n.time_us for n in parts))
