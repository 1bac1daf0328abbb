"""Case sources: where the image/label files of a dataset are, read from the layouts users already have.

A source's ``cases()`` returns ``[{"case", "image", "label"}]`` records (absolute paths) and its
``class_names``. Nothing is downloaded. Layouts that store one mask per structure (TotalSegmentator,
AbdomenAtlas) are combined once into a single label map by the documented class table and written (atomically)
to a cache folder. Every problem raises :class:`DatasetError` naming the case and the file.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from mqb.data.tables import (
    ABDOMENATLAS_CLASSES,
    ASEG_TO_BRAIN18,
    BRAIN18_CLASSES,
    BTCV_CLASSES,
    BTCV_FROM_TOTALSEGMENTATOR,
    totalsegmentator_classes,
)
from mqb.results import atomic_write
from mqb.samples import missing_sample_hint, shipped_data_dir


class DatasetError(ValueError):
    """A dataset on disk is missing, unreadable or inconsistent (the message names the case and file)."""


def _require_dir(root: str | os.PathLike[str], what: str, hint: str) -> Path:
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DatasetError(f"{what}: folder {str(path)!r} does not exist; {hint}")
    return path


def _sample_folder(data_dir: str, name: str) -> Path:
    """A folder of the shipped real samples (``paths.data_dir``/name), with a message saying what to set."""
    return _require_dir(Path(data_dir) / name, "paths.data_dir", missing_sample_hint(data_dir))


def _require_file(path: Path, case: str, role: str, data_dir: str | None = None) -> str:
    """``path`` as a string; a missing file raises naming the case (and, for a shipped sample read from
    ``data_dir``, the setting that says where the samples are)."""
    if not path.is_file():
        hint = f"; {missing_sample_hint(data_dir)}" if data_dir is not None else ""
        raise DatasetError(f"case {case!r}: {role} file {str(path)!r} is missing{hint}")
    return str(path)


def _default_data_dir() -> str:
    return str(shipped_data_dir())


def _atomic_nifti(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    with atomic_write(path) as tmp:
        nib.save(nib.Nifti1Image(data, affine), tmp)


# -- one check of every case's files at set-up ---------------------------------------------------------------
#: NumPy kinds a volume may hold: bool, signed and unsigned integers, floats (not complex, RGB or other records).
VOLUME_KINDS = {"b": "bool", "i": "integer", "u": "unsigned integer", "f": "float"}
#: How far the voxel grids of an image and its label may differ (affine entries, mm).
AFFINE_TOLERANCE = 1e-3


def _gzip_problem(path: Path, needed: int) -> str | None:
    """Why the gzip file ``path`` cannot hold ``needed`` uncompressed bytes (header + voxels), or ``None``.

    Cheap first: a complete single-member gzip file ends with ISIZE, the uncompressed length modulo 2^32
    (RFC 1952), which equals ``needed`` for a NIfTI written in one piece; a file cut short ends in the middle of
    the compressed data instead, whose last 4 bytes match by chance with probability 2^-32. Only where they differ
    (cut short, several members as bgzip writes, trailing data as in .mgz) is the whole file decompressed: an
    incomplete stream, a bad CRC or fewer bytes than ``needed`` is a problem, anything else is fine."""
    import gzip
    import zlib

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            magic = f.read(2)
            f.seek(max(0, size - 4))
            trailer = f.read(4)
    except OSError as err:
        return f"unreadable ({err.strerror or err})"
    if magic != b"\x1f\x8b":
        return "not gzip-compressed although its name ends in .gz"
    if size >= 18 and int.from_bytes(trailer, "little") == needed % (1 << 32):
        return None
    total = 0
    try:
        with gzip.open(path, "rb") as f:
            while chunk := f.read(1 << 16):
                total += len(chunk)
    except EOFError:
        return (f"truncated: its gzip stream ends after about {total:,} of the {needed:,} uncompressed bytes the "
                "header announces (an interrupted copy or download?)")  # fmt: skip
    except (OSError, zlib.error) as err:
        return f"corrupt: bad gzip data after about {total:,} uncompressed bytes ({err})"
    if total < needed:
        return f"too short: it holds {total:,} uncompressed bytes, its header announces {needed:,}"
    return None


def check_volume_file(path: str | os.PathLike[str], case: str, role: str) -> nib.spatialimages.SpatialImage:
    """Check one image or label file from its header and its size, without reading the voxels; return the image
    (header and lazy data). Raises :class:`DatasetError` naming the case, the file and what is valid when the file
    is missing, not a readable NIfTI, cut short (an incomplete gzip member, or fewer bytes than the header
    announces), not one 3-D volume (2-D; 4-D with several volumes; a zero-size axis), of a dtype that is not
    bool / integer / float, or placed by a non-finite or singular affine."""
    path = Path(path)
    where = f"case {case!r}: {role} file {str(path)!r}"
    if not path.is_file():
        raise DatasetError(f"{where} is missing")
    try:
        img = nib.load(str(path))
        shape = tuple(int(n) for n in img.header.get_data_shape())
        dtype = np.dtype(img.get_data_dtype())
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as err:  # noqa: BLE001
        raise DatasetError(f"{where} is not a readable NIfTI ({err})") from None
    if not (len(shape) == 3 or (len(shape) == 4 and shape[3] == 1)):
        why = ""
        if len(shape) < 3:
            why = f" — a {len(shape)}-D image cannot be evaluated in 3-D"
        elif len(shape) == 4:
            why = f" — it holds {shape[3]} volumes (a time series or channels); give one volume per file"
        raise DatasetError(f"{where} has shape {shape}; valid: one 3-D volume (X, Y, Z), or (X, Y, Z, 1){why}")
    if min(shape) < 1:
        raise DatasetError(f"{where} has shape {shape} with an empty axis; valid: at least one voxel per axis")
    if dtype.kind not in VOLUME_KINDS:
        raise DatasetError(
            f"{where} stores voxels as {dtype} (NIfTI datatype {int(img.header['datatype'])}); valid: "
            f"{', '.join(VOLUME_KINDS.values())} voxels (not complex or RGB)"
        )
    if not np.isfinite(affine).all() or abs(float(np.linalg.det(affine[:3, :3]))) < 1e-12:
        raise DatasetError(
            f"{where} has the affine {affine[:3].round(4).tolist()}, which does not place voxels in space "
            "(non-finite, or a zero voxel size); valid: a finite affine with non-zero voxel sizes (sform or qform)"
        )
    offset = int(getattr(img.dataobj, "offset", 0) or 0)
    needed = offset + int(np.prod(shape)) * dtype.itemsize
    if path.name.endswith(".nii.gz"):
        problem = _gzip_problem(path, needed)
    else:
        size = path.stat().st_size
        problem = (f"truncated: {size:,} bytes, the header announces {needed:,} (an interrupted copy or download?)"
                   if size < needed and path.suffix == ".nii" else None)  # fmt: skip
    if problem is not None:
        raise DatasetError(f"{where} is {problem}; valid: a complete file (copy or download it again)")
    return img


def validate_cases(cases: Sequence[dict[str, str]]) -> None:
    """Check every case's files up front, before any work (the one place: ``SegmentationDataModule.splits``):
    each image and label by :func:`check_volume_file` (readable, complete, one 3-D volume, a voxel dtype, a
    usable affine), and a label against its image: the same grid (shape and affine). Raises :class:`DatasetError`
    naming the case and the file (the CLI exits 2)."""
    for c in cases:
        images = {role: check_volume_file(c[role], c["case"], role) for role in ("image", "label") if role in c}
        if "label" not in images:
            continue
        image, label = images["image"], images["label"]
        if tuple(image.shape[:3]) != tuple(label.shape[:3]):
            raise DatasetError(
                f"case {c['case']!r}: image {c['image']!r} shape {image.shape} != label {c['label']!r} shape "
                f"{label.shape}; valid: a label map on the image's voxel grid"
            )
        if not np.allclose(image.affine, label.affine, atol=AFFINE_TOLERANCE):
            raise DatasetError(
                f"case {c['case']!r}: image {c['image']!r} and label {c['label']!r} have different affines "
                f"(not aligned in space; valid: equal within {AFFINE_TOLERANCE} mm)"
            )


def _load(path: Path, case: str, role: str) -> nib.Nifti1Image:
    try:
        img = nib.load(str(path))
        img.get_fdata(dtype=np.float32) if role == "mask" else None
        return img
    except Exception as err:  # noqa: BLE001
        raise DatasetError(f"case {case!r}: {role} file {str(path)!r} is not a readable NIfTI ({err})") from None


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class MSDSource:
    """Medical Segmentation Decathlon layout (also MONAI's BTCV tutorial): a ``dataset.json`` listing
    ``{"image": ..., "label": ...}`` pairs (paths relative to ``root``) under ``sections``, with a ``labels``
    table ``{"0": "background", ...}``.
    """

    root: str
    dataset_json: str = "dataset.json"
    sections: tuple[str, ...] = ("training",)

    def _json(self) -> dict:
        root = _require_dir(self.root, "dataset.root", "point dataset.root at the folder holding the dataset JSON")
        path = root / self.dataset_json
        if not path.is_file():
            raise DatasetError(f"dataset.root {str(root)!r} has no {self.dataset_json!r} (expected the MSD layout)")
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise DatasetError(f"{str(path)!r} is not valid JSON: {err}") from None

    @property
    def class_names(self) -> list[str]:
        labels = self._json().get("labels")
        if not isinstance(labels, dict) or not labels:
            raise DatasetError(f"{self.dataset_json!r} has no 'labels' table")
        ids = sorted(int(k) for k in labels)
        if ids != list(range(len(ids))):
            raise DatasetError(f"{self.dataset_json!r}: label ids {ids} are not 0..{len(ids) - 1}")
        return [str(labels[str(i)]) for i in ids]

    def cases(self) -> list[dict[str, str]]:
        data, root = self._json(), Path(self.root).expanduser()
        records = []
        for section in self.sections:
            if section not in data:
                raise DatasetError(f"{self.dataset_json!r} has no section {section!r}; it has {sorted(data)}")
            for item in data[section]:
                if not isinstance(item, dict) or "image" not in item or "label" not in item:
                    raise DatasetError(f"{self.dataset_json!r}: entry {item!r} in {section!r} lacks image/label")
                image = (root / item["image"]).resolve()
                case = Path(item["image"]).name.split(".")[0]
                records.append(
                    {
                        "case": case,
                        "image": _require_file(image, case, "image"),
                        "label": _require_file((root / item["label"]).resolve(), case, "label"),
                    }
                )
        if not records:
            raise DatasetError(f"{self.dataset_json!r} lists no cases in {list(self.sections)}")
        return records


@dataclass(frozen=True)
class MaskFolderSource:
    """One folder per case with ``<case>/<image_name>`` and ``<case>/segmentations/<structure>.nii.gz`` masks
    (TotalSegmentator v2, AbdomenAtlas 1.1), combined into one label map: structure ``classes[i]`` -> id i+1.

    Attributes:
        root: the dataset folder.
        classes: structure names in label-id order (the dataset's official table, or a subset of it).
        cache_dir: where combined label maps are written.
        image_name: the image file inside each case folder.
        missing_ok: a case without a mask file for some structure treats it as absent (TotalSegmentator
            omits nothing, AbdomenAtlas neither; keep False to catch incomplete copies).
    """

    root: str
    classes: tuple[str, ...]
    cache_dir: str = ".cache/mqb/labels"
    image_name: str = "ct.nii.gz"
    missing_ok: bool = False

    @property
    def class_names(self) -> list[str]:
        return ["background", *self.classes]

    def cases(self) -> list[dict[str, str]]:
        root = _require_dir(self.root, "dataset.root", "point it at the folder holding one sub-folder per case")
        folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not folders:
            raise DatasetError(
                f"dataset.root {str(root)!r} has no case folders (expected <case>/{self.image_name} and "
                "<case>/segmentations/<structure>.nii.gz)"
            )
        out_dir = Path(self.cache_dir) / f"{root.name}-{_digest([str(root), list(self.classes)])}"
        records = []
        for folder in folders:
            case = folder.name
            image = folder / self.image_name
            _require_file(image, case, "image")
            label = out_dir / f"{case}_label.nii.gz"
            if not label.is_file():
                self._combine(case, folder, image, label)
            records.append({"case": case, "image": str(image), "label": str(label)})
        return records

    def _combine(self, case: str, folder: Path, image: Path, out: Path) -> None:
        ref = check_volume_file(image, case, "image")
        label = np.zeros(ref.shape[:3], dtype=np.uint8 if len(self.classes) < 255 else np.uint16)
        seg_dir = folder / "segmentations"
        if not seg_dir.is_dir():
            raise DatasetError(f"case {case!r}: folder {str(seg_dir)!r} is missing")
        for index, name in enumerate(self.classes, start=1):
            path = seg_dir / f"{name}.nii.gz"
            if not path.is_file():
                if self.missing_ok:
                    continue
                raise DatasetError(f"case {case!r}: mask file {str(path)!r} is missing (structure {name!r})")
            mask_img = _load(path, case, "mask")
            if mask_img.shape[:3] != ref.shape[:3] or not np.allclose(mask_img.affine, ref.affine, atol=1e-3):
                raise DatasetError(
                    f"case {case!r}: mask file {str(path)!r} has shape {mask_img.shape} / affine unlike the image "
                    f"{str(image)!r} {ref.shape}"
                )
            label[np.asarray(mask_img.dataobj) > 0] = index
        _atomic_nifti(label, ref.affine, out)


def totalsegmentator_source(root: str, classes: Sequence[str] | None = None, cache_dir: str = ".cache/mqb/labels"):
    """TotalSegmentator v2 (117 structures, official id order); ``classes`` picks a subset (renumbered 1..K)."""
    table = totalsegmentator_classes()
    chosen = tuple(classes) if classes else table
    unknown = [c for c in chosen if c not in table]
    if unknown:
        raise DatasetError(f"dataset.classes: {unknown} are not TotalSegmentator v2 structures (e.g. {table[:4]})")
    return MaskFolderSource(root=root, classes=chosen, cache_dir=cache_dir)


def abdomenatlas_source(root: str, cache_dir: str = ".cache/mqb/labels") -> MaskFolderSource:
    """AbdomenAtlas 1.1 (25 structures in the official order)."""
    return MaskFolderSource(root=root, classes=ABDOMENATLAS_CLASSES, cache_dir=cache_dir)


@dataclass(frozen=True)
class PairSource:
    """Image/label NIfTI pairs listed in a JSON (``[{"image", "label"}]``, paths relative to ``root``) or found
    by two glob patterns matched in sorted order (e.g. whole-brain T1 MRI with 133-class labels).
    """

    root: str
    pairs_json: str | None = None
    image_glob: str = "images/*.nii.gz"
    label_glob: str = "labels/*.nii.gz"
    num_classes: int = 133
    class_table: str | None = None  # JSON list of names, relative to root; default "class_<i>"

    @property
    def class_names(self) -> list[str]:
        if self.class_table:
            names = json.loads((Path(self.root) / self.class_table).read_text())
            if len(names) != self.num_classes:
                raise DatasetError(f"{self.class_table!r} has {len(names)} names; num_classes={self.num_classes}")
            return list(names)
        return ["background", *(f"class_{i}" for i in range(1, self.num_classes))]

    def cases(self) -> list[dict[str, str]]:
        root = _require_dir(self.root, "dataset.root", "point it at the folder with the image/label pairs")
        if self.pairs_json:
            pairs = json.loads((root / self.pairs_json).read_text())
            items = [((root / p["image"]).resolve(), (root / p["label"]).resolve()) for p in pairs]
        else:
            images = sorted(glob.glob(str(root / self.image_glob)))
            labels = sorted(glob.glob(str(root / self.label_glob)))
            if not images or len(images) != len(labels):
                raise DatasetError(
                    f"dataset.root {str(root)!r}: {len(images)} images ({self.image_glob!r}) vs {len(labels)} labels "
                    f"({self.label_glob!r}); expected equal, non-zero counts"
                )
            items = [(Path(i), Path(lab)) for i, lab in zip(images, labels, strict=True)]
        records = []
        for image, label in items:
            case = image.name.split(".")[0]
            records.append(
                {
                    "case": case,
                    "image": _require_file(image, case, "image"),
                    "label": _require_file(label, case, "label"),
                }
            )
        return records


@dataclass(frozen=True)
class TotalSegmentatorExampleCT:
    """The real TotalSegmentator example CT (``data/totalsegmentator_example_ct``), labels mapped to BTCV-13.

    Two disjoint pieces of the same 3 mm abdominal CT: **test** = ``example_ct_sm`` (the top 30 slices, labels
    ``example_seg``, TotalSegmentator 1.5 mm model) and **calibration** = slices 0..81 of ``example_ct``
    (labels ``example_seg_fast_force_split``), which do not overlap the test slices (82..111). Labels are model
    outputs (pseudo ground truth), see the folder's PROVENANCE.md.
    """

    data_dir: str = field(default_factory=_default_data_dir)
    cache_dir: str = ".cache/mqb/labels"
    class_names: tuple[str, ...] = field(default=BTCV_CLASSES)

    def cases(self) -> list[dict[str, str]]:
        folder = _sample_folder(self.data_dir, "totalsegmentator_example_ct")
        out = Path(self.cache_dir) / "ts_example_ct"
        lut = np.zeros(256, dtype=np.uint8)
        for btcv_id, name in enumerate(BTCV_CLASSES[1:], start=1):
            lut[BTCV_FROM_TOTALSEGMENTATOR[name]] = btcv_id
        specs = [
            ("ts_example_top30", "example_ct_sm.nii.gz", "example_seg.nii.gz", None),
            ("ts_example_lower82", "example_ct.nii.gz", "example_seg_fast_force_split.nii.gz", slice(0, 82)),
        ]
        records = []
        for case, image_name, label_name, z in specs:
            image_path, label_path = folder / image_name, folder / label_name
            _require_file(image_path, case, "image", self.data_dir)
            _require_file(label_path, case, "label", self.data_dir)
            image_out, label_out = out / f"{case}_ct.nii.gz", out / f"{case}_label.nii.gz"
            if not (image_out.is_file() and label_out.is_file()):
                img, lab = _load(image_path, case, "image"), _load(label_path, case, "label")
                ct = np.asarray(img.dataobj).astype(np.int16)
                seg = lut[np.asarray(lab.dataobj).astype(np.uint8)]
                affine = img.affine
                if z is not None:
                    ct, seg = ct[:, :, z], seg[:, :, z]
                    affine = img.slicer[:, :, z].affine
                _atomic_nifti(ct, affine, image_out)
                _atomic_nifti(seg, affine, label_out)
            split = "test" if z is None else "calib"
            records.append({"case": case, "image": str(image_out), "label": str(label_out), "split": split})
        return records


@dataclass(frozen=True)
class FolderSource:
    """Your own scans: the NIfTI images ``root/<image_glob>``, each with a label map of the same file name in
    ``root/<label_dir>/`` where you have one (``dataset=folder``).

    All images labelled: DSC / NSD / HD95 against the labels. None labelled: every quantized run is scored by its
    agreement with the FP32 prediction of the same model (records say ``reference: fp32_prediction``). Labels for
    some images only is refused (say which images lack one), as is an empty folder.

    Attributes:
        root: the folder (``dataset.root``).
        num_classes: the model's output classes (class names ``class1`` ... unless the dataset gives them).
        image_glob: which files are images (relative to ``root``; sorted; the case id is the file name without
            ``.nii``/``.nii.gz``).
        label_dir: the label folder under ``root``, or ``None`` (images only).
    """

    root: str
    num_classes: int = 2
    image_glob: str = "*.nii.gz"
    label_dir: str | None = "labels"

    @property
    def class_names(self) -> list[str]:
        return ["background", *[f"class{i}" for i in range(1, int(self.num_classes))]]

    def cases(self) -> list[dict[str, str]]:
        root = _require_dir(self.root, "dataset.root", "point it at the folder holding your NIfTI images")
        images = sorted(p for p in root.glob(self.image_glob) if p.is_file())
        if not images:
            raise DatasetError(f"dataset.root {str(root)!r} has no images matching {self.image_glob!r}")
        labels = root / self.label_dir if self.label_dir else None
        records, unlabelled = [], []
        for image in images:
            case = image.name.removesuffix(".gz").removesuffix(".nii")
            record = {"case": case, "image": str(image)}
            label = labels / image.name if labels is not None else None
            if label is not None and label.is_file():
                record["label"] = str(label)
            else:
                unlabelled.append(image.name)
            records.append(record)
        if unlabelled and len(unlabelled) < len(records):
            raise DatasetError(
                f"dataset.root {str(root)!r}: {len(unlabelled)} of {len(records)} images have no label map in "
                f"{str(labels)!r} (e.g. {unlabelled[:3]}); label every image, or none (scored against FP32)"
            )
        return records


@dataclass(frozen=True)
class BrainAsegSample:
    """The real VoxelMorph T1 (1 mm, skull-stripped) with its FreeSurfer aseg mapped to the 18 brainchop classes
    (**test**), calibrated on a different brain: the MNI ICBM152 2009a T1 template (no labels needed).
    """

    data_dir: str = field(default_factory=_default_data_dir)
    cache_dir: str = ".cache/mqb/labels"
    class_names: tuple[str, ...] = field(default=BRAIN18_CLASSES)

    def cases(self) -> list[dict[str, str]]:
        folder = _sample_folder(self.data_dir, "voxelmorph_brain_t1_aseg")
        case = "voxelmorph_test_scan"
        image = folder / "test_scan_t1.nii.gz"
        aseg = folder / "test_scan_aseg.nii.gz"
        _require_file(image, case, "image", self.data_dir)
        _require_file(aseg, case, "label", self.data_dir)
        label_out = Path(self.cache_dir) / "brain_aseg_sample" / f"{case}_brain18.nii.gz"
        if not label_out.is_file():
            lab = _load(aseg, case, "label")
            lut = np.zeros(256, dtype=np.uint8)
            for aseg_id, cls in ASEG_TO_BRAIN18.items():
                lut[aseg_id] = cls
            _atomic_nifti(lut[np.asarray(lab.dataobj).astype(np.uint8)], lab.affine, label_out)
        template = (
            Path(self.data_dir) / "mni_icbm152_2009a_nilearn" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
        )
        return [
            {"case": case, "image": str(image), "label": str(label_out), "split": "test"},
            {
                "case": "mni_icbm152_2009a",
                "image": _require_file(template, "mni_icbm152_2009a", "image", self.data_dir),
                "split": "calib",
            },
        ]


@dataclass(frozen=True)
class BrainT1Crop:
    """The real brainchop T1 head MRI (256^3, 1 mm, LIA, with skull), **no labels**: quantized runs are scored
    against the FP32 model's prediction (agreement metrics). Calibrated on a different brain (the VoxelMorph T1).
    """

    data_dir: str = field(default_factory=_default_data_dir)
    num_classes: int = 18

    @property
    def class_names(self) -> list[str]:
        if self.num_classes == len(BRAIN18_CLASSES):
            return list(BRAIN18_CLASSES)
        return ["background", *(f"class_{i}" for i in range(1, self.num_classes))]

    def cases(self) -> list[dict[str, str]]:
        folder = _sample_folder(self.data_dir, "brainchop_t1_meshnet")
        image = _require_file(folder / "t1_crop.nii.gz", "brainchop_t1_crop", "image", self.data_dir)
        calib = Path(self.data_dir) / "voxelmorph_brain_t1_aseg" / "test_scan_t1.nii.gz"
        return [
            {"case": "brainchop_t1_crop", "image": image, "split": "test"},
            {
                "case": "voxelmorph_test_scan",
                "image": _require_file(calib, "voxelmorph_test_scan", "image", self.data_dir),
                "split": "calib",
            },
        ]
