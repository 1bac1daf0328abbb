"""Segmentation metrics per case and class: DSC, NSD and HD95 (MONAI), with one empty-structure policy.

All three are computed by MONAI (``DiceMetric``, ``SurfaceDiceMetric``, ``HausdorffDistanceMetric`` with
percentile 95) on one-hot foreground classes, at the image's real voxel spacing in mm.

Empty-structure policy (applied to every metric, every class, every case):

| ground truth | prediction | DSC | NSD | HD95 |
|---|---|---|---|---|
| absent | absent | excluded (NaN) | excluded (NaN) | excluded (NaN) |
| absent | present | 0 | 0 | the volume diagonal in mm |
| present | absent | 0 | 0 | the volume diagonal in mm |

Excluded values do not enter means. Per-class means average over cases; the model-level mean (mDSC, mNSD,
mHD95) averages the per-class means over classes that have at least one non-excluded case.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric, SurfaceDiceMetric
from monai.networks.utils import one_hot

METRICS = ("dsc", "nsd", "hd95")


def spacing_from_affine(affine: torch.Tensor | np.ndarray) -> tuple[float, float, float]:
    """Voxel spacing in mm: the norms of the affine's first three columns."""
    a = torch.as_tensor(affine, dtype=torch.float64)
    return tuple(float(v) for v in torch.linalg.norm(a[:3, :3], dim=0))  # type: ignore[return-value]


def case_metrics(
    prediction: torch.Tensor,
    label: torch.Tensor,
    num_classes: int,
    spacing: Sequence[float],
    nsd_tolerance_mm: Sequence[float],
) -> dict[str, np.ndarray]:
    """Per-foreground-class DSC, NSD and HD95 of one case (arrays of length ``num_classes - 1``).

    Args:
        prediction / label: integer label maps of the same spatial shape (X, Y, Z), optionally with a leading
            channel dimension of 1.
        spacing: voxel spacing in mm along X, Y, Z.
        nsd_tolerance_mm: NSD tolerance per foreground class (or a single value for all).
    """
    if prediction.shape != label.shape:
        raise ValueError(f"prediction shape {tuple(prediction.shape)} != label shape {tuple(label.shape)}")
    pred = prediction.reshape(1, 1, *prediction.shape[-3:]).long()
    gt = label.reshape(1, 1, *label.shape[-3:]).long().to(pred.device)  # MONAI needs both on one device
    if int(gt.max()) >= num_classes or int(gt.min()) < 0:
        raise ValueError(f"label values span {int(gt.min())}..{int(gt.max())}; valid: 0..{num_classes - 1}")
    tolerances = list(nsd_tolerance_mm)
    if len(tolerances) == 1:
        tolerances = tolerances * (num_classes - 1)
    if len(tolerances) != num_classes - 1:
        raise ValueError(f"nsd_tolerance_mm has {len(tolerances)} values; need 1 or {num_classes - 1}")
    pred_oh = one_hot(pred, num_classes).float()
    gt_oh = one_hot(gt, num_classes).float()
    spacing = [float(s) for s in spacing]

    with warnings.catch_warnings():  # MONAI warns on empty structures; the policy below handles them
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        dsc = DiceMetric(include_background=False, reduction="none", ignore_empty=False)(pred_oh, gt_oh)[0]
        nsd = SurfaceDiceMetric(tolerances, include_background=False, reduction="none")(
            pred_oh, gt_oh, spacing=spacing
        )[0]
        hd95 = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")(
            pred_oh, gt_oh, spacing=spacing
        )[0]

    # The policy is applied on the CPU: the values leave torch here (records), and MONAI may return each metric
    # on the input's device (CUDA) or on the CPU, so every operand is brought to the CPU first.
    in_gt = gt_oh[0, 1:].flatten(1).any(dim=1).cpu()
    in_pred = pred_oh[0, 1:].flatten(1).any(dim=1).cpu()
    both_absent = ~in_gt & ~in_pred
    one_absent = in_gt ^ in_pred
    diagonal = float(np.linalg.norm(np.array(pred.shape[-3:]) * np.array(spacing)))
    out = {}
    for name, values, if_one_absent in (("dsc", dsc, 0.0), ("nsd", nsd, 0.0), ("hd95", hd95, diagonal)):
        v = values.detach().double().cpu()
        v = torch.where(one_absent, torch.full_like(v, if_one_absent), v)
        v = torch.where(both_absent, torch.full_like(v, float("nan")), v)
        out[name] = v.numpy()
    return out


def aggregate(cases: Sequence[dict[str, np.ndarray]], class_names: Sequence[str]) -> dict[str, object]:
    """Per-class means over cases and model-level means over classes (NaN = excluded, see module doc)."""
    result: dict[str, object] = {"num_cases": len(cases)}
    per_class: dict[str, dict[str, float | None]] = {name: {} for name in class_names[1:]}
    for metric in METRICS:
        stacked = np.stack([c[metric] for c in cases])  # (cases, classes)
        with np.errstate(invalid="ignore"):
            counts = np.sum(~np.isnan(stacked), axis=0)
            class_means = np.where(counts > 0, np.nansum(stacked, axis=0) / np.maximum(counts, 1), np.nan)
        for name, value in zip(class_names[1:], class_means, strict=True):
            per_class[name][metric] = None if np.isnan(value) else float(value)
        valid = class_means[~np.isnan(class_means)]
        result[metric] = float(valid.mean()) if valid.size else None
    result["per_class"] = per_class
    return result
