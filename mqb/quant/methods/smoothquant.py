"""SmoothQuant (Xiao et al. 2023): migrate activation range into the weights, per input channel."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mqb.quant.layers import QuantLayer
from mqb.quant.methods.base import (
    InputRanges,
    PTQMethod,
    input_channel_axis,
    scale_input_channels,
    weight_absmax_per_input_channel,
)


def smoothing_factors(
    act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float = 0.5, eps: float = 1e-5
) -> torch.Tensor:
    """SmoothQuant eq. 4: ``s_j = max|X_j|^α / max|W_j|^(1-α)`` per input channel ``j``.

    ``X / s`` and ``W · s`` leave ``X W`` unchanged. Channels that never fire (``max|X_j| = 0``) or have no
    weight get ``s_j = 1``; both maxima are clamped at ``eps`` so ``s`` is finite and positive.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"SmoothQuant alpha must be in [0, 1], got {alpha}")
    a = act_absmax.float().clamp(min=eps)
    w = weight_absmax.float().clamp(min=eps)
    s = a.pow(alpha) / w.pow(1.0 - alpha)
    dead = (act_absmax <= 0) | (weight_absmax <= 0)
    return torch.where(dead, torch.ones_like(s), s)


class ChannelScale(nn.Module):
    """``x / s`` along the channel axis (the activation side of smoothing)."""

    def __init__(self, s: torch.Tensor, channel_axis: int) -> None:
        super().__init__()
        self.register_buffer("s", s)
        self.channel_axis = channel_axis

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1] * x.dim()
        shape[self.channel_axis] = -1
        return x / self.s.view(shape).to(x.dtype)


class SmoothQuant(PTQMethod):
    """Per-input-channel smoothing with strength ``alpha`` (the paper: α = 0.5).

    Works on Conv (k > 1 included: ``max|W_j|`` runs over output channels and kernel offsets), grouped and
    depthwise convs, ConvTranspose and Linear. In a deployed graph ``1/s`` folds into the producer (a norm or
    the previous layer); here it is an explicit channel scale before the input quantizer.
    """

    name = "smoothquant"
    needs_input_ranges = True

    def __init__(self, alpha: float = 0.5, layers: Sequence[str] | str = ("all",)) -> None:
        super().__init__(layers)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"SmoothQuant alpha must be in [0, 1], got {alpha}")
        self.alpha = alpha

    def skip_reason(self, layer: QuantLayer) -> str | None:
        if layer.input_transform is not None:
            return "already has an input transform"
        return None

    def apply_to_layer(self, name: str, layer: QuantLayer, ranges: InputRanges | None) -> None:
        assert ranges is not None
        r = ranges[name]
        act_absmax = torch.maximum(r["lo"].abs(), r["hi"].abs()).to(layer.weight.device)
        weight_absmax = weight_absmax_per_input_channel(layer.weight, layer.kind, layer.mqb_info.groups)
        s = smoothing_factors(act_absmax, weight_absmax, self.alpha).to(layer.weight.dtype)
        layer.rewrite_weight(scale_input_channels(layer, layer.weight.detach(), s), self.name)
        layer.input_transform = ChannelScale(s, input_channel_axis(layer))

    def __repr__(self) -> str:
        return f"SmoothQuant(alpha={self.alpha}, layers={list(self.layers)})"
