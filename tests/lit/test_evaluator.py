"""The evaluator scores label-free volumes against FP32 reference predictions."""

import torch
from torch import nn

from mqb.lit.evaluator import SegmentationEvaluator
from mqb.metrics import case_metrics


class Shift(nn.Module):
    """Logits whose argmax is the input's channel 0 thresholded, optionally shifted by one voxel."""

    def __init__(self, shift: int) -> None:
        super().__init__()
        self.shift = shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fg = torch.roll(x[:, :1], self.shift, dims=2)
        return torch.cat([0.5 - fg, fg - 0.5], dim=1)


def _run(evaluator: SegmentationEvaluator, batch: dict) -> dict:
    evaluator.on_test_epoch_start()
    evaluator.test_step(batch, 0)
    evaluator.on_test_epoch_end()
    return evaluator.results


def test_label_free_reference_run_and_agreement():
    image = torch.zeros(1, 1, 16, 16, 16)
    image[:, :, 4:10, 4:10, 4:10] = 1.0
    batch = {"image": image, "case": ["vol"]}
    reference_eval = SegmentationEvaluator(Shift(0), ["bg", "fg"], (16, 16, 16), keep_predictions=True)
    ref = _run(reference_eval, batch)
    assert ref["dsc"] == 1.0  # the FP32 run is its own reference
    stored = reference_eval.predictions["vol"]
    assert stored.dtype == torch.uint8 and int(stored.sum()) == 216
    shifted = SegmentationEvaluator(Shift(1), ["bg", "fg"], (16, 16, 16), reference_predictions={"vol": stored})
    out = _run(shifted, batch)
    expected = case_metrics(torch.roll(stored, 1, dims=0), stored, 2, (1.0, 1.0, 1.0), [2.0])
    assert abs(out["dsc"] - float(expected["dsc"][0])) < 1e-9 and out["dsc"] < 1.0
