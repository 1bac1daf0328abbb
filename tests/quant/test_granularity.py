"""Granularities: scale shapes and values by hand, eq. 4 against an unfold-based reference."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mqb.quant import QuantRecipe, QuantSpec, calibrate, fake_quantize, quant_scale, quantize


def test_per_voxel_scales_by_hand():
    # x: N=1, C=3, D=1, H=1, W=2; voxel 0 has channels (1.5, -7, 2.5), voxel 1 has (0.5, 0.75, -3.5)
    x = torch.tensor([[1.5, 0.5], [-7.0, 0.75], [2.5, -3.5]]).reshape(1, 3, 1, 1, 2)
    scale = quant_scale(x, bits=4, granularity="per_voxel")
    assert scale.shape == (1, 1, 1, 1, 2)
    assert scale.flatten().tolist() == [1.0, 0.5]  # 7 / 7 and 3.5 / 7
    out = fake_quantize(x, bits=4, granularity="per_voxel")
    # voxel 0 (scale 1): 1.5 -> 2, 2.5 -> 2 (ties to even), -7 -> -7
    # voxel 1 (scale 0.5): 0.5 -> 1 -> 0.5, 0.75 -> 1.5 -> 2 -> 1.0, -3.5 -> -7 -> -3.5
    expected = torch.tensor([[2.0, 0.5], [-7.0, 1.0], [2.0, -3.5]]).reshape(1, 3, 1, 1, 2)
    assert torch.equal(out, expected)


def test_per_token_and_per_channel_shapes():
    x = torch.randn(2, 5, 8)
    assert quant_scale(x, granularity="per_token").shape == (2, 5, 1)
    assert quant_scale(x, granularity="per_channel", axis=-1).shape == (1, 1, 8)
    assert quant_scale(x, granularity="per_tensor").shape == (1, 1, 1)


def test_per_group_blocks_along_axis_with_padding():
    x = torch.arange(1.0, 11.0).reshape(1, 10)  # groups of 4 along the last axis: [1..4], [5..8], [9, 10]
    out = fake_quantize(x, bits=4, granularity="per_group", group_size=4)
    expected = []
    for block in ([1.0, 2, 3, 4], [5.0, 6, 7, 8], [9.0, 10]):
        b = torch.tensor(block)
        s = b.abs().max() / 7
        expected.append(torch.clamp(torch.round(b / s), -7, 7) * s)
    torch.testing.assert_close(out, torch.cat(expected).reshape(1, 10))
    # along axis 1 of a (N, C, D) tensor: groups of channels per position
    y = torch.randn(2, 6, 3)
    torch.testing.assert_close(
        fake_quantize(y, bits=8, granularity="per_group", group_size=3, axis=1),
        fake_quantize(y.transpose(1, 2), bits=8, granularity="per_group", group_size=3).transpose(1, 2),
    )


def _unfold3d(x: torch.Tensor, k: int, pad: int) -> torch.Tensor:
    """(N, C, D, H, W) -> (N, C, D', H', W', k, k, k) patches (stride 1)."""
    xp = F.pad(x, (pad,) * 6)
    return xp.unfold(2, k, 1).unfold(3, k, 1).unfold(4, k, 1)


@pytest.mark.parametrize("bits", [4, 8])
def test_per_voxel_conv_equals_eq4_with_per_kernel_offset_scales(bits):
    torch.manual_seed(0)
    conv = nn.Conv3d(5, 4, kernel_size=3, padding=1, bias=False)
    x = torch.randn(1, 5, 4, 5, 3) * (1 + 5 * torch.rand(1, 1, 4, 5, 3))
    model = nn.Sequential(conv)
    w_q = fake_quantize(conv.weight.detach(), bits=bits, granularity="per_channel", axis=0)
    quantize(model, QuantRecipe(weight=QuantSpec(bits=bits), activation=QuantSpec(bits=bits), granularity="per_voxel"))
    with torch.no_grad():
        ours = model(x)
    # eq. 4: Y_o = sum_k S_k^X * sum_i Xq_{i,k} W_{i,o,k}, S_k^X = max_i |X_{i,k}| / qmax for the voxel under offset k
    patches = _unfold3d(x, 3, 1)  # N, C, D, H, W, kd, kh, kw
    qmax = 2 ** (bits - 1) - 1
    s = patches.abs().amax(dim=1, keepdim=True) / qmax
    s = torch.where(s > 0, s, torch.ones_like(s))
    xq = torch.clamp(torch.round(patches * (1 / s)), -qmax, qmax)
    ref = torch.einsum("ncdhwxyz,ocxyz->nodhw", xq * s, w_q)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_static_per_channel_activation_uses_calibrated_range():
    conv = nn.Sequential(nn.Conv3d(3, 2, 1, bias=False))
    quantize(conv, QuantRecipe(weight=None, activation=QuantSpec(bits=8), granularity="per_channel"))
    calib = torch.zeros(1, 3, 2, 2, 2)
    calib[0, :, 0, 0, 0] = torch.tensor([1.0, 2.0, 4.0])
    calibrate(conv, [calib])
    amax = conv[0].input_quantizer.amax
    assert amax.shape == (3, 1, 1, 1) and amax.flatten().tolist() == [1.0, 2.0, 4.0]
    # values beyond the calibrated range are clipped
    x = torch.full((1, 3, 1, 1, 1), 10.0)
    with torch.no_grad():
        xq = conv[0].input_quantizer(x)
    assert xq.flatten().tolist() == [1.0, 2.0, 4.0]
