"""One call for post-training quantization: :func:`ptq` (like ModelOpt's ``mtq.quantize(model, config, loop)``).

The sequence every mqb tool runs — ``mqb.eval`` (through :class:`mqb.lit.callbacks.QuantizationCallback`),
``mqb.deploy`` and the error proxies of ``mqb.sensitivity`` — so that all of them score the same model:

1. float input ranges, where a PTQ method needs them (SmoothQuant) or where they can stand in for calibration
   (a min-max recipe: ranges collected once from the float model serve every bit width and granularity);
2. :func:`mqb.quant.quantize` with the recipe;
3. the ``transform`` methods (SmoothQuant, SVD, rotation: exact rewrites of the quantized layers);
4. calibration of the static activation ranges (:func:`mqb.quant.calibrate`), or the float input ranges of step 1
   where they are exactly what calibration would give (:func:`ranges_stand_in_for_calibration`);
5. the ``post_calibration`` methods (shared ranges, bias correction, GPTQ).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mqb.preemption import checked
from mqb.quant.api import apply_input_ranges, calibrate, collect_input_ranges, needs_calibration, quantize
from mqb.quant.methods.base import InputRanges, MethodReport, PTQMethod, apply_methods
from mqb.quant.recipe import QuantRecipe

#: how the static activation ranges were set (:attr:`PTQReport.calibration`)
CALIBRATION_KINDS = ("calibrated", "input_ranges", "not_needed")


class NonFiniteError(ValueError):
    """A NaN or Inf where a number must be: an input voxel, a calibrated range, a logit."""


def check_finite_ranges(model: nn.Module) -> None:
    """Refuse calibrated ranges holding NaN / Inf (a NaN calibration voxel, an overflow), naming the quantizers in
    module order; otherwise they would turn into scale 1 or NaN tensors silently."""
    from mqb.quant.quantizer import TensorQuantizer

    bad = []
    for name, module in model.named_modules():
        if isinstance(module, TensorQuantizer):
            for key in ("amax", "lo", "hi"):
                value = getattr(module, key, None)
                if isinstance(value, torch.Tensor) and not bool(torch.isfinite(value).all()):
                    bad.append(f"{name}.{key}")
    if bad:
        raise NonFiniteError(
            f"calibration gave non-finite ranges in {len(bad)} quantizers, first {bad[0]} (all: {bad[:8]}"
            f"{' ...' if len(bad) > 8 else ''}): a NaN / Inf in a calibration volume or an activation overflow"
        )


@dataclass
class PTQReport:
    """What :func:`ptq` did."""

    #: one report per PTQ method, in the order they ran
    methods: list[MethodReport] = field(default_factory=list)
    #: ``calibrated`` (a calibration pass), ``input_ranges`` (the float input ranges, no pass), ``not_needed``
    calibration: str = "not_needed"
    #: wall time of the whole sequence (float ranges, methods and calibration included)
    seconds: float = 0.0


def ranges_stand_in_for_calibration(model: nn.Module, recipe: QuantRecipe, methods: Sequence[PTQMethod]) -> bool:
    """Whether the float model's per-channel input min/max give exactly the static ranges calibration would.

    True for a min-max, static recipe without attention quantization or per-layer precision rules, no
    ``transform`` method (it changes what an input quantizer sees) and no quantized GroupNorm input (its rank is
    known only once it runs). :func:`mqb.quant.apply_input_ranges` is tested equal to :func:`calibrate` there.
    """
    activation = recipe.activation
    return (
        activation is not None
        and activation.observer == "minmax"
        and not activation.dynamic
        and not recipe.attention
        and all(r.precision is None for r in recipe.rules)
        and not any(m.stage == "transform" for m in methods)
        and not ("norm" in recipe.include and any(isinstance(m, nn.GroupNorm) for m in model.modules()))
    )


def ptq(
    model: nn.Module,
    recipe: QuantRecipe,
    batches: Callable[[], Iterable[Any]],
    forward: Callable[[nn.Module, Any], Any] | None = None,
    *,
    methods: Sequence[PTQMethod] = (),
    input_ranges: Callable[[], InputRanges] | None = None,
) -> PTQReport:
    """Quantize ``model`` in place with ``recipe``, apply ``methods`` and calibrate, in mqb's one order.

    Args:
        model: the float network (eval mode); quantized in place.
        recipe: what to quantize and how.
        batches: a fresh iterable of calibration batches per call (it may be called more than once).
        forward: ``forward(model, batch)`` runs one batch (e.g. a sliding window over a volume); default
            ``model(batch)``.
        methods: PTQ methods (:mod:`mqb.quant.methods`), in order.
        input_ranges: where the float model's input ranges come from when they are used (e.g. a cache shared by
            the configs of a sweep); without it they are collected from ``batches`` when a method needs them,
            and calibration runs otherwise.

    Returns a :class:`PTQReport` (method reports, how the ranges were set, time).

    Every pass over ``batches`` checks for a stop request before each batch (:func:`mqb.preemption.check`): after
    SIGTERM, :class:`mqb.preemption.Preempted` is raised at the next calibration batch, the model left half
    quantized (in memory only).
    """
    start = time.perf_counter()
    source = batches
    batches = lambda: checked(source(), "calibration batch")  # noqa: E731
    stand_in = ranges_stand_in_for_calibration(model, recipe, methods)
    ranges: InputRanges | None = None
    if any(m.needs_input_ranges for m in methods) or (input_ranges is not None and stand_in):
        ranges = input_ranges() if input_ranges is not None else collect_input_ranges(model, batches(), forward=forward)
    quantize(model, recipe)
    report = PTQReport(methods=apply_methods(model, methods, "transform", ranges=ranges))
    if needs_calibration(model):
        if ranges is not None and stand_in:
            apply_input_ranges(model, ranges)
            report.calibration = "input_ranges"
        else:
            calibrate(model, batches(), forward=forward)
            report.calibration = "calibrated"
        check_finite_ranges(model)
    report.methods += apply_methods(model, methods, "post_calibration", batches=batches, forward=forward)
    check_finite_ranges(model)
    report.seconds = time.perf_counter() - start
    return report
