"""PTQ methods: exact float equivalence, the formulas by hand, and the effect each one is meant to have."""

import math

import pytest
import scipy.linalg
import torch
from torch import nn

from mqb.quant import QuantRecipe, calibrate, collect_input_ranges, dequantize, quantize
from mqb.quant.layers import QuantLayer
from mqb.quant.methods import (
    GPTQ,
    BiasCorrection,
    HadamardRotation,
    LowRankSVD,
    SmoothQuant,
    apply_methods,
    block_hadamard,
    quantizers_disabled,
    smoothing_factors,
)
from mqb.quant.methods.svd import low_rank_part


class Mixed(nn.Module):
    """Every layer kind the methods must handle: dense k3, grouped, depthwise, pointwise, transposed, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Conv3d(2, 16, 3, padding=1)
        self.grouped = nn.Conv3d(16, 16, 3, padding=1, groups=4, bias=False)
        self.depthwise = nn.Conv3d(16, 16, (1, 3, 3), padding=(0, 1, 1), groups=16)
        self.pointwise = nn.Conv3d(16, 32, 1)
        self.up = nn.ConvTranspose3d(32, 8, 2, stride=2)
        self.head = nn.Linear(8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.dense(x))
        x = torch.relu(self.grouped(x))
        x = self.pointwise(self.depthwise(x))
        x = self.up(x)
        return self.head(x.movedim(1, -1))


def _data(n: int = 2, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(1, 2, 4, 6, 6, generator=g)
        x[:, 1] *= 20.0  # an outlier input channel
        out.append(x)
    return out


def _quantized(model: nn.Module, precision: str = "w4a4", scheme: str = "per_channel") -> nn.Module:
    return quantize(model, QuantRecipe.from_precision(precision, scheme=scheme))


METHODS = [
    [SmoothQuant(alpha=0.5)],
    [LowRankSVD(rank=4)],
    [HadamardRotation(block=32)],
    [SmoothQuant(alpha=0.5), LowRankSVD(rank=4)],
    [HadamardRotation(block=8), LowRankSVD(rank=2)],
]


@pytest.mark.parametrize("methods", METHODS, ids=lambda ms: "+".join(m.name for m in ms))
def test_methods_leave_the_float_model_unchanged(methods):
    torch.manual_seed(0)
    model = Mixed().eval()
    batches = _data()
    with torch.no_grad():
        reference = [model(x) for x in batches]
    ranges = collect_input_ranges(model, batches)
    _quantized(model)
    reports = apply_methods(model, methods, "transform", ranges=ranges)
    assert all(r.applied for r in reports)
    with quantizers_disabled(model), torch.no_grad():
        for x, ref in zip(batches, reference, strict=True):
            diff = (model(x) - ref).abs().max() / ref.abs().max()
            assert diff < 1e-4, f"{methods}: relative max diff {diff:.2e}"


def test_dequantize_restores_the_exact_float_weights():
    torch.manual_seed(0)
    model = Mixed().eval()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    ranges = collect_input_ranges(model, _data())
    _quantized(model)
    apply_methods(model, [SmoothQuant(), LowRankSVD(), HadamardRotation()], "transform", ranges=ranges)
    dequantize(model)
    assert not any(isinstance(m, QuantLayer) for m in model.modules())
    restored = model.state_dict()
    assert restored.keys() == original.keys()
    assert all(torch.equal(restored[k], original[k]) for k in original)


def test_smoothing_factors_by_hand():
    act = torch.tensor([16.0, 1.0, 0.0, 4.0])
    weight = torch.tensor([1.0, 4.0, 2.0, 0.0])
    s = smoothing_factors(act, weight, alpha=0.5)
    # s = sqrt(a) / sqrt(w); a dead channel (a = 0 or w = 0) keeps s = 1
    assert torch.allclose(s, torch.tensor([4.0, 0.5, 1.0, 1.0]))
    s1 = smoothing_factors(act[:2], weight[:2], alpha=1.0)
    assert torch.allclose(s1, torch.tensor([16.0, 1.0]))
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        SmoothQuant(alpha=1.5)


def test_smoothquant_balances_channel_ranges_of_the_quantized_input():
    """After smoothing, max|X_j / s_j| = max|X_j|^(1-α) · max|W_j|^(1-α): the outlier channel shrinks."""
    torch.manual_seed(0)
    model = Mixed().eval()
    batches = _data()
    ranges = collect_input_ranges(model, batches)
    _quantized(model)
    SmoothQuant(alpha=0.5, layers="name:dense").apply(model, ranges)
    seen = []
    model.dense.input_transform.register_forward_hook(lambda m, a, out: seen.append(out.abs().amax(dim=(0, 2, 3, 4))))
    with quantizers_disabled(model), torch.no_grad():
        model(batches[0])
    before = torch.maximum(ranges["dense"]["lo"].abs(), ranges["dense"]["hi"].abs())
    after = seen[0]
    assert (before.max() / before.min()) > 10 > (after.max() / after.min())


def test_smoothquant_helps_channel_outliers_at_w8a8_per_tensor():
    """LLM-style activations (one channel 50x larger everywhere): smoothing cuts the per-tensor W8A8 error."""
    torch.manual_seed(0)
    layer = nn.Linear(64, 64)
    x = torch.randn(256, 64)
    x[:, 3] *= 50
    with torch.no_grad():
        ref = layer(x)

    def error(methods):
        m = nn.Sequential(nn.Linear(64, 64)).eval()
        m[0].load_state_dict(layer.state_dict())
        ranges = collect_input_ranges(m, [x])
        quantize(m, QuantRecipe.from_precision("w8a8", scheme="per_tensor"))
        apply_methods(m, methods, "transform", ranges=ranges)
        calibrate(m, [x])
        with torch.no_grad():
            return ((m(x) - ref).norm() / ref.norm()).item()

    assert error([SmoothQuant(alpha=0.5)]) < 0.5 * error([])


def test_block_hadamard_is_orthonormal_and_matches_scipy():
    h32 = block_hadamard(32, 32)
    assert torch.allclose(h32, torch.from_numpy(scipy.linalg.hadamard(32)).double() / math.sqrt(32))
    h48 = block_hadamard(48, 32)  # 48 = 3 x 16
    assert torch.allclose(h48 @ h48.t(), torch.eye(48, dtype=torch.float64), atol=1e-12)
    assert torch.count_nonzero(h48[:16, 16:]) == 0
    assert torch.allclose(h48[:16, :16].abs(), torch.full((16, 16), 0.25, dtype=torch.float64))
    with pytest.raises(ValueError, match="power of two"):
        HadamardRotation(block=24)


def test_rotation_spreads_a_channel_outlier():
    """A Hadamard rotation turns one large channel into equal magnitudes on every channel of its block."""
    x = torch.zeros(1, 32)
    x[0, 5] = 32.0
    rotated = x.double() @ block_hadamard(32, 32)
    assert torch.allclose(rotated.abs(), torch.full((1, 32), 32 / math.sqrt(32), dtype=torch.float64))


def test_rotation_skips_grouped_and_depthwise_with_a_reason():
    torch.manual_seed(0)
    model = _quantized(Mixed().eval())
    report = HadamardRotation().apply(model)
    assert "grouped" in report.skipped and "depthwise" in report.skipped
    assert "mix groups" in report.skipped["depthwise"]
    assert {"pointwise", "up", "head"} <= set(report.applied)


def test_low_rank_part_is_the_truncated_svd():
    torch.manual_seed(0)
    w = torch.randn(12, 20)
    u, s, vh = torch.linalg.svd(w.double())
    expected = sum(s[i] * torch.outer(u[:, i], vh[i]) for i in range(3))
    assert torch.allclose(low_rank_part(w, 3).double(), expected, atol=1e-5)
    assert torch.allclose(low_rank_part(w, 100), w, atol=1e-5)  # full rank: exact


def test_svd_absorbs_a_low_rank_weight_outlier():
    """A rank-1 spike on top of small weights dominates per-channel scales; the float branch takes it."""
    torch.manual_seed(0)
    conv = nn.Conv3d(8, 8, 3, bias=False)
    with torch.no_grad():
        conv.weight.normal_(0, 0.01)
        conv.weight.view(8, -1)[:, :] += 0.5 * torch.outer(torch.ones(8), torch.randn(8 * 27).sign())
    x = torch.randn(2, 8, 5, 5, 5)
    with torch.no_grad():
        ref = conv(x)

    def error(methods):
        m = nn.Sequential(nn.Conv3d(8, 8, 3, bias=False)).eval()
        m[0].load_state_dict(conv.state_dict())
        quantize(m, QuantRecipe.from_precision("w4a16", scheme="per_channel"))
        apply_methods(m, methods, "transform")
        with torch.no_grad():
            return ((m(x) - ref).norm() / ref.norm()).item()

    assert error([LowRankSVD(rank=1)]) < 0.25 * error([])


def test_bias_correction_zeroes_the_mean_output_error():
    torch.manual_seed(0)
    model = Mixed().eval()
    batches = _data(3)
    _quantized(model, "w4a8", "per_tensor")
    calibrate(model, batches)
    report = BiasCorrection(layers=["name:pointwise"]).apply(model, batches=lambda: batches)
    assert report.applied == ["pointwise"]
    layer = model.pointwise
    errors = []

    def hook(module, args, output):
        with quantizers_disabled(model):
            ref = module.forward(*args)
        errors.append((output - ref).double().sum(dim=(0, 2, 3, 4)) / (output[:, 0].numel()))

    handle = layer.register_forward_hook(hook)
    with torch.no_grad():
        for x in batches:
            model(x)
    handle.remove()
    mean_error = torch.stack(errors).mean(0)
    # the correction was measured on the same inputs: the remaining mean error is float rounding only
    assert mean_error.abs().max() < 1e-5
    assert layer.output_correction.abs().max() > 1e-3  # and there was something to correct
    assert "bias_correction" in layer.applied_methods


def test_conv_patches_reproduce_the_convolution():
    """im2col rows at sampled positions times the flattened weight give the conv output at those positions."""
    from mqb.quant.methods.gptq import conv_patches

    torch.manual_seed(0)
    conv = nn.Conv3d(3, 5, (1, 3, 3), stride=(1, 2, 1), padding=(0, 1, 1))
    x = torch.randn(2, 3, 4, 7, 6)
    y = conv(x).detach()
    g = torch.Generator().manual_seed(1)
    rows = conv_patches(x, conv, 10**6, g)  # all positions, in (b, d, h, w) order
    expected = y.permute(0, 2, 3, 4, 1).reshape(-1, 5)
    got = rows @ conv.weight.detach().flatten(1).t() + conv.bias.detach()
    assert torch.allclose(got, expected, atol=1e-5)
    assert conv_patches(x, conv, 7, g).shape == (7, 3 * 9)


def test_gptq_with_a_diagonal_hessian_is_round_to_nearest():
    """No correlation between inputs: there is no other column to move the error to, so GPTQ == RTN."""
    from mqb.quant.fake_quant import fake_quant_symmetric
    from mqb.quant.methods.gptq import gptq_round
    from mqb.quant.spec import QuantSpec

    torch.manual_seed(0)
    w = torch.randn(6, 20, dtype=torch.float64)
    spec = QuantSpec(bits=4)
    amax = w.abs().amax(dim=1, keepdim=True)
    rtn = fake_quant_symmetric(w, amax, spec)
    out = gptq_round(
        w, torch.diag(torch.rand(20, dtype=torch.float64) + 0.5), lambda c: fake_quant_symmetric(c, amax, spec)
    )
    assert torch.equal(out, rtn)


def test_gptq_lowers_the_layer_reconstruction_error_and_stays_on_the_grid():
    torch.manual_seed(0)
    conv = nn.Conv3d(8, 8, 3, padding=1)
    mix = torch.randn(8, 8) * 0.5 + torch.eye(8)  # correlated input channels, as real feature maps are
    data = [torch.einsum("bcdhw,ce->bedhw", torch.randn(1, 8, 6, 6, 6), mix) for _ in range(4)]

    def output_error(method):
        m = nn.Sequential(nn.Conv3d(8, 8, 3, padding=1)).eval()
        m[0].load_state_dict(conv.state_dict())
        quantize(m, QuantRecipe.from_precision("w4a16", scheme="per_channel"))
        if method is not None:
            report = method.apply(m, batches=lambda: data)
            assert report.applied == ["0"]
        with torch.no_grad():
            return sum(float((m(x) - conv(x)).pow(2).mean()) for x in data), m

    rtn_error, _ = output_error(None)
    gptq_error, model = output_error(GPTQ(damp=0.01, block=16))
    assert gptq_error < 0.8 * rtn_error
    layer = model[0]
    assert layer.weight_quantizer.range_frozen and "gptq" in layer.applied_methods
    scale = layer.weight_quantizer.amax.reshape(-1, 1, 1, 1, 1) / 7
    steps = layer.weight.detach() / scale
    assert torch.allclose(steps, steps.round(), atol=1e-4) and steps.abs().max() <= 7 + 1e-4
    dequantize(model)
    assert torch.equal(model[0].weight, conv.weight)


def test_gptq_skips_what_it_cannot_round():
    model = _quantized(Mixed().eval(), "w4a4", "per_channel")
    calibrate(model, _data(1))
    report = GPTQ().apply(model, batches=lambda: _data(1))
    assert "grouped" in report.skipped["grouped"] and "transposed" in report.skipped["up"]
    assert {"dense", "pointwise", "head"} <= set(report.applied)
