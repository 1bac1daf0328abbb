"""Input quantizers overwrite their input only where nothing reads it again (:mod:`mqb.quant.in_place`).

The plan is checked against the network's structure (a concatenation read by one conv qualifies; a residual, the
model's input, a view, a tensor returned or kept by a hook do not), results against the copying path bit for bit,
and memory against the float forward (the peak of the allocator, as ``benchmarks/quant_overhead.py`` counts it).
The compiled kernel's cases are slow (a compilation per spec on a small CPU).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

from mqb.quant import QuantRecipe, calibrate, dequantize, in_place, quantize, set_kernel
from mqb.quant.fake_quant import quantize_dequantize
from mqb.quant.spec import QuantSpec


class Net(nn.Module):
    """stem (reads the model input) -> in-place LeakyReLU -> ``mid`` -> a 1x1 ``side`` whose output is read by
    ``res`` and added back (a residual), concatenated with ``mid``'s output for ``fuse`` (read by nothing else),
    a view of it for ``head``; ``keep`` set: the input of ``fuse`` is also kept on the module."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv3d(2, 8, 3, padding=1)
        self.act = nn.LeakyReLU(inplace=True)
        self.mid = nn.Conv3d(8, 8, 3, padding=1)
        self.side = nn.Conv3d(8, 8, 1)
        self.res = nn.Conv3d(8, 8, 1)
        self.fuse = nn.Conv3d(16, 8, 3, padding=1)
        self.head = nn.Conv3d(4, 3, 1)
        self.keep = False
        self.kept: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act(self.stem(x))
        m = self.mid(a)
        s = self.side(m)
        s = self.res(s) + s
        cat = torch.cat([m, s], dim=1)
        if self.keep:
            self.kept.append(cat)
        f = torch.relu(self.fuse(cat))
        return self.head(f[:, :4])


#: ``stem`` reads the model's input, ``side`` m (which the concatenation reads later), ``res`` s (added back after
#: it), ``head`` a view; ``mid`` reads the in-place LeakyReLU's output and ``fuse`` the concatenation: only they
PLANNED = {"mid", "fuse"}


def data(n: int = 2, seed: int = 0, size: int = 8) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 2, size, size, size, generator=g) for _ in range(n)]


def quantized(precision: str = "w8a8", scheme: str = "per_channel", net: nn.Module | None = None) -> nn.Module:
    torch.manual_seed(0)
    model = quantize((net or Net()).eval(), QuantRecipe.from_precision(precision, scheme=scheme))
    calibrate(model, data())
    return model


def planned_layers(model: nn.Module) -> set[str]:
    return {name.rsplit(".", 1)[0] for name in in_place.planned(model)}


def test_the_plan_follows_the_tensors():
    model = quantized()
    assert in_place.planned(model) == []  # nothing before a forward has been traced
    with torch.inference_mode():
        model(data(1, seed=3)[0])
    assert planned_layers(model) == PLANNED


def test_results_equal_the_copying_path_bit_for_bit():
    x = data(2, seed=5)
    model = quantized()
    copying = copy.deepcopy(model)
    in_place.uninstall(copying)
    with torch.inference_mode():
        for batch in x:
            got, want = model(batch), copying(batch)
            assert torch.equal(got, want)
    assert planned_layers(model) == PLANNED and in_place.planned(copying) == []


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(bits=8, granularity="per_channel"),
        QuantSpec(bits=4, granularity="per_voxel", dynamic=True),
        QuantSpec(bits=8, granularity="per_tensor", dynamic=True),
        QuantSpec(bits=8, format="fp8_e4m3", granularity="per_channel"),
        QuantSpec(bits=4, format="mxfp4", granularity="per_group", group_size=32),
    ],
    ids=lambda s: s.short(),
)
@pytest.mark.parametrize("kernel", ["eager", pytest.param("compiled", marks=pytest.mark.slow)])
def test_in_place_fake_quantization_is_the_copying_one(spec, kernel):
    x = torch.randn(2, 64, 6, 5, 4, generator=torch.Generator().manual_seed(1)) * 3
    amax = None if spec.dynamic or spec.granularity == "per_group" else x.abs().amax((0, 2, 3, 4), keepdim=True)
    want = quantize_dequantize(x, spec, axis=1, amax=amax, kernel=kernel)
    with torch.inference_mode():
        target = x.clone()
        got = quantize_dequantize(target, spec, axis=1, amax=amax, kernel=kernel, in_place=True)
    assert torch.equal(got, want) and got.stride() == want.stride()
    if kernel == "compiled" or spec.format != "fp8_e4m3":  # eager FP8 has no in-place form: it returns a copy
        assert got.data_ptr() == target.data_ptr()


class Attention(nn.Module):
    """MONAI's self-attention block (its operand products quantized under a torch function mode of its own)
    between two linears."""

    def __init__(self) -> None:
        super().__init__()
        from monai.networks.blocks.selfattention import SABlock

        self.inp = nn.Linear(16, 32)
        self.block = SABlock(hidden_size=32, num_heads=4)
        self.out = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.block(self.inp(x))))


@pytest.mark.parametrize("precision,scheme", [("w8a8", "per_tensor"), ("w4a4", "per_channel"), ("mxfp4", "per_group")])
def test_the_traced_forward_computes_what_the_others_do_with_attention(precision, scheme):
    """The trace's own mode sits under the attention block's operand mode; the quantizers it runs inside the block
    (the projections') must leave that mode in place."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 10, 16, generator=g) for _ in range(2)]
    model = quantize(Attention().eval(), QuantRecipe.from_precision(precision, scheme=scheme, attention=True))
    calibrate(model, batches)
    copying = copy.deepcopy(model)
    in_place.uninstall(copying)
    with torch.inference_mode():
        for _ in range(2):  # the first forward is traced, the second runs the plan
            assert torch.equal(model(batches[1]), copying(batches[1]))
    assert in_place.planned(model)


def test_a_tensor_kept_by_the_model_is_never_overwritten():
    model = quantized()
    reference = copy.deepcopy(model)
    in_place.uninstall(reference)
    x = data(1, seed=7)[0]
    with torch.inference_mode():
        model(x)  # traced without keeping: ``fuse`` may overwrite its input
        assert "fuse" in planned_layers(model)
        model.keep = reference.keep = True  # a plain attribute: the traced setting does not see it
        model(x), reference(x)
    kept, float_cat = model.kept[-1], reference.kept[-1]
    assert torch.equal(kept, float_cat)  # one reference more than traced: quantized into a copy


def test_a_hook_added_later_sees_the_float_input():
    model = quantized()
    x = data(1, seed=8)[0]
    seen: list[torch.Tensor] = []
    with torch.inference_mode():
        model(x)
        model.fuse.register_forward_hook(lambda module, args, out: seen.append(args[0].clone()))
        model(x)
        assert "fuse" not in planned_layers(model)  # traced again with the hook, which reads the input after
        float_model = copy.deepcopy(model)
        dequantize(float_model)
        seen_float: list[torch.Tensor] = []
        float_model.fuse.register_forward_hook(lambda module, args, out: seen_float.append(args[0].clone()))
        float_model(x)
    assert seen and torch.equal(seen[-1], seen_float[-1])


def test_switching_quantizers_off_retraces():
    model = quantized()
    x = data(1, seed=9)[0]
    with torch.inference_mode():
        model(x)
        model.fuse.quantizers_enabled = False
        model(x)
        assert "fuse" not in planned_layers(model)  # its quantizer is not called: traced again without it
        model.fuse.quantizers_enabled = True
        quantized_out = model(x)
        assert planned_layers(model) == PLANNED
    reference = copy.deepcopy(model)
    in_place.uninstall(reference)
    with torch.inference_mode():
        assert torch.equal(quantized_out, reference(x))


def test_nothing_is_overwritten_with_gradients():
    model = quantized()
    x = data(1, seed=4)[0].requires_grad_()
    out = model(x)
    out.sum().backward()  # an overwritten tensor saved for backward would raise here
    assert x.grad is not None and in_place.planned(model) == []
    with torch.no_grad():
        model(x.detach())
    assert planned_layers(model) == PLANNED  # without gradients (no_grad, not only inference_mode) it applies


def test_dequantize_removes_the_hooks_and_a_deep_copy_keeps_its_plan():
    model = quantized()
    with torch.inference_mode():
        model(data(1)[0])
    clone = copy.deepcopy(model)
    assert planned_layers(clone) == PLANNED
    dequantize(model)
    assert "_mqb_in_place" not in model.__dict__ and not model._forward_pre_hooks and not model._forward_hooks


class Concat(nn.Module):
    """A U-Net's last decoder stage: the full-resolution skip and the upsampled features, concatenated for a 3x3
    conv: the concatenation is the largest tensor and read by nothing else."""

    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv3d(1, channels, 3, padding=1)
        self.down = nn.Conv3d(channels, channels, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose3d(channels, channels, 2, stride=2)
        self.conv = nn.Conv3d(2 * channels, channels, 3, padding=1)
        self.head = nn.Conv3d(channels, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = torch.relu(self.stem(x))
        up = self.up(torch.relu(self.down(skip)))
        return self.head(torch.relu(self.conv(torch.cat([up, skip], dim=1))))


def transient_peak(model: nn.Module, x: torch.Tensor) -> int:
    """The most bytes the CPU allocator held during one forward above what it held before (torch.profiler)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model(x)
    peak, stack = 0, list(prof.profiler.kineto_results.experimental_event_tree())  # type: ignore[union-attr]
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            peak = max(peak, int(node.extra_fields.total_allocated))
        stack.extend(node.children)
    return peak


@pytest.mark.parametrize(
    "precision,scheme,kernel",
    [("w8a8", "per_channel", "eager"), pytest.param("fp8", "per_channel", "compiled", marks=pytest.mark.slow)],
)
def test_the_quantized_peak_is_the_float_peak(precision, scheme, kernel):
    """Static INT in place by its eager codec; FP8 (whose eager form takes many passes) by the compiled kernel
    writing into its input."""
    x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    float_model = Concat().eval()
    model = quantize(copy.deepcopy(float_model), QuantRecipe.from_precision(precision, scheme=scheme))
    calibrate(model, [x])
    set_kernel(model, kernel)
    copying = copy.deepcopy(model)
    in_place.uninstall(copying)
    with torch.inference_mode():
        model(x), copying(x), float_model(x)  # plan, and allocator warm-up
    cat_bytes = 2 * 16 * 32**3 * 4
    fp32, quant, copy_peak = transient_peak(float_model, x), transient_peak(model, x), transient_peak(copying, x)
    assert copy_peak >= fp32 + cat_bytes  # the copy of the concatenation is what the copying path adds
    assert quant <= fp32 + cat_bytes // 16, (quant, fp32)


class Wrap(nn.Module):
    """``body`` planned inside the root; called on its own it must not overwrite its caller's tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Conv3d(2, 8, 1)
        self.body = nn.Sequential(nn.Conv3d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv3d(8, 2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(torch.relu(self.pre(x)))


def test_a_submodule_called_on_its_own_overwrites_nothing():
    model = quantized(net=Wrap())
    with torch.no_grad():
        model(data(1)[0])
        assert {"body.0", "body.2"} <= planned_layers(model)
        mine = torch.randn(1, 8, 8, 8, 8)
        kept = mine.clone()
        model.body(mine)
    assert torch.equal(mine, kept)


def test_a_hook_replaced_by_one_that_reads_the_input_retraces():
    """Same number of hooks, another hook: the setting follows handles, not counts."""
    model = quantized()
    x = data(1, seed=2)[0]
    handle = model.fuse.register_forward_hook(lambda module, args, out: None)
    seen: list[torch.Tensor] = []
    with torch.no_grad():
        model(x)
        handle.remove()
        model.fuse.register_forward_hook(lambda module, args, out: seen.append(args[0].clone()))
        model(x)
    float_model = copy.deepcopy(model)
    dequantize(float_model)
    float_seen: list[torch.Tensor] = []
    float_model.fuse.register_forward_hook(lambda module, args, out: float_seen.append(args[0].clone()))
    with torch.no_grad():
        float_model(x)
    assert torch.equal(seen[-1], float_seen[-1])


class Aux(nn.Module):
    """In training mode the encoder's output is also read after the decoder (as MONAI's SegResNetVAE does)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Conv3d(2, 8, 3, padding=1)
        self.dec = nn.Conv3d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.enc(x))
        y = self.dec(h)
        return y + h.mean() if self.training else y


def check_after_a_change(net: nn.Module, layer: str, change: Callable[[nn.Module], object]) -> None:
    """Plan ``layer`` on a traced forward, ``change`` the model (and a copying twin), then both compute the same."""
    model = quantized(net=net)
    reference = copy.deepcopy(model)
    in_place.uninstall(reference)
    x = data(1, seed=6)[0]
    with torch.no_grad():
        model(x)
        assert layer in planned_layers(model)
        change(model), change(reference)
        assert torch.equal(model(x), reference(x))


def test_train_mode_is_part_of_the_setting():
    check_after_a_change(Aux(), "dec", lambda m: m.train())


class Alias(nn.Module):
    """Reads its intermediate through a NumPy view after the conv: no Python reference, the same storage."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv3d(2, 8, 3, padding=1)
        self.b = nn.Conv3d(8, 2, 1)
        self.alias = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        if self.alias:
            view = h.detach().numpy()
            return self.b(h) + float(view.mean())
        return self.b(h)


def test_a_tensor_aliased_without_a_reference_is_not_overwritten():
    check_after_a_change(Alias(), "b", lambda m: setattr(m, "alias", True))  # a plain attribute: not in the setting


def test_an_interrupted_trace_leaves_no_mode_behind():
    from torch.overrides import _get_current_function_mode_stack

    model = quantized()

    def interrupt(module: nn.Module, args: tuple) -> None:
        raise KeyboardInterrupt  # a BaseException: torch's always-called hooks do not run

    handle = model.fuse.register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt), torch.no_grad():
        model(data(1)[0])
    handle.remove()
    assert in_place.active_trace() is None and not _get_current_function_mode_stack()
    with torch.no_grad():
        model(data(1)[0])
    assert planned_layers(model) == PLANNED
