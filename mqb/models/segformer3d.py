"""SegFormer3D (Perera et al., CVPR-W 2024): a 4-stage Mix-Transformer encoder and an all-MLP decoder, 4.5 M params.

Native re-implementation whose state-dict keys and shapes equal those of the reference implementation
(github OSUPCVLab/SegFormer3D, ``architectures/segformer3d.py``), so its released checkpoints load strictly:
``segformer_encoder.{embed_s, tf_block{s}.{i}, norm{s}}.*`` and
``segformer_decoder.{linear_c{s}, linear_fuse, linear_pred}.*``. The defaults are the published BraTS
configuration (embed dims 32/64/160/256, heads 1/2/5/8, SR ratios 4/2/1/1, depths 2/2/2/2, MLP ratio 4).
4,525,251 parameters with 4 input channels / 3 classes; 4,495,150 with 1 / 14.

Each stage: a strided Conv3d patch embedding + LayerNorm, pre-LN transformer blocks with *efficient* (spatial-
reduction) self-attention -- keys and values come from the token grid shrunk by a Conv3d with kernel = stride =
``sr_ratio`` -- and a Mix-FFN (Linear, depthwise 3x3x3 conv + BatchNorm, GELU, Linear), then a LayerNorm. The
decoder projects each stage with Linear + LayerNorm (named ``bn`` in the keys) to 256 channels, upsamples to
1/4 resolution, fuses with a 1x1x1 conv + BatchNorm + ReLU and predicts with a 1x1x1 conv, then upsamples x4.

The reference reshapes tokens with the cube root of their count, so it only works on cubic inputs
(D = H = W); this module checks that, and that the side is a multiple of the first patch stride (else the x4
upsampled output would not match the input size), and raises ``ValueError`` otherwise.

Attention scale (``attention_scale``): the launch version of the reference (commit 5a149a6, the code the
paper's results and checkpoints were produced with) divides the logits by ``sqrt(num_heads)``; since commit
2859487 (2025-11-29) the reference calls ``F.scaled_dot_product_attention``, which scales by
``1/sqrt(head_dim)``. Both versions have the same keys but give different outputs for the same weights. The
default is ``"num_heads"``, the launch numerics the published checkpoints were trained with; ``"head_dim"``
reproduces the later code. Q·Kᵀ and softmax·V are explicit ``torch.matmul`` calls, so mqb quantizes their
operands through :class:`QuantEfficientSelfAttention` (``recipe.attention=True``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from mqb.quant.attention import QuantAttention
from mqb.quant.registry import register_quant_module

AttentionScale = Literal["num_heads", "head_dim"]
ATTENTION_SCALES: tuple[str, ...] = ("num_heads", "head_dim")

Grid = tuple[int, int, int]


def _tokens_to_grid(x: torch.Tensor, grid: Grid) -> torch.Tensor:
    """(B, N, C) tokens -> (B, C, D, H, W) map; tokens are in the row-major order of ``flatten(2)``."""
    d, h, w = grid
    return rearrange(x, "b (d h w) c -> b c d h w", d=d, h=h, w=w)


def _grid_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, D, H, W) map -> (B, N, C) tokens."""
    return rearrange(x, "b c d h w -> b (d h w) c")


class PatchEmbedding(nn.Module):
    """Overlapping patch embedding: strided Conv3d, flatten to tokens, LayerNorm."""

    def __init__(self, in_channels: int, embed_dim: int, kernel_size: int, stride: int, padding: int) -> None:
        super().__init__()
        self.patch_embeddings = nn.Conv3d(in_channels, embed_dim, kernel_size, stride=stride, padding=padding)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Grid]:
        x = self.patch_embeddings(x)
        grid = (int(x.shape[2]), int(x.shape[3]), int(x.shape[4]))
        return self.norm(_grid_to_tokens(x)), grid


class EfficientSelfAttention(nn.Module):
    """Multi-head self-attention whose keys/values come from a spatially reduced token grid (``sr_ratio`` > 1).

    ``forward(x, grid)`` takes (B, N, C) tokens of a (D, H, W) grid. The two activation products are plain
    ``torch.matmul`` calls so that mqb's attention quantizer sees them.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        sr_ratio: int = 1,
        qkv_bias: bool = True,
        attention_scale: AttentionScale = "num_heads",
        attn_dropout: float = 0.0,
        proj_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"SegFormer3D attention: dim={dim} is not divisible by num_heads={num_heads}")
        if attention_scale not in ATTENTION_SCALES:
            raise ValueError(f"attention_scale={attention_scale!r} is invalid; valid: {', '.join(ATTENTION_SCALES)}")
        self.hidden_size = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.sr_ratio = sr_ratio
        self.attention_scale = attention_scale
        self.scale = 1.0 / math.sqrt(num_heads if attention_scale == "num_heads" else self.head_dim)
        self.query = nn.Linear(dim, dim, bias=qkv_bias)
        self.key_value = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.attn_dropout = nn.Dropout(attn_dropout)
        self.proj = nn.Linear(dim, dim)
        self.proj_dropout = nn.Dropout(proj_dropout)
        if sr_ratio > 1:
            self.sr = nn.Conv3d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.sr_norm = nn.LayerNorm(dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, heads, N, head_dim)."""
        return x.reshape(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        b, n, c = x.shape
        q = self._heads(self.query(x))
        source = x
        if self.sr_ratio > 1:
            source = self.sr_norm(_grid_to_tokens(self.sr(_tokens_to_grid(x, grid))))
        k, v = (self._heads(t) for t in self.key_value(source).chunk(2, dim=-1))
        logits = torch.matmul(q, k.transpose(-2, -1)) * self.scale
        probs = self.attn_dropout(logits.softmax(dim=-1))
        out = torch.matmul(probs, v).transpose(1, 2).reshape(b, n, c)
        return self.proj_dropout(self.proj(out))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, sr_ratio={self.sr_ratio}, attention_scale={self.attention_scale!r}"


@register_quant_module(EfficientSelfAttention)
class QuantEfficientSelfAttention(QuantAttention, EfficientSelfAttention):
    """SegFormer3D efficient self-attention with quantized Q·Kᵀ and softmax·V operands."""

    float_class = EfficientSelfAttention


class DWConv(nn.Module):
    """Depthwise 3x3x3 conv + BatchNorm on the token grid (the positional part of the Mix-FFN)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv3d(dim, dim, 3, padding=1, groups=dim)
        self.bn = nn.BatchNorm3d(dim)

    def forward(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        return _grid_to_tokens(self.bn(self.dwconv(_tokens_to_grid(x, grid))))


class MixFFN(nn.Module):
    """fc1 -> depthwise conv + BN -> GELU -> fc2."""

    def __init__(self, dim: int, mlp_ratio: int) -> None:
        super().__init__()
        hidden = dim * mlp_ratio
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(x), grid)))


class TransformerBlock(nn.Module):
    """Pre-LN block: x + attention(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: int, sr_ratio: int, attention_scale: AttentionScale
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attention = EfficientSelfAttention(dim, num_heads, sr_ratio, True, attention_scale)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MixFFN(dim, mlp_ratio)

    def forward(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        x = x + self.attention(self.norm1(x), grid)
        return x + self.mlp(self.norm2(x), grid)


class MixVisionTransformer(nn.Module):
    """The 4-stage encoder; returns the stage outputs c1..c4 as (B, C_s, D_s, H_s, W_s) maps."""

    def __init__(
        self,
        in_channels: int,
        embed_dims: Sequence[int],
        num_heads: Sequence[int],
        depths: Sequence[int],
        sr_ratios: Sequence[int],
        mlp_ratios: Sequence[int],
        patch_kernel_size: Sequence[int],
        patch_stride: Sequence[int],
        patch_padding: Sequence[int],
        attention_scale: AttentionScale,
    ) -> None:
        super().__init__()
        self.num_stages = len(embed_dims)
        features = in_channels
        for s in range(self.num_stages):
            dim = embed_dims[s]
            embed = PatchEmbedding(features, dim, patch_kernel_size[s], patch_stride[s], patch_padding[s])
            self.add_module(f"embed_{s + 1}", embed)
            features = dim
        for s in range(self.num_stages):  # registered after all embeddings, as in the reference
            blocks = nn.ModuleList(
                TransformerBlock(embed_dims[s], num_heads[s], mlp_ratios[s], sr_ratios[s], attention_scale)
                for _ in range(depths[s])
            )
            self.add_module(f"tf_block{s + 1}", blocks)
            self.add_module(f"norm{s + 1}", nn.LayerNorm(embed_dims[s]))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for s in range(1, self.num_stages + 1):
            tokens, grid = getattr(self, f"embed_{s}")(x)
            for block in getattr(self, f"tf_block{s}"):
                tokens = block(tokens, grid)
            x = _tokens_to_grid(getattr(self, f"norm{s}")(tokens), grid).contiguous()
            outs.append(x)
        return outs


class LinearEmbedding(nn.Module):
    """Decoder projection of one stage: (B, C, D, H, W) -> Linear -> LayerNorm -> (B, E, D, H, W)."""

    def __init__(self, input_dim: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(input_dim, embed_dim)
        self.bn = nn.LayerNorm(embed_dim)  # a LayerNorm named ``bn`` in the reference keys

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = (int(x.shape[2]), int(x.shape[3]), int(x.shape[4]))
        return _tokens_to_grid(self.bn(self.proj(_grid_to_tokens(x))), grid)


class SegFormerDecoderHead(nn.Module):
    """All-MLP decoder: project c4..c1 to ``embed_dim``, upsample to c1, concatenate [c4, c3, c2, c1], fuse, predict."""

    def __init__(
        self, input_dims: Sequence[int], embed_dim: int, num_classes: int, dropout: float, upsample: float
    ) -> None:
        super().__init__()
        self.num_stages = len(input_dims)
        for s in reversed(range(self.num_stages)):  # linear_c4 first, as in the reference
            self.add_module(f"linear_c{s + 1}", LinearEmbedding(input_dims[s], embed_dim))
        self.linear_fuse = nn.Sequential(
            nn.Conv3d(self.num_stages * embed_dim, embed_dim, 1, bias=False),
            nn.BatchNorm3d(embed_dim),
            nn.ReLU(),
        )
        self.dropout = nn.Dropout(dropout)
        self.linear_pred = nn.Conv3d(embed_dim, num_classes, 1)
        self.upsample = upsample

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        size = features[0].shape[2:]
        maps = []
        for s in reversed(range(self.num_stages)):
            y = getattr(self, f"linear_c{s + 1}")(features[s])
            if s > 0:
                y = F.interpolate(y, size=size, mode="trilinear", align_corners=False)
            maps.append(y)
        x = self.linear_pred(self.dropout(self.linear_fuse(torch.cat(maps, dim=1))))
        return F.interpolate(x, scale_factor=self.upsample, mode="trilinear", align_corners=False)


def _ints(name: str, values: Sequence[int], length: int) -> tuple[int, ...]:
    out = tuple(int(v) for v in values)
    if len(out) != length:
        raise ValueError(f"SegFormer3D {name}={list(out)} must have {length} entries (one per stage)")
    return out


class SegFormer3D(nn.Module):
    """SegFormer3D; defaults are the published configuration (BraTS: 4 input channels, 3 classes).

    Args:
        in_channels / out_channels: input modalities and output classes (BTCV: 1 / 14).
        embed_dims, num_heads, depths, sr_ratios, mlp_ratios: per-stage encoder settings.
        patch_kernel_size, patch_stride, patch_padding: per-stage patch-embedding convolutions.
        decoder_head_embedding_dim: channels of the all-MLP decoder.
        decoder_dropout: dropout before the classifier.
        attention_scale: ``"num_heads"`` (logits / sqrt(num_heads), the launch code the published weights were
            trained with; default) or ``"head_dim"`` (logits / sqrt(head_dim), the reference since 2025-11).

    The input must be cubic (D = H = W) with a side divisible by ``patch_stride[0]``; ``ValueError`` otherwise.
    """

    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int = 3,
        embed_dims: Sequence[int] = (32, 64, 160, 256),
        num_heads: Sequence[int] = (1, 2, 5, 8),
        depths: Sequence[int] = (2, 2, 2, 2),
        sr_ratios: Sequence[int] = (4, 2, 1, 1),
        mlp_ratios: Sequence[int] = (4, 4, 4, 4),
        patch_kernel_size: Sequence[int] = (7, 3, 3, 3),
        patch_stride: Sequence[int] = (4, 2, 2, 2),
        patch_padding: Sequence[int] = (3, 1, 1, 1),
        decoder_head_embedding_dim: int = 256,
        decoder_dropout: float = 0.0,
        attention_scale: AttentionScale = "num_heads",
    ) -> None:
        super().__init__()
        stages = len(embed_dims)
        embed_dims = _ints("embed_dims", embed_dims, stages)
        lists = {
            name: _ints(name, values, stages)
            for name, values in (
                ("num_heads", num_heads),
                ("depths", depths),
                ("sr_ratios", sr_ratios),
                ("mlp_ratios", mlp_ratios),
                ("patch_kernel_size", patch_kernel_size),
                ("patch_stride", patch_stride),
                ("patch_padding", patch_padding),
            )
        }
        if attention_scale not in ATTENTION_SCALES:
            raise ValueError(
                f"SegFormer3D attention_scale={attention_scale!r} is invalid; valid: {', '.join(ATTENTION_SCALES)}"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.attention_scale = attention_scale
        self.input_multiple = lists["patch_stride"][0]
        self.segformer_encoder = MixVisionTransformer(in_channels, embed_dims, attention_scale=attention_scale, **lists)
        self.segformer_decoder = SegFormerDecoderHead(
            embed_dims, decoder_head_embedding_dim, out_channels, decoder_dropout, float(self.input_multiple)
        )
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5:
            raise ValueError(f"SegFormer3D expects a (B, C, D, H, W) input, got shape {tuple(x.shape)}")
        d, h, w = x.shape[2:]
        if not d == h == w:
            raise ValueError(
                f"SegFormer3D needs a cubic input (D = H = W; its token grids are reshaped as cubes), got "
                f"{d}x{h}x{w}; use a cubic window, e.g. dataset.roi_size=[96,96,96]"
            )
        if d % self.input_multiple:
            raise ValueError(
                f"SegFormer3D input side {d} must be a multiple of the first patch stride {self.input_multiple} "
                "(the decoder upsamples the 1/4-resolution map back by that factor)"
            )
        return self.segformer_decoder(self.segformer_encoder(x))


def _init_weights(m: nn.Module) -> None:
    """The reference initialisation: truncated-normal Linear, unit norms, fan-out normal convolutions."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.LayerNorm, nn.BatchNorm3d)):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv3d):
        fan_out = math.prod(m.kernel_size) * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)
