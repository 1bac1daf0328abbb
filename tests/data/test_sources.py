"""Each loader on a tiny fake tree in its exact on-disk layout; bad input; the real shipped samples."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from mqb.config import CONF_DIR, register_configs
from mqb.data.module import split_cases
from mqb.data.sources import DatasetError
from mqb.data.tables import ABDOMENATLAS_CLASSES, totalsegmentator_classes

register_configs()
SHAPE = (12, 10, 6)
AFFINE = np.diag([0.8, 0.8, 2.5, 1.0])  # anisotropic, RAS


def save(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def ct(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.uniform(-1000, 1000, SHAPE).astype(np.float32)
    img[0, 0, 0] = 37.5  # -> (37.5 + 175) / 425 = 0.5 under the BTCV window
    return img


def labels(seed: int, num_classes: int) -> np.ndarray:
    lab = np.zeros(SHAPE, dtype=np.uint8)
    lab[2:6, 2:6, 1:4] = 1
    lab[7:10, 3:8, 2:5] = min(num_classes - 1, 2 + seed % 3)
    return lab


def make_msd(root: Path, n: int, json_name: str = "dataset_0.json", num_classes: int = 14) -> Path:
    items = []
    for i in range(n):
        save(root / "imagesTr" / f"img{i:04d}.nii.gz", ct(i))
        save(root / "labelsTr" / f"label{i:04d}.nii.gz", labels(i, num_classes))
        items.append({"image": f"./imagesTr/img{i:04d}.nii.gz", "label": f"./labelsTr/label{i:04d}.nii.gz"})
    names = {str(i): f"c{i}" for i in range(num_classes)}
    (root / json_name).write_text(
        json.dumps({"labels": names, "training": items[: n - 2], "validation": items[n - 2 :]})
    )
    return root


def make_mask_tree(root: Path, structures: tuple[str, ...], n: int) -> Path:
    for i in range(n):
        case = root / f"case_{i:03d}"
        save(case / "ct.nii.gz", ct(i))
        for j, name in enumerate(structures):
            mask = np.zeros(SHAPE, dtype=np.uint8)
            mask.flat[(j * 7 + i) % mask.size] = 1  # one voxel each, distinct positions
            save(case / "segmentations" / f"{name}.nii.gz", mask)
    return root


def datamodule(dataset: str, tmp: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("eval", overrides=[f"dataset={dataset}", f"paths.cache_dir={tmp / 'cache'}", *overrides])
    return instantiate(cfg.dataset)


def first(loader) -> dict:
    return next(iter(loader))


def test_btcv_msd_layout(tmp_path):
    root = make_msd(tmp_path / "btcv", 6)
    dm = datamodule("btcv", tmp_path, f"dataset.root={root}", "dataset.splits={test: 2, calib: 2, val: 1}")
    assert dm.class_names[1] == "spleen" and dm.num_classes == 14
    assert sum(len(v) for v in dm.splits.values()) == 6
    batch = first(dm.test_dataloader())
    img, lab = batch["image"], batch["label"]
    spacing = torch.linalg.norm(img.affine[0, :3, :3], dim=0)
    assert torch.allclose(spacing, torch.tensor([1.5, 1.5, 2.0], dtype=spacing.dtype))
    assert torch.all(torch.diagonal(img.affine[0, :3, :3]) > 0)  # RAS
    assert img.min() >= 0 and img.max() <= 1 and img.shape == lab.shape
    assert set(torch.unique(lab).tolist()) <= set(range(14))


def test_btcv_intensity_window_on_native_grid(tmp_path):
    root = make_msd(tmp_path / "btcv", 5)
    dm = datamodule(
        "btcv", tmp_path, f"dataset.root={root}", "dataset.pixdim=null", "dataset.splits={test: 5, calib: 0, val: 0}"
    )
    case = next(c for c in dm.splits["test"] if c["case"] == "img0000")
    item = dm.eval_transforms()(case)
    assert item["image"][0, 0, 0, 0].item() == pytest.approx(0.5)
    assert tuple(item["image"].shape[1:]) == SHAPE


def test_msd_class_names_from_json(tmp_path):
    root = make_msd(tmp_path / "task", 5, "dataset.json", num_classes=3)
    dm = datamodule(
        "msd", tmp_path, f"dataset.root={root}", "dataset.num_classes=3", "dataset.splits={test: 1, calib: 0, val: 0}"
    )
    assert dm.class_names == ["c0", "c1", "c2"]
    assert len(dm.splits["train"]) == 2  # the msd preset reads only the "training" section


def test_totalsegmentator_full_table_and_subset(tmp_path):
    table = totalsegmentator_classes()
    assert len(table) == 117 and table[4] == "liver" and table[51] == "aorta"
    root = make_mask_tree(tmp_path / "ts", table, 2)
    dm = datamodule("totalsegmentator", tmp_path, f"dataset.root={root}", "dataset.splits={test: 2, calib: 0, val: 0}")
    assert dm.class_names[5] == "liver" and dm.num_classes == 118
    case = dm.splits["test"][0]
    label = np.asarray(nib.load(case["label"]).dataobj)
    i = int(case["case"][-3:])
    liver_index = table.index("liver")
    assert label.flat[(liver_index * 7 + i) % label.size] == liver_index + 1
    subset = datamodule(
        "totalsegmentator",
        tmp_path / "sub",
        f"dataset.root={root}",
        "dataset.source.classes=[aorta,liver]",
        "dataset.num_classes=3",
        "dataset.splits={test: 1, calib: 0, val: 0}",
    )
    assert subset.class_names == ["background", "aorta", "liver"]
    sub_case = next(c for c in subset.splits["test"] + subset.splits["train"] if c["case"] == case["case"])
    sub_label = np.asarray(nib.load(sub_case["label"]).dataobj)
    assert sub_label.flat[(liver_index * 7 + i) % sub_label.size] == 2
    assert set(np.unique(sub_label).tolist()) == {0, 1, 2}


def test_abdomenatlas_official_order(tmp_path):
    root = make_mask_tree(tmp_path / "aa", ABDOMENATLAS_CLASSES, 2)
    dm = datamodule("abdomenatlas", tmp_path, f"dataset.root={root}", "dataset.splits={test: 1, calib: 0, val: 0}")
    assert dm.class_names[:4] == ["background", "aorta", "gall_bladder", "kidney_left"] and dm.num_classes == 26
    case = dm.splits["test"][0]
    label = np.asarray(nib.load(case["label"]).dataobj)
    i = int(case["case"][-3:])
    assert label.flat[(ABDOMENATLAS_CLASSES.index("postcava") * 7 + i) % label.size] == 7


def test_wholebrain_pairs_by_glob_and_json(tmp_path):
    root = tmp_path / "brain"
    for i in range(3):
        save(root / "images" / f"s{i}.nii.gz", ct(i))
        save(root / "labels" / f"s{i}_seg.nii.gz", (labels(i, 133) * 30).astype(np.uint8))
    dm = datamodule("wholebrain", tmp_path, f"dataset.root={root}", "dataset.splits={test: 1, calib: 0, val: 0}")
    assert dm.num_classes == 133 and len(dm.class_names) == 133
    assert torch.unique(first(dm.test_dataloader())["label"]).max() < 133
    (root / "pairs.json").write_text(json.dumps([{"image": "images/s0.nii.gz", "label": "labels/s0_seg.nii.gz"}]))
    dm2 = datamodule(
        "wholebrain",
        tmp_path,
        f"dataset.root={root}",
        "dataset.source.pairs_json=pairs.json",
        "dataset.splits={test: 1, calib: 0, val: 0}",
    )
    assert [c["case"] for c in dm2.splits["test"]] == ["s0"]


def test_splits_are_disjoint_seeded_and_pinnable(tmp_path):
    cases = [{"case": f"c{i}", "image": "", "label": ""} for i in range(20)]
    a = split_cases(cases, {"test": 5, "calib": 3, "val": 2}, seed=1)
    b = split_cases(cases, {"test": 5, "calib": 3, "val": 2}, seed=1)
    names = {k: [c["case"] for c in v] for k, v in a.items()}
    assert names == {k: [c["case"] for c in v] for k, v in b.items()}
    flat = [n for v in names.values() for n in v]
    assert len(flat) == len(set(flat)) == 20 and len(names["train"]) == 10
    pinned = split_cases(cases, {"test": 5, "calib": 3}, seed=1, pinned={"test": ["c0", "c1"], "calib": ["c2"]})
    assert {"c0", "c1"} <= {c["case"] for c in pinned["test"]} and len(pinned["test"]) == 5
    with pytest.raises(ValueError, match="no such case"):
        split_cases(cases, {}, seed=0, pinned={"test": ["nope"]})
    with pytest.raises(ValueError, match="asks for 30"):
        split_cases(cases, {"test": 30}, seed=0)


# -- bad input -------------------------------------------------------------------------------------------
def test_missing_file_names_case_and_file(tmp_path):
    root = make_msd(tmp_path / "btcv", 5)
    (root / "labelsTr" / "label0003.nii.gz").unlink()
    with pytest.raises(DatasetError, match=r"case 'img0003': label file .*label0003.nii.gz' is missing"):
        datamodule("btcv", tmp_path, f"dataset.root={root}").splits  # noqa: B018


def test_corrupt_nifti(tmp_path):
    root = make_msd(tmp_path / "btcv", 5)
    (root / "imagesTr" / "img0001.nii.gz").write_bytes(b"not a nifti at all")
    with pytest.raises(DatasetError, match=r"case 'img0001': image file .*img0001.nii.gz' is not a readable NIfTI"):
        datamodule("btcv", tmp_path, f"dataset.root={root}", "dataset.splits={test: 1, calib: 0, val: 0}").splits  # noqa: B018


@pytest.mark.parametrize(("shape", "why"), [((8, 8), "2-D image"), ((8, 8, 8, 3), "holds 3 volumes")])
def test_images_that_are_not_one_3d_volume_are_refused_up_front(tmp_path, shape, why):
    root = make_msd(tmp_path / "btcv", 5)
    nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), np.eye(4)), root / "imagesTr" / "img0001.nii.gz")
    with pytest.raises(DatasetError, match=rf"case 'img0001': image file .*img0001.nii.gz' has shape .*{why}"):
        datamodule("btcv", tmp_path, f"dataset.root={root}", "dataset.splits={test: 1, calib: 0, val: 0}").splits  # noqa: B018


def test_shape_and_affine_mismatch(tmp_path):
    root = make_msd(tmp_path / "btcv", 5)
    save(root / "labelsTr" / "label0002.nii.gz", np.zeros((5, 5, 5), np.uint8))
    with pytest.raises(DatasetError, match=r"case 'img0002': image .* shape \(12, 10, 6\) != label"):
        datamodule("btcv", tmp_path, f"dataset.root={root}", "dataset.splits={test: 1, calib: 0, val: 0}").splits  # noqa: B018
    save(root / "labelsTr" / "label0002.nii.gz", labels(2, 14), np.diag([1.0, 1.0, 1.0, 1.0]))
    with pytest.raises(DatasetError, match=r"case 'img0002': .*different affines"):
        datamodule("btcv", tmp_path, f"dataset.root={root}", "dataset.splits={test: 1, calib: 0, val: 0}").splits  # noqa: B018


def test_label_values_outside_the_table(tmp_path):
    root = make_msd(tmp_path / "btcv", 5)
    bad = labels(0, 14)
    bad[0, 0, 0] = 20
    save(root / "labelsTr" / "label0000.nii.gz", bad)
    dm = datamodule(
        "btcv",
        tmp_path,
        f"dataset.root={root}",
        "dataset.split_file=null",
        "dataset.splits={test: 5, calib: 0, val: 0}",
    )
    case = next(c for c in dm.splits["test"] if c["case"] == "img0000")
    with pytest.raises(Exception) as err:
        dm.eval_transforms()(case)
    chain = []
    e = err.value
    while e is not None:
        chain.append(str(e))
        e = e.__cause__ or e.__context__
    assert any("case 'img0000': label file" in m and "[20] outside the class table 0..13" in m for m in chain)


def test_empty_split_and_bad_layout(tmp_path):
    root = make_msd(tmp_path / "btcv", 5)
    dm = datamodule("btcv", tmp_path, f"dataset.root={root}", "dataset.splits={test: 2, calib: 0, val: 0}")
    with pytest.raises(ValueError, match="the 'calib' split is empty"):
        dm.calib_dataloader()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="has no 'dataset_0.json'"):
        datamodule("btcv", tmp_path, f"dataset.root={tmp_path / 'empty'}").splits  # noqa: B018
    with pytest.raises(DatasetError, match="has no case folders"):
        datamodule("totalsegmentator", tmp_path, f"dataset.root={tmp_path / 'empty'}").splits  # noqa: B018
    with pytest.raises(DatasetError, match="does not exist"):
        datamodule("abdomenatlas", tmp_path, f"dataset.root={tmp_path / 'nowhere'}").splits  # noqa: B018


# -- the real samples shipped in data/ (paths.data_dir) --------------------------------------------------
def test_ts_example_ct_real_sample(tmp_path):
    dm = datamodule("ts_example_ct", tmp_path)
    assert [c["case"] for c in dm.splits["test"]] == ["ts_example_top30"]
    assert [c["case"] for c in dm.splits["calib"]] == ["ts_example_lower82"]
    batch = first(dm.test_dataloader())
    assert tuple(batch["image"].shape) == (1, 1, 243, 201, 44)
    present = set(torch.unique(batch["label"]).tolist())
    assert present == set(range(14)) - {5}  # 12 organs + background; no esophagus in the field of view
    calib = first(dm.calib_dataloader())
    assert calib["image"].shape[-1] == 122  # slices 0..81 at 3 mm -> 2 mm


def test_brain_aseg_sample_real_sample(tmp_path):
    dm = datamodule("brain_aseg_sample", tmp_path)
    batch = first(dm.test_dataloader())
    assert tuple(batch["image"].shape) == (1, 1, 160, 192, 224)
    assert set(torch.unique(batch["label"]).tolist()) == set(range(18))
    assert torch.allclose(torch.linalg.norm(batch["image"].affine[0, :3, :3], dim=0).float(), torch.ones(3))
    calib = first(dm.calib_dataloader())
    assert "label" not in calib and calib["image"].max() <= 1.0


def test_centre_crop_keeps_the_intensities_of_the_whole_volume(tmp_path):
    """dataset.crop: the centre box of image and label, cut after the (percentile) intensity window."""
    whole = first(datamodule("brain_aseg_sample", tmp_path).test_dataloader())
    dm = datamodule("brain_aseg_sample", tmp_path / "crop", "+dataset.crop=[128,112,300]")
    cropped = first(dm.test_dataloader())
    assert tuple(cropped["image"].shape) == (1, 1, 128, 112, 224)  # an axis smaller than the crop stays whole
    box = (..., slice(16, 144), slice(40, 152), slice(None))  # (160 - 128) / 2, (192 - 112) / 2
    assert torch.equal(cropped["image"].as_tensor(), whole["image"].as_tensor()[box])
    assert torch.equal(cropped["label"].as_tensor(), whole["label"].as_tensor()[box])
    with pytest.raises(InstantiationException, match=r"crop=\[0, 4, 4\] is invalid"):
        datamodule("brain_aseg_sample", tmp_path, "+dataset.crop=[0,4,4]")


def test_cli_bad_label_values_exit_nonzero_without_success_record(tmp_path):
    from tests.test_eval_cli import run_cli

    root = make_msd(tmp_path / "btcv", 6)
    bad = labels(0, 14)
    bad[1, 1, 1] = 99
    save(root / "labelsTr" / "label0000.nii.gz", bad)
    pinned = tmp_path / "split.json"
    pinned.write_text(json.dumps({"test": ["img0000"], "calib": ["img0001"]}))
    proc = run_cli(
        "mqb.eval",
        "dataset=btcv",
        f"dataset.root={root}",
        f"dataset.split_file={pinned}",
        "dataset.splits={test: 1, calib: 1, val: 0}",
        "dataset.roi_size=[32,32,32]",
        "model.checkpoint=null",
        "trainer.progress=false",
        tmp=tmp_path,
        check=False,
    )
    assert proc.returncode == 2
    assert "case 'img0000': label file" in proc.stderr and "[99] outside the class table 0..13" in proc.stderr
    results = tmp_path / "out" / "results"
    assert all(p.name.endswith(".error.json") for p in results.glob("*.json"))


def test_brain_t1_crop_has_no_labels(tmp_path):
    dm = datamodule("brain_t1_crop", tmp_path)
    assert not dm.test_has_labels and dm.class_names[13] == "Brain-Stem"
    case = dm.splits["test"][0]
    item = dm.eval_transforms()(case)
    assert tuple(item["image"].shape) == (1, 256, 256, 256) and "label" not in item


def test_non_ras_input_is_reoriented(tmp_path):
    root = tmp_path / "task"
    lps = np.diag([-0.8, -0.8, 2.5, 1.0])
    img = ct(0)
    save(root / "images" / "a.nii.gz", img, lps)
    save(root / "labels" / "a.nii.gz", labels(0, 3), lps)
    items = [{"image": "images/a.nii.gz", "label": "labels/a.nii.gz"}]
    (root / "dataset.json").write_text(json.dumps({"labels": {"0": "bg", "1": "x", "2": "y"}, "training": items}))
    dm = datamodule(
        "msd",
        tmp_path,
        f"dataset.root={root}",
        "dataset.num_classes=3",
        "dataset.intensity=null",
        "dataset.splits={test: 1, calib: 0, val: 0}",
    )
    item = dm.eval_transforms()(dm.splits["test"][0])
    assert torch.all(torch.diagonal(item["image"].affine[:3, :3]) > 0)
    assert item["image"][0, -1, -1, 0].item() == pytest.approx(37.5)  # voxel (0, 0, 0) flipped along x and y


@pytest.mark.parametrize("name", ["ts_example_ct", "brain_aseg_sample", "brain_t1_crop"])
def test_missing_samples_say_what_to_set(tmp_path, name):
    nowhere = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match="set paths.data_dir to the folder holding them") as err:
        datamodule(name, tmp_path, f"paths.data_dir={nowhere}").splits  # noqa: B018
    assert f"paths.data_dir='{nowhere}' (no samples there)" in str(err.value)


def test_a_missing_sample_file_says_what_to_set(tmp_path):
    """A samples folder that lacks one file: the error names the case, the file and the setting."""
    partial = tmp_path / "partial" / "voxelmorph_brain_t1_aseg"
    partial.mkdir(parents=True)
    with pytest.raises(DatasetError, match="case 'voxelmorph_test_scan': image file .* is missing; .*paths.data_dir"):
        datamodule("brain_aseg_sample", tmp_path, f"paths.data_dir={partial.parent}").splits  # noqa: B018


def test_a_file_fixed_in_place_changes_the_case_fingerprint_and_the_cache_keys(tmp_path):
    """Caches are keyed on content, not only on paths: fixing a file in place recomputes."""
    import os

    from mqb.pipeline import baseline_key

    root = make_msd(tmp_path / "btcv", 5)
    overrides = (f"dataset.root={root}", "dataset.splits={test: 2, calib: 2, val: 0}")
    before = datamodule("btcv", tmp_path, *overrides).splits
    case = before["test"][0]
    assert case["fingerprint"].startswith("image:") and ";label:" in case["fingerprint"]
    image = Path(case["image"])
    data = nib.load(image)
    fixed = np.asarray(data.dataobj).copy()
    fixed[0, 0, 0] += 1.0
    nib.save(nib.Nifti1Image(fixed, data.affine), image)
    os.utime(image, ns=(os.stat(image).st_atime_ns, os.stat(image).st_mtime_ns + 1_000_000))
    after = datamodule("btcv", tmp_path, *overrides).splits
    assert after["test"][0]["case"] == case["case"] and after["test"][0]["fingerprint"] != case["fingerprint"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("eval", overrides=["dataset=btcv", *overrides])
    keys = {baseline_key(cfg, None, [c["fingerprint"] for c in s["test"]]) for s in (before, after)}
    assert len(keys) == 2
