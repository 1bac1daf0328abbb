"""STU-Net (Huang et al. 2023, "STU-Net: Scalable and Transferable Medical Image Segmentation Models Empowered by
Large-Scale Supervised Pre-training"), written natively with the reference state-dict keys.

The reference is the ``STUNet`` class of uni-medical/STU-Net (``nnUNet-2.2/.../STUNetTrainer.py``, identical to the
nnU-Net v1 copy apart from wrapper details). Keys are those of the reference, so the released nnU-Net v1
(``*_ep4k.model``: weights under ``state_dict``) and v2 (``network_weights``) checkpoints load strictly:

- ``conv_blocks_context.{s}.{b}.{conv1,norm1,conv2,norm2}.*`` and ``conv_blocks_context.{s}.0.conv3.*`` (encoder)
- ``upsample_layers.{u}.conv.*`` (u = 0 is the lowest resolution)
- ``conv_blocks_localization.{u}.{b}.{conv1,norm1,conv2,norm2}.*`` and ``.{u}.0.conv3.*`` (decoder)
- ``seg_outputs.{u}.*`` (``seg_outputs.4`` is the full-resolution head)

Architecture (every conv has a bias; InstanceNorm3d eps 1e-5 affine without running stats; LeakyReLU 0.01):

- :class:`BasicResBlock`: conv1 (k, stride) -> norm1 -> act1 -> conv2 (k) -> norm2, plus the shortcut (a 1x1x1
  ``conv3`` with the same stride when the block changes shape, else identity, no norm), add, then act2.
- Encoder stage 0: ``depth[0]`` blocks at stride 1; stage d >= 1: the first block downsamples with stride
  ``pool_op_kernel_sizes[d-1]`` (strided 3x3x3 conv + strided 1x1x1 shortcut), then ``depth[d]-1`` blocks.
  No pooling layers.
- Upsampling: nearest-neighbour ``F.interpolate`` by the stride of the matching encoder stage, then a 1x1x1 conv
  (at the higher resolution). No transposed convs, so the strides do not change the parameter count.
- Decoder stage u: concat([upsampled, skip]) (upsampled first) -> BasicResBlock(2C -> C, 1x1x1 shortcut) ->
  ``depth`` - 1 identity-shortcut blocks -> 1x1x1 head to the classes.

Sizes (``depth`` / ``dims``; parameters with 14 outputs (BTCV) / 105 outputs (TotalSegmentator, 104 + background),
the latter matching the README/paper figures exactly):

=====  ==================  =============================  ==============  ==============
size   depth               dims                           out=14          out=105
=====  ==================  =============================  ==============  ==============
S      [1]*6               [16,32,64,128,256,256]         14,551,350      14,596,941
B      [1]*6               [32,64,128,256,512,512]        58,171,942      58,262,669
L      [2]*6               [64,128,256,512,1024,1024]     440,121,606     440,302,605
H      [3]*6               [96,192,384,768,1536,1536]     1,457,054,950   1,457,326,221
=====  ==================  =============================  ==============  ==============

The STU-Net trainers force ``conv_kernel_sizes=[[3,3,3]]*6`` and take the strides from the dataset's nnU-Net plan
(``pool_op_kernel_sizes[1:]``, truncated or padded with [1,1,1] to 5 entries). The TotalSegmentator pre-training
plan is ``[[2,2,2]]*4 + [[1,1,2]]`` (1.5 mm isotropic, patch 128^3). Each input axis must be divisible by the
product of the strides along it, so the skips and the upsampled tensors line up.

Initialisation: PyTorch defaults, as the v2 class (the v1 trainer applied He init with slope 1e-2).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

#: (depth, dims) of the four published sizes.
SIZES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "S": ((1,) * 6, (16, 32, 64, 128, 256, 256)),
    "B": ((1,) * 6, (32, 64, 128, 256, 512, 512)),
    "L": ((2,) * 6, (64, 128, 256, 512, 1024, 1024)),
    "H": ((3,) * 6, (96, 192, 384, 768, 1536, 1536)),
}

#: Strides of the TotalSegmentator pre-training plan (the released checkpoints).
TOTALSEG_STRIDES: tuple[tuple[int, int, int], ...] = ((2, 2, 2),) * 4 + ((1, 1, 2),)

Triple = tuple[int, int, int]


def _triple(value: int | Sequence[int], what: str) -> Triple:
    if isinstance(value, int):
        return (value, value, value)
    items = tuple(int(v) for v in value)
    if len(items) != 3 or any(v < 1 for v in items):
        raise ValueError(f"STUNet {what}={list(value)!r} is invalid: expected 3 positive integers (one per axis)")
    return items  # type: ignore[return-value]


class BasicResBlock(nn.Module):
    """Residual block: conv1 -> norm1 -> act1 -> conv2 -> norm2, + shortcut (1x1x1 ``conv3`` or identity), act2."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Triple,
        stride: Triple = (1, 1, 1),
        use_1x1conv: bool = False,
    ) -> None:
        super().__init__()
        padding = tuple(k // 2 for k in kernel_size)
        self.conv1 = nn.Conv3d(in_channels, out_channels, kernel_size, stride=stride, padding=padding)
        self.norm1 = nn.InstanceNorm3d(out_channels, eps=1e-5, affine=True)
        self.act1 = nn.LeakyReLU(negative_slope=0.01, inplace=True)
        self.conv2 = nn.Conv3d(out_channels, out_channels, kernel_size, padding=padding)
        self.norm2 = nn.InstanceNorm3d(out_channels, eps=1e-5, affine=True)
        self.act2 = nn.LeakyReLU(negative_slope=0.01, inplace=True)
        self.conv3 = nn.Conv3d(in_channels, out_channels, 1, stride=stride) if use_1x1conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act1(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        shortcut = self.conv3(x) if self.conv3 is not None else x
        return self.act2(y + shortcut)


class UpsampleNearest(nn.Module):
    """Nearest-neighbour upsampling by ``scale`` followed by a 1x1x1 conv (reference ``Upsample_Layer_nearest``)."""

    def __init__(self, in_channels: int, out_channels: int, scale: Triple) -> None:
        super().__init__()
        self.scale = scale
        self.conv = nn.Conv3d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=[float(s) for s in self.scale], mode="nearest"))


def _stage(in_channels: int, channels: int, blocks: int, kernel: Triple, stride: Triple) -> nn.Sequential:
    first = BasicResBlock(in_channels, channels, kernel, stride, use_1x1conv=True)
    return nn.Sequential(first, *(BasicResBlock(channels, channels, kernel) for _ in range(blocks - 1)))


class STUNet(nn.Module):
    """STU-Net with ``len(dims)`` stages (6 in every published size; see the module doc for S/B/L/H).

    Args:
        in_channels: input image channels.
        out_channels: segmentation heads (classes including background).
        depth: residual blocks per stage, used by both the encoder stage and the matching decoder stage.
        dims: features per stage.
        pool_op_kernel_sizes: the ``len(dims) - 1`` downsampling strides (encoder stages 1..n-1), per axis.
        conv_kernel_sizes: the ``len(dims)`` conv kernels per stage (the STU-Net trainers use 3x3x3 everywhere).
        deep_supervision: if True, forward returns a tuple of logits, full resolution first, then each coarser
            decoder level at its own resolution (as the reference). If False (default), forward returns one
            full-resolution tensor [B, out_channels, D, H, W]. Every head runs in both cases, as in the reference
            (the coarse heads are 1x1x1 convs at low resolution: negligible cost), so post-training calibration
            reaches every layer.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 14,
        depth: Sequence[int] = SIZES["B"][0],
        dims: Sequence[int] = SIZES["B"][1],
        pool_op_kernel_sizes: Sequence[int | Sequence[int]] = TOTALSEG_STRIDES,
        conv_kernel_sizes: Sequence[int | Sequence[int]] = ((3, 3, 3),) * 6,
        deep_supervision: bool = False,
    ) -> None:
        super().__init__()
        depth, dims = [int(d) for d in depth], [int(d) for d in dims]
        n = len(dims)
        if n < 2 or len(depth) != n or any(d < 1 for d in depth) or any(c < 1 for c in dims):
            raise ValueError(
                f"STUNet depth={depth} and dims={dims} are invalid: need the same number (>= 2) of positive entries"
            )
        if len(pool_op_kernel_sizes) != n - 1:
            raise ValueError(
                f"STUNet pool_op_kernel_sizes has {len(pool_op_kernel_sizes)} entries; {n} stages need {n - 1} "
                "(one stride per downsampling; drop the leading [1,1,1] of an nnU-Net v2 plan)"
            )
        if len(conv_kernel_sizes) != n:
            raise ValueError(f"STUNet conv_kernel_sizes has {len(conv_kernel_sizes)} entries; {n} stages need {n}")
        strides = [_triple(s, "pool_op_kernel_sizes entry") for s in pool_op_kernel_sizes]
        kernels = [_triple(k, "conv_kernel_sizes entry") for k in conv_kernel_sizes]
        self.in_channels, self.out_channels = in_channels, out_channels
        self.depth, self.dims = tuple(depth), tuple(dims)
        self.pool_op_kernel_sizes, self.conv_kernel_sizes = tuple(strides), tuple(kernels)
        self.deep_supervision = deep_supervision

        context = [_stage(in_channels, dims[0], depth[0], kernels[0], (1, 1, 1))]
        context += [_stage(dims[d - 1], dims[d], depth[d], kernels[d], strides[d - 1]) for d in range(1, n)]
        self.conv_blocks_context = nn.ModuleList(context)
        # Decoder level u = 0 is the lowest resolution; it produces dims[-2-u] features.
        self.upsample_layers = nn.ModuleList(
            UpsampleNearest(dims[-1 - u], dims[-2 - u], strides[-1 - u]) for u in range(n - 1)
        )
        self.conv_blocks_localization = nn.ModuleList(
            _stage(2 * dims[-2 - u], dims[-2 - u], depth[-2 - u], kernels[-2 - u], (1, 1, 1)) for u in range(n - 1)
        )
        self.seg_outputs = nn.ModuleList(nn.Conv3d(dims[-2 - u], out_channels, 1) for u in range(n - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        skips: list[torch.Tensor] = []
        for stage in self.conv_blocks_context[:-1]:
            x = stage(x)
            skips.append(x)
        x = self.conv_blocks_context[-1](x)
        outputs: list[torch.Tensor] = []
        for u, (up, block, head) in enumerate(
            zip(self.upsample_layers, self.conv_blocks_localization, self.seg_outputs, strict=True)
        ):
            x = up(x)
            skip = skips[-1 - u]
            if x.shape[2:] != skip.shape[2:]:
                raise ValueError(
                    f"STUNet: upsampled {tuple(x.shape[2:])} does not match the skip {tuple(skip.shape[2:])} at "
                    f"decoder level {u}; each input axis must be divisible by the product of the strides "
                    f"{[list(s) for s in self.pool_op_kernel_sizes]} along it"
                )
            x = block(torch.cat((x, skip), dim=1))
            outputs.append(head(x))  # every head runs, as in the reference (and calibration reaches them all)
        return tuple(reversed(outputs)) if self.deep_supervision else outputs[-1]


def stunet(
    size: str,
    in_channels: int = 1,
    out_channels: int = 14,
    pool_op_kernel_sizes: Sequence[int | Sequence[int]] = TOTALSEG_STRIDES,
    deep_supervision: bool = False,
) -> STUNet:
    """A published STU-Net size (``"S"``, ``"B"``, ``"L"`` or ``"H"``) with 3x3x3 kernels, as the trainers build it."""
    key = size.upper()
    if key not in SIZES:
        raise ValueError(f"STU-Net size={size!r} is invalid; valid: {', '.join(SIZES)}")
    depth, dims = SIZES[key]
    return STUNet(in_channels, out_channels, depth, dims, pool_op_kernel_sizes, ((3, 3, 3),) * len(dims),
                  deep_supervision)  # fmt: skip
