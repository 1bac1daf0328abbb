"""A SLURM sweep without a cluster: fake sbatch / srun / sacct / squeue / scancel on PATH record the job script
and run the array tasks locally, so the real hydra-submitit-launcher + submitit code paths run end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.test_eval_cli import ROOT, TINY, records

SBATCH = r"""#!/usr/bin/env python3
import os, re, shutil, subprocess, sys
from pathlib import Path
log = Path(os.environ["FAKE_SLURM_DIR"]); log.mkdir(parents=True, exist_ok=True)
script = Path(sys.argv[-1]); text = script.read_text()
counter = log / "counter"; job = int(counter.read_text()) + 1 if counter.exists() else 1000; counter.write_text(str(job))
shutil.copy(script, log / f"sbatch_{job}.sh")
(log / f"sbatch_{job}.args").write_text(" ".join(sys.argv[1:]))
m = re.search(r"#SBATCH --array=(\d+)-(\d+)", text)
tasks = range(int(m.group(1)), int(m.group(2)) + 1) if m else [None]
procs = []
for task in tasks:
    env = dict(os.environ, SLURM_NTASKS="1", SLURM_JOB_NUM_NODES="1", SLURM_NODEID="0", SLURM_PROCID="0",
               SLURM_LOCALID="0", SLURM_JOB_NODELIST="localhost")
    if task is None:
        env["SLURM_JOB_ID"] = str(job)
    else:
        env.update(SLURM_JOB_ID=f"{job}_{task}", SLURM_ARRAY_JOB_ID=str(job), SLURM_ARRAY_TASK_ID=str(task))
    procs.append(subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True))
print(f"Submitted batch job {job}")
"""

SRUN = r"""#!/usr/bin/env python3
import os, subprocess, sys
args, out, err = sys.argv[1:], None, None
def sub(p):
    return (p.replace("%A", os.environ.get("SLURM_ARRAY_JOB_ID", "")).replace("%a", os.environ.get("SLURM_ARRAY_TASK_ID", ""))
             .replace("%j", os.environ["SLURM_JOB_ID"]).replace("%t", "0"))
while args and args[0].startswith("--"):
    flag = args.pop(0)
    if flag in ("--output", "--error"):
        value = sub(args.pop(0))
        out, err = (value, err) if flag == "--output" else (out, value)
with open(out, "a") as o, open(err or out, "a") as e:
    sys.exit(subprocess.call(args, stdout=o, stderr=e))
"""

SACCT = r"""#!/usr/bin/env python3
import sys
ids = [sys.argv[i + 1] for i, a in enumerate(sys.argv) if a == "-j"]
print("JobID|State|NodeList")
for j in ids:
    print(f"{j}|COMPLETED|localhost")
"""


@pytest.fixture()
def fake_slurm(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("sbatch", SBATCH), ("srun", SRUN), ("sacct", SACCT), ("squeue", "#!/bin/sh\necho JOBID\n"),
                       ("scancel", "#!/bin/sh\nexit 0\n")):  # fmt: skip
        path = bin_dir / name
        path.write_text(textwrap.dedent(body))
        path.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB", "SLURM"))}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", FAKE_SLURM_DIR=str(tmp_path / "slurm"))
    return tmp_path / "slurm", env


@pytest.mark.slow
def test_slurm_profile_sweep(tmp_path, fake_slurm):
    slurm_dir, env = fake_slurm
    cmd = [
        sys.executable, "-m", "mqb.eval", "-m", "+cluster=example_gpu", "precision=w8a8,w4a4,w4a8",
        "hydra.launcher.partition=fakegpu", "hydra.launcher.account=proj42", "hydra.launcher.qos=high",
        "hydra.launcher.array_parallelism=2", "hydra.launcher.timeout_min=33",
        "trainer.accelerator=cpu", "model.checkpoint=null", *TINY,
        f"paths.output_dir={tmp_path / 'out'}", f"paths.cache_dir={tmp_path / 'cache'}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    scripts = sorted(slurm_dir.glob("sbatch_*.sh"))
    assert len(scripts) == 1  # one job array for the sweep
    script = scripts[0].read_text()
    for line in ("#SBATCH --partition=fakegpu", "#SBATCH --account=proj42", "#SBATCH --qos=high",
                 "#SBATCH --gpus-per-task=1", "#SBATCH --cpus-per-task=8", "#SBATCH --mem=64GB",
                 "#SBATCH --time=33", "#SBATCH --array=0-2%2", "#SBATCH --signal=USR2@120"):  # fmt: skip
        assert line in script, line
    assert "bin/activate" in script and "-m submitit.core._submit" in script and sys.executable in script
    recs = records(tmp_path / "out" / "results")
    assert sorted(r["precision"] for r in recs) == ["w4a4", "w4a8", "w8a8"] and all(
        r["status"] == "success" for r in recs
    )
    summary = next((tmp_path / "out" / "multirun").glob("*/summary.md")).read_text()
    assert summary.count("| unet |") == 3
    assert json.loads((tmp_path / "out" / "results" / f"{recs[0]['id']}.json").read_text())["id"] == recs[0]["id"]
