"""``python -m mqb.eval``: FP32 baseline (cached) + quantized evaluation, one JSON record per config.

python -m mqb.eval                                           # defaults: unet, synthetic, w8a8, per_channel
python -m mqb.eval -m model=unetr,swinunetr_t precision=w4a4 granularity=adaptive
python -m mqb.eval --help                                    # groups and choices
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import sys
import time
import traceback
import typing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

import mqb
from mqb.checkpoints import CheckpointError, file_sha256, load_weights
from mqb.config import EVAL_GROUPS, EvalConfig, register_configs
from mqb.data.module import SegmentationDataModule
from mqb.data.sources import DatasetError
from mqb.devices import apply_fp32_precision, device_info
from mqb.lit import quiet_lightning
from mqb.lit.callbacks import QuantizationCallback
from mqb.lit.evaluator import SegmentationEvaluator, calibration_forward
from mqb.quant import LayerRule, QuantRecipe
from mqb.quant import plan as quant_plan
from mqb.quant.methods import PTQMethod, SharedInputRanges
from mqb.quant.recipe import DEFAULT_INCLUDE
from mqb.quant.spec import FORMAT_BITS
from mqb.results import (
    Claim,
    ResultsDirError,
    check_writable,
    clean_temp_files,
    config_id,
    git_commit,
    host_info,
    lock_holder,
    read_record,
    read_records,
    save_tensors_atomic,
    stable_hash,
    try_claim,
    write_json_atomic,
)
from mqb.samples import missing_sample_hint, sample_data_dir
from mqb.sweep import (
    COLUMNS,
    drop_ci,
    metric_with_delta,
    reference_first,
    status,
    summary_rows,
    sweep_configs,
    with_holm,
    write_summary,
)

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
#: Bumped whenever evaluation results change for the same inputs, invalidating cached baselines.
PIPELINE_VERSION = 3  # 3: NSD / HD95 as DeepMind surface-distance (surfel-area weighted); model code in the key
console = Console(width=None if sys.stdout.isatty() else 160)


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
    rules = tuple(LayerRule(r.select, r.precision, r.granularity) for r in method.rules)
    return QuantRecipe(
        weight=weight,
        activation=activation,
        granularity=cfg.granularity.scheme,
        include=tuple(method.include),
        exclude=tuple(method.exclude),
        attention=bool(method.attention),
        rules=rules,
    )


#: Names of the element formats and float compute dtypes in precision labels (as the presets are named).
_FORMAT_NAMES = {"fp8_e4m3": "fp8"}
_DTYPE_NAMES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def _task_overrides() -> list[str]:
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


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
    calibration = cfg.get("calibration")
    if calibration is not None:
        n = calibration.get("num_volumes")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"calibration.num_volumes={n!r} is invalid; valid: a positive number of calibration "
                             "volumes (1 or more)")  # fmt: skip
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
            element = str(spec.bits) if spec.format == "int" else _FORMAT_NAMES.get(spec.format, spec.format)
            return f"{prefix}{element}"

        if weight is not None and activation is not None and weight.format == activation.format != "int":
            derived = _FORMAT_NAMES.get(weight.format, weight.format)
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
    """The method's name, plus the layer kinds quantized beyond the default ones and the calibration options
    that change the quantized model: ``rtn+norm+shared_ranges+tensor_quantizers`` for ``experiment=int8_deploy``
    (so tables tell such runs apart)."""
    extra = [str(s) for s in cfg.method.get("include") or () if str(s) not in DEFAULT_INCLUDE]
    for option in ("shared_ranges", "tensor_quantizers"):
        if cfg.get("calibration") is not None and cfg.calibration.get(option):
            extra.append(option)
    return "+".join([str(cfg.method.get("name")), *extra])


def build_methods(cfg: DictConfig) -> list[PTQMethod]:
    """The PTQ methods of ``cfg.method.steps`` (empty for round-to-nearest), in order, preceded by
    :class:`~mqb.quant.methods.SharedInputRanges` when ``calibration.shared_ranges`` or
    ``calibration.tensor_quantizers`` is on (it runs right after calibration, before post-calibration methods
    such as bias correction measure anything)."""
    methods = [instantiate(step) for step in cfg.method.get("steps") or []]
    wrong = [type(m).__name__ for m in methods if not isinstance(m, PTQMethod)]
    if wrong:
        raise ValueError(f"method.steps must build mqb.quant.methods.PTQMethod objects, got {wrong}")
    tensor_quantizers = bool(cfg.calibration.get("tensor_quantizers"))
    if cfg.calibration.get("shared_ranges") or tensor_quantizers:
        methods.insert(0, SharedInputRanges(quantize_tensors=tensor_quantizers))
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
    if path.is_file():
        return path
    if cfg.auto_train:
        from mqb.train import fit

        console.print(f"[yellow]no checkpoint for {cfg.model.name} on {cfg.dataset.name}: training one -> {path}")
        fit(cfg.model, cfg.dataset, cfg.train, path, progress=cfg.trainer.progress,
            accelerator=cfg.trainer.accelerator, fp32_precision=cfg.trainer.fp32_precision)
        return path
    return None


def build_logger(cfg: DictConfig, run_dir: Path, sweep: str) -> Any:
    """The experiment logger, or ``None``. W&B runs offline unless a key is configured (never hangs)."""
    lcfg = cfg.get("logger")
    if not lcfg or "_target_" not in lcfg:
        return None
    kwargs: dict[str, Any] = {}
    if lcfg._target_.endswith("WandbLogger"):
        offline = lcfg.get("offline")
        if offline is None:
            offline = not wandb_key_available()
        label = precision_label(cfg)
        name = f"{cfg.model.name}-{label}-{cfg.granularity.name}-{cfg.method.name}"
        tags = [cfg.model.name, label, cfg.granularity.name, cfg.method.name, cfg.dataset.name]
        kwargs = {
            "offline": bool(offline),
            "name": lcfg.get("name") or name,
            "group": lcfg.get("group") or sweep,
            "tags": list(lcfg.get("tags") or []) + tags,
            "save_dir": str(run_dir),
        }
        # one line per run instead of W&B's banners (WANDB_SILENT=false brings them back)
        os.environ.setdefault("WANDB_SILENT", "true")
        where = run_dir / "wandb"
        print(f"W&B {'offline' if offline else 'online'} run {kwargs['name']}"
              + (f"; upload later: wandb sync {where}/offline-run-*" if offline else f" in {where}"), flush=True)
    return instantiate(lcfg, **kwargs)


def wandb_key_available() -> bool:
    """Whether W&B may go online: ``WANDB_MODE=offline`` (or disabled) wins over a configured key."""
    if os.environ.get("WANDB_MODE") in ("offline", "disabled", "dryrun"):
        return False
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import netrc

        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def _trainer(cfg: DictConfig, logger: Any, run_dir: Path, callbacks: list[L.Callback]) -> L.Trainer:
    quiet_lightning()
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


def _evaluator(
    cfg: DictConfig, net: torch.nn.Module, dm: SegmentationDataModule, dtype: str, **kwargs: Any
) -> SegmentationEvaluator:
    return SegmentationEvaluator(
        net,
        class_names=dm.class_names,
        roi_size=inference_window(cfg, dm),
        sw_batch_size=cfg.eval.sw_batch_size,
        overlap=cfg.eval.overlap,
        mode=cfg.eval.mode,
        nsd_tolerance_mm=dm.nsd_tolerance_mm,
        compute_dtype=dtype,
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


def calibration_inputs(
    cfg: DictConfig, net: torch.nn.Module
) -> tuple[typing.Callable[[], typing.Any], typing.Callable[[torch.nn.Module, typing.Any], typing.Any]]:
    """``(batches(), forward)`` over the config's calibration volumes: a fresh loader per call and a
    sliding-window forward, exactly what calibration sees in ``mqb.eval`` (for tools that work outside it)."""
    dm: SegmentationDataModule = instantiate(cfg.dataset)
    dm.prepare_data()
    evaluator = _evaluator(cfg, net, dm, "float32")
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
            "eval": OmegaConf.to_container(cfg.eval, resolve=True),
            "mqb": mqb.__version__,
            "pipeline": PIPELINE_VERSION,
            # TF32 changes the FP32 numbers; at the default (ieee) the key is the one earlier baselines had
            **({"fp32_precision": fp32} if (fp32 := cfg.trainer.get("fp32_precision", "ieee")) != "ieee" else {}),
        },
        length=24,
    )


def _drop_stats(cfg: DictConfig, baseline: dict[str, Any], metrics: dict[str, Any], dm: Any) -> dict[str, Any] | None:
    """:func:`mqb.analysis.stats.compare` of this config's per-case metrics with the FP32 baseline's (seeded by
    ``seed``), or ``None`` where either has no per-case values."""
    from mqb.analysis.stats import compare

    if not baseline.get("per_case") or not metrics.get("per_case"):
        return None
    return compare(baseline, metrics, seed=int(cfg.seed), class_names=list(dm.class_names[1:]))


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


def _delta_pct(base: float | None, value: float | None, higher_is_better: bool = True) -> float | None:
    if base is None or value is None or base == 0:
        return None
    drop = (base - value) if higher_is_better else (value - base)
    return 100.0 * drop / abs(base)


# -- one job ----------------------------------------------------------------------------------------------
def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run one config end to end and return its record (also written to disk)."""
    t0 = time.perf_counter()
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    numerics = apply_fp32_precision(str(cfg.trainer.fp32_precision))  # before any forward: FP32 means FP32
    ran_on: dict[str, Any] = {"type": "none (cached FP32 baseline)"}
    run_dir = Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else Path(cfg.paths.output_dir)
    sweep = Path(HydraConfig.get().sweep.dir).name if _is_multirun() else run_dir.name
    recipe = build_recipe(cfg)  # validates precision/granularity/method before any work
    checkpoint = resolve_checkpoint(cfg)
    untrained = checkpoint is None
    if untrained:
        console.print(
            f"[bold red]WARNING: {cfg.model.name} has no checkpoint for {cfg.dataset.name}: evaluating an UNTRAINED "
            "network (results are flagged untrained: true and mean nothing). Train one with "
            f"`python -m mqb.train model={cfg.model.name} dataset={cfg.dataset.name}` or pass model.checkpoint=PATH."
        )
    checkpoint_sha = file_sha256(checkpoint) if checkpoint is not None else None
    dm: SegmentationDataModule = instantiate(cfg.dataset)
    dm.prepare_data()
    net, _ = load_model(cfg)
    if recipe is not None:
        _check_plan(cfg, recipe, net)  # before the baseline, calibration or any forward
    float_net = copy.deepcopy(net)

    timings: dict[str, float] = {}
    calibration_cached = None
    calib = dm.calibration_indices(cfg.calibration.num_volumes, cfg.calibration.seed)
    bkey = baseline_key(cfg, checkpoint_sha, [c.get("fingerprint") for c in dm.splits["test"]])
    baseline_file = Path(cfg.paths.cache_dir) / "baselines" / f"{bkey}.json"
    labelled = dm.test_has_labels
    predictions_file = baseline_file.with_suffix(".predictions.pt")
    reference = None
    if not labelled and predictions_file.is_file():
        try:
            reference = torch.load(predictions_file, weights_only=True)
        except Exception:  # noqa: BLE001  (unreadable cache: recompute the reference below)
            reference = None
    if baseline_file.is_file() and (labelled or reference is not None):
        baseline = json.loads(baseline_file.read_text())
        timings["baseline_seconds"] = 0.0
        baseline_cached = True
    else:
        start = time.perf_counter()
        evaluator = _evaluator(cfg, float_net, dm, "float32", keep_predictions=not labelled)
        trainer = _trainer(cfg, None, run_dir, [])
        trainer.test(evaluator, datamodule=dm, verbose=False)
        ran_on = device_info(trainer.strategy.root_device)
        baseline = evaluator.results
        if not labelled:  # no labels: the FP32 prediction is the reference of every quantized run
            reference = evaluator.predictions
            if is_rank_zero():
                save_tensors_atomic(predictions_file, reference)
        if is_rank_zero():
            write_json_atomic(baseline_file, baseline)
        timings["baseline_seconds"] = time.perf_counter() - start
        timings["baseline_data_seconds"] = evaluator.data_seconds
        baseline_cached = False

    logger = build_logger(cfg, run_dir, sweep)
    summary = None
    method_reports: list[dict[str, Any]] = []
    if recipe is None and cfg.precision.compute_dtype == "float32":
        metrics = baseline
        timings["eval_seconds"] = 0.0
        if logger is not None:
            logger.log_metrics({f"test/{k}": v for k, v in baseline.items() if k in ("dsc", "nsd", "hd95") and v})
    else:
        callbacks: list[L.Callback] = []
        quant_cb = None
        evaluator = _evaluator(cfg, net, dm, cfg.precision.compute_dtype, reference_predictions=reference)
        if recipe is not None:
            calib_files = [dm.splits["calib"][i].get("fingerprint") for i in calib]  # contents, not only paths
            range_key = stable_hash({"baseline": bkey, "calibration": calib, "files": calib_files, "v": 1}, 24)
            quant_cb = QuantizationCallback(
                recipe,
                lambda: dm.calib_dataloader(cfg.calibration.num_volumes, cfg.calibration.seed),
                calibration_forward(evaluator),
                progress=cfg.trainer.progress,
                range_cache=Path(cfg.paths.cache_dir) / "calibration" / f"{range_key}.pt",
                methods=build_methods(cfg),
            )
            callbacks.append(quant_cb)
        start = time.perf_counter()
        trainer = _trainer(cfg, logger, run_dir, callbacks)
        trainer.test(evaluator, datamodule=dm, verbose=False)
        ran_on = device_info(trainer.strategy.root_device)
        metrics = evaluator.results
        timings["eval_seconds"] = time.perf_counter() - start
        timings["data_seconds"] = evaluator.data_seconds
        if quant_cb is not None:
            timings["calibration_seconds"] = quant_cb.calibration_seconds
            calibration_cached = quant_cb.calibration_cached
            timings["eval_seconds"] -= quant_cb.calibration_seconds
            summary = quant_cb.summary
            method_reports = [r.as_dict() for r in quant_cb.method_reports]
    assert metrics is not None and baseline is not None
    delta = {
        "dsc": _delta_pct(baseline["dsc"], metrics["dsc"]),
        "nsd": _delta_pct(baseline["nsd"], metrics["nsd"]),
        "hd95": _delta_pct(baseline["hd95"], metrics["hd95"], higher_is_better=False),
    }
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
        "untrained": untrained,
        "reference": "labels" if labelled else "fp32_prediction",
        "checkpoint": {"path": str(checkpoint) if checkpoint else None, "sha256": checkpoint_sha},
        "metrics": metrics,
        "baseline": {"key": bkey, "cached": baseline_cached, **{k: baseline[k] for k in ("dsc", "nsd", "hd95")}},
        "delta_pct": delta,
        # is the drop real? paired per-case differences vs the FP32 baseline: bootstrap CI, paired test
        # (mqb.analysis.stats; Holm across a sweep's configs is applied in its summary)
        "stats": _drop_stats(cfg, baseline, metrics, dm) if metrics is not baseline else None,
        "realizability": _realizability(summary),
        "methods": method_reports,
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "data": {
            "test_cases": [c["case"] for c in dm.splits["test"]],
            "calibration_cases": [dm.splits["calib"][i]["case"] for i in calib] if recipe is not None else [],
            "calibration_cached": calibration_cached,
        },
        "host": host_info(),
        "device": {**ran_on, **numerics},
        "git": git_commit(),
        "sweep": sweep,
        "run_dir": str(run_dir),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    if logger is not None:
        _log_final(logger, record, baseline)
    return record


def _realizability(summary: Any) -> dict[str, Any] | None:
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


def _log_final(logger: Any, record: dict[str, Any], baseline: dict[str, Any]) -> None:
    flat = {f"delta_pct/{k}": v for k, v in record["delta_pct"].items() if v is not None}
    flat.update({f"baseline/{k}": baseline[k] for k in ("dsc", "nsd", "hd95") if baseline[k] is not None})
    flat.update({f"timings/{k}": v for k, v in record["timings"].items()})
    logger.log_metrics(flat)
    logger.log_hyperparams(record["config"])
    if hasattr(logger, "log_table"):
        rows = [
            [name, v.get("dsc"), v.get("nsd"), v.get("hd95"), baseline["per_class"][name].get("dsc")]
            for name, v in record["metrics"]["per_class"].items()
        ]
        logger.log_table(key="per_class", columns=["class", "dsc", "nsd", "hd95", "fp32_dsc"], data=rows)
        logger.experiment.summary.update({"untrained": record["untrained"]})
    logger.finalize("success")
    if hasattr(logger, "experiment") and hasattr(logger.experiment, "finish"):
        logger.experiment.finish()


def is_rank_zero() -> bool:
    """Only the first process writes records and caches (DDP children re-run the same job)."""
    return int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0


def _is_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def results_table(records: list[dict[str, Any]], title: str = "mqb results") -> Table:
    """A rich table in the paper's format: DSC (Δ%) / NSD (Δ%) per model, precision, granularity."""
    table = Table(title=title)
    for col in ("model", "dataset", "precision", "granularity", "method", "DSC (↓Δ%)", "NSD (↓Δ%)", "HD95 mm", "note"):
        table.add_column(col)

    for r in records:
        if r.get("status") != "success":
            table.add_row(
                r.get("model", "?"),
                r.get("dataset", "?"),
                r.get("precision", "?"),
                r.get("granularity", "?"),
                r.get("method", "?"),
                "-",
                "-",
                "-",
                f"[red]FAILED: {r.get('error', '')[:60]}",
            )
            continue
        m, d = r["metrics"], r["delta_pct"]
        note = "[red]UNTRAINED" if r.get("untrained") else ""
        hd = f"{m['hd95']:.1f}" if m.get("hd95") is not None else "-"
        table.add_row(
            r["model"],
            r["dataset"],
            r["precision"],
            r["granularity"],
            r["method"],
            *(metric_with_delta(m[k], d[k], drop_ci(r, k), reference=r["precision"] == "fp32") for k in ("dsc", "nsd")),
            hd,
            note,
        )
    return table


# -- job wrapper: resume, atomic records, errors ----------------------------------------------------------
def run_job(cfg: DictConfig) -> dict[str, Any] | None:
    """One config: skip it if it has a valid success record (``resume``), else claim it, evaluate it and write
    its record (``<id>.json``, or ``<id>.error.json`` when it fails). Returns ``None`` in a sweep when another
    live process has claimed the config (the sweep waits for its record at the end)."""
    results_dir = Path(cfg.results_dir)
    cid = config_id(cfg)
    success, failure = results_dir / f"{cid}.json", results_dir / f"{cid}.error.json"
    if HydraConfig.initialized() and is_rank_zero():  # lets the sweep summary find skipped configs too
        job_dir = Path(HydraConfig.get().runtime.output_dir)
        job_dir.mkdir(parents=True, exist_ok=True)
        (job_dir / "record_id.txt").write_text(cid)
    if is_rank_zero():
        check_writable(results_dir)  # before any work: a record that cannot be saved is not computed
        for folder in (results_dir, Path(cfg.paths.cache_dir) / "baselines", Path(cfg.paths.cache_dir) / "calibration"):
            clean_temp_files(folder)
    if cfg.resume and (done := _success_record(success)) is not None:
        console.print(f"[green]skip {cid}: a success record exists ({success})")
        return done
    claim: Claim | None = None
    if is_rank_zero():
        got = _claim(cfg, results_dir, cid, success)
        if not isinstance(got, Claim):
            return got
        claim = got
    try:
        return _evaluate_and_record(cfg, cid, success, failure)
    finally:
        if claim is not None:
            claim.release()


#: Seconds between looks at a config another process has claimed.
CLAIM_POLL_S = 2.0


def _success_record(path: Path, quiet: bool = False) -> dict[str, Any] | None:
    """The success record in ``path``, or ``None``; a corrupt one is treated as missing (re-run) and, unless
    ``quiet``, named on stderr."""
    record = read_record(path, on_bad=None) if quiet else read_record(path)
    return record if record is not None and record.get("status") == "success" else None


def _claim(cfg: DictConfig, results_dir: Path, cid: str, success: Path) -> Claim | dict[str, Any] | None:
    """This process's claim on the config; or, when another live process holds it: ``None`` in a sweep (skip it
    now, the sweep's end waits for it), else its record once it is done (waits)."""
    waiting = False
    while True:
        got = try_claim(results_dir, cid)
        if isinstance(got, Claim):
            if cfg.resume and (done := _success_record(success)) is not None:  # finished while we looked
                got.release()
                console.print(f"[green]skip {cid}: a success record exists ({success})")
                return done
            return got
        if _is_multirun():
            console.print(f"[yellow]skip {cid} for now: claimed by {got.describe()} (another run computes it; this "
                          "sweep waits for its record at the end)")  # fmt: skip
            return None
        if not waiting:
            console.print(f"[yellow]{cid} is being computed by {got.describe()}: waiting for its record")
            waiting = True
        time.sleep(CLAIM_POLL_S)
        if (done := _success_record(success)) is not None:
            return done


def _evaluate_and_record(cfg: DictConfig, cid: str, success: Path, failure: Path) -> dict[str, Any] | None:
    try:
        record = evaluate(cfg)
    except Exception as err:  # noqa: BLE001  (recorded, then re-raised or reported)
        try:
            label = precision_label(cfg)
        except Exception:  # noqa: BLE001
            label = cfg.precision.get("name")
        error = {
            "id": cid,
            "status": "error",
            "created": datetime.now(UTC).isoformat(),
            "model": cfg.model.get("name"),
            "dataset": cfg.dataset.get("name"),
            "precision": label,
            "granularity": cfg.granularity.get("name"),
            "method": method_label(cfg),
            "error": f"{type(_user_error(err) or err).__name__}: {_user_error(err) or err}",
            "traceback": traceback.format_exc(),
            "sweep": Path(HydraConfig.get().sweep.dir).name if _is_multirun() else None,
            "config": OmegaConf.to_container(cfg, resolve=False),
        }
        if is_rank_zero():
            _write_error_record(err, failure, error)
        raise
    if not is_rank_zero():
        return record
    try:
        write_json_atomic(success, record)  # first the record that counts ...
    except OSError as err:
        lost = ResultsDirError(err.errno or 5, f"could not save the record of {cid} to {str(success)!r} "
                               f"({err.strerror or err}); the evaluation's results are lost")  # fmt: skip
        error = {"id": cid, "status": "error", "created": datetime.now(UTC).isoformat(), "model": record["model"],
                 "dataset": record["dataset"], "precision": record["precision"], "granularity": record["granularity"],
                 "method": record["method"], "error": f"ResultsDirError: {lost}", "sweep": record["sweep"]}  # fmt: skip
        _write_error_record(lost, failure, error)
        raise lost from err
    try:  # ... then its copy in the run folder
        write_json_atomic(Path(record["run_dir"]) / "record.json", record)
    except OSError as err:
        console.print(f"[yellow]could not copy the record into the run folder {record['run_dir']}: {err}")
    failure.unlink(missing_ok=True)
    if not _is_multirun():
        console.print(results_table([record]))
    return record


def _write_error_record(err: BaseException, failure: Path, error: dict[str, Any]) -> None:
    """Write the error record; remember on ``err`` where it went (``None``: it could not be written)."""
    try:
        write_json_atomic(failure, error)
        err.mqb_error_record = str(failure)  # type: ignore[attr-defined]
    except OSError as write_err:
        err.mqb_error_record = None  # type: ignore[attr-defined]
        print(f"mqb.eval: could not write the error record {str(failure)!r} either: {write_err}", file=sys.stderr)


class SweepSummaryCallback(Callback):
    """Hydra callback: refuse a results_dir that cannot take records before a multirun starts; at its end wait
    for configs other runs were computing, print the sweep's results table, save it as CSV/Markdown, and exit
    non-zero when any config of the sweep has no success record (failed, not saved, never run) or the sweep was
    empty."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            results_dir = Path(str(config.results_dir))
        except Exception:  # noqa: BLE001  (results_dir swept or not resolvable here: each job checks it)
            return
        try:
            check_writable(results_dir)
        except ResultsDirError as err:
            print(f"mqb.eval: error: {err}", file=sys.stderr)
            sys.exit(2)
        clean_temp_files(results_dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        results_dir = Path(config.results_dir)
        sweep = sweep_dir.name
        jobs = sweep_configs(sweep_dir, compose=False) if sweep_dir.is_dir() else []
        if not jobs:
            task = " ".join(config.hydra.overrides.task)
            print(f"mqb.eval: error: the sweep ran no config: its overrides expand to an empty grid ({task})",
                  file=sys.stderr)  # fmt: skip
            sys.exit(2)
        ids = {j["id"] for j in jobs if j["id"]}
        self._wait_for_others(results_dir, ids)
        latest: dict[str, dict[str, Any]] = {}
        for r in read_records(results_dir):  # success wins over an error record of the same config
            if r["id"] in ids and (r.get("status") == "success" or latest.get(r["id"], {}).get("status") != "success"):
                latest[r["id"]] = r
        records = list(latest.values())
        if records:
            console.print(results_table(sorted(with_holm(records), key=reference_first), title=f"mqb sweep {sweep}"))
            console.print("↓Δ% [95% CI]: drop from FP32 over the test cases; * significant after Holm across the sweep")
            csv_path, md_path = write_summary(records, sweep_dir / "summary")
            console.print(f"sweep summary: {csv_path} {md_path}")
            logger_cfg = config.get("logger") or {}
            if str(logger_cfg.get("_target_", "")).endswith("WandbLogger"):
                _log_sweep_table(records, sweep, sweep_dir, logger_cfg)
        rows = status(results_dir, sweep_dir, on_bad=None, compose=False)
        failed = [r for r in rows if r["status"] == "failed"]
        unsaved = [r for r in rows if r["status"] not in ("done", "failed")]
        if failed:
            console.print(f"[red]{len(failed)} config(s) failed; see the .error.json records in {results_dir}")
        if unsaved:
            names = ", ".join(f"{r['model']} ({r['id']})" for r in unsaved[:10])
            print(f"mqb.eval: {len(unsaved)} config(s) of the sweep have no record in {str(results_dir)!r}: {names}",
                  file=sys.stderr)  # fmt: skip
        if failed or unsaved:
            sys.exit(1)

    @staticmethod
    def _wait_for_others(results_dir: Path, ids: set[str]) -> None:
        """Wait until no config of ``ids`` is claimed by another live process (they were skipped here)."""
        announced = False
        while True:
            held = {}
            for cid in sorted(ids):
                done = _success_record(results_dir / f"{cid}.json", quiet=True)
                if done is None and (h := lock_holder(results_dir, cid)):
                    held[cid] = h
            if not held:
                return
            if not announced:
                who = "; ".join(f"{cid}: {h.describe()}" for cid, h in list(held.items())[:5])
                console.print(f"[yellow]waiting for {len(held)} config(s) other runs are computing ({who})")
                announced = True
            time.sleep(CLAIM_POLL_S)


def _user_error(err: BaseException) -> BaseException | None:
    """The bad-input error behind ``err`` (also when wrapped by MONAI/Lightning), or ``None`` for a bug."""
    seen = err
    while seen is not None:
        if isinstance(seen, (CheckpointError, DatasetError, ValueError, FileNotFoundError, ResultsDirError)):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _unknown_key(key: str) -> str | None:
    """Our message for an override of a key the typed schema does not have (``precision.weight.bitz``)."""
    node: Any = EvalConfig
    path = []
    for part in key.split("."):
        if not dataclasses.is_dataclass(node):
            return None  # free-form (model, dataset, logger): Hydra checks those against the YAML
        fields = {f.name: f for f in dataclasses.fields(node)}
        if part not in fields:
            where = ".".join(path) or "the top level"
            valid = ", ".join(sorted(n for n in fields if not n.startswith("_")))
            return f"mqb.eval: unknown key {key!r}: {where} has no {part!r}; valid keys there: {valid}"
        path.append(part)
        hints = typing.get_type_hints(node)
        node = next((a for a in typing.get_args(hints[part]) if dataclasses.is_dataclass(a)), hints[part])
    return None


def _log_sweep_table(records: list[dict[str, Any]], sweep: str, sweep_dir: Path, logger_cfg: Any) -> None:
    """The sweep's paper-style table as a W&B Table in a ``<sweep>-summary`` run of the sweep's group."""
    import wandb

    rows = summary_rows(records)
    run = wandb.init(
        project=logger_cfg.get("project", "mqb"),
        group=sweep,
        name=f"{sweep}-summary",
        job_type="sweep-summary",
        dir=str(sweep_dir),
        mode=wandb_mode(logger_cfg),
    )
    table = wandb.Table(columns=list(COLUMNS), data=[[r[c] for c in COLUMNS] for r in rows])
    run.log({"sweep_summary": table})
    run.finish()


def wandb_mode(logger_cfg: Any) -> str:
    """The W&B mode: ``WANDB_MODE`` (offline, disabled) wins, then ``logger.offline``, then online only where a
    key is configured."""
    env = os.environ.get("WANDB_MODE")
    if env in ("offline", "dryrun"):
        return "offline"
    if env == "disabled":
        return "disabled"
    offline = logger_cfg.get("offline")
    if offline is None:
        offline = not wandb_key_available()
    return "offline" if offline else "online"


def _config_dirs(argv: list[str]) -> list[Path] | None:
    """mqb's config folder plus the user's: ``--config-dir DIR`` / ``-cd DIR`` / ``--config-dir=DIR`` and
    ``hydra.searchpath=[file://DIR, ...]``; ``None`` when a search path is not a folder (``pkg://``)."""
    dirs = [CONF_DIR]
    for i, arg in enumerate(argv):
        if arg in ("--config-dir", "-cd") and i + 1 < len(argv):
            dirs.append(Path(argv[i + 1]).expanduser())
        elif arg.startswith("--config-dir="):
            dirs.append(Path(arg.partition("=")[2]).expanduser())
        elif arg.lstrip("+").startswith("hydra.searchpath="):
            for entry in arg.partition("=")[2].strip("[]").split(","):
                entry = entry.strip().strip("'\"")
                if entry.startswith("pkg://"):
                    return None
                if entry:
                    dirs.append(Path(entry.removeprefix("file://")).expanduser())
    return dirs


def _check_group_choices(argv: list[str]) -> list[str]:
    """Our messages for a wrong group choice or key (Hydra's follows): which group/key, the valid values."""
    problems = []
    dirs = _config_dirs(argv)
    for arg in argv:
        if "=" not in arg or arg.startswith("-"):
            continue
        key, _, value = arg.lstrip("+~").partition("=")
        hydra_key = key.split(".")[0] == "hydra"  # Hydra's own settings (launcher, sweeper ...): Hydra checks them
        if "." in key and not arg.startswith("+") and not hydra_key and (message := _unknown_key(key)):
            problems.append(message)
            continue
        if key not in EVAL_GROUPS or not value or value.startswith(("choice(", "range(", "glob(")):
            continue
        if dirs is None:  # a pkg:// search path: its choices cannot be listed here; Hydra checks them
            continue
        valid = sorted({p.stem for d in dirs for p in (d / key).glob("*.yaml")})
        for choice in value.split(","):
            if choice and choice != "null" and choice not in valid:
                problems.append(
                    f"mqb.eval: unknown {key} {choice!r} in '{arg}'; valid {key} choices: {', '.join(valid)}"
                )
    return problems


def run_task(cfg: DictConfig) -> None:
    """The Hydra task: one config. Module-level and undecorated so launchers pickle it by reference."""
    try:
        run_job(cfg)
    except Exception as err:  # noqa: BLE001
        user_error = _user_error(err)
        if _is_multirun():
            where = getattr(err, "mqb_error_record", None)
            note = f"error record {where}" if where else "NO record written"
            console.print(f"[red]config failed ({note}): {user_error or err}")
            if not where:
                print(f"mqb.eval: config failed and nothing was saved: {user_error or err}", file=sys.stderr)
            return
        if user_error is not None:
            print(f"mqb.eval: error: {user_error}", file=sys.stderr)
            sys.exit(2)
        raise


_hydra_main = hydra.main(config_path=str(CONF_DIR), config_name="eval", version_base="1.3")(run_task)


LAUNCHERS_DIR = CONF_DIR.parent / "launchers"


def main() -> None:
    for problem in _check_group_choices(sys.argv[1:]):
        print(problem, file=sys.stderr)
    if not any(a.startswith("hydra.searchpath") for a in sys.argv[1:]):
        # cluster profiles (+cluster=<name>); placed beside the other overrides so argparse keeps them together
        overrides = [i for i, a in enumerate(sys.argv) if i > 0 and "=" in a and not a.startswith("-")]
        sys.argv.insert(overrides[0] if overrides else len(sys.argv), f"hydra.searchpath=[file://{LAUNCHERS_DIR}]")
    _hydra_main()


register_configs()

if __name__ == "__main__":
    # Run the importable module, not this __main__ copy: launchers (submitit) pickle the task function, which
    # must be pickled by reference to mqb.eval, not by value with this module's globals.
    from mqb.eval import main as _main

    _main()
