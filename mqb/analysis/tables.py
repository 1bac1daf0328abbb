"""Every table mqb prints or writes is laid out and rendered here, from records (``mqb.results``) or the rows built
from them to text: Markdown, booktabs LaTeX, CSV and rich console tables.

* cells and labels: :func:`metric_with_delta` (``0.881 (0.3% [0.1, 0.5]*)``, the paper's DSC (↓Δ%) cell with the
  drop's 95 % interval and significance mark), :func:`drop_ci` / :func:`row_ci`, :func:`format_pct`,
  :func:`precision_label` / :func:`granularity_label` / :func:`config_label` (the paper's names) and the groups of
  rows that share one FP32 reference (:func:`group_key`, :func:`group_names`: the Dataset cell, † ‡ (2));
* the results table of ``mqb.eval`` and its sweeps (:func:`results_table`, rich) and the sweep summary
  (:func:`summary_rows`, :func:`write_summary`: CSV + Markdown);
* the paper's tables of ``python -m mqb.report`` (:func:`paper_table`, :func:`per_class_tables`: a :class:`Table`
  of text cells with merged label columns and footnotes; :func:`to_markdown`, :func:`to_latex`,
  :func:`render_report`, :func:`render_per_class`); the rows, statistics and figures are
  :mod:`mqb.analysis.report`'s, which calls these;
* the steps of a sensitivity study (:func:`steps_table`, :func:`steps_markdown`);
* the side-by-side deployment table of ``mqb.deploy`` (:func:`deploy_markdown`);
* the per-layer and per-group summaries of a quantized model (:func:`layer_summary_table`,
  :func:`group_summary_table`: ``mqb.quant.summary``);
* plain aligned text, Markdown and CSV tables (:func:`text_table`, :func:`markdown_table`, :func:`csv_text`).

This module imports no torch (nor SciPy or matplotlib), so ``mqb.sweep status`` / ``summary`` stay quick; it
imports no other mqb module at import time.
"""

from __future__ import annotations

import csv
import io
import math
import re
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table as RichTable

#: The console every mqb command prints its tables to (wide enough for the paper's columns when piped).
console = Console(width=None if sys.stdout.isatty() else 160)

#: Columns of ``summary.csv`` (and the W&B sweep table).
COLUMNS = ("model", "dataset", "precision", "granularity", "method", "dsc", "dsc_delta_pct", "dsc_drop_ci_low",
           "dsc_drop_ci_high", "dsc_p_holm", "dsc_significant", "dsc_cases", "nsd", "nsd_delta_pct", "nsd_drop_ci_low",
           "nsd_drop_ci_high", "nsd_p_holm", "nsd_significant", "nsd_cases", "hd95", "untrained", "id",
           "calibration_draws", "dsc_calibration_std", "nsd_calibration_std")  # fmt: skip

#: Columns of the W&B sweep table (``mqb.loggers.log_sweep_table``): :data:`COLUMNS` plus, per metric, the
#: uncorrected p-value of the paired test (``<metric>_p``, next to the Holm-adjusted one) and the test used
#: (``<metric>_test``: ``permutation-exact``, ``wilcoxon`` ...).
SWEEP_TABLE_COLUMNS = tuple(
    name
    for col in COLUMNS
    for name in (f"{col[: -len('_holm')]}" if col.endswith("_p_holm") else None, col,
                 f"{col[: -len('_significant')]}_test" if col.endswith("_significant") else None)
    if name is not None
)  # fmt: skip

#: The legend printed under a table whose cells carry intervals.
DELTA_LEGEND = "↓Δ% [95% CI]: drop from FP32 over the test cases; * significant after Holm across the sweep"

#: The paper's granularity names, in table order; others follow alphabetically ("per_group" -> "Per-group").
GRANULARITY_NAMES = {
    "-": "-",
    "per_channel": "Per-channel/token",
    "per_tensor": "Per-tensor",
    "adaptive": "Adaptive stratification",
    "per_voxel": "Per-voxel",
}
#: Marks of the Dataset and Precision cells: untrained network, scored without labels, FP32 row from a baseline.
UNTRAINED, NO_LABELS, FROM_BASELINE = "†", "‡", "§"
#: The class key of the mean over classes in the per-class entries and tables.
MEAN = "mean"


# -- cells --------------------------------------------------------------------------------------------------
def metric_with_delta(
    value: float | None, delta: float | None, ci: dict[str, Any] | None = None, reference: bool = False,
    reference_note: str = "ref.",
) -> str:  # fmt: skip
    """``0.881 (0.3%)`` as in the paper's tables; with ``ci`` (:func:`drop_ci`, :func:`row_ci`) the 95 % interval of
    the drop and a ``*`` where it is significant: ``0.881 (0.3% [0.1, 0.5]*)``; ``0.884 (ref.)`` for the FP32
    reference row (``reference``; the paper table writes ``reference_note="-"``: ``0.884 (-)``); ``-`` when the
    metric is undefined."""
    if value is None:
        return "-"
    if delta is not None and round(delta, 1) == 0:
        delta = 0.0  # "0.0%", never "-0.0%"
    if reference:
        return f"{value:.3f} ({reference_note})"
    if delta is None:
        return f"{value:.3f}"
    if ci is not None and ci.get("n") is not None and ci["n"] < 2:  # one case: no interval, no test
        return f"{value:.3f} ({delta:.1f}%, {ci['n']} case)"
    if ci is None or ci.get("low") is None or ci.get("high") is None:
        return f"{value:.3f} ({delta:.1f}%)"
    mark = "*" if ci.get("significant") else ""
    return f"{value:.3f} ({delta:.1f}% [{ci['low']:.1f}, {ci['high']:.1f}]{mark})"


def drop_ci(record: dict[str, Any], metric: str) -> dict[str, Any] | None:
    """The record's 95 % interval of the mean drop (in %, as ``delta_pct``) and its significance (after Holm when
    the record went through :func:`mqb.analysis.stats.with_holm`), from its ``stats`` section; ``None`` without
    one."""
    entry = ((record.get("stats") or {}).get(metric) or {}).get("mean")
    if not isinstance(entry, dict):
        return None
    return {"low": entry.get("drop_pct_ci_low"), "high": entry.get("drop_pct_ci_high"), "p": entry.get("p"),
            "p_holm": entry.get("p_holm"), "significant": entry.get("significant"), "n": entry.get("n"),
            "test": entry.get("test")}  # fmt: skip


def row_ci(row: dict[str, Any], metric: str) -> dict[str, Any] | None:
    """A row's interval of the mean drop of ``metric`` and its significance after Holm (columns
    ``<metric>_drop_ci_low`` ... of :func:`summary_rows`), ``None`` when the record had no ``stats``."""
    if row.get(f"{metric}_drop_ci_low") is None and row.get(f"{metric}_cases") is None:
        return None
    return {"low": row.get(f"{metric}_drop_ci_low"), "high": row.get(f"{metric}_drop_ci_high"),
            "significant": row.get(f"{metric}_significant"), "n": row.get(f"{metric}_cases")}  # fmt: skip


def calibration_note(record: dict[str, Any]) -> str:
    """``DSC ±0.004 over 3 calibration draws`` (sample standard deviation of the mean DSC) where the record was
    computed with ``calibration.draws`` > 1, else ``""``."""
    spread = ((record.get("stats") or {}).get("calibration") or {}).get("dsc") or {}
    if spread.get("std") is None:
        return ""
    return f"DSC ±{spread['std']:.3f} over {spread['n_draws']} calibration draws"


def reference_first(record: dict[str, Any]) -> tuple:
    """Sort key: by model and dataset, the FP32 reference first, then the rest in their given order."""
    return (record.get("model", ""), record.get("dataset", ""), record.get("precision") != "fp32")


def format_pct(value: float | None, minus: str = "-") -> str:
    """A percentage with sensible precision: 2 decimals below 1 (``0.37``), 1 below 100 (``5.2``), none above
    (``100``); never ``-0.00`` (a value that rounds to zero reads ``0.00``). ``minus``: e.g. ``"−"`` in figures."""
    if value is None or not math.isfinite(value):
        return "-"
    digits = 2 if abs(value) < 1 else 1 if abs(value) < 100 else 0
    text = f"{abs(value):.{digits}f}"
    return (minus if value < 0 and float(text) != 0 else "") + text


def _pct_with_ci(e: dict[str, Any]) -> str:
    if e["drop_pct"] is None:
        return ""
    text = f"{format_pct(e['drop_pct'])}%"
    if e["drop_pct_ci_low"] is not None and e["drop_pct_ci_high"] is not None:
        text += f" [{format_pct(e['drop_pct_ci_low'])}, {format_pct(e['drop_pct_ci_high'])}]"
    return text


def per_class_cell(e: dict[str, Any]) -> str:
    """``0.875 (0.70% [0.21, 1.3])*``: the quantized value of a per-class entry
    (:func:`mqb.analysis.report.per_class_entries`), ↓Δ% with its CI, ``*`` when significant after Holm."""
    value = "-" if e["value"] is None else f"{e['value']:.3f}"
    pct = _pct_with_ci(e)
    return value + (f" ({pct})" if pct else "") + ("*" if e["significant"] else "")


# -- labels and groups ----------------------------------------------------------------------------------------
def precision_label(name: str) -> str:
    """``w4a8`` -> ``INT W4A8`` (as in the paper), ``fp32`` -> ``FP32``, ``mxfp4`` -> ``MXFP4``."""
    m = re.fullmatch(r"w(\d+)a(\d+)", name)
    return f"INT W{m[1]}A{m[2]}" if m else name.upper()


def granularity_label(name: str) -> str:
    """The paper's name: ``per_channel`` -> ``Per-channel/token``, ``adaptive`` -> ``Adaptive stratification``."""
    return GRANULARITY_NAMES.get(name) or name.replace("_", "-").capitalize()


def series_label(row: dict[str, Any], with_method: bool) -> str:
    """A row's granularity label, with its method in parentheses when ``with_method`` (a bar series' legend)."""
    label = granularity_label(row["granularity"])
    return f"{label} ({row['method']})" if with_method and row["method"] != "-" else label


def config_label(row: dict[str, Any], with_method: bool) -> str:
    """``INT W4A4 Per-tensor (rtn) [method.exclude=[linear]]``: precision, :func:`series_label` and the row's
    distinguishing setting (a per-class column, an overlay panel)."""
    setting = row.get("setting") or ""
    return f"{precision_label(row['precision'])} {series_label(row, with_method)}" + (f" [{setting}]" * bool(setting))


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


# -- primitives -----------------------------------------------------------------------------------------------
def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table (``|`` in cells escaped); floats with 3 significant digits."""

    def cell(value: Any) -> str:
        text = f"{value:.3g}" if isinstance(value, float) else str(value)
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def text_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Columns aligned with spaces under a dashed rule (terminal output without rich markup)."""
    cells = [[str(c) for c in header], *([str(c) for c in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()

    return "\n".join([line(cells[0]), line(["-" * w for w in widths]), *(line(r) for r in cells[1:])])


def csv_text(rows: Iterable[dict[str, Any]], columns: Sequence[str], lineterminator: str = "\n") -> str:
    """CSV of dict rows: a header of ``columns`` and, per row, its values of those columns (other keys left out)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator=lineterminator)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


# -- the paper's tables (python -m mqb.report) ----------------------------------------------------------------
#: Output formats of :func:`render_report` / :func:`mqb.analysis.report.write_report` and their file names.
FORMATS = {"md": "table.md", "tex": "table.tex", "csv": "table.csv"}
#: File names of the per-class tables per format (``per_class_dsc.md`` ...).
PER_CLASS_FILES = {"md": "per_class_{metric}.md", "tex": "per_class_{metric}.tex", "csv": "per_class_{metric}.csv"}
#: Columns of the per-class CSV (one line per group x quantized config x class, ``class == "mean"`` last).
PER_CLASS_COLUMNS = ("model", "dataset", "group", "id", "precision", "granularity", "method", "config", "class",
                     "metric", "n_cases", "fp32", "value", "drop_pct", "drop_pct_ci_low", "drop_pct_ci_high",
                     "p", "p_holm", "significant", "test", "source")  # fmt: skip

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
CI_NOTE = (
    "[95% CI]: bootstrap interval of the drop over the test cases; * the paired test across cases is "
    "significant at 0.05 after Holm's correction across the configs of this report (mqb.analysis.stats)."
)
SETTING_NOTE = "Setting: the config keys in which rows with the same label differ."


@dataclass
class Table:
    """Text cells of a table. The first ``merge`` columns are hierarchical labels: a cell equal to the one above
    it (and whose left neighbours are too) is merged with it (blank in Markdown, ``\\multirow`` in LaTeX)."""

    header: tuple[str, ...]
    rows: list[tuple[str, ...]]
    merge: int = 0
    notes: list[str] = field(default_factory=list)
    align: str = ""  # LaTeX column types, "l" per column when empty
    rule_before: tuple[int, ...] = ()  # rows preceded by a LaTeX \midrule (besides those of the merged columns)


def paper_table(rows: Sequence[dict[str, Any]]) -> Table:
    """Architecture / Dataset / Precision / Quant-Granularity [/ Method] [/ Setting] / DSC (↓Δ%) / NSD (↓Δ%), as
    in the paper, from the rows of :func:`mqb.analysis.report.table_rows` (in their order); a Method column only
    when the quantized rows use more than one method, a Setting column only when rows share a label and differ in
    other config keys (``row["setting"]``). Cells carry the drop's 95 % interval and a ``*`` when significant after
    Holm where the records have ``stats``; the FP32 reference reads ``0.884 (-)``."""
    methods = sorted({r["method"] for r in rows if r["method"] != "-"})
    with_method = len(methods) > 1
    with_setting = any(r.get("setting") for r in rows)
    with_ci = any(row_ci(r, m) is not None for r in rows for m in ("dsc", "nsd"))
    delta = "↓Δ% [95% CI]" if with_ci else "↓Δ%"
    header = ("Architecture", "Dataset", "Precision", "Quant-Granularity", *(("Method",) * with_method),
              *(("Setting",) * with_setting), f"DSC ({delta})", f"NSD ({delta})")  # fmt: skip
    names = group_names(rows)
    used = set()
    cells = []
    for r in rows:
        dataset = names[group_key(r)]
        reference = r["precision"] == "fp32"
        precision = precision_label(r["precision"]) + (FROM_BASELINE if r["from_baseline"] else "")
        used.update(dataset + precision)
        metric_cells = (metric_with_delta(r[m], r[f"{m}_delta_pct"], row_ci(r, m), reference=reference,
                                          reference_note="-") for m in ("dsc", "nsd"))  # fmt: skip
        cells.append((str(r["model"]), dataset, precision, granularity_label(r["granularity"]),
                      *((str(r["method"]),) * with_method), *((r.get("setting") or "",) * with_setting),
                      *metric_cells))  # fmt: skip
    notes = [NOTES[m] for m in (UNTRAINED, NO_LABELS, FROM_BASELINE) if m in used]
    if any(name.endswith(")") for name in names.values()):
        notes.append(SAME_NAME_NOTE)
    if len(methods) == 1:
        notes.append(f"Quantization method: {methods[0]}.")
    notes.append(DELTA_NOTE)
    if with_ci:
        notes.append(CI_NOTE)
    if with_setting:
        notes.append(SETTING_NOTE)
    return Table(header, cells, merge=3, notes=notes, align="l" * (len(header) - 2) + "cc")


def group_starts(table: Table) -> list[int]:
    """Per row, the first column that starts a new group (``merge`` when the merged columns all repeat)."""
    firsts = []
    for i, row in enumerate(table.rows):
        c = 0
        while i > 0 and c < table.merge and row[c] == table.rows[i - 1][c]:
            c += 1
        firsts.append(c)
    return firsts


def to_markdown(table: Table) -> str:
    """A Markdown table (:func:`markdown_table`; repeated labels of the merged columns left blank) followed by its
    footnotes."""
    rows = [["" if c < first else cell for c, cell in enumerate(row)]
            for row, first in zip(table.rows, group_starts(table), strict=True)]  # fmt: skip
    return markdown_table(table.header, rows).removesuffix("\n") + "".join(f"\n\n{n}" for n in table.notes) + "\n"


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
    firsts = group_starts(table)
    out = [r"% \usepackage{booktabs,multirow}", rf"\begin{{tabular}}{{{table.align or 'l' * n}}}", r"\toprule",
           " & ".join(latex_escape(h) for h in table.header) + r" \\", r"\midrule"]  # fmt: skip
    for i, (row, first) in enumerate(zip(table.rows, firsts, strict=True)):
        if i > 0 and ((first == 0 and table.merge > 0) or i in table.rule_before):
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


def failure_lines(errors: Sequence[dict[str, Any]]) -> list[str]:
    """``<id>: model / dataset / precision / granularity / method: <first line of the error>`` per failed config."""
    lines = []
    for e in sorted(errors, key=lambda e: (str(e.get("model")), str(e.get("dataset")), str(e.get("id")))):
        what = " / ".join(str(e.get(k, "?")) for k in ("model", "dataset", "precision", "granularity", "method"))
        error = (str(e.get("error") or "unknown error").strip().splitlines() or ["unknown error"])[0][:300]
        lines.append(f"{e['id']}: {what}: {error}")
    return lines


def render_report(table: Table, rows: Sequence[dict[str, Any]], fmt: str, errors: Sequence[dict[str, Any]] = (),
                  n_other: int = 0) -> str:  # fmt: skip
    """The paper table as ``md`` (the table, its footnotes, the failed configs of ``errors`` and how many records
    of other kinds were not tabulated), ``tex`` (failed configs as ``%`` comments) or ``csv`` (``rows``' raw
    numbers in table order, the columns of ``summary.csv``: :data:`COLUMNS`)."""
    failures = failure_lines(errors)
    if fmt == "md":
        text = to_markdown(table)
        if failures:
            text += f"\n**{len(failures)} failed config(s), not in the table:**\n\n"
            text += "".join(f"- {line}\n" for line in failures)
        if n_other:
            text += f"\n{n_other} record(s) of other kinds (e.g. sensitivity) not tabulated.\n"
        return text
    if fmt == "tex":
        return to_latex(table, [f"failed, not in the table: {line}" for line in failures])
    if fmt == "csv":
        return csv_text(rows, COLUMNS)
    raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")


def per_class_tables(entries: Sequence[dict[str, Any]], alpha: float = 0.05) -> dict[tuple[str, str], Table]:
    """``(model, group cell) -> Table`` from the entries of :func:`mqb.analysis.report.per_class_entries`: classes
    (and ``Mean``) x configs, the FP32 column first; cells :func:`per_class_cell`; footnotes on the convention, the
    interval, the test and what could not be computed."""
    from mqb.analysis.stats import FEW_CASES  # numpy: not needed by the sweep readers of this module

    tables = {}
    for model, cell in dict.fromkeys((e["model"], e["group"]) for e in entries):
        group = [e for e in entries if (e["model"], e["group"]) == (model, cell)]
        configs = list(dict.fromkeys((e["id"], e["config"]) for e in group))
        classes = list(dict.fromkeys(e["class"] for e in group))
        by = {(e["id"], e["class"]): e for e in group}
        body = []
        for c in classes:
            fp32 = next((by[(i, c)]["fp32"] for i, _ in configs if by.get((i, c)) and by[(i, c)]["fp32"] is not None),
                        None)  # fmt: skip
            body.append(("Mean" if c == MEAN else c, "-" if fp32 is None else f"{fp32:.3f}",
                         *(per_class_cell(by[(i, c)]) if (i, c) in by else "-" for i, _ in configs)))  # fmt: skip
        metric = group[0]["metric"].upper()
        notes = [f"{metric} per class: quantized value (↓Δ% [CI]); ↓Δ% = 100 (FP32 - quantized) / FP32, "
                 "positive: worse than FP32."]  # fmt: skip
        sources = Counter(e["source"] for e in group)
        if sources["stats"] or sources["per_case"]:
            ns = sorted({e["n_cases"] for e in group if e["n_cases"]})
            n_text = f"{ns[0]}" if len(ns) == 1 else f"{ns[0]}-{ns[-1]}"
            notes.append(f"[CI]: 95% bootstrap interval over the {n_text} test cases (paired per-case differences); "
                         f"* significant at α = {alpha:g} after Holm's correction across the {len(configs)} "
                         "configs of this table (exact sign-flip permutation test up to 12 cases, Wilcoxon "
                         "signed-rank above).")  # fmt: skip
            if ns and ns[-1] < FEW_CASES:
                notes.append(f"Only {n_text} test cases: the intervals are too narrow (they undercover) and the "
                             "test decides.")  # fmt: skip
            floors = [e["min_p"] for e in group if e["min_p"] is not None]
            if floors and min(floors) >= alpha:
                notes.append(f"With {n_text} test cases no difference can be significant at α = {alpha:g} "
                             f"(smallest attainable p = {min(floors):.3g}).")  # fmt: skip
            notes.append("Mean: per case the mean over the classes present in both, then the mean over cases.")
        if sources["per_class"]:
            notes.append("Cells without [CI]: no per-case values (or no FP32 record) for them; ↓Δ% from class means.")
        tables[(model, cell)] = Table(("Class", "FP32", *(label for _, label in configs)), body, merge=0,
                                      notes=notes, align="l" + "c" * (len(configs) + 1),
                                      rule_before=(classes.index(MEAN),) if MEAN in classes else ())  # fmt: skip
    return tables


def render_per_class(entries: Sequence[dict[str, Any]], fmt: str) -> str:
    """The per-class tables of one metric as ``md`` (a heading per group), ``tex`` (a tabular per group) or
    ``csv`` (long format, raw numbers: one line per group x quantized config x class, :data:`PER_CLASS_COLUMNS`)."""
    if fmt == "csv":
        return csv_text(entries, PER_CLASS_COLUMNS)
    tables = per_class_tables(entries)
    metric = entries[0]["metric"].upper() if entries else ""
    if fmt == "md":
        return "\n".join(f"### {model} on {cell}: per-class {metric}\n\n{to_markdown(t)}"
                         for (model, cell), t in tables.items())  # fmt: skip
    if fmt == "tex":
        return "\n".join(f"% {model} on {cell}: per-class {metric}\n{to_latex(t)}"
                         for (model, cell), t in tables.items())  # fmt: skip
    raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(PER_CLASS_FILES)}")


# -- mqb.quant.summary ----------------------------------------------------------------------------------------
#: Columns of the per-layer summary of a quantized model (keys of ``LayerRow.as_record``).
LAYER_SUMMARY_COLUMNS = ("name", "type", "kernel", "weight", "activation", "realizability")


def layer_summary_table(records: Sequence[dict[str, Any]]) -> str:
    """One line per layer (:data:`LAYER_SUMMARY_COLUMNS` of ``mqb.quant.summary.QuantSummary.records``), as text."""
    keys = list(LAYER_SUMMARY_COLUMNS)
    return text_table(keys, [[str(rec[k]) for k in keys] for rec in records])


def group_summary_table(groups: dict[str, dict[str, Any]]) -> str:
    """One line per layer group (``QuantSummary.groups``: layer count, the W / A specs used, realizability counts),
    as text."""
    rows = []
    for group, g in groups.items():
        status = ", ".join(f"{s}: {n}" for s, n in sorted(g["status"].items()))
        rows.append([group, str(g["layers"]), " | ".join(sorted(g["weight"])), " | ".join(sorted(g["activation"])),
                     status])  # fmt: skip
    return text_table(["group", "layers", "weight", "activation", "realizability"], rows)


# -- mqb.eval and sweeps --------------------------------------------------------------------------------------
def results_table(records: list[dict[str, Any]], title: str = "mqb results") -> RichTable:
    """A rich table in the paper's format: DSC (↓Δ%) / NSD (↓Δ%) per model, precision, granularity."""
    table = RichTable(title=title)
    for col in ("model", "dataset", "precision", "granularity", "method", "DSC (↓Δ%)", "NSD (↓Δ%)", "HD95 mm", "note"):
        table.add_column(col)
    for r in records:
        labels = [str(r.get(k, "?")) for k in ("model", "dataset", "precision", "granularity", "method")]
        if r.get("status") != "success":
            table.add_row(*labels, "-", "-", "-", f"[red]FAILED: {r.get('error', '')[:60]}")
            continue
        m, d = r["metrics"], r["delta_pct"]
        hd = f"{m['hd95']:.1f}" if m.get("hd95") is not None else "-"
        reference = r["precision"] == "fp32"
        cells = (metric_with_delta(m[k], d[k], drop_ci(r, k), reference=reference) for k in ("dsc", "nsd"))
        table.add_row(*labels, *cells, hd, " ".join(filter(None, ["[red]UNTRAINED" if r.get("untrained") else "",
                                                                  calibration_note(r)])))
    return table


def status_table(rows: list[dict[str, Any]], title: str) -> RichTable:
    """``mqb.sweep status``: one line per config of a sweep (done / failed / running / missing), coloured."""
    table = RichTable(title=title)
    for col in ("status", "id", "model", "precision", "granularity", "method", "error"):
        table.add_column(col)
    colors = {"done": "green", "failed": "red", "running": "cyan", "missing": "yellow"}
    for r in rows:
        table.add_row(f"[{colors[r['status']]}]{r['status']}", str(r["id"]), str(r["model"]), str(r["precision"]),
                      str(r["granularity"]), str(r["method"]), str(r["error"])[:200])  # fmt: skip
    return table


def summary_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Flat rows (one per successful config, in the given order) in the paper's table format, with the drop's 95 %
    interval, the paired test's p-value (``<metric>_p``) and test, and its Holm-adjusted p across these configs
    (the keys of :data:`SWEEP_TABLE_COLUMNS`; ``summary.csv`` keeps :data:`COLUMNS`)."""
    from mqb.analysis.stats import with_holm

    ok = [r for r in records if r.get("status") == "success" and isinstance(r.get("metrics"), dict)]
    rows = []
    for r in with_holm(ok):  # error records and other kinds (sensitivity studies) left out
        m, d = r["metrics"], r.get("delta_pct") or {}
        row = {"model": r["model"], "dataset": r["dataset"], "precision": r["precision"],
               "granularity": r["granularity"], "method": r["method"], "hd95": m.get("hd95"),
               "untrained": r.get("untrained"), "id": r["id"]}  # fmt: skip
        spread = (r.get("stats") or {}).get("calibration") or {}
        row["calibration_draws"] = (spread.get("dsc") or {}).get("n_draws")
        for metric in ("dsc", "nsd"):
            row[f"{metric}_calibration_std"] = (spread.get(metric) or {}).get("std")
            ci = drop_ci(r, metric) or {}
            row.update({metric: m.get(metric), f"{metric}_delta_pct": d.get(metric),
                        f"{metric}_drop_ci_low": ci.get("low"), f"{metric}_drop_ci_high": ci.get("high"),
                        f"{metric}_p_holm": ci.get("p_holm"), f"{metric}_cases": ci.get("n"),
                        f"{metric}_significant": ci.get("significant"), f"{metric}_p": ci.get("p"),
                        f"{metric}_test": ci.get("test")})  # fmt: skip
        rows.append(row)
    return rows


def _summary_cell(row: dict[str, Any], metric: str) -> str:
    return metric_with_delta(row[metric], row[f"{metric}_delta_pct"], row_ci(row, metric),
                             reference=row["precision"] == "fp32")  # fmt: skip


def write_summary(records: list[dict[str, Any]], out: Path) -> tuple[Path, Path]:
    """Write ``out.csv`` and ``out.md`` (DSC (↓Δ%) / NSD (↓Δ%) like the paper's tables, FP32 first within each
    model and dataset: the reference); returns the paths."""
    rows = sorted(summary_rows(records), key=reference_first)
    out.parent.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out.with_suffix(".csv"), out.with_suffix(".md")
    with open(csv_path, "w", newline="") as f:  # the W&B-only columns left out; the csv module's \r\n
        f.write(csv_text(rows, COLUMNS, lineterminator="\r\n"))

    baselines: dict[tuple, set] = {}
    for r in records:
        if r.get("status") == "success" and isinstance(r.get("baseline"), dict):
            baselines.setdefault((r.get("model"), r.get("dataset")), set()).add(r["baseline"].get("key"))
    cells = []
    for r in rows:
        note = "UNTRAINED" if r["untrained"] else ""
        if len(baselines.get((r["model"], r["dataset"]), ())) > 1:
            note = (note + "; " if note else "") + "other FP32 baselines in this table (other test cases or settings)"
        if r["dsc_calibration_std"] is not None:
            spread = f"DSC ±{r['dsc_calibration_std']:.3f} over {r['calibration_draws']} calibration draws"
            note = (note + "; " if note else "") + spread
        cells.append([r["model"], r["dataset"], r["precision"], r["granularity"], r["method"],
                      _summary_cell(r, "dsc"), _summary_cell(r, "nsd"), note])  # fmt: skip
    header = ["Architecture", "Dataset", "Precision", "Quant-Granularity", "Method", "DSC (↓Δ% [95% CI])",
              "NSD (↓Δ% [95% CI])", "note"]  # fmt: skip
    text = markdown_table(header, cells)
    if any(r.get(f"{m}_drop_ci_low") is not None for r in rows for m in ("dsc", "nsd")):
        text += ("\n↓Δ%: drop from FP32 (positive = worse), 95 % bootstrap interval over the test cases; * the paired "
                 "test across cases is significant at 0.05 after Holm correction across this table's configs "
                 "(mqb.analysis.stats).\n")  # fmt: skip
    md_path.write_text(text)
    return csv_path, md_path


# -- sensitivity studies --------------------------------------------------------------------------------------
def _step_cells(r: dict[str, Any], extra: tuple[str, ...]) -> list[str]:
    values = [f"{r[c]:.3g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in extra]
    return [r["label"], metric_with_delta(r["dsc"], r["dsc_delta_pct"]),
            metric_with_delta(r["nsd"], r["nsd_delta_pct"]), *values]  # fmt: skip


def steps_table(title: str, rows: list[dict[str, Any]], extra: tuple[str, ...] = ()) -> RichTable:
    """The steps of a sensitivity study (rich): label, DSC (↓Δ%), NSD (↓Δ%) and ``extra`` columns."""
    table = RichTable(title=title)
    for col in ("step", "DSC (↓Δ%)", "NSD (↓Δ%)", *extra):
        table.add_column(col)
    for r in rows:
        table.add_row(*_step_cells(r, extra))
    return table


def steps_markdown(rows: list[dict[str, Any]], extra: tuple[str, ...] = ()) -> str:
    """:func:`steps_table` as Markdown."""
    return markdown_table(["Step", "DSC (↓Δ%)", "NSD (↓Δ%)", *extra], [_step_cells(r, extra) for r in rows])


# -- mqb.deploy -----------------------------------------------------------------------------------------------
def deploy_markdown(record: dict[str, Any]) -> str:
    """``mqb.deploy``'s record: FP32 / BF16 / INT8 side by side (latency, speed-up, memory, agreement), then the
    per-layer reports."""
    machine = record["machine"]
    head = (f"# mqb.deploy: {record['model']} {record['precision']} ({record['scheme']})\n\n"
            f"{machine['model']}, {machine['cpu_count']} CPUs ({', '.join(machine['isa'])}); "
            + (f"INT8: {record['int8_isa']['description']}"
               + ("; 7-bit weights (overflow fix)" if record["int8_isa"]["overflow_fix"] else "") + "; "
               if "int8_isa" in record else "")
            + ", ".join(f"{k} {v}" for k, v in record["versions"].items()) + "\n\n")  # fmt: skip
    sizes = record["export"]
    lines = [
        f"ONNX: FP32 {sizes['fp32']['file_bytes'] / 1e6:.2f} MB (weights {sizes['fp32']['weight_bytes'] / 1e6:.2f} MB)"
        f", INT8 {sizes['int8']['file_bytes'] / 1e6:.2f} MB (weights {sizes['int8']['weight_bytes'] / 1e6:.2f} MB): "
        f"{sizes['size_ratio']:.2f}x smaller file, {sizes['weight_ratio']:.2f}x smaller weights; "
        f"{sizes['int8']['counts']['int8']} layers INT8, {sizes['int8']['counts']['int8-input']} norm inputs INT8, "
        f"{sizes['int8']['counts']['float']} in float.",
        "",
    ]
    profile = record.get("profile", {})
    agree = record.get("agreement", {})
    names = list(profile) or list(agree)
    cols = ["runtime", "precision"]
    if profile:
        cols += ["patch latency (ms)", "speedup vs FP32", "volume latency (s)", "patches/s", "load (MiB)",
                 "inference peak (MiB)"]  # fmt: skip
    if agree:
        cols += ["Dice vs reference", "reference"]
    rows = []
    for name in names:
        prof, row = profile.get(name, {}), agree.get(name, {})
        if "skipped" in prof:
            rows.append([name, prof["skipped"], *([""] * (len(cols) - 2))])
            continue
        cells = [name, str(prof.get("precision") or row.get("precision") or "")]
        if profile:
            lat = prof.get("patch_latency", {}).get("median_s")
            vol = prof.get("volume_latency", {}).get("median_s")
            mem = prof.get("memory", {})
            cells += [
                f"{lat * 1000:.1f}" if lat else "-",
                f"{prof['speedup']:.2f}x" if prof.get("speedup") else "-",
                f"{vol:.2f}" if vol else "-",
                f"{prof['throughput']['patches_per_s']:.2f}" if "throughput" in prof else "-",
                f"{mem['load_bytes'] / 2**20:.0f}" if "load_bytes" in mem else "-",
                f"{mem['inference_peak_bytes'] / 2**20:.0f}" if "inference_peak_bytes" in mem else "-",
            ]
        if agree:
            dice = row.get("dice")
            cells += [f"{dice:.4f}" if dice is not None else "-", row.get("reference", "-")]
        rows.append(cells)
    if names:
        lines += [markdown_table(cols, rows)]
    from mqb.deploy.agreement import ROUNDING_FLOOR

    floor = agree.get(ROUNDING_FLOOR, {}).get("dice")
    if floor is not None:
        lines += [f"Rounding floor: mqb's fake quantization in float64 agrees with the float32 one at Dice {floor:.4f} "
                  "(how far two exact computations of this INT8 network are apart: rounding at grid boundaries). "
                  "An INT8 runtime in its range deviates by its own rounding; one far below it computes "
                  "something else.", ""]  # fmt: skip
    rewrites = {name: entry["graph_rewrites"] for name, entry in {**agree, **profile}.items()
                if entry.get("graph_rewrites")}  # fmt: skip
    if rewrites:  # what a runtime ran differs in form from the file (same formula): say so, to do the same outside
        forms = "; ".join(f"{name}: " + ", ".join(f"{k} x{v}" for k, v in rw.items()) for name, rw in rewrites.items())
        lines += [f"Graph forms run (rewritten on loading, the files unchanged; mqb.deploy.runtimes / "
                  f"mqb.deploy.norms): {forms}.", ""]  # fmt: skip
    for rep in record.get("layer_reports", {}).values():
        lines.append(runtime_report_markdown(rep))
    return head + "\n".join(lines) + "\n"


def runtime_report_markdown(report: dict[str, Any], max_types: int = 12) -> str:
    """:func:`mqb.deploy.layer_precision.runtime_report` as Markdown: per layer how it was exported and how the
    runtime ran it (op, precision, kernel, time), what fell back to float, and the time per op type."""
    layers = [[r["layer"], r["kind"], r["export_mode"], r["runtime_type"] or "-", r["runtime_precision"] or "-",
               r["kernel"] or "-", f"{r['time_us'] / 1000:.2f}" if r["time_us"] is not None else "-"]
              for r in report["layers"]]  # fmt: skip
    lines = [
        f"### {report['runtime']}: {report['int8_layers']}/{len(report['layers'])} quantized layers run in INT8",
        "",
        markdown_table(["layer", "kind", "exported as", "runtime op", "runtime precision", "kernel", "time (ms)"],
                       layers).rstrip("\n"),
    ]
    if report["fell_back"]:
        lines += ["", "Exported as INT8 but run in float: " + ", ".join(report["fell_back"])]
    if report["exported_float"]:
        lines += ["", "Exported in float (not INT8-exportable): " + ", ".join(report["exported_float"])]
    types = [[g["type"], g["precision"], g["count"], f"{g['time_us'] / 1000:.2f}" if g["time_us"] is not None else "-"]
             for g in report["by_type"][:max_types]]  # fmt: skip
    lines += ["", markdown_table(["op type", "precision", "count", "time (ms)"], types).rstrip("\n")]
    return "\n".join(lines) + "\n"
