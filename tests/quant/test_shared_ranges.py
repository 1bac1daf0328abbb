"""One range per tensor: the readers of a tensor (and of concatenations containing it) are found by tracing, and
get the largest of their calibrated ranges, recomputed here from the float network's activations."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from mqb.quant import LayerRule, QuantRecipe, calibrate, quantize
from mqb.quant.methods import SharedInputRanges, shared_input_groups
from tests.deploy import SHAPE, ResidualConcat, volume


def _calib() -> list[torch.Tensor]:
    return [volume(100 + i, (2, *SHAPE[1:])) for i in range(2)]


def _quantized(net: nn.Module, rules: tuple[LayerRule, ...] = ()) -> nn.Module:
    quantize(net, QuantRecipe.from_precision("w8a8", scheme="deploy", rules=rules))
    calibrate(net, _calib())
    return net


def _float_net() -> nn.Module:
    torch.manual_seed(0)
    return ResidualConcat().eval()


def test_groups_follow_tensors_through_concatenation() -> None:
    net = _quantized(_float_net())
    # conv and shortcut read `skip`; head reads cat(skip, y); stem reads the image alone
    assert shared_input_groups(net, _calib()[0]) == [["conv", "shortcut", "head"]]


def test_group_gets_the_largest_range_of_its_readers() -> None:
    float_net = _float_net()
    net = _quantized(copy.deepcopy(float_net))
    with torch.no_grad():  # the calibrated ranges, by hand: max |skip| and max |cat(skip, y)| over the batches
        skips = [torch.relu(float_net.stem(x)) for x in _calib()]
        ys = [torch.relu(float_net.conv(s) + float_net.shortcut(s)) for s in skips]
        amax_skip = max(float(s.abs().max()) for s in skips)
        amax_cat = max(float(torch.cat([s, y], 1).abs().max()) for s, y in zip(skips, ys, strict=True))
    assert float(net.conv.input_quantizer.amax) == pytest.approx(amax_skip, rel=1e-6)
    assert float(net.head.input_quantizer.amax) == pytest.approx(amax_cat, rel=1e-6)
    stem_before = float(net.stem.input_quantizer.amax)
    report = SharedInputRanges().apply(net, batches=_calib)
    assert sorted(report.applied) == ["conv", "head", "shortcut"] and report.skipped == {}
    for name in ("conv", "shortcut", "head"):
        assert float(getattr(net, name).input_quantizer.amax) == pytest.approx(max(amax_skip, amax_cat), rel=1e-6)
    assert float(net.stem.input_quantizer.amax) == stem_before


def test_quantizers_without_a_shareable_range_are_left_alone_and_listed() -> None:
    net = _quantized(_float_net(), rules=(LayerRule("name:shortcut", scheme="per_channel"),))
    before = net.shortcut.input_quantizer.amax.clone()
    report = SharedInputRanges().apply(net, batches=_calib)
    assert "per_channel" in report.skipped["shortcut"] or "per-channel" in report.skipped["shortcut"]
    assert torch.equal(net.shortcut.input_quantizer.amax, before)
    assert sorted(report.applied) == ["conv", "head"]


def test_export_after_sharing_quantizes_the_skip_tensor_once(tmp_path) -> None:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from mqb.deploy.export import export_onnx

    net = _quantized(_float_net())
    SharedInputRanges().apply(net, batches=_calib)
    result = export_onnx(net, volume(0), tmp_path / "shared.onnx")
    graph = onnx.load(str(result.path)).graph
    producer = {o: n for n in graph.node for o in n.output}
    # the skip tensor is the ReLU output; every chain reading it is now one chain
    relu = next(n for n in graph.node if n.op_type == "Relu")
    readers = [n for n in graph.node if relu.output[0] in n.input]
    assert len(readers) == 1 and readers[0].op_type in ("Clip", "QuantizeLinear")
    concat = next(n for n in graph.node if n.op_type == "Concat")
    assert all(producer[i].op_type == "DequantizeLinear" for i in concat.input)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    x = volume(7, (2, *SHAPE[1:]))
    out = ort.InferenceSession(str(result.path), options).run(None, {"image": x.numpy()})[0]
    with torch.no_grad():
        reference = net(x).numpy()
    step = np.abs(reference).max() / 127
    assert (np.abs(out - reference) <= step).mean() >= 0.99


@pytest.mark.parametrize(
    ("overrides", "v1", "v2"),
    [
        (["experiment=int8_deploy"], "a6f8a3881792121b", "5cf5be296250e868"),
        (["precision=w8a8", "method.output_quantizers=true"], "1cc2f30cbaa43966", "5e1da8b849b324eb"),
        (["precision=w8a8", "calibration.tensor_quantizers=true"], "1cc2f30cbaa43966", "5e1da8b849b324eb"),
        (
            ["precision=w8a8", "method.shared_ranges=true", "method.output_quantizers=true"],
            "30dc700cb0f4849e",
            "675309129e0940b4",
        ),
        (["precision=w8a8", "method.shared_ranges=true"], "793e08ff4d76d033", "793e08ff4d76d033"),
    ],
)
def test_output_quantizer_placement_v2_has_its_own_record_ids(overrides: list[str], v1: str, v2: str) -> None:
    """Output quantizers after in-place writers compute something else than placement v1 did (the conv read
    Q(LeakyReLU(Q(x)))): records with ``method.output_quantizers=true`` hash its version
    (``mqb.results.OPTION_VERSIONS``), so a v1 record is not taken for v2; shared ranges alone are unchanged."""
    from mqb.config import compose_eval
    from mqb.results import config_id

    assert config_id(compose_eval(overrides)) == v2
