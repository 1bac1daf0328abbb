"""Fake-quantization overhead of mqb.quant: time and peak memory of a quantized forward against a true-FP32 one.

Models: MONAI SwinUNETR (feature_size 24) and DynUNet (nnU-Net-like, 6 stages) at 96^3, batch 1, eval mode,
torch.inference_mode, float32 arithmetic (TF32 off on GPUs: ``mqb.devices.apply_fp32_precision("ieee")``).
Formats (``--formats``): ``w8a8`` (per-channel weights and static calibrated per-channel activations),
``w8a8_adaptive`` (dynamic per-voxel on 1x1x1 convs, static per-channel elsewhere, dynamic per-token on linears),
``fp8`` (E4M3, per-channel), ``mxint8``, ``mxfp8``, ``mxfp4``, ``nvfp4`` (blocks of 32 / 16 along the reduction
axis). ``--kernel`` sets the fake-quantization kernel of every quantizer (``mqb.quant.set_kernel``: auto, eager,
compiled); the first forward of each variant (compilation included) is untimed and reported.

Time: variants are interleaved round by round so that drift of the machine affects them alike; the figure is the
ratio of medians (``--clock process`` times the process's CPU seconds instead of wall seconds, steadier on a
machine shared with other jobs). Memory: the peak of one forward, counted as the bytes the model holds
(``mqb.quant.held_bytes``: parameters, buffers, quantizer scales) plus the input plus the most bytes allocated
during the forward above what was allocated before it (CUDA: ``torch.cuda.max_memory_allocated``; CPU: the
running total of the CPU allocator recorded by ``torch.profiler`` with ``profile_memory``, compiled kernels
included). ``peak_ratio`` is the largest quantized / FP32 ratio over all models and formats.

Last line: ``<model>_<format>=<time ratio>`` for every pair, ``<model>_<format>_peak=<memory ratio>``,
``peak_ratio=<max>``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
from monai.networks.nets import DynUNet, SwinUNETR

from mqb.devices import apply_fp32_precision
from mqb.quant import QuantRecipe, calibrate, held_bytes, quantize, set_kernel

#: format label -> (precision preset, granularity scheme)
FORMATS: dict[str, tuple[str, str]] = {
    "w8a8": ("w8a8", "per_channel"),
    "w8a8_adaptive": ("w8a8", "adaptive"),
    "fp8": ("fp8", "per_channel"),
    "mxint8": ("mxint8", "per_group"),
    "mxfp8": ("mxfp8", "per_group"),
    "mxfp4": ("mxfp4", "per_group"),
    "nvfp4": ("nvfp4", "per_group"),
}
DEFAULT_FORMATS = ["w8a8", "w8a8_adaptive", "fp8", "mxfp4", "nvfp4"]


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "swinunetr":
        return SwinUNETR(in_channels=1, out_channels=14, feature_size=24).eval()
    if name == "dynunet":
        return DynUNet(
            spatial_dims=3,
            in_channels=1,
            out_channels=14,
            kernel_size=[3, 3, 3, 3, 3, 3],
            strides=[1, 2, 2, 2, 2, 2],
            upsample_kernel_size=[2, 2, 2, 2, 2],
            filters=[32, 64, 128, 256, 320, 320],
            norm_name="instance",
            res_block=False,
        ).eval()
    raise ValueError(name)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(model: torch.nn.Module, x: torch.Tensor, clock: Callable[[], float]) -> float:
    _sync(x.device)
    start = clock()
    with torch.inference_mode():
        model(x)
    _sync(x.device)
    return clock() - start


def transient_peak(model: torch.nn.Module, x: torch.Tensor) -> int:
    """The most bytes allocated during one forward above what was allocated before it."""
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
        before = torch.cuda.memory_allocated(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        with torch.inference_mode():
            model(x)
        torch.cuda.synchronize(x.device)
        return torch.cuda.max_memory_allocated(x.device) - before
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model(x)
    peak = 0
    stack = list(prof.profiler.kineto_results.experimental_event_tree())  # type: ignore[union-attr]
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            peak = max(peak, int(node.extra_fields.total_allocated))  # running total since the profiler started
        stack.extend(node.children)
    return peak


def peak_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Peak bytes of one forward: what the model holds, the input, and the forward's own allocations."""
    return held_bytes(model) + x.untyped_storage().nbytes() + transient_peak(model, x)


def measure(
    name: str, size: int, rounds: int, formats: list[str], kernel: str, device: torch.device, clock: str
) -> dict[str, float]:
    tick = time.process_time if clock == "process" else time.perf_counter
    x = torch.randn(1, 1, size, size, size, generator=torch.Generator().manual_seed(1)).to(device)
    calib = [torch.randn(1, 1, size, size, size, generator=torch.Generator().manual_seed(2)).to(device)]
    variants = {"fp32": build(name).to(device)}
    for label in formats:
        precision, scheme = FORMATS[label]
        model = quantize(build(name).to(device), QuantRecipe.from_precision(precision, scheme=scheme))
        calibrate(model, calib)
        set_kernel(model, kernel)
        variants[label] = model
    warmup = {label: time_once(model, x, time.perf_counter) for label, model in variants.items()}  # + compilation
    peaks = {label: peak_bytes(model, x) for label, model in variants.items()}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for label, model in variants.items():
            times[label].append(time_once(model, x, tick))
    med = {k: statistics.median(v) for k, v in times.items()}
    figures: dict[str, float] = {}
    lines = [f"{name} {size}^3 on {device.type}, kernel={kernel}, {clock} clock, median of {rounds}:"]
    for label in variants:
        ratio, peak = med[label] / med["fp32"], peaks[label] / peaks["fp32"]
        lines.append(
            f"  {label:14s} {med[label]:7.3f}s ({ratio:.2f}x)  peak {peaks[label] / 2**20:8.1f} MiB ({peak:.2f}x)  "
            f"held {held_bytes(variants[label]) / 2**20:6.1f} MiB  first forward {warmup[label]:.1f}s"
        )
        if label != "fp32":
            figures[f"{name}_{label}"] = ratio
            figures[f"{name}_{label}_peak"] = peak
    print("\n".join(lines), flush=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--kernel", choices=["auto", "eager", "compiled"], default="auto")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--models", nargs="+", default=["swinunetr", "dynunet"])
    parser.add_argument("--formats", nargs="+", default=DEFAULT_FORMATS, choices=list(FORMATS))
    parser.add_argument("--clock", choices=["wall", "process"], default="wall")
    args = parser.parse_args()
    device = torch.device(args.device)
    numerics = apply_fp32_precision("ieee")  # true FP32: no TF32 in cuDNN convolutions or matmuls
    print(
        f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads, {numerics}, "
        f"LD_PRELOAD={os.environ.get('LD_PRELOAD', '')!r}"
    )
    figures: dict[str, float] = {}
    for name in args.models:
        figures.update(measure(name, args.size, args.rounds, args.formats, args.kernel, device, args.clock))
    figures["peak_ratio"] = max(v for k, v in figures.items() if k.endswith("_peak"))
    print(" ".join(f"{k}={v:.3f}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
