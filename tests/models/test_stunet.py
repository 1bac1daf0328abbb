"""STU-Net S/B/L/H: exact parameter counts, reference state-dict keys, forward, Hydra configs, quantization.

Large sizes are only built on the meta device (no memory, no init cost).
"""

import copy
import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from mqb.checkpoints import load_weights
from mqb.config import CONF_DIR, register_configs
from mqb.models.stunet import SIZES, STUNet, stunet
from mqb.quant import QuantRecipe, calibrate, quantize, summarize

register_configs()
KEYS = Path(__file__).resolve().parent / "keys"

# Measured with the reference class (shared/reference/architectures-cnn.md, section 2): out=14 (BTCV) and
# out=105 (TotalSegmentator, 104 classes + background; equal to the README / paper figures).
PARAMS = {
    "S": (14_551_350, 14_596_941),
    "B": (58_171_942, 58_262_669),
    "L": (440_121_606, 440_302_605),
    "H": (1_457_054_950, 1_457_326_221),
}
SHAPE = (1, 1, 16, 32, 32)  # divisible by the TotalSegmentator strides' products 16 x 16 x 32


def _count(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("size", list(PARAMS))
@pytest.mark.parametrize("out,column", [(14, 0), (105, 1)])
def test_parameter_count(size, out, column):
    with torch.device("meta"):
        net = stunet(size, 1, out)
    assert _count(net) == PARAMS[size][column]


@pytest.mark.parametrize("size", list(PARAMS))
def test_state_dict_keys_and_shapes_equal_reference(size):
    ref = json.loads((KEYS / f"stunet_{size.lower()}.json").read_text())
    with torch.device("meta"):
        net = STUNet(ref["in_channels"], ref["out_channels"], *SIZES[size])
    assert {k: list(v.shape) for k, v in net.state_dict().items()} == ref["keys"]
    assert _count(net) == ref["params"]


def _compose(name: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("eval", overrides=[f"model={name}", "dataset=btcv"])


@pytest.mark.parametrize("size", list(PARAMS))
def test_hydra_config_instantiates(size):
    cfg = _compose(f"stunet_{size.lower()}")
    assert cfg.model.name == f"stunet_{size.lower()}" and cfg.model.net.out_channels == 14
    with torch.device("meta"):
        net = instantiate(cfg.model.net)
    assert isinstance(net, STUNet) and _count(net) == PARAMS[size][0]
    assert net.pool_op_kernel_sizes == ((2, 2, 2),) * 4 + ((1, 1, 2),)
    assert net.conv_kernel_sizes == ((3, 3, 3),) * 6 and not net.deep_supervision


@pytest.fixture(scope="module")
def small() -> tuple[STUNet, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    net = stunet("S", 1, 14).eval()
    x = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = net(x)
    return net, x, ref


def test_forward_shape_and_deep_supervision(small):
    net, x, ref = small
    assert isinstance(ref, torch.Tensor) and ref.shape == (1, 14, 16, 32, 32) and torch.isfinite(ref).all()
    ds = copy.deepcopy(net)
    ds.deep_supervision = True
    with torch.no_grad():
        outs = ds(x)
    # full resolution first, then each coarser decoder level (strides reversed: [1,1,2] is undone first)
    assert [tuple(o.shape[2:]) for o in outs] == [(16, 32, 32), (8, 16, 16), (4, 8, 8), (2, 4, 4), (1, 2, 2)]
    assert torch.equal(outs[0], ref)


def test_checkpoint_loads_strictly_in_nnunet_layouts(small, tmp_path):
    net, _, _ = small
    state = net.state_dict()
    v1, v2 = tmp_path / "stunet_v1.model", tmp_path / "checkpoint_final.pth"
    torch.save({"state_dict": state, "epoch": 4000}, v1)  # nnU-Net v1 *.model layout
    torch.save({"network_weights": state, "current_epoch": 1000}, v2)  # nnU-Net v2 layout
    for path in (v1, v2):
        other = stunet("S", 1, 14)
        load_weights(other, path)
        assert all(torch.equal(v, state[k]) for k, v in other.state_dict().items())


def test_invalid_arguments_and_input():
    with pytest.raises(ValueError, match="pool_op_kernel_sizes has 6 entries; 6 stages need 5"):
        STUNet(1, 14, *SIZES["S"], pool_op_kernel_sizes=[[1, 1, 1]] + [[2, 2, 2]] * 5)
    with pytest.raises(ValueError, match="depth=.* and dims=.* are invalid"):
        STUNet(1, 14, depth=[1] * 5, dims=SIZES["S"][1])
    with pytest.raises(ValueError, match="size='XL' is invalid"):
        stunet("XL")
    tiny = STUNet(1, 2, [1, 1, 1], [4, 8, 8], [[2, 2, 2], [2, 2, 2]], [[3, 3, 3]] * 3).eval()
    with pytest.raises(ValueError, match="divisible by the product of the strides"), torch.no_grad():
        tiny(torch.randn(1, 1, 6, 8, 8))


def test_quantize_w8a8_and_w4a4(small):
    """W8A8 per-channel stays close to FP32; adaptive W4A4 stays finite; the layer census is STU-Net's.

    Bound: round-to-nearest at 8 bits adds ~1% relative noise per tensor (step = max|x|/127 with max|x| ~ 4-5
    std for these Gaussian-like tensors, noise = step/sqrt(12) ~ 0.01 std), accumulated over the ~28 convs of
    the longest path of this untrained net: ~sqrt(28) * 1% ~ 5%. Measured 0.046 relative L2 (0.046-0.049 over 3
    seeds; weight-only W8 alone: 0.033, 0.014 at 32^3 where the bottleneck has 4 voxels instead of 2 for its
    InstanceNorm); adaptive W4A4: 0.46. Calibrated on the evaluated input, as tests/quant/test_api.py does.
    """
    net, x, ref = small
    calib = [x]
    errors = {}
    for precision, granularity in (("w8a8", "per_channel"), ("w4a4", "adaptive")):
        model = quantize(copy.deepcopy(net), QuantRecipe.from_precision(precision, granularity=granularity))
        calibrate(model, calib)
        with torch.no_grad():
            out = model(x)
        assert out.shape == ref.shape and torch.isfinite(out).all()
        errors[precision] = _rel(out, ref)
        tags = [row.info.kernel_tag for row in summarize(model).rows]
        # 3x3x3: 2 per block (22); 1x1x1: 6 + 5 shortcuts, 5 upsample projections, 5 heads (21)
        assert {t: tags.count(t) for t in set(tags)} == {"conv3x3x3": 22, "conv1x1x1": 21}
    assert 0 < errors["w8a8"] < 0.1, errors
    assert errors["w4a4"] > 3 * errors["w8a8"], errors
