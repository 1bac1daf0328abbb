"""Fig. 4 in ``mqb.report``: qualitative overlays drawn from the NIfTI label maps that ``eval.save_predictions=true``
lists in a record's ``predictions`` section (Python API, the CLI once, and the HTML page rendered by Chromium).

The volumes are written here in an LPS-like orientation (x and y flipped), so the report must reorient them; the
expected panels, slices and disagreement counts are computed here from the arrays themselves.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mqb.analysis.html import HTML_FILE, render_html
from mqb.analysis.overlays import OVERLAYS_MD, disagreement_slices, load_volume, overlay_figures
from mqb.analysis.report import build_report
from mqb.results import read_records, write_json_atomic
from tests.analysis.test_html import CHROMIUM, Page, chromium
from tests.analysis.test_report import PNG_MAGIC, record

SHAPE = (24, 20, 16)  # canonical (RAS) x, y, z
#: On disk: x and y flipped (an LPS-like affine), 2 x 2 x 2.5 mm.
AFFINE = np.diag([-2.0, -2.0, 2.5, 1.0])
NAMES = ["background", "liver", "spleen", "aorta"]
CONFIGS = {"qa": ("w8a8", "per_channel"), "qb": ("w4a4", "per_tensor")}
TITLES = {"qa": "INT W8A8 Per-channel/token", "qb": "INT W4A4 Per-tensor"}  # the table's labels, in table order


def canonical_volumes() -> dict[str, np.ndarray]:
    """Image, label, FP32 and two quantized predictions in RAS orientation. Disagreement with FP32 per axial slice:
    qb changes 64 voxels of z=3 and 20 of z=12; qa 36 voxels of z=9 and 18 of z=10: the three most informative
    slices are 3, 9 and 12 (z=10 has fewer)."""
    rng = np.random.default_rng(0)
    x, y, z = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    image = (x + 2 * y + 0.5 * z + rng.normal(0, 0.5, SHAPE)).astype(np.float32)
    label = np.zeros(SHAPE, dtype=np.uint8)
    label[4:12, 4:12, 2:14] = 1
    label[14:20, 10:16, 4:12] = 2
    fp32 = label.copy()
    fp32[14, 10:16, 4:12] = 0  # FP32 misses one row of the spleen
    qa, qb = fp32.copy(), fp32.copy()
    qa[15:20, 10:16, 9] = 0  # 30 voxels ...
    qa[4:10, 12, 9] = 1  # ... + 6 = 36
    qa[15:18, 10:16, 10] = 0  # 18
    qb[4:12, 4:12, 3] = 2  # 64 voxels of the liver called spleen
    qb[0:4, 0:5, 12] = 3  # 20 background voxels called aorta
    return {"image": image, "label": label, "fp32": fp32, "qa": qa, "qb": qb}


def write_nifti(path: Path, canonical: np.ndarray) -> str:
    nib.save(nib.Nifti1Image(canonical[::-1, ::-1, :].copy(), AFFINE), str(path))  # stored flipped in x and y
    return str(path)


def write_results(tmp_path: Path, cases: tuple[str, ...] = ("case_1",)) -> tuple[Path, dict[str, np.ndarray]]:
    """An FP32 record and two quantized ones, each with a ``predictions`` section (the contract of
    ``eval.save_predictions``) pointing at NIfTI files under ``tmp_path/runs``."""
    vols = canonical_volumes()
    results = tmp_path / "results"
    sections: dict[str, dict] = {rid: {} for rid in ("fp32", *CONFIGS)}
    for case in cases:
        shared = tmp_path / "runs" / "fp32" / case
        shared.mkdir(parents=True)
        image = write_nifti(shared / "image.nii.gz", vols["image"])
        label = write_nifti(shared / "label.nii.gz", vols["label"])
        fp32 = write_nifti(shared / "prediction.nii.gz", vols["fp32"])
        sections["fp32"][case] = {"prediction": fp32, "fp32": fp32, "image": image, "label": label}
        for rid in CONFIGS:
            folder = tmp_path / "runs" / rid / case
            folder.mkdir(parents=True)
            sections[rid][case] = {"prediction": write_nifti(folder / "prediction.nii.gz", vols[rid]), "fp32": fp32,
                                   "image": image, "label": label}  # fmt: skip
    rows = [("fp32", "fp32", "-", 0.884, 0.800), ("qa", *CONFIGS["qa"], 0.881, 0.792),
            ("qb", *CONFIGS["qb"], 0.600, 0.500)]  # fmt: skip
    for rid, precision, granularity, dsc, nsd in rows:
        r = record(rid, "unet", precision, granularity, dsc, nsd)
        r["config"] = {"dataset": {"name": "btcv", "class_names": NAMES}}
        r["predictions"] = {"dir": str(tmp_path / "runs" / rid), "cases": sections[rid]}
        write_json_atomic(results / f"{rid}.json", r)
    return results, vols


def expected_slices(vols: dict[str, np.ndarray], n: int = 3) -> tuple[list[int], list[int]]:
    counts = sum((vols[q] != vols["fp32"]).sum(axis=(0, 1)) for q in CONFIGS)
    top = sorted((z for z in range(SHAPE[2]) if counts[z] > 0), key=lambda z: (-counts[z], z))[:n]
    return sorted(top), [int(counts[z]) for z in sorted(top)]


def panel_titles(fig) -> list[str]:
    return [a.get_title().replace("\n", " ") for a in fig.axes if a.get_title()]


# -- unit pieces ---------------------------------------------------------------------------------------------
def test_load_volume_reorients_and_names_bad_files(tmp_path):
    vols = canonical_volumes()
    path = write_nifti(tmp_path / "label.nii.gz", vols["label"])
    data, affine = load_volume(path)
    assert np.array_equal(data, vols["label"])  # flipped back to RAS
    assert np.allclose(np.diag(affine)[:3], [2.0, 2.0, 2.5])
    with pytest.raises(Exception, match=r"image file '.*nope\.nii\.gz' does not exist"):
        load_volume(tmp_path / "nope.nii.gz", "image")
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(Exception, match=r"label file '.*broken\.nii\.gz' is unreadable"):
        load_volume(broken, "label")


def test_disagreement_slices():
    vols = canonical_volumes()
    slices, counts = disagreement_slices(vols["fp32"], [vols["qa"], vols["qb"]])
    assert (slices, counts) == expected_slices(vols) == ([3, 9, 12], [64, 36, 20])
    assert disagreement_slices(vols["fp32"], [vols["fp32"]]) == ([], [])
    # neighbours of a taken slice are skipped when a gap is required: 30 slices, n=3 -> at least 3 apart
    fp32 = np.zeros((4, 4, 30), dtype=np.int64)
    pred = fp32.copy()
    pred[:, :, 10] = pred[:, :, 11] = 1
    pred[:2, :, 20] = 1
    assert disagreement_slices(fp32, [pred]) == ([10, 20], [16, 8])


# -- the report ------------------------------------------------------------------------------------------------
def test_overlay_figure_from_saved_predictions(tmp_path):
    results, vols = write_results(tmp_path)
    overlays = overlay_figures(build_report(read_records(results), n_resamples=200))
    assert overlays.warnings == []
    (name,) = overlays.figures
    assert name == "overlay_unet_btcv.png"
    fig = overlays.figures[name]
    slices, counts = expected_slices(vols)
    # one row per chosen slice; columns image, label, FP32 and the quantized configs in table order (no FP32 twice)
    assert panel_titles(fig) == ["image", "label", "FP32", TITLES["qa"], TITLES["qb"]]
    assert len(fig.axes) == 5 * len(slices)
    assert [fig.axes[5 * i].get_ylabel() for i in range(len(slices))] == [f"slice {s} (axis 2)" for s in slices]
    # the panels show the volumes in RAS orientation although the files are stored flipped
    for i, s in enumerate(slices):
        row = fig.axes[5 * i : 5 * i + 5]
        assert np.allclose(row[0].images[0].get_array(), vols["image"][:, :, s].T)
        for ax, key in zip(row[1:], ("label", "fp32", "qa", "qb"), strict=True):
            assert np.array_equal(ax.images[1].get_array()[..., 3] > 0, vols[key][:, :, s].T > 0), (s, key)
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["liver", "spleen", "aorta"]  # the dataset's class names (aorta: qb's false positives)
    caption = overlays.captions[name]
    assert f"axial slices {', '.join(map(str, slices))} of {SHAPE[2]}" in caption
    assert f"({', '.join(map(str, counts))} voxels, summed over the 2 config(s))" in caption
    assert "case case_1" in caption and "RAS" in caption
    # bounded: at most max_configs columns (the rest named in the caption), no figure with max_cases=0
    report = build_report(read_records(results), n_resamples=200)
    one = overlay_figures(report, max_configs=1)
    assert panel_titles(one.figures[name]) == ["image", "label", "FP32", TITLES["qa"]]
    assert "1 further config(s) not shown" in one.captions[name]
    assert overlay_figures(report, max_cases=0).figures == {}


def test_missing_and_unreadable_files_are_warnings(tmp_path):
    results, vols = write_results(tmp_path, cases=("case_1", "case_2"))
    missing = tmp_path / "runs" / "qb" / "case_1" / "prediction.nii.gz"
    missing.unlink()
    label = tmp_path / "runs" / "fp32" / "case_1" / "label.nii.gz"
    label.write_bytes(b"\x1f\x8b\x08 truncated")
    gone = tmp_path / "runs" / "fp32" / "case_2" / "image.nii.gz"
    gone.unlink()
    report = build_report(read_records(results), n_resamples=200)
    overlays = overlay_figures(report, max_cases=2)
    assert list(overlays.figures) == ["overlay_unet_btcv_case_1.png"]  # case_2 has no image: skipped
    fig = overlays.figures["overlay_unet_btcv_case_1.png"]
    assert panel_titles(fig) == ["image", "FP32", TITLES["qa"]]  # no label, no qb column
    caption = overlays.captions["overlay_unet_btcv_case_1.png"]
    assert f"Not shown, no readable prediction (see the warnings): {TITLES['qb']}." in caption
    assert "no readable label: no slice Dice" in caption
    text = "\n".join(overlays.warnings)
    assert len(overlays.warnings) == 3, text
    assert f"prediction file {str(missing)!r} does not exist" in text and "(record qb)" in text
    assert f"label file {str(label)!r} is unreadable" in text
    assert f"image file {str(gone)!r} does not exist" in text and "case case_2 skipped" in text
    # the slices: where qa disagrees with FP32 (qb's column is gone)
    qa_only = sorted(sorted(range(SHAPE[2]), key=lambda z: -int((vols["qa"] != vols["fp32"])[:, :, z].sum()))[:2])
    assert [fig.axes[3 * i].get_ylabel() for i in range(2)] == [f"slice {s} (axis 2)" for s in qa_only]
    # the page still renders, with the warnings in a banner
    page = Page(render_html(report, extra_images=overlays.figures, captions=overlays.captions,
                            warnings=overlays.warnings))  # fmt: skip
    assert any(img["alt"] == "overlay_unet_btcv_case_1.png" for img in page.images)
    html = render_html(report, warnings=overlays.warnings)
    assert "3 warning(s)" in html and "does not exist" in html
    # a malformed section is a warning too, not a crash
    records = read_records(results)
    next(r for r in records if r["id"] == "qa")["predictions"] = {"dir": "/x", "cases": ["not", "a", "dict"]}
    bad = overlay_figures(build_report(records, n_resamples=200))
    assert any("record qa: 'predictions' has no 'cases' mapping" in w for w in bad.warnings)


def test_cli_writes_overlays_and_the_html_page_decodes_them(tmp_path):
    results, _ = write_results(tmp_path)
    missing = tmp_path / "runs" / "qb" / "case_1" / "prediction.nii.gz"
    missing.unlink()
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "-m", "mqb.report", str(results), "--out", str(out), "--figures",
                           "--html"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"mqb.report: warning: overlay of unet on btcv, case case_1: column 'INT W4A4 Per-tensor' left out: " \
           f"prediction file {str(missing)!r} does not exist (record qb)" in proc.stderr  # fmt: skip
    png = out / "overlay_unet_btcv.png"
    assert png.read_bytes()[:8] == PNG_MAGIC and str(png) in proc.stdout
    md = (out / OVERLAYS_MD).read_text()
    assert "![overlay_unet_btcv](overlay_unet_btcv.png)" in md and str(missing) in md
    page = Page((out / HTML_FILE).read_text(encoding="utf-8"))
    assert [img["alt"] for img in page.images][-1] == "overlay_unet_btcv.png"
    # without --figures / --html: no overlay drawn, a hint
    quiet = subprocess.run([sys.executable, "-m", "mqb.report", str(results), "--out", str(tmp_path / "plain")],
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert quiet.returncode == 0 and "--figures or --html draws their overlays" in quiet.stderr
    assert not list((tmp_path / "plain").glob("overlay*"))
    if CHROMIUM is None:
        pytest.skip("chromium is not installed: the page was checked as text only")
    # rendered by a real browser: every image decodes, the overlay at its full size
    dom = Page(chromium(tmp_path, (out / HTML_FILE).as_uri(), "--dump-dom").stdout)
    n = len(dom.images)
    assert n >= 2 and dom.body.get("data-images-decoded") == f"{n}/{n}"
    overlay = next(img for img in dom.images if img["alt"] == "overlay_unet_btcv.png")
    assert int(overlay["data-natural-width"]) > 300 and int(overlay["data-natural-height"]) > 300


def test_multichannel_image_shows_its_first_channel(tmp_path):
    # an image with channels last (e.g. MRI sequences, as NIfTI stores them): the first channel is drawn
    results, vols = write_results(tmp_path)
    image = tmp_path / "runs" / "fp32" / "case_1" / "image.nii.gz"
    stacked = np.stack([vols["image"], -vols["image"]], axis=-1)
    nib.save(nib.Nifti1Image(stacked[::-1, ::-1].copy(), AFFINE), str(image))
    overlays = overlay_figures(build_report(read_records(results), n_resamples=200))
    assert overlays.warnings == []
    fig = overlays.figures["overlay_unet_btcv.png"]
    s = expected_slices(vols)[0][0]
    assert np.allclose(fig.axes[0].images[0].get_array(), vols["image"][:, :, s].T)
    assert "(channel 1 of 2 shown)" in overlays.captions["overlay_unet_btcv.png"]
