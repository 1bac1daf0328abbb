"""Element formats: rounding onto integer and minifloat grids, and the shared scales of block formats.

All functions are pure tensor functions (no state) and round half-to-even, as hardware does.

* INT-N symmetric: ``clamp(round(v), -(2^(N-1)-1), 2^(N-1)-1)`` (paper eq. 1).
* Minifloats with E exponent bits and M mantissa bits (FP8 E4M3 "fn": max 448; FP4 E2M1: max 6), with
  subnormals and saturation at the largest finite value.
* OCP Microscaling (MX v1.0): a block of 32 elements shares an E8M0 scale
  ``X = 2^(floor(log2(max|v|)) - emax_elem)``; elements are E4M3 (MXFP8), E2M1 (MXFP4) or INT8 with an
  implied scale of 2^-6 (MXINT8).
* NVFP4: a block of 16 E2M1 elements shares an E4M3 scale ``round_e4m3(max|v| / 6 / g) * g`` where the
  per-tensor FP32 scale ``g = max|x| / (6 * 448)`` keeps block scales inside the E4M3 range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MiniFloat:
    """A sign + E exponent bits + M mantissa bits format without infinities (the "fn" variants)."""

    name: str
    exponent_bits: int
    mantissa_bits: int
    max_value: float

    @property
    def bias(self) -> int:
        return 2 ** (self.exponent_bits - 1) - 1

    @property
    def min_normal_exponent(self) -> int:
        return 1 - self.bias

    @property
    def max_exponent(self) -> int:
        """Unbiased exponent of the largest finite value (``emax`` in the OCP MX spec)."""
        return math.floor(math.log2(self.max_value))  # plain Python: no CPU tensor on the quantization path


E4M3 = MiniFloat("e4m3", exponent_bits=4, mantissa_bits=3, max_value=448.0)
E2M1 = MiniFloat("e2m1", exponent_bits=2, mantissa_bits=1, max_value=6.0)


def round_int_symmetric(v: torch.Tensor, qmax: int) -> torch.Tensor:
    """Round to the nearest integer (ties to even) and clamp to the narrow symmetric range [-qmax, qmax]."""
    return torch.clamp(torch.round(v), -qmax, qmax)


def round_minifloat(v: torch.Tensor, fmt: MiniFloat) -> torch.Tensor:
    """Round ``v`` to the nearest value representable in ``fmt`` (ties to even), saturating at ±max.

    For |v| with binade e = max(floor(log2|v|), e_min), the spacing of representable values is
    2^(e - M); rounding ``|v| / 2^(e-M)`` to an integer is exact in float32 because it only shifts the
    exponent. Values below the smallest normal use e_min, which yields the subnormal grid.
    """
    mag = v.abs()
    if v.requires_grad and torch.is_grad_enabled():
        _, exponent = torch.frexp(mag)  # mag = m * 2^exponent with m in [0.5, 1)
        binade = torch.clamp(exponent - 1, min=fmt.min_normal_exponent)
        step = torch.exp2((binade - fmt.mantissa_bits).to(v.dtype))
        rounded = torch.round(mag / step) * step
        return torch.copysign(torch.clamp(rounded, max=fmt.max_value), v)
    # the same operations in the same order, in place: two full-size temporaries instead of about seven
    exponent = torch.frexp(mag).exponent
    step = exponent.sub_(1).clamp_(min=fmt.min_normal_exponent).sub_(fmt.mantissa_bits).to(v.dtype).exp2_()
    del exponent
    return mag.div_(step).round_().mul_(step).clamp_(max=fmt.max_value).copysign_(v)


def e8m0_block_scale(block_amax: torch.Tensor, element_emax: int) -> torch.Tensor:
    """OCP MX shared scale: ``2^(floor(log2(amax)) - emax_elem)``, exponent clamped to E8M0's [-127, 127].

    Blocks that are all zero get scale 1 (their elements are zero whatever the scale).
    """
    safe = torch.where(block_amax > 0, block_amax, torch.ones_like(block_amax))
    _, exponent = torch.frexp(safe)
    shared = torch.clamp(exponent - 1 - element_emax, -127, 127)
    return torch.where(block_amax > 0, torch.exp2(shared.to(block_amax.dtype)), torch.ones_like(block_amax))


#: Element codecs of the block formats: (element rounding function, emax of the element format).
MXINT8_IMPLIED_SCALE = 2.0**-6  # MXINT8 elements are int8 in units of 2^-6 (range ±1.984375)


def quantize_mx_blocks(blocks: torch.Tensor, fmt: str) -> torch.Tensor:
    """Fake-quantize ``blocks`` (..., block) in an OCP MX format; the last axis is one block."""
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    if fmt == "mxfp8":
        scale = e8m0_block_scale(amax, E4M3.max_exponent)
        return _rescale(round_minifloat(blocks / scale, E4M3), scale, blocks)
    if fmt == "mxfp4":
        scale = e8m0_block_scale(amax, E2M1.max_exponent)
        return _rescale(round_minifloat(blocks / scale, E2M1), scale, blocks)
    if fmt == "mxint8":
        scale = e8m0_block_scale(amax, 0) * MXINT8_IMPLIED_SCALE
        return _rescale(round_int_symmetric(blocks / scale, 127), scale, blocks)
    raise ValueError(f"format={fmt!r} is not an MX format; valid: 'mxint8', 'mxfp8', 'mxfp4'")


def quantize_nvfp4_blocks(blocks: torch.Tensor, tensor_amax: torch.Tensor) -> torch.Tensor:
    """Fake-quantize ``blocks`` (..., 16) as NVFP4: E2M1 elements, E4M3 block scale, FP32 tensor scale."""
    global_scale = torch.where(
        tensor_amax > 0, tensor_amax / (E2M1.max_value * E4M3.max_value), torch.ones_like(tensor_amax)
    )
    block_amax = blocks.abs().amax(dim=-1, keepdim=True)
    block_scale = round_minifloat(block_amax / E2M1.max_value / global_scale, E4M3) * global_scale
    safe = torch.where(block_scale > 0, block_scale, torch.ones_like(block_scale))
    return _rescale(round_minifloat(blocks / safe, E2M1), block_scale, blocks)


def _rescale(codes: torch.Tensor, scale: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """``codes * scale``, in place on the fresh ``codes`` unless ``source`` needs gradients."""
    if source.requires_grad and torch.is_grad_enabled():
        return codes * scale
    return codes.mul_(scale)
