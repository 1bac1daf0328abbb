"""Sweep bookkeeping: status from records, the summary table, and concurrent record writers."""

from __future__ import annotations

import csv
import json
import multiprocessing as mp
from pathlib import Path

import pytest

from mqb.results import read_records, write_json_atomic
from mqb.sweep import main as sweep_main
from mqb.sweep import status, write_summary


def record(rid: str, ok: bool, created: str, **extra) -> dict:
    base = {"id": rid, "status": "success" if ok else "error", "created": created, "model": "unet",
            "dataset": "synthetic", "precision": "w8a8", "granularity": "adaptive", "method": "rtn"}  # fmt: skip
    if ok:
        base.update(metrics={"dsc": 0.8, "nsd": 0.7, "hd95": 3.0}, delta_pct={"dsc": 1.25, "nsd": 2.5, "hd95": 0.0})
    else:
        base["error"] = "RuntimeError: out of memory"
    base.update(extra)
    return base


def test_status_done_failed_missing(tmp_path):
    results = tmp_path / "results"
    write_json_atomic(results / "a.json", record("a", True, "2026-01-01"))
    write_json_atomic(results / "b.error.json", record("b", False, "2026-01-01"))
    write_json_atomic(results / "c.error.json", record("c", False, "2026-01-01"))
    write_json_atomic(results / "c.json", record("c", True, "2026-01-02"))  # rerun succeeded
    sweep = tmp_path / "multirun"
    for name, rid in (("0_a", "a"), ("1_b", "b"), ("2_c", "c"), ("3_d", None)):
        (sweep / name / ".hydra").mkdir(parents=True)
        (sweep / name / ".hydra" / "overrides.yaml").write_text(f"- precision={name}\n")
        if rid:
            (sweep / name / "record_id.txt").write_text(rid)
    rows = {r["id"]: r["status"] for r in status(results, sweep)}
    assert rows == {"a": "done", "b": "failed", "c": "done", "-": "missing"}
    failed = next(r for r in status(results) if r["status"] == "failed")
    assert "out of memory" in failed["error"]
    assert sweep_main(["status", str(results), "--sweep", str(sweep)]) == 1
    write_json_atomic(results / "b.json", record("b", True, "2026-01-03"))
    assert sweep_main(["status", str(results)]) == 0
    assert sweep_main(["status", str(tmp_path / "nope")]) == 2


def test_summary_table(tmp_path):
    csv_path, md_path = write_summary([record("a", True, "x"), record("b", False, "y")], tmp_path / "summary")
    lines = md_path.read_text().splitlines()
    assert lines[0].startswith("| Architecture | Dataset | Precision | Quant-Granularity")
    assert lines[2] == "| unet | synthetic | w8a8 | adaptive | rtn | 0.800 (1.2%) | 0.700 (2.5%) |  |"  # no stats
    assert len(lines) == 3 and csv_path.read_text().count("\n") == 2


def _writer(folder: str, worker: int) -> None:
    for i in range(40):
        rid = f"cfg{i % 10}"  # every worker rewrites the same 10 configs
        write_json_atomic(Path(folder) / f"{rid}.json", record(rid, True, "x", worker=worker, i=i, pad="x" * 5000))


def test_eight_concurrent_writers_never_corrupt_records(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w)) for w in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    files = sorted(tmp_path.iterdir())
    assert [f.name for f in files] == [f"cfg{i}.json" for i in range(10)]  # no temporary file left behind
    for f in files:
        data = json.loads(f.read_text())  # every record is complete JSON
        assert data["id"] == f.stem and len(data["pad"]) == 5000
    assert len(read_records(tmp_path)) == 10


def _stats_record(cid: str, precision: str, drops: list[float], untrained: bool = False) -> dict:
    """A success record with per-case DSC/NSD and its ``stats`` section computed as mqb.eval does."""
    from mqb.analysis.stats import compare

    cases = [f"case{i}" for i in range(len(drops))]
    fp32 = {"per_class": {"liver": {}}, "per_case": {c: {"dsc": [0.9], "nsd": [0.8]} for c in cases}}
    per_case = {c: {"dsc": [0.9 - d], "nsd": [0.8 - d]} for c, d in zip(cases, drops, strict=True)}
    quant = {"per_class": {"liver": {}}, "per_case": per_case}
    stats = compare(fp32, quant, n_resamples=2000, class_names=["liver"]) if precision != "fp32" else None
    dsc = 0.9 - sum(drops) / len(drops)
    return {"id": cid, "status": "success", "model": "unet", "dataset": "synthetic", "precision": precision,
            "granularity": "per_tensor", "method": "rtn", "untrained": untrained,
            "metrics": {"dsc": dsc, "nsd": dsc - 0.1, "hd95": 1.0},
            "delta_pct": {"dsc": 100 * (0.9 - dsc) / 0.9, "nsd": 100 * (0.8 - dsc + 0.1) / 0.8, "hd95": 0.0},
            "baseline": {"key": "b1", "dsc": 0.9, "nsd": 0.8, "hd95": 1.0}, "stats": stats}  # fmt: skip


def test_summary_has_the_reference_first_intervals_holm_and_flags(tmp_path):
    from mqb.analysis.stats import holm

    records = [
        _stats_record("q1", "w8a8", [0.001, -0.001, 0.0005, 0.0, -0.0005, 0.001, 0.0, 0.0]),  # no real drop
        _stats_record("q2", "w4a4", [0.10, 0.12, 0.09, 0.11, 0.13, 0.1, 0.12, 0.11], untrained=True),  # real drop
        _stats_record("f", "fp32", [0.0] * 8),
    ]
    csv_path, md_path = write_summary(records, tmp_path / "summary")
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["precision"] for r in rows] == ["fp32", "w8a8", "w4a4"]  # the FP32 reference first
    adjusted = holm({"q1": records[0]["stats"]["dsc"]["mean"]["p"], "q2": records[1]["stats"]["dsc"]["mean"]["p"]})
    assert float(rows[2]["dsc_p_holm"]) == pytest.approx(adjusted["q2"])
    assert rows[2]["dsc_significant"] == "True" and rows[1]["dsc_significant"] == "False"
    low, high = float(rows[2]["dsc_drop_ci_low"]), float(rows[2]["dsc_drop_ci_high"])
    assert low <= float(rows[2]["dsc_delta_pct"]) <= high and low > 0
    md = md_path.read_text()
    lines = md.splitlines()
    assert "0.900 (ref.)" in lines[2] and "(0.0%" not in lines[2]
    assert f"[{low:.1f}, {high:.1f}]*" in lines[4] and "UNTRAINED" in lines[4]
    assert "Holm" in md
    assert records[1]["stats"]["holm"] is False  # the records themselves are not changed


def test_clear_cache_keeps_checkpoints(tmp_path, capsys):
    for folder in ("baselines", "calibration", "persistent", "labels", "checkpoints"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "x").write_text("1")
    assert sweep_main(["clear-cache", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints"]
    assert "checkpoints kept" in capsys.readouterr().out
    assert sweep_main(["clear-cache", str(tmp_path / "nope")]) == 2
