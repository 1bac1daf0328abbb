"""The README's "Your own model" section runs as written: a user's module, legacy checkpoint with other key names,
unlabelled NIfTI folder, and the same network as a YAML under --config-dir."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

NET = '''
import torch
from torch import nn


class MyNet(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, width: int) -> None:
        super().__init__()
        self.stem = nn.Conv3d(in_channels, width, 3, padding=1)
        self.norm = nn.InstanceNorm3d(width, affine=True)
        self.head = nn.Conv3d(width, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.norm(self.stem(x))))
'''

MYNET_YAML = """name: mynet
checkpoint: weights.pt
checkpoint_keys: {rename: {"backbone.": ""}, ignore: ["version$"]}
inference: {whole_volume: true}
net: {_target_: my_pkg.net.MyNet, in_channels: 1, out_channels: 3, width: 8}
"""


def _commands() -> list[list[str]]:
    text = README.read_text()
    section = text[text.index("## Your own model") :]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    joined = block.replace("\\\n", " ")
    return [shlex.split(line) for line in joined.splitlines() if line.strip().startswith("python -m mqb.eval")]


def _user_files(tmp: Path) -> None:
    (tmp / "my_pkg").mkdir()
    (tmp / "my_pkg" / "__init__.py").write_text("")
    (tmp / "my_pkg" / "net.py").write_text(NET)
    sys.path.insert(0, str(tmp))
    try:
        from my_pkg.net import MyNet
    finally:
        sys.path.remove(str(tmp))
        sys.modules.pop("my_pkg.net", None)
        sys.modules.pop("my_pkg", None)
    torch.manual_seed(0)
    state = {f"backbone.{k}": v for k, v in MyNet(1, 3, 8).state_dict().items()}
    state["backbone.version"] = torch.tensor(2)
    torch.save(state, tmp / "weights.pt", _use_new_zipfile_serialization=False)
    scans = tmp / "scans"
    scans.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        volume = rng.normal(100.0, 20.0, (24, 24, 16)).astype(np.float32)
        volume[6:18, 6:18, 4:12] += 80.0  # a bright block
        nib.save(nib.Nifti1Image(volume, np.diag([1.2, 1.2, 2.0, 1.0])), scans / f"scan{i}.nii.gz")
    (tmp / "conf_mine" / "model").mkdir(parents=True)
    (tmp / "conf_mine" / "model" / "mynet.yaml").write_text(MYNET_YAML)


@pytest.mark.slow
def test_readme_own_model_section_runs_as_written(tmp_path: Path) -> None:
    _user_files(tmp_path)
    commands = _commands()
    assert len(commands) == 2 and all(c[:3] == ["python", "-m", "mqb.eval"] for c in commands)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "PYTHONWARNINGS": "ignore"}
    for command in commands:
        done = subprocess.run([sys.executable, *command[1:], "trainer.progress=false"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)  # fmt: skip
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        assert "unknown model" not in done.stderr
    records = [json.loads(p.read_text()) for p in (tmp_path / "outputs" / "results").glob("*.json")]
    assert sorted(r["precision"] for r in records) == ["w4a4", "w8a8"]
    for r in records:
        assert r["status"] == "success" and r["untrained"] is False and r["reference"] == "fp32_prediction"
        assert r["data"]["test_cases"] and len(r["data"]["test_cases"]) == 2  # 3 scans: 1 calibrates
        assert not set(r["data"]["test_cases"]) & set(r["data"]["calibration_cases"])
        assert 0.0 <= r["metrics"]["dsc"] <= 1.0
