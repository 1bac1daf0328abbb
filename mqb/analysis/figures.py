"""Figures a reader can read: layer sensitivity, FLOP composition (Fig. 1a) and qualitative overlays (Fig. 4).

Every plot function returns a matplotlib :class:`~matplotlib.figure.Figure` built without pyplot (no global state,
no display needed); :func:`save_figure` writes it atomically. Layouts are sized from the data (one row per layer,
one bar per model, one column per prediction) so that long layer names, many layers or many classes never
squash the plot, and legends sit outside the axes.

* :func:`sensitivity_figure`: per-step DSC of a sensitivity study (``python -m mqb.sensitivity``) as horizontal
  bars with the full step labels, FP32 and "all quantized" reference lines, Spearman's ρ in the caption.
* :func:`flop_composition` / :func:`flop_composition_figure`: the share of a network's FLOPs per layer type
  (``conv3x3x3``, ``conv1x1x1``, ``linear``, attention matmuls ...), counted by
  :class:`torch.utils.flop_counter.FlopCounterMode`.
* :func:`overlay_figure`: image slices with the label and each prediction (FP32, quantized ...) overlaid,
  and each panel's slice Dice against the label.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from torch import nn

from mqb.quant.layers import describe_layer
from mqb.results import atomic_write

#: FLOP categories that are not a quantizable layer: matmuls outside nn.Linear (attention's QK^T and AV, SDPA)
#: and any other counted op (a functional convolution ...).
ATTENTION, OTHER = "attention matmul", "other"
_ATTENTION_OPS = ("mm", "bmm", "addmm", "baddbmm", "matmul", "scaled_dot_product", "attention")


def save_figure(fig: Figure, path: str | os.PathLike[str], dpi: int = 150) -> Path:
    """Write ``fig`` as a PNG atomically (temporary file + rename); returns the path."""
    target = Path(path)
    with atomic_write(target) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return target


def format_rho(value: float | None, digits: int = 2) -> str:
    """A correlation with sensible precision: ``0.80`` (not ``0.7999999999999999``), ``−0.45`` with a real minus,
    ``n/a`` when undefined (NaN, e.g. a constant score)."""
    if value is None or not math.isfinite(value):
        return "n/a"
    text = f"{value:.{digits}f}"
    return text.replace("-", "−") if float(text) != 0 else f"{0:.{digits}f}"


# -- sensitivity -------------------------------------------------------------------------------------------
def sensitivity_figure(
    rows: Sequence[Mapping[str, Any]],
    baseline: float | None,
    title: str,
    metric: str = "dsc",
    spearman: float | None = None,
) -> Figure:
    """One horizontal bar per step of a sensitivity study (``rows``: ``label`` and ``metric``, optionally
    ``<metric>_delta_pct``), in the given order from the top, each labelled with its full name and its value
    (``0.712 (3.4%)``). The FP32 ``baseline`` is a dashed line, the first row's value (all layers quantized) a
    dotted one; the legend sits under the axes. The height grows with the number of rows and the left margin with
    the longest label, so no name is cut or squashed; ``spearman`` (ρ of recovered DSC vs. layer SQNR) goes in
    the caption as ``ρ = 0.80``."""
    if not rows:
        raise ValueError("sensitivity_figure: no rows to plot")
    missing = [i for i, r in enumerate(rows) if "label" not in r or metric not in r]
    if missing:
        raise ValueError(f"sensitivity_figure: rows {missing} lack 'label' or {metric!r} (keys of row "
                         f"{missing[0]}: {sorted(rows[missing[0]])})")  # fmt: skip
    labels = [str(r["label"]) for r in rows]
    values = [float(r[metric]) if r[metric] is not None else math.nan for r in rows]
    longest = max(len(s) for s in labels)
    height = 1.6 + 0.28 * len(rows)
    width = min(16.0, 5.5 + 0.075 * longest)
    fig = Figure(figsize=(width, height), layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(rows))
    colors = ["tab:gray"] + ["tab:blue"] * (len(rows) - 1)
    bars = ax.barh(y, [0.0 if math.isnan(v) else v for v in values], color=colors, height=0.7)
    finite = [v for v in values if math.isfinite(v)] + ([baseline] if baseline is not None else [])
    top = max(finite, default=1.0) or 1.0
    for bar, r, v in zip(bars, rows, values, strict=True):
        delta = r.get(f"{metric}_delta_pct")
        text = "n/a" if math.isnan(v) else f"{v:.3f}" + (f" ({delta:.1f}%)" if delta is not None else "")
        ax.text(bar.get_width() + 0.01 * top, bar.get_y() + bar.get_height() / 2, text, va="center",
                fontsize="x-small")  # fmt: skip
    handles = []
    if baseline is not None and math.isfinite(baseline):
        handles.append(ax.axvline(baseline, color="black", linestyle="--", linewidth=1,
                                  label=f"FP32 {metric.upper()} {baseline:.3f}"))  # fmt: skip
    if len(rows) > 1 and math.isfinite(values[0]):
        handles.append(ax.axvline(values[0], color="tab:gray", linestyle=":", linewidth=1,
                                  label=f"{labels[0]} {values[0]:.3f}"))  # fmt: skip
    ax.set_yticks(y, labels, fontsize="small")
    ax.invert_yaxis()  # the first step on top
    ax.set_ylim(len(rows) - 0.4, -0.6)
    ax.set_xlim(0, top * 1.25)  # room for the value labels right of the longest bar
    ax.set_xlabel(f"mean {metric.upper()}")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title, fontsize="medium", loc="left")
    if spearman is not None:
        ax.set_title(f"Spearman ρ(recovered {metric.upper()}, SQNR) = {format_rho(spearman)}", fontsize="small",
                     loc="right", color="dimgray")  # fmt: skip
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize="small", frameon=False)
    return fig


# -- FLOP composition (Fig. 1a) ------------------------------------------------------------------------------
def layer_type(name: str, module: nn.Module) -> str | None:
    """The FLOP category of a quantizable layer: its kernel tag (``conv3x3x3``, ``conv1x1x1``,
    ``conv_transpose2x2x2``; `` depthwise`` / `` grouped`` appended) or ``linear``; ``None`` for other modules."""
    info = describe_layer(name, module)
    if info is None or info.kind == "norm":
        return None
    if info.kind == "linear":
        return "linear"
    return info.kernel_tag + (" depthwise" if info.depthwise else " grouped" if info.groups > 1 else "")


def _op_category(op: Any) -> str:
    name = str(getattr(op, "__name__", op)).split(".")[-1]
    return ATTENTION if any(name == k or name.startswith(k) or k in name for k in _ATTENTION_OPS) else OTHER


def flop_composition(model: nn.Module, input_shape: Sequence[int]) -> dict[str, int]:
    """FLOPs of one forward pass of ``model`` on a zero input of ``input_shape`` (batch included, e.g.
    ``(1, 1, 96, 96, 96)``), per layer type: each Conv / ConvTranspose / Linear layer's FLOPs go to its
    :func:`layer_type`; FLOPs counted outside those layers go to ``attention matmul`` (matrix products: attention's
    QKᵀ and AV, SDPA) or ``other``. Largest first, zero categories left out.

    FLOPs are :class:`torch.utils.flop_counter.FlopCounterMode`'s: 2 per multiply-accumulate of convolutions and
    matrix products (bias, norms and activations are not counted). The input is created on the device of the
    model's first parameter (CPU without parameters), so a network built under ``with torch.device("meta")``
    is counted from shapes alone, without computing anything."""
    from torch.utils.flop_counter import FlopCounterMode

    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s <= 0 for s in shape):
        raise ValueError(f"flop_composition: input_shape must be positive sizes (batch, channels, *spatial); "
                         f"got {tuple(input_shape)}")  # fmt: skip
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = torch.zeros(shape, device=param.device if param is not None else "cpu", dtype=dtype)
    counter = FlopCounterMode(display=False)
    per_op: dict[str, dict[Any, int]] = {}  # category -> op -> FLOPs inside the layers of that category
    starts: dict[int, dict[Any, int]] = {}
    handles = []

    def snapshot() -> dict[Any, int]:
        return dict(counter.get_flop_counts().get("Global", {}))

    for name, module in model.named_modules():
        category = layer_type(name, module)
        if category is None:
            continue

        def pre(mod: nn.Module, args: Any) -> None:
            starts[id(mod)] = snapshot()

        def post(mod: nn.Module, args: Any, output: Any, category: str = category) -> None:
            before, after = starts.pop(id(mod)), snapshot()
            ops = per_op.setdefault(category, {})
            for op, n in after.items():
                ops[op] = ops.get(op, 0) + n - before.get(op, 0)

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    training = model.training
    try:
        model.eval()
        with torch.no_grad(), counter:
            model(x)
    finally:
        model.train(training)
        for h in handles:
            h.remove()
    total_per_op = snapshot()
    out: dict[str, int] = {c: sum(ops.values()) for c, ops in per_op.items()}
    for op, n in total_per_op.items():
        rest = n - sum(ops.get(op, 0) for ops in per_op.values())
        if rest:
            out[_op_category(op)] = out.get(_op_category(op), 0) + rest
    return dict(sorted(((c, int(n)) for c, n in out.items() if n), key=lambda kv: (-kv[1], kv[0])))


def _flops_text(n: float) -> str:
    for unit, scale in (("TFLOPs", 1e12), ("GFLOPs", 1e9), ("MFLOPs", 1e6), ("kFLOPs", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} FLOPs"


def flop_composition_figure(
    compositions: Mapping[str, Mapping[str, int]], title: str = "FLOP composition by layer type"
) -> Figure:
    """Fig. 1a: per model (``name -> flop_composition(...)``), one 100 % stacked horizontal bar of its FLOPs by
    layer type; segments of 5 % or more read their share, the total is written right of each bar, and the legend
    (one colour per layer type, the same in every bar) sits under the axes."""
    if not compositions:
        raise ValueError("flop_composition_figure: no models")
    totals = {m: sum(c.values()) for m, c in compositions.items()}
    empty = [m for m, t in totals.items() if t <= 0]
    if empty:
        raise ValueError(f"flop_composition_figure: no FLOPs counted for {empty}")
    overall: dict[str, float] = {}
    for m, comp in compositions.items():
        for cat, n in comp.items():
            overall[cat] = overall.get(cat, 0.0) + n / totals[m]
    # layer kinds in a fixed order (convs by their overall share, then transposed convs, linear, attention, other)
    def kind_rank(cat: str) -> int:
        return 4 if cat == OTHER else 3 if cat == ATTENTION else 2 if cat == "linear" else \
            1 if cat.startswith("conv_transpose") else 0  # fmt: skip

    categories = sorted(overall, key=lambda c: (kind_rank(c), -overall[c], c))
    palette = colormaps["tab20" if len(categories) > 10 else "tab10"]
    colors = {c: palette(i % palette.N) for i, c in enumerate(categories)}
    colors.update({OTHER: (0.75, 0.75, 0.75, 1.0)} if OTHER in colors else {})
    models = list(compositions)
    longest = max(len(m) for m in models)
    fig = Figure(figsize=(min(14.0, 7.5 + 0.07 * longest), 1.9 + 0.42 * len(models) + 0.25 * math.ceil(
        len(categories) / 4)), layout="constrained")  # fmt: skip
    ax = fig.subplots()
    for i, m in enumerate(models):
        left = 0.0
        for cat in categories:
            share = 100.0 * compositions[m].get(cat, 0) / totals[m]
            if share <= 0:
                continue
            ax.barh(i, share, left=left, color=colors[cat], height=0.7, edgecolor="white", linewidth=0.5)
            if share >= 5:
                r, g, b, _ = colors[cat]
                ink = "white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "black"
                ax.text(left + share / 2, i, f"{share:.0f}%", ha="center", va="center", fontsize="x-small",
                        color=ink)  # fmt: skip
            left += share
        ax.text(101.0, i, _flops_text(totals[m]), va="center", fontsize="x-small")
    ax.set_yticks(range(len(models)), models, fontsize="small")
    ax.set_ylim(len(models) - 0.4, -0.6)
    ax.set_xlim(0, 100)
    ax.set_xlabel("share of FLOPs (%)")
    ax.set_title(title, fontsize="medium", loc="left")
    ax.spines[["top", "right"]].set_visible(False)
    fig.legend(handles=[Patch(color=colors[c], label=c) for c in categories], loc="outside lower center",
               ncols=min(4, len(categories)), fontsize="small", frameon=False)  # fmt: skip
    fig.get_layout_engine().set(w_pad=0.1)  # room right of the bars for the totals
    return fig


# -- qualitative overlays (Fig. 4) ---------------------------------------------------------------------------
def _volume(name: str, array: Any) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    out = np.asarray(array)
    while out.ndim > 3 and out.shape[0] == 1:  # [1, D, H, W] or [1, 1, D, H, W]: a channel / batch axis
        out = out[0]
    if out.ndim != 3:
        raise ValueError(f"overlay_figure: {name} must be a 3-D volume (or with leading axes of size 1); got shape "
                         f"{tuple(np.shape(array))}")  # fmt: skip
    return out


def choose_slices(mask: np.ndarray, axis: int = 2, n: int = 3) -> list[int]:
    """``n`` slice indices along ``axis`` spread over the foreground's extent (at 1/(n+1), 2/(n+1) ... of it),
    each moved to the nearest slice with the most foreground around it; the middle slices when ``mask`` is
    empty."""
    if axis not in (0, 1, 2, -1, -2, -3):
        raise ValueError(f"choose_slices: axis must be 0, 1 or 2; got {axis}")
    axis %= 3
    area = (np.asarray(mask) > 0).sum(axis=tuple(a for a in range(3) if a != axis))
    size = area.shape[0]
    fg = np.flatnonzero(area)
    lo, hi = (fg[0], fg[-1]) if fg.size else (0, size - 1)
    picks = []
    for k in range(1, n + 1):
        target = lo + (hi - lo) * k / (n + 1)
        picks.append(int(round(target)))
    return sorted(dict.fromkeys(min(max(p, 0), size - 1) for p in picks))


def _slice_dice(label: np.ndarray, pred: np.ndarray) -> float | None:
    """Mean Dice over the foreground classes present in the label or prediction slice (``None`` when none is)."""
    classes = [c for c in np.union1d(np.unique(label), np.unique(pred)) if c != 0]
    if not classes:
        return None
    scores = []
    for c in classes:
        a, b = label == c, pred == c
        scores.append(2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))
    return float(np.mean(scores))


def class_colors(n_classes: int) -> np.ndarray:
    """RGBA colour per class id ``0 .. n_classes-1`` (row 0, the background, transparent): the ten ``tab10``
    colours first, then the ten light ``tab20`` ones (neighbouring ids never get two shades of one hue), evenly
    spaced hues beyond 20 foreground classes."""
    colors = np.zeros((max(n_classes, 1), 4))
    if n_classes - 1 <= 20:
        tab20 = colormaps["tab20"]
        palette = [tab20(2 * i) for i in range(10)] + [tab20(2 * i + 1) for i in range(10)]
        for c in range(1, n_classes):
            colors[c] = palette[c - 1]
    else:
        hsv = colormaps["hsv"]
        for c in range(1, n_classes):
            colors[c] = hsv((c - 1) / (n_classes - 1))
    return colors


def overlay_rgba(mask: np.ndarray, colors: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """``[H, W, 4]`` RGBA image: each voxel of class ``c > 0`` in ``colors[c]`` at opacity ``alpha``, background
    transparent."""
    rgba = colors[np.asarray(mask, dtype=np.int64)].copy()
    rgba[..., 3] = np.where(mask > 0, alpha, 0.0)
    return rgba


def overlay_figure(
    image: Any,
    label: Any | None,
    predictions: Mapping[str, Any],
    slices: Sequence[int] | None = None,
    axis: int = 2,
    class_names: Sequence[str] | None = None,
    title: str = "",
    alpha: float = 0.5,
) -> Figure:
    """Fig. 4: one row per slice, columns image, label (when given) and each prediction (e.g. ``{"FP32": ...,
    "W4A4 per-tensor": ...}``), classes in colour over the grey image; each prediction panel reads its slice Dice
    against the label (mean over the classes present in either). Arrays are NumPy or torch, 3-D (leading size-1
    axes dropped), all the same shape; label and predictions hold class ids. ``slices`` along ``axis`` (default
    :func:`choose_slices` of the label, or of the first prediction without a label); a slice is shown transposed
    with the origin at the bottom (RAS volumes: right / anterior up). ``class_names[c]`` names class ``c`` in the
    legend (the classes present in the shown slices)."""
    img = _volume("image", image)
    masks: dict[str, np.ndarray] = {}
    argument = {"label": "label"}  # column -> the argument it came from, for errors
    if label is not None:
        masks["label"] = _volume("label", label)
    if not predictions:
        raise ValueError("overlay_figure: no predictions to show")
    for name, p in predictions.items():
        argument[str(name)] = f"predictions[{name!r}]"
        masks[str(name)] = _volume(argument[str(name)], p)
    for name, m in masks.items():
        if m.shape != img.shape:
            raise ValueError(f"overlay_figure: {argument[name]} has shape {m.shape}, the image {img.shape}")
        if not np.all(np.isfinite(m)) or np.any(m < 0) or np.any(m != np.round(m)):
            raise ValueError(f"overlay_figure: {argument[name]} must hold class ids (non-negative integers)")
    if axis not in (0, 1, 2, -1, -2, -3):
        raise ValueError(f"overlay_figure: axis must be 0, 1 or 2; got {axis}")
    axis %= 3
    ref = masks.get("label", next(iter(masks.values())))
    chosen = list(slices) if slices is not None else choose_slices(ref, axis)
    bad = [s for s in chosen if not 0 <= int(s) < img.shape[axis]]
    if bad or not chosen:
        raise ValueError(f"overlay_figure: slices {bad or chosen} outside 0..{img.shape[axis] - 1} along axis {axis}")
    n_classes = int(max(m.max() for m in masks.values())) + 1
    if class_names is not None and len(class_names) < n_classes:
        raise ValueError(f"overlay_figure: class_names has {len(class_names)} names; the masks hold class ids up to "
                         f"{n_classes - 1}")  # fmt: skip
    colors = class_colors(max(n_classes, 2))
    finite = img[np.isfinite(img)]
    lo, hi = (np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0))
    hi = hi if hi > lo else lo + 1.0
    columns = ["image", *masks]
    first, second = (img.shape[a] for a in range(3) if a != axis)
    panel = 2.3
    aspect = second / first  # a slice is shown transposed: `second` rows by `first` columns
    fig = Figure(figsize=(panel * len(columns), 0.9 + panel * aspect * len(chosen) + 0.4), layout="constrained")
    axes = fig.subplots(len(chosen), len(columns), squeeze=False)
    shown: set[int] = set()
    for i, s in enumerate(chosen):
        s = int(s)
        base = np.take(img, s, axis=axis).T
        for j, col in enumerate(columns):
            ax = axes[i][j]
            ax.imshow(base, cmap="gray", vmin=lo, vmax=hi, origin="lower", interpolation="nearest")
            if col != "image":
                m = np.take(masks[col], s, axis=axis).T.astype(np.int64)
                shown.update(int(c) for c in np.unique(m) if c)
                ax.imshow(overlay_rgba(m, colors, alpha), origin="lower", interpolation="nearest")
                if col != "label" and "label" in masks:
                    d = _slice_dice(np.take(masks["label"], s, axis=axis), np.take(masks[col], s, axis=axis))
                    # under the panel, not on it: the box would hide what it scores (e.g. a corner false positive)
                    ax.text(0.5, -0.02, "DSC -" if d is None else f"DSC {d:.2f}", transform=ax.transAxes,
                            fontsize="x-small", color="black", ha="center", va="top")  # fmt: skip
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(col, fontsize="small")
            if j == 0:
                ax.set_ylabel(f"slice {s} (axis {axis})", fontsize="x-small")
    if shown:
        names = [class_names[c] if class_names is not None else f"class {c}" for c in sorted(shown)]
        fig.legend(handles=[Patch(color=colors[c], label=n) for c, n in zip(sorted(shown), names, strict=True)],
                   loc="outside lower center", ncols=min(len(shown), max(2, len(columns) * 2)), fontsize="x-small",
                   frameon=False)  # fmt: skip
    if title:
        fig.suptitle(title, fontsize="medium")
    return fig
