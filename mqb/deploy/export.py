"""Export a calibrated mqb model to ONNX with real INT8 QuantizeLinear / DequantizeLinear (QDQ) nodes.

The scales are mqb's own: each exportable quantized layer's weight quantizer and input quantizer are replaced,
for the duration of ``torch.onnx.export`` only, by modules that compute exactly what mqb's fake quantization
computes and that the exporter writes as ONNX QDQ:

* weights (INT8, symmetric, static, per-tensor or per-output-channel): an ``int8`` initializer
  ``q = clamp(round(w · (1/S)), -127, 127)`` followed by ``DequantizeLinear(q, S, 0, axis)``. The INT8 tensor is
  what is stored, so the file holds one byte per weight. ``q · S`` reproduces mqb's fake-quantized weight bit for
  bit (checked at export). INT7 weights (``|q| <= 63``, the overflow fix of :mod:`mqb.deploy.isa` for CPUs
  without VNNI) are stored the same way.
* activations (INT8, symmetric, static, per-tensor): ``Clip(x, -127·S, 127·S) -> QuantizeLinear(S, 0) ->
  DequantizeLinear(S, 0)``. mqb's grid is the narrow range ±127 (``QuantSpec.qmax``) while ONNX INT8 saturates at
  -128; the Clip makes the exported model match mqb exactly also for inputs below the calibrated range
  (``narrow_range=False`` drops it and lets such inputs reach -128).

``S = max(amax / 127, tiny)`` (paper eq. 1, :func:`mqb.quant.fake_quant.int_scale` with mqb's safe-scale rule),
``amax`` read from the quantizer's calibrated buffer. Everything else (norms, activations, pooling, the rewrites
PTQ methods add: ``input_transform``, ``low_rank_weight``, ``output_correction``) is exported as the float ops
the layer runs.

Layers that cannot run as real INT8 (4-bit, FP8/MX formats, per-voxel / per-channel / dynamic activations,
asymmetric specs, quantized attention products) are exported in float with the reason in
:attr:`ExportResult.layers` (``mode == "float"``), or rejected with a ``ValueError`` naming every such layer when
``strict=True``. A layer with only a weight quantizer (W8A16) exports as ``int8-weight-only``: INT8 storage,
float compute.

The legacy TorchScript exporter is used (``dynamo=False``): it writes one self-contained file (the dynamo exporter
of torch >= 2.9 needs onnxscript and may write external weight files) and maps custom autograd functions to the
exact QDQ nodes above.
"""

from __future__ import annotations

import contextlib
import os
import types
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mqb.deploy.isa import FIXED_WEIGHT_BITS
from mqb.quant.attention import QuantAttention
from mqb.quant.fake_quant import _safe_scale, int_scale
from mqb.quant.layers import QuantLayer
from mqb.quant.output import OUTPUT_QUANTIZER, output_quantizers
from mqb.quant.spec import QuantSpec

#: The ONNX opset written by default (per-axis DequantizeLinear needs >= 13).
DEFAULT_OPSET = 17
#: Export modes of a layer, from most to least quantized (``int8-input``: a norm whose input is INT8 QDQ).
MODES = ("int8", "int8-input", "int8-weight-only", "float")
_METHOD_EXTRAS = ("input_transform", "low_rank_weight", "output_correction")


# -- what can be exported -------------------------------------------------------------------------------------
def _spec_issue(spec: QuantSpec, role: str) -> str | None:
    """Why a spec has no INT8 QDQ form, or ``None`` if it has one."""
    if spec.format != "int":
        return f"{role} format {spec.format} is not INT (no INT8 QDQ form)"
    if spec.bits != 8 and not (role == "weight" and spec.bits == FIXED_WEIGHT_BITS):
        return f"{role} is INT{spec.bits}; only INT8 (and INT7 weights, the overflow fix) has INT8 kernels"
    if not spec.symmetric:
        return f"{role} is asymmetric; only symmetric INT8 (zero-point 0) is exported"
    if spec.dynamic:
        return f"{role} scales are dynamic ({spec.granularity}); only static calibrated scales are exported"
    if role == "weight" and spec.granularity not in ("per_tensor", "per_channel"):
        return f"weight granularity {spec.granularity} is not per-tensor / per-output-channel"
    if role == "activation" and spec.granularity != "per_tensor":
        return f"activation granularity {spec.granularity} is not per-tensor (INT8 kernels take one input scale)"
    return None


def layer_export_mode(layer: nn.Module) -> tuple[str, str]:
    """(mode, reason) for one quantized layer: ``int8``, ``int8-weight-only`` or ``float``."""
    if isinstance(layer, QuantAttention):
        return "float", "quantized attention products (activation x activation matmuls) have no QDQ export"
    assert isinstance(layer, QuantLayer)
    if not layer.quantizers_enabled:
        return "float", "quantizers disabled on this layer"
    wq, aq = layer.weight_quantizer, layer.input_quantizer
    for role, q in (("weight", wq), ("activation", aq)):
        if q is not None and q.mode != "quantize":
            return "float", f"{role} quantizer is in mode {q.mode!r}, not 'quantize'"
    if layer.kind == "norm":
        issue = _spec_issue(aq.spec, "activation") if aq is not None else "no input quantizer"
        if issue is None and not aq.is_calibrated:  # type: ignore[union-attr]
            issue = "activation quantizer was never calibrated (call mqb.quant.calibrate first)"
        if issue is not None:
            return "float", issue
        return "int8-input", "INT8 QDQ on the norm input (the producer can write INT8; the norm reads it)"
    if wq is None:
        return "float", "no weight quantizer (activation-only quantization has no INT8 kernel)"
    issue = _spec_issue(wq.spec, "weight")
    if issue is None and aq is not None:
        issue = _spec_issue(aq.spec, "activation")
        if issue is None and not aq.is_calibrated:
            issue = "activation quantizer was never calibrated (call mqb.quant.calibrate first)"
    if issue is not None:
        return "float", issue
    if aq is None:
        return "int8-weight-only", "INT8 weights, float activations (W8A16): INT8 storage, float compute"
    return "int8", "W8A8: INT8 weights and per-tensor static INT8 activations"


@dataclass
class LayerExport:
    """How one quantized mqb layer was written to ONNX."""

    name: str
    kind: str
    mode: str
    reason: str
    weight: str | None = None
    activation: str | None = None
    #: rewrites added by PTQ methods that run as float ops around the INT8 op
    float_extras: list[str] = field(default_factory=list)
    #: the ONNX node of the layer's conv / conv-transpose / gemm (filled after export)
    onnx_node: str | None = None
    #: False for a layer the traced forward never reached (e.g. nnU-Net's unused deep-supervision heads)
    in_graph: bool = True
    #: the scales written to ONNX (per output channel for per-channel weights)
    weight_scale: list[float] | None = None
    activation_scale: float | None = None


@dataclass
class ExportResult:
    """The exported file and what happened to every quantized layer."""

    path: Path
    opset: int
    quantized: bool
    layers: list[LayerExport]
    file_bytes: int
    weight_bytes: int
    initializer_bytes: dict[str, int]
    narrow_range: bool = True
    #: what :func:`mqb.deploy.graph.share_quantization` changed (empty when it was not run)
    graph_rewrites: dict[str, int] = field(default_factory=dict)
    #: modules whose output is quantized (tensor quantizers, :mod:`mqb.quant.output`), exported as QDQ after them
    tensor_quantizers: list[str] = field(default_factory=list)

    @property
    def float_layers(self) -> list[LayerExport]:
        """Quantized mqb layers that were exported in float (not INT8)."""
        return [layer for layer in self.layers if layer.mode == "float" and layer.in_graph]

    def as_dict(self, scales: bool = False) -> dict[str, Any]:
        layers = []
        for layer in self.layers:
            row = asdict(layer)
            if not scales:
                row.pop("weight_scale")
                row.pop("activation_scale")
            layers.append(row)
        return {
            "path": str(self.path),
            "opset": self.opset,
            "quantized": self.quantized,
            "narrow_range": self.narrow_range,
            "graph_rewrites": self.graph_rewrites,
            "tensor_quantizers": self.tensor_quantizers,
            "file_bytes": self.file_bytes,
            "weight_bytes": self.weight_bytes,
            "initializer_bytes": self.initializer_bytes,
            "layers": layers,
            "counts": {mode: sum(1 for r in self.layers if r.mode == mode and r.in_graph) for mode in MODES},
            "not_in_graph": [r.name for r in self.layers if not r.in_graph],
        }


# -- export-time replacements of the quantizers ---------------------------------------------------------------
class _DequantizeWeight(torch.autograd.Function):
    """``q · S`` in torch; ``DequantizeLinear(q, S, 0[, axis])`` in ONNX."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, scale: torch.Tensor, broadcast: torch.Tensor, axis: int) -> torch.Tensor:
        return q.float() * broadcast

    @staticmethod
    def symbolic(g: Any, q: Any, scale: Any, broadcast: Any, axis: int) -> Any:
        per_axis = axis >= 0
        shape = q.type().sizes() if per_axis else None
        zero = torch.zeros(shape[axis], dtype=torch.int8) if per_axis else torch.tensor(0, dtype=torch.int8)
        zp = g.op("Constant", value_t=zero)
        if per_axis:
            return g.op("DequantizeLinear", q, scale, zp, axis_i=axis)
        return g.op("DequantizeLinear", q, scale, zp)


class _QuantizeActivation(torch.autograd.Function):
    """mqb's symmetric INT8 fake quantization in torch; ``[Clip ->] QuantizeLinear -> DequantizeLinear`` in ONNX."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, high: torch.Tensor, clip: int):
        return (x * torch.reciprocal(scale)).round_().clamp_(-127, 127).mul_(scale)

    @staticmethod
    def symbolic(g: Any, x: Any, scale: Any, low: Any, high: Any, clip: int) -> Any:
        zp = g.op("Constant", value_t=torch.tensor(0, dtype=torch.int8))
        if clip:
            x = g.op("Clip", x, low, high)
        q = g.op("QuantizeLinear", x, scale, zp)
        return g.op("DequantizeLinear", q, scale, zp)


class ExportWeightQDQ(nn.Module):
    """Stands in for a :class:`WeightQuantizer` during export: an INT8 weight and its scales."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, axis: int | None) -> None:
        super().__init__()
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.axis = -1 if axis is None else axis
        shape = [1] * qweight.ndim
        if axis is not None:
            shape[axis] = -1
        self.register_buffer("broadcast", scale.reshape(shape))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return _DequantizeWeight.apply(self.qweight, self.scale, self.broadcast, self.axis)


class ExportActivationQDQ(nn.Module):
    """Stands in for a per-tensor INT8 input :class:`TensorQuantizer` during export."""

    def __init__(self, scale: torch.Tensor, narrow_range: bool) -> None:
        super().__init__()
        self.register_buffer("scale", scale.reshape(()))
        self.register_buffer("low", -127 * self.scale)
        self.register_buffer("high", 127 * self.scale)
        self.narrow_range = narrow_range

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _QuantizeActivation.apply(x, self.scale, self.low, self.high, int(self.narrow_range))


def weight_qdq(layer: QuantLayer) -> tuple[torch.Tensor, torch.Tensor, int | None]:
    """(INT8 weight, scales (C,) or (), axis) of a layer's INT8 weight quantizer, with mqb's exact scales.

    Raises ``RuntimeError`` if ``q · S`` differs from mqb's fake-quantized weight in any element.
    """
    wq = layer.weight_quantizer
    assert wq is not None
    weight = layer.weight.detach()
    with torch.no_grad():
        reference = wq(weight).detach()  # also sets the range from the current weight if needed
    assert wq.amax is not None
    scale = _safe_scale(int_scale(wq.amax.detach().float(), wq.spec.bits))
    axis = wq.axis if wq.spec.granularity == "per_channel" else None
    if axis is None:
        scale = scale.reshape(())
        broadcast = scale
    else:
        axis = axis % weight.ndim
        scale = scale.reshape(-1)
        shape = [1] * weight.ndim
        shape[axis] = -1
        broadcast = scale.reshape(shape)
    q = (weight.float() * torch.reciprocal(broadcast)).round().clamp(-wq.spec.qmax, wq.spec.qmax)
    dequantized = (q * broadcast).to(reference.dtype)
    if not torch.equal(dequantized, reference):
        bad = int((dequantized != reference).sum())
        raise RuntimeError(f"{wq.name}: INT8 export differs from mqb's fake-quantized weight in {bad} elements")
    return q.to(torch.int8), scale, axis


def activation_scale(quantizer: nn.Module) -> torch.Tensor:
    """The per-tensor INT8 scale S = amax / 127 of a static activation quantizer (mqb's safe-scale rule)."""
    assert quantizer is not None and quantizer.amax is not None
    return _safe_scale(int_scale(quantizer.amax.detach().float().reshape(()), quantizer.spec.bits))


def plan_export(model: nn.Module) -> list[LayerExport]:
    """What :func:`export_onnx` will do with every quantized layer of ``model`` (nothing is changed)."""
    rows = []
    for name, module in model.named_modules():
        if not isinstance(module, (QuantLayer, QuantAttention)):
            continue
        mode, reason = layer_export_mode(module)
        ws, as_ = module.weight_spec, module.activation_spec
        extras = [a for a in _METHOD_EXTRAS if getattr(module, a, None) is not None]
        if mode == "float":  # the correction belongs to the quantized layer and is off with its quantizers
            extras = [a for a in extras if a != "output_correction"]
        rows.append(
            LayerExport(
                name=name,
                kind=module.mqb_info.kind,
                mode=mode,
                reason=reason,
                weight=ws.short() if ws is not None else None,
                activation=as_.short() if as_ is not None else None,
                float_extras=extras,
            )
        )
    return rows


@contextlib.contextmanager
def export_mode(model: nn.Module, rows: list[LayerExport], narrow_range: bool = True) -> Iterator[None]:
    """Swap the quantizers of ``model`` for their export forms (per ``rows``, and every tensor quantizer of
    :mod:`mqb.quant.output`); everything is put back after."""
    modules = dict(model.named_modules())
    undo: list[Any] = []
    try:
        for _, producer in output_quantizers(model):
            saved_output = producer._modules[OUTPUT_QUANTIZER]
            producer._modules[OUTPUT_QUANTIZER] = ExportActivationQDQ(activation_scale(saved_output), narrow_range)
            undo.append(lambda m=producer, q=saved_output: m._modules.__setitem__(OUTPUT_QUANTIZER, q))
        for row in rows:
            layer = modules[row.name]
            if isinstance(layer, QuantAttention):
                layer.forward = types.MethodType(layer.float_class.forward, layer)  # type: ignore[method-assign]
                undo.append(lambda m=layer: m.__dict__.pop("forward", None))
                continue
            assert isinstance(layer, QuantLayer)
            saved = (layer._modules["weight_quantizer"], layer._modules["input_quantizer"], layer.quantizers_enabled)

            def restore(m: QuantLayer = layer, s: tuple = saved) -> None:
                m._modules["weight_quantizer"], m._modules["input_quantizer"] = s[0], s[1]
                m.quantizers_enabled = s[2]

            undo.append(restore)
            if row.mode == "float":
                layer.quantizers_enabled = False
                continue
            if row.mode == "int8-input":
                s = activation_scale(layer.input_quantizer)
                row.activation_scale = float(s)
                layer._modules["input_quantizer"] = ExportActivationQDQ(s, narrow_range)
                continue
            q, scale, axis = weight_qdq(layer)
            row.weight_scale = scale.reshape(-1).tolist()
            layer._modules["weight_quantizer"] = ExportWeightQDQ(q, scale, axis)
            if row.mode == "int8":
                s = activation_scale(layer.input_quantizer)
                row.activation_scale = float(s)
                layer._modules["input_quantizer"] = ExportActivationQDQ(s, narrow_range)
            else:
                layer._modules["input_quantizer"] = None
        yield
    finally:
        for fn in reversed(undo):
            fn()


def initializer_bytes(path: str | os.PathLike[str]) -> dict[str, int]:
    """Bytes of the ONNX initializers by element type (``int8``, ``float32`` ...), counted from their shapes."""
    import numpy as np
    import onnx
    from onnx import helper

    model = onnx.load(str(path), load_external_data=False)
    out: dict[str, int] = {}
    for init in model.graph.initializer:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type))
        count = int(np.prod(init.dims)) if len(init.dims) else 1
        out[dtype.name] = out.get(dtype.name, 0) + count * dtype.itemsize
    for node in model.graph.node:  # constants the exporter kept as nodes (zero points, small shapes)
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(attr.t.data_type))
                    count = int(np.prod(attr.t.dims)) if len(attr.t.dims) else 1
                    out[dtype.name] = out.get(dtype.name, 0) + count * dtype.itemsize
    return out


def artifact_bytes(path: str | os.PathLike[str]) -> int:
    """Size of the serialized model: the file plus any external-data files next to it."""
    path = Path(path)
    total = path.stat().st_size
    if path.suffix == ".xml":  # OpenVINO IR: graph + weights
        total += path.with_suffix(".bin").stat().st_size
    data = path.with_name(path.name + ".data")
    if data.is_file():
        total += data.stat().st_size
    return total


def _layer_nodes(path: Path, rows: list[LayerExport]) -> None:
    """Fill ``onnx_node``: the Conv / ConvTranspose / Gemm / MatMul node whose weight is the layer's."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    producer = {out: node for node in graph.node for out in node.output}
    by_name = {row.name: row for row in rows}
    for node in graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        src = node.input[1]
        for _ in range(4):  # weight <- DequantizeLinear / Transpose / Identity <- initializer
            if src in producer and producer[src].op_type in ("DequantizeLinear", "Transpose", "Identity"):
                src = producer[src].input[0]
            else:
                break
        for suffix in (".weight_quantizer.qweight", ".weight"):
            if src.endswith(suffix) and src[: -len(suffix)] in by_name:
                by_name[src[: -len(suffix)]].onnx_node = node.name
                break
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    dq_by_name = {node.name: node for node in graph.node if node.op_type == "DequantizeLinear"}
    for row in rows:  # a quantized norm input: the node reading its (named) DequantizeLinear
        dq = dq_by_name.get(NORM_INPUT_PREFIX + row.name)
        if row.mode == "int8-input" and dq is not None:
            readers = [n for n in consumers.get(dq.output[0], []) if n.op_type != "QuantizeLinear"]
            row.onnx_node = readers[0].name if readers else None
    initializers = {init.name for init in graph.initializer}
    for row in rows:
        if row.onnx_node is None:
            row.in_graph = any(name.startswith(row.name + ".") for name in initializers)


#: ONNX name of the DequantizeLinear that feeds a quantized norm input: ``<NORM_INPUT_PREFIX><layer>``
NORM_INPUT_PREFIX = "mqb-norm-input:"


def _rewrite_graph(path: Path, rows: list[LayerExport], share_quantization: bool, int8_concat: bool = True,
                   float_concat_before: tuple[str, ...] = ()) -> dict[str, int]:  # fmt: skip
    """Post-export rewrites of the file in place (checked by ``onnx.checker``): the exact QDQ sharing of
    :func:`mqb.deploy.graph.share_quantization` if asked, and the DequantizeLinear in front of each quantized norm
    named ``<NORM_INPUT_PREFIX><layer>`` so runtime reports find the norm (OpenVINO renames it ``MVN_<n>``)."""
    import onnx

    from mqb.deploy.graph import share_quantization as share

    model = onnx.load(str(path))
    graph = model.graph
    scales = {f"{r.name}.input_quantizer.scale": r.name for r in rows if r.mode == "int8-input"}
    readers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    norms = {}  # norm node name -> layer, found before the rewrites (which may drop the norm's own chain)
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input[1] in scales:
            for reader in readers.get(node.output[0], []):
                if reader.op_type != "QuantizeLinear":
                    norms[reader.name] = scales[node.input[1]]
    counts = share(model, int8_concat, float_concat_before) if share_quantization else {}
    producer = {out: node for node in graph.node for out in node.output}
    for node in graph.node:
        dq = producer.get(node.input[0]) if node.name in norms and node.input else None
        if dq is not None and dq.op_type == "DequantizeLinear":
            dq.name = NORM_INPUT_PREFIX + norms[node.name]
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return counts


@contextlib.contextmanager
def explicit_norm_affine(model: nn.Module, like: torch.Tensor) -> Iterator[None]:
    """Give every instance norm without affine parameters ``weight = 1``, ``bias = 0`` (the same values) for the
    export, with the dtype and device of ``like`` (the export's input). The ONNX exporter writes
    ``InstanceNormalization``'s scale and bias from the channel count otherwise, and refuses ("instance_norm for
    unknown channel size") where tracing lost it, e.g. after a Concat of a tensor upsampled to a size read from
    another (MedFormer's decoder)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.instancenorm._InstanceNorm) and m.weight is None]
    try:
        for norm in norms:
            norm.weight = nn.Parameter(like.new_ones(norm.num_features), requires_grad=False)
            norm.bias = nn.Parameter(like.new_zeros(norm.num_features), requires_grad=False)
        yield
    finally:
        for norm in norms:
            norm.weight = norm.bias = None


def export_onnx(
    model: nn.Module,
    example: torch.Tensor,
    path: str | os.PathLike[str],
    *,
    opset: int = DEFAULT_OPSET,
    strict: bool = False,
    narrow_range: bool = True,
    dynamic_batch: bool = True,
    share_quantization: bool = True,
    int8_concat: bool = True,
    float_concat_before: tuple[str, ...] = (),
) -> ExportResult:
    """Write ``model`` (float, or quantized and calibrated with mqb) to ``path`` as ONNX with INT8 QDQ.

    Args:
        model: the network; its quantized layers are exported per :func:`layer_export_mode`.
        example: an input of the deployed shape (B, C, *roi); the batch axis is dynamic unless told otherwise.
        opset: ONNX opset (>= 13 for per-channel weights).
        strict: raise ``ValueError`` naming every quantized layer that would fall back to float.
        narrow_range: clip activations to mqb's ±127 grid before QuantizeLinear (exact match to mqb).
        share_quantization: apply the exact QDQ rewrites of :func:`mqb.deploy.graph.share_quantization` (one
            quantize per tensor and scale, INT8 Concat) so runtimes fuse more; outputs are unchanged.
        int8_concat: with ``share_quantization``, also move a Concat's QDQ onto its inputs (INT8 Concat). OpenVINO
            2026.4 computes that graph wrongly on CPUs without AMX when it reads the Q/DQ pairs as they are, and
            exactly in NNCF's FakeQuantize form, which :class:`mqb.deploy.runtimes.OpenVINORuntime` runs
            (:func:`mqb.deploy.runtimes.fake_quantize_form`; :func:`mqb.deploy.runtimes.openvino_exactness` tells
            both; ``mqb.deploy`` turns the rewrite off where the form it runs is inexact).
        float_concat_before: with ``int8_concat``, keep the Concats whose quantized value only ops of these ONNX
            types read in float (:func:`mqb.deploy.runtimes.openvino_float_concat_before`: OpenVINO runs a
            ``ConvTranspose`` reading an INT8 Concat in f32, slower than its INT8 kernel on VNNI / AMX CPUs).

    Returns an :class:`ExportResult` with every quantized layer's mode and reason, the file and weight bytes.
    """
    if opset < 13:
        raise ValueError(f"opset={opset}: per-channel DequantizeLinear needs opset >= 13")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = plan_export(model)
    if strict:
        bad = [f"{r.name} ({r.reason})" for r in rows if r.mode == "float"]
        if bad:
            raise ValueError(f"{len(bad)} quantized layers cannot be exported as INT8: " + "; ".join(bad))
    was_training = model.training
    model.eval()
    tmp = path.with_name(f".{path.name}.tmp")
    dynamic_axes = {"image": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
    try:
        with (
            export_mode(model, rows, narrow_range),
            explicit_norm_affine(model, example),
            torch.no_grad(),
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (example,),
                str(tmp),
                dynamo=False,
                opset_version=opset,
                input_names=["image"],
                output_names=["logits"],
                dynamic_axes=dynamic_axes,
                do_constant_folding=True,
            )
        quantized = any(r.mode != "float" for r in rows)
        rewrites = {}
        if quantized:
            rewrites = _rewrite_graph(tmp, rows, share_quantization, int8_concat, tuple(float_concat_before))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
        model.train(was_training)
    _layer_nodes(path, rows)
    by_type = initializer_bytes(path)
    return ExportResult(
        path=path,
        opset=opset,
        quantized=any(r.mode != "float" for r in rows),
        layers=rows,
        file_bytes=artifact_bytes(path),
        weight_bytes=sum(by_type.values()),
        initializer_bytes=by_type,
        narrow_range=narrow_range,
        graph_rewrites=rewrites,
        tensor_quantizers=[name for name, _ in output_quantizers(model)],
    )
