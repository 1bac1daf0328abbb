"""Calibration observers: turn the tensors seen during calibration into static clipping ranges.

An observer sees tensors reshaped to (G, -1) rows, one row per scale group (G = 1 for per-tensor, C for
per-channel), accumulates statistics over calibration batches and returns one range per group.

* ``minmax`` (the paper's choice): running max|x| (or min and max for asymmetric specs).
* ``percentile``: the p-th percentile of |x| over all calibration data (TensorRT / ModelOpt style).
* ``mse``: the clipping value c minimising E[(x - Q_c(x))^2] under the actual element format.
* ``entropy``: the clipping value minimising KL(P || Q) between the |x| histogram and its quantized version
  (the TensorRT entropy calibrator).

Histogram observers keep a fixed number of bins whose width doubles (adjacent bins merged, which is exact)
whenever a batch exceeds the covered range, so the result does not depend on batch order beyond bin
resolution.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from mqb.quant.spec import QuantSpec

#: ``quant_fn(values, amax)`` returns the fake-quantized values for a clipping range ``amax``.
QuantFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class MinMaxObserver:
    """Running max|x| per group (and min/max for asymmetric quantization)."""

    def __init__(self) -> None:
        self.amax: torch.Tensor | None = None
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    def update(self, rows: torch.Tensor) -> None:
        rows = rows.detach().float()
        lo, hi = rows.amin(dim=1), rows.amax(dim=1)
        amax = torch.maximum(lo.abs(), hi.abs())
        if self.amax is None:
            self.amax, self.lo, self.hi = amax, lo, hi
        else:
            self.amax = torch.maximum(self.amax, amax)
            self.lo = torch.minimum(self.lo, lo)
            self.hi = torch.maximum(self.hi, hi)

    def compute(self) -> dict[str, torch.Tensor]:
        if self.amax is None:
            raise RuntimeError("observer saw no data: the calibration batches never reached this layer")
        return {"amax": self.amax, "lo": self.lo, "hi": self.hi}


class HistogramObserver:
    """Per-group histogram of |x| with exact bin-merging range growth; base of percentile/MSE/entropy."""

    def __init__(self, num_bins: int = 2048) -> None:
        if num_bins % 2:
            raise ValueError(f"num_bins={num_bins} must be even")
        self.num_bins = num_bins
        self.hist: torch.Tensor | None = None  # (G, num_bins) float64 counts
        self.width: torch.Tensor | None = None  # (G,) bin width
        self.max_seen: torch.Tensor | None = None  # (G,)

    def _grow(self, needed: torch.Tensor) -> None:
        """Double bin widths (merging bin pairs) until each group's range covers ``needed``."""
        assert self.hist is not None and self.width is not None
        covered = self.width * self.num_bins
        ratio = torch.where(covered > 0, needed / torch.where(covered > 0, covered, 1.0), torch.ones_like(needed))
        doublings = torch.clamp(torch.ceil(torch.log2(torch.clamp(ratio, min=1.0))), min=0).long()
        half = self.num_bins // 2
        for k in sorted(set(doublings.tolist()) - {0}):
            rows = doublings == k
            h = self.hist[rows]
            for _ in range(int(k)):
                h = torch.cat([h.view(h.shape[0], half, 2).sum(-1), torch.zeros_like(h[:, :half])], dim=1)
            self.hist[rows] = h
            self.width[rows] = self.width[rows] * (2.0**k)

    def update(self, rows: torch.Tensor) -> None:
        mag = rows.detach().float().abs()
        groups = mag.shape[0]
        batch_max = mag.amax(dim=1)
        if self.hist is None:
            self.hist = torch.zeros(groups, self.num_bins, dtype=torch.float64, device=mag.device)
            self.width = torch.zeros(groups, device=mag.device)
            self.max_seen = torch.zeros(groups, device=mag.device)
        assert self.width is not None and self.max_seen is not None
        fresh = (self.width == 0) & (batch_max > 0)
        self.width = torch.where(fresh, batch_max / self.num_bins, self.width)
        self._grow(batch_max)
        self.max_seen = torch.maximum(self.max_seen, batch_max)
        safe_width = torch.where(self.width > 0, self.width, torch.ones_like(self.width))
        index = torch.clamp((mag / safe_width[:, None]).long(), max=self.num_bins - 1)
        flat = index + torch.arange(groups, device=mag.device)[:, None] * self.num_bins
        counts = torch.bincount(flat.flatten(), minlength=groups * self.num_bins)
        self.hist += counts.view(groups, self.num_bins).to(torch.float64)

    def _centers(self) -> torch.Tensor:
        assert self.width is not None
        return (torch.arange(self.num_bins, device=self.width.device) + 0.5)[None, :] * self.width[:, None]

    def _check(self) -> None:
        if self.hist is None:
            raise RuntimeError("observer saw no data: the calibration batches never reached this layer")


class PercentileObserver(HistogramObserver):
    """amax = the ``percentile``-th percentile of |x| (upper bin edge), never above the observed max."""

    def __init__(self, percentile: float, num_bins: int = 2048) -> None:
        super().__init__(num_bins)
        self.percentile = percentile

    def compute(self) -> dict[str, torch.Tensor]:
        self._check()
        assert self.hist is not None and self.width is not None and self.max_seen is not None
        cdf = torch.cumsum(self.hist, dim=1) / torch.clamp(self.hist.sum(dim=1, keepdim=True), min=1.0)
        target = torch.tensor(self.percentile / 100.0, dtype=cdf.dtype, device=cdf.device) - 1e-12
        first = torch.searchsorted(cdf, target.expand(cdf.shape[0], 1).contiguous()).squeeze(1)
        amax = (first.float() + 1.0) * self.width
        return {"amax": torch.minimum(amax, self.max_seen)}


class MSEObserver(HistogramObserver):
    """amax = argmin_c sum_bins count * (center - Q_c(center))^2 over ``num_candidates`` clipping values."""

    def __init__(self, quant_fn: QuantFn, num_candidates: int = 100, num_bins: int = 2048) -> None:
        super().__init__(num_bins)
        self.quant_fn = quant_fn
        self.num_candidates = num_candidates

    def compute(self) -> dict[str, torch.Tensor]:
        self._check()
        assert self.hist is not None and self.max_seen is not None
        centers = self._centers()
        weights = self.hist.float()
        best_err = torch.full_like(self.max_seen, math.inf)
        best = self.max_seen.clone()
        for frac in torch.linspace(1.0 / self.num_candidates, 1.0, self.num_candidates).tolist():
            amax = self.max_seen * frac
            err = (weights * (centers - self.quant_fn(centers, amax[:, None])) ** 2).sum(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, amax, best)
        return {"amax": best}


class EntropyObserver(HistogramObserver):
    """TensorRT-style KL calibration over ``levels`` = 2^(N-1) quantization bins of |x|."""

    def __init__(self, levels: int, num_bins: int = 2048, num_thresholds: int = 128) -> None:
        super().__init__(num_bins)
        self.levels = levels
        self.num_thresholds = num_thresholds

    def compute(self) -> dict[str, torch.Tensor]:
        self._check()
        assert self.hist is not None and self.width is not None
        hist = self.hist
        groups, bins = hist.shape
        stride = max(1, (bins - self.levels) // self.num_thresholds)
        best_kl = torch.full((groups,), math.inf, dtype=torch.float64, device=hist.device)
        best_i = torch.full((groups,), bins, device=hist.device)
        for i in range(self.levels, bins + 1, stride):
            ref = hist[:, :i].clone()
            ref[:, i - 1] += hist[:, i:].sum(dim=1)
            chunk = (torch.arange(i, device=hist.device) * self.levels) // i
            sliced = hist[:, :i]
            nonzero = (sliced > 0).to(hist.dtype)
            totals = torch.zeros(groups, self.levels, dtype=hist.dtype, device=hist.device)
            totals.index_add_(1, chunk, sliced)
            counts = torch.zeros_like(totals).index_add_(1, chunk, nonzero)
            expanded = torch.where(nonzero > 0, (totals / torch.clamp(counts, min=1.0))[:, chunk], 0.0)
            p = ref / torch.clamp(ref.sum(dim=1, keepdim=True), min=1e-12)
            q = expanded / torch.clamp(expanded.sum(dim=1, keepdim=True), min=1e-12)
            q = torch.clamp(q, min=1e-12)
            kl = torch.where(p > 0, p * torch.log(torch.clamp(p, min=1e-300) / q), 0.0).sum(dim=1)
            better = kl < best_kl
            best_kl = torch.where(better, kl, best_kl)
            best_i = torch.where(better, torch.full_like(best_i, i), best_i)
        assert self.max_seen is not None
        return {"amax": torch.minimum((best_i.float() + 0.5) * self.width, self.max_seen)}


class Observer(Protocol):
    """What every observer provides: ``update(rows)`` per calibration tensor (one row per scale group) and
    ``compute() -> {"amax": (G,)}`` (``lo`` / ``hi`` too for asymmetric specs)."""

    def update(self, rows: torch.Tensor) -> None: ...

    def compute(self) -> dict[str, torch.Tensor]: ...


@dataclass(frozen=True)
class ObserverEntry:
    """One calibration observer of the registry.

    Attributes:
        name: the ``QuantSpec.observer`` / ``calibration.observer`` value.
        make: ``make(spec, quant_fn) -> observer``; ``quant_fn(values, amax)`` is the spec's element quantizer.
        affine: it also gives ``lo`` / ``hi`` for asymmetric specs.
        integer_grid: it needs a format whose elements are integers (:attr:`mqb.quant.formats.Format.integer_grid`),
            ``why`` says why.
    """

    name: str
    make: Callable[[QuantSpec, QuantFn], Observer]
    affine: bool = False
    integer_grid: bool = False
    why: str = ""


#: The observer registry: name -> :class:`ObserverEntry`. Filled by :func:`register_observer`.
OBSERVERS: dict[str, ObserverEntry] = {}


def register_observer(entry: ObserverEntry) -> ObserverEntry:
    """Add ``entry`` to the observer registry (replacing one of the same name); returns it."""
    OBSERVERS[entry.name] = entry
    return entry


register_observer(ObserverEntry("minmax", lambda spec, quant_fn: MinMaxObserver(), affine=True))
register_observer(ObserverEntry("percentile", lambda spec, quant_fn: PercentileObserver(spec.percentile)))
register_observer(ObserverEntry("mse", lambda spec, quant_fn: MSEObserver(quant_fn)))
register_observer(ObserverEntry("entropy", lambda spec, quant_fn: EntropyObserver(levels=spec.qmax + 1),
                                integer_grid=True, why="KL over integer levels"))  # fmt: skip


def make_observer(spec: QuantSpec, quant_fn: QuantFn) -> Observer:
    """The observer named by ``spec.observer``; ``quant_fn`` is the element quantizer used by ``mse``."""
    if spec.observer not in OBSERVERS:
        raise ValueError(f"observer={spec.observer!r} is unknown")
    return OBSERVERS[spec.observer].make(spec, quant_fn)
