"""The public engine API: quantize, calibrate, dequantize, inspect.

model = quantize(model, QuantRecipe.from_precision("w8a8", scheme="adaptive"))
calibrate(model, calibration_batches)          # static activation ranges (min-max by default)
dequantize(model, ["conv1x3x3"])              # back to float for a layer group (sensitivity studies)
print(summarize(model))
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

import mqb.quant.attention  # noqa: F401  (registers the attention twins)
from mqb.quant import in_place
from mqb.quant.fake_quant import check_kernel
from mqb.quant.layers import LayerInfo
from mqb.quant.output import detach_for_readers
from mqb.quant.quantizer import TensorQuantizer, module_device
from mqb.quant.recipe import LayerPlan, QuantRecipe
from mqb.quant.registry import QuantModule, describe, quant_class, swap_in, swap_out
from mqb.quant.selectors import VALID_SELECTORS, matches_any, validate_selector


def used_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``model.named_modules()`` without the sub-modules its ``forward`` never runs.

    A network that keeps such modules only so that checkpoints load (VISTA3D's interactive point head, say)
    names them in a ``mqb_unused_modules`` attribute (module-name prefixes); mqb neither quantizes nor lists them.
    """
    unused = tuple(getattr(model, "mqb_unused_modules", ()))
    for name, module in model.named_modules():
        if not any(name == prefix or name.startswith(prefix + ".") for prefix in unused):
            yield name, module


def quantizable_layers(model: nn.Module) -> list[LayerInfo]:
    """Every float layer of ``model`` that mqb knows how to quantize, in module order."""
    return [info for name, module in used_modules(model) if (info := describe(name, module)) is not None]


def quantized_layers(model: nn.Module) -> Iterator[tuple[str, QuantModule]]:
    """(name, layer) for every quantized layer of ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, QuantModule):
            yield name, module


def plan(model: nn.Module, recipe: QuantRecipe) -> list[LayerPlan]:
    """What :func:`quantize` would do, layer by layer, without changing the model."""
    return [p for info in quantizable_layers(model) if (p := recipe.plan(info)) is not None]


def quantize(model: nn.Module, recipe: QuantRecipe, *, inplace: bool = True) -> nn.Module:
    """Replace the layers selected by ``recipe`` with fake-quantized twins and return the model.

    Static activation scales must then be calibrated with :func:`calibrate`; weight scales are computed from
    the weights at the first forward. Raises ``ValueError`` if the model is already quantized.
    """
    if not isinstance(recipe, QuantRecipe):
        raise TypeError(f"recipe must be a mqb.quant.QuantRecipe, got {type(recipe).__name__}")
    already = [name for name, _ in quantized_layers(model)]
    if already:
        raise ValueError(f"model is already quantized ({len(already)} layers, e.g. {already[0]!r}); dequantize first")
    if not inplace:
        model = copy.deepcopy(model)
    modules = dict(model.named_modules())
    done: list[nn.Module] = []
    try:
        for layer_plan in plan(model, recipe):
            module = modules[layer_plan.info.name]
            swap_in(module, layer_plan.info, layer_plan.weight, layer_plan.activation)
            done.append(module)
    except Exception:
        for module in done:  # leave nothing half-quantized
            swap_out(module)  # type: ignore[arg-type]
        raise
    in_place.install(model)  # inputs that nothing reads again are quantized in place (no copy)
    return model


def set_kernel(model: nn.Module, kernel: str) -> int:
    """How every quantizer of ``model`` runs its fake quantization: ``auto``, ``eager`` or ``compiled`` (the
    ``quant.kernel`` setting of ``mqb.eval``; :mod:`mqb.quant.fake_quant`). Every choice gives the same result to
    the bit. Operand quantizers that a quantized attention block creates at its first forward inherit the block's
    setting. Returns the number of quantizers and attention blocks set; ``ValueError`` for another value.
    """
    check_kernel(kernel)
    count = 0
    for module in model.modules():
        if isinstance(module, TensorQuantizer):
            module.kernel = kernel
            count += 1
        elif isinstance(module, QuantModule) and module.set_kernel(kernel):
            count += 1
    return count


def _storages(value: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict) and depth < 3:
        for item in value.values():
            yield from _storages(item, depth + 1)
    elif isinstance(value, (list, tuple)) and depth < 3:
        for item in value:
            yield from _storages(item, depth + 1)


def held_bytes(model: nn.Module) -> int:
    """Bytes of tensor storage ``model`` holds: parameters, buffers and tensors kept in module attributes
    (quantizer scales, a float weight kept for ``dequantize`` ...), each storage counted once.

    What a quantized model costs beside its float parameters: ``held_bytes(quantized) / held_bytes(float)``.
    """
    seen: set[tuple[str, int]] = set()
    total = 0
    for module in model.modules():
        for name, value in vars(module).items():
            if name == "_modules":
                continue
            for tensor in _storages(value):
                storage = tensor.untyped_storage()
                key = (str(tensor.device), storage.data_ptr() or id(storage))
                if key not in seen:
                    seen.add(key)
                    total += storage.nbytes()
    return total


def needs_calibration(model: nn.Module) -> bool:
    """Whether any quantized layer of ``model`` has static activation ranges that :func:`calibrate` must set."""
    for _, layer in quantized_layers(model):
        spec = layer.activation_spec
        if spec is not None and not spec.dynamic:
            return True
    return False


def default_forward(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, dict):
        if "image" not in batch:
            raise ValueError(f"calibration batch is a dict without an 'image' key (keys: {sorted(batch)})")
        return model(batch["image"])
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return model(batch[0])
    raise TypeError(
        f"cannot feed a calibration batch of type {type(batch).__name__}: pass tensors, (image, ...) tuples, "
        "dicts with 'image', or forward=callable(model, batch)"
    )


@contextlib.contextmanager
def inference_state(model: nn.Module) -> Iterator[None]:
    """Run statistics passes in the model's inference state, and give every module its own flag back after.

    A model whose top level is in training mode (a freshly built ``nn.Module``) is put in eval mode for the pass;
    a model in eval mode is run as it is, so submodules a user deliberately keeps in training mode (norms that use
    instance statistics at inference) stay so. Afterwards, also on error, **every** module's ``training`` flag is
    what it was (``model.train(flag)`` would set them all alike).
    """
    flags = [(m, m.training) for m in model.modules()]
    if model.training:
        model.eval()
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag


def run_batches(
    model: nn.Module,
    batches: Iterable[Any],
    forward: Callable[[nn.Module, Any], Any] | None = None,
    hooks: Iterable[torch.utils.hooks.RemovableHandle] = (),
    max_batches: int | None = None,
) -> int:
    """Run ``forward(model, batch)`` (default :func:`default_forward`) over ``batches`` in eval mode without
    gradients (:func:`inference_state`); afterwards, also on error, remove ``hooks`` and restore every module's
    training flag. Returns the batch count.

    The common loop of every statistics pass (input ranges, bias correction, GPTQ Hessians, proxies).
    """
    run = forward or default_forward
    seen = 0
    try:
        with inference_state(model), torch.no_grad():
            for batch in batches:
                if max_batches is not None and seen >= max_batches:
                    break
                run(model, batch)
                seen += 1
    finally:
        for h in hooks:
            h.remove()
    return seen


def calibrate(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    max_batches: int | None = None,
) -> nn.Module:
    """Observe the float model on ``batches`` and freeze the static activation ranges.

    During calibration every quantizer passes tensors through unchanged, so the statistics are those of the
    float model (as in the paper and in ModelOpt/TensorRT). ``forward(model, batch)`` customises how a batch is
    run, e.g. sliding-window inference over a whole volume. Run in the model's inference state, every module's
    train/eval flag restored after (:func:`inference_state`).
    """
    layers = [layer for _, layer in quantized_layers(model)]
    if not layers:
        raise ValueError("calibrate: the model has no quantized layers; call mqb.quant.quantize first")
    quantizers = [m for m in model.modules() if isinstance(m, TensorQuantizer)]
    run = forward or default_forward
    with inference_state(model):
        for q in quantizers:
            q.begin_calibration()
        for layer in layers:
            layer.set_calibrating(True)
        seen = 0
        try:
            with torch.no_grad():
                for batch in batches:
                    if max_batches is not None and seen >= max_batches:
                        break
                    run(model, batch)
                    seen += 1
            if seen == 0:
                raise ValueError("calibrate: the calibration batches were empty")
            for q in model.modules():
                if isinstance(q, TensorQuantizer):
                    q.end_calibration()
        finally:
            for layer in layers:
                layer.set_calibrating(False)
            for q in model.modules():
                if isinstance(q, TensorQuantizer) and q.mode == "calibrate":
                    q._observer = None
                    q.mode = "quantize"
    return model


def collect_input_ranges(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    forward: Callable[[nn.Module, Any], Any] | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """Per-channel min/max of the input of every conv / conv-transpose / linear layer of a float model.

    One pass serves every min-max recipe: per-tensor ranges are the extremes of the per-channel ones, and the
    bit width does not enter min-max calibration. Apply them with :func:`apply_input_ranges`.
    """
    modules = dict(model.named_modules())
    stats: dict[str, dict[str, torch.Tensor]] = {}

    def make_hook(name: str, axis: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach()
            dims = [d for d in range(x.ndim) if d != axis % x.ndim]
            lo, hi = x.amin(dim=dims).float(), x.amax(dim=dims).float()
            old = stats.get(name)
            if old is not None:
                lo, hi = torch.minimum(old["lo"], lo), torch.maximum(old["hi"], hi)
            stats[name] = {"lo": lo, "hi": hi}

        return hook

    hooks = [
        modules[info.name].register_forward_pre_hook(make_hook(info.name, -1 if info.kind == "linear" else 1))
        for info in quantizable_layers(model)
        if quant_class(modules[info.name]).takes_input_ranges  # type: ignore[union-attr]
    ]
    run_batches(model, batches, forward, hooks)
    if not stats:
        raise ValueError("collect_input_ranges: no quantizable layer saw any data")
    return stats


def _input_ndim(layer: QuantModule) -> int | None:
    """The rank of a quantized layer's input (batched), ``None`` where the layer does not fix it (GroupNorm)."""
    info = layer.mqb_info
    if info.kind == "linear":
        return 2
    if info.kind == "norm":
        if isinstance(layer, nn.modules.instancenorm._InstanceNorm):
            return layer._get_no_batch_dim() + 1  # InstanceNorm3d: 5 (N, C, D, H, W)
        return None
    return 2 + len(info.kernel)


def apply_input_ranges(model: nn.Module, ranges: dict[str, dict[str, torch.Tensor]]) -> None:
    """Set every static min-max activation range of a quantized model from :func:`collect_input_ranges` output.

    Equivalent to :func:`calibrate` with the same batches for min-max observers (tested). Raises ``ValueError``
    for a static quantizer that needs another observer or a layer missing from ``ranges``.
    """
    model_device = module_device(model)  # ranges may come from a CPU cache; a layer without tensors uses this
    for name, layer in quantized_layers(model):
        spec = layer.activation_spec
        if spec is None or spec.dynamic:
            continue
        if not layer.takes_input_ranges or spec.observer != "minmax":
            raise ValueError(f"{name}: static {spec.observer} ranges cannot come from per-channel min/max statistics")
        if name not in ranges:
            raise ValueError(f"{name}: no collected input range (was the model changed after collection?)")
        device = layer.input_quantizer.device or module_device(layer) or model_device
        lo, hi = ranges[name]["lo"].to(device), ranges[name]["hi"].to(device)
        if spec.granularity == "per_tensor":
            lo, hi = lo.min().reshape(1), hi.max().reshape(1)
        amax = torch.maximum(lo.abs(), hi.abs())
        ndim = _input_ndim(layer)
        if ndim is None and spec.granularity != "per_tensor":
            raise ValueError(
                f"{name}: the rank of a {layer.mqb_info.type_name} input is unknown before it runs, so per-channel "
                "ranges cannot be shaped for it; calibrate with mqb.quant.calibrate instead"
            )
        layer.input_quantizer.load_ranges({"amax": amax, "lo": lo, "hi": hi}, ndim or 1)


def dequantize(model: nn.Module, layers: Iterable[str] | str = ("all",)) -> list[str]:
    """Return the quantized layers matching any selector in ``layers`` to float; returns their names.

    Raises ``ValueError`` if a selector is invalid or matches no quantized layer (a typo would otherwise
    silently leave everything quantized).
    """
    selectors = (layers,) if isinstance(layers, str) else tuple(layers)
    for s in selectors:
        validate_selector(s)
    quantized = list(quantized_layers(model))
    chosen: dict[str, QuantModule] = {}
    for selector in selectors:
        hit = {n: m for n, m in quantized if matches_any((selector,), m.mqb_info)}
        if not hit:
            kinds = sorted({t for _, m in quantized for t in m.mqb_info.tags if not t.startswith("type:")})
            raise ValueError(
                f"dequantize: selector {selector!r} matches no quantized layer; quantized layer tags: {kinds}; "
                f"valid selectors: {VALID_SELECTORS}"
            )
        chosen.update(hit)
    for module in chosen.values():
        swap_out(module)
    detach_for_readers(model, chosen)  # a dequantized layer reads float again
    if not any(True for _ in quantized_layers(model)):
        in_place.uninstall(model)
    return list(chosen)
