"""A readable summary of a quantized model: per layer and per layer group, with realizability."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from torch import nn

from mqb.analysis.tables import group_summary_table, layer_summary_table
from mqb.quant.layers import LayerInfo
from mqb.quant.realizability import Realizability, realizability
from mqb.quant.spec import QuantSpec


@dataclass(frozen=True)
class LayerRow:
    info: LayerInfo
    weight: QuantSpec | None
    activation: QuantSpec | None
    realizability: Realizability

    @property
    def group(self) -> str:
        """The layer group used in the paper's sensitivity study: conv1x3x3, conv1x1x1 dw, linear ..."""
        base = self.info.kernel_tag or self.info.kind
        return base + (" depthwise" if self.info.depthwise else "")

    def as_record(self) -> dict[str, object]:
        return {
            "name": self.info.name,
            "type": self.info.type_name,
            "group": self.group,
            "kernel": self.info.describe_kernel(),
            "weight": self.weight.short() if self.weight else "float",
            "activation": self.activation.short() if self.activation else "float",
            "realizability": self.realizability.status,
            "reason": self.realizability.reason,
        }


@dataclass(frozen=True)
class QuantSummary:
    rows: tuple[LayerRow, ...]

    @property
    def quantized(self) -> tuple[LayerRow, ...]:
        return tuple(r for r in self.rows if r.realizability.status != "float")

    def groups(self) -> dict[str, dict[str, object]]:
        """Per layer group: layer count, W/A specs used, and realizability status counts."""
        out: dict[str, dict[str, object]] = {}
        for row in self.rows:
            g = out.setdefault(row.group, {"layers": 0, "weight": set(), "activation": set(), "status": Counter()})
            g["layers"] += 1  # type: ignore[operator]
            g["weight"].add(row.weight.short() if row.weight else "float")  # type: ignore[union-attr]
            g["activation"].add(row.activation.short() if row.activation else "float")  # type: ignore[union-attr]
            g["status"][row.realizability.status] += 1  # type: ignore[index]
        return out

    def records(self) -> list[dict[str, object]]:
        return [r.as_record() for r in self.rows]

    def layer_table(self) -> str:
        """One line per layer, as text (:func:`mqb.analysis.tables.layer_summary_table`)."""
        return layer_summary_table(self.records())

    def group_table(self) -> str:
        """One line per layer group, as text (:func:`mqb.analysis.tables.group_summary_table`)."""
        return group_summary_table(self.groups())

    def __str__(self) -> str:
        n_sim = sum(1 for r in self.rows if r.realizability.status == "simulation-only")
        head = (
            f"{len(self.quantized)} of {len(self.rows)} quantizable layers quantized; "
            f"{n_sim} simulation-only (no real low-bit kernel executes them as configured)"
        )
        return f"{head}\n\n{self.group_table()}\n\n{self.layer_table()}"


def summarize(model: nn.Module) -> QuantSummary:
    """Summarize every quantizable layer of ``model`` (float layers included, marked ``float``; norms only when
    their input is quantized: a float norm is the default, not a layer the recipe left out)."""
    from mqb.quant.api import describe, used_modules  # local import: api imports this module's siblings

    rows = []
    for name, module in used_modules(model):
        info = getattr(module, "mqb_info", None) or describe(name, module)
        if info is None or (info.kind == "norm" and not hasattr(module, "mqb_info")):
            continue
        weight = getattr(module, "weight_spec", None) if hasattr(module, "mqb_info") else None
        activation = getattr(module, "activation_spec", None) if hasattr(module, "mqb_info") else None
        rows.append(LayerRow(info, weight, activation, realizability(info, weight, activation)))
    return QuantSummary(tuple(rows))
