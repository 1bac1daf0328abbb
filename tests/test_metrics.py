"""DSC / NSD / HD95 on hand-built masks at anisotropic spacing, against hand counts and a scipy reference."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from mqb.metrics import aggregate, case_metrics, spacing_from_affine
from tests.devices import device_params

SPACING = (1.0, 1.0, 3.0)


def _cube(shape, lo, hi, value=1):
    m = np.zeros(shape, dtype=np.int64)
    m[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = value
    return m


def _reference_surface_distances(a: np.ndarray, b: np.ndarray, spacing):
    """Distances (mm) from each surface voxel of a to the surface of b (surfaces = mask minus its erosion)."""
    sa = a & ~ndimage.binary_erosion(a)
    sb = b & ~ndimage.binary_erosion(b)
    dist_to_b = ndimage.distance_transform_edt(~sb, sampling=spacing)
    return dist_to_b[sa]


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
    d_pg = _reference_surface_distances(pred.astype(bool), gt.astype(bool), SPACING)
    d_gp = _reference_surface_distances(gt.astype(bool), pred.astype(bool), SPACING)
    nsd_ref = ((d_pg <= 2.0).sum() + (d_gp <= 2.0).sum()) / (d_pg.size + d_gp.size)
    hd95_ref = max(np.percentile(d_pg, 95), np.percentile(d_gp, 95))
    assert m["nsd"][0] == pytest.approx(nsd_ref)
    assert m["hd95"][0] == pytest.approx(hd95_ref)
    assert m["hd95"][0] == pytest.approx(3.0)  # one slice at 3 mm
    # tolerance of 3 mm covers the shift: every surface point is within tolerance
    m3 = case_metrics(torch.tensor(pred), torch.tensor(gt), 2, SPACING, [3.0])
    assert m3["nsd"][0] == pytest.approx(1.0)


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
