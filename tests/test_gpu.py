"""The real CLI on a CUDA GPU gives the CPU's numbers (``make test-gpu``; skipped where there is no GPU).

Each sweep runs twice in this test, with ``trainer.accelerator=gpu`` and ``=cpu`` (true FP32 on both:
``trainer.fp32_precision=ieee``), and every config's DSC must agree within 0.002:

* the headline: ``model=unetr,medformer precision=w4a4 granularity=adaptive`` (synthetic CT, untrained networks);
* MeshNet 18-class with its real weights on the real T1 with FreeSurfer labels, whole volume, FP32 and
  ``precision=w8a8,w4a4 granularity=per_tensor,per_channel,adaptive``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SWEEPS = {
    "headline": ["experiment=headline", "dataset.source.num_cases=12"],
    "meshnet": ["model=meshnet_18cls", "dataset=brain_aseg_sample", "dataset.roi_size=[160,192,224]",
                "precision=fp32,w8a8,w4a4", "granularity=per_tensor,per_channel,adaptive"],  # fmt: skip
}


def _sweep(args: list[str], accelerator: str, tmp: Path) -> dict[str, dict]:
    out = tmp / accelerator
    cmd = [sys.executable, "-m", "mqb.eval", "-m", *args, f"trainer.accelerator={accelerator}", "logger=none",
           "trainer.progress=false", f"paths.output_dir={out}", f"paths.cache_dir={out}"]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    records = [json.loads(p.read_text()) for p in (tmp / accelerator / "results").glob("*.json")]
    assert records and all(r["status"] == "success" for r in records), [r.get("error") for r in records]
    return {r["id"]: r for r in records}


@pytest.mark.parametrize("sweep", list(SWEEPS))
def test_gpu_sweep_matches_the_cpu(sweep: str, tmp_path: Path) -> None:
    gpu = _sweep(SWEEPS[sweep], "gpu", tmp_path)
    cpu = _sweep(SWEEPS[sweep], "cpu", tmp_path)
    assert set(gpu) == set(cpu)
    for cid, record in gpu.items():
        if record["precision"] != "fp32":
            assert record["device"]["type"] == "cuda" and record["device"]["tf32_conv"] is False
        print(f"{sweep} {record['model']} {record['precision']} {record['granularity']}: "
              f"GPU DSC {record['metrics']['dsc']:.4f}, CPU {cpu[cid]['metrics']['dsc']:.4f}")  # fmt: skip
        assert abs(record["metrics"]["dsc"] - cpu[cid]["metrics"]["dsc"]) <= 0.002, cid
        assert abs(record["baseline"]["dsc"] - cpu[cid]["baseline"]["dsc"]) <= 0.002, cid
