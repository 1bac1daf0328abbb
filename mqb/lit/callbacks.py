"""``QuantizationCallback``: quantize the evaluated network, calibrated on a split disjoint from the test set;
``PreemptionCallback``: stop testing at the next batch or window after SIGTERM (:mod:`mqb.preemption`)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from tqdm.auto import tqdm

from mqb.preemption import check, checked
from mqb.quant import QuantRecipe, collect_input_ranges, ptq, set_kernel, summarize
from mqb.quant.methods import MethodReport, PTQMethod
from mqb.quant.summary import QuantSummary
from mqb.results import save_tensors_atomic


class PreemptionCallback(L.Callback):
    """Stop testing soon after the process was asked to stop (SIGTERM, seen by
    :func:`mqb.preemption.stop_on_sigterm` or by Lightning's own handler): :func:`mqb.preemption.check` runs before
    every test batch and before every call of the network (each sliding window: a large volume takes a while),
    raising :class:`mqb.preemption.Preempted`. Lightning's loop stops too, but only after a whole batch, never
    during ``on_test_start`` (where :class:`QuantizationCallback` calibrates) and with exit code 0."""

    def __init__(self) -> None:
        self.phase = "evaluation"  # what the network is run for (said in the message)
        self._hook: Any = None

    def _watch(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._unwatch()
        net = getattr(pl_module, "net", pl_module)
        self._hook = net.register_forward_pre_hook(lambda module, args: check(f"{self.phase} window", trainer))

    def _unwatch(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._watch(trainer, pl_module)

    def on_test_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        check(f"{self.phase} batch", trainer)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._unwatch()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._unwatch()


class QuantizationCallback(PreemptionCallback):
    """Quantize ``pl_module.net`` with ``recipe`` at the start of testing.

    Static activation ranges come from ``calibration_batches()`` (a loader over the *calibration* split, which
    the data module keeps disjoint from the test split); ``forward(model, batch)`` runs one batch, e.g.
    sliding-window inference over a whole volume, so the ranges see what evaluation sees.

    With ``range_cache`` (a file path) and a min-max recipe, the float model's per-channel input ranges are
    collected once and reused by every min-max config of the same model/checkpoint/data (any bit width,
    per-tensor or per-channel): a sweep calibrates once.

    ``methods`` (PTQ methods, :mod:`mqb.quant.methods`) run in order: ``transform`` methods after quantization
    and before calibration (SmoothQuant reads the float input ranges, from the same cache), ``post_calibration``
    methods (bias correction) after it. A method that changes what a layer's input quantizer sees (smoothing,
    rotation) makes cached float ranges unusable for calibration, so those configs calibrate afresh.

    After ``on_test_start``: ``summary`` (per-layer realizability), ``method_reports``, ``calibration_seconds``
    and ``calibration_cached``.

    Preemption (:class:`PreemptionCallback`): after SIGTERM, calibration (range collection included) and evaluation
    stop before their next batch or sliding window, raising :class:`mqb.preemption.Preempted`; the range cache is
    written only once complete.
    """

    def __init__(
        self,
        recipe: QuantRecipe,
        calibration_batches: Callable[[], Any],
        forward: Callable[[nn.Module, Any], Any],
        progress: bool = True,
        range_cache: str | os.PathLike[str] | None = None,
        methods: list[PTQMethod] | None = None,
        kernel: str = "auto",
    ) -> None:
        super().__init__()
        self.recipe = recipe
        self.kernel = kernel  # quant.kernel: how the quantizers run (mqb.quant.set_kernel), never what they compute
        self.calibration_batches = calibration_batches
        self.forward = forward
        self.progress = progress
        self.range_cache = Path(range_cache) if range_cache is not None else None
        self.summary: QuantSummary | None = None
        self.calibration_seconds = 0.0
        self.calibration_cached = False
        self.methods = list(methods or [])
        self.method_reports: list[MethodReport] = []

    def _batches(self, trainer: L.Trainer) -> Any:
        batches = self.calibration_batches()
        if self.progress:
            batches = tqdm(batches, desc="calibration", leave=False, disable=not trainer.is_global_zero)
        return checked(batches, "calibration batch", trainer)  # Lightning's loop does not look during on_test_start

    def _cached_ranges(self, trainer: L.Trainer, net: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
        """The float input ranges from ``range_cache``, collected and saved there first if it is missing."""
        assert self.range_cache is not None
        if self.range_cache.is_file():
            self.calibration_cached = True
            return torch.load(self.range_cache, map_location="cpu", weights_only=True)
        ranges = collect_input_ranges(net, self._batches(trainer), forward=self.forward)
        if trainer.is_global_zero:  # stored on the CPU; every consumer moves ranges to its layer's device
            save_tensors_atomic(self.range_cache, {n: {k: v.cpu() for k, v in r.items()} for n, r in ranges.items()})
        return ranges

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_test_start(trainer, pl_module)  # stop on SIGTERM before any window, calibration included
        net = pl_module.net
        self.calibration_cached = False
        self.phase = "calibration"
        try:
            report = ptq(
                net,
                self.recipe,
                lambda: self._batches(trainer),
                self.forward,
                methods=self.methods,
                input_ranges=(lambda: self._cached_ranges(trainer, net)) if self.range_cache is not None else None,
            )
        finally:
            self.phase = "evaluation"
        self.method_reports = report.methods
        # the sweep's cached float ranges stood in for this config's calibration pass
        self.calibration_cached = self.calibration_cached and report.calibration == "input_ranges"
        self.calibration_seconds = report.seconds
        set_kernel(net, self.kernel)
        self.summary = summarize(net)
