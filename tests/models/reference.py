"""Shared helpers of the model tests: the reference key lists and random weights in their shapes."""

from pathlib import Path

import torch

#: ``shared/reference/keys/*.json``: the reference implementations' state-dict keys with shapes.
KEYS = Path(__file__).resolve().parents[3] / "shared" / "reference" / "keys"


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
