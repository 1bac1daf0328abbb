"""The common shape of PTQ methods: which layers, when they run, what they did."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from mqb.quant.layers import QuantLayer
from mqb.quant.selectors import matches_any, validate_selector

#: ``{layer name: {"lo": per-channel min, "hi": per-channel max}}`` of float layer inputs
#: (:func:`mqb.quant.collect_input_ranges`).
InputRanges = dict[str, dict[str, torch.Tensor]]


@dataclass
class MethodReport:
    """What a method did: the layers it changed and, for the selected layers it left alone, why."""

    method: str
    applied: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    #: modules whose output the method quantized (:mod:`mqb.quant.output`)
    outputs: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out = {"method": self.method, "applied": list(self.applied), "skipped": dict(self.skipped)}
        if self.outputs:
            out["outputs"] = list(self.outputs)
        return out


class PTQMethod:
    """Base class. ``stage`` is ``"transform"`` (before calibration, on the quantized layers' float operands)
    or ``"post_calibration"`` (needs calibrated quantizers and calibration batches).

    Args:
        layers: selectors of the layers the method applies to (``all`` by default); layers that the recipe
            left in float are never touched.
    """

    name: ClassVar[str] = "method"
    stage: ClassVar[str] = "transform"
    needs_input_ranges: ClassVar[bool] = False

    def __init__(self, layers: Sequence[str] | str = ("all",)) -> None:
        self.layers = (layers,) if isinstance(layers, str) else tuple(layers)
        for selector in self.layers:
            validate_selector(selector)

    def selected(self, model: nn.Module) -> Iterator[tuple[str, QuantLayer]]:
        for name, module in model.named_modules():
            if isinstance(module, QuantLayer) and matches_any(self.layers, module.mqb_info):
                yield name, module

    def skip_reason(self, layer: QuantLayer) -> str | None:
        """Why this method cannot rewrite ``layer`` (``None`` if it can)."""
        return None

    def first_batch(self, batches: Callable[[], Iterable[Any]] | None) -> Any:
        """The first calibration batch, with an error naming the method when there is none."""
        if batches is None:
            raise ValueError(f"{self.name} needs calibration batches")
        batch = next(iter(batches()), None)
        if batch is None:
            raise ValueError(f"{self.name}: the calibration batches were empty")
        return batch

    def partition(
        self, model: nn.Module, ranges: InputRanges | None = None
    ) -> tuple[dict[str, QuantLayer], MethodReport]:
        """The selected layers this method can rewrite, and a report already listing the others with why."""
        report = MethodReport(self.name)
        chosen: dict[str, QuantLayer] = {}
        for name, layer in self.selected(model):
            reason = "a quantized norm input has no weight to rewrite" if layer.kind == "norm" else None
            reason = reason or self.skip_reason(layer)
            if reason is None and self.needs_input_ranges and name not in (ranges or {}):
                reason = "no calibration statistics (the layer never ran)"
            if reason is None:
                chosen[name] = layer
            else:
                report.skipped[name] = reason
        return chosen, report

    def apply_to_layer(self, name: str, layer: QuantLayer, ranges: InputRanges | None) -> None:
        raise NotImplementedError

    def apply(
        self,
        model: nn.Module,
        ranges: InputRanges | None = None,
        batches: Callable[[], Iterable[Any]] | None = None,
        forward: Callable[[nn.Module, Any], Any] | None = None,
    ) -> MethodReport:
        if self.needs_input_ranges and ranges is None:
            raise ValueError(f"{self.name} needs float input ranges (mqb.quant.collect_input_ranges)")
        chosen, report = self.partition(model, ranges)
        for name, layer in chosen.items():
            self.apply_to_layer(name, layer, ranges)
            report.applied.append(name)
        return report

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layers={list(self.layers)})"


@contextmanager
def quantizers_disabled(model: nn.Module) -> Iterator[None]:
    """Run quantized layers with float operands (method rewrites stay active), e.g. to check equivalence."""
    layers = [m for m in model.modules() if isinstance(m, QuantLayer)]
    previous = [m.quantizers_enabled for m in layers]
    for m in layers:
        m.quantizers_enabled = False
    try:
        yield
    finally:
        for m, flag in zip(layers, previous, strict=True):
            m.quantizers_enabled = flag


def float_output(layer: QuantLayer, args: tuple[Any, ...]) -> torch.Tensor:
    """The layer's float output for the same inputs (method rewrites kept, quantizers and corrections off).

    Calls ``forward`` directly, so it can run inside the layer's own forward hooks without re-entering them.
    """
    enabled = layer.quantizers_enabled
    layer.quantizers_enabled = False
    try:
        return layer.forward(*args)
    finally:
        layer.quantizers_enabled = enabled


def apply_methods(
    model: nn.Module,
    methods: Sequence[PTQMethod],
    stage: str,
    *,
    ranges: InputRanges | None = None,
    batches: Callable[[], Iterable[Any]] | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
) -> list[MethodReport]:
    """Apply the methods of one ``stage`` in order; returns one report per method."""
    return [m.apply(model, ranges, batches, forward) for m in methods if m.stage == stage]


def input_channel_axis(layer: QuantLayer) -> int:
    """Axis of the input channels in the layer's activation (1 for convolutions, -1 for linear)."""
    return -1 if layer.kind == "linear" else 1


def weight_absmax_per_input_channel(weight: torch.Tensor, kind: str, groups: int = 1) -> torch.Tensor:
    """``max|W_{:,j}|`` for each input channel ``j``: over every weight that multiplies channel ``j``.

    Conv (C_out, C_in/g, *k): input channel ``j = g·(C_in/g) + i`` meets the output channels of group ``g``
    and every kernel offset. ConvTranspose (C_in, C_out/g, *k): everything but dim 0. Linear (out, in): dim 0.
    """
    w = weight.detach().abs()
    if kind == "linear":
        return w.amax(dim=0)
    if kind == "conv_transpose":
        return w.reshape(w.shape[0], -1).amax(dim=1)
    per_group = w.reshape(groups, w.shape[0] // groups, w.shape[1], -1)  # (g, C_out/g, C_in/g, k)
    return per_group.amax(dim=(1, 3)).reshape(-1)


def scale_input_channels(layer: QuantLayer, weight: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``W`` with every weight of input channel ``c`` multiplied by ``s[c]`` (the layout of each kind)."""
    if layer.kind == "linear":
        return weight * s.view(1, -1)
    if layer.kind == "conv_transpose":
        return weight * s.view(-1, *[1] * (weight.dim() - 1))
    groups = layer.mqb_info.groups
    c_out, c_in_g = weight.shape[0], weight.shape[1]
    s_g = s.view(groups, 1, c_in_g, *[1] * (weight.dim() - 2))
    return (weight.reshape(groups, c_out // groups, *weight.shape[1:]) * s_g).reshape(weight.shape)
