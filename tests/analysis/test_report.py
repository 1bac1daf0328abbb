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

from mqb.analysis.report import build_report, figures, render, select_records, table_rows, write_report
from mqb.analysis.tables import Table, latex_escape, paper_table, to_markdown
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
    assert list(rows[0]) == ["model", "dataset", "precision", "granularity", "method", "dsc", "dsc_delta_pct",
                             "dsc_drop_ci_low", "dsc_drop_ci_high", "dsc_p_holm", "dsc_significant", "dsc_cases",
                             "nsd", "nsd_delta_pct", "nsd_drop_ci_low", "nsd_drop_ci_high", "nsd_p_holm",
                             "nsd_significant", "nsd_cases", "hd95", "untrained", "id", "calibration_draws",
                             "dsc_calibration_std", "nsd_calibration_std"]  # fmt: skip
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
                     "per_class_delta_dsc_unet_btcv.png", "per_class_dsc.md", "per_class_nsd.md",
                     "table.md"]  # fmt: skip
    for p in paths:
        if p.suffix == ".png":
            assert p.stat().st_size > 1000
        else:
            assert p.read_text().startswith("### " if p.name.startswith("per_class") else "| Architecture")
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
    assert sorted(p.name for p in (tmp_path / "md_only").iterdir()) == ["per_class_dsc.md", "per_class_nsd.md",
                                                                        "table.md"]  # fmt: skip
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0 and "--figures" in capsys.readouterr().out


# -- per-class tables and the heat map ---------------------------------------------------------------------
def per_class_csv_rows(folder: Path, metric: str = "dsc") -> list[dict]:
    return list(csv.DictReader(io.StringIO((folder / f"per_class_{metric}.csv").read_text())))


def test_per_class_tables_from_class_means(results, tmp_path):
    """Records without per-case values: ↓Δ% from the class means, no interval, no test."""
    report = build_report(read_records(results), n_resamples=200)
    paths = write_report(report, tmp_path / "out")
    assert {p.name for p in paths} >= {f"per_class_{m}.{f}" for m in ("dsc", "nsd") for f in ("md", "tex", "csv")}
    rows = per_class_csv_rows(tmp_path / "out")
    assert len(rows) == 12 * 4  # 12 quantized configs x (3 classes + mean)
    # no config.dataset.class_names: the records' per_class order (sorted by the JSON writer)
    assert [r["class"] for r in rows[:4]] == ["aorta", "liver", "spleen", "mean"]
    by = {(r["id"], r["class"]): r for r in rows}
    # record(): class i has DSC = dsc - 0.01 i, for FP32 (0.884) and quantized (0.170) alike
    spleen = by[("unet-w4a4-per_tensor", "spleen")]
    assert float(spleen["fp32"]) == pytest.approx(0.874) and float(spleen["value"]) == pytest.approx(0.160)
    assert float(spleen["drop_pct"]) == pytest.approx(100 * (0.874 - 0.160) / 0.874)
    assert spleen["source"] == "per_class" and spleen["drop_pct_ci_low"] == "" and spleen["p"] == ""
    mean = by[("unet-w4a4-per_tensor", "mean")]
    assert float(mean["drop_pct"]) == pytest.approx(80.769, abs=1e-3)  # the record's own Δ%, as in table.md
    assert mean["config"] == "INT W4A4 Per-tensor" and mean["group"] == "btcv" and mean["model"] == "unet"
    md = (tmp_path / "out" / "per_class_dsc.md").read_text()
    assert "### unet on btcv: per-class DSC" in md and "### swin_unetr on btcv: per-class DSC" in md
    unet_md = md[md.index("### unet") :]
    assert unet_md.splitlines()[2] == (
        "| Class | FP32 | INT W8A8 Per-channel/token | INT W8A8 Per-tensor | INT W8A8 Adaptive stratification | "
        "INT W4A4 Per-channel/token | INT W4A4 Per-tensor | INT W4A4 Adaptive stratification |"
    )
    liver = next(line for line in unet_md.splitlines() if line.startswith("| liver |"))
    assert liver.split(" | ")[1] == "0.884" and "0.170 (80.8%)" in liver and "[" not in liver
    assert "Cells without [CI]" in md
    tex = (tmp_path / "out" / "per_class_dsc.tex").read_text()
    assert tex.count(r"\begin{tabular}{lccccccc}") == 2 and r"0.170 (80.8\%)" in tex
    first = tex.split(r"\end{tabular}")[0].splitlines()
    assert first.count(r"\midrule") == 2 and first[first.index(r"\midrule", 6) + 1].startswith("Mean & ")


CASES = [f"case{i}" for i in range(6)]
#: dataset order (not alphabetical, as a JSON round trip leaves the per_class keys): liver, spleen, aorta
FP32_CASES = {c: [0.90 - 0.01 * i, 0.80, 0.70 + 0.01 * i] for i, c in enumerate(CASES)}
QUANT_DROPS = {"w8a8": [0.010, 0.012, 0.008, 0.011, 0.009, 0.010], "w4a4": [0.1, 0.2, -0.05, 0.15, 0.1, 0.3]}


def per_case_record(rid: str, precision: str, values: dict[str, list[float | None]], with_names: bool = True):
    per_case = {c: {"dsc": v, "nsd": v, "hd95": [1.0] * 3, "spacing_mm": [1, 1, 1]} for c, v in values.items()}
    means = [sum(v[i] for v in values.values() if v[i] is not None) / sum(v[i] is not None for v in values.values())
             for i in range(3)]  # fmt: skip
    r = record(rid, "unet", precision, "per_channel", sum(means) / 3, sum(means) / 3)
    r["metrics"]["per_class"] = {c: {"dsc": m, "nsd": m, "hd95": 1.0} for c, m in zip(CLASSES, means, strict=True)}
    r["metrics"]["per_case"] = per_case
    r["config"] = {"dataset": {"class_names": ["background", *CLASSES]}} if with_names else {}
    return r


def per_case_results(folder: Path, with_names: bool = True) -> Path:
    write_json_atomic(folder / "fp32.json", per_case_record("fp32", "fp32", FP32_CASES, with_names))
    for p, drops in QUANT_DROPS.items():
        # the liver (first class) loses `drops`; the spleen is absent from case0 on the quantized side only
        values = {c: [v[0] - d, None if c == "case0" else v[1], v[2]] for (c, v), d in zip(FP32_CASES.items(), drops,
                                                                                            strict=True)}  # fmt: skip
        write_json_atomic(folder / f"{p}.json", per_case_record(p, p, values, with_names))
    return folder


def hand_sign_flip_p(d: list[float]) -> float:
    import itertools

    flips = list(itertools.product((1, -1), repeat=len(d)))
    return sum(abs(sum(s * x for s, x in zip(f, d, strict=True))) >= abs(sum(d)) - 1e-12 for f in flips) / len(flips)


def test_per_class_tables_with_per_case_intervals(tmp_path):
    """Records with per-case values (read back from JSON): paired Δ, bootstrap CI, exact test, Holm."""
    import numpy as np
    from scipy.stats import bootstrap

    report = build_report(read_records(per_case_results(tmp_path / "results")), n_resamples=2000)
    write_report(report, tmp_path / "out", ("md", "csv"))
    by = {(r["id"], r["class"]): r for r in per_class_csv_rows(tmp_path / "out")}
    assert [c for i, c in by if i == "w8a8"] == ["liver", "spleen", "aorta", "mean"]  # dataset order
    liver = by[("w8a8", "liver")]
    fp32 = np.array([v[0] for v in FP32_CASES.values()])
    drops = np.array(QUANT_DROPS["w8a8"])
    assert liver["source"] == "per_case" and int(liver["n_cases"]) == 6
    assert float(liver["fp32"]) == pytest.approx(fp32.mean())
    assert float(liver["drop_pct"]) == pytest.approx(100 * drops.mean() / fp32.mean())
    ci = bootstrap((-drops,), np.mean, n_resamples=2000, rng=np.random.default_rng(0)).confidence_interval
    assert float(liver["drop_pct_ci_low"]) == pytest.approx(-100 * ci.high / fp32.mean())
    assert float(liver["drop_pct_ci_high"]) == pytest.approx(-100 * ci.low / fp32.mean())
    assert liver["test"] == "permutation-exact" and float(liver["p"]) == pytest.approx(2 / 64)  # all 6 negative
    p4 = hand_sign_flip_p(list(-np.array(QUANT_DROPS["w4a4"])))
    w4 = by[("w4a4", "liver")]
    assert float(w4["p"]) == pytest.approx(p4)
    # Holm across the 2 configs: sorted p = 2/64, p4 -> 2 * 2/64, max(2 * 2/64, p4)
    assert float(liver["p_holm"]) == pytest.approx(4 / 64) and float(w4["p_holm"]) == pytest.approx(max(4 / 64, p4))
    assert liver["significant"] == "False"  # 4/64 > 0.05: Holm's price for two configs
    spleen = by[("w8a8", "spleen")]
    assert int(spleen["n_cases"]) == 5 and float(spleen["drop_pct"]) == pytest.approx(0.0)  # case0 dropped
    assert float(by[("w8a8", "aorta")]["drop_pct"]) == pytest.approx(0.0)
    # mean: per case over the classes on both sides (case0: liver and aorta only)
    mean_drop = np.mean([(d if c != "case0" else 1.5 * d) / 3 for c, d in zip(CASES, drops, strict=True)])
    fp32_mean = np.mean([np.mean(v) if c != "case0" else (v[0] + v[2]) / 2 for c, v in FP32_CASES.items()])
    assert float(by[("w8a8", "mean")]["drop_pct"]) == pytest.approx(100 * mean_drop / fp32_mean)
    md = (tmp_path / "out" / "per_class_dsc.md").read_text()
    assert f"| liver | {fp32.mean():.3f} | {fp32.mean() - drops.mean():.3f} (1.1% [1.0, 1.3]) |" in md
    assert "over the 5-6 test cases" in md and "Holm's correction across the 2 configs" in md
    assert "Only 5-6 test cases" in md
    # without config.dataset.class_names the class of each per-case position is recovered from the class means
    other = build_report(read_records(per_case_results(tmp_path / "results2", with_names=False)), n_resamples=2000)
    same = {(e["id"], e["class"]): e for e in other.per_class["dsc"]}
    for key, row in by.items():
        assert float(row["drop_pct"]) == pytest.approx(same[key]["drop_pct"])


def test_per_class_entries_prefer_the_records_stats_section(tmp_path):
    from mqb.analysis.report import per_class_delta_figure
    from mqb.analysis.stats import compare
    from mqb.analysis.tables import render_per_class

    records = read_records(per_case_results(tmp_path / "results"))
    fp32 = next(r for r in records if r["id"] == "fp32")
    for r in records:
        if r["id"] != "fp32":
            r["stats"] = compare(fp32["metrics"], r["metrics"], n_resamples=500, class_names=CLASSES)
            r["stats"]["dsc"]["per_class"]["liver"].update(drop_pct=42.0, p=0.001)  # marks where the cell comes from
    report = build_report(records, n_resamples=2000)
    entries = {(e["id"], e["class"]): e for e in report.per_class["dsc"]}
    liver = entries[("w8a8", "liver")]
    assert liver["source"] == "stats" and liver["drop_pct"] == 42.0
    assert liver["p_holm"] == pytest.approx(0.002) and liver["significant"]  # Holm over the 2 configs, here
    md = render_per_class(report.per_class["dsc"], "md")
    assert "(42.0% [" in md and "])* |" in md
    heat = per_class_delta_figure(report.per_class["dsc"], "x")
    assert (
        "42.0%*" in [t.get_text() for t in heat.axes[0].texts] and "significant after Holm" in heat.axes[0].get_title()
    )


def test_heat_map_reads_percent_and_spans_the_data(results, tmp_path):
    from mqb.analysis.report import per_class_delta_figure
    from mqb.analysis.tables import format_pct

    assert [format_pct(v) for v in (0.004, -0.37, 5.24, 80.77, 100.0, -0.001)] == [
        "0.00", "-0.37", "5.2", "80.8", "100", "0.00"]  # fmt: skip
    assert format_pct(-0.4, minus="−") == "−0.40" and format_pct(None) == "-"
    report = build_report(read_records(results))
    unet = [e for e in report.per_class["dsc"] if e["model"] == "unet"]
    fig = per_class_delta_figure(unet, "unet on btcv")
    ax = fig.axes[0]
    texts = [t.get_text() for t in ax.texts]
    assert "80.8%" in texts and "0.34%" in texts  # 100 (0.884 - 0.881) / 0.884: not "0.00"
    assert len(texts) == 6 * 3
    image = ax.images[0]
    drops = [e["drop_pct"] for e in unet if e["class"] != "mean"]
    assert (image.norm.vmin, image.norm.vmax) == pytest.approx((min(0.0, *drops), max(drops)))
    # per-case records: significant cells carry a star
    records = read_records(per_case_results(tmp_path / "pc"))
    fig2 = per_class_delta_figure(build_report(records, n_resamples=500).per_class["dsc"], "x")
    assert fig2 is not None and all(not t.get_text().endswith("*") for t in fig2.axes[0].texts)
    fig2.savefig(tmp_path / "heat.png", dpi=80)
    assert (tmp_path / "heat.png").read_bytes()[:8] == PNG_MAGIC


# -- rows that share a label, and the drop's interval in the headline table ---------------------------------------
def test_rows_with_the_same_label_are_told_apart_by_their_settings():
    """Table 11's rows (same model / precision / granularity / method, other method.exclude) must not read alike."""
    from mqb.analysis.report import distinguishing_settings, flat_config

    cfg = {"method": {"name": "rtn", "exclude": []}, "calibration": {"name": "minmax"},
           "paths": {"output_dir": "/a"}, "dataset": {"cache_dir": "/c", "name": "btcv"}}  # fmt: skip
    excluded = {**cfg, "method": {"name": "rtn", "exclude": ["conv1x1x1", "linear"]}, "paths": {"output_dir": "/b"}}
    percentile = {**cfg, "calibration": {"name": "percentile", "percentile": 99.9}}
    records = [record("fp", "unet", "fp32", "-", *BASE["unet"], config=cfg),
               record("a", "unet", "w4a4", "per_channel", 0.6, 0.5, config=cfg),
               record("b", "unet", "w4a4", "per_channel", 0.7, 0.6, config=excluded),
               record("c", "unet", "w4a4", "per_channel", 0.65, 0.55, config=percentile),
               record("d", "unet", "w4a4", "per_tensor", 0.2, 0.2, config=excluded)]  # fmt: skip
    assert flat_config(excluded) == {"method.name": "rtn", "method.exclude": ["conv1x1x1", "linear"],
                                     "calibration.name": "minmax", "dataset.name": "btcv"}  # no paths, no cache_dir
    rows = table_rows(records)
    settings = {r["id"]: r["setting"] for r in rows}
    assert settings == {
        "fp": "", "d": "",  # unique labels
        "a": "calibration.name=minmax, calibration.percentile=unset, method.exclude=[]",
        "b": "calibration.name=minmax, calibration.percentile=unset, method.exclude=[conv1x1x1, linear]",
        "c": "calibration.name=percentile, calibration.percentile=99.9, method.exclude=[]",
    }  # fmt: skip
    assert distinguishing_settings(rows) == [r["setting"] for r in rows]
    md = to_markdown(paper_table(rows))
    assert md.splitlines()[0] == ("| Architecture | Dataset | Precision | Quant-Granularity | Setting | DSC (↓Δ%) | "
                                  "NSD (↓Δ%) |")  # fmt: skip
    w4 = [line for line in md.splitlines() if "Per-channel/token" in line]
    assert len(w4) == 3 and len(set(w4)) == 3 and "method.exclude=[conv1x1x1, linear]" in w4[1]
    assert "Setting: the config keys in which rows with the same label differ." in md
    # the per-class columns and the bar chart's series are told apart too
    labels = {e["config"] for e in build_report(records, n_resamples=100).per_class["dsc"]}
    assert "INT W4A4 Per-channel/token [calibration.name=percentile, calibration.percentile=99.9, " \
           "method.exclude=[]]" in labels and len(labels) == 4  # fmt: skip
    bars = figures(rows)["dsc_unet_btcv.png"]
    assert len([c for c in bars.axes[0].containers]) == 4  # 3 per-channel settings + per-tensor
    # two records with the same label and the same config differ only in their id
    same = table_rows([record("x1", "unet", "w8a8", "adaptive", 0.8, 0.7), record("x2", "unet", "w8a8", "adaptive",
                                                                                 0.81, 0.7)])  # fmt: skip
    assert [r["setting"] for r in same if r["id"]] == ["id x1", "id x2"]


def test_headline_cells_carry_the_interval_and_the_mark(tmp_path):
    """Records with a stats section: ``value (Δ% [low, high]*)`` from the record's own numbers, Holm across configs."""
    from mqb.analysis.stats import compare

    records = read_records(per_case_results(tmp_path / "results"))
    fp32 = next(r for r in records if r["id"] == "fp32")
    for r in records:
        if r["id"] != "fp32":
            r["stats"] = compare(fp32["metrics"], r["metrics"], n_resamples=500, class_names=CLASSES)
    w8 = next(r for r in records if r["id"] == "w8a8")
    w8["stats"]["dsc"]["mean"].update(p=0.001)  # significant even after Holm over 2 configs (0.002)
    rows = table_rows(records)
    md = to_markdown(paper_table(rows))
    assert "DSC (↓Δ% [95% CI])" in md.splitlines()[0] and "[95% CI]: bootstrap interval" in md
    for r in records:
        if r["id"] == "fp32":
            continue
        mean = r["stats"]["dsc"]["mean"]
        cell = (f"{r['metrics']['dsc']:.3f} ({r['delta_pct']['dsc']:.1f}% [{mean['drop_pct_ci_low']:.1f}, "
                f"{mean['drop_pct_ci_high']:.1f}]")  # fmt: skip
        assert cell + ("*)" if r["id"] == "w8a8" else ")") in md, cell
