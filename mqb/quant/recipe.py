"""Quantization recipes: precision + scheme + which layers, as one validated value.

Vocabulary: a tensor's *granularity* (:attr:`QuantSpec.granularity`: per-tensor, per-channel, per-token, per-voxel,
per-group) says which elements share a scale; a layer-level *scheme* (:attr:`QuantRecipe.scheme`,
:mod:`mqb.quant.schemes`; the ``granularity`` config group of ``mqb.eval``) gives each layer kind its weight and
activation granularity.

Example::

    recipe = QuantRecipe.from_precision("w4a4", scheme="adaptive", exclude=("conv_transpose",))
    recipe = QuantRecipe(weight=QuantSpec(bits=8), activation=None)                 # W8A16, weight-only
    recipe = QuantRecipe.from_precision("w4a4", rules=(LayerRule("conv1x3x3", precision="w8a8"),))
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from mqb.quant.layers import LayerInfo
from mqb.quant.schemes import get_scheme
from mqb.quant.selectors import matches, matches_any, validate_selector
from mqb.quant.spec import Precision, QuantSpec, get_precision

DEFAULT_INCLUDE = ("conv", "conv_transpose", "linear")
_DEFAULT = object()  # "not given" (``None`` is a meaningful spec: that tensor stays in float)


def _scheme_alias(owner: str, scheme: str | None, granularity: str | None) -> str | None:
    """``scheme``, or the deprecated keyword ``granularity=`` standing for it (it wins: ``dataclasses.replace(recipe,
    granularity=...)`` passes the old scheme too)."""
    if granularity is None:
        return scheme
    warnings.warn(f"{owner}(granularity=...) is deprecated: the layer-level choice is scheme=", DeprecationWarning,
                  stacklevel=3)  # fmt: skip
    return granularity


@dataclass(frozen=True, init=False)
class LayerRule:
    """Override the precision and/or scheme of the layers matching ``select``.

    Later rules win over earlier ones. ``precision`` is a preset name (``w8a8``) or a :class:`Precision`; ``scheme``
    one of :data:`mqb.quant.schemes.SCHEMES` (``granularity=`` is its deprecated keyword).
    """

    select: str
    precision: str | Precision | None = None
    scheme: str | None = None

    def __init__(
        self,
        select: str,
        precision: str | Precision | None = None,
        scheme: str | None = None,
        *,
        granularity: str | None = None,
    ) -> None:
        object.__setattr__(self, "select", select)
        object.__setattr__(self, "precision", precision)
        object.__setattr__(self, "scheme", _scheme_alias("LayerRule", scheme, granularity))
        self.__post_init__()

    def __post_init__(self) -> None:
        validate_selector(self.select)
        if isinstance(self.precision, str):
            object.__setattr__(self, "precision", get_precision(self.precision))
        if self.scheme is not None:
            get_scheme(self.scheme)

    @property
    def granularity(self) -> str | None:
        """Deprecated name of :attr:`scheme`."""
        return self.scheme


@dataclass(frozen=True)
class LayerPlan:
    """What :func:`mqb.quant.quantize` does to one layer."""

    info: LayerInfo
    weight: QuantSpec | None
    activation: QuantSpec | None


def _int8() -> QuantSpec:
    return QuantSpec(bits=8)


@dataclass(frozen=True, init=False)
class QuantRecipe:
    """How to quantize a model.

    Attributes:
        weight / activation: spec templates (their granularity is set per layer by the scheme); ``None``
            leaves that tensor in float (e.g. ``activation=None`` is weight-only W8A16).
        scheme: the layer-level scheme, one of :data:`mqb.quant.schemes.SCHEMES` (``granularity=`` is its
            deprecated keyword).
        include / exclude: selectors (see :mod:`mqb.quant.selectors`) of the layers to quantize.
        attention: also quantize the Q·Kᵀ and softmax·V products of known attention blocks.
        rules: per-layer overrides (mixed precision, a different scheme for some layers).
    """

    weight: QuantSpec | None = field(default_factory=_int8)
    activation: QuantSpec | None = field(default_factory=_int8)
    scheme: str = "per_channel"
    include: tuple[str, ...] = DEFAULT_INCLUDE
    exclude: tuple[str, ...] = ()
    attention: bool = False
    rules: tuple[LayerRule, ...] = ()

    def __init__(
        self,
        weight: QuantSpec | None = _DEFAULT,  # type: ignore[assignment]
        activation: QuantSpec | None = _DEFAULT,  # type: ignore[assignment]
        scheme: str | None = None,
        include: tuple[str, ...] | list[str] | str = DEFAULT_INCLUDE,
        exclude: tuple[str, ...] | list[str] | str = (),
        attention: bool = False,
        rules: tuple[LayerRule, ...] | list[LayerRule] = (),
        *,
        granularity: str | None = None,
    ) -> None:
        values = {
            "weight": _int8() if weight is _DEFAULT else weight,
            "activation": _int8() if activation is _DEFAULT else activation,
            "scheme": _scheme_alias("QuantRecipe", scheme, granularity) or "per_channel",
            "include": include,
            "exclude": exclude,
            "attention": attention,
            "rules": rules,
        }
        for key, value in values.items():
            object.__setattr__(self, key, value)
        self.__post_init__()

    def __post_init__(self) -> None:
        get_scheme(self.scheme)
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

    @property
    def granularity(self) -> str:
        """Deprecated name of :attr:`scheme`."""
        return self.scheme

    @classmethod
    def from_precision(cls, precision: str | Precision, scheme: str | None = None, **kwargs: object) -> QuantRecipe:
        """A recipe from a precision preset (``w8a8``, ``w4a4``, ``w4a8``, ``w8a16``, ``fp8``, ``mxfp4`` ...)."""
        p = get_precision(precision) if isinstance(precision, str) else precision
        return cls(weight=p.weight, activation=p.activation, scheme=scheme, **kwargs)  # type: ignore[arg-type]

    def plan(self, info: LayerInfo) -> LayerPlan | None:
        """The specs for one layer, or ``None`` if the layer stays in float."""
        if info.kind == "attention":
            if not self.attention or matches_any(self.exclude, info):
                return None
        elif not matches_any(self.include, info) or matches_any(self.exclude, info):
            return None
        weight, activation, scheme = self.weight, self.activation, self.scheme
        for rule in self.rules:
            if matches(rule.select, info):
                if isinstance(rule.precision, Precision):
                    weight, activation = rule.precision.weight, rule.precision.activation
                if rule.scheme is not None:
                    scheme = rule.scheme
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
