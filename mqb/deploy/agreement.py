"""Agreement between mqb's fake-quantized prediction and a deployed runtime's prediction on the same input.

* :func:`prediction_dice`: Dice of the two argmax label maps (MONAI ``DiceMetric`` on one-hot maps), averaged
  over the classes present in either map (a class absent from both says nothing about agreement); target
  >= 0.99 at W8A8.
* :func:`logit_agreement`: how close the logits are, in quantization steps of an INT8 grid over the reference's
  range (``max|y| / 127``): the fraction of voxels within one step and the largest difference.
* :func:`float64_twin`: the *rounding floor* of both. A quantized network rounds every activation to its grid, so a
  value that lands near a rounding boundary (k + 1/2 steps) moves a whole step when any arithmetic changes by one
  float32 ulp, and the step travels on through the later layers. Two exact implementations of the same INT8 network
  (mqb's float32 fake quantization, ONNX Runtime's int32 arithmetic) therefore differ at a few voxels whatever is
  deployed, and by how much depends on the network: a network whose logits are near ties at many voxels (early in
  training) differs more. The floor measures that for the network at hand: mqb's fake quantization computed again in
  float64 (same calibrated ranges), compared with the float32 one. A runtime's own summation order (blocked
  layouts, fused bias, int32 accumulation) perturbs more than float64 does, so an exact runtime lands somewhat
  below the floor but in its range; a saturating INT8 dot product, a wrong scale or zero point, or a layer run
  differently lands far below it. A norm summed in one float32 pass over a whole volume perturbs far more than
  float64 does (ONNX Runtime's and OpenVINO's instance norms: a trained nnU-Net on a 96³ phantom 0.003 / 0.011 of
  Dice below its floor of 0.990); mqb's ONNX Runtime runs norms axis-wise instead (:mod:`mqb.deploy.norms`) and
  lands at the floor.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot


def _labels(x: np.ndarray | torch.Tensor, num_classes: int | None) -> tuple[torch.Tensor, int]:
    """(B, 1, *spatial) integer labels: argmax over axis 1 of logits (B, C, ...), or labels as given."""
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if t.is_floating_point():
        classes = int(t.shape[1]) if num_classes is None else num_classes
        return t.argmax(dim=1, keepdim=True), classes
    if num_classes is None:
        raise ValueError("label maps need num_classes")
    return (t if t.ndim >= 2 and t.shape[1] == 1 else t.unsqueeze(1)).long(), num_classes


def prediction_dice(
    reference: np.ndarray | torch.Tensor, candidate: np.ndarray | torch.Tensor, num_classes: int | None = None
) -> dict[str, Any]:
    """Dice between the argmax predictions of two logit tensors (B, C, *spatial), or two label maps.

    Returns ``dice`` (mean over cases and over the classes present in either prediction), ``per_class``
    (mean over cases, ``None`` where a class is absent from both) and ``voxel_agreement`` (fraction of voxels
    with the same label).
    """
    ref, classes = _labels(reference, num_classes)
    cand, _ = _labels(candidate, classes)
    if ref.shape != cand.shape:
        raise ValueError(f"prediction shapes differ: {tuple(ref.shape)} vs {tuple(cand.shape)}")
    ref_1h, cand_1h = one_hot(ref, classes), one_hot(cand, classes)
    metric = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
    dice = metric(y_pred=cand_1h, y=ref_1h)  # (B, C); both empty -> 1, one empty -> 0
    spatial = tuple(range(2, ref_1h.ndim))
    present = (ref_1h.sum(spatial) > 0) | (cand_1h.sum(spatial) > 0)
    dice = torch.where(present, dice, torch.full_like(dice, float("nan")))
    per_class = torch.nanmean(dice, dim=0)
    return {
        "dice": float(torch.nanmean(dice)),
        "per_class": [None if torch.isnan(v) else round(float(v), 6) for v in per_class],
        "voxel_agreement": float((ref == cand).float().mean()),
        "classes_present": int(present.any(0).sum()),
    }


#: The agreement row (``mqb.deploy compare``) of mqb's fake quantization recomputed in float64: the rounding floor.
ROUNDING_FLOOR = "mqb fake-quant float64"


def float64_twin(model: torch.nn.Module) -> torch.nn.Module:
    """A float64 copy of ``model`` (weights, buffers and calibrated quantizer ranges converted, scales recomputed in
    float64) for the rounding floor (module docstring); ``model`` itself is unchanged. Run it on float64 input."""
    import copy

    return copy.deepcopy(model).double().eval()


def logit_agreement(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Difference of two logit tensors in INT8 steps of the reference's range (``step = max|ref| / 127``)."""
    ref, cand = np.asarray(reference, dtype=np.float64), np.asarray(candidate, dtype=np.float64)
    step = float(np.abs(ref).max()) / 127 or 1.0
    diff = np.abs(ref - cand) / step
    return {
        "step": step,
        "within_one_step": float((diff <= 1.0).mean()),
        "max_steps": float(diff.max()),
        "mean_steps": float(diff.mean()),
    }
