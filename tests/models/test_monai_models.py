"""The MONAI-provided zoo entries through the engine: W8A8 and adaptive W4A4, with the expected layer census."""

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from mqb.config import CONF_DIR, register_configs
from mqb.quant import QuantRecipe, calibrate, quantize, summarize

register_configs()

#: Kernel tags each config's summary must list (MONAI UNet: 3x3x3 convs, 3x3x3 transposed convs, a 1x1x1
#: residual; UNETR: 16^3 patch embedding, 2x2x2 transposed convs, linear + attention; ...).
EXPECTED = {
    "unet": {"conv3x3x3", "conv_transpose3x3x3", "conv1x1x1"},
    "segresnet": {"conv3x3x3", "conv1x1x1"},
    "unetr": {"conv16x16x16", "conv3x3x3", "conv_transpose2x2x2", "conv1x1x1", "linear", "attention"},
    "swinunetr_t": {"conv2x2x2", "conv3x3x3", "conv_transpose2x2x2", "conv1x1x1", "linear", "attention"},
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("precision,scheme", [("w8a8", "per_channel"), ("w4a4", "adaptive")])
def test_quantize_summarize_and_run(name, precision, scheme):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        size = 64 if name == "swinunetr_t" else 32  # SwinUNETR downsamples 32x and normalizes the last map
        cfg = compose("eval", overrides=[f"model={name}", f"dataset.roi_size=[{size},{size},{size}]"])
    torch.manual_seed(0)
    net = instantiate(cfg.model.net).eval()
    x = torch.randn(1, 1, size, size, size)
    quantize(net, QuantRecipe.from_precision(precision, granularity=scheme, attention=True))
    calibrate(net, [x])
    with torch.no_grad():
        out = net(x)
    assert out.shape == (1, cfg.model.net.out_channels, size, size, size) and torch.isfinite(out).all()
    rows = summarize(net).rows
    tags = {r.info.kernel_tag or r.info.kind for r in rows}
    assert EXPECTED[name] <= tags
    assert all(r.weight is not None or r.info.kind == "attention" for r in rows)
