"""MedPTQ ``UNet3D``: the "U-Net" of MedPTQ / MedQuanBench Table 5 (5,646,606 parameters at base 16, 14 classes).

A native re-implementation from the architecture facts of hrlblab/PTQ ``networks/Unet.py`` (no code taken) whose
state-dict keys and shapes (118 entries, BatchNorm buffers included) equal the reference's, so its checkpoints
load strictly. It is not MONAI's UNet (no MONAI configuration has this parameter count):

* ``inc``: DoubleConv, [Conv3x3x3 (no bias) -> BatchNorm -> ReLU] x 2 at ``base_features`` channels
  (keys ``inc.double_conv.{0,1,3,4}.*``);
* ``down1..4``: the same pair with stride 2 on the first conv, channels base x (2, 4, 8, 16)
  (keys ``down{i}.down_conv.{0,1,3,4}.*``);
* ``up1..4``: ConvTranspose 2x2x2 stride 2 (bias) halving the channels, concatenate (skip, upsampled), DoubleConv
  (keys ``up{i}.up.*``, ``up{i}.conv.double_conv.*``);
* ``outc.conv``: 1x1x1 conv (bias) to the classes.

Inputs need spatial sizes divisible by 16 (four stride-2 stages; ``ValueError`` otherwise).
"""

from __future__ import annotations

import torch
from torch import nn


def _conv_pair(in_channels: int, out_channels: int, stride: int) -> list[nn.Module]:
    return [
        nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm3d(out_channels),
        nn.ReLU(inplace=True),
        nn.Conv3d(out_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm3d(out_channels),
        nn.ReLU(inplace=True),
    ]


class DoubleConv(nn.Module):
    """[Conv3x3x3 -> BatchNorm -> ReLU] x 2 at full resolution."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.double_conv = nn.Sequential(*_conv_pair(in_channels, out_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.double_conv(x)


class Down(nn.Module):
    """[Conv3x3x3 -> BatchNorm -> ReLU] x 2, the first conv with stride 2."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.down_conv = nn.Sequential(*_conv_pair(in_channels, out_channels, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_conv(x)


class Up(nn.Module):
    """ConvTranspose 2x2x2 s2 (in -> out), concatenate (skip, upsampled), DoubleConv (2·out -> out)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose3d(in_channels, out_channels, 2, stride=2)
        self.conv = DoubleConv(in_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class OutConv(nn.Module):
    """1x1x1 classifier conv."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class UNet3D(nn.Module):
    """MedPTQ UNet3D.

    Args:
        in_channels: input channels (BTCV: 1); the reference calls it ``n_channels`` (accepted as a keyword too).
        out_channels: output classes (BTCV: 14); the reference's ``n_classes`` (accepted as a keyword too).
        base_features: channels of the first stage; stages have base x (1, 2, 4, 8, 16).

    The positional order is the reference's, so ``UNet3D(1, 14, 16)`` builds the Table 5 model.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 14,
        base_features: int = 16,
        *,
        n_channels: int | None = None,
        n_classes: int | None = None,
    ) -> None:
        super().__init__()
        in_channels = in_channels if n_channels is None else n_channels
        out_channels = out_channels if n_classes is None else n_classes
        f = [base_features * 2**i for i in range(5)]
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.inc = DoubleConv(in_channels, f[0])
        self.down1 = Down(f[0], f[1])
        self.down2 = Down(f[1], f[2])
        self.down3 = Down(f[2], f[3])
        self.down4 = Down(f[3], f[4])
        self.up1 = Up(f[4], f[3])
        self.up2 = Up(f[3], f[2])
        self.up3 = Up(f[2], f[1])
        self.up4 = Up(f[1], f[0])
        self.outc = OutConv(f[0], out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or any(int(s) % 16 for s in x.shape[2:]):
            raise ValueError(
                f"UNet3D needs a (B, C, D, H, W) input with D, H, W divisible by 16 (4 stride-2 stages), "
                f"got shape {tuple(x.shape)}"
            )
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        x4 = self.down3(x3)
        x = self.up1(self.down4(x4), x4)
        x = self.up2(x, x3)
        x = self.up3(x, x2)
        return self.outc(self.up4(x, x1))
