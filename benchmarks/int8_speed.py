"""Real INT8 speed and size of mqb-calibrated models on the CPU, as ratios against FP32 in the same process.

Models: mqb's ``model=unet`` (MONAI UNet, batch norm, PReLU) and ``model=nnunet`` (nnU-Net v2 PlainConvUNet,
instance norm, leaky ReLU), 1 input channel, 8 classes (``dataset=synthetic``), at 96^3, batch 1, with the
trained synthetic-data checkpoint where the cache has one (``model.checkpoint=auto``), else untrained (speed does
not depend on the weights; the argmax agreement of an untrained network, whose logits are nearly flat, does).
Each is quantized W8A8 with mqb (INT8 per-channel weights, per-tensor static activations), calibrated on two
synthetic CT phantoms, and exported by ``mqb.deploy.export_onnx`` with mqb's own scales. Runtimes, timed round by
round (median of ``--rounds`` after one warm-up):

* ``ort_fp32`` / ``ort_int8``: ONNX Runtime CPU EP on the FP32 / QDQ ONNX (instance norms with axis-wise
  reductions, :mod:`mqb.deploy.norms`: its fused kernel's float32 sum over a whole volume is not torch's accuracy);
* ``ov_fp32``: OpenVINO CPU, ``INFERENCE_PRECISION_HINT=f32`` (the FP32 reference of the speedup);
* ``ov_default``: OpenVINO's default precision on the FP32 ONNX (bf16 on CPUs with AVX512-BF16 / AMX);
* ``ov_int8``: OpenVINO reading the QDQ ONNX, float remainder (norms, activations) in f32;
* ``ov_int8_default``: the same with the default precision (float remainder in bf16 where the CPU has it);
* ``ov_int8d`` / ``ov_int8d_default``: mqb's ``experiment=int8_deploy`` recipe: the inputs of InstanceNorm /
  GroupNorm quantized too (the convolution writes INT8 and OpenVINO's MVN reads it) and one quantizer per tensor
  (``method.shared_ranges`` + ``output_quantizers``: readers of a residual or skip tensor share the largest
  calibrated range, and the tensor is quantized where it is produced, so an identity shortcut's Add reads INT8),
  again with mqb's own calibrated scales.

Every INT8 file is written with the exact QDQ sharing of :func:`mqb.deploy.graph.share_quantization` (the
default of ``export_onnx``; the INT8 Concat where :func:`mqb.deploy.runtimes.openvino_exactness` finds it exact,
except before a ConvTranspose where that runs faster in INT8 from a float Concat,
:func:`mqb.deploy.runtimes.openvino_float_concat_before`), and OpenVINO runs the Q/DQ pairs in NNCF's FakeQuantize
form (:func:`mqb.deploy.runtimes.fake_quantize_form`). ``qdq_int8d`` / ``qdq_int8d_default``: the same
``int8_deploy`` network as OpenVINO reads the ONNX Q/DQ pairs as they are (the Concat in float where that form is
inexact): the conservative form mqb ran before, timed in the same rounds for the before / after ratio. The executed
graphs (``compiled_model.get_runtime_model()``) of mqb's files and NNCF's are summarized side by side (INT8 and
float convolutions, MVNs, Concats, and the float quantizers / Reorders an INT8 graph fused like NNCF's lacks).

``--nncf`` also times OpenVINO + NNCF's own post-training INT8 of the FP32 model (its own scales and quantization
points) for comparison, if nncf is installed.
``--previous-placement`` also times ``v1_int8d`` / ``v1_int8d_default``: the ``int8_deploy`` network with its
output quantizers where each tensor was first produced, ahead of an in-place activation (nnU-Net's InstanceNorm
output, then quantized again by the conv after the LeakyReLU; placement v1, before
``SharedInputRanges(in_place_writers=True)``), in the same rounds, with its ``vs_nncf`` next to the current one.

Sizes: the serialized ONNX files and their initializer bytes (weights), FP32 vs INT8. Agreement: Dice of the
argmax of mqb's fake-quantized prediction and of each INT8 runtime on a third phantom (target >= 0.99), next to the
rounding floor of each fake-quantized network: the same fake quantization computed in float64 against float32
(:func:`mqb.deploy.agreement.float64_twin`), how far two exact computations of that INT8 network are apart.
Targets (issue): INT8 >= 3.0x faster than OpenVINO FP32 (f32 hint), weights >= 3.9x smaller.

Last line: ``int8_speedup=<x> size_ratio=<y> runtime=openvino config=... model=... file_ratio=<z> [vs_nncf=<r>]``:
the smallest speedup over the models (OpenVINO FP32 with the f32 hint vs the fastest of mqb's OpenVINO INT8
configurations, named by ``config``), the smallest weight-bytes ratio (``file_ratio``: whole ONNX files), and with
``--nncf`` the smallest ratio NNCF INT8 latency / mqb INT8 latency (1.0: as fast as NNCF's own INT8, same precision
hint on the float remainder; ratio of the medians); per-model figures on the lines before, with
``<model>_vs_nncf_paired``, the median of the per-round ratios (the two ran back to back, so a load that changes
between rounds cancels). The machine is shared: the load average is printed, and the fastest-run ratios next to the
medians.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate

from mqb.checkpoints import load_weights
from mqb.config import compose_eval
from mqb.data.synthetic import make_phantom
from mqb.deploy.agreement import float64_twin, logit_agreement, prediction_dice
from mqb.deploy.export import export_onnx
from mqb.deploy.isa import int8_isa, recipe_for_cpu
from mqb.deploy.layer_precision import openvino_nodes, runtime_report
from mqb.deploy.profile import interleaved_latency
from mqb.deploy.runtimes import (
    OpenVINORuntime,
    OrtRuntime,
    cpu_features,
    openvino_exactness,
    openvino_float_concat_before,
    runtime_versions,
)
from mqb.pipeline import resolve_checkpoint
from mqb.quant import QuantRecipe, calibrate, quantize
from mqb.quant.methods import SharedInputRanges


def phantom(size: int, seed: int) -> torch.Tensor:
    """A synthetic CT phantom of size^3, windowed like the synthetic dataset (-175..250 HU -> [0, 1])."""
    ct, _ = make_phantom((size, size, size), (1.5, 1.5, 2.0), seed)
    return torch.from_numpy(np.clip((ct + 175.0) / 425.0, 0.0, 1.0)).float()[None, None]


def build(model: str) -> tuple[torch.nn.Module, str]:
    """The network, with its trained synthetic-data checkpoint if the cache has one (else untrained)."""
    torch.manual_seed(0)
    cfg = compose_eval([f"model={model}", "dataset=synthetic"])
    net = instantiate(cfg.model.net).eval()
    checkpoint = resolve_checkpoint(cfg)
    if checkpoint is None:
        return net, "untrained"
    load_weights(net, checkpoint)
    return net, f"trained ({checkpoint.name})"


def nncf_int8(fp32_onnx: Path, calib: list[torch.Tensor], shape: tuple[int, ...], out: Path) -> Path | None:
    """OpenVINO + NNCF's own post-training INT8 of the FP32 model (its own scales and quantization points), as
    OpenVINO IR; ``None`` if nncf is not installed. For comparison only (``--nncf``)."""
    try:
        import nncf
        import openvino as ov
    except ImportError:
        return None
    core = ov.Core()
    model = core.read_model(str(fp32_onnx))
    model.reshape({model.inputs[0].get_any_name(): ov.PartialShape(list(shape))})
    quantized = nncf.quantize(model, nncf.Dataset([c.numpy() for c in calib]), subset_size=len(calib))
    ov.save_model(quantized, str(out), compress_to_fp16=False)
    return out


def graph_counts(nodes: list) -> str:
    """What an executed OpenVINO graph spends its nodes on: convolutions by precision, and the float quantizers
    (FakeQuantize / Subgraph), Concats and Reorders that an INT8 graph fused like NNCF's does not have."""
    counts: dict[str, int] = {}
    for n in nodes:
        int8 = n.precision.lower() in ("u8", "i8")
        if n.type in ("Convolution", "Deconvolution", "MVN"):
            key = f"{n.type} {'int8' if int8 else n.precision}"
        elif n.type in ("FakeQuantize", "Subgraph", "Concatenation", "Reorder", "Eltwise"):
            key = f"{n.type} {'int8' if int8 else n.precision}"
        else:
            continue
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))


#: experiment=int8_deploy: norm inputs quantized, one range per tensor
DEPLOY_INCLUDE = ("conv", "conv_transpose", "linear", "norm")


def deploy_recipe(**kwargs: object) -> QuantRecipe:
    """W8A8, weights per channel and activations per tensor; 7-bit weights where this CPU's INT8 dot product
    saturates (``mqb.deploy``'s ``deploy.overflow_fix=auto``)."""
    recipe = QuantRecipe.from_precision("w8a8", scheme="deploy", **kwargs)  # type: ignore[arg-type]
    return recipe_for_cpu(recipe)[0]


def measure(
    model: str, size: int, rounds: int, workdir: Path, with_nncf: bool = False, previous_placement: bool = False
) -> dict[str, float]:
    net, weights = build(model)
    calib = [phantom(size, 1), phantom(size, 2)]
    x = phantom(size, 3)
    fq = quantize(copy.deepcopy(net), deploy_recipe())
    calibrate(fq, calib)
    exact = openvino_exactness()
    concat = exact["int8_concat"]  # the INT8 Concat rewrite only where OpenVINO computes it exactly
    keep = openvino_float_concat_before()  # ... and not before a ConvTranspose where its INT8 kernel is faster
    fp32 = export_onnx(net, x, workdir / f"{model}_fp32.onnx")
    int8 = export_onnx(fq, x, workdir / f"{model}_int8.onnx", strict=True, int8_concat=concat, float_concat_before=keep)
    shape = tuple(x.shape)
    runtimes = {
        "ort_fp32": OrtRuntime(fp32.path),
        "ort_int8": OrtRuntime(int8.path),
        "ov_fp32": OpenVINORuntime(fp32.path, precision="f32", shape=shape),
        "ov_default": OpenVINORuntime(fp32.path, precision=None, shape=shape),
        "ov_int8": OpenVINORuntime(int8.path, precision="f32", shape=shape),
        "ov_int8_default": OpenVINORuntime(int8.path, precision=None, shape=shape),
    }
    quantized = {"ov_int8": fq, "ov_int8_default": fq, "ort_int8": fq}
    exports = {"mqb int8": int8}
    calibrated = quantize(copy.deepcopy(net), deploy_recipe(include=DEPLOY_INCLUDE))
    calibrate(calibrated, calib)
    fqd = copy.deepcopy(calibrated)
    SharedInputRanges(output_quantizers=True).apply(fqd, batches=lambda: calib)
    int8d = export_onnx(
        fqd, x, workdir / f"{model}_int8d.onnx", strict=True, int8_concat=concat, float_concat_before=keep
    )
    runtimes["ov_int8d"] = OpenVINORuntime(int8d.path, precision="f32", shape=shape)
    runtimes["ov_int8d_default"] = OpenVINORuntime(int8d.path, precision=None, shape=shape)
    quantized.update(ov_int8d=fqd, ov_int8d_default=fqd)
    # the same network in the conservative form (mqb before NNCF's FakeQuantize form): Q/DQ pairs as OpenVINO's
    # ONNX reader builds them, the INT8 Concat only where OpenVINO computes that form exactly; timed for the ratio
    plain_concat = exact["int8_concat_onnx_qdq"]
    int8q = export_onnx(fqd, x, workdir / f"{model}_int8d_qdq.onnx", strict=True, int8_concat=plain_concat)
    runtimes["qdq_int8d"] = OpenVINORuntime(int8q.path, precision="f32", shape=shape, fake_quantize=False)
    runtimes["qdq_int8d_default"] = OpenVINORuntime(int8q.path, precision=None, shape=shape, fake_quantize=False)
    quantized.update(qdq_int8d=fqd, qdq_int8d_default=fqd)
    if previous_placement:  # output quantizers where the tensor was first produced, ahead of in-place activations
        fqp = copy.deepcopy(calibrated)
        SharedInputRanges(output_quantizers=True, in_place_writers=False).apply(fqp, batches=lambda: calib)
        int8p = export_onnx(
            fqp, x, workdir / f"{model}_int8d_v1.onnx", strict=True, int8_concat=concat, float_concat_before=keep
        )
        runtimes["v1_int8d"] = OpenVINORuntime(int8p.path, precision="f32", shape=shape)
        runtimes["v1_int8d_default"] = OpenVINORuntime(int8p.path, precision=None, shape=shape)
        quantized.update(v1_int8d=fqp, v1_int8d_default=fqp)
        exports["mqb int8_deploy, output quantizers v1"] = int8p
    exports["mqb int8_deploy"] = int8d
    nncf_ir = nncf_int8(fp32.path, calib, shape, workdir / f"{model}_nncf.xml") if with_nncf else None
    if nncf_ir is not None:
        runtimes["nncf_int8"] = OpenVINORuntime(nncf_ir, precision="f32", shape=shape)
        runtimes["nncf_int8_default"] = OpenVINORuntime(nncf_ir, precision=None, shape=shape)
    elif with_nncf:
        print("--nncf: nncf is not installed; no NNCF comparison", flush=True)
    xn = x.numpy()
    timed = interleaved_latency(runtimes, xn, warmup=1, repeats=rounds)
    med = {k: v["median_s"] for k, v in timed.items()}
    fastest = {k: v["min_s"] for k, v in timed.items()}
    if "nncf_int8" in med:
        print(
            f"{model} NNCF's own INT8 (its scales and quantization points, e.g. norm / add inputs too): "
            f"f32 rest {med['nncf_int8']:.3f}s ({med['ov_fp32'] / med['nncf_int8']:.2f}x), default rest "
            f"{med['nncf_int8_default']:.3f}s ({med['ov_fp32'] / med['nncf_int8_default']:.2f}x)",
            flush=True,
        )
    default_precision = runtimes["ov_default"].precision
    if "ov_int8d" in med:
        print(
            f"{model} mqb experiment=int8_deploy (norm inputs, tensor quantizers): f32 rest {med['ov_int8d']:.3f}s "
            f"({med['ov_fp32'] / med['ov_int8d']:.2f}x), {default_precision} rest {med['ov_int8d_default']:.3f}s "
            f"({med['ov_fp32'] / med['ov_int8d_default']:.2f}x)",
            flush=True,
        )
    print(
        f"{model} {size}^3 [median of {rounds}]: ORT fp32 {med['ort_fp32']:.3f}s int8 {med['ort_int8']:.3f}s "
        f"({med['ort_fp32'] / med['ort_int8']:.2f}x) | OpenVINO f32 {med['ov_fp32']:.3f}s, "
        f"default ({default_precision}) {med['ov_default']:.3f}s ({med['ov_fp32'] / med['ov_default']:.2f}x), "
        f"int8 (f32 rest) {med['ov_int8']:.3f}s ({med['ov_fp32'] / med['ov_int8']:.2f}x), "
        f"int8 ({default_precision} rest) {med['ov_int8_default']:.3f}s "
        f"({med['ov_fp32'] / med['ov_int8_default']:.2f}x)",
        flush=True,
    )
    print(
        f"{model} fastest-run ratios (less sensitive to other load): OpenVINO int8 (f32 rest) "
        f"{fastest['ov_fp32'] / fastest['ov_int8']:.2f}x, int8 ({default_precision} rest) "
        f"{fastest['ov_fp32'] / fastest['ov_int8_default']:.2f}x; load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    file_ratio = fp32.file_bytes / int8.file_bytes
    weight_ratio = fp32.weight_bytes / int8.weight_bytes
    print(
        f"{model} size: ONNX {fp32.file_bytes / 1e6:.2f} MB -> {int8.file_bytes / 1e6:.2f} MB ({file_ratio:.2f}x), "
        f"weights {fp32.weight_bytes / 1e6:.2f} MB -> {int8.weight_bytes / 1e6:.2f} MB ({weight_ratio:.2f}x; "
        f"INT8 file holds {int8.initializer_bytes})",
        flush=True,
    )

    def agreement(reference: np.ndarray, out: np.ndarray) -> str:
        dice, steps = prediction_dice(reference, out), logit_agreement(reference, out)
        return f"{dice['dice']:.4f} ({100 * steps['within_one_step']:.1f}%, voxels {dice['voxel_agreement']:.4f})"

    agree, references, floors = [], {}, {}
    for k, fake_quant in quantized.items():
        if id(fake_quant) not in references:  # each fake-quant network once, with its rounding floor
            with torch.no_grad():
                references[id(fake_quant)] = fake_quant(x).numpy()
                twin = float64_twin(fake_quant)(x.double()).float().numpy()
            floors[k] = agreement(references[id(fake_quant)], twin)
        agree.append(f"{k} {agreement(references[id(fake_quant)], runtimes[k](xn))}")
    fp32_dice = prediction_dice(net(x).detach().numpy(), runtimes["ov_fp32"](xn))["dice"]
    print(
        f"{model} agreement, {weights} weights (argmax Dice vs mqb fake-quant, % of logits within one INT8 step "
        "of max|logit|/127, fraction of voxels with the same label): "
        + ", ".join(agree)
        + f"; FP32 torch vs ov_fp32 {fp32_dice:.4f}",
        flush=True,
    )
    print(
        f"{model} rounding floor (mqb fake-quant in float64 vs float32, mqb.deploy.agreement): "
        + ", ".join(f"{k}'s network {v}" for k, v in floors.items()),
        flush=True,
    )
    graphs = {}
    for label, export in exports.items():
        profiled = OpenVINORuntime(export.path, precision="f32", shape=shape, perf_count=True)  # per-node timings
        profiled(xn)
        graphs[label] = openvino_nodes(profiled.compiled)
        rep = runtime_report(label, export.layers, graphs[label])
        top = ", ".join(f"{g['type']}/{g['precision']} {(g['time_us'] or 0) / 1000:.0f}ms" for g in rep["by_type"][:5])
        print(
            f"{model} OpenVINO layers ({label}): {rep['int8_layers']}/{len(rep['layers'])} quantized layers run in "
            f"INT8; fell back: {rep['fell_back'] or 'none'}; time by op: {top}",
            flush=True,
        )
    if nncf_ir is not None:
        profiled = OpenVINORuntime(nncf_ir, precision="f32", shape=shape, perf_count=True)
        profiled(xn)
        graphs["NNCF"] = openvino_nodes(profiled.compiled)
    plain = OpenVINORuntime(int8q.path, precision="f32", shape=shape, perf_count=True, fake_quantize=False)
    plain(xn)
    graphs["mqb int8_deploy, plain QDQ"] = openvino_nodes(plain.compiled)
    print(f"{model} executed graphs (f32 rest): " + "; ".join(f"{k}: {graph_counts(v)}" for k, v in graphs.items()),
          flush=True)  # fmt: skip
    best = min((k for k in quantized if k.startswith("ov_")), key=lambda k: med[k])
    plain_best = min((k for k in quantized if k.startswith("qdq_")), key=lambda k: med[k])
    print(
        f"{model} mqb int8_deploy, FakeQuantize form vs plain Q/DQ form: {best} {med[best]:.3f}s, {plain_best} "
        f"{med[plain_best]:.3f}s (plain / FakeQuantize latency {med[plain_best] / med[best]:.2f})",
        flush=True,
    )
    out = {
        "speedup": med["ov_fp32"] / med[best],
        "speedup_f32_rest": med["ov_fp32"]
        / min(med[k] for k in quantized if k.startswith("ov_") and "default" not in k),
        "file_ratio": file_ratio,
        "weight_ratio": weight_ratio,
        "best": best,
        "ort_speedup": med["ort_fp32"] / med["ort_int8"],
    }
    if "nncf_int8" in med:  # same precision hint on both sides: f32 vs f32, default vs default
        hint = "nncf_int8_default" if best.endswith("_default") else "nncf_int8"
        out["vs_nncf"] = med[hint] / med[best]
        # round by round (the two ran back to back, under the same load): the median of the per-round ratios
        paired = [n / m for n, m in zip(timed[hint]["times_s"], timed[best]["times_s"], strict=True)]
        out["vs_nncf_paired"] = float(np.median(paired))
        same = "nncf_int8_default" if best.endswith("_default") else "nncf_int8"
        other = "nncf_int8" if same.endswith("_default") else "nncf_int8_default"
        twin = best[: -len("_default")] if best.endswith("_default") else best + "_default"
        print(
            f"{model} mqb {best} vs NNCF {hint}: NNCF latency / mqb latency = {out['vs_nncf']:.2f} (ratio of "
            f"medians), {out['vs_nncf_paired']:.2f} (median of per-round ratios); other precision hint: mqb {twin} "
            f"vs NNCF {other} {med[other] / med[twin]:.2f}",
            flush=True,
        )
        if "v1_int8d" in med:
            for new in ("ov_int8d", "ov_int8d_default"):
                old = "v1" + new[2:]
                ref = "nncf_int8_default" if new.endswith("_default") else "nncf_int8"
                pair = [n / m for n, m in zip(timed[ref]["times_s"], timed[new]["times_s"], strict=True)]
                pair_old = [n / m for n, m in zip(timed[ref]["times_s"], timed[old]["times_s"], strict=True)]
                v1_v2 = [o / n for o, n in zip(timed[old]["times_s"], timed[new]["times_s"], strict=True)]
                print(
                    f"{model} output quantizers after in-place writers (v2, {new}) vs at first producer (v1, {old}): "
                    f"vs_nncf {med[ref] / med[new]:.3f} (paired {np.median(pair):.3f}) vs {med[ref] / med[old]:.3f} "
                    f"(paired {np.median(pair_old):.3f}); v1/v2 latency {med[old] / med[new]:.3f} "
                    f"(paired {np.median(v1_v2):.3f})",
                    flush=True,
                )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--models", nargs="+", default=["unet", "nnunet"])
    parser.add_argument("--nncf", action="store_true", help="also time NNCF's own INT8 (needs nncf installed)")
    parser.add_argument(
        "--previous-placement",
        action="store_true",
        help="also time int8_deploy with output quantizers where a tensor is first produced, ahead of in-place "
        "activations (placement v1, SharedInputRanges(in_place_writers=False)) in the same rounds",
    )
    args = parser.parse_args()
    versions = runtime_versions()
    print(
        f"{cpu_features()} | INT8: {int8_isa().describe()} | OpenVINO exact forms: {openvino_exactness()} | "
        + ", ".join(f"{k} {v}" for k, v in versions.items())
        + f" | LD_PRELOAD={os.environ.get('LD_PRELOAD', '')!r} | load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )  # fmt: skip
    results = {}
    with tempfile.TemporaryDirectory(prefix="mqb-int8-") as tmp:
        for model in args.models:
            results[model] = measure(model, args.size, args.rounds, Path(tmp), with_nncf=args.nncf,
                                     previous_placement=args.previous_placement)  # fmt: skip
    worst = min(results, key=lambda m: results[m]["speedup"])
    per_model = " ".join(
        f"{m}_speedup={r['speedup']:.2f} {m}_speedup_f32_rest={r['speedup_f32_rest']:.2f} "
        f"{m}_ort={r['ort_speedup']:.2f}"
        + (f" {m}_vs_nncf={r['vs_nncf']:.2f} {m}_vs_nncf_paired={r['vs_nncf_paired']:.2f}" if "vs_nncf" in r else "")
        for m, r in results.items()
    )
    print(per_model)
    weight_ratio = min(r["weight_ratio"] for r in results.values())
    file_ratio = min(r["file_ratio"] for r in results.values())
    vs_nncf = [r["vs_nncf"] for r in results.values() if "vs_nncf" in r]
    print(
        f"int8_speedup={results[worst]['speedup']:.2f} size_ratio={weight_ratio:.2f} runtime=openvino "
        f"config={results[worst]['best']} model={worst} file_ratio={file_ratio:.2f}"
        + (f" vs_nncf={min(vs_nncf):.2f}" if len(vs_nncf) == len(results) else "")
    )


if __name__ == "__main__":
    main()
