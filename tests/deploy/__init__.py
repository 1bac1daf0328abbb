"""Shared small models for the mqb.deploy tests (seeded, 16^3 volumes, a few seconds on 2 cores)."""

from __future__ import annotations

import torch
from torch import nn

from mqb.deploy.isa import recipe_for_cpu
from mqb.quant import LayerRule, QuantRecipe, calibrate, quantize

SHAPE = (1, 1, 16, 16, 16)


def volume(seed: int, shape: tuple[int, ...] = SHAPE, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def small_net(seed: int = 0) -> nn.Module:
    """Conv 3^3 -> InstanceNorm -> LeakyReLU -> strided conv -> ReLU -> ConvTranspose 2^3 -> 1x1x1 head."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv3d(1, 8, 3, padding=1),
        nn.InstanceNorm3d(8, affine=True),
        nn.LeakyReLU(0.01),
        nn.Conv3d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.ConvTranspose3d(16, 8, 2, stride=2),
        nn.Conv3d(8, 4, 1),
    ).eval()


def deploy_recipe(**kwargs: object) -> QuantRecipe:
    """W8A8 with per-channel weights and per-tensor activations, as ``mqb.deploy`` runs it on this CPU: with 7-bit
    weights where the CPU's INT8 dot product saturates (``deploy.overflow_fix=auto``, :mod:`mqb.deploy.isa`)."""
    recipe = QuantRecipe.from_precision("w8a8", granularity="deploy", **kwargs)  # type: ignore[arg-type]
    return recipe_for_cpu(recipe)[0]


def deployable(net: nn.Module, rules: tuple[LayerRule, ...] = (), batches: int = 2) -> nn.Module:
    """:func:`deploy_recipe`, calibrated on random volumes."""
    quantize(net, deploy_recipe(rules=rules))
    calibrate(net, [volume(100 + i, (2, *SHAPE[1:])) for i in range(batches)])
    return net


class ResidualConcat(nn.Module):
    """A residual unit (conv + 1x1 shortcut read the same tensor) and a U-Net skip Concat feeding a conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv3d(1, 8, 3, padding=1)
        self.conv = nn.Conv3d(8, 8, 3, padding=1)
        self.shortcut = nn.Conv3d(8, 8, 1)
        self.head = nn.Conv3d(16, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = torch.relu(self.stem(x))
        y = torch.relu(self.conv(skip) + self.shortcut(skip))
        return self.head(torch.cat([skip, y], dim=1))


class IdentityResidual(nn.Module):
    """stem -> ReLU -> (conv + identity): the ReLU output is read by a quantized conv and by a float Add."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv3d(1, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.conv = nn.Conv3d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.stem(x))
        return self.conv(y) + y


class InPlaceNormAct(nn.Module):
    """nnU-Net's conv -> InstanceNorm -> LeakyReLU(inplace=True) -> conv, with an identity Add reading the
    activation too (a float reader of the tensor the conv reads)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv3d(1, 4, 3, padding=1)
        self.norm = nn.InstanceNorm3d(4, affine=True)
        self.act = nn.LeakyReLU(0.01, inplace=True)
        self.conv = nn.Conv3d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.norm(self.stem(x)))
        return self.conv(y) + y


class SharedActResidual(nn.Module):
    """MONAI's UnetResBlock: one in-place LeakyReLU module called twice, after the first norm and after
    ``out += residual`` (a value written in place by a function); a conv reads the block's output."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv3d(1, 4, 3, padding=1)
        self.conv1 = nn.Conv3d(4, 4, 3, padding=1)
        self.norm1 = nn.InstanceNorm3d(4, affine=True)
        self.conv2 = nn.Conv3d(4, 4, 3, padding=1)
        self.norm2 = nn.InstanceNorm3d(4, affine=True)
        self.lrelu = nn.LeakyReLU(0.01, inplace=True)
        self.head = nn.Conv3d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.stem(x)
        out = self.lrelu(self.norm1(self.conv1(residual)))
        out = self.norm2(self.conv2(out))
        out += residual
        return self.head(self.lrelu(out))
