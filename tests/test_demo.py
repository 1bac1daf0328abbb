"""`make demo` as a user runs it: the real MeshNet on the real T1, and the README's table is what it writes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _rows(markdown: str) -> dict[tuple[str, str, str], list[float]]:
    """{(model, precision, granularity): [DSC, DSC Δ%, NSD, NSD Δ%]} of a paper-style table (FP32: no Δ)."""
    rows = {}
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 7 or not cells[0].startswith("meshnet"):
            continue
        numbers = [float(x) for c in cells[5:7] for x in re.findall(r"-?\d+\.\d+", c)[:2]]
        rows[(cells[0], cells[2], cells[3])] = numbers
    return rows


def _readme_demo_table() -> str:
    text = README.read_text()
    start = text.index("<!-- demo table -->")
    return text[start : text.index("<!-- /demo table -->")]


@pytest.mark.slow
def test_demo_writes_the_readme_table(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "WANDB_MODE": "offline"}
    cmd = [sys.executable, "-m", "mqb.eval", "-m", "experiment=demo", "logger=none", "trainer.progress=false",
           f"paths.output_dir={tmp_path / 'out'}", f"paths.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    (summary,) = (tmp_path / "out" / "multirun").glob("*/summary.md")
    written, documented = _rows(summary.read_text()), _rows(_readme_demo_table())
    assert len(written) == 7 and set(written) == set(documented)
    for key, values in written.items():  # 3 decimals as printed; another CPU may round the last digit differently
        assert values == pytest.approx(documented[key], abs=0.0015), key
    assert "summary.md" in done.stdout  # the results path is printed at the end


@pytest.mark.slow
def test_meshnet_defaults_reproduce_the_reference_figure(tmp_path: Path) -> None:
    """model=meshnet_18cls dataset=brain_aseg_sample with no overrides runs as brainchop does (whole volume) and
    gives the full-volume Dice measured with the model's own inference (tests/models/test_meshnet.py)."""
    from tests.models.test_meshnet import FULL_VOLUME_DSC

    cmd = [sys.executable, "-m", "mqb.eval", "model=meshnet_18cls", "dataset=brain_aseg_sample", "precision=fp32",
           "logger=none", "trainer.progress=false", f"paths.output_dir={tmp_path}",
           f"paths.cache_dir={tmp_path}"]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    (record,) = [json.loads(p.read_text()) for p in (tmp_path / "results").glob("*.json")]
    assert abs(record["metrics"]["dsc"] - FULL_VOLUME_DSC) < 0.005
