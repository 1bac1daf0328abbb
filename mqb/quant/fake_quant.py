"""Fake quantization (quantize then dequantize) of tensors: the numerical core of mqb.

Everything here is a pure function of its inputs. Static scales are passed in as ``amax`` (symmetric) or
``lo``/``hi`` (asymmetric); otherwise they are computed from ``x`` itself (dynamic quantization).

Kernels (``kernel=`` of :func:`quantize_dequantize`, ``quant.kernel`` of ``mqb.eval``, :func:`mqb.quant.set_kernel`):

* ``eager``: the formulas below, one ATen operation after another;
* ``compiled``: the same function through ``torch.compile`` (inductor: C++/OpenMP on the CPU, Triton on CUDA), so
  the scale computation, rounding, clamping and rescaling of one tensor run as one fused kernel (plus its block or
  token reduction). Bit for bit the eager result (``tests/quant/test_kernels.py``). One compiled function per
  (spec, axis, input signature), each with its own code object and so its own recompilation budget
  (``torch._dynamo.config.recompile_limit``), traced with dynamic shapes: the last, smaller sliding-window batch
  and a whole volume reuse the kernel of the first window. If compilation fails (no C++ compiler, no Triton), one
  warning is printed and that device falls back to eager for the rest of the process.
* ``auto`` (default of the quantizer modules): on the CPU, ``compiled`` for tensors of at least
  :data:`CPU_COMPILE_MIN_NUMEL` elements in the formats whose eager form takes many passes (FP8, MX, NVFP4,
  per-group and dynamic INT), where the fused kernel measured several times faster; ``eager`` otherwise (static
  INT is already a few in-place passes, and small tensors do not repay a compilation). ``eager`` on CUDA: off the
  CPU, inductor rewrites a division by a constant (``amax / 127``, ``/ 448``) as a multiplication by its rounded
  reciprocal (``div_prim`` in ``torch/_inductor/lowering.py``), so a compiled scale can differ from eager's in
  the last place and move values to the next level; ATen's CUDA kernels divide as the CPU does, so ``auto`` keeps
  a GPU record equal to the CPU's. ``compiled`` on CUDA is an explicit choice, compiled with Triton's IEEE
  division and without flush-to-zero (``eager_numerics`` options). Always ``eager`` for tensors that need
  gradients and on devices other than CPU and CUDA (meta).
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable

import torch

from mqb.quant.formats import FORMATS, int_scale
from mqb.quant.formats import safe_scale as _safe_scale
from mqb.quant.granularity import GRANULARITIES, absmax, apply_in_groups, minmax
from mqb.quant.spec import QuantSpec


def symmetric_scales(amax: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(S, 1/S or None)`` of a per-element-scaled format (INT: ``(S, 1/S)``, FP8 E4M3: ``(S, None)``) for the
    given ``amax``, from the codec table (what :func:`fake_quant_symmetric` computes first; a static weight
    quantizer keeps them between forwards)."""
    scales = FORMATS[spec.format].scales
    if scales is None:
        raise ValueError(f"format={spec.format!r} has no per-element scale; it is quantized in blocks")
    return scales(amax, spec)


def fake_quant_scaled(
    x: torch.Tensor,
    spec: QuantSpec,
    scale: torch.Tensor,
    reciprocal: torch.Tensor | None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric fake quantization with the scales of :func:`symmetric_scales` (the format's codec); ``out``: the
    tensor to write into (``x`` itself), for a codec that takes it (:attr:`mqb.quant.formats.Format.in_place`)."""
    quantize = FORMATS[spec.format].quantize_scaled
    assert quantize is not None
    if out is None:
        return quantize(x, spec, scale, reciprocal)
    return quantize(x, spec, scale, reciprocal, out=out)  # type: ignore[call-arg]


def fake_quant_symmetric(x: torch.Tensor, amax: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Symmetric fake quantization with the given ``amax`` (broadcastable to ``x``).

    INT: ``round(x * (1/S)) * S`` clamped to ±(2^(N-1)-1), S from eq. 1 (multiplying by the reciprocal, as
    ``torch.fake_quantize_per_*_affine`` does, so results match torch to the bit).
    FP8 E4M3: ``S = max|X| / 448`` and the scaled value is rounded onto the E4M3 grid.
    """
    scale, reciprocal = symmetric_scales(amax, spec)
    return fake_quant_scaled(x, spec, scale, reciprocal)


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
    quantize_blocks = FORMATS[spec.format].quantize_blocks
    if quantize_blocks is not None:  # a block-scaled format: its codec sets the block's scale
        return quantize_blocks(blocks, tensor_amax)
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
    kernel: str = "eager",
    in_place: bool = False,
) -> torch.Tensor:
    """Fake-quantize ``x`` according to ``spec``.

    ``axis`` is the channel axis for ``per_channel`` and the reduction axis along which blocks are formed for
    ``per_group`` (default: last). ``amax`` (symmetric) or ``lo``/``hi`` (asymmetric) give static scales;
    when absent the scales are computed from ``x``. Half-precision inputs are quantized in float32.
    ``kernel``: ``eager``, ``compiled`` or ``auto`` (module docstring); the result is the same to the bit.
    ``in_place``: the caller no longer needs ``x``: write the result into ``x`` and return ``x`` where that saves
    a full-size tensor (a compiled kernel whose result is laid out as ``x``; eager INT with per-tensor, per-channel,
    per-token or per-voxel scales; eager blocks, copied back), else return a new tensor as without it. Same values,
    same layout either way.
    """
    if kernel != "eager" and choose_kernel(kernel, spec, x) == "compiled":
        return _run_compiled(x, spec, axis, amax, lo, hi, in_place=in_place)
    form = _eager_in_place_form(x, spec) if in_place else None
    if form == "blocks":
        return x.copy_(_fake_quant_grouped(x, spec, axis))  # no copy of x beside the blocks and the result
    if form == "scaled":
        amax = absmax(x, spec.granularity, axis) if amax is None else amax
        return fake_quant_scaled(x, spec, *symmetric_scales(amax, spec), out=x)
    return _quantize_dequantize_eager(x, spec, axis, amax, lo, hi)


def _fake_quant_grouped(xf: torch.Tensor, spec: QuantSpec, axis: int | None) -> torch.Tensor:
    """Blocks of ``group_size`` along ``axis`` (default last), each fake-quantized by the format's codec; the result
    has the grouped axis innermost in memory."""
    group_axis = -1 if axis is None else axis
    tensor_amax = xf.detach().abs().amax() if FORMATS[spec.format].needs_tensor_amax else None
    return apply_in_groups(xf, group_axis, int(spec.group_size), lambda b: _fake_quant_blocks(b, spec, tensor_amax))


def _eager_in_place_form(x: torch.Tensor, spec: QuantSpec) -> str | None:
    """How the eager path can write its fake quantization into ``x`` (float32, needing no gradient): ``blocks``
    (a grouped spec on a dense ``x``: the block result copied back), ``scaled`` (a symmetric per-element-scaled
    format whose codec takes ``out=``, :attr:`mqb.quant.formats.Format.in_place`), or ``None``."""
    if x.dtype != torch.float32 or (x.requires_grad and torch.is_grad_enabled()):
        return None
    if GRANULARITIES[spec.granularity].grouped:
        return "blocks" if x.is_contiguous() else None
    return "scaled" if FORMATS[spec.format].in_place and spec.symmetric else None


def _quantize_dequantize_eager(
    x: torch.Tensor,
    spec: QuantSpec,
    axis: int | None,
    amax: torch.Tensor | None,
    lo: torch.Tensor | None,
    hi: torch.Tensor | None,
) -> torch.Tensor:
    dtype = x.dtype
    xf = x.float() if dtype in (torch.float16, torch.bfloat16) else x
    if GRANULARITIES[spec.granularity].grouped:
        out = _fake_quant_grouped(xf, spec, axis)
        if out.stride() != xf.stride():
            # laid out as the input (not with the grouped axis innermost, as the blocks were formed): the layer reading
            # it runs the algorithm it runs on the float input, and an input quantizer can write it into its input
            out = torch.empty_like(xf).copy_(out)
    elif not spec.symmetric:
        if lo is None or hi is None:
            lo, hi = minmax(xf, spec.granularity, axis)
        out = fake_quant_affine(xf, lo, hi, spec.bits)
    else:
        if amax is None:
            amax = absmax(xf, spec.granularity, axis)
        out = fake_quant_symmetric(xf, amax, spec)
    return out.to(dtype)


# -- kernels -------------------------------------------------------------------------------------------------
#: ``quant.kernel`` values: how the fake quantization of a tensor runs (module docstring).
KERNELS: tuple[str, ...] = ("auto", "eager", "compiled")

#: ``auto`` on the CPU compiles tensors from this size up (a 96^3 window with 16 channels has 14 M elements; weights
#: of 3D convolutions up to a few million): below it the one-off compilation (2-15 s on 2 cores) is not repaid.
CPU_COMPILE_MIN_NUMEL = 1 << 20

#: inductor options that keep Triton's arithmetic that of ATen's CUDA kernels: IEEE-rounded division (Triton's
#: ``/`` is approximate by default) and subnormals kept (no flush-to-zero); no effect on the CPU's C++ kernels
_EAGER_NUMERICS = {"eager_numerics.division_rounding": True, "eager_numerics.disable_ftz": True}

#: (spec, axis, input signature) -> its compiled function; ``None`` once it hit dynamo's recompilation limit
_COMPILED: dict[tuple, Callable[..., torch.Tensor] | None] = {}
#: device type -> why compiled fake quantization failed there (that device then runs eager)
_COMPILE_FAILED: dict[str, str] = {}


def check_kernel(kernel: str) -> str:
    """``kernel`` if it is one of :data:`KERNELS`, else a ``ValueError`` naming ``quant.kernel`` and the choices."""
    if kernel not in KERNELS:
        raise ValueError(f"quant.kernel={kernel!r} is invalid; valid: {', '.join(repr(k) for k in KERNELS)}")
    return kernel


def _many_pass_eager(spec: QuantSpec) -> bool:
    """Formats and granularities whose eager form is many full-size passes (minifloat rounding via frexp/exp2,
    block reshapes, per-element dynamic scales); static INT is one multiply and three in-place passes."""
    return FORMATS[spec.format].many_pass or GRANULARITIES[spec.granularity].grouped or bool(spec.dynamic)


def choose_kernel(kernel: str, spec: QuantSpec, x: torch.Tensor) -> str:
    """``eager`` or ``compiled``: what ``kernel`` (``auto`` / ``eager`` / ``compiled``) runs for ``x``."""
    check_kernel(kernel)
    device = x.device.type
    if kernel == "eager" or device not in ("cpu", "cuda") or device in _COMPILE_FAILED:
        return "eager"
    if x.requires_grad and torch.is_grad_enabled():
        return "eager"  # the fused kernel is for inference; gradients (STE) go through the eager formulas
    if kernel == "compiled":
        return "compiled"
    if device == "cuda":
        return "eager"  # the CPU's arithmetic (module docstring)
    return "compiled" if _many_pass_eager(spec) and x.numel() >= CPU_COMPILE_MIN_NUMEL else "eager"


def _signature(t: torch.Tensor | None) -> tuple | None:
    """What dynamo specialises a tensor argument on even with dynamic shapes: rank, dtype, which sizes are 1, dense
    or strided, inference tensor or not. Tensors that differ in these get compiled functions of their own."""
    if t is None:
        return None
    return (t.ndim, t.dtype, tuple(size == 1 for size in t.shape), t.is_contiguous(), t.is_inference())


def _group_signature(x: torch.Tensor, spec: QuantSpec, axis: int | None) -> tuple[bool, bool] | None:
    """Per-group: whether the grouped axis needs padding and whether it holds a single group (both are branches
    or size-1 specialisations in the traced code)."""
    if not GRANULARITIES[spec.granularity].grouped or x.ndim == 0:
        return None
    length, size = x.shape[(-1 if axis is None else axis) % x.ndim], int(spec.group_size or 1)
    return (length % size == 0, length <= size)


#: (spec, axis, x's shape, strides and dtype, ranges' signatures) -> the strides of the eager result
_LAYOUTS: dict[tuple, tuple[int, ...]] = {}


def _eager_strides(
    x: torch.Tensor,
    spec: QuantSpec,
    axis: int | None,
    amax: torch.Tensor | None,
    lo: torch.Tensor | None,
    hi: torch.Tensor | None,
) -> tuple[int, ...]:
    """The strides of :func:`_quantize_dequantize_eager`'s result for such inputs, from a run on the meta device
    (no data touched), remembered per input layout."""
    key = (spec, axis, x.dtype, tuple(x.shape), x.stride(), _signature(amax), _signature(lo), _signature(hi))
    strides = _LAYOUTS.get(key)
    if strides is None:

        def meta(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")

        strides = _quantize_dequantize_eager(meta(x), spec, axis, meta(amax), meta(lo), meta(hi)).stride()  # type: ignore[arg-type]
        if len(_LAYOUTS) > 4096:  # shapes seen in one process are few; never grow without bound
            _LAYOUTS.clear()
        _LAYOUTS[key] = strides
    return strides


def _compiled_for(
    spec: QuantSpec,
    axis: int | None,
    x: torch.Tensor,
    amax: torch.Tensor | None,
    lo: torch.Tensor | None,
    hi: torch.Tensor | None,
    in_place: bool = False,
    scaled: bool = False,
) -> tuple[tuple, Callable[..., torch.Tensor] | None]:
    """(key, the compiled fake quantization of one (spec, axis, input signature, in place or not)), made on first
    use; ``None`` where that key hit the recompilation limit."""
    key = (spec, axis, x.device.type, _signature(x), _group_signature(x, spec, axis))
    key += (_signature(amax), _signature(lo), _signature(hi), in_place, scaled)
    if key in _COMPILED:
        return key, _COMPILED[key]

    def body(x: torch.Tensor, a: torch.Tensor | None, b: torch.Tensor | None, c: torch.Tensor | None) -> torch.Tensor:
        if scaled:  # a, b: the scales S and 1/S, computed outside (eagerly, as the eager path computes them)
            xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
            return fake_quant_scaled(xf, spec, a, b).to(x.dtype)  # type: ignore[arg-type]
        return _quantize_dequantize_eager(x, spec, axis, a, b, c)

    if in_place:  # the result overwrites x (an input the graph mutates: inductor writes it in x's buffer)

        def qdq(x: torch.Tensor, amax: torch.Tensor | None, lo: torch.Tensor | None, hi: torch.Tensor | None) -> None:
            x.copy_(body(x, amax, lo, hi))

    else:

        def qdq(  # type: ignore[misc]
            x: torch.Tensor,
            amax: torch.Tensor | None,
            lo: torch.Tensor | None,
            hi: torch.Tensor | None,
            out: torch.Tensor,
        ) -> None:
            out.copy_(body(x, amax, lo, hi))

    # a code object of its own: dynamo keeps its cache (and recompilation budget) per code object, so the quantizers
    # of a network (several specs, axes, ranks, layouts) do not exhaust one shared budget; within one, shapes vary
    # freely (dynamic=True): the sliding windows, the last smaller batch and a whole volume share one kernel
    code = qdq.__code__.replace(co_name=f"mqb_fake_quant_{len(_COMPILED)}")
    own = types.FunctionType(code, qdq.__globals__, code.co_name, qdq.__defaults__, qdq.__closure__)
    fn = torch.compile(own, dynamic=True, fullgraph=True, options=_EAGER_NUMERICS)
    _COMPILED[key] = fn
    return key, fn


def _scales_outside(spec: QuantSpec, amax: torch.Tensor | None) -> bool:
    """Whether the scales of a static symmetric per-element-scaled spec are computed before the compiled kernel:
    off the CPU, inductor turns ``amax / 127`` into ``amax * (1/127)``, which is not ATen's division; the scales
    computed eagerly are the eager path's own, and the kernel only multiplies, rounds and clamps."""
    return (
        amax is not None
        and spec.symmetric
        and not GRANULARITIES[spec.granularity].grouped
        and FORMATS[spec.format].scales is not None
    )


def _run_compiled(
    x: torch.Tensor,
    spec: QuantSpec,
    axis: int | None,
    amax: torch.Tensor | None,
    lo: torch.Tensor | None,
    hi: torch.Tensor | None,
    *,
    in_place: bool = False,
) -> torch.Tensor:
    # the result is written into a tensor laid out as the eager result is (a padded block layout, channels last ...):
    # layers reading it then run the same algorithms as after eager, so the model's output is the same to the bit,
    # not only this tensor. In place only where x has that layout.
    strides = _eager_strides(x, spec, axis, amax, lo, hi)
    in_place = in_place and x.stride() == strides and not x.requires_grad
    scaled = _scales_outside(spec, amax)
    key, fn = _compiled_for(spec, axis, x, amax, lo, hi, in_place, scaled)
    if fn is None:
        return _quantize_dequantize_eager(x, spec, axis, amax, lo, hi)
    try:
        # x detached: dynamo keeps the shapes of nn.Parameters static, which would compile once per weight shape
        args: tuple[torch.Tensor | None, ...] = (*symmetric_scales(amax, spec), None) if scaled else (amax, lo, hi)  # type: ignore[arg-type]
        if in_place:
            fn(x, *args)
            return x
        out = torch.empty_strided(x.shape, strides, dtype=x.dtype, device=x.device)
        fn(x.detach(), *args, out)
        return out
    except Exception as err:  # noqa: BLE001  (any compiler failure: fall back to eager)
        out = _quantize_dequantize_eager(x, spec, axis, amax, lo, hi)  # bad inputs raise here, as in eager
        device = x.device.type
        reason = _reason(err)
        if "RecompileLimit" in type(err).__name__ or "CacheLimit" in type(err).__name__:
            _COMPILED[key] = None  # this spec met too many shapes: eager for it, compiled for the others
            where = f"{spec.short()} on {device}"
        else:
            _COMPILE_FAILED[device] = reason
            where = device
        warnings.warn(
            f"mqb.quant: compiled fake quantization failed for {where} ({reason}); using eager kernels there",
            RuntimeWarning,
            stacklevel=3,
        )
        return out


def _reason(err: Exception) -> str:
    """``Type: message``, the message's first informative line (inductor's first line is often a bare prefix)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    informative = [line for line in lines if not line.endswith(":")] or lines
    return f"{type(err).__name__}: {informative[0] if informative else ''}"[:300]


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
