"""PTQ methods: exact rewrites of quantized layers that make them easier to quantize, and corrections.

Each method is a small class with ``layers`` (selectors, see :mod:`mqb.quant.selectors`) and ``apply``:

* :class:`SmoothQuant` (Xiao et al. 2023): per-input-channel scales move activation range into the weights.
* :class:`LowRankSVD` (SVDQuant-like, Li et al. 2024): a rank-r float branch takes the weight's top singular
  directions; the residual is quantized.
* :class:`HadamardRotation` (QuaRot-like, Ashkboos et al. 2024): an orthogonal block-Hadamard rotation of the
  input channels spreads outliers; its inverse is folded into the weight.
* :class:`BiasCorrection` (Nagel et al. 2019): after calibration, the mean output error per channel is removed.
* :class:`GPTQ` (Frantar et al. 2023): weight rounding that spreads each column's error over the remaining
  columns through the inverse Hessian of the layer's reconstruction loss.
* :class:`SharedInputRanges` (``calibration.shared_ranges``): quantizers reading one tensor (directly or
  through ``torch.cat``) share its largest calibrated range, as deployment toolkits quantize each tensor once.

Methods run in the order given (``smoothquant`` then ``svd`` is the paper's "Activation Smoothing+SVD"), with
:func:`apply_methods` between :func:`mqb.quant.quantize` and :func:`mqb.quant.calibrate`, and post-calibration
methods after it (see :class:`mqb.lit.callbacks.QuantizationCallback`).
"""

from mqb.quant.methods.base import MethodReport, PTQMethod, apply_methods, float_output, quantizers_disabled
from mqb.quant.methods.bias_correction import BiasCorrection
from mqb.quant.methods.gptq import GPTQ
from mqb.quant.methods.rotation import HadamardRotation, block_hadamard
from mqb.quant.methods.shared_ranges import SharedInputRanges, shared_input_groups
from mqb.quant.methods.smoothquant import SmoothQuant, smoothing_factors
from mqb.quant.methods.svd import LowRankSVD

__all__ = [
    "BiasCorrection",
    "GPTQ",
    "HadamardRotation",
    "LowRankSVD",
    "MethodReport",
    "PTQMethod",
    "SharedInputRanges",
    "SmoothQuant",
    "apply_methods",
    "block_hadamard",
    "float_output",
    "quantizers_disabled",
    "shared_input_groups",
    "smoothing_factors",
]
