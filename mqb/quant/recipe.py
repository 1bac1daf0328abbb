"""Quantization recipes: precision + granularity scheme + which layers, as one validated value.

Example::

    recipe = QuantRecipe.from_precision("w4a4", granularity="adaptive", exclude=("conv_transpose",))
    recipe = QuantRecipe(weight=QuantSpec(bits=8), activation=None)                 # W8A16, weight-only
    recipe = QuantRecipe.from_precision("w4a4", rules=(LayerRule("conv1x3x3", precision="w8a8"),))
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mqb.quant.layers import LayerInfo
from mqb.quant.schemes import get_scheme
from mqb.quant.selectors import matches, matches_any, validate_selector
from mqb.quant.spec import Precision, QuantSpec, get_precision

DEFAULT_INCLUDE = ("conv", "conv_transpose", "linear")


@dataclass(frozen=True)
class LayerRule:
    """Override the precision and/or granularity scheme of the layers matching ``select``.

    Later rules win over earlier ones. ``precision`` is a preset name (``w8a8``) or a :class:`Precision`.
    """

    select: str
    precision: str | Precision | None = None
    granularity: str | None = None

    def __post_init__(self) -> None:
        validate_selector(self.select)
        if isinstance(self.precision, str):
            object.__setattr__(self, "precision", get_precision(self.precision))
        if self.granularity is not None:
            get_scheme(self.granularity)


@dataclass(frozen=True)
class LayerPlan:
    """What :func:`mqb.quant.quantize` does to one layer."""

    info: LayerInfo
    weight: QuantSpec | None
    activation: QuantSpec | None


@dataclass(frozen=True)
class QuantRecipe:
    """How to quantize a model.

    Attributes:
        weight / activation: spec templates (their granularity is set per layer by the scheme); ``None``
            leaves that tensor in float (e.g. ``activation=None`` is weight-only W8A16).
        granularity: the layer-level scheme, one of :data:`mqb.quant.schemes.SCHEMES`.
        include / exclude: selectors (see :mod:`mqb.quant.selectors`) of the layers to quantize.
        attention: also quantize the Q·Kᵀ and softmax·V products of known attention blocks.
        rules: per-layer overrides (mixed precision, a different scheme for some layers).
    """

    weight: QuantSpec | None = field(default_factory=lambda: QuantSpec(bits=8))
    activation: QuantSpec | None = field(default_factory=lambda: QuantSpec(bits=8))
    granularity: str = "per_channel"
    include: tuple[str, ...] = DEFAULT_INCLUDE
    exclude: tuple[str, ...] = ()
    attention: bool = False
    rules: tuple[LayerRule, ...] = ()

    def __post_init__(self) -> None:
        get_scheme(self.granularity)
        for attr in ("include", "exclude"):
            value = getattr(self, attr)
            if isinstance(value, str):
                value = (value,)
            object.__setattr__(self, attr, tuple(value))
            for selector in getattr(self, attr):
                validate_selector(selector)
        object.__setattr__(self, "rules", tuple(self.rules))
        if self.weight is None and self.activation is None:
            raise ValueError("QuantRecipe needs a weight or an activation spec (both are None: nothing to do)")

    @classmethod
    def from_precision(
        cls, precision: str | Precision, granularity: str = "per_channel", **kwargs: object
    ) -> QuantRecipe:
        """A recipe from a precision preset (``w8a8``, ``w4a4``, ``w4a8``, ``w8a16``, ``fp8``, ``mxfp4`` ...)."""
        p = get_precision(precision) if isinstance(precision, str) else precision
        return cls(weight=p.weight, activation=p.activation, granularity=granularity, **kwargs)  # type: ignore[arg-type]

    def plan(self, info: LayerInfo) -> LayerPlan | None:
        """The specs for one layer, or ``None`` if the layer stays in float."""
        if info.kind == "attention":
            if not self.attention or matches_any(self.exclude, info):
                return None
        elif not matches_any(self.include, info) or matches_any(self.exclude, info):
            return None
        weight, activation, scheme = self.weight, self.activation, self.granularity
        for rule in self.rules:
            if matches(rule.select, info):
                if isinstance(rule.precision, Precision):
                    weight, activation = rule.precision.weight, rule.precision.activation
                if rule.granularity is not None:
                    scheme = rule.granularity
        if info.kind == "attention":
            if activation is None:
                return None
            granularity = get_scheme(scheme)(info)
            return LayerPlan(info, None, activation.replace(granularity=granularity.activation))
        if info.kind == "norm":  # only the input of a norm is quantized
            if activation is None:
                return None
            granularity = get_scheme(scheme)(info)
            return LayerPlan(info, None, activation.replace(granularity=granularity.activation))
        if weight is None and activation is None:
            return None
        granularity = get_scheme(scheme)(info)
        return LayerPlan(
            info,
            weight.replace(granularity=granularity.weight) if weight is not None else None,
            activation.replace(granularity=granularity.activation) if activation is not None else None,
        )
