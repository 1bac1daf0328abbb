"""MeshNet: parameter counts of the five brainchop models and strict loading of their released weights."""

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from mqb.checkpoints import load_weights
from mqb.config import CONF_DIR, register_configs
from mqb.metrics import case_metrics
from mqb.models import MeshNet

register_configs()

# (config, classes, parameters from brainchop_t1_meshnet/PROVENANCE.md)
MODELS = [
    ("meshnet_gwm", 3, 5_598),
    ("meshnet_18cls", 18, 96_408),
    ("meshnet_30chan_18cls", 18, 196_038),
    ("meshnet_104cls", 104, 86_372),
    ("meshnet_50cls", 50, 197_030),
]


def _net(name: str, classes: int) -> MeshNet:
    names = ",".join(f"c{i}" for i in range(classes))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("eval", overrides=[f"model={name}", "dataset=brain_aseg_sample", f"dataset.num_classes={classes}",
                                         f"dataset.class_names=[{names}]"])  # fmt: skip
    return instantiate(cfg.model.net), cfg


@pytest.mark.parametrize("name,classes,params", MODELS)
def test_parameter_count(name, classes, params):
    net, _ = _net(name, classes)
    assert sum(p.numel() for p in net.parameters()) == params


@pytest.mark.parametrize("name,classes,params", MODELS)
def test_released_weights_load_strictly(name, classes, params):
    net, cfg = _net(name, classes)
    load_weights(net, cfg.model.checkpoint)
    with torch.no_grad():
        out = net(torch.rand(1, 1, 12, 12, 12))
    assert out.shape == (1, classes, 12, 12, 12) and torch.isfinite(out).all()


def test_bad_activation():
    with pytest.raises(ValueError, match="activation='gelu' is invalid"):
        MeshNet(activation="gelu")


#: Measured with ``mqb.eval model=meshnet_18cls dataset=brain_aseg_sample`` on the whole volume (160x192x224,
#: one window): mean DSC over the 17 structures, and over the 11 deep structures that the fast test crops to.
FULL_VOLUME_DSC = 0.6993
FULL_VOLUME_DSC_DEEP = 0.6833
DEEP = [3, 4, 7, 8, 9, 10, 11, 14, 15, 16, 17]  # ventricles, thalamus, basal ganglia, hippocampus, amygdala ...


def _brain_case():
    net, cfg = _net("meshnet_18cls", 18)
    load_weights(net, cfg.model.checkpoint)
    dm = instantiate(cfg.dataset)
    dm.prepare_data()
    batch = next(iter(dm.test_dataloader()))
    return net.eval(), batch["image"].as_tensor(), batch["label"].as_tensor()[0, 0]


def _dsc(prediction: torch.Tensor, label: torch.Tensor) -> np.ndarray:
    return case_metrics(prediction, label, 18, (1.0, 1.0, 1.0), [1.0])["dsc"]


def test_real_weights_on_real_brain_crop_match_the_full_volume_dice():
    """The deep structures' box plus a 24-voxel margin of context (a fifth of the voxels) gives the full-volume
    Dice of those structures within 0.02."""
    net, image, label = _brain_case()
    boxes = [(label == c).nonzero() for c in DEEP]
    lo = torch.stack([b.min(0).values for b in boxes]).min(0).values
    hi = torch.stack([b.max(0).values for b in boxes]).max(0).values
    box = tuple(slice(max(0, int(a) - 24), int(b) + 25) for a, b in zip(lo, hi, strict=True))
    with torch.no_grad():
        prediction = net(image[(slice(None), slice(None), *box)]).argmax(1)[0]
    dsc = _dsc(prediction, label[box])
    assert abs(float(np.mean(dsc[[c - 1 for c in DEEP]])) - FULL_VOLUME_DSC_DEEP) < 0.02


@pytest.mark.slow
def test_real_weights_on_the_whole_brain_volume():
    net, image, label = _brain_case()
    with torch.no_grad():
        prediction = net(image).argmax(1)[0]
    dsc = _dsc(prediction, label)
    assert abs(float(np.nanmean(dsc)) - FULL_VOLUME_DSC) < 0.005
    assert abs(float(np.mean(dsc[[c - 1 for c in DEEP]])) - FULL_VOLUME_DSC_DEEP) < 0.005
