"""Layer-wise quantization sensitivity (paper sec. 4.3, Fig. 3, Table 11) and accuracy-constrained mixed precision.

Three kinds of study, all expressed as lists of *steps*; a step is the set of layer selectors kept in float
(``method.exclude`` of an ordinary ``mqb.eval`` config), so every step is a normal, cached, resumable record:

* incremental dequantization by layer type (Fig. 3): all quantized, then ``conv1x3x3`` in float, then also
  ``conv1x1x1`` ... (:func:`incremental_steps`);
* one layer at a time (Table 11, "exclude the i-th 3×3×3 conv"): :func:`per_layer_steps`, ranked by the DSC each
  exclusion recovers (:func:`rank_by_recovery`);
* cheap proxies that need one forward pass instead of one evaluation per layer: each quantized layer's output
  error against its own float output on the same input, as MSE and SQNR (:func:`layer_error_proxies`), and their
  Spearman rank correlation with the Dice ranking (:func:`rank_correlation`).

:func:`greedy_mixed_precision` keeps the most sensitive layers at a higher precision until a target ΔDSC holds,
and :func:`bit_budget` reports what that costs in weight bits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from scipy.stats import spearmanr
from torch import nn

from mqb.quant.api import run_batches
from mqb.quant.layers import QuantLayer
from mqb.quant.methods.base import float_output


@dataclass(frozen=True)
class Step:
    """One evaluation of a sensitivity study: a label and the selectors kept in float."""

    label: str
    excluded: tuple[str, ...]


def incremental_steps(groups: Sequence[str]) -> list[Step]:
    """All quantized, then the groups put back to float one after another (cumulative), as in Fig. 3."""
    steps = [Step("all quantized", ())]
    for i, group in enumerate(groups):
        steps.append(Step(f"+ {group} in float", tuple(groups[: i + 1])))
    return steps


def per_layer_steps(layer_names: Sequence[str], kind: str = "layer") -> list[Step]:
    """All quantized, then each layer alone in float (Table 11); ``kind`` words the label ("3×3×3 conv")."""
    steps = [Step("all quantized", ())]
    for i, name in enumerate(layer_names, start=1):
        steps.append(Step(f"exclude {_ordinal(i)} {kind} ({name})", (f"name:{name}",)))
    return steps


def _ordinal(i: int) -> str:
    suffix = "th" if 10 <= i % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(i % 10, "th")
    return f"{i}{suffix}"


def execution_order(model: nn.Module, example: torch.Tensor, layer_names: Iterable[str]) -> list[str]:
    """``layer_names`` sorted by when they first run in ``model(example)`` (registration order can differ).

    Layers that do not run on the example keep their relative order at the end.
    """
    wanted = list(layer_names)
    modules = dict(model.named_modules())
    order: list[str] = []

    def make_hook(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if name not in order:
                order.append(name)

        return hook

    handles = [modules[n].register_forward_pre_hook(make_hook(n)) for n in wanted]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return order + [n for n in wanted if n not in order]


def rank_by_recovery(rows: Sequence[dict[str, Any]], metric: str = "dsc") -> list[dict[str, Any]]:
    """Per-layer rows (``label``, ``excluded``, ``dsc``, ``nsd``) ranked by what excluding each layer recovers.

    ``recovered = metric(layer in float) - metric(all quantized)``; the first row (no exclusion) is the
    reference and is not ranked. Ties keep execution order.
    """
    if not rows or rows[0]["excluded"]:
        raise ValueError("rank_by_recovery: the first row must be the all-quantized step (nothing excluded)")
    base = rows[0][metric]
    ranked = [{**r, "recovered": r[metric] - base} for r in rows[1:]]
    order = sorted(range(len(ranked)), key=lambda i: (-ranked[i]["recovered"], i))
    return [{**ranked[i], "rank": k + 1} for k, i in enumerate(order)]


def layer_error_proxies(
    model: nn.Module, batches: Iterable[Any], forward: Callable[[nn.Module, Any], Any] | None = None
) -> dict[str, dict[str, float]]:
    """Per quantized layer: output MSE and SQNR (dB) of the quantized layer against its float self.

    ``SQNR = 10·log10(Σ y² / Σ (ŷ - y)²)`` with ``y`` the float output and ``ŷ`` the quantized output, both for
    the input the layer receives in the quantized network. One pass over ``batches`` serves all layers.

    A proxy, not the truth: a layer fed a few extreme voxels (the medical outlier pattern) keeps those voxels
    and loses the rest, yet its SQNR stays high because the kept voxels carry the output energy. The Dice
    ranking is the reference; ``mqb.sensitivity per_layer`` reports how well the proxy agrees with it.
    """
    signal: dict[str, float] = {}
    noise: dict[str, float] = {}
    count: dict[str, int] = {}

    def make_hook(name: str, layer: QuantLayer) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            reference = float_output(layer, args).double()
            err = output.double() - reference
            signal[name] = signal.get(name, 0.0) + float(reference.pow(2).sum())
            noise[name] = noise.get(name, 0.0) + float(err.pow(2).sum())
            count[name] = count.get(name, 0) + err.numel()

        return hook

    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLayer)}
    handles = [m.register_forward_hook(make_hook(n, m)) for n, m in layers.items()]
    run_batches(model, batches, forward, handles)
    out = {}
    for name in layers:
        if name not in count:
            continue
        mse = noise[name] / count[name]
        sqnr = float("inf") if noise[name] == 0 else 10.0 * float(torch.log10(torch.tensor(signal[name] / noise[name])))
        out[name] = {"mse": mse, "sqnr_db": sqnr}
    return out


def rank_correlation(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's ρ between two per-layer scores (scipy), e.g. recovered DSC and output MSE."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"rank_correlation needs two equal-length sequences of >= 2 values, got {len(a)}/{len(b)}")
    return float(spearmanr(a, b).statistic)


def bit_budget(layers: Iterable[tuple[int, int | None]]) -> dict[str, float]:
    """Weight storage of (parameter count, bits) pairs (``None`` bits = float32): mean bits and bytes."""
    params = bits = 0.0
    for n, b in layers:
        params += n
        bits += n * (32 if b is None else b)
    return {"params": params, "mean_weight_bits": bits / params if params else 0.0, "weight_bytes": bits / 8}


def greedy_mixed_precision(
    evaluate: Callable[[Sequence[str]], float], ranking: Sequence[str], target_drop_pct: float, baseline: float
) -> dict[str, Any]:
    """The fewest top-ranked layers to keep at high precision so that the metric drop is at most the target.

    ``evaluate(kept)`` returns the metric with the layers ``kept`` at the higher precision. The drop shrinks
    (weakly) as more sensitive layers are kept, so the count is found by doubling and then bisection, which needs
    O(log n) evaluations instead of n. Returns the kept layers, the metric, the drop and every evaluation made.
    """
    trials: dict[int, float] = {}

    def drop_with(k: int) -> float:
        if k not in trials:
            trials[k] = evaluate(list(ranking[:k]))
        return 100.0 * (baseline - trials[k]) / abs(baseline) if baseline else 0.0

    n = len(ranking)
    if drop_with(0) <= target_drop_pct:
        k = 0
    else:
        lo, hi = 0, 1
        while hi < n and drop_with(hi) > target_drop_pct:
            lo, hi = hi, min(2 * hi, n)
        if drop_with(hi) > target_drop_pct:
            k = n  # even keeping every ranked layer misses the target; report it as such
        else:
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if drop_with(mid) <= target_drop_pct:
                    hi = mid
                else:
                    lo = mid
            k = hi
    return {
        "kept": list(ranking[:k]),
        "metric": trials[k],
        "drop_pct": drop_with(k),
        "target_met": drop_with(k) <= target_drop_pct,
        "evaluations": dict(sorted(trials.items())),
    }
