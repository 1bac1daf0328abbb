"""Segmentation metrics per case and class: DSC, NSD and HD95, with one empty-structure policy.

DSC = 2|P ∩ G| / (|P| + |G|), counted in voxels (what MONAI's ``DiceMetric`` computes). NSD and HD95 follow
DeepMind's ``surface-distance`` package (Nikolov et al., 2021; the definition behind published NSD numbers), built
from MONAI's pieces (``monai.metrics.utils.get_edge_surface_distance(..., use_subvoxels=True)``):

* the surface is made of surface elements (surfels) on the grid of voxel corners, one per 2x2x2 neighbourhood
  that is neither empty nor full; each surfel carries its area in mm², from the marching-cubes lookup table at
  the image's voxel spacing;
* a surfel's distance is the Euclidean distance in mm (at the voxel spacing) to the nearest surfel of the
  other surface;
* NSD at tolerance τ = (area of gt surfels within τ of pred + area of pred surfels within τ of gt)
  / (total gt surfel area + total pred surfel area);
* HD95 = max(P95(gt→pred), P95(pred→gt)), where P95 is the area-weighted 95th percentile of one direction's
  distances: sort the surfels by (distance, area) and take the distance of the first surfel whose cumulative
  area fraction reaches 0.95 (``compute_robust_hausdorff(distances, 95)``).

Counting boundary voxels instead (MONAI's default ``SurfaceDiceMetric`` / ``HausdorffDistanceMetric``)
under-estimates NSD and over-estimates HD95, most at anisotropic spacing; :data:`DEFINITIONS` names the
definitions in every record. The computation stays on the tensors' device (MONAI's subvoxel edges are a
convolution; its distance transform uses cuCIM on CUDA when installed).

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
from monai.metrics.utils import get_edge_surface_distance

METRICS = ("dsc", "nsd", "hd95")
HD_PERCENTILE = 95.0

DEFINITIONS = {
    "dsc": "volumetric Dice 2|P&G|/(|P|+|G|) in voxels",
    "nsd": "surface Dice at tolerance (DeepMind surface-distance compute_surface_dice_at_tolerance: "
    "surfel-area weighted, marching-cubes surfels at voxel spacing; via MONAI use_subvoxels=True)",
    "hd95": "robust Hausdorff 95 % (DeepMind surface-distance compute_robust_hausdorff(.., 95): max over both "
    "directions of the surfel-area weighted 95th percentile of surfel distances, mm)",
    "empty_structure_policy": "absent in both: NaN (excluded); absent in one: DSC 0, NSD 0, HD95 volume diagonal",
}


def metric_definitions(nsd_tolerance_mm: Sequence[float] | None = None) -> dict[str, object]:
    """The metric definitions for a record (:data:`DEFINITIONS`, plus the NSD tolerances in mm if given)."""
    out: dict[str, object] = dict(DEFINITIONS)
    if nsd_tolerance_mm is not None:
        out["nsd_tolerance_mm"] = [float(t) for t in nsd_tolerance_mm]
    return out


def spacing_from_affine(affine: torch.Tensor | np.ndarray) -> tuple[float, float, float]:
    """Voxel spacing in mm: the norms of the affine's first three columns."""
    a = torch.as_tensor(affine, dtype=torch.float64)
    return tuple(float(v) for v in torch.linalg.norm(a[:3, :3], dim=0))  # type: ignore[return-value]


def _bounding_box(mask: torch.Tensor) -> tuple[slice, ...]:
    """Slices of the smallest box holding every true voxel of a non-empty 3D mask."""
    box = []
    for axis in range(mask.ndim):
        present = mask.any(dim=[d for d in range(mask.ndim) if d != axis]).nonzero()
        box.append(slice(int(present[0]), int(present[-1]) + 1))
    return tuple(box)


def _robust_hausdorff_one_way(distances: torch.Tensor, areas: torch.Tensor, percent: float) -> torch.Tensor:
    """Area-weighted percentile of one direction's surfel distances, as ``compute_robust_hausdorff`` does:
    surfels sorted by (distance, area), the first whose cumulative area fraction reaches ``percent``/100."""
    order = torch.argsort(areas, stable=True)
    order = order[torch.argsort(distances[order], stable=True)]
    d, a = distances[order], areas[order]
    fraction = torch.cumsum(a, dim=0) / a.sum()
    idx = torch.searchsorted(fraction, torch.tensor([percent / 100.0], dtype=fraction.dtype, device=d.device))
    return d[idx.clamp(max=d.numel() - 1)][0]


def surface_metrics(
    prediction: torch.Tensor, label: torch.Tensor, spacing: Sequence[float], tolerance_mm: float
) -> tuple[float, float]:
    """NSD at ``tolerance_mm`` and HD95 (mm) of two non-empty binary 3D masks, as DeepMind's ``surface-distance``
    defines them (see the module doc). Empty masks are the caller's policy (see :func:`case_metrics`)."""
    if not (bool(prediction.any()) and bool(label.any())):
        raise ValueError("surface_metrics needs two non-empty masks")
    with warnings.catch_warnings():  # MONAI's deprecation notices (and empty-mask warnings: there are none here)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        (edges_pred, edges_gt), (d_pred_gt, d_gt_pred), (areas_pred, areas_gt) = get_edge_surface_distance(
            prediction.bool(),
            label.bool(),
            distance_metric="euclidean",
            spacing=list(spacing),
            use_subvoxels=True,
            symmetric=True,
        )
    a_pred = areas_pred[edges_pred].double()
    a_gt = areas_gt[edges_gt].double()
    d_pred_gt, d_gt_pred = d_pred_gt.double(), d_gt_pred.double()
    within = a_gt[d_gt_pred <= tolerance_mm].sum() + a_pred[d_pred_gt <= tolerance_mm].sum()
    nsd = within / (a_gt.sum() + a_pred.sum())
    hd = torch.maximum(
        _robust_hausdorff_one_way(d_gt_pred, a_gt, HD_PERCENTILE),
        _robust_hausdorff_one_way(d_pred_gt, a_pred, HD_PERCENTILE),
    )
    return float(nsd), float(hd)


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
    pred = prediction.reshape(*prediction.shape[-3:]).long()
    gt = label.reshape(*label.shape[-3:]).long().to(pred.device)  # both on one device (the prediction's)
    if int(gt.max()) >= num_classes or int(gt.min()) < 0:
        raise ValueError(f"label values span {int(gt.min())}..{int(gt.max())}; valid: 0..{num_classes - 1}")
    tolerances = [float(t) for t in nsd_tolerance_mm]
    if len(tolerances) == 1:
        tolerances = tolerances * (num_classes - 1)
    if len(tolerances) != num_classes - 1:
        raise ValueError(f"nsd_tolerance_mm has {len(tolerances)} values; need 1 or {num_classes - 1}")
    spacing = [float(s) for s in spacing]

    diagonal = float(np.linalg.norm(np.array(pred.shape) * np.array(spacing)))
    out = {name: np.full(num_classes - 1, np.nan) for name in METRICS}
    foreground = (pred > 0) | (gt > 0)
    if not bool(foreground.any()):
        return out
    box = _bounding_box(foreground)  # every class lies inside: crop once, then per class
    pred, gt = pred[box], gt[box]
    for c in range(1, num_classes):
        pred_c, gt_c = pred == c, gt == c
        n_pred, n_gt = int(pred_c.sum()), int(gt_c.sum())
        if n_pred == 0 and n_gt == 0:
            continue  # excluded (NaN)
        if n_pred == 0 or n_gt == 0:
            out["dsc"][c - 1], out["nsd"][c - 1], out["hd95"][c - 1] = 0.0, 0.0, diagonal
            continue
        out["dsc"][c - 1] = 2.0 * int((pred_c & gt_c).sum()) / (n_pred + n_gt)
        class_box = _bounding_box(pred_c | gt_c)  # MONAI pads its own crop: structures at the border stay whole
        out["nsd"][c - 1], out["hd95"][c - 1] = surface_metrics(
            pred_c[class_box], gt_c[class_box], spacing, tolerances[c - 1]
        )
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
