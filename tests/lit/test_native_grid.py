"""``dataset.score_on``: metrics of resampled data computed on each case's native grid (prediction mapped back with
MONAI's ``Invertd``, scored against the label as loaded at the file's spacing), checked against numpy on the native
arrays, on a cache hit and a miss, and for label-free cases (both predictions mapped back the same way)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from mqb.data.module import SegmentationDataModule
from mqb.lit.evaluator import SegmentationEvaluator
from mqb.metrics import case_metrics
from tests.devices import device_params, to_device

#: the test loop runs without a Lightning trainer (self.log has nowhere to go)
pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")

#: the file's grid: 12 x 10 x 6 voxels of 1 x 2 x 3 mm, x pointing left (RAS flips it), resampled to 1 mm
SHAPE = (12, 10, 6)
AFFINE = np.array([[-1.0, 0, 0, 20.0], [0, 2.0, 0, -7.0], [0, 0, 3.0, 4.0], [0, 0, 0, 1]])
CLASSES = ["background", "organ", "core"]


def native_label() -> np.ndarray:
    """Class 1 a box, class 2 a core inside it one voxel from its border: neighbours differ by one class at most,
    so a bilinear resampling of the label as an image never passes through a class that is not there."""
    label = np.zeros(SHAPE, np.uint8)
    label[2:9, 2:8, 1:5] = 1
    label[4:7, 3:6, 2:4] = 2
    return label


class Source:
    class_names = CLASSES

    def __init__(self, root: Path, names: tuple[str, ...], labelled: bool = True) -> None:
        self.root, self.names, self.labelled = root, names, labelled

    def cases(self) -> list[dict[str, str]]:
        return [
            {"case": n, "image": str(self.root / f"{n}.nii.gz"),
             **({"label": str(self.root / "labels" / f"{n}.nii.gz")} if self.labelled else {}), "split": "test"}
            for n in self.names
        ]  # fmt: skip


@pytest.fixture()
def volumes(tmp_path: Path) -> Path:
    """Two cases; the image is the label as intensities (case ``b`` shifted by one voxel along x)."""
    (tmp_path / "labels").mkdir()
    for name, shift in (("a", 0), ("b", 1)):
        label = np.roll(native_label(), shift, axis=0)
        nib.save(nib.Nifti1Image(label.astype(np.float32), AFFINE), tmp_path / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(label, AFFINE), tmp_path / "labels" / f"{name}.nii.gz")
    return tmp_path


def datamodule(root: Path, labelled: bool = True, cache: Path | None = None, **kwargs) -> SegmentationDataModule:
    settings = {"pixdim": (1.0, 1.0, 1.0), **kwargs}
    dm = SegmentationDataModule("tiny", Source(root, ("a", "b"), labelled), 3, CLASSES, {}, axcodes="RAS",
                                cache_dir=str(cache) if cache else None, **settings)  # fmt: skip
    dm.prepare_data()
    return dm


class Generous(nn.Module):
    """A network that reads the class off the (label-valued, bilinearly resampled) image with thresholds 0.2 and
    1.2: exact where the image is exact (the native voxels), generous in between (a resampled voxel 1/3 of the way
    from a structure is called inside it). ``shift`` rolls its output by voxels along x (an imperfect network)."""

    def __init__(self, shift: int = 0) -> None:
        super().__init__()
        self.shift = shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        classes = (x[:, 0] > 0.2).long() + (x[:, 0] > 1.2).long()
        classes = torch.roll(classes, self.shift, dims=1)
        return nn.functional.one_hot(classes, 3).permute(0, 4, 1, 2, 3).float()


def score(dm: SegmentationDataModule, net: nn.Module, device: str = "cpu", **kwargs) -> SegmentationEvaluator:
    """The evaluator's test loop over ``dm``'s test cases (whole volume as one window, batches on ``device``, as
    Lightning moves them), without a trainer."""
    evaluator = SegmentationEvaluator(net, CLASSES, (-1, -1, -1), nsd_tolerance_mm=[1.0],
                                      native_grid=dm.native_grid(), grid=dm.grid_definition, **kwargs)  # fmt: skip
    evaluator.on_test_epoch_start()
    for index, batch in enumerate(dm.test_dataloader()):
        evaluator.test_step(to_device(batch, device), index)
    evaluator.on_test_epoch_end()
    return evaluator


def hand_native_prediction(dm: SegmentationDataModule, net: nn.Module, case: int) -> np.ndarray:
    """The network's label map on the resampled grid, mapped to the file's grid by hand: every native voxel takes
    the class of the resampled voxel nearest to its centre, found through the two affines (numpy, no MONAI)."""
    item = dm._dataset("test", dm.eval_transforms())[case]
    with torch.no_grad():
        resampled = net(item["image"].as_tensor()[None]).argmax(1)[0].numpy()
    to_resampled = np.linalg.inv(item["image"].affine.numpy()) @ AFFINE
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), -1).reshape(-1, 3)
    index = np.rint(ijk @ to_resampled[:3, :3].T + to_resampled[:3, 3]).astype(int)
    assert (index >= 0).all() and (index < np.array(resampled.shape)).all()
    return resampled[tuple(index.T)].reshape(SHAPE)


def numpy_dice(prediction: np.ndarray, label: np.ndarray, k: int) -> float:
    p, g = prediction == k, label == k
    return 2.0 * np.logical_and(p, g).sum() / (p.sum() + g.sum())


def test_a_generous_network_is_perfect_on_the_native_grid_but_not_on_the_resampled_one(volumes):
    native = score(datamodule(volumes), Generous()).results
    resampled = score(datamodule(volumes, score_on="resampled"), Generous()).results
    assert native["dsc"] == 1.0 and native["nsd"] == 1.0 and native["hd95"] == 0.0
    assert resampled["dsc"] < 0.95  # the interpolated voxels between slices count against it there
    assert native["per_case"]["a"]["spacing_mm"] == pytest.approx([1.0, 2.0, 3.0])  # the file's spacing
    assert resampled["per_case"]["a"]["spacing_mm"] == pytest.approx([1.0, 1.0, 1.0])
    assert native["definitions"]["grid"].startswith("native") and resampled["definitions"]["grid"].startswith("resam")


def test_native_metrics_equal_numpy_on_the_native_arrays(volumes):
    dm, net = datamodule(volumes), Generous(shift=2)
    evaluator = score(dm, net, keep_predictions=True)
    label = native_label()
    for index, name in enumerate(("a", "b")):
        expected = hand_native_prediction(dm, net, index)
        truth = np.roll(label, index, axis=0)
        stored = evaluator.predictions[name]
        assert stored.shape == SHAPE and np.array_equal(stored.numpy(), expected)  # the map that was scored
        got = evaluator.results["per_case"][name]
        assert got["dsc"] == pytest.approx([numpy_dice(expected, truth, k) for k in (1, 2)], abs=1e-12)
        assert 0.0 < got["dsc"][0] < 1.0
        reference = case_metrics(torch.as_tensor(expected), torch.as_tensor(truth), 3, (1.0, 2.0, 3.0), [1.0])
        assert got["nsd"] == pytest.approx(reference["nsd"].tolist()) and got["hd95"] == pytest.approx(
            reference["hd95"].tolist())


def test_a_cache_hit_scores_like_a_miss_and_like_no_cache(volumes, tmp_path):
    cache = tmp_path / "cache"
    miss = score(datamodule(volumes, cache=cache), Generous(shift=1)).results
    entries = sorted(cache.rglob("*.pt"))
    assert len(entries) == 2  # one preprocessed item per test case, applied operations included
    stamps = [p.stat().st_mtime_ns for p in entries]
    hit = score(datamodule(volumes, cache=cache), Generous(shift=1)).results  # a new module: other transform ids
    assert sorted(cache.rglob("*.pt")) == entries and [p.stat().st_mtime_ns for p in entries] == stamps
    uncached = score(datamodule(volumes), Generous(shift=1)).results
    assert hit["per_case"] == miss["per_case"] == uncached["per_case"]
    assert 0.0 < miss["dsc"] < 1.0


def test_a_cache_entry_is_read_back_where_python_pickles_enums_by_name(volumes, tmp_path, monkeypatch):
    """Early Python 3.11 releases (3.11.2, Debian 12's) pickle an Enum member as ``getattr(Class, name)``, which
    ``torch.load(weights_only=True)`` refuses; the cache writes its MetaTensor keys (``MetaKeys``) by value all the
    same, so its entries are read back, not computed again with a warning."""
    import enum
    import warnings

    from monai.data import MetaTensor
    from monai.utils.enums import MetaKeys

    monkeypatch.setattr(enum.Enum, "__reduce_ex__", lambda self, proto: (getattr, (type(self), self._name_)))
    assert MetaKeys.AFFINE.__reduce_ex__(2)[0] is getattr  # pickled by name, as those releases do
    cache = tmp_path / "cache"
    dm = datamodule(volumes, cache=cache)
    miss = [item["image"] for item in dm._dataset("test", dm.eval_transforms())]
    entries = sorted(cache.rglob("*.pt"))
    stamps = [p.stat().st_mtime_ns for p in entries]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "unreadable cached item")
        dm = datamodule(volumes, cache=cache)
        hit = [item["image"] for item in dm._dataset("test", dm.eval_transforms())]
    assert len(entries) == 2 and [p.stat().st_mtime_ns for p in sorted(cache.rglob("*.pt"))] == stamps
    for h, m in zip(hit, miss, strict=True):
        assert isinstance(h, MetaTensor) and torch.equal(h.affine, m.affine) and torch.equal(h.as_tensor(), m)


def test_label_free_cases_compare_both_predictions_on_the_native_grid(volumes):
    dm = datamodule(volumes, labelled=False)
    fp32 = score(dm, Generous(), keep_predictions=True)
    assert fp32.results["dsc"] == 1.0 and all(p.shape == SHAPE for p in fp32.predictions.values())
    shifted = score(dm, Generous(shift=1), reference_predictions=fp32.predictions).results
    for index, name in enumerate(("a", "b")):
        reference, ours = hand_native_prediction(dm, Generous(), index), hand_native_prediction(dm, Generous(1), index)
        assert np.array_equal(fp32.predictions[name].numpy(), reference)
        assert shifted["per_case"][name]["dsc"] == pytest.approx([numpy_dice(ours, reference, k) for k in (1, 2)])


def test_a_crop_is_scored_on_its_region_of_the_native_grid(volumes):
    dm = datamodule(volumes, crop=(20, 30, 30))  # x: 12 mm resampled to 12 voxels; y, z kept whole (smaller)
    cropped = datamodule(volumes, crop=(8, 30, 30))  # x cut to 8 of 12 voxels: the rest of the label is ignored
    assert score(dm, Generous()).results["dsc"] == 1.0
    evaluator = score(cropped, Generous(), keep_predictions=True)
    assert evaluator.results["dsc"] == 1.0 and evaluator.predictions["a"].shape == SHAPE
    assert int(evaluator.predictions["a"][:2].sum()) == 0  # never seen: background (x flipped, centre crop of 8)


def test_without_resampling_nothing_is_inverted(volumes):
    dm = datamodule(volumes, pixdim=None)
    assert dm.native_grid() is None and "native_label" not in dm._dataset("test", dm.eval_transforms())[0]
    same = datamodule(volumes, pixdim=None, score_on="resampled")
    assert score(dm, Generous(1)).results["per_case"] == score(same, Generous(1)).results["per_case"]
    assert dm.grid_definition.startswith("native")


def test_an_invalid_score_on_names_the_key_and_the_valid_values(volumes):
    with pytest.raises(ValueError, match=r"dataset\.score_on='nativ' is invalid; valid: native .*resampled"):
        datamodule(volumes, score_on="nativ")


@pytest.mark.parametrize("device", device_params())
def test_native_scoring_on_device_matches_cpu(volumes, device):
    """The inversion runs on the prediction's device (MONAI resampling of a MetaTensor there): same label maps and
    metrics as on the CPU."""
    dm = datamodule(volumes)
    on_device = score(dm, Generous(shift=1), device=device, keep_predictions=True)
    on_cpu = score(dm, Generous(shift=1), keep_predictions=True)
    for name, prediction in on_cpu.predictions.items():
        assert torch.equal(on_device.predictions[name], prediction)
    for case, values in on_cpu.results["per_case"].items():
        for metric in ("dsc", "nsd", "hd95", "spacing_mm"):
            assert on_device.results["per_case"][case][metric] == pytest.approx(values[metric], abs=1e-6)
