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
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from mqb.quant.api import default_forward, inference_state
from mqb.quant.layers import QuantLayer
from mqb.quant.live import LiveTensors, tensor_version
from mqb.quant.methods.base import InputRanges, MethodReport, PTQMethod
from mqb.quant.output import OUTPUT_QUANTIZER, attach_output_quantizer, make_output_quantizer

_CAT = {torch.cat, torch.concat, torch.concatenate}


class _TensorTokens:
    """Token sets per live tensor: a fresh token for a new tensor, the union of its inputs' tokens for a cat.

    Kept in :class:`mqb.quant.live.LiveTensors`.

    Two keys per tensor. Its *tokens* follow the tensor object, written in place or not: they group the quantizers
    that share a range (as before in-place writes were told apart, so shared ranges are unchanged). Its *values*
    follow what it holds: a tensor written in place since it was last seen (``Tensor._version`` moved on: an
    in-place activation such as nnU-Net's ``LeakyReLU(inplace=True)``, ``out += residual``) holds a new value, and
    an output quantizer belongs where the value its readers read was produced, not where the storage was."""

    def __init__(self) -> None:
        self.entries: LiveTensors[frozenset[int]] = LiveTensors()
        self.value_entries: LiveTensors[tuple[int, frozenset[int]]] = LiveTensors()
        self.counter = itertools.count()

    def known(self, t: torch.Tensor) -> bool:
        return self.entries.get(t) is not None

    def of(self, t: torch.Tensor) -> frozenset[int]:
        tokens = self.entries.get(t)
        return tokens if tokens is not None else self.set(t, frozenset({next(self.counter)}))

    def set(self, t: torch.Tensor, tokens: frozenset[int]) -> frozenset[int]:
        return self.entries.set(t, tokens)

    def _current_values(self, t: torch.Tensor) -> frozenset[int] | None:
        entry = self.value_entries.get(t)
        return entry[1] if entry is not None and entry[0] == tensor_version(t) else None

    def value_known(self, t: torch.Tensor) -> bool:
        """Whether ``t`` was seen holding what it holds now (not written in place since)."""
        return self._current_values(t) is not None

    def values(self, t: torch.Tensor) -> frozenset[int]:
        """The values ``t`` holds now: a fresh one for a new or since rewritten tensor, its inputs' for a cat."""
        values = self._current_values(t)
        return values if values is not None else self.set_values(t, frozenset({next(self.counter)}))

    def set_values(self, t: torch.Tensor, values: frozenset[int]) -> frozenset[int]:
        self.value_entries.set(t, (tensor_version(t), values))
        return values


class _CatTracker(TorchFunctionMode):
    def __init__(self, tokens: _TensorTokens) -> None:
        super().__init__()
        self.tokens = tokens

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func in _CAT and isinstance(out, torch.Tensor):
            inputs = args[0] if args else (kwargs or {}).get("tensors", ())
            tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
            self.tokens.set(out, frozenset().union(*(self.tokens.of(t) for t in tensors)))
            self.tokens.set_values(out, frozenset().union(*(self.tokens.values(t) for t in tensors)))
        return out


@dataclass
class InputTrace:
    """What one forward showed: the tokens of each quantized layer's input (per call: a sliding-window forward
    calls every layer once per patch), and the leaf module that produced each token (a tensor first seen as that
    module's output); and the same by value (:class:`_TensorTokens`): the values each call read, and the leaf
    module that produced each value (a tensor first seen as its output, or one it wrote in place: the last writer,
    e.g. the in-place LeakyReLU after nnU-Net's InstanceNorm, not the norm)."""

    calls: list[tuple[str, frozenset[int]]]
    producers: dict[int, str]
    order: list[str]
    reads: list[tuple[str, frozenset[int]]] = field(default_factory=list)
    writers: dict[int, str] = field(default_factory=dict)

    @property
    def inputs(self) -> dict[str, set[int]]:
        """Every token each quantized layer read, over all its calls."""
        out: dict[str, set[int]] = {}
        for name, toks in self.calls:
            out.setdefault(name, set()).update(toks)
        return out

    def readers(self, by_value: bool = False) -> dict[int, tuple[set[str], bool]]:
        """Per token (per value with ``by_value``): the quantized layers that read it (alone or inside a
        concatenation), and whether one read it alone (the tensor itself, not a concatenation containing it)."""
        out: dict[int, tuple[set[str], bool]] = {}
        for name, toks in self.reads if by_value else self.calls:
            for tok in toks:
                names, alone = out.get(tok, (set(), False))
                names.add(name)
                out[tok] = (names, alone or toks == {tok})
        return out

    def groups(self) -> list[list[str]]:
        """Groups (of >= 2) of quantized layers whose inputs share a token, in module order."""
        inputs = self.inputs
        parent = {name: name for name in inputs}

        def root(name: str) -> str:
            while parent[name] != name:
                parent[name] = parent[parent[name]]
                name = parent[name]
            return name

        owner: dict[int, str] = {}
        for name, toks in inputs.items():
            for tok in toks:
                if tok in owner:
                    parent[root(name)] = root(owner[tok])
                else:
                    owner[tok] = name
        groups: dict[str, list[str]] = {}
        for name in self.order:
            if name in inputs:
                groups.setdefault(root(name), []).append(name)
        return [g for g in groups.values() if len(g) > 1]


def trace_inputs(model: nn.Module, batch: Any, forward: Callable[[nn.Module, Any], Any] | None = None) -> InputTrace:
    """Run ``forward(model, batch)`` once and record, for every quantized layer, which tensors its input is made of
    (through ``torch.cat``), and which leaf module produced each tensor."""
    tokens = _TensorTokens()
    calls: list[tuple[str, frozenset[int]]] = []
    reads: list[tuple[str, frozenset[int]]] = []
    producers: dict[int, str] = {}
    writers: dict[int, str] = {}
    names = {id(m): n for n, m in model.named_modules()}
    quantized = [m for m in model.modules() if isinstance(m, QuantLayer)]

    def pre_hook(module: nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], torch.Tensor):
            calls.append((names[id(module)], tokens.of(args[0])))
            reads.append((names[id(module)], tokens.values(args[0])))

    def post_hook(module: nn.Module, args: tuple, output: Any) -> None:
        if not isinstance(output, torch.Tensor):
            return
        if not tokens.known(output):
            (tok,) = tokens.of(output)
            producers[tok] = names[id(module)]
        if not tokens.value_known(output):  # a new tensor, or one this module wrote in place
            (value,) = tokens.values(output)
            writers[value] = names[id(module)]

    leaves = [m for m in model.modules() if isinstance(m, QuantLayer) or next(m.children(), None) is None]
    handles = [m.register_forward_pre_hook(pre_hook) for m in quantized]
    handles += [m.register_forward_hook(post_hook) for m in leaves]
    try:
        with inference_state(model), torch.no_grad(), _CatTracker(tokens):
            (forward or default_forward)(model, batch)
    finally:
        for h in handles:
            h.remove()
    return InputTrace(calls, producers, [names[id(m)] for m in quantized], reads, writers)


def shared_input_groups(
    model: nn.Module, batch: Any, forward: Callable[[nn.Module, Any], Any] | None = None
) -> list[list[str]]:
    """Groups (of >= 2) of quantized layers whose inputs are the same tensor or concatenations sharing one,
    found by running ``forward(model, batch)`` once; layer names in module order."""
    return trace_inputs(model, batch, forward).groups()


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
    """After calibration, give each group of quantizers that read one tensor the group's largest range.

    A PTQ method step like the others (``method.shared_ranges`` / ``method.output_quantizers`` of ``mqb.eval``; it
    runs first among the post-calibration steps).

    Args:
        layers: selectors of the quantized layers whose ranges may change.
        output_quantizers: also quantize each such tensor where it is produced (an output quantizer,
            :mod:`mqb.quant.output`; ModelOpt's ``output_quantizer``), when a leaf module produces it and all its
            quantized readers now share one range: float readers of the tensor (a residual Add) then read the
            quantized value too, as NNCF / TensorRT place quantizers. ``quantize_tensors`` is its deprecated name.
            The quantizer goes where the value the readers read was produced: after the last module that wrote the
            tensor in place (nnU-Net's and MONAI's ``LeakyReLU(inplace=True)`` after an InstanceNorm), so it
            quantizes what the readers read, once; on the norm it would quantize the value before the activation
            rewrote it and the readers would quantize the result a second time. A value last written in place by a
            function, not a module (``out += residual``), has no module to hold the quantizer and gets none.
        in_place_writers: ``False`` puts the output quantizer where the tensor object was first produced, ahead of
            any in-place module (mqb before output-quantizer placement v2; the double quantization above), for A/B
            measurements of that form only.
    """

    name = "shared_ranges"
    stage = "post_calibration"

    def __init__(
        self,
        layers: Sequence[str] | str = ("all",),
        output_quantizers: bool = False,
        *,
        quantize_tensors: bool | None = None,
        in_place_writers: bool = True,
    ) -> None:
        super().__init__(layers)
        if quantize_tensors is not None:
            warnings.warn("SharedInputRanges(quantize_tensors=...) is deprecated: use output_quantizers=",
                          DeprecationWarning, stacklevel=2)  # fmt: skip
            output_quantizers = output_quantizers or quantize_tensors
        self.output_quantizers = output_quantizers
        self.in_place_writers = in_place_writers

    @property
    def quantize_tensors(self) -> bool:
        """Deprecated name of :attr:`output_quantizers`."""
        return self.output_quantizers

    def apply(
        self,
        model: nn.Module,
        ranges: InputRanges | None = None,
        batches: Callable[[], Iterable[Any]] | None = None,
        forward: Callable[[nn.Module, Any], Any] | None = None,
    ) -> MethodReport:
        trace = trace_inputs(model, self.first_batch(batches), forward)  # which layers read the same tensor
        report = MethodReport(self.name)
        modules = dict(model.named_modules())
        selected = {name for name, _ in self.selected(model)}
        for group in trace.groups():
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
        if self.output_quantizers:
            report.outputs = self._attach_output_quantizers(trace, modules, selected, self.in_place_writers)
        return report

    @staticmethod
    def _attach_output_quantizers(
        trace: InputTrace, modules: dict[str, nn.Module], selected: set[str], in_place_writers: bool = True
    ) -> list[str]:
        """Attach an output quantizer to each producer whose quantized readers all share one range and spec.

        With ``in_place_writers`` the producer of a value is the last module that wrote it (:class:`InputTrace`),
        and a module gets a quantizer only if every value it wrote in the traced forward qualifies, with one range:
        its hook quantizes every call's output, so a module called at two places (MONAI's blocks call one
        ``lrelu`` after each norm) must not carry one place's range to the other, nor quantize a value no quantized
        layer reads."""
        if not in_place_writers:
            return SharedInputRanges._attach_at_first_producers(trace, modules, selected)
        by_value = trace.readers(by_value=True)
        per_module: dict[str, list[tuple[tuple | None, list[str]]]] = {}
        for value, producer in trace.writers.items():
            found, alone = by_value.get(value, (set(), False))
            readers = sorted(found, key=trace.order.index)
            key = None
            if alone and all(n in selected and _shareable(modules[n]) is None for n in readers):
                keys = {(modules[n].input_quantizer.spec, float(modules[n].input_quantizer.amax.reshape(())))
                        for n in readers}  # fmt: skip
                key = next(iter(keys)) if len(keys) == 1 else None
            per_module.setdefault(producer, []).append((key, readers))
        attached = []
        for producer, entries in per_module.items():
            if len({key for key, _ in entries}) != 1 or entries[0][0] is None:
                continue
            if OUTPUT_QUANTIZER in modules[producer]._modules:
                continue
            readers = sorted({n for _, names in entries for n in names}, key=trace.order.index)
            quantizer = make_output_quantizer(modules[readers[0]].input_quantizer, f"{producer}.output")
            attach_output_quantizer(modules[producer], quantizer, readers)
            attached.append(producer)
        return attached

    @staticmethod
    def _attach_at_first_producers(trace: InputTrace, modules: dict[str, nn.Module], selected: set[str]) -> list[str]:
        """The placement before v2 (``in_place_writers=False``): at the module that first produced each tensor."""
        attached = []
        by_token = trace.readers()
        for token, producer in trace.producers.items():
            found, alone = by_token.get(token, (set(), False))
            readers = sorted(found, key=trace.order.index)
            if not alone:
                continue  # only read inside concatenations (or not at all): their readers quantize those
            if any(n not in selected or _shareable(modules[n]) is not None for n in readers):
                continue
            quantizers = [modules[n].input_quantizer for n in readers]
            if len({(q.spec, float(q.amax.reshape(()))) for q in quantizers}) != 1:
                continue
            if OUTPUT_QUANTIZER in modules[producer]._modules:
                continue
            quantizer = make_output_quantizer(quantizers[0], f"{producer}.output")
            attach_output_quantizer(modules[producer], quantizer, readers)
            attached.append(producer)
        return attached
