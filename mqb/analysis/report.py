"""Paper-style tables and figures from the result records of any sweep (MedQuanBench Tables 1-3 and 8-10).

Each step is a function of the previous one's output (only :func:`write_report` touches the disk)::

    records ──select_records──▶ Selection: latest success per id, errors without a success, other kinds
            ──table_rows──────▶ rows: one dict per config (``mqb.sweep.COLUMNS`` + per_class, reference),
                                 in the paper's order, an FP32 row first per model + dataset (group_key)
            ──paper_table─────▶ Table: header, text cells, merged leading columns, footnotes
            ──to_markdown / to_latex──▶ text          rows ──to_csv──▶ text (raw numbers)
    rows    ──dsc_bar_figure / per_class_delta_figure──▶ matplotlib Figures (no pyplot, no display needed)

The writers take a :class:`Table`, not records: a table of another record kind (e.g. the layer-sensitivity
records that :func:`select_records` sets aside in ``Selection.other``) is one more ``rows -> Table`` function.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from mqb.results import atomic_write
from mqb.sweep import COLUMNS, metric_with_delta, summary_rows

#: Table order of the precisions; others follow alphabetically.
PRECISION_ORDER = ("fp32", "w8a8", "w4a8", "w4a4")
#: The paper's granularity names, in table order; others follow alphabetically ("per_group" -> "Per-group").
GRANULARITY_NAMES = {
    "-": "-",
    "per_channel": "Per-channel/token",
    "per_tensor": "Per-tensor",
    "adaptive": "Adaptive stratification",
    "per_voxel": "Per-voxel",
}
METHOD_ORDER = ("-", "rtn")
#: Output formats of :func:`render` / :func:`write_report` and their file names.
FORMATS = {"md": "table.md", "tex": "table.tex", "csv": "table.csv"}

UNTRAINED, NO_LABELS, FROM_BASELINE = "†", "‡", "§"
NOTES = {
    UNTRAINED: f"{UNTRAINED} untrained network (no checkpoint): these numbers test the pipeline, not the model.",
    NO_LABELS: f"{NO_LABELS} no labels: DSC / NSD measure agreement with the FP32 network's predictions.",
    FROM_BASELINE: f"{FROM_BASELINE} FP32 row from the baseline stored in the quantized records "
    "(no matching fp32 record).",
}
SAME_NAME_NOTE = (
    "(2), (3) ...: another FP32 baseline of the same model and dataset (other checkpoint or "
    "evaluation settings); the CSV has the config ids."
)
DELTA_NOTE = "Δ%: relative drop from the FP32 baseline (negative: above FP32)."


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


def group_key(row: dict[str, Any]) -> tuple[str, str, bool, bool, str]:
    """The rows that share one FP32 reference: model, dataset, untrained, scored without labels, baseline key."""
    return (str(row["model"]), str(row["dataset"]), bool(row["untrained"]), row["reference"] != "labels",
            str(row["baseline"].get("key") or ""))  # fmt: skip


def group_names(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str, bool, bool, str], str]:
    """:func:`group_key` -> the group's Dataset cell: the dataset name, † when untrained, ‡ when scored without
    labels, and `` (2)``, `` (3)`` ... for further groups whose model and cell would otherwise read the same."""
    names: dict[tuple[str, str, bool, bool, str], str] = {}
    seen: Counter[tuple[str, str]] = Counter()
    for r in rows:
        key = group_key(r)
        if key not in names:
            name = key[1] + UNTRAINED * key[2] + NO_LABELS * key[3]
            seen[(key[0], name)] += 1
            names[key] = name + (f" ({seen[(key[0], name)]})" if seen[(key[0], name)] > 1 else "")
    return names


def _rank_in_group(row: dict[str, Any]) -> tuple[Any, ...]:
    """Precision / granularity / method in the paper's order."""
    granularity = _rank(tuple(GRANULARITY_NAMES), row["granularity"])
    return _rank(PRECISION_ORDER, row["precision"]), granularity, _rank(METHOD_ORDER, row["method"]), str(row["id"])


def table_rows(successes: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per success record (``mqb.sweep.summary_rows`` plus ``per_class``, ``reference``,
    ``baseline``, ``from_baseline``), in the paper's order. Rows are grouped by :func:`group_key`, so e.g.
    untrained and trained records of a model never share an FP32 row; a group without an fp32 record gets an FP32
    row from the baseline stored in its latest quantized record (``from_baseline: True``, no per-class values)."""
    rows = []
    for record, row in zip(successes, summary_rows(list(successes)), strict=True):
        per_class = record["metrics"].get("per_class") or {}
        rows.append({**row, "per_class": per_class, "reference": record.get("reference", "labels"),
                     "from_baseline": False, "baseline": record.get("baseline") or {}})  # fmt: skip
    has_fp32 = {group_key(r) for r in rows if r["precision"] == "fp32"}
    synthesized: dict[tuple[str, str, bool, bool, str], dict[str, Any]] = {}
    for r in rows:  # successes come oldest first: the latest baseline wins
        base = r["baseline"]
        if group_key(r) not in has_fp32 and base.get("dsc") is not None:
            synthesized[group_key(r)] = {
                "model": r["model"], "dataset": r["dataset"], "precision": "fp32", "granularity": "-", "method": "-",
                "dsc": base.get("dsc"), "dsc_delta_pct": None, "nsd": base.get("nsd"), "nsd_delta_pct": None,
                "hd95": base.get("hd95"), "untrained": r["untrained"], "id": "", "per_class": {},
                "reference": r["reference"], "from_baseline": True, "baseline": base,
            }  # fmt: skip

    def order(row: dict[str, Any]) -> tuple[Any, ...]:  # model, dataset, trained, labelled, with an fp32 record
        key = group_key(row)
        return key[:4], key not in has_fp32, key[4], _rank_in_group(row)

    return sorted(rows + list(synthesized.values()), key=order)


# -- rows -> table ----------------------------------------------------------------------------------------
@dataclass
class Table:
    """Text cells of a table. The first ``merge`` columns are hierarchical labels: a cell equal to the one above
    it (and whose left neighbours are too) is merged with it (blank in Markdown, ``\\multirow`` in LaTeX)."""

    header: tuple[str, ...]
    rows: list[tuple[str, ...]]
    merge: int = 0
    notes: list[str] = field(default_factory=list)
    align: str = ""  # LaTeX column types, "l" per column when empty


def precision_label(name: str) -> str:
    """``w4a8`` -> ``INT W4A8`` (as in the paper), ``fp32`` -> ``FP32``, ``mxfp4`` -> ``MXFP4``."""
    m = re.fullmatch(r"w(\d+)a(\d+)", name)
    return f"INT W{m[1]}A{m[2]}" if m else name.upper()


def granularity_label(name: str) -> str:
    """The paper's name: ``per_channel`` -> ``Per-channel/token``, ``adaptive`` -> ``Adaptive stratification``."""
    return GRANULARITY_NAMES.get(name) or name.replace("_", "-").capitalize()


def metric_cell(value: float | None, delta: float | None, reference: bool = False) -> str:
    """``0.881 (0.3%)`` (``mqb.sweep.metric_with_delta``); the FP32 reference row reads ``0.881 (-)``."""
    if reference and value is not None:
        return f"{value:.3f} (-)"
    return metric_with_delta(value, delta)


def paper_table(rows: Sequence[dict[str, Any]]) -> Table:
    """Architecture / Dataset / Precision / Quant-Granularity [/ Method] / DSC (↓Δ%) / NSD (↓Δ%), as in the
    paper; a Method column only when the quantized rows use more than one method."""
    methods = sorted({r["method"] for r in rows if r["method"] != "-"}, key=lambda m: _rank(METHOD_ORDER, m))
    with_method = len(methods) > 1
    header = ("Architecture", "Dataset", "Precision", "Quant-Granularity", *(("Method",) * with_method),
              "DSC (↓Δ%)", "NSD (↓Δ%)")  # fmt: skip
    names = group_names(rows)
    used = set()
    cells = []
    for r in rows:
        dataset = names[group_key(r)]
        reference = r["precision"] == "fp32"
        precision = precision_label(r["precision"]) + (FROM_BASELINE if r["from_baseline"] else "")
        used.update(dataset + precision)
        cells.append((str(r["model"]), dataset, precision, granularity_label(r["granularity"]),
                      *((str(r["method"]),) * with_method), metric_cell(r["dsc"], r["dsc_delta_pct"], reference),
                      metric_cell(r["nsd"], r["nsd_delta_pct"], reference)))  # fmt: skip
    notes = [NOTES[m] for m in (UNTRAINED, NO_LABELS, FROM_BASELINE) if m in used]
    if any(name.endswith(")") for name in names.values()):
        notes.append(SAME_NAME_NOTE)
    if len(methods) == 1:
        notes.append(f"Quantization method: {methods[0]}.")
    notes.append(DELTA_NOTE)
    return Table(header, cells, merge=3, notes=notes, align="l" * (len(header) - 2) + "cc")


def _merged(table: Table) -> list[int]:
    """Per row, the first column that starts a new group (``merge`` when the merged columns all repeat)."""
    firsts = []
    for i, row in enumerate(table.rows):
        c = 0
        while i > 0 and c < table.merge and row[c] == table.rows[i - 1][c]:
            c += 1
        firsts.append(c)
    return firsts


# -- writers ----------------------------------------------------------------------------------------------
def to_markdown(table: Table) -> str:
    """A Markdown table (repeated labels of the merged columns left blank) followed by its footnotes."""

    def line(cells: Iterable[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    lines = [line(table.header), "|" + "---|" * len(table.header)]
    for row, first in zip(table.rows, _merged(table), strict=True):
        lines.append(line(("" if c < first else cell) for c, cell in enumerate(row)))
    return "\n".join(lines) + "".join(f"\n\n{note}" for note in table.notes) + "\n"


_LATEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
          "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "↓Δ": r"$\downarrow\Delta$",
          "↓": r"$\downarrow$", "Δ": r"$\Delta$", "−": "--", "–": "--", UNTRAINED: r"\textsuperscript{\dag}",
          NO_LABELS: r"\textsuperscript{\ddag}", FROM_BASELINE: r"\textsuperscript{\S}"}  # fmt: skip
_LATEX_RE = re.compile("|".join(re.escape(k) for k in sorted(_LATEX, key=len, reverse=True)))


def latex_escape(text: str) -> str:
    """Escape LaTeX's special characters (``_ & % $ # { } ~ ^ \\``) and map the table's symbols (↓Δ † ‡ §)."""
    return _LATEX_RE.sub(lambda m: _LATEX[m.group()], text)


def to_latex(table: Table, comments: Sequence[str] = ()) -> str:
    """A booktabs ``tabular``: ``\\multirow`` for the merged columns, ``\\midrule`` between groups of the first
    column, ``\\cmidrule`` between groups of the inner merged columns but the last; footnotes under the rule;
    ``comments`` (e.g. failed configs) as ``%`` lines after it. Needs ``\\usepackage{booktabs,multirow}``."""
    n = len(table.header)
    firsts = _merged(table)
    out = [r"% \usepackage{booktabs,multirow}", rf"\begin{{tabular}}{{{table.align or 'l' * n}}}", r"\toprule",
           " & ".join(latex_escape(h) for h in table.header) + r" \\", r"\midrule"]  # fmt: skip
    for i, (row, first) in enumerate(zip(table.rows, firsts, strict=True)):
        if i > 0 and first == 0:
            out.append(r"\midrule")
        elif i > 0 and first < table.merge - 1:
            out.append(rf"\cmidrule(l){{{first + 1}-{n}}}")
        cells = []
        for c, cell in enumerate(row):
            if c >= table.merge:
                cells.append(latex_escape(cell))
            elif c < first:
                cells.append("")
            else:  # a new group in column c: it spans the following rows that do not start a group at <= c
                span = 1
                while i + span < len(table.rows) and firsts[i + span] > c:
                    span += 1
                cells.append(rf"\multirow{{{span}}}{{*}}{{{latex_escape(cell)}}}" if span > 1 else latex_escape(cell))
        out.append(" & ".join(cells) + r" \\")
    out.append(r"\bottomrule")
    out += [rf"\multicolumn{{{n}}}{{l}}{{\footnotesize {latex_escape(note)}}} \\" for note in table.notes]
    out.append(r"\end{tabular}")
    out += ["% " + " ".join(c.split()) for c in comments]
    return "\n".join(out) + "\n"


def to_csv(rows: Sequence[dict[str, Any]]) -> str:
    """Raw numbers in table order, with the columns of ``mqb.sweep summary`` (``mqb.sweep.COLUMNS``)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def failure_lines(errors: Sequence[dict[str, Any]]) -> list[str]:
    """``<id>: model / dataset / precision / granularity / method: <first line of the error>`` per failed config."""
    lines = []
    for e in sorted(errors, key=lambda e: (str(e.get("model")), str(e.get("dataset")), str(e.get("id")))):
        what = " / ".join(str(e.get(k, "?")) for k in ("model", "dataset", "precision", "granularity", "method"))
        error = (str(e.get("error") or "unknown error").strip().splitlines() or ["unknown error"])[0][:300]
        lines.append(f"{e['id']}: {what}: {error}")
    return lines


# -- the report -------------------------------------------------------------------------------------------
@dataclass
class Report:
    """A results directory's records, the table rows built from them and the paper table."""

    selection: Selection
    rows: list[dict[str, Any]]
    table: Table


def build_report(records: Iterable[dict[str, Any]]) -> Report:
    """Records (e.g. ``mqb.results.read_records(dir)``) -> selection, rows and the paper table."""
    selection = select_records(records)
    rows = table_rows(selection.successes)
    return Report(selection, rows, paper_table(rows))


def render(report: Report, fmt: str) -> str:
    """The report as ``md`` (table, footnotes, failed configs), ``tex`` or ``csv``."""
    failures = failure_lines(report.selection.errors)
    if fmt == "md":
        text = to_markdown(report.table)
        if failures:
            text += f"\n**{len(failures)} failed config(s), not in the table:**\n\n"
            text += "".join(f"- {line}\n" for line in failures)
        if report.selection.other:
            text += f"\n{len(report.selection.other)} record(s) of other kinds (e.g. sensitivity) not tabulated.\n"
        return text
    if fmt == "tex":
        return to_latex(report.table, [f"failed, not in the table: {line}" for line in failures])
    if fmt == "csv":
        return to_csv(report.rows)
    raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")


# -- figures ----------------------------------------------------------------------------------------------
def _series_label(row: dict[str, Any], with_method: bool) -> str:
    label = granularity_label(row["granularity"])
    return f"{label} ({row['method']})" if with_method and row["method"] != "-" else label


def dsc_bar_figure(group: Sequence[dict[str, Any]], title: str) -> Figure | None:
    """DSC bars of one group's rows (:func:`group_key`) by precision, one bar per granularity (and method), FP32
    as a dashed line; ``None`` without quantized rows."""
    fp32 = next((r for r in group if r["precision"] == "fp32" and r["dsc"] is not None), None)
    quant = [r for r in group if r["precision"] != "fp32"]
    if not quant:
        return None
    with_method = len({r["method"] for r in quant}) > 1
    precisions = list(dict.fromkeys(r["precision"] for r in quant))  # rows are in table order
    series = sorted({(r["granularity"], r["method"]) for r in quant},
                    key=lambda s: (_rank(tuple(GRANULARITY_NAMES), s[0]), _rank(METHOD_ORDER, s[1])))  # fmt: skip
    width = 0.8 / len(series)
    fig = Figure(figsize=(max(5.0, 1.0 + (0.6 + 0.35 * len(series)) * len(precisions)), 4.2), layout="constrained")
    ax = fig.subplots()
    for j, s in enumerate(series):
        points = [(i - 0.4 + width * (j + 0.5), r["dsc"]) for i, p in enumerate(precisions) for r in quant
                  if (r["precision"], r["granularity"], r["method"]) == (p, *s) and r["dsc"] is not None]  # fmt: skip
        label = _series_label({"granularity": s[0], "method": s[1]}, with_method)
        bars = ax.bar([x for x, _ in points], [y for _, y in points], width, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=6, padding=1)
    if fp32 is not None:
        ax.axhline(fp32["dsc"], linestyle="--", color="black", linewidth=1, label=f"FP32 ({fp32['dsc']:.3f})")
    ax.set_xticks(range(len(precisions)), [precision_label(p) for p in precisions])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("DSC")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    fig.legend(loc="outside lower center", ncols=min(len(series) + (fp32 is not None), 3), fontsize="small")
    return fig


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) else math.nan


def per_class_delta_figure(group: Sequence[dict[str, Any]], title: str) -> Figure | None:
    """Heat map of one group's per-class DSC drop ``DSC_fp32 - DSC_quantized`` (configs x classes); ``None``
    without an fp32 record holding per-class values or without quantized rows holding them."""
    fp32 = next((r for r in group if r["precision"] == "fp32" and r["per_class"]), None)
    quant = [r for r in group if r["precision"] != "fp32" and r["per_class"]]
    if fp32 is None or not quant:
        return None
    classes = list(fp32["per_class"])
    base = [_number((fp32["per_class"][c] or {}).get("dsc")) for c in classes]
    matrix = [[b - _number((r["per_class"].get(c) or {}).get("dsc")) for c, b in zip(classes, base, strict=True)]
              for r in quant]  # fmt: skip
    finite = [abs(v) for line in matrix for v in line if math.isfinite(v)]
    vmax = max(finite, default=0.0) or 1e-3
    with_method = len({r["method"] for r in quant}) > 1
    labels = [f"{precision_label(r['precision'])} {_series_label(r, with_method)}" for r in quant]
    fig = Figure(figsize=(3.0 + 0.35 * len(classes), 1.6 + 0.32 * len(quant)), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(matrix, cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize="small")
    ax.set_yticks(range(len(quant)), labels, fontsize="small")
    if len(classes) * len(quant) <= 300:
        for i, line in enumerate(matrix):
            for j, v in enumerate(line):
                if math.isfinite(v):
                    color = "white" if abs(v) > 0.6 * vmax else "black"
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color=color)
    ax.set_title(f"Per-class DSC drop vs FP32: {title}")
    fig.colorbar(image, ax=ax, label="DSC$_{FP32}$ − DSC")
    return fig


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


def figures(rows: Sequence[dict[str, Any]]) -> dict[str, Figure]:
    """File name -> figure, per group: ``dsc_<model>_<dataset>.png`` and ``per_class_delta_dsc_<model>_<dataset>.png``
    (``_untrained``, ``_nolabels``, ``_2`` ... appended for the groups marked †, ‡, (2) ... in the table)."""
    out = {}
    for key, cell in group_names(rows).items():
        group = [r for r in rows if group_key(r) == key]
        name = f"{_slug(key[0])}_{_slug(cell.replace(UNTRAINED, '_untrained').replace(NO_LABELS, '_nolabels'))}.png"
        for prefix, make in (("dsc_", dsc_bar_figure), ("per_class_delta_dsc_", per_class_delta_figure)):
            fig = make(group, f"{key[0]} on {cell}")
            if fig is not None:
                out[prefix + name] = fig
    return out


def write_report(report: Report, out: str | os.PathLike[str], formats: Iterable[str] = tuple(FORMATS),
                 with_figures: bool = False) -> list[Path]:  # fmt: skip
    """Write ``out/table.{md,tex,csv}`` (and the PNG figures) atomically; returns the paths written."""
    folder = Path(out)
    paths = []
    for fmt in formats:
        text = render(report, fmt)
        path = folder / FORMATS[fmt]
        with atomic_write(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
        paths.append(path)
    if with_figures:
        for name, fig in figures(report.rows).items():
            path = folder / name
            with atomic_write(path) as tmp:
                fig.savefig(tmp, dpi=150)
            paths.append(path)
    return paths
