"""The evaluator scores label-free volumes against FP32 reference predictions."""

import pytest
import torch
from torch import nn

from mqb.lit.evaluator import SegmentationEvaluator, calibration_forward
from mqb.metrics import case_metrics
from mqb.quant import QuantRecipe, calibrate, quantize
from tests.devices import device_params, exact_float32


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


def _quantized_net(device: str) -> nn.Module:
    """A small conv net, W4A4 per-channel, calibrated through the evaluator's sliding-window forward."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 3, 1)).eval().to(device)
    evaluator = SegmentationEvaluator(net, ["bg", "a", "b"], (8, 8, 8))
    quantize(net, QuantRecipe.from_precision("w4a4", granularity="adaptive"))
    volumes = [{"image": torch.randn(1, 1, 12, 12, 12, generator=torch.Generator().manual_seed(s))} for s in (1, 2)]
    calibrate(net, volumes, forward=calibration_forward(evaluator))  # CPU volumes go to the network's device
    return net


@pytest.mark.parametrize("device", device_params())
def test_evaluator_on_device_matches_cpu(device):
    """Forward (sliding windows) and scoring of a quantized network on ``device`` against the CPU run."""
    image = torch.randn(1, 1, 12, 12, 12, generator=torch.Generator().manual_seed(3))
    label = (image > 0.3).long() + (image > 1.2).long()
    results, logits = {}, {}
    for dev in ("cpu", device):
        with exact_float32():
            evaluator = SegmentationEvaluator(_quantized_net(dev), ["bg", "a", "b"], (8, 8, 8)).to(dev)
            with torch.no_grad():
                logits[dev] = evaluator(image.to(dev))
                results[dev] = _run(evaluator, {"image": image.to(dev), "label": label.to(dev), "case": ["vol"]})
    assert logits[device].device.type == device
    torch.testing.assert_close(logits[device].cpu(), logits["cpu"], rtol=1e-5, atol=1e-5)
    for metric in ("dsc", "nsd", "hd95"):
        assert results[device][metric] == pytest.approx(results["cpu"][metric], rel=1e-5, nan_ok=True)


def test_non_finite_inputs_and_logits_are_errors_naming_the_case_and_the_layer() -> None:
    """A NaN voxel is refused before the forward (it would score DSC 0 as a success); non-finite logits name the
    first layer whose output is non-finite."""
    import pytest
    from torch import nn

    from mqb.lit.evaluator import SegmentationEvaluator
    from mqb.quant.ptq import NonFiniteError

    class Overflow(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * torch.finfo(torch.float32).max * 4  # inf where x != 0

    net = nn.Sequential(nn.Conv3d(1, 2, 1), Overflow(), nn.Conv3d(2, 2, 1)).eval()
    ev = SegmentationEvaluator(net, ["background", "x"], roi_size=(8, 8, 8), sw_batch_size=1)
    image = torch.rand(1, 1, 8, 8, 8)
    with pytest.raises(NonFiniteError, match=r"first non-finite output: 1 \(Overflow\)"):
        ev.test_step({"image": image, "case": ["c1"]}, 0)
    image[0, 0, 2, 2, 2] = float("nan")
    with pytest.raises(NonFiniteError, match=r"case c1: the image has 1 non-finite voxels"):
        ev.test_step({"image": image, "case": ["c1"]}, 0)


def test_metatensor_labels_and_where_the_time_went():
    """A MONAI MetaTensor label (what the data module yields) scores as the plain tensor does, and the evaluator
    says where the test loop's time went (forwards, metrics)."""
    from monai.data import MetaTensor

    image = torch.zeros(1, 1, 16, 16, 16)
    image[:, :, 4:10, 3:11, 5:9] = 1.0
    label = torch.roll((image > 0.5).long(), 1, dims=4)  # one 3 mm slice: beyond the 2 mm tolerance
    affine = torch.diag(torch.tensor([1.5, 1.5, 3.0, 1.0], dtype=torch.float64))
    results = []
    for wrap in (lambda t: t, lambda t: MetaTensor(t, affine=affine)):
        evaluator = SegmentationEvaluator(Shift(0), ["bg", "fg"], (16, 16, 16))
        batch = {"image": MetaTensor(image, affine=affine), "label": wrap(label), "case": ["vol"]}
        results.append(_run(evaluator, batch))
        assert evaluator.forward_seconds > 0 and evaluator.metric_seconds > 0
    assert results[0]["per_case"]["vol"]["spacing_mm"] == [1.5, 1.5, 3.0]
    expected = case_metrics((image[0, 0] > 0.5).long(), label[0, 0], 2, (1.5, 1.5, 3.0), [2.0])
    for metric in ("dsc", "nsd", "hd95"):
        assert results[0][metric] == results[1][metric] == pytest.approx(float(expected[metric][0]))
    assert 0 < results[0]["nsd"] < 1


@pytest.mark.parametrize("device", device_params())
def test_finite_check_and_label_map(device):
    """The sum-first finite check: a NaN or an Inf anywhere is caught, finite values whose sum overflows float32
    are not refused; the label map is ``argmax`` (first maximum on ties), MetaTensor or not."""
    from monai.data import MetaTensor

    from mqb.lit.evaluator import all_finite, label_map

    x = torch.randn(2, 3, 5, 6, 7, device=device)
    assert all_finite(x)
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[1, 2, 4, 5, 6] = bad
        assert not all_finite(y)
    opposite = torch.tensor([float("inf"), -float("inf")], device=device)  # the sum is NaN either way
    assert not all_finite(opposite)
    huge = torch.full((4,), 3e38, device=device)  # finite, its float32 sum overflows
    assert not bool(torch.isfinite(huge.sum())) and all_finite(huge)
    ties = torch.randint(0, 3, (2, 5, 6, 7, 8), generator=torch.Generator().manual_seed(0)).float().to(device)
    for logits in (ties, MetaTensor(ties)):
        out = label_map(logits)
        assert type(out) is torch.Tensor and out.device.type == device
        assert torch.equal(out, ties.argmax(dim=1))
