"""Faults that used to pass silently: unsaved sweeps, corrupt records, mislabelled overrides, leftovers and gaps.

Each test drives the real CLI where the behaviour is the CLI's (``python -m mqb.eval`` / ``mqb.sweep`` /
``mqb.report`` in a subprocess, tiny synthetic data, untrained net) and calls functions directly otherwise.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
import types
import uuid
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import mqb.jobs
import mqb.loggers
import mqb.pipeline
from mqb.config import CONF_DIR, register_configs
from mqb.jobs import SweepSummaryCallback, run_job
from mqb.pipeline import precision_label
from mqb.results import (
    ResultsDirError,
    check_record,
    clean_temp_files,
    config_id,
    lock_path,
    read_records,
    try_claim,
    write_json_atomic,
)
from tests.test_eval_cli import ROOT, TINY, _env, run_cli

register_configs()
UNTRAINED = ["model.checkpoint=null", "logger=none", *TINY]


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="eval", overrides=list(overrides))


def _cli(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=_env())  # fmt: skip


def _record(rid: str, **extra) -> dict:
    r = {"id": rid, "status": "success", "created": "2026-01-01T00:00:00", "model": "unet", "dataset": "synthetic",
         "precision": "w8a8", "granularity": "per_channel", "method": "rtn",
         "metrics": {"dsc": 0.8, "nsd": 0.7, "hd95": 3.0},
         "delta_pct": {"dsc": 1.0, "nsd": 2.0, "hd95": 0.0}}  # fmt: skip
    r.update(extra)
    return r


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# -- 1. a sweep that saved nothing ----------------------------------------------------------------------------
def _unwritable(tmp_path: Path) -> Path:
    """A results_dir no record can go to: read-only (chmod, or a read-only tmpfs as root), else a path under a
    regular file (never creatable)."""
    folder = tmp_path / "ro_results"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return folder
    if shutil.which("mount") and subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)],
                                                capture_output=True).returncode == 0:  # fmt: skip
        return folder
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    return blocker / "results"


def test_unwritable_results_dir_fails_before_any_work_and_the_sweep_exits_nonzero(tmp_path, monkeypatch):
    results = _unwritable(tmp_path)
    try:
        proc = run_cli("mqb.eval", "-m", "precision=w8a8,w4a4", f"results_dir={results}", *UNTRAINED, tmp=tmp_path,
                       check=False)  # fmt: skip
        single = run_cli("mqb.eval", f"results_dir={results}", *UNTRAINED, tmp=tmp_path, check=False)
    finally:
        subprocess.run(["umount", str(results)], capture_output=True) if os.geteuid() == 0 else None
    assert proc.returncode != 0 and "cannot take records" in proc.stderr, proc.stderr[-2000:]
    assert single.returncode == 2 and "cannot take records" in single.stderr and "Traceback" not in single.stderr
    assert not (tmp_path / "cache" / "baselines").exists()  # nothing was evaluated
    assert not list((tmp_path / "out").rglob("record.json"))

    # the disk fills up during a run: the final write fails -> a clear error, no success record anywhere
    cfg = _compose(f"results_dir={tmp_path / 'full'}", f"paths.output_dir={tmp_path / 'out2'}", *UNTRAINED)
    run_dir = tmp_path / "run"
    monkeypatch.setattr(mqb.pipeline, "evaluate", lambda c: {**_record("x"), "sweep": "s", "run_dir": str(run_dir)})

    def full(path, obj):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mqb.jobs, "write_json_atomic", full)
    with pytest.raises(ResultsDirError, match="could not save the record") as info:
        run_job(cfg)
    assert info.value.mqb_error_record is None  # the CLI then says "NO record written", not "error record written"
    assert not list(tmp_path.rglob("record.json")) and not list((tmp_path / "full").glob("*.json"))

    # any config of a sweep without a record (here: started, nothing saved) -> the sweep exits 1
    sweep = tmp_path / "multirun" / "s"
    (sweep / "0_a" / ".hydra").mkdir(parents=True)
    (sweep / "0_a" / "record_id.txt").write_text("abc")
    conf = OmegaConf.create({"results_dir": str(tmp_path / "full"), "logger": None,
                             "hydra": {"sweep": {"dir": str(sweep)}, "overrides": {"task": []}}})  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        SweepSummaryCallback().on_multirun_end(conf)
    assert exit_info.value.code == 1


# -- 2. corrupt records ---------------------------------------------------------------------------------------
def test_corrupt_records_are_named_and_treated_as_missing_by_every_reader(tmp_path, monkeypatch):
    results = tmp_path / "results"
    write_json_atomic(results / "good.json", _record("good"))
    full = json.dumps(_record("trunc"))
    (results / "trunc.json").write_text(full[: len(full) // 2])  # a write cut short
    (results / "list.json").write_text("[]")
    (results / "binary.json").write_bytes(b"\xff\xfe\x00garbage")
    write_json_atomic(results / "nometrics.json", {k: v for k, v in _record("nometrics").items() if k != "metrics"})
    bad = ("trunc.json", "list.json", "binary.json", "nometrics.json")

    st = _cli("mqb.sweep", "status", str(results))
    assert st.returncode == 1 and "1 done, 0 failed, 4 missing" in st.stdout, st.stdout + st.stderr
    sm = _cli("mqb.sweep", "summary", str(results), "--out", str(tmp_path / "summary"))
    rp = _cli("mqb.report", str(results), "--out", str(tmp_path / "report"))
    for proc in (st, sm, rp):
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
        for name in bad:
            assert f"corrupt record {results / name}" in proc.stderr
    assert sm.returncode == 0 and rp.returncode == 0
    assert (tmp_path / "summary.md").read_text().count("| unet |") == 1
    assert [r["id"] for r in read_records(results, on_bad=None)] == ["good"]
    assert check_record(results / "list.json")[1].reason.startswith("not a JSON object")

    # resume re-runs a config whose success record is corrupt (and the new record replaces it)
    cfg = _compose(f"results_dir={results}", f"paths.output_dir={tmp_path / 'out'}", *UNTRAINED)
    cid = config_id(cfg)
    (results / f"{cid}.json").write_text(full[:100])
    ran = []
    fake = {**_record(cid), "sweep": "s", "run_dir": str(tmp_path / "run")}
    monkeypatch.setattr(mqb.pipeline, "evaluate", lambda c: ran.append(1) or fake)
    run_job(cfg)
    assert ran == [1] and check_record(results / f"{cid}.json")[0]["id"] == cid
    run_job(cfg)  # now valid: skipped
    assert ran == [1]


# -- 5. overrides are labelled by what ran; contradictions are rejected ----------------------------------------
def test_precision_label_follows_the_settings_and_contradictions_are_rejected(tmp_path):
    presets = sorted(p.stem for p in (CONF_DIR / "precision").glob("*.yaml"))
    for name in presets:  # unmodified presets keep their names
        assert precision_label(_compose(f"precision={name}")) == name
    four = _compose("precision=w8a8", "precision.weight.bits=4", "precision.activation.bits=4")
    assert precision_label(four) == "w4a4"
    assert precision_label(_compose("precision=w8a8", "precision.activation=null")) == "w8a16"
    assert precision_label(_compose("precision=w8a8", "precision.activation.symmetric=false")) == "w8a8+a_asym"
    assert precision_label(_compose("precision=w8a8", "precision.activation.dynamic=true")) == "w8a8+a_dynamic"
    assert precision_label(_compose("precision=fp32", "precision.compute_dtype=bfloat16")) == "bf16"
    assert precision_label(_compose("precision=w8a8", "precision.weight.format=mxfp4")) == "wmxfp4a8"

    fp8_bits = run_cli("mqb.eval", "precision=w8a8", "precision.weight.format=fp8_e4m3", "precision.weight.bits=4",
                       *UNTRAINED, tmp=tmp_path, check=False)  # fmt: skip
    assert fp8_bits.returncode == 2
    assert "precision.weight.bits=4 contradicts precision.weight.format=fp8_e4m3" in fp8_bits.stderr
    voxel_static = run_cli("mqb.eval", "granularity=per_voxel", "precision.activation.dynamic=false", *UNTRAINED,
                           tmp=tmp_path, check=False)  # fmt: skip
    assert voxel_static.returncode == 2
    assert "precision.activation.dynamic=false contradicts granularity=per_voxel" in voxel_static.stderr
    assert not (tmp_path / "cache" / "baselines").exists()  # rejected before the FP32 baseline
    errors = [json.loads(p.read_text()) for p in (tmp_path / "out" / "results").glob("*.error.json")]
    assert len(errors) == 2 and not list((tmp_path / "out" / "results").glob("*[!r].json"))


# -- 8. leftovers and small gaps ------------------------------------------------------------------------------
def test_leftover_temp_files_are_removed(tmp_path):
    dead = _dead_pid()
    host = mqb.jobs.__dict__["clean_temp_files"].__globals__["_HOST_TAG"]
    killed = tmp_path / f".{dead}@{host}.{uuid.uuid4().hex}.abc.json"  # this host, process gone
    legacy = tmp_path / f".{dead}.{uuid.uuid4().hex}.old.json"  # older name without host, an hour old
    live = tmp_path / f".{os.getpid()}@{host}.{uuid.uuid4().hex}.cur.json"  # a write in flight
    other_host = tmp_path / f".{dead}@elsewhere.{uuid.uuid4().hex}.x.json"  # maybe in flight on another node
    for f in (killed, legacy, live, other_host):
        f.write_text("{")
    os.utime(legacy, (time.time() - 3600, time.time() - 3600))
    (tmp_path / "keep.json").write_text("{}")
    assert sorted(clean_temp_files(tmp_path)) == sorted([killed, legacy])
    assert live.exists() and other_host.exists() and (tmp_path / "keep.json").exists()


def test_sweep_status_lists_the_whole_grid_of_a_killed_sweep(tmp_path):
    results, sweep = tmp_path / "results", tmp_path / "multirun" / "2026-01-01_00-00-00"
    task = ["precision=w8a8,w4a4", "granularity=per_channel,adaptive", "model.checkpoint=null"]
    sweep.mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"hydra": {"sweeper": {
        "_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper", "max_batch_size": None, "params": None},
        "overrides": {"task": task}}}), sweep / "multirun.yaml")  # fmt: skip
    first = ["precision=w8a8", "granularity=per_channel", "model.checkpoint=null"]
    rid = config_id(_compose(*first))
    (sweep / "0_unet_w8a8" / ".hydra").mkdir(parents=True)  # the only job that started before the kill
    (sweep / "0_unet_w8a8" / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in first))
    (sweep / "0_unet_w8a8" / "record_id.txt").write_text(rid)
    write_json_atomic(results / f"{rid}.json", _record(rid))
    proc = _cli("mqb.sweep", "status", str(results), "--sweep", str(sweep))
    assert proc.returncode == 1 and "1 done, 0 failed, 3 missing" in proc.stdout, proc.stdout + proc.stderr
    never = config_id(_compose("precision=w4a4", "granularity=adaptive", "model.checkpoint=null"))
    assert never in proc.stdout  # a never-started config, with the id it will write


def test_calibration_volumes_and_empty_sweeps_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="calibration.num_volumes=0 is invalid"):
        mqb.pipeline.build_recipe(_compose("calibration.num_volumes=0"))
    proc = run_cli("mqb.eval", "calibration.num_volumes=-1", *UNTRAINED, tmp=tmp_path, check=False)
    assert proc.returncode == 2 and "calibration.num_volumes=-1 is invalid" in proc.stderr
    empty = run_cli("mqb.eval", "-m", "model=glob(no_such_model*)", *UNTRAINED, tmp=tmp_path, check=False)
    assert empty.returncode == 2 and "the sweep ran no config" in empty.stderr


def test_wandb_mode_offline_wins_over_a_configured_key(tmp_path, monkeypatch):
    seen = {}

    class Run:
        def log(self, data):
            pass

        def finish(self):
            pass

    fake = types.SimpleNamespace(init=lambda **kw: seen.update(kw) or Run(), Table=lambda **kw: kw)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_MODE", "offline")
    mqb.loggers.log_sweep_table([_record("a")], "s", tmp_path, OmegaConf.create({"project": "mqb"}))
    assert seen["mode"] == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    mqb.loggers.log_sweep_table([_record("a")], "s", tmp_path, OmegaConf.create({"offline": False}))
    assert seen["mode"] == "disabled"
    monkeypatch.delenv("WANDB_MODE")
    assert mqb.loggers.wandb_mode(OmegaConf.create({})) == "online"  # a key and no WANDB_MODE: online


def test_claims_stale_locks_of_dead_processes_are_retaken(tmp_path):
    first = try_claim(tmp_path, "cfg")
    assert not isinstance(first, type(None)) and hasattr(first, "release")
    held = try_claim(tmp_path, "cfg")  # a second claim while the first is held (a live pid of this host)
    assert held.pid == os.getpid() and "pid" in held.describe()
    first.release()
    assert not lock_path(tmp_path, "cfg").exists()
    # a lock left by a killed process of this host does not block a relaunch
    import platform

    stale = {"pid": _dead_pid(), "host": platform.node(), "created": "2026-01-01T00:00:00+00:00", "token": "t"}
    lock_path(tmp_path, "cfg").write_text(json.dumps(stale))
    again = try_claim(tmp_path, "cfg")
    assert hasattr(again, "release")
    again.release()


def test_two_identical_sweeps_started_together_compute_each_config_once(tmp_path):
    results = tmp_path / "out" / "results"
    results.mkdir(parents=True)
    leftover = results / f".{_dead_pid()}.{uuid.uuid4().hex}.zz.json"  # a killed writer's temp file (old name)
    leftover.write_text("{")
    os.utime(leftover, (time.time() - 3600, time.time() - 3600))
    args = ["-m", "precision=w8a8", "precision.weight.bits=4", "precision.activation.bits=4",
            "granularity=per_tensor,per_channel", *UNTRAINED, "dataset.splits={test: 1, calib: 1, val: 1}"]  # fmt: skip
    cmd = [sys.executable, "-m", "mqb.eval", *args, f"paths.output_dir={tmp_path / 'out'}",
           f"paths.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    procs = [subprocess.Popen([*cmd, f"hydra.sweep.dir={tmp_path / f'sweep{i}'}"], cwd=ROOT, env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]  # fmt: skip
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-2000:] + err[-3000:]
    computed = list(tmp_path.glob("sweep*/*/record.json"))  # a run folder gets a record only where it computed
    assert len(computed) == 2, [str(c) for c in computed]
    recs = read_records(results, on_bad=None)
    assert len(recs) == 2 and {r["precision"] for r in recs} == {"w4a4"}  # labelled by what ran
    assert {r["precision_preset"] for r in recs} == {"w8a8"}
    assert not leftover.exists() and not list(results.glob(".*.lock"))
