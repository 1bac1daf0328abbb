"""Paper-style tables and figures from the result records of any sweep (MedQuanBench Tables 1-3 and 8-10).

This module selects the records, computes the rows and the per-class statistics, draws the figures and writes
the files; the tables are laid out and rendered by :mod:`mqb.analysis.tables` (``tables.``\ *name* below). Each
step is a function of the previous one's output (only :func:`write_report` touches the disk)::

    records ──select_records──▶ Selection: latest success per id, errors without a success, other kinds
            ──table_rows──────▶ rows: one dict per config (``tables.COLUMNS`` + per_class, reference),
                                 in the paper's order, an FP32 row first per model + dataset (tables.group_key)
            ──tables.paper_table──▶ tables.Table: header, text cells, merged leading columns, footnotes
            ──tables.render_report (render)──▶ Markdown / LaTeX text, or the rows' raw numbers as CSV
    rows    ──per_class_entries──▶ per config x class (+ mean): value, ↓Δ%, bootstrap CI, p, Holm (mqb.analysis.stats)
            ──tables.render_per_class──▶ one class x config table per group (Markdown / LaTeX), or long-format CSV
    record + its FP32 baseline ──record_entries──▶ the same entries for one run (the W&B per-class table)
    rows    ──dsc_bar_figure / per_class_delta_figure──▶ matplotlib Figures (no pyplot, no display needed)

The writers take a :class:`mqb.analysis.tables.Table`, not records: a table of another record kind (e.g. the
layer-sensitivity records that :func:`select_records` sets aside in ``Selection.other``) is one more
``rows -> Table`` function in :mod:`mqb.analysis.tables`.
"""

from __future__ import annotations

import math
import os
import re
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import ListedColormap, Normalize, SymLogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from mqb.analysis.stats import compare, holm
from mqb.analysis.tables import (
    FORMATS,
    GRANULARITY_NAMES,
    MEAN,
    NO_LABELS,
    PER_CLASS_FILES,
    UNTRAINED,
    Table,
    config_label,
    format_pct,
    group_key,
    group_names,
    paper_table,
    precision_label,
    render_per_class,
    render_report,
    series_label,
    summary_rows,
)
from mqb.results import NESTED_VOLATILE_KEYS, VOLATILE_KEYS, atomic_write

#: Table order of the precisions; others follow alphabetically.
PRECISION_ORDER = ("fp32", "w8a8", "w4a8", "w4a4")
METHOD_ORDER = ("-", "rtn")
#: Metrics of the per-class entries and tables (``per_class_dsc.md`` ...).
PER_CLASS_METRICS = ("dsc", "nsd")


# -- records -> rows ---------------------------------------------------------------------------------------
@dataclass
class Selection:
    """What a results directory holds, one entry per config id."""

    successes: list[dict[str, Any]]  # the latest success record per id
    errors: list[dict[str, Any]]  # the latest error record per id that has no success record
    other: list[dict[str, Any]] = field(default_factory=list)  # other kinds ("sensitivity"), no id, malformed


def select_records(records: Iterable[dict[str, Any]]) -> Selection:
    """Latest success per id wins (also over a newer error record, as in ``mqb.sweep status``)."""
    successes: dict[str, dict[str, Any]] = {}
    errors: dict[str, dict[str, Any]] = {}
    other = []
    for r in sorted(records, key=lambda r: str(r.get("created", ""))):
        rid = r.get("id")
        if "sensitivity" in r or rid is None:
            other.append(r)
        elif r.get("status") == "success":
            if isinstance(r.get("metrics"), dict) and isinstance(r.get("delta_pct"), dict):
                successes[rid] = r
            else:
                other.append(r)
        else:
            errors[rid] = r
    return Selection(list(successes.values()), [e for rid, e in errors.items() if rid not in successes], other)


def _rank(order: Sequence[str], name: str) -> tuple[int, str]:
    return (order.index(name), "") if name in order else (len(order), name)


def _rank_in_group(row: dict[str, Any]) -> tuple[Any, ...]:
    """Precision / granularity / method in the paper's order."""
    granularity = _rank(tuple(GRANULARITY_NAMES), row["granularity"])
    return _rank(PRECISION_ORDER, row["precision"]), granularity, _rank(METHOD_ORDER, row["method"]), str(row["id"])


def table_rows(successes: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per success record (:func:`mqb.analysis.tables.summary_rows` plus ``per_class``, ``reference``,
    ``baseline``, ``from_baseline``), in the paper's order. Rows are grouped by :func:`group_key`, so e.g.
    untrained and trained records of a model never share an FP32 row; a group without an fp32 record gets an FP32
    row from the baseline stored in its latest quantized record (``from_baseline: True``, no per-class values)."""
    rows = []
    for record, row in zip(successes, summary_rows(list(successes)), strict=True):
        per_class = record["metrics"].get("per_class") or {}
        per_case = record["metrics"].get("per_case") or {}
        stats = record.get("stats") if isinstance(record.get("stats"), dict) else None
        dataset = (record.get("config") or {}).get("dataset") if isinstance(record.get("config"), dict) else None
        names = dataset.get("class_names") if isinstance(dataset, dict) else None
        rows.append({**row, "per_class": per_class if isinstance(per_class, dict) else {},
                     "per_case": per_case if isinstance(per_case, dict) else {}, "stats": stats,
                     "class_order": [str(n) for n in names[1:]] if isinstance(names, list) else None,
                     "reference": record.get("reference", "labels"), "from_baseline": False,
                     "baseline": record.get("baseline") or {},
                     "config": record.get("config") if isinstance(record.get("config"), dict) else {}})  # fmt: skip
    has_fp32 = {group_key(r) for r in rows if r["precision"] == "fp32"}
    synthesized: dict[tuple[str, str, bool, bool, str], dict[str, Any]] = {}
    for r in rows:  # successes come oldest first: the latest baseline wins
        base = r["baseline"]
        if group_key(r) not in has_fp32 and base.get("dsc") is not None:
            synthesized[group_key(r)] = {
                "model": r["model"], "dataset": r["dataset"], "precision": "fp32", "granularity": "-", "method": "-",
                "dsc": base.get("dsc"), "dsc_delta_pct": None, "nsd": base.get("nsd"), "nsd_delta_pct": None,
                "hd95": base.get("hd95"), "untrained": r["untrained"], "id": "", "per_class": {}, "per_case": {},
                "stats": None, "class_order": None, "config": {},
                "reference": r["reference"], "from_baseline": True, "baseline": base,
            }  # fmt: skip

    def order(row: dict[str, Any]) -> tuple[Any, ...]:  # model, dataset, trained, labelled, with an fp32 record
        key = group_key(row)
        return key[:4], key not in has_fp32, key[4], _rank_in_group(row)

    out = sorted(rows + list(synthesized.values()), key=order)
    for row, setting in zip(out, distinguishing_settings(out), strict=True):
        row["setting"] = setting
    return out


def flat_config(config: dict[str, Any]) -> dict[str, Any]:
    """A record's ``config`` as dotted keys -> leaf values (lists kept whole), without the keys that do not change
    results (``mqb.results.VOLATILE_KEYS``: paths, results_dir, logger, trainer ...; ``NESTED_VOLATILE_KEYS``:
    cache_dir, num_workers at any depth), as the config id leaves them out."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                if (not prefix and k in VOLATILE_KEYS) or k in NESTED_VOLATILE_KEYS:
                    continue
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = value

    walk("", config if isinstance(config, dict) else {})
    return out


def config_value(value: Any) -> str:
    """A config value as a reader writes it: ``percentile``, ``0.5``, ``[conv1x1x1, linear]``, ``null``."""
    if isinstance(value, list):
        return "[" + ", ".join(config_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {config_value(v)}" for k, v in value.items()) + "}"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def label_key(row: dict[str, Any]) -> tuple[Any, ...]:
    """What a row's visible label says: its group (:func:`group_key`), precision, granularity and method."""
    return (*group_key(row), row["precision"], row["granularity"], row["method"])


def distinguishing_settings(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Per row, the config settings that tell it apart from the other rows with the same label
    (:func:`label_key`), e.g. ``method.exclude=[conv1x1x1]`` or ``calibration.name=percentile,
    calibration.observer=percentile``: the keys of :func:`flat_config` whose values differ within the label
    (a key one record lacks reads ``unset``). ``""`` for a row whose label is unique."""
    by_label: dict[tuple[Any, ...], list[int]] = {}
    for i, r in enumerate(rows):
        by_label.setdefault(label_key(r), []).append(i)
    out = [""] * len(rows)
    for members in by_label.values():
        if len(members) < 2:
            continue
        flats = [flat_config(rows[i].get("config") or {}) for i in members]
        keys = sorted({k for f in flats for k in f})
        missing = object()
        differ = [k for k in keys if len({repr(f.get(k, missing)) for f in flats}) > 1]
        for i, f in zip(members, flats, strict=True):
            if differ:
                out[i] = ", ".join(f"{k}={config_value(f[k]) if k in f else 'unset'}" for k in differ)
            else:  # same visible label and same config: only the id tells them apart
                out[i] = f"id {rows[i]['id']}" if rows[i]["id"] else "FP32 from baseline"
    return out


# -- per-class entries ------------------------------------------------------------------------------------
def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) \
        else None  # fmt: skip


def _group_classes(fp32: dict[str, Any] | None, quant: Sequence[dict[str, Any]], metric: str) -> list[str]:
    """Class names in the dataset's order (``config.dataset.class_names``), else the FP32 record's, then those
    only some quantized records have."""
    names: dict[str, None] = {}
    for r in ([fp32] if fp32 else []) + list(quant):
        names.update(dict.fromkeys(r.get("class_order") or ()))
    for r in ([fp32] if fp32 else []) + list(quant):
        names.update(dict.fromkeys(r["per_class"]))
        block = (r.get("stats") or {}).get(metric)
        if isinstance(block, dict) and isinstance(block.get("per_class"), dict):
            names.update(dict.fromkeys(block["per_class"]))
    return list(names)


def per_class_entries(
    rows: Sequence[dict[str, Any]],
    metric: str = "dsc",
    n_resamples: int = 10_000,
    seed: int = 0,
    confidence: float = 0.95,
    ci_method: str = "BCa",
    alpha: float = 0.05,
) -> list[dict[str, Any]]:
    """Per group (:func:`group_key`), quantized config (table order) and class (FP32 order, then ``mean``): one
    dict with the columns :data:`PER_CLASS_COLUMNS`. Values come from, in order of preference:

    * ``stats`` — the record's ``stats`` section (``mqb.analysis.stats.compare``): paired per-case means, ↓Δ%
      with its bootstrap CI, p-value;
    * ``per_case`` — computed here with :func:`mqb.analysis.stats.compare` from the per-case values of the
      quantized record and of the group's fp32 record (``metrics.per_case``), seeded;
    * ``per_class`` — the records' class means only: ↓Δ% = 100 (FP32 - quantized) / FP32, no CI, no test.

    ``p_holm`` / ``significant``: Holm's correction across the quantized configs of the group, one family per
    class (and mean); ``significant`` is ``p_holm < alpha``."""
    out = []
    names = group_names(rows)
    options = {"n_resamples": n_resamples, "seed": seed, "confidence": confidence, "ci_method": ci_method,
               "alpha": alpha}  # fmt: skip
    for key, cell in names.items():
        group = [r for r in rows if group_key(r) == key]
        fp32 = next((r for r in group if r["precision"] == "fp32" and (r["per_case"] or r["per_class"])), None)
        fp32 = fp32 or next((r for r in group if r["precision"] == "fp32"), None)
        quant = [r for r in group if r["precision"] != "fp32"]
        classes = _group_classes(fp32, quant, metric)
        with_method = len({r["method"] for r in quant}) > 1
        group_entries = []
        for r in quant:
            stats = r.get("stats") or {}
            block = stats.get(metric) if isinstance(stats.get(metric), dict) else None
            source = "stats"
            if block is None and fp32 is not None and fp32["per_case"] and r["per_case"]:
                # per-case lists are in the dataset's class order; the records' per_class keys are sorted (JSON)
                order = r["class_order"] or fp32["class_order"]
                order = order if fp32["class_order"] in (None, order) else None
                try:
                    computed = compare({"per_class": fp32["per_class"], "per_case": fp32["per_case"]},
                                       {"per_class": r["per_class"], "per_case": r["per_case"]},
                                       metrics=(metric,), class_names=order, **options)  # fmt: skip
                    block, source = computed[metric], "per_case"
                except ValueError:  # the class of each per-case value is unknown: class means only
                    block = None
            per_class_block = (block or {}).get("per_class") if isinstance((block or {}).get("per_class"), dict) else {}
            for c in [*classes, MEAN]:
                e = (block or {}).get("mean") if c == MEAN else per_class_block.get(c)
                e = e if isinstance(e, dict) else None
                if c == MEAN:
                    own, base = r.get(metric), (fp32 or {}).get(metric)
                else:
                    own = (r["per_class"].get(c) or {}).get(metric)
                    base = ((fp32 or {}).get("per_class", {}).get(c) or {}).get(metric)
                entry = {
                    "model": r["model"], "dataset": r["dataset"], "group": cell, "id": r["id"],
                    "precision": r["precision"], "granularity": r["granularity"], "method": r["method"],
                    "config": config_label(r, with_method), "class": c, "metric": metric,
                    "n_cases": None, "fp32": _float(base), "value": _float(own), "drop_pct": None,
                    "drop_pct_ci_low": None, "drop_pct_ci_high": None, "p": None, "p_holm": None,
                    "significant": None, "test": None, "source": "per_class", "min_p": None,
                }  # fmt: skip
                if e is not None and e.get("n"):
                    entry.update(
                        n_cases=e.get("n"), fp32=_float(e.get("fp32")), value=_float(e.get("quant")),
                        drop_pct=_float(e.get("drop_pct")), drop_pct_ci_low=_float(e.get("drop_pct_ci_low")),
                        drop_pct_ci_high=_float(e.get("drop_pct_ci_high")), p=_float(e.get("p")),
                        test=e.get("test"), source=source, min_p=_float(e.get("min_p")),
                    )  # fmt: skip
                elif c == MEAN and r.get(f"{metric}_delta_pct") is not None:
                    entry["drop_pct"] = _float(r[f"{metric}_delta_pct"])  # the record's own Δ%, as in the table
                elif entry["fp32"] and entry["value"] is not None:
                    entry["drop_pct"] = 100.0 * (entry["fp32"] - entry["value"]) / entry["fp32"]
                group_entries.append(entry)
        for c in [*classes, MEAN]:
            family = {str(i): e for i, e in enumerate(group_entries) if e["class"] == c}
            adjusted = holm({i: e["p"] for i, e in family.items()})
            for i, e in family.items():
                e["p_holm"] = adjusted[i]
                e["significant"] = None if adjusted[i] is None else bool(adjusted[i] < alpha)
        out += group_entries
    return out


def record_entries(
    record: dict[str, Any], baseline: dict[str, Any], metric: str = "dsc", n_resamples: int = 10_000,
    seed: int | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """:func:`per_class_entries` of one quantized ``record`` against its FP32 ``baseline`` metrics (the results
    dict of the FP32 run: ``dsc``, ``per_class``, ``per_case`` ..., as ``mqb.pipeline`` holds it), per class and
    ``mean``: from the record's ``stats`` section where it has one, else computed from both sides' per-case values
    (seeded with the record's ``config.seed`` unless ``seed`` is given), else from class means. A group of one
    config: ``p_holm`` equals ``p`` (Holm across a sweep's configs is :func:`mqb.analysis.tables.summary_rows`'
    business). ``[]`` for an FP32 record or without a baseline."""
    if record.get("precision") == "fp32" or not isinstance(baseline, dict) or not isinstance(record.get("metrics"),
                                                                                                 dict):  # fmt: skip
        return []
    config = record.get("config") if isinstance(record.get("config"), dict) else {}
    if seed is None:
        seed = config["seed"] if isinstance(config.get("seed"), int) else 0
    fp32 = {"id": "", "status": "success", "created": "", "model": record.get("model"),
            "dataset": record.get("dataset"), "precision": "fp32", "granularity": "-", "method": "-",
            "untrained": record.get("untrained"), "reference": record.get("reference", "labels"),
            "baseline": record.get("baseline") or {}, "config": config, "metrics": baseline,
            "delta_pct": {}}  # fmt: skip
    quant = {**record, "status": "success", "delta_pct": record.get("delta_pct") or {}}
    return per_class_entries(table_rows([fp32, quant]), metric, n_resamples=n_resamples, seed=seed)


# -- the report -------------------------------------------------------------------------------------------
@dataclass
class Report:
    """A results directory's records, the table rows built from them, the paper table and, per metric of
    :data:`PER_CLASS_METRICS`, the per-class entries (:func:`per_class_entries`)."""

    selection: Selection
    rows: list[dict[str, Any]]
    table: Table
    per_class: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


def build_report(records: Iterable[dict[str, Any]], n_resamples: int = 10_000, seed: int = 0) -> Report:
    """Records (e.g. ``mqb.results.read_records(dir)``) -> selection, rows, the paper table and the per-class
    entries (bootstrap with ``n_resamples`` resamples, ``seed``, where records lack a ``stats`` section)."""
    # TODO(mqb.results): unreadable / truncated record files are skipped by mqb.results.read_records (not here);
    # a record whose "metrics" or "stats" has the wrong shape is set aside (select_records) or ignored
    # (per_class_entries), never fatal.
    selection = select_records(records)
    rows = table_rows(selection.successes)
    per_class = {m: per_class_entries(rows, m, n_resamples=n_resamples, seed=seed) for m in PER_CLASS_METRICS}
    return Report(selection, rows, paper_table(rows), per_class)


def render(report: Report, fmt: str) -> str:
    """The report as ``md`` (table, footnotes, failed configs), ``tex`` or ``csv``
    (:func:`mqb.analysis.tables.render_report`)."""
    return render_report(report.table, report.rows, fmt, report.selection.errors, len(report.selection.other))


# -- figures ----------------------------------------------------------------------------------------------
def _series_key(row: dict[str, Any]) -> tuple[str, str, str]:
    return row["granularity"], row["method"], row.get("setting") or ""


def _wrap(text: str, width: int) -> str:
    """``text`` broken at ``", "`` / spaces into lines of about ``width`` characters (figure labels)."""
    return textwrap.fill(text, width, break_on_hyphens=False) if len(text) > width else text


def dsc_bar_figure(group: Sequence[dict[str, Any]], title: str) -> Figure | None:
    """DSC bars of one group's rows (:func:`group_key`) by precision, one bar per granularity (and method, and
    distinguishing setting) present at that precision, in one colour per series across precisions; FP32 as a
    dashed line; the legend under the axes (long settings wrapped). ``None`` without quantized rows."""
    fp32 = next((r for r in group if r["precision"] == "fp32" and r["dsc"] is not None), None)
    quant = [r for r in group if r["precision"] != "fp32"]
    if not quant:
        return None
    with_method = len({r["method"] for r in quant}) > 1
    precisions = list(dict.fromkeys(r["precision"] for r in quant))  # rows are in table order
    series = sorted({_series_key(r) for r in quant},
                    key=lambda s: (_rank(tuple(GRANULARITY_NAMES), s[0]), _rank(METHOD_ORDER, s[1]), s[2]))  # fmt: skip
    at = {p: [s for s in series if any((r["precision"], *_series_key(r)) == (p, *s) for r in quant)]
          for p in precisions}  # fmt: skip
    slots = max(len(v) for v in at.values())
    width = 0.8 / slots
    labels = {s: _wrap(series_label({"granularity": s[0], "method": s[1]}, with_method) + (f" [{s[2]}]" if s[2]
                                                                                          else ""), 60)
              for s in series}  # fmt: skip
    longest = max(len(line) for text in labels.values() for line in text.splitlines())
    ncols = min(len(series) + (fp32 is not None), 3 if longest <= 32 else 1)
    legend_width = (0.075 * longest + 0.8) * ncols
    entries = [labels[s].count("\n") + 1 for s in series] + [1] * (fp32 is not None)
    legend_lines = sum(entries) if ncols == 1 else math.ceil(len(entries) / ncols)
    fig = Figure(figsize=(max(5.0, legend_width, 1.0 + (0.6 + 0.35 * slots) * len(precisions)),
                          3.6 + 0.2 * legend_lines), layout="constrained")  # fmt: skip
    ax = fig.subplots()
    colors = {s: f"C{j % 10}" for j, s in enumerate(series)}
    for s in series:
        points = []
        for i, p in enumerate(precisions):
            if s not in at[p]:
                continue
            x = i - width * len(at[p]) / 2 + width * (at[p].index(s) + 0.5)  # centred on the precision's tick
            points += [(x, r["dsc"]) for r in quant if (r["precision"], *_series_key(r)) == (p, *s) and r["dsc"]
                       is not None]  # fmt: skip
        bars = ax.bar([x for x, _ in points], [y for _, y in points], width, label=labels[s], color=colors[s])
        ax.bar_label(bars, fmt="%.2f", fontsize=6, padding=1)
    if fp32 is not None:
        ax.axhline(fp32["dsc"], linestyle="--", color="black", linewidth=1, label=f"FP32 ({fp32['dsc']:.3f})")
    ax.set_xticks(range(len(precisions)), [precision_label(p) for p in precisions])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("DSC")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    fig.legend(loc="outside lower center", ncols=ncols, fontsize="small")
    return fig


def _color_scale(values: Sequence[float]) -> tuple[Normalize, ListedColormap]:
    """A norm and a colour map whose range is the data's ``[min, max]`` with white at 0 (blue below, red above,
    the red-blue map cut to the data's side(s) of 0). Values spanning more than two decades (e.g. W8A8 drops of
    0.3% beside W4A4 drops of 80%) get a symmetric-log scale, linear within 1/100 of the largest magnitude."""
    lo, hi = min(values, default=0.0), max(values, default=0.0)
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if hi - lo == 0:
        hi = 1e-3
    big = max(abs(lo), abs(hi))
    small = [abs(v) for v in values if v != 0]
    if small and big / min(small) > 100:
        norm: Normalize = SymLogNorm(linthresh=big / 100, vmin=lo, vmax=hi, base=10)

        def t(v: float) -> float:
            return float(np.sign(v) * np.log10(1 + abs(v) / (big / 100)))
    else:
        norm = Normalize(vmin=lo, vmax=hi)

        def t(v: float) -> float:
            return float(v)

    span = max(abs(t(lo)), abs(t(hi)))
    base = colormaps["RdBu_r"]
    cmap = ListedColormap(base(np.linspace(0.5 + 0.5 * t(lo) / span, 0.5 + 0.5 * t(hi) / span, 256)))
    return norm, cmap


def _tick_pct(value: float) -> str:
    """Colour-bar labels: ``0%``, ``1%``, ``10%``, ``79.6%``, ``−0.05%`` (3 significant digits, a real minus)."""
    return f"{value:.3g}%".replace("-", "−") if value != 0 else "0%"


def per_class_delta_figure(entries: Sequence[dict[str, Any]], title: str) -> Figure | None:
    """Heat map of one group's per-class ↓Δ% (configs x classes, ``mean`` last; :func:`per_class_entries`):
    cells read the drop in percent (``0.37%``, ``−0.12%``: better than FP32), ``*`` when significant after Holm;
    the colour bar spans the data's range. ``None`` without any ↓Δ% value."""
    entries = [e for e in entries if e["class"] != MEAN]
    if not any(e["drop_pct"] is not None for e in entries):
        return None
    configs = list(dict.fromkeys((e["id"], e["config"]) for e in entries))
    classes = list(dict.fromkeys(e["class"] for e in entries))
    by = {(e["id"], e["class"]): e for e in entries}
    matrix = np.array([[(by.get((i, c)) or {}).get("drop_pct") for c in classes] for i, _ in configs], dtype=float)
    finite = [float(v) for v in matrix.ravel() if np.isfinite(v)]
    norm, cmap = _color_scale(finite)
    row_labels = [_wrap(label, 48) for _, label in configs]  # long settings wrapped: the map keeps its room
    longest = max(len(line) for label in row_labels for line in label.splitlines())
    lines = sum(label.count("\n") + 1 for label in row_labels)
    fig = Figure(figsize=(3.2 + 0.6 * len(classes) + 0.06 * max(longest - 24, 0), 2.2 + 0.3 * len(configs)
                          + 0.13 * (lines - len(configs))), layout="constrained")  # fmt: skip
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap=cmap, norm=norm, aspect="auto")
    ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize="small")
    ax.set_yticks(range(len(configs)), row_labels, fontsize="small")
    marked = False
    if len(classes) * len(configs) <= 300:
        for i, (cid, _) in enumerate(configs):
            for j, c in enumerate(classes):
                v = matrix[i, j]
                if not np.isfinite(v):
                    continue
                star = "*" if by[(cid, c)]["significant"] else ""
                marked |= bool(star)
                r, g, b, _ = cmap(norm(v))
                color = "white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "black"
                ax.text(j, i, f"{format_pct(v, minus='−')}%{star}", ha="center", va="center", fontsize=6,
                        color=color)  # fmt: skip
    metric = entries[0]["metric"].upper()
    formula = f"↓Δ% = 100·({metric}$_{{FP32}}$ − {metric}) / {metric}$_{{FP32}}$"
    ax.set_title(f"Per-class {metric} drop vs FP32: {title}\n{formula}" + ("; * significant after Holm" * marked),
                 fontsize="medium")  # fmt: skip
    bar = fig.colorbar(image, ax=ax, label="↓Δ% (positive: worse)")
    if isinstance(norm, SymLogNorm):  # the data's extremes, 0, and the decades not too close to those
        lo, hi, lin = float(norm.vmin), float(norm.vmax), float(norm.linthresh)
        top = math.floor(math.log10(max(-lo, hi)))
        decades = [sign * 10.0**k for k in range(math.ceil(math.log10(lin)), top + 1) for sign in (1, -1)]
        ticks = {0.0}
        for t in (hi, lo, *decades):
            if lo <= t <= hi and all(abs(float(norm(t)) - float(norm(u))) > 0.12 for u in ticks):
                ticks.add(t)
        bar.set_ticks(sorted(ticks))
        bar.ax.minorticks_off()
    bar.ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _tick_pct(v)))
    return fig


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


def figures(rows: Sequence[dict[str, Any]], per_class: Sequence[dict[str, Any]] | None = None) -> dict[str, Figure]:
    """File name -> figure, per group: ``dsc_<model>_<dataset>.png`` and ``per_class_delta_dsc_<model>_<dataset>.png``
    (``_untrained``, ``_nolabels``, ``_2`` ... appended for the groups marked †, ‡, (2) ... in the table).
    ``per_class``: the DSC entries of :func:`per_class_entries` (computed from ``rows`` when not given)."""
    entries = per_class_entries(rows, "dsc") if per_class is None else per_class
    out = {}
    for key, cell in group_names(rows).items():
        group = [r for r in rows if group_key(r) == key]
        name = f"{_slug(key[0])}_{_slug(cell.replace(UNTRAINED, '_untrained').replace(NO_LABELS, '_nolabels'))}.png"
        bars = dsc_bar_figure(group, f"{key[0]} on {cell}")
        if bars is not None:
            out["dsc_" + name] = bars
        heat = per_class_delta_figure([e for e in entries if (e["model"], e["group"]) == (key[0], cell)],
                                      f"{key[0]} on {cell}")  # fmt: skip
        if heat is not None:
            out["per_class_delta_dsc_" + name] = heat
    return out


def write_report(report: Report, out: str | os.PathLike[str], formats: Iterable[str] = tuple(FORMATS),
                 with_figures: bool = False) -> list[Path]:  # fmt: skip
    """Write ``out/table.{md,tex,csv}``, the per-class tables ``out/per_class_<metric>.{md,tex,csv}`` (per metric
    of :data:`PER_CLASS_METRICS` with values) and, ``with_figures``, the PNG figures, atomically; returns the
    paths written."""
    folder = Path(out)
    paths = []

    def write(path: Path, text: str) -> None:
        with atomic_write(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
        paths.append(path)

    formats = tuple(formats)
    for fmt in formats:
        write(folder / FORMATS[fmt], render(report, fmt))
    for metric, entries in report.per_class.items():
        if entries:
            for fmt in formats:
                write(folder / PER_CLASS_FILES[fmt].format(metric=metric), render_per_class(entries, fmt))
    if with_figures:
        for name, fig in figures(report.rows, report.per_class.get("dsc")).items():
            path = folder / name
            with atomic_write(path) as tmp:
                fig.savefig(tmp, dpi=150)
            paths.append(path)
    return paths
