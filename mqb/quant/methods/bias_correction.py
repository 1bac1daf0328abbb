"""Empirical bias correction (Nagel et al. 2019, "Data-Free Quantization", sec. 4.2, with calibration data)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from mqb.quant.api import run_batches
from mqb.quant.layers import QuantLayer
from mqb.quant.methods.base import InputRanges, MethodReport, PTQMethod, float_output


class BiasCorrection(PTQMethod):
    """Remove the mean quantization error of each output channel: ``c = E[op(Q(x), Q(W))] - E[op(x, W)]``.

    The expectation runs over the calibration batches and every voxel/token, with ``x`` the input the layer
    actually receives in the quantized network, so the correction also absorbs the shift that reaches it from
    earlier layers' errors at the operand level. All selected layers are measured in one pass, then corrected.
    """

    name = "bias_correction"
    stage = "post_calibration"

    def __init__(self, layers: Sequence[str] | str = ("all",)) -> None:
        super().__init__(layers)

    def skip_reason(self, layer: QuantLayer) -> str | None:
        return "already corrected" if layer.output_correction is not None else None

    def apply(
        self,
        model: nn.Module,
        ranges: InputRanges | None = None,
        batches: Callable[[], Iterable[Any]] | None = None,
        forward: Callable[[nn.Module, Any], Any] | None = None,
    ) -> MethodReport:
        if batches is None:
            raise ValueError("bias_correction needs calibration batches")
        measured, report = self.partition(model)
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}

        def make_hook(name: str, layer: QuantLayer) -> Callable[..., None]:
            def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
                reference = float_output(layer, args)
                error = (output - reference).double()
                axis = layer.output_channel_axis() % error.dim()
                dims = [d for d in range(error.dim()) if d != axis]
                sums[name] = sums.get(name, 0) + error.sum(dim=dims)
                counts[name] = counts.get(name, 0) + error.numel() // error.shape[axis]

            return hook

        handles = [lyr.register_forward_hook(make_hook(n, lyr)) for n, lyr in measured.items()]
        run_batches(model, batches(), forward, handles)
        for name, layer in measured.items():
            if name not in sums:
                report.skipped[name] = "never ran on the calibration data"
                continue
            layer.output_correction = (sums[name] / counts[name]).to(layer.weight.dtype)
            layer.applied_methods.append(self.name)
            report.applied.append(name)
        return report
