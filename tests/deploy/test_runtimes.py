"""Runtimes (ONNX Runtime, OpenVINO, TensorRT detection), their layer reports, and the agreement metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mqb.analysis.tables import runtime_report_markdown as report_markdown
from mqb.deploy.agreement import float64_twin, logit_agreement, prediction_dice
from mqb.deploy.export import export_onnx
from mqb.deploy.layer_precision import ort_nodes, runtime_report
from mqb.deploy.runtimes import (
    OrtRuntime,
    Runtime,
    RuntimeUnavailable,
    TensorRTRuntime,
    TorchRuntime,
    cpu_features,
    runtime_from_spec,
    runtime_versions,
    tensorrt_available,
)
from mqb.quant import LayerRule, QuantRecipe, calibrate, quantize
from tests.deploy import SHAPE, deployable, small_net, volume

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):
    net = deployable(small_net(), rules=(LayerRule("name:6", precision="w4a4"),))
    path = tmp_path_factory.mktemp("runtimes") / "int8.onnx"
    return net, export_onnx(net, volume(0), path)


def _reference(net: nn.Module, x: torch.Tensor, float_layers: tuple[str, ...] = ()) -> np.ndarray:
    """mqb's output, with the layers the export kept in float run in float (what the deployed model computes)."""
    modules = dict(net.named_modules())
    try:
        for name in float_layers:
            modules[name].quantizers_enabled = False
        with torch.no_grad():
            return net(x).numpy()
    finally:
        for name in float_layers:
            modules[name].quantizers_enabled = True


def test_runtime_protocol_and_versions(exported) -> None:
    net, result = exported
    ort_rt, torch_rt = OrtRuntime(result.path), TorchRuntime(net, "fake-quant")
    for runtime in (ort_rt, torch_rt):
        assert isinstance(runtime, Runtime)
        assert runtime.versions()
    assert "onnxruntime" in ort_rt.versions() and ort_rt.precision == "int8 qdq"
    rebuilt = runtime_from_spec(ort_rt.spec)
    np.testing.assert_array_equal(rebuilt(volume(1).numpy()), ort_rt(volume(1).numpy()))
    np.testing.assert_array_equal(torch_rt(volume(1).numpy()), _reference(net, volume(1)))
    versions = runtime_versions()
    assert {"torch", "onnx", "onnxruntime"} <= set(versions)
    assert isinstance(cpu_features()["isa"], list)


def test_tensorrt_is_detected_and_skipped_cleanly(exported) -> None:
    ok, why = tensorrt_available()
    if ok:
        pytest.skip("a TensorRT GPU is present: the unavailable path is not exercised")
    assert why
    with pytest.raises(RuntimeUnavailable, match="TensorRT"):
        TensorRTRuntime(exported[1].path)


def test_onnxruntime_layer_report_from_profiling(exported, tmp_path) -> None:
    net, result = exported
    runtime = OrtRuntime(result.path, profile=True, profile_dir=tmp_path)
    x = volume(2)
    out = runtime(x.numpy())
    reference = _reference(net, x, ("6",))
    assert (np.abs(out - reference) <= np.abs(reference).max() / 127).mean() >= 0.99
    profile = runtime.end_profiling()
    assert profile.is_file() and profile.parent == tmp_path
    report = runtime_report(runtime.name, result.layers, ort_nodes(profile))
    rows = {r["layer"]: r for r in report["layers"]}
    assert list(rows) == [r.name for r in result.layers]
    for row in rows.values():  # every layer found in the profile, with the element type it ran in
        assert row["runtime_type"] in ("Conv", "ConvTranspose", "QLinearConv", "FusedConv")
        assert row["runtime_precision"]
    assert rows["6"]["export_mode"] == "float" and report["exported_float"] == ["6"]
    text = report_markdown(report)
    assert "| 6 | conv | float |" in text and "Exported in float" in text


def test_agreement_dice_by_hand() -> None:
    ref = np.zeros((1, 1, 4, 4, 4), dtype=np.int64)
    cand = np.zeros_like(ref)
    ref[0, 0, :2] = 1  # 32 voxels of class 1
    cand[0, 0, :1] = 1  # 16 of them predicted
    cand[0, 0, 3, 0, 0] = 2  # one voxel of class 2, absent from the reference
    result = prediction_dice(ref, cand, num_classes=4)  # class 3: absent from both, left out
    bg = 2 * 31 / (32 + 47)
    fg = 2 * 16 / (32 + 16)
    assert result["per_class"][3] is None
    assert result["per_class"][:3] == pytest.approx([bg, fg, 0.0], abs=1e-6)
    assert result["dice"] == pytest.approx((bg + fg + 0.0) / 3, abs=1e-6)
    assert result["voxel_agreement"] == pytest.approx(47 / 64)
    logits = np.random.default_rng(0).normal(size=(2, 3, 4, 4, 4)).astype(np.float32)
    assert prediction_dice(logits, logits.copy())["dice"] == 1.0
    step = np.abs(logits).max() / 127
    shifted = logit_agreement(logits, logits + 0.5 * step)
    assert shifted["within_one_step"] == 1.0 and shifted["max_steps"] == pytest.approx(0.5, rel=1e-3)


def test_float64_twin_is_the_same_quantized_network_in_float64() -> None:
    """The rounding floor's twin: every tensor in float64, the original untouched, and converting the twin back to
    float32 gives the original's output to the bit (the calibrated ranges survive the round trip exactly); in
    float64 the output moves by float32 rounding only (far below one INT8 step of the output)."""
    net = deployable(small_net())
    x = volume(3)
    with torch.no_grad():
        before = net(x)
        twin = float64_twin(net)
        assert all(t.dtype == torch.float32 for t in [*net.parameters(), *net.buffers()] if t.is_floating_point())
        assert all(t.dtype == torch.float64 for t in [*twin.parameters(), *twin.buffers()] if t.is_floating_point())
        assert torch.equal(net(x), before)
        exact = twin(x.double())
        assert exact.dtype == torch.float64
        assert torch.equal(float64_twin(twin).float()(x), before)
    step = before.abs().max() / 127
    diff = (exact - before.double()).abs()
    assert diff.max() <= 2 * step  # a rounding flip moves a value by one step of its layer, not more
    assert (diff <= 1e-5 * step).float().mean() > 0.99  # nearly all equal up to float32 rounding


# -- OpenVINO ------------------------------------------------------------------------------------------------
def test_openvino_matches_fake_quant_and_reports_layer_precision(exported) -> None:
    pytest.importorskip("openvino")
    from mqb.deploy.layer_precision import openvino_nodes
    from mqb.deploy.runtimes import OpenVINORuntime, narrow_fold_exact

    net, result = exported
    runtime = OpenVINORuntime(result.path, precision="f32", perf_count=True)
    assert runtime.precision == "int8+f32" and runtime.float_precision == "f32" and isinstance(runtime, Runtime)
    # one narrow-range FakeQuantize per INT8 layer (layer 6 is float), where this CPU computes the fold exactly
    assert runtime.folded_clips == (3 if narrow_fold_exact() else 0)
    assert set(runtime.layer_tags) == {"0", "3", "5", "6"}
    x = volume(4, (2, *SHAPE[1:]))
    reference = _reference(net, x, ("6",))
    out = runtime(x.numpy())
    assert (np.abs(out - reference) <= np.abs(reference).max() / 127).mean() >= 0.99
    report = runtime_report(runtime.name, result.layers, openvino_nodes(runtime.compiled))
    rows = {r["layer"]: r for r in report["layers"]}
    assert list(rows) == ["0", "3", "5", "6"]
    for name, row in rows.items():
        assert row["runtime_type"] in ("Convolution", "Deconvolution"), name
        assert row["runtime_precision"] in ("i8", "u8", "f32"), name
    assert rows["6"]["runtime_precision"] == "f32"  # exported in float, runs in float
    assert report["by_type"] and report["unmatched"] == []
    assert "openvino" in runtime.versions()


def test_openvino_narrow_range_and_static_batch(tmp_path) -> None:
    """Inputs below the calibrated range give mqb's -127 S (the folded Clip); a static batch pads a smaller one."""
    pytest.importorskip("openvino")
    from mqb.deploy.runtimes import OpenVINORuntime, narrow_fold_exact

    net = nn.Sequential(nn.Conv3d(1, 4, 1)).eval()
    quantize(net, QuantRecipe.from_precision("w8a8", granularity="per_tensor"))
    calibrate(net, [torch.linspace(-1, 1, 64).reshape(1, 1, 4, 4, 4)])
    x = torch.linspace(-3, 3, 128).reshape(2, 1, 4, 4, 4)
    result = export_onnx(net, x[:1], tmp_path / "tiny.onnx")
    reference = _reference(net, x)
    step = np.abs(reference).max() / 127
    runtime = OpenVINORuntime(result.path, shape=(2, 1, 4, 4, 4))
    assert runtime.folded_clips == (1 if narrow_fold_exact() else 0)
    assert np.abs(runtime(x.numpy()) - reference).max() <= step
    single = runtime(x[:1].numpy())
    assert single.shape == (1, 4, 4, 4, 4)
    np.testing.assert_allclose(single, runtime(x.numpy())[:1], rtol=1e-6, atol=1e-7)
    single_batch = OpenVINORuntime(result.path, shape=(1, 1, 4, 4, 4))
    np.testing.assert_allclose(single_batch(x.numpy()), runtime(x.numpy()), rtol=1e-6, atol=1e-7)  # in chunks
    loose = OpenVINORuntime(result.path, narrow_range=False)
    assert loose.folded_clips == 0
    np.testing.assert_allclose(loose(x.numpy()), runtime(x.numpy()), rtol=1e-5, atol=1e-6)
