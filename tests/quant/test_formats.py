"""Simulated formats: FP8 E4M3 against torch's float8 dtype, FP4 E2M1 against its hand-enumerated grid,
MX block scales (power of two, E8M0) and NVFP4 (E4M3 block scale) by hand."""

import itertools

import pytest
import torch

from mqb.quant import fake_quantize
from mqb.quant.formats import E2M1, E4M3, e8m0_block_scale, round_minifloat


def test_e4m3_rounding_matches_torch_float8():
    x = torch.cat([torch.randn(20000) * s for s in (1e-3, 0.1, 1, 30, 300)])
    x = torch.clamp(x, -448, 448)
    ref = x.to(torch.float8_e4m3fn).to(torch.float32)
    assert torch.equal(round_minifloat(x, E4M3), ref)


def test_e4m3_saturates():
    assert round_minifloat(torch.tensor([1e6, -500.0]), E4M3).tolist() == [448.0, -448.0]


def _e2m1_grid() -> list[float]:
    values = set()
    for e, m in itertools.product(range(4), range(2)):  # bias 1; e = 0 is subnormal (0.m * 2^0)
        values.add((m / 2) if e == 0 else (1 + m / 2) * 2 ** (e - 1))
    return sorted(values)


def test_e2m1_grid_and_round_to_nearest_even():
    grid = _e2m1_grid()
    assert grid == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    x = torch.linspace(-7, 7, 2801)
    out = round_minifloat(x, E2M1)
    g = torch.tensor(grid)
    for v, q in zip(x.tolist(), out.tolist(), strict=True):
        dist = (g - abs(v)).abs()
        best = g[dist == dist.min()]
        # ties go to the value with an even mantissa bit (0, 1, 2, 4, 6 ... i.e. index even in the grid)
        choice = best[0] if len(best) == 1 else [b for b in best if grid.index(float(b)) % 2 == 0][0]
        assert abs(q) == pytest.approx(float(min(choice, 6.0))) and (q == 0 or (q > 0) == (v > 0))


def test_e8m0_block_scale_is_power_of_two():
    amax = torch.tensor([6.0, 7.9, 8.0, 0.1, 0.0])
    # MXFP4: emax(E2M1) = 2 -> scale = 2^(floor(log2 amax) - 2)
    assert e8m0_block_scale(amax, 2).tolist() == [1.0, 1.0, 2.0, 2.0**-6, 1.0]


def test_mxfp4_block_by_hand():
    block = torch.zeros(32)
    block[:4] = torch.tensor([7.0, 1.3, -0.2, 3.1])
    out = fake_quantize(block.reshape(1, 32), format="mxfp4").flatten()
    # amax 7 -> shared scale 2^(2-2) = 1; elements rounded on the E2M1 grid, 7 saturates to 6
    assert out[:4].tolist() == [6.0, 1.5, -0.0, 3.0]
    assert torch.all(out[4:] == 0)


def test_mxint8_and_mxfp8_block_error_is_small():
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    for fmt, tol in (("mxint8", 0.01), ("mxfp8", 0.05)):
        rel = (fake_quantize(x, format=fmt) - x).norm() / x.norm()
        assert rel < tol, fmt


def test_nvfp4_by_hand():
    x = torch.zeros(1, 32)
    x[0, :16] = torch.linspace(-3, 3, 16)
    x[0, 16] = 12.0
    out = fake_quantize(x, format="nvfp4")
    g = 12.0 / (6 * 448)  # per-tensor FP32 scale
    s0 = float(round_minifloat(torch.tensor(3.0 / 6 / g), E4M3)) * g  # block 0 scale (E4M3)
    expected0 = round_minifloat(x[0, :16] / s0, E2M1) * s0
    torch.testing.assert_close(out[0, :16], expected0)
    assert out[0, 16].item() == pytest.approx(12.0, rel=1e-6)


def test_fp8_per_channel_scales():
    x = torch.tensor([[1000.0, 1.0], [0.01, 0.02]])
    out = fake_quantize(x, format="fp8_e4m3", granularity="per_channel", axis=0)
    assert out[0, 0].item() == pytest.approx(1000.0)
    assert out[1, 1].item() == pytest.approx(0.02, rel=1e-6)
