"""``SegmentationEvaluator``: sliding-window inference + DSC / NSD / HD95 per case and class."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from monai.data import decollate_batch
from monai.inferers import sliding_window_inference

from mqb.lit.case_results import CaseResults
from mqb.metrics import METRICS, aggregate, case_metrics, metric_definitions, spacing_from_affine
from mqb.quant.ptq import NonFiniteError
from mqb.quant.quantizer import module_device

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class SegmentationEvaluator(L.LightningModule):
    """Evaluate a segmentation network on whole volumes.

    Args:
        net: the network (``B, C_in, *roi -> B, num_classes, *roi``).
        class_names: one name per class, background first.
        roi_size / sw_batch_size / overlap / mode: MONAI ``sliding_window_inference`` settings.
        nsd_tolerance_mm: NSD tolerance per foreground class (or one value for all).
        compute_dtype: ``float32``, ``float16`` or ``bfloat16`` (network weights and inputs cast to it).
        reference_predictions: for volumes without labels, the FP32 label maps to compare against (agreement
            metrics); a volume with neither is compared with its own prediction (the FP32 reference run).
        keep_predictions: keep each case's argmax label map in ``predictions`` (uint8, CPU), on the grid it is scored
            on (the native grid with ``native_grid``).
        native_grid: map each prediction back to the case's native grid before scoring it
            (:class:`mqb.data.module.NativeGrid`, from ``SegmentationDataModule.native_grid()``): the batches then
            hold ``native_label``, the label as loaded, and the spacing is the native affine's. Label-free volumes
            are scored against ``reference_predictions`` given on that grid (the FP32 run's, mapped back the same
            way). ``None``: scored on the grid the network saw.
        grid: which grid the metrics are on, for ``results["definitions"]["grid"]``.

    After testing, ``results`` (:func:`mqb.metrics.aggregate` plus definitions and per-case values) and where the
    test loop's time went, in seconds: ``forward_seconds`` (sliding windows, finite check, argmax),
    ``metric_seconds`` (DSC / NSD / HD95 on the prediction's device) and ``data_seconds`` (loading batches).
    """

    def __init__(
        self,
        net: torch.nn.Module,
        class_names: Sequence[str],
        roi_size: Sequence[int],
        sw_batch_size: int = 2,
        overlap: float = 0.25,
        mode: str = "gaussian",
        nsd_tolerance_mm: Sequence[float] = (2.0,),
        compute_dtype: str = "float32",
        reference_predictions: dict[str, torch.Tensor] | None = None,
        keep_predictions: bool = False,
        native_grid: Any = None,
        grid: str | None = None,
    ) -> None:
        super().__init__()
        if compute_dtype not in DTYPES:
            raise ValueError(f"compute_dtype={compute_dtype!r} is invalid; valid: {', '.join(DTYPES)}")
        self.net = net
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.roi_size = tuple(int(r) for r in roi_size)
        self.sw_batch_size = sw_batch_size
        self.overlap = overlap
        self.mode = mode
        self.nsd_tolerance_mm = list(nsd_tolerance_mm)
        self.compute_dtype = DTYPES[compute_dtype]
        self.case_results: list[dict[str, np.ndarray]] = []
        self.case_ids: list[str] = []
        self.results: dict[str, object] | None = None
        self.data_seconds = 0.0
        self.forward_seconds = 0.0
        self.metric_seconds = 0.0
        self.reference_predictions = reference_predictions
        self.keep_predictions = keep_predictions
        self.predictions: dict[str, torch.Tensor] = {}
        # every scored case (and its label map with keep_predictions), gathered across DDP processes by torchmetrics
        self.cases = CaseResults(METRICS, self.num_classes - 1, keep_predictions=keep_predictions)
        self.native_grid = native_grid
        self.grid = grid

    def sliding_window(self, image: torch.Tensor, net: torch.nn.Module | None = None) -> torch.Tensor:
        """Logits for a whole volume (B, C_in, X, Y, Z) by Gaussian-weighted sliding windows."""
        predictor = net if net is not None else self.net
        return sliding_window_inference(
            image.to(self.compute_dtype),
            roi_size=self.roi_size,
            sw_batch_size=self.sw_batch_size,
            predictor=predictor,
            overlap=self.overlap,
            mode=self.mode,
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.sliding_window(image)

    def on_test_start(self) -> None:
        if self.compute_dtype != torch.float32:
            self.net.to(self.compute_dtype)

    def on_test_epoch_start(self) -> None:
        self.case_results, self.case_ids, self.results = [], [], None
        self.case_spacing: list[tuple[float, ...]] = []
        self.cases.reset()
        self.data_seconds = self.forward_seconds = self.metric_seconds = 0.0
        self._last_batch_end = time.perf_counter()

    def on_test_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Time since the previous batch finished = time spent loading this one."""
        self.data_seconds += time.perf_counter() - self._last_batch_end

    def on_test_batch_end(self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._last_batch_end = time.perf_counter()

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        image = batch["image"]
        cases = batch.get("case", [f"volume{batch_idx}_{i}" for i in range(image.shape[0])])
        check_finite_input(image, cases)
        start = time.perf_counter()
        logits = self(image)
        if not all_finite(logits):
            raise NonFiniteError(
                f"case {', '.join(map(str, cases))}: the network's output has "
                f"{int((~torch.isfinite(logits)).sum())} non-finite values (of {logits.numel()}); "
                f"first non-finite output: {first_non_finite_layer(self.net, image, self.sliding_window)} "
                f"(compute dtype {str(self.compute_dtype).removeprefix('torch.')}: float16 overflows above 65504)"
            )
        prediction = label_map(logits)
        del logits  # (B, classes, X, Y, Z): freed before the metrics run
        self.forward_seconds += time.perf_counter() - start  # synchronized by the finite check above
        start = time.perf_counter()
        affines = image.affine if hasattr(image, "affine") else torch.eye(4).expand(image.shape[0], 4, 4)
        native = self.native_grid is not None
        if native and "label" in batch and "native_label" not in batch:
            raise ValueError(f"case {', '.join(map(str, cases))}: scoring on the native grid needs the label as "
                             "loaded (batch key 'native_label', added by SegmentationDataModule when "
                             "dataset.score_on=native and dataset.pixdim is set)")  # fmt: skip
        images = decollate_batch(image, detach=True) if native else None  # one MetaTensor per case, with its trace
        for i in range(image.shape[0]):
            affine, predicted, region = (affines[i] if affines.ndim == 3 else affines), prediction[i], None
            if images is not None:  # back to the case's file grid (nearest neighbour), scored there
                predicted, region, affine = self.native_grid(predicted, images[i])
            spacing = spacing_from_affine(affine)
            case = str(cases[i])
            if "label" in batch:
                reference = batch["native_label" if native else "label"][i, 0]
                if hasattr(reference, "as_tensor"):  # a MetaTensor: every operation on it goes through its metadata
                    reference = reference.as_tensor()
                if region is not None:  # a crop: the native label where the network saw the volume
                    reference = reference * region.to(reference.dtype)
            elif self.reference_predictions is not None:
                if case not in self.reference_predictions:
                    raise ValueError(f"case {case!r} has no label and no FP32 reference prediction")
                reference = self.reference_predictions[case].to(predicted.device)
                if reference.shape != predicted.shape:
                    raise ValueError(f"case {case!r}: the FP32 reference prediction has shape {tuple(reference.shape)}"
                                     f" but this run's is {tuple(predicted.shape)} (not the same grid)")  # fmt: skip
            else:
                reference = predicted
            metrics = case_metrics(predicted, reference, self.num_classes, spacing, self.nsd_tolerance_mm)
            self.cases.update(case, metrics, spacing, predicted if self.keep_predictions else None)
            self.log("test/case_dsc", float(np.nanmean(metrics["dsc"])), batch_size=1, on_step=True, on_epoch=False)
        self.metric_seconds += time.perf_counter() - start

    def on_test_epoch_end(self) -> None:
        # Under DDP each process scored its share of the volumes: CaseResults.compute() gathers them all (torchmetrics'
        # synchronisation), drops the sampler's padding repeats, and returns them in one order (sorted by case)
        # whatever the process count, so the means below add the same numbers in the same order, equal to the last
        # bit on one device and on several
        cases = self.cases.compute()
        self.case_ids = [c.case for c in cases]
        self.case_results = [c.metrics for c in cases]
        self.case_spacing = [c.spacing for c in cases]
        if self.keep_predictions:
            self.predictions = {c.case: c.prediction for c in cases}
        self.results = aggregate(self.case_results, self.class_names)
        self.results["definitions"] = metric_definitions(self.nsd_tolerance_mm)  # which NSD / HD95 these are
        if self.grid is not None:  # which grid (native / resampled) the metrics and per-case spacings are on
            self.results["definitions"]["grid"] = self.grid
        self.results["per_case"] = {
            case: {
                "spacing_mm": list(spacing),
                **{m: [None if np.isnan(v) else float(v) for v in r[m]] for m in r},
            }
            for case, r, spacing in zip(self.case_ids, self.case_results, self.case_spacing, strict=True)
        }
        for metric in ("dsc", "nsd", "hd95"):
            value = self.results[metric]
            if value is not None:
                self.log(f"test/{metric}", float(value), batch_size=1, rank_zero_only=True)


def all_finite(x: torch.Tensor) -> bool:
    """Whether every element of ``x`` is finite: a NaN or Inf element makes the sum non-finite, so a finite sum
    (one reduction, no mask of the tensor's size) answers; only a non-finite sum (or one that overflowed) needs
    the element-wise check."""
    if bool(torch.isfinite(x.sum(dtype=torch.float32))):
        return True
    return bool(torch.isfinite(x).all())


def label_map(logits: torch.Tensor) -> torch.Tensor:
    """The argmax over classes (dim 1) as a plain tensor, ties to the first class. On the CPU through ``max``,
    which returns the same indices as ``argmax`` (the first maximum) about 3x faster there."""
    if hasattr(logits, "as_tensor"):  # a MetaTensor: keep plain label maps
        logits = logits.as_tensor()
    if logits.device.type == "cpu":
        return logits.float().max(dim=1).indices
    return logits.float().argmax(dim=1)


def check_finite_input(image: torch.Tensor, cases: Any) -> None:
    """Refuse an image with NaN / Inf voxels, naming the case and the count (a NaN input is scored DSC 0 otherwise)."""
    if not all_finite(image):
        finite = torch.isfinite(image)
        bad = int((~finite).sum())
        names = ", ".join(map(str, cases)) if isinstance(cases, list | tuple) else str(cases)
        raise NonFiniteError(f"case {names}: the image has {bad} non-finite voxels (NaN/Inf) after loading; fix "
                             "the file or mask them before evaluation")  # fmt: skip


def first_non_finite_layer(net: torch.nn.Module, image: torch.Tensor, run: Any) -> str:
    """The first module (in execution order) whose output holds a NaN / Inf when ``run(image, net)`` runs again;
    ``"(none found on a second run)"`` if none does."""
    found: list[str] = []

    def hook(name: str) -> Any:
        def record(module: torch.nn.Module, args: Any, output: Any) -> None:
            if not found and isinstance(output, torch.Tensor) and not bool(torch.isfinite(output).all()):
                found.append(f"{name} ({type(module).__name__})")

        return record

    leaves = [(n, m) for n, m in net.named_modules() if n and next(m.children(), None) is None]
    handles = [m.register_forward_hook(hook(n)) for n, m in leaves]
    try:
        with torch.no_grad():
            run(image, net)
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else "(none found on a second run)"


def calibration_forward(evaluator: SegmentationEvaluator):
    """``forward(model, batch)`` for :func:`mqb.quant.calibrate`: sliding windows over calibration volumes.

    The image goes to the device of ``model`` (its first parameter or buffer), so the forward also serves a
    network moved outside Lightning (``mqb.sensitivity``, ``mqb.activations``); a network without tensors
    falls back to the evaluator's device."""

    def forward(model: torch.nn.Module, batch: Any) -> torch.Tensor:
        device = module_device(model) or evaluator.device
        check_finite_input(batch["image"], batch.get("case", ["calibration volume"]))
        return evaluator.sliding_window(batch["image"].to(device), model)

    return forward
