"""Checkpoint formats users bring (nnU-Net v1/v2, Lightning, DDP, MONAI bundles, safetensors), read safely."""

import argparse

import numpy as np
import pytest
import torch
from torch import nn

from mqb.checkpoints import CheckpointError, load_weights, read_state_dict, save_weights


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv3d(1, 4, 3), nn.InstanceNorm3d(4, affine=True), nn.Conv3d(4, 2, 1))


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_nnunet_v2_checkpoint_with_numpy_log_loads(tmp_path):
    """nnU-Net v2 ``checkpoint_final.pth``: weights under ``network_weights`` next to NumPy floats and a device."""
    src = _net()
    checkpoint = {
        "network_weights": src.state_dict(),
        "optimizer_state": {"state": {}, "param_groups": [{"lr": 0.01}]},
        "grad_scaler_state": None,
        "logging": {"ema_fg_dice": [np.float64(0.5), np.float32(0.6)], "dice_per_class": [np.array([0.1, 0.2])]},
        "_best_ema": np.float64(0.61),
        "current_epoch": 1000,
        "init_args": {"plans": {"configurations": {}}, "configuration": "3d_fullres", "device": torch.device("cpu")},
        "trainer_name": "nnUNetTrainer",
        "inference_allowed_mirroring_axes": (0, 1, 2),
    }
    path = tmp_path / "checkpoint_final.pth"
    torch.save(checkpoint, path)
    dst = _net()
    load_weights(dst, path)
    assert _same(src, dst)


def test_nnunet_v1_and_lightning_and_ddp_layouts(tmp_path):
    src = _net()
    layouts = {
        "v1.model": {"state_dict": src.state_dict(), "epoch": 3, "plot_stuff": ([0.1], [0.2])},
        "lightning.ckpt": {"state_dict": {f"net.{k}": v for k, v in src.state_dict().items()}, "epoch": 1},
        "ddp.pt": {f"module.{k}": v for k, v in src.state_dict().items()},
        "bundle.pt": {"model": src.state_dict()},
    }
    for name, obj in layouts.items():
        torch.save(obj, tmp_path / name)
        dst = _net()
        load_weights(dst, tmp_path / name)
        assert _same(src, dst), name


def test_code_objects_are_refused_and_named(tmp_path):
    path = tmp_path / "with_args.pth"
    torch.save({"state_dict": _net().state_dict(), "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(CheckpointError, match=r"cannot be loaded safely.*argparse\.Namespace"):
        read_state_dict(path)


def test_key_and_shape_mismatches_list_the_keys(tmp_path):
    state = _net().state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["2.bias"]
    torch.save(state, tmp_path / "bad_keys.pt")
    with pytest.raises(CheckpointError, match=r"1 missing keys \['2.bias'\].*1 unexpected keys \['extra.weight'\]"):
        load_weights(_net(), tmp_path / "bad_keys.pt")
    wrong = _net().state_dict()
    wrong["0.weight"] = torch.zeros(4, 1, 1, 1, 1)
    torch.save(wrong, tmp_path / "bad_shape.pt")
    with pytest.raises(CheckpointError, match=r"0.weight: \(4, 1, 1, 1, 1\) vs \(4, 1, 3, 3, 3\)"):
        load_weights(_net(), tmp_path / "bad_shape.pt")


def test_safetensors_round_trip_with_sidecar(tmp_path):
    src = _net()
    save_weights(src, tmp_path / "w.safetensors", {"model": "toy", "steps": 3})
    dst = _net()
    load_weights(dst, tmp_path / "w.safetensors")
    assert _same(src, dst)
    assert (tmp_path / "w.json").read_text().count('"steps": 3') == 1


class _Aliased(nn.Module):
    """Like nnU-Net v2: a conv registered under two names, and a second module holding the first."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 1)
        self.all_modules = nn.Sequential(self.conv)
        self.head = nn.Conv3d(2, 2, 1)


def test_aliased_tensors_save_once_and_load_under_every_name(tmp_path):
    src = _Aliased()
    assert set(src.state_dict()) == {"conv.weight", "conv.bias", "all_modules.0.weight", "all_modules.0.bias",
                                     "head.weight", "head.bias"}  # fmt: skip
    save_weights(src, tmp_path / "a.safetensors", {})
    assert set(read_state_dict(tmp_path / "a.safetensors")) == {"conv.weight", "conv.bias", "head.weight", "head.bias"}
    dst = _Aliased()
    load_weights(dst, tmp_path / "a.safetensors")
    assert _same(src, dst)
    torch.save(src.state_dict(), tmp_path / "full.pt")  # the nnU-Net layout with every alias also loads strictly
    dst = _Aliased()
    load_weights(dst, tmp_path / "full.pt")
    assert _same(src, dst)


def test_legacy_non_zip_checkpoints_load_and_refuse_code_all_the_same(tmp_path):
    """``torch.save(..., _use_new_zipfile_serialization=False)`` (older releases such as HD-BET's): a plain state
    dict loads; one that needs code is refused with its format named."""
    src = _net()
    path = tmp_path / "legacy.model"
    torch.save({"state_dict": src.state_dict(), "log": [np.float64(0.5)]}, path, _use_new_zipfile_serialization=False)
    assert not __import__("zipfile").is_zipfile(path)
    dst = _net()
    load_weights(dst, path)
    assert _same(src, dst)
    bad = tmp_path / "legacy_code.pth"
    torch.save({"state_dict": src.state_dict(), "args": argparse.Namespace(lr=0.1)}, bad,
               _use_new_zipfile_serialization=False)  # fmt: skip
    with pytest.raises(CheckpointError, match=r"legacy \(non-zip\) torch.save format.*cannot be loaded safely"):
        read_state_dict(bad)


def test_key_mapping_for_checkpoints_with_other_names_and_extra_buffers(tmp_path):
    src = _net()
    state = {f"seg_head.{k}": v for k, v in src.state_dict().items()}
    state["seg_head.0.num_batches_tracked"] = torch.tensor(3)  # a buffer the network does not have
    torch.save(state, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="unexpected keys"):
        load_weights(_net(), tmp_path / "other.pt")
    dst = _net()
    load_weights(dst, tmp_path / "other.pt", rename={"seg_head.": ""}, ignore=[r"num_batches_tracked$"])
    assert _same(src, dst)
