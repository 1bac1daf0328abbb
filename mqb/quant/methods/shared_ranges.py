"""One range per tensor: quantizers that read the same activation, directly or through ``torch.cat``, share it.

mqb quantizes layer *inputs*, so a tensor read by two quantized layers (a residual unit's conv and its 1x1
shortcut) or concatenated into a U-Net decoder (the encoder's skip tensor is also the next encoder stage's input)
is quantized once per reader, each with its own calibrated range. An INT8 runtime then has to quantize that tensor
twice, and the layer that produces it cannot write INT8 directly. Deployment toolkits place one quantizer per
tensor instead (NNCF's "unified scales", TensorRT's explicit quantization of concat inputs). This step does the
same on calibrated mqb quantizers:

* it finds, on one calibration batch, which quantized inputs are the same tensor or a concatenation containing it
  (forward pre-hooks on the quantized layers and a ``TorchFunctionMode`` on ``torch.cat``; tensors are tracked
  by weak reference, so no activation is kept alive);
* every connected group of static, symmetric, per-tensor input quantizers with the same format and bits gets the
  group's largest range, ``amax = max_i amax_i``, so its scale ``S = amax / (2^(N-1) - 1)`` is shared.

Every clipped value stays unclipped (ranges only grow), and the simulated model is what the runtime executes:
:func:`mqb.deploy.export_onnx` then writes one QuantizeLinear per tensor (see :mod:`mqb.deploy.graph`).
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from mqb.quant.api import default_forward
from mqb.quant.layers import QuantLayer
from mqb.quant.methods.base import InputRanges, MethodReport, PTQMethod

_CAT = {torch.cat, torch.concat, torch.concatenate}


class _TensorTokens:
    """Token sets per live tensor: a fresh token for a new tensor, the union of its inputs' tokens for a cat.

    Keyed by ``id`` with a weak reference to check the entry is still that tensor (an id is reused once a tensor
    is freed; ``WeakKeyDictionary`` would compare tensors with ``==``, which is element-wise)."""

    def __init__(self) -> None:
        self.entries: dict[int, tuple[weakref.ref, frozenset[int]]] = {}
        self.counter = itertools.count()

    def of(self, t: torch.Tensor) -> frozenset[int]:
        entry = self.entries.get(id(t))
        if entry is not None and entry[0]() is t:
            return entry[1]
        return self.set(t, frozenset({next(self.counter)}))

    def set(self, t: torch.Tensor, tokens: frozenset[int]) -> frozenset[int]:
        self.entries[id(t)] = (weakref.ref(t), tokens)
        return tokens


class _CatTracker(TorchFunctionMode):
    def __init__(self, tokens: _TensorTokens) -> None:
        super().__init__()
        self.tokens = tokens

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func in _CAT and isinstance(out, torch.Tensor):
            inputs = args[0] if args else (kwargs or {}).get("tensors", ())
            merged = frozenset().union(*(self.tokens.of(t) for t in inputs if isinstance(t, torch.Tensor)))
            self.tokens.set(out, merged)
        return out


def shared_input_groups(
    model: nn.Module, batch: Any, forward: Callable[[nn.Module, Any], Any] | None = None
) -> list[list[str]]:
    """Groups (of >= 2) of quantized layers whose inputs are the same tensor or concatenations sharing one,
    found by running ``forward(model, batch)`` once; layer names in module order."""
    tokens = _TensorTokens()
    seen: dict[str, set[int]] = {}
    names = {id(m): n for n, m in model.named_modules() if isinstance(m, QuantLayer)}
    order = list(names.values())

    def hook(module: nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], torch.Tensor):
            seen.setdefault(names[id(module)], set()).update(tokens.of(args[0]))

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, QuantLayer)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _CatTracker(tokens):
            (forward or default_forward)(model, batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    parent = {name: name for name in seen}

    def root(name: str) -> str:
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    owner: dict[int, str] = {}
    for name, toks in seen.items():
        for tok in toks:
            if tok in owner:
                parent[root(name)] = root(owner[tok])
            else:
                owner[tok] = name
    groups: dict[str, list[str]] = {}
    for name in order:
        if name in seen:
            groups.setdefault(root(name), []).append(name)
    return [g for g in groups.values() if len(g) > 1]


def _shareable(layer: QuantLayer) -> str | None:
    """Why this layer's input range cannot be shared (``None`` if it can)."""
    q = layer.input_quantizer
    if q is None or not layer.quantizers_enabled:
        return "no input quantizer"
    spec = q.spec
    if spec.dynamic or spec.granularity != "per_tensor" or not spec.symmetric:
        return f"input is {spec.short()} (only static symmetric per-tensor ranges are shared)"
    if q.amax is None:
        return "input quantizer is not calibrated"
    return None


class SharedInputRanges(PTQMethod):
    """After calibration, give each group of quantizers that read one tensor the group's largest range."""

    name = "shared_ranges"
    stage = "post_calibration"

    def apply(
        self,
        model: nn.Module,
        ranges: InputRanges | None = None,
        batches: Callable[[], Iterable[Any]] | None = None,
        forward: Callable[[nn.Module, Any], Any] | None = None,
    ) -> MethodReport:
        batch = self.first_batch(batches)  # one forward shows which layers read the same tensor
        report = MethodReport(self.name)
        modules = dict(model.named_modules())
        selected = {name for name, _ in self.selected(model)}
        for group in shared_input_groups(model, batch, forward):
            chosen = [n for n in group if n in selected]
            ok = [n for n in chosen if _shareable(modules[n]) is None]
            report.skipped.update({n: str(_shareable(modules[n])) for n in chosen if n not in ok})
            by_format: dict[tuple[str, int], list[str]] = {}
            for n in ok:
                spec = modules[n].input_quantizer.spec
                by_format.setdefault((spec.format, spec.bits), []).append(n)
            for members in by_format.values():
                if len(members) < 2:
                    report.skipped.update({n: "no other reader of its tensor with the same format" for n in members})
                    continue
                amax = torch.stack([modules[n].input_quantizer.amax.reshape(()) for n in members]).max()
                for n in members:
                    q = modules[n].input_quantizer
                    q.amax = amax.clone().reshape(q.amax.shape)
                report.applied.extend(members)
        return report
