"""Where a job runs and with which float arithmetic: ``trainer.accelerator`` and ``trainer.fp32_precision``.

**FP32 means FP32.** PyTorch lets cuDNN run float32 convolutions in TF32 (10-bit mantissa) on Ampere and newer
GPUs by default (``torch.backends.cudnn.conv.fp32_precision == "tf32"``). On an H200 that changed a DynUNet's
"FP32" output by 0.2 % (relative L2) and the class of 0.2 % of the voxels: the size of the W8A8 drops mqb reports.
So mqb sets ``trainer.fp32_precision=ieee`` (default) before any forward: IEEE float32 for cuDNN convolutions,
cuDNN RNNs and CUDA matmuls; ``tf32`` opts in to TF32 everywhere. The setting is written into every record (next
to the device name) and is part of the FP32 baseline's cache key.

PyTorch >= 2.9 has the ``fp32_precision`` switches next to the legacy global settings
(``torch.set_float32_matmul_precision``, ``allow_tf32``), and reading a legacy one that disagrees with the new
switches raises ("mix of the legacy and new APIs"); Lightning reads ``torch.get_float32_matmul_precision()`` when it
sets up a CUDA device. So the legacy setters are called first (they move the new switches too), then the new
switches themselves: both agree. The CPU's oneDNN matmul stays IEEE (``set_float32_matmul_precision("high")`` would
let it use TF32 too). The legacy flags alone on older PyTorch.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

#: ``trainer.fp32_precision`` values
FP32_PRECISIONS = ("ieee", "tf32")


def _switches() -> list[tuple[Any, str]]:
    """(object, attribute) of each ``fp32_precision`` switch that decides float32 GPU arithmetic."""
    backends = torch.backends
    found = []
    for owner in (getattr(backends.cuda, "matmul", None), getattr(backends.cudnn, "conv", None),
                  getattr(backends.cudnn, "rnn", None)):  # fmt: skip
        if owner is not None and hasattr(owner, "fp32_precision"):
            found.append((owner, "fp32_precision"))
    return found


def apply_fp32_precision(setting: str) -> dict[str, Any]:
    """Set float32 GPU arithmetic for this process (``ieee`` or ``tf32``); return what is in force.

    Raises ``ValueError`` naming ``trainer.fp32_precision`` and the valid values for anything else.
    """
    if setting not in FP32_PRECISIONS:
        raise ValueError(f"trainer.fp32_precision={setting!r} is invalid; valid: {', '.join(FP32_PRECISIONS)}")
    tf32 = setting == "tf32"
    switches = _switches()
    if len(switches) == 3:
        # the legacy global state first (these setters also move the new switches, consistently), so that
        # torch.get_float32_matmul_precision() and the allow_tf32 flags can still be read (Lightning does)
        torch.set_float32_matmul_precision("high" if tf32 else "highest")
        torch.backends.cudnn.allow_tf32 = tf32
        onednn = _onednn_matmul()
        if onednn is not None:  # "high" also lets the CPU's oneDNN matmul use TF32: keep it IEEE
            setattr(onednn[0], onednn[1], "ieee")
        for owner, attr in switches:
            setattr(owner, attr, setting)
    else:  # PyTorch < 2.9: the legacy flags
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    return fp32_precision_state(setting)


def _onednn_matmul() -> tuple[Any, str] | None:
    """(object, attribute) of the CPU's oneDNN matmul ``fp32_precision`` switch, where PyTorch has it."""
    owner = getattr(torch.backends.mkldnn, "matmul", None)
    return (owner, "fp32_precision") if owner is not None and hasattr(owner, "fp32_precision") else None


def _legacy_state() -> tuple[str | None, bool | None]:
    """The legacy global matmul precision and cuDNN ``allow_tf32`` flag (``None``: unreadable, because something
    set the new switches alone and they disagree)."""
    try:
        matmul: str | None = torch.get_float32_matmul_precision()
    except RuntimeError:
        matmul = None
    try:
        cudnn: bool | None = bool(torch.backends.cudnn.allow_tf32)
    except RuntimeError:
        cudnn = None
    return matmul, cudnn


@contextmanager
def float32_arithmetic(setting: str = "ieee") -> Iterator[dict[str, Any]]:
    """:func:`apply_fp32_precision` for a block, everything it sets restored after it: the legacy global state
    through the legacy setters, then the ``fp32_precision`` switches (oneDNN's matmul too) as they were."""
    switches = _switches()
    if len(switches) == 3:
        onednn = _onednn_matmul()
        every = switches + ([onednn] if onednn is not None else [])
        saved: list[Any] = [getattr(o, a) for o, a in every]
        legacy = _legacy_state()
    else:
        saved = [torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32]
    try:
        yield apply_fp32_precision(setting)
    finally:
        if len(switches) == 3:
            matmul, cudnn = legacy
            if matmul is not None:
                torch.set_float32_matmul_precision(matmul)
            if cudnn is not None:
                torch.backends.cudnn.allow_tf32 = cudnn
            for (owner, attr), value in zip(every, saved, strict=True):
                setattr(owner, attr, value)
        else:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def fp32_precision_state(setting: str | None = None) -> dict[str, Any]:
    """The float32 arithmetic in force: the setting and whether cuDNN convolutions / CUDA matmuls may use TF32."""
    switches = _switches()
    if len(switches) == 3:
        matmul, conv = (getattr(o, a) for o, a in switches[:2])
        tf32_matmul, tf32_conv = matmul == "tf32", conv == "tf32"
    else:
        tf32_matmul, tf32_conv = bool(torch.backends.cuda.matmul.allow_tf32), bool(torch.backends.cudnn.allow_tf32)
    return {"fp32_precision": setting, "tf32_matmul": tf32_matmul, "tf32_conv": tf32_conv}


def device_info(device: torch.device | str) -> dict[str, Any]:
    """The device a job's forwards ran on, by name (``cuda`` with the GPU's name and capability)."""
    device = torch.device(device)
    info: dict[str, Any] = {"type": device.type}
    if device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        info["name"] = torch.cuda.get_device_name(index)
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(index)))
        info["count"] = torch.cuda.device_count()
    return info


def cpu_flags() -> set[str]:
    """This CPU's ISA flags (``/proc/cpuinfo`` ``flags``, or ``Features`` on Arm; empty where it is absent)."""
    from pathlib import Path

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()
