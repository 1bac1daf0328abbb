"""MeshNet: parameter counts of the five brainchop models and strict loading of their released weights."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from mqb.checkpoints import load_weights
from mqb.config import register_configs
from mqb.eval import CONF_DIR
from mqb.models import MeshNet

register_configs()
SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"

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


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared/data not present")
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
