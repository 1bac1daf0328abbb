"""Class tables of the supported datasets and the label mappings between them (documented, not guessed).

* BTCV: 13 abdominal organs + background, in the order of MONAI's BTCV tutorial ``dataset_0.json``.
* TotalSegmentator v2 ``total`` task: 117 structures, ids 1..117 (``tables/totalsegmentator_v2_total.json``,
  extracted from the TotalSegmentator repository's ``map_to_binary.py``).
* AbdomenAtlas 1.1: 25 structures; label id = 1-based position in :data:`ABDOMENATLAS_CLASSES`.
* Brain, 18 classes (brainchop MeshNet "subcortical-mini"): FreeSurfer aseg ids merged left/right by
  :data:`ASEG_TO_BRAIN18` (from ``shared/data/brainchop_t1_meshnet/PROVENANCE.md``).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

TABLES = Path(__file__).resolve().parent / "tables"

BTCV_CLASSES: tuple[str, ...] = (
    "background",
    "spleen",
    "kidney_right",
    "kidney_left",
    "gallbladder",
    "esophagus",
    "liver",
    "stomach",
    "aorta",
    "inferior_vena_cava",
    "portal_vein_and_splenic_vein",
    "pancreas",
    "adrenal_gland_right",
    "adrenal_gland_left",
)

#: BTCV class name -> TotalSegmentator v2 ``total`` id (TotalSegmentator example PROVENANCE.md).
BTCV_FROM_TOTALSEGMENTATOR: dict[str, int] = {
    "spleen": 1,
    "kidney_right": 2,
    "kidney_left": 3,
    "gallbladder": 4,
    "esophagus": 15,
    "liver": 5,
    "stomach": 6,
    "aorta": 52,
    "inferior_vena_cava": 63,
    "portal_vein_and_splenic_vein": 64,
    "pancreas": 7,
    "adrenal_gland_right": 8,
    "adrenal_gland_left": 9,
}

ABDOMENATLAS_CLASSES: tuple[str, ...] = (
    "aorta",
    "gall_bladder",
    "kidney_left",
    "kidney_right",
    "liver",
    "pancreas",
    "postcava",
    "spleen",
    "stomach",
    "adrenal_gland_left",
    "adrenal_gland_right",
    "bladder",
    "celiac_trunk",
    "colon",
    "duodenum",
    "esophagus",
    "femur_left",
    "femur_right",
    "hepatic_vessel",
    "intestine",
    "lung_left",
    "lung_right",
    "portal_vein_and_splenic_vein",
    "prostate",
    "rectum",
)

BRAIN18_CLASSES: tuple[str, ...] = (
    "Unknown",
    "Cerebral-White-Matter",
    "Cerebral-Cortex",
    "Lateral-Ventricle",
    "Inferior-Lateral-Ventricle",
    "Cerebellum-White-Matter",
    "Cerebellum-Cortex",
    "Thalamus",
    "Caudate",
    "Putamen",
    "Pallidum",
    "3rd-Ventricle",
    "4th-Ventricle",
    "Brain-Stem",
    "Hippocampus",
    "Amygdala",
    "Accumbens-area",
    "VentralDC",
)

#: FreeSurfer aseg id -> 18-class id (left and right merged); every other aseg id -> 0.
ASEG_TO_BRAIN18: dict[int, int] = {
    2: 1, 41: 1, 3: 2, 42: 2, 4: 3, 43: 3, 5: 4, 44: 4, 7: 5, 46: 5, 8: 6, 47: 6, 10: 7, 49: 7, 11: 8, 50: 8,
    12: 9, 51: 9, 13: 10, 52: 10, 14: 11, 15: 12, 16: 13, 17: 14, 53: 14, 18: 15, 54: 15, 26: 16, 58: 16,
    28: 17, 60: 17,
}  # fmt: skip


@cache
def totalsegmentator_classes() -> tuple[str, ...]:
    """The 117 TotalSegmentator v2 ``total`` structures, index = label id - 1."""
    table = json.loads((TABLES / "totalsegmentator_v2_total.json").read_text())["classes"]
    return tuple(table[str(i)] for i in range(1, len(table) + 1))
