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

Each granularity is one :class:`Granularity` entry of :data:`GRANULARITIES`, registered with
:func:`register_granularity`: which dimensions share a scale, whether its scales must be dynamic, which tensors of
which layers it may quantize (and along which axis), and whether real kernels run it (:mod:`mqb.quant.realizability`).
``QuantSpec`` validation, fake quantization, the quantized layers and realizability read the entry; a layer-level
scheme (:mod:`mqb.quant.schemes`) that should use a new granularity names it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


def normalize_axis(axis: int, ndim: int, what: str = "axis") -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"{what}={axis} is out of range for a tensor with {ndim} dimensions")
    return axis % ndim


def reduce_dims(x: torch.Tensor, granularity: str, axis: int | None) -> tuple[int, ...]:
    """The dimensions reduced to obtain one scale, for the non-grouped granularities."""
    entry = GRANULARITIES.get(granularity)
    if entry is None or entry.reduce is None:
        raise ValueError(f"reduce_dims does not handle granularity={granularity!r}")
    return entry.reduce(x, axis)


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


# -- the registry ----------------------------------------------------------------------------------------------
#: ``reduce(x, axis) -> dims``: the dimensions of ``x`` whose elements share one scale.
Reduce = Callable[[torch.Tensor, "int | None"], tuple[int, ...]]
#: ``issue(info) -> why not`` (``None``: real kernels run it) for a :class:`mqb.quant.layers.LayerInfo`.
Issue = Callable[[Any], "str | None"]


def _realizable(info: Any) -> str | None:
    return None


@dataclass(frozen=True)
class Granularity:
    """One tensor granularity.

    Attributes:
        name: the ``QuantSpec.granularity`` value.
        reduce: the dimensions sharing a scale; ``None`` for the grouped granularity (blocks of ``group_size`` along
            ``axis``: :func:`apply_in_groups`).
        dynamic_only: the scales depend on the position in the input, so they are computed per input.
        weights: weights of convolutions and linear layers may use it.
        activations: the layer kinds whose input may use it.
        axis: ``axis(kind, role)`` the quantizer needs (``role``: ``weight`` or ``input``); ``None``: no axis.
        weight_realizable: a weight with these scales runs on real kernels (they factor out of the dot product).
        activation_issue: ``issue(info)``: why an input of that layer with these scales does not run on real
            kernels (``None``: it does); without one, no kernel runs such inputs.
    """

    name: str
    reduce: Reduce | None = None
    dynamic_only: bool = False
    weights: bool = False
    activations: tuple[str, ...] = ()
    axis: Callable[[str, str], int | None] | None = None
    weight_realizable: bool = False
    activation_issue: Issue | None = None

    @property
    def grouped(self) -> bool:
        return self.reduce is None


#: The granularity registry: name -> :class:`Granularity`, in the order valid choices are listed.
GRANULARITIES: dict[str, Granularity] = {}


def register_granularity(entry: Granularity) -> Granularity:
    """Add ``entry`` to the registry (replacing one of the same name); returns it."""
    GRANULARITIES[entry.name] = entry
    return entry


def valid_granularities(role: str, kind: str) -> tuple[str, ...]:
    """The granularities a ``weight`` or ``input`` of a layer of ``kind`` may use, in registry order."""
    return tuple(n for n, g in GRANULARITIES.items() if (g.weights if role == "weight" else kind in g.activations))


def _per_tensor_dims(x: torch.Tensor, axis: int | None) -> tuple[int, ...]:
    return tuple(range(x.ndim))


def _per_channel_dims(x: torch.Tensor, axis: int | None) -> tuple[int, ...]:
    if axis is None:
        raise ValueError("granularity='per_channel' needs axis= (the channel axis that keeps its own scales)")
    keep = normalize_axis(axis, x.ndim)
    return tuple(d for d in range(x.ndim) if d != keep)


def _per_token_dims(x: torch.Tensor, axis: int | None) -> tuple[int, ...]:
    if x.ndim < 2:
        raise ValueError(f"granularity='per_token' needs a tensor (..., tokens, hidden); got shape {tuple(x.shape)}")
    return (x.ndim - 1,)


def _per_voxel_dims(x: torch.Tensor, axis: int | None) -> tuple[int, ...]:
    if x.ndim < 3:
        raise ValueError(f"granularity='per_voxel' needs an activation (N, C, *spatial); got shape {tuple(x.shape)}")
    return (1,)


def _channel_axis(kind: str, role: str) -> int:
    """Per-channel: the output channels of a weight (ConvTranspose: axis 1), the channels of an input."""
    if role == "weight":
        return 1 if kind == "conv_transpose" else 0
    return -1 if kind == "linear" else 1


def _reduction_axis(kind: str, role: str) -> int:
    """Per-group: the reduction axis (input channels) of a weight (ConvTranspose: axis 0) or an input."""
    if role == "weight":
        return 0 if kind == "conv_transpose" else 1
    return -1 if kind == "linear" else 1


def _along_reduction(name: str, info: Any) -> str:
    return f"{name} activation scales on a {info.kind} run along the reduction axis (not folded into weights)"


def _per_channel_issue(info: Any) -> str | None:
    if info.kind in ("linear", "attention"):
        return _along_reduction("per_channel", info)
    if info.depthwise:
        return None
    return "per-input-channel activation scales are not folded into the weights (eq. 3)"


def _per_voxel_issue(info: Any) -> str | None:
    if info.kind in ("linear", "attention"):
        return _along_reduction("per_voxel", info)
    if all(k == 1 for k in info.kernel) and not info.depthwise:
        return None
    return f"per-voxel activations on a {info.describe_kernel()} kernel need per-kernel-offset dot products (eq. 4)"


def _per_token_issue(info: Any) -> str | None:
    return None if info.kind in ("linear", "attention") else "per_token activations are not supported by any kernel"


_CONV = ("conv", "conv_transpose")
register_granularity(Granularity("per_tensor", _per_tensor_dims, weights=True, weight_realizable=True,
                                 activations=(*_CONV, "linear", "norm"), activation_issue=_realizable))  # fmt: skip
register_granularity(Granularity("per_channel", _per_channel_dims, weights=True, weight_realizable=True,
                                 activations=(*_CONV, "linear", "norm"), axis=_channel_axis,
                                 activation_issue=_per_channel_issue))  # fmt: skip
register_granularity(Granularity("per_token", _per_token_dims, dynamic_only=True, activations=("linear",),
                                 activation_issue=_per_token_issue))  # fmt: skip
register_granularity(Granularity("per_voxel", _per_voxel_dims, dynamic_only=True, activations=_CONV,
                                 activation_issue=_per_voxel_issue))  # fmt: skip
register_granularity(Granularity("per_group", None, dynamic_only=True, weights=True, weight_realizable=True,
                                 activations=(*_CONV, "linear"), axis=_reduction_axis,
                                 activation_issue=_realizable))  # fmt: skip
