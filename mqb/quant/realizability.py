"""Realizability: can real low-bit kernels execute a quantized layer as configured, or is it simulation only?

A quantized GEMM/convolution runs on integer (or FP8 / block-scaled) hardware when every scale factors out
of the inner dot product (paper eqs. 2-4):

* weights per-tensor or per-output-channel: the scale multiplies the output -> yes;
* activations per-tensor, per-token (Linear) or per-voxel on a 1x1x1 conv (one scale per GEMM row) -> yes;
* per-channel activations on a depthwise conv (input channel == output channel, so the scale factors out) -> yes;
* per-input-channel activation scales on a channel-mixing layer (eq. 3) are not folded into the weights:
  the inner sum runs over channels with different scales -> simulation only;
* per-voxel activations on a k>1 conv need eq. 4's per-kernel-offset scaled dot products, for which no
  kernels exist -> simulation only;
* per-group scales along the reduction axis need block-scaled hardware (MX / NVFP4 on Blackwell);
* a quantized norm input (InstanceNorm / GroupNorm, selector ``norm``): per-tensor or per-channel scales factor
  out of the per-channel statistics, so the producer can write INT8 and the norm read it (OpenVINO's MVN).
"""

from __future__ import annotations

from dataclasses import dataclass

from mqb.quant.layers import LayerInfo
from mqb.quant.spec import QuantSpec

#: Status values, from most to least deployable.
STATUSES = ("float", "integer-kernel", "fp8-kernel", "block-scaled", "simulation-only")


@dataclass(frozen=True)
class Realizability:
    status: str
    reason: str

    @property
    def executable(self) -> bool:
        return self.status != "simulation-only"


def _weight_issue(info: LayerInfo, spec: QuantSpec) -> str | None:
    if spec.granularity in ("per_tensor", "per_channel", "per_group"):
        return None
    return f"weight {spec.granularity} scales are neither per-output nor blocks along the reduction axis"


def _activation_issue(info: LayerInfo, spec: QuantSpec) -> str | None:
    gran = spec.granularity
    if gran in ("per_tensor", "per_group"):
        return None
    if info.kind in ("linear", "attention"):
        if gran == "per_token":
            return None
        return f"{gran} activation scales on a {info.kind} run along the reduction axis (not folded into weights)"
    if gran == "per_channel":
        if info.depthwise:
            return None
        return "per-input-channel activation scales are not folded into the weights (eq. 3)"
    if gran == "per_voxel":
        if all(k == 1 for k in info.kernel) and not info.depthwise:
            return None
        return f"per-voxel activations on a {info.describe_kernel()} kernel need per-kernel-offset dot products (eq. 4)"
    return f"{gran} activations are not supported by any kernel"


def realizability(info: LayerInfo, weight: QuantSpec | None, activation: QuantSpec | None) -> Realizability:
    """Classify one quantized layer (see the module docstring)."""
    specs = [s for s in (weight, activation) if s is not None]
    if not specs:
        return Realizability("float", "not quantized")
    if info.kind == "norm" and activation is not None and activation.format == "int":
        if activation.granularity in ("per_tensor", "per_channel"):
            return Realizability("integer-kernel", f"INT{activation.bits} norm input (the producer writes integers)")
        return Realizability("simulation-only", f"{activation.granularity} scales on a norm input")
    issues = [
        issue
        for issue in (
            _weight_issue(info, weight) if weight is not None else None,
            _activation_issue(info, activation) if activation is not None else None,
        )
        if issue
    ]
    if issues:
        return Realizability("simulation-only", "; ".join(issues))
    formats = {s.format for s in specs}
    grouped = any(s.granularity == "per_group" for s in specs)
    if grouped or formats & {"mxint8", "mxfp8", "mxfp4", "nvfp4"}:
        return Realizability("block-scaled", "block scales along the reduction axis (Blackwell MX/NVFP4 tensor cores)")
    if "fp8_e4m3" in formats:
        return Realizability("fp8-kernel", "FP8 tensor cores (Ada/Hopper/Blackwell)")
    bits = sorted({s.bits for s in specs})
    what = "weight-only " if activation is None else ""
    return Realizability(
        "integer-kernel", f"{what}INT{'/'.join(map(str, bits))} GEMM/conv with scales applied to outputs"
    )
