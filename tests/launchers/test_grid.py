"""``hydra/sweeper=mqb_grid`` (mqb.eval's default sweeper): a 300-config grid is checked on a covering subset of
its configs and goes to SLURM as one job array."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap

import pytest

from hydra_plugins.mqb_sweeps.grid_sweeper import covering_jobs
from tests.test_eval_cli import ROOT

AXES = {"model": ["unet", "unetr", "segresnet", "swinunetr_t", "medformer"], "precision": ["w8a8", "w4a4", "w4a8",
        "fp8"], "granularity": ["per_tensor", "per_channel", "per_group", "adaptive", "per_voxel"],
        "method": ["rtn", "smoothquant", "gptq"]}  # fmt: skip


def _grid() -> list[list[str]]:
    return [[f"{k}={v}" for k, v in zip(AXES, values, strict=True)] for values in itertools.product(*AXES.values())]


def test_covering_jobs_compose_every_override_value_of_a_cartesian_grid():
    grid = _grid()
    assert len(grid) == 300
    chosen = covering_jobs(grid)
    covered = {o for i in chosen for o in grid[i]}
    assert covered == {o for job in grid for o in job}  # every value of every axis is composed at least once
    assert len(chosen) <= sum(len(v) for v in AXES.values())  # about the sum of the axes, not their product
    assert covering_jobs([]) == [] and covering_jobs([["a=1"], ["a=1"]]) == [0]


#: sbatch that records the job script and refuses the job (nothing runs: only the submission is under test)
SBATCH = r"""#!/usr/bin/env python3
import os, shutil, sys
from pathlib import Path
log = Path(os.environ["FAKE_SLURM_DIR"]); log.mkdir(parents=True, exist_ok=True)
shutil.copy(sys.argv[-1], log / "sbatch.sh")
print("sbatch: error: fake cluster refuses jobs", file=sys.stderr)
sys.exit(1)
"""


@pytest.mark.slow
def test_a_300_config_sweep_is_checked_on_a_covering_subset_and_submitted_as_one_array(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("sbatch", SBATCH), ("srun", "#!/bin/sh\nexit 1\n")):  # submitit looks for srun first
        (bin_dir / name).write_text(textwrap.dedent(body))
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB", "SLURM"))}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", FAKE_SLURM_DIR=str(tmp_path / "slurm"))
    cmd = [sys.executable, "-m", "mqb.eval", "-m", "+cluster=example_gpu", "hydra.launcher.array_parallelism=16",
           *(f"{k}={','.join(v)}" for k, v in AXES.items()), f"paths.output_dir={tmp_path / 'out'}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "fake cluster refuses jobs" in out  # the submission was reached, then refused
    checked = [line for line in out.splitlines() if "mqb_grid: checked" in line]
    assert checked and "of 300 configs" in checked[0], out[-3000:]
    assert int(checked[0].split("checked ")[1].split(" of")[0]) <= sum(len(v) for v in AXES.values())
    script = (tmp_path / "slurm" / "sbatch.sh").read_text()
    assert "#SBATCH --array=0-299%16" in script  # one job array, at most 16 configs at once
