"""Figures a reader can read (mqb.analysis.figures, the kurtosis scatter of mqb.analysis.activation_stats).

Readability is checked on the drawn figure: tick labels and titles inside the figure and not overlapping each
other, legends outside the axes, the full layer names on the axis. FLOPs are checked against hand-computed
counts of a tiny network (2 FLOPs per multiply-accumulate, FlopCounterMode's convention).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.transforms import Bbox
from torch import nn

from mqb.analysis.activation_stats import collect_activation_stats, kurtosis_scatter_figure
from mqb.analysis.figures import (
    ATTENTION,
    OTHER,
    choose_slices,
    class_colors,
    flop_composition,
    flop_composition_figure,
    format_rho,
    overlay_figure,
    save_figure,
    sensitivity_figure,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def drawn(fig):
    FigureCanvasAgg(fig)
    fig.canvas.draw()
    return fig.canvas.get_renderer()


def extents(texts, renderer) -> list[Bbox]:
    return [t.get_window_extent(renderer) for t in texts if t.get_visible() and t.get_text()]


def xticks(ax) -> list:
    """The x tick labels matplotlib draws (the locator also returns ticks beyond the view, never drawn)."""
    lo, hi = sorted(ax.get_xlim())
    return [t for t in ax.get_xticklabels() if lo - 1e-9 <= t.get_position()[0] <= hi + 1e-9]


def overlapping(boxes: list[Bbox]) -> list[tuple[int, int]]:
    return [(i, j) for i in range(len(boxes)) for j in range(i + 1, len(boxes)) if boxes[i].overlaps(boxes[j])]


def inside(box: Bbox, fig, tol: float = 1.0) -> bool:
    return box.x0 >= -tol and box.y0 >= -tol and box.x1 <= fig.bbox.x1 + tol and box.y1 <= fig.bbox.y1 + tol


def test_format_rho():
    assert format_rho(0.7999999999999999) == "0.80" and format_rho(-0.45) == "−0.45"
    assert format_rho(-0.001) == "0.00" and format_rho(float("nan")) == "n/a" and format_rho(None) == "n/a"
    assert format_rho(1 / 3, digits=3) == "0.333"


# -- sensitivity -----------------------------------------------------------------------------------------------
def study_rows(n: int) -> list[dict]:
    rows = [{"label": "all quantized", "dsc": 0.41, "dsc_delta_pct": 53.4}]
    rows += [{"label": f"exclude {i}th 3×3×3 conv (model.{i % 3}.submodule.{i}.residual_unit.conv.adn.conv)",
              "dsc": 0.41 + 0.01 * i, "dsc_delta_pct": 53.4 - i} for i in range(1, n)]  # fmt: skip
    return rows


def test_sensitivity_figure_shows_every_full_layer_name(tmp_path):
    rows = study_rows(25)
    fig = sensitivity_figure(rows, 0.88, "unet w4a4: per-3×3×3 conv sensitivity", spearman=0.7999999999999999)
    renderer = drawn(fig)
    ax = fig.axes[0]
    labels = [t for t in ax.get_yticklabels()]
    assert [t.get_text() for t in labels] == [r["label"] for r in rows]  # full names, first step on top
    assert labels[0].get_position()[1] < labels[-1].get_position()[1]  # inverted axis: row 0 drawn at the top
    boxes = extents(labels, renderer)
    assert all(inside(b, fig) for b in boxes), "a layer name is cut at the figure's edge"
    assert not overlapping(boxes), "layer names overlap"
    legend = fig.legends[0].get_window_extent(renderer)
    assert not legend.overlaps(ax.get_window_extent(renderer)) and inside(legend, fig)  # legend outside the bars
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["FP32 DSC 0.880", "all quantized 0.410"]
    values = [t.get_text() for t in ax.texts]
    assert values[0] == "0.410 (53.4%)" and values[-1] == f"{0.41 + 0.24:.3f} ({53.4 - 24:.1f}%)"
    assert all(inside(b, fig) for b in extents(ax.texts, renderer))
    assert ax.get_title(loc="right").endswith("= 0.80")
    small = sensitivity_figure(study_rows(4), 0.88, "x")
    assert fig.get_figheight() > 2 * small.get_figheight()  # the height follows the number of layers
    assert save_figure(fig, tmp_path / "s.png").read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match=r"rows \[1\] lack 'label' or 'dsc'"):
        sensitivity_figure([rows[0], {"label": "x"}], 0.9, "x")


# -- FLOP composition --------------------------------------------------------------------------------------------
class Tiny(nn.Module):
    """Every FLOP category: 3x3x3, depthwise, 1x1x1 and transposed convs, a Linear called twice, attention
    matmuls and a functional convolution outside any layer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(2, 4, 3, padding=1)
        self.dw = nn.Conv3d(4, 4, 3, padding=1, groups=4)
        self.pw = nn.Conv3d(4, 4, 1)
        self.proj = nn.Linear(4, 8)
        self.up = nn.ConvTranspose3d(4, 2, 2, stride=2)
        self.register_buffer("mix", torch.ones(1, 4, 1, 1, 1))
        self.norm = nn.InstanceNorm3d(4)

    def forward(self, x):
        x = self.norm(self.pw(self.dw(self.conv(x))))
        t = x.flatten(2).transpose(1, 2)  # (1, 216, 4) tokens
        q, k = self.proj(t), self.proj(t)
        a = (q @ k.transpose(1, 2)).softmax(-1) @ q  # two batched matmuls
        return self.up(x) + a.mean() + F.conv3d(x, self.mix).mean()


def hand_flops() -> dict[str, int]:
    voxels = 6**3
    return {
        "conv3x3x3": 2 * voxels * 4 * (2 * 27),  # per output element: C_in * k^3 MACs
        "conv3x3x3 depthwise": 2 * voxels * 4 * 27,  # one input channel per output channel
        "conv1x1x1": 2 * voxels * 4 * 4,
        "linear": 2 * (2 * voxels * 4 * 8),  # called twice
        ATTENTION: 2 * voxels * voxels * 8 + 2 * voxels * voxels * 8,  # QK^T (216x8 @ 8x216) and AV (216x216 @ 216x8)
        "conv_transpose2x2x2": 2 * voxels * 4 * 2 * 8,  # each input voxel and channel feeds 2^3 outputs x C_out
        OTHER: 2 * voxels * 4,  # F.conv3d with a 1x1x1 kernel, 4 -> 1 channel
    }


def test_flop_composition_matches_hand_counts():
    net = Tiny().train()
    flops = flop_composition(net, (1, 2, 6, 6, 6))
    expected = hand_flops()
    assert flops == expected
    assert list(flops) == sorted(expected, key=lambda c: (-expected[c], c))  # largest first, ties by name
    assert net.training and all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())
    with torch.device("meta"):  # shapes only: the same counts without computing anything
        meta = Tiny()
    assert flop_composition(meta, (1, 2, 6, 6, 6)) == expected
    with pytest.raises(ValueError, match="input_shape must be positive"):
        flop_composition(net, (1, 2, 0, 6, 6))


def test_flop_composition_figure():
    comps = {"tiny": hand_flops(), "a network with a long name": {"conv3x3x3": 3 * 10**9, "linear": 10**9}}
    fig = flop_composition_figure(comps)
    renderer = drawn(fig)
    ax = fig.axes[0]
    for y, comp in enumerate(comps.values()):  # one 100 % stacked bar per model, its segments in category order
        widths = [p.get_width() for p in ax.patches if abs(p.get_y() + p.get_height() / 2 - y) < 1e-9]
        assert sum(widths) == pytest.approx(100.0)
        assert sorted(widths) == pytest.approx(sorted(100.0 * n / sum(comp.values()) for n in comp.values()))
    texts = [t.get_text() for t in ax.texts]
    assert "75%" in texts and "25%" in texts and "4 GFLOPs" in texts
    legend = fig.legends[0]
    assert {t.get_text() for t in legend.get_texts()} == set(hand_flops())
    assert not legend.get_window_extent(renderer).overlaps(ax.get_window_extent(renderer))
    assert all(inside(b, fig) for b in extents([*ax.get_yticklabels(), *ax.texts], renderer))
    with pytest.raises(ValueError, match="no FLOPs counted for"):
        flop_composition_figure({"empty": {}})


# -- overlays ----------------------------------------------------------------------------------------------------
def volumes():
    image = np.linspace(0, 1, 20 * 16 * 12).reshape(20, 16, 12)
    label = np.zeros((20, 16, 12), dtype=np.int64)
    label[4:10, 3:9, 2:10] = 1
    label[12:16, 8:14, 4:8] = 2
    fp32 = label.copy()
    quant = label.copy()
    quant[quant == 2] = 0  # the quantized model loses class 2
    return image, label, fp32, quant


def test_overlay_figure_panels_colours_and_slice_dice():
    image, label, fp32, quant = volumes()
    names = ["background", "liver", "spleen"]
    fig = overlay_figure(torch.from_numpy(image)[None], label, {"FP32": fp32, "W4A4 per-tensor": quant},
                         slices=[6, 5], axis=2, class_names=names, title="case 1")  # fmt: skip
    axes = fig.axes
    assert len(axes) == 2 * 4 and [a.get_title() for a in axes[:4]] == ["image", "label", "FP32", "W4A4 per-tensor"]
    # slice 6 of axis 2 holds class 1 (4:10, 3:9) and class 2 (12:16, 8:14): quantized Dice = (1 + 0) / 2
    assert [t.get_text() for t in axes[2].texts] == ["DSC 1.00"] and [t.get_text() for t in axes[3].texts] == [
        "DSC 0.50"]  # fmt: skip
    overlay = axes[1].images[1].get_array()  # the label panel's colour layer: the slice transposed (x right, y up)
    colors = class_colors(3)
    assert overlay.shape == (16, 20, 4)
    assert np.allclose(overlay[5, 6, :3], colors[1][:3]) and overlay[5, 6, 3] == pytest.approx(0.5)  # label[6, 5]
    assert np.allclose(overlay[10, 13, :3], colors[2][:3]) and overlay[0, 0, 3] == 0.0  # class 2, background
    assert not np.allclose(colors[1], colors[2])
    assert np.array_equal(axes[0].images[0].get_array(), image[:, :, 6].T)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["liver", "spleen"]
    renderer = drawn(fig)
    assert not fig.legends[0].get_window_extent(renderer).overlaps(axes[-1].get_window_extent(renderer))


def test_overlay_defaults_and_errors():
    image, label, fp32, quant = volumes()
    assert choose_slices(label, axis=0) == [7, 10, 12]  # spread over rows 4..15 of the foreground
    assert choose_slices(np.zeros((9, 9, 9)), axis=1, n=1) == [4]
    fig = overlay_figure(image, None, {"FP32": fp32})  # no label: image and prediction, no Dice
    assert len(fig.axes) == 3 * 2 and not any(a.texts for a in fig.axes)
    with pytest.raises(ValueError, match=r"predictions\['W4A4'\] has shape \(20, 16, 11\), the image \(20, 16, 12\)"):
        overlay_figure(image, label, {"W4A4": quant[..., :11]})
    with pytest.raises(ValueError, match="must be a 3-D volume"):
        overlay_figure(image[0], label, {"W4A4": quant})
    with pytest.raises(ValueError, match="must hold class ids"):
        overlay_figure(image, label, {"W4A4": quant + 0.5})
    with pytest.raises(ValueError, match=r"slices \[12\] outside 0..11 along axis 2"):
        overlay_figure(image, label, {"W4A4": quant}, slices=[12])
    with pytest.raises(ValueError, match="class_names has 2 names"):
        overlay_figure(image, label, {"W4A4": quant}, class_names=["bg", "liver"])


# -- kurtosis scatter ------------------------------------------------------------------------------------------
class LongNames(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.ModuleDict({"stages": nn.ModuleList([nn.Conv3d(4, 4, 3, padding=1) for _ in range(2)])})
        self.attention_output_projection_with_a_long_name = nn.Linear(4, 4)

    def forward(self, x):
        for conv in self.encoder["stages"]:
            x = conv(x)
        return self.attention_output_projection_with_a_long_name(x.movedim(1, -1))


def test_kurtosis_scatter_is_readable(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(1, 4, 24, 24, 24)
    x[..., :3, :3, :3] *= 40  # spatially localized outliers
    stats = collect_activation_stats(LongNames(), [x], max_voxels=2000)
    fig = kurtosis_scatter_figure(stats)
    renderer = drawn(fig)
    panels = [a for a in fig.axes if a.get_xlabel()]
    bars = [a for a in fig.axes if "max |x| / panel max" in a.get_ylabel()]
    assert len(panels) == 2 * 3 and len(bars) == 2  # one colour bar per row
    titles = [a.title for a in panels if a.get_title()]
    assert len(titles) == 3 and not overlapping(extents(titles, renderer)), "panel titles overlap"
    assert all(len(line) <= 26 for t in titles for line in t.get_text().split("\n")[:-1])  # long names wrapped
    assert "attention_output_" in titles[-1].get_text()
    for ax in panels:
        ticks = extents(xticks(ax), renderer)
        assert ticks and not overlapping(ticks), f"x ticks collide in {ax.get_xlabel()}"
        assert ax.xaxis.get_offset_text().get_text() == ""  # '24k', not an offset such as '1e4'
        assert all(inside(b, fig) for b in ticks + extents([ax.xaxis.label, ax.yaxis.label], renderer))
    voxel_ticks = [t.get_text() for t in xticks(panels[3])]
    assert any(t.endswith("k") for t in voxel_ticks), voxel_ticks  # 13824 voxels
    assert save_figure(fig, tmp_path / "k.png").read_bytes()[:8] == PNG_MAGIC
    assert math.isclose(panels[0].lines[0].get_ydata()[0], math.log10(3.0))  # a normal's kurtosis marked
