"""Fake-quantization overhead of mqb.quant on CPU, as ratios against FP32 in the same process.

Models: MONAI SwinUNETR (feature_size 24) and DynUNet (nnU-Net-like, 6 stages) at 96^3, batch 1, eval mode,
torch.inference_mode. Variants: FP32, W8A8 per-channel with static (calibrated) activation scales, W8A8
adaptive (dynamic per-voxel on 1x1x1 convs, static per-channel elsewhere, dynamic per-token on linears).
Variants are interleaved round by round so that drift of the machine affects them alike; the figure is the
ratio of medians. Targets (issue 2): static <= 1.3x, adaptive <= 1.8x.

Last line: ``swinunetr_static=<x> swinunetr_adaptive=<x> dynunet_static=<x> dynunet_adaptive=<x>``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from monai.networks.nets import DynUNet, SwinUNETR

from mqb.quant import QuantRecipe, calibrate, quantize


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


def time_once(model: torch.nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        model(x)
    return time.perf_counter() - start


def measure(name: str, size: int, rounds: int) -> dict[str, float]:
    x = torch.randn(1, 1, size, size, size, generator=torch.Generator().manual_seed(1))
    calib = [torch.randn(1, 1, size, size, size, generator=torch.Generator().manual_seed(2))]
    variants = {"fp32": build(name)}
    for label, scheme in (("static", "per_channel"), ("adaptive", "adaptive")):
        model = quantize(build(name), QuantRecipe.from_precision("w8a8", granularity=scheme))
        calibrate(model, calib)
        variants[label] = model
    times: dict[str, list[float]] = {k: [] for k in variants}
    for model in variants.values():  # warm-up (weight-quantization caches, allocator)
        time_once(model, x)
    for _ in range(rounds):
        for label, model in variants.items():
            times[label].append(time_once(model, x))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"{name} {size}^3: fp32 {med['fp32']:.3f}s, w8a8 per-channel static {med['static']:.3f}s "
        f"({med['static'] / med['fp32']:.2f}x), w8a8 adaptive {med['adaptive']:.3f}s "
        f"({med['adaptive'] / med['fp32']:.2f}x)  [median of {rounds}]",
        flush=True,
    )
    return {"static": med["static"] / med["fp32"], "adaptive": med["adaptive"] / med["fp32"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--models", nargs="+", default=["swinunetr", "dynunet"])
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, LD_PRELOAD={os.environ.get('LD_PRELOAD', '')!r}"
    )
    figures = {}
    for name in args.models:
        ratios = measure(name, args.size, args.rounds)
        figures.update({f"{name}_{k}": v for k, v in ratios.items()})
    print(" ".join(f"{k}={v:.3f}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
