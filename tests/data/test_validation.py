"""Issue 16, item 6: every case's files are checked at data set-up, before any evaluation work.

Real broken files made in tmp folders (a truncated copy of a shipped sample, a 4-D and a 2-D image, a label on
another grid, complex voxels, a singular affine) must stop ``SegmentationDataModule.splits`` with a
``DatasetError`` that names the case and the file; complete files in every form must pass, the cheap way.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from mqb.config import CONF_DIR, register_configs
from mqb.data import sources
from mqb.data.sources import DatasetError, check_volume_file
from mqb.samples import shipped_data_dir

register_configs()
SAMPLE = shipped_data_dir() / "voxelmorph_brain_t1_aseg" / "test_scan_t1.nii.gz"  # 1.8 MB, 160 x 192 x 224 uint8


def _save(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


def _folder(tmp_path: Path, labels: bool = False) -> Path:
    """A ``dataset=folder`` tree with two good 16^3 images (and their labels)."""
    root = tmp_path / "scans"
    for name in ("good_a", "good_b"):
        _save(root / f"{name}.nii.gz", np.random.default_rng(0).normal(size=(16, 16, 16)).astype(np.float32))
        if labels:
            _save(root / "labels" / f"{name}.nii.gz", np.zeros((16, 16, 16), np.uint8))
    return root


def _datamodule(tmp_path: Path, root: Path):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("eval", overrides=["dataset=folder", f"dataset.root={root}", f"paths.cache_dir={tmp_path / 'c'}"])
    return instantiate(cfg.dataset)


def _refused(tmp_path: Path, root: Path) -> str:
    dm = _datamodule(tmp_path, root)
    with pytest.raises(DatasetError) as info:
        dm.splits  # noqa: B018  (set-up: lists, splits and checks the cases)
    assert not (tmp_path / "c" / "persistent").exists()  # refused before any volume was loaded or cached
    return str(info.value)


@pytest.mark.parametrize(
    ("cut", "why"),
    [
        (lambda b: b[: len(b) // 2], "truncated: its gzip stream ends"),  # a copy interrupted half-way
        (lambda b: b[:-1], "truncated: its gzip stream ends"),  # the last byte of the trailer missing
        (lambda b: b[:-8], "truncated: its gzip stream ends"),  # the whole trailer (CRC + size) missing
        (lambda b: gzip.compress(gzip.decompress(b)[:-1000]), "too short: it holds"),  # complete gzip, short data
    ],
    ids=["half", "last_byte", "trailer", "short_data"],
)
def test_a_cut_copy_of_a_shipped_sample_is_refused_at_set_up_naming_case_and_file(tmp_path, cut, why):
    root = _folder(tmp_path)
    bad = root / "brain_t1.nii.gz"
    bad.write_bytes(cut(SAMPLE.read_bytes()))
    nib.load(bad)  # its header alone still reads fine: only the size / gzip check finds it
    message = _refused(tmp_path, root)
    assert f"case 'brain_t1': image file {str(bad)!r} is {why}" in message, message
    assert "valid: a complete file" in message


def test_an_uncompressed_nifti_cut_short_is_refused(tmp_path):
    data = gzip.decompress(SAMPLE.read_bytes())
    bad = tmp_path / "raw" / "brain_t1.nii"
    bad.parent.mkdir()
    bad.write_bytes(data[:-5])
    with pytest.raises(DatasetError, match=r"case 'x': image file .*brain_t1.nii' is truncated: 6,881,627 bytes, the "
                                           r"header announces 6,881,632"):  # fmt: skip
        check_volume_file(bad, "x", "image")


def test_complete_files_pass_and_a_complete_gzip_is_not_decompressed(tmp_path, monkeypatch):
    raw = gzip.decompress(SAMPLE.read_bytes())
    multi = tmp_path / "bgzip_like.nii.gz"  # several gzip members, as bgzip writes: checked by decompressing it
    multi.write_bytes(gzip.compress(raw[:1_000_000]) + gzip.compress(raw[1_000_000:]))
    plain = tmp_path / "plain.nii"
    plain.write_bytes(raw)
    for path in (SAMPLE, multi, plain):
        assert check_volume_file(path, "c", "image").shape == (160, 192, 224)

    def no_decompression(*args, **kwargs):
        raise AssertionError("a complete single-member gzip file must be checked from its trailer alone")

    monkeypatch.setattr(gzip, "open", no_decompression)
    assert check_volume_file(SAMPLE, "c", "image").shape == (160, 192, 224)  # the cheap path: header + trailer
    with pytest.raises(AssertionError):
        check_volume_file(multi, "c", "image")  # (the trailer alone cannot vouch for a multi-member file)


def _four_d(root: Path) -> tuple[Path, str]:
    return _save(root / "bad.nii.gz", np.zeros((8, 8, 8, 3), np.float32)), "has shape (8, 8, 8, 3); valid: one 3-D"


def _two_d(root: Path) -> tuple[Path, str]:
    return _save(root / "bad.nii.gz", np.zeros((16, 16), np.float32)), "has shape (16, 16); valid: one 3-D volume"


def _complex(root: Path) -> tuple[Path, str]:
    path = _save(root / "bad.nii.gz", np.zeros((8, 8, 8), np.complex64))
    return path, "stores voxels as complex64 (NIfTI datatype 32); valid: bool, integer, unsigned integer, float"


def _singular(root: Path) -> tuple[Path, str]:
    header = nib.Nifti1Header()
    affine = np.diag([1.0, 1.0, 0.0, 1.0])  # a zero voxel size in the sform
    header.set_sform(affine, code=1)
    path = root / "bad.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), None, header=header), path)
    return path, "has the affine [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]], which does not"


@pytest.mark.parametrize("make", [_four_d, _two_d, _complex, _singular], ids=["4d", "2d", "complex", "singular"])
def test_images_that_cannot_be_evaluated_are_refused_at_set_up(tmp_path, make):
    root = _folder(tmp_path)
    bad, why = make(root)
    message = _refused(tmp_path, root)
    assert f"case 'bad': image file {str(bad)!r} {why}" in message, message


def test_a_label_on_another_grid_is_refused_at_set_up(tmp_path):
    root = _folder(tmp_path, labels=True)
    _save(root / "bad.nii.gz", np.zeros((16, 16, 16), np.float32))
    label = _save(root / "labels" / "bad.nii.gz", np.zeros((16, 16, 12), np.uint8))
    message = _refused(tmp_path, root)
    assert f"case 'bad': image {str(root / 'bad.nii.gz')!r} shape (16, 16, 16) != label {str(label)!r}" in message
    _save(root / "labels" / "bad.nii.gz", np.zeros((16, 16, 16), np.uint8), np.diag([2.0, 1.0, 1.0, 1.0]))
    assert "different affines" in _refused(tmp_path, root)


def test_every_case_goes_through_the_one_check(tmp_path, monkeypatch):
    """The data module's set-up checks each image and label once, through ``check_volume_file``."""
    root = _folder(tmp_path, labels=True)
    seen = []
    real = sources.check_volume_file
    monkeypatch.setattr(sources, "check_volume_file", lambda p, c, r: seen.append((c, r)) or real(p, c, r))
    _datamodule(tmp_path, root).splits  # noqa: B018
    assert sorted(seen) == [("good_a", "image"), ("good_a", "label"), ("good_b", "image"), ("good_b", "label")]


@pytest.mark.slow
def test_cli_refuses_a_truncated_file_with_exit_2_naming_it_and_writes_no_success_record(tmp_path):
    from tests.test_eval_cli import run_cli

    root = _folder(tmp_path)
    bad = root / "brain_t1.nii.gz"
    bad.write_bytes(SAMPLE.read_bytes()[:-4096])
    proc = run_cli("mqb.eval", "dataset=folder", f"dataset.root={root}", "model.checkpoint=null", "logger=none",
                   "trainer.progress=false", tmp=tmp_path, check=False)  # fmt: skip
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"case 'brain_t1': image file {str(bad)!r} is truncated" in proc.stderr
    assert "Traceback" not in proc.stderr
    results = tmp_path / "out" / "results"
    errors = [json.loads(p.read_text()) for p in results.glob("*.error.json")]
    assert len(errors) == 1 and "brain_t1.nii.gz" in errors[0]["error"]
    assert [p for p in results.glob("*.json") if not p.name.endswith(".error.json")] == []  # no success record
    assert not (tmp_path / "cache" / "baselines").exists() and not (tmp_path / "cache" / "persistent").exists()
