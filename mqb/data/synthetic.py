"""Seeded synthetic abdominal CT phantoms: the embedded default dataset (no data from the user needed).

Each case is an abdomen-like volume in Hounsfield units with organ-shaped structures: deformed ellipsoids
(liver, spleen, kidneys, stomach with an air pocket), a contrast-filled aorta tube and a bony vertebral body,
inside a fat/muscle body ellipse surrounded by air, with CT-like noise and a smooth intensity bias. Labels are
integers 0..7 (class table :data:`CLASS_NAMES`). Geometry, intensities and noise vary per case from a
per-case seed, so the same ``(seed, case index)`` always produces the same volume.

Cases are written once as NIfTI (image in HU, label as uint8) with the real voxel spacing in the affine, and
then loaded like any on-disk dataset.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy.ndimage import gaussian_filter

from mqb.results import atomic_write

CLASS_NAMES: tuple[str, ...] = (
    "background",
    "liver",
    "spleen",
    "kidney_right",
    "kidney_left",
    "stomach",
    "aorta",
    "vertebra",
)

#: (mean HU, HU spread across cases) per structure; body fat/muscle and air handled separately.
_HU = {
    "liver": (65.0, 10.0),
    "spleen": (50.0, 8.0),
    "kidney_right": (160.0, 20.0),
    "kidney_left": (160.0, 20.0),
    "stomach": (20.0, 8.0),
    "aorta": (220.0, 25.0),
    "vertebra": (450.0, 60.0),
}


@dataclass(frozen=True)
class SyntheticPhantoms:
    """A reproducible set of synthetic CT cases, materialised as NIfTI files in ``cache_dir``.

    Attributes:
        num_cases: number of cases.
        shape: volume shape (x, y, z) in voxels.
        spacing: voxel spacing (x, y, z) in mm (anisotropic like BTCV: 1.5 x 1.5 x 2.0).
        seed: base seed; case i uses ``seed + i``.
        cache_dir: where the NIfTI files go (one sub-folder per parameter set).
    """

    num_cases: int = 20
    shape: tuple[int, int, int] = (96, 96, 64)
    spacing: tuple[float, float, float] = (1.5, 1.5, 2.0)
    seed: int = 1234
    cache_dir: str = ".cache/mqb/synthetic"
    class_names: tuple[str, ...] = field(default=CLASS_NAMES)

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        object.__setattr__(self, "class_names", tuple(self.class_names))
        if len(self.shape) != 3 or min(self.shape) < 16:
            raise ValueError(f"SyntheticPhantoms.shape={self.shape} is invalid; valid: three sizes >= 16")
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise ValueError(f"SyntheticPhantoms.spacing={self.spacing} is invalid; valid: three positive mm values")
        if self.num_cases < 1:
            raise ValueError(f"SyntheticPhantoms.num_cases={self.num_cases} is invalid; valid: >= 1")
        if self.class_names != CLASS_NAMES:
            raise ValueError(f"SyntheticPhantoms.class_names must be {list(CLASS_NAMES)}")

    @property
    def folder(self) -> Path:
        params = {k: v for k, v in asdict(self).items() if k != "cache_dir"}
        digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
        return Path(self.cache_dir) / f"phantoms-{digest}"

    def cases(self) -> list[dict[str, str]]:
        """``[{"case", "image", "label"}]`` file records, generating missing files first."""
        folder = self.folder
        folder.mkdir(parents=True, exist_ok=True)
        records = []
        for index in range(self.num_cases):
            case = f"phantom_{index:03d}"
            image, label = folder / f"{case}_ct.nii", folder / f"{case}_label.nii"
            if not (image.exists() and label.exists()):
                ct, seg = make_phantom(self.shape, self.spacing, self.seed + index)
                affine = np.diag([*self.spacing, 1.0])
                _atomic_save(nib.Nifti1Image(ct, affine), image)
                _atomic_save(nib.Nifti1Image(seg, affine), label)
            records.append({"case": case, "image": str(image), "label": str(label)})
        return records


def _atomic_save(img: nib.Nifti1Image, path: Path) -> None:
    """Concurrent jobs never see a half-written file (see :func:`mqb.results.atomic_write`)."""
    with atomic_write(path) as tmp:
        nib.save(img, tmp)


def _ellipsoid(coords: np.ndarray, center: np.ndarray, radii: np.ndarray, angle: float) -> np.ndarray:
    """Implicit function (< 1 inside) of an ellipsoid rotated by ``angle`` about the z axis (coords in mm)."""
    d = coords - center[:, None, None, None]
    c, s = np.cos(angle), np.sin(angle)
    x = c * d[0] + s * d[1]
    y = -s * d[0] + c * d[1]
    return (x / radii[0]) ** 2 + (y / radii[1]) ** 2 + (d[2] / radii[2]) ** 2


def make_phantom(
    shape: tuple[int, int, int], spacing: tuple[float, float, float], seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic CT (float32, HU) and its label map (uint8), both of ``shape`` (x, y, z)."""
    rng = np.random.default_rng(seed)
    extent = np.array(shape) * np.array(spacing)
    axes = [(np.arange(n) + 0.5) * sp - e / 2 for n, sp, e in zip(shape, spacing, extent, strict=True)]
    coords = np.stack(np.meshgrid(*axes, indexing="ij")).astype(np.float32)  # (3, x, y, z) in mm, centred
    half = extent / 2

    def jitter(scale: float) -> float:
        return float(rng.normal(0.0, scale))

    def deform(field_scale: float) -> np.ndarray:
        noise = rng.normal(size=shape).astype(np.float32)
        smooth = gaussian_filter(noise, sigma=[8.0 / s for s in spacing])
        return field_scale * smooth / (smooth.std() + 1e-6)

    label = np.zeros(shape, dtype=np.uint8)
    ct = np.full(shape, -1000.0, dtype=np.float32)  # air
    body = _ellipsoid(coords, np.zeros(3), np.array([half[0] * 0.92, half[1] * 0.8, 1e6]), 0.0) + deform(0.03) < 1
    ct[body] = rng.normal(-90.0, 8.0)  # subcutaneous fat
    muscle = body & (_ellipsoid(coords, np.zeros(3), np.array([half[0] * 0.8, half[1] * 0.68, 1e6]), 0.0) < 1)
    ct[muscle] = 40.0 + jitter(5.0)

    # (name, center as fraction of half-extent, radii as fraction of half-extent, rotation)
    organs = [
        ("liver", (-0.35, -0.1, 0.1), (0.42, 0.38, 0.55), 0.3),
        ("spleen", (0.45, 0.2, 0.15), (0.16, 0.22, 0.3), -0.4),
        ("kidney_right", (-0.3, 0.35, -0.2), (0.11, 0.15, 0.3), 0.5),
        ("kidney_left", (0.3, 0.35, -0.2), (0.11, 0.15, 0.3), -0.5),
        ("stomach", (0.2, -0.25, 0.35), (0.22, 0.16, 0.25), 0.8),
    ]
    for name, center_f, radii_f, angle in organs:
        cls = CLASS_NAMES.index(name)
        center = np.array(center_f) * half + np.array([jitter(3.0), jitter(3.0), jitter(4.0)])
        radii = np.array(radii_f) * half * rng.uniform(0.85, 1.15, size=3)
        inside = (_ellipsoid(coords, center, radii, angle + jitter(0.15)) + deform(0.15) < 1) & muscle
        label[inside] = cls
        mean, spread = _HU[name]
        ct[inside] = mean + jitter(spread)
        if name == "stomach":  # an air/fluid pocket: same label, very different intensity
            pocket = inside & (coords[1] < center[1] - radii[1] * 0.4)
            ct[pocket] = -600.0 + jitter(80.0)
    aorta_center = np.array([jitter(2.0), 0.3 * half[1] + jitter(2.0)])
    aorta_radius = rng.uniform(6.0, 9.0)
    aorta = ((coords[0] - aorta_center[0]) ** 2 + (coords[1] - aorta_center[1]) ** 2) < aorta_radius**2
    label[aorta & muscle] = CLASS_NAMES.index("aorta")
    ct[aorta & muscle] = _HU["aorta"][0] + jitter(_HU["aorta"][1])
    vertebra_center = np.array([jitter(2.0), 0.55 * half[1] + jitter(2.0), 0.0])
    vertebra_radii = np.array([rng.uniform(14, 18), rng.uniform(11, 14), 1e6])
    vertebra = (_ellipsoid(coords, vertebra_center, vertebra_radii, 0.0) < 1) & body
    label[vertebra] = CLASS_NAMES.index("vertebra")
    ct[vertebra] = _HU["vertebra"][0] + jitter(_HU["vertebra"][1])

    smooth = gaussian_filter(rng.normal(size=shape).astype(np.float32), sigma=12.0)
    bias = 1.0 + 0.03 * smooth / (smooth.std() + 1e-6)
    ct = np.where(body, ct * np.clip(bias, 0.9, 1.1), ct)
    ct = ct + rng.normal(0.0, 15.0, size=shape).astype(np.float32)
    ct = gaussian_filter(ct, sigma=0.6).astype(np.float32)
    return ct, label
