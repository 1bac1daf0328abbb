"""The Lightning DataModule shared by evaluation, calibration and training.

A *source* lists cases (``{"case", "image", "label"}`` file records); the module splits them into disjoint,
seeded train / val / calibration / test sets and builds MONAI pipelines:

* evaluation (test, calibration, val): LoadImaged -> EnsureChannelFirstd -> Orientationd(RAS) ->
  [Spacingd] -> intensity preset -> EnsureTyped, cached on disk by ``PersistentDataset`` (the cache key hashes
  the transform chain too, so changing preprocessing invalidates it);
* training: the same, then RandCropByPosNegLabeld patches, flips and intensity shifts.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import lightning as L
import numpy as np
import torch
from monai import transforms as T
from monai.data import DataLoader, Dataset, PersistentDataset
from monai.data.utils import pickle_hashing

SPLITS = ("train", "val", "calib", "test")


class CaseSource(Protocol):
    def cases(self) -> list[dict[str, str]]: ...


def split_cases(cases: Sequence[dict[str, str]], sizes: dict[str, int], seed: int) -> dict[str, list[dict[str, str]]]:
    """Disjoint seeded splits. ``sizes`` gives val/calib/test counts; train gets the rest (or ``sizes['train']``).

    Raises ``ValueError`` when the requested sizes exceed the number of cases.
    """
    unknown = set(sizes) - set(SPLITS)
    if unknown:
        raise ValueError(f"dataset.splits has unknown split(s) {sorted(unknown)}; valid: {list(SPLITS)}")
    order = np.random.default_rng(seed).permutation(len(cases))
    fixed = {k: int(sizes.get(k, 0)) for k in ("test", "calib", "val")}
    need = sum(fixed.values()) + (int(sizes["train"]) if "train" in sizes else 0)
    if need > len(cases) or any(v < 0 for v in fixed.values()):
        raise ValueError(f"dataset.splits {dict(sizes)} asks for {need} cases but the source has {len(cases)}")
    out: dict[str, list[dict[str, str]]] = {}
    start = 0
    for name in ("test", "calib", "val"):
        out[name] = [cases[i] for i in order[start : start + fixed[name]]]
        start += fixed[name]
    rest = order[start:] if "train" not in sizes else order[start : start + int(sizes["train"])]
    out["train"] = [cases[i] for i in rest]
    return out


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
    """

    def __init__(
        self,
        name: str,
        source: CaseSource,
        num_classes: int,
        class_names: Sequence[str],
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
    ) -> None:
        super().__init__()
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
        self._splits: dict[str, list[dict[str, str]]] | None = None

    # -- splits --------------------------------------------------------------------------------------------
    @property
    def splits(self) -> dict[str, list[dict[str, str]]]:
        if self._splits is None:
            self._splits = split_cases(self.source.cases(), self.split_sizes, self.split_seed)
        return self._splits

    def prepare_data(self) -> None:
        self.splits  # noqa: B018  (materialises the source's files once)

    # -- transforms ----------------------------------------------------------------------------------------
    def eval_transforms(self) -> T.Compose:
        keys = ["image", "label"]
        chain: list[Any] = [
            T.LoadImaged(keys=keys, image_only=True),
            T.EnsureChannelFirstd(keys=keys),
            T.Orientationd(keys=keys, axcodes="RAS", labels=None),
        ]
        if self.pixdim:
            chain.append(T.Spacingd(keys=keys, pixdim=self.pixdim, mode=("bilinear", "nearest")))
        if self.intensity:
            chain.append(T.ScaleIntensityRanged(keys=["image"], **self.intensity))
        chain.append(T.EnsureTyped(keys=keys, dtype=(torch.float32, torch.uint8), track_meta=True))
        return T.Compose(chain)

    def train_transforms(self) -> T.Compose:
        keys = ["image", "label"]
        return T.Compose(
            [
                *self.eval_transforms().transforms,
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

    def _dataset(self, split: str, transforms: T.Compose) -> Dataset:
        data = self.splits[split]
        if not data:
            raise ValueError(f"dataset {self.name!r}: the {split!r} split is empty (dataset.splits={self.split_sizes})")
        if self.cache_dir is None:
            return Dataset(data, transforms)
        cache = Path(self.cache_dir) / "persistent" / self.name
        return PersistentDataset(data, transforms, cache_dir=cache, hash_transform=pickle_hashing)

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
