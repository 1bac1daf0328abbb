"""Shared helpers of the model tests: the reference key lists and random weights in their shapes."""

from pathlib import Path

import torch

#: ``tests/models/keys/*.json``: the reference implementations' state-dict keys with shapes (PROVENANCE.md there).
KEYS = Path(__file__).resolve().parent / "keys"


def random_state(keys: dict[str, list[int]], seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict with the given shapes: small weights, positive BN variances, an integer batch counter."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in keys.items():
        if name.endswith("num_batches_tracked"):
            state[name] = torch.tensor(7)
        elif name.endswith("running_var"):
            state[name] = torch.rand(shape, generator=g) + 0.5
        else:
            state[name] = torch.randn(shape, generator=g) * 0.05
    return state


def centered_rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative error of the spatially varying part of the logits (constant per-class offsets removed)."""
    mean = ref.mean((0, 2, 3, 4), keepdim=True)
    return float(((out - mean) - (ref - mean)).norm() / (ref - mean).norm())


def quantized_errors(make_net, census: dict[str, int]) -> tuple[dict[str, float], dict[str, "torch.nn.Module"]]:
    """W8A8 per-channel and adaptive W4A4 (attention included) of ``make_net()`` on a 32³ input, calibrated on a
    batch that includes it: the relative error of the varying logits per precision, and the quantized nets.

    Asserts on the way what every model test checks: finite output, the layer census, no layer left in float.
    """
    from collections import Counter

    from mqb.quant import QuantRecipe, calibrate, quantize, summarize

    x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(1))
    calib = [torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(2)), x]
    errors, nets = {}, {}
    for precision, granularity in (("w8a8", "per_channel"), ("w4a4", "adaptive")):
        torch.manual_seed(0)
        net = make_net().eval()
        with torch.no_grad():
            ref = net(x)
        quantize(net, QuantRecipe.from_precision(precision, granularity=granularity, attention=True))
        calibrate(net, calib)
        with torch.no_grad():
            out = net(x)
        assert torch.isfinite(out).all()
        errors[precision] = centered_rel(out, ref)
        rows = summarize(net).rows
        assert Counter(r.group for r in rows) == census
        assert all(r.realizability.status != "float" for r in rows)
        nets[precision] = net
    return errors, nets
