"""mqb.quant: the quantization engine (usable without Hydra or Lightning).

from mqb.quant import QuantRecipe, ptq, quantize, calibrate, dequantize, summarize, fake_quantize

Extension points, one registry each: :func:`register_format` (element formats: the codec table used by fake
quantization and realizability), :func:`register_granularity` (tensor granularities), :func:`register_observer`
(calibration observers), :func:`register_quant_module` (quantized twins of layers and attention blocks),
:data:`mqb.quant.schemes.SCHEMES` (layer-level schemes), :data:`PRESETS` (precision presets; the ``precision``
config group is written from it).
"""

from mqb.quant.api import (
    apply_input_ranges,
    calibrate,
    collect_input_ranges,
    dequantize,
    held_bytes,
    needs_calibration,
    plan,
    quantizable_layers,
    quantize,
    quantized_layers,
    set_kernel,
)
from mqb.quant.attention import QuantAttention, register_attention
from mqb.quant.fake_quant import KERNELS, fake_quantize, quant_scale, quantize_dequantize
from mqb.quant.formats import Format, register_format
from mqb.quant.granularity import Granularity, register_granularity
from mqb.quant.layers import LayerInfo, QuantLayer
from mqb.quant.observers import ObserverEntry, register_observer
from mqb.quant.ptq import PTQReport, ptq
from mqb.quant.quantizer import TensorQuantizer, WeightQuantizer
from mqb.quant.realizability import Realizability, realizability
from mqb.quant.recipe import LayerPlan, LayerRule, QuantRecipe
from mqb.quant.registry import QuantModule, register_quant_module
from mqb.quant.schemes import SCHEMES
from mqb.quant.spec import (
    FORMATS,
    GRANULARITIES,
    OBSERVERS,
    PRECISIONS,
    PRESETS,
    Precision,
    QuantSpec,
    get_precision,
)
from mqb.quant.summary import QuantSummary, summarize

__all__ = [
    "FORMATS",
    "GRANULARITIES",
    "KERNELS",
    "OBSERVERS",
    "PRECISIONS",
    "PRESETS",
    "SCHEMES",
    "Format",
    "Granularity",
    "LayerInfo",
    "LayerPlan",
    "LayerRule",
    "ObserverEntry",
    "PTQReport",
    "Precision",
    "QuantAttention",
    "QuantLayer",
    "QuantModule",
    "QuantRecipe",
    "QuantSpec",
    "QuantSummary",
    "Realizability",
    "TensorQuantizer",
    "WeightQuantizer",
    "apply_input_ranges",
    "calibrate",
    "collect_input_ranges",
    "dequantize",
    "fake_quantize",
    "get_precision",
    "held_bytes",
    "needs_calibration",
    "plan",
    "ptq",
    "quant_scale",
    "quantizable_layers",
    "quantize",
    "quantize_dequantize",
    "quantized_layers",
    "realizability",
    "register_attention",
    "register_format",
    "register_granularity",
    "register_observer",
    "register_quant_module",
    "set_kernel",
    "summarize",
]
