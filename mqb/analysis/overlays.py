"""Fig. 4 from saved predictions: per model and dataset, the image, the label, the FP32 prediction and each quantized
config's prediction on the slices where they disagree most (``python -m mqb.report RESULTS --figures / --html``).

A run with ``eval.save_predictions=true`` writes NIfTI label maps and lists them in its record::

    "predictions": {"dir": "<dir>", "cases": {"<case>": {"prediction": "<quantized label map .nii.gz>",
                    "fp32": "<FP32 label map>", "image": "<the image the network saw>", "label": "<path or null>"}}}

For each group of the report (:func:`mqb.analysis.tables.group_key`: model, dataset, FP32 baseline) whose
quantized records have that section, :func:`overlay_figures` draws one figure per case for the first ``max_cases``
cases (sorted by id; 1 by default): columns image, label (when there is one), FP32 and the quantized configs in table
order (at most :data:`MAX_CONFIGS`), rows the chosen slices. Volumes are read with nibabel and reoriented to the
closest canonical (RAS+) orientation (:func:`load_volume`), so every panel shows the same anatomy the same way up
whatever orientation the files were written in; slices are axial (the third RAS axis).

Slices (:func:`disagreement_slices`): the ``n`` axial slices with the most voxels where a quantized prediction
differs from FP32 (summed over the configs), at least a few slices apart; when no prediction differs, slices spread
over the label's (else FP32's) foreground (:func:`mqb.analysis.figures.choose_slices`). The caption says which.

A missing or unreadable file never stops the report: the case (image or FP32 missing) or the column (a quantized
prediction) or the label column is left out and :attr:`Overlays.warnings` names the file and the record.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from mqb.analysis.figures import choose_slices, overlay_figure
from mqb.analysis.report import Report, _slug, _wrap
from mqb.analysis.tables import config_label, group_key, group_names
from mqb.results import atomic_write

#: Quantized configs (columns) shown per figure at most, in table order; the caption says when some are left out.
MAX_CONFIGS = 8
#: Slices (rows) per figure.
N_SLICES = 3
#: Axis of the slices in the canonical (RAS+) orientation: 2, axial.
AXIS = 2
#: Markdown file listing the overlay figures (``--figures`` with the ``md`` format).
OVERLAYS_MD = "overlays.md"


@dataclass
class Overlays:
    """File name -> figure, file name -> caption, and the warnings (missing / unreadable files ...)."""

    figures: dict[str, Figure] = field(default_factory=dict)
    captions: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


class VolumeError(Exception):
    """A file of the ``predictions`` section that cannot be used (missing, unreadable, wrong shape)."""


def load_volume(path: str | os.PathLike[str], what: str = "volume") -> tuple[np.ndarray, np.ndarray]:
    """``(array, affine)`` of a NIfTI file reoriented to the closest canonical (RAS+) orientation
    (``nibabel.as_closest_canonical``); ``VolumeError`` naming the file when it is missing or unreadable."""
    import nibabel as nib

    p = Path(path)
    if not p.is_file():
        raise VolumeError(f"{what} file {str(p)!r} does not exist")
    try:
        img = nib.as_closest_canonical(nib.load(str(p)))
        data = np.asanyarray(img.dataobj)
    except Exception as e:  # nibabel raises ImageFileError, EOFError, zlib / gzip errors ... on a damaged file
        raise VolumeError(f"{what} file {str(p)!r} is unreadable ({type(e).__name__}: {e})") from e
    return np.asarray(data), np.asarray(img.affine)


def _label_map(path: str, what: str, shape: tuple[int, ...] | None) -> np.ndarray:
    data, _ = load_volume(path, what)
    data = np.squeeze(data) if data.ndim > 3 else data
    if data.ndim != 3:
        raise VolumeError(f"{what} file {path!r} is not a 3-D label map (shape {data.shape})")
    if shape is not None and data.shape != shape:
        raise VolumeError(f"{what} file {path!r} has shape {data.shape}, the image {shape}")
    if not np.all(np.isfinite(data)) or np.any(data < 0) or np.any(data != np.round(data)):
        raise VolumeError(f"{what} file {path!r} does not hold class ids (non-negative integers)")
    return data.astype(np.int64)


def disagreement_slices(
    fp32: np.ndarray, predictions: Sequence[np.ndarray], axis: int = AXIS, n: int = N_SLICES
) -> tuple[list[int], list[int]]:
    """``(slices, counts)``: up to ``n`` slice indices along ``axis`` with the most voxels where a prediction
    differs from ``fp32`` (summed over ``predictions``), greedily, each at least ``max(1, size // (3 n))`` slices
    from those already taken, in increasing order, with their counts. Only slices with a disagreement count:
    ``([], [])`` when every prediction equals FP32."""
    other = tuple(a for a in range(3) if a != axis)
    counts = np.zeros(fp32.shape[axis], dtype=np.int64)
    for p in predictions:
        counts += (p != fp32).sum(axis=other)
    gap = max(1, fp32.shape[axis] // (3 * n))
    taken: list[int] = []
    for s in np.argsort(-counts, kind="stable"):
        if counts[s] == 0 or len(taken) == n:
            break
        if all(abs(int(s) - t) >= gap for t in taken):
            taken.append(int(s))
    taken.sort()
    return taken, [int(counts[s]) for s in taken]


def _cases(section: Any, rid: str, warnings: list[str]) -> dict[str, dict[str, Any]]:
    """The ``cases`` of a record's ``predictions`` section, malformed entries reported and left out."""
    cases = section.get("cases") if isinstance(section, dict) else None
    if not isinstance(cases, dict):
        warnings.append(f"record {rid}: 'predictions' has no 'cases' mapping; no overlay from it")
        return {}
    out = {}
    for case, paths in cases.items():
        if not isinstance(paths, dict) or not all(isinstance(paths.get(k), str) for k in ("prediction", "fp32",
                                                                                           "image")):  # fmt: skip
            warnings.append(f"record {rid}: predictions.cases[{case!r}] lacks 'prediction', 'fp32' or 'image' paths; "
                            "case left out")  # fmt: skip
            continue
        out[str(case)] = paths
    return out


def _class_names(records: Sequence[dict[str, Any]]) -> list[str] | None:
    for r in records:
        dataset = (r.get("config") or {}).get("dataset") if isinstance(r.get("config"), dict) else None
        names = dataset.get("class_names") if isinstance(dataset, dict) else None
        if isinstance(names, list) and names:
            return [str(n) for n in names]
    return None


def overlay_figures(
    report: Report, max_cases: int = 1, n_slices: int = N_SLICES, max_configs: int = MAX_CONFIGS
) -> Overlays:
    """Fig. 4 for every group of ``report`` whose quantized records have a ``predictions`` section: one figure per
    case for the first ``max_cases`` cases (sorted; the cases of the group's first such record), named
    ``overlay_<model>_<dataset>[_<case>].png`` (the case in the name when ``max_cases`` > 1)."""
    out = Overlays()
    if max_cases <= 0:
        return out
    by_id = {r.get("id"): r for r in report.selection.successes}
    names = group_names(report.rows)
    for key, cell in names.items():
        rows = [r for r in report.rows if group_key(r) == key and r["precision"] != "fp32" and r.get("id")]
        with_predictions = [(r, by_id[r["id"]]) for r in rows if (by_id.get(r["id"]) or {}).get("predictions")
                            is not None]  # fmt: skip
        if not with_predictions:
            continue
        model = key[0]
        with_method = len({r["method"] for r in rows}) > 1
        configs = []  # (column title, record id, cases)
        for row, record in with_predictions:
            cases = _cases(record["predictions"], str(row["id"]), out.warnings)
            if cases:
                configs.append((config_label(row, with_method), str(row["id"]), cases))
        if not configs:
            continue
        shown = configs[:max_configs]
        left_out = len(configs) - len(shown)
        case_ids = sorted(shown[0][2])[:max_cases]
        class_names = _class_names([record for _, record in with_predictions])
        stem = f"overlay_{_slug(model)}_{_slug(cell.replace('†', '_untrained').replace('‡', '_nolabels'))}"
        for case in case_ids:
            name = f"{stem}_{_slug(case)}.png" if max_cases > 1 else f"{stem}.png"
            drawn = _case_figure(model, cell, case, shown, left_out, class_names, n_slices, out.warnings)
            if drawn is not None:
                out.figures[name], out.captions[name] = drawn
    return out


def _case_figure(
    model: str, cell: str, case: str, configs: list[tuple[str, str, dict]], left_out: int,
    class_names: list[str] | None, n_slices: int, warnings: list[str],
) -> tuple[Figure, str] | None:  # fmt: skip
    """One case's figure and caption, or ``None`` (warned) when its image or FP32 prediction cannot be read."""
    first_id, paths = next(((rid, cases[case]) for _, rid, cases in configs if case in cases))
    where = f"{model} on {cell}, case {case}"
    try:
        image, _ = load_volume(paths["image"], "image")
    except VolumeError as e:
        warnings.append(f"overlay of {where} skipped: {e} (record {first_id})")
        return None
    channel_note = ""
    if image.ndim == 4:  # a multi-channel image (e.g. MRI sequences): the first channel is shown
        image, channel_note = image[..., 0], f" (channel 1 of {image.shape[-1]} shown)"
    if image.ndim != 3:
        warnings.append(f"overlay of {where} skipped: image file {paths['image']!r} has shape {image.shape}, not a "
                        f"3-D volume (record {first_id})")  # fmt: skip
        return None
    shape = tuple(image.shape)
    try:
        fp32 = _label_map(paths["fp32"], "FP32 prediction", shape)
    except VolumeError as e:
        warnings.append(f"overlay of {where} skipped: {e} (record {first_id})")
        return None
    label = None
    if paths.get("label"):
        try:
            label = _label_map(paths["label"], "label", shape)
        except VolumeError as e:
            warnings.append(f"overlay of {where}: no label column: {e} (record {first_id})")
    predictions: dict[str, np.ndarray] = {}
    unreadable = []
    for title, rid, cases in configs:
        if case not in cases:
            warnings.append(f"overlay of {where}: record {rid} has no saved prediction for this case; column left out")
            unreadable.append(title)
            continue
        try:
            pred = _label_map(cases[case]["prediction"], "prediction", shape)
        except VolumeError as e:
            warnings.append(f"overlay of {where}: column {title!r} left out: {e} (record {rid})")
            unreadable.append(title)
            continue
        column = _wrap(title, 24)
        predictions[column if column not in predictions and column != "FP32" else f"{column}\n({rid})"] = pred
    if not predictions:
        warnings.append(f"overlay of {where} skipped: no readable quantized prediction")
        return None
    slices, counts = disagreement_slices(fp32, list(predictions.values()), AXIS, n_slices)
    n_configs = len(predictions)
    if slices:
        gap = max(1, shape[AXIS] // (3 * n_slices))
        how = (f"axial slices {', '.join(map(str, slices))} of {shape[AXIS]}: the slices"
               + (f" (at least {gap} apart)" if gap > 1 else "") + " with the most voxels where a quantized "
               f"prediction differs from FP32 ({', '.join(map(str, counts))} voxels, summed over the {n_configs} "
               "config(s))")  # fmt: skip
    else:
        reference = label if label is not None else fp32
        slices = choose_slices(reference, AXIS, n_slices)
        how = (f"axial slices {', '.join(map(str, slices))} of {shape[AXIS]}: no quantized prediction differs from "
               f"FP32 in this case, so the slices are spread over the {'label' if label is not None else 'FP32'} "
               "foreground")  # fmt: skip
    highest = max([int(fp32.max()), *(int(p.max()) for p in predictions.values()), int(label.max()) if label is not
                   None else 0])  # fmt: skip
    names = class_names if class_names is not None and len(class_names) > highest else None
    fig = overlay_figure(image, label, {"FP32": fp32, **predictions}, slices=slices, axis=AXIS, class_names=names,
                         title=f"{model} on {cell}: case {case}")  # fmt: skip
    columns = "image, " + ("label, " if label is not None else "") + f"FP32 and {n_configs} quantized config(s)"
    dice = "each prediction panel reads its slice Dice against the label" if label is not None else \
        "no readable label: no slice Dice"  # fmt: skip
    caption = (f"Fig. 4 — {where}{channel_note}: {columns}; {how}. Volumes reoriented to RAS: the patient's right "
               f"on the right of each panel, anterior up; {dice}."
               + (f" Not shown, no readable prediction (see the warnings): {', '.join(unreadable)}." if unreadable
                  else "")
               + (f" {left_out} further config(s) not shown (the first {len(configs)} in table order are)."
                  if left_out else ""))  # fmt: skip
    return fig, caption


def overlays_markdown(overlays: Overlays, with_images: bool = True) -> str:
    """``overlays.md``: per figure a heading, the image (``with_images``: the PNG next to it) and its caption; the
    warnings last."""
    lines = ["# Qualitative overlays (Fig. 4)", ""]
    for name, caption in overlays.captions.items():
        lines += [f"## {Path(name).stem}", ""]
        if with_images:
            lines += [f"![{Path(name).stem}]({name})", ""]
        lines += [caption, ""]
    if overlays.warnings:
        lines += ["## Warnings", "", *(f"- {w}" for w in overlays.warnings), ""]
    return "\n".join(lines)


def write_overlays(
    overlays: Overlays, out: str | os.PathLike[str], markdown: bool = True, dpi: int = 150
) -> list[Path]:
    """Write each figure as ``out/<name>`` (PNG) and, ``markdown``, ``out/overlays.md``, atomically; returns the
    paths written (none when there is nothing to show and nothing to warn about)."""
    folder = Path(out)
    paths = []
    for name, fig in overlays.figures.items():
        path = folder / name
        with atomic_write(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi)
        paths.append(path)
    if markdown and (overlays.figures or overlays.warnings):
        path = folder / OVERLAYS_MD
        with atomic_write(path) as tmp:
            tmp.write_text(overlays_markdown(overlays), encoding="utf-8")
        paths.append(path)
    return paths
