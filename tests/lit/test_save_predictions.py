"""``eval.save_predictions=true``: ``mqb.pipeline.evaluate`` writes each test case's label maps (quantized and FP32)
and the synthetic image as NIfTI on the grid the metrics are on, lists them in the record, and leaves the config id
and the FP32 baseline key alone."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from hydra.utils import instantiate

import mqb.pipeline
from mqb.config import compose_eval
from mqb.pipeline import evaluate
from mqb.results import config_id, validate_record

TINY = [
    "dataset.source.num_cases=5",
    "dataset.source.shape=[32,32,16]",
    "dataset.roi_size=[32,32,16]",
    "dataset.splits={test: 2, calib: 1, val: 0}",
    "trainer.progress=false",
    "trainer.accelerator=cpu",
    "logger=none",
    "model.checkpoint=null",
]


@pytest.fixture()
def tiny(tmp_path):
    def cfg(*overrides: str):
        return compose_eval([*TINY, f"paths.output_dir={tmp_path}/run", f"paths.cache_dir={tmp_path}/cache",
                             *overrides])  # fmt: skip

    return cfg


@pytest.fixture()
def evaluators(monkeypatch):
    """Every evaluator ``evaluate`` builds, in order (FP32 baseline first where it is computed)."""
    built = []
    original = mqb.pipeline.build_evaluator

    def spy(*args, **kwargs):
        built.append(original(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(mqb.pipeline, "build_evaluator", spy)
    return built


def load(path: str) -> tuple[np.ndarray, np.ndarray, np.dtype]:
    image = nib.load(path)
    return np.asarray(image.dataobj), image.affine, image.get_data_dtype()


def test_a_quantized_run_writes_its_and_the_fp32_label_maps(tiny, evaluators):
    plain = evaluate(tiny("precision=w8a8", "granularity=per_tensor"))  # FP32 baseline cached without label maps
    assert "predictions" not in plain
    cfg = tiny("precision=w8a8", "granularity=per_tensor", "eval.save_predictions=true")
    assert config_id(cfg) == plain["id"]  # the option only says what else is written
    evaluators.clear()
    record = evaluate(cfg)
    assert validate_record(record) is None and record["metrics"] == plain["metrics"]
    # the baseline cache held no label maps: computed again, under the same key
    assert record["baseline"]["key"] == plain["baseline"]["key"] and record["baseline"]["cached"] is False
    fp32_eval, quant_eval = evaluators
    section = record["predictions"]
    folder = Path(cfg.paths.output_dir).resolve() / "predictions"
    assert section["dir"] == str(folder)
    dm = instantiate(cfg.dataset)
    dm.prepare_data()
    test = dm.splits["test"]
    assert sorted(section["cases"]) == sorted(c["case"] for c in test)
    for case in test:
        name, entry = case["case"], section["cases"][case["case"]]
        assert entry == {"prediction": str(folder / f"{name}.nii.gz"), "fp32": str(folder / "fp32" / f"{name}.nii.gz"),
                         "image": str(folder / "image" / f"{name}.nii.gz"),  # synthetic: generated under the cache
                         "label": str(Path(case["label"]).resolve())}  # fmt: skip
        source = nib.load(case["image"])
        for role, evaluator in (("prediction", quant_eval), ("fp32", fp32_eval)):
            data, affine, dtype = load(entry[role])
            assert dtype == np.uint8 and np.array_equal(data, evaluator.predictions[name].numpy())
            np.testing.assert_allclose(affine, source.affine, atol=1e-6)
        image, affine, dtype = load(entry["image"])  # the image the network saw: windowed to [0, 1]
        np.testing.assert_allclose(affine, source.affine, atol=1e-6)
        expected = dm._dataset("test", dm.eval_transforms())[test.index(case)]["image"][0].numpy()
        assert dtype == np.float32 and np.array_equal(image, expected) and 0.0 <= image.min() < image.max() <= 1.0
    assert not [p for p in folder.rglob(".*")]  # no temporary file left behind


def test_an_fp32_config_writes_the_fp32_maps_on_the_native_grid_of_resampled_data(tiny, evaluators):
    cfg = tiny("precision=fp32", "eval.save_predictions=true", "dataset.pixdim=[1.0,1.0,1.0]")
    record = evaluate(cfg)
    assert len(evaluators) == 1  # the baseline is the config's evaluation
    assert record["metrics"]["definitions"]["grid"].startswith("native")
    folder = Path(record["predictions"]["dir"])
    assert sorted(p.name for p in folder.iterdir()) == ["fp32", "image"]  # no quantized map
    for name, entry in record["predictions"]["cases"].items():
        assert entry["prediction"] == entry["fp32"] == str(folder / "fp32" / f"{name}.nii.gz")
        data, affine, _ = load(entry["fp32"])
        label = nib.load(entry["label"])
        assert data.shape == label.shape == (32, 32, 16)  # the file's grid, not the 1 mm one the network saw
        np.testing.assert_allclose(affine, label.affine, atol=1e-6)
        assert np.array_equal(data, evaluators[0].predictions[name].numpy())
        image, image_affine, _ = load(entry["image"])
        assert image.shape == (32, 32, 16) and np.allclose(image_affine, label.affine, atol=1e-6)
    again = evaluate(cfg)  # the cached baseline now holds the label maps
    assert again["baseline"]["cached"] is True and len(evaluators) == 1
    for name, entry in again["predictions"]["cases"].items():
        assert torch.equal(torch.as_tensor(load(entry["fp32"])[0]), evaluators[0].predictions[name])
