"""Fake quantization (quantize then dequantize) of tensors: the numerical core of mqb.

Everything here is a pure function of its inputs. Static scales are passed in as ``amax`` (symmetric) or
``lo``/``hi`` (asymmetric); otherwise they are computed from ``x`` itself (dynamic quantization).
"""

from __future__ import annotations

import torch

from mqb.quant.formats import (
    E4M3,
    quantize_mx_blocks,
    quantize_nvfp4_blocks,
    round_int_symmetric,
    round_minifloat,
)
from mqb.quant.granularity import absmax, apply_in_groups, minmax
from mqb.quant.spec import QuantSpec


def _safe_scale(scale: torch.Tensor) -> torch.Tensor:
    """Scale 0 (an all-zero group) becomes 1 so that zeros map to zero without dividing by zero; scales below
    the smallest normal float are raised to it so that their reciprocal stays finite."""
    tiny = torch.finfo(scale.dtype).tiny
    return torch.where(scale > 0, torch.clamp(scale, min=tiny), torch.ones_like(scale))


def int_scale(amax: torch.Tensor, bits: int) -> torch.Tensor:
    """Paper eq. 1: ``S = max|X| / (2^(N-1) - 1)``."""
    return amax / (2 ** (bits - 1) - 1)


def fake_quant_symmetric(x: torch.Tensor, amax: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Symmetric fake quantization with the given ``amax`` (broadcastable to ``x``).

    INT: ``round(x * (1/S)) * S`` clamped to ±(2^(N-1)-1), S from eq. 1 (multiplying by the reciprocal, as
    ``torch.fake_quantize_per_*_affine`` does, so results match torch to the bit).
    FP8 E4M3: ``S = max|X| / 448`` and the scaled value is rounded onto the E4M3 grid.
    """
    if spec.format == "int":
        scale = _safe_scale(int_scale(amax, spec.bits))
        if x.requires_grad and torch.is_grad_enabled():
            return round_int_symmetric(x * torch.reciprocal(scale), spec.qmax) * scale
        # the same arithmetic, in place on one fresh tensor: 2.4x faster on large activations
        out = x * torch.reciprocal(scale)
        return out.round_().clamp_(-spec.qmax, spec.qmax).mul_(scale)
    if spec.format == "fp8_e4m3":
        scale = _safe_scale(amax / E4M3.max_value)
        return round_minifloat(x / scale, E4M3) * scale
    raise ValueError(f"format={spec.format!r} has no per-element scale; it is quantized in blocks")


def fake_quant_affine(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
    """Asymmetric INT-N: ``S = (max - min) / (2^N - 1)``, ``Z = round(-min / S)``, levels 0..2^N-1.

    The range is first widened to include 0 so that zero is exactly representable.
    """
    lo = torch.clamp(lo, max=0.0)
    hi = torch.clamp(hi, min=0.0)
    levels = 2**bits - 1
    scale = _safe_scale((hi - lo) / levels)
    zero_point = torch.clamp(torch.round(-lo / scale), 0, levels)
    q = torch.clamp(torch.round(x * torch.reciprocal(scale)) + zero_point, 0, levels)
    return (q - zero_point) * scale


def _fake_quant_blocks(blocks: torch.Tensor, spec: QuantSpec, tensor_amax: torch.Tensor | None) -> torch.Tensor:
    if spec.format == "nvfp4":
        assert tensor_amax is not None
        return quantize_nvfp4_blocks(blocks, tensor_amax)
    if spec.format in ("mxint8", "mxfp8", "mxfp4"):
        return quantize_mx_blocks(blocks, spec.format)
    if not spec.symmetric:
        return fake_quant_affine(blocks, blocks.amin(-1, keepdim=True), blocks.amax(-1, keepdim=True), spec.bits)
    return fake_quant_symmetric(blocks, blocks.abs().amax(-1, keepdim=True), spec)


def quantize_dequantize(
    x: torch.Tensor,
    spec: QuantSpec,
    *,
    axis: int | None = None,
    amax: torch.Tensor | None = None,
    lo: torch.Tensor | None = None,
    hi: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fake-quantize ``x`` according to ``spec``.

    ``axis`` is the channel axis for ``per_channel`` and the reduction axis along which blocks are formed for
    ``per_group`` (default: last). ``amax`` (symmetric) or ``lo``/``hi`` (asymmetric) give static scales;
    when absent the scales are computed from ``x``. Half-precision inputs are quantized in float32.
    """
    dtype = x.dtype
    xf = x.float() if dtype in (torch.float16, torch.bfloat16) else x
    if spec.granularity == "per_group":
        group_axis = -1 if axis is None else axis
        tensor_amax = xf.detach().abs().amax() if spec.format == "nvfp4" else None
        out = apply_in_groups(xf, group_axis, int(spec.group_size), lambda b: _fake_quant_blocks(b, spec, tensor_amax))
    elif not spec.symmetric:
        if lo is None or hi is None:
            lo, hi = minmax(xf, spec.granularity, axis)
        out = fake_quant_affine(xf, lo, hi, spec.bits)
    else:
        if amax is None:
            amax = absmax(xf, spec.granularity, axis)
        out = fake_quant_symmetric(xf, amax, spec)
    return out.to(dtype)


def fake_quantize(
    x: torch.Tensor,
    bits: int = 8,
    granularity: str = "per_tensor",
    axis: int | None = None,
    *,
    group_size: int | None = None,
    symmetric: bool = True,
    format: str = "int",
) -> torch.Tensor:
    """Functional fake quantization for notebooks and tests (scales computed from ``x``).

    Args:
        x: the tensor.
        bits: integer bit width N; symmetric scale ``max|x| / (2^(N-1)-1)`` (paper eq. 1).
        granularity: ``per_tensor``, ``per_channel`` (``axis`` = channel axis), ``per_token`` (last axis is
            the hidden size; one scale per token), ``per_voxel`` (x is N, C, D, H, W; one scale per n, d, h, w
            across C) or ``per_group`` (blocks of ``group_size`` along ``axis``, default last).
        group_size: elements per scale for ``per_group`` (default 32).
        symmetric: symmetric (eq. 1) or asymmetric affine quantization.
        format: ``int`` or a simulated format (``fp8_e4m3``, ``mxint8``, ``mxfp8``, ``mxfp4``, ``nvfp4``).

    Example:
        >>> x = torch.tensor([[-1.0, 0.5], [0.25, 2.0]])
        >>> fake_quantize(x, bits=8, granularity="per_channel", axis=0)  # row scales 1/127 and 2/127
        tensor([[-1.0000,  0.5039],
                [ 0.2520,  2.0000]])
    """
    spec = QuantSpec(bits=bits, format=format, granularity=granularity, symmetric=symmetric, group_size=group_size)
    return quantize_dequantize(x, spec, axis=axis)


def quant_scale(
    x: torch.Tensor, bits: int = 8, granularity: str = "per_tensor", axis: int | None = None
) -> torch.Tensor:
    """The symmetric INT scales S (eq. 1) that :func:`fake_quantize` uses, keepdim-shaped against ``x``."""
    QuantSpec(bits=bits, granularity=granularity)  # validates the arguments
    return int_scale(absmax(x, granularity, axis), bits)
