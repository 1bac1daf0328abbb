"""Structured configs (Hydra ConfigStore schemas) for ``mqb.eval`` and ``mqb.train``.

The YAML files in ``conf/`` are merged onto these dataclasses, so an unknown key or a wrongly typed value
fails at composition time, before any work, with Hydra's message naming the key.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from mqb.results import RENAMED_OPTIONS
from mqb.samples import shipped_data_dir, shipped_folder

#: The config folder (``conf/``: one folder per group) and the cluster profiles (``launchers/``, ``+cluster=<name>``).
#: The Hydra configs and the cluster profiles: the checkout's ``conf/`` and ``launchers/``, or their copies in a wheel
#: (``mqb/_conf``, ``mqb/_launchers``).
CONF_DIR = shipped_folder("conf")
LAUNCHERS_DIR = shipped_folder("launchers")

#: Config groups of mqb.eval (each a folder under conf/).
EVAL_GROUPS = (
    "model", "dataset", "precision", "granularity", "method", "calibration", "logger", "deploy", "experiment"
)  # fmt: skip


@dataclass
class SpecConfig:
    """One tensor's quantizer (``mqb.quant.QuantSpec``); the granularity comes from the ``granularity`` group."""

    _target_: str = "mqb.quant.QuantSpec"
    bits: int = 8
    format: str = "int"
    symmetric: bool = True
    dynamic: bool | None = None
    group_size: int | None = None


@dataclass
class PrecisionConfig:
    name: str = MISSING
    weight: SpecConfig | None = None
    activation: SpecConfig | None = None
    compute_dtype: str = "float32"


@dataclass
class GranularityConfig:
    """The ``granularity`` group: which layer-level *scheme* (``mqb.quant.QuantRecipe.scheme``) runs; each layer's
    tensor granularities follow from it (``mqb.quant.schemes``)."""

    name: str = MISSING
    scheme: str = MISSING


@dataclass
class LayerRuleConfig:
    """A per-layer override (``mqb.quant.LayerRule``); ``granularity`` names a scheme, as the group does."""

    select: str = MISSING
    precision: str | None = None
    granularity: str | None = None


@dataclass
class MethodConfig:
    """What gets quantized (include/exclude/attention/rules) and the PTQ methods applied to it.

    ``steps`` are instantiable :class:`mqb.quant.methods.PTQMethod` configs, applied in order; ``layers`` are
    the selectors the steps act on (``[all]``, a kind such as ``conv1x3x3``, or layer names).
    """

    name: str = "rtn"
    include: list[str] = field(default_factory=lambda: ["conv", "conv_transpose", "linear"])
    exclude: list[str] = field(default_factory=list)
    attention: bool = False
    rules: list[LayerRuleConfig] = field(default_factory=list)
    layers: list[str] = field(default_factory=lambda: ["all"])
    steps: list[Any] = field(default_factory=list)
    #: a step before the post-calibration ``steps``: quantizers reading one tensor (directly or through torch.cat)
    #: share its largest range (mqb.quant.methods.SharedInputRanges; what INT8 runtimes execute with one quantize
    #: per tensor)
    shared_ranges: bool = False
    #: also quantize each such tensor where it is produced (an output quantizer, mqb.quant.output), so float readers
    #: (a residual Add) read the INT8 value too, as NNCF / TensorRT place quantizers; implies shared_ranges
    output_quantizers: bool = False


@dataclass
class CalibrationConfig:
    name: str = "minmax"
    observer: str = "minmax"
    percentile: float = 99.99
    num_volumes: int = 4
    seed: int = 0
    #: deprecated spellings of method.shared_ranges / method.output_quantizers (same effect, same record id;
    #: DEPRECATED_KEYS)
    shared_ranges: bool = False
    tensor_quantizers: bool = False
    #: calibrate and evaluate K times, on calibration volumes drawn with seeds seed, seed+1, ...: the record's
    #: metrics are the first draw's, ``stats.calibration`` the spread of mean DSC / NSD over the K draws
    draws: int = 1


@dataclass
class EvalSettings:
    sw_batch_size: int = 2
    overlap: float = 0.25
    mode: str = "gaussian"
    # write each test case's label map (and the FP32 baseline's) as NIfTI under <run_dir>/predictions, listed in
    # the record's "predictions" section; mqb.report draws its qualitative overlays (Fig. 4) from them
    save_predictions: bool = False


@dataclass
class TrainerSettings:
    #: Lightning's accelerator: auto (a GPU where there is one, else the CPU), gpu, cpu
    accelerator: str = "auto"
    devices: int = 1
    strategy: str = "auto"  # "ddp" with devices > 1 splits the test volumes across processes/GPUs
    progress: bool = True
    #: float32 arithmetic on GPUs (mqb.devices): ieee (true FP32: no TF32 in cuDNN convolutions or matmuls) or tf32
    fp32_precision: str = "ieee"


@dataclass
class PathsConfig:
    output_dir: str = "outputs"
    #: where the paper-table presets look for datasets: ``<data_root>/<dataset.name>`` (btcv, abdomenatlas ...)
    data_root: str = "data"
    cache_dir: str = ".cache/mqb"
    checkpoints: str = "${paths.cache_dir}/checkpoints"
    #: the real samples shipped with mqb (MeshNet weights, brain/CT volumes; ``data/`` in the repository, inside
    #: the package in a wheel): the model and dataset configs read ``${paths.data_dir}/<dataset>/...``
    data_dir: str = field(default_factory=lambda: str(shipped_data_dir()))


@dataclass
class TrainSettings:
    max_steps: int = 300
    lr: float = 2e-3
    batch_size: int = 2
    samples_per_volume: int = 2
    val_every: int = 100
    seed: int = 0


@dataclass
class ProfileSettings:
    """How ``python -m mqb.deploy profile`` / ``compare`` measure (``deploy.profile.*``)."""

    warmup: int = 1  # profile: untimed calls per runtime before the patch latency is timed
    repeats: int = 5  # profile: timed calls per patch (the median is reported)
    volume_repeats: int = 3  # profile: timed whole-volume sliding-window runs (median)
    volume: bool = True  # profile: also time a whole test volume (false: patch latency only)
    cases: int = 1  # compare: test volumes the deployed and fake-quantized predictions are compared on


#: Deployment schemes (``deploy.scheme``) and runtime families (``deploy.runtimes``) ``mqb.deploy`` knows.
DEPLOY_SCHEMES = ("deploy", "as_configured")
DEPLOY_RUNTIMES = ("onnxruntime", "openvino", "tensorrt")


@dataclass
class DeployConfig:
    """``python -m mqb.deploy``: what to export and which runtimes run it (the ``deploy`` group, ``conf/deploy/``).

    Not part of an evaluation's identity: :func:`mqb.results.config_id` drops it, so choosing a ``deploy``
    never changes ``mqb.eval`` records.
    """

    name: str = "cpu"
    #: runtime families to build, FP32 (TensorRT: FP16) and INT8 each: onnxruntime, openvino, tensorrt
    #: (tensorrt is skipped, and says why, without a GPU)
    runtimes: list[str] = field(default_factory=lambda: list(DEPLOY_RUNTIMES))
    #: "deploy": weights per-output-channel, activations per-tensor (what INT8 runtimes execute), whatever
    #: ``granularity`` says; "as_configured": keep the configured granularity (layers with no INT8 form go to float)
    scheme: str = "deploy"
    #: refuse (error) quantized layers that cannot be exported as INT8 instead of exporting them in float
    strict: bool = False
    #: Clip before QuantizeLinear so INT8 activations stay on mqb's +-127 grid (false: they may reach -128)
    narrow_range: bool = True
    #: INT8 export: apply the exact QDQ rewrites of ``mqb.deploy.graph.share_quantization`` (one quantize per
    #: tensor and scale, INT8 Concat) so runtimes fuse more; outputs are unchanged (``export_onnx`` keyword)
    share_quantization: bool = True
    #: INT8 weights on a 7-bit grid (|q| <= 63) so CPUs without VNNI, which sum u8 x s8 pairs into saturating
    #: int16, compute exactly what mqb fake-quantizes (NNCF's overflow_fix, ORT's reduce_range; mqb.deploy.isa):
    #: auto (where this CPU's INT8 dot product saturates), enable, disable
    overflow_fix: str = "auto"
    #: ONNX Runtime runs instance / group norms with mean and variance reduced one axis at a time
    #: (``mqb.deploy.norms``, on a copy; the file is unchanged): its fused kernel's one-pass float32 sum
    #: over a volume is 25-120x less accurate than torch. false: run the file's norms as written
    axiswise_norms: bool = True
    #: ONNX opset of both exports (>= 13: per-channel DequantizeLinear)
    opset: int = 17
    #: output folder; null: ``<results_dir>/../deploy/<model>-<precision>-<run id>``
    out: str | None = None
    profile: ProfileSettings = field(default_factory=ProfileSettings)


@dataclass
class JobConfig:
    """What every mqb job (evaluation, training) composes: a model on a dataset, run by a Lightning trainer."""

    model: Any = MISSING
    dataset: Any = MISSING
    logger: Any = None
    train: TrainSettings = field(default_factory=TrainSettings)
    trainer: TrainerSettings = field(default_factory=TrainerSettings)
    paths: PathsConfig = field(default_factory=PathsConfig)
    seed: int = 0


#: ``quant.kernel`` values (``mqb.quant.fake_quant.KERNELS``, repeated here so composing a config imports no torch).
QUANT_KERNELS = ("auto", "eager", "compiled")


@dataclass
class QuantSettings:
    """How fake quantization runs (``quant.*``); never what it computes, so not part of a record's id.

    ``kernel``: ``auto`` (compiled where it is faster and exact: large FP8/MX/NVFP4/dynamic tensors on the CPU;
    eager on CUDA, where inductor's division by a constant is not ATen's), ``eager`` (ATen operations one after
    another) or ``compiled`` (one ``torch.compile``-fused kernel per tensor, falling back to eager with a warning
    where compilation fails); on the CPU every choice gives the same result to the bit (``mqb.quant.set_kernel``).
    Checked with :func:`check_quant_settings`.
    """

    kernel: str = "auto"


def check_quant_settings(quant: Any) -> None:
    """``ValueError`` naming ``quant.kernel`` and its valid values for anything else."""
    kernel = getattr(quant, "kernel", None)
    if kernel not in QUANT_KERNELS:
        raise ValueError(f"quant.kernel={kernel!r} is invalid; valid: {', '.join(repr(k) for k in QUANT_KERNELS)}")


@dataclass
class EvalConfig(JobConfig):
    precision: PrecisionConfig = MISSING
    granularity: GranularityConfig = MISSING
    method: MethodConfig = MISSING
    calibration: CalibrationConfig = MISSING
    eval: EvalSettings = field(default_factory=EvalSettings)
    deploy: DeployConfig = field(default_factory=DeployConfig)  # python -m mqb.deploy only; not in config_id
    quant: QuantSettings = field(default_factory=QuantSettings)  # how fake quantization runs; not in config_id
    results_dir: str = "${paths.output_dir}/results"
    resume: bool = True
    auto_train: bool = False


@dataclass
class TrainConfig(JobConfig):
    output: str = "${paths.checkpoints}/${dataset.name}/${model.name}.safetensors"


#: Config keys with a new name: old key -> new key. The old spelling still works (one warning); a record's id is
#: the same for both (:func:`mqb.results.config_id` hashes the old spelling).
DEPRECATED_KEYS: dict[str, str] = {old: new for new, old in RENAMED_OPTIONS.items()}


def renamed_option(cfg: Any, new_key: str) -> bool:
    """The value of boolean option ``new_key`` (``method.output_quantizers``), true also where the user wrote its
    deprecated spelling (:data:`DEPRECATED_KEYS`), which gets a one-line warning."""
    from omegaconf import OmegaConf

    value = bool(OmegaConf.select(cfg, new_key, default=False))
    for old_key, key in DEPRECATED_KEYS.items():
        if key == new_key and OmegaConf.select(cfg, old_key, default=False):
            import warnings

            warnings.warn(f"{old_key} is deprecated: write {new_key} (same effect, same record id)", FutureWarning,
                          stacklevel=2)  # fmt: skip
            value = True
    return value


def find_mqb_plugins() -> None:
    """Let Hydra find mqb's plugins (``hydra_plugins/mqb_sweeps``: ``hydra/sweeper=mqb_grid``,
    ``hydra/launcher=mqb_pool``) wherever mqb runs. Hydra lists the folders of the ``hydra_plugins`` namespace
    package; an editable install (``pip install -e``) maps ``hydra_plugins.mqb_sweeps`` through an import hook that
    cannot be listed, so a console script (``mqb-eval``: its folder, not the repository, is first on the path) or
    ``python -m mqb.eval`` from another folder failed with "Could not find 'hydra/sweeper/mqb_grid'". Append the
    folder holding ``hydra_plugins/`` to ``sys.path`` when the namespace does not list it (a wheel: it does)."""
    import importlib.util

    try:
        import hydra_plugins

        spec = importlib.util.find_spec("hydra_plugins.mqb_sweeps")
    except ImportError:
        return
    if spec is None or not spec.submodule_search_locations:
        return
    folder = Path(next(iter(spec.submodule_search_locations))).parent
    if str(folder) not in list(hydra_plugins.__path__) and str(folder.parent) not in sys.path:
        sys.path.append(str(folder.parent))


def register_configs() -> None:
    """Register the schemas (idempotent), and make mqb's Hydra plugins findable (:func:`find_mqb_plugins`)."""
    find_mqb_plugins()
    cs = ConfigStore.instance()
    cs.store(name="eval_schema", node=EvalConfig)
    cs.store(name="train_schema", node=TrainConfig)


def compose_eval(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The ``mqb.eval`` config for ``overrides`` (``["model=unetr", "precision=w4a4"]``), composed with Hydra's
    compose API as the command line would (for tools, notebooks and tests that run outside ``hydra.main``)."""
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("eval", overrides=list(overrides))


def write_precision_configs(folder: Path = CONF_DIR / "precision") -> list[Path]:
    """Write the ``precision`` config group from its one source, :data:`mqb.quant.spec.PRESETS` (one file per
    preset, :func:`mqb.quant.spec.precision_config_yaml`); returns the files. ``python -m mqb.config`` runs it."""
    from mqb.quant.spec import PRESETS, precision_config_yaml

    written = []
    for preset in PRESETS.values():
        path = folder / f"{preset.name}.yaml"
        path.write_text(precision_config_yaml(preset))
        written.append(path)
    return written


if __name__ == "__main__":  # python -m mqb.config: rewrite conf/precision/ from mqb.quant.spec.PRESETS
    for written_path in write_precision_configs():
        print(written_path)
