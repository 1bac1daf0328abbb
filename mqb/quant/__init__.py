"""mqb.quant: the quantization engine (usable without Hydra or Lightning).

from mqb.quant import QuantRecipe, ptq, quantize, calibrate, dequantize, summarize, fake_quantize
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
from mqb.quant.layers import LayerInfo, QuantLayer
from mqb.quant.ptq import PTQReport, ptq
from mqb.quant.quantizer import TensorQuantizer, WeightQuantizer
from mqb.quant.realizability import Realizability, realizability
from mqb.quant.recipe import LayerPlan, LayerRule, QuantRecipe
from mqb.quant.schemes import SCHEMES
from mqb.quant.spec import FORMATS, GRANULARITIES, OBSERVERS, PRECISIONS, Precision, QuantSpec, get_precision
from mqb.quant.summary import QuantSummary, summarize

__all__ = [
    "FORMATS",
    "GRANULARITIES",
    "KERNELS",
    "OBSERVERS",
    "PRECISIONS",
    "SCHEMES",
    "LayerInfo",
    "LayerPlan",
    "LayerRule",
    "PTQReport",
    "Precision",
    "QuantAttention",
    "QuantLayer",
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
    "set_kernel",
    "summarize",
]
