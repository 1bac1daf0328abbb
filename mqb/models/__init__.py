"""Networks mqb implements natively (MONAI provides the others), with the reference state-dict key names.

nnU-Net v2 is built by :mod:`mqb.models.nnunet` from ``dynamic-network-architectures`` (imported on use).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: public name -> (module, attribute); imported on first use, so ``python -m mqb.models --help`` needs no torch
_EXPORTS = {
    "MedFormer": ("medformer", "MedFormer"), "MedPTQUNet3D": ("medptq_unet", "UNet3D"),
    "MeshNet": ("meshnet", "MeshNet"), "STUNet": ("stunet", "STUNet"), "SegFormer3D": ("segformer3d", "SegFormer3D"),
    "TransUNet3D": ("transunet", "TransUNet3D"), "UNesT": ("unest", "UNesT"),
    "VISTA3DAuto": ("vista3d", "VISTA3DAuto"),
}  # fmt: skip

if TYPE_CHECKING:
    from mqb.models.medformer import MedFormer
    from mqb.models.medptq_unet import UNet3D as MedPTQUNet3D
    from mqb.models.meshnet import MeshNet
    from mqb.models.segformer3d import SegFormer3D
    from mqb.models.stunet import STUNet
    from mqb.models.transunet import TransUNet3D
    from mqb.models.unest import UNesT
    from mqb.models.vista3d import VISTA3DAuto


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mqb.models' has no attribute {name!r}")
    module, attr = _EXPORTS[name]
    return getattr(importlib.import_module(f"mqb.models.{module}"), attr)


__all__ = ["MedFormer", "MedPTQUNet3D", "MeshNet", "STUNet", "SegFormer3D", "TransUNet3D", "UNesT", "VISTA3DAuto"]
