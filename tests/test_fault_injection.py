"""Issue 16, "Tests": kill a sweep with ``kill -9`` at random points, relaunch it, and check that every config ends
with exactly one valid record, that no temporary file is left behind and that ``mqb.sweep status`` is right.

The kills are real SIGKILLs of a real ``python -m mqb.eval -m`` sweep (tiny synthetic data, untrained net,
``logger=none``): at a random delay (during start-up, data generation, the FP32 baseline, calibration or
evaluation), and at the k-th atomic write of the process (:func:`mqb.results.atomic_write`: the temporary file is
complete, the rename has not happened: the moment a record or a cache entry is written). The second kind needs a
precise moment, so the sweep then runs under a small wrapper, written here, that SIGKILLs its own process from
``os.replace``; mqb itself has no test hook.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from mqb.results import _TEMP_NAME, check_record, load_records, lock_holder, read_lock
from tests.test_eval_cli import ROOT, _env

#: Three configs (FP32 and two quantized) on 4 synthetic 32^3 volumes, a slim UNet: one config takes seconds.
GRID = ["precision=fp32,w8a8,w4a4", "granularity=per_tensor"]
ARGS = ["hydra/launcher=basic", "model.checkpoint=null", "model.net.channels=[4,8,16,32,64]", "logger=none",
        "dataset.source.num_cases=4", "dataset.source.shape=[32,32,32]", "dataset.roi_size=[32,32,32]",
        "dataset.splits={test: 1, calib: 1, val: 0}", "trainer.progress=false"]  # fmt: skip

#: Runs ``mqb.eval`` and SIGKILLs its own process at the FI_KILL_AT-th ``os.replace`` into FI_DIR (any folder when
#: empty): after a temporary file was written and synced, before it is renamed over the record or cache entry.
KILLER = '''
import os, runpy, signal, sys
folder, kill_at = os.environ["FI_DIR"], int(os.environ["FI_KILL_AT"])
real_replace, seen = os.replace, [0]
def replace(src, dst, *args, **kwargs):
    if not folder or os.path.dirname(os.path.abspath(dst)) == folder:
        seen[0] += 1
        if seen[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst, *args, **kwargs)
os.replace = replace
sys.path.insert(0, os.getcwd())  # as `python -m` does (the repository's hydra_plugins)
sys.argv = ["mqb.eval", *sys.argv[1:]]
runpy.run_module("mqb.eval", run_name="__main__", alter_sys=True)
'''


def _temp_files(*roots: Path) -> list[Path]:
    return [p for root in roots for p in root.rglob(".*") if _TEMP_NAME.match(p.name) and p.suffix != ".lock"]


def _cmd(tmp: Path, sweep: str, script: Path | None = None) -> list[str]:
    head = [sys.executable, str(script)] if script else [sys.executable, "-m", "mqb.eval"]
    return [*head, "-m", *GRID, *ARGS, f"paths.output_dir={tmp / 'out'}", f"paths.cache_dir={tmp / 'cache'}",
            f"hydra.sweep.dir={tmp / sweep}"]  # fmt: skip


def _status(results: Path, sweep: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mqb.sweep", "status", str(results), "--sweep", str(sweep)],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_a_sweep_killed_at_random_points_ends_with_one_valid_record_per_config(tmp_path, seed):
    rng = random.Random(seed)
    results, cache = tmp_path / "out" / "results", tmp_path / "cache"
    killer = tmp_path / "kill_at_write.py"
    killer.write_text(KILLER)
    plan = [  # each step relaunches the sweep and kills it
        ("any_write", rng.randint(1, 14)),  # the k-th atomic write of a cold start: synthetic volume, cache, record
        ("after", rng.uniform(0.5, 5.0)),  # seconds after Hydra launches the jobs: data, baseline, calibration, eval
        ("record_write", rng.randint(1, 3)),  # the k-th record of a resume=false relaunch, over a valid one
    ]
    killed = 0
    for step, (how, when) in enumerate(plan):
        sweep = f"sweep{step}"
        if how == "after":
            log = tmp_path / f"{sweep}.log"
            with open(log, "wb") as out:
                proc = subprocess.Popen(_cmd(tmp_path, sweep), cwd=ROOT, env=_env(), stdout=out, stderr=out)
                deadline = time.monotonic() + 300
                while b"Launching 3 jobs" not in log.read_bytes() and proc.poll() is None:
                    assert time.monotonic() < deadline, log.read_text()[-3000:]
                    time.sleep(0.05)
                try:
                    proc.wait(timeout=when)
                except subprocess.TimeoutExpired:
                    os.kill(proc.pid, signal.SIGKILL)
                returncode = proc.wait(timeout=60)
        else:
            env = {**_env(), "FI_DIR": str(results) if how == "record_write" else "", "FI_KILL_AT": str(when)}
            extra = ["resume=false"] if how == "record_write" else []
            proc = subprocess.Popen([*_cmd(tmp_path, sweep, killer), *extra], cwd=ROOT, env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
            returncode = proc.wait(timeout=600)
            assert returncode == -signal.SIGKILL, f"step {step}: the sweep ended ({returncode}) before write {when}"
            mine = [t for t in _temp_files(tmp_path) if t.name.startswith(f".{proc.pid}@")]
            assert len(mine) == 1, mine  # killed with its temporary file written and not renamed
        killed += returncode == -signal.SIGKILL
        records, bad = load_records(results)
        assert bad == [], f"step {step} ({how} {when}): {[b.message() for b in bad]}"  # every record whole
        assert all(r["status"] == "success" for r in records)
    assert killed >= 2, "the write kills always find a sweep at work"

    # a killed sweep: status counts what is there, and a dead process's claim is not "running"
    st = _status(results, tmp_path / "sweep2")
    done = len(load_records(results)[0])
    assert f"{done} done, 0 failed, {3 - done} missing" in st.stdout, st.stdout + st.stderr
    assert st.returncode == (0 if done == 3 else 1)

    final = subprocess.run(_cmd(tmp_path, "final"), cwd=ROOT, env=_env(), capture_output=True, text=True,
                           timeout=600)  # fmt: skip
    assert final.returncode == 0, final.stdout[-2000:] + final.stderr[-3000:]
    ids = sorted(p.read_text().strip() for p in (tmp_path / "final").glob("*/record_id.txt"))
    assert len(ids) == 3 and len(set(ids)) == 3
    assert sorted(p.name for p in results.glob("*.json")) == sorted(f"{i}.json" for i in ids)  # one per config
    for cid in ids:
        record, problem = check_record(results / f"{cid}.json")
        assert problem is None and record["status"] == "success" and record["id"] == cid
        assert lock_holder(results, cid) is None  # nobody holds a claim any more ...
    for lock in results.glob(".*.lock"):  # ... and a lock left by a killed process is stale (never blocks)
        info = read_lock(lock)
        assert info is not None and info.pid != os.getpid()
    assert {r["precision"] for r in load_records(results)[0]} == {"fp32", "w8a8", "w4a4"}
    # killed writers' temporary files were removed by the relaunch (run folders of killed jobs are not revisited:
    # a copy of the record that was being written there stays a hidden temporary file)
    assert _temp_files(results, cache) == []

    st = _status(results, tmp_path / "final")
    assert st.returncode == 0 and "3 done, 0 failed, 0 missing" in st.stdout, st.stdout + st.stderr


def test_a_cached_volume_cut_short_is_computed_again_and_leftovers_are_removed(tmp_path):
    """A persistent-cache item cut short (a kill while it was copied) is recomputed, not a failure of every later
    run; a killed writer's temporary file in the cache folder is removed when the dataset is made."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from mqb.config import CONF_DIR, register_configs

    register_configs()
    overrides = ["dataset.source.num_cases=3", "dataset.source.shape=[24,24,16]",
                 "dataset.splits={test: 1, calib: 1, val: 0}", f"paths.cache_dir={tmp_path}"]  # fmt: skip
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        dm = instantiate(compose("eval", overrides=overrides).dataset)
    first = next(iter(dm.test_dataloader()))
    folder = tmp_path / "persistent" / "synthetic"
    (item,) = list(folder.glob("*.pt"))
    item.write_bytes(item.read_bytes()[:200])  # cut short
    leftover = folder / f".{_dead_pid()}@{_host()}.{'0' * 32}.{item.name}"
    leftover.write_bytes(b"partial")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = next(iter(dm.test_dataloader()))
    assert torch.equal(again["image"].as_tensor(), first["image"].as_tensor())
    assert any("computing it again" in str(w.message) for w in caught)
    assert item.stat().st_size > 200  # written again, whole
    assert not leftover.exists() and _temp_files(tmp_path) == []


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _host() -> str:
    from mqb.results import _HOST_TAG

    return _HOST_TAG
