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

from mqb.quant.formats import FORMATS, FormatView
from mqb.quant.granularity import GRANULARITIES
from mqb.quant.observers import OBSERVERS

# FORMATS: the codec table (format name -> mqb.quant.formats.Format; ``int`` is the paper's format, the others are
# simulated formats of newer GPUs). GRANULARITIES: which elements share one scale (paper Fig. 2, eqs. 3-4; name ->
# mqb.quant.granularity.Granularity). OBSERVERS: the calibration observers for static scales (name ->
# mqb.quant.observers.ObserverEntry). All are registries: a new entry is valid here at once.

#: Formats whose scale is shared by a fixed-size block along the reduction axis (OCP MX, NVIDIA NVFP4): a live view
#: of the codec table.
BLOCK_FORMATS: FormatView = FormatView("block")

#: Element bit width implied by the non-integer formats: a live view of the codec table.
FORMAT_BITS: FormatView = FormatView("bits")

MIN_BITS, MAX_BITS = 2, 8


def _choices(values: tuple[str, ...] | list[str] | dict[str, object]) -> str:
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
        codec = FORMATS[self.format]
        if codec.bits is not None:
            object.__setattr__(self, "bits", codec.bits)
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not MIN_BITS <= self.bits <= MAX_BITS:
            raise ValueError(
                f"QuantSpec.bits={self.bits!r} is invalid; valid: an integer from {MIN_BITS} to {MAX_BITS}"
            )
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"QuantSpec.granularity={self.granularity!r} is not a known granularity; "
                f"valid: {_choices(GRANULARITIES)}"
            )
        if codec.block is not None:
            block = codec.block
            if self.granularity != "per_group":
                object.__setattr__(self, "granularity", "per_group")
            if self.group_size not in (None, block):
                raise ValueError(
                    f"QuantSpec.group_size={self.group_size!r} conflicts with format={self.format!r}, "
                    f"whose block size is fixed at {block}"
                )
            object.__setattr__(self, "group_size", block)
        if GRANULARITIES[self.granularity].grouped:
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
        observer = OBSERVERS[self.observer]
        if not self.symmetric:
            if not codec.affine:
                affine = [name for name, f in FORMATS.items() if f.affine]
                raise ValueError(
                    f"QuantSpec.symmetric=False is only supported for format={_choices(affine)} "
                    f"(got format={self.format!r})"
                )
            if not observer.affine:
                affine = [name for name, o in OBSERVERS.items() if o.affine]
                raise ValueError(
                    f"QuantSpec.observer={self.observer!r} needs symmetric=True; "
                    f"asymmetric specs use {_choices(affine)}"
                )
        if observer.integer_grid and not codec.integer_grid:
            integer = [name for name, f in FORMATS.items() if f.integer_grid]
            raise ValueError(
                f"QuantSpec.observer={self.observer!r} needs format={_choices(integer)} ({observer.why}); "
                f"got {self.format!r}"
            )
        if not 0.0 < float(self.percentile) <= 100.0:
            raise ValueError(f"QuantSpec.percentile={self.percentile!r} is invalid; valid: 0 < percentile <= 100")
        if self.dynamic is None:
            object.__setattr__(self, "dynamic", GRANULARITIES[self.granularity].dynamic_only)
        elif not self.dynamic and GRANULARITIES[self.granularity].dynamic_only:
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
        return FORMATS[self.format].block is not None

    def replace(self, **changes: object) -> QuantSpec:
        """A copy with some fields changed (re-validated)."""
        if "granularity" in changes and self.is_block_format:
            changes.pop("granularity")
        new = GRANULARITIES.get(str(changes.get("granularity")))
        if "granularity" in changes and not (new is not None and new.grouped) and "group_size" not in changes:
            changes["group_size"] = None
        if "granularity" in changes and "dynamic" not in changes:
            # a dynamic choice forced by the old granularity is not carried over; an explicit one is
            forced = GRANULARITIES[self.granularity].dynamic_only
            new_forced = new is not None and new.dynamic_only
            changes["dynamic"] = None if forced or new_forced else self.dynamic
        return dataclasses.replace(self, **changes)

    def short(self) -> str:
        """Compact human description, e.g. ``int8 per_channel static`` or ``mxfp4 g32 dynamic``."""
        name = f"int{self.bits}" if self.format == "int" else self.format
        if not self.symmetric:
            name += " asym"
        gran = f"g{self.group_size}" if GRANULARITIES[self.granularity].grouped else self.granularity
        mode = "dynamic" if self.dynamic else f"static/{self.observer}"
        return f"{name} {gran} {mode}"


@dataclass(frozen=True)
class Precision:
    """A named weight/activation precision pair such as W4A4. ``None`` means "left in floating point".

    ``compute_dtype``: the float dtype the network runs in (``float16`` / ``bfloat16`` for the float presets fp16 /
    bf16); ``description``: one line for the preset's config file.
    """

    name: str
    weight: QuantSpec | None
    activation: QuantSpec | None
    compute_dtype: str = "float32"
    description: str = ""

    @property
    def quantized(self) -> bool:
        return self.weight is not None or self.activation is not None


def _int(bits: int) -> QuantSpec:
    return QuantSpec(bits=bits)


def _same(fmt: str) -> tuple[QuantSpec, QuantSpec]:
    return QuantSpec(format=fmt), QuantSpec(format=fmt)


_WEIGHT_ONLY = "weight-only INT{}; activations stay in float"

#: Every precision preset, the ONE source: ``mqb.quant.get_precision`` reads it and the ``precision`` config group
#: (``conf/precision/<name>.yaml``) is written from it (:func:`precision_config_yaml`; ``python -m mqb.config``
#: rewrites the files, ``tests/quant/test_registries.py`` checks they are what it writes). A16 means activations stay
#: in 16/32-bit float (weight-only quantization).
PRESETS: dict[str, Precision] = {
    p.name: p
    for p in (
        Precision("fp32", None, None, "float32"),
        Precision("fp16", None, None, "float16"),
        Precision("bf16", None, None, "bfloat16"),
        Precision("w8a8", _int(8), _int(8)),
        Precision("w4a4", _int(4), _int(4)),
        Precision("w4a8", _int(4), _int(8)),
        Precision("w8a16", _int(8), None, description=_WEIGHT_ONLY.format(8)),
        Precision("w4a16", _int(4), None, description=_WEIGHT_ONLY.format(4)),
        Precision("w2a16", _int(2), None, description=_WEIGHT_ONLY.format(2)),
        Precision("fp8", *_same("fp8_e4m3")),
        Precision("mxint8", *_same("mxint8")),
        Precision("mxfp8", *_same("mxfp8")),
        Precision("mxfp4", *_same("mxfp4")),
        Precision("nvfp4", *_same("nvfp4")),
    )
}

#: The quantized presets (those :class:`mqb.quant.QuantRecipe` can be built from).
PRECISIONS: dict[str, Precision] = {name: p for name, p in PRESETS.items() if p.quantized}


def get_precision(name: str) -> Precision:
    """Look up a precision preset by name (``w8a8``, ``w4a4``, ``fp8``, ``mxfp4`` ...)."""
    key = name.lower()
    if key not in PRECISIONS:
        raise ValueError(f"precision={name!r} is not a known preset; valid: {_choices(list(PRECISIONS))}")
    return PRECISIONS[key]


def _spec_yaml(spec: QuantSpec | None) -> str:
    """A preset's spec as its config node: the format, the bits of integer formats, what differs from the default."""
    if spec is None:
        return "null"
    fields = [] if FORMATS[spec.format].bits is not None else [f"bits: {spec.bits}"]
    fields.append(f"format: {spec.format}")
    if not spec.symmetric:
        fields.append("symmetric: false")
    if spec.group_size is not None and not spec.is_block_format:
        fields.append(f"group_size: {spec.group_size}")
    return "{" + ", ".join(fields) + "}"


def precision_config_yaml(p: Precision) -> str:
    """The text of ``conf/precision/<name>.yaml`` for preset ``p`` (granularity and dynamic scales come from the
    ``granularity`` group, so a preset leaves them out)."""
    lines = ["# Written from mqb.quant.spec.PRESETS by `python -m mqb.config`: edit the table, not this file."]
    if p.description:
        lines.append(f"# {p.description}")
    lines += [f"name: {p.name}", f"weight: {_spec_yaml(p.weight)}", f"activation: {_spec_yaml(p.activation)}"]
    if not p.quantized:
        lines.append(f"compute_dtype: {p.compute_dtype}")
    return "\n".join(lines) + "\n"
