"""Inference runtimes for exported models, behind one protocol: ``runtime(x: np.ndarray) -> np.ndarray``.

* :class:`OrtRuntime`: ONNX Runtime, CPU execution provider (QDQ models run through ORT's QDQ transformers).
* :class:`OpenVINORuntime`: OpenVINO CPU plugin reading the (QDQ) ONNX file. ``precision`` sets the
  ``INFERENCE_PRECISION_HINT`` (``f32``, ``bf16``, ``f16``; ``None`` keeps the plugin default, which is ``bf16``
  on CPUs with AVX512-BF16/AMX). INT8 comes from the Q/DQ pairs, which OpenVINO turns into FakeQuantize and its
  low-precision transformations into INT8 kernels. Each activation Q/DQ pair is first rewritten into the one
  FakeQuantize with a float output range that NNCF writes (:func:`fake_quantize_form`; the same values): OpenVINO
  fuses that form as it fuses NNCF's own INT8 (the convolution or MVN writes INT8, a Concat joins INT8), and on
  CPUs without AMX it computes an INT8 Concat of ONNX Q/DQ pairs wrongly and of this form exactly (measured by
  :func:`openvino_exactness`). mqb's narrow INT8 grid (±127) is written to ONNX as
  ``Clip -> QuantizeLinear``; :func:`narrow_fake_quantize` folds each such pair into one FakeQuantize with 255
  levels (the same values, and it keeps the Clip from blocking OpenVINO's fusions). The fold is applied only where
  :func:`openvino_exactness` finds that this CPU plugin computes it exactly: OpenVINO 2026.4 on an AVX-512 VNNI
  CPU without AMX shifted a folded 255-level input by half a step (exact on AMX), while the unfolded Clip is exact
  everywhere.
* :class:`TensorRTRuntime`: TensorRT through ONNX Runtime's TensorRT execution provider, only where a CUDA GPU and
  that provider exist (:func:`tensorrt_available` says why not otherwise; nothing is attempted on a CPU machine).
* :class:`TorchRuntime`: a torch module (the FP32 network or mqb's fake-quantized one) as the reference.

An OpenVINO runtime compiled for a static batch (``shape=...``) runs a larger batch in chunks and pads a smaller
one (the last sliding-window batch), so it serves as a MONAI ``sliding_window_inference`` predictor whatever
``sw_batch_size`` is.
"""

from __future__ import annotations

import copy
import functools
import itertools
import os
import platform
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from mqb.deploy.export import NORM_INPUT_PREFIX

#: OpenVINO precision hints accepted by :class:`OpenVINORuntime` (``None`` = the plugin's default).
OV_PRECISIONS = ("f32", "bf16", "f16")


class RuntimeUnavailable(RuntimeError):
    """The runtime cannot run here (package missing, no GPU ...); the message says why."""


@runtime_checkable
class Runtime(Protocol):
    """What every deployed model offers."""

    name: str

    def __call__(self, x: np.ndarray) -> np.ndarray: ...

    def versions(self) -> dict[str, str]: ...


def _pad_batch(x: np.ndarray, batch: int) -> tuple[np.ndarray, int]:
    n = x.shape[0]
    if n == batch:
        return x, n
    pad = np.zeros((batch - n, *x.shape[1:]), dtype=x.dtype)
    return np.concatenate([x, pad]), n


# -- ONNX Runtime -----------------------------------------------------------------------------------------------
class OrtRuntime:
    """ONNX Runtime session on the CPU execution provider.

    Args:
        path: the ONNX file.
        threads: intra-op threads (default: ONNX Runtime's choice, one per physical core).
        profile: write ORT's profiling JSON (``end_profiling()`` returns its path; see
            :mod:`mqb.deploy.layer_precision`).
        profile_dir: where the profiling JSON goes (default: next to the model).
        providers: execution providers (default CPU only).
        axiswise_norms: run each ``InstanceNormalization`` (and group norm) with its mean and variance reduced one
            axis at a time (:func:`mqb.deploy.norms.axiswise_copy`: a rewritten copy in a temporary folder, kept
            while the runtime lives, ``session_path``; the file is not changed). ONNX Runtime's CPU kernel sums a
            whole volume in one float32 pass, 25-120x less accurately than torch at 96³. ``norms_rewritten`` says
            how many; ``False`` runs the file as it is, and so does an ORT-format ``.ort`` model.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        threads: int | None = None,
        profile: bool = False,
        profile_dir: str | os.PathLike[str] | None = None,
        providers: list[Any] | None = None,
        name: str = "onnxruntime-cpu",
        axiswise_norms: bool = True,
    ) -> None:
        import onnxruntime as ort

        from mqb.deploy.norms import axiswise_copy
        from mqb.deploy.profile import release_freed_memory

        self.path = Path(path)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        if profile:
            options.enable_profiling = True
            prefix = Path(profile_dir) if profile_dir is not None else self.path.parent
            options.profile_file_prefix = str(prefix / f"{self.path.stem}.ort_profile")
        self.norms_rewritten = 0
        #: the file the session was built from: the rewritten copy (kept while this runtime lives), or ``path``
        self.session_path = self.path
        #: the op types of the file's main graph (read once, without its external data)
        self.op_types = op_types(self.path) if self.path.suffix != ".ort" else frozenset()
        if axiswise_norms and "InstanceNormalization" in self.op_types:
            copies = tempfile.mkdtemp(prefix="mqb-ort-")
            weakref.finalize(self, shutil.rmtree, copies, ignore_errors=True)  # removed with the runtime
            self.session_path, self.norms_rewritten = axiswise_copy(self.path, copies)
            release_freed_memory()  # the rewrite's parsed copies go back to the OS
        self.session = ort.InferenceSession(str(self.session_path), options,
                                            providers=providers or ["CPUExecutionProvider"])  # fmt: skip
        self.input_name = self.session.get_inputs()[0].name
        self.name = name
        self.precision = "int8 qdq" if QDQ_OPS & self.op_types else "fp32"
        self.spec: dict[str, Any] = {"kind": "onnxruntime", "path": str(self.path), "threads": threads, "name": name,
                                     "axiswise_norms": axiswise_norms}  # fmt: skip

    @property
    def memory_spec(self) -> dict[str, Any]:
        """The spec that loads this session's graph as it is, for a memory measurement in a fresh process
        (:func:`mqb.deploy.profile.isolated_memory`): ONNX Runtime's own memory, without the rewrite's."""
        if self.session_path == self.path:
            return self.spec
        return {**self.spec, "path": str(self.session_path), "axiswise_norms": False}

    @property
    def graph_rewrites(self) -> dict[str, int]:
        """What was rewritten in the graph the session was built from (a copy; the file is not changed)."""
        return {"axiswise_norms": self.norms_rewritten} if self.norms_rewritten else {}

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]

    def end_profiling(self) -> Path:
        """Stop profiling; the path of ORT's JSON trace."""
        return Path(self.session.end_profiling())

    def versions(self) -> dict[str, str]:
        import onnx
        import onnxruntime as ort

        return {
            "onnxruntime": ort.__version__,
            "onnx": onnx.__version__,
            "providers": ",".join(self.session.get_providers()),
        }


QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})


def op_types(path: str | os.PathLike[str]) -> frozenset[str]:
    """The op types of an ONNX file's main graph (read without its external data)."""
    import onnx

    return frozenset(node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node)


def has_qdq(path: str | os.PathLike[str]) -> bool:
    """Whether an ONNX file has QuantizeLinear / DequantizeLinear nodes."""
    return bool(QDQ_OPS & op_types(path))


# -- OpenVINO ------------------------------------------------------------------------------------------------------
def _const_value(output: Any) -> np.ndarray | None:
    node = output.get_node()
    if node.get_type_name() != "Constant":
        return None
    return np.asarray(node.get_data(), dtype=np.float64)


def narrow_fake_quantize(model: Any) -> int:
    """Fold ``Maximum(lo) -> Minimum(hi) -> FakeQuantize`` (an ONNX ``Clip -> QuantizeLinear``) into one
    FakeQuantize over the clipped part of its grid, in place; returns how many were folded.

    Only scalar clip bounds lying on the FakeQuantize grid (within 1e-3 of a step) are folded, so the result is
    exactly the clipped quantizer: for mqb's INT8 activations the ±127 grid, levels 255.
    """
    import openvino.opset13 as ops

    folded = 0
    for fq in model.get_ordered_ops():
        if fq.get_type_name() != "FakeQuantize":
            continue
        minimum = fq.input_value(0).get_node()
        if minimum.get_type_name() != "Minimum" or len(minimum.output(0).get_target_inputs()) != 1:
            continue
        high, maximum_out = _scalar_and_other(minimum)
        if high is None or maximum_out.get_node().get_type_name() != "Maximum":
            continue
        maximum = maximum_out.get_node()
        if len(maximum.output(0).get_target_inputs()) != 1:
            continue
        low, source = _scalar_and_other(maximum)
        ranges = [_const_value(fq.input_value(i)) for i in range(1, 5)]
        if low is None or any(r is None or r.size != 1 for r in ranges):
            continue
        in_lo, in_hi, out_lo, out_hi = (float(r.reshape(())) for r in ranges)  # type: ignore[union-attr]
        levels = int(fq.get_attributes()["levels"])
        step_in, step_out = (in_hi - in_lo) / (levels - 1), (out_hi - out_lo) / (levels - 1)
        cut_lo, cut_hi = round((low - in_lo) / step_in), round((in_hi - high) / step_in)
        on_grid = abs(low - (in_lo + cut_lo * step_in)) <= 1e-3 * step_in
        on_grid &= abs(high - (in_hi - cut_hi * step_in)) <= 1e-3 * step_in
        if not on_grid or cut_lo < 0 or cut_hi < 0 or cut_lo + cut_hi >= levels - 1:
            continue

        def const(value: float) -> Any:
            return ops.constant(np.array(value, dtype=np.float32))

        new = ops.fake_quantize(
            source,
            const(low),
            const(high),
            const(out_lo + cut_lo * step_out),
            const(out_hi - cut_hi * step_out),
            levels - cut_lo - cut_hi,
        )
        new.set_friendly_name(fq.get_friendly_name())
        fq.output(0).replace(new.output(0))
        folded += 1
    if folded:
        model.validate_nodes_and_infer_types()
    return folded


def _only_reader(output: Any, op_type: str) -> Any | None:
    """The node reading ``output`` if it is its only reader and of type ``op_type``, else ``None``."""
    targets = list(output.get_target_inputs())
    if len(targets) == 1 and targets[0].get_node().get_type_name() == op_type:
        return targets[0].get_node()
    return None


def _scalar_constant(output: Any) -> float | None:
    """A scalar constant, also behind one ``Convert`` (how OpenVINO's ONNX reader keeps an INT8 zero point)."""
    node = output.get_node()
    if node.get_type_name() == "Convert":
        output = node.input_value(0)
    value = _const_value(output)
    return float(value.reshape(())) if value is not None and value.size == 1 else None


def fake_quantize_form(model: Any) -> int:
    """Rewrite each activation ``QuantizeLinear -> DequantizeLinear`` pair as OpenVINO's ONNX reader builds it,
    ``FakeQuantize(out: integer levels) -> Convert(i8) -> Convert(f32) [-> Subtract(zp)] -> Multiply(S)``, into the
    one FakeQuantize with a float output range ``[(lo - zp) S, (hi - zp) S]`` that NNCF writes, in place; returns how
    many were rewritten.

    The values are the same (the integer levels times the scale; float32 rounding of the scaled grid aside, far
    below half a step), and the Clip before the quantize (mqb's narrow range) stays. Why: OpenVINO 2026.4's CPU
    plugin computes an INT8 Concat of ONNX QDQ inputs wrongly on CPUs without AMX (about half of the output's
    range off on an AVX-512 VNNI EPYC, also when capped to AVX2) and gets the same graph exactly right in this form
    (:func:`openvino_exactness`), where its transformations also fuse the quantize into the producer
    (a convolution or MVN writes INT8) as for NNCF's own INT8 models.
    """
    import openvino.opset13 as ops

    rewritten = 0
    for fq in model.get_ordered_ops():
        if fq.get_type_name() != "FakeQuantize":
            continue
        to_int = _only_reader(fq.output(0), "Convert")
        if to_int is None or not to_int.get_output_element_type(0).is_integral():
            continue
        to_float = _only_reader(to_int.output(0), "Convert")
        if to_float is None or to_float.get_output_element_type(0).is_integral():
            continue
        last, zero_point = to_float, 0.0
        subtract = _only_reader(to_float.output(0), "Subtract")
        if subtract is not None:
            if subtract.input_value(0).get_node() is not to_float:
                continue
            zp = _scalar_constant(subtract.input_value(1))
            if zp is None:
                continue
            last, zero_point = subtract, zp
        multiply = _only_reader(last.output(0), "Multiply")
        if multiply is None:
            continue
        scale, other = _scalar_and_other(multiply)
        if scale is None or other.get_node() is not last:
            continue
        ranges = [_const_value(fq.input_value(i)) for i in range(1, 5)]
        if any(r is None or r.size != 1 for r in ranges):
            continue
        in_lo, in_hi, out_lo, out_hi = (float(r.reshape(())) for r in ranges)  # type: ignore[union-attr]
        if out_lo != round(out_lo) or out_hi != round(out_hi):
            continue  # not integer levels: the Convert would round them

        def const(value: float) -> Any:
            return ops.constant(np.array(value, dtype=np.float32))

        levels = int(fq.get_attributes()["levels"])
        new = ops.fake_quantize(
            fq.input_value(0),
            const(in_lo),
            const(in_hi),
            const((out_lo - zero_point) * scale),
            const((out_hi - zero_point) * scale),
            levels,
        )
        new.set_friendly_name(multiply.get_friendly_name())  # the DequantizeLinear's name (norm-input tags)
        multiply.output(0).replace(new.output(0))
        rewritten += 1
    if rewritten:
        model.validate_nodes_and_infer_types()
    return rewritten


def _isa_cap() -> str | None:
    from mqb.deploy.isa import int8_isa

    return int8_isa().cap


def narrow_fold_exact() -> bool:
    """Whether this machine's OpenVINO CPU plugin computes a folded narrow-range FakeQuantize (255 levels on
    ``[-127 S, 127 S]``) exactly (see :func:`openvino_exactness`)."""
    return openvino_exactness()["narrow_fold"]


def openvino_exactness() -> dict[str, bool]:
    """Which of mqb's exact graph forms this machine's OpenVINO CPU plugin also computes exactly, measured once per
    process (and oneDNN ISA cap) on small probes against mqb's fake quantization:

    * ``narrow_fold``: a ``Clip -> QuantizeLinear`` folded into a 255-level FakeQuantize (a calibrated W8A8 1x1x1
      conv fed values inside and beyond its calibrated range). Exact on AMX; half a step off on an AVX-512 VNNI
      CPU without AMX (OpenVINO 2026.4).
    * ``int8_concat``: a Concat whose QDQ was moved onto its inputs (:func:`mqb.deploy.graph.quantize_concat_inputs`:
      a stem, a residual unit and a head reading ``cat(skip, y)``), run as :class:`OpenVINORuntime` runs it (QDQ
      pairs in NNCF's :func:`fake_quantize_form`). ONNX Runtime computes it exactly everywhere.
    * ``int8_concat_onnx_qdq``: the same file read by OpenVINO as it is (ONNX QDQ pairs, no
      :func:`fake_quantize_form`), i.e. what a plain ``openvino`` user of the exported ``.onnx`` gets. OpenVINO
      2026.4 computed this one wrongly (about half the output range off) on an AVX-512 VNNI CPU without AMX, also
      capped to AVX2, and the FakeQuantize form exactly on the same CPU; it is recorded (and used by
      ``benchmarks/int8_speed.py`` for its plain-Q/DQ comparison), not used by the export.
    """
    return dict(_openvino_exactness(_isa_cap()))


def openvino_float_concat_before() -> tuple[str, ...]:
    """ONNX op types before which mqb's export keeps a Concat in float for OpenVINO on this CPU
    (``export_onnx(float_concat_before=...)``): OpenVINO 2026.4 runs a ConvTranspose that reads an INT8 Concat in
    f32 (NNCF's INT8 too) and one that reads a float Concat's quantize in INT8. With VNNI / AMX its INT8 kernel is
    the faster (MONAI UNet 96^3 on an AVX-512 VNNI EPYC: 0.14 s with INT8 ConvTransposes vs 0.22 s), on the AVX2
    kernels the f32 one (0.12 s vs 0.17 s at 64^3), so the INT8 Concat is kept there. Both forms are exact."""
    from mqb.deploy.isa import int8_isa

    return () if int8_isa().saturates else ("ConvTranspose",)


def _probe_max_error(net: torch.nn.Module, x: torch.Tensor, calib: torch.Tensor, fold: bool, fq_form: bool = True,
                     **export: Any) -> float:  # fmt: skip
    """max |OpenVINO - mqb fake quantization| / max |mqb| of ``net`` quantized W8A8 (deploy scheme; 7-bit weights
    where this CPU's INT8 dot product saturates, so only the graph form is probed), with the QDQ pairs in
    :func:`fake_quantize_form` (``fq_form``, as :class:`OpenVINORuntime` runs them) or as the ONNX reader builds
    them."""
    import openvino as ov

    from mqb.deploy.export import export_onnx
    from mqb.deploy.isa import recipe_for_cpu
    from mqb.quant import QuantRecipe, calibrate, quantize

    recipe = QuantRecipe.from_precision("w8a8", scheme="deploy")
    quantize(net, recipe_for_cpu(recipe)[0])
    calibrate(net, [calib])
    with torch.no_grad():
        reference = net(x).numpy()
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(net, x, Path(tmp) / "probe.onnx", **export).path
        core = ov.Core()
        model = core.read_model(str(path))
        if fq_form:
            fake_quantize_form(model)
        if fold:
            narrow_fake_quantize(model)
        out = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})({0: x.numpy()})[0]
    return float(np.abs(out - reference).max() / max(np.abs(reference).max(), 1e-12))


class _ConcatProbe(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.conv = torch.nn.Conv3d(1, 8, 3, padding=1), torch.nn.Conv3d(8, 8, 3, padding=1)
        self.shortcut, self.head = torch.nn.Conv3d(8, 8, 1), torch.nn.Conv3d(16, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = torch.relu(self.stem(x))
        y = torch.relu(self.conv(skip) + self.shortcut(skip))
        return self.head(torch.cat([skip, y], dim=1))


@functools.cache
def _openvino_exactness(cap: str | None) -> tuple[tuple[str, bool], ...]:
    # the probes' tensors stay on the CPU by design: they measure OpenVINO's CPU plugin
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        conv = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 1)).eval()  # one input channel: no pair sums at all
        concat = _ConcatProbe().eval()
    line = torch.linspace(-1, 1, 64).reshape(1, 1, 4, 4, 4)
    fold = _probe_max_error(conv, 3 * line, line, fold=True)
    volume = torch.randn(1, 1, 8, 8, 8, generator=gen)
    calib = torch.randn(2, 1, 8, 8, 8, generator=gen)
    plain = _probe_max_error(copy.deepcopy(concat), volume, calib, fold=False, fq_form=False)
    cat = _probe_max_error(concat, volume, calib, fold=False)
    # a correct runtime differs from mqb by float rounding only (< 1e-4 of the output); the failures seen are one
    # half step (~4e-3) and more
    return (("narrow_fold", fold <= 1e-4), ("int8_concat", cat <= 1e-4), ("int8_concat_onnx_qdq", plain <= 1e-4))


#: OpenVINO ops that carry a layer's weight (input 1)
_WEIGHTED_OPS = ("Convolution", "GroupConvolution", "ConvolutionBackpropData", "GroupConvolutionBackpropData", "MatMul")
_WEIGHT_PATH_OPS = ("Convert", "Subtract", "Multiply", "Reshape", "Transpose", "FakeQuantize", "Unsqueeze")
#: friendly-name prefix of the ops tagged with their mqb layer (see :func:`tag_layer_ops`)
TAG = "mqb:"


def _weight_constant(op: Any) -> str | None:
    """Name of the initializer a conv / matmul op's weight comes from (through decompression ops), if any."""
    if op.get_input_size() < 2:
        return None
    out = op.input_value(1)
    for _ in range(8):
        node = out.get_node()
        kind = node.get_type_name()
        if kind == "Constant":
            return node.get_friendly_name()
        if kind not in _WEIGHT_PATH_OPS:
            return None
        # follow the non-scalar input (the weight, not a scale or zero point)
        sizes = [
            int(np.prod([d for d in node.input_value(i).get_shape()] or [1])) for i in range(node.get_input_size())
        ]
        out = node.input_value(int(np.argmax(sizes)))
    return None


def tag_layer_ops(model: Any, layers: list[str] | None = None) -> dict[str, str]:
    """Rename each conv / transposed-conv / matmul op whose weight is an mqb layer's initializer
    (``<layer>.weight_quantizer.qweight`` or ``<layer>.weight``), and each MVN fed by a quantized norm input
    (:data:`mqb.deploy.export.NORM_INPUT_PREFIX`), to ``mqb:<layer>``, in place, so the compiled
    model's ``originalLayersNames`` name the layer (OpenVINO's ONNX reader and its fusions otherwise rename
    transposed convolutions and the output layer). Returns {layer: tag}."""
    tags: dict[str, str] = {}
    wanted = set(layers) if layers is not None else None
    for op in model.get_ordered_ops():
        if op.get_type_name() == "MVN":  # a quantized norm: its input is the named DequantizeLinear (a Multiply)
            source = op.input_value(0).get_node().get_friendly_name()
            layer = source[len(NORM_INPUT_PREFIX) :] if source.startswith(NORM_INPUT_PREFIX) else None
            if layer is not None and (wanted is None or layer in wanted) and layer not in tags:
                tags[layer] = TAG + layer
                op.set_friendly_name(TAG + layer)
            continue
        if op.get_type_name() not in _WEIGHTED_OPS:
            continue
        source = _weight_constant(op)
        if source is None:
            continue
        for suffix in (".weight_quantizer.qweight", ".weight"):
            if source.endswith(suffix):
                layer = source[: -len(suffix)]
                if (wanted is None or layer in wanted) and layer not in tags:
                    tags[layer] = TAG + layer
                    op.set_friendly_name(TAG + layer)
                break
    return tags


def _scalar_and_other(node: Any) -> tuple[float | None, Any]:
    """For a binary op with one scalar constant input: (that scalar, the other input); else (None, None)."""
    a, b = node.input_value(0), node.input_value(1)
    for const, other in ((a, b), (b, a)):
        value = _const_value(const)
        if value is not None and value.size == 1:
            return float(value.reshape(())), other
    return None, None


class OpenVINORuntime:
    """OpenVINO CPU plugin on an ONNX (or IR) file.

    Args:
        path: ``.onnx`` (read directly, QDQ included) or ``.xml`` IR.
        precision: ``INFERENCE_PRECISION_HINT`` (``f32``, ``bf16``, ``f16``) or ``None`` for the plugin default.
        shape: compile for this static input shape (faster kernels); a smaller batch is padded.
        threads: ``INFERENCE_NUM_THREADS`` (default: the plugin's choice).
        perf_count: collect per-node timings (``PERF_COUNT``) for the layer report.
        narrow_range: fold ``Clip -> QuantizeLinear`` into narrow-range FakeQuantize (see module doc).
        fake_quantize: run each activation QDQ pair as one FakeQuantize with a float output range (NNCF's form,
            :func:`fake_quantize_form`; same values), which OpenVINO fuses like NNCF's own INT8 and computes
            exactly where it gets ONNX QDQ into an INT8 Concat wrong.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        precision: str | None = "f32",
        shape: tuple[int, ...] | None = None,
        threads: int | None = None,
        perf_count: bool = False,
        narrow_range: bool = True,
        fake_quantize: bool = True,
        name: str | None = None,
    ) -> None:
        if "tcmalloc" in os.environ.get("LD_PRELOAD", ""):
            raise RuntimeUnavailable("OpenVINO crashes with tcmalloc preloaded (LD_PRELOAD); run without it")
        import openvino as ov

        if precision is not None and precision not in OV_PRECISIONS:
            raise ValueError(f"precision={precision!r} is invalid; valid: {', '.join(OV_PRECISIONS)} or None")
        cap = (_isa_cap() or "").upper()
        if precision is None and cap and cap != "ALL" and not any(k in cap for k in ("BF16", "AMX", "FP16")):
            # OpenVINO picks its default (bf16 on AVX512-BF16/AMX CPUs) from the CPU's flags, but oneDNN is capped
            # below bf16 (ONEDNN_MAX_CPU_ISA): that combination computes garbage; the capped CPU's default is f32
            precision = "f32"
        self.path = Path(path)
        self.core = ov.Core()
        model = self.core.read_model(str(self.path))
        #: activation QDQ pairs rewritten into NNCF's FakeQuantize form (:func:`fake_quantize_form`)
        self.fake_quantized = fake_quantize_form(model) if fake_quantize else 0
        #: why the Clips were (not) folded (``narrow_range`` off, or the plugin's fold is not exact on this CPU)
        self.fold, exact = "off (narrow_range=False)", False
        if narrow_range:
            exact = narrow_fold_exact()
            self.fold = "folded (exact on this CPU)" if exact else "kept as Clip (a fold is inexact on this CPU)"
        self.folded_clips = narrow_fake_quantize(model) if narrow_range and exact else 0
        quantized = any(op.get_type_name() == "FakeQuantize" for op in model.get_ops())
        #: {mqb layer: friendly name of its op} (see :func:`tag_layer_ops`)
        self.layer_tags = tag_layer_ops(model)
        self.batch: int | None = None
        if shape is not None:
            model.reshape({model.inputs[0].get_any_name(): ov.PartialShape(list(shape))})
            self.batch = int(shape[0])
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
        if precision is not None:
            config["INFERENCE_PRECISION_HINT"] = precision
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        if perf_count:
            config["PERF_COUNT"] = True
        self.compiled = self.core.compile_model(model, "CPU", config)
        self.request = self.compiled.create_infer_request()
        #: the precision the plugin runs float ops in (``f32``, ``bf16`` ...), as it reports it
        self.float_precision = self.compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
        #: ``int8+<float precision>`` for a QDQ model (INT8 layers, the rest in the float precision)
        self.precision = f"int8+{self.float_precision}" if quantized else self.float_precision
        self.name = name or f"openvino-cpu-{self.precision}"
        self.spec = {
            "kind": "openvino",
            "path": str(self.path),
            "precision": precision,
            "threads": threads,
            "shape": list(shape) if shape is not None else None,
            "narrow_range": narrow_range,
            "fake_quantize": fake_quantize,
            "name": name,
        }

    @property
    def graph_rewrites(self) -> dict[str, int]:
        """What was rewritten in the loaded graph before compiling (the file is not changed)."""
        return {k: v for k, v in (("fake_quantize_form", self.fake_quantized),
                                  ("narrow_fake_quantize", self.folded_clips)) if v}  # fmt: skip

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.batch is None:
            self.request.infer({0: x})
            return self.request.get_output_tensor(0).data.copy()
        outs = []
        for start in range(0, x.shape[0], self.batch):  # a static batch: chunks, the last one padded
            chunk, n = _pad_batch(x[start : start + self.batch], self.batch)
            self.request.infer({0: chunk})
            outs.append(self.request.get_output_tensor(0).data[:n].copy())
        return outs[0] if len(outs) == 1 else np.concatenate(outs)

    def runtime_model(self) -> Any:
        """The executed graph (``compiled_model.get_runtime_model()``) with layerType / runtimePrecision rt_info."""
        return self.compiled.get_runtime_model()

    def profiling_info(self) -> list[Any]:
        """Per-node timings of the last inference (needs ``perf_count=True``)."""
        return list(self.request.get_profiling_info())

    def save_ir(self, path: str | os.PathLike[str]) -> int:
        """Serialize the (uncompiled, folded) model as OpenVINO IR with weights kept as they are (no FP16
        compression); returns the bytes of .xml + .bin."""
        import openvino as ov

        path = Path(path)
        model = self.core.read_model(str(self.path))
        if self.fake_quantized:
            fake_quantize_form(model)
        if self.folded_clips:
            narrow_fake_quantize(model)
        ov.save_model(model, str(path), compress_to_fp16=False)
        return path.stat().st_size + path.with_suffix(".bin").stat().st_size

    def versions(self) -> dict[str, str]:
        import openvino as ov

        return {
            "openvino": ov.get_version(),
            "device": str(self.core.get_property("CPU", "FULL_DEVICE_NAME")),
            "capabilities": ",".join(self.core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")),
            "inference_precision": self.float_precision,
        }


# -- TensorRT (GPU only) ------------------------------------------------------------------------------------------
def tensorrt_available() -> tuple[bool, str]:
    """Whether TensorRT can run here, and why not: needs a CUDA GPU and ONNX Runtime's TensorRT provider."""
    if not torch.cuda.is_available():
        return False, "no CUDA GPU on this machine"
    try:
        import onnxruntime as ort
    except ImportError:
        return False, "onnxruntime is not installed"
    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        return False, "onnxruntime has no TensorrtExecutionProvider (install onnxruntime-gpu with TensorRT)"
    return True, "TensorRT execution provider on " + torch.cuda.get_device_name(0)


class TensorRTRuntime(OrtRuntime):
    """TensorRT (explicit INT8 from the Q/DQ nodes, FP16 allowed for the rest) via ONNX Runtime's TensorRT EP."""

    def __init__(self, path: str | os.PathLike[str], *, fp16: bool = True, cache_dir: str | None = None) -> None:
        ok, why = tensorrt_available()
        if not ok:
            raise RuntimeUnavailable(f"TensorRT: {why}")
        options = {"trt_fp16_enable": fp16, "trt_int8_enable": True, "trt_engine_cache_enable": cache_dir is not None}
        if cache_dir is not None:
            options["trt_engine_cache_path"] = cache_dir
        providers = [("TensorrtExecutionProvider", options), "CUDAExecutionProvider"]
        # TensorRT's normalization layer reduces in parallel on the GPU: the graph stays as written
        super().__init__(path, providers=providers, name="tensorrt", axiswise_norms=False)
        self.precision = ("int8+fp16" if fp16 else "int8") if QDQ_OPS & self.op_types else ("fp16" if fp16 else "fp32")
        self.spec = {"kind": "tensorrt", "path": str(path), "fp16": fp16, "cache_dir": cache_dir}

    def versions(self) -> dict[str, str]:
        return {**super().versions(), "gpu": torch.cuda.get_device_name(0), "cuda": str(torch.version.cuda)}


def runtime_from_spec(spec: dict[str, Any]) -> Runtime:
    """Rebuild a runtime from its ``spec`` (e.g. in a fresh process, to measure its memory alone)."""
    kwargs = {k: v for k, v in spec.items() if k not in ("kind", "path")}
    if spec["kind"] == "onnxruntime":
        return OrtRuntime(spec["path"], **kwargs)
    if spec["kind"] == "openvino":
        if kwargs.get("shape") is not None:
            kwargs["shape"] = tuple(kwargs["shape"])
        return OpenVINORuntime(spec["path"], **kwargs)
    if spec["kind"] == "tensorrt":
        return TensorRTRuntime(spec["path"], **kwargs)
    raise ValueError(f"unknown runtime kind {spec['kind']!r}; valid: onnxruntime, openvino, tensorrt")


# -- torch reference ---------------------------------------------------------------------------------------------
class TorchRuntime:
    """A torch module as a runtime: the FP32 network, or mqb's fake-quantized model (the reference). It runs on the
    device the model is on (its first parameter's or buffer's; the CPU for a module without either): the input goes
    there, the output comes back to the CPU as a NumPy array."""

    def __init__(self, model: torch.nn.Module, name: str = "torch", dtype: torch.dtype = torch.float32) -> None:
        self.model = model.eval()
        self.name = name
        self.dtype = dtype
        self.precision = str(dtype).removeprefix("torch.")

    @property
    def device(self) -> torch.device:
        """Where the model is (read at each call: the model may have been moved since)."""
        tensor = next(itertools.chain(self.model.parameters(), self.model.buffers()), None)
        return tensor.device if tensor is not None else torch.device("cpu")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = self.model(torch.from_numpy(np.ascontiguousarray(x)).to(self.device, self.dtype))
        return out.float().cpu().numpy()

    def versions(self) -> dict[str, str]:
        return {"torch": torch.__version__, "threads": str(torch.get_num_threads())}


# -- machine -------------------------------------------------------------------------------------------------------
def cpu_features() -> dict[str, Any]:
    """The CPU model and the ISA flags that decide INT8 / BF16 speed (VNNI, AMX, AVX512-BF16/FP16)."""
    from mqb.devices import cpu_flags

    flags = cpu_flags()
    model_name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model_name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_int8", "amx_bf16")
    return {"model": model_name, "isa": [f for f in wanted if f in flags], "cpu_count": os.cpu_count()}


def runtime_versions() -> dict[str, str]:
    """Versions of every runtime package present (absent ones are left out)."""
    out: dict[str, str] = {"torch": torch.__version__}
    try:
        import onnx

        out["onnx"] = onnx.__version__
    except ImportError:
        pass
    try:
        import onnxruntime as ort

        out["onnxruntime"] = ort.__version__
    except ImportError:
        pass
    try:
        import openvino as ov

        out["openvino"] = ov.get_version()
    except ImportError:
        pass
    try:
        import monai

        out["monai"] = monai.__version__
    except ImportError:
        pass
    ok, why = tensorrt_available()
    out["tensorrt"] = "available" if ok else f"unavailable: {why}"
    return out
