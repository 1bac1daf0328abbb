"""``benchmarks/eval_throughput.py`` runs a quantized config and the bare forwards of its volumes in one process and
prints its figures on the last line (no wall-time bar here: a shared machine's clock is no test)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model=unet",
    "model.checkpoint=null",
    "precision=w8a8",
    "granularity=per_channel",
    "dataset.source.num_cases=4",
    "dataset.source.shape=[32,32,24]",
    "dataset.roi_size=[32,32,32]",
    "dataset.splits={test: 2, calib: 1, val: 0}",
]


@pytest.mark.slow
def test_eval_throughput_prints_the_ratio_and_the_breakdown():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "eval_throughput.py"), "--device", "cpu", "--rounds", "1", *TINY]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    lines = proc.stdout.strip().splitlines()
    last = re.fullmatch(r"eval_vs_forward=(\d+\.\d+) configs_per_hour=(\d+) device=cpu", lines[-1])
    assert last is not None, lines[-1]
    assert float(last.group(1)) > 0 and int(last.group(2)) > 0
    head = "unet w8a8 per_channel rtn on synthetic (2 test, 1 calibration volumes)"
    assert any(line.startswith(head) for line in lines)
    (round_line,) = [line for line in lines if line.startswith("round 1:")]
    assert "metrics" in round_line and "cached ranges: True" in round_line  # the timed config reused the ranges
