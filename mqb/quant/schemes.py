"""Layer-level granularity schemes: which tensor granularity each layer kind gets (paper sec. 2.2, 3.1).

| scheme        | conv weights | conv activations                                | linear W / A        |
|---------------|--------------|-------------------------------------------------|---------------------|
| per_tensor    | per-tensor   | per-tensor                                      | per-tensor          |
| per_channel   | per-channel  | per-channel (eq. 3)                             | per-channel / token |
| per_voxel     | per-channel  | per-voxel (eq. 4); depthwise: per-channel       | per-channel / token |
| adaptive      | per-channel  | per-voxel on 1x1x1, per-channel elsewhere       | per-channel / token |
| per_group     | per-group    | per-group (blocks along the reduction axis)     | per-group           |
| deploy        | per-channel  | per-tensor                                      | per-channel / tensor|

Norm inputs (selector ``norm``, opt-in) have no weight; their activation is per-tensor under ``per_tensor``,
``per_group`` and ``deploy`` and per-channel otherwise (a norm has no reduction axis to group or voxel to scale).

``per_channel`` is the paper's "per-channel/token"; ``adaptive`` is its "adaptive stratification"; ``deploy`` is
what INT8 runtimes execute (TensorRT, OpenVINO, ONNX Runtime QDQ: per-channel weights, one static activation
scale). Depthwise convolutions always use per-channel activations outside ``per_tensor``/``per_group``:
per-voxel scales would reduce over a single input channel (paper sec. 2.2).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mqb.quant.layers import LayerInfo


@dataclass(frozen=True)
class LayerGranularity:
    weight: str
    activation: str


def _per_tensor(info: LayerInfo) -> LayerGranularity:
    return LayerGranularity("per_tensor", "per_tensor")


def _per_channel(info: LayerInfo) -> LayerGranularity:
    if info.kind == "norm":
        return LayerGranularity("per_tensor", "per_channel")
    if info.kind in ("linear", "attention"):
        return LayerGranularity("per_channel", "per_token")
    return LayerGranularity("per_channel", "per_channel")


def _per_voxel(info: LayerInfo) -> LayerGranularity:
    if info.kind in ("conv", "conv_transpose") and not info.depthwise:
        return LayerGranularity("per_channel", "per_voxel")
    return _per_channel(info)


def _adaptive(info: LayerInfo) -> LayerGranularity:
    return _per_voxel(info) if info.pointwise else _per_channel(info)


def _deploy(info: LayerInfo) -> LayerGranularity:
    return LayerGranularity("per_channel", "per_tensor")


def _per_group(info: LayerInfo) -> LayerGranularity:
    if info.kind == "norm":
        return LayerGranularity("per_tensor", "per_tensor")
    return LayerGranularity("per_group", "per_group")


SCHEMES: dict[str, Callable[[LayerInfo], LayerGranularity]] = {
    "per_tensor": _per_tensor,
    "per_channel": _per_channel,
    "per_voxel": _per_voxel,
    "adaptive": _adaptive,
    "per_group": _per_group,
    "deploy": _deploy,
}


def get_scheme(name: str) -> Callable[[LayerInfo], LayerGranularity]:
    if name not in SCHEMES:
        valid = ", ".join(repr(k) for k in SCHEMES)
        raise ValueError(f"granularity scheme {name!r} is unknown; valid: {valid}")
    return SCHEMES[name]
