"""``hydra/launcher=mqb_pool``: run a sweep's configs on a pool of long-lived worker processes on one machine.

Hydra's basic launcher runs a sweep's configs one after another in one process; submitit's local launcher starts
a Python process per config. This launcher keeps ``workers`` processes (a :class:`concurrent.futures.
ProcessPoolExecutor` with the ``spawn`` start method: safe with CUDA) for the whole sweep and hands them the configs
as they become free, so each worker pays for Python, torch, its GPU context and mqb's in-process caches (the built
model, the prepared data) once, and several configs run at once (one GPU per worker with ``devices``).

Each config runs through Hydra's own ``run_job`` (its output folder, ``.hydra/`` files, job logging and callbacks)
exactly as under the basic launcher; the job configs are composed in the workers, as submitit's launcher does.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import queue
import signal
from collections.abc import Sequence
from concurrent.futures import CancelledError, ProcessPoolExecutor
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)


def _start_worker(devices: Any, threads: int | None) -> None:
    """Pool initializer, run once per worker before any config: its device (``CUDA_VISIBLE_DEVICES``, before CUDA
    is initialised) and its share of the CPU threads."""
    if devices is not None:
        try:
            os.environ["CUDA_VISIBLE_DEVICES"] = str(devices.get_nowait())
        except queue.Empty:
            pass
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)
        import torch

        torch.set_num_threads(threads)


def _run_config(payload: bytes, overrides: list[str], idx: int) -> bytes:
    """One config in a worker: compose its job config, then Hydra's ``run_job`` (output folder, logging, task).
    The sweep's context travels cloudpickled (as with submitit: Hydra's singletons hold local resolver functions
    that the standard pickle refuses), and so does the returned ``JobReturn``."""
    import cloudpickle

    hydra_context, config, task_function, singleton_state = cloudpickle.loads(payload)
    setup_globals()
    Singleton.set_state(singleton_state)
    sweep_config = hydra_context.config_loader.load_sweep_config(config, list(overrides))
    with open_dict(sweep_config):
        sweep_config.hydra.job.id = f"{sweep_config.hydra.job.name}_{idx}"
        sweep_config.hydra.job.num = idx
    ret = run_job(hydra_context=hydra_context, task_function=task_function, config=sweep_config,
                  job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")  # fmt: skip
    ret.hydra_cfg = None  # the HydraConfig node does not travel back (not needed by the sweep)
    return cloudpickle.dumps(ret)


class PoolLauncher(Launcher):
    """Hydra launcher: a sweep's configs on ``workers`` long-lived processes (see the module docstring)."""

    def __init__(self, workers: int = 1, devices: Any = None, threads: Any = None) -> None:
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
            raise ValueError(f"hydra.launcher.workers={workers!r} is invalid; valid: a number of worker processes >= 1")
        devices = OmegaConf.to_container(devices) if OmegaConf.is_config(devices) else devices
        if devices is not None and (not isinstance(devices, list) or len(devices) < workers):
            raise ValueError(f"hydra.launcher.devices={devices!r} is invalid; valid: null, or a list with one device "
                             f"per worker ({workers} entries, e.g. {list(range(workers))})")  # fmt: skip
        self.workers, self.devices = workers, devices
        self.threads = threads if threads else max(1, (os.cpu_count() or 1) // workers)
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        setup_globals()
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        workers = min(self.workers, len(job_overrides))
        log.info(f"mqb_pool: {len(job_overrides)} configs on {workers} worker process(es), sweep dir {sweep_dir}")
        context = multiprocessing.get_context("spawn")
        devices = None
        if self.devices is not None:
            devices = context.Manager().Queue()
            for device in self.devices[:workers]:
                devices.put(device)
        import cloudpickle

        payload = cloudpickle.dumps((self.hydra_context, self.config, self.task_function, Singleton.get_state()))
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                                 initargs=(devices, self.threads)) as pool:  # fmt: skip
            futures = []

            def forward(signum: int, frame: Any) -> None:
                """SIGTERM (preemption) to the workers, which stop at their next batch (mqb.preemption) and
                start no further config; configs not started yet are cancelled. The sweep then exits 143."""
                for future in futures:
                    future.cancel()
                for process in list(getattr(pool, "_processes", {}).values()):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(process.pid, signum)

            previous = signal.signal(signal.SIGTERM, forward)
            try:
                for i, overrides in enumerate(job_overrides):
                    idx = initial_job_idx + i
                    log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
                    futures.append(pool.submit(_run_config, payload, list(overrides), idx))
                return [cloudpickle.loads(f.result()) for f in futures]
            except CancelledError:
                from mqb.preemption import Preempted

                raise Preempted("the sweep") from None
            finally:
                signal.signal(signal.SIGTERM, previous)
