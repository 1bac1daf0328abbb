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

from mqb.quant.formats import BLOCK_SCALED_REASON, FORMATS
from mqb.quant.granularity import GRANULARITIES
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
    if GRANULARITIES[spec.granularity].weight_realizable:
        return None
    return f"weight {spec.granularity} scales are neither per-output nor blocks along the reduction axis"


def _activation_issue(info: LayerInfo, spec: QuantSpec) -> str | None:
    issue = GRANULARITIES[spec.granularity].activation_issue
    return f"{spec.granularity} activations are not supported by any kernel" if issue is None else issue(info)


def realizability(info: LayerInfo, weight: QuantSpec | None, activation: QuantSpec | None) -> Realizability:
    """Classify one quantized layer (see the module docstring)."""
    specs = [s for s in (weight, activation) if s is not None]
    if not specs:
        return Realizability("float", "not quantized")
    if info.kind == "norm" and activation is not None and FORMATS[activation.format].kernel == "integer-kernel":
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
    # the least deployable kernel among the formats (the codec table's kind); scales per group along the reduction
    # axis need block-scaled hardware whatever the element format
    kinds = [(FORMATS[s.format].kernel, FORMATS[s.format].kernel_reason) for s in specs]
    if any(GRANULARITIES[s.granularity].grouped for s in specs):
        kinds.append(("block-scaled", BLOCK_SCALED_REASON))
    kind, reason = max(kinds, key=lambda k: STATUSES.index(k[0]))
    if kind != "integer-kernel":
        return Realizability(kind, reason)
    bits = sorted({s.bits for s in specs})
    what = "weight-only " if activation is None else ""
    return Realizability(
        "integer-kernel", f"{what}INT{'/'.join(map(str, bits))} GEMM/conv with scales applied to outputs"
    )
