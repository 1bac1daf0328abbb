"""The evaluation pipeline as a library: config -> objects -> record. Every tool builds through it.

One config, from its Hydra config to its record (:func:`evaluate`)::

    build_recipe(cfg)          precision x granularity x method -> QuantRecipe (validated; None for float)
    load_model(cfg)            instantiate(cfg.model.net) + resolve_checkpoint + load_weights, eval mode
    instantiate(cfg.dataset)   SegmentationDataModule (MONAI transforms, cached, fingerprinted cases)
    fp32_baseline(...)         the FP32 metrics (and predictions where there are no labels), cached by baseline_key
    build_evaluator(...)       SegmentationEvaluator: MONAI sliding window + DSC / NSD / HD95 per case
    QuantizationCallback       mqb.quant.ptq (quantize -> methods -> calibrate -> post-calibration methods) before
                               the test loop, on the calibration split
    build_trainer(...).test    Lightning runs the quantized evaluation
    -> record                  metrics, Δ % and its statistics vs FP32, realizability, timings, device, config

Writing the record (resume, claims, error records) is :mod:`mqb.jobs`; the command line is :mod:`mqb.eval`.
``compose_eval`` (:mod:`mqb.config`) gives the config of a list of overrides outside ``hydra.main``::

    from mqb.config import compose_eval
    from mqb.pipeline import evaluate
    record = evaluate(compose_eval(["model=unet", "precision=w4a4", "logger=none"]))
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
import typing
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import mqb
from mqb.analysis.tables import console
from mqb.checkpoints import CheckpointError, file_sha256, load_weights
from mqb.cli import hydra_job, is_multirun
from mqb.config import CONF_DIR, check_quant_settings, compose_eval, renamed_option
from mqb.data.module import SegmentationDataModule
from mqb.devices import apply_fp32_precision, device_info
from mqb.lit import quiet_lightning
from mqb.lit.callbacks import PreemptionCallback, QuantizationCallback
from mqb.lit.evaluator import SegmentationEvaluator, calibration_forward
from mqb.loggers import build_logger, log_record
from mqb.quant import LayerRule, QuantRecipe
from mqb.quant import plan as quant_plan
from mqb.quant.formats import FORMATS
from mqb.quant.methods import PTQMethod, SharedInputRanges
from mqb.quant.recipe import DEFAULT_INCLUDE
from mqb.quant.spec import FORMAT_BITS
from mqb.results import (
    config_id,
    git_commit,
    host_info,
    is_rank_zero,
    save_tensors_atomic,
    stable_hash,
    write_json_atomic,
)
from mqb.samples import missing_sample_hint, sample_data_dir

__all__ = [
    "PIPELINE_VERSION", "baseline_key", "build_evaluator", "build_methods", "build_recipe", "build_trainer",
    "calibration_inputs", "compose_eval", "compute_device", "evaluate", "fp32_baseline", "inference_window",
    "load_model", "method_label", "precision_label", "resolve_checkpoint", "set_numerics",
]  # fmt: skip

#: Bumped whenever evaluation results change for the same inputs, invalidating cached baselines.
PIPELINE_VERSION = 4  # 3: NSD / HD95 as DeepMind surface-distance (surfel-area weighted); model code in the key
# 4: resampled datasets (dataset.pixdim) scored on each case's native grid by default (dataset.score_on=native)


# -- configuration -> objects -----------------------------------------------------------------------------
def build_recipe(cfg: DictConfig) -> QuantRecipe | None:
    """The quantization recipe of a config, or ``None`` for float precisions (fp32/fp16/bf16); raises a
    ``ValueError`` for contradictory settings (a bit width the format does not have, no calibration volume)."""
    _check_settings(cfg)
    p = cfg.precision
    if p.weight is None and p.activation is None:
        return None
    weight = instantiate(p.weight) if p.weight is not None else None
    activation = instantiate(p.activation) if p.activation is not None else None
    if activation is not None:
        activation = activation.replace(observer=cfg.calibration.observer, percentile=cfg.calibration.percentile)
    method = cfg.method
    rules = tuple(LayerRule(r.select, r.precision, scheme=r.granularity) for r in method.rules)
    return QuantRecipe(
        weight=weight,
        activation=activation,
        scheme=cfg.granularity.scheme,
        include=tuple(method.include),
        exclude=tuple(method.exclude),
        attention=bool(method.attention),
        rules=rules,
    )


#: Names of the float compute dtypes in precision labels (as the presets are named; formats: ``Format.label``).
_DTYPE_NAMES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def _task_overrides() -> list[str]:
    return list(job.overrides.task) if (job := hydra_job()) is not None else []


def _preset_precision(name: str) -> dict[str, Any] | None:
    """The precision preset ``conf/precision/<name>.yaml`` as composed (schema defaults filled), or ``None``."""
    from mqb.config import PrecisionConfig

    path = CONF_DIR / "precision" / f"{name}.yaml"
    if not path.is_file():
        return None
    try:
        merged = OmegaConf.merge(OmegaConf.structured(PrecisionConfig), OmegaConf.load(path))
        data = OmegaConf.to_container(merged, resolve=True)
    except Exception:  # noqa: BLE001
        return None
    return data if isinstance(data, dict) else None


def _explicit(cfg: DictConfig, key: str) -> bool:
    """Whether ``precision.<role>.<field>`` was set by the user: on the command line, or to a value other than
    the preset's."""
    if any(o.lstrip("+~").partition("=")[0] == key for o in _task_overrides()):
        return True
    preset = _preset_precision(str(cfg.precision.get("name")))
    if preset is None:
        return False
    _, role, field = key.split(".")
    return (preset.get(role) or {}).get(field) != OmegaConf.select(cfg, key)


def _check_settings(cfg: DictConfig) -> None:
    """Reject settings that contradict each other or cannot work, naming the keys."""
    if OmegaConf.is_missing(cfg.model.net, "_target_"):
        raise ValueError(
            f"model.net._target_ is not set: model={cfg.model.name} needs your network class, e.g. "
            "model.net._target_=my_pkg.MyNet (importable), with its arguments as +model.net.<name>=<value>"
        )
    if cfg.get("quant") is not None:
        check_quant_settings(cfg.quant)  # quant.kernel: one of auto, eager, compiled
    calibration = cfg.get("calibration")
    if calibration is not None:
        n = calibration.get("num_volumes")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"calibration.num_volumes={n!r} is invalid; valid: a positive number of calibration "
                             "volumes (1 or more)")  # fmt: skip
        k = calibration.get("draws", 1)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"calibration.draws={k!r} is invalid; valid: the number of calibration draws (1 or "
                             "more; each calibrates and evaluates the config once more)")  # fmt: skip
    for role in ("weight", "activation"):
        spec = cfg.precision.get(role)
        if spec is None or spec.get("format") not in FORMAT_BITS:
            continue
        bits, fixed = spec.get("bits"), FORMAT_BITS[spec.format]
        if bits != fixed and _explicit(cfg, f"precision.{role}.bits"):
            raise ValueError(
                f"precision.{role}.bits={bits} contradicts precision.{role}.format={spec.format}, whose elements "
                f"are {fixed}-bit; drop the bits setting or use format=int for {bits}-bit integers"
            )


def _check_plan(cfg: DictConfig, recipe: QuantRecipe, net: torch.nn.Module) -> None:
    """Reject a precision setting the granularity scheme would silently override on some layer: ``dynamic=false``
    where the scheme gives per-voxel/per-token/per-group scales (computed per input, so always dynamic), or a
    ``group_size`` where the scheme does not group."""
    plain = dataclasses.replace(recipe, rules=tuple(r for r in recipe.rules if r.precision is None))
    for layer in quant_plan(net, plain):
        for role, spec in (("weight", layer.weight), ("activation", layer.activation)):
            node = cfg.precision.get(role)
            if spec is None or node is None:
                continue
            where = f"granularity={cfg.granularity.name}: it gives layer {layer.info.name!r} ({layer.info.kind})"
            if node.get("dynamic") is False and spec.dynamic:
                raise ValueError(
                    f"precision.{role}.dynamic=false contradicts {where} {spec.granularity} {role} scales, which are "
                    "computed from each input (dynamic); drop the setting or choose a static granularity "
                    "(per_tensor, deploy)"
                )
            if node.get("group_size") is not None and spec.group_size != node.group_size:
                raise ValueError(
                    f"precision.{role}.group_size={node.group_size} contradicts {where} {spec.granularity} {role} "
                    "scales (no groups); use granularity=per_group or drop the setting"
                )


def precision_label(cfg: DictConfig) -> str:
    """The precision that runs, as a record and table label: the preset's name when its settings are unchanged,
    else a name derived from the settings (``precision=w8a8 precision.weight.bits=4 precision.activation.bits=4``
    is ``w4a4``; extras such as ``+asym``, ``+a_static``, ``+g64``, ``+bf16`` say what differs from a preset)."""
    p = cfg.precision
    name = str(p.get("name"))
    dtype = str(p.get("compute_dtype") or "float32")
    specs = {role: instantiate(p[role]) if p.get(role) is not None else None for role in ("weight", "activation")}
    weight, activation = specs["weight"], specs["activation"]
    if weight is None and activation is None:
        derived = _DTYPE_NAMES.get(dtype, dtype)
    else:
        def part(spec: Any, prefix: str) -> str:
            if spec is None:
                return f"{prefix}16"
            element = str(spec.bits) if spec.format == "int" else FORMATS[spec.format].label
            return f"{prefix}{element}"

        if weight is not None and activation is not None and weight.format == activation.format != "int":
            derived = FORMATS[weight.format].label
        else:
            derived = part(weight, "w") + part(activation, "a")
        extras = []
        for role, spec in specs.items():
            node = p.get(role)
            if spec is None or node is None:
                continue
            if not spec.symmetric:
                extras.append(f"{role[0]}_asym")
            if node.get("dynamic") is not None:
                extras.append(f"{role[0]}_{'dynamic' if node.dynamic else 'static'}")
            if node.get("group_size") is not None and not spec.is_block_format:
                extras.append(f"{role[0]}_g{node.group_size}")
        if dtype != "float32":
            extras.append(_DTYPE_NAMES.get(dtype, dtype))
        derived = "+".join([derived, *extras])
    if derived == name:
        return name
    preset = _preset_precision(name)
    if preset is not None and preset == OmegaConf.to_container(p, resolve=True):
        return name  # a user preset with a name of its own, unchanged
    return derived


def method_label(cfg: DictConfig) -> str:
    """The method's name, plus the layer kinds quantized beyond the default ones and the shared-range step:
    ``rtn+norm+shared_ranges+tensor_quantizers`` for ``experiment=int8_deploy`` (so tables tell such runs apart;
    ``tensor_quantizers`` is the label's word for ``method.output_quantizers``, kept so labels of earlier records
    match)."""
    extra = [str(s) for s in cfg.method.get("include") or () if str(s) not in DEFAULT_INCLUDE]
    with warnings.catch_warnings():  # build_methods warns about a deprecated spelling once
        warnings.simplefilter("ignore", FutureWarning)
        options = {"shared_ranges": "method.shared_ranges", "tensor_quantizers": "method.output_quantizers"}
        extra += [label for label, key in options.items() if renamed_option(cfg, key)]
    return "+".join([str(cfg.method.get("name")), *extra])


def build_methods(cfg: DictConfig) -> list[PTQMethod]:
    """The PTQ methods of ``cfg.method.steps`` (empty for round-to-nearest), in order, preceded by the
    :class:`~mqb.quant.methods.SharedInputRanges` step when ``method.shared_ranges`` or ``method.output_quantizers``
    is on (it runs right after calibration, before post-calibration methods such as bias correction measure
    anything). The deprecated spellings ``calibration.shared_ranges`` / ``calibration.tensor_quantizers`` still work
    (one warning each)."""
    methods = [instantiate(step) for step in cfg.method.get("steps") or []]
    wrong = [type(m).__name__ for m in methods if not isinstance(m, PTQMethod)]
    if wrong:
        raise ValueError(f"method.steps must build mqb.quant.methods.PTQMethod objects, got {wrong}")
    output_quantizers = renamed_option(cfg, "method.output_quantizers")
    if renamed_option(cfg, "method.shared_ranges") or output_quantizers:
        methods.insert(0, SharedInputRanges(output_quantizers=output_quantizers))
    return methods


def resolve_checkpoint(cfg: DictConfig) -> Path | None:
    """``model.checkpoint``: a path (must exist), ``auto`` (the trained checkpoint cache), or null (untrained)."""
    value = cfg.model.get("checkpoint")
    if value in (None, "", "none", "null"):
        return None
    if value != "auto":
        path = Path(str(value)).expanduser()
        if not path.is_file():
            hint = "give a weights file or 'auto'"
            if (samples := sample_data_dir(path)) is not None:  # a shipped sample: say which setting finds it
                hint = missing_sample_hint(samples, alternative="model.checkpoint")
            raise CheckpointError(f"model.checkpoint={str(value)!r} does not exist; {hint}")
        return path
    path = Path(cfg.paths.checkpoints) / cfg.dataset.name / f"{cfg.model.name}.safetensors"
    stale = stale_checkpoint(path, cfg) if path.is_file() else None
    if path.is_file() and (stale is None or not cfg.auto_train):
        if stale is not None:
            console.print(f"[yellow]warning: {stale}; its numbers will differ from a fresh training's (delete it, or "
                          "set auto_train=true, to train it again)")  # fmt: skip
        return path
    if cfg.auto_train:
        from mqb.train import fit

        why = f"{stale}: training it again" if stale else f"no checkpoint for {cfg.model.name} on {cfg.dataset.name}"
        console.print(f"[yellow]{why} -> {path}")
        fit(cfg.model, cfg.dataset, cfg.train, path, progress=cfg.trainer.progress,
            accelerator=cfg.trainer.accelerator, fp32_precision=cfg.trainer.fp32_precision)
        return path
    return None


def stale_checkpoint(path: Path, cfg: DictConfig) -> str | None:
    """Why the cached checkpoint ``path`` (``model.checkpoint=auto``) is not what ``mqb.train`` would train from
    ``cfg.train`` today, or ``None``: its sidecar (``.json``) is missing or unreadable, it predates deterministic
    training (no ``determinism`` record), or it was trained with other ``train`` settings."""
    sidecar = path.with_suffix(".json")
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return f"the cached checkpoint {path} has no readable training record ({sidecar.name})"
    if "determinism" not in meta:
        return f"the cached checkpoint {path} was trained by an earlier mqb, not reproducibly"
    trained, wanted = meta.get("train") or {}, OmegaConf.to_container(cfg.train, resolve=True)
    assert isinstance(wanted, dict)
    changed = sorted(k for k in set(trained) | set(wanted) if trained.get(k) != wanted.get(k))
    if changed:
        return (f"the cached checkpoint {path} was trained with other settings ("
                + ", ".join(f"train.{k}={trained.get(k)!r}, now {wanted.get(k)!r}" for k in changed) + ")")
    return None


def build_trainer(cfg: DictConfig, logger: Any, run_dir: Path, callbacks: list[L.Callback]) -> L.Trainer:
    """The Lightning trainer of an evaluation (``cfg.trainer``: accelerator, devices, strategy, progress), quiet,
    with a :class:`~mqb.lit.callbacks.PreemptionCallback` (SIGTERM stops it before the next sliding window)."""
    quiet_lightning()
    if not any(isinstance(c, PreemptionCallback) for c in callbacks):  # QuantizationCallback is one already
        callbacks = [PreemptionCallback(), *callbacks]
    return L.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        strategy=cfg.trainer.strategy,
        logger=logger if logger is not None else False,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=cfg.trainer.progress,
        default_root_dir=str(run_dir),
    )


def build_evaluator(
    cfg: DictConfig, net: torch.nn.Module, dm: SegmentationDataModule, dtype: str, **kwargs: Any
) -> SegmentationEvaluator:
    """The evaluator of a config on ``dm``: its window, sliding-window settings, NSD tolerances, and the grid the
    metrics are computed on (``dataset.score_on``: the native grid, through ``dm.native_grid()``, where the data
    is resampled)."""
    return SegmentationEvaluator(
        net,
        class_names=dm.class_names,
        roi_size=inference_window(cfg, dm),
        sw_batch_size=cfg.eval.sw_batch_size,
        overlap=cfg.eval.overlap,
        mode=cfg.eval.mode,
        nsd_tolerance_mm=dm.nsd_tolerance_mm,
        compute_dtype=dtype,
        native_grid=dm.native_grid(),
        grid=dm.grid_definition,
        **kwargs,
    )


def inference_window(cfg: DictConfig, dm: SegmentationDataModule) -> tuple[int, ...]:
    """The window the model is run with, as the model config says (``model.inference``):

    * ``whole_volume: true``: one window that is the whole volume (``-1`` per axis: MONAI's sliding window then
      takes the image size), as brainchop runs MeshNet;
    * ``roi_size: [x, y, z]``: sliding windows of that size (the size the network was trained on);
    * neither (or no ``inference`` node): the dataset's ``roi_size``.
    """
    inference = cfg.model.get("inference") or {}
    if inference.get("whole_volume"):
        return (-1,) * len(dm.roi_size)
    if inference.get("roi_size") is not None:
        return tuple(int(r) for r in inference["roi_size"])
    return tuple(dm.roi_size)


def checkpoint_keys(cfg: DictConfig) -> dict[str, Any]:
    """``model.checkpoint_keys`` (optional): ``rename`` (prefix -> prefix) and ``ignore`` (regular expressions)
    for a checkpoint whose keys are not the network's (:func:`mqb.checkpoints.load_weights`)."""
    keys = cfg.model.get("checkpoint_keys") or {}
    unknown = sorted(set(keys) - {"rename", "ignore"})
    if unknown:
        raise ValueError(f"model.checkpoint_keys: unknown key(s) {unknown}; valid: rename, ignore")
    return {"rename": dict(keys.get("rename") or {}), "ignore": list(keys.get("ignore") or [])}


def load_model(cfg: DictConfig) -> tuple[torch.nn.Module, Path | None]:
    """The config's network in eval mode with its checkpoint loaded (``None``: untrained); ``evaluate`` and every
    tool build the network with it."""
    net = instantiate(cfg.model.net)
    checkpoint = resolve_checkpoint(cfg)
    if checkpoint is not None:
        load_weights(net, checkpoint, **checkpoint_keys(cfg))
    return net.eval(), checkpoint


def set_numerics(cfg: DictConfig) -> dict[str, Any]:
    """Set this process's float arithmetic for evaluation forwards (before the first): ``trainer.fp32_precision``
    (FP32 means FP32, :mod:`mqb.devices`), and cuDNN's deterministic algorithms without its benchmark (otherwise a
    ConvTranspose3d may get a non-deterministic algorithm, and a cached FP32 baseline need not reproduce; no effect
    on the CPU). Returns what is in force, for a record's ``device`` section."""
    numerics = apply_fp32_precision(str(cfg.trainer.get("fp32_precision", "ieee")))
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    return {**numerics, "cudnn_deterministic": True}


def compute_device(cfg: DictConfig) -> torch.device:
    """The device ``trainer.accelerator`` asks for, for the passes that run outside Lightning (error proxies,
    activation statistics, ``mqb.deploy compare``): ``gpu``/``cuda`` -> CUDA, ``auto`` -> CUDA when available,
    otherwise the CPU; with the config's float arithmetic set (:func:`set_numerics`), as ``mqb.eval`` sets it."""
    accelerator = str(cfg.trainer.get("accelerator", "cpu")).lower()
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ValueError(f"trainer.accelerator={accelerator} needs CUDA, which is not available")
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    set_numerics(cfg)  # before the pass's first forward
    return torch.device("cuda" if on_gpu else "cpu")


def calibration_inputs(
    cfg: DictConfig, net: torch.nn.Module
) -> tuple[typing.Callable[[], typing.Any], typing.Callable[[torch.nn.Module, typing.Any], typing.Any]]:
    """``(batches(), forward)`` over the config's calibration volumes: a fresh loader per call and a
    sliding-window forward, exactly what calibration sees in ``mqb.eval`` (for tools that work outside it)."""
    dm: SegmentationDataModule = instantiate(cfg.dataset)
    dm.prepare_data()
    evaluator = build_evaluator(cfg, net, dm, "float32")
    return (lambda: dm.calib_dataloader(cfg.calibration.num_volumes, cfg.calibration.seed)), calibration_forward(
        evaluator
    )


def baseline_key(cfg: DictConfig, checkpoint_sha: str | None, test_files: list[str | None] | None = None) -> str:
    """Cache key of the FP32 baseline: model (config, code, inference), checkpoint bytes, dataset (config and the
    test files' fingerprints), evaluation settings, mqb version."""
    dataset = OmegaConf.to_container(cfg.dataset, resolve=True)
    assert isinstance(dataset, dict)
    for key in ("num_workers", "batch_size", "samples_per_volume", "cache_dir"):
        dataset.pop(key, None)
    if isinstance(dataset.get("source"), dict):
        dataset["source"].pop("cache_dir", None)
    return stable_hash(
        {
            "model": OmegaConf.to_container(cfg.model.net, resolve=True),
            "code": model_code_sha(cfg),  # the network's own source: edited model code recomputes the baseline
            # the test files' size and mtime (mqb.data.module.file_fingerprint): a file fixed in place is re-read
            **({"files": test_files} if test_files else {}),
            # how the model is run (window / whole volume); absent where the model config has no say (stable keys)
            **({"inference": OmegaConf.to_container(cfg.model.inference, resolve=True)}
               if cfg.model.get("inference") else {}),
            "checkpoint": checkpoint_sha,
            "dataset": dataset,
            "eval": {k: v for k, v in OmegaConf.to_container(cfg.eval, resolve=True).items()
                     if k != "save_predictions"},  # what is written, not what is computed  # fmt: skip
            "mqb": mqb.__version__,
            "pipeline": PIPELINE_VERSION,
            # TF32 changes the FP32 numbers; at the default (ieee) the key is the one earlier baselines had
            **({"fp32_precision": fp32} if (fp32 := cfg.trainer.get("fp32_precision", "ieee")) != "ieee" else {}),
        },
        length=24,
    )


def model_code_sha(cfg: DictConfig) -> str | None:
    """SHA-256 of the source file of the network class ``model.net._target_`` (a user's model code changes the
    FP32 baseline as much as its weights do); ``None`` where it has no readable source."""
    import importlib
    import inspect

    target = str(cfg.model.net.get("_target_", ""))
    module_name, _, attr = target.rpartition(".")
    try:
        source = inspect.getsourcefile(getattr(importlib.import_module(module_name), attr))
        return file_sha256(source) if source else None
    except (ImportError, AttributeError, OSError, TypeError, ValueError):
        return None


def drop_stats(cfg: DictConfig, baseline: dict[str, Any], metrics: dict[str, Any], dm: Any) -> dict[str, Any] | None:
    """:func:`mqb.analysis.stats.compare` of this config's per-case metrics with the FP32 baseline's (seeded by
    ``seed``), or ``None`` where either has no per-case values."""
    from mqb.analysis.stats import compare

    if not baseline.get("per_case") or not metrics.get("per_case"):
        return None
    return compare(baseline, metrics, seed=int(cfg.seed), class_names=list(dm.class_names[1:]))


def delta_pct(base: float | None, value: float | None, higher_is_better: bool = True) -> float | None:
    if base is None or value is None or base == 0:
        return None
    drop = (base - value) if higher_is_better else (value - base)
    return 100.0 * drop / abs(base)


@dataclasses.dataclass
class Baseline:
    """The FP32 reference of a config: its metrics, the FP32 predictions where the test cases have no labels (the
    reference every quantized run is scored against), whether it came from the cache, where it ran."""

    key: str
    metrics: dict[str, Any]
    predictions: dict[str, torch.Tensor] | None  # case -> uint8 label map on the grid the metrics are on
    cached: bool
    ran_on: dict[str, Any]
    timings: dict[str, float]


def fp32_baseline(cfg: DictConfig, net: torch.nn.Module, dm: SegmentationDataModule, checkpoint_sha: str | None,
                  run_dir: Path, keep_predictions: bool = False) -> Baseline:  # fmt: skip
    """The FP32 evaluation of ``net`` on the test split, from ``paths.cache_dir/baselines/<baseline_key>.json``
    when cached (configs of a sweep share it), else computed (on a copy: ``net`` is left as it is) and cached.

    Its predictions (label maps on the grid the metrics are on) are kept, and cached beside the metrics, where the
    test cases have no labels (the reference of every quantized run) or ``keep_predictions`` asks for them
    (``eval.save_predictions``); a cached baseline without them is computed again. ``eval.save_predictions`` is not
    part of the key: it says what is written, not what is computed."""
    key = baseline_key(cfg, checkpoint_sha, [c.get("fingerprint") for c in dm.splits["test"]])
    metrics_file = Path(cfg.paths.cache_dir) / "baselines" / f"{key}.json"
    predictions_file = metrics_file.with_suffix(".predictions.pt")
    labelled = dm.test_has_labels
    needed = not labelled or keep_predictions
    predictions = None
    if needed and predictions_file.is_file():
        try:
            predictions = torch.load(predictions_file, weights_only=True)
        except Exception:  # noqa: BLE001  (unreadable cache: recompute the reference below)
            predictions = None
        if not isinstance(predictions, dict) or any(c["case"] not in predictions for c in dm.splits["test"]):
            predictions = None
    if metrics_file.is_file() and (not needed or predictions is not None):
        cached = json.loads(metrics_file.read_text())
        return Baseline(key, cached, predictions, True, {"type": "none (cached FP32 baseline)"},
                        {"baseline_seconds": 0.0})  # fmt: skip
    start = time.perf_counter()
    evaluator = build_evaluator(cfg, copy.deepcopy(net), dm, "float32", keep_predictions=needed)
    trainer = build_trainer(cfg, None, run_dir, [])
    trainer.test(evaluator, datamodule=dm, verbose=False)
    if needed:  # no labels: the FP32 prediction is the reference of every quantized run; or written as NIfTI
        predictions = evaluator.predictions
        if is_rank_zero():
            save_tensors_atomic(predictions_file, predictions)
    if is_rank_zero():
        write_json_atomic(metrics_file, evaluator.results)
    timings = {"baseline_seconds": time.perf_counter() - start, "baseline_data_seconds": evaluator.data_seconds,
               "baseline_forward_seconds": evaluator.forward_seconds,
               "baseline_metric_seconds": evaluator.metric_seconds}
    return Baseline(key, evaluator.results, predictions, False, device_info(trainer.strategy.root_device), timings)


def _warn_untrained(cfg: DictConfig) -> None:
    console.print(
        f"[bold red]WARNING: {cfg.model.name} has no checkpoint for {cfg.dataset.name}: evaluating an UNTRAINED "
        "network (results are flagged untrained: true and mean nothing). Train one with "
        f"`python -m mqb.train model={cfg.model.name} dataset={cfg.dataset.name}` or pass model.checkpoint=PATH."
    )


def run_dirs(cfg: DictConfig) -> tuple[Path, str]:
    """This run's output folder and the name of its sweep (the run folder's name outside a sweep)."""
    job = hydra_job()
    run_dir = Path(job.runtime.output_dir) if job is not None else Path(cfg.paths.output_dir)
    return run_dir, Path(job.sweep.dir).name if is_multirun() else run_dir.name


@dataclasses.dataclass
class QuantizedRun:
    """One evaluation of the quantized (or low-precision) network: its metrics, the quantization callback (``None``
    for a float precision), where it ran and how long it took."""

    metrics: dict[str, Any]
    callback: QuantizationCallback | None
    ran_on: dict[str, Any]
    timings: dict[str, float]
    calibration: list[int]  # indices into the calibration split (empty for a float precision)
    predictions: dict[str, torch.Tensor] | None = None  # case -> uint8 label map (keep_predictions)


def quantized_run(cfg: DictConfig, net: torch.nn.Module, dm: SegmentationDataModule, baseline: Baseline,
                  recipe: QuantRecipe | None, logger: Any, run_dir: Path, seed: int,
                  keep_predictions: bool = False) -> QuantizedRun:  # fmt: skip
    """Post-training quantization of ``net`` in place (:class:`QuantizationCallback`: ``mqb.quant.ptq`` on the
    calibration volumes drawn with ``seed``; none for a float precision) and the evaluation on the test split,
    scored against the labels or the FP32 predictions (on the grid the metrics are on); ``keep_predictions``: the
    run's label maps come back in ``predictions``."""
    reference = baseline.predictions if not dm.test_has_labels else None
    evaluator = build_evaluator(cfg, net, dm, cfg.precision.compute_dtype, reference_predictions=reference,
                                keep_predictions=keep_predictions)  # fmt: skip
    callback, calib = None, []
    if recipe is not None:
        n = cfg.calibration.num_volumes
        calib = dm.calibration_indices(n, seed)
        calib_files = [dm.splits["calib"][i].get("fingerprint") for i in calib]  # contents, not only paths
        range_key = stable_hash({"baseline": baseline.key, "calibration": calib, "files": calib_files, "v": 1}, 24)
        callback = QuantizationCallback(
            recipe,
            lambda: dm.calib_dataloader(n, seed),
            calibration_forward(evaluator),
            progress=cfg.trainer.progress,
            range_cache=Path(cfg.paths.cache_dir) / "calibration" / f"{range_key}.pt",
            methods=build_methods(cfg),
            kernel=str(cfg.get("quant", {}).get("kernel", "auto")),
        )
    start = time.perf_counter()
    trainer = build_trainer(cfg, logger, run_dir, [callback] if callback is not None else [])
    trainer.test(evaluator, datamodule=dm, verbose=False)
    timings = {"eval_seconds": time.perf_counter() - start, "data_seconds": evaluator.data_seconds,
               "forward_seconds": evaluator.forward_seconds, "metric_seconds": evaluator.metric_seconds}
    if callback is not None:
        timings["calibration_seconds"] = callback.calibration_seconds
        timings["eval_seconds"] -= callback.calibration_seconds
    return QuantizedRun(evaluator.results, callback, device_info(trainer.strategy.root_device), timings, calib,
                        evaluator.predictions if keep_predictions else None)  # fmt: skip


def calibration_draws(cfg: DictConfig, dm: SegmentationDataModule, baseline: Baseline, recipe: QuantRecipe,
                      run_dir: Path, first: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """``calibration.draws=K``: the config quantized and evaluated again with calibration volumes drawn with seeds
    ``calibration.seed + 1 ... + K-1`` (the record's metrics are those of the first draw, ``calibration.seed``), and
    the spread of mean DSC / NSD over the K draws (:func:`mqb.analysis.stats.calibration_spread`): how much the
    result depends on which volumes calibrated it."""
    from mqb.analysis.stats import calibration_spread

    seed, k = int(cfg.calibration.seed), int(cfg.calibration.draws)
    per_draw = [{"seed": seed, "dsc": first.get("dsc"), "nsd": first.get("nsd")}]
    for s in range(seed + 1, seed + k):
        net, _ = load_model(cfg)
        run = quantized_run(cfg, net, dm, baseline, recipe, None, run_dir, s)
        per_draw.append({"seed": s, "dsc": run.metrics.get("dsc"), "nsd": run.metrics.get("nsd")})
    return {"draws": per_draw, **{m: calibration_spread([d[m] for d in per_draw]) for m in ("dsc", "nsd")}}


# -- one config -------------------------------------------------------------------------------------------
def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run one config end to end and return its record (:mod:`mqb.jobs` writes it): the FP32 baseline (cached),
    then, for a quantized or low-precision config, post-training quantization and the evaluation."""
    t0 = time.perf_counter()
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    numerics = set_numerics(cfg)  # before any forward: FP32 means FP32, deterministic cuDNN
    run_dir, sweep = run_dirs(cfg)
    recipe = build_recipe(cfg)  # validates precision/granularity/method before any work
    net, checkpoint = load_model(cfg)
    if checkpoint is None:
        _warn_untrained(cfg)
    checkpoint_sha = file_sha256(checkpoint) if checkpoint is not None else None
    if recipe is not None:
        _check_plan(cfg, recipe, net)  # before the baseline, calibration or any forward
    dm: SegmentationDataModule = instantiate(cfg.dataset)
    dm.prepare_data()
    save_predictions = bool(cfg.eval.get("save_predictions", False))
    baseline = fp32_baseline(cfg, net, dm, checkpoint_sha, run_dir, keep_predictions=save_predictions)
    timings, ran_on = dict(baseline.timings), baseline.ran_on

    logger = build_logger(cfg, run_dir, sweep)
    seed = int(cfg.calibration.seed)
    quant_cb, draws, calib, predictions = None, None, [], None
    if recipe is None and cfg.precision.compute_dtype == "float32":
        metrics, predictions = baseline.metrics, baseline.predictions  # FP32 is the baseline: its label maps
        timings["eval_seconds"] = 0.0
        if logger is not None:
            logger.log_metrics({f"test/{k}": v for k, v in metrics.items() if k in ("dsc", "nsd", "hd95") and v})
    else:
        run = quantized_run(cfg, net, dm, baseline, recipe, logger, run_dir, seed, keep_predictions=save_predictions)
        metrics, quant_cb, ran_on, calib, predictions = run.metrics, run.callback, run.ran_on, run.calibration, \
            run.predictions  # fmt: skip
        timings.update(run.timings)
        if recipe is not None and int(cfg.calibration.get("draws", 1)) > 1:
            draws = calibration_draws(cfg, dm, baseline, recipe, run_dir, metrics)
    assert metrics is not None
    base = baseline.metrics
    saved = None
    if save_predictions:  # after every computation succeeded: files only for a successful run
        assert predictions is not None and baseline.predictions is not None
        saved = dm.write_predictions(run_dir / "predictions", predictions, baseline.predictions,
                                     fp32_only=metrics is base, write=is_rank_zero())  # fmt: skip
    timings["total_seconds"] = time.perf_counter() - t0
    record = {
        "id": config_id(cfg),
        "status": "success",
        "created": datetime.now(UTC).isoformat(),
        "model": cfg.model.name,
        "dataset": cfg.dataset.name,
        "precision": precision_label(cfg),
        "precision_preset": cfg.precision.name,
        "granularity": cfg.granularity.name if recipe is not None else "-",
        "method": method_label(cfg) if recipe is not None else "-",
        "untrained": checkpoint is None,
        "reference": "labels" if dm.test_has_labels else "fp32_prediction",
        "checkpoint": {"path": str(checkpoint) if checkpoint else None, "sha256": checkpoint_sha},
        "metrics": metrics,
        "baseline": {"key": baseline.key, "cached": baseline.cached, **{k: base[k] for k in ("dsc", "nsd", "hd95")}},
        "delta_pct": {
            "dsc": delta_pct(base["dsc"], metrics["dsc"]),
            "nsd": delta_pct(base["nsd"], metrics["nsd"]),
            "hd95": delta_pct(base["hd95"], metrics["hd95"], higher_is_better=False),
        },
        # is the drop real? paired per-case differences vs the FP32 baseline: bootstrap CI, paired test
        # (mqb.analysis.stats; Holm across a sweep's configs is applied in its summary)
        "stats": {**(drop_stats(cfg, base, metrics, dm) or {}), **({"calibration": draws} if draws else {})} or None
        if metrics is not base else None,
        "realizability": realizability_record(quant_cb.summary if quant_cb is not None else None),
        "methods": [r.as_dict() for r in quant_cb.method_reports] if quant_cb is not None else [],
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "data": {
            "test_cases": [c["case"] for c in dm.splits["test"]],
            "calibration_cases": [dm.splits["calib"][i]["case"] for i in calib],
            "calibration_cached": quant_cb.calibration_cached if quant_cb is not None else None,
        },
        "host": host_info(),
        "device": {**ran_on, **numerics},
        "git": git_commit(),
        "sweep": sweep,
        "run_dir": str(run_dir),
        "config": OmegaConf.to_container(cfg, resolve=True),
        **({"predictions": saved} if saved is not None else {}),
    }
    if logger is not None:
        log_record(logger, record, base)
    return record


def realizability_record(summary: Any) -> dict[str, Any] | None:
    if summary is None:
        return None
    groups = {
        name: {
            "layers": g["layers"],
            "weight": sorted(g["weight"]),
            "activation": sorted(g["activation"]),
            "status": dict(g["status"]),
        }
        for name, g in summary.groups().items()
    }
    return {"groups": groups, "layers": summary.records()}