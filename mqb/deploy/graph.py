"""Exact rewrites of an exported QDQ ONNX graph that let INT8 runtimes fuse more (no value changes).

An INT8 runtime fuses a ``QuantizeLinear`` into the op that produces its input (OpenVINO folds it into the
convolution's post-ops and writes INT8) only when every consumer of that tensor reads the same quantized value.
mqb quantizes layer *inputs*, so a tensor read by two quantized layers gets two identical quantize chains, and a
``Concat`` feeding a quantized layer is concatenated in float and quantized afterwards. These rewrites fix that
without changing a single output value:

* :func:`merge_duplicate_qdq`: chains ``[Clip ->] QuantizeLinear -> DequantizeLinear`` that read the same tensor
  with bit-identical scale, zero point and clip bounds are computed once (the layers' calibrated input ranges of
  one tensor are equal under the same observer, e.g. a residual unit's first conv and its 1x1 shortcut).
* :func:`drop_requantization`: a chain that reads the output of a bit-identical chain returns its input
  unchanged (the values are on its grid already) and is removed.
* :func:`quantize_concat_inputs`: ``Concat(a, b) -> [Clip] -> Q(S) -> DQ(S)`` becomes
  ``Concat(DQ(Q([Clip] a, S)), DQ(Q([Clip] b, S)))``. Clip, Q and DQ act element by element, so they commute with
  concatenation; the runtime then concatenates INT8 (one byte per voxel) and may fuse each Q into its producer.

Both work on the graph as the exporter writes it (scales, zero points and clip bounds as initializers or
``Constant`` nodes).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any

import numpy as np

_CHAIN_OPS = ("Clip", "QuantizeLinear", "DequantizeLinear")


@dataclass
class QDQChain:
    """``[Clip ->] QuantizeLinear -> DequantizeLinear`` reading ``source``."""

    source: str
    nodes: list[Any]  # onnx.NodeProto, in order

    @property
    def output(self) -> str:
        return self.nodes[-1].output[0]


class _Graph:
    """Producer / consumer / constant lookups over an ``onnx.GraphProto`` (rebuilt after each edit)."""

    def __init__(self, graph: Any) -> None:
        from onnx import numpy_helper

        self.graph = graph
        self.producer = {out: node for node in graph.node for out in node.output}
        self.consumers: dict[str, list[Any]] = collections.defaultdict(list)
        for node in graph.node:
            for name in node.input:
                self.consumers[name].append(node)
        self.constants: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        for node in graph.node:
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.name == "value":
                        self.constants[node.output[0]] = numpy_helper.to_array(attr.t)
        self.outputs = {o.name for o in graph.output}

    def constant(self, name: str) -> np.ndarray | None:
        """The value of a constant input, following ``Identity`` nodes (the exporter aliases shared buffers)."""
        for _ in range(4):
            if name in self.constants:
                return self.constants[name]
            node = self.producer.get(name)
            if node is None or node.op_type != "Identity":
                return None
            name = node.input[0]
        return None

    def only_consumer(self, name: str, op_type: str) -> Any | None:
        nodes = self.consumers.get(name, [])
        if len(nodes) == 1 and nodes[0].op_type == op_type and name not in self.outputs:
            return nodes[0]
        return None

    def chain_from(self, first: Any) -> QDQChain | None:
        """The QDQ chain that starts with ``first`` (a Clip or QuantizeLinear node), or ``None``."""
        nodes = [first]
        if first.op_type == "Clip":
            q = self.only_consumer(first.output[0], "QuantizeLinear")
            if q is None:
                return None
            nodes.append(q)
        elif first.op_type != "QuantizeLinear":
            return None
        dq = self.only_consumer(nodes[-1].output[0], "DequantizeLinear")
        if dq is None:
            return None
        nodes.append(dq)
        if any(self.constant(name) is None for node in nodes for name in node.input[1:] if name):
            return None  # only static, constant scales / bounds
        return QDQChain(first.input[0], nodes)

    def chain_key(self, chain: QDQChain) -> tuple:
        """What the chain computes: op types and the exact bytes of every constant input."""
        key: list[Any] = []
        for node in chain.nodes:
            key.append(node.op_type)
            for attr in sorted(node.attribute, key=lambda a: a.name):
                key.append((attr.name, attr.SerializeToString()))
            for name in node.input[1:]:
                value = self.constant(name) if name else None
                key.append(None if value is None else (value.dtype.str, value.shape, value.tobytes()))
        return tuple(key)


def _rename_input(graph: Any, old: str, new: str) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new


def merge_duplicate_qdq(model: Any) -> int:
    """Compute bit-identical QDQ chains on the same tensor once; returns how many chains were removed."""
    graph = model.graph
    removed = 0
    g = _Graph(graph)
    for source in list(g.consumers):
        starts = [n for n in g.consumers[source] if n.op_type in ("Clip", "QuantizeLinear") and n.input[0] == source]
        chains = [c for c in (g.chain_from(n) for n in starts) if c is not None]
        kept: dict[tuple, QDQChain] = {}
        for chain in chains:
            key = g.chain_key(chain)
            if key not in kept:
                kept[key] = chain
                continue
            if chain.output in g.outputs:
                continue
            _rename_input(graph, chain.output, kept[key].output)
            for node in chain.nodes:
                graph.node.remove(node)
            removed += 1
    return removed


def _chain_ending_at(g: _Graph, dq: Any) -> QDQChain | None:
    """The QDQ chain whose DequantizeLinear is ``dq``, if any."""
    q = g.producer.get(dq.input[0])
    if q is None or q.op_type != "QuantizeLinear":
        return None
    clip = g.producer.get(q.input[0])
    first = clip if clip is not None and clip.op_type == "Clip" and g.only_consumer(clip.output[0], q.op_type) else q
    chain = g.chain_from(first)
    return chain if chain is not None and chain.nodes[-1] is dq else None


def drop_requantization(model: Any) -> int:
    """Remove a QDQ chain that reads the output of a bit-identical chain: its input is already on its grid.

    ``x = q·S`` with ``|q| <= 127`` gives ``round(x / S) = q`` (float32 keeps ``q·S/S`` within far less than half
    a step of ``q``) and passes the Clip at ``±127·S`` unchanged, so the second chain returns its input exactly.
    Such pairs appear when a tensor quantizer (:mod:`mqb.quant.output`) quantizes a producer's output that a
    quantized layer's own input quantizer reads again. Returns how many chains were removed."""
    graph = model.graph
    removed = 0
    g = _Graph(graph)
    for dq in [n for n in graph.node if n.op_type == "DequantizeLinear"]:
        first = _chain_ending_at(g, dq)
        if first is None:
            continue
        key = g.chain_key(first)
        for reader in list(g.consumers.get(dq.output[0], [])):
            if reader.op_type not in ("Clip", "QuantizeLinear") or reader.input[0] != dq.output[0]:
                continue
            second = g.chain_from(reader)
            if second is None or second.output in g.outputs or g.chain_key(second) != key:
                continue
            _rename_input(graph, second.output, dq.output[0])
            for node in second.nodes:
                graph.node.remove(node)
            removed += 1
        if removed:
            g = _Graph(graph)
    return removed


def quantize_concat_inputs(model: Any, float_before: tuple[str, ...] = ()) -> int:
    """Move a QDQ chain that reads a ``Concat`` (and is its only reader) onto each Concat input; returns how many
    Concats now join quantized tensors. A Concat whose quantized value is read only by ops of a type in
    ``float_before`` (e.g. ``ConvTranspose``) is left as it is (see :func:`share_quantization`)."""
    from onnx import helper

    graph = model.graph
    moved = 0
    g = _Graph(graph)
    for concat in [n for n in graph.node if n.op_type == "Concat"]:
        readers = g.consumers.get(concat.output[0], [])
        if len(readers) != 1 or concat.output[0] in g.outputs:
            continue
        chain = g.chain_from(readers[0])
        if chain is None:
            continue
        users = g.consumers.get(chain.output, [])
        if float_before and users and all(n.op_type in float_before for n in users):
            continue
        new_inputs = []
        position = list(graph.node).index(concat)
        inserted = []
        for k, source in enumerate(concat.input):
            previous = source
            for node in chain.nodes:
                out = f"{node.output[0]}/concat_input_{k}"
                inserted.append(
                    helper.make_node(
                        node.op_type,
                        [previous, *node.input[1:]],
                        [out],
                        name=f"{node.name}/concat_input_{k}",
                        **{a.name: helper.get_attribute_value(a) for a in node.attribute},
                    )
                )
                previous = out
            new_inputs.append(previous)
        for node in chain.nodes:
            graph.node.remove(node)
        _rename_input(graph, chain.output, concat.output[0])
        del concat.input[:]
        concat.input.extend(new_inputs)
        for offset, node in enumerate(inserted):
            graph.node.insert(position + offset, node)
        moved += 1
        g = _Graph(graph)
    return moved


def topological_sort(graph: Any) -> None:
    """Reorder ``graph.node`` so every node follows its inputs' producers (stable: keeps the order otherwise)."""
    nodes = list(graph.node)
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    ordered: list[Any] = []
    pending = nodes
    while pending:
        rest = []
        for node in pending:
            if all(name in available for name in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ValueError(f"ONNX graph has a cycle or a missing input at node {rest[0].name!r}")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def drop_unused(graph: Any) -> int:
    """Remove ``Constant`` nodes and initializers nothing reads any more; returns how many were removed."""
    removed = 0
    while True:
        used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if n.op_type == "Constant" and n.output[0] not in used]
        dead_init = [i for i in graph.initializer if i.name not in used]
        if not dead and not dead_init:
            return removed
        for node in dead:
            graph.node.remove(node)
        for init in dead_init:
            graph.initializer.remove(init)
        removed += len(dead) + len(dead_init)


def share_quantization(model: Any, int8_concat: bool = True, float_concat_before: tuple[str, ...] = ()
                       ) -> dict[str, int]:  # fmt: skip
    """The rewrites (the Concat move only with ``int8_concat``, and not for a Concat read only by ops of a type in
    ``float_concat_before``: OpenVINO runs a ConvTranspose that reads an INT8 Concat in f32, slower than its INT8
    kernel on VNNI / AMX CPUs), then duplicates the Concat move may have created; counts of what changed."""
    merged = merge_duplicate_qdq(model)
    concats = quantize_concat_inputs(model, float_concat_before) if int8_concat else 0
    merged += merge_duplicate_qdq(model)
    requantized = drop_requantization(model)
    topological_sort(model.graph)
    drop_unused(model.graph)
    return {"merged_qdq": merged, "quantized_concats": concats, "dropped_requantization": requantized}
