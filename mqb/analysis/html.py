"""One self-contained HTML page per results directory (``python -m mqb.report RESULTS --html``).

The page opens from disk in any browser, with no server, no network and no W&B account: figures are embedded
as base64 PNG ``data:`` URIs, the CSS is inline, and a Content-Security-Policy forbids loading anything else. It
holds what :mod:`mqb.analysis.report` builds, laid out for reading:

* the headline table (:func:`mqb.analysis.tables.paper_table`: ↓Δ% with its 95 % interval and ``*`` where the
  paired test is significant after Holm), with, per row, the config keys that tell it apart from rows with the
  same label (``method.exclude=[conv1x1x1]``; ``Setting``), a note (UNTRAINED, FP32 from the baseline, no
  labels) and a link to its configuration;
* the per-class tables (class x config, per metric) and the figures (DSC bars, per-class heat maps, any extra
  figure passed in, e.g. the qualitative overlays of :mod:`mqb.analysis.overlays`, with their captions), and a
  banner with any warnings (e.g. prediction files that could not be read);
* failed configs (error records) with their error text;
* the machines and versions the records were computed with (host, platform, Python, torch, mqb, device, git
  commit) and the configurations (the settings all rows share, and each row's own).

All text goes through :func:`html.escape`. A short inline script (no network) writes each image's decoded size
into ``data-natural-width`` / ``data-natural-height`` and the count of decoded images into the body's
``data-images-decoded`` (``"4/4"``), so a headless browser can check that the page rendered.
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from html import escape
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from mqb.analysis.report import Report, config_value, figures, flat_config
from mqb.analysis.tables import (
    FROM_BASELINE,
    NO_LABELS,
    UNTRAINED,
    Table,
    group_key,
    group_starts,
    per_class_tables,
    precision_label,
)
from mqb.results import atomic_write

#: File name of the page in the report folder.
HTML_FILE = "report.html"
#: Characters of an error record's text shown in the page (the record keeps all of it).
MAX_ERROR_CHARS = 6000

CSS = """
:root { --ink: #1d2330; --muted: #5b6473; --rule: #d5dae1; --head: #eef1f5; --warn: #fff4d6; --bad: #fde8e8;
        --good: #e6f4ea; --accent: #1f5fa8; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: var(--ink); margin: 0 auto; padding: 1.5rem 2rem 4rem; max-width: 1500px; }
h1 { font-size: 1.6rem; margin: 0 0 .3rem; }
h2 { font-size: 1.25rem; margin: 2.2rem 0 .6rem; padding-bottom: .2rem; border-bottom: 2px solid var(--rule); }
h3 { font-size: 1.05rem; margin: 1.4rem 0 .4rem; }
p.meta, p.note { color: var(--muted); margin: .25rem 0; }
p.note { font-size: 12.5px; max-width: 100ch; }
nav a { margin-right: 1rem; color: var(--accent); text-decoration: none; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; margin: .4rem 0; font-size: 13px; }
th, td { border: 1px solid var(--rule); padding: .28rem .55rem; vertical-align: top; text-align: left; }
th { background: var(--head); position: sticky; top: 0; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.sig { background: var(--bad); font-weight: 600; }
td.setting, td.mono, code, pre { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
                                 font-size: 12px; }
td.setting { color: #6a2c91; max-width: 46ch; }
tr.reference td { background: #f7f8fa; }
tr.untrained td { background: var(--warn); }
.badge { display: inline-block; padding: 0 .4rem; border-radius: .6rem; font-size: 11.5px; font-weight: 600; }
.badge.untrained { background: #f0b429; color: #3d2800; }
.badge.note { background: var(--head); color: var(--muted); }
div.warn { background: var(--warn); border-left: 4px solid #f0b429; padding: .5rem .8rem; margin: .8rem 0; }
div.fail { background: var(--bad); border-left: 4px solid #c53030; padding: .5rem .8rem; margin: .8rem 0; }
div.ok { background: var(--good); border-left: 4px solid #2f855a; padding: .5rem .8rem; margin: .8rem 0; }
figure { margin: 1rem 0 1.6rem; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--rule); }
figcaption { color: var(--muted); font-size: 12.5px; }
details { margin: .3rem 0; }
summary { cursor: pointer; }
pre { background: #f6f8fa; padding: .6rem; overflow-x: auto; white-space: pre-wrap; max-height: 24rem; }
"""

SCRIPT = """
window.addEventListener("load", function () {
  var images = document.images, decoded = 0;
  for (var i = 0; i < images.length; i++) {
    images[i].setAttribute("data-natural-width", images[i].naturalWidth);
    images[i].setAttribute("data-natural-height", images[i].naturalHeight);
    if (images[i].complete && images[i].naturalWidth > 0) { decoded++; }
  }
  document.body.setAttribute("data-images-decoded", decoded + "/" + images.length);
});
"""

#: Only inline styles and scripts and data: images: the page never reaches the network.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"


def png_data_uri(figure: Figure | bytes, dpi: int = 110) -> str:
    """``data:image/png;base64,...`` of a matplotlib figure (rendered at ``dpi``) or of PNG bytes."""
    if isinstance(figure, Figure):
        buf = io.BytesIO()
        figure.savefig(buf, format="png", dpi=dpi)
        data = buf.getvalue()
    else:
        data = bytes(figure)
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        raise ValueError("png_data_uri: not a PNG image")
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def anchor(config_id: str) -> str:
    """The page anchor of a config's details (``cfg-<id>``)."""
    return "cfg-" + "".join(c if c.isalnum() or c in "-_" else "_" for c in str(config_id))


def table_html(
    table: Table,
    numeric: Sequence[int] = (),
    row_classes: Sequence[str] | None = None,
    row_attrs: Sequence[Mapping[str, str]] | None = None,
    raw_columns: Mapping[int, Sequence[str]] | None = None,
    css_columns: Mapping[int, str] | None = None,
) -> str:
    """A :class:`Table` as an HTML ``<table>``: the first ``table.merge`` columns merged down (``rowspan``) where
    they repeat, ``numeric`` columns right-aligned and marked ``sig`` when the cell carries ``*``; ``row_classes``
    / ``row_attrs`` per body row; ``raw_columns[c][i]``: already-escaped HTML for cell ``(i, c)``; ``css_columns``:
    a class per column. The table's notes follow as paragraphs."""
    firsts = group_starts(table)
    out = ['<div class="scroll"><table>', "<thead><tr>"]
    out += [f"<th>{escape(h)}</th>" for h in table.header]
    out.append("</tr></thead><tbody>")
    for i, (row, first) in enumerate(zip(table.rows, firsts, strict=True)):
        cls = (row_classes[i] if row_classes else "") or ""
        attrs = "".join(f' {escape(k)}="{escape(v)}"' for k, v in ((row_attrs[i] if row_attrs else {}) or {}).items())
        out.append(f"<tr{f' class={chr(34)}{escape(cls)}{chr(34)}' if cls else ''}{attrs}>")
        for c, cell in enumerate(row):
            span = 1
            if c < table.merge:
                if c < first:
                    continue  # covered by the rowspan of the cell above
                while i + span < len(table.rows) and firsts[i + span] > c:
                    span += 1
            classes = []
            if c in numeric:
                classes.append("num")
                if "*" in cell:
                    classes.append("sig")
            if css_columns and c in css_columns:
                classes.append(css_columns[c])
            body = raw_columns[c][i] if raw_columns and c in raw_columns else escape(cell)
            td_attrs = (f' rowspan="{span}"' if span > 1 else "") + (f' class="{" ".join(classes)}"' if classes else "")
            out.append(f"<td{td_attrs}>{body}</td>")
        out.append("</tr>")
    out.append("</tbody></table></div>")
    out += [f'<p class="note">{escape(note)}</p>' for note in table.notes]
    return "\n".join(out)


# -- sections ------------------------------------------------------------------------------------------------
def _row_note(row: dict[str, Any]) -> str:
    notes = []
    if row.get("untrained"):
        notes.append('<span class="badge untrained">UNTRAINED</span>')
    if row.get("from_baseline"):
        notes.append('<span class="badge note">FP32 from baseline</span>')
    if row.get("reference") not in (None, "labels"):
        notes.append('<span class="badge note">no labels</span>')
    return " ".join(notes)


def headline_section(report: Report) -> str:
    """The paper table plus Note and Config columns (the config id, linking to its configuration)."""
    table = report.table
    header = (*table.header, "Note", "Config")
    cells = [(*cells, "", str(r.get("id") or "")) for cells, r in zip(table.rows, report.rows, strict=True)]
    extended = Table(header, cells, merge=table.merge, notes=table.notes, align=table.align)
    n = len(table.header)
    metric_cols = [c for c, h in enumerate(table.header) if h.startswith(("DSC", "NSD"))]
    setting_col = table.header.index("Setting") if "Setting" in table.header else None
    links = [f'<a href="#{anchor(r["id"])}"><code>{escape(r["id"])}</code></a>' if r.get("id") else ""
             for r in report.rows]  # fmt: skip
    classes = [" ".join(c for c, on in (("reference", r["precision"] == "fp32"), ("untrained", bool(r["untrained"])))
                        if on) for r in report.rows]  # fmt: skip
    attrs = [{"data-id": str(r.get("id") or ""), "data-precision": str(r["precision"])} for r in report.rows]
    html = table_html(extended, numeric=metric_cols, row_classes=classes, row_attrs=attrs,
                      raw_columns={n: [_row_note(r) for r in report.rows], n + 1: links},
                      css_columns={setting_col: "setting"} if setting_col is not None else None)  # fmt: skip
    return f'<h2 id="results">Results</h2>\n{html}'


def per_class_section(report: Report) -> str:
    parts = []
    for metric, entries in report.per_class.items():
        if not entries:
            continue
        for (model, cell), table in per_class_tables(entries).items():
            parts.append(f"<h3>{escape(model)} on {escape(cell)}: per-class {escape(metric.upper())}</h3>")
            parts.append(table_html(table, numeric=range(1, len(table.header))))
    if not parts:
        return ""
    return '<h2 id="per-class">Per-class results</h2>\n' + "\n".join(parts)


def figures_section(images: Mapping[str, Figure | bytes], dpi: int = 110,
                    captions: Mapping[str, str] | None = None) -> str:  # fmt: skip
    """The figures as embedded PNGs, each captioned with its file name and, where given, ``captions[name]``."""
    if not images:
        return ""
    parts = ['<h2 id="figures">Figures</h2>']
    for name, fig in images.items():
        text = escape(name) + (f"<br>{escape(captions[name])}" if captions and captions.get(name) else "")
        parts.append(f'<figure><img src="{png_data_uri(fig, dpi)}" alt="{escape(name, quote=True)}">'
                     f"<figcaption>{text}</figcaption></figure>")  # fmt: skip
    return "\n".join(parts)


def failures_section(errors: Sequence[dict[str, Any]]) -> str:
    if not errors:
        return '<h2 id="failures">Failed configs</h2>\n<div class="ok">No failed config.</div>'
    rows = []
    for e in sorted(errors, key=lambda e: (str(e.get("model")), str(e.get("dataset")), str(e.get("id")))):
        text = str(e.get("error") or "unknown error").strip() or "unknown error"
        first = text.splitlines()[0][:300]
        more = text[:MAX_ERROR_CHARS] + ("\n..." if len(text) > MAX_ERROR_CHARS else "")
        detail = f"<details><summary>{escape(first)}</summary><pre>{escape(more)}</pre></details>" \
            if "\n" in text or len(text) > 300 else escape(first)  # fmt: skip
        what = [escape(str(e.get(k, "?"))) for k in ("model", "dataset", "precision", "granularity", "method")]
        rows.append(f'<tr data-id="{escape(str(e.get("id")))}"><td><code>{escape(str(e.get("id")))}</code></td>'
                    + "".join(f"<td>{w}</td>" for w in what) + f"<td>{detail}</td></tr>")  # fmt: skip
    head = "".join(f"<th>{h}</th>" for h in ("Config", "Model", "Dataset", "Precision", "Granularity", "Method",
                                              "Error"))  # fmt: skip
    return (f'<h2 id="failures">Failed configs</h2>\n<div class="fail">{len(errors)} config(s) failed and are not '
            f'in the tables (error records without a later success).</div>\n<div class="scroll"><table><thead><tr>'
            f"{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>")  # fmt: skip


MACHINE_COLUMNS = ("Host", "Platform", "CPUs", "Python", "torch", "mqb", "Device", "git commit", "Records")


def machines(records: Sequence[dict[str, Any]]) -> list[tuple[str, ...]]:
    """Distinct (host, platform, CPUs, Python, torch, mqb, device, git commit) of ``records``, each with the
    number of records computed there; a missing field reads ``?``."""
    counts: dict[tuple[str, ...], int] = {}
    for r in records:
        host = r.get("host") if isinstance(r.get("host"), dict) else {}
        device = r.get("device") if isinstance(r.get("device"), dict) else {}
        git = r.get("git") if isinstance(r.get("git"), dict) else {}
        commit = str(git.get("commit") or "?")[:12] + (" (dirty)" if git.get("dirty") else "")
        key = (str(host.get("hostname", "?")), str(host.get("platform", "?")), str(host.get("cpu_count", "?")),
               str(host.get("python", "?")), str(host.get("torch", "?")), str(host.get("mqb", "?")),
               ", ".join(f"{k}={config_value(v)}" for k, v in device.items()) or "?", commit)  # fmt: skip
        counts[key] = counts.get(key, 0) + 1
    return [(*k, str(n)) for k, n in counts.items()]


def machines_section(records: Sequence[dict[str, Any]]) -> str:
    rows = machines(records)
    table = Table(MACHINE_COLUMNS, rows)
    return '<h2 id="machines">Machines and versions</h2>\n' + table_html(table, css_columns={6: "mono", 7: "mono"})


def configurations_section(report: Report) -> str:
    """The settings every success record shares, then per row its own (the keys not shared)."""
    rows = [r for r in report.rows if r.get("id")]
    flats = {r["id"]: flat_config(r.get("config") or {}) for r in rows}
    if not flats:
        return ""
    keys = sorted({k for f in flats.values() for k in f})
    missing = object()
    shared = {k: next(iter(flats.values()))[k] for k in keys
              if len({repr(f.get(k, missing)) for f in flats.values()}) == 1}  # fmt: skip
    parts = ['<h2 id="configs">Configurations</h2>',
             f"<p class=\"meta\">{len(shared)} settings shared by all {len(flats)} configs; each config's own "
             "settings below (config keys that do not change results, such as paths and loggers, left out).</p>",
             "<details><summary>Shared settings</summary>",
             table_html(Table(("key", "value"), [(k, config_value(v)) for k, v in shared.items()]),
                        css_columns={0: "mono", 1: "mono"}), "</details>"]  # fmt: skip
    for r in rows:
        own = [(k, config_value(v)) for k, v in flats[r["id"]].items() if k not in shared]
        label = " / ".join((str(r["model"]), str(r["dataset"]), precision_label(r["precision"]), str(r["granularity"]),
                            str(r["method"])))  # fmt: skip
        setting = f" — {r['setting']}" if r.get("setting") else ""
        parts.append(f'<details id="{anchor(r["id"])}"><summary><code>{escape(r["id"])}</code> {escape(label)}'
                     f"{escape(setting)}</summary>")  # fmt: skip
        parts.append(table_html(Table(("key", "value"), own), css_columns={0: "mono", 1: "mono"})
                     if own else '<p class="note">No setting of its own.</p>')  # fmt: skip
        parts.append("</details>")
    return "\n".join(parts)


def render_html(
    report: Report,
    source: str = "",
    images: Mapping[str, Figure | bytes] | None = None,
    extra_images: Mapping[str, Figure | bytes] | None = None,
    generated: datetime | None = None,
    captions: Mapping[str, str] | None = None,
    warnings: Sequence[str] = (),
) -> str:
    """The whole page. ``images``: name -> figure or PNG bytes (default: :func:`mqb.analysis.report.figures` of
    the report); ``extra_images`` are added after them (e.g. a FLOP composition or the overlays of
    :func:`mqb.analysis.overlays.overlay_figures`), ``captions[name]`` under a figure; ``warnings`` (e.g. prediction
    files that could not be read) as a banner; ``source``: the results directory, shown in the title."""
    images = dict(figures(report.rows, report.per_class.get("dsc")) if images is None else images)
    images.update(extra_images or {})
    selection = report.selection
    when = (generated or datetime.now(UTC)).strftime("%Y-%m-%d %H:%M UTC")
    title = f"mqb report: {source}" if source else "mqb report"
    untrained = [r for r in report.rows if r["untrained"] and r["precision"] != "fp32"]
    n_configs = len(selection.successes)
    summary = (f"{n_configs} config(s) with results, {len(selection.errors)} failed, "
               f"{len(selection.other)} record(s) of other kinds not tabulated; generated {when}.")  # fmt: skip
    banners = []
    if untrained:
        banners.append(f'<div class="warn"><span class="badge untrained">UNTRAINED</span> {len(untrained)} '
                       f"quantized config(s) evaluate a network without a checkpoint (rows marked {UNTRAINED}): "
                       "these numbers test the pipeline, not the model.</div>")  # fmt: skip
    if selection.errors:
        banners.append(f'<div class="fail">{len(selection.errors)} config(s) failed: see '
                       '<a href="#failures">Failed configs</a>.</div>')  # fmt: skip
    if any(group_key(r)[3] for r in report.rows):
        banners.append(f'<div class="warn">Rows marked {NO_LABELS} were scored against the FP32 network\'s '
                       "predictions (no labels).</div>")  # fmt: skip
    if warnings:
        banners.append(f'<div class="warn" id="warnings">{len(warnings)} warning(s):<ul>'
                       + "".join(f"<li>{escape(w)}</li>" for w in warnings) + "</ul></div>")  # fmt: skip
    if any(r["from_baseline"] for r in report.rows):
        banners.append(f'<div class="warn">Rows marked {FROM_BASELINE}: FP32 values from the baseline stored in '
                       "the quantized records (no fp32 record in this folder).</div>")  # fmt: skip
    nav = " ".join(f'<a href="#{a}">{t}</a>' for a, t in (("results", "Results"), ("per-class", "Per class"),
                   ("figures", "Figures"), ("failures", "Failed configs"), ("machines", "Machines"),
                   ("configs", "Configurations")))  # fmt: skip
    body = [f"<h1>{escape(title)}</h1>", f'<p class="meta">{escape(summary)}</p>', f"<nav>{nav}</nav>", *banners,
            headline_section(report), per_class_section(report), figures_section(images, captions=captions),
            failures_section(selection.errors), machines_section(selection.successes + selection.errors),
            configurations_section(report)]  # fmt: skip
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(title)}</title>",
        f"<style>{CSS}</style>",
        f"<script>{SCRIPT}</script>",
        "</head><body>",
        *[b for b in body if b],
        "</body></html>",
        "",
    ])  # fmt: skip


def write_html(
    report: Report,
    out: str | os.PathLike[str],
    source: str = "",
    images: Mapping[str, Figure | bytes] | None = None,
    extra_images: Mapping[str, Figure | bytes] | None = None,
    captions: Mapping[str, str] | None = None,
    warnings: Sequence[str] = (),
) -> Path:
    """Write :func:`render_html` to ``out/report.html`` atomically; returns the path."""
    path = Path(out) / HTML_FILE
    text = render_html(report, source, images, extra_images, captions=captions, warnings=warnings)
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path
