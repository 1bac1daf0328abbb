"""A real W&B run in offline mode (no key, no network, no WANDB_* variables), read back from its run file."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from wandb.proto import wandb_internal_pb2 as pb

from mqb.loggers import CLASS_TABLE_COLUMNS
from tests.test_eval_cli import TINY, records, run_cli

BLOCK = 32768  # the .wandb file is a LevelDB-style log: 7-byte file header, 32 KiB blocks of chunked records


def read_wandb_records(path: Path) -> list[pb.Record]:
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, chunks, pending = 7, [], b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        chunk, pos = data[pos : pos + length], pos + length
        if kind == 0:
            break
        if kind == 1:
            chunks.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            chunks.append(pending + chunk)
    out = []
    for chunk in chunks:
        record = pb.Record()
        record.ParseFromString(chunk)
        out.append(record)
    return out


def test_offline_wandb_run_is_written_and_readable(tmp_path):
    proc = run_cli("mqb.eval", "logger=wandb", "model.checkpoint=null", *TINY, tmp=tmp_path)
    assert "wandb sync" in proc.stdout + proc.stderr  # tells the user how to upload later
    (record,) = records(tmp_path / "out" / "results")
    run_files = list(Path(record["run_dir"]).glob("wandb/offline-run-*/run-*.wandb"))
    assert len(run_files) == 1
    parsed = read_wandb_records(run_files[0])
    run = next(r.run for r in parsed if r.WhichOneof("record_type") == "run")
    assert run.display_name == "unet-w8a8-per_channel-rtn"
    assert {"unet", "w8a8", "per_channel", "rtn", "synthetic"} <= set(run.tags)
    history = {}
    for r in parsed:
        if r.WhichOneof("record_type") == "history":
            history.update(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            )
    assert abs(history["test/dsc"] - record["metrics"]["dsc"]) < 1e-6
    assert abs(history["baseline/dsc"] - record["baseline"]["dsc"]) < 1e-6
    config = next(r.config for r in parsed if r.WhichOneof("record_type") == "config")
    keys = {item.key or "/".join(item.nested_key) for item in config.update}
    assert {"model", "precision", "granularity"} <= keys
    summary_keys = {
        u.key or "/".join(u.nested_key)
        for r in parsed
        if r.WhichOneof("record_type") == "summary"
        for u in r.summary.update
    }
    assert "untrained" in summary_keys and record["untrained"] is True
    # the per-class table carries each class's ↓Δ% and 95 % interval: those of the record's stats section
    table = json.loads(next(run_files[0].parent.glob("files/media/table/per_class_*.table.json")).read_text())
    rows = {row[0]: dict(zip(table["columns"], row, strict=True)) for row in table["data"]}
    assert table["columns"] == list(CLASS_TABLE_COLUMNS) and list(rows)[-1] == "mean"
    for metric in ("dsc", "nsd"):
        stats = record["stats"][metric]
        for name, entry in [*stats["per_class"].items(), ("mean", stats["mean"])]:
            got = [rows[name][f"{metric}_{c}"] for c in ("delta_pct", "drop_ci_low", "drop_ci_high", "p")]
            assert got == [entry[k] for k in ("drop_pct", "drop_pct_ci_low", "drop_pct_ci_high", "p")], (name, metric)
        assert history[f"delta_pct_ci/{metric}_low"] == pytest.approx(stats["mean"]["drop_pct_ci_low"])


@pytest.mark.slow
def test_sweep_summary_table_is_logged_offline(tmp_path):
    run_cli("mqb.eval", "-m", "precision=w8a8,w4a4", "logger=wandb", "model.checkpoint=null", *TINY, tmp=tmp_path)
    (sweep_dir,) = (tmp_path / "out" / "multirun").iterdir()
    assert (sweep_dir / "summary.md").read_text().count("| unet |") == 2
    tables = list(sweep_dir.glob("wandb/offline-run-*/files/media/table/sweep_summary_*.table.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    assert len(table["data"]) == 2 and "dsc_delta_pct" in table["columns"]
    runs = {}
    for run_file in sweep_dir.glob("wandb/offline-run-*/run-*.wandb"):
        run = next(r.run for r in read_wandb_records(run_file) if r.WhichOneof("record_type") == "run")
        runs[run.display_name] = run.run_group
    assert runs == {f"{sweep_dir.name}-summary": sweep_dir.name}
    groups = {r["sweep"] for r in records(tmp_path / "out" / "results")}
    assert groups == {sweep_dir.name}  # the per-config runs share the sweep's group
