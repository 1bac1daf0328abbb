"""UNesT (Yu et al. 2023): the network of the MONAI model-zoo bundle ``wholeBrainSeg_Large_UNEST_segmentation``.

A native re-implementation from the architecture facts of the bundle's ``scripts/networks`` (no code taken) whose
state-dict keys and shapes equal the bundle's network, so its ``models/model.pt`` (a plain state dict, loaded
strictly by the bundle) loads strictly here: 193 keys, 87,205,158 parameters with 133 classes (87,201,231 with
14), no buffers.

Encoder: a 3-level Nested Transformer (NesT, Zhang et al. 2022) on a fixed 96³ window, ``nestViT``:

* ``patch_embed.proj``: Conv3d 4x4x4 stride 4 (in -> 128, bias), 128 x 24³, no norm (``hidden[0]``);
* ``levels.{0,1,2}``: [``pool`` (levels 1, 2: :class:`ConvPool`, Conv3d 3x3x3 -> channels-last LayerNorm ->
  MaxPool3d(3, 2, 1))] -> blockify into T = 64 / 8 / 1 blocks of N = 6³ = 216 tokens -> + ``pos_embed``
  [1, T, N, C] -> ``transformer_encoder`` (2 / 2 / 8 pre-LN layers, LayerNorm eps 1e-6, attention *within* each
  block, qkv Linear with bias, head_dim 32 at every level, MLP ratio 4 with exact GELU, stochastic depth linearly
  spaced 0 -> 0.5) -> deblockify; outputs 128 x 24³, 256 x 12³, 512 x 6³ (``hidden[1..3]``);
* ``norm``: a final LayerNorm(512) on the last level's output, channels-last.

CNN branches (MONAI blocks, InstanceNorm without affine parameters): ``encoder1`` UnetResBlock on the raw input
(-> 32 x 96³); ``encoder2`` projection-upsampling of ``hidden[0]`` (ConvTranspose 2x2x2 s2 -> ConvTranspose
1x1x1, -> 64 x 48³); ``encoder3`` / ``encoder4`` UnetResBlocks on ``hidden[1]`` / ``hidden[2]``; the skip of
``decoder5`` is ``hidden[3]`` (before the final norm); ``encoder10`` MONAI ``Convolution`` 3x3x3 s2 on the normed
output (bias, then PReLU with one slope -> Dropout(0) -> InstanceNorm: ADN order), 1024 x 3³. ``decoder5`` ..
``decoder1`` are MONAI ``UnetrUpBlock`` (ConvTranspose 2x2x2 s2, concatenate [upsampled, skip], UnetResBlock
2C -> C) and ``out`` is ``UnetOutBlock`` (Conv 1x1x1 with bias).

Differences from the bundle's class, none of which changes keys, shapes or the function at ``in_channels=1``:
``in_channels`` feeds both the patch embedding and ``encoder1`` (the bundle hard-codes 1 there); ``img_size``
is honoured (the bundle ignores it and hard-codes 96, which fixes the ``pos_embed`` shapes); the unused
arguments (``window_size``, ``conv_block``, classification head) are absent.

The window is fixed: the positional embeddings have one entry per token of each block, so inputs must be exactly
``img_size``³ (use a sliding-window inferer with ``roi_size = img_size``, 96³ for the bundle, overlap 0.7).

The attention products Q·Kᵀ and softmax·V are ``@`` calls inside :class:`NestAttention`; its quantized twin
:class:`QuantNestAttention` (registered with :func:`mqb.quant.register_quant_module`) fake-quantizes their
operands, and qkv / proj are ordinary ``nn.Linear`` layers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from einops import rearrange
from monai.networks.blocks import Convolution, UnetOutBlock, UnetrBasicBlock, UnetrUpBlock
from monai.networks.blocks.dynunet_block import get_conv_layer
from monai.networks.layers import DropPath
from torch import nn

from mqb.quant.attention import QuantAttention
from mqb.quant.registry import register_quant_module

#: Number of NesT levels; the block grid halves per edge at each level (64 -> 8 -> 1 blocks).
NUM_LEVELS = 3


class NestAttention(nn.Module):
    """Multi-head self-attention within each image block of a (B, T, N, C) tensor (T blocks of N tokens).

    ``qkv`` is one Linear(C -> 3C); scores are (q @ kᵀ) · head_dim^-0.5, softmax over keys, then ``proj``.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"UNesT: embedding dim {dim} is not divisible by num_heads={num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, n, c = x.shape
        # (B, T, N, 3C) -> (3, B, heads, T, N, head_dim): the channel order of qkv is (q|k|v, head, head_dim).
        qkv = self.qkv(x).reshape(b, t, n, 3, self.num_heads, self.head_dim).permute(3, 0, 4, 1, 2, 5)
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1)) * self.scale  # (B, heads, T, N, N)
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = (attn @ v).permute(0, 2, 3, 4, 1).reshape(b, t, n, c)  # heads back next to head_dim: (head, head_dim)
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}"


@register_quant_module(NestAttention)
class QuantNestAttention(QuantAttention, NestAttention):
    """UNesT block-local attention with quantized Q·Kᵀ and softmax·V operands."""

    float_class = NestAttention


class Mlp(nn.Module):
    """``fc1`` (C -> hidden) -> GELU (exact erf) -> ``fc2`` (hidden -> C), with dropout after each linear."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class TransformerLayer(nn.Module):
    """Pre-LN layer: x + DropPath(attn(norm1(x))), then x + DropPath(mlp(norm2(x))); LayerNorm eps 1e-6."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        qkv_bias: bool,
        drop: float,
        attn_drop: float,
        drop_path: float,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = NestAttention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ConvPool(nn.Module):
    """NesT block aggregation: Conv3d 3x3x3 (bias, pad 1) -> LayerNorm over channels -> MaxPool3d(3, 2, 1)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm = nn.LayerNorm(out_channels, eps=1e-6)
        self.pool = nn.MaxPool3d(kernel_size=3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        x = self.norm(x.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)
        return self.pool(x)


def blockify(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """(B, D, H, W, C) -> (B, T, N, C): T blocks in (d, h, w) raster order, N = block_size³ tokens each
    (``rearrange(x, "b (d s1) (h s2) (w s3) c -> b (d h w) (s1 s2 s3) c")``)."""
    s = block_size
    return rearrange(x, "b (d s1) (h s2) (w s3) c -> b (d h w) (s1 s2 s3) c", s1=s, s2=s, s3=s)


def deblockify(x: torch.Tensor, block_size: int, grid: int) -> torch.Tensor:
    """Inverse of :func:`blockify` for a cubic grid of ``grid``³ blocks: (B, T, N, C) -> (B, D, H, W, C)."""
    s = block_size
    return rearrange(x, "b (d h w) (s1 s2 s3) c -> b (d s1) (h s2) (w s3) c", d=grid, h=grid, w=grid, s1=s, s2=s, s3=s)


class NestLevel(nn.Module):
    """One NesT level: [ConvPool] -> blockify -> + pos_embed -> transformer layers -> deblockify (channels-first)."""

    def __init__(
        self,
        grid: int,
        block_size: int,
        embed_dim: int,
        prev_embed_dim: int | None,
        num_heads: int,
        depth: int,
        mlp_ratio: float,
        qkv_bias: bool,
        drop_rate: float,
        attn_drop_rate: float,
        drop_path_rates: Sequence[float],
    ) -> None:
        super().__init__()
        self.grid = grid
        self.block_size = block_size
        self.pos_embed = nn.Parameter(torch.zeros(1, grid**3, block_size**3, embed_dim))
        self.pool = ConvPool(prev_embed_dim, embed_dim) if prev_embed_dim is not None else nn.Identity()
        self.transformer_encoder = nn.Sequential(
            *(
                TransformerLayer(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, rate)
                for rate in drop_path_rates
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = blockify(self.pool(x).permute(0, 2, 3, 4, 1), self.block_size) + self.pos_embed
        x = self.transformer_encoder(x)
        return deblockify(x, self.block_size, self.grid).permute(0, 4, 1, 2, 3)


class PatchEmbed(nn.Module):
    """Conv3d with kernel = stride = ``patch_size`` (bias), no norm; channels-first output."""

    def __init__(self, in_channels: int, embed_dim: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class NestTransformer3D(nn.Module):
    """3-level NesT encoder returning (normed last level, [patch embedding, level 0, level 1, level 2])."""

    def __init__(
        self,
        in_channels: int,
        img_size: int,
        patch_size: int,
        embed_dims: Sequence[int],
        num_heads: Sequence[int],
        depths: Sequence[int],
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.5,
    ) -> None:
        super().__init__()
        tokens = img_size // patch_size  # tokens per edge at level 0
        blocks = 2 ** (NUM_LEVELS - 1)  # blocks per edge at level 0 (4: 64 blocks)
        block_size = tokens // blocks
        self.patch_embed = PatchEmbed(in_channels, embed_dims[0], patch_size)
        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # linspace(0, rate, total)
        starts = [sum(depths[:i]) for i in range(NUM_LEVELS)]
        self.levels = nn.ModuleList(
            NestLevel(
                grid=blocks // 2**i,
                block_size=block_size,
                embed_dim=embed_dims[i],
                prev_embed_dim=embed_dims[i - 1] if i else None,
                num_heads=num_heads[i],
                depth=depths[i],
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                drop_rate=drop_rate,
                attn_drop_rate=attn_drop_rate,
                drop_path_rates=rates[starts[i] : starts[i] + depths[i]],
            )
            for i in range(NUM_LEVELS)
        )
        self.norm = nn.LayerNorm(embed_dims[-1], eps=1e-6)
        # NesT initialisation: truncated normal (std 0.02, cut at +-2) for pos_embed and Linear weights, zero
        # Linear biases; LayerNorm and the 3D convolutions keep PyTorch's defaults.
        for level in self.levels:
            nn.init.trunc_normal_(level.pos_embed, std=0.02, a=-2.0, b=2.0)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02, a=-2.0, b=2.0)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.patch_embed(x)
        hidden = [x]
        for level in self.levels:
            x = level(x)
            hidden.append(x)
        x = self.norm(x.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)
        return x, hidden


class ProjectionUpBlock(nn.Module):
    """UNesT's ``encoder2``: ConvTranspose k=s=2 (``transp_conv_init``) then ``num_layer`` ConvTranspose 1x1x1.

    MONAI's ``UnetrPrUpBlock`` has the same keys but its ``blocks`` are k=s=2 (each doubling the resolution);
    the bundle's ``blocks`` keep the resolution, so this block is written out with MONAI's ``get_conv_layer``.
    """

    def __init__(self, in_channels: int, out_channels: int, num_layer: int = 1, upsample_kernel_size: int = 2) -> None:
        super().__init__()
        self.transp_conv_init = get_conv_layer(
            3, in_channels, out_channels, upsample_kernel_size, upsample_kernel_size, conv_only=True, is_transposed=True
        )
        self.blocks = nn.ModuleList(
            get_conv_layer(3, out_channels, out_channels, 1, 1, conv_only=True, is_transposed=True)
            for _ in range(num_layer)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.transp_conv_init(x)
        for block in self.blocks:
            x = block(x)
        return x


class UNesT(nn.Module):
    """UNesT; the defaults are the bundle's network (whole-brain, 133 classes, 96³ windows, 87.2 M parameters).

    Args:
        in_channels: input channels (the bundle: 1, T1 MRI registered to MNI305, NormalizeIntensity nonzero).
        out_channels: output classes (the bundle: 133; background included).
        patch_size: patch-embedding kernel and stride; must be 4 (the decoder upsamples 4x from the patch grid).
        depths, embed_dim, num_heads: transformer layers, width and heads of the 3 NesT levels.
        feature_size: CNN width unit (channels 2, 4, 8, 16, 32, 64 x feature_size); ``embed_dim[2]`` must equal
            ``32 * feature_size`` (the last level is the skip of ``decoder5``).
        img_size: edge of the cubic input window; fixes the ``pos_embed`` shapes, so inputs must be exactly this
            size (``ValueError`` otherwise). A multiple of 32, at least 64: 4 blocks per edge at level 0, an even
            grid at level 2 for ``encoder10``'s stride 2, and more than one voxel after it (InstanceNorm).
        norm_name: normalization of the CNN blocks (the bundle: instance, affine-free).
        res_block: residual (UnetResBlock) or plain (UnetBasicBlock) CNN encoders/decoders; keys assume True.
        mlp_ratio, qkv_bias: transformer MLP width ratio and bias of the qkv projection.
        dropout_rate, attn_drop_rate: dropout in the transformer MLP/projection and on attention probabilities.
        drop_path_rate: stochastic depth, linearly spaced from 0 over all transformer layers (training only).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 133,
        patch_size: int = 4,
        depths: Sequence[int] = (2, 2, 8),
        embed_dim: Sequence[int] = (128, 256, 512),
        num_heads: Sequence[int] = (4, 8, 16),
        feature_size: int = 16,
        img_size: int | Sequence[int] = 96,
        norm_name: tuple | str = "instance",
        res_block: bool = True,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        dropout_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.5,
    ) -> None:
        super().__init__()
        size = self._img_size(img_size, patch_size)
        depths, embed_dim, num_heads = (tuple(int(v) for v in seq) for seq in (depths, embed_dim, num_heads))
        for name, seq in (("depths", depths), ("embed_dim", embed_dim), ("num_heads", num_heads)):
            if len(seq) != NUM_LEVELS:
                raise ValueError(f"UNesT: {name}={list(seq)} must have {NUM_LEVELS} entries (one per NesT level)")
        if embed_dim[2] != 32 * feature_size:
            raise ValueError(
                f"UNesT: embed_dim[2]={embed_dim[2]} must equal 32 * feature_size={32 * feature_size} "
                "(the last NesT level is the skip connection of decoder5)"
            )
        if not 0 <= dropout_rate <= 1:
            raise ValueError(f"UNesT: dropout_rate={dropout_rate} must be in [0, 1]")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.img_size = size
        fs = feature_size
        self.nestViT = NestTransformer3D(
            in_channels, size, patch_size, embed_dim, num_heads, depths, mlp_ratio, qkv_bias,
            dropout_rate, attn_drop_rate, drop_path_rate,
        )  # fmt: skip
        self.encoder1 = UnetrBasicBlock(3, in_channels, 2 * fs, 3, 1, norm_name, res_block=res_block)
        self.encoder2 = ProjectionUpBlock(embed_dim[0], 4 * fs, num_layer=1, upsample_kernel_size=2)
        self.encoder3 = UnetrBasicBlock(3, embed_dim[0], 8 * fs, 3, 1, norm_name, res_block=res_block)
        self.encoder4 = UnetrBasicBlock(3, embed_dim[1], 16 * fs, 3, 1, norm_name, res_block=res_block)
        self.decoder5 = UnetrUpBlock(3, 2 * embed_dim[2], 32 * fs, 3, 2, norm_name, res_block=res_block)
        self.decoder4 = UnetrUpBlock(3, embed_dim[2], 16 * fs, 3, 2, norm_name, res_block=res_block)
        self.decoder3 = UnetrUpBlock(3, 16 * fs, 8 * fs, 3, 2, norm_name, res_block=res_block)
        self.decoder2 = UnetrUpBlock(3, 8 * fs, 4 * fs, 3, 2, norm_name, res_block=res_block)
        self.decoder1 = UnetrUpBlock(3, 4 * fs, 2 * fs, 3, 2, norm_name, res_block=res_block)
        self.encoder10 = Convolution(
            spatial_dims=3, in_channels=32 * fs, out_channels=64 * fs, strides=2, adn_ordering="ADN", dropout=0.0
        )  # kernel 3, bias, PReLU (one slope) -> Dropout -> InstanceNorm: MONAI's Convolution defaults
        self.out = UnetOutBlock(3, 2 * fs, out_channels)

    @staticmethod
    def _img_size(img_size: int | Sequence[int], patch_size: int) -> int:
        sizes = {int(img_size)} if isinstance(img_size, int) else {int(s) for s in img_size}
        if patch_size != 4:
            raise ValueError(f"UNesT: patch_size={patch_size} must be 4 (the decoder upsamples 4x from the patch grid)")
        if len(sizes) != 1 or (size := sizes.pop()) < 16 * patch_size or size % (8 * patch_size):
            raise ValueError(
                f"UNesT: img_size={img_size} must be one multiple of {8 * patch_size} that is at least "
                f"{16 * patch_size} (a cube; 4 NesT blocks per edge at level 0, an even grid at level 2 for "
                "encoder10's stride 2, and more than one voxel after it for its InstanceNorm)"
            )
        return size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expected = (self.img_size,) * 3
        if x.ndim != 5 or tuple(x.shape[2:]) != expected:
            raise ValueError(
                f"UNesT takes (B, C, {', '.join(map(str, expected))}) inputs (its positional embeddings fix the "
                f"window; use sliding-window inference with roi_size={list(expected)}), got {list(x.shape)}"
            )
        normed, hidden = self.nestViT(x)
        enc0 = self.encoder1(x)  # 2fs x img³
        enc1 = self.encoder2(hidden[0])  # 4fs x (img/2)³
        enc2 = self.encoder3(hidden[1])  # 8fs x (img/4)³
        enc3 = self.encoder4(hidden[2])  # 16fs x (img/8)³
        enc4 = hidden[3]  # 32fs x (img/16)³, before the final norm
        dec4 = self.encoder10(normed)  # 64fs x (img/32)³
        dec3 = self.decoder5(dec4, enc4)
        dec2 = self.decoder4(dec3, enc3)
        dec1 = self.decoder3(dec2, enc2)
        dec0 = self.decoder2(dec1, enc1)
        return self.out(self.decoder1(dec0, enc0))
