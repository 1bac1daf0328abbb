"""Calibration observers against direct computations on the same data."""

import pytest
import torch
from torch import nn

from mqb.quant import QuantRecipe, QuantSpec, calibrate, quantize
from mqb.quant.fake_quant import fake_quant_symmetric
from mqb.quant.observers import EntropyObserver, MinMaxObserver, MSEObserver, PercentileObserver


def _int8(values, amax):
    return fake_quant_symmetric(values, amax, QuantSpec(bits=8))


def test_minmax_over_batches():
    obs = MinMaxObserver()
    obs.update(torch.tensor([[1.0, -3.0], [0.5, 0.2]]))
    obs.update(torch.tensor([[2.0, 0.0], [-0.7, 0.1]]))
    out = obs.compute()
    assert out["amax"].tolist() == pytest.approx([3.0, 0.7]) and out["lo"].tolist() == pytest.approx([-3.0, -0.7])
    assert out["hi"].tolist() == pytest.approx([2.0, 0.5])


def test_percentile_matches_torch_quantile_across_batches_in_any_order():
    g = torch.Generator().manual_seed(0)
    small = torch.randn(1, 20000, generator=g)
    large = torch.randn(1, 20000, generator=g) * 8  # forces the histogram range to grow (bin merging)
    expected = torch.quantile(torch.cat([small, large], 1).abs().flatten(), 0.99).item()
    for order in ((small, large), (large, small)):
        obs = PercentileObserver(99.0)
        for batch in order:
            obs.update(batch)
        amax = obs.compute()["amax"].item()
        assert amax == pytest.approx(expected, rel=0.02)


def test_histogram_growth_preserves_counts():
    obs = PercentileObserver(100.0, num_bins=64)
    obs.update(torch.full((2, 10), 0.5))
    obs.update(torch.full((2, 30), 100.0))
    assert obs.hist.sum(1).tolist() == [40.0, 40.0]
    assert obs.compute()["amax"].tolist() == [100.0, 100.0]


def test_mse_clips_outliers_and_beats_minmax_on_the_data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 50000, generator=g)
    x[0, :5] = 60.0  # a few extreme outliers
    obs = MSEObserver(_int8)
    obs.update(x)
    amax_mse = obs.compute()["amax"]
    assert amax_mse.item() < 60.0
    direct = lambda a: ((_int8(x, a) - x) ** 2).mean().item()  # noqa: E731
    assert direct(amax_mse) < direct(torch.tensor([60.0]))


def test_entropy_clips_long_tail():
    torch.manual_seed(2)
    x = torch.distributions.Laplace(0.0, 1.0).sample((1, 100000))
    x[0, 0] = 40.0
    obs = EntropyObserver(levels=128)
    obs.update(x)
    amax = obs.compute()["amax"].item()
    assert 3.0 < amax < 40.0


@pytest.mark.parametrize("observer", ["minmax", "percentile", "mse", "entropy"])
def test_observers_plug_into_calibration(observer):
    model = nn.Sequential(nn.Conv3d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 2, 1))
    spec = QuantSpec(bits=8, observer=observer)
    quantize(model, QuantRecipe(weight=spec, activation=spec, scheme="per_tensor"))
    x = torch.randn(2, 4, 6, 6, 6)
    calibrate(model, [x[:1], x[1:]])
    amax = model[0].input_quantizer.amax
    assert amax.shape == () and 0 < amax.item() <= x.abs().max().item()
    assert model[2].input_quantizer.amax.shape == ()
    with torch.no_grad():
        out = model(x)
    assert torch.isfinite(out).all() and out.shape == (2, 2, 6, 6, 6)
