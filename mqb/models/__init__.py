"""Networks mqb implements natively (MONAI provides the others), with the reference state-dict key names.

nnU-Net v2 is built by :mod:`mqb.models.nnunet` from ``dynamic-network-architectures`` (imported on use).
"""

from mqb.models.medformer import MedFormer
from mqb.models.medptq_unet import UNet3D as MedPTQUNet3D
from mqb.models.meshnet import MeshNet
from mqb.models.segformer3d import SegFormer3D
from mqb.models.stunet import STUNet
from mqb.models.transunet import TransUNet3D
from mqb.models.unest import UNesT
from mqb.models.vista3d import VISTA3DAuto

__all__ = ["MedFormer", "MedPTQUNet3D", "MeshNet", "STUNet", "SegFormer3D", "TransUNet3D", "UNesT", "VISTA3DAuto"]
