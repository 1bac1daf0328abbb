"""Result records: stable config ids, atomic JSON writes, reading a results directory."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

import mqb

#: Top-level keys that do not change what is computed (outputs, logging, resuming; ``deploy``: read by
#: ``python -m mqb.deploy`` only).
VOLATILE_KEYS = ("paths", "results_dir", "resume", "logger", "auto_train", "trainer", "deploy")
#: Keys at any depth that only say where things are cached or how fast data loads.
NESTED_VOLATILE_KEYS = ("cache_dir", "num_workers")
#: Options added after records existed, dropped from the id while at their default so earlier records keep theirs.
DEFAULT_OPTIONS = (("calibration", "shared_ranges", False), ("calibration", "tensor_quantizers", False))
#: Groups that do not matter when nothing is quantized (fp32/fp16/bf16).
QUANT_ONLY_KEYS = ("granularity", "method", "calibration")


def stable_hash(obj: Any, length: int = 16) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]


def config_id(cfg: DictConfig) -> str:
    """Hash of the resolved config minus output/logging keys (and quantization keys for float precisions)."""
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.pop("logger", None)  # may interpolate Hydra's runtime output dir
    data = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(data, dict)
    for key in VOLATILE_KEYS:
        data.pop(key, None)
    _drop_nested(data, NESTED_VOLATILE_KEYS)
    for group, key, default in DEFAULT_OPTIONS:
        if isinstance(data.get(group), dict) and data[group].get(key, default) == default:
            data[group].pop(key, None)
    precision = data.get("precision") or {}
    if precision.get("weight") is None and precision.get("activation") is None:
        for key in QUANT_ONLY_KEYS:
            data.pop(key, None)
    return stable_hash(data)


def _drop_nested(data: Any, keys: tuple[str, ...]) -> None:
    if isinstance(data, dict):
        for key in keys:
            data.pop(key, None)
        for value in data.values():
            _drop_nested(value, keys)
    elif isinstance(data, list):
        for value in data:
            _drop_nested(value, keys)


@contextmanager
def atomic_write(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a unique hidden temporary path beside ``path`` (same file name ending, so writers that look at the
    extension work); rename it over ``path`` if the block succeeds, remove it if it fails. Readers and concurrent
    writers never see a half-written file."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{os.getpid()}.{uuid.uuid4().hex}.{target.name}")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """Write JSON through :func:`atomic_write`, fsynced before the rename."""
    with atomic_write(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())


def save_tensors_atomic(path: str | os.PathLike[str], tensors: dict[str, Any]) -> None:
    """``torch.save`` a (nested) dict of tensors through :func:`atomic_write`."""
    with atomic_write(path) as tmp:
        torch.save(tensors, tmp)


def read_records(results_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All success and error records of a results directory, sorted by creation time."""
    folder = Path(results_dir)
    if not folder.is_dir():
        return []
    records = []
    for path in sorted(p for p in folder.glob("*.json") if not p.name.startswith(".")):  # skip in-flight writes
        try:
            records.append(json.loads(path.read_text()))
        except json.JSONDecodeError:
            continue
    return sorted(records, key=lambda r: r.get("created", ""))


def git_commit() -> dict[str, Any]:
    root = Path(mqb.__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=root,
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
        )
        return {"commit": commit, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}


def host_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "mqb": mqb.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
