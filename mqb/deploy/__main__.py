"""``python -m mqb.deploy`` (``mqb-deploy``): export a calibrated mqb model to INT8 ONNX, run it on real runtimes,
profile it.

    python -m mqb.deploy export  model=unet precision=w8a8                        # FP32 + INT8 QDQ ONNX, layer plan
    python -m mqb.deploy export  model=nnunet deploy.strict=true                  # refuse layers with no INT8 form
    python -m mqb.deploy profile model=nnunet "dataset.roi_size=[96,96,96]"       # latency, memory, size, layers
    python -m mqb.deploy profile model=nnunet deploy=openvino deploy.profile.repeats=10
    python -m mqb.deploy compare model=unet model.checkpoint=/path/w.safetensors  # Dice: fake-quant vs runtimes
    mqb-deploy -m export model=unet,segresnet                                     # one export per model
    mqb-deploy --help                                                             # groups, choices, deploy keys

A Hydra app over ``conf/deploy_app.yaml``: the ``mqb.eval`` config with ``deploy.command`` (the first word sets it;
schema :class:`mqb.tool_config.DeployToolConfig`). Overrides are the usual ``mqb.eval`` ones (model, dataset,
precision, granularity, method, calibration, ``model.checkpoint``, ``dataset.roi_size`` = the exported patch
shape ...) plus the ``deploy`` group
(``conf/deploy/``: ``cpu`` (default), ``onnxruntime``, ``openvino``, ``tensorrt``) and its keys (schema:
``mqb.config.DeployConfig``):

    deploy.runtimes=[onnxruntime,openvino]   runtime families (tensorrt is skipped without a GPU)
    deploy.scheme=deploy|as_configured       see below
    deploy.strict=true                       refuse layers that cannot be exported as INT8
    deploy.narrow_range=false                no Clip before QuantizeLinear (INT8 activations may reach -128)
    deploy.share_quantization=false          no shared-QDQ rewrites of the INT8 graph (outputs are unchanged)
    deploy.overflow_fix=auto|enable|disable  7-bit INT8 weights where the CPU has no VNNI (see below)
    deploy.opset=17                          ONNX opset of both exports
    deploy.out=/path                         output folder
    deploy.profile.warmup=1 .repeats=5 .volume_repeats=3 .volume=false   profile: timing
    deploy.profile.cases=1                   compare: test volumes

The network, checkpoint, data module, recipe, PTQ methods and calibration are built as ``mqb.eval`` builds them
(calibration volumes, sliding windows); the ``deploy`` keys are not part of a result's config id.

Deployment scheme: with ``deploy.scheme=deploy`` (default) activations are quantized per-tensor and weights
per-output-channel (the INT8 scheme of TensorRT / OpenVINO / ONNX Runtime) whatever ``granularity`` says, because
mqb's ``per_channel`` scheme also makes conv activations per-channel, which no INT8 kernel takes. With
``deploy.scheme=as_configured`` the configured granularity is kept and layers without an INT8 form are exported in
float (listed in the record; ``deploy.strict=true`` refuses them instead).

INT8 on CPUs without VNNI (``mqb.deploy.isa``): such CPUs sum pairs of u8 x s8 products into saturating int16, so
a W8A8 network deployed as is computes something else than mqb's fake quantization. ``deploy.overflow_fix=auto``
(default) detects the ISA (``/proc/cpuinfo`` and ``ONEDNN_MAX_CPU_ISA``) and there quantizes the weights on a 7-bit
grid (still INT8 tensors and kernels), in mqb's fake quantization and in the export alike; the record says which
ISA was found and whether the fix was applied. ``enable`` / ``disable`` force it.

Each command writes ``<out>/deploy.json`` (atomic; machine, runtime versions, export plan, and per command the
profile / layer reports / agreement) and ``<out>/deploy.md`` (FP32 / BF16 / INT8 side by side); ``<out>``
(``deploy.out``) defaults to ``<results_dir>/../deploy/<model>-<precision>-<id>``, the id covering the config and
the export settings (scheme, narrow_range, share_quantization, opset).
"""

from __future__ import annotations

import copy
import dataclasses
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from mqb.cli import run_tool_task, tool_config, tool_main
from mqb.config import CONF_DIR, DEPLOY_RUNTIMES
from mqb.tool_config import DEPLOY, DEPLOY_COMMANDS, node_problems, register_tool_configs

if TYPE_CHECKING:  # imported when a command runs: --help, --cfg and errors come without torch
    import numpy as np
    import torch

    from mqb.deploy.export import ExportResult

COMMANDS = DEPLOY_COMMANDS
RUNTIME_FAMILIES = DEPLOY_RUNTIMES


@dataclasses.dataclass
class Prepared:
    """Everything a command needs: the float and the calibrated fake-quantized networks, data, exports."""

    cfg: DictConfig
    float_net: torch.nn.Module
    quant_net: torch.nn.Module
    dm: Any
    roi: tuple[int, ...]
    example: torch.Tensor
    fp32: ExportResult
    int8: ExportResult
    untrained: bool
    checkpoint: str | None
    scheme: str
    timings: dict[str, float]
    #: what each PTQ method (and ``calibration.shared_ranges``) did, as in ``mqb.eval`` records
    methods: list[dict[str, Any]]
    #: the INT8 dot product found (:class:`mqb.deploy.isa.Int8Isa`) and whether the overflow fix was applied
    isa: dict[str, Any]


def validate(cfg: DictConfig, command: str) -> None:
    """Refuse a bad ``deploy`` setting before any work: ``ValueError`` naming the key, the value and the valid ones
    (:func:`mqb.tool_config.node_problems`: scheme, runtimes, overflow_fix, profile counts)."""
    problems = node_problems(cfg, "deploy")
    if problems:
        raise ValueError("; ".join(problems))
    if command not in COMMANDS:
        raise ValueError(f"deploy.command={command!r} is not valid; valid: {', '.join(COMMANDS)}")
    if command != "export" and not cfg.deploy.runtimes:
        raise ValueError(f"deploy.runtimes is empty: {command} needs one of {', '.join(DEPLOY_RUNTIMES)}")


def prepare(cfg: DictConfig, out: Path) -> Prepared:
    """Build, load, quantize and calibrate as ``mqb.eval`` does; export FP32 and INT8 ONNX into ``out`` with the
    ``deploy`` settings."""
    import torch
    from hydra.utils import instantiate

    from mqb.deploy.export import export_onnx
    from mqb.deploy.isa import int8_isa, recipe_for_cpu
    from mqb.lit.evaluator import calibration_forward
    from mqb.pipeline import build_evaluator, build_methods, build_recipe, load_model
    from mqb.quant import ptq

    timings: dict[str, float] = {}
    torch.manual_seed(int(cfg.seed))  # as mqb.eval: an untrained network is the same network every run
    recipe = build_recipe(cfg)
    if recipe is None:
        raise ValueError(
            f"precision={cfg.precision.name} is a float precision: choose an INT8 one, e.g. precision=w8a8"
        )
    deploy = cfg.deploy
    scheme = cfg.granularity.name
    if deploy.scheme == "deploy":
        recipe = dataclasses.replace(recipe, scheme="deploy")
        scheme = "deploy (weights per-channel, activations per-tensor)"
    isa = int8_isa()
    recipe, fixed = recipe_for_cpu(recipe, str(deploy.overflow_fix), isa)
    if fixed:
        scheme += ", 7-bit weights (overflow fix)"
    elif isa.saturates:
        print(f"WARNING: this CPU's INT8 dot product saturates ({isa.describe()}) and deploy.overflow_fix=disable: "
              "the INT8 runtimes may compute something else than mqb's fake quantization (see the agreement)")
    net, checkpoint = load_model(cfg)
    if checkpoint is None:
        print(f"WARNING: {cfg.model.name} has no checkpoint for {cfg.dataset.name}: deploying an UNTRAINED network")
    dm = instantiate(cfg.dataset)
    dm.prepare_data()
    float_net = copy.deepcopy(net)
    forward = calibration_forward(build_evaluator(cfg, net, dm, "float32"))

    def batches() -> Any:
        return dm.calib_dataloader(cfg.calibration.num_volumes, cfg.calibration.seed)

    report = ptq(net, recipe, batches, forward, methods=build_methods(cfg))
    reports = report.methods
    timings["calibration_s"] = report.seconds

    roi = tuple(int(r) for r in dm.roi_size)
    example = torch.zeros(1, int(cfg.dataset.in_channels), *roi)
    start = time.perf_counter()
    fp32 = export_onnx(float_net, example, out / "fp32.onnx", opset=int(deploy.opset))
    exact = _openvino_exact(list(deploy.runtimes))
    float_concat_before: tuple[str, ...] = ()
    if exact:  # OpenVINO runs the export: a ConvTranspose reads a float Concat where its INT8 kernel is the faster
        from mqb.deploy.runtimes import openvino_float_concat_before

        float_concat_before = openvino_float_concat_before()
    int8 = export_onnx(net, example, out / "int8.onnx", opset=int(deploy.opset), strict=bool(deploy.strict),
                       narrow_range=bool(deploy.narrow_range),
                       share_quantization=bool(deploy.share_quantization),
                       int8_concat=exact.get("int8_concat", True), float_concat_before=float_concat_before)  # fmt: skip
    timings["export_s"] = time.perf_counter() - start
    return Prepared(cfg, float_net, net, dm, roi, example, fp32, int8, checkpoint is None,
                    str(checkpoint) if checkpoint else None, scheme, timings,
                    [r.as_dict() for r in reports],
                    {**isa.as_dict(), "overflow_fix": fixed, "openvino_exact": exact,
                     "float_concat_before": list(float_concat_before)})  # fmt: skip


def _openvino_exact(families: list[str]) -> dict[str, bool]:
    """:func:`mqb.deploy.runtimes.openvino_exactness` where OpenVINO is to run the export (empty otherwise): the
    INT8 Concat rewrite is left out of the export where OpenVINO computes it wrongly on this CPU in the form mqb's
    OpenVINO runtime runs (Q/DQ pairs as NNCF's FakeQuantize, :func:`mqb.deploy.runtimes.fake_quantize_form`)."""
    if "openvino" not in families:
        return {}
    try:
        from mqb.deploy.runtimes import openvino_exactness

        exact = openvino_exactness()
    except ImportError:
        return {}
    for form, ok in exact.items():
        if ok:
            continue
        if form == "int8_concat_onnx_qdq":  # mqb's OpenVINO runtime reads Q/DQ in NNCF's FakeQuantize form
            print("note: on this CPU OpenVINO computes an INT8 Concat of plain ONNX Q/DQ wrongly; mqb runs the file "
                  "with mqb.deploy.runtimes.fake_quantize_form (exact here): do the same outside mqb")  # fmt: skip
        else:
            print(f"note: OpenVINO does not compute the {form} graph form exactly on this CPU: not used")
    return exact


def build_runtimes(p: Prepared, families: list[str]) -> dict[str, Any]:
    """name -> runtime (or the reason it is unavailable), FP32 and INT8 for each runtime family (no profiling
    hooks: these are the timed ones)."""
    from mqb.deploy.runtimes import (
        OpenVINORuntime,
        OrtRuntime,
        RuntimeUnavailable,
        TensorRTRuntime,
        tensorrt_available,
    )

    shape = tuple(p.example.shape)
    built: dict[str, Any] = {}

    def add(name: str, build: Any) -> None:
        try:
            built[name] = build()
        except (RuntimeUnavailable, ImportError) as err:
            built[name] = f"unavailable: {err}"
        except RuntimeError as err:  # e.g. OpenVINO's default (bf16) precision under an ONEDNN_MAX_CPU_ISA cap
            built[name] = f"unavailable: {type(err).__name__}: {' '.join(str(err).split())[-300:]}"

    if "onnxruntime" in families:
        axiswise = bool(p.cfg.deploy.axiswise_norms)
        add("onnxruntime fp32", lambda: OrtRuntime(p.fp32.path, name="onnxruntime fp32", axiswise_norms=axiswise))
        add("onnxruntime int8", lambda: OrtRuntime(p.int8.path, name="onnxruntime int8", axiswise_norms=axiswise))
    if "openvino" in families:
        add("openvino fp32", lambda: OpenVINORuntime(p.fp32.path, precision="f32", shape=shape, name="openvino fp32"))
        add("openvino default", lambda: OpenVINORuntime(p.fp32.path, precision=None, shape=shape))
        add("openvino int8", lambda: OpenVINORuntime(p.int8.path, precision="f32", shape=shape, name="openvino int8"))
        add("openvino int8 default", lambda: OpenVINORuntime(p.int8.path, precision=None, shape=shape))
    if "tensorrt" in families:
        ok, why = tensorrt_available()
        if ok:
            add("tensorrt fp16", lambda: TensorRTRuntime(p.fp32.path, fp16=True))
            add("tensorrt int8", lambda: TensorRTRuntime(p.int8.path, fp16=True))
        else:
            built["tensorrt"] = f"skipped: {why}"
    for name, runtime in built.items():  # the default-precision OpenVINO entries say which precision they got
        if not isinstance(runtime, str) and name.endswith(" default"):
            runtime.name = f"{name} ({runtime.precision})"
    return built


def _test_volume(p: Prepared) -> torch.Tensor:
    batch = next(iter(p.dm.test_dataloader()))
    image = batch["image"]
    return image.as_tensor() if hasattr(image, "as_tensor") else image


def profile_all(p: Prepared, runtimes: dict[str, Any], patch: np.ndarray, settings: DictConfig,
                overlap: float) -> dict[str, Any]:  # fmt: skip
    """Patch latency (all runtimes interleaved round by round), throughput, isolated memory, whole-volume latency;
    speedups against the FP32 entry of the same runtime family. ``settings``: ``cfg.deploy.profile``."""
    from mqb.deploy.profile import interleaved_latency, isolated_memory, throughput, volume_latency

    live = {name: r for name, r in runtimes.items() if not isinstance(r, str)}
    profiles: dict[str, Any] = {}
    print(f"timing {', '.join(live)} on {tuple(patch.shape)} ...", flush=True)
    timed = interleaved_latency(live, patch, warmup=int(settings.warmup), repeats=int(settings.repeats))
    volume = _test_volume(p) if settings.volume else None
    for name, runtime in live.items():
        prof: dict[str, Any] = {
            "runtime": runtime.name,
            "precision": runtime.precision,
            "patch_shape": list(patch.shape),
            "patch_latency": timed[name],
            "throughput": throughput(timed[name]["median_s"], patch.shape),
            "versions": runtime.versions(),
            "graph_rewrites": getattr(runtime, "graph_rewrites", {}),
        }
        try:
            prof["memory"] = isolated_memory(getattr(runtime, "memory_spec", runtime.spec), tuple(patch.shape))
        except (RuntimeError, subprocess.TimeoutExpired) as err:
            prof["memory"] = {"error": str(err)[-500:]}
        if volume is not None:
            print(f"whole volume {tuple(volume.shape)}: {runtime.name} ...", flush=True)
            prof["volume_latency"] = volume_latency(runtime, volume, p.roi, sw_batch_size=1, overlap=overlap,
                                                    warmup=1, repeats=int(settings.volume_repeats))  # fmt: skip
        profiles[name] = prof
    profiles.update({name: {"skipped": r} for name, r in runtimes.items() if isinstance(r, str)})
    for family in RUNTIME_FAMILIES:  # the reference: the family's first float entry (FP32; TensorRT: FP16)
        base = next((v for k, v in profiles.items() if k.startswith(family) and "int8" not in k
                     and "patch_latency" in v), None)  # fmt: skip
        for key, prof in profiles.items():
            if base is not None and key.startswith(family) and "patch_latency" in prof:
                prof["speedup"] = base["patch_latency"]["median_s"] / prof["patch_latency"]["median_s"]
                if "volume_latency" in prof and "volume_latency" in base:
                    prof["volume_speedup"] = base["volume_latency"]["median_s"] / prof["volume_latency"]["median_s"]
    return profiles


def layer_reports(p: Prepared, runtimes: dict[str, Any], patch: np.ndarray, out: Path) -> dict[str, Any]:
    """Per-layer runtime precision of every INT8 runtime, from its own profiling (separate profiled instances:
    ORT's profiling JSON, OpenVINO's runtime model with ``PERF_COUNT``)."""
    from mqb.deploy.layer_precision import openvino_nodes, ort_nodes, runtime_report
    from mqb.deploy.runtimes import OpenVINORuntime, OrtRuntime

    reports = {}
    for name, runtime in runtimes.items():
        if isinstance(runtime, str) or "int8" not in name:
            continue
        if isinstance(runtime, OpenVINORuntime):
            spec = runtime.spec
            shape = tuple(spec["shape"]) if spec["shape"] is not None else None
            profiled = OpenVINORuntime(spec["path"], precision=spec["precision"], shape=shape, perf_count=True)
            profiled(patch)
            nodes = openvino_nodes(profiled.compiled)
        elif type(runtime) is OrtRuntime:
            # the graph the timed session runs (its axis-wise copy, if any), not rewritten a second time
            profiled_ort = OrtRuntime(runtime.session_path, profile=True, profile_dir=out, axiswise_norms=False)
            profiled_ort(patch)
            nodes = ort_nodes(profiled_ort.end_profiling())
        else:
            continue
        reports[runtime.name] = runtime_report(runtime.name, p.int8.layers, nodes)
    return reports


def agreement(p: Prepared, runtimes: dict[str, Any], cases: int, sw_batch_size: int, overlap: float,
              device: torch.device | str = "cpu") -> dict:  # fmt: skip
    """Dice of argmax predictions: mqb fake-quant vs INT8 runtimes, torch FP32 vs FP32 runtimes, per test volume;
    the two torch references run on ``device`` (the networks are moved there). The row ``ROUNDING_FLOOR`` is the
    fake quantization in float64 against the float32 one: how far apart two exact computations of this INT8 network
    are (:func:`mqb.deploy.agreement.float64_twin`), the level an INT8 runtime is judged against."""
    import numpy as np
    import torch

    from mqb.deploy.agreement import ROUNDING_FLOOR, float64_twin, logit_agreement, prediction_dice
    from mqb.deploy.profile import sliding_window
    from mqb.deploy.runtimes import TorchRuntime

    fake_quant = TorchRuntime(p.quant_net.to(device), "mqb fake-quant")
    float_ref = TorchRuntime(p.float_net.to(device), "torch fp32")
    # the rounding floor: the same fake quantization in float64 (mqb.deploy.agreement); MPS has no float64
    floor_device = torch.device(device)
    floor_device = floor_device if floor_device.type != "mps" else torch.device("cpu")
    floor = TorchRuntime(float64_twin(p.quant_net).to(floor_device), ROUNDING_FLOOR, dtype=torch.float64)
    runtimes = {**runtimes, ROUNDING_FLOOR: floor}
    per_runtime: dict[str, dict[str, Any]] = {}
    for i, batch in enumerate(p.dm.test_dataloader()):
        if i >= cases:
            break
        image = batch["image"].as_tensor() if hasattr(batch["image"], "as_tensor") else batch["image"]
        kwargs = {"sw_batch_size": sw_batch_size, "overlap": overlap}
        refs = {"int8": sliding_window(fake_quant, image, p.roi, **kwargs).numpy(),
                "fp32": sliding_window(float_ref, image, p.roi, **kwargs).numpy()}  # fmt: skip
        patch = image[..., : p.roi[0], : p.roi[1], : p.roi[2]]
        patch_refs = {"int8": fake_quant(patch.numpy()), "fp32": float_ref(patch.numpy())}
        for name, runtime in runtimes.items():
            if isinstance(runtime, str):
                continue
            kind = "int8" if "int8" in name or name == ROUNDING_FLOOR else "fp32"
            pred = sliding_window(runtime, image, p.roi, **kwargs).numpy()
            row = per_runtime.setdefault(runtime.name, {"reference": "mqb fake-quant" if kind == "int8" else
                                                        "torch fp32", "precision": runtime.precision,
                                                        "graph_rewrites": getattr(runtime, "graph_rewrites", {}),
                                                        "cases": []})  # fmt: skip
            case = prediction_dice(refs[kind], pred)
            if tuple(patch.shape[2:]) == p.roi:
                case["patch_logits"] = logit_agreement(patch_refs[kind], runtime(patch.numpy()))
            row["cases"].append(case)
    for row in per_runtime.values():
        row["dice"] = float(np.mean([c["dice"] for c in row["cases"]]))
        row["voxel_agreement"] = float(np.mean([c["voxel_agreement"] for c in row["cases"]]))
    return per_runtime


def _config_dict(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config without the logger (whose paths interpolate Hydra's run-time config)."""
    out = copy.deepcopy(cfg)
    with open_dict(out):
        out.pop("logger", None)
    container = OmegaConf.to_container(out, resolve=True)
    assert isinstance(container, dict)
    return container


def run(command: str, cfg: DictConfig) -> dict[str, Any]:
    """Export (and profile or compare) the model ``cfg`` describes; writes and returns the deploy record."""
    import numpy as np

    from mqb.analysis.tables import deploy_markdown
    from mqb.deploy.isa import overflow_fix_active
    from mqb.deploy.runtimes import cpu_features, runtime_versions
    from mqb.results import config_id, host_info, stable_hash, write_json_atomic

    validate(cfg, command)
    deploy = cfg.deploy
    cid = config_id(cfg)  # the evaluation's id: deploy.* is not part of it, so the export settings go in the run id
    export = {k: deploy[k] for k in ("scheme", "narrow_range", "share_quantization", "opset")}
    if overflow_fix_active(str(deploy.overflow_fix)):  # only when it changes the export: earlier ids are kept
        export["overflow_fix"] = True
    run_id = stable_hash({"config": cid, "export": export})[:12]
    out = Path(deploy.out) if deploy.out else Path(cfg.results_dir).parent / "deploy" / (
        f"{cfg.model.name}-{cfg.precision.name}-{run_id}"
    )  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    p = prepare(cfg, out)
    size_ratio = p.fp32.file_bytes / p.int8.file_bytes
    record: dict[str, Any] = {
        "command": command,
        "id": cid,
        "created": datetime.now(UTC).isoformat(),
        "model": cfg.model.name,
        "dataset": cfg.dataset.name,
        "precision": cfg.precision.name,
        "scheme": p.scheme,
        "untrained": p.untrained,
        "checkpoint": p.checkpoint,
        "roi_size": list(p.roi),
        "export": {
            "fp32": p.fp32.as_dict(),
            "int8": p.int8.as_dict(),
            "size_ratio": size_ratio,
            "weight_ratio": p.fp32.weight_bytes / p.int8.weight_bytes,
        },  # fmt: skip
        "machine": cpu_features(),
        "int8_isa": p.isa,
        "versions": runtime_versions(),
        "host": host_info(),
        "timings": p.timings,
        "methods": p.methods,
        "config": _config_dict(cfg),
    }
    for layer in p.int8.float_layers:
        print(f"exported in float: {layer.name}: {layer.reason}")
    if command in ("profile", "compare"):
        runtimes = build_runtimes(p, list(deploy.runtimes))
        patch = np.random.default_rng(0).random(tuple(p.example.shape), dtype=np.float32)
        record["layer_reports"] = layer_reports(p, runtimes, patch, out)
        if command == "profile":
            record["profile"] = profile_all(p, runtimes, patch, deploy.profile, float(cfg.eval.overlap))
        else:
            from mqb.devices import device_info
            from mqb.pipeline import compute_device

            device = compute_device(cfg)  # the torch references run where mqb.eval runs (trainer.accelerator)
            record["reference_device"] = device_info(device)
            record["agreement"] = agreement(
                p, runtimes, int(deploy.profile.cases), int(cfg.eval.sw_batch_size), float(cfg.eval.overlap),
                device=device,
            )
    write_json_atomic(out / "deploy.json", record)
    from mqb.results import atomic_write

    with atomic_write(out / "deploy.md") as tmp:
        tmp.write_text(deploy_markdown(record))
    print(deploy_markdown(record))
    print(f"written: {out / 'deploy.json'}, {out / 'deploy.md'}, {p.fp32.path}, {p.int8.path}")
    return record


def run_task(cfg: DictConfig) -> None:
    """The Hydra task: one command on one config. Module-level and undecorated so launchers pickle it by
    reference. Bad input (a float precision, a runtime that cannot run) ends a single run with exit 2."""
    from mqb.deploy.runtimes import RuntimeUnavailable

    def work() -> None:
        _, options = tool_config(cfg, DEPLOY)
        run(str(options.command), cfg)

    run_tool_task(DEPLOY, work, user_errors=(ValueError, RuntimeUnavailable))


_hydra_main = hydra.main(config_path=str(CONF_DIR), config_name=DEPLOY.config_name, version_base="1.3")(run_task)


def main(argv: list[str] | None = None) -> int:
    """``mqb-deploy`` / ``python -m mqb.deploy``: the exit status (2 for a user error)."""
    return tool_main(DEPLOY, _hydra_main, argv)


register_tool_configs()

if __name__ == "__main__":
    # Run the importable module, not this __main__ copy: launchers (submitit) pickle the task function by reference.
    from mqb.deploy.__main__ import main as _main

    sys.exit(_main())
