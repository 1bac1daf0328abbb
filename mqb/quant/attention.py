"""Quantization points inside attention: the activation-activation matmuls Q·Kᵀ and softmax(·)·V.

Module hooks cannot reach these products (they are functional calls inside ``forward``), so a quantized
attention block runs its original ``forward`` under a :class:`torch.overrides.TorchFunctionMode` that
intercepts ``matmul`` / ``@`` / ``bmm`` / two-operand ``einsum`` / ``scaled_dot_product_attention`` and
fake-quantizes both operands. The projections (qkv, out) are ordinary ``nn.Linear`` layers and are quantized
as such.

Operand scales: per-tensor (static, calibrated, or dynamic) when the activation spec is per-tensor;
otherwise one dynamic scale per row/column along the contraction axis ("per-token" on both operands), which
maps onto an integer batched GEMM with row and column scales. Block formats use blocks along the contraction
axis. The ``k``-th product of a forward pass uses quantizers ``mm{k}_a`` and ``mm{k}_b``.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from monai.networks.blocks.selfattention import SABlock
from monai.networks.nets.swin_unetr import WindowAttention
from torch import nn
from torch.overrides import TorchFunctionMode

from mqb.quant.layers import LayerInfo
from mqb.quant.quantizer import TensorQuantizer
from mqb.quant.registry import QuantModule, register_quant_module
from mqb.quant.spec import QuantSpec

_MATMULS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm}


def _is_activation(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter)


def _einsum_contracted_axes(equation: str) -> tuple[int, int] | None:
    """Axis of the single contracted index in each operand of ``'ab..,ab..->..'``; ``None`` if not that form."""
    eq = equation.replace(" ", "")
    if "->" not in eq or "..." in eq:
        return None
    inputs, output = eq.split("->")
    operands = inputs.split(",")
    if len(operands) != 2:
        return None
    a, b = operands
    contracted = [c for c in a if c in b and c not in output]
    if len(contracted) != 1:
        return None
    return a.index(contracted[0]), b.index(contracted[0])


class _OperandQuantMode(TorchFunctionMode):
    def __init__(self, layer: QuantAttention) -> None:
        super().__init__()
        self.layer = layer
        self.count = 0

    def _pair(self, a: torch.Tensor, axis_a: int, b: torch.Tensor, axis_b: int) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.count
        self.count += 1
        return self.layer.quantize_operand(f"mm{k}_a", a, axis_a), self.layer.quantize_operand(f"mm{k}_b", b, axis_b)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _MATMULS and len(args) >= 2 and _is_activation(args[0]) and _is_activation(args[1]):
            a, b = args[0], args[1]
            if a.ndim >= 2 and b.ndim >= 2:
                a, b = self._pair(a, -1, b, -2)
                return func(a, b, *args[2:], **kwargs)
        elif func is torch.einsum and args and isinstance(args[0], str):
            operands = list(args[1:])
            if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
                operands = list(operands[0])
            axes = _einsum_contracted_axes(args[0])
            if axes is not None and len(operands) == 2 and all(_is_activation(t) for t in operands):
                a, b = self._pair(operands[0], axes[0], operands[1], axes[1])
                return func(args[0], a, b, **kwargs)
        elif func is F.scaled_dot_product_attention:
            return self._sdpa(*args, **kwargs)
        return func(*args, **kwargs)

    def _sdpa(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> torch.Tensor:
        """scaled_dot_product_attention written out so both products can be quantized (same semantics)."""
        if enable_gqa and key.shape[-3] != query.shape[-3]:
            repeat = query.shape[-3] // key.shape[-3]
            key, value = key.repeat_interleave(repeat, dim=-3), value.repeat_interleave(repeat, dim=-3)
        scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
        q, k = self._pair(query, -1, key, -1)
        scores = torch.matmul(q, k.transpose(-2, -1)) * scale
        length_q, length_k = scores.shape[-2], scores.shape[-1]
        if is_causal:
            keep = torch.ones(length_q, length_k, dtype=torch.bool, device=scores.device).tril()
            scores = scores.masked_fill(~keep, float("-inf"))
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                scores = scores.masked_fill(~attn_mask, float("-inf"))
            else:
                scores = scores + attn_mask
        probs = torch.softmax(scores, dim=-1)
        if dropout_p > 0:
            probs = F.dropout(probs, p=dropout_p)
        p, v = self._pair(probs, -1, value, -2)
        return torch.matmul(p, v)


class QuantAttention(QuantModule):
    """Mixin of quantized attention blocks: runs the float ``forward`` with operand quantization.

    A model's own attention block gets a twin ``class QuantMine(QuantAttention, Mine)`` registered with
    :func:`mqb.quant.register_quant_module` (``@register_quant_module(Mine)``).
    """

    kind: ClassVar[str] = "attention"
    operand_spec: QuantSpec
    operand_quantizers: nn.ModuleDict
    #: the kernel of the operand quantizers, also of those made at the first forward (:func:`mqb.quant.set_kernel`)
    kernel: str = "auto"

    @classmethod
    def describe_float(cls, name: str, module: nn.Module) -> LayerInfo:
        hidden = int(getattr(module, "hidden_size", 0) or getattr(module, "dim", 0) or 0)
        heads = int(getattr(module, "num_heads", 1) or 1)
        return LayerInfo(name, "attention", type(module).__name__, (), hidden, hidden, heads)

    def attach_quantizers(self, weight: QuantSpec | None, activation: QuantSpec | None) -> None:
        if activation is None:
            raise ValueError(f"{self.mqb_info.name}: attention quantization needs an activation spec (got None)")
        if activation.granularity == "per_tensor" or activation.is_block_format:
            spec = activation
        else:
            spec = activation.replace(granularity="per_token")
        self.operand_spec = spec
        self.operand_quantizers = nn.ModuleDict()
        self._calibrating = False

    def detach_quantizers(self) -> None:
        self._modules.pop("operand_quantizers", None)
        for attr in ("operand_spec", "_calibrating", "kernel"):
            self.__dict__.pop(attr, None)

    @property
    def activation_spec(self) -> QuantSpec | None:
        return self.operand_spec

    def set_calibrating(self, flag: bool) -> None:
        self._calibrating = flag

    def set_kernel(self, kernel: str) -> bool:
        self.kernel = kernel  # for the operand quantizers made at the first forward; the others are set directly
        return True

    def quantize_operand(self, key: str, x: torch.Tensor, contraction_axis: int) -> torch.Tensor:
        quantizer = self.operand_quantizers[key] if key in self.operand_quantizers else None
        if quantizer is None:
            axis = -1 if self.operand_spec.granularity == "per_group" else None
            quantizer = TensorQuantizer(self.operand_spec, axis, f"{self.mqb_info.name}.{key}", device=x.device)
            quantizer.kernel = self.kernel
            if self._calibrating:
                quantizer.begin_calibration()
            self.operand_quantizers[key] = quantizer
        if self.operand_spec.granularity == "per_tensor":
            return quantizer(x)
        return quantizer(x.movedim(contraction_axis, -1)).movedim(-1, contraction_axis)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with _OperandQuantMode(self):
            return super().forward(*args, **kwargs)


class QuantSABlock(QuantAttention, SABlock):
    """MONAI ``SABlock`` (UNETR, ViT) with quantized Q·Kᵀ and softmax·V."""

    float_class = SABlock


class QuantWindowAttention(QuantAttention, WindowAttention):
    """MONAI ``WindowAttention`` (SwinUNETR) with quantized Q·Kᵀ and softmax·V."""

    float_class = WindowAttention


for _twin in (QuantSABlock, QuantWindowAttention):
    register_quant_module(_twin.float_class, _twin)


def register_attention(quant_cls: type[QuantAttention]) -> type[QuantAttention]:
    """Class decorator registering a quantized attention twin (``float_class`` set on the class).

    Kept for existing code; the one registration is :func:`mqb.quant.register_quant_module`.
    """
    register_quant_module(quant_cls.float_class, quant_cls)
    return quant_cls
