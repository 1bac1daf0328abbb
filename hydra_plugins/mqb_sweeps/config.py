"""Schema of ``hydra/launcher=mqb_pool`` (registered when Hydra discovers its plugins)."""

from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore


@dataclass
class PoolLauncherConf:
    """``workers``: long-lived worker processes (each keeps its Python, torch and GPU context, and mqb's in-process
    model and data caches, across the configs it runs). ``devices``: one entry per worker, exported as
    ``CUDA_VISIBLE_DEVICES`` in it (``[0, 1, 2, 3]`` for one GPU each; ``null``: all workers see every device).
    ``threads``: torch threads per worker (``null``: the CPU count divided among the workers)."""

    _target_: str = "hydra_plugins.mqb_sweeps.pool_launcher.PoolLauncher"
    workers: int = 1
    devices: Any = None
    threads: Any = None


ConfigStore.instance().store(group="hydra/launcher", name="mqb_pool", node=PoolLauncherConf, provider="mqb")


@dataclass
class GridSweeperConf:
    """Hydra's basic sweeper settings (``max_batch_size``, ``params``); see :mod:`.grid_sweeper`."""

    _target_: str = "hydra_plugins.mqb_sweeps.grid_sweeper.GridSweeper"
    max_batch_size: Any = None
    params: Any = None


ConfigStore.instance().store(group="hydra/sweeper", name="mqb_grid", node=GridSweeperConf, provider="mqb")
