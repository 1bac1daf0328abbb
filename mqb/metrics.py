"""Segmentation metrics per case and class: DSC, NSD and HD95, with one empty-structure policy.

DSC = 2|P ∩ G| / (|P| + |G|), counted in voxels (what MONAI's ``DiceMetric`` computes). NSD and HD95 follow
DeepMind's ``surface-distance`` package (Nikolov et al., 2021; the definition behind published NSD numbers):

* the surface is made of surface elements (surfels) on the grid of voxel corners, one per 2x2x2 neighbourhood
  that is neither empty nor full; each surfel carries its area in mm², from the marching-cubes lookup table at
  the image's voxel spacing (MONAI's ``create_table_neighbour_code_to_surface_area``, the package's table);
* a surfel's distance is the Euclidean distance in mm (at the voxel spacing) to the nearest surfel of the
  other surface;
* NSD at tolerance τ = (area of gt surfels within τ of pred + area of pred surfels within τ of gt)
  / (total gt surfel area + total pred surfel area);
* HD95 = max(P95(gt→pred), P95(pred→gt)), where P95 is the area-weighted 95th percentile of one direction's
  distances: sort the surfels by (distance, area) and take the distance of the first surfel whose cumulative
  area fraction reaches 0.95 (``compute_robust_hausdorff(distances, 95)``).

Counting boundary voxels instead (MONAI's default ``SurfaceDiceMetric`` / ``HausdorffDistanceMetric``)
under-estimates NSD and over-estimates HD95, most at anisotropic spacing; :data:`DEFINITIONS` names the
definitions in every record.

Where it runs: on the tensors' device. Surfels (neighbourhood codes, areas) are tensor operations on the
class's bounding box. The distances are exact nearest-surfel distances, by the Euclidean distance transform of
the other surface (what the package computes): on the CPU scipy's exact EDT (``distance_transform_edt``; it
releases the GIL, so a case's classes run on ``torch.get_num_threads()`` threads); on any other device an
exact separable EDT in torch (:func:`squared_distance_to_surface`; no cuCIM / CuPy needed) in float64, equal to
scipy's.

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

import functools
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import torch

METRICS = ("dsc", "nsd", "hd95")
HD_PERCENTILE = 95.0

DEFINITIONS = {
    "dsc": "volumetric Dice 2|P&G|/(|P|+|G|) in voxels",
    "nsd": "surface Dice at tolerance (DeepMind surface-distance compute_surface_dice_at_tolerance: "
    "surfel-area weighted, marching-cubes surfels at voxel spacing, exact nearest-surfel distances)",
    "hd95": "robust Hausdorff 95 % (DeepMind surface-distance compute_robust_hausdorff(.., 95): max over both "
    "directions of the surfel-area weighted 95th percentile of surfel distances, mm)",
    "empty_structure_policy": "absent in both: NaN (excluded); absent in one: DSC 0, NSD 0, HD95 volume diagonal",
}

#: ``surface_metrics(..., distances=)``: ``auto`` (scipy's EDT on the CPU, torch elsewhere), ``scipy``, ``torch``.
DISTANCE_BACKENDS = ("auto", "scipy", "torch")

#: The bit of each corner of a 2x2x2 neighbourhood in its code (offsets along x, y, z), as the package and
#: MONAI's ``ENCODING_KERNEL`` number them: the code indexes the surfel-area table.
_CORNER_BITS = (
    ((0, 0, 0), 128), ((0, 0, 1), 64), ((0, 1, 0), 32), ((0, 1, 1), 16),
    ((1, 0, 0), 8), ((1, 0, 1), 4), ((1, 1, 0), 2), ((1, 1, 1), 1),
)  # fmt: skip

#: Elements of one chunk of the torch distance transform's (lines x n x n) min-plus products.
_EDT_CHUNK = {"cpu": 1 << 22, "other": 1 << 25}


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


def _plain(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor (a MONAI ``MetaTensor`` runs every operation through its metadata handling: slow)."""
    return t.as_tensor() if hasattr(t, "as_tensor") else t


def _bounding_box(mask: torch.Tensor) -> tuple[slice, ...]:
    """Slices of the smallest box holding every true voxel of a non-empty 3D mask."""
    box = []
    for axis in range(mask.ndim):
        present = mask.any(dim=[d for d in range(mask.ndim) if d != axis]).nonzero()
        box.append(slice(int(present[0]), int(present[-1]) + 1))
    return tuple(box)


def _class_boxes(pred: torch.Tensor, gt: torch.Tensor, num_classes: int) -> list[tuple[slice, ...] | None]:
    """Per class, the smallest box holding its voxels in ``pred`` or ``gt`` (``None``: in neither), found in one
    pass over each label map per axis (not one pass per class)."""
    device = pred.device
    lo = torch.full((num_classes, 3), torch.iinfo(torch.long).max, dtype=torch.long, device=device)
    hi = torch.full((num_classes, 3), -1, dtype=torch.long, device=device)
    for labels in (pred, gt):
        for axis in range(3):
            n = labels.shape[axis]
            coords = torch.arange(n, device=device)
            present = torch.zeros(num_classes * n, dtype=torch.bool, device=device)
            present[(labels.movedim(axis, -1) * n + coords).reshape(-1)] = True  # (class, index along axis)
            present = present.view(num_classes, n)
            first = torch.where(present, coords, torch.iinfo(torch.long).max).amin(1)
            last = torch.where(present, coords, -1).amax(1)
            lo[:, axis] = torch.minimum(lo[:, axis], first)
            hi[:, axis] = torch.maximum(hi[:, axis], last + 1)
    return [
        tuple(slice(a, b) for a, b in zip(low, high, strict=True)) if high[0] > 0 else None
        for low, high in zip(lo.tolist(), hi.tolist(), strict=True)
    ]


@functools.lru_cache(maxsize=64)
def _area_table(spacing: tuple[float, float, float], device: torch.device) -> torch.Tensor:
    """Surfel area (mm², float64) of each of the 256 neighbourhood codes at ``spacing``: the package's
    marching-cubes normals table (as MONAI ships it; its entries are exact in float32) scaled by the face areas
    in float64, as the package computes them."""
    try:
        from monai.metrics.utils import _get_neighbour_code_to_normals_table
    except ImportError:  # a MONAI without the private table: its public float32 areas (within 1e-7)
        from monai.metrics.utils import create_table_neighbour_code_to_surface_area

        return create_table_neighbour_code_to_surface_area(spacing)[0].to(device=device, dtype=torch.float64)
    # a 256-entry table: computed on the CPU by design (the same float64 bits whatever the data's device), then moved
    normals = _get_neighbour_code_to_normals_table(None).to(device="cpu", dtype=torch.float64)  # (256, 4, 3)
    s0, s1, s2 = spacing
    faces = torch.tensor([s1 * s2, s0 * s2, s0 * s1], dtype=torch.float64, device="cpu")
    return torch.linalg.norm(normals * faces, dim=-1).sum(-1).to(device)


def _surfels(mask: torch.Tensor) -> torch.Tensor:
    """The neighbourhood code (uint8) of every voxel corner of a boolean mask padded with one empty voxel on
    every side (shape + 1 per axis): 0 outside, 255 inside, anything else a surfel."""
    m = torch.nn.functional.pad(mask.to(torch.uint8)[None], (1, 1, 1, 1, 1, 1))[0]
    n0, n1, n2 = (d - 1 for d in m.shape)
    code = torch.zeros((n0, n1, n2), dtype=torch.uint8, device=mask.device)
    for (a, b, c), bit in _CORNER_BITS:
        code |= m[a : a + n0, b : b + n1, c : c + n2] * bit
    return code


def squared_distance_to_surface(
    surface: torch.Tensor, spacing: Sequence[float], points: torch.Tensor, chunk: int | None = None
) -> torch.Tensor:
    """Exact squared Euclidean distance (mm², float64) from each of ``points`` (N, 3 grid indices) to the
    nearest true element of the 3D boolean grid ``surface`` with voxel ``spacing`` (inf where it is empty).

    The separable exact distance transform (Saito & Toriwaki): the nearest along axis 0 per line (prefix
    maxima of the true indices), then along axis 1 the min-plus product ``D(i) = min_j D(j) + ((i - j) s)²``
    over every line, then along axis 2 the same product only at ``points``. Each value is
    ``((Δ0 s0)² + (Δ1 s1)²) + (Δ2 s2)²`` in float64, rounded as scipy's ``distance_transform_edt`` rounds it
    (so a distance equal to an NSD tolerance compares as there). Plain tensor operations on the grid's device
    (chunked to ``chunk`` elements), so it runs where the data is without cuCIM / CuPy."""
    device = surface.device
    dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
    if chunk is None:
        chunk = _EDT_CHUNK["cpu" if device.type == "cpu" else "other"]
    s0, s1, s2 = (float(s) for s in spacing)

    def cost(n: int, s: float) -> torch.Tensor:
        """((i - j) s)² for every i, j < n, as scipy rounds it (the integer offset times the spacing)."""
        index = torch.arange(n, device=device)
        return ((index[:, None] - index[None, :]).to(dtype) * s) ** 2

    n0 = surface.shape[0]
    index = torch.arange(n0, device=device).view(-1, 1, 1).expand_as(surface)
    far = 2 * n0 + 2
    before = torch.where(surface, index, -far).cummax(0).values
    after = torch.where(surface, index, far + n0).flip(0).cummin(0).values.flip(0)
    steps = torch.minimum(index - before, after - index)
    inf = torch.tensor(float("inf"), dtype=dtype, device=device)
    dist = torch.where(steps > n0, inf, (steps.to(dtype) * s0) ** 2)  # (n0, n1, n2)
    del index, before, after, steps  # device memory: a few grids of the box's size at most

    lines = dist.movedim(1, -1)  # (n0, n2, n1): the min-plus product along axis 1
    shape, n1 = lines.shape, lines.shape[-1]
    flat, table = lines.reshape(-1, n1), cost(n1, s1)
    out = torch.empty_like(flat)
    step = max(1, chunk // (n1 * n1))
    for start in range(0, flat.shape[0], step):
        out[start : start + step] = (flat[start : start + step, None, :] + table).amin(-1)
    dist = out.reshape(shape).movedim(-1, 1)  # (n0, n1, n2)

    n2 = dist.shape[2]
    table = cost(n2, s2)
    result = torch.empty(points.shape[0], dtype=dtype, device=device)
    step = max(1, chunk // n2)
    for start in range(0, points.shape[0], step):
        p = points[start : start + step]
        result[start : start + step] = (dist[p[:, 0], p[:, 1]] + table[p[:, 2]]).amin(-1)
    return result


def _distances(source: torch.Tensor, target: torch.Tensor, spacing: tuple[float, float, float], backend: str):
    """Distance in mm (float64, on ``source``'s device) from every surfel of ``source`` (in ``nonzero`` order)
    to the nearest surfel of ``target`` (boolean grids of one shape)."""
    if backend == "scipy":  # scipy's exact EDT as the package runs it, its distances read at the surfels only
        from scipy.ndimage import distance_transform_edt

        nearest = distance_transform_edt(~target.cpu().numpy(), sampling=spacing, return_distances=False,
                                         return_indices=True)  # fmt: skip
        where = np.nonzero(source.cpu().numpy())
        offsets = (nearest[(slice(None), *where)] - np.stack(where)).astype(np.float64) * np.asarray(spacing)[:, None]
        return torch.from_numpy(np.sqrt(np.add.reduce(offsets * offsets, axis=0))).to(source.device)
    return squared_distance_to_surface(target, spacing, torch.nonzero(source)).to(torch.float64).sqrt()


def _robust_hausdorff_one_way(distances: torch.Tensor, areas: torch.Tensor, percent: float) -> torch.Tensor:
    """Area-weighted percentile of one direction's surfel distances, as ``compute_robust_hausdorff`` does:
    surfels sorted by (distance, area), the first whose cumulative area fraction reaches ``percent``/100.

    One sort by distance: the order within a group of equal distances does not change which group the
    fraction first reaches ``percent`` in (the cumulative area at the group's end is the same), so neither
    the distance returned."""
    d, order = torch.sort(distances)
    a = areas[order]
    fraction = torch.cumsum(a, dim=0) / a.sum()
    idx = torch.searchsorted(fraction, torch.tensor([percent / 100.0], dtype=fraction.dtype, device=d.device))
    return d[idx.clamp(max=d.numel() - 1)][0]


def surface_metrics(
    prediction: torch.Tensor,
    label: torch.Tensor,
    spacing: Sequence[float],
    tolerance_mm: float,
    *,
    distances: str = "auto",
) -> tuple[float, float]:
    """NSD at ``tolerance_mm`` and HD95 (mm) of two non-empty binary 3D masks, as DeepMind's ``surface-distance``
    defines them (see the module doc), computed on the masks' device. ``distances`` picks the distance
    transform: ``auto`` (scipy on the CPU, torch elsewhere), ``scipy`` or ``torch``. Empty masks are the
    caller's policy (see :func:`case_metrics`)."""
    if distances not in DISTANCE_BACKENDS:
        raise ValueError(f"distances={distances!r} is invalid; valid: {', '.join(DISTANCE_BACKENDS)}")
    pred, gt = _plain(prediction).bool(), _plain(label).bool().to(prediction.device)
    if not (bool(pred.any()) and bool(gt.any())):
        raise ValueError("surface_metrics needs two non-empty masks")
    if distances == "auto":
        distances = "scipy" if pred.device.type == "cpu" else "torch"
    sp = tuple(float(s) for s in spacing)
    table = _area_table(sp, pred.device)  # type: ignore[arg-type]
    code_pred, code_gt = _surfels(pred), _surfels(gt)
    edges_pred = (code_pred != 0) & (code_pred != 255)
    edges_gt = (code_gt != 0) & (code_gt != 255)
    a_pred, a_gt = table[code_pred[edges_pred].long()], table[code_gt[edges_gt].long()]
    d_pred_gt = _distances(edges_pred, edges_gt, sp, distances)  # type: ignore[arg-type]
    d_gt_pred = _distances(edges_gt, edges_pred, sp, distances)  # type: ignore[arg-type]
    within = a_gt[d_gt_pred <= tolerance_mm].sum() + a_pred[d_pred_gt <= tolerance_mm].sum()
    nsd = within / (a_gt.sum() + a_pred.sum())
    hd = torch.maximum(
        _robust_hausdorff_one_way(d_gt_pred, a_gt, HD_PERCENTILE),
        _robust_hausdorff_one_way(d_pred_gt, a_pred, HD_PERCENTILE),
    )
    return float(nsd), float(hd)


def _no_grad_call(task: tuple[int, Callable[[], tuple[float, float]]]) -> tuple[float, float]:
    """Run one class's surface metrics in inference mode (grad mode is per thread: a worker's starts enabled)."""
    with torch.inference_mode():
        return task[1]()


def _workers(device: torch.device, tasks: int) -> int:
    """Threads for a case's per-class surface metrics: on the CPU as many as torch may use (scipy's distance
    transform releases the GIL), at most one per class; elsewhere one (the device works in parallel)."""
    if device.type != "cpu" or tasks < 2:
        return 1
    return max(1, min(tasks, torch.get_num_threads(), os.cpu_count() or 1))


@contextmanager
def _torch_threads(n: int, device: torch.device) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` on the CPU for the block. The metrics are many small operations:
    split across threads they wait for each other (10x slower on a loaded 2-core machine than on one thread),
    so they run on one thread each and the classes run in parallel instead (:func:`_workers`)."""
    before = torch.get_num_threads()
    if device.type != "cpu" or before == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def case_metrics(
    prediction: torch.Tensor,
    label: torch.Tensor,
    num_classes: int,
    spacing: Sequence[float],
    nsd_tolerance_mm: Sequence[float],
    *,
    distances: str = "auto",
) -> dict[str, np.ndarray]:
    """Per-foreground-class DSC, NSD and HD95 of one case (arrays of length ``num_classes - 1``), computed on
    the prediction's device.

    Args:
        prediction / label: integer label maps of the same spatial shape (X, Y, Z), optionally with a leading
            channel dimension of 1.
        spacing: voxel spacing in mm along X, Y, Z.
        nsd_tolerance_mm: NSD tolerance per foreground class (or a single value for all).
        distances: the distance transform of :func:`surface_metrics`.
    """
    if prediction.shape != label.shape:
        raise ValueError(f"prediction shape {tuple(prediction.shape)} != label shape {tuple(label.shape)}")
    pred = _plain(prediction).reshape(*prediction.shape[-3:]).long()
    gt = _plain(label).reshape(*label.shape[-3:]).long().to(pred.device)  # both on one device (the prediction's)
    if int(gt.max()) >= num_classes or int(gt.min()) < 0:
        raise ValueError(f"label values span {int(gt.min())}..{int(gt.max())}; valid: 0..{num_classes - 1}")
    tolerances = [float(t) for t in nsd_tolerance_mm]
    if len(tolerances) == 1:
        tolerances = tolerances * (num_classes - 1)
    if len(tolerances) != num_classes - 1:
        raise ValueError(f"nsd_tolerance_mm has {len(tolerances)} values; need 1 or {num_classes - 1}")
    spacing = [float(s) for s in spacing]

    diagonal = float(np.linalg.norm(np.array(pred.shape) * np.array(spacing)))
    workers = _workers(pred.device, num_classes - 1)
    with _torch_threads(1, pred.device):  # one thread per class instead (see _torch_threads)
        return _case_metrics(pred, gt, num_classes, spacing, tolerances, diagonal, distances, workers)


def _case_metrics(
    pred: torch.Tensor,
    gt: torch.Tensor,
    num_classes: int,
    spacing: list[float],
    tolerances: list[float],
    diagonal: float,
    distances: str,
    workers: int,
) -> dict[str, np.ndarray]:
    out = {name: np.full(num_classes - 1, np.nan) for name in METRICS}
    foreground = (pred > 0) | (gt > 0)
    if not bool(foreground.any()):
        return out
    box = _bounding_box(foreground)  # every class lies inside: crop once, then per class
    pred, gt = pred[box], gt[box]
    pred = pred.clamp(0, num_classes)  # a prediction beyond the classes counts as no class (bincount bounds)
    n_pred = torch.bincount(pred.reshape(-1), minlength=num_classes + 1).tolist()
    n_gt = torch.bincount(gt.reshape(-1), minlength=num_classes).tolist()
    overlap = torch.bincount(pred[pred == gt], minlength=num_classes).tolist()
    class_boxes = _class_boxes(pred, gt, num_classes + 1)
    surface: list[tuple[int, Callable[[], tuple[float, float]]]] = []
    for c in range(1, num_classes):
        if n_pred[c] == 0 and n_gt[c] == 0:
            continue  # excluded (NaN)
        if n_pred[c] == 0 or n_gt[c] == 0:
            out["dsc"][c - 1], out["nsd"][c - 1], out["hd95"][c - 1] = 0.0, 0.0, diagonal
            continue
        out["dsc"][c - 1] = 2.0 * overlap[c] / (n_pred[c] + n_gt[c])
        class_box = class_boxes[c]  # surfels pad their own border: structures at the volume edge stay whole
        assert class_box is not None
        surface.append((c, functools.partial(
            surface_metrics, pred[class_box] == c, gt[class_box] == c, spacing, tolerances[c - 1], distances=distances
        )))  # fmt: skip
    surface.sort(key=lambda task: -task[1].args[0].numel())  # largest first: balanced threads
    if min(workers, len(surface)) > 1:
        with ThreadPoolExecutor(min(workers, len(surface)), thread_name_prefix="mqb-metrics") as pool:
            values = list(pool.map(_no_grad_call, surface))
    else:
        values = [_no_grad_call(task) for task in surface]
    for (c, _), (nsd, hd95) in zip(surface, values, strict=True):
        out["nsd"][c - 1], out["hd95"][c - 1] = nsd, hd95
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
