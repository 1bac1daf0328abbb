"""VISTA3D as a C-class network: keys of the released bundle, VISTA3D's decision rule, quantization census."""

import json
from pathlib import Path

import pytest
import torch
from monai.networks.nets import vista3d132

from mqb.models.vista3d import VISTA3DAuto
from mqb.quant import QuantRecipe, calibrate, quantize, summarize

KEYS = Path(__file__).resolve().parent / "keys" / "vista3d.json"


@pytest.fixture(scope="module")
def net() -> VISTA3DAuto:
    torch.manual_seed(0)
    return VISTA3DAuto(in_channels=1, out_channels=4, class_ids=[1, 3, 4]).eval()


def test_keys_shapes_and_parameters_match_the_reference(net):
    reference = json.loads(KEYS.read_text())
    assert {k: list(v.shape) for k, v in net.state_dict().items()} == reference["keys"]
    assert sum(p.numel() for p in net.parameters()) == reference["params"] == 217_964_982


def test_background_channel_implements_vistas_sigmoid_rule(net):
    """argmax over [0, logits] == (largest logit's class if sigmoid(logit) > 0.5 else background)."""
    reference = vista3d132(encoder_embed_dim=48, in_channels=1).eval()
    reference.load_state_dict(net.state_dict())
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        ours = net(x)
        theirs = reference(x, class_vector=torch.tensor([[1], [3], [4]]), transpose=True)
    assert ours.shape == (1, 4, 32, 32, 32)
    torch.testing.assert_close(ours[:, 1:], theirs)
    best, index = theirs.max(dim=1)
    expected = torch.where(torch.sigmoid(best) > 0.5, index + 1, torch.zeros_like(index))
    assert torch.equal(ours.argmax(dim=1), expected)


def test_bad_class_ids_are_explained():
    with pytest.raises(ValueError, match="class_ids has 2 ids but out_channels=14 needs 13"):
        VISTA3DAuto(out_channels=14, class_ids=[1, 2])


@pytest.mark.parametrize("precision,scheme", [("w8a8", "per_channel"), ("w4a4", "adaptive")])
def test_quantization_covers_exactly_the_automatic_path(net, precision, scheme):
    """The point head and point decoder never run; they are neither quantized nor listed (fact sheet census)."""
    recipe = QuantRecipe.from_precision(precision, granularity=scheme)
    model = quantize(VISTA3DAuto(1, 4, class_ids=[1, 3, 4]).eval(), recipe)
    model.load_state_dict(net.state_dict())
    calibrate(model, [torch.randn(1, 1, 32, 32, 32)])
    rows = summarize(model).rows
    census: dict[str, int] = {}
    for row in rows:
        tag = row.info.kernel_tag or row.info.kind
        census[tag] = census.get(tag, 0) + 1
    assert census == {"conv3x3x3": 43, "conv_transpose3x3x3": 4, "conv1x1x1": 1, "linear": 2}
    assert not any(r.info.name.startswith(("point_head", "image_encoder.up_layers.")) for r in rows)
    with torch.no_grad():
        out = model(torch.randn(1, 1, 32, 32, 32))
    assert out.shape == (1, 4, 32, 32, 32) and torch.isfinite(out).all()
