"""Fake quantization against torch's reference ops (to the bit) and its defining properties (hypothesis)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mqb.quant import fake_quantize, quant_scale


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_per_tensor_matches_torch_reference_to_the_bit(bits):
    x = torch.randn(4, 7, 5, generator=torch.Generator().manual_seed(bits)) * 3
    qmax = 2 ** (bits - 1) - 1
    scale = float(x.abs().max() / qmax)
    ref = torch.fake_quantize_per_tensor_affine(x, scale, 0, -qmax, qmax)
    assert torch.equal(fake_quantize(x, bits=bits, granularity="per_tensor"), ref)


@pytest.mark.parametrize("bits,axis", [(8, 0), (4, 0), (8, 1), (4, 2)])
def test_per_channel_matches_torch_reference_to_the_bit(bits, axis):
    x = torch.randn(6, 5, 4, 3, generator=torch.Generator().manual_seed(7)) * torch.rand(6, 5, 4, 3) * 10
    qmax = 2 ** (bits - 1) - 1
    dims = [d for d in range(x.ndim) if d != axis]
    scale = x.abs().amax(dim=dims) / qmax
    zero = torch.zeros(x.shape[axis], dtype=torch.int32)
    ref = torch.fake_quantize_per_channel_affine(x, scale, zero, axis, -qmax, qmax)
    assert torch.equal(fake_quantize(x, bits=bits, granularity="per_channel", axis=axis), ref)


def test_asymmetric_matches_torch_reference():
    x = torch.rand(3, 50, generator=torch.Generator().manual_seed(1)) * 5 - 1  # range [-1, 4]
    lo, hi = float(x.min()), float(x.max())
    scale = torch.tensor((hi - lo) / 255)
    zero = int(torch.round(-torch.tensor(lo) / scale))
    ref = torch.fake_quantize_per_tensor_affine(x, float(scale), zero, 0, 255)
    out = fake_quantize(x, bits=8, symmetric=False)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def test_round_half_to_even():
    # amax 127 -> scale 1; 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, -2.5 -> -2
    x = torch.tensor([127.0, 0.5, 1.5, 2.5, -2.5, -0.5])
    assert fake_quantize(x, bits=8).tolist() == [127.0, 0.0, 2.0, 2.0, -2.0, -0.0]


def test_scale_is_paper_eq1():
    x = torch.tensor([[-3.0, 1.0], [0.5, 0.25]])
    assert quant_scale(x, bits=4).item() == pytest.approx(3.0 / 7)
    assert quant_scale(x, bits=8, granularity="per_channel", axis=0).flatten().tolist() == pytest.approx(
        [3.0 / 127, 0.5 / 127]
    )


def test_all_zero_group_stays_zero():
    x = torch.zeros(2, 3)
    x[1] = torch.tensor([1.0, -2.0, 0.5])
    out = fake_quantize(x, bits=4, granularity="per_channel", axis=0)
    assert torch.equal(out[0], torch.zeros(3)) and torch.isfinite(out).all()


values = st.lists(st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32), min_size=1, max_size=64)


@settings(max_examples=200, deadline=None)
@given(values, st.integers(2, 8))
def test_error_at_most_half_a_step(vals, bits):
    x = torch.tensor(vals)
    scale = float(quant_scale(x, bits=bits))
    err = (fake_quantize(x, bits=bits) - x).abs().max().item()
    assert err <= scale / 2 * (1 + 1e-5) + 1e-30


@settings(max_examples=200, deadline=None)
@given(values, st.integers(2, 8), st.sampled_from(["per_tensor", "per_token", "per_group"]))
def test_idempotent_sign_symmetric_and_zero_kept(vals, bits, granularity):
    x = torch.tensor(vals).reshape(1, -1)
    kw = {"group_size": 4} if granularity == "per_group" else {}
    once = fake_quantize(x, bits=bits, granularity=granularity, **kw)
    twice = fake_quantize(once, bits=bits, granularity=granularity, **kw)
    step = float(quant_scale(x, bits=bits))
    torch.testing.assert_close(twice, once, rtol=1e-5, atol=1e-6 * max(step, 1e-30))
    assert torch.equal(fake_quantize(-x, bits=bits, granularity=granularity, **kw), -once)
    assert torch.all(once[x == 0] == 0)


def test_autograd_path_gives_identical_values():
    x = torch.randn(3, 40, generator=torch.Generator().manual_seed(5))
    plain = fake_quantize(x, bits=4, granularity="per_channel", axis=0)
    tracked = fake_quantize(x.clone().requires_grad_(True), bits=4, granularity="per_channel", axis=0)
    assert torch.equal(plain, tracked.detach())
