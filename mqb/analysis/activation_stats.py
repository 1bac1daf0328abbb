"""Activation statistics of the inputs of quantizable layers: kurtosis within / across channels, outliers.

Reproduces the activation analysis of MedQuanBench (Fig. 1b, appendix B Fig. 5, appendix C). An activation is
viewed as a matrix ``X[v, c]`` of *units*: rows are voxels (conv inputs ``[B, C, *spatial]``, one row per
``(b, *spatial)`` position) or tokens (linear inputs ``[..., C]``), columns are channels.

* kurtosis (eq. 5): ``κ(X) = E[((X - μ) / σ)^4] = m4 / m2²`` with population moments
  ``m_k = mean((X - μ)^k)``; ``κ = 3`` for a normal, ``1.8`` for a uniform, ``≥ 1`` always.
* within-channel kurtosis: ``κ_c = κ(X[:, c])``, one value per channel, over all voxels/tokens;
  high when a channel has a few spatially localized outliers.
* across-channel kurtosis: ``κ_v = κ(X[v, :])``, one value per voxel/token, over its channels;
  high when a few channels dominate (the LLM pattern of persistent outlier channels).
* channel imbalance: ``max_c a_c / median_c a_c`` with ``a_c = max_v |X[v, c]|``; what per-channel
  smoothing (SmoothQuant) flattens.

The paper's finding: medical models have high within-channel and low across-channel kurtosis (outliers are
spatially sparse and shared by many channels), the opposite of LLMs. Per-channel smoothing ``X / s`` lowers the
channel imbalance but cannot change within-channel kurtosis, which is invariant to a per-channel scale.

:func:`collect_activation_stats` streams these statistics over calibration batches with forward pre-hooks;
:func:`activation_report` also writes a CSV, a safetensors file and the Fig. 1b / Fig. 5 style figures.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mqb.quant.api import quantizable_layers, run_batches
from mqb.quant.layers import LayerInfo, describe_layer
from mqb.quant.methods.base import weight_absmax_per_input_channel as absmax_per_input_channel
from mqb.quant.methods.smoothquant import smoothing_factors
from mqb.quant.selectors import matches_any, validate_selector
from mqb.results import atomic_write

#: Kurtosis above which a unit counts as heavy-tailed in the summaries (a normal has 3).
DEFAULT_KURTOSIS_THRESHOLD = 10.0
#: Bound on the per-voxel values (across-channel kurtosis, |x| max) and example rows kept per layer.
DEFAULT_MAX_VOXELS = 4096
#: Histogram of log10 across-channel kurtosis: bins over [0, HIST_MAX_LOG10] (κ ≥ 1, so log10 κ ≥ 0).
HIST_BINS = 160
HIST_MAX_LOG10 = 8.0
#: Elements per float64 chunk when a batch is reduced (bounds the temporary memory of one hook call).
_CHUNK_ELEMENTS = 1 << 22

CSV_COLUMNS = (
    "name",
    "kind",
    "kernel",
    "type",
    "channels",
    "voxels_seen",
    "within_log10_kurtosis_median",
    "within_log10_kurtosis_mean",
    "within_log10_kurtosis_max",
    "within_frac_above_threshold",
    "across_log10_kurtosis_median",
    "across_log10_kurtosis_mean",
    "across_log10_kurtosis_max",
    "across_frac_above_threshold",
    "threshold",
    "channel_imbalance",
    "channel_imbalance_smoothed",
    "alpha",
)


# ----------------------------------------------------------------------------------------------------------------
# pure statistics


def kurtosis(x: torch.Tensor, dim: int | tuple[int, ...] | None = None, keepdim: bool = False) -> torch.Tensor:
    """Population kurtosis (eq. 5) along ``dim`` (all elements if ``None``), in float64.

    ``κ = E[((X - μ) / σ)^4] = m4 / m2²`` with ``μ = mean(X)``, ``m_k = mean((X - μ)^k)`` (biased moments, as
    ``scipy.stats.kurtosis(fisher=False, bias=True)``). Normal: 3, uniform: 1.8, Laplace: 6. NaN where ``m2 = 0``
    (constant input), which the summaries skip.
    """
    x = x.double()
    if dim is None:
        x, dim = x.reshape(-1), 0
    d = x - x.mean(dim=dim, keepdim=True)
    d2 = d * d
    m2 = d2.mean(dim=dim, keepdim=keepdim)
    m4 = (d2 * d2).mean(dim=dim, keepdim=keepdim)
    return torch.where(m2 > 0, m4 / (m2 * m2), torch.full_like(m2, math.nan))


def to_voxel_channel(x: torch.Tensor, channel_axis: int = 1) -> torch.Tensor:
    """``x`` as a ``[voxels, channels]`` matrix: the channel axis last, every other axis flattened into rows.

    Rows are in the order of the remaining axes, e.g. ``(b, d, h, w)`` for a ``[B, C, D, H, W]`` conv input and
    ``(b, n)`` for a ``[B, N, C]`` token input (``channel_axis=-1``).
    """
    return x.movedim(channel_axis, -1).reshape(-1, x.shape[channel_axis])


def within_channel_kurtosis(x: torch.Tensor, channel_axis: int = 1) -> torch.Tensor:
    """``κ_c = κ(X[:, c])``: kurtosis of each channel over all voxels/tokens (and the batch); shape ``[C]``.

    ``channel_axis`` is 1 for conv inputs ``[B, C, *spatial]`` and -1 for linear inputs ``[B, N, C]``.
    """
    return kurtosis(to_voxel_channel(x, channel_axis), dim=0)


def across_channel_kurtosis(x: torch.Tensor, channel_axis: int = 1) -> torch.Tensor:
    """``κ_v = κ(X[v, :])``: kurtosis over the channels at each voxel/token; shape ``[voxels]`` (flattened in the
    row order of :func:`to_voxel_channel`)."""
    return kurtosis(to_voxel_channel(x, channel_axis), dim=1)


def channel_absmax(x: torch.Tensor, channel_axis: int = 1) -> torch.Tensor:
    """``a_c = max_v |X[v, c]|`` per channel, shape ``[C]``."""
    return to_voxel_channel(x, channel_axis).abs().amax(dim=0)


def channel_imbalance(absmax: torch.Tensor) -> float:
    """``max_c a_c / median_c a_c`` of per-channel absolute maxima (1 = balanced; inf if the median is 0)."""
    a = absmax.double().reshape(-1)
    med = a.median()
    return float(a.max() / med) if med > 0 else math.inf


def log10_summary(values: torch.Tensor, threshold: float = DEFAULT_KURTOSIS_THRESHOLD) -> dict[str, float]:
    """Median (the lower one for an even count, as ``torch.median``) / mean / max of ``log10(values)`` and the
    fraction of values ``> threshold``, NaNs skipped.

    All NaN for an empty or all-NaN input.
    """
    v = values.double().reshape(-1)
    v = v[~torch.isnan(v)]
    if v.numel() == 0:
        return {"median": math.nan, "mean": math.nan, "max": math.nan, "frac_above": math.nan}
    lg = torch.log10(v.clamp(min=1e-300))
    return {
        "median": float(lg.median()),
        "mean": float(lg.mean()),
        "max": float(lg.max()),
        "frac_above": float((v > threshold).double().mean()),
    }


def select_voxels(voxel_absmax: torch.Tensor, max_voxels: int, top_fraction: float = 0.25) -> torch.Tensor:
    """Deterministic indices (ascending) of at most ``max_voxels`` rows for an outlier map.

    All rows if there are at most ``max_voxels``. Otherwise the ``round(top_fraction * max_voxels)`` rows of
    largest ``voxel_absmax`` (max over channels of |x|; ties broken by index) so the outliers always show, plus
    rows at a uniform stride over the remaining ones (``linspace`` over their positions) so the background
    shows too; sorted back into spatial order.
    """
    n = voxel_absmax.numel()
    if n <= max_voxels:
        return torch.arange(n)
    k_top = min(max_voxels, max(0, round(top_fraction * max_voxels)))
    order = torch.sort(voxel_absmax.reshape(-1).double().cpu(), descending=True, stable=True).indices
    top = order[:k_top]
    rest_mask = torch.ones(n, dtype=torch.bool)
    rest_mask[top] = False
    rest = torch.nonzero(rest_mask).reshape(-1)
    k_rest = max_voxels - k_top
    if k_rest > 0:
        pick = torch.linspace(0, rest.numel() - 1, k_rest, dtype=torch.float64).round().long().unique()
        top = torch.cat([top, rest[pick]])
    return torch.sort(top).values


def outlier_map(
    x: torch.Tensor,
    channel_axis: int = 1,
    max_voxels: int = 512,
    voxel_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """``|x|`` arranged voxel × channel (``[V, C]``, float32, CPU) for a Fig. 5 style heat map.

    Rows are subsampled with :func:`select_voxels` (the largest-|x| voxels plus a uniform stride, at most
    ``max_voxels``) unless ``voxel_index`` gives them, e.g. the rows chosen for the activation before smoothing
    so the map after smoothing shows the same voxels.
    """
    a = to_voxel_channel(x.detach(), channel_axis).abs()
    if voxel_index is None:
        voxel_index = select_voxels(a.amax(dim=1), max_voxels)
    return a[voxel_index.to(a.device)].float().cpu()


def apply_smoothing_preview(x: torch.Tensor, s: torch.Tensor, channel_axis: int = 1) -> torch.Tensor:
    """The activation after SmoothQuant smoothing, ``x / s`` with ``s`` broadcast along ``channel_axis``.

    Only a preview for statistics: the matching weight change ``W · s`` is not applied anywhere.
    """
    shape = [1] * x.ndim
    shape[channel_axis] = -1
    return x / s.to(device=x.device, dtype=x.dtype).reshape(shape)


def weight_absmax_per_input_channel(module: nn.Module) -> torch.Tensor:
    """``max|W_{:,j}|`` for each input channel ``j`` of a float Linear, conv or conv-transpose layer (float64, CPU);
    see :func:`mqb.quant.methods.base.weight_absmax_per_input_channel`."""
    info = describe_layer("", module)
    if info is None:
        raise TypeError(f"no input-channel weight maxima for {type(module).__name__}")
    return absmax_per_input_channel(module.weight.detach().double().cpu(), info.kind, info.groups)  # type: ignore[union-attr]


# ----------------------------------------------------------------------------------------------------------------
# streaming accumulation


def _merge_moments(
    a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge ``(n, mean, M2, M3, M4)`` of two disjoint samples, ``M_k = Σ (x - mean)^k`` (Pébay 2008, eq. 2.1)."""
    na, ma, m2a, m3a, m4a = a
    nb, mb, m2b, m3b, m4b = b
    n = na + nb
    d = mb - ma
    mean = ma + d * nb / n
    m2 = m2a + m2b + d**2 * na * nb / n
    m3 = m3a + m3b + d**3 * na * nb * (na - nb) / n**2 + 3 * d * (na * m2b - nb * m2a) / n
    m4 = (
        m4a
        + m4b
        + d**4 * na * nb * (na * na - na * nb + nb * nb) / n**3
        + 6 * d**2 * (na * na * m2b + nb * nb * m2a) / n**2
        + 4 * d * (na * m3b - nb * m3a) / n
    )
    return n, mean, m2, m3, m4


@dataclass
class LayerActivationStats:
    """Streaming statistics of one layer's input. Feed batches with :meth:`update`.

    Per channel (exact, any number of batches): central moments merged with Pébay's formulas in float64 (so
    streaming equals one pass over the concatenated batches up to rounding) and ``absmax``. Per voxel: the
    across-channel kurtosis has one value per voxel, so only exact summaries (count, NaN count, sum / max of
    log10, count above ``threshold``, a fixed histogram of log10) and a bounded deterministic sample are kept: the
    voxels whose global row index is a multiple of ``voxel_stride``, a power of two doubled whenever more than
    ``max_voxels`` would be kept (the sample depends only on the row order, not on how rows were batched).
    ``example`` holds signed rows ``[V, C]`` of the first batch's first item (subsampled with
    :func:`select_voxels`) for the Fig. 5 heat map.
    """

    name: str
    kind: str
    kernel: str
    type_name: str
    channel_axis: int
    max_voxels: int = DEFAULT_MAX_VOXELS
    threshold: float = DEFAULT_KURTOSIS_THRESHOLD
    weight_absmax: torch.Tensor | None = None
    channels: int = 0
    count: int = 0
    mean: torch.Tensor | None = None
    m2: torch.Tensor | None = None
    m3: torch.Tensor | None = None
    m4: torch.Tensor | None = None
    absmax: torch.Tensor | None = None
    voxels_nan: int = 0
    voxels_log10_sum: float = 0.0
    voxels_log10_max: float = -math.inf
    voxels_above: int = 0
    voxel_hist: torch.Tensor = field(default_factory=lambda: torch.zeros(HIST_BINS, dtype=torch.int64))
    voxel_stride: int = 1
    voxel_index: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    voxel_kurtosis: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    voxel_absmax: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    example: torch.Tensor | None = None

    @classmethod
    def for_layer(cls, info: LayerInfo, module: nn.Module | None = None, **kwargs: Any) -> LayerActivationStats:
        """Empty statistics for a layer described by ``info`` (channel axis -1 for linear, 1 otherwise)."""
        w = weight_absmax_per_input_channel(module) if module is not None else None
        axis = -1 if info.kind == "linear" else 1
        return cls(info.name, info.kind, info.kernel_tag, info.type_name, axis, weight_absmax=w, **kwargs)

    # -- accumulation --------------------------------------------------------------------------------------------

    def update(self, x: torch.Tensor) -> None:
        """Add a batch of inputs (``[B, C, *spatial]`` or unbatched ``[C, *spatial]`` for convs, ``[..., C]`` for
        linear layers)."""
        x = x.detach()
        if self._unbatched(x):
            x = x.unsqueeze(0)
        rows = to_voxel_channel(x, self.channel_axis)
        if self.channels == 0:
            self.channels = rows.shape[1]
        elif rows.shape[1] != self.channels:
            raise ValueError(f"{self.name}: input has {rows.shape[1]} channels, earlier batches had {self.channels}")
        if self.example is None and rows.shape[0] > 0:
            first = to_voxel_channel(x[:1] if x.ndim > 2 else x, self.channel_axis)  # first item (all rows if 2-D)
            idx = select_voxels(first.abs().amax(dim=1), self.max_voxels)
            self.example = first[idx.to(first.device)].float().cpu()
        chunk = max(1, _CHUNK_ELEMENTS // max(1, self.channels))
        for start in range(0, rows.shape[0], chunk):
            self._update_rows(rows[start : start + chunk])

    def _unbatched(self, x: torch.Tensor) -> bool:
        """A conv input without batch axis: ``[C, *spatial]`` (one axis more than the kernel has)."""
        if self.kind not in ("conv", "conv_transpose") or not self.kernel:
            return False
        return x.ndim == len(re.findall(r"\d+", self.kernel)) + 1

    def _update_rows(self, rows: torch.Tensor) -> None:
        r = rows.double()
        n = r.shape[0]
        if n == 0:
            return
        # per channel: central moments of this chunk, merged into the running ones
        mu = r.mean(dim=0)
        d = r - mu
        d2 = d * d
        chunk = (
            torch.tensor(float(n), dtype=torch.float64),
            mu.cpu(),
            d2.sum(dim=0).cpu(),
            (d2 * d).sum(dim=0).cpu(),
            (d2 * d2).sum(dim=0).cpu(),
        )
        amax = r.abs().amax(dim=0).cpu()
        offset = self.count
        if self.mean is None:
            _, self.mean, self.m2, self.m3, self.m4 = chunk
            self.absmax = amax
        else:
            assert self.m2 is not None and self.m3 is not None and self.m4 is not None and self.absmax is not None
            old = (torch.tensor(float(self.count), dtype=torch.float64), self.mean, self.m2, self.m3, self.m4)
            _, self.mean, self.m2, self.m3, self.m4 = _merge_moments(old, chunk)
            self.absmax = torch.maximum(self.absmax, amax)
        self.count += n
        # per voxel: across-channel kurtosis, summarized exactly plus a strided sample
        kv = kurtosis(r, dim=1).cpu()
        vmax = r.abs().amax(dim=1).cpu()
        valid = ~torch.isnan(kv)
        self.voxels_nan += int((~valid).sum())
        lg = torch.log10(kv[valid].clamp(min=1e-300))
        if lg.numel():
            self.voxels_log10_sum += float(lg.sum())
            self.voxels_log10_max = max(self.voxels_log10_max, float(lg.max()))
            self.voxels_above += int((kv[valid] > self.threshold).sum())
            self.voxel_hist += torch.histc(lg.clamp(0.0, HIST_MAX_LOG10), HIST_BINS, 0.0, HIST_MAX_LOG10).long()
        index = torch.arange(offset, offset + n, dtype=torch.int64)
        keep = index % self.voxel_stride == 0
        self.voxel_index = torch.cat([self.voxel_index, index[keep]])
        self.voxel_kurtosis = torch.cat([self.voxel_kurtosis, kv[keep]])
        self.voxel_absmax = torch.cat([self.voxel_absmax, vmax[keep]])
        while self.voxel_index.numel() > self.max_voxels:
            self.voxel_stride *= 2
            keep = self.voxel_index % self.voxel_stride == 0
            self.voxel_index = self.voxel_index[keep]
            self.voxel_kurtosis = self.voxel_kurtosis[keep]
            self.voxel_absmax = self.voxel_absmax[keep]

    # -- results -------------------------------------------------------------------------------------------------

    @property
    def within_kurtosis(self) -> torch.Tensor:
        """``κ_c`` per channel over every voxel seen: ``n · M4 / M2²`` (NaN for a constant channel)."""
        if self.m2 is None or self.m4 is None:
            return torch.zeros(0, dtype=torch.float64)
        return torch.where(self.m2 > 0, self.count * self.m4 / (self.m2 * self.m2), torch.full_like(self.m2, math.nan))

    def smoothing_factors(self, alpha: float = 0.5) -> torch.Tensor | None:
        """:func:`smoothing_factors` from the collected activation and weight maxima (``None`` without weights)."""
        if self.absmax is None or self.weight_absmax is None or self.weight_absmax.numel() != self.absmax.numel():
            return None
        return smoothing_factors(self.absmax, self.weight_absmax, alpha)

    def summary(self, alpha: float = 0.5) -> dict[str, Any]:
        """One CSV row (:data:`CSV_COLUMNS`). Across-channel median from the voxel sample (exact if
        ``voxel_stride == 1``); mean, max and fraction above ``threshold`` exact over every voxel."""
        within = log10_summary(self.within_kurtosis, self.threshold)
        valid = self.count - self.voxels_nan
        sample = log10_summary(self.voxel_kurtosis, self.threshold)
        s = self.smoothing_factors(alpha)
        absmax = self.absmax if self.absmax is not None else torch.zeros(0)
        return {
            "name": self.name,
            "kind": self.kind,
            "kernel": self.kernel,
            "type": self.type_name,
            "channels": self.channels,
            "voxels_seen": self.count,
            "within_log10_kurtosis_median": within["median"],
            "within_log10_kurtosis_mean": within["mean"],
            "within_log10_kurtosis_max": within["max"],
            "within_frac_above_threshold": within["frac_above"],
            "across_log10_kurtosis_median": sample["median"],
            "across_log10_kurtosis_mean": self.voxels_log10_sum / valid if valid else math.nan,
            "across_log10_kurtosis_max": self.voxels_log10_max if valid else math.nan,
            "across_frac_above_threshold": self.voxels_above / valid if valid else math.nan,
            "threshold": self.threshold,
            "channel_imbalance": channel_imbalance(absmax) if absmax.numel() else math.nan,
            "channel_imbalance_smoothed": channel_imbalance(absmax.double() / s) if s is not None else math.nan,
            "alpha": alpha,
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        """The per-channel and per-voxel arrays, for :func:`save_activation_stats`."""
        out = {
            "within_kurtosis": self.within_kurtosis,
            "channel_absmax": self.absmax,
            "weight_absmax": self.weight_absmax,
            "channel_mean": self.mean,
            "voxel_index": self.voxel_index,
            "voxel_kurtosis": self.voxel_kurtosis,
            "voxel_absmax": self.voxel_absmax,
            "voxel_log10_kurtosis_hist": self.voxel_hist,
            "example": self.example,
        }
        return {k: v.detach().cpu().contiguous() for k, v in out.items() if v is not None}


# ----------------------------------------------------------------------------------------------------------------
# collection over a model


def collect_activation_stats(
    model: nn.Module,
    batches: Iterable[Any],
    layers: Sequence[str] | str = ("conv", "linear"),
    max_voxels: int = DEFAULT_MAX_VOXELS,
    *,
    threshold: float = DEFAULT_KURTOSIS_THRESHOLD,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    max_batches: int | None = None,
) -> dict[str, LayerActivationStats]:
    """Run the float ``model`` on ``batches`` and gather :class:`LayerActivationStats` of each selected layer's input.

    ``layers`` are mqb selectors (:mod:`mqb.quant.selectors`) over :func:`mqb.quant.api.quantizable_layers`;
    attention layers are skipped (their inputs are not one activation). Forward pre-hooks on the float modules
    see each input before the layer; they are removed afterwards, also on error. ``forward(model, batch)``
    customises how a batch runs (default: a tensor, ``(image, ...)`` or ``{"image": ...}``). Runs under
    ``torch.no_grad`` in eval mode and restores the train/eval state. Keys follow module order.
    """
    selectors = (layers,) if isinstance(layers, str) else tuple(layers)
    for s in selectors:
        validate_selector(s)
    modules = dict(model.named_modules())
    infos = [i for i in quantizable_layers(model) if i.kind != "attention" and matches_any(selectors, i)]
    if not infos:
        raise ValueError(f"collect_activation_stats: selectors {list(selectors)} match no conv/linear layer")
    stats = {
        i.name: LayerActivationStats.for_layer(i, modules[i.name], max_voxels=max_voxels, threshold=threshold)
        for i in infos
    }

    def make_hook(layer: LayerActivationStats) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if args and isinstance(args[0], torch.Tensor):
                layer.update(args[0])

        return hook

    hooks = [modules[info.name].register_forward_pre_hook(make_hook(stats[info.name])) for info in infos]
    seen = run_batches(model, batches, forward, hooks, max_batches)
    if seen == 0:
        raise ValueError("collect_activation_stats: the batches were empty")
    return {name: st for name, st in stats.items() if st.count > 0}


# ----------------------------------------------------------------------------------------------------------------
# storage


def save_activation_stats(
    stats: dict[str, LayerActivationStats], out_dir: str | Path, alpha: float = 0.5
) -> tuple[Path, Path]:
    """Write ``activation_stats.csv`` (one :meth:`LayerActivationStats.summary` row per layer, columns
    :data:`CSV_COLUMNS`) and ``activation_stats.safetensors`` (keys ``<layer>/<array>``, see
    :meth:`LayerActivationStats.tensors`) atomically into ``out_dir``; return both paths."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    csv_path, tensor_path = out / "activation_stats.csv", out / "activation_stats.safetensors"
    with atomic_write(csv_path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for st in stats.values():
            writer.writerow(st.summary(alpha))
    flat = {f"{name}/{key}": t for name, st in stats.items() for key, t in st.tensors().items()}
    with atomic_write(tensor_path) as tmp:
        save_file(flat, str(tmp), metadata={"alpha": str(alpha)})
    return csv_path, tensor_path


# ----------------------------------------------------------------------------------------------------------------
# figures (matplotlib Figure objects with the Agg canvas: no pyplot state, nothing shown)


def _save_figure(fig: Any, path: str | Path) -> Path:
    target = Path(path)
    with atomic_write(target) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return target


def _wrap_name(name: str, width: int = 26) -> str:
    """A long qualified layer name broken into lines of at most ``width`` characters, after a ``.`` or ``_``
    where possible (``encoder.stages.0.`` / ``conv_depthwise_expansion``)."""
    lines, line = [], ""
    for part in re.findall(r"[^._]+[._]?|[._]", name) or [name]:
        if line and len(line) + len(part) > width:
            lines.append(line)
            line = ""
        while len(part) > width:  # one piece longer than a line
            lines.append(part[:width])
            part = part[width:]
        line += part
    return "\n".join([*lines, line] if line else lines)


def _index_formatter(value: float, _: Any) -> str:
    """Tick labels of unit indices: ``0``, ``900``, ``2.5k``, ``4M`` (no offset text colliding with the label)."""
    for suffix, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.0f}"


def kurtosis_scatter_figure(
    stats: LayerActivationStats | Sequence[LayerActivationStats] | dict[str, LayerActivationStats],
) -> Any:
    """Fig. 1b style: ``log10`` kurtosis per unit for one or more layers (one column each), as a
    :class:`~matplotlib.figure.Figure`.

    Top row: one dot per channel (within-channel kurtosis), bottom row: one dot per sampled voxel or token
    (across-channel kurtosis); x = unit index (global row index for voxels), colour = the unit's max |x| relative
    to the largest in its panel (one colour bar per row; each panel's title gives that largest value). A dashed
    line marks a normal distribution's κ = 3. Long layer names are wrapped at dots; index ticks read ``2M``, not
    an offset; the layout is constrained so titles, ticks and labels do not overlap.
    """
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    if isinstance(stats, LayerActivationStats):
        layers = [stats]
    elif isinstance(stats, dict):
        layers = list(stats.values())
    else:
        layers = list(stats)
    if not layers:
        raise ValueError("plot_kurtosis_scatter: no layers to plot")
    titles = [_wrap_name(st.name) for st in layers]
    title_lines = max(t.count("\n") + 1 for t in titles) + 1
    fig = Figure(figsize=(2.9 * len(layers) + 1.6, 5.2 + 0.16 * title_lines), layout="constrained")
    axes = fig.subplots(2, len(layers), squeeze=False)
    cmap, norm = colormaps["coolwarm"], Normalize(vmin=0.0, vmax=1.0)
    for col, (st, title) in enumerate(zip(layers, titles, strict=True)):
        series = (
            ("channel", st.within_kurtosis, st.absmax, torch.arange(st.channels)),
            ("token" if st.kind == "linear" else "voxel", st.voxel_kurtosis, st.voxel_absmax, st.voxel_index),
        )
        peaks = []
        for row, (unit, kurt, mag, index) in enumerate(series):
            ax = axes[row][col]
            empty = torch.zeros(0, dtype=torch.float64, device="cpu")  # plotted with matplotlib: CPU by design
            k = kurt.double().reshape(-1).cpu() if kurt is not None else empty
            m = mag.double().reshape(-1).cpu() if mag is not None else torch.zeros_like(k)
            m = m if m.numel() == k.numel() else torch.zeros_like(k)
            ok = ~torch.isnan(k)
            y = torch.log10(k[ok].clamp(min=1e-300)).numpy()
            c = m[ok].abs().numpy()
            peak = float(c.max()) if c.size else 0.0
            peaks.append(peak)
            ax.scatter(index[ok].cpu().numpy() if index.numel() == k.numel() else range(int(ok.sum())), y,
                       c=c / peak if peak > 0 else c, cmap=cmap, norm=norm, s=12 if row == 0 else 5,
                       linewidths=0)  # fmt: skip
            ax.axhline(math.log10(3.0), color="dimgray", linestyle="--", linewidth=0.8)
            ax.xaxis.set_major_locator(MaxNLocator(nbins=4, integer=True))
            ax.xaxis.set_major_formatter(FuncFormatter(_index_formatter))
            ax.yaxis.set_major_locator(MaxNLocator(nbins=5))
            ax.tick_params(labelsize="small")
            ax.set_xlabel(f"{unit} index", fontsize="small")
            if col == 0:
                ax.set_ylabel(f"log₁₀ κ {'within' if row == 0 else 'across'} channels", fontsize="small")
            ax.grid(alpha=0.25)
        axes[0][col].set_title(f"{title}\n{st.kernel or st.kind} · max |x| {peaks[0]:.3g}", fontsize="small")
    for row, what in enumerate(("channel", "voxel/token")):
        bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=list(axes[row]), fraction=0.04, pad=0.01)
        bar.set_label(f"{what} max |x| / panel max", fontsize="small")
        bar.ax.tick_params(labelsize="x-small")
    fig.suptitle("Kurtosis per channel (top) and per voxel/token (bottom); dashed: a normal's κ = 3",
                 fontsize="medium")  # fmt: skip
    return fig


def plot_kurtosis_scatter(
    stats: LayerActivationStats | Sequence[LayerActivationStats] | dict[str, LayerActivationStats],
    path: str | Path,
) -> Path:
    """Write :func:`kurtosis_scatter_figure` of ``stats`` as a PNG at ``path``; returns the path."""
    return _save_figure(kurtosis_scatter_figure(stats), path)


def plot_outlier_heatmap(
    x_before: torch.Tensor,
    x_after: torch.Tensor,
    path: str | Path,
    channel_axis: int = 1,
    max_voxels: int = 512,
    title: str = "",
) -> Path:
    """Fig. 5 style: side-by-side ``|x|`` heat maps before / after smoothing, channel (x) × voxel (y).

    ``x_before`` and ``x_after`` have the same shape; pass ``[V, C]`` matrices with ``channel_axis=-1``. The rows
    are chosen once from ``x_before`` (:func:`select_voxels`) and shown for both. Each panel has its own colour
    scale, so the scales show how far smoothing reduced the magnitudes.
    """
    from matplotlib.figure import Figure

    if x_before.shape != x_after.shape:
        raise ValueError(f"plot_outlier_heatmap: shapes differ, {tuple(x_before.shape)} vs {tuple(x_after.shape)}")
    before = to_voxel_channel(x_before.detach(), channel_axis).abs()
    index = select_voxels(before.amax(dim=1), max_voxels)
    maps = (
        ("before smoothing", outlier_map(x_before, channel_axis, voxel_index=index)),
        ("after smoothing", outlier_map(x_after, channel_axis, voxel_index=index)),
    )
    fig = Figure(figsize=(10, 4.5))
    fig.subplots_adjust(left=0.08, right=0.97, bottom=0.12, top=0.86, wspace=0.3)
    axes = fig.subplots(1, 2, squeeze=False)[0]
    for ax, (label, m) in zip(axes, maps, strict=True):
        im = ax.imshow(m.numpy(), aspect="auto", cmap="coolwarm", interpolation="nearest", origin="lower")
        ax.set_title(f"{label} (max |x| {float(m.max()) if m.numel() else 0.0:.3g})", fontsize=9)
        ax.set_xlabel("channel")
        ax.set_ylabel(f"voxel ({m.shape[0]} of {before.shape[0]})")
        fig.colorbar(im, ax=ax, label="|x|")
    if title:
        fig.suptitle(title, fontsize=10)
    return _save_figure(fig, path)


# ----------------------------------------------------------------------------------------------------------------
# report


def _max_within(st: LayerActivationStats) -> float:
    k = st.within_kurtosis
    k = k[~torch.isnan(k)]
    return float(k.max()) if k.numel() else -math.inf


def _file_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "layer"


def activation_report(
    model: nn.Module,
    batches: Iterable[Any],
    out_dir: str | Path,
    layers: Sequence[str] | str = ("conv", "linear"),
    *,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    threshold: float = DEFAULT_KURTOSIS_THRESHOLD,
    alpha: float = 0.5,
    plot_layers: int | Sequence[str] = 4,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    max_batches: int | None = None,
) -> Path:
    """Collect activation statistics, save them and draw the figures; return ``out_dir``.

    Writes ``activation_stats.csv`` / ``.safetensors`` (:func:`save_activation_stats`), ``kurtosis_scatter.png``
    (:func:`plot_kurtosis_scatter`) and ``outliers_<layer>.png`` (:func:`plot_outlier_heatmap` of each plotted
    layer's example rows before / after smoothing with ``alpha``). ``plot_layers``: layer names, or how many
    layers to plot, chosen as those with the largest maximum within-channel kurtosis (shown in module order).
    """
    stats = collect_activation_stats(
        model, batches, layers, max_voxels, threshold=threshold, forward=forward, max_batches=max_batches
    )
    out = Path(out_dir)
    save_activation_stats(stats, out, alpha)
    if isinstance(plot_layers, int):
        top = set(sorted(stats, key=lambda n: _max_within(stats[n]), reverse=True)[: max(0, plot_layers)])
        chosen = [n for n in stats if n in top]
    else:
        missing = [n for n in plot_layers if n not in stats]
        if missing:
            raise ValueError(f"activation_report: no statistics for layers {missing}; have {list(stats)}")
        chosen = list(plot_layers)
    if chosen:
        plot_kurtosis_scatter([stats[n] for n in chosen], out / "kurtosis_scatter.png")
    for n in chosen:
        st = stats[n]
        s = st.smoothing_factors(alpha)
        if st.example is None or s is None:
            continue
        after = apply_smoothing_preview(st.example.double(), s, channel_axis=-1).float()
        plot_outlier_heatmap(
            st.example,
            after,
            out / f"outliers_{_file_stem(n)}.png",
            channel_axis=-1,
            max_voxels=st.max_voxels,
            title=f"{n} ({st.kernel or st.kind}), smoothing alpha={alpha}",
        )
    return out
