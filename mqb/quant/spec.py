"""Quantizer specifications: what number format, how many bits, which granularity, which observer.

A :class:`QuantSpec` describes how ONE tensor (a weight or an activation) is fake-quantized. It is a
frozen, validated value object: every bad field raises a ``ValueError`` naming the field and the valid
choices, so a typo in a config fails before any work is done.

Integer quantization follows MedQuanBench eq. 1 (symmetric, round-half-to-even, narrow range):

    S = max|X| / (2^(N-1) - 1),   X_q = clamp(round(X / S), -(2^(N-1)-1), 2^(N-1)-1)

and optionally the asymmetric (affine) variant ``S = (max - min) / (2^N - 1)``, ``Z = round(-min / S)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

#: Element formats. ``int`` is the paper's format; the others are simulated formats of newer GPUs.
FORMATS: tuple[str, ...] = ("int", "fp8_e4m3", "mxint8", "mxfp8", "mxfp4", "nvfp4")

#: Formats whose scale is shared by a fixed-size block along the reduction axis (OCP MX, NVIDIA NVFP4).
BLOCK_FORMATS: dict[str, int] = {"mxint8": 32, "mxfp8": 32, "mxfp4": 32, "nvfp4": 16}

#: Element bit width implied by the non-integer formats.
FORMAT_BITS: dict[str, int] = {"fp8_e4m3": 8, "mxint8": 8, "mxfp8": 8, "mxfp4": 4, "nvfp4": 4}

#: Granularities (paper Fig. 2, eqs. 3-4), i.e. which elements share one scale.
GRANULARITIES: tuple[str, ...] = ("per_tensor", "per_channel", "per_token", "per_voxel", "per_group")

#: Granularities whose scales depend on the position in the input, so they are computed per input.
DYNAMIC_ONLY_GRANULARITIES: frozenset[str] = frozenset({"per_token", "per_voxel", "per_group"})

#: Calibration observers for static scales.
OBSERVERS: tuple[str, ...] = ("minmax", "percentile", "mse", "entropy")

MIN_BITS, MAX_BITS = 2, 8


def _choices(values: tuple[str, ...] | list[str]) -> str:
    return ", ".join(repr(v) for v in values)


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized.

    Attributes:
        bits: integer bit width N (2-8). Ignored for non-``int`` formats, whose width is fixed.
        format: element format, one of :data:`FORMATS`.
        granularity: one of :data:`GRANULARITIES`. Block formats (MX*, NVFP4) are always ``per_group``.
        symmetric: symmetric (eq. 1, zero-point 0) or asymmetric affine quantization (``int`` only).
        dynamic: compute scales from each input (``True``) or from calibration (``False``). ``None``
            picks the natural choice: dynamic for per-token / per-voxel / per-group, static otherwise.
        observer: how static scales are calibrated, one of :data:`OBSERVERS`.
        group_size: elements per scale for ``per_group`` (fixed by the format for block formats).
        percentile: the percentile of |x| used by the ``percentile`` observer.
    """

    bits: int = 8
    format: str = "int"
    granularity: str = "per_tensor"
    symmetric: bool = True
    dynamic: bool | None = None
    observer: str = "minmax"
    group_size: int | None = None
    percentile: float = 99.99

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"QuantSpec.format={self.format!r} is not a known format; valid: {_choices(FORMATS)}")
        if self.format in FORMAT_BITS:
            object.__setattr__(self, "bits", FORMAT_BITS[self.format])
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not MIN_BITS <= self.bits <= MAX_BITS:
            raise ValueError(
                f"QuantSpec.bits={self.bits!r} is invalid; valid: an integer from {MIN_BITS} to {MAX_BITS}"
            )
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"QuantSpec.granularity={self.granularity!r} is not a known granularity; "
                f"valid: {_choices(GRANULARITIES)}"
            )
        if self.format in BLOCK_FORMATS:
            block = BLOCK_FORMATS[self.format]
            if self.granularity != "per_group":
                object.__setattr__(self, "granularity", "per_group")
            if self.group_size not in (None, block):
                raise ValueError(
                    f"QuantSpec.group_size={self.group_size!r} conflicts with format={self.format!r}, "
                    f"whose block size is fixed at {block}"
                )
            object.__setattr__(self, "group_size", block)
        if self.granularity == "per_group":
            if self.group_size is None:
                object.__setattr__(self, "group_size", 32)
            if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size < 1:
                raise ValueError(f"QuantSpec.group_size={self.group_size!r} is invalid; valid: a positive integer")
        elif self.group_size is not None:
            raise ValueError(
                f"QuantSpec.group_size={self.group_size!r} is only meaningful with granularity='per_group' "
                f"(got granularity={self.granularity!r})"
            )
        if self.observer not in OBSERVERS:
            raise ValueError(
                f"QuantSpec.observer={self.observer!r} is not a known observer; valid: {_choices(OBSERVERS)}"
            )
        if not self.symmetric:
            if self.format != "int":
                raise ValueError(
                    f"QuantSpec.symmetric=False is only supported for format='int' (got format={self.format!r})"
                )
            if self.observer != "minmax":
                raise ValueError(
                    f"QuantSpec.observer={self.observer!r} needs symmetric=True; asymmetric specs use 'minmax'"
                )
        if self.observer == "entropy" and self.format != "int":
            raise ValueError(
                f"QuantSpec.observer='entropy' needs format='int' (KL over integer levels); got {self.format!r}"
            )
        if not 0.0 < float(self.percentile) <= 100.0:
            raise ValueError(f"QuantSpec.percentile={self.percentile!r} is invalid; valid: 0 < percentile <= 100")
        if self.dynamic is None:
            object.__setattr__(self, "dynamic", self.granularity in DYNAMIC_ONLY_GRANULARITIES)
        elif not self.dynamic and self.granularity in DYNAMIC_ONLY_GRANULARITIES:
            raise ValueError(
                f"QuantSpec.dynamic=False is impossible with granularity={self.granularity!r}: its scales depend "
                "on the position in each input, so they are computed per input (use dynamic=True or None)"
            )

    @property
    def qmax(self) -> int:
        """Largest integer level of a symmetric signed N-bit grid, 2^(N-1) - 1 (127 for INT8, 7 for INT4)."""
        return 2 ** (self.bits - 1) - 1

    @property
    def is_block_format(self) -> bool:
        return self.format in BLOCK_FORMATS

    def replace(self, **changes: object) -> QuantSpec:
        """A copy with some fields changed (re-validated)."""
        if "granularity" in changes and self.is_block_format:
            changes.pop("granularity")
        if "granularity" in changes and changes["granularity"] != "per_group" and "group_size" not in changes:
            changes["group_size"] = None
        if "granularity" in changes and "dynamic" not in changes:
            # a dynamic choice forced by the old granularity is not carried over; an explicit one is
            forced = self.granularity in DYNAMIC_ONLY_GRANULARITIES
            new_forced = changes["granularity"] in DYNAMIC_ONLY_GRANULARITIES
            changes["dynamic"] = None if forced or new_forced else self.dynamic
        return dataclasses.replace(self, **changes)

    def short(self) -> str:
        """Compact human description, e.g. ``int8 per_channel static`` or ``mxfp4 g32 dynamic``."""
        name = f"int{self.bits}" if self.format == "int" else self.format
        if not self.symmetric:
            name += " asym"
        gran = f"g{self.group_size}" if self.granularity == "per_group" else self.granularity
        mode = "dynamic" if self.dynamic else f"static/{self.observer}"
        return f"{name} {gran} {mode}"


@dataclass(frozen=True)
class Precision:
    """A named weight/activation precision pair such as W4A4. ``None`` means "left in floating point"."""

    name: str
    weight: QuantSpec | None
    activation: QuantSpec | None


def _int(bits: int) -> QuantSpec:
    return QuantSpec(bits=bits)


#: The precision presets. A16 means activations stay in 16/32-bit float (weight-only quantization).
PRECISIONS: dict[str, Precision] = {
    p.name: p
    for p in (
        Precision("w8a8", _int(8), _int(8)),
        Precision("w4a4", _int(4), _int(4)),
        Precision("w4a8", _int(4), _int(8)),
        Precision("w8a16", _int(8), None),
        Precision("w4a16", _int(4), None),
        Precision("w2a16", _int(2), None),
        Precision("fp8", QuantSpec(format="fp8_e4m3"), QuantSpec(format="fp8_e4m3")),
        Precision("mxint8", QuantSpec(format="mxint8"), QuantSpec(format="mxint8")),
        Precision("mxfp8", QuantSpec(format="mxfp8"), QuantSpec(format="mxfp8")),
        Precision("mxfp4", QuantSpec(format="mxfp4"), QuantSpec(format="mxfp4")),
        Precision("nvfp4", QuantSpec(format="nvfp4"), QuantSpec(format="nvfp4")),
    )
}


def get_precision(name: str) -> Precision:
    """Look up a precision preset by name (``w8a8``, ``w4a4``, ``fp8``, ``mxfp4`` ...)."""
    key = name.lower()
    if key not in PRECISIONS:
        raise ValueError(f"precision={name!r} is not a known preset; valid: {_choices(list(PRECISIONS))}")
    return PRECISIONS[key]
