"""Lightning modules and callbacks: evaluation, quantization, training."""

from mqb.lit.callbacks import QuantizationCallback
from mqb.lit.evaluator import SegmentationEvaluator
from mqb.lit.trainer import SegmentationTrainer

__all__ = ["QuantizationCallback", "SegmentationEvaluator", "SegmentationTrainer"]
