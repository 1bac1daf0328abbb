"""What a GPU job sets before its first forward, checked on the CPU: training's determinism choice (a pure function
of ``trainer.accelerator``), the float arithmetic and deterministic cuDNN of the passes outside ``mqb.eval``
(activations, error proxies, ``mqb.deploy compare``), and :class:`~mqb.deploy.runtimes.TorchRuntime` on the device
its model is on (``meta`` stands in for CUDA, as in tests/quant/test_devices.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import mqb.pipeline
from mqb.config import compose_eval
from mqb.deploy.runtimes import TorchRuntime
from mqb.devices import float32_arithmetic
from mqb.train import CUBLAS_WORKSPACE_CONFIG, determinism, training_determinism


@pytest.fixture
def restore_torch_flags():
    """Put the deterministic-algorithm, cuDNN and float32 settings back as they were."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)  # fmt: skip
    with float32_arithmetic("ieee"):
        yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]


# -- training -------------------------------------------------------------------------------------------------------
def test_training_is_exactly_deterministic_on_the_cpu_and_warns_on_a_gpu(monkeypatch) -> None:
    """On CUDA the DiceCE loss's cross entropy over 5-D inputs and trilinear interpolation's backward have no
    deterministic kernel: ``deterministic=True`` stopped a GPU training at its first step."""
    assert training_determinism("cpu") is True
    assert training_determinism("gpu") == "warn" and training_determinism("cuda") == "warn"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert training_determinism("auto") is True
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert training_determinism("auto") == "warn"


def test_the_sidecar_says_what_a_gpu_training_rested_on(restore_torch_flags, monkeypatch) -> None:
    torch.use_deterministic_algorithms(True)
    cpu = determinism(0, 1, True, "cpu")
    assert cpu["deterministic_algorithms"] is True and "deterministic_warn_only" not in cpu  # as before
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE_CONFIG)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    gpu = determinism(0, 1, False, "cuda")
    assert gpu["deterministic_algorithms"] is True and gpu["deterministic_warn_only"] is True
    assert gpu["cudnn_deterministic"] is True and gpu["cudnn_benchmark"] is False
    assert gpu["cublas_workspace_config"] == ":4096:8" and "warned" in gpu["holds"]


def test_a_warn_only_training_sets_and_restores_the_gpu_switches(tmp_path: Path, restore_torch_flags,
                                                                 monkeypatch) -> None:  # fmt: skip
    """The GPU path of ``mqb.train`` run on the CPU (the choice forced to ``"warn"``): cuBLAS's workspace setting
    where none was set, cuDNN deterministic without benchmark, recorded in the sidecar, and the caller's settings
    back afterwards."""
    from hydra import compose, initialize_config_dir

    import mqb.train
    from mqb.config import CONF_DIR, register_configs
    from tests.test_demo_synthetic import TINY

    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "unset")  # so that monkeypatch restores its absence
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    monkeypatch.setattr(mqb.train, "training_determinism", lambda accelerator: "warn")
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, True
    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.cache_dir={tmp_path / 'cache'}", *TINY, "train.max_steps=2"])
    metadata = mqb.train.fit(cfg.model, cfg.dataset, cfg.train, tmp_path / "w.safetensors", accelerator="cpu",
                             progress=False, isolate=False)  # fmt: skip
    record = metadata["determinism"]
    assert record["deterministic_algorithms"] is True and record["deterministic_warn_only"] is True
    assert record["cudnn_deterministic"] is True and record["cudnn_benchmark"] is False
    assert record["cublas_workspace_config"] == CUBLAS_WORKSPACE_CONFIG
    assert not torch.are_deterministic_algorithms_enabled()
    assert not torch.is_deterministic_algorithms_warn_only_enabled()
    assert (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) == (False, True)


# -- passes outside mqb.eval ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("setting", ["ieee", "tf32"])
def test_compute_device_sets_the_configs_float_arithmetic(restore_torch_flags, monkeypatch, setting) -> None:
    """Activations, error proxies and ``mqb.deploy compare`` pick their device with ``compute_device``: it sets
    ``trainer.fp32_precision`` (otherwise their convolutions ran in TF32 on a GPU) and deterministic cuDNN."""
    seen: list[str] = []
    real = mqb.pipeline.apply_fp32_precision
    monkeypatch.setattr(mqb.pipeline, "apply_fp32_precision", lambda s: seen.append(s) or real(s))
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, True
    cfg = compose_eval(["trainer.accelerator=cpu", f"trainer.fp32_precision={setting}"])
    assert mqb.pipeline.compute_device(cfg) == torch.device("cpu")
    assert seen == [setting]
    assert (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) == (True, False)


def test_evaluations_record_deterministic_cudnn(restore_torch_flags) -> None:
    numerics = mqb.pipeline.set_numerics(compose_eval(["trainer.fp32_precision=tf32"]))
    assert numerics == {"fp32_precision": "tf32", "tf32_matmul": True, "tf32_conv": True, "cudnn_deterministic": True}
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark


class _Applied(Exception):
    """Raised by the stand-in ``apply_fp32_precision``: the tool got as far as setting its arithmetic."""


@pytest.mark.parametrize("tool", ["activations", "error_proxies"])
def test_the_tools_apply_the_configs_fp32_precision(restore_torch_flags, monkeypatch, tool) -> None:
    seen: list[str] = []

    def apply(setting: str) -> None:
        seen.append(setting)
        raise _Applied

    monkeypatch.setattr(mqb.pipeline, "apply_fp32_precision", apply)
    monkeypatch.setattr(mqb.pipeline, "load_model", lambda cfg: (nn.Conv3d(1, 2, 1), None))
    overrides = ["trainer.accelerator=cpu", "trainer.fp32_precision=tf32"]
    with pytest.raises(_Applied):
        if tool == "activations":
            from mqb.activations import report
            from mqb.tool_config import ACTIVATIONS, compose_tool

            report(compose_tool(ACTIVATIONS, overrides))
        else:
            from mqb.sensitivity import error_proxies

            error_proxies(compose_eval([*overrides, "precision=w8a8"]))
    assert seen == ["tf32"]


# -- TorchRuntime ---------------------------------------------------------------------------------------------------
class _Recorder(nn.Module):
    """Records the device and dtype of its input; returns it as float64 (TorchRuntime returns float32 NumPy)."""

    def __init__(self, device: str) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, device=device))
        self.seen: list[tuple[torch.device, torch.dtype]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append((x.device, x.dtype))
        return (x + self.weight).double() if x.device.type != "meta" else torch.zeros(x.shape, dtype=torch.float64)


def test_torch_runtime_runs_on_its_models_device_and_returns_cpu_numpy() -> None:
    x = np.arange(8, dtype=np.float64).reshape(1, 1, 2, 2, 2)
    cpu = _Recorder("cpu")
    out = TorchRuntime(cpu)(x)
    assert cpu.seen == [(torch.device("cpu"), torch.float32)]
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and np.array_equal(out, x.astype(np.float32))
    meta = _Recorder("meta")  # the input goes to the model's device, the output comes back to the CPU
    out = TorchRuntime(meta)(x)
    assert meta.seen == [(torch.device("meta"), torch.float32)]
    assert isinstance(out, np.ndarray) and out.shape == x.shape and out.dtype == np.float32


def test_torch_runtime_follows_a_model_moved_after_it_was_built() -> None:
    net = _Recorder("cpu")
    runtime = TorchRuntime(net)
    assert runtime.device == torch.device("cpu")
    net.to("meta")
    assert runtime.device.type == "meta"
    assert TorchRuntime(nn.Identity()).device == torch.device("cpu")  # no parameters: the CPU
    assert TorchRuntime(nn.Identity())(np.ones((1, 2), np.float32)).tolist() == [[1.0, 1.0]]
