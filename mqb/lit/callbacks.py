"""``QuantizationCallback``: quantize the evaluated network, calibrated on a split disjoint from the test set."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import lightning as L
from torch import nn
from tqdm.auto import tqdm

from mqb.quant import QuantRecipe, calibrate, needs_calibration, quantize, summarize
from mqb.quant.summary import QuantSummary


class QuantizationCallback(L.Callback):
    """Quantize ``pl_module.net`` with ``recipe`` at the start of testing.

    Static activation ranges are calibrated on ``calibration_batches`` (a loader over the *calibration* split,
    which the data module keeps disjoint from the test split). ``forward(model, batch)`` runs one calibration
    batch, e.g. sliding-window inference over a whole volume, so that the ranges see what evaluation sees.

    After ``on_test_start``: ``summary`` holds the per-layer realizability summary and ``calibration_seconds``
    the time spent calibrating.
    """

    def __init__(
        self,
        recipe: QuantRecipe,
        calibration_batches: Callable[[], Any],
        forward: Callable[[nn.Module, Any], Any],
        progress: bool = True,
    ) -> None:
        self.recipe = recipe
        self.calibration_batches = calibration_batches
        self.forward = forward
        self.progress = progress
        self.summary: QuantSummary | None = None
        self.calibration_seconds = 0.0

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        net = pl_module.net
        quantize(net, self.recipe)
        start = time.perf_counter()
        if needs_calibration(net):
            batches = self.calibration_batches()
            if self.progress:
                batches = tqdm(batches, desc="calibration", leave=False, disable=not trainer.is_global_zero)
            calibrate(net, batches, forward=self.forward)
        self.calibration_seconds = time.perf_counter() - start
        self.summary = summarize(net)
