"""SVDQuant-like low-rank split (Li et al. 2024): ``W = L + R``, L (rank r) in float, R quantized."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mqb.quant.layers import QuantLayer
from mqb.quant.methods.base import InputRanges, PTQMethod


def low_rank_part(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """The best rank-``r`` approximation ``U_r Σ_r V_rᵀ`` of a 2-D matrix (Eckart-Young), in float64 for accuracy."""
    u, sigma, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    r = min(rank, sigma.numel())
    return ((u[:, :r] * sigma[:r]) @ vh[:r]).to(matrix.dtype)


class LowRankSVD(PTQMethod):
    """Keep the top-``rank`` singular directions of each weight in float (paper: rank 4); quantize the rest.

    The weight is viewed as ``(C_out, C_in/g · k)`` (ConvTranspose: output channels first, too), so the
    float branch is a rank-r GEMM on the unquantized input: ``y = op(Q(x), Q(W - L)) + op(x, L) + b``.
    """

    name = "svd"

    def __init__(self, rank: int = 4, layers: Sequence[str] | str = ("all",)) -> None:
        super().__init__(layers)
        if rank < 1:
            raise ValueError(f"LowRankSVD rank must be >= 1, got {rank}")
        self.rank = rank

    def skip_reason(self, layer: QuantLayer) -> str | None:
        if layer.low_rank_weight is not None:
            return "already has a low-rank branch"
        if layer.weight_quantizer is None:
            return "weight is not quantized"
        return None

    def apply_to_layer(self, name: str, layer: QuantLayer, ranges: InputRanges | None) -> None:
        w = layer.weight.detach()
        if layer.kind == "conv_transpose":
            rows = w.transpose(0, 1)  # (C_out/g, C_in, *k)
            low = low_rank_part(rows.reshape(rows.shape[0], -1), self.rank).reshape(rows.shape).transpose(0, 1)
        else:
            low = low_rank_part(w.reshape(w.shape[0], -1), self.rank).reshape(w.shape)
        layer.rewrite_weight(w - low, self.name)
        layer.low_rank_weight = low.contiguous()

    def __repr__(self) -> str:
        return f"LowRankSVD(rank={self.rank}, layers={list(self.layers)})"
