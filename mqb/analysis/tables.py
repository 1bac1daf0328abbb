"""Every table mqb prints or writes is rendered here, from records (``mqb.results``) to text.

* cells: :func:`metric_with_delta` (``0.881 (0.3% [0.1, 0.5]*)``, the paper's DSC (↓Δ%) cell with the drop's
  95 % interval and significance mark), :func:`drop_ci`;
* the results table of ``mqb.eval`` and its sweeps (:func:`results_table`, rich) and the sweep summary
  (:func:`summary_rows`, :func:`write_summary`: CSV + Markdown);
* the steps of a sensitivity study (:func:`steps_table`, :func:`steps_markdown`);
* the side-by-side deployment table of ``mqb.deploy`` (:func:`deploy_markdown`);
* plain aligned text and Markdown tables (:func:`text_table`, :func:`markdown_table`) for the per-layer summaries.

The paper's own table layout (merged columns, footnotes, LaTeX) is :mod:`mqb.analysis.report`, which builds on
these cells. This module imports no torch, so ``mqb.sweep status`` / ``summary`` stay quick.
"""

from __future__ import annotations

import csv
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

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


# -- cells --------------------------------------------------------------------------------------------------
def metric_with_delta(
    value: float | None, delta: float | None, ci: dict[str, Any] | None = None, reference: bool = False
) -> str:
    """``0.881 (0.3%)`` as in the paper's tables; with ``ci`` (:func:`drop_ci`) the 95 % interval of the drop and
    a ``*`` where it is significant: ``0.881 (0.3% [0.1, 0.5]*)``; ``0.884 (ref.)`` for the FP32 reference row
    (``reference``); ``-`` when the metric is undefined."""
    if value is None:
        return "-"
    if delta is not None and round(delta, 1) == 0:
        delta = 0.0  # "0.0%", never "-0.0%"
    if reference:
        return f"{value:.3f} (ref.)"
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


# -- mqb.eval and sweeps --------------------------------------------------------------------------------------
def results_table(records: list[dict[str, Any]], title: str = "mqb results") -> Table:
    """A rich table in the paper's format: DSC (↓Δ%) / NSD (↓Δ%) per model, precision, granularity."""
    table = Table(title=title)
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


def status_table(rows: list[dict[str, Any]], title: str) -> Table:
    """``mqb.sweep status``: one line per config of a sweep (done / failed / running / missing), coloured."""
    table = Table(title=title)
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
    ci = {"low": row[f"{metric}_drop_ci_low"], "high": row[f"{metric}_drop_ci_high"],
          "significant": row[f"{metric}_significant"], "n": row[f"{metric}_cases"]}  # fmt: skip
    return metric_with_delta(row[metric], row[f"{metric}_delta_pct"], ci, reference=row["precision"] == "fp32")


def write_summary(records: list[dict[str, Any]], out: Path) -> tuple[Path, Path]:
    """Write ``out.csv`` and ``out.md`` (DSC (↓Δ%) / NSD (↓Δ%) like the paper's tables, FP32 first within each
    model and dataset: the reference); returns the paths."""
    rows = sorted(summary_rows(records), key=reference_first)
    out.parent.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out.with_suffix(".csv"), out.with_suffix(".md")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")  # the W&B-only columns left out
        writer.writeheader()
        writer.writerows(rows)

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


def steps_table(title: str, rows: list[dict[str, Any]], extra: tuple[str, ...] = ()) -> Table:
    """The steps of a sensitivity study (rich): label, DSC (↓Δ%), NSD (↓Δ%) and ``extra`` columns."""
    table = Table(title=title)
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
    for rep in record.get("layer_reports", {}).values():
        lines.append(runtime_report_markdown(rep))
    return head + "\n".join(lines) + "\n"


def runtime_report_markdown(report: dict[str, Any], max_types: int = 12) -> str:
    """:func:`mqb.deploy.report.runtime_report` as Markdown: per layer how it was exported and how the runtime ran
    it (op, precision, kernel, time), what fell back to float, and the time per op type."""
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
