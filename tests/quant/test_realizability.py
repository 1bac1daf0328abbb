"""Realizability of each layer under each scheme, and the readable summary."""

import pytest
from torch import nn

from mqb.quant import QuantRecipe, quantize, summarize


def _model() -> nn.Module:
    return nn.Sequential(
        nn.Conv3d(4, 8, 1),  # pointwise
        nn.Conv3d(8, 8, 3, padding=1),  # 3x3x3
        nn.Conv3d(8, 8, 3, padding=1, groups=8),  # depthwise
        nn.Conv3d(8, 8, (1, 3, 3), padding=(0, 1, 1)),  # 1x3x3
        nn.Flatten(),
        nn.Linear(8, 3),
    )


def _status(model: nn.Module) -> dict[str, str]:
    return {row.info.name: row.realizability.status for row in summarize(model).rows}


@pytest.mark.parametrize(
    "precision,scheme,expected",
    [
        ("w4a4", "per_tensor", ["integer-kernel"] * 5),
        # per-input-channel activation scales are not foldable except on depthwise convs
        (
            "w4a4",
            "per_channel",
            ["simulation-only", "simulation-only", "integer-kernel", "simulation-only", "integer-kernel"],
        ),
        # adaptive: per-voxel on 1x1x1 (a GEMM row scale) is executable; per-channel elsewhere is not
        (
            "w4a4",
            "adaptive",
            ["integer-kernel", "simulation-only", "integer-kernel", "simulation-only", "integer-kernel"],
        ),
        # per-voxel on k>1 kernels needs eq. 4's per-kernel-offset products
        (
            "w8a8",
            "per_voxel",
            ["integer-kernel", "simulation-only", "integer-kernel", "simulation-only", "integer-kernel"],
        ),
        ("w8a16", "per_channel", ["integer-kernel"] * 5),
        ("mxfp4", "per_channel", ["block-scaled"] * 5),
        ("fp8", "per_tensor", ["fp8-kernel"] * 5),
    ],
)
def test_realizability_per_layer(precision, scheme, expected):
    model = quantize(_model(), QuantRecipe.from_precision(precision, scheme=scheme))
    assert list(_status(model).values()) == expected


def test_float_layers_are_listed_and_summary_reads_well():
    model = quantize(_model(), QuantRecipe.from_precision("w4a4", scheme="adaptive", exclude=("linear",)))
    summary = summarize(model)
    assert _status(model)["5"] == "float"
    text = str(summary)
    assert text.startswith("4 of 5 quantizable layers quantized; 2 simulation-only")
    groups = summary.groups()
    assert set(groups) == {"conv1x1x1", "conv3x3x3", "conv3x3x3 depthwise", "conv1x3x3", "linear"}
    assert groups["conv1x1x1"]["activation"] == {"int4 per_voxel dynamic"}
    assert "eq. 3" in summary.rows[1].realizability.reason
    record = summary.records()[0]
    assert record["weight"] == "int4 per_channel static/minmax" and record["realizability"] == "integer-kernel"
