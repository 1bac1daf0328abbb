"""Which layers actually run in INT8: per-layer runtime precision from each runtime's own profiling.

* OpenVINO: ``compiled_model.get_runtime_model()`` -- every executed node with its rt_info ``layerType``,
  ``runtimePrecision``, ``primitiveType`` (the kernel, e.g. ``brgconv_avx512_amx_i8``), ``originalLayersNames``
  (the source ops fused into it) and, with ``PERF_COUNT``, ``execTimeMcs``. :class:`~mqb.deploy.runtimes.
  OpenVINORuntime` tags each layer's conv / matmul as ``mqb:<layer>`` before compiling, so the layer is found in
  ``originalLayersNames`` whatever OpenVINO renamed; a conv fused with a following batch norm is found by its
  weight constant, whose name (the ONNX initializer's) the runtime model keeps.
* ONNX Runtime: the profiling JSON (``SessionOptions.enable_profiling``): one ``Node`` event per executed kernel
  with ``op_name`` and ``input_type_shape``; a node runs in INT8 when it is an integer kernel (``QLinearConv``,
  ``ConvInteger`` ...) or its data input is ``int8`` / ``uint8``. Layers are matched by the ONNX node name
  recorded at export (:attr:`mqb.deploy.export.LayerExport.onnx_node`).

:func:`layer_table` joins the export plan with a runtime's nodes: one row per quantized mqb layer with its export
mode and the precision the runtime ran it in; ``fell_back`` lists layers exported as INT8 that ran in float.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mqb.deploy.export import LayerExport
from mqb.deploy.runtimes import TAG

INT8_PRECISIONS = frozenset({"i8", "u8", "int8", "uint8"})
#: ONNX Runtime kernels that compute in integers
ORT_INTEGER_OPS = frozenset(
    {"QLinearConv", "ConvInteger", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat", "QGemm", "QLinearAdd",
     "DynamicQuantizeMatMul", "QAttention", "QLinearConvTranspose"}
)  # fmt: skip


_HELPER_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "Clip", "Cast", "Reorder", "FakeQuantize"})


@dataclass
class RuntimeNode:
    """One executed node of a runtime."""

    name: str
    type: str
    precision: str
    kernel: str = ""
    original: list[str] = field(default_factory=list)
    time_us: float | None = None
    #: names of the constant inputs (the weight initializer of a conv / matmul survives OpenVINO's fusions)
    constants: list[str] = field(default_factory=list)

    @property
    def int8(self) -> bool:
        return self.precision.lower() in INT8_PRECISIONS


def _rt(info: Any, key: str) -> str:
    try:
        return str(info[key].astype(str))
    except (KeyError, RuntimeError, AttributeError):
        return ""


def openvino_nodes(compiled_model: Any) -> list[RuntimeNode]:
    """The executed nodes of an OpenVINO compiled model (constants, inputs and outputs left out)."""
    nodes = []
    for op in compiled_model.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        kind = _rt(info, "layerType")
        if kind in ("Const", "Input", "Output", "Parameter", "Result"):
            continue
        exec_time = _rt(info, "execTimeMcs")
        constants = []
        for port in op.inputs():
            source = port.get_source_output().get_node()
            if _rt(source.get_rt_info(), "layerType") == "Const":
                constants.append(source.get_friendly_name())
        nodes.append(
            RuntimeNode(
                name=op.get_friendly_name(),
                type=kind,
                precision=_rt(info, "runtimePrecision"),
                kernel=_rt(info, "primitiveType"),
                original=[n for n in _rt(info, "originalLayersNames").split(",") if n],
                time_us=float(exec_time) if exec_time.replace(".", "", 1).isdigit() else None,
                constants=constants,
            )
        )
    return nodes


def _ort_precision(op: str, inputs: list[dict[str, Any]]) -> str:
    if op in ORT_INTEGER_OPS:
        return "int8"
    if not inputs:
        return ""
    return next(iter(inputs[0]))  # the element type of the data input: float, int8, uint8, float16 ...


def ort_nodes(profile_json: str | os.PathLike[str]) -> list[RuntimeNode]:
    """The executed kernels in an ONNX Runtime profiling JSON, times summed over runs."""
    events = json.loads(Path(profile_json).read_text())
    by_name: dict[str, RuntimeNode] = {}
    for event in events:
        if event.get("cat") != "Node" or not str(event.get("name", "")).endswith("_kernel_time"):
            continue
        args = event.get("args", {})
        name = event["name"][: -len("_kernel_time")]
        op = str(args.get("op_name", ""))
        node = by_name.get(name)
        if node is None:
            node = by_name[name] = RuntimeNode(
                name=name,
                type=op,
                precision=_ort_precision(op, args.get("input_type_shape", [])),
                kernel=str(args.get("provider", "")),
                original=[name],
                time_us=0.0,
            )
        node.time_us = (node.time_us or 0.0) + float(event.get("dur", 0))
    return list(by_name.values())


@dataclass
class LayerRow:
    """One quantized mqb layer: how it was exported and how the runtime ran it."""

    layer: str
    kind: str
    export_mode: str
    runtime_node: str | None
    runtime_type: str | None
    runtime_precision: str | None
    kernel: str | None
    time_us: float | None
    reason: str

    @property
    def runs_int8(self) -> bool:
        return (self.runtime_precision or "").lower() in INT8_PRECISIONS


def _find(nodes: list[RuntimeNode], layer: LayerExport) -> RuntimeNode | None:
    weights = (layer.name + ".weight_quantizer.qweight", layer.name + ".weight")
    tag = TAG + layer.name
    for node in nodes:
        if tag in node.original or any(w in node.constants for w in weights):
            return node
    if not layer.onnx_node:
        return None
    for node in nodes:  # ONNX Runtime keeps node names
        if layer.onnx_node == node.name or layer.onnx_node in node.original:
            return node
    for node in nodes:  # ... and fused nodes start with them (not the helper Q/DQ nodes it adds, e.g. "_bias_dq")
        if node.type not in _HELPER_OPS and any(o.startswith(layer.onnx_node) for o in (node.name, *node.original)):
            return node
    return None


def layer_table(layers: list[LayerExport], nodes: list[RuntimeNode]) -> list[LayerRow]:
    """Join the export plan with the runtime's executed nodes (one row per quantized mqb layer)."""
    rows = []
    for layer in layers:
        if not layer.in_graph:
            continue
        node = _find(nodes, layer)
        runtime_type, time_us = (node.type, node.time_us) if node else (None, None)
        parts = [n for n in nodes if layer.onnx_node and n.name.startswith(layer.onnx_node + "/")]
        if node is not None and node in parts:  # a norm run as several nodes (mqb.deploy.norms: <norm>/...)
            runtime_type = f"{layer.onnx_node.rsplit('/', 1)[-1]} as {len(parts)} nodes (axis-wise)"
            times = [n.time_us for n in parts if n.time_us is not None]
            time_us = sum(times) if times else None
        rows.append(
            LayerRow(
                layer=layer.name,
                kind=layer.kind,
                export_mode=layer.mode,
                runtime_node=node.name if node else None,
                runtime_type=runtime_type,
                runtime_precision=node.precision if node else None,
                kernel=node.kernel if node else None,
                time_us=time_us,
                reason=layer.reason,
            )
        )
    return rows


def precision_summary(nodes: list[RuntimeNode]) -> list[dict[str, Any]]:
    """Executed nodes grouped by (type, precision): count and total time, slowest first."""
    groups: dict[tuple[str, str], dict[str, Any]] = defaultdict(lambda: {"count": 0, "time_us": None})
    for node in nodes:
        g = groups[(node.type, node.precision)]
        g["count"] += 1
        if node.time_us is not None:
            g["time_us"] = (g["time_us"] or 0.0) + node.time_us
    out = [{"type": t, "precision": p, **g} for (t, p), g in groups.items()]
    return sorted(out, key=lambda r: (-(r["time_us"] or 0.0), -r["count"]))


def runtime_report(runtime_name: str, layers: list[LayerExport], nodes: list[RuntimeNode]) -> dict[str, Any]:
    """The layer report of one runtime: per-layer rows (layers in the exported graph), the fallbacks, and time by
    op type and precision."""
    rows = layer_table(layers, nodes)
    fell_back = [r.layer for r in rows if r.export_mode == "int8" and r.runtime_precision and not r.runs_int8]
    unmatched = [r.layer for r in rows if r.runtime_node is None and r.export_mode != "float"]
    return {
        "runtime": runtime_name,
        "layers": [asdict(r) | {"runs_int8": r.runs_int8} for r in rows],
        "int8_layers": sum(r.runs_int8 for r in rows),
        "fell_back": fell_back,
        "exported_float": [r.layer for r in rows if r.export_mode == "float"],
        "unmatched": unmatched,
        "not_in_graph": [layer.name for layer in layers if not layer.in_graph],
        "by_type": precision_summary(nodes),
    }
