"""Networks mqb implements natively (MONAI provides the others)."""

from mqb.models.meshnet import MeshNet

__all__ = ["MeshNet"]
