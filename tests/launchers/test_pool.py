"""``hydra/launcher=mqb_pool``: a sweep on a pool of long-lived worker processes."""

from __future__ import annotations

import re

import pytest

from hydra_plugins.mqb_sweeps.pool_launcher import PoolLauncher
from tests.test_eval_cli import TINY, records, run_cli


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [({"workers": 0}, "hydra.launcher.workers=0"), ({"workers": 2, "devices": [0]}, "hydra.launcher.devices=[0]"),
     ({"workers": True}, "hydra.launcher.workers=True")],
)  # fmt: skip
def test_bad_pool_settings_are_named(kwargs, key):
    with pytest.raises(ValueError, match=f"{re.escape(key)}.*valid"):
        PoolLauncher(**kwargs)


def test_the_pool_launcher_is_a_discovered_hydra_plugin():
    from hydra.core.plugins import Plugins
    from hydra.plugins.launcher import Launcher

    # Hydra loads plugin modules on its own (not through sys.modules): compare by name
    names = {f"{c.__module__}.{c.__qualname__}" for c in Plugins.instance().discover(Launcher)}
    assert "hydra_plugins.mqb_sweeps.pool_launcher.PoolLauncher" in names


@pytest.mark.slow
def test_pool_sweep_runs_every_config_on_long_lived_workers(tmp_path):
    """5 configs on 2 workers: every config has a success record, the configs ran in (at most) 2 processes other
    than the sweep's own, and each worker saw the device it was given; a relaunch resumes (nothing recomputed)."""
    args = ["-m", "hydra/launcher=mqb_pool", "hydra.launcher.workers=2", "hydra.launcher.devices=[dev0,dev1]",
            "precision=w8a8,w4a4,w4a8,fp32,fp16", "granularity=per_tensor", "model.checkpoint=null", "logger=none",
            *TINY]  # fmt: skip
    run_cli("mqb.eval", *args, tmp=tmp_path)
    done = [r for r in records(tmp_path / "out" / "results") if r["status"] == "success"]
    assert sorted(r["precision"] for r in done) == ["fp16", "fp32", "w4a4", "w4a8", "w8a8"]
    pids = {r["host"]["pid"] for r in done}
    assert 1 <= len(pids) <= 2  # configs share worker processes
    assert {r["host"]["cuda_visible_devices"] for r in done} <= {"dev0", "dev1"}
    assert len({(r["host"]["pid"], r["host"]["cuda_visible_devices"]) for r in done}) == len(pids)  # one per worker
    again = run_cli("mqb.eval", *args, tmp=tmp_path)
    assert again.stdout.count("a success record exists") == 5


@pytest.mark.slow
def test_sigterm_to_a_pool_sweep_stops_its_workers_and_the_relaunch_completes(tmp_path):
    """SIGTERM to the sweep (what SLURM sends to the job) reaches the workers, which stop at their next batch: the
    sweep exits 143 with no half-written file; the relaunch computes what is missing."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.test_eval_cli import ROOT, _env

    grid = ["precision=w8a8,w4a4,w4a8", "granularity=per_tensor,per_channel"]  # 6 configs
    paths = [f"paths.output_dir={tmp_path / 'out'}", f"paths.cache_dir={tmp_path / 'cache'}"]
    args = ["-m", "hydra/launcher=mqb_pool", "hydra.launcher.workers=2", *grid, "model.checkpoint=null",
            "logger=none", *TINY, *paths]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "mqb.eval", *args], cwd=ROOT, env=_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    deadline = time.monotonic() + 300
    while not list((tmp_path / "out").glob("multirun/*/*/.hydra")) and time.monotonic() < deadline:
        time.sleep(0.2)  # until a worker has started a config
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 143, out[-3000:]
    results = tmp_path / "out" / "results"
    assert not list(results.glob(".*")) and not list(results.glob("*.error.json"))  # nothing half-written or failed
    assert len(records(results)) < 6
    run_cli("mqb.eval", *args[:-2], tmp=tmp_path)
    done = [r for r in records(results) if r["status"] == "success"]
    assert len(done) == 6
    assert not [p for p in (tmp_path / "cache").rglob(".*") if p.is_file() and os.sep + "." in str(p)]
