"""``python -m mqb.eval``: FP32 baseline (cached) + quantized evaluation, one JSON record per config.

python -m mqb.eval                                           # defaults: unet, synthetic, w8a8, per_channel
python -m mqb.eval -m model=unetr,swinunetr_t precision=w4a4 granularity=adaptive
python -m mqb.eval --help                                    # groups and choices

The Hydra task only: a config goes to :func:`mqb.jobs.run_job` (resume, claim, record), which runs
:func:`mqb.pipeline.evaluate`. Torch, MONAI and Lightning are imported when a config runs, not before, so
``--help``, ``--cfg`` and command-line errors come in about a second.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from mqb.cli import check_group_choices, is_multirun, user_error, with_launchers
from mqb.config import CONF_DIR, register_configs
from mqb.preemption import stop_on_sigterm


def run_task(cfg: DictConfig) -> None:
    """The Hydra task: one config. Module-level and undecorated so launchers pickle it by reference. A user error
    ends a single run with exit 2 and one line; in a sweep the config's error record says it and the sweep goes on
    (its end exits non-zero). SIGTERM (preemption) ends the process at the next batch with exit 143 and no record
    of the config; the relaunch computes it."""
    from mqb.analysis.tables import console
    from mqb.jobs import run_job

    try:
        with stop_on_sigterm():  # SIGTERM: stop at the next batch, write nothing, exit 143 (mqb.preemption)
            run_job(cfg)
    except Exception as err:  # noqa: BLE001
        problem = user_error(err)
        if is_multirun():
            where = getattr(err, "mqb_error_record", None)
            note = f"error record {where}" if where else "NO record written"
            console.print(f"[red]config failed ({note}): {problem or err}")
            if not where:
                print(f"mqb.eval: config failed and nothing was saved: {problem or err}", file=sys.stderr)
            return
        if problem is not None:
            print(f"mqb.eval: error: {problem}", file=sys.stderr)
            sys.exit(2)
        raise


_hydra_main = hydra.main(config_path=str(CONF_DIR), config_name="eval", version_base="1.3")(run_task)


def main() -> None:
    for problem in check_group_choices(sys.argv[1:]):
        print(problem, file=sys.stderr)
    sys.argv[:] = with_launchers(sys.argv)
    _hydra_main()


register_configs()

if __name__ == "__main__":
    # Run the importable module, not this __main__ copy: launchers (submitit) pickle the task function, which
    # must be pickled by reference to mqb.eval, not by value with this module's globals.
    from mqb.eval import main as _main

    _main()
