"""Paper-style report: records -> Markdown / LaTeX / CSV tables and PNG figures, and the ``python -m mqb.report`` CLI.

Cells are checked against values computed by hand: Δ% = 100 * (FP32 - quantized) / FP32, one decimal.
"""

from __future__ import annotations

import csv
import io
import subprocess
import sys
from pathlib import Path

import pytest

from mqb.analysis.report import (
    Table,
    build_report,
    figures,
    latex_escape,
    paper_table,
    render,
    select_records,
    table_rows,
    to_markdown,
    write_report,
)
from mqb.report import main
from mqb.results import read_records, write_json_atomic

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BASE = {"unet": (0.884, 0.800), "swin_unetr": (0.804, 0.746)}
#: (model, precision, granularity) -> (DSC, NSD)
VALUES = {
    ("unet", "w8a8", "per_channel"): (0.881, 0.792),
    ("unet", "w8a8", "per_tensor"): (0.870, 0.776),
    ("unet", "w8a8", "adaptive"): (0.884, 0.800),
    ("unet", "w4a4", "per_channel"): (0.600, 0.500),
    ("unet", "w4a4", "per_tensor"): (0.170, 0.169),
    ("unet", "w4a4", "adaptive"): (0.800, 0.700),
    ("swin_unetr", "w8a8", "per_channel"): (0.803, 0.744),
    ("swin_unetr", "w8a8", "per_tensor"): (0.802, 0.740),
    ("swin_unetr", "w8a8", "adaptive"): (0.804, 0.745),
    ("swin_unetr", "w4a4", "per_channel"): (0.380, 0.286),
    ("swin_unetr", "w4a4", "per_tensor"): (0.002, 0.004),
    ("swin_unetr", "w4a4", "adaptive"): (0.378, 0.289),
}
CLASSES = ("liver", "spleen", "aorta")


def record(rid, model, precision, granularity, dsc, nsd, created="2026-01-02T00:00:00", **extra) -> dict:
    base_dsc, base_nsd = BASE[model]
    quant = precision != "fp32"
    r = {
        "id": rid,
        "status": "success",
        "created": created,
        "model": model,
        "dataset": "btcv",
        "precision": precision,
        "granularity": granularity if quant else "-",
        "method": "rtn" if quant else "-",
        "metrics": {
            "dsc": dsc,
            "nsd": nsd,
            "hd95": 3.0,
            "per_class": {c: {"dsc": dsc - 0.01 * i, "nsd": nsd, "hd95": 3.0} for i, c in enumerate(CLASSES)},
            "per_case": {},
        },
        "delta_pct": {"dsc": 100 * (base_dsc - dsc) / base_dsc, "nsd": 100 * (base_nsd - nsd) / base_nsd, "hd95": 0.0},
        "baseline": {"dsc": base_dsc, "nsd": base_nsd, "hd95": 3.0, "key": f"{model}-btcv"},
        "untrained": False,
        "reference": "labels",
        "config": {},
    }
    r.update(extra)
    return r


def grid() -> list[dict]:
    """2 models x (fp32 + {w8a8, w4a4} x {per_tensor, per_channel, adaptive}), written in scrambled order."""
    records = [record(f"{m}-fp32", m, "fp32", "-", *BASE[m]) for m in BASE]
    records += [record(f"{m}-{p}-{g}", m, p, g, *v) for (m, p, g), v in VALUES.items()]
    return records[::-1]


@pytest.fixture
def results(tmp_path) -> Path:
    folder = tmp_path / "results"
    for r in grid():
        write_json_atomic(folder / f"{r['id']}.json", r)
    # an older success of the same config (e.g. copied from another sweep): the latest one wins
    stale = record("unet-w4a4-per_tensor", "unet", "w4a4", "per_tensor", 0.5, 0.5, created="2025-12-31T00:00:00")
    write_json_atomic(folder / "zz-stale-copy.json", stale)
    # an error record of a config that later succeeded, and one of a config that never did
    error = {"id": "unet-w8a8-per_channel", "status": "error", "created": "2026-01-01T00:00:00", "model": "unet",
             "dataset": "btcv", "precision": "w8a8", "granularity": "per_channel", "method": "rtn",
             "error": "RuntimeError: flaky node"}  # fmt: skip
    write_json_atomic(folder / "unet-w8a8-per_channel.error.json", error)
    boom = {**error, "id": "boom", "precision": "w4a8", "granularity": "per_voxel",
            "error": "RuntimeError: CUDA out of memory\nTraceback (most recent call last): ..."}  # fmt: skip
    write_json_atomic(folder / "boom.error.json", boom)
    # a record of another kind (layer sensitivity): set aside, not tabulated
    write_json_atomic(folder / "sens.json", {"id": "sens", "status": "success", "sensitivity": {"layers": []}})
    return folder


MD_SWIN = [
    "| swin_unetr | btcv | FP32 | - | 0.804 (-) | 0.746 (-) |",
    "|  |  | INT W8A8 | Per-channel/token | 0.803 (0.1%) | 0.744 (0.3%) |",
    "|  |  |  | Per-tensor | 0.802 (0.2%) | 0.740 (0.8%) |",
    "|  |  |  | Adaptive stratification | 0.804 (0.0%) | 0.745 (0.1%) |",
    "|  |  | INT W4A4 | Per-channel/token | 0.380 (52.7%) | 0.286 (61.7%) |",
    "|  |  |  | Per-tensor | 0.002 (99.8%) | 0.004 (99.5%) |",
    "|  |  |  | Adaptive stratification | 0.378 (53.0%) | 0.289 (61.3%) |",
]
MD_UNET = [
    "| unet | btcv | FP32 | - | 0.884 (-) | 0.800 (-) |",
    "|  |  | INT W8A8 | Per-channel/token | 0.881 (0.3%) | 0.792 (1.0%) |",
    "|  |  |  | Per-tensor | 0.870 (1.6%) | 0.776 (3.0%) |",
    "|  |  |  | Adaptive stratification | 0.884 (0.0%) | 0.800 (0.0%) |",
    "|  |  | INT W4A4 | Per-channel/token | 0.600 (32.1%) | 0.500 (37.5%) |",
    "|  |  |  | Per-tensor | 0.170 (80.8%) | 0.169 (78.9%) |",
    "|  |  |  | Adaptive stratification | 0.800 (9.5%) | 0.700 (12.5%) |",
]


def test_markdown_table(results):
    report = build_report(read_records(results))
    md = render(report, "md")
    lines = md.splitlines()
    assert lines[0] == "| Architecture | Dataset | Precision | Quant-Granularity | DSC (↓Δ%) | NSD (↓Δ%) |"
    assert lines[1] == "|---|---|---|---|---|---|"
    assert lines[2:16] == MD_SWIN + MD_UNET  # FP32 first, precisions and granularities in the paper's order
    assert "Quantization method: rtn." in md and "Δ%: relative drop from the FP32 baseline" in md
    # the failed config is reported under the table, not in it; the one that later succeeded is not reported
    assert "**1 failed config(s), not in the table:**" in md
    assert "- boom: unet / btcv / w4a8 / per_voxel / rtn: RuntimeError: CUDA out of memory\n" in md
    assert "INT W4A8" not in md and "flaky node" not in md and "Traceback" not in md
    assert "1 record(s) of other kinds (e.g. sensitivity) not tabulated." in md


def test_selection_latest_success_wins(results):
    selection = select_records(read_records(results))
    assert len(selection.successes) == 14 and [e["id"] for e in selection.errors] == ["boom"]
    assert [r["id"] for r in selection.other] == ["sens"]
    (stale,) = [r for r in selection.successes if r["id"] == "unet-w4a4-per_tensor"]
    assert stale["metrics"]["dsc"] == 0.170
    # order of reading does not matter: a newer error record never hides a success
    newer_error = {"id": "x", "status": "error", "created": "2027", "model": "m"}
    ok = record("x", "unet", "w8a8", "per_tensor", 0.8, 0.7, created="2026")
    assert [r["id"] for r in select_records([newer_error, ok]).successes] == ["x"]
    assert select_records([ok, newer_error]).errors == []


def test_csv_raw_numbers_in_table_order(results):
    rows = list(csv.DictReader(io.StringIO(render(build_report(read_records(results)), "csv"))))
    assert list(rows[0]) == ["model", "dataset", "precision", "granularity", "method", "dsc", "dsc_delta_pct", "nsd",
                             "nsd_delta_pct", "hd95", "untrained", "id"]  # fmt: skip
    assert [(r["model"], r["precision"], r["granularity"]) for r in rows[:7]] == [
        ("swin_unetr", "fp32", "-"),
        ("swin_unetr", "w8a8", "per_channel"),
        ("swin_unetr", "w8a8", "per_tensor"),
        ("swin_unetr", "w8a8", "adaptive"),
        ("swin_unetr", "w4a4", "per_channel"),
        ("swin_unetr", "w4a4", "per_tensor"),
        ("swin_unetr", "w4a4", "adaptive"),
    ]
    unet_pt = next(r for r in rows if r["id"] == "unet-w4a4-per_tensor")
    assert float(unet_pt["dsc"]) == 0.170 and float(unet_pt["dsc_delta_pct"]) == pytest.approx(80.769, abs=1e-3)
    assert len(rows) == 14


def test_latex_table(results):
    report = build_report(read_records(results))
    tex = render(report, "tex")
    lines = tex.splitlines()
    assert lines[1] == r"\begin{tabular}{llllcc}" and lines[2] == r"\toprule"
    assert lines[3] == (r"Architecture & Dataset & Precision & Quant-Granularity & DSC ($\downarrow\Delta$\%) & "
                        r"NSD ($\downarrow\Delta$\%) \\")  # fmt: skip
    assert lines[5] == (r"\multirow{7}{*}{swin\_unetr} & \multirow{7}{*}{btcv} & FP32 & - & 0.804 (-) & "
                        r"0.746 (-) \\")  # fmt: skip
    assert lines[6] == r" &  & \multirow{3}{*}{INT W8A8} & Per-channel/token & 0.803 (0.1\%) & 0.744 (0.3\%) \\"
    assert lines[12] == r"\midrule"  # between the two architectures
    assert lines[13].startswith(r"\multirow{7}{*}{unet} & ")
    assert r"\bottomrule" in lines and lines.index(r"\end{tabular}") > lines.index(r"\bottomrule")
    assert r"\multicolumn{6}{l}{\footnotesize $\Delta$\%: relative drop" in tex
    assert "% failed, not in the table: boom: unet / btcv / w4a8 / per_voxel / rtn: RuntimeError: CUDA" in tex
    assert latex_escape(r"a_b & 5% $x# {y} ~^\ ↓Δ†") == (
        r"a\_b \& 5\% \$x\# \{y\} \textasciitilde{}\textasciicircum{}\textbackslash{} $\downarrow\Delta$"
        r"\textsuperscript{\dag}"
    )


def test_markdown_escapes_pipes_and_merges_only_repeats():
    table = Table(("a|b", "c", "v"), [("x", "1", "p|q"), ("x", "1", "r"), ("x", "2", "s"), ("y", "2", "t")], merge=2)
    assert to_markdown(table).splitlines() == [
        "| a\\|b | c | v |",
        "|---|---|---|",
        "| x | 1 | p\\|q |",
        "|  |  | r |",
        "|  | 2 | s |",
        "| y | 2 | t |",  # a new architecture repeats its dataset label
    ]


def test_groups_markers_methods_and_other_precisions():
    trained = [record("u8", "unet", "w8a8", "per_tensor", 0.870, 0.776, method="smoothquant"),
               record("u8r", "unet", "w8a8", "per_tensor", 0.860, 0.776),
               record("u16", "unet", "fp16", "-", 0.884, 0.800, method="-"),
               record("umx", "unet", "mxfp4", "per_group", 0.5, 0.5),
               record("u48", "unet", "w4a8", "per_voxel", 0.7, 0.6),
               record("u32", "unet", "fp32", "-", 0.884, 0.800)]  # fmt: skip
    untrained = record("r8", "unet", "w8a8", "adaptive", 0.02, 0.03, untrained=True,
                       baseline={"dsc": 0.013, "nsd": 0.016, "hd95": 9.0, "key": "random"})  # fmt: skip
    rows = table_rows(trained + [untrained])
    order = [(r["precision"], r["granularity"], r["method"], bool(r["untrained"])) for r in rows]
    assert order == [("fp32", "-", "-", False), ("w8a8", "per_tensor", "rtn", False),
                     ("w8a8", "per_tensor", "smoothquant", False), ("w4a8", "per_voxel", "rtn", False),
                     ("fp16", "-", "-", False), ("mxfp4", "per_group", "rtn", False),
                     ("fp32", "-", "-", True), ("w8a8", "adaptive", "rtn", True)]  # fmt: skip
    assert rows[6]["from_baseline"] and rows[6]["dsc"] == 0.013 and rows[6]["id"] == ""
    md = to_markdown(paper_table(rows))
    assert md.splitlines()[0].endswith("| Quant-Granularity | Method | DSC (↓Δ%) | NSD (↓Δ%) |")
    assert "|  |  |  | Per-tensor | smoothquant | 0.870 (1.6%) | 0.776 (3.0%) |" in md
    assert "|  |  | INT W4A8 | Per-voxel | rtn |" in md and "|  |  | MXFP4 | Per-group | rtn |" in md
    assert "|  | btcv† | FP32§ | - | - | 0.013 (-) | 0.016 (-) |" in md  # its own FP32 row, from its baseline
    assert "† untrained network" in md and "§ FP32 row from the baseline" in md
    assert "Quantization method" not in md  # there is a Method column instead
    # a second FP32 baseline with the same visible name is told apart
    other_ckpt = record("o8", "unet", "w8a8", "adaptive", 0.8, 0.7, baseline={"dsc": 0.85, "nsd": 0.8, "key": "k2"})
    md2 = to_markdown(paper_table(table_rows(trained + [other_ckpt])))
    assert md2.splitlines()[2] == "| unet | btcv | FP32 | - | - | 0.884 (-) | 0.800 (-) |"  # with an fp32 record
    assert "|  | btcv (2) | FP32§ | - | - | 0.850 (-) | 0.800 (-) |" in md2 and "(2), (3) ...: another FP32" in md2
    assert {"dsc_unet_btcv.png", "dsc_unet_btcv_2.png"} <= set(figures(table_rows(trained + [other_ckpt])))


def test_figures_are_pngs(results, tmp_path):
    report = build_report(read_records(results))
    paths = write_report(report, tmp_path / "out", ("md",), with_figures=True)
    names = sorted(p.name for p in paths)
    assert names == ["dsc_swin_unetr_btcv.png", "dsc_unet_btcv.png", "per_class_delta_dsc_swin_unetr_btcv.png",
                     "per_class_delta_dsc_unet_btcv.png", "table.md"]  # fmt: skip
    for p in paths:
        assert p.stat().st_size > 1000 if p.suffix == ".png" else p.read_text().startswith("| Architecture")
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == PNG_MAGIC
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temporary files left


def test_cli(results, tmp_path):
    cmd = [sys.executable, "-m", "mqb.report"]
    out = tmp_path / "report"
    run = subprocess.Popen([*cmd, str(results), "--out", str(out), "--figures"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)  # fmt: skip
    missing = subprocess.Popen([*cmd, str(tmp_path / "nope")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)  # fmt: skip
    stdout, stderr = run.communicate(timeout=120)
    assert run.returncode == 0, stderr
    assert MD_UNET[1] in stdout and f"wrote {out / 'table.md'}" in stdout
    assert (out / "table.md").read_text() + "\n" in stdout
    assert (out / "table.tex").read_text().startswith("% \\usepackage{booktabs,multirow}")
    assert (out / "table.csv").read_text().count("\n") == 15
    assert (out / "dsc_unet_btcv.png").read_bytes()[:8] == PNG_MAGIC
    _, stderr = missing.communicate(timeout=120)
    assert missing.returncode == 2 and f"results directory '{tmp_path / 'nope'}' does not exist" in stderr


def test_cli_exit_codes_in_process(results, tmp_path, capsys):
    only_errors = tmp_path / "only_errors"
    write_json_atomic(only_errors / "boom.error.json", {"id": "boom", "status": "error", "error": "x"})
    assert main([str(only_errors), "--out", str(tmp_path / "o")]) == 2
    assert f"no success records in '{only_errors}' (1 failed config(s))" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit) as exc:
        main([str(results), "--formats", "md,pdf"])
    assert exc.value.code == 2 and "unknown format(s) pdf" in capsys.readouterr().err
    assert main([str(results), "--out", str(tmp_path / "md_only"), "--formats", "md"]) == 0
    assert sorted(p.name for p in (tmp_path / "md_only").iterdir()) == ["table.md"]
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0 and "--figures" in capsys.readouterr().out
