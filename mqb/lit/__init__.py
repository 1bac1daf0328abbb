"""Lightning modules and callbacks: evaluation, quantization, training."""

import logging
import warnings

from mqb.lit.callbacks import QuantizationCallback
from mqb.lit.evaluator import SegmentationEvaluator
from mqb.lit.trainer import SegmentationTrainer

__all__ = ["QuantizationCallback", "SegmentationEvaluator", "SegmentationTrainer", "quiet_lightning"]


def quiet_lightning() -> None:
    """Silence what Lightning prints for every Trainer (``GPU available ...``, ``TPU available ...``, the LitLogger
    advertisement) and a deprecation warning raised inside Lightning's own code: in a sweep they repeat for every
    config. Warnings and errors still show; mqb writes the device into every record (``record["device"]``)."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric.utilities.rank_zero").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=Warning)
