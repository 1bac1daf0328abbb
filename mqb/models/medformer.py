"""MedFormer 3D (Gao et al. 2022): a conv stem, then stages of bidirectional multi-head attention (B-MHA).

Re-implemented from the facts of the reference code (github yhygao/CBIM-Medical-Image-Segmentation @ 7c26979,
``model/dim3/medformer.py`` and its helpers) with the same module names, so its state dicts load strictly;
the defaults are the BTCV configuration (``config/bcv/medformer_3d.yaml``: 36,669,180 parameters with the
auxiliary head, 300 state-dict entries, no buffers).

Layout (``chan_num`` = c0..c7, ``kernel_sizes`` = k0..k4, ``scales`` = s0..s3):

* ``inc``: Conv k0 (in -> base, no bias), then a pre-activation ``BasicBlock``;
* ``down1``..``down4``: ``PatchMerging`` (space-to-depth by scale s, IN, depthwise-separable conv), then
  ``conv_num`` BasicBlocks, then (down2..4) ``SemanticMapGeneration`` -> a map of ``prod(map_size)`` tokens,
  then ``trans_num`` B-MHA blocks that update the features and the map together;
* ``map_fusion``: the three maps are projected to ``fusion_dim``, concatenated into one token sequence, run
  through a pre-LN transformer and projected back;
* ``up1``..``up4``: trilinear upsampling (align_corners) to the skip size, concat with the skip, (up1/up2)
  ``map_reduction`` of [previous map, fused encoder map] and B-MHA blocks, (up3/up4) BasicBlocks;
* ``aux_out`` (1x1x1 conv on the up2 output, only with ``aux_loss``) and ``outc`` (1x1x1 conv).

B-MHA (per block): q and v come from a depthwise-separable conv of the normalised features and from a 1x1x1
conv of the normalised map (no key projection); logits = q_feat · q_mapᵀ / sqrt(dim_head) of shape
[B, heads, N_feat, N_map]; feat_out = softmax_map(logits) · v_map and map_out = softmax_feat(logits)ᵀ · v_feat.
The heads split the channels as ``c = d * heads + h`` (d: position within the head), as in the reference.

Normalisation: every ``InstanceNorm3d`` is affine-free; those inside conv units use eps 1e-4, the
patch-merging and B-MHA pre-norms the PyTorch default 1e-5 (as in the reference).

Quantization: the activation-activation products (the B-MHA einsums, the fusion transformer's attention and
the semantic-map pooling einsum: 61 products in the BTCV model) run inside modules registered with
:func:`mqb.quant.register_quant_module`, so ``QuantRecipe(attention=True)`` fake-quantizes them.

Redesign (MedQuanBench sec. 4.3): ``replace_with_pointwise`` names (or globs) 1x3x3 convs that are rebuilt as
1x1x1 convs with padding 0 (same channels, groups and bias), e.g. ``["inc.conv2.conv1.conv"]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fnmatch import fnmatchcase

import torch
import torch.nn.functional as F
from torch import nn

from mqb.quant.attention import QuantAttention
from mqb.quant.registry import register_quant_module

Triple = tuple[int, int, int]

#: Activation of the conv units (the reference's ``act`` argument; BTCV uses relu).
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU}
#: eps of the InstanceNorm inside every conv unit (``ConvNormAct``); the other norms use PyTorch's 1e-5.
CONV_NORM_EPS = 1e-4


def _triple(values: Sequence[int] | int, what: str) -> Triple:
    """Three ints from a sequence of length 3 (or one int repeated)."""
    if isinstance(values, int):
        return (values, values, values)
    out = tuple(int(v) for v in values)
    if len(out) != 3:
        raise ValueError(f"MedFormer {what}={list(out)} must have 3 entries (D, H, W)")
    return out  # type: ignore[return-value]


def _same_padding(kernel: Triple) -> Triple:
    """Padding k // 2 per axis: keeps the spatial size for odd kernels."""
    return (kernel[0] // 2, kernel[1] // 2, kernel[2] // 2)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, C, *spatial) -> (B, heads, N, C // heads), channel ``c = d * heads + h`` (N = prod(spatial))."""
    b, c = x.shape[:2]
    return x.reshape(b, c // heads, heads, -1).permute(0, 2, 3, 1)


def merge_heads(x: torch.Tensor, spatial: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`split_heads`: (B, heads, N, d) -> (B, d * heads, *spatial)."""
    b = x.shape[0]
    return x.permute(0, 3, 1, 2).reshape(b, -1, *spatial)


class ConvNormAct(nn.Module):
    """Pre-activation conv unit: InstanceNorm(in, eps 1e-4, no affine) -> activation -> Conv3d (no bias)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: Triple,
        act: type[nn.Module] | None,
        groups: int = 1,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv3d(
            in_channels, out_channels, kernel, padding=_same_padding(kernel), groups=groups, bias=False
        )
        self.norm = nn.InstanceNorm3d(in_channels, eps=CONV_NORM_EPS)
        self.act = act() if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.act(self.norm(x)))


class BasicBlock(nn.Module):
    """Pre-activation residual block: conv2(conv1(x)) + shortcut(x).

    ``shortcut`` is a :class:`ConvNormAct` with the same kernel (not 1x1x1) when the channels change,
    otherwise the identity.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: Triple, act: type[nn.Module]) -> None:
        super().__init__()
        self.conv1 = ConvNormAct(in_channels, out_channels, kernel, act)
        self.conv2 = ConvNormAct(out_channels, out_channels, kernel, act)
        self.shortcut: nn.Module = (
            ConvNormAct(in_channels, out_channels, kernel, act) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x)) + self.shortcut(x)


class DepthwiseSeparableConv(nn.Module):
    """Depthwise conv (groups = in, same padding) then a pointwise 1x1x1 conv; both without bias."""

    def __init__(self, in_channels: int, out_channels: int, kernel: Triple) -> None:
        super().__init__()
        self.depthwise = nn.Conv3d(
            in_channels, in_channels, kernel, padding=_same_padding(kernel), groups=in_channels, bias=False
        )
        self.pointwise = nn.Conv3d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


class SEBlock(nn.Module):
    """Squeeze-excitation: x * sigmoid(conv(relu(conv(avgpool(x))))), hidden width C // ratio, convs with bias."""

    def __init__(self, channels: int, ratio: int = 4) -> None:
        super().__init__()
        self.squeeze = nn.AdaptiveAvgPool3d(1)
        self.excitation = nn.Sequential(
            nn.Conv3d(channels, channels // ratio, 1),
            nn.ReLU(),
            nn.Conv3d(channels // ratio, channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.excitation(self.squeeze(x))


class MBConv(nn.Module):
    """Inverted residual (the B-MHA feed-forward): x + pointwise(se(depthwise(expand_proj(x)))).

    expand_proj: pre-act 1x1x1 C -> expansion·C (identity if expansion == 1); depthwise: pre-act k×k×k with
    groups = expansion·C; se: :class:`SEBlock` (ratio 4); pointwise: IN -> 1x1x1 back to C, no activation.
    """

    def __init__(self, channels: int, expansion: int, kernel: Triple, act: type[nn.Module]) -> None:
        super().__init__()
        expanded = expansion * channels
        self.expand_proj: nn.Module = (
            nn.Identity() if expansion == 1 else ConvNormAct(channels, expanded, (1, 1, 1), act)
        )
        self.depthwise = ConvNormAct(expanded, expanded, kernel, act, groups=expanded)
        self.se = SEBlock(expanded)
        self.pointwise = ConvNormAct(expanded, channels, (1, 1, 1), None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pointwise(self.se(self.depthwise(self.expand_proj(x))))


class BidirectionAttention(nn.Module):
    """Bidirectional attention between N_feat voxels and N_map semantic-map tokens (no key projection).

    Inputs: features (B, feat_dim, D, H, W) and map (B, map_dim, *map_size). With inner = heads · dim_head:
    ``feat_qv`` (depthwise-separable, stage kernel) and ``map_qv`` (1x1x1) give 2·inner channels each, split
    into q and v. logits = einsum('bhid,bhjd->bhij', q_feat, q_map) · dim_head^-0.5; feat_out =
    softmax(logits, -1) · v_map -> ``feat_out`` conv (-> out_dim); map_out = softmax(logits, -2)ᵀ · v_feat ->
    ``map_out`` 1x1x1 conv (-> map_dim), or the identity with ``project_map=False``.

    ``dim`` (= inner) and ``num_heads`` describe the block to :mod:`mqb.quant`.
    """

    def __init__(
        self,
        feat_dim: int,
        map_dim: int,
        out_dim: int,
        num_heads: int,
        dim_head: int,
        kernel: Triple,
        project_map: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        inner = num_heads * dim_head
        self.feat_dim, self.map_dim, self.out_dim = feat_dim, map_dim, out_dim
        self.num_heads, self.dim_head, self.dim = num_heads, dim_head, inner
        self.scale = dim_head**-0.5
        self.feat_qv = DepthwiseSeparableConv(feat_dim, 2 * inner, kernel)
        self.feat_out = DepthwiseSeparableConv(inner, out_dim, kernel)
        self.map_qv = nn.Conv3d(map_dim, 2 * inner, 1, bias=False)
        self.map_out: nn.Module = nn.Conv3d(inner, map_dim, 1, bias=False) if project_map else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, feat: torch.Tensor, semantic_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feat_q, feat_v = (split_heads(t, self.num_heads) for t in self.feat_qv(feat).chunk(2, dim=1))
        map_q, map_v = (split_heads(t, self.num_heads) for t in self.map_qv(semantic_map).chunk(2, dim=1))
        logits = torch.einsum("bhid,bhjd->bhij", feat_q, map_q) * self.scale
        feat_attn = torch.softmax(logits, dim=-1)  # each voxel over the map tokens
        map_attn = self.attn_drop(torch.softmax(logits, dim=-2))  # each map token over the voxels
        feat_out = merge_heads(torch.einsum("bhij,bhjd->bhid", feat_attn, map_v), feat.shape[2:])
        map_out = merge_heads(torch.einsum("bhji,bhjd->bhid", map_attn, feat_v), semantic_map.shape[2:])
        return self.proj_drop(self.feat_out(feat_out)), self.map_out(map_out)


class BidirectionAttentionBlock(nn.Module):
    """One B-MHA block: attention on IN-normalised inputs, residuals, then the :class:`MBConv` feed-forward.

    out = feedforward(attn_feat + shortcut(x)) and map = attn_map + map, where ``shortcut`` is a pre-act
    1x1x1 :class:`ConvNormAct` when feat_dim != out_dim, else the identity.
    """

    def __init__(
        self,
        feat_dim: int,
        map_dim: int,
        out_dim: int,
        num_heads: int,
        dim_head: int,
        kernel: Triple,
        expansion: int,
        act: type[nn.Module],
        project_map: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.InstanceNorm3d(feat_dim)
        self.norm2 = nn.InstanceNorm3d(map_dim)
        self.attn = BidirectionAttention(
            feat_dim, map_dim, out_dim, num_heads, dim_head, kernel, project_map, attn_drop, proj_drop
        )
        self.shortcut: nn.Module = (
            ConvNormAct(feat_dim, out_dim, (1, 1, 1), act) if feat_dim != out_dim else nn.Identity()
        )
        self.feedforward = MBConv(out_dim, expansion, kernel, act)

    def forward(self, x: torch.Tensor, semantic_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, map_out = self.attn(self.norm1(x), self.norm2(semantic_map))
        return self.feedforward(out + self.shortcut(x)), map_out + semantic_map


class BasicLayer(nn.Module):
    """``num_blocks`` B-MHA blocks (``blocks``); the first maps feat_dim -> out_dim, the rest keep out_dim.

    Only the last block may skip its map projection (``project_last_map=False``, up2 in the reference).
    """

    def __init__(
        self,
        feat_dim: int,
        map_dim: int,
        out_dim: int,
        num_blocks: int,
        num_heads: int,
        dim_head: int,
        kernel: Triple,
        expansion: int,
        act: type[nn.Module],
        project_last_map: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            BidirectionAttentionBlock(
                feat_dim if i == 0 else out_dim,
                map_dim,
                out_dim,
                num_heads,
                dim_head,
                kernel,
                expansion,
                act,
                project_map=project_last_map or i < num_blocks - 1,
                attn_drop=attn_drop,
                proj_drop=proj_drop,
            )
            for i in range(num_blocks)
        )

    def forward(self, x: torch.Tensor, semantic_map: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        for block in self.blocks:
            x, semantic_map = block(x, semantic_map)
        return x, semantic_map


class PatchMerging(nn.Module):
    """Downsampling by space-to-depth: the prod(scale) strided sub-grids are concatenated on channels.

    Slice order: for i < s_D, j < s_H, k < s_W: x[:, :, i::s_D, j::s_H, k::s_W]; then ``norm`` (IN, eps 1e-5)
    on the prod(scale)·C channels and ``reduction`` (:class:`DepthwiseSeparableConv`, stage kernel) -> out.
    """

    def __init__(self, in_channels: int, out_channels: int, scale: Triple, kernel: Triple) -> None:
        super().__init__()
        self.scale = scale
        merged = math.prod(scale) * in_channels
        self.reduction = DepthwiseSeparableConv(merged, out_channels, kernel)
        self.norm = nn.InstanceNorm3d(merged)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sd, sh, sw = self.scale
        parts = [x[:, :, i::sd, j::sh, k::sw] for i in range(sd) for j in range(sh) for k in range(sw)]
        return self.reduction(self.norm(torch.cat(parts, dim=1)))


class SemanticMapGeneration(nn.Module):
    """A semantic map of prod(map_size) tokens pooled from the features by learned soft assignment.

    feat = base_proj(x) (3x3x3, C -> map_dim) and w = softmax over voxels of semantic_proj(x) (3x3x3,
    C -> tokens); map[b, c, t] = sum_n feat[b, c, n] · w[b, t, n] (einsum 'bij,bkj->bik'), reshaped to
    (B, map_dim, *map_size). ``dim`` and ``num_heads`` (1) describe the pooling product to :mod:`mqb.quant`.
    """

    def __init__(self, feat_dim: int, map_dim: int, map_size: Triple) -> None:
        super().__init__()
        self.map_size = map_size
        self.dim = map_dim
        self.num_heads = 1
        tokens = math.prod(map_size)
        self.base_proj = nn.Conv3d(feat_dim, map_dim, 3, padding=1, bias=False)
        self.semantic_proj = nn.Conv3d(feat_dim, tokens, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        feat = self.base_proj(x).flatten(2)
        weights = torch.softmax(self.semantic_proj(x).flatten(2), dim=2)
        return torch.einsum("bij,bkj->bik", feat, weights).reshape(b, self.dim, *self.map_size)


class FusionAttention(nn.Module):
    """Multi-head self-attention over tokens (B, L, dim): ``to_qkv`` (no bias) and ``to_out`` Linear layers.

    Heads split the features as (heads, dim_head); softmax(q·kᵀ / sqrt(dim_head)) · v, merged back the same way.
    """

    def __init__(self, dim: int, num_heads: int, dim_head: int) -> None:
        super().__init__()
        inner = num_heads * dim_head
        self.dim, self.num_heads, self.dim_head = dim, num_heads, dim_head
        self.scale = dim_head**-0.5
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length = x.shape[:2]
        q, k, v = (t.reshape(b, length, self.num_heads, -1).transpose(1, 2) for t in self.to_qkv(x).chunk(3, dim=-1))
        attn = torch.softmax(torch.einsum("bhid,bhjd->bhij", q, k) * self.scale, dim=-1)
        out = torch.einsum("bhij,bhjd->bhid", attn, v)
        return self.to_out(out.transpose(1, 2).reshape(b, length, -1))


class Mlp(nn.Module):
    """fc1 -> GELU -> dropout -> fc2 -> dropout."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class PreNorm(nn.Module):
    """fn(LayerNorm(x))."""

    def __init__(self, dim: int, fn: nn.Module) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.norm(x))


class FusionTransformer(nn.Module):
    """Pre-LN transformer: per layer x = attn(LN(x)) + x; x = mlp(LN(x)) + x (``layers.i.{0,1}``)."""

    def __init__(self, dim: int, depth: int, num_heads: int, dim_head: int, mlp_dim: int, drop: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [PreNorm(dim, FusionAttention(dim, num_heads, dim_head)), PreNorm(dim, Mlp(dim, mlp_dim, drop))]
            )
            for _ in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for attn, mlp in self.layers:  # type: ignore[misc]
            x = attn(x) + x
            x = mlp(x) + x
        return x


class SemanticMapFusion(nn.Module):
    """Joint attention over the maps of all B-MHA encoder stages.

    Each map i is projected by ``in_proj[i]`` (1x1x1) to ``dim`` and flattened to tokens; the concatenated
    sequence runs through ``fusion`` (:class:`FusionTransformer`, mlp width = dim) and is split back and
    projected by ``out_proj[i]`` to its own width. All maps must share one spatial size.
    """

    def __init__(self, in_dims: Sequence[int], dim: int, num_heads: int, depth: int, drop: float = 0.0) -> None:
        super().__init__()
        self.dim = dim
        self.in_proj = nn.ModuleList(nn.Conv3d(c, dim, 1, bias=False) for c in in_dims)
        self.fusion = FusionTransformer(dim, depth, num_heads, dim // num_heads, dim, drop)
        self.out_proj = nn.ModuleList(nn.Conv3d(dim, c, 1, bias=False) for c in in_dims)

    def forward(self, maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        b, _, *spatial = maps[0].shape
        tokens = torch.cat([proj(m).flatten(2).transpose(1, 2) for proj, m in zip(self.in_proj, maps, strict=True)], 1)
        fused = self.fusion(tokens).chunk(len(maps), dim=1)
        return [
            proj(t.transpose(1, 2).reshape(b, self.dim, *spatial)) for proj, t in zip(self.out_proj, fused, strict=True)
        ]


class InConv(nn.Module):
    """Stem: ``conv1`` (kernel k0, in -> out, no bias) then a :class:`BasicBlock` ``conv2``."""

    def __init__(self, in_channels: int, out_channels: int, kernel: Triple, act: type[nn.Module]) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, kernel, padding=_same_padding(kernel), bias=False)
        self.conv2 = BasicBlock(out_channels, out_channels, kernel, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x))


class DownStage(nn.Module):
    """patch_merging -> conv_blocks -> (map_gen) -> trans_blocks; returns (features, map or None)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        conv_num: int,
        trans_num: int,
        scale: Triple,
        kernel: Triple,
        act: type[nn.Module],
        map_size: Triple | None,
        num_heads: int = 1,
        dim_head: int = 1,
        expansion: int = 4,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.map_gen = SemanticMapGeneration(out_channels, out_channels, map_size) if map_size is not None else None
        self.patch_merging = PatchMerging(in_channels, out_channels, scale, kernel)
        self.conv_blocks = nn.Sequential(
            *(BasicBlock(out_channels, out_channels, kernel, act) for _ in range(conv_num))
        )
        self.trans_blocks = BasicLayer(
            out_channels, out_channels, out_channels, trans_num, num_heads, dim_head, kernel, expansion, act,
            attn_drop=attn_drop, proj_drop=proj_drop,
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.conv_blocks(self.patch_merging(x))
        semantic_map = self.map_gen(out) if self.map_gen is not None else None
        return self.trans_blocks(out, semantic_map)


class UpStage(nn.Module):
    """Upsample to the skip size, concat [upsampled, skip], (map_reduction of the maps), trans_blocks, conv_blocks.

    With ``map_shortcut`` the map is ``map_reduction`` (1x1x1, in+out -> out) of cat(previous map, encoder map);
    otherwise the previous map passes through. The first B-MHA block (or, without any, the first BasicBlock)
    takes in+out channels.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        conv_num: int,
        trans_num: int,
        kernel: Triple,
        act: type[nn.Module],
        map_shortcut: bool,
        project_last_map: bool = True,
        num_heads: int = 1,
        dim_head: int = 1,
        expansion: int = 4,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        cat_channels = in_channels + out_channels
        self.map_shortcut = map_shortcut
        self.map_reduction: nn.Module = (
            nn.Conv3d(cat_channels, out_channels, 1, bias=False) if map_shortcut else nn.Identity()
        )
        self.trans_blocks = BasicLayer(
            cat_channels, out_channels, out_channels, trans_num, num_heads, dim_head, kernel, expansion, act,
            project_last_map=project_last_map, attn_drop=attn_drop, proj_drop=proj_drop,
        )  # fmt: skip
        first = cat_channels if trans_num == 0 else out_channels
        self.conv_blocks = nn.Sequential(
            *(BasicBlock(first if i == 0 else out_channels, out_channels, kernel, act) for i in range(conv_num))
        )

    def forward(
        self, low: torch.Tensor, skip: torch.Tensor, semantic_map: torch.Tensor | None, skip_map: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        low = F.interpolate(low, size=skip.shape[2:], mode="trilinear", align_corners=True)
        feat = torch.cat([low, skip], dim=1)
        if self.map_shortcut and skip_map is not None and semantic_map is not None:
            semantic_map = self.map_reduction(torch.cat([semantic_map, skip_map], dim=1))
        out, semantic_map = self.trans_blocks(feat, semantic_map)
        return self.conv_blocks(out), semantic_map


def pointwise_redesign(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Rebuild every 1x3x3 Conv3d whose name matches a pattern (fnmatch) as a 1x1x1 conv with padding 0.

    Channels, stride, groups and bias are kept (fresh weights). Returns the replaced names; raises
    ``ValueError`` for a pattern that matches no 1x3x3 conv (listing the candidates).
    """
    candidates = [
        name for name, m in model.named_modules() if type(m) is nn.Conv3d and tuple(m.kernel_size) == (1, 3, 3)
    ]
    replaced: list[str] = []
    for pattern in patterns:
        hits = [name for name in candidates if fnmatchcase(name, pattern)]
        if not hits:
            raise ValueError(
                f"MedFormer replace_with_pointwise: {pattern!r} matches no 1x3x3 Conv3d; candidates: {candidates}"
            )
        replaced += [name for name in hits if name not in replaced]
    for name in replaced:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = parent.get_submodule(child)
        assert isinstance(old, nn.Conv3d)
        new = nn.Conv3d(
            old.in_channels, old.out_channels, 1, stride=old.stride, padding=0, groups=old.groups,
            bias=old.bias is not None,
        )  # fmt: skip
        setattr(parent, child, new)
    return replaced


class MedFormer(nn.Module):
    """MedFormer 3D; defaults are the reference BTCV configuration (1 -> 14 channels, 36,669,180 parameters).

    Args:
        in_channels, out_channels: image channels and classes.
        base_channels: stem width (``inc``).
        kernel_sizes: 5 kernels: inc, down1, down2, down3, down4 (up1 uses down3's, up2 down2's, up3
            down1's, up4 the stem's).
        scales: 4 downsampling factors (per axis 1 or 2) of down1..down4.
        chan_num: 8 widths: down1..down4, up1..up4.
        conv_num, trans_num: BasicBlocks / B-MHA blocks per stage (same 8-stage order). down1, up3 and up4 have
            no semantic map, so their ``trans_num`` must be 0.
        num_heads: heads per stage; dim_head = chan_num // num_heads.
        map_size: semantic-map grid (prod = tokens per map).
        expansion: MBConv expansion of the B-MHA feed-forward.
        fusion_depth, fusion_dim, fusion_heads: the map-fusion transformer (mlp width = fusion_dim).
        attn_drop, proj_drop: dropout on the map-side attention and the attention output / fusion MLP.
        activation: ``relu`` (BTCV, AMOS) or ``gelu``.
        aux_loss: add ``aux_out`` (1x1x1 on the up2 output, upsampled trilinearly to the input size).
        replace_with_pointwise: names or globs of 1x3x3 convs rebuilt as 1x1x1 convs with padding 0.

    Forward: (B, in, D, H, W) -> (B, out, D, H, W); D must be divisible by the product of the D scales and
    H, W likewise. In training with ``aux_loss`` it returns [main, aux]; in eval only the main output (the
    auxiliary conv still runs, so its quantizers see calibration data, but it is not upsampled or returned).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 14,
        base_channels: int = 32,
        kernel_sizes: Sequence[Sequence[int]] = ((1, 3, 3), (1, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3)),
        scales: Sequence[Sequence[int]] = ((1, 2, 2), (1, 2, 2), (2, 2, 2), (2, 2, 2)),
        chan_num: Sequence[int] = (64, 128, 256, 320, 256, 128, 64, 32),
        conv_num: Sequence[int] = (2, 0, 0, 0, 0, 0, 2, 2),
        trans_num: Sequence[int] = (0, 2, 4, 6, 4, 2, 0, 0),
        num_heads: Sequence[int] = (1, 4, 8, 10, 8, 4, 1, 1),
        map_size: Sequence[int] = (3, 3, 3),
        expansion: int = 4,
        fusion_depth: int = 2,
        fusion_dim: int = 320,
        fusion_heads: int = 10,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        activation: str = "relu",
        aux_loss: bool = True,
        replace_with_pointwise: Sequence[str] = (),
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"MedFormer activation={activation!r} is invalid; valid: {', '.join(ACTIVATIONS)}")
        kernels = [_triple(k, "kernel_sizes entry") for k in kernel_sizes]
        self.scales = [_triple(s, "scales entry") for s in scales]
        chans, convs, trans, heads = (
            [int(v) for v in seq] for seq in (chan_num, conv_num, trans_num, num_heads)
        )  # fmt: skip
        for what, seq, n in (("kernel_sizes", kernels, 5), ("scales", self.scales, 4), ("chan_num", chans, 8),
                             ("conv_num", convs, 8), ("trans_num", trans, 8), ("num_heads", heads, 8)):  # fmt: skip
            if len(seq) != n:
                raise ValueError(f"MedFormer {what} needs {n} entries, got {len(seq)}")
        if trans[0] or trans[6] or trans[7]:
            raise ValueError(f"MedFormer trans_num={trans}: down1, up3 and up4 have no semantic map (entries 0, 6, 7)")
        grid = _triple(map_size, "map_size")
        act = ACTIVATIONS[activation]
        dim_head = [c // h for c, h in zip(chans, heads, strict=True)]
        common = {"expansion": expansion, "attn_drop": attn_drop, "proj_drop": proj_drop}

        self.inc = InConv(in_channels, base_channels, kernels[0], act)
        self.down1 = DownStage(base_channels, chans[0], convs[0], trans[0], self.scales[0], kernels[1], act, None)
        for i in (1, 2, 3):  # down2..down4 generate semantic maps and run B-MHA
            stage = DownStage(chans[i - 1], chans[i], convs[i], trans[i], self.scales[i], kernels[i + 1], act, grid,
                              heads[i], dim_head[i], **common)  # fmt: skip
            self.add_module(f"down{i + 1}", stage)
        self.map_fusion = SemanticMapFusion(chans[1:4], fusion_dim, fusion_heads, fusion_depth, proj_drop)
        self.up1 = UpStage(chans[3], chans[4], convs[4], trans[4], kernels[3], act, True, True, heads[4], dim_head[4],
                           **common)  # fmt: skip
        self.up2 = UpStage(chans[4], chans[5], convs[5], trans[5], kernels[2], act, True, False, heads[5], dim_head[5],
                           **common)  # fmt: skip
        self.up3 = UpStage(chans[5], chans[6], convs[6], trans[6], kernels[1], act, False)
        self.up4 = UpStage(chans[6], chans[7], convs[7], trans[7], kernels[0], act, False)
        self.aux_loss = aux_loss
        if aux_loss:
            self.aux_out = nn.Conv3d(chans[5], out_channels, 1)
        self.outc = nn.Conv3d(chans[7], out_channels, 1)
        patterns = [replace_with_pointwise] if isinstance(replace_with_pointwise, str) else replace_with_pointwise
        #: names of the 1x3x3 convs rebuilt as 1x1x1 (the redesign), in module order
        self.replaced = tuple(pointwise_redesign(self, [str(p) for p in patterns]))

    @property
    def divisor(self) -> Triple:
        """What every input size must be divisible by: the product of the down-sampling scales per axis."""
        return _triple([math.prod(s[axis] for s in self.scales) for axis in range(3)], "divisor")

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if x.ndim != 5 or any(n % d for n, d in zip(x.shape[2:], self.divisor, strict=True)):
            raise ValueError(f"MedFormer input {tuple(x.shape)}: spatial size must be divisible by {self.divisor}")
        x0 = self.inc(x)
        x1, _ = self.down1(x0)
        x2, map2 = self.down2(x1)
        x3, map3 = self.down3(x2)
        x4, map4 = self.down4(x3)
        fused2, fused3, fused4 = self.map_fusion([map2, map3, map4])
        out, semantic_map = self.up1(x4, x3, fused4, fused3)
        out, semantic_map = self.up2(out, x2, semantic_map, fused2)
        aux = self.aux_out(out) if self.aux_loss else None
        out, semantic_map = self.up3(out, x1, semantic_map, None)
        out, _ = self.up4(out, x0, semantic_map, None)
        out = self.outc(out)
        if self.training and aux is not None:
            return [out, F.interpolate(aux, size=x.shape[2:], mode="trilinear", align_corners=True)]
        return out


@register_quant_module(BidirectionAttention)
class QuantBidirectionAttention(QuantAttention, BidirectionAttention):
    """B-MHA attention with its three einsums (logits, feat <- map, map <- feat) fake-quantized."""

    float_class = BidirectionAttention


@register_quant_module(FusionAttention)
class QuantFusionAttention(QuantAttention, FusionAttention):
    """Map-fusion self-attention with q·kᵀ and softmax·v fake-quantized."""

    float_class = FusionAttention


@register_quant_module(SemanticMapGeneration)
class QuantSemanticMapGeneration(QuantAttention, SemanticMapGeneration):
    """Semantic-map pooling with its einsum (features · soft assignment) fake-quantized."""

    float_class = SemanticMapGeneration
