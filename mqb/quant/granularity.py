"""Tensor-level granularity: which elements of a tensor share one scale (paper Fig. 2, eqs. 3-4).

* ``per_tensor``: one scale for the whole tensor.
* ``per_channel``: one scale per index of ``axis`` (conv weights: output channel, axis 0; ConvTranspose
  weights: axis 1; conv activations: channel axis 1, eq. 3).
* ``per_token``: one scale per token, i.e. per index of every axis but the last (hidden) one.
* ``per_voxel``: for an activation (N, C, D, H, W), one scale per (n, d, h, w) shared across the C channels
  (eq. 4). For a k>1 convolution, eq. 4's per-kernel-offset scales S_k^(X) are exactly the per-voxel scales of
  the input voxel under each kernel offset, so per-voxel quantization of the input followed by the
  convolution *is* eq. 4 (tested against an unfold-based evaluation of eq. 4).
* ``per_group``: one scale per block of ``group_size`` consecutive elements along ``axis`` (the reduction
  axis: input channels), as in MX block formats.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def normalize_axis(axis: int, ndim: int, what: str = "axis") -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"{what}={axis} is out of range for a tensor with {ndim} dimensions")
    return axis % ndim


def reduce_dims(x: torch.Tensor, granularity: str, axis: int | None) -> tuple[int, ...]:
    """The dimensions reduced to obtain one scale, for the non-grouped granularities."""
    if granularity == "per_tensor":
        return tuple(range(x.ndim))
    if granularity == "per_channel":
        if axis is None:
            raise ValueError("granularity='per_channel' needs axis= (the channel axis that keeps its own scales)")
        keep = normalize_axis(axis, x.ndim)
        return tuple(d for d in range(x.ndim) if d != keep)
    if granularity == "per_token":
        if x.ndim < 2:
            raise ValueError(
                f"granularity='per_token' needs a tensor (..., tokens, hidden); got shape {tuple(x.shape)}"
            )
        return (x.ndim - 1,)
    if granularity == "per_voxel":
        if x.ndim < 3:
            raise ValueError(
                f"granularity='per_voxel' needs an activation (N, C, *spatial); got shape {tuple(x.shape)}"
            )
        return (1,)
    raise ValueError(f"reduce_dims does not handle granularity={granularity!r}")


def absmax(x: torch.Tensor, granularity: str, axis: int | None = None) -> torch.Tensor:
    """max|x| over the elements sharing a scale, shaped to broadcast against ``x`` (keepdim)."""
    return x.detach().abs().amax(dim=reduce_dims(x, granularity, axis), keepdim=True)


def minmax(x: torch.Tensor, granularity: str, axis: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) over the elements sharing a scale, keepdim."""
    dims = reduce_dims(x, granularity, axis)
    xd = x.detach()
    return xd.amin(dim=dims, keepdim=True), xd.amax(dim=dims, keepdim=True)


def apply_in_groups(
    x: torch.Tensor, axis: int, group_size: int, fn: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Apply ``fn`` to blocks of ``group_size`` consecutive elements along ``axis`` and restore the shape.

    ``fn`` receives a tensor (..., n_groups, group_size) whose last axis is one block. When the axis length is
    not a multiple of ``group_size`` the last block is zero-padded (zeros change neither max|x| nor the
    result of the other elements) and the padding is removed afterwards.
    """
    ax = normalize_axis(axis, x.ndim)
    moved = x.movedim(ax, -1)
    length = moved.shape[-1]
    pad = (-length) % group_size
    if pad:
        moved = F.pad(moved, (0, pad))
    blocks = moved.reshape(*moved.shape[:-1], -1, group_size)
    out = fn(blocks).reshape(moved.shape)
    if pad:
        out = out[..., :length]
    return out.movedim(-1, ax)
