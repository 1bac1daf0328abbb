"""mqb.pipeline in process, as a library: ``evaluate(compose_eval(overrides))`` on tiny synthetic data, no CLI."""

from __future__ import annotations

import json
import math

import pytest

from mqb.config import compose_eval
from mqb.pipeline import Baseline, delta_pct, evaluate, fp32_baseline, load_model, run_dirs
from mqb.results import config_id, validate_record

TINY = [
    "dataset.source.num_cases=6",
    "dataset.source.shape=[32,32,32]",
    "dataset.roi_size=[32,32,32]",
    "dataset.splits={test: 2, calib: 1, val: 1}",
    "trainer.progress=false",
    "logger=none",
    "model.checkpoint=null",
]


@pytest.fixture()
def tiny(tmp_path):
    def cfg(*overrides: str):
        return compose_eval([*TINY, f"paths.output_dir={tmp_path}", f"paths.cache_dir={tmp_path}/cache", *overrides])

    return cfg


def test_evaluate_returns_a_valid_record_and_shares_the_fp32_baseline(tiny):
    fp32 = evaluate(tiny("precision=fp32"))
    w8a8 = evaluate(tiny("precision=w8a8", "granularity=per_tensor"))
    for record in (fp32, w8a8):
        assert validate_record(json.loads(json.dumps(record))) is None  # the schema every reader checks
    assert fp32["id"] == config_id(tiny("precision=fp32")) != w8a8["id"]
    assert fp32["precision"] == "fp32" and fp32["granularity"] == "-" and fp32["stats"] is None
    assert fp32["baseline"]["cached"] is False and w8a8["baseline"]["cached"] is True
    assert w8a8["baseline"]["key"] == fp32["baseline"]["key"]
    assert w8a8["baseline"]["dsc"] == fp32["metrics"]["dsc"]  # the quantized run is compared to the same FP32
    # Δ % is the relative drop from FP32, computed here by hand
    expected = 100.0 * (fp32["metrics"]["dsc"] - w8a8["metrics"]["dsc"]) / fp32["metrics"]["dsc"]
    assert math.isclose(w8a8["delta_pct"]["dsc"], expected, rel_tol=1e-12, abs_tol=1e-12)
    assert w8a8["data"]["calibration_cases"] and not fp32["data"]["calibration_cases"]
    assert w8a8["realizability"]["layers"]  # the per-layer plan of what ran
    assert len(w8a8["metrics"]["per_case"]) == 2


def test_fp32_baseline_leaves_the_network_unchanged_and_is_cached(tiny):
    cfg = tiny("precision=fp32")
    net, checkpoint = load_model(cfg)
    assert checkpoint is None
    before = {k: v.clone() for k, v in net.state_dict().items()}
    from hydra.utils import instantiate

    dm = instantiate(cfg.dataset)
    dm.prepare_data()
    run_dir, _ = run_dirs(cfg)
    first = fp32_baseline(cfg, net, dm, None, run_dir)
    second = fp32_baseline(cfg, net, dm, None, run_dir)
    assert isinstance(first, Baseline) and not first.cached and second.cached
    assert first.key == second.key and first.metrics == second.metrics
    assert all((net.state_dict()[k] == v).all() for k, v in before.items())
    assert not net.training


@pytest.mark.parametrize(
    ("base", "value", "higher", "expected"),
    [(0.8, 0.6, True, 25.0), (0.8, 0.9, True, -12.5), (4.0, 5.0, False, 25.0), (0.0, 0.5, True, None),
     (None, 0.5, True, None)],
)  # fmt: skip
def test_delta_pct_is_the_relative_drop(base, value, higher, expected):
    got = delta_pct(base, value, higher_is_better=higher)
    assert got == pytest.approx(expected) if expected is not None else got is None


def test_calibration_draws_record_the_spread_over_seeded_calibration_sets(tiny):
    """calibration.draws=3: the record's metrics are the first draw's (the same as draws=1, same id), and
    stats.calibration holds each draw's mean DSC and their spread, computed here by hand."""
    import statistics

    from mqb.analysis.tables import calibration_note, summary_rows

    overrides = ("precision=w4a4", "granularity=per_tensor", "dataset.splits={test: 2, calib: 3, val: 0}",
                 "calibration.num_volumes=1")  # fmt: skip
    one = evaluate(tiny(*overrides))
    three = evaluate(tiny(*overrides, "calibration.draws=3"))
    assert one["id"] != three["id"] and one["id"] == config_id(tiny(*overrides, "calibration.draws=1"))
    assert three["metrics"]["dsc"] == one["metrics"]["dsc"]  # draw 0 is calibration.seed, as without draws
    spread = three["stats"]["calibration"]
    dscs = [d["dsc"] for d in spread["draws"]]
    assert [d["seed"] for d in spread["draws"]] == [0, 1, 2] and dscs[0] == one["metrics"]["dsc"]
    assert spread["dsc"]["n_draws"] == 3
    assert spread["dsc"]["std"] == pytest.approx(statistics.stdev(dscs), abs=1e-12)
    assert spread["dsc"]["range"] == pytest.approx(max(dscs) - min(dscs), abs=1e-12)
    assert "calibration" not in (one["stats"] or {})
    assert summary_rows([three])[0]["dsc_calibration_std"] == spread["dsc"]["std"]
    assert "over 3 calibration draws" in calibration_note(three) and calibration_note(one) == ""
    with pytest.raises(ValueError, match="calibration.draws=0 is invalid"):
        evaluate(tiny(*overrides, "calibration.draws=0"))
