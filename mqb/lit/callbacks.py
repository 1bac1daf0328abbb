"""``QuantizationCallback``: quantize the evaluated network, calibrated on a split disjoint from the test set."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from tqdm.auto import tqdm

from mqb.quant import (
    QuantRecipe,
    apply_input_ranges,
    calibrate,
    collect_input_ranges,
    needs_calibration,
    quantize,
    summarize,
)
from mqb.quant.summary import QuantSummary
from mqb.results import save_tensors_atomic


class QuantizationCallback(L.Callback):
    """Quantize ``pl_module.net`` with ``recipe`` at the start of testing.

    Static activation ranges come from ``calibration_batches()`` (a loader over the *calibration* split, which
    the data module keeps disjoint from the test split); ``forward(model, batch)`` runs one batch, e.g.
    sliding-window inference over a whole volume, so the ranges see what evaluation sees.

    With ``range_cache`` (a file path) and a min-max recipe, the float model's per-channel input ranges are
    collected once and reused by every min-max config of the same model/checkpoint/data (any bit width,
    per-tensor or per-channel): a sweep calibrates once.

    After ``on_test_start``: ``summary`` (per-layer realizability), ``calibration_seconds`` and
    ``calibration_cached``.
    """

    def __init__(
        self,
        recipe: QuantRecipe,
        calibration_batches: Callable[[], Any],
        forward: Callable[[nn.Module, Any], Any],
        progress: bool = True,
        range_cache: str | os.PathLike[str] | None = None,
    ) -> None:
        self.recipe = recipe
        self.calibration_batches = calibration_batches
        self.forward = forward
        self.progress = progress
        self.range_cache = Path(range_cache) if range_cache is not None else None
        self.summary: QuantSummary | None = None
        self.calibration_seconds = 0.0
        self.calibration_cached = False

    def _batches(self, trainer: L.Trainer) -> Any:
        batches = self.calibration_batches()
        if self.progress:
            batches = tqdm(batches, desc="calibration", leave=False, disable=not trainer.is_global_zero)
        return batches

    def _cached_ranges(self, trainer: L.Trainer, net: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
        assert self.range_cache is not None
        if self.range_cache.is_file():
            self.calibration_cached = True
            return torch.load(self.range_cache, map_location="cpu", weights_only=True)
        ranges = collect_input_ranges(net, self._batches(trainer), forward=self.forward)
        if trainer.is_global_zero:
            save_tensors_atomic(self.range_cache, ranges)
        return ranges

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        net = pl_module.net
        activation = self.recipe.activation
        use_cache = (
            self.range_cache is not None
            and activation is not None
            and activation.observer == "minmax"
            and not self.recipe.attention
            and all(r.precision is None for r in self.recipe.rules)
        )
        start = time.perf_counter()
        ranges = self._cached_ranges(trainer, net) if use_cache and not activation.dynamic else None
        quantize(net, self.recipe)
        if needs_calibration(net):
            if ranges is not None:
                apply_input_ranges(net, ranges)
            else:
                calibrate(net, self._batches(trainer), forward=self.forward)
        self.calibration_seconds = time.perf_counter() - start
        self.summary = summarize(net)
