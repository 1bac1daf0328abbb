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
