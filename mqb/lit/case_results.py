"""``CaseResults``: the per-case metrics of a test run as a torchmetrics ``Metric``, so that under DDP every process's
cases are gathered by torchmetrics' own synchronisation (``gather_all_tensors``, uneven shares included) rather
than by a hand-written ``all_gather_object``.

Each case adds one row: its id (UTF-8 bytes), its per-class values of every metric (float64, NaN kept), its voxel
spacing, and optionally its label map. The states are flat tensors concatenated across processes
(``dist_reduce_fx="cat"``) with the row lengths beside them, so a process with a different number of cases, ids of
different lengths or volumes of different shapes gathers correctly. ``compute()`` returns the cases once each
(``DistributedSampler`` pads a short last share with repeats of the first cases) in sorted id order: one order
whatever the number of processes, so the means downstream add the same numbers in the same order.

The states live on the module's device (``.to()`` moves them with the ``LightningModule`` that holds this metric).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torchmetrics import Metric


@dataclass
class Case:
    """One scored case: its id, its per-class metric values, its voxel spacing (mm), its label map (or ``None``)."""

    case: str
    metrics: dict[str, np.ndarray]
    spacing: tuple[float, ...]
    prediction: torch.Tensor | None = None


class CaseResults(Metric):
    """Per-case, per-class metric values gathered across processes.

    Args:
        metric_names: the metrics each case reports (``dsc``, ``nsd``, ``hd95``), in the order they are stored.
        num_values: values per metric and case (the number of foreground classes).
        keep_predictions: also gather each case's label map (uint8), e.g. FP32 reference predictions.
    """

    full_state_update = False
    # values are whatever each case reports; nothing here is "higher is better"
    higher_is_better = None
    is_differentiable = False

    def __init__(self, metric_names: Sequence[str], num_values: int, keep_predictions: bool = False) -> None:
        super().__init__(dist_sync_on_step=False)
        self.metric_names = list(metric_names)
        self.num_values = int(num_values)
        self.keep_predictions = keep_predictions
        for name in ("ids", "id_lengths", "values", "spacing"):
            self.add_state(name, default=[], dist_reduce_fx="cat")
        if keep_predictions:
            self.add_state("predictions", default=[], dist_reduce_fx="cat")
            self.add_state("shapes", default=[], dist_reduce_fx="cat")

    def update(self, case: str, metrics: Mapping[str, np.ndarray], spacing: Sequence[float],
               prediction: torch.Tensor | None = None) -> None:  # fmt: skip
        missing = [m for m in self.metric_names if m not in metrics]
        if missing:
            raise ValueError(f"case {case!r}: no {', '.join(missing)} (expected {', '.join(self.metric_names)})")
        values = np.concatenate([np.asarray(metrics[m], dtype=np.float64).reshape(-1) for m in self.metric_names])
        if values.size != len(self.metric_names) * self.num_values:
            raise ValueError(f"case {case!r}: {values.size} metric values; expected {self.num_values} per metric "
                             f"({', '.join(self.metric_names)})")  # fmt: skip
        encoded = torch.tensor(list(str(case).encode()), dtype=torch.uint8, device=self.device)
        self.ids.append(encoded)
        self.id_lengths.append(torch.tensor([encoded.numel()], dtype=torch.int64, device=self.device))
        self.values.append(torch.as_tensor(values, device=self.device))
        self.spacing.append(torch.tensor([float(s) for s in spacing], dtype=torch.float64, device=self.device))
        if self.keep_predictions:
            if prediction is None:
                raise ValueError(f"case {case!r}: keep_predictions is on but no prediction was given")
            self.predictions.append(prediction.detach().to(device=self.device, dtype=torch.uint8).reshape(-1))
            self.shapes.append(torch.tensor(list(prediction.shape), dtype=torch.int64, device=self.device))

    def _flat(self, name: str) -> torch.Tensor:
        """State ``name`` as one flat tensor: a list before synchronisation, one concatenated tensor after it."""
        state = getattr(self, name)
        if isinstance(state, torch.Tensor):
            return state.reshape(-1)
        if not state:
            return torch.empty(0, device=self.device)
        return torch.cat([s.reshape(-1) for s in state])

    def compute(self) -> list[Case]:
        """The cases, each once, sorted by id (label maps on the CPU)."""
        ids, lengths = self._flat("ids").to(torch.uint8).cpu(), self._flat("id_lengths").long().cpu()
        values = self._flat("values").double().cpu().numpy()
        spacing = self._flat("spacing").double().cpu().numpy().reshape(len(lengths), -1) if len(lengths) else []
        per_case = len(self.metric_names) * self.num_values
        names, offset = [], 0
        for n in lengths.tolist():
            names.append(bytes(ids[offset : offset + n].tolist()).decode())
            offset += n
        predictions: list[torch.Tensor | None] = [None] * len(names)
        if self.keep_predictions:
            flat, shapes = self._flat("predictions").to(torch.uint8).cpu(), self._flat("shapes").long().cpu()
            dims = shapes.numel() // max(len(names), 1)
            offset = 0
            for i, shape in enumerate(shapes.reshape(len(names), dims).tolist()):
                size = int(np.prod(shape))
                predictions[i] = flat[offset : offset + size].reshape(shape)
                offset += size
        cases: dict[str, Case] = {}
        for i, name in enumerate(names):
            if name in cases:  # a sampler repeat
                continue
            row = values[i * per_case : (i + 1) * per_case].reshape(len(self.metric_names), self.num_values)
            metrics = {m: row[j].copy() for j, m in enumerate(self.metric_names)}
            cases[name] = Case(name, metrics, tuple(float(s) for s in spacing[i]), predictions[i])
        return [cases[name] for name in sorted(cases)]
