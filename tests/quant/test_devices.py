"""Device placement of the quantization engine: calibration state moves with ``model.to()``, ranges set later land
on the model's device, and every format / granularity / method gives the CPU result on each device.

On a machine without a GPU only the ``cpu`` cases run (``-k cuda`` selects the CUDA ones). The ``meta`` device
stands in for CUDA where no GPU is needed: a tensor still on the CPU after ``model.to("meta")`` is state that
``model.to("cuda")`` would leave behind too, and CPU ranges loaded into a model on ``meta`` must end up there.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from monai.networks.blocks.selfattention import SABlock
from torch import nn

from mqb.quant import (
    QuantRecipe,
    QuantSpec,
    apply_input_ranges,
    calibrate,
    collect_input_ranges,
    fake_quantize,
    quantize,
)
from mqb.quant.methods import (
    GPTQ,
    BiasCorrection,
    HadamardRotation,
    LowRankSVD,
    SharedInputRanges,
    SmoothQuant,
    apply_methods,
)
from mqb.quant.quantizer import TensorQuantizer
from tests.devices import assert_close_to_cpu, device_params, exact_float32, stray_tensors, to_device

WITH_NORMS = ("conv", "conv_transpose", "linear", "norm")


class ConvNet(nn.Module):
    """k3 conv -> affine-free InstanceNorm (no tensors of its own) -> ReLU, read by two 1x1 convs (shared ranges,
    tensor quantizer on the ReLU), strided conv, ConvTranspose, Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv3d(2, 8, 3, padding=1)
        self.norm = nn.InstanceNorm3d(8)
        self.act = nn.ReLU()
        self.point = nn.Conv3d(8, 8, 1)
        self.short = nn.Conv3d(8, 8, 1)
        self.down = nn.Conv3d(8, 16, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose3d(16, 8, 2, stride=2)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.act(self.norm(self.stem(x)))
        y = torch.relu(self.point(s)) + self.short(s)
        y = self.up(torch.relu(self.down(y)))
        return self.head(y.movedim(1, -1))


class AttnNet(nn.Module):
    """Linear -> MONAI SABlock (quantized Q·Kᵀ and softmax·V) -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.block = SABlock(hidden_size=16, num_heads=2, qkv_bias=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.embed(x)))


def _conv_batches() -> list[torch.Tensor]:
    out = []
    for seed in (1, 2):
        x = torch.randn(1, 2, 4, 4, 4, generator=torch.Generator().manual_seed(seed))
        x[:, 1] *= 10.0  # an outlier input channel
        out.append(x)
    return out


def _attn_batches() -> list[torch.Tensor]:
    return [torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]


Build = Callable[[nn.Module, list[torch.Tensor]], None]


def _recipe(precision: str, granularity: str, **kwargs: object) -> Build:
    def build(model: nn.Module, batches: list[torch.Tensor]) -> None:
        quantize(model, QuantRecipe.from_precision(precision, scheme=granularity, **kwargs))
        calibrate(model, batches)

    return build


def _observer(observer: str) -> Build:
    def build(model: nn.Module, batches: list[torch.Tensor]) -> None:
        act = QuantSpec(bits=8, observer=observer)
        quantize(model, QuantRecipe(weight=QuantSpec(bits=8), activation=act, granularity="per_channel"))
        calibrate(model, batches)

    return build


def _methods(*methods: object, precision: str = "w4a4", granularity: str = "per_channel") -> Build:
    def build(model: nn.Module, batches: list[torch.Tensor]) -> None:
        ranges = collect_input_ranges(model, batches)
        quantize(model, QuantRecipe.from_precision(precision, scheme=granularity))
        apply_methods(model, methods, "transform", ranges=ranges)  # type: ignore[arg-type]
        calibrate(model, batches)
        apply_methods(model, methods, "post_calibration", batches=lambda: batches)  # type: ignore[arg-type]

    return build


def _cached_ranges(model: nn.Module, batches: list[torch.Tensor]) -> None:
    """The range-cache path of mqb.eval: float input ranges collected first, applied to the quantized model."""
    ranges = collect_input_ranges(model, batches)
    quantize(model, QuantRecipe.from_precision("w8a8", scheme="per_channel", include=WITH_NORMS))
    apply_input_ranges(model, ranges)


CONV_CONFIGS: dict[str, Build] = {
    "w8a8-per_tensor": _recipe("w8a8", "per_tensor"),
    "w8a8-per_channel": _recipe("w8a8", "per_channel"),
    "w8a8-adaptive": _recipe("w8a8", "adaptive"),
    "w8a8-per_voxel": _recipe("w8a8", "per_voxel"),
    "w8a8-per_group": _recipe("w8a8", "per_group"),
    "w8a8-deploy": _recipe("w8a8", "deploy"),
    "w4a4-adaptive": _recipe("w4a4", "adaptive"),
    "w4a4-per_channel-norms": _recipe("w4a4", "per_channel", include=WITH_NORMS),
    "w4a16-per_channel": _recipe("w4a16", "per_channel"),
    "fp8": _recipe("fp8", "per_tensor"),
    "mxint8": _recipe("mxint8", "per_group"),
    "mxfp4": _recipe("mxfp4", "per_group"),
    "nvfp4": _recipe("nvfp4", "per_group"),
    "observer-percentile": _observer("percentile"),
    "observer-mse": _observer("mse"),
    "cached-ranges": _cached_ranges,
    "smoothquant": _methods(SmoothQuant(alpha=0.5)),
    "rotation": _methods(HadamardRotation(block=8)),
    "svd": _methods(LowRankSVD(rank=2)),
    "smoothquant+svd": _methods(SmoothQuant(alpha=0.5), LowRankSVD(rank=2)),
    "bias_correction": _methods(BiasCorrection()),
    "gptq": _methods(GPTQ(max_rows=64)),
    "shared_ranges": _methods(SharedInputRanges(), granularity="deploy", precision="w8a8"),
    "tensor_quantizers": _methods(SharedInputRanges(output_quantizers=True), granularity="deploy", precision="w8a8"),
}

ATTN_CONFIGS: dict[str, Build] = {
    "attention-w8a8-per_tensor": _recipe("w8a8", "per_tensor", attention=True),
    "attention-w4a4-per_channel": _recipe("w4a4", "per_channel", attention=True),
    "attention-mxfp4": _recipe("mxfp4", "per_group", attention=True),
}

CASES = [pytest.param("conv", k, id=k) for k in CONV_CONFIGS] + [pytest.param("attn", k, id=k) for k in ATTN_CONFIGS]


def _build(kind: str, key: str, device: str = "cpu") -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = (ConvNet() if kind == "conv" else AttnNet()).eval().to(device)
    batches = to_device(_conv_batches() if kind == "conv" else _attn_batches(), device)
    (CONV_CONFIGS if kind == "conv" else ATTN_CONFIGS)[key](model, batches)
    return model, batches


def _strays(model: nn.Module, kind: str, device: str) -> list[str]:
    """:func:`stray_tensors` less those of the float network itself (MONAI's SABlock keeps empty CPU tensors in
    ``att_mat`` / ``causal_mask`` that ``.to()`` does not move either; they are not quantization state)."""
    float_model = (ConvNet() if kind == "conv" else AttnNet()).to(device)
    known = {s.rsplit(" on ", 1)[0] for s in stray_tensors(float_model, device)}
    return [s for s in stray_tensors(model, device) if s.rsplit(" on ", 1)[0] not in known]


@pytest.fixture
def no_tf32():
    with exact_float32():
        yield


# -- state follows model.to() ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "key"), CASES)
def test_calibration_state_moves_with_the_model(kind, key):
    model, batches = _build(kind, key)
    with torch.no_grad():
        model(batches[0])  # fills the weight caches
    assert any(isinstance(m, TensorQuantizer) for m in model.modules())
    model.to("meta")
    assert _strays(model, kind, "meta") == []
    quantizers = [m for m in model.modules() if isinstance(m, TensorQuantizer)]
    assert all(q.device is None or q.device.type == "meta" for q in quantizers)


@pytest.mark.parametrize(("kind", "key"), CASES)
def test_forward_after_a_cast_to_float64(kind, key):
    model, batches = _build(kind, key)
    with torch.no_grad():
        reference = model(batches[0])
        model.to(torch.float64)
        out = model(batches[0].double())
    assert out.dtype == torch.float64 and torch.isfinite(out).all()
    # the same quantized model up to rounding ties flipped by float32 vs float64 arithmetic
    assert float((out.float() - reference).norm() / reference.norm()) < 0.05


def test_ranges_stay_float32_when_the_model_is_cast_to_half():
    model, batches = _build("conv", "w8a8-per_channel")
    quantizers = {n: m for n, m in model.named_modules() if isinstance(m, TensorQuantizer)}
    amax = {n: m.amax.clone() for n, m in quantizers.items() if m.amax is not None}
    assert "stem.input_quantizer" in amax
    model.to(torch.bfloat16)
    assert model.stem.weight.dtype == torch.bfloat16
    for name, m in model.named_modules():
        if name in amax:
            assert m.amax.dtype == torch.float32 and torch.equal(m.amax, amax[name]), name
    with torch.no_grad():
        out = model(batches[0].bfloat16())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_weight_cache_is_dropped_on_a_move():
    model, batches = _build("conv", "w8a8-per_channel")
    with torch.no_grad():
        model(batches[0])
    assert model.stem.weight_quantizer._cache is not None
    model.to(torch.float64)
    assert model.stem.weight_quantizer._cache is None


# -- ranges that arrive after the move land on the model's device ------------------------------------------------


def test_cpu_range_cache_lands_on_the_model_device():
    """mqb.eval's range cache is loaded on the CPU and applied to the model on its device (the MeshNet
    per-channel failure): every range, including an affine-free norm's (a layer without tensors), follows."""
    torch.manual_seed(0)
    model = ConvNet().eval()
    ranges = collect_input_ranges(model, _conv_batches())
    model.to("meta")
    quantize(model, QuantRecipe.from_precision("w8a8", scheme="per_channel", include=WITH_NORMS))
    apply_input_ranges(model, ranges)
    assert model.norm.input_quantizer.amax.device.type == "meta"
    assert stray_tensors(model, "meta") == []


def test_load_ranges_into_a_quantizer_moved_before_it_had_ranges():
    q = TensorQuantizer(QuantSpec(bits=8, granularity="per_channel"), axis=1).to("meta")
    q.load_ranges({"amax": torch.ones(4)}, ndim=5)
    assert q.amax.device.type == "meta" and q.amax.shape == (4, 1, 1, 1)
    born = TensorQuantizer(QuantSpec(bits=8), device="meta")
    born.load_ranges({"amax": torch.ones(1)}, ndim=5)
    assert born.amax.device.type == "meta"


@pytest.mark.filterwarnings("ignore:.*copying from a non-meta parameter")
def test_state_dict_loads_onto_the_model_device():
    cpu_model, _ = _build("conv", "w8a8-per_channel")
    state = cpu_model.state_dict()
    torch.manual_seed(0)
    model = ConvNet().eval()
    quantize(model, QuantRecipe.from_precision("w8a8", scheme="per_channel"))
    model.to("meta")
    model.load_state_dict(state)
    assert model.stem.input_quantizer.amax.device.type == "meta"
    assert stray_tensors(model, "meta") == []


def test_state_dict_keys_are_unchanged():
    model, _ = _build("conv", "smoothquant")
    keys = set(model.state_dict())
    assert "stem.input_quantizer.amax" in keys and "stem.input_transform.s" in keys
    assert not any(k.endswith(("_cache", "float_weight", "low_rank_weight", "output_correction")) for k in keys)


def test_gptq_hessians_on_the_model_device():
    """The Hessian accumulators start on the device of the layer inputs (a CPU ``torch.zeros`` failed on CUDA)."""
    model, batches = _build("conv", "w8a8-per_channel")
    model.to("meta")
    method = GPTQ(max_rows=16)
    layers, _ = method.partition(model)
    hessians = method._hessians(model, layers, lambda: [b.to("meta") for b in batches], None)
    assert hessians and all(h.device.type == "meta" for h, _ in hessians.values())


# -- the same numbers on every device ---------------------------------------------------------------------------

FORMATS = [
    dict(bits=8, granularity="per_tensor"),
    dict(bits=8, granularity="per_channel", axis=1),
    dict(bits=4, granularity="per_token"),
    dict(bits=8, granularity="per_voxel"),
    dict(bits=4, granularity="per_group", group_size=8, axis=1),
    dict(bits=4, granularity="per_channel", axis=1, symmetric=False),
    dict(format="fp8_e4m3"),
    dict(format="mxint8", granularity="per_group", axis=1),
    dict(format="mxfp8", granularity="per_group", axis=1),
    dict(format="mxfp4", granularity="per_group", axis=1),
    dict(format="nvfp4", granularity="per_group", axis=1),
]


def _format_id(kw: dict) -> str:
    parts = [str(kw.get("format", "int")), f"{kw.get('bits', '')}", str(kw.get("granularity", "per_tensor"))]
    return "-".join(p for p in parts if p) + ("-asym" if kw.get("symmetric") is False else "")


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("kwargs", FORMATS, ids=_format_id)
def test_fake_quantize_matches_cpu(kwargs, device):
    x = torch.randn(2, 40, 3, 4, generator=torch.Generator().manual_seed(0)) * 3.0
    x[0, 5] *= 40.0
    reference = fake_quantize(x, **kwargs)
    out = fake_quantize(x.to(device), **kwargs)
    assert out.device.type == device
    assert_close_to_cpu(out, reference, exact=True)  # elementwise after exact reductions: bit-exact


SCHEMES = ["per_tensor", "per_channel", "per_voxel", "adaptive", "per_group", "deploy"]
DEVICE_CASES = (
    [pytest.param("conv", f"w8a8-{s}", id=f"w8a8-{s}") for s in SCHEMES]
    + [pytest.param("conv", k, id=k) for k in ("w4a4-per_channel-norms", "fp8", "nvfp4", "observer-mse")]
    + [pytest.param("conv", k, id=k) for k in ("cached-ranges", "smoothquant", "rotation", "svd")]
    + [pytest.param("conv", k, id=k) for k in ("bias_correction", "gptq", "tensor_quantizers")]
    + [pytest.param("attn", k, id=k) for k in ATTN_CONFIGS]
)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize(("kind", "key"), DEVICE_CASES)
def test_quantized_model_matches_cpu(kind, key, device, no_tf32):
    """Quantize and calibrate on ``device`` (the eval path) and on the CPU: the same calibrated model."""
    reference_model, batches = _build(kind, key, "cpu")
    model, device_batches = _build(kind, key, device)
    assert _strays(model, kind, device) == []
    with torch.no_grad():
        reference = reference_model(batches[0])
        out = model(device_batches[0])
    assert out.device.type == device
    assert_close_to_cpu(out, reference, exact=False)


@pytest.mark.parametrize("device", device_params())
def test_calibrated_on_cpu_then_moved(device, no_tf32):
    """Calibrate on the CPU, then ``.to(device)``: the model runs there with the same result."""
    model, batches = _build("conv", "w4a4-adaptive")
    with torch.no_grad():
        reference = model(batches[0])
        moved = copy.deepcopy(model).to(device)
        out = moved(batches[0].to(device))
    assert stray_tensors(moved, device) == []
    assert_close_to_cpu(out, reference, exact=False)
