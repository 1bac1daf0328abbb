"""Quantized layers: Conv1d/2d/3d, ConvTranspose1d/2d/3d, Linear and norm inputs, swapped in place.

``quantize`` changes the class of a float layer to its quantized twin (e.g. ``nn.Conv3d`` ->
:class:`QuantConv3d`, a subclass) and attaches ``weight_quantizer`` / ``input_quantizer`` submodules. The
layer keeps its parameters under the same names, so checkpoints and optimizers keep working, and
``dequantize`` restores the original class exactly. Activations and pooling stay in float.

Norms are quantizable only on their *input*, and only on request (selector ``norm``, not in the default
``include``): InstanceNorm1d/2d/3d and GroupNorm compute their statistics at run time, so an INT8 runtime that
reads their input in INT8 (OpenVINO's MVN) lets the producing convolution write INT8 instead of FP32. Quantizing
that input is what NNCF's and TensorRT's explicit-quantization recipes do; the norm itself and its affine
parameters stay float. BatchNorm is not offered: at inference it is an affine map folded into the convolution.

Axes: Conv weights are (C_out, C_in/g, *k): per-channel axis 0, reduction axis 1. ConvTranspose weights are
(C_in, C_out/g, *k): per-output-channel axis 1, reduction axis 0. Linear weights are (out, in): axis 0 / 1.
Conv activations are (N, C, *spatial): channel / reduction axis 1. Linear activations are (..., hidden).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mqb.quant.granularity import GRANULARITIES, valid_granularities
from mqb.quant.quantizer import TensorQuantizer, WeightQuantizer, module_device
from mqb.quant.registry import QuantModule, quant_class, register_quant_module
from mqb.quant.spec import QuantSpec

LAYER_KINDS = ("conv", "conv_transpose", "linear", "attention", "norm")


@dataclass(frozen=True)
class LayerInfo:
    """What a quantizable layer is: name, kind, kernel shape, channels and groups."""

    name: str
    kind: str
    type_name: str
    kernel: tuple[int, ...] = ()
    in_channels: int = 0
    out_channels: int = 0
    groups: int = 1

    @property
    def depthwise(self) -> bool:
        """A convolution with one input channel per group (C_in == groups > 1)."""
        return self.kind in ("conv", "conv_transpose") and self.groups > 1 and self.groups == self.in_channels

    @property
    def pointwise(self) -> bool:
        """A 1x1(x1) convolution that mixes channels (not depthwise): a GEMM over channels at each voxel."""
        return self.kind == "conv" and all(k == 1 for k in self.kernel) and not self.depthwise

    @property
    def kernel_tag(self) -> str:
        """``conv1x3x3``, ``conv3x3x3``, ``conv_transpose2x2x2`` ... ('' for non-convolutions)."""
        if self.kind not in ("conv", "conv_transpose"):
            return ""
        return self.kind + "x".join(str(k) for k in self.kernel)

    @property
    def tags(self) -> frozenset[str]:
        """The selector words this layer answers to (see :mod:`mqb.quant.selectors`)."""
        tags = {self.kind, f"type:{self.type_name}"}
        if self.kernel_tag:
            tags.add(self.kernel_tag)
        if self.depthwise:
            tags.add("depthwise")
        elif self.groups > 1:
            tags.add("grouped")
        if self.pointwise:
            tags.add("pointwise")
        return frozenset(tags)

    def describe_kernel(self) -> str:
        if self.kind in ("conv", "conv_transpose"):
            extra = " dw" if self.depthwise else (f" g{self.groups}" if self.groups > 1 else "")
            return "x".join(str(k) for k in self.kernel) + extra
        return "-"


def axis_for(kind: str, role: str, granularity: str) -> int | None:
    """The axis a quantizer needs (channel axis for per-channel, reduction axis for per-group), from the granularity
    registry (:data:`mqb.quant.granularity.GRANULARITIES`)."""
    entry = GRANULARITIES.get(granularity)
    return entry.axis(kind, role) if entry is not None and entry.axis is not None else None


class QuantLayer(QuantModule):
    """Mixin of the quantized twins of weighted layers and norm inputs. ``float_class`` is the class restored by
    ``dequantize``.

    Besides the two quantizers, a layer can carry the pieces that PTQ methods (:mod:`mqb.quant.methods`) add,
    all exact rewrites of the float layer ``y = op(x, W) + b``:

    * ``input_transform`` T with a weight rewritten so that ``op(T(x), W') == op(x, W)`` (smoothing: T divides
      channels by ``s`` and ``W' = W·s``; rotation: T mixes channels by an orthogonal ``H`` and ``W' = W·H``);
    * ``low_rank_weight`` L, kept in float, with ``W' = W - L`` quantized: ``y = op(Q(x), Q(W')) + op(x, L) + b``;
    * ``output_correction`` c per output channel, subtracted from ``y`` (bias correction; a correction of the
      quantized layer, so it is off while the quantizers are, which keeps that mode the exact float model).

    The float weight is kept (``float_weight``) the first time a method rewrites it, and put back by
    ``dequantize``, so a dequantized layer is exactly the original float layer again. That is the only second copy
    of a weight: the fake-quantized weight exists only during the layer's forward (:class:`WeightQuantizer`), so an
    RTN-quantized layer holds its float parameters and a few scales.
    """

    takes_input_ranges: ClassVar[bool] = True
    weight_quantizer: WeightQuantizer | None
    input_quantizer: TensorQuantizer | None

    def attach_quantizers(self, weight: QuantSpec | None, activation: QuantSpec | None) -> None:
        name = self.mqb_info.name
        for role, spec, valid in (
            ("weight", weight, valid_granularities("weight", self.kind)),
            ("activation", activation, valid_granularities("input", self.kind)),
        ):
            if spec is not None and spec.granularity not in valid:
                raise ValueError(
                    f"{name}: {role} granularity {spec.granularity!r} is invalid for a {self.kind} layer; "
                    f"valid: {', '.join(repr(v) for v in valid)}"
                )
        device = module_device(self)  # quantizers are born where the layer lives (ranges loaded later go there)
        self.register_module(
            "weight_quantizer",
            WeightQuantizer(weight, axis_for(self.kind, "weight", weight.granularity), f"{name}.weight", device=device)
            if weight is not None
            else None,
        )
        self.register_module(
            "input_quantizer",
            TensorQuantizer(
                activation, axis_for(self.kind, "input", activation.granularity), f"{name}.input", device=device
            )
            if activation is not None
            else None,
        )
        self.register_module("input_transform", None)
        self.register_buffer("low_rank_weight", None, persistent=False)
        self.register_buffer("output_correction", None, persistent=False)
        self.register_buffer("float_weight", None, persistent=False)
        self.quantizers_enabled = True
        self.applied_methods: list[str] = []

    def detach_quantizers(self) -> None:
        if getattr(self, "float_weight", None) is not None:
            with torch.no_grad():
                self.weight.copy_(self.float_weight)  # type: ignore[operator]
        for attr in ("weight_quantizer", "input_quantizer", "input_transform"):
            self._modules.pop(attr, None)
        for attr in ("low_rank_weight", "output_correction", "float_weight"):
            self._buffers.pop(attr, None)
        for attr in ("quantizers_enabled", "applied_methods"):
            self.__dict__.pop(attr, None)

    def rewrite_weight(self, weight: torch.Tensor, method: str) -> None:
        """Replace the weight by an equivalent rewrite (keeping the float original once) and drop cached scales."""
        with torch.no_grad():
            if self.float_weight is None:
                self.float_weight = self.weight.detach().clone()  # type: ignore[operator]
            self.weight.copy_(weight)  # type: ignore[operator]
        if self.weight_quantizer is not None:
            self.weight_quantizer.clear_cache()
        self.applied_methods.append(method)

    @property
    def weight_spec(self) -> QuantSpec | None:
        return self.weight_quantizer.spec if self.weight_quantizer is not None else None

    @property
    def activation_spec(self) -> QuantSpec | None:
        return self.input_quantizer.spec if self.input_quantizer is not None else None

    def quantized_operands(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.quantizers_enabled:
            return x, self.weight  # type: ignore[return-value]
        xq = self.input_quantizer(x) if self.input_quantizer is not None else x
        wq = self.weight_quantizer(self.weight) if self.weight_quantizer is not None else self.weight
        return xq, wq

    def output_channel_axis(self) -> int:
        """Axis of the output channels in ``y`` (1 for convolutions, -1 for linear)."""
        return -1 if self.kind == "linear" else 1

    def layer_op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The float operation of the layer with the given operands (conv, transposed conv or linear)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xt = self.input_transform(x) if self.input_transform is not None else x
        xq, wq = self.quantized_operands(xt)
        y = self.layer_op(xq, wq, self.bias)  # type: ignore[arg-type]
        if self.low_rank_weight is not None:
            y = y + self.layer_op(xt, self.low_rank_weight, None)
        if self.output_correction is not None and self.quantizers_enabled:
            shape = [1] * y.dim()
            shape[self.output_channel_axis()] = -1
            y = y - self.output_correction.view(shape)
        return y


def _describe_conv(cls: type[QuantLayer], name: str, module: nn.Module) -> LayerInfo:
    assert isinstance(module, nn.modules.conv._ConvNd)
    kernel = tuple(int(k) for k in module.kernel_size)
    return LayerInfo(name, cls.kind, type(module).__name__, kernel, module.in_channels, module.out_channels,
                     module.groups)  # fmt: skip


class _QuantConv(QuantLayer):
    kind = "conv"
    describe_float = classmethod(_describe_conv)

    def layer_op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self._conv_forward(x, weight, bias)  # type: ignore[attr-defined]


class QuantConv1d(_QuantConv, nn.Conv1d):
    float_class = nn.Conv1d


class QuantConv2d(_QuantConv, nn.Conv2d):
    float_class = nn.Conv2d


class QuantConv3d(_QuantConv, nn.Conv3d):
    float_class = nn.Conv3d


class _QuantConvTranspose(QuantLayer):
    kind = "conv_transpose"
    describe_float = classmethod(_describe_conv)
    _functional: ClassVar = None
    _spatial_dims: ClassVar[int] = 0
    _mqb_output_size: list[int] | None = None

    def layer_op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        output_padding = self._output_padding(  # type: ignore[attr-defined]
            x, self._mqb_output_size, self.stride, self.padding, self.kernel_size, self._spatial_dims, self.dilation
        )
        return type(self)._functional(
            x, weight, bias, self.stride, self.padding, output_padding, self.groups, self.dilation
        )

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:  # type: ignore[override]
        self._mqb_output_size = output_size
        try:
            return super().forward(x)
        finally:
            self._mqb_output_size = None


class QuantConvTranspose1d(_QuantConvTranspose, nn.ConvTranspose1d):
    float_class = nn.ConvTranspose1d
    _functional = F.conv_transpose1d
    _spatial_dims = 1


class QuantConvTranspose2d(_QuantConvTranspose, nn.ConvTranspose2d):
    float_class = nn.ConvTranspose2d
    _functional = F.conv_transpose2d
    _spatial_dims = 2


class QuantConvTranspose3d(_QuantConvTranspose, nn.ConvTranspose3d):
    float_class = nn.ConvTranspose3d
    _functional = F.conv_transpose3d
    _spatial_dims = 3


class QuantLinear(QuantLayer, nn.Linear):
    float_class = nn.Linear
    kind = "linear"

    @classmethod
    def describe_float(cls, name: str, module: nn.Module) -> LayerInfo:
        assert isinstance(module, nn.Linear)
        return LayerInfo(name, "linear", type(module).__name__, (), module.in_features, module.out_features, 1)

    def layer_op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight, bias)


class _QuantNormInput(QuantLayer):
    """A normalization layer whose input is fake-quantized: ``y = norm(Q(x))``; no weight quantizer."""

    kind = "norm"

    @classmethod
    def describe_float(cls, name: str, module: nn.Module) -> LayerInfo:
        if isinstance(module, nn.GroupNorm):
            return LayerInfo(name, "norm", type(module).__name__, (), module.num_channels, module.num_channels,
                             module.num_groups)  # fmt: skip
        assert isinstance(module, nn.modules.instancenorm._InstanceNorm)
        return LayerInfo(name, "norm", type(module).__name__, (), module.num_features, module.num_features, 1)

    def layer_op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.float_class.forward(self, x)  # type: ignore[arg-type]


class QuantInstanceNorm1d(_QuantNormInput, nn.InstanceNorm1d):
    float_class = nn.InstanceNorm1d


class QuantInstanceNorm2d(_QuantNormInput, nn.InstanceNorm2d):
    float_class = nn.InstanceNorm2d


class QuantInstanceNorm3d(_QuantNormInput, nn.InstanceNorm3d):
    float_class = nn.InstanceNorm3d


class QuantGroupNorm(_QuantNormInput, nn.GroupNorm):
    float_class = nn.GroupNorm


for _twin in (
    QuantConv1d,
    QuantConv2d,
    QuantConv3d,
    QuantConvTranspose1d,
    QuantConvTranspose2d,
    QuantConvTranspose3d,
    QuantLinear,
    QuantInstanceNorm1d,
    QuantInstanceNorm2d,
    QuantInstanceNorm3d,
    QuantGroupNorm,
):
    register_quant_module(_twin.float_class, _twin)


def describe_layer(name: str, module: nn.Module) -> LayerInfo | None:
    """A :class:`LayerInfo` for a float layer with a :class:`QuantLayer` twin (conv, conv-transpose, linear, norm),
    else ``None`` (attention blocks included: :func:`mqb.quant.registry.describe` describes every twin)."""
    cls = quant_class(module)
    return cls.describe_float(name, module) if cls is not None and issubclass(cls, QuantLayer) else None
