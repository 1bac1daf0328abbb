"""The compiled (fused) fake-quantization kernel equals the eager one bit for bit; ``quant.kernel`` selection.

Compiling is slow on a small CPU (2-15 s per spec), so the fast tests cover two specs (static per-channel INT,
an MX block format: an elementwise kernel and a block reduction) and the exhaustive grid is marked slow. On CUDA the
same cases compare the Triton kernel with the eager CUDA result.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from mqb.quant import QuantRecipe, QuantSpec, calibrate, quantize, set_kernel
from mqb.quant import fake_quant as fq
from mqb.quant.attention import QuantAttention
from mqb.quant.granularity import absmax, minmax
from mqb.quant.quantizer import TensorQuantizer
from tests.devices import device_params


def hard_input(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Channels of very different magnitudes, and the values where rounding code goes wrong: +-0, a zero block,
    subnormals, exact ties, the largest finite float."""
    g = torch.Generator().manual_seed(seed)
    magnitude = torch.exp2(torch.randint(-8, 8, shape[:2] + (1,) * (len(shape) - 2), generator=g).float())
    x = torch.randn(shape, generator=g) * magnitude
    flat = x.view(-1)
    flat[:8] = torch.tensor([0.0, -0.0, 1e-40, -3e-39, 3e38, 0.5, -2.5, 1.5])
    flat[8 : max(9, flat.numel() // 50)] = 0.0
    return x


def ranges(x: torch.Tensor, spec: QuantSpec, axis: int | None) -> dict[str, torch.Tensor | None]:
    """Static ranges from ``x`` for a static spec (as calibration would set them), none for a dynamic one."""
    if spec.dynamic:
        return {}
    if spec.symmetric:
        return {"amax": absmax(x, spec.granularity, axis)}
    lo, hi = minmax(x, spec.granularity, axis)
    return {"lo": lo, "hi": hi}


def assert_bits_equal(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal bits (so -0.0 is not 0.0), NaNs at the same places (their payloads carry no meaning)."""
    assert out.shape == ref.shape and out.dtype == ref.dtype
    as_int = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[ref.dtype]
    same = (out.view(as_int) == ref.view(as_int)) | (out.isnan() & ref.isnan())
    assert bool(same.all()), f"{int((~same).sum())} of {ref.numel()} elements differ in their bits"


def check_compiled_equals_eager(spec: QuantSpec, axis: int | None, shapes, device: str, dtype=torch.float32) -> None:
    for i, shape in enumerate(shapes):
        x = hard_input(shape, seed=i).clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max)  # finite in dtype
        x = x.to(device=device, dtype=dtype)
        static = {k: v.float() for k, v in ranges(x.float(), spec, axis).items()}
        with torch.no_grad():
            ref = fq.quantize_dequantize(x, spec, axis=axis, kernel="eager", **static)
            with warnings.catch_warnings():
                warnings.simplefilter("error", RuntimeWarning)  # a fallback to eager would prove nothing
                out = fq.quantize_dequantize(x, spec, axis=axis, kernel="compiled", **static)
        assert_bits_equal(out, ref)
        assert out.stride() == ref.stride()  # the layers reading it run the same algorithms as after eager


#: activations (N, C, D, H, W) of different sizes, channel counts (block padding) and batch sizes, so the
#: dynamic-shape kernel is exercised: a full and a last, smaller sliding-window batch, a batch of one (dynamo
#: specialises sizes 0 and 1: a second compilation, left to the slow tests)
SHAPES = [(3, 40, 5, 6, 7), (2, 24, 2, 3, 5), (1, 40, 3, 4, 4)]
FAST = [
    pytest.param(QuantSpec(bits=8, granularity="per_channel"), 1, id="int8-per_channel-static"),
    pytest.param(QuantSpec(format="mxfp4"), 1, id="mxfp4"),
]
EXHAUSTIVE = [
    pytest.param(QuantSpec(bits=4, granularity="per_voxel"), None, id="int4-per_voxel-dynamic"),
    pytest.param(QuantSpec(bits=8), None, id="int8-per_tensor-static"),
    pytest.param(QuantSpec(bits=2, granularity="per_channel"), 0, id="int2-per_channel-axis0"),
    pytest.param(QuantSpec(bits=8, granularity="per_channel", symmetric=False), 1, id="int8-asym-per_channel"),
    pytest.param(QuantSpec(bits=8, granularity="per_token"), None, id="int8-per_token"),
    pytest.param(QuantSpec(bits=8, granularity="per_tensor", dynamic=True), None, id="int8-per_tensor-dynamic"),
    pytest.param(QuantSpec(bits=4, granularity="per_group", group_size=16), 1, id="int4-g16"),
    pytest.param(QuantSpec(bits=8, granularity="per_group", symmetric=False), -1, id="int8-asym-g32-last"),
    pytest.param(QuantSpec(format="fp8_e4m3"), None, id="fp8-per_tensor-static"),
    pytest.param(QuantSpec(format="fp8_e4m3", granularity="per_channel"), 1, id="fp8-per_channel-static"),
    pytest.param(QuantSpec(format="fp8_e4m3", granularity="per_voxel"), None, id="fp8-per_voxel"),
    pytest.param(QuantSpec(format="mxint8"), 1, id="mxint8"),
    pytest.param(QuantSpec(format="mxfp8"), 1, id="mxfp8"),
    pytest.param(QuantSpec(format="nvfp4"), 1, id="nvfp4"),
]


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("spec,axis", FAST)
def test_compiled_equals_eager_bit_for_bit(spec, axis, device):
    check_compiled_equals_eager(spec, axis, SHAPES[:2], device)


@pytest.mark.slow
@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("spec,axis", EXHAUSTIVE)
def test_compiled_equals_eager_bit_for_bit_every_format(spec, axis, device):
    check_compiled_equals_eager(spec, axis, SHAPES, device)


@pytest.mark.slow
@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compiled_equals_eager_in_half_precision(dtype, device):
    check_compiled_equals_eager(QuantSpec(format="nvfp4"), 1, SHAPES, device, dtype)
    check_compiled_equals_eager(QuantSpec(bits=8, granularity="per_channel"), 1, SHAPES, device, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("device", device_params())
def test_compiled_propagates_nan_and_inf_as_eager(device):
    x = hard_input((2, 32, 4, 4, 4)).to(device)
    x.view(-1)[100:103] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    for spec, axis in ((QuantSpec(bits=8, granularity="per_voxel"), None), (QuantSpec(format="mxfp4"), 1)):
        with torch.no_grad():
            ref = fq.quantize_dequantize(x, spec, axis=axis, kernel="eager")
            out = fq.quantize_dequantize(x, spec, axis=axis, kernel="compiled")
        assert torch.equal(ref.isnan(), out.isnan())
        assert torch.equal(ref.nan_to_num(0.0), out.nan_to_num(0.0))


class TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(3, 32, 3, padding=1)
        self.linear = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.conv(x).movedim(1, -1))


@pytest.mark.slow
@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("precision,scheme", [("w8a8", "adaptive"), ("nvfp4", "per_group"), ("fp8", "per_channel")])
def test_quantized_model_compiled_equals_eager(precision, scheme, device):
    torch.manual_seed(0)
    model = quantize(TwoLayer().eval(), QuantRecipe.from_precision(precision, scheme=scheme)).to(device)
    batches = [torch.randn(2, 3, 6, 6, 6, device=device)]
    calibrate(model, batches)
    for batch in (2, 1):
        x = torch.randn(batch, 3, 6, 7, 5, device=device)
        set_kernel(model, "eager")
        with torch.inference_mode():
            ref = model(x)
        set_kernel(model, "compiled")
        with torch.inference_mode():
            out = model(x)
        assert_bits_equal(out, ref)


# -- choosing the kernel -------------------------------------------------------------------------------------------


def test_check_kernel_names_the_setting_and_the_choices():
    assert [fq.check_kernel(k) for k in fq.KERNELS] == ["auto", "eager", "compiled"]
    with pytest.raises(ValueError, match=r"quant.kernel='fused' is invalid; valid: 'auto', 'eager', 'compiled'"):
        fq.check_kernel("fused")
    with pytest.raises(ValueError, match="quant.kernel"):
        fq.quantize_dequantize(torch.ones(3), QuantSpec(), kernel="fast")


def test_auto_chooses_by_device_format_and_size():
    big, small = torch.empty(fq.CPU_COMPILE_MIN_NUMEL), torch.empty(1000)
    static_int = QuantSpec(bits=8, granularity="per_channel")
    for spec in (QuantSpec(format="mxfp4"), QuantSpec(format="fp8_e4m3"), QuantSpec(bits=8, granularity="per_voxel")):
        assert fq.choose_kernel("auto", spec, big) == "compiled"  # measured several times faster fused on a CPU
        assert fq.choose_kernel("auto", spec, small) == "eager"  # a compilation is not repaid
    assert fq.choose_kernel("auto", static_int, big) == "eager"  # already a multiply and three in-place passes
    assert fq.choose_kernel("compiled", static_int, small) == "compiled"
    assert fq.choose_kernel("eager", QuantSpec(format="mxfp4"), big) == "eager"
    assert fq.choose_kernel("compiled", static_int, torch.empty(4, device="meta")) == "eager"
    grad = torch.ones(fq.CPU_COMPILE_MIN_NUMEL, requires_grad=True)
    assert fq.choose_kernel("compiled", static_int, grad) == "eager"  # gradients go through the eager formulas
    with torch.no_grad():
        assert fq.choose_kernel("compiled", static_int, grad) == "compiled"


@pytest.mark.parametrize("device", device_params())
def test_auto_runs_eager_on_cuda(device):
    if device == "cpu":
        pytest.skip("the CUDA rule")
    big = torch.empty(fq.CPU_COMPILE_MIN_NUMEL, device=device)
    for spec in (QuantSpec(bits=8), QuantSpec(format="mxfp4"), QuantSpec(bits=8, granularity="per_voxel")):
        assert fq.choose_kernel("auto", spec, big) == "eager"  # ATen's CUDA arithmetic is the CPU's
        assert fq.choose_kernel("compiled", spec, big) == "compiled"


def test_a_failed_compilation_warns_once_and_falls_back_to_eager(monkeypatch):
    monkeypatch.setattr(fq, "_COMPILED", {})
    monkeypatch.setattr(fq, "_COMPILE_FAILED", {})

    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no C++ compiler\nmore detail")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    spec, x = QuantSpec(format="mxfp4"), hard_input((2, 40, 3, 4, 4))
    ref = fq.quantize_dequantize(x, spec, axis=1)
    with pytest.warns(RuntimeWarning, match=r"compiled fake quantization failed for cpu \(RuntimeError: no C\+\+ comp"):
        out = fq.quantize_dequantize(x, spec, axis=1, kernel="compiled")
    assert_bits_equal(out, ref)
    assert "cpu" in fq._COMPILE_FAILED and fq.choose_kernel("compiled", spec, x) == "eager"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_bits_equal(fq.quantize_dequantize(x, spec, axis=1, kernel="compiled"), ref)  # no second warning


def test_a_spec_past_the_recompilation_limit_runs_eager_alone(monkeypatch):
    monkeypatch.setattr(fq, "_COMPILED", {})
    monkeypatch.setattr(fq, "_COMPILE_FAILED", {})

    class FailOnRecompileLimitHit(Exception):  # what dynamo raises with fullgraph=True
        pass

    def limited_compile(fn, **kwargs):
        def run(*args):
            raise FailOnRecompileLimitHit("Hard failure due to fullgraph=True")

        return run

    monkeypatch.setattr(torch, "compile", limited_compile)
    spec, x = QuantSpec(format="mxfp4"), hard_input((2, 40, 3, 4, 4))
    with pytest.warns(RuntimeWarning, match=r"failed for mxfp4 g32 dynamic on cpu \(FailOnRecompileLimitHit"):
        out = fq.quantize_dequantize(x, spec, axis=1, kernel="compiled")
    assert_bits_equal(out, fq.quantize_dequantize(x, spec, axis=1))
    assert fq._COMPILE_FAILED == {} and list(fq._COMPILED.values()) == [None]  # only that spec: others compile


def test_bad_inputs_raise_as_in_eager_and_do_not_disable_compilation(monkeypatch):
    monkeypatch.setattr(fq, "_COMPILED", {})
    monkeypatch.setattr(fq, "_COMPILE_FAILED", {})
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)  # "compiled" = the traced function itself
    with pytest.raises(ValueError, match="out of range"):
        fq.quantize_dequantize(
            torch.ones(2, 3), QuantSpec(bits=8, granularity="per_channel"), axis=5, kernel="compiled"
        )
    assert fq._COMPILE_FAILED == {}


def test_each_spec_gets_its_own_compiled_function(monkeypatch):
    """One code object per (spec, axis, signature), so dynamo's recompilation budget is not shared by the whole
    network; equal specs of different layers share one."""
    monkeypatch.setattr(fq, "_COMPILED", {})
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    x = torch.randn(2, 4, 3, 3, 3)
    fq.quantize_dequantize(x, QuantSpec(bits=8, granularity="per_voxel"), kernel="compiled")
    fq.quantize_dequantize(torch.randn(3, 4, 5, 2, 3), QuantSpec(bits=8, granularity="per_voxel"), kernel="compiled")
    fq.quantize_dequantize(x, QuantSpec(bits=4, granularity="per_voxel"), kernel="compiled")
    fq.quantize_dequantize(x, QuantSpec(bits=8), amax=x.abs().amax(), kernel="compiled")
    codes = [fn.__code__ for fn in fq._COMPILED.values()]
    assert len(codes) == 3 and len(set(map(id, codes))) == 3
    assert len({c.co_name for c in codes}) == 3


def test_set_kernel_reaches_every_quantizer_and_later_attention_operands():
    from monai.networks.blocks.selfattention import SABlock

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(2, 4, 1), nn.Flatten(2), SABlock(hidden_size=27, num_heads=3)).eval()
    quantize(model, QuantRecipe.from_precision("w8a8", scheme="per_tensor", attention=True))
    assert set_kernel(model, "compiled") > 0
    with pytest.raises(ValueError, match="quant.kernel"):
        set_kernel(model, "turbo")
    set_kernel(model, "eager")
    calibrate(model, [torch.randn(1, 2, 3, 3, 3)])
    quantizers = [m for m in model.modules() if isinstance(m, TensorQuantizer)]
    attention = [m for m in model.modules() if isinstance(m, QuantAttention)]
    assert attention and any(".mm0_" in q.name for q in quantizers)  # made during calibration, after set_kernel
    assert all(q.kernel == "eager" for q in quantizers) and all(a.kernel == "eager" for a in attention)
    assert "kernel=eager" in repr(quantizers[0])
