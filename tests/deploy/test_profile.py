"""Profiling: warm-up excluded, medians, interleaving, memory, sliding windows, sizes; the CLI."""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mqb.deploy import profile as prof
from mqb.deploy.isa import int8_isa
from mqb.deploy.runtimes import TorchRuntime
from tests.deploy import small_net

ROOT = Path(__file__).resolve().parents[2]


def test_latency_excludes_warmup_and_takes_the_median() -> None:
    calls: list[int] = []
    result = prof.latency(lambda: calls.append(1), warmup=2, repeats=5)
    assert len(calls) == 7 and len(result["times_s"]) == 5 and result["warmup"] == 2
    assert result["median_s"] == statistics.median(result["times_s"])
    assert result["min_s"] == min(result["times_s"])
    with pytest.raises(ValueError, match="repeats"):
        prof.latency(lambda: None, repeats=0)


def test_interleaved_latency_runs_round_robin() -> None:
    order: list[str] = []
    runtimes = {k: (lambda x, k=k: order.append(k)) for k in ("a", "b", "c")}
    result = prof.interleaved_latency(runtimes, np.zeros(1), warmup=1, repeats=3)
    assert order == ["a", "b", "c"] * 4
    assert {k: len(v["times_s"]) for k, v in result.items()} == {"a": 3, "b": 3, "c": 3}


def test_throughput_by_hand() -> None:
    out = prof.throughput(0.5, (2, 1, 10, 10, 10))
    assert out == {"patches_per_s": 4.0, "megavoxels_per_s": pytest.approx(2 * 1000 / 0.5 / 1e6)}


def test_inference_memory_sees_a_large_allocation() -> None:
    size = 64 * 2**20

    inside: list[int] = []

    def allocate(x: np.ndarray) -> float:
        buffer = np.ones(size // 8, dtype=np.float64)  # touched, so resident
        inside.append(prof.current_rss_bytes())  # what the process holds during the call
        return float(buffer[-1])

    mem = prof.inference_memory(allocate, np.zeros(1))
    # the high-water mark is at least any RSS seen during the call (the allocator may reuse resident pages, so
    # the growth itself depends on what earlier tests left behind); the kernel syncs its per-thread RSS counters
    # lazily, so both readings carry a few MiB of slack
    slack = 8 * 2**20
    assert mem["peak_rss_bytes"] >= inside[0] - slack and inside[0] > 0
    if mem["peak_is_per_call"]:
        assert mem["inference_peak_bytes"] >= inside[0] - mem["rss_before_bytes"] - slack


def test_sliding_window_with_a_runtime_predictor() -> None:
    """Two channels that copy the input: MONAI's blended output is the input again; the window count is MONAI's."""

    def copy_runtime(x: np.ndarray) -> np.ndarray:
        return np.concatenate([x, -x], axis=1)

    volume = torch.rand(1, 1, 40, 40, 24)
    out = prof.sliding_window(copy_runtime, volume, (32, 32, 16), overlap=0.25)
    assert out.shape == (1, 2, 40, 40, 24)
    torch.testing.assert_close(out[:, :1], volume, rtol=1e-5, atol=1e-6)
    timing = prof.volume_latency(copy_runtime, volume, (32, 32, 16), overlap=0.25, warmup=1, repeats=2)
    # windows per axis: ceil((size - roi) / (roi * 0.75)) + 1 -> 2 x 2 x 2
    expected = math.prod(
        math.ceil((s - r) / int(r * 0.75)) + 1 for s, r in zip((40, 40, 24), (32, 32, 16), strict=True)
    )
    assert timing["windows"] == expected == 8
    assert len(timing["times_s"]) == 2


def test_profile_runtime_record() -> None:
    runtime = TorchRuntime(small_net(), "torch fp32")
    patch = np.random.default_rng(0).random((1, 1, 16, 16, 16), dtype=np.float32)
    record = prof.profile_runtime(runtime, patch, volume=torch.rand(1, 1, 20, 20, 20), warmup=1, repeats=2,
                                  volume_repeats=1)  # fmt: skip
    assert record["runtime"] == "torch fp32" and record["precision"] == "float32"
    times = record["patch_latency"]["times_s"]
    assert len(times) == 2 and record["patch_latency"]["median_s"] == pytest.approx(statistics.median(times))
    assert record["throughput"]["patches_per_s"] == pytest.approx(1 / record["patch_latency"]["median_s"])
    assert record["volume_latency"]["windows"] == 8 and record["versions"]["torch"] == torch.__version__
    assert "inference_peak_bytes" in record["memory"]


def test_isolated_memory_of_a_runtime(tmp_path) -> None:
    """A fresh process loads the runtime alone: loading adds at least the weights, and the first inference peaks
    above that by at least its output."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from mqb.deploy.export import export_onnx

    net = torch.nn.Sequential(torch.nn.Conv3d(1, 64, 3, padding=1), torch.nn.Conv3d(64, 64, 3, padding=1)).eval()
    result = export_onnx(net, torch.zeros(1, 1, 32, 32, 32), tmp_path / "fp32.onnx")
    mem = prof.isolated_memory({"kind": "onnxruntime", "path": str(result.path)}, (1, 1, 32, 32, 32))
    assert {"load_bytes", "inference_peak_bytes", "total_peak_bytes", "baseline_rss_bytes"} <= set(mem)
    assert mem["total_peak_bytes"] >= mem["load_bytes"]
    if mem["peak_is_per_call"]:
        assert mem["inference_peak_bytes"] >= 64 * 32**3 * 4  # the output tensor alone
    with pytest.raises(RuntimeError, match="failed"):
        prof.isolated_memory({"kind": "onnxruntime", "path": str(tmp_path / "missing.onnx")}, (1, 1, 4, 4, 4))


def test_cli_rejects_a_float_precision(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Through the Hydra app, in this process: the task refuses it with exit 2 and one line (the Hydra run folder in
    tmp_path; Hydra's logging left as it is)."""
    from mqb.deploy.__main__ import main

    argv = ["export", "precision=fp32", "deploy.out=/nonexistent/never-written", f"hydra.run.dir={tmp_path / 'run'}",
            "hydra/job_logging=none", "hydra/hydra_logging=none"]  # fmt: skip
    assert main(argv) == 2
    assert "mqb.deploy: error: precision=fp32 is a float precision" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_export_profile_compare(tmp_path: Path) -> None:
    """The real CLI on the synthetic data with a small UNet: records, Markdown and both ONNX files."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    overrides = ["model=unet", "model.checkpoint=null", "model.net.channels=[4,8,16]", "model.net.strides=[2,2]",
                 "model.net.num_res_units=1", "dataset.source.num_cases=6",
                 "dataset.splits={test: 1, calib: 1, val: 1}", "calibration.num_volumes=1",
                 f"paths.cache_dir={tmp_path / 'cache'}", f"results_dir={tmp_path / 'results'}"]  # fmt: skip
    for command in ("export", "profile", "compare"):
        out = tmp_path / command
        args = [sys.executable, "-m", "mqb.deploy", command, *overrides, f"deploy.out={out}",
                "deploy.profile.repeats=1", "deploy.profile.volume_repeats=1"]  # fmt: skip
        done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        record = json.loads((out / "deploy.json").read_text())
        assert (out / "fp32.onnx").is_file() and (out / "int8.onnx").is_file() and (out / "deploy.md").is_file()
        assert record["export"]["int8"]["counts"]["float"] == 0
        assert {"machine", "versions", "host"} <= set(record)
        if command == "profile":
            assert record["profile"]["onnxruntime fp32"]["patch_latency"]["median_s"] > 0
            assert "skipped" in record["profile"].get("tensorrt", {"skipped": "gpu"})
        if command == "compare":
            for name, row in record["agreement"].items():
                assert row["dice"] >= 0.9, name
            floor = record["agreement"]["mqb fake-quant float64"]  # the rounding floor, against the fake quant
            assert floor["reference"] == "mqb fake-quant" and floor["precision"] == "float64"
            assert "Rounding floor: " in (out / "deploy.md").read_text()
            assert record["agreement"]["onnxruntime int8"]["graph_rewrites"] == {}  # batch norm: no norm to rewrite
            ov = record["agreement"].get("openvino int8", {}).get("graph_rewrites", {})
            if ov:  # OpenVINO ran the Q/DQ pairs in NNCF's FakeQuantize form: deploy.md says so, to do the same
                md = (out / "deploy.md").read_text()
                assert f"openvino int8: fake_quantize_form x{ov['fake_quantize_form']}" in md


@pytest.mark.slow
def test_cli_export_int8_deploy_preset(tmp_path: Path) -> None:
    """``experiment=int8_deploy`` through the real CLI on an InstanceNorm UNet: norm inputs exported as INT8 and
    the shared-ranges step recorded with the layers it changed."""
    pytest.importorskip("onnx")
    out = tmp_path / "export"
    args = [sys.executable, "-m", "mqb.deploy", "export", "experiment=int8_deploy", "model=unet",
            "model.checkpoint=null", "model.net.channels=[4,8,16]", "model.net.strides=[2,2]",
            "model.net.num_res_units=1", "model.net.norm=instance", "dataset.source.num_cases=6",
            "dataset.splits={test: 1, calib: 1, val: 1}", "calibration.num_volumes=1",
            f"paths.cache_dir={tmp_path / 'cache'}", f"results_dir={tmp_path / 'results'}", f"deploy.out={out}",
            "deploy.strict=true"]  # fmt: skip
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((out / "deploy.json").read_text())
    from monai.networks.nets import UNet

    net = UNet(3, 1, 8, channels=(4, 8, 16), strides=(2, 2), num_res_units=1, norm="instance")
    norms = sum(isinstance(m, torch.nn.InstanceNorm3d) for m in net.modules())
    counts = record["export"]["int8"]["counts"]
    assert counts["float"] == 0 and counts["int8-input"] == norms > 0
    (shared,) = [m for m in record["methods"] if m["method"] == "shared_ranges"]
    assert len(shared["applied"]) >= 2 and shared["skipped"] == {}
    # the two U-Net skip Concats run in INT8 where OpenVINO computes that graph exactly on this CPU (the record
    # says which forms it found exact; mqb.deploy.runtimes.openvino_exactness), except that both feed a
    # ConvTranspose, which reads a float Concat where its INT8 kernel is the faster one (VNNI / AMX)
    concat = record["int8_isa"]["openvino_exact"].get("int8_concat", True)
    concat &= "ConvTranspose" not in record["int8_isa"]["float_concat_before"]
    assert record["export"]["int8"]["graph_rewrites"]["quantized_concats"] == (2 if concat else 0)
    if importlib.util.find_spec("openvino") is not None:
        from mqb.deploy.runtimes import openvino_exactness, openvino_float_concat_before

        assert record["int8_isa"]["openvino_exact"] == openvino_exactness()
        assert record["int8_isa"]["float_concat_before"] == list(openvino_float_concat_before())
        assert record["int8_isa"]["float_concat_before"] == ([] if int8_isa().saturates else ["ConvTranspose"])
    assert record["int8_isa"]["overflow_fix"] == int8_isa().saturates  # deploy.overflow_fix=auto
