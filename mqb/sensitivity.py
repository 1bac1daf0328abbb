"""``python -m mqb.sensitivity``: which layers break under quantization, and what it costs to keep them.

    python -m mqb.sensitivity incremental model=medformer precision=w4a4 --groups conv1x3x3 conv1x1x1 linear
    python -m mqb.sensitivity per_layer model=segformer3d precision=w4a4 --layers conv3x3x3 --label "3x3x3 conv"
    python -m mqb.sensitivity mixed model=unet precision=w4a4 --target-drop 2 --keep w8a8

Every step is an ordinary ``mqb.eval`` config (the studied layers go to ``method.exclude`` or, for ``mixed``, to
``method.rules``), so steps share the FP32 baseline, data and calibration caches with any sweep, land as records
in ``results_dir`` and are skipped when already done: an interrupted study resumes. The study itself is written
to ``<results_dir>/../sensitivity/<study>.{json,md,png}``.

``per_layer`` also measures each layer's output error against its float self (MSE, SQNR) in one pass and
reports the Spearman correlation of SQNR with the recovered DSC; ``mixed`` ranks layers by SQNR (cheap) unless
``--ranking-from`` gives a ``per_layer`` study, then keeps the fewest top-ranked layers at ``--keep``
precision that bring the DSC drop under ``--target-drop`` percent.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict
from rich.console import Console

from mqb.analysis.sensitivity import (
    Step,
    bit_budget,
    execution_order,
    greedy_mixed_precision,
    incremental_steps,
    layer_error_proxies,
    per_layer_steps,
    rank_by_recovery,
    rank_correlation,
)
from mqb.analysis.tables import steps_markdown, steps_table
from mqb.cli import user_error
from mqb.config import compose_eval
from mqb.jobs import run_job
from mqb.pipeline import build_methods, build_recipe, calibration_inputs, compute_device, load_model
from mqb.quant import ptq, quantizable_layers
from mqb.quant.selectors import matches_any, validate_selector
from mqb.quant.spec import get_precision
from mqb.results import stable_hash, write_json_atomic

console = Console(width=None if sys.stdout.isatty() else 160)
DEFAULT_GROUPS = ["conv1x3x3", "conv1x1x1", "conv3x3x3", "linear", "attention"]


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
    recipe = build_recipe(cfg)
    if recipe is None:
        raise ValueError(f"precision={cfg.precision.name} is a float precision: nothing to study; choose e.g. w4a4")
    net = instantiate(cfg.model.net).eval()
    names = [i.name for i in quantizable_layers(net) if recipe.plan(i) is not None and matches_any(selector, i)]
    if not names:
        raise ValueError(f"--layers {selector} matches no quantized layer of {cfg.model.name}")
    example = torch.zeros(1, int(cfg.dataset.in_channels), *[int(s) for s in cfg.dataset.roi_size])
    return net, execution_order(net, example, names)


def error_proxies(cfg: DictConfig) -> dict[str, dict[str, float]]:
    """Per-layer output MSE / SQNR of the fully quantized model on the calibration volumes: the model the Dice
    steps evaluate (:func:`mqb.quant.ptq` with the config's PTQ methods, as ``mqb.eval`` runs it)."""
    recipe = build_recipe(cfg)
    assert recipe is not None
    net, _ = load_model(cfg)
    net.to(compute_device(cfg))  # the forward sends each volume to the network's device
    batches, forward = calibration_inputs(cfg, net)
    ptq(net, recipe, batches, forward, methods=build_methods(cfg))
    return layer_error_proxies(net, batches(), forward=forward)


def _bar_chart(rows: list[dict[str, Any]], baseline: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(rows) + 2), 4))
    ax.bar(range(len(rows)), [r["dsc"] for r in rows], color="tab:blue")
    ax.axhline(baseline, color="k", linestyle="--", label=f"FP32 {baseline:.3f}")
    ax.set_xticks(range(len(rows)), [r["label"] for r in rows], rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("mean DSC")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def write_study(cfg: DictConfig, study: dict[str, Any], rows: list[dict[str, Any]], extra: tuple[str, ...]) -> Path:
    out_dir = Path(cfg.results_dir).parent / "sensitivity"
    sid = stable_hash({"study": study["mode"], "config": study["config_id"], "args": study["args"]}, 16)
    base = out_dir / f"{study['mode']}-{cfg.model.name}-{cfg.precision.name}-{sid}"
    write_json_atomic(base.with_suffix(".json"), {**study, "rows": rows})
    md = base.with_suffix(".md")
    md.parent.mkdir(parents=True, exist_ok=True)
    tmp = md.with_name(f".{md.name}.tmp")
    tmp.write_text(f"# {study['title']}\n\nFP32 DSC {study['baseline_dsc']:.3f}\n\n" + steps_markdown(rows, extra))
    tmp.replace(md)
    _bar_chart(rows, study["baseline_dsc"], base.with_suffix(".png"), study["title"])
    return base


def main(argv: list[str] | None = None) -> int:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(prog="python -m mqb.sensitivity", description=doc.split("\n\n")[0],
                                     epilog=doc, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("mode", choices=("incremental", "per_layer", "mixed"))
    parser.add_argument("overrides", nargs="*", help="mqb.eval overrides (model=..., precision=..., ...)")
    parser.add_argument("--groups", nargs="+", default=DEFAULT_GROUPS, help="incremental: selectors, in order")
    layers_help = "per_layer/mixed: selectors of the layers to study (default: every quantized layer)"
    parser.add_argument("--layers", nargs="+", default=["conv", "conv_transpose", "linear"], help=layers_help)
    parser.add_argument("--label", default="layer", help='per_layer: what a layer is called ("3x3x3 conv")')
    parser.add_argument("--max-layers", type=int, default=None, help="per_layer: study only the first N")
    parser.add_argument("--no-proxies", action="store_true", help="per_layer: skip the MSE/SQNR proxies")
    parser.add_argument("--target-drop", type=float, default=1.0, help="mixed: max DSC drop vs FP32 in percent")
    parser.add_argument("--keep", default="w8a8", help="mixed: precision for the kept layers (w8a8, w8a16 ...)")
    parser.add_argument("--ranking-from", type=Path, default=None, help="mixed: a per_layer study JSON to rank by")
    args = parser.parse_args(argv)
    try:
        for sel in [*args.groups, *args.layers]:
            validate_selector(sel)
        get_precision(args.keep)
        cfg = compose_eval(args.overrides)
        return _run(cfg, args)
    except Exception as err:  # noqa: BLE001
        problem = user_error(err)
        if problem is None:
            raise
        print(f"mqb.sensitivity: error: {problem}", file=sys.stderr)
        return 2


def _run(cfg: DictConfig, args: argparse.Namespace) -> int:
    from mqb.results import config_id

    study: dict[str, Any] = {"mode": args.mode, "config_id": config_id(cfg), "model": cfg.model.name,
                             "dataset": cfg.dataset.name, "precision": cfg.precision.name,
                             "granularity": cfg.granularity.name, "method": cfg.method.name,
                             "args": {k: str(v) for k, v in vars(args).items() if k != "overrides"}}  # fmt: skip
    extra: tuple[str, ...] = ()
    if args.mode == "incremental":
        rows = run_steps(cfg, incremental_steps(args.groups))
        study["title"] = f"{cfg.model.name} {cfg.precision.name}: incremental dequantization"
    elif args.mode == "per_layer":
        _, names = quantized_layer_names(cfg, args.layers)
        names = names[: args.max_layers] if args.max_layers else names
        rows = run_steps(cfg, per_layer_steps(names, args.label))
        ranked = rank_by_recovery(rows)
        layer_of = {r["label"]: n for r, n in zip(rows[1:], names, strict=True)}
        for r in ranked:
            r["layer"] = layer_of[r["label"]]
        rows = rows[:1] + sorted(ranked, key=lambda r: names.index(r["layer"]))
        extra = ("recovered", "rank")
        if not args.no_proxies:
            proxies = error_proxies(cfg)
            for r in rows[1:]:
                r.update(proxies.get(r["layer"], {}))
            scored = [r for r in rows[1:] if "mse" in r]
            if len(scored) >= 2:
                # a layer that recovers more should have a lower SQNR: a good proxy gives rho near -1
                study["spearman_recovered_vs_sqnr"] = rank_correlation([r["recovered"] for r in scored],
                                                                       [r["sqnr_db"] for r in scored])  # fmt: skip
            extra += ("mse", "sqnr_db")
        study["title"] = f"{cfg.model.name} {cfg.precision.name}: per-{args.label} sensitivity"
    else:
        rows, extra = _mixed(cfg, args, study)
    study["baseline_dsc"] = rows[0]["baseline"]["dsc"] if rows else float("nan")
    base = write_study(cfg, study, rows, extra)
    console.print(steps_table(study["title"], rows, extra))
    if "spearman_recovered_vs_sqnr" in study:  # printed to 3 digits (the study file keeps the full value)
        console.print(f"spearman_recovered_vs_sqnr: {study['spearman_recovered_vs_sqnr']:.3f}")
    if "mixed_precision" in study:
        console.print(f"mixed_precision: {json.dumps(study['mixed_precision'], default=str)}")
    console.print(f"study written to {base}.json / .md / .png")
    return 0


def _mixed(cfg: DictConfig, args: argparse.Namespace, study: dict[str, Any]) -> tuple[list[dict[str, Any]], tuple]:
    net, names = quantized_layer_names(cfg, args.layers)
    if args.ranking_from is not None:
        previous = json.loads(Path(args.ranking_from).read_text())
        ranked_layers = [r["layer"] for r in sorted(previous["rows"][1:], key=lambda r: r["rank"])]
        source = f"recovered DSC ({args.ranking_from})"
    else:
        proxies = error_proxies(cfg)
        ranked_layers = sorted((n for n in names if n in proxies), key=lambda n: proxies[n]["sqnr_db"])
        source = "layer output SQNR, lowest first (one pass)"
    rows: list[dict[str, Any]] = []

    def evaluate(kept: list[str]) -> float:
        rules = [{"select": f"name:{n}", "precision": args.keep, "granularity": None} for n in kept]
        record = run_job(with_method(cfg, rules=rules))
        assert record is not None
        rows.append(_row(f"{len(kept)} layers at {args.keep}", [f"name:{n}" for n in kept], record))
        return float(record["metrics"]["dsc"])

    first = run_job(cfg)
    assert first is not None
    baseline = float(first["baseline"]["dsc"])
    result = greedy_mixed_precision(evaluate, ranked_layers, args.target_drop, baseline)
    params = {n: sum(p.numel() for p in m.parameters(recurse=False)) for n, m in net.named_modules() if n in names}
    main_bits = cfg.precision.weight.bits if cfg.precision.weight is not None else None
    keep_spec = get_precision(args.keep).weight
    keep_bits = keep_spec.bits if keep_spec is not None else None
    kept = set(result["kept"])
    budget = bit_budget((params[n], keep_bits if n in kept else main_bits) for n in names)
    study["mixed_precision"] = {**result, "ranking": source, "keep": args.keep, "budget": budget,
                                "uniform_bits": main_bits}  # fmt: skip
    study["title"] = f"{cfg.model.name} {cfg.precision.name}: mixed precision for ΔDSC ≤ {args.target_drop}%"
    rows.sort(key=lambda r: len(r["excluded"]))
    return rows, ()


if __name__ == "__main__":
    sys.exit(main())
