"""``python -m mqb.sensitivity`` (``mqb-sensitivity``): which layers break under quantization, and what it costs to
keep them.

    mqb-sensitivity incremental model=medformer precision=w4a4 sensitivity.groups=[conv1x3x3,conv1x1x1,linear]
    mqb-sensitivity per_layer model=segformer3d precision=w4a4 sensitivity.layers=[conv3x3x3] sensitivity.label=conv
    mqb-sensitivity mixed model=unet precision=w4a4 sensitivity.target_drop=2 sensitivity.keep=w8a8
    mqb-sensitivity -m incremental model=unet,segresnet precision=w4a4          # one study per model
    mqb-sensitivity --help                                                      # groups, choices, the study's keys

A Hydra app over ``conf/sensitivity.yaml``: the ``mqb.eval`` config plus the ``sensitivity`` node
(:class:`mqb.tool_config.SensitivityOptions`); the first word sets ``sensitivity.mode`` and the earlier options
(``--groups a b``, ``--layers``, ``--label``, ``--max-layers``, ``--no-proxies``, ``--target-drop``, ``--keep``,
``--ranking-from``) set their keys. Every step is an ordinary ``mqb.eval`` config (the studied layers go to
``method.exclude`` or, for ``mixed``, to ``method.rules``; the ``sensitivity`` node is not part of it), so steps
share the FP32 baseline, data and calibration caches with any sweep, land as records in ``results_dir`` and are
skipped when already done: an interrupted study resumes. The study itself is written to
``<results_dir>/../sensitivity/<study>.{json,md,png}``.

``per_layer`` also measures each layer's output error against its float self (MSE, SQNR) in one pass and
reports the Spearman correlation of SQNR with the recovered DSC; ``mixed`` ranks layers by SQNR (cheap) unless
``sensitivity.ranking_from`` gives a ``per_layer`` study, then keeps the fewest top-ranked layers at
``sensitivity.keep`` precision that bring the DSC drop under ``sensitivity.target_drop`` percent.

Torch and the pipeline are imported when a study runs, not before: ``--help``, ``--cfg`` and errors come fast.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from omegaconf import DictConfig, open_dict

from mqb.cli import run_tool_task, tool_config, tool_main
from mqb.config import CONF_DIR
from mqb.tool_config import DEFAULT_GROUPS, SENSITIVITY, register_tool_configs

if TYPE_CHECKING:
    import torch

    from mqb.analysis.sensitivity import Step

__all__ = ["DEFAULT_GROUPS", "error_proxies", "main", "quantized_layer_names", "run_steps", "run_study", "run_task"]


def with_method(
    cfg: DictConfig, exclude: tuple[str, ...] = (), rules: list[dict[str, Any]] | None = None
) -> DictConfig:
    """``cfg`` with more selectors kept in float and/or more per-layer precision rules."""
    out = copy.deepcopy(cfg)
    with open_dict(out):
        out.method.exclude = list(out.method.exclude) + list(exclude)
        out.method.rules = list(out.method.rules) + list(rules or [])
    return out


def run_steps(cfg: DictConfig, steps: list[Step]) -> list[dict[str, Any]]:
    """Evaluate each step (resuming finished ones); rows with label, excluded selectors and metrics."""
    from mqb.analysis.tables import console
    from mqb.jobs import run_job

    rows = []
    for i, step in enumerate(steps, start=1):
        console.print(f"[bold]step {i}/{len(steps)}: {step.label}")
        record = run_job(with_method(cfg, step.excluded))
        assert record is not None
        rows.append(_row(step.label, list(step.excluded), record))
    return rows


def _row(label: str, excluded: list[str], record: dict[str, Any]) -> dict[str, Any]:
    m, d = record["metrics"], record["delta_pct"]
    return {"label": label, "excluded": excluded, "dsc": m["dsc"], "nsd": m["nsd"], "dsc_delta_pct": d["dsc"],
            "nsd_delta_pct": d["nsd"], "id": record["id"], "baseline": record["baseline"]}  # fmt: skip


def quantized_layer_names(cfg: DictConfig, selector: list[str]) -> tuple[torch.nn.Module, list[str]]:
    """The float network and the names of the layers the recipe quantizes that match ``selector``, in execution
    order (one forward pass on a zero ROI)."""
    import torch
    from hydra.utils import instantiate

    from mqb.analysis.sensitivity import execution_order
    from mqb.pipeline import build_recipe
    from mqb.quant import quantizable_layers
    from mqb.quant.selectors import matches_any

    recipe = build_recipe(cfg)
    if recipe is None:
        raise ValueError(f"precision={cfg.precision.name} is a float precision: nothing to study; choose e.g. w4a4")
    net = instantiate(cfg.model.net).eval()
    names = [i.name for i in quantizable_layers(net) if recipe.plan(i) is not None and matches_any(selector, i)]
    if not names:
        raise ValueError(f"sensitivity.layers={list(selector)} matches no quantized layer of {cfg.model.name}")
    example = torch.zeros(1, int(cfg.dataset.in_channels), *[int(s) for s in cfg.dataset.roi_size])
    return net, execution_order(net, example, names)


def error_proxies(cfg: DictConfig) -> dict[str, dict[str, float]]:
    """Per-layer output MSE / SQNR of the fully quantized model on the calibration volumes: the model the Dice
    steps evaluate (:func:`mqb.quant.ptq` with the config's PTQ methods, as ``mqb.eval`` runs it)."""
    from mqb.analysis.sensitivity import layer_error_proxies
    from mqb.pipeline import build_methods, build_recipe, calibration_inputs, compute_device, load_model
    from mqb.quant import ptq

    recipe = build_recipe(cfg)
    assert recipe is not None
    net, _ = load_model(cfg)
    net.to(compute_device(cfg))  # the forward sends each volume to the network's device
    batches, forward = calibration_inputs(cfg, net)
    ptq(net, recipe, batches, forward, methods=build_methods(cfg))
    return layer_error_proxies(net, batches(), forward=forward)


def write_study(cfg: DictConfig, study: dict[str, Any], rows: list[dict[str, Any]], extra: tuple[str, ...]) -> Path:
    from mqb.analysis.tables import steps_markdown
    from mqb.results import stable_hash, write_json_atomic

    out_dir = Path(cfg.results_dir).parent / "sensitivity"
    sid = stable_hash({"study": study["mode"], "config": study["config_id"], "args": study["args"]}, 16)
    base = out_dir / f"{study['mode']}-{cfg.model.name}-{cfg.precision.name}-{sid}"
    write_json_atomic(base.with_suffix(".json"), {**study, "rows": rows})
    md = base.with_suffix(".md")
    md.parent.mkdir(parents=True, exist_ok=True)
    tmp = md.with_name(f".{md.name}.tmp")
    tmp.write_text(f"# {study['title']}\n\nFP32 DSC {study['baseline_dsc']:.3f}\n\n" + steps_markdown(rows, extra))
    tmp.replace(md)
    from mqb.analysis.figures import save_figure, sensitivity_figure

    figure = sensitivity_figure(rows, study["baseline_dsc"], study["title"],
                                spearman=study.get("spearman_recovered_vs_sqnr"))  # fmt: skip
    save_figure(figure, base.with_suffix(".png"), dpi=120)
    return base


def study_args(options: DictConfig) -> dict[str, str]:
    """The study's settings as the earlier argparse program recorded them (``vars(args)``, each value ``str``-ed):
    they name the study file (its hash), so a study keeps its file name."""
    ranking = options.ranking_from
    return {"mode": str(options.mode), "groups": str(list(options.groups)), "layers": str(list(options.layers)),
            "label": str(options.label), "max_layers": str(options.max_layers), "no_proxies": str(not options.proxies),
            "target_drop": str(float(options.target_drop)), "keep": str(options.keep),
            "ranking_from": str(Path(ranking) if ranking is not None else None)}  # fmt: skip


def run_study(cfg: DictConfig) -> Path:
    """Run the study ``cfg.sensitivity`` describes on the eval config in ``cfg`` (composed from
    ``conf/sensitivity.yaml``); returns the study files' path without suffix. ``ValueError`` for bad input."""
    from mqb.quant.selectors import validate_selector
    from mqb.quant.spec import get_precision

    eval_cfg, options = tool_config(cfg, SENSITIVITY)
    for key in ("groups", "layers"):
        for selector in options[key]:
            try:
                validate_selector(selector)
            except ValueError as err:
                raise ValueError(f"sensitivity.{key}: {err}") from err
    try:
        get_precision(options.keep)
    except ValueError as err:
        raise ValueError(f"sensitivity.keep={options.keep!r}: {err}") from err
    return _run(eval_cfg, options)


def run_task(cfg: DictConfig) -> None:
    """The Hydra task: one study. Module-level and undecorated so launchers pickle it by reference."""
    run_tool_task(SENSITIVITY, lambda: run_study(cfg))


_hydra_main = hydra.main(config_path=str(CONF_DIR), config_name=SENSITIVITY.config_name, version_base="1.3")(run_task)


def main(argv: list[str] | None = None) -> int:
    """``mqb-sensitivity`` / ``python -m mqb.sensitivity``: the exit status (2 for a user error)."""
    return tool_main(SENSITIVITY, _hydra_main, argv)


def _run(cfg: DictConfig, options: DictConfig) -> Path:
    from mqb.analysis.sensitivity import incremental_steps, per_layer_steps, rank_by_recovery, rank_correlation
    from mqb.analysis.tables import console, steps_table
    from mqb.results import config_id

    study: dict[str, Any] = {"mode": options.mode, "config_id": config_id(cfg), "model": cfg.model.name,
                             "dataset": cfg.dataset.name, "precision": cfg.precision.name,
                             "granularity": cfg.granularity.name, "method": cfg.method.name,
                             "args": study_args(options)}  # fmt: skip
    extra: tuple[str, ...] = ()
    if options.mode == "incremental":
        rows = run_steps(cfg, incremental_steps(list(options.groups)))
        study["title"] = f"{cfg.model.name} {cfg.precision.name}: incremental dequantization"
    elif options.mode == "per_layer":
        _, names = quantized_layer_names(cfg, list(options.layers))
        names = names[: options.max_layers] if options.max_layers else names
        rows = run_steps(cfg, per_layer_steps(names, options.label))
        ranked = rank_by_recovery(rows)
        layer_of = {r["label"]: n for r, n in zip(rows[1:], names, strict=True)}
        for r in ranked:
            r["layer"] = layer_of[r["label"]]
        rows = rows[:1] + sorted(ranked, key=lambda r: names.index(r["layer"]))
        extra = ("recovered", "rank")
        if options.proxies:
            proxies = error_proxies(cfg)
            for r in rows[1:]:
                r.update(proxies.get(r["layer"], {}))
            scored = [r for r in rows[1:] if "mse" in r]
            if len(scored) >= 2:
                # a layer that recovers more should have a lower SQNR: a good proxy gives rho near -1
                study["spearman_recovered_vs_sqnr"] = rank_correlation([r["recovered"] for r in scored],
                                                                       [r["sqnr_db"] for r in scored])  # fmt: skip
            extra += ("mse", "sqnr_db")
        study["title"] = f"{cfg.model.name} {cfg.precision.name}: per-{options.label} sensitivity"
    else:
        rows, extra = _mixed(cfg, options, study)
    study["baseline_dsc"] = rows[0]["baseline"]["dsc"] if rows else float("nan")
    base = write_study(cfg, study, rows, extra)
    console.print(steps_table(study["title"], rows, extra))
    if "spearman_recovered_vs_sqnr" in study:  # printed to 3 digits (the study file keeps the full value)
        from mqb.analysis.figures import format_rho

        console.print(f"spearman_recovered_vs_sqnr: {format_rho(study['spearman_recovered_vs_sqnr'], 3)}")
    if "mixed_precision" in study:
        console.print(f"mixed_precision: {json.dumps(study['mixed_precision'], default=str)}")
    console.print(f"study written to {base}.json / .md / .png")
    return base


def _mixed(cfg: DictConfig, options: DictConfig, study: dict[str, Any]) -> tuple[list[dict[str, Any]], tuple]:
    from mqb.analysis.sensitivity import bit_budget, greedy_mixed_precision
    from mqb.jobs import run_job
    from mqb.quant.spec import get_precision

    net, names = quantized_layer_names(cfg, list(options.layers))
    if options.ranking_from is not None:
        previous = json.loads(Path(options.ranking_from).read_text())
        ranked_layers = [r["layer"] for r in sorted(previous["rows"][1:], key=lambda r: r["rank"])]
        source = f"recovered DSC ({Path(options.ranking_from)})"
    else:
        proxies = error_proxies(cfg)
        ranked_layers = sorted((n for n in names if n in proxies), key=lambda n: proxies[n]["sqnr_db"])
        source = "layer output SQNR, lowest first (one pass)"
    rows: list[dict[str, Any]] = []

    def evaluate(kept: list[str]) -> float:
        rules = [{"select": f"name:{n}", "precision": options.keep, "granularity": None} for n in kept]
        record = run_job(with_method(cfg, rules=rules))
        assert record is not None
        rows.append(_row(f"{len(kept)} layers at {options.keep}", [f"name:{n}" for n in kept], record))
        return float(record["metrics"]["dsc"])

    first = run_job(cfg)
    assert first is not None
    baseline = float(first["baseline"]["dsc"])
    result = greedy_mixed_precision(evaluate, ranked_layers, float(options.target_drop), baseline)
    params = {n: sum(p.numel() for p in m.parameters(recurse=False)) for n, m in net.named_modules() if n in names}
    main_bits = cfg.precision.weight.bits if cfg.precision.weight is not None else None
    keep_spec = get_precision(options.keep).weight
    keep_bits = keep_spec.bits if keep_spec is not None else None
    kept = set(result["kept"])
    budget = bit_budget((params[n], keep_bits if n in kept else main_bits) for n in names)
    study["mixed_precision"] = {**result, "ranking": source, "keep": options.keep, "budget": budget,
                                "uniform_bits": main_bits}  # fmt: skip
    study["title"] = f"{cfg.model.name} {cfg.precision.name}: mixed precision for ΔDSC ≤ {float(options.target_drop)}%"
    rows.sort(key=lambda r: len(r["excluded"]))
    return rows, ()


register_tool_configs()

if __name__ == "__main__":
    # Run the importable module, not this __main__ copy: launchers (submitit) pickle the task function, which
    # must be pickled by reference to mqb.sensitivity, not by value with this module's globals.
    from mqb.sensitivity import main as _main

    sys.exit(_main())
