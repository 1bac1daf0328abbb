"""MeshNet (Fedorov et al. 2017; the brainchop models): a fully convolutional stack of dilated 3x3x3 convolutions.

Conv i (i = 0..n-1): Conv3d(k=3, stride 1, padding = dilation, bias) followed by the activation; the last layer
is a 1x1x1 conv to the classes. No normalisation, no dropout. State-dict keys are ``model.{2*i}.weight`` /
``model.{2*i}.bias`` (odd indices are the activations), as in brainchop's released safetensors, so those
weights load without conversion. Hyper-parameters of the five released models are in
``shared/data/brainchop_t1_meshnet/PROVENANCE.md`` and ``conf/model/meshnet_*.yaml``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {"elu": nn.ELU, "relu": nn.ReLU}


class MeshNet(nn.Module):
    """MeshNet with ``len(dilations)`` dilated conv layers of ``channels`` features and a 1x1x1 classifier."""

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 18,
        channels: int = 21,
        dilations: Sequence[int] = (1, 2, 4, 8, 16, 8, 4, 2, 1),
        activation: str = "elu",
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"MeshNet activation={activation!r} is invalid; valid: {', '.join(ACTIVATIONS)}")
        layers: list[nn.Module] = []
        features = in_channels
        for dilation in dilations:
            layers += [nn.Conv3d(features, channels, 3, padding=dilation, dilation=dilation), ACTIVATIONS[activation]()]
            features = channels
        layers.append(nn.Conv3d(features, out_channels, 1))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)
