"""DSC / NSD / HD95 against DeepMind's ``surface-distance`` (the reference of published NSD numbers) on real
masks at isotropic and anisotropic spacing, for both distance transforms (scipy's on the CPU, the torch one that
runs on the data's device), against MONAI's surface distances (what mqb computed before), and the
empty-structure policy on hand-built masks."""

from functools import cache
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import surface_distance  # DeepMind's reference implementation (dev dependency `surface-distance`)
import torch
from scipy import ndimage

from mqb import metrics
from mqb.metrics import (
    DEFINITIONS,
    aggregate,
    case_metrics,
    metric_definitions,
    spacing_from_affine,
    squared_distance_to_surface,
    surface_metrics,
)
from tests.devices import device_params

SPACING = (1.0, 1.0, 3.0)
DATA = Path(__file__).resolve().parents[1] / "data"
ASEG = DATA / "voxelmorph_brain_t1_aseg" / "test_scan_aseg.nii.gz"  # FreeSurfer aseg, 1 mm isotropic
TOTALSEG = DATA / "totalsegmentator_example_ct" / "example_seg.nii.gz"  # TotalSegmentator CT labels, 3 mm
ATOL = 1e-4  # the bar: equal to the reference to 1e-4


def _cube(shape, lo, hi, value=1):
    m = np.zeros(shape, dtype=np.int64)
    m[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = value
    return m


@cache
def _labels(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj).astype(np.int64)


def _crop(*masks: np.ndarray, margin: int = 3) -> list[np.ndarray]:
    """The masks cut to their joint bounding box plus ``margin`` voxels (keeps each test fast)."""
    idx = np.nonzero(np.logical_or.reduce([m != 0 for m in masks]))
    box = tuple(slice(max(int(i.min()) - margin, 0), int(i.max()) + 1 + margin) for i in idx)
    return [m[box] for m in masks]


def _reference(gt: np.ndarray, pred: np.ndarray, spacing, tolerances) -> tuple[list[float], float]:
    """NSD at each tolerance and HD95 by DeepMind's ``surface-distance``."""
    d = surface_distance.compute_surface_distances(gt.astype(bool), pred.astype(bool), tuple(spacing))
    nsd = [surface_distance.compute_surface_dice_at_tolerance(d, t) for t in tolerances]
    return nsd, surface_distance.compute_robust_hausdorff(d, 95)


def _structure(path: Path, label: int) -> np.ndarray:
    """One structure's mask, cut to its bounding box plus a margin for the perturbations below."""
    (mask,) = _crop(_labels(path) == label, margin=4)
    return mask


def _perturbed(path: Path, label: int, perturb) -> tuple[np.ndarray, np.ndarray]:
    mask = _structure(path, label)
    return mask, perturb(mask)


# Real mask pairs (gt, pred) from the FreeSurfer aseg (1 mm) and the TotalSegmentator CT labels (3 mm; 1 spleen,
# 2/3 kidney right/left, 5 liver): a structure against its contralateral twin mirrored (a realistic disagreement),
# perturbed versions of itself, and a neighbouring structure (far-apart surfaces: large HD95, low NSD).
PAIRS = {
    "thalamus_vs_mirrored_twin": lambda: (_labels(ASEG) == 10, np.flip(_labels(ASEG) == 49, 0)),
    "putamen_vs_mirrored_twin": lambda: (_labels(ASEG) == 12, np.flip(_labels(ASEG) == 51, 0)),
    "caudate_vs_shifted_eroded": lambda: _perturbed(
        ASEG, 11, lambda m: ndimage.binary_erosion(np.roll(m, (1, 0, 1), (0, 1, 2)))
    ),
    "hippocampus_vs_dilated": lambda: _perturbed(ASEG, 17, ndimage.binary_dilation),
    "hippocampus_vs_amygdala": lambda: (_labels(ASEG) == 17, _labels(ASEG) == 18),
    "ventricle_vs_closed": lambda: _perturbed(ASEG, 4, lambda m: ndimage.binary_closing(m, iterations=2)),
    "ct_kidney_vs_mirrored_twin": lambda: (_labels(TOTALSEG) == 2, np.flip(_labels(TOTALSEG) == 3, 0)),
    "ct_spleen_vs_opened_shifted": lambda: _perturbed(TOTALSEG, 1, lambda m: np.roll(ndimage.binary_opening(m), 1, 2)),
    "ct_liver_vs_opened_shifted": lambda: _perturbed(TOTALSEG, 5, lambda m: np.roll(ndimage.binary_opening(m), 1, 2)),
}


@cache
def _pair(name: str) -> tuple[np.ndarray, np.ndarray]:
    return tuple(_crop(*PAIRS[name]()))


NATIVE = {"ct": (3.0, 3.0, 3.0)}  # aseg pairs: 1 mm


@pytest.mark.parametrize("anisotropic", [False, True], ids=["native_isotropic", "anisotropic_1.5x1.5x3"])
@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_nsd_and_hd95_equal_deepmind_surface_distance(pair, anisotropic):
    """Both metrics equal the reference to 1e-4 on real masks, with either distance transform (scipy's, the CPU
    default, and the torch one that runs on the data's device); the spacing is the native one (1 mm for the aseg,
    3 mm for the CT labels) or declared 1.5 x 1.5 x 3 mm, where voxel counting is furthest off."""
    gt, pred = _pair(pair)
    assert gt.any() and pred.any() and (gt != pred).any()
    spacing = (1.5, 1.5, 3.0) if anisotropic else NATIVE.get(pair.split("_")[0], (1.0, 1.0, 1.0))
    tolerances = (1.0, 2.0)
    nsd_ref, hd95_ref = _reference(gt, pred, spacing, tolerances)
    assert 0 < min(nsd_ref) < 1 and hd95_ref > 0
    p, g = torch.tensor(pred.astype(np.int64)), torch.tensor(gt.astype(np.int64))
    for distances in ("scipy", "torch"):
        for tolerance, nsd in zip(tolerances, nsd_ref, strict=True):
            m = case_metrics(p, g, 2, spacing, [tolerance], distances=distances)
            assert m["nsd"][0] == pytest.approx(nsd, abs=ATOL), distances
            assert m["hd95"][0] == pytest.approx(hd95_ref, abs=ATOL), distances
            assert m["dsc"][0] == pytest.approx(2 * (gt & pred).sum() / (gt.sum() + pred.sum()))


@cache
def _multiclass_case() -> tuple[np.ndarray, np.ndarray]:
    """A whole label map (subcortical aseg classes, cut so one structure touches the volume border) and a
    shifted, partly relabelled prediction; class 7 is absent in both, 8 only predicted, 9 only in the labels."""
    labels = {10: 1, 11: 2, 12: 3, 13: 4, 17: 5, 18: 6}
    aseg = _labels(ASEG)
    gt = np.zeros_like(aseg)
    for src, dst in labels.items():
        gt[aseg == src] = dst
    (gt,) = _crop(gt, margin=2)
    gt = gt[:, :, 6:]  # the cut leaves some structures open at the volume border
    assert (gt[:, :, 0] > 0).any()
    pred = np.roll(gt, (1, -1, 0), (0, 1, 2))
    pred[ndimage.binary_dilation(gt == 5) & (pred == 0)] = 5
    pred[1:4, 1:4, 1:3] = 8  # a false structure
    gt[-4:-1, -4:-1, -3:-1] = 9  # a missed one
    return pred, gt


MULTICLASS_SPACING, MULTICLASS_TOLERANCES = (1.2, 0.9, 2.5), [1.0, 2.0, 1.5, 2.0, 3.0, 1.0, 2.0, 2.0, 2.0]


@pytest.mark.parametrize("distances", ["auto", "torch"])
@pytest.mark.parametrize("device", device_params())
def test_multiclass_case_matches_reference_per_class(device, distances):
    """Each class of a real multi-class case equals the reference on its own binary masks, computed on the
    device (``auto``: scipy on the CPU, torch on CUDA), with the empty-structure policy for the one-sided
    classes."""
    pred, gt = _multiclass_case()
    spacing, tolerances = MULTICLASS_SPACING, MULTICLASS_TOLERANCES
    m = case_metrics(torch.tensor(pred).to(device), torch.tensor(gt).to(device), 10, spacing, tolerances,
                     distances=distances)  # fmt: skip
    for c in range(1, 7):
        (nsd_ref,), hd95_ref = _reference(gt == c, pred == c, spacing, [tolerances[c - 1]])
        assert m["nsd"][c - 1] == pytest.approx(nsd_ref, abs=ATOL), c
        assert m["hd95"][c - 1] == pytest.approx(hd95_ref, abs=ATOL), c
        g, p = gt == c, pred == c
        assert m["dsc"][c - 1] == pytest.approx(2 * (g & p).sum() / (g.sum() + p.sum()))
    assert np.isnan(m["nsd"][6]) and np.isnan(m["hd95"][6]) and np.isnan(m["dsc"][6])  # class 7 absent in both
    diagonal = float(np.linalg.norm(np.array(gt.shape) * np.array(spacing)))
    for c in (8, 9):  # one-sided: DSC 0, NSD 0, HD95 the volume diagonal
        assert (m["dsc"][c - 1], m["nsd"][c - 1]) == (0.0, 0.0) and m["hd95"][c - 1] == pytest.approx(diagonal)


def _monai_surface_metrics(pred: np.ndarray, gt: np.ndarray, spacing, tolerance: float) -> tuple[float, float]:
    """NSD and HD95 as mqb computed them before the device-side distances: MONAI's subvoxel surfels and surface
    distances (``get_edge_surface_distance(use_subvoxels=True)``), weighted and ranked as the package does."""
    import warnings

    from monai.metrics.utils import get_edge_surface_distance

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (e_pred, e_gt), (d_pred_gt, d_gt_pred), (a_pred, a_gt) = get_edge_surface_distance(
            torch.tensor(pred), torch.tensor(gt), spacing=list(spacing), use_subvoxels=True, symmetric=True
        )
    a_pred, a_gt = a_pred[e_pred].double().numpy(), a_gt[e_gt].double().numpy()
    d_pred_gt, d_gt_pred = d_pred_gt.double().numpy(), d_gt_pred.double().numpy()
    nsd = (a_gt[d_gt_pred <= tolerance].sum() + a_pred[d_pred_gt <= tolerance].sum()) / (a_gt.sum() + a_pred.sum())

    def p95(d: np.ndarray, a: np.ndarray) -> float:
        order = np.lexsort((a, d))
        fraction = np.cumsum(a[order]) / a.sum()
        return float(d[order][min(int(np.searchsorted(fraction, 0.95)), len(d) - 1)])

    return float(nsd), max(p95(d_gt_pred, a_gt), p95(d_pred_gt, a_pred))


def _noisy_pair() -> tuple[np.ndarray, np.ndarray]:
    """An untrained network's kind of prediction: a real structure against speckle around it."""
    gt = _structure(ASEG, 17)
    rng = np.random.default_rng(0)
    pred = (rng.random(gt.shape) < 0.15) | (ndimage.binary_erosion(gt) & (rng.random(gt.shape) < 0.8))
    return pred, gt


def test_equal_to_the_former_monai_values():
    """The values mqb recorded before (MONAI's surfels and distances) to 1e-4, with either distance transform: the
    FP32 baselines cached under the same pipeline version stay comparable. Real structures (anisotropic spacing)
    and a speckled prediction (isotropic)."""
    pred, gt = _multiclass_case()
    cases = [(pred == c, gt == c, MULTICLASS_SPACING, 1.0) for c in (1, 3, 5)]
    cases += [(*_noisy_pair(), (1.0, 1.0, 1.0), 2.0), (*_pair("ct_kidney_vs_mirrored_twin"), (1.5, 1.5, 3.0), 1.5)]
    for p, g, spacing, tolerance in cases:
        p, g = np.ascontiguousarray(p), np.ascontiguousarray(g)  # (mirrored masks: negative strides)
        nsd_ref, hd95_ref = _monai_surface_metrics(p, g, spacing, tolerance)
        assert 0 < nsd_ref < 1
        for distances in ("scipy", "torch"):
            nsd, hd95 = surface_metrics(torch.tensor(p), torch.tensor(g), spacing, tolerance, distances=distances)
            assert nsd == pytest.approx(nsd_ref, abs=ATOL) and hd95 == pytest.approx(hd95_ref, abs=ATOL), distances


@pytest.mark.parametrize("device", device_params())
def test_torch_distance_transform_equals_scipy(device):
    """The torch distance transform against scipy's exact one on a sparse anisotropic grid, in small chunks (every
    chunk boundary case), at every grid point; an empty surface is infinitely far."""
    rng = np.random.default_rng(1)
    surface = rng.random((13, 17, 11)) < 0.01
    spacing = (0.7, 1.3, 2.9)
    points = np.argwhere(np.ones_like(surface))
    reference = ndimage.distance_transform_edt(~surface, sampling=spacing)[tuple(points.T)]
    for chunk in (1, 50, None):
        squared = squared_distance_to_surface(torch.tensor(surface).to(device), spacing,
                                              torch.tensor(points).to(device), chunk=chunk)  # fmt: skip
        assert squared.device.type == device
        np.testing.assert_allclose(squared.sqrt().cpu().numpy(), reference, rtol=1e-12, atol=0)
    empty = squared_distance_to_surface(torch.zeros(4, 5, 6, dtype=torch.bool, device=device), spacing,
                                        torch.tensor([[1, 2, 3]], device=device))  # fmt: skip
    assert torch.isinf(empty).all()


def test_threads_change_nothing(monkeypatch):
    """The per-class surface metrics run on several threads on the CPU: the same values as one by one."""
    pred, gt = _multiclass_case()
    args = (torch.tensor(pred), torch.tensor(gt), 10, MULTICLASS_SPACING, MULTICLASS_TOLERANCES)
    monkeypatch.setattr(metrics, "_workers", lambda device, tasks: 1)
    serial = case_metrics(*args)
    monkeypatch.setattr(metrics, "_workers", lambda device, tasks: min(tasks, 4))
    threaded = case_metrics(*args)
    for name in serial:
        np.testing.assert_array_equal(serial[name], threaded[name])
    with pytest.raises(ValueError, match="distances='edt' is invalid; valid: auto, scipy, torch"):
        surface_metrics(torch.tensor(pred == 1), torch.tensor(gt == 1), (1.0, 1.0, 1.0), 1.0, distances="edt")


def test_surface_metrics_at_the_volume_border():
    """Structures cut by the volume edge keep their surface there, as the reference's zero padding does."""
    gt = np.zeros((6, 7, 5), bool)
    gt[:4, 2:7, :3] = True
    pred = np.zeros_like(gt)
    pred[:3, 1:7, :5] = True
    for spacing in ((1.0, 1.0, 1.0), (1.5, 1.5, 3.0)):
        (nsd_ref,), hd95_ref = _reference(gt, pred, spacing, [1.5])
        nsd, hd95 = surface_metrics(torch.tensor(pred), torch.tensor(gt), spacing, 1.5)
        assert nsd == pytest.approx(nsd_ref, abs=ATOL) and hd95 == pytest.approx(hd95_ref, abs=ATOL)
    with pytest.raises(ValueError, match="non-empty"):
        surface_metrics(torch.zeros(4, 4, 4, dtype=torch.bool), torch.tensor(gt[:4, :4, :4]), (1.0, 1.0, 1.0), 1.0)


def test_identical_masks():
    gt = _cube((20, 20, 12), (5, 5, 3), (12, 14, 8))
    m = case_metrics(torch.tensor(gt), torch.tensor(gt), 2, SPACING, [1.0])
    assert m["dsc"].tolist() == [1.0] and m["nsd"].tolist() == [1.0] and m["hd95"].tolist() == [0.0]


def test_shift_along_the_coarse_axis():
    shape = (20, 20, 14)
    gt = _cube(shape, (5, 5, 3), (13, 13, 8))  # 8 x 8 x 5 voxels
    pred = _cube(shape, (5, 5, 4), (13, 13, 9))  # shifted by one 3 mm slice
    m = case_metrics(torch.tensor(pred), torch.tensor(gt), 2, SPACING, [2.0])
    # Dice by hand: overlap 8*8*4 = 256, sizes 320 each
    assert m["dsc"][0] == pytest.approx(2 * 256 / 640)
    (nsd_ref,), hd95_ref = _reference(gt, pred, SPACING, [2.0])
    assert m["nsd"][0] == pytest.approx(nsd_ref, abs=ATOL) and 0.8 < nsd_ref < 0.82
    assert m["hd95"][0] == pytest.approx(hd95_ref) == 3.0  # one slice at 3 mm
    # tolerance of 3 mm covers the shift: every surface element is within tolerance
    m3 = case_metrics(torch.tensor(pred), torch.tensor(gt), 2, SPACING, [3.0])
    assert m3["nsd"][0] == pytest.approx(1.0)


def test_definitions_name_the_reference():
    d = metric_definitions([2.0, 1.0])
    assert "surface-distance" in d["nsd"] and "surface-distance" in d["hd95"] and "area" in d["nsd"]
    assert d["nsd_tolerance_mm"] == [2.0, 1.0] and set(DEFINITIONS) <= set(d)


def test_empty_structure_policy():
    shape = (16, 16, 8)
    gt = _cube(shape, (2, 2, 2), (6, 6, 5), 1)  # class 1 only
    pred = _cube(shape, (2, 2, 2), (6, 6, 5), 1) + _cube(shape, (10, 10, 2), (12, 12, 4), 2)  # + false class 2
    m = case_metrics(torch.tensor(pred), torch.tensor(gt), 4, SPACING, [1.0])
    diagonal = float(np.linalg.norm(np.array(shape) * np.array(SPACING)))
    assert m["dsc"][0] == 1.0 and m["dsc"][1] == 0.0 and np.isnan(m["dsc"][2])  # 3 absent in both
    assert m["nsd"][1] == 0.0 and np.isnan(m["nsd"][2])
    assert m["hd95"][1] == pytest.approx(diagonal) and np.isnan(m["hd95"][2])
    missed = case_metrics(torch.zeros_like(torch.tensor(gt)), torch.tensor(gt), 4, SPACING, [1.0])
    assert missed["dsc"][0] == 0.0 and missed["hd95"][0] == pytest.approx(diagonal)


def test_aggregate_excludes_nan_and_averages_classes():
    cases = [
        {"dsc": np.array([1.0, np.nan]), "nsd": np.array([0.5, np.nan]), "hd95": np.array([2.0, np.nan])},
        {"dsc": np.array([0.5, 0.2]), "nsd": np.array([0.5, 0.4]), "hd95": np.array([4.0, 1.0])},
    ]
    out = aggregate(cases, ["bg", "a", "b"])
    assert out["per_class"]["a"]["dsc"] == pytest.approx(0.75) and out["per_class"]["b"]["dsc"] == pytest.approx(0.2)
    assert out["dsc"] == pytest.approx((0.75 + 0.2) / 2)
    assert out["hd95"] == pytest.approx((3.0 + 1.0) / 2)


def test_spacing_from_affine_and_bad_labels():
    affine = torch.tensor([[0.0, 1.5, 0, 0], [-1.5, 0, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 1]])
    assert spacing_from_affine(affine) == (1.5, 1.5, 2.0)
    with pytest.raises(ValueError, match="label values span 5..5; valid: 0..3"):
        case_metrics(torch.zeros(4, 4, 4), torch.full((4, 4, 4), 5), 4, SPACING, [1.0])


@pytest.mark.parametrize("device", device_params())
def test_case_metrics_on_device_match_cpu(device):
    """Masks on the device (the evaluator's CUDA predictions), with an absent and a missed class: the
    empty-structure policy mixes MONAI's values with masks, which must share a device."""
    shape = (16, 16, 10)
    gt = _cube(shape, (3, 3, 2), (10, 11, 7)) + _cube(shape, (11, 11, 7), (14, 14, 9), value=2)  # class 3 absent
    pred = _cube(shape, (3, 4, 2), (10, 12, 6)) + _cube(shape, (1, 1, 1), (3, 3, 2), value=3)  # misses 2, adds 3
    reference = case_metrics(torch.tensor(pred), torch.tensor(gt), 4, SPACING, [2.0])
    out = case_metrics(torch.tensor(pred).to(device), torch.tensor(gt).to(device), 4, SPACING, [2.0])
    for name in ("dsc", "nsd", "hd95"):
        assert isinstance(out[name], np.ndarray)
        np.testing.assert_allclose(out[name], reference[name], rtol=1e-5, equal_nan=True)
    assert reference["dsc"][1] == 0.0 and reference["hd95"][2] > 0  # the policy cases are present
