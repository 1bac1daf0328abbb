"""Instance / group normalization that a runtime computes as accurately as torch: mean and variance reduced one
axis at a time.

ONNX ``InstanceNormalization`` (also what the exporter writes for ``GroupNorm``: a reshape to ``[N, G, L]``,
the op, a reshape back) normalizes each channel over its whole volume:

.. math::

    y = \\frac{x - \\mu}{\\sqrt{\\sigma^2 + \\epsilon}}\\,\\gamma + \\beta,\\qquad
    \\mu = \\frac{1}{L}\\sum_i x_i,\\qquad \\sigma^2 = \\frac{1}{L}\\sum_i (x_i - \\mu)^2

(Ulyanov et al. 2016, *Instance Normalization*, eq. 2; ONNX operator spec). ONNX Runtime's CPU kernel sums the
``L = D·H·W`` terms of a channel in one float32 pass: at 96³ (884 736 voxels) its output is off by 5.9e-5 where
torch's is off by 8e-7 (max error against float64, one ``InstanceNorm3d``), and a trained nnU-Net's FP32 output by
3.6e-3 of its largest logit where torch's is off by 5e-7. After INT8 quantization that moves activations across
rounding boundaries: the deployed network agreed with mqb's fake quantization less than two exact computations of
the same network do (:func:`mqb.deploy.agreement.float64_twin`).

:func:`axiswise_norms` rewrites every ``InstanceNormalization`` node of the main graph into the same formula with
each sum taken over one axis at a time (``ReduceMean`` over W, then H, then D: sums of at most ``max(D, H, W)``
terms), which ONNX Runtime computes within 3x of torch's error (2.0-2.7x in ``tests/deploy/test_norms.py``, its
fused kernel 11-33x). A ``[N, G, L]`` input (a group norm) is viewed as ``[N, G, a, b, c]`` first, ``a·b·c = L``
with each factor near ``L^(1/3)`` (:func:`volume_view`). The values are the formula's, so the
rewrite changes an output by float32 rounding only, and costs ONNX Runtime no measurable time on an INT8 nnU-Net at
96³ (1.85 s either way on a 2-core AVX-512 VNNI EPYC). That network's INT8 agreement with mqb's fake quantization
(argmax Dice) goes from 0.987 / 0.988 to 0.990 / 0.991 on VNNI / AVX2-only kernels: its rounding floor, 0.990 /
0.991. :class:`mqb.deploy.runtimes.OrtRuntime` loads a rewritten copy (:func:`axiswise_copy`, ``axiswise_norms=True``).

Not for OpenVINO: it fuses the plain op into its MVN kernel, which reads INT8 from a quantized convolution. The
rewritten form runs 20-35 % slower there (INT8 nnU-Net, 96³), and OpenVINO merges the per-axis reductions back into
one per statistic (44 ``Reduce`` nodes executed for 22 norms), summed less accurately than its MVN (FP32 nnU-Net
1.5e-2 of the largest logit off torch-float64, against 3.3e-3 with MVN).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

#: ONNX element type -> numpy type of the float inputs InstanceNormalization takes (the epsilon constant's type)
FLOAT_TYPES = {10: np.float16, 1: np.float32, 11: np.float64}  # TensorProto.FLOAT16, FLOAT, DOUBLE


def _shapes(model: Any) -> dict[str, tuple[list[int | None], int]]:
    """name -> (dims, ``None`` where symbolic; ONNX element type) of every tensor whose shape ONNX shape inference
    knows."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    shapes: dict[str, tuple[list[int | None], int]] = {}
    for info in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output):
        tensor = info.type.tensor_type
        if tensor.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
            shapes[info.name] = (dims, tensor.elem_type)
    return shapes


def volume_view(length: int) -> tuple[int, int, int] | None:
    """``(a, b, c)`` with ``a·b·c == length``: ``c`` the largest divisor of ``length`` not above its cube root,
    ``b`` the largest divisor of ``length / c`` not above its square root; ``None`` where ``length`` is prime. How
    much the sums shorten depends on the divisors: ``2·p`` (``p`` prime) gives ``(p, 1, 2)``, sums of ``p`` terms.
    """

    def largest_divisor_up_to(n: int, bound: int) -> int:
        return next(d for d in range(max(bound, 1), 0, -1) if n % d == 0)

    cube_root = round(length ** (1 / 3))
    cube_root -= cube_root**3 > length
    c = largest_divisor_up_to(length, cube_root)
    b = largest_divisor_up_to(length // c, math.isqrt(length // c))
    return None if b == c == 1 else (length // (b * c), b, c)


def _opset(model: Any) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


class _Nodes:
    """The nodes and constants replacing one norm, named ``<norm>/<suffix>``."""

    def __init__(self, model: Any, name: str) -> None:
        self.graph, self.name, self.opset, self.nodes = model.graph, name, _opset(model), []

    def const(self, suffix: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        tensor = numpy_helper.from_array(value, f"{self.name}/{suffix}")
        self.graph.initializer.append(tensor)
        return tensor.name

    def op(self, kind: str, inputs: list[str], suffix: str, out: str | None = None, **attrs: Any) -> str:
        from onnx import helper

        out = out or f"{self.name}/{suffix}"
        self.nodes.append(helper.make_node(kind, inputs, [out], name=f"{self.name}/{suffix}", **attrs))
        return out

    def mean(self, x: str, axes: list[int], what: str) -> str:
        """``ReduceMean`` over each axis in turn (keeping dims)."""
        for axis in axes:
            if self.opset >= 18:  # axes became an input in opset 18
                x = self.op("ReduceMean", [x, self.const(f"{what}_{axis}_axes", np.array([axis], np.int64))],
                            f"{what}_{axis}", keepdims=1)  # fmt: skip
            else:
                x = self.op("ReduceMean", [x], f"{what}_{axis}", axes=[axis], keepdims=1)
        return x


def _axiswise(model: Any, node: Any, dims: list[int | None], elem_type: int) -> list[Any] | None:
    """The nodes computing ``node`` (an ``InstanceNormalization`` whose input has static ``dims[1:]``) with
    axis-wise sums, or ``None`` where its input cannot be viewed so."""
    new = _Nodes(model, node.name or node.output[0])
    x, rank, grouped = node.input[0], len(dims), len(dims) == 3
    if grouped:  # [N, G, L] (a group norm): view as [N, G, a, b, c]
        view = volume_view(int(dims[2]))  # type: ignore[arg-type]
        if view is None:
            return None
        x = new.op("Reshape", [x, new.const("view_shape", np.array([0, 0, *view], np.int64))], "view")
        rank = 5
    axes = list(range(rank - 1, 1, -1))
    centred = new.op("Sub", [x, new.mean(x, axes, "mean")], "centred")
    variance = new.mean(new.op("Mul", [centred, centred], "square"), axes, "variance")
    eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
    dtype = FLOAT_TYPES[elem_type]
    shifted = new.op("Add", [variance, new.const("epsilon", np.array(eps, dtype))], "variance_eps")
    inv_std = new.op("Reciprocal", [new.op("Sqrt", [shifted], "std")], "inv_std")
    per_channel = new.const("per_channel", np.array([-1] + [1] * (rank - 2), np.int64))
    gain = new.op("Mul", [inv_std, new.op("Reshape", [node.input[1], per_channel], "gamma")], "gain")
    beta = new.op("Reshape", [node.input[2], per_channel], "beta")
    y = new.op("Add", [new.op("Mul", [centred, gain], "scaled"), beta], "y", out=None if grouped else node.output[0])
    if grouped:  # back to [N, G, L]
        new.op("Reshape", [y, new.op("Shape", [node.input[0]], "shape")], "unview", out=node.output[0])
    return new.nodes


def axiswise_norms(model: Any) -> int:
    """Rewrite each ``InstanceNormalization`` of an ``onnx.ModelProto``'s main graph (not inside ``If`` / ``Loop``
    bodies) into mean and variance reduced one axis at a time, in place; returns how many.

    The new nodes are named ``<norm>/...`` (runtime reports add up their times as the norm's) and the output keeps
    its name. Left as they are: norms whose input rank or float type shape inference cannot tell, ``[N, G, L]``
    inputs whose ``L`` it cannot tell or is prime, and every norm of a model of 2 GiB or more (protobuf's limit:
    shape inference cannot read it).
    """
    if model.ByteSize() >= 2**31:
        return 0
    shapes = _shapes(model)
    rewritten = 0
    nodes: list[Any] = []
    for node in model.graph.node:
        dims, elem_type = shapes.get(node.input[0], ([], 0)) if node.op_type == "InstanceNormalization" else ([], 0)
        new = None  # rank 4+: any spatial size (ReduceMean takes the axis); rank 3 needs L to find the view
        if elem_type in FLOAT_TYPES and (len(dims) >= 4 or (len(dims) == 3 and dims[2] is not None)):
            new = _axiswise(model, node, dims, elem_type)
        nodes.extend(new or [node])
        rewritten += new is not None
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return rewritten


def axiswise_copy(path: str | os.PathLike[str], directory: str | os.PathLike[str]) -> tuple[Path, int]:
    """``(file to load, norms rewritten)``: the ONNX file at ``path`` with :func:`axiswise_norms` applied, saved into
    ``directory`` under the same name, or ``path`` itself where nothing was rewritten. ONNX Runtime loads the copy
    from disk: a session built from the serialized bytes holds about twice the model's size more memory (measured
    on the nnU-Net)."""
    import onnx

    path = Path(path)
    model = onnx.load(str(path))
    rewritten = axiswise_norms(model)
    if not rewritten:
        return path, 0
    copy = Path(directory) / path.name
    onnx.save(model, str(copy))
    return copy, rewritten
