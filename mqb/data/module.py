"""The Lightning DataModule shared by evaluation, calibration and training.

A *source* lists cases (``{"case", "image", "label"}`` file records); the module splits them into disjoint,
seeded train / val / calibration / test sets and builds MONAI pipelines:

* evaluation (test, calibration, val): LoadImaged -> EnsureChannelFirstd -> Orientationd(RAS) ->
  [Spacingd] -> intensity preset -> [CenterSpatialCropd] -> EnsureTyped, cached on disk by ``PersistentDataset``
  (the cache key hashes the transform chain too, so changing preprocessing invalidates it; cached items keep their
  MetaTensor ``applied_operations``, so a cache hit can be inverted like a miss);
* training: the same, then RandCropByPosNegLabeld patches, flips and intensity shifts.

Where the volumes are resampled (``pixdim``) and ``score_on="native"`` (the default), the evaluation chain also keeps
the label as loaded (``native_label``, the file's own grid) and :class:`NativeGrid` maps each predicted label map
back to that grid with MONAI's ``Invertd`` (the inverse of the chain's spatial transforms, nearest neighbour), so
DSC / NSD / HD95 are computed on each case's native grid at its native spacing.
"""

from __future__ import annotations

import enum
import json
import pickle
import warnings
from collections.abc import Iterator, Sequence
from copy import deepcopy
from pathlib import Path
from typing import Any, Protocol

import lightning as L
import numpy as np
import torch
from monai import transforms as T
from monai.data import DataLoader, Dataset, PersistentDataset
from monai.data.meta_tensor import MetaTensor
from monai.data.utils import SUPPORTED_PICKLE_MOD, pickle_hashing
from monai.utils import convert_to_tensor, look_up_option
from monai.utils.enums import MetaKeys, SpaceKeys, TraceKeys

from mqb.data.sources import DatasetError, validate_cases
from mqb.results import atomic_write, clean_temp_files

SPLITS = ("train", "val", "calib", "test")
#: ``dataset.score_on``: the grid the metrics are computed on when the volumes are resampled (``pixdim``).
SCORE_ON = {
    "native": "each case's own grid: the prediction is mapped back (MONAI Invertd, nearest neighbour) and scored "
    "against the label as loaded, at the file's voxel spacing",
    "resampled": "the resampled grid (dataset.pixdim): the prediction is scored against the resampled label",
}


class CaseSource(Protocol):
    def cases(self) -> list[dict[str, str]]: ...


def split_cases(
    cases: Sequence[dict[str, str]],
    sizes: dict[str, int],
    seed: int,
    pinned: dict[str, list[str]] | None = None,
) -> dict[str, list[dict[str, str]]]:
    """Disjoint splits.

    Cases that carry a ``"split"`` key, or are named in ``pinned`` (``{"test": [case, ...], ...}``, e.g. from
    ``dataset.split_file``), keep that split. The others are assigned by a seeded permutation: ``sizes`` gives
    the val/calib/test counts (``test: -1``: every case left after calib and val) and train gets the rest (or
    ``sizes['train']``). Raises ``ValueError`` when the
    requested sizes exceed the available cases or a pinned case does not exist.
    """
    unknown = set(sizes) - set(SPLITS) | (set(pinned or {}) - set(SPLITS))
    if unknown:
        raise ValueError(f"dataset.splits has unknown split(s) {sorted(unknown)}; valid: {list(SPLITS)}")
    by_name = {c["case"]: c for c in cases}
    if len(by_name) != len(cases):
        raise ValueError("dataset: case names are not unique")
    out: dict[str, list[dict[str, str]]] = {name: [] for name in SPLITS}
    assigned: set[str] = set()
    for name, members in (pinned or {}).items():
        for case in members:
            if case not in by_name:
                raise ValueError(f"dataset.split_file pins case {case!r} to {name!r} but the dataset has no such case")
            if case in assigned:
                raise ValueError(f"dataset.split_file pins case {case!r} to more than one split")
            out[name].append(by_name[case])
            assigned.add(case)
    for c in cases:
        if "split" in c and c["case"] not in assigned:
            if c["split"] not in SPLITS:
                raise ValueError(f"case {c['case']!r} has split {c['split']!r}; valid: {list(SPLITS)}")
            out[c["split"]].append(c)
            assigned.add(c["case"])
    free = [c for c in cases if c["case"] not in assigned]
    order = np.random.default_rng(seed).permutation(len(free))
    sizes = dict(sizes)
    if int(sizes.get("test", 0)) == -1:  # test: -1 = every case left after calib and val (your own scans)
        if "train" in sizes:
            raise ValueError("dataset.splits: test=-1 (the rest) leaves nothing for an explicit train size")
        taken = sum(max(0, int(sizes.get(k, 0)) - len(out[k])) for k in ("calib", "val"))
        sizes["test"] = len(out["test"]) + max(0, len(free) - taken)
    fixed = {k: max(0, int(sizes.get(k, 0)) - len(out[k])) for k in ("test", "calib", "val")}
    need = sum(fixed.values()) + (int(sizes["train"]) if "train" in sizes else 0)
    if need > len(free) or any(int(v) < 0 for v in sizes.values()):
        raise ValueError(f"dataset.splits {dict(sizes)} asks for {need} unpinned cases but only {len(free)} are left")
    start = 0
    for name in ("test", "calib", "val"):
        out[name] += [free[i] for i in order[start : start + fixed[name]]]
        start += fixed[name]
    rest = order[start:] if "train" not in sizes else order[start : start + int(sizes["train"])]
    out["train"] += [free[i] for i in rest]
    return out


try:  # numpy >= 2
    from numpy._core import multiarray as np_multiarray
except ImportError:  # numpy 1.26
    from numpy.core import multiarray as np_multiarray  # type: ignore[no-redef]

#: What a cached MetaTensor item holds besides tensors: allow-listed for ``torch.load(weights_only=True)``.
_CACHE_SAFE_GLOBALS = [
    MetaTensor,
    TraceKeys,
    SpaceKeys,
    MetaKeys,
    np.dtype,
    np.ndarray,
    np_multiarray._reconstruct,
    *(
        type(np.dtype(t))
        for t in ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "bool")
    ),
]


class _EnumByValuePickle:
    """``pickle`` for ``torch.save`` of a cached item, whose Pickler writes an Enum member (``MetaKeys.AFFINE``, a
    key of every MetaTensor's metadata) as ``Class(value)``, as Python 3.12 and later 3.11 releases do: earlier 3.11
    releases (3.11.2, Debian 12's) write ``getattr(Class, name)``, which ``torch.load(weights_only=True)`` refuses,
    so every cached item would be unreadable and computed again."""

    class Pickler(pickle.Pickler):
        def reducer_override(self, obj: Any) -> Any:
            return (type(obj), (obj._value_,)) if isinstance(obj, enum.Enum) else NotImplemented


class MetaPersistentDataset(PersistentDataset):
    """``PersistentDataset`` whose cached items keep their MetaTensor metadata (affine -> voxel spacing) and
    are still read with ``weights_only=True`` (only the data types above are allowed, no code).

    Unlike MONAI's, an item is written beside its final name and renamed (:func:`mqb.results.atomic_write`; MONAI
    writes to the system temporary folder and moves, which is a copy, cut short by a kill, when that folder is on
    another file system than the cache), and an unreadable cached item (cut short, or not loadable) is computed
    again instead of failing every later run. Leftovers of killed writers are removed when the dataset is made."""

    def __init__(self, *args: Any, hash_transforms: Sequence[Any] | None = None, **kwargs: Any) -> None:
        """``hash_transforms``: the chain to key the cache by, when the chain applied is one already used (a used
        ``LoadImaged`` pickles differently from a new one, so its hash, and with it every cached file's name,
        would change from one dataset of the process to the next)."""
        super().__init__(*args, **kwargs)
        if hash_transforms is not None and kwargs.get("hash_transform") is not None:
            applied, self.transform = self.transform, T.Compose(list(hash_transforms))
            self.set_transform_hash(kwargs["hash_transform"])
            self.transform = applied
        if self.cache_dir is not None:
            clean_temp_files(self.cache_dir)

    def _cachecheck(self, item_transformed: Any) -> Any:
        if self.cache_dir is None:
            return super()._cachecheck(item_transformed)
        hashfile = self.cache_dir / f"{self.hash_func(item_transformed).decode('utf-8')}{self.transform_hash}.pt"
        if hashfile.is_file():
            try:
                with torch.serialization.safe_globals(_CACHE_SAFE_GLOBALS):
                    return torch.load(hashfile, weights_only=True)
            except PermissionError:
                raise
            except Exception as err:  # noqa: BLE001  (a cache entry: compute it again)
                warnings.warn(f"unreadable cached item {hashfile} ({type(err).__name__}: {err}); computing it again",
                              stacklevel=2)  # fmt: skip
                hashfile.unlink(missing_ok=True)
        item = self._pre_transform(deepcopy(item_transformed))  # keep the original (hashed) record as it is
        pickle_module = look_up_option(self.pickle_module, SUPPORTED_PICKLE_MOD)
        try:
            with atomic_write(hashfile) as tmp:
                torch.save(convert_to_tensor(item, convert_numeric=False, track_meta=self.track_meta), tmp,
                           pickle_module=_EnumByValuePickle if pickle_module is pickle else pickle_module,
                           pickle_protocol=self.pickle_protocol)  # fmt: skip
        except PermissionError:  # a read-only cache: compute every time, as MONAI does
            pass
        return item


class CheckLabelsd(T.MapTransform):
    """Fail with the case and file when a label map holds values outside ``0..num_classes-1``."""

    def __init__(self, num_classes: int, key: str = "label") -> None:
        super().__init__([key], allow_missing_keys=True)
        self.num_classes = num_classes

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        for key in self.key_iterator(data):
            label = data[key]
            values = torch.unique(torch.as_tensor(label))
            bad = values[(values < 0) | (values >= self.num_classes) | (values != values.round())]
            if bad.numel():
                path = getattr(label, "meta", {}).get("filename_or_obj", "?")
                shown = [int(v) if float(v).is_integer() else float(v) for v in bad[:10].tolist()]
                raise DatasetError(
                    f"case {data.get('case', '?')!r}: label file {str(path)!r} has values {shown} outside "
                    f"the class table 0..{self.num_classes - 1}"
                )
        return data


class NativeGrid:
    """Maps what was predicted on the preprocessed grid back to the case's file grid: MONAI ``Invertd`` with the
    evaluation chain, i.e. the inverse of its spatial transforms in reverse order (the crop's inverse pads, Spacingd's
    resamples back to the file's affine and shape, Orientationd's restores the file's axis order).

    Label maps are inverted with nearest neighbour: each native voxel gets the class predicted at the nearest
    resampled voxel. This inverts the argmax label map, not the logits (nnU-Net resamples probabilities): one volume
    instead of ``num_classes`` volumes on the native grid (117 classes on a 512 x 512 x 300 CT would be 37 GB of
    float32), and a label map resampled to a grid at least as fine comes back to itself exactly, so a perfect
    prediction scores DSC 1 on the native grid. Works on a cache hit: cached items keep ``applied_operations``.
    """

    def __init__(self, transform: T.Compose, crop: bool = False) -> None:
        self.crop = crop
        self._labels = T.Invertd(keys="pred", transform=transform, orig_keys="image", nearest_interp=True)
        self._images = T.Invertd(keys="pred", transform=transform, orig_keys="image", nearest_interp=False)

    def __call__(self, prediction: torch.Tensor, image: MetaTensor) -> tuple[torch.Tensor, torch.Tensor | None,
                                                                              torch.Tensor]:  # fmt: skip
        """``prediction``: an ``(X, Y, Z)`` label map on the grid of ``image``, the case's preprocessed image (a
        ``(C, X, Y, Z)`` MetaTensor with its applied operations). Returns the label map on the native grid (int64,
        on the prediction's device), the region of it the network saw (bool; ``None`` without a crop) and the
        native affine (float64, 4 x 4)."""
        # with a crop, classes are shifted by one so that the background the crop's inverse pads with (0) marks the
        # part of the native grid the network never saw
        shifted = MetaTensor(prediction.unsqueeze(0).float() + (1.0 if self.crop else 0.0))
        inverted = self._labels({"pred": shifted, "image": image})["pred"]
        labels = inverted[0].as_tensor().round().long().to(prediction.device)
        region = None
        if self.crop:
            region = labels > 0
            labels = (labels - 1).clamp_(min=0)
        return labels, region, inverted.affine.to(torch.float64)

    def image(self, image: MetaTensor) -> MetaTensor:
        """The preprocessed image mapped back to the native grid (the chain's own interpolation, e.g. bilinear)."""
        return self._images({"pred": MetaTensor(image.as_tensor().float()), "image": image})["pred"]


def save_volume(volume: torch.Tensor, affine: torch.Tensor, path: str | Path, dtype: Any) -> Path:
    """Write a 3-D volume as NIfTI with MONAI ``SaveImage`` (nibabel writer, ``affine`` as the volume's affine, no
    resampling, voxels cast to ``dtype``), atomically: written under a temporary name beside ``path`` and renamed,
    so a killed run leaves no half-written file."""
    path = Path(path)
    ext = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    if volume.ndim not in (3, 4):
        raise ValueError(f"save_volume: {path.name} needs a 3-D volume (or channels first), got shape "
                         f"{tuple(volume.shape)}")  # fmt: skip
    writer = T.SaveImage(output_ext=ext, output_dtype=dtype, resample=False, separate_folder=False,
                         print_log=False, writer="NibabelWriter")  # fmt: skip
    volume = volume.detach().cpu()
    data = MetaTensor(volume[None] if volume.ndim == 3 else volume,
                      affine=torch.as_tensor(affine, dtype=torch.float64).cpu())  # fmt: skip
    with atomic_write(path) as tmp:
        writer(data, filename=str(tmp)[: -len(ext)])
    return path


def _content_digest(path: Path) -> str:
    """A digest of a file's content: for gzip (``.nii.gz``) its size and last 64 KiB, which end with the gzip
    trailer (CRC-32 and length of all the uncompressed data), so any change of the data changes it without reading
    the whole file; for other files the SHA-256 of all bytes."""
    import hashlib

    from mqb.checkpoints import file_sha256

    if not path.name.endswith(".gz"):
        return file_sha256(path)[:16]
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(max(0, size - 65536))
        return hashlib.sha256(f"{size}:".encode() + f.read()).hexdigest()[:16]


def file_fingerprint(case: dict[str, str]) -> str:
    """The content digests of a case's image and label files (:func:`_content_digest`): part of the case record,
    so MONAI's persistent cache (which hashes the record), the FP32 baseline key and the calibration-range key change
    when a file is replaced or fixed in place (a path alone would keep serving the old results), while identical
    copies in two places (the synthetic data of two cache folders) keep one key."""
    parts = []
    for role in ("image", "label"):
        if role in case and Path(case[role]).is_file():
            parts.append(f"{role}:{_content_digest(Path(case[role]))}")
    return ";".join(parts)


class SegmentationDataModule(L.LightningDataModule):
    """Splits, transforms and loaders for one dataset.

    Args:
        name: dataset name (used in cache keys and records).
        source: an object with ``cases()`` returning file records.
        num_classes: number of label classes including background.
        class_names: one name per class.
        splits: counts per split (``val``, ``calib``, ``test``; ``train`` = the rest unless given).
        split_seed: seed of the split permutation.
        intensity: ``ScaleIntensityRanged`` arguments (a_min, a_max, b_min, b_max, clip), or ``None``.
        pixdim: target spacing for ``Spacingd`` in mm, or ``None`` to keep the native spacing.
        roi_size: training patch size.
        cache_dir: root of the on-disk preprocessing cache (``None`` disables it).
        num_workers / batch_size / samples_per_volume: training loader settings.
        nsd_tolerance_mm: NSD tolerance per foreground class (or one value for all), in mm.
        split_file: JSON ``{"test": [case, ...], "calib": [...], ...}`` pinning cases to splits.
        test_cases / calib_cases: keep only the first N cases of the test / calibration split (quick runs).
        validate: check every case's files before any work (:func:`mqb.data.sources.validate_cases`: readable,
            complete, one 3-D volume, voxel dtype, affine; label on the image's grid).
        root: the dataset folder (``dataset.root``; the source reads it, kept here for records).
        axcodes: orientation every volume is brought to (``RAS``; ``LIA`` for FreeSurfer-conformed brain models).
        crop: a centre crop ``[x, y, z]`` (voxels, after orientation and resampling) of every volume, labels
            included, or ``None``: a quick look at a large volume (``experiment=demo`` crops the brain to its deep
            structures). Axes smaller than the crop are kept whole.
        score_on: the grid DSC / NSD / HD95 are computed on when ``pixdim`` resamples the volumes: ``native``
            (default: the prediction mapped back to each case's file grid by :class:`NativeGrid` and scored against
            the label as loaded, at the file's spacing, as nnU-Net reports) or ``resampled`` (the ``pixdim`` grid).
            Without ``pixdim`` nothing is resampled and both are the same grid (nothing is inverted). With ``crop``
            too, the native scoring covers the crop's region of the native grid (the label outside it is ignored).
    """

    def __init__(
        self,
        name: str,
        source: CaseSource,
        num_classes: int,
        class_names: Sequence[str] | None,
        splits: dict[str, int],
        split_seed: int = 0,
        intensity: dict[str, Any] | None = None,
        pixdim: Sequence[float] | None = None,
        roi_size: Sequence[int] = (64, 64, 64),
        cache_dir: str | None = None,
        num_workers: int = 0,
        batch_size: int = 2,
        samples_per_volume: int = 2,
        in_channels: int = 1,
        nsd_tolerance_mm: Sequence[float] = (2.0,),
        split_file: str | None = None,
        test_cases: int | None = None,
        calib_cases: int | None = None,
        validate: bool = True,
        axcodes: str = "RAS",
        root: str | None = None,
        crop: Sequence[int] | None = None,
        score_on: str = "native",
    ) -> None:
        super().__init__()
        if class_names is None:
            class_names = list(source.class_names)  # type: ignore[attr-defined]
        if len(class_names) != num_classes:
            raise ValueError(
                f"dataset {name!r}: class_names has {len(class_names)} entries but num_classes={num_classes}"
            )
        self.name = name
        self.source = source
        self.num_classes = int(num_classes)
        self.class_names = list(class_names)
        self.in_channels = in_channels
        self.split_sizes = dict(splits)
        self.split_seed = split_seed
        self.intensity = dict(intensity) if intensity else None
        self.pixdim = tuple(pixdim) if pixdim else None
        self.roi_size = tuple(int(r) for r in roi_size)
        self.cache_dir = cache_dir
        self.num_workers = num_workers
        self.batch_size = batch_size
        self.samples_per_volume = samples_per_volume
        self.nsd_tolerance_mm = [float(t) for t in nsd_tolerance_mm]
        if len(self.nsd_tolerance_mm) not in (1, self.num_classes - 1):
            raise ValueError(
                f"dataset {name!r}: nsd_tolerance_mm has {len(self.nsd_tolerance_mm)} values; "
                f"valid: 1 (all classes) or {self.num_classes - 1} (one per foreground class)"
            )
        self.split_file = split_file
        self.test_cases = test_cases
        self.calib_cases = calib_cases
        self.validate = validate
        self.axcodes = axcodes
        self.root = root
        self.crop = tuple(int(c) for c in crop) if crop else None
        if self.crop is not None and (len(self.crop) != 3 or min(self.crop) < 1):
            raise ValueError(f"dataset {name!r}: crop={list(self.crop)} is invalid; valid: three positive sizes")
        if score_on not in SCORE_ON:
            raise ValueError(
                f"dataset {name!r}: dataset.score_on={score_on!r} is invalid; valid: "
                + "; ".join(f"{k} ({v})" for k, v in SCORE_ON.items())
            )
        self.score_on = score_on
        self._splits: dict[str, list[dict[str, str]]] | None = None
        self._eval_chain: T.Compose | None = None

    # -- splits --------------------------------------------------------------------------------------------
    @property
    def splits(self) -> dict[str, list[dict[str, str]]]:
        if self._splits is None:
            cases = self.source.cases()
            pinned = None
            if self.split_file:
                path = Path(self.split_file)
                if not path.is_file():
                    raise DatasetError(f"dataset.split_file {str(path)!r} does not exist")
                pinned = json.loads(path.read_text())
            self._clean_cache_leftovers(cases)
            splits = split_cases(cases, self.split_sizes, self.split_seed, pinned)
            if self.test_cases is not None:
                splits["test"] = splits["test"][: self.test_cases]
            if self.calib_cases is not None:
                splits["calib"] = splits["calib"][: self.calib_cases]
            if self.validate:
                validate_cases([c for split in splits.values() for c in split])
            for split in splits.values():
                for c in split:
                    c["fingerprint"] = file_fingerprint(c)
            self._splits = splits
        return self._splits

    def _clean_cache_leftovers(self, cases: Sequence[dict[str, str]]) -> None:
        """Remove the temporary files that killed writers left beside the case files mqb wrote itself (generated
        or combined volumes under ``cache_dir``; never the user's dataset folders)."""
        if self.cache_dir is None:
            return
        cache = Path(self.cache_dir).resolve()
        folders = {Path(c[role]).resolve().parent for c in cases for role in ("image", "label") if role in c}
        for folder in sorted(folders):
            if folder.is_relative_to(cache):
                clean_temp_files(folder)

    @property
    def test_has_labels(self) -> bool:
        """Whether every test volume has a label map (else FP32 predictions are the reference)."""
        return all("label" in c for c in self.splits["test"])

    def prepare_data(self) -> None:
        self.splits  # noqa: B018  (materialises the source's files once)

    # -- transforms ----------------------------------------------------------------------------------------
    @property
    def scores_on_native_grid(self) -> bool:
        """Whether predictions are mapped back to the native grid to be scored (``pixdim`` resamples the volumes
        and ``score_on`` is ``native``); without ``pixdim`` the grid scored on is the native one already."""
        return self.pixdim is not None and self.score_on == "native"

    @property
    def grid_definition(self) -> str:
        """Which grid the metrics are on, for the record (``results["definitions"]["grid"]``)."""
        if self.pixdim is None:
            return f"native: each case's own voxels at its file's spacing (reoriented to {self.axcodes}, nothing " \
                "resampled" + (f"; centre crop {list(self.crop)})" if self.crop else ")")  # fmt: skip
        if self.scores_on_native_grid:
            return f"native: {SCORE_ON['native']} (inference on the {list(self.pixdim)} mm grid" + (
                f", centre crop {list(self.crop)}: scored on its region of the native grid)" if self.crop else ")")
        return f"resampled: {SCORE_ON['resampled']} ({list(self.pixdim)} mm)"

    def native_grid(self) -> NativeGrid | None:
        """The inversion of the evaluation chain's spatial transforms (:class:`NativeGrid`), or ``None`` where the
        metrics are computed on the grid the network saw (:attr:`scores_on_native_grid`)."""
        if not self.scores_on_native_grid:
            return None
        return NativeGrid(self.eval_transforms(), crop=self.crop is not None)

    def eval_transforms(self) -> T.Compose:
        """The evaluation chain, one instance per module: MONAI checks that an inverted transform is the one that
        ran (its ``id``), so :meth:`native_grid` inverts with the very chain the datasets applied."""
        if self._eval_chain is None:
            self._eval_chain = T.Compose(self._eval_chain_list(native_label=self.scores_on_native_grid))
        return self._eval_chain

    def _eval_chain_list(self, native_label: bool) -> list[Any]:
        keys = ["image", "label"]
        chain: list[Any] = [
            T.LoadImaged(keys=keys, image_only=True, allow_missing_keys=True),
            CheckLabelsd(self.num_classes),
            T.EnsureChannelFirstd(keys=keys, allow_missing_keys=True),
        ]
        if native_label:  # the label as loaded (file grid, no reorientation or resampling): the native reference
            # (not "label_*": Spacingd takes keys named "label_..." for the label's metadata dictionaries)
            chain.append(T.CopyItemsd(keys="label", names="native_label", allow_missing_keys=True))
        chain.append(T.Orientationd(keys=keys, axcodes=self.axcodes, labels=None, allow_missing_keys=True))
        if self.pixdim:
            chain.append(
                T.Spacingd(keys=keys, pixdim=self.pixdim, mode=("bilinear", "nearest"), allow_missing_keys=True)
            )
        if self.intensity:
            chain.append(self.intensity_transform())
        if self.crop:  # after the intensity window, which is computed on the whole volume as without the crop
            chain.append(T.CenterSpatialCropd(keys=keys, roi_size=self.crop, allow_missing_keys=True))
        typed = [*keys, "native_label"] if native_label else keys
        dtypes = (torch.float32, torch.uint8, torch.uint8)[: len(typed)]
        chain.append(T.EnsureTyped(keys=typed, dtype=dtypes, track_meta=True, allow_missing_keys=True))
        return chain

    def intensity_transform(self) -> T.MapTransform:
        """``{"a_min", "a_max", ...}``: fixed window (CT); ``{"lower", "upper", ...}``: percentile window (MRI);
        ``{"zscore": true, "nonzero": ...}``: (x - mean) / std over the volume (over its non-zero voxels with
        ``nonzero: true``, as nnU-Net and HD-BET normalise MRI), MONAI ``NormalizeIntensityd``."""
        assert self.intensity is not None
        if self.intensity.get("zscore"):
            unknown = set(self.intensity) - {"zscore", "nonzero"}
            if unknown:
                raise ValueError(f"dataset.intensity: {sorted(unknown)} do not go with zscore; valid: nonzero")
            return T.NormalizeIntensityd(keys=["image"], nonzero=bool(self.intensity.get("nonzero", False)))
        if "lower" in self.intensity:
            return T.ScaleIntensityRangePercentilesd(keys=["image"], **self.intensity)
        return T.ScaleIntensityRanged(keys=["image"], **self.intensity)

    def train_transforms(self) -> T.Compose:
        keys = ["image", "label"]
        return T.Compose(
            [
                *self._eval_chain_list(native_label=False),
                T.SpatialPadd(keys=keys, spatial_size=self.roi_size),
                T.RandCropByPosNegLabeld(
                    keys=keys,
                    label_key="label",
                    spatial_size=self.roi_size,
                    pos=1.0,
                    neg=1.0,
                    num_samples=self.samples_per_volume,
                    image_key="image",
                ),
                T.RandFlipd(keys=keys, prob=0.2, spatial_axis=0),
                T.RandShiftIntensityd(keys=["image"], offsets=0.05, prob=0.5),
            ]
        )

    def scoring_grid_images(self) -> Iterator[tuple[dict[str, str], MetaTensor]]:
        """Each test case's record and the image the network saw, on the grid its metrics are computed on
        (mapped back to the native grid where :attr:`scores_on_native_grid`), as a ``(C, X, Y, Z)`` MetaTensor
        whose ``affine`` is that grid's: what a prediction is written with (``eval.save_predictions``)."""
        dataset = self._dataset("test", self.eval_transforms())
        grid = self.native_grid()
        for index, case in enumerate(self.splits["test"]):
            image = dataset[index]["image"]
            yield case, (grid.image(image) if grid is not None else image)

    def write_predictions(self, folder: str | Path, predictions: dict[str, torch.Tensor],
                          fp32: dict[str, torch.Tensor], fp32_only: bool = False,
                          write: bool = True) -> dict[str, Any]:  # fmt: skip
        """Write each test case's label maps as NIfTI (uint8, :func:`save_volume`) on the grid its metrics are on,
        with that grid's affine: ``<folder>/<case>.nii.gz`` (``predictions``), ``<folder>/fp32/<case>.nii.gz``
        (``fp32``, the FP32 baseline's); ``fp32_only`` (a float32 config, which is the baseline): the FP32 maps
        only, which are then also the config's ``prediction``. Cases whose image file mqb generated itself (under
        ``cache_dir``: synthetic data; or none on disk) also get the image the network saw,
        ``<folder>/image/<case>.nii.gz``. ``write=False`` (a DDP process other than the first) writes nothing.
        Returns the record's ``predictions`` section: ``{"dir", "cases": {case: {"prediction", "fp32", "image",
        "label"}}}`` (absolute paths; ``label`` null for an unlabelled case)."""
        folder = Path(folder).resolve()
        cache = Path(self.cache_dir).resolve() if self.cache_dir else None
        for sub in (folder, folder / "fp32", folder / "image"):  # what killed writers left behind (same run folder)
            if write and sub.is_dir():
                clean_temp_files(sub)
        cases: dict[str, dict[str, str | None]] = {}
        grids = self.scoring_grid_images() if write else ((case, None) for case in self.splits["test"])
        for case, image in grids:
            name = case["case"]
            maps = {"fp32": (fp32, folder / "fp32" / f"{name}.nii.gz")}
            if not fp32_only:
                maps["prediction"] = (predictions, folder / f"{name}.nii.gz")
            for role, (source, path) in maps.items():
                if name not in source:
                    raise ValueError(f"case {name!r}: no {role} label map to write to {path}")
                if image is None:
                    continue
                if tuple(source[name].shape) != tuple(image.shape[1:]):
                    raise ValueError(f"case {name!r}: the {role} label map has shape {tuple(source[name].shape)}, "
                                     f"not that of the grid it was scored on {tuple(image.shape[1:])}")  # fmt: skip
                save_volume(source[name], image.affine, path, np.uint8)
            original = Path(case["image"]).resolve() if case.get("image") else None
            generated = original is None or not original.is_file() or (
                cache is not None and original.is_relative_to(cache))  # written by mqb (clear-cache deletes it)
            image_path = folder / "image" / f"{name}.nii.gz" if generated else original
            if generated and image is not None:
                save_volume(image.as_tensor()[0] if image.shape[0] == 1 else image.as_tensor(), image.affine,
                            image_path, np.float32)  # fmt: skip
            cases[name] = {
                "prediction": str(maps["fp32" if fp32_only else "prediction"][1]),
                "fp32": str(maps["fp32"][1]),
                "image": str(image_path),
                "label": str(Path(case["label"]).resolve()) if case.get("label") else None,
            }
        return {"dir": str(folder), "cases": cases}

    def _dataset(self, split: str, transforms: T.Compose) -> Dataset:
        data = self.splits[split]
        if not data:
            raise ValueError(f"dataset {self.name!r}: the {split!r} split is empty (dataset.splits={self.split_sizes})")
        if self.cache_dir is None:
            return Dataset(data, transforms)
        cache = Path(self.cache_dir) / "persistent" / self.name
        # the evaluation chain is one object per module (NativeGrid inverts with it): keyed by the chain as built
        fresh = self._eval_chain_list(self.scores_on_native_grid) if transforms is self._eval_chain else None
        # track_meta: cached items keep their MetaTensor affine (voxel spacing for NSD/HD95)
        return MetaPersistentDataset(data, transforms, cache_dir=cache, hash_transform=pickle_hashing, track_meta=True,
                                     hash_transforms=fresh)  # fmt: skip

    def _eval_loader(self, split: str, indices: Sequence[int] | None = None) -> DataLoader:
        dataset = self._dataset(split, self.eval_transforms())
        if indices is not None:
            dataset = torch.utils.data.Subset(dataset, list(indices))
        return DataLoader(dataset, batch_size=1, shuffle=False, num_workers=self.num_workers)

    # -- loaders -------------------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self._dataset("train", self.train_transforms()),
            batch_size=self.batch_size,
            shuffle=True,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def calibration_indices(self, num_volumes: int | None = None, seed: int = 0) -> list[int]:
        """A seeded choice of ``num_volumes`` calibration volumes (all of them when ``None``)."""
        total = len(self.splits["calib"])
        count = total if num_volumes is None else min(int(num_volumes), total)
        return sorted(np.random.default_rng(seed).permutation(total)[:count].tolist())

    def calib_dataloader(self, num_volumes: int | None = None, seed: int = 0) -> DataLoader:
        """Calibration volumes: never the test split (disjoint by construction)."""
        return self._eval_loader("calib", self.calibration_indices(num_volumes, seed))
