"""MedPTQ ``TransUNet3D``: the "TransUNet" of MedPTQ / MedQuanBench Table 5 (91,590,094 parameters).

A native re-implementation from the architecture facts of hrlblab/PTQ ``networks/transunet.py`` (no code taken)
whose state-dict keys and shapes equal the reference's, so its checkpoints load strictly. It is not the
nnU-Net-based 3D TransUNet of Chen et al.; it is a plain CNN encoder with a ViT bottleneck:

* encoder ``conv1``..``conv5``: [Conv3x3x3 (bias) -> BatchNorm -> ReLU] x 2, the first conv of conv2..conv5 with
  stride 2; channels base x (1, 2, 4, 8, 16); keys ``conv{i}.conv.{0,1,3,4}.*``;
* ``embed_conv`` (1x1x1, 16·base -> embed_dim), flattened to (img_size/16)³ tokens in sequence-first layout
  (N, B, C), plus ``position_embeddings`` [1, N, embed_dim];
* ``transformer_blocks.{i}``: post-LN blocks, x = norm1(x + self_attn(x)); x = norm2(x + linear2(GELU(linear1(x))));
* decoder ``upconv{4..1}.up`` (ConvTranspose 2x2x2 s2) -> concatenate (upsampled, skip) -> ``dec{4..1}`` ConvBlock
  -> ``final_conv`` (1x1x1).

The trained configuration (MedPTQ ``train.py``: img_size 96, base_channels 16, embed_dim 768, mlp_dim 3072,
12 heads, 12 layers, dropout 0.1) is the default here (the reference class defaults differ and were not trained).

The reference uses ``nn.MultiheadAttention``, whose packed ``in_proj_weight`` is a bare parameter and whose
matmuls run inside a fused function, out of reach of a layer quantizer. :class:`MultiheadSelfAttention` computes
the same function with real ``nn.Linear`` projections (``in_proj``: embed -> 3·embed, ``out_proj``) and explicit
Q·Kᵀ / softmax·V matmuls, so mqb quantizes the projections as linear layers and the products through
:class:`QuantMultiheadSelfAttention`. State-dict hooks keep the reference key names
(``self_attn.in_proj_weight`` / ``self_attn.in_proj_bias`` / ``self_attn.out_proj.*``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mqb.quant.attention import QuantAttention
from mqb.quant.registry import register_quant_module

#: Native (module) parameter name -> reference (``nn.MultiheadAttention``) state-dict name.
_PACKED_NAMES = {"in_proj.weight": "in_proj_weight", "in_proj.bias": "in_proj_bias"}


def _rename_keys(state_dict: dict[str, Any], prefix: str, names: Mapping[str, str]) -> None:
    """Rename ``prefix + old`` to ``prefix + new`` in place, keeping the order of the keys under ``prefix``."""
    if not any(prefix + old in state_dict for old in names):
        return
    ours = [k for k in list(state_dict) if k.startswith(prefix)]
    items = [(k, state_dict.pop(k)) for k in ours]
    for key, value in items:
        rest = key[len(prefix) :]
        state_dict[prefix + names.get(rest, rest)] = value


def _save_packed_names(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    _rename_keys(state_dict, prefix, _PACKED_NAMES)


def _load_packed_names(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    _rename_keys(state_dict, prefix, {new: old for old, new in _PACKED_NAMES.items()})


class MultiheadSelfAttention(nn.Module):
    """Self-attention equal to ``nn.MultiheadAttention(embed_dim, num_heads, dropout, batch_first=False)(x, x, x)[0]``.

    Input and output are sequence-first (N, B, C). ``in_proj`` and ``out_proj`` are ``nn.Linear`` layers; the
    state dict uses ``nn.MultiheadAttention``'s names (``in_proj_weight``, ``in_proj_bias``, ``out_proj.*``),
    and loading accepts both spellings.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"TransUNet3D: embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
        self.hidden_size = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.in_proj = nn.Linear(embed_dim, 3 * embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        # nn.MultiheadAttention's initialisation: Xavier-uniform packed projection, zero biases.
        nn.init.xavier_uniform_(self.in_proj.weight)
        nn.init.zeros_(self.in_proj.bias)
        nn.init.zeros_(self.out_proj.bias)
        self.register_state_dict_post_hook(_save_packed_names)
        self.register_load_state_dict_pre_hook(_load_packed_names)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """(N, B, C) -> (B·heads, N, head_dim), the head layout of ``nn.MultiheadAttention``."""
        n, b, _ = x.shape
        return x.reshape(n, b * self.num_heads, self.head_dim).transpose(0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, b, c = x.shape
        q, k, v = (self._heads(t) for t in self.in_proj(x).chunk(3, dim=-1))
        q = q * (1.0 / math.sqrt(self.head_dim))
        probs = torch.matmul(q, k.transpose(-2, -1)).softmax(dim=-1)
        probs = F.dropout(probs, p=self.dropout, training=self.training)
        out = torch.matmul(probs, v).transpose(0, 1).reshape(n, b, c)
        return self.out_proj(out)

    def extra_repr(self) -> str:
        return f"embed_dim={self.hidden_size}, num_heads={self.num_heads}, dropout={self.dropout}"


@register_quant_module(MultiheadSelfAttention)
class QuantMultiheadSelfAttention(QuantAttention, MultiheadSelfAttention):
    """TransUNet3D self-attention with quantized Q·Kᵀ and softmax·V operands."""

    float_class = MultiheadSelfAttention


class TransformerBlock(nn.Module):
    """Post-LN encoder block (the layout of ``nn.TransformerEncoderLayer`` with GELU, no FFN dropout)."""

    def __init__(self, embed_dim: int, num_heads: int, mlp_dim: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = MultiheadSelfAttention(embed_dim, num_heads, dropout)
        self.norm1 = nn.LayerNorm(embed_dim)
        self.dropout1 = nn.Dropout(dropout)
        self.linear1 = nn.Linear(embed_dim, mlp_dim)
        self.activation = nn.GELU()
        self.linear2 = nn.Linear(mlp_dim, embed_dim)
        self.norm2 = nn.LayerNorm(embed_dim)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.dropout1(self.self_attn(x)))
        return self.norm2(x + self.dropout2(self.linear2(self.activation(self.linear1(x)))))


class ConvBlock(nn.Module):
    """[Conv3x3x3 (bias) -> BatchNorm -> ReLU] x 2; the first conv has ``stride``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=1),
            nn.BatchNorm3d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv3d(out_channels, out_channels, 3, padding=1),
            nn.BatchNorm3d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class UpConv(nn.Module):
    """ConvTranspose3d with kernel = stride = ``scale``."""

    def __init__(self, in_channels: int, out_channels: int, scale: int = 2) -> None:
        super().__init__()
        self.up = nn.ConvTranspose3d(in_channels, out_channels, scale, stride=scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(x)


def _img_size(img_size: int | Sequence[int]) -> tuple[int, int, int]:
    size = (int(img_size),) * 3 if isinstance(img_size, int) else tuple(int(s) for s in img_size)
    if len(size) != 3 or any(s <= 0 or s % 16 for s in size):
        raise ValueError(f"TransUNet3D img_size={list(size)} must be 3 positive multiples of 16 (4 stride-2 stages)")
    return size  # type: ignore[return-value]


class TransUNet3D(nn.Module):
    """MedPTQ TransUNet3D; the defaults are the trained MedPTQ configuration (BTCV: 1 input channel, 14 classes).

    Args:
        img_size: the training window; fixes the token grid (img_size / 16) and ``position_embeddings``. Inputs
            must have this spatial size (``ValueError`` otherwise).
        in_channels / out_channels: input channels and output classes (``num_classes`` in the reference).
        base_channels: channels of the first encoder stage (doubled at each of the 4 downsamplings).
        embed_dim, mlp_dim, num_heads, num_layers: the ViT bottleneck.
        dropout: attention, residual dropout (identity in eval).
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = (96, 96, 96),
        in_channels: int = 1,
        out_channels: int = 14,
        base_channels: int = 16,
        embed_dim: int = 768,
        mlp_dim: int = 3072,
        num_heads: int = 12,
        num_layers: int = 12,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.img_size = _img_size(img_size)
        self.grid = tuple(s // 16 for s in self.img_size)
        self.in_channels = in_channels
        self.out_channels = out_channels
        ch = [base_channels * 2**i for i in range(5)]
        self.conv1 = ConvBlock(in_channels, ch[0])
        self.conv2 = ConvBlock(ch[0], ch[1], stride=2)
        self.conv3 = ConvBlock(ch[1], ch[2], stride=2)
        self.conv4 = ConvBlock(ch[2], ch[3], stride=2)
        self.conv5 = ConvBlock(ch[3], ch[4], stride=2)
        self.embed_conv = nn.Conv3d(ch[4], embed_dim, 1)
        self.position_embeddings = nn.Parameter(torch.zeros(1, math.prod(self.grid), embed_dim))
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(embed_dim, num_heads, mlp_dim, dropout) for _ in range(num_layers)
        )
        self.upconv4 = UpConv(embed_dim, ch[3])
        self.dec4 = ConvBlock(2 * ch[3], ch[3])
        self.upconv3 = UpConv(ch[3], ch[2])
        self.dec3 = ConvBlock(2 * ch[2], ch[2])
        self.upconv2 = UpConv(ch[2], ch[1])
        self.dec2 = ConvBlock(2 * ch[1], ch[1])
        self.upconv1 = UpConv(ch[1], ch[0])
        self.dec1 = ConvBlock(2 * ch[0], ch[0])
        self.final_conv = nn.Conv3d(ch[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or tuple(x.shape[2:]) != self.img_size:
            raise ValueError(
                f"TransUNet3D was built for img_size={list(self.img_size)} (its position embeddings fix the token "
                f"grid); got input shape {tuple(x.shape)}; use that window size (dataset.roi_size)"
            )
        c1 = self.conv1(x)
        c2 = self.conv2(c1)
        c3 = self.conv3(c2)
        c4 = self.conv4(c3)
        e = self.embed_conv(self.conv5(c4))
        b, c = e.shape[:2]
        tokens = e.flatten(2).permute(2, 0, 1) + self.position_embeddings.transpose(0, 1)  # (N, B, C)
        for block in self.transformer_blocks:
            tokens = block(tokens)
        y = tokens.permute(1, 2, 0).reshape(b, c, *e.shape[2:])
        y = self.dec4(torch.cat((self.upconv4(y), c4), dim=1))
        y = self.dec3(torch.cat((self.upconv3(y), c3), dim=1))
        y = self.dec2(torch.cat((self.upconv2(y), c2), dim=1))
        y = self.dec1(torch.cat((self.upconv1(y), c1), dim=1))
        return self.final_conv(y)
