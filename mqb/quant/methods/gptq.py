"""GPTQ weight rounding (Frantar et al. 2023) for convolutions and linear layers, from calibration data.

Round-to-nearest quantizes every weight on its own. GPTQ quantizes the columns of ``W`` (rows: output channels,
columns: the ``C_in·k`` inputs of a conv, as im2col sees them) one at a time and spreads each column's rounding
error over the columns not yet quantized, weighted by the inverse Hessian of the layer's reconstruction loss
``‖W X - Ŵ X‖²``, ``H = 2 X Xᵀ`` (eqs. 2-3 of the paper). The scales stay those of round-to-nearest (from the
float weight), so the result is an ordinary INT weight; only the rounding changes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mqb.quant.api import run_batches
from mqb.quant.fake_quant import fake_quant_symmetric
from mqb.quant.layers import QuantLayer
from mqb.quant.methods.base import InputRanges, MethodReport, PTQMethod


def conv_patches(
    x: torch.Tensor, layer: nn.modules.conv._ConvNd, max_rows: int, generator: torch.Generator
) -> torch.Tensor:
    """Up to ``max_rows`` im2col rows ``(n, C_in·k)`` of a conv input, at randomly sampled output positions.

    Built from strided views (``Tensor.unfold``) and gathered only at the sampled positions, so a 96³ input
    never materializes its full im2col matrix. Column order ``(c, k_1, k_2, ...)`` matches ``weight.flatten(1)``.
    """
    dims = x.dim() - 2
    pad = [p for p in reversed(layer.padding) for _ in range(2)]  # type: ignore[arg-type]
    xp = F.pad(x, pad) if any(pad) else x
    u = xp
    for i in range(dims):
        u = u.unfold(2 + i, layer.kernel_size[i], layer.stride[i])
    batch, out_sizes = u.shape[0], u.shape[2 : 2 + dims]
    total = batch * math.prod(int(s) for s in out_sizes)
    count = min(max_rows, total)
    # the sample is drawn with the (CPU) generator, so CPU and CUDA runs pick the same rows, then moved to x
    flat = torch.randperm(total, generator=generator)[:count] if count < total else torch.arange(total)
    flat = flat.to(x.device)
    index = torch.unravel_index(flat, (batch, *out_sizes))
    patches = u[(index[0], slice(None), *index[1:])]  # (n, C, k_1, ..., k_dims)
    return patches.reshape(count, -1)


class GPTQ(PTQMethod):
    """GPTQ rounding of INT weights (symmetric, per-tensor or per-channel) of Conv1-3d and Linear layers.

    Args:
        damp: dampening ``λ·mean(diag H)`` added to ``H`` (the paper's 1 %).
        block: columns per lazy-update block (the paper's 128).
        max_rows: im2col rows sampled per calibration batch and layer (bounds memory and time).
        layers: selectors of the layers to round.
        seed: seed of the row sampling.

    The Hessian uses the operand the weight actually multiplies: the layer input after its method transform
    and input quantizer, on the calibration batches. Grouped/depthwise, dilated and transposed convolutions are
    skipped with the reason in the report.
    """

    name = "gptq"
    stage = "post_calibration"

    def __init__(
        self,
        damp: float = 0.01,
        block: int = 128,
        max_rows: int = 4096,
        layers: Sequence[str] | str = ("all",),
        seed: int = 0,
    ) -> None:
        super().__init__(layers)
        if not 0.0 <= damp < 1.0 or block < 1 or max_rows < 1:
            raise ValueError(f"GPTQ needs 0 <= damp < 1, block >= 1, max_rows >= 1; got {damp}, {block}, {max_rows}")
        self.damp, self.block, self.max_rows, self.seed = damp, block, max_rows, seed

    def skip_reason(self, layer: QuantLayer) -> str | None:
        spec = layer.weight_spec
        if spec is None:
            return "weight is not quantized"
        if spec.format != "int" or not spec.symmetric or spec.granularity not in ("per_tensor", "per_channel"):
            return f"GPTQ here rounds symmetric INT per-tensor/per-channel weights, not {spec.short()}"
        if layer.kind == "conv_transpose":
            return "transposed convolution: its im2col is not a plain input patch"
        if layer.kind == "conv":
            if layer.mqb_info.groups > 1:
                return "grouped/depthwise convolution"
            if any(d != 1 for d in layer.dilation) or isinstance(layer.padding, str):  # type: ignore[attr-defined]
                return "dilated or 'same'-padded convolution"
            if layer.padding_mode != "zeros":  # type: ignore[attr-defined]
                return f"padding_mode={layer.padding_mode!r}"  # type: ignore[attr-defined]
        return None

    def apply(
        self,
        model: nn.Module,
        ranges: InputRanges | None = None,
        batches: Callable[[], Iterable[Any]] | None = None,
        forward: Callable[[nn.Module, Any], Any] | None = None,
    ) -> MethodReport:
        if batches is None:
            raise ValueError("gptq needs calibration batches")
        chosen, report = self.partition(model)
        hessians = self._hessians(model, chosen, batches, forward)
        for name, layer in chosen.items():
            if name not in hessians:
                report.skipped[name] = "never ran on the calibration data"
                continue
            h, n = hessians[name]
            self._round_layer(layer, h / n)
            report.applied.append(name)
        return report

    def _hessians(
        self,
        model: nn.Module,
        layers: dict[str, QuantLayer],
        batches: Callable[[], Iterable[Any]],
        forward: Callable[[nn.Module, Any], Any] | None,
    ) -> dict[str, tuple[torch.Tensor, int]]:
        """``Σ X Xᵀ`` and the row count per layer, in one pass over the calibration batches."""
        out: dict[str, tuple[torch.Tensor, int]] = {}
        generator = torch.Generator().manual_seed(self.seed)

        def make_hook(name: str, layer: QuantLayer) -> Callable[..., None]:
            def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
                x = args[0]
                x = layer.input_transform(x) if layer.input_transform is not None else x
                x = layer.input_quantizer(x) if layer.input_quantizer is not None else x
                if layer.kind == "linear":
                    rows = x.reshape(-1, x.shape[-1])
                    if rows.shape[0] > self.max_rows:
                        pick = torch.randperm(rows.shape[0], generator=generator)[: self.max_rows]
                        rows = rows[pick.to(rows.device)]
                else:
                    rows = conv_patches(x, layer, self.max_rows, generator)  # type: ignore[arg-type]
                rows = rows.double()
                h, n = out.get(name, (rows.new_zeros(rows.shape[1], rows.shape[1]), 0))
                out[name] = (h + rows.t() @ rows, n + rows.shape[0])

            return hook

        handles = [layer.register_forward_pre_hook(make_hook(n, layer)) for n, layer in layers.items()]
        run_batches(model, batches(), forward, handles)
        return out

    def _round_layer(self, layer: QuantLayer, hessian: torch.Tensor) -> None:
        quantizer = layer.weight_quantizer
        assert quantizer is not None
        w = layer.weight.detach()
        rows = w.shape[0]
        quantizer.set_range(w)  # round-to-nearest scales from the float weight, kept from now on
        amax = quantizer.amax.detach().reshape(-1, 1).double().expand(rows, 1)  # type: ignore[union-attr]
        weight = w.reshape(rows, -1).double().clone()
        rounded = gptq_round(weight, hessian, lambda col: fake_quant_symmetric(col, amax, quantizer.spec),
                             self.damp, self.block)  # fmt: skip
        layer.rewrite_weight(rounded.reshape(w.shape).to(w.dtype), self.name)
        quantizer.range_frozen = True


def gptq_round(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    quantize_column: Callable[[torch.Tensor], torch.Tensor],
    damp: float = 0.01,
    block: int = 128,
) -> torch.Tensor:
    """GPTQ (Frantar et al., Algorithm 1) on a ``(rows, d)`` weight with ``H`` ``(d, d)``; returns the rounded weight.

    ``quantize_column`` maps a ``(rows, 1)`` column onto the grid. Inputs that never fired (``H_jj = 0``) get
    weight 0, as in the reference algorithm.
    """
    w = weight.clone()
    h = hessian.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros_like(w)
    d = w.shape[1]
    for start in range(0, d, block):
        stop = min(start + block, d)
        w1 = w[:, start:stop].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[start:stop, start:stop]
        for i in range(stop - start):
            col = w1[:, i : i + 1]
            qcol = quantize_column(col)
            q[:, start + i] = qcol[:, 0]
            err = (col - qcol) / u1[i, i]
            w1[:, i:] -= err @ u1[i : i + 1, i:]
            err1[:, i] = err[:, 0]
        w[:, stop:] -= err1 @ u[start:stop, stop:]
    return q
