"""Activation statistics: kurtosis definitions, the paper's within- vs across-channel finding, the collector."""

from __future__ import annotations

import csv
import math

import pytest
import scipy.stats
import torch
from safetensors.torch import load_file
from torch import nn

from mqb.analysis.activation_stats import (
    CSV_COLUMNS,
    across_channel_kurtosis,
    activation_report,
    apply_smoothing_preview,
    channel_absmax,
    channel_imbalance,
    collect_activation_stats,
    kurtosis,
    log10_summary,
    outlier_map,
    plot_kurtosis_scatter,
    plot_outlier_heatmap,
    save_activation_stats,
    select_voxels,
    smoothing_factors,
    weight_absmax_per_input_channel,
    within_channel_kurtosis,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _kurtosis_sd(n: int, var: float, mu4: float, mu6: float, mu8: float) -> float:
    """Asymptotic standard deviation of the sample kurtosis m4/m2² of a symmetric distribution (delta method)."""
    v = (mu8 - mu4**2) / var**4 - 4 * mu4 * (mu6 - var * mu4) / var**5 + 4 * mu4**2 * (mu4 - var**2) / var**6
    return math.sqrt(v / n)


# ---------------------------------------------------------------------------------------------------------------
# kurtosis


def test_kurtosis_matches_scipy_population_kurtosis():
    x = torch.randn(7, 50, 3, generator=_gen(), dtype=torch.float64) ** 3 + 0.5
    for dim in (0, 1, 2):
        expected = scipy.stats.kurtosis(x.numpy(), axis=dim, fisher=False, bias=True)
        torch.testing.assert_close(kurtosis(x, dim=dim), torch.from_numpy(expected).double(), rtol=1e-9, atol=0)
    whole = scipy.stats.kurtosis(x.numpy().ravel(), fisher=False, bias=True)
    assert float(kurtosis(x)) == pytest.approx(whole, rel=1e-9)
    assert kurtosis(x, dim=1, keepdim=True).shape == (7, 1, 3)


def test_kurtosis_of_normal_and_uniform_samples_is_close_to_the_population_value():
    n = 200_000
    normal = torch.randn(n, generator=_gen(1), dtype=torch.float64)
    sd = _kurtosis_sd(n, 1.0, 3.0, 15.0, 105.0)  # sqrt(24 / n)
    assert sd == pytest.approx(math.sqrt(24 / n))
    assert abs(float(kurtosis(normal)) - 3.0) < 6 * sd
    uniform = torch.rand(n, generator=_gen(2), dtype=torch.float64) * 2 - 1  # moments of U(-1, 1): 1/(k+1)
    sd = _kurtosis_sd(n, 1 / 3, 1 / 5, 1 / 7, 1 / 9)
    assert abs(float(kurtosis(uniform)) - 1.8) < 6 * sd


def test_kurtosis_is_nan_for_constant_input_and_summaries_skip_it():
    k = kurtosis(torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 2.0]]), dim=1)
    assert math.isnan(k[0]) and k[1] == pytest.approx(1.5)
    s = log10_summary(k, threshold=1.0)
    assert s["median"] == pytest.approx(math.log10(1.5)) and s["frac_above"] == 1.0
    assert math.isnan(log10_summary(torch.tensor([math.nan]))["median"])


def test_within_and_across_channel_kurtosis_on_constructed_tensors():
    # channel 0 heavy-tailed over voxels, channel 1 two-valued (kurtosis 1); voxels laid out [B=1, C=2, 2, 2, 2]
    x = torch.zeros(1, 2, 2, 2, 2, dtype=torch.float64)
    x[0, 0].view(-1)[:] = torch.tensor([0, 0, 0, 0, 0, 0, 0, 8.0])
    x[0, 1].view(-1)[:] = torch.tensor([1, -1, 1, -1, 1, -1, 1, -1.0])
    within = within_channel_kurtosis(x)
    assert within.shape == (2,)
    expected0 = scipy.stats.kurtosis([0, 0, 0, 0, 0, 0, 0, 8.0], fisher=False)
    torch.testing.assert_close(within, torch.tensor([expected0, 1.0], dtype=torch.float64))
    across = across_channel_kurtosis(x)
    assert across.shape == (8,)  # two channels: kurtosis 1 wherever they differ
    torch.testing.assert_close(across, torch.ones(8, dtype=torch.float64))
    # the same activation as tokens [B, N, C] with the channel last gives the same numbers
    tokens = x.flatten(2).transpose(1, 2)
    torch.testing.assert_close(within_channel_kurtosis(tokens, channel_axis=-1), within)
    torch.testing.assert_close(across_channel_kurtosis(tokens, channel_axis=-1), across)


# ---------------------------------------------------------------------------------------------------------------
# the paper's finding as a property


def _medical_activation(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """[1, 32, 8, 8, 8] noise with 4 voxels large in every channel, with uneven per-channel strength."""
    g = _gen(seed)
    c = 32
    x = torch.randn(1, c, 8, 8, 8, generator=g, dtype=torch.float64)
    hot = torch.tensor([17, 200, 333, 480])
    strength = 1.08 ** torch.arange(c, dtype=torch.float64)  # channel c's outliers are 1.08^c times stronger
    flat = x.view(1, c, -1)
    flat[0][:, hot] = (20 * strength[:, None]) * (1 + torch.rand(c, len(hot), generator=g, dtype=torch.float64))
    return x, hot


def test_spatially_localized_outliers_give_high_within_and_low_across_channel_kurtosis():
    x, hot = _medical_activation()
    within = within_channel_kurtosis(x)
    across = across_channel_kurtosis(x)
    assert float(within.median()) > 30  # 4 outliers among 512 voxels in every channel
    assert float(across[hot].max()) < 6  # at the outlier voxels every channel is large: no tail over channels
    assert float(within.median()) > 10 * float(across[hot].max())


def test_smoothing_lowers_channel_imbalance_but_not_within_channel_kurtosis():
    x, _ = _medical_activation(1)
    weight = torch.randn(16, 32, 3, 3, 3, generator=_gen(3), dtype=torch.float64)
    conv = nn.Conv3d(32, 16, 3).double()
    with torch.no_grad():
        conv.weight.copy_(weight)
    w_absmax = weight_absmax_per_input_channel(conv)
    torch.testing.assert_close(w_absmax, weight.abs().amax(dim=(0, 2, 3, 4)))
    s = smoothing_factors(channel_absmax(x), w_absmax, alpha=0.5)
    smoothed = apply_smoothing_preview(x, s)
    # the layer output is unchanged when the weights take the factors: conv(x / s, W * s) == conv(x, W)
    scaled = nn.Conv3d(32, 16, 3).double()
    with torch.no_grad():
        scaled.weight.copy_(weight * s.view(1, -1, 1, 1, 1))
        scaled.bias.copy_(conv.bias)
        torch.testing.assert_close(scaled(smoothed), conv(x))
    before, after = channel_imbalance(channel_absmax(x)), channel_imbalance(channel_absmax(smoothed))
    assert before > 2.5 and after < 0.75 * before
    # kurtosis is invariant to a per-channel scale: smoothing cannot remove within-channel outliers
    torch.testing.assert_close(within_channel_kurtosis(smoothed), within_channel_kurtosis(x), rtol=1e-10, atol=0)


def test_llm_style_persistent_outlier_channels_give_high_across_channel_kurtosis():
    g = _gen(4)
    x = torch.randn(2, 128, 64, generator=g, dtype=torch.float64)  # [B, tokens, hidden]
    x[..., [5, 40]] += 60.0  # two channels dominate at every token
    across = across_channel_kurtosis(x, channel_axis=-1)
    within = within_channel_kurtosis(x, channel_axis=-1)
    assert float(across.median()) > 15  # 2 of 64 channels carry the outliers at each token
    assert float(within[[5, 40]].max()) < 4  # a constant offset is no tail within the channel
    assert float(across.median()) > 3 * float(within.median())


def test_smoothing_preview_divides_channels():
    # the factors' formula is tested with the method (tests/quant/test_methods.py)
    torch.testing.assert_close(
        apply_smoothing_preview(torch.ones(1, 2, 3), torch.tensor([2.0, 4.0]))[0, :, 0], torch.tensor([0.5, 0.25])
    )


def test_weight_absmax_per_input_channel_for_grouped_conv_transpose_and_linear():
    conv = nn.Conv3d(4, 6, 1, groups=2)
    w = conv.weight.detach().double().abs()  # (6, 2, 1, 1, 1): out 0-2 read in 0-1, out 3-5 read in 2-3
    expected = torch.cat([w[:3, :, 0, 0, 0].amax(0), w[3:, :, 0, 0, 0].amax(0)])
    torch.testing.assert_close(weight_absmax_per_input_channel(conv), expected)
    tconv = nn.ConvTranspose3d(3, 5, 2)
    torch.testing.assert_close(
        weight_absmax_per_input_channel(tconv), tconv.weight.detach().double().abs().flatten(1).amax(1)
    )
    lin = nn.Linear(3, 7)
    torch.testing.assert_close(weight_absmax_per_input_channel(lin), lin.weight.detach().double().abs().amax(0))


def test_outlier_map_keeps_the_largest_voxels_and_is_deterministic():
    x, hot = _medical_activation()
    m = outlier_map(x, max_voxels=64)
    assert m.shape == (64, 32) and bool((m >= 0).all())
    idx = select_voxels(x.abs().amax(dim=1).reshape(-1), 64)
    assert set(hot.tolist()) <= set(idx.tolist()) and bool((idx[1:] > idx[:-1]).all())
    torch.testing.assert_close(m, outlier_map(x, max_voxels=64))
    assert outlier_map(x, max_voxels=10_000).shape == (512, 32)  # everything when it fits


# ---------------------------------------------------------------------------------------------------------------
# the collector


class _ToTokens(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)  # [B, C, D, H, W] -> [B, DHW, C]


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv3d(2, 8, 3, padding=1), nn.ReLU(), nn.Conv3d(8, 8, 1), _ToTokens(), nn.Linear(8, 4)
    ).double()


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_collector_streaming_equals_one_pass_and_removes_its_hooks():
    net = _net()
    g = _gen(5)
    b1, b2 = torch.randn(2, 2, 4, 5, 6, generator=g).double(), torch.randn(3, 2, 4, 5, 6, generator=g).double()
    b1[0, :, 1, 2, 3] = 25.0  # a localized outlier
    streamed = collect_activation_stats(net, [b1, b2], max_voxels=100)
    assert _no_hooks(net) and net.training
    once = collect_activation_stats(net, [torch.cat([b1, b2])], max_voxels=100)
    assert list(streamed) == ["0", "2", "4"]
    assert [streamed[n].kind for n in streamed] == ["conv", "conv", "linear"]
    assert streamed["2"].kernel == "conv1x1x1" and streamed["4"].channel_axis == -1
    for name, a in streamed.items():
        b = once[name]
        assert a.count == b.count == 5 * 4 * 5 * 6 and a.channels == b.channels
        torch.testing.assert_close(a.within_kurtosis, b.within_kurtosis, rtol=1e-9, atol=0)
        torch.testing.assert_close(a.absmax, b.absmax, rtol=0, atol=0)
        assert a.voxel_stride == b.voxel_stride > 1 and a.voxel_index.numel() <= 100
        torch.testing.assert_close(a.voxel_index, b.voxel_index)
        torch.testing.assert_close(a.voxel_kurtosis, b.voxel_kurtosis, rtol=1e-12, atol=0, equal_nan=True)
        torch.testing.assert_close(a.voxel_hist, b.voxel_hist)
        sa, sb = a.summary(), b.summary()
        for key in CSV_COLUMNS:
            if isinstance(sa[key], float):
                assert sa[key] == pytest.approx(sb[key], rel=1e-9, nan_ok=True), key
            else:
                assert sa[key] == sb[key], key
    # the streamed statistics are those of the whole input, computed directly
    seen: dict[str, torch.Tensor] = {}
    hooks = [net[i].register_forward_pre_hook(lambda m, args, i=i: seen.setdefault(str(i), args[0])) for i in (0, 2)]
    with torch.no_grad():
        net(torch.cat([b1, b2]))
    for h in hooks:
        h.remove()
    across0 = across_channel_kurtosis(seen["0"])  # two channels: kurtosis 1, NaN where they are equal
    assert int(across0.isnan().sum()) == streamed["0"].voxels_nan == 1
    st, x = streamed["2"], seen["2"]
    torch.testing.assert_close(st.within_kurtosis, within_channel_kurtosis(x), rtol=1e-9, atol=0)
    torch.testing.assert_close(st.absmax, channel_absmax(x).double(), rtol=0, atol=0)
    across = across_channel_kurtosis(x)
    assert st.voxels_nan == int(across.isnan().sum())
    lg = across[~across.isnan()].log10()
    row = st.summary()
    assert row["across_log10_kurtosis_max"] == pytest.approx(float(lg.max()))
    assert row["across_log10_kurtosis_mean"] == pytest.approx(float(lg.mean()))
    assert row["across_frac_above_threshold"] == pytest.approx(float((lg > 1).double().mean()))
    torch.testing.assert_close(st.voxel_kurtosis, across[st.voxel_index], equal_nan=True)
    assert row["channel_imbalance"] == pytest.approx(channel_imbalance(channel_absmax(x)))


def test_collector_selects_layers_and_removes_hooks_on_error():
    net = _net()
    only = collect_activation_stats(net, [torch.randn(1, 2, 3, 3, 3).double()], layers=("conv1x1x1",))
    assert list(only) == ["2"]

    def boom(model: nn.Module, batch: torch.Tensor) -> None:
        model(batch)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        collect_activation_stats(net, [torch.randn(1, 2, 3, 3, 3).double()], forward=boom)
    assert _no_hooks(net)
    with pytest.raises(ValueError, match="match no"):
        collect_activation_stats(net, [torch.randn(1, 2, 3, 3, 3).double()], layers=("conv_transpose",))
    with pytest.raises(ValueError, match="empty"):
        collect_activation_stats(net, [])


# ---------------------------------------------------------------------------------------------------------------
# storage and figures


def test_save_and_report_write_csv_tensors_and_pngs(tmp_path):
    net = _net()
    batches = [torch.randn(2, 2, 4, 4, 4, generator=_gen(6)).double() for _ in range(2)]
    out = activation_report(net, batches, tmp_path / "report", max_voxels=50, plot_layers=1)
    assert out == tmp_path / "report"
    with open(out / "activation_stats.csv") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == CSV_COLUMNS and [r["name"] for r in rows] == ["0", "2", "4"]
    assert rows[1]["kernel"] == "conv1x1x1" and rows[2]["kind"] == "linear" and rows[0]["voxels_seen"] == "256"
    assert float(rows[0]["channel_imbalance"]) >= 1.0
    tensors = load_file(out / "activation_stats.safetensors")
    assert tensors["0/within_kurtosis"].shape == (2,) and tensors["4/channel_absmax"].shape == (8,)
    assert tensors["2/voxel_kurtosis"].numel() <= 50 and tensors["2/example"].shape == (50, 8)
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "kurtosis_scatter.png" in pngs and len([p for p in pngs if p.startswith("outliers_")]) == 1
    for name in pngs:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_plots_directly(tmp_path):
    x, _ = _medical_activation()
    s = smoothing_factors(channel_absmax(x), torch.ones(32))
    path = plot_outlier_heatmap(x, apply_smoothing_preview(x, s), tmp_path / "fig5.png", max_voxels=64)
    assert path.read_bytes()[:8] == PNG_MAGIC
    stats = collect_activation_stats(_net(), [torch.randn(1, 2, 3, 3, 3).double()])
    save_activation_stats(stats, tmp_path)
    assert plot_kurtosis_scatter(stats, tmp_path / "fig1b.png").read_bytes()[:8] == PNG_MAGIC
