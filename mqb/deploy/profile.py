"""Hardware profiling of deployed models: latency, throughput, peak memory and model size.

* latency per patch: median of ``repeats`` timed calls after ``warmup`` untimed ones (compilation, allocator and
  cache effects excluded); :func:`interleaved_latency` times several runtimes round by round so that drift of a
  shared machine affects them alike (compare ratios from the same call);
* latency per whole volume: MONAI ``sliding_window_inference`` with the runtime as predictor (same windows,
  overlap and blending as ``mqb.eval``), median of ``repeats`` after one warm-up;
* throughput: patches and megavoxels per second at the patch latency;
* memory: CPU resident set from ``/proc/self/status`` (``VmRSS`` / ``VmHWM``; the high-water mark is reset
  through ``/proc/self/clear_refs`` before each measurement, ``resource.getrusage`` is the fallback).
  :func:`isolated_memory` loads one runtime in a fresh process: the RSS its loading adds and the peak above that
  during its first inference (GPU: device memory used, for TensorRT); :func:`inference_memory` measures a call in
  this process (a lower bound once other runtimes have run; on CUDA also ``torch.cuda.max_memory_allocated``);
* size: bytes of the serialized artifact and of its weights (:mod:`mqb.deploy.export`).
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mqb.deploy.runtimes import Runtime


# -- memory -----------------------------------------------------------------------------------------------------
def _status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _status_bytes(key: str) -> int:
    """A ``/proc/self/status`` memory line in bytes; ``getrusage``'s peak RSS where /proc is missing."""
    kb = _status_kb(key)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss if kb is None else kb) * 1024


def current_rss_bytes() -> int:
    """Resident set size of this process now."""
    return _status_bytes("VmRSS")


def release_freed_memory() -> None:
    """``malloc_trim(0)`` where glibc has it: heap pages freed by Python go back to the OS, so that RSS shows what
    is held (no effect on values)."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux ``clear_refs`` 5); ``False`` if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """RSS high-water mark since the last :func:`reset_peak_rss` (or since the process started)."""
    return _status_bytes("VmHWM")


def inference_memory(fn: Callable[[np.ndarray], Any], x: np.ndarray) -> dict[str, Any]:
    """Peak RSS during one call of ``fn(x)`` above the RSS before it (the call's working memory)."""
    before = current_rss_bytes()
    exact = reset_peak_rss()
    gpu = torch.cuda.is_available()
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    fn(x)
    peak = peak_rss_bytes()
    out: dict[str, Any] = {
        "rss_before_bytes": before,
        "peak_rss_bytes": peak,
        "inference_peak_bytes": max(0, peak - before),
        "peak_is_per_call": exact,
    }
    if gpu:
        out["gpu_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
    return out


_ISOLATED = """
import json, sys
import numpy as np
spec, shape = json.loads(sys.argv[1]), tuple(json.loads(sys.argv[2]))
if spec["kind"] == "openvino":
    import openvino
else:
    import onnxruntime
from mqb.deploy.profile import current_rss_bytes, peak_rss_bytes, reset_peak_rss
from mqb.deploy.runtimes import runtime_from_spec
x = np.random.default_rng(0).random(shape, dtype=np.float32)
gpu = None
if spec["kind"] == "tensorrt":
    import torch
    gpu = torch.cuda.mem_get_info()[0]
base = current_rss_bytes()
runtime = runtime_from_spec(spec)
loaded = current_rss_bytes()
exact = reset_peak_rss()
runtime(x)
peak = peak_rss_bytes()
out = {"baseline_rss_bytes": base, "load_bytes": max(0, loaded - base), "inference_peak_bytes": max(0, peak - loaded),
       "total_peak_bytes": max(0, peak - base), "peak_is_per_call": exact}
if gpu is not None:
    out["gpu_used_bytes"] = gpu - torch.cuda.mem_get_info()[0]
print("MQB_MEMORY " + json.dumps(out))
"""


def isolated_memory(spec: dict[str, Any], shape: tuple[int, ...], timeout: float = 900) -> dict[str, Any]:
    """Memory of one runtime alone, in a fresh process: the RSS its loading adds (weights, compiled kernels) and
    the peak above that during its first inference (activations, arenas, scratch), from ``VmRSS`` / ``VmHWM``.
    In-process figures are lower bounds (the allocator reuses memory other runtimes freed); these are not."""
    done = subprocess.run(
        [sys.executable, "-c", _ISOLATED, json.dumps(spec), json.dumps(list(shape))],
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    for line in done.stdout.splitlines():
        if line.startswith("MQB_MEMORY "):
            return json.loads(line[len("MQB_MEMORY ") :])
    raise RuntimeError(f"memory measurement of {spec.get('name') or spec['kind']} failed: {done.stderr[-2000:]}")


# -- latency ----------------------------------------------------------------------------------------------------
def latency(fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 5) -> dict[str, Any]:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` untimed calls."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats}: need at least one timed call")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "times_s": times, "warmup": warmup}


def interleaved_latency(
    runtimes: dict[str, Callable[[np.ndarray], Any]], x: np.ndarray, *, warmup: int = 1, repeats: int = 5
) -> dict[str, dict[str, Any]]:
    """Per-patch latency of several runtimes, timed round by round (one call of each per round)."""
    for fn in runtimes.values():
        for _ in range(warmup):
            fn(x)
    times: dict[str, list[float]] = {k: [] for k in runtimes}
    for _ in range(repeats):
        for key, fn in runtimes.items():
            start = time.perf_counter()
            fn(x)
            times[key].append(time.perf_counter() - start)
    return {
        k: {"median_s": statistics.median(v), "min_s": min(v), "times_s": v, "warmup": warmup} for k, v in times.items()
    }


def throughput(latency_s: float, x_shape: tuple[int, ...]) -> dict[str, float]:
    """Patches and megavoxels per second for one call on a batch of shape ``x_shape`` (B, C, *spatial)."""
    batch, voxels = int(x_shape[0]), int(np.prod(x_shape[2:]))
    return {"patches_per_s": batch / latency_s, "megavoxels_per_s": batch * voxels / latency_s / 1e6}


def as_predictor(runtime: Callable[[np.ndarray], np.ndarray]) -> Callable[[torch.Tensor], torch.Tensor]:
    """A MONAI predictor (torch in, torch out) around a numpy runtime."""

    def predictor(window: torch.Tensor) -> torch.Tensor:
        array = window.as_tensor() if hasattr(window, "as_tensor") else window
        return torch.from_numpy(runtime(array.detach().float().cpu().numpy()))

    return predictor


def sliding_window(
    runtime: Callable[[np.ndarray], np.ndarray],
    volume: torch.Tensor | np.ndarray,
    roi_size: tuple[int, ...],
    *,
    sw_batch_size: int = 1,
    overlap: float = 0.25,
    mode: str = "gaussian",
) -> torch.Tensor:
    """Whole-volume logits with MONAI ``sliding_window_inference``, the runtime as predictor."""
    from monai.inferers import sliding_window_inference

    image = torch.as_tensor(volume, dtype=torch.float32)
    with torch.no_grad():
        out = sliding_window_inference(
            image, roi_size=tuple(roi_size), sw_batch_size=sw_batch_size, predictor=as_predictor(runtime),
            overlap=overlap, mode=mode,
        )  # fmt: skip
    return out.as_tensor() if hasattr(out, "as_tensor") else out


def volume_latency(
    runtime: Callable[[np.ndarray], np.ndarray],
    volume: torch.Tensor | np.ndarray,
    roi_size: tuple[int, ...],
    *,
    sw_batch_size: int = 1,
    overlap: float = 0.25,
    mode: str = "gaussian",
    warmup: int = 1,
    repeats: int = 3,
) -> dict[str, Any]:
    """Whole-volume latency (sliding windows + blending), with the number of windows run."""
    calls = {"windows": 0}

    def counted(x: np.ndarray) -> np.ndarray:
        calls["windows"] += int(x.shape[0])
        return runtime(x)

    result = latency(
        lambda: sliding_window(counted, volume, roi_size, sw_batch_size=sw_batch_size, overlap=overlap, mode=mode),
        warmup=warmup,
        repeats=repeats,
    )
    result["windows"] = calls["windows"] // (warmup + repeats)
    result["volume_shape"] = list(np.shape(volume))
    return result


def profile_runtime(
    runtime: Runtime,
    patch: np.ndarray,
    *,
    volume: torch.Tensor | np.ndarray | None = None,
    roi_size: tuple[int, ...] | None = None,
    warmup: int = 1,
    repeats: int = 5,
    volume_repeats: int = 3,
    sw_batch_size: int = 1,
    overlap: float = 0.25,
) -> dict[str, Any]:
    """Patch latency, throughput, memory and (with ``volume``) whole-volume latency of one runtime."""
    memory = inference_memory(runtime, patch)  # also the first warm-up call
    patch_latency = latency(lambda: runtime(patch), warmup=warmup, repeats=repeats)
    record: dict[str, Any] = {
        "runtime": runtime.name,
        "precision": getattr(runtime, "precision", None),
        "patch_shape": list(patch.shape),
        "patch_latency": patch_latency,
        "throughput": throughput(patch_latency["median_s"], patch.shape),
        "memory": memory,
        "versions": runtime.versions(),
    }
    if volume is not None:
        record["volume_latency"] = volume_latency(
            runtime, volume, roi_size or tuple(patch.shape[2:]), sw_batch_size=sw_batch_size, overlap=overlap,
            warmup=1, repeats=volume_repeats,
        )  # fmt: skip
    return record
