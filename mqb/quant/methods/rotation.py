"""QuaRot-like rotation (Ashkboos et al. 2024): an orthogonal block-Hadamard mix of the input channels."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from scipy.linalg import hadamard
from torch import nn

from mqb.quant.layers import QuantLayer
from mqb.quant.methods.base import InputRanges, PTQMethod, input_channel_axis


def block_hadamard(channels: int, block: int = 32) -> torch.Tensor:
    """``I_{C/b} ⊗ H_b / √b``: orthonormal, with ``b`` the largest power of two ≤ ``block`` that divides ``C``.

    The paper uses a Hadamard of order 32 (the input width of its sensitive layer); for other widths the
    rotation is block-diagonal (b = 1, the identity, when C is odd).
    """
    if block < 1 or block & (block - 1):
        raise ValueError(f"Hadamard block must be a power of two, got {block}")
    b = block
    while channels % b:
        b //= 2
    h = torch.from_numpy(hadamard(b)).double() / math.sqrt(b)
    return torch.block_diag(*[h] * (channels // b))


class ChannelRotation(nn.Module):
    """``x ↦ Hᵀ x`` along the channel axis (the activation side of the rotation)."""

    def __init__(self, h: torch.Tensor, channel_axis: int) -> None:
        super().__init__()
        self.register_buffer("h", h)
        self.channel_axis = channel_axis

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        moved = x.movedim(self.channel_axis, -1)
        return (moved @ self.h.to(x.dtype)).movedim(-1, self.channel_axis)


class HadamardRotation(PTQMethod):
    """Rotate a layer's input channels by ``H`` (block Hadamard of order ``block``; paper: 32) and fold ``H``
    into the weight: ``op(Hᵀx, W H) = op(x, W)`` because ``H Hᵀ = I``.

    Needs channel mixing across the whole input, so grouped and depthwise convolutions are skipped.
    """

    name = "rotation"

    def __init__(self, block: int = 32, layers: Sequence[str] | str = ("all",)) -> None:
        super().__init__(layers)
        block_hadamard(1, block)  # validates
        self.block = block

    def skip_reason(self, layer: QuantLayer) -> str | None:
        if layer.mqb_info.groups > 1:
            return "grouped/depthwise convolution: a channel rotation would mix groups"
        if layer.input_transform is not None:
            return "already has an input transform"
        if layer.mqb_info.in_channels % 2:
            return f"odd input width {layer.mqb_info.in_channels}: only the identity rotation fits"
        return None

    def apply_to_layer(self, name: str, layer: QuantLayer, ranges: InputRanges | None) -> None:
        w = layer.weight.detach()
        h = block_hadamard(layer.mqb_info.in_channels, self.block).to(w.device)
        if layer.kind == "linear":  # (out, in): W H
            rotated = (w.double() @ h).to(w.dtype)
        elif layer.kind == "conv_transpose":  # (in, out/g, *k): Hᵀ along the input axis
            rotated = torch.tensordot(h.t(), w.double(), dims=([1], [0])).to(w.dtype)
        else:  # (out, in, *k): W H along the input axis
            rotated = torch.tensordot(w.double(), h, dims=([1], [0])).movedim(-1, 1).to(w.dtype)
        layer.rewrite_weight(rotated, self.name)
        layer.input_transform = ChannelRotation(h.to(w.dtype), input_channel_axis(layer))

    def __repr__(self) -> str:
        return f"HadamardRotation(block={self.block}, layers={list(self.layers)})"
