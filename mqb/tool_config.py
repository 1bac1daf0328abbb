"""Structured configs of mqb's Hydra tools (``mqb.sensitivity``, ``mqb.activations``, ``mqb.deploy``).

Each tool's primary config (``conf/sensitivity.yaml``, ``conf/activations.yaml``, ``conf/deploy_app.yaml``) is the
``mqb.eval`` config (``conf/eval.yaml``: every group, experiment and key) plus a small node of the tool's own
options, typed here and registered in Hydra's ConfigStore (``<tool>_schema``):

    sensitivity.mode=per_layer sensitivity.layers=[conv3x3x3] sensitivity.max_layers=4     (SensitivityOptions)
    activations.layers=[conv] activations.out=outputs/act                                   (ActivationsOptions)
    deploy.command=profile deploy.profile.repeats=10                                        (DeployToolConfig)

A wrong key or a wrongly typed value fails at composition (Hydra names the key); a value outside its valid set is
refused by :func:`option_problem` / :func:`node_problems`, which name the key and the valid values. Each tool also
takes its first positional word (``mqb-sensitivity incremental``, ``mqb-deploy export``) and its earlier argparse
options (``--groups a b``) as shorthands for these keys: :class:`Tool` describes both for :mod:`mqb.cli`.

Imports neither torch nor anything that does: the tools' ``--help``, ``--cfg`` and argument errors come fast.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from mqb.config import DEPLOY_RUNTIMES, DEPLOY_SCHEMES, DeployConfig, EvalConfig

#: ``sensitivity.mode``: the three studies of ``mqb.sensitivity``.
SENSITIVITY_MODES = ("incremental", "per_layer", "mixed")
#: ``deploy.command``: what ``mqb.deploy`` does after the export.
DEPLOY_COMMANDS = ("export", "profile", "compare")
#: ``deploy.overflow_fix`` (:data:`mqb.deploy.isa.OVERFLOW_FIX`, repeated here so this module stays torch-free;
#: tests/test_tools_cli.py checks that the two agree).
OVERFLOW_FIX = ("auto", "enable", "disable")
#: ``sensitivity.groups``' default: the layer types the paper's Fig. 3 puts back to float, in order.
DEFAULT_GROUPS = ["conv1x3x3", "conv1x1x1", "conv3x3x3", "linear", "attention"]
#: the layers studied by default (``sensitivity.layers``, ``activations.layers``): every quantized layer.
DEFAULT_LAYERS = ["conv", "conv_transpose", "linear"]


@dataclass
class SensitivityOptions:
    """``mqb.sensitivity``: which study and its settings (the ``sensitivity`` node)."""

    #: incremental (layer types back to float one after another), per_layer (each layer alone in float, ranked),
    #: mixed (the fewest layers at ``keep`` precision that bring the DSC drop under ``target_drop``)
    mode: str = "incremental"
    #: incremental: layer selectors put back to float, cumulatively, in this order
    groups: list[str] = field(default_factory=lambda: list(DEFAULT_GROUPS))
    #: per_layer / mixed: selectors of the layers studied
    layers: list[str] = field(default_factory=lambda: list(DEFAULT_LAYERS))
    #: per_layer: what a layer is called in the table ("3x3x3 conv")
    label: str = "layer"
    #: per_layer: study only the first N layers (execution order); null: all
    max_layers: int | None = None
    #: per_layer: also measure each layer's output MSE / SQNR against its float self (one pass)
    proxies: bool = True
    #: mixed: the largest DSC drop against FP32 allowed, in percent
    target_drop: float = 1.0
    #: mixed: the precision of the layers kept (a precision preset: w8a8, w8a16 ...)
    keep: str = "w8a8"
    #: mixed: a per_layer study JSON whose Dice ranking orders the layers (null: rank by SQNR, one pass)
    ranking_from: str | None = None


@dataclass
class ActivationsOptions:
    """``mqb.activations``: which layers and where the statistics go (the ``activations`` node)."""

    #: layer selectors whose inputs are measured
    layers: list[str] = field(default_factory=lambda: list(DEFAULT_LAYERS))
    #: output folder; null: ``<paths.output_dir>/activations/<model>-<dataset>``
    out: str | None = None
    #: SmoothQuant migration strength of the "after smoothing" view, in [0, 1]
    alpha: float = 0.5
    #: heat maps of the N layers with the largest kurtosis
    plot: int = 4
    #: use only the first N calibration volumes; null: all ``calibration.num_volumes``
    max_batches: int | None = None


def overlay(cls: type) -> type:
    """``cls``, a dataclass extending a schema (its first base) with fields of its own, remade as an *overlay*: the
    inherited fields default to MISSING. Merged after the base config has been composed (``conf/<tool>.yaml`` lists
    it after ``eval``), it types the root as ``cls`` and adds the new fields with their defaults, and leaves every
    composed value as it is: OmegaConf keeps a value where the merged one is MISSING. (Listed before ``eval`` it is
    refused: OmegaConf does not merge the base schema onto a subclass; a plain subclass listed after it would reset
    every composed value to its default: the ``deploy`` choice, an experiment's settings.)"""
    base = cls.__mro__[1]
    hints = typing.get_type_hints(cls)
    own = set(cls.__dict__.get("__annotations__", {}))
    specs: list[tuple[str, Any, Any]] = []
    for f in dataclasses.fields(cls):
        if f.name not in own:
            specs.append((f.name, hints[f.name], field(default=MISSING)))
        elif f.default_factory is not dataclasses.MISSING:
            specs.append((f.name, hints[f.name], field(default_factory=f.default_factory)))
        else:
            specs.append((f.name, hints[f.name], field(default=f.default)))
    namespace = {"__doc__": cls.__doc__, "__module__": cls.__module__, "__qualname__": cls.__qualname__}
    return dataclasses.make_dataclass(cls.__name__, specs, bases=(base,), namespace=namespace)


@overlay
@dataclass
class DeployToolConfig(DeployConfig):
    """``mqb.deploy``: the ``deploy`` group's settings (:class:`mqb.config.DeployConfig`) plus the command."""

    #: export (FP32 + INT8 ONNX and the layer plan), profile (latency, memory, size, layer reports),
    #: compare (Dice of the deployed against the fake-quantized prediction)
    command: str = "export"


@overlay
@dataclass
class SensitivityAppConfig(EvalConfig):
    """``conf/sensitivity.yaml``: the eval config plus the ``sensitivity`` node."""

    sensitivity: SensitivityOptions = field(default_factory=SensitivityOptions)


@overlay
@dataclass
class ActivationsAppConfig(EvalConfig):
    """``conf/activations.yaml``: the eval config plus the ``activations`` node."""

    activations: ActivationsOptions = field(default_factory=ActivationsOptions)


@overlay
@dataclass
class DeployAppConfig(EvalConfig):
    """``conf/deploy_app.yaml``: the eval config with ``deploy.command`` (``deploy.*`` is not in a record's id)."""

    deploy: DeployToolConfig = field(default_factory=DeployToolConfig)


#: the valid values of the tools' choice keys (a list key: each element)
CHOICES: dict[str, tuple[str, ...]] = {
    "sensitivity.mode": SENSITIVITY_MODES,
    "deploy.command": DEPLOY_COMMANDS,
    "deploy.scheme": DEPLOY_SCHEMES,
    "deploy.runtimes": DEPLOY_RUNTIMES,
    "deploy.overflow_fix": OVERFLOW_FIX,
}
#: the smallest valid value of the tools' numeric keys (``None`` stays valid where the schema allows it)
MINIMA: dict[str, float] = {
    "sensitivity.max_layers": 1,
    "activations.alpha": 0,
    "activations.plot": 0,
    "activations.max_batches": 1,
    "deploy.profile.warmup": 0,
    "deploy.profile.repeats": 1,
    "deploy.profile.volume_repeats": 1,
    "deploy.profile.cases": 1,
}
MAXIMA: dict[str, float] = {"activations.alpha": 1}


def option_problem(key: str, value: Any) -> str | None:
    """Why ``key=value`` is not a valid tool option (naming the key and the valid values), or ``None``."""
    if key in CHOICES:
        valid = CHOICES[key]
        values = [value] if isinstance(value, str) or not hasattr(value, "__iter__") else list(value)
        bad = [v for v in values if v not in valid]
        if bad:
            return f"{key}: {', '.join(repr(b) for b in bad)} is not valid; valid: {', '.join(valid)}"
        return None
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return None
    least, most = MINIMA.get(key, -math.inf), MAXIMA.get(key, math.inf)
    if not least <= value <= most:
        bounds = f">= {least:g}" if most == math.inf else f"in [{least:g}, {most:g}]"
        return f"{key}={value}: must be {bounds}"
    return None


def node_problems(cfg: Any, node: str) -> list[str]:
    """Every invalid value under ``cfg.<node>`` (a composed config: also what a YAML or an experiment set)."""
    problems = []
    for key in [*CHOICES, *MINIMA]:
        if key.split(".")[0] != node:
            continue
        value: Any = cfg
        for part in key.split("."):
            value = value.get(part) if hasattr(value, "get") else None
        if value is not None and (problem := option_problem(key, value)) is not None:
            problems.append(problem)
    return problems


@dataclass(frozen=True)
class Tool:
    """A Hydra tool: its program name, primary config, schema, own node and command-line shorthands."""

    prog: str  # "mqb.sensitivity": the prefix of its messages
    config_name: str  # its primary config in conf/
    schema: type
    node: str  # the top-level key of its own options
    #: the key the first bare word of the command line sets (``mqb-deploy export`` -> ``deploy.command=export``)
    positional: str | None = None
    #: the earlier argparse options: flag -> (key, kind); kind: "list" (one or more words), "value" (one word),
    #: "false" (no word: sets the key to false)
    flags: dict[str, tuple[str, str]] = field(default_factory=dict)
    #: the node is part of the eval config (``deploy``: a group of it, left out of record ids by mqb.results);
    #: otherwise the tool's node is taken out of the config before its evaluations run
    node_in_eval: bool = False

    @property
    def positional_choices(self) -> tuple[str, ...]:
        return CHOICES.get(self.positional, ()) if self.positional else ()


SENSITIVITY = Tool(
    "mqb.sensitivity", "sensitivity", SensitivityAppConfig, "sensitivity", "sensitivity.mode",
    {"--groups": ("sensitivity.groups", "list"), "--layers": ("sensitivity.layers", "list"),
     "--label": ("sensitivity.label", "value"), "--max-layers": ("sensitivity.max_layers", "value"),
     "--no-proxies": ("sensitivity.proxies", "false"), "--target-drop": ("sensitivity.target_drop", "value"),
     "--keep": ("sensitivity.keep", "value"), "--ranking-from": ("sensitivity.ranking_from", "value")},
)  # fmt: skip
ACTIVATIONS = Tool(
    "mqb.activations", "activations", ActivationsAppConfig, "activations", None,
    {"--layers": ("activations.layers", "list"), "--out": ("activations.out", "value"),
     "--alpha": ("activations.alpha", "value"), "--plot": ("activations.plot", "value"),
     "--max-batches": ("activations.max_batches", "value")},
)  # fmt: skip
DEPLOY = Tool("mqb.deploy", "deploy_app", DeployAppConfig, "deploy", "deploy.command", node_in_eval=True)
TOOLS = {t.prog: t for t in (SENSITIVITY, ACTIVATIONS, DEPLOY)}


def register_tool_configs() -> None:
    """Register the tools' schemas (idempotent); the eval schemas too, which their primary configs include."""
    from mqb.config import register_configs

    register_configs()
    cs = ConfigStore.instance()
    cs.store(name="sensitivity_schema", node=SensitivityAppConfig)
    cs.store(name="activations_schema", node=ActivationsAppConfig)
    cs.store(name="deploy_app_schema", node=DeployAppConfig)


def compose_tool(tool: Tool, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """The tool's config for ``overrides`` (Hydra's compose API, as the command line would compose it), for tests
    and notebooks that run outside ``hydra.main``."""
    from hydra import compose, initialize_config_dir

    from mqb.config import CONF_DIR

    register_tool_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(tool.config_name, overrides=list(overrides))
