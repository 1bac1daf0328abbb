"""Loading and saving network weights safely (no code execution), with clear errors.

Accepted files: safetensors; PyTorch files read with ``torch.load(weights_only=True)`` holding a state dict
directly or under ``state_dict`` (Lightning, SwinUNETR/UNETR research releases, nnU-Net v1 ``*.model``; prefix
``net.`` / ``module.`` / ``model.`` stripped), ``network_weights`` (nnU-Net v2 ``checkpoint_final.pth``),
``model`` (MONAI bundles) or ``state_dict_ema``.

A file that needs code execution to unpickle is refused. The one exception is a short allow-list of NumPy
globals that only rebuild data (arrays, scalars, dtypes): nnU-Net v2 checkpoints carry NumPy floats in their
training log, and refusing them would refuse every nnU-Net model. Anything else is named in the error.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mqb.results import atomic_write, write_json_atomic
from mqb.samples import missing_sample_hint, sample_data_dir

_NESTED_KEYS = ("state_dict", "network_weights", "model", "state_dict_ema")

#: Pickle globals that rebuild NumPy data and execute nothing else (numpy 1.x and 2.x module names).
_NUMPY_DATA_GLOBALS = (
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.ndarray",
    "numpy.dtype",
)


def _data_only_global(name: str) -> Any | None:
    """The object behind an allow-listed NumPy global name (``numpy.dtypes.*DType`` included), else ``None``."""
    import importlib

    import numpy as np

    module, _, attr = name.rpartition(".")
    allowed = name in _NUMPY_DATA_GLOBALS or (module == "numpy.dtypes" and attr.endswith("DType"))
    if not allowed:
        return None
    if module.startswith("numpy.core.") and not hasattr(np, "core"):
        module = module.replace("numpy.core.", "numpy._core.", 1)
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        return None


def _dtype_classes() -> list[Any]:
    """``numpy.dtypes.*DType``: a pickled dtype is rebuilt through its class (``Float64DType`` ...)."""
    import numpy.dtypes

    names = [f"numpy.dtypes.{attr}" for attr in dir(numpy.dtypes) if attr.endswith("DType")]
    return [cls for name in names if (cls := _data_only_global(name)) is not None]


def _all_data_only_globals() -> list[Any]:
    return [obj for name in _NUMPY_DATA_GLOBALS if (obj := _data_only_global(name)) is not None] + _dtype_classes()


def _torch_load_data_only(path: Path) -> Any:
    """``torch.load(weights_only=True)``, admitting only the data-rebuilding NumPy globals."""
    if not zipfile.is_zipfile(path):
        # the legacy (non-zip) torch.save format: the globals cannot be listed beforehand, but the weights_only
        # unpickler checks every one as it reads and refuses anything outside the allow-list
        with torch.serialization.safe_globals(_all_data_only_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    resolved = {name: _data_only_global(name) for name in unsafe}
    refused = sorted(name for name, obj in resolved.items() if obj is None)
    if refused:
        raise pickle.UnpicklingError(f"it needs the code objects {refused}")
    allowed = [obj for obj in resolved.values() if obj is not None]
    if "numpy.dtype" in resolved:
        allowed += _dtype_classes()
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location="cpu", weights_only=True)


_PREFIXES = ("net.", "module.", "model.")


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, unsafe or does not match the network."""


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file as a flat state dict (see module doc for the accepted layouts)."""
    p = Path(path)
    if not p.is_file():
        hint = "give a path to a file"
        if (data_dir := sample_data_dir(p)) is not None:  # a shipped sample (MeshNet weights): from paths.data_dir
            hint = missing_sample_hint(data_dir, alternative="model.checkpoint")
        raise CheckpointError(f"checkpoint {str(p)!r} does not exist (model.checkpoint); {hint}")
    if p.suffix == ".safetensors":
        try:
            return load_file(str(p))
        except Exception as err:  # noqa: BLE001
            raise CheckpointError(f"checkpoint {str(p)!r} is not a readable safetensors file: {err}") from None
    try:
        obj: Any = _torch_load_data_only(p)
    except Exception as err:  # noqa: BLE001
        kind = "zip" if zipfile.is_zipfile(p) else "legacy (non-zip)"
        raise CheckpointError(
            f"checkpoint {str(p)!r} ({kind} torch.save format) cannot be loaded safely (torch.load "
            f"weights_only=True refused it or it is corrupt): {str(err).splitlines()[0]}. mqb never unpickles "
            "code; re-save the weights as a state dict or safetensors where you trust the file, e.g. "
            "torch.save(torch.load(path, weights_only=False)['state_dict'], 'weights.pt')"
        ) from None
    for key in _NESTED_KEYS:
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"checkpoint {str(p)!r} holds no state dict of tensors")
    return obj


def map_keys(state: dict[str, torch.Tensor], rename: dict[str, str] | None = None,
             ignore: list[str] | tuple[str, ...] = ()) -> dict[str, torch.Tensor]:  # fmt: skip
    """``state`` with keys matching any ``ignore`` regular expression dropped (extra buffers the network does not
    have) and each key starting with a ``rename`` prefix given the new prefix (first match wins)."""
    patterns = [re.compile(p) for p in ignore]
    out = {}
    for key, value in state.items():
        if any(p.search(key) for p in patterns):
            continue
        for old, new in (rename or {}).items():
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        out[key] = value
    return out


def load_weights(
    net: nn.Module,
    path: str | os.PathLike[str],
    *,
    rename: dict[str, str] | None = None,
    ignore: list[str] | tuple[str, ...] = (),
) -> None:
    """Strictly load ``path`` into ``net``; mismatches raise :class:`CheckpointError` listing the keys.

    ``rename`` (prefix -> prefix) and ``ignore`` (regular expressions) map a checkpoint whose keys differ from
    the network's (``model.checkpoint_keys`` in configs): the load stays strict on what is left.
    """
    state = map_keys(read_state_dict(path), rename, ignore)
    expected = set(net.state_dict())
    for prefix in _PREFIXES:
        if not (set(state) & expected) and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    for group in alias_groups(net):  # a file saved with one name per shared tensor: fill in the other names
        present = [k for k in group if k in state]
        if present:
            state.update({k: state[present[0]] for k in group if k not in state})
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not match {type(net).__name__}: "
            f"{len(missing)} missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
            f"{len(unexpected)} unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
        )
    own = net.state_dict()
    wrong = [k for k in own if tuple(own[k].shape) != tuple(state[k].shape)]
    if wrong:
        shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in wrong[:5]]
        raise CheckpointError(f"checkpoint {str(path)!r} has {len(wrong)} tensors of the wrong shape: {shapes}")
    net.load_state_dict(state, strict=True)


def alias_groups(net: nn.Module) -> list[list[str]]:
    """State-dict names that are the same tensor (nnU-Net v2 registers each conv twice, and its decoder holds
    the encoder): groups of two or more names, first name canonical."""
    groups: dict[tuple[int, int, tuple[int, ...]], list[str]] = {}
    for name, tensor in net.state_dict(keep_vars=True).items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        groups.setdefault(key, []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def save_weights(net: nn.Module, path: str | os.PathLike[str], metadata: dict[str, Any]) -> None:
    """Save ``net``'s state dict as safetensors (atomically), with ``metadata`` also in a ``.json`` sidecar.

    Aliased tensors (:func:`alias_groups`) are stored once, under their first name; :func:`load_weights`
    restores the other names.
    """
    p = Path(path)
    aliases = {name for group in alias_groups(net) for name in group[1:]}
    state = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items() if k not in aliases}
    with atomic_write(p) as tmp:
        save_file(state, str(tmp), metadata={"mqb": json.dumps(metadata, sort_keys=True, default=str)})
    write_json_atomic(p.with_suffix(".json"), metadata)
