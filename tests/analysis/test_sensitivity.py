"""Sensitivity: the ranking finds a deliberately fragile layer; proxies, budget and mixed-precision search."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from mqb.analysis.sensitivity import (
    bit_budget,
    execution_order,
    greedy_mixed_precision,
    incremental_steps,
    layer_error_proxies,
    per_layer_steps,
    rank_by_recovery,
    rank_correlation,
)
from mqb.quant import QuantRecipe, calibrate, quantize

ROOT = Path(__file__).resolve().parents[2]


class Chain(nn.Module):
    """Four 3x3x3 convs; ``c3``'s input carries a few huge voxels, so a per-tensor scale wipes out the rest."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3, self.c4 = (nn.Conv3d(8, 8, 3, padding=1) for _ in range(4))
        self.stem = nn.Conv3d(1, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c1(self.stem(x)))
        x = torch.relu(self.c2(x))
        spike = torch.zeros_like(x)
        spike[..., 0, 0, 0] = 500.0  # spatially localized outliers feeding c3 (the paper's pattern)
        x = torch.tanh(self.c3(x + spike))  # bounded: the outlier does not reach c4
        return self.c4(x)


def _model_and_data():
    torch.manual_seed(0)
    model = Chain().eval()
    data = [torch.randn(1, 1, 8, 8, 8) for _ in range(3)]
    return model, data


def _score(model: nn.Module, data: list[torch.Tensor], excluded: tuple[str, ...]) -> float:
    """Higher is better: 1 - relative output error of the W8A8 model against the float model."""
    reference = [model(x) for x in data]
    recipe = QuantRecipe.from_precision("w8a8", granularity="per_tensor", exclude=("name:stem", *excluded))
    q = quantize(Chain().eval(), recipe)
    q.load_state_dict(model.state_dict(), strict=False)
    calibrate(q, data)
    with torch.no_grad():
        errors = [float((q(x) - r).norm() / r.norm()) for x, r in zip(data, reference, strict=True)]
    return 1.0 - sum(errors) / len(errors)


def test_per_layer_ranking_finds_the_fragile_layer():
    model, data = _model_and_data()
    with torch.no_grad():
        names = execution_order(model, data[0], ["c4", "c3", "c2", "c1"])
    assert names == ["c1", "c2", "c3", "c4"]
    steps = per_layer_steps(names, "3x3x3 conv")
    assert steps[0].excluded == () and steps[3].excluded == ("name:c3",)
    assert steps[3].label == "exclude 3rd 3x3x3 conv (c3)"
    with torch.no_grad():
        rows = [{"label": s.label, "excluded": s.excluded, "dsc": _score(model, data, s.excluded)} for s in steps]
    ranked = rank_by_recovery(rows)
    assert ranked[0]["label"].endswith("(c3)") and ranked[0]["rank"] == 1
    assert ranked[0]["recovered"] == pytest.approx(rows[3]["dsc"] - rows[0]["dsc"])

    # the local SQNR proxy is blind here: c3's output energy sits in the outlier voxels it keeps, so its SQNR is
    # the best of all four although everything else it computes is lost -- why the Dice ranking is the reference
    q = quantize(Chain().eval(), QuantRecipe.from_precision("w8a8", granularity="per_tensor", exclude=("name:stem",)))
    q.load_state_dict(model.state_dict(), strict=False)
    calibrate(q, data)
    proxies = layer_error_proxies(q, data)
    assert max(proxies, key=lambda n: proxies[n]["sqnr_db"]) == "c3"


def test_sqnr_by_hand():
    layer = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    model = quantize(nn.Sequential(layer), QuantRecipe.from_precision("w8a16", granularity="per_tensor"))
    x = torch.tensor([[0.3, 0.0, 0.0, 0.0]])
    proxy = layer_error_proxies(model, [x])["0"]
    # weight 1.0 is exactly representable at INT8 (scale 1/127): no error, infinite SQNR
    assert proxy["mse"] == 0.0 and math.isinf(proxy["sqnr_db"])
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0.3, 0.0, 0.0]]))
    model[0].weight_quantizer.clear_cache()
    x = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    proxy = layer_error_proxies(model, [x])["0"]
    q = round(0.3 * 127) / 127  # per-tensor scale max|W|/127 = 1/127
    assert proxy["mse"] == pytest.approx((q - 0.3) ** 2, rel=1e-4)  # float32 weights: 0.3 is 0.30000001
    assert proxy["sqnr_db"] == pytest.approx(10 * math.log10(0.3**2 / (q - 0.3) ** 2), rel=1e-4)


def test_incremental_steps_are_cumulative():
    steps = incremental_steps(["conv1x3x3", "conv1x1x1", "linear"])
    assert [s.excluded for s in steps] == [
        (),
        ("conv1x3x3",),
        ("conv1x3x3", "conv1x1x1"),
        ("conv1x3x3", "conv1x1x1", "linear"),
    ]


def test_rank_correlation_is_spearman():
    assert rank_correlation([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert rank_correlation([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # d = ranks differ by (1,-1,0,0): rho = 1 - 6*2/(4*15) = 0.8
    assert rank_correlation([1, 2, 3, 4], [2, 1, 3, 4]) == pytest.approx(0.8)


def test_bit_budget_by_hand():
    budget = bit_budget([(1000, 4), (3000, 8), (100, None)])
    assert budget["mean_weight_bits"] == pytest.approx((1000 * 4 + 3000 * 8 + 100 * 32) / 4100)
    assert budget["weight_bytes"] == pytest.approx((4000 + 24000 + 3200) / 8)


def test_greedy_mixed_precision_finds_the_fewest_layers_in_log_steps():
    ranking = [f"l{i}" for i in range(40)]
    calls = []

    def evaluate(kept):
        calls.append(len(kept))
        return 0.9 - 0.01 * max(0, 13 - len(kept))  # the drop vanishes once the 13 worst layers are kept

    result = greedy_mixed_precision(evaluate, ranking, target_drop_pct=1.0, baseline=0.9)
    # drop(k) = 100 * 0.01 * (13 - k) / 0.9 <= 1  <=>  k >= 13 - 0.9 = 12.1  -> 13 layers
    assert len(result["kept"]) == 13 and result["target_met"]
    assert len(calls) <= 2 * math.ceil(math.log2(40)) + 1
    unreachable = greedy_mixed_precision(lambda kept: 0.5, ranking[:5], target_drop_pct=1.0, baseline=0.9)
    assert not unreachable["target_met"] and len(unreachable["kept"]) == 5


@pytest.mark.slow
def test_sensitivity_cli_incremental_and_per_layer(tmp_path):
    """``incremental`` as the README writes it (first word, ``--groups``; the default CSV logger, which needs
    Hydra's run folder), ``per_layer`` in the Hydra form (``sensitivity.*`` keys)."""
    common = [
        "precision=w4a4", "model.checkpoint=null", "trainer.progress=false",
        "dataset.source.num_cases=6", "dataset.source.shape=[40,40,32]", "dataset.roi_size=[32,32,32]",
        "dataset.splits={test: 1, calib: 1, val: 1}",
        f"paths.output_dir={tmp_path / 'out'}", f"paths.cache_dir={tmp_path / 'cache'}",
    ]  # fmt: skip
    run = [sys.executable, "-m", "mqb.sensitivity"]
    proc = subprocess.run([*run, "incremental", *common, "--groups", "conv3x3x3", "conv_transpose"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    study_dir = tmp_path / "out" / "sensitivity"
    md = next(study_dir.glob("incremental-unet-w4a4-*.md")).read_text()
    assert "+ conv3x3x3 in float" in md and "+ conv_transpose in float" in md
    assert next(study_dir.glob("incremental-*.png")).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (hydra_run,) = (tmp_path / "out" / "runs").glob("*_sensitivity_incremental_unet_w4a4")  # the logger's folder
    assert (hydra_run / ".hydra" / "config.yaml").is_file()
    per_layer = ["sensitivity.mode=per_layer", "sensitivity.layers=[conv_transpose]", "sensitivity.max_layers=2"]
    proc = subprocess.run([*run, *common, *per_layer], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "exclude 2nd layer" in next(study_dir.glob("per_layer-*.md")).read_text()
    bad = subprocess.run([*run, "per_layer", *common, "--layers", "conv9x9x9"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert bad.returncode == 2 and "matches no quantized layer" in bad.stderr


def test_error_proxies_score_the_model_the_dice_steps_evaluate(tmp_path):
    """With a PTQ method (SmoothQuant), the per-layer proxies are measured on the model ``mqb.eval`` evaluates
    (its QuantizationCallback), not on a plain quantize + calibrate copy (what they were measured on before)."""
    from types import SimpleNamespace

    from mqb.config import compose_eval
    from mqb.lit.callbacks import QuantizationCallback
    from mqb.pipeline import build_methods, build_recipe, calibration_inputs, load_model
    from mqb.sensitivity import error_proxies

    cfg = compose_eval([
        "precision=w8a8", "granularity=per_tensor", "method=smoothquant", "model.checkpoint=null", "logger=none",
        "model.net.channels=[4,8,16]", "model.net.strides=[2,2]", "model.net.num_res_units=1",
        "dataset.source.num_cases=6", "dataset.source.shape=[32,32,32]", "dataset.roi_size=[32,32,32]",
        "dataset.splits={test: 1, calib: 1, val: 1}", "calibration.num_volumes=1",
        f"paths.output_dir={tmp_path / 'out'}", f"paths.cache_dir={tmp_path / 'cache'}",
    ])  # fmt: skip
    torch.manual_seed(0)
    proxies = error_proxies(cfg)

    def proxies_of(prepare) -> dict:
        torch.manual_seed(0)  # the same untrained network
        net, _ = load_model(cfg)
        batches, forward = calibration_inputs(cfg, net)
        prepare(net, batches, forward)
        return layer_error_proxies(net, batches(), forward=forward)

    def evaluated(net, batches, forward) -> None:
        callback = QuantizationCallback(build_recipe(cfg), batches, forward, progress=False, methods=build_methods(cfg))
        callback.on_test_start(SimpleNamespace(is_global_zero=True), SimpleNamespace(net=net))
        assert [r.method for r in callback.method_reports] == ["smoothquant"]

    def plain(net, batches, forward) -> None:
        quantize(net, build_recipe(cfg))
        calibrate(net, batches(), forward=forward)

    assert proxies == proxies_of(evaluated)
    assert proxies != proxies_of(plain)  # SmoothQuant changes the layers' errors: the old proxies were of another model
