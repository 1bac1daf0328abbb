"""Uncertainty of Δ: paired differences, bootstrap CIs, paired tests and Holm, checked against scipy, hand
enumerations, a worked example and synthetic data whose true effect is known."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from scipy import stats as sps

from mqb.analysis.stats import (
    AUTO_PERMUTATION_MAX,
    apply_holm,
    bootstrap_ci,
    calibration_spread,
    compare,
    compare_values,
    holm,
    paired_differences,
    paired_test,
    permutation_test,
    wilcoxon_test,
)

B = 2000  # resamples in tests (fast)


def test_paired_differences_match_by_case_and_drop_nan_pairs():
    fp32 = {"c3": 0.9, "c1": 0.8, "c2": None, "c4": float("nan"), "only_fp32": 0.5}
    quant = {"c1": 0.7, "c2": 0.6, "c3": 0.95, "c4": 0.1, "only_quant": 0.4}
    cases, diffs, dropped = paired_differences(fp32, quant)
    assert cases == ["c1", "c3"]
    np.testing.assert_allclose(diffs, [0.7 - 0.8, 0.95 - 0.9])
    assert dropped == 4  # c2, c4 (excluded value) + one case on each side only


def test_bootstrap_ci_is_scipys_with_the_same_seed():
    d = np.random.default_rng(1).normal(-0.02, 0.01, 25)
    for method in ("BCa", "percentile"):
        ours = bootstrap_ci(d, confidence=0.9, n_resamples=B, seed=7, method=method)
        ref = sps.bootstrap((d,), np.mean, confidence_level=0.9, n_resamples=B, method=method,
                            rng=np.random.default_rng(7)).confidence_interval  # fmt: skip
        assert (ours.low, ours.high) == (ref.low, ref.high) and ours.method == method and ours.reason is None
        assert ours.estimate == pytest.approx(d.mean()) and ours.n == 25

    def interval(seed):
        ci = bootstrap_ci(d, n_resamples=B, seed=seed)
        return ci.low, ci.high

    assert interval(7) == interval(7) != interval(8)


def test_bootstrap_ci_degenerate_inputs():
    empty = bootstrap_ci([], n_resamples=B)
    assert empty.estimate is None and empty.low is None and empty.method == "point" and "no paired" in empty.reason
    one = bootstrap_ci([0.3], n_resamples=B)
    assert (one.estimate, one.low, one.high, one.method) == (0.3, 0.3, 0.3, "point") and "one case" in one.reason
    flat = bootstrap_ci([-0.01] * 6, n_resamples=B)
    assert flat.low == flat.high == pytest.approx(-0.01) and "zero variance" in flat.reason
    # two distinct values: BCa's jackknife is degenerate for n=2; an interval still comes back, finite
    two = bootstrap_ci([0.0, 1.0], n_resamples=B)
    assert math.isfinite(two.low) and math.isfinite(two.high) and two.low <= 0.5 <= two.high
    with pytest.raises(ValueError, match="method"):
        bootstrap_ci([1.0, 2.0], method="bca_typo")


def hand_permutation_p(d):
    """Two-sided sign-flip p by literal enumeration (itertools)."""
    observed = abs(sum(d))
    flips = list(itertools.product((1, -1), repeat=len(d)))
    hits = sum(abs(sum(s * x for s, x in zip(signs, d, strict=True))) >= observed - 1e-12 for signs in flips)
    return hits / len(flips)


def test_exact_permutation_p_by_hand():
    # 4 cases: of the 16 sign vectors, |sum| >= |0.1+0.2+0.3-0.05| = 0.55 for (+,+,+,-), (+,+,+,+) and their
    # negatives: p = 4/16
    d = [0.1, 0.2, 0.3, -0.05]
    result = permutation_test(d)
    assert result.pvalue == pytest.approx(4 / 16) == pytest.approx(hand_permutation_p(d))
    assert result.method == "permutation-exact" and result.min_p == pytest.approx(2 / 16)
    assert result.statistic == pytest.approx(0.55)
    # one-sided tails
    assert permutation_test(d, alternative="greater").pvalue == pytest.approx(2 / 16)
    assert permutation_test(d, alternative="less").pvalue == pytest.approx(15 / 16)
    rng = np.random.default_rng(3)
    for n in (1, 5, 9):
        d = rng.normal(0.01, 0.02, n)
        assert permutation_test(d).pvalue == pytest.approx(hand_permutation_p(d))
        if n > 1:  # scipy needs two observations
            ref = sps.permutation_test((d,), np.mean, permutation_type="samples", n_resamples=np.inf)
            assert permutation_test(d).pvalue == pytest.approx(ref.pvalue)
    # ties in |d| and zeros: still the literal count
    d = [0.1, -0.1, 0.1, 0.0, 0.2]
    assert permutation_test(d).pvalue == pytest.approx(hand_permutation_p(d))


def test_monte_carlo_permutation_is_seeded_and_close_to_exact():
    d = np.random.default_rng(4).normal(0.005, 0.02, 14)
    exact = permutation_test(d).pvalue
    mc = permutation_test(d, n_resamples=20_000, seed=1, max_exact=10)
    assert mc.method == "permutation-mc" and abs(mc.pvalue - exact) < 0.02
    assert mc.pvalue == permutation_test(d, n_resamples=20_000, seed=1, max_exact=10).pvalue


def test_wilcoxon_is_scipys():
    d = np.random.default_rng(5).normal(-0.01, 0.02, 20)
    ref = sps.wilcoxon(d)
    ours = paired_test(d)  # auto: 20 > 12 cases -> Wilcoxon
    assert ours.method == "wilcoxon" and ours.pvalue == pytest.approx(ref.pvalue) and ours.statistic == ref.statistic
    assert wilcoxon_test(d, alternative="less").pvalue == pytest.approx(sps.wilcoxon(d, alternative="less").pvalue)
    zeros = wilcoxon_test([0.0, 0.0, 0.0])
    assert zeros.pvalue == 1.0 and zeros.reason == "all differences zero"


def test_auto_switches_at_few_cases():
    rng = np.random.default_rng(6)
    assert paired_test(rng.normal(size=AUTO_PERMUTATION_MAX)).method == "permutation-exact"
    assert paired_test(rng.normal(size=AUTO_PERMUTATION_MAX + 1)).method == "wilcoxon"
    assert paired_test(rng.normal(size=30), method="permutation").method == "permutation-mc"
    assert paired_test([]).pvalue is None
    with pytest.raises(ValueError):
        paired_test([1.0], method="t")


def test_holm_worked_example():
    # m = 4 sorted p: 0.01, 0.02, 0.03, 0.20 -> 4*0.01=0.04, max(0.04, 3*0.02=0.06)=0.06, max(0.06, 2*0.03)=0.06,
    # max(0.06, 1*0.20)=0.20; a None p is not in the family
    p = {"w4a4": 0.03, "w8a8": 0.01, "w4a8": 0.2, "fp16": 0.02, "failed": None}
    assert holm(p) == pytest.approx({"w4a4": 0.06, "w8a8": 0.04, "w4a8": 0.2, "fp16": 0.06, "failed": None})
    assert holm({"a": 0.5, "b": 0.6}) == {"a": 1.0, "b": 1.0}  # capped at 1
    assert holm({}) == {}
    try:
        from statsmodels.stats.multitest import multipletests
    except ImportError:
        return
    ps = np.random.default_rng(0).uniform(0, 0.2, 9)
    ref = multipletests(ps, method="holm")[1]
    np.testing.assert_allclose(list(holm({str(i): v for i, v in enumerate(ps)}).values()), ref)


def test_known_effect_is_found_and_no_effect_is_not():
    rng = np.random.default_rng(2024)
    d = rng.normal(-0.02, 0.01, 30)
    ci = bootstrap_ci(d, n_resamples=B, seed=0)
    assert ci.low < -0.02 < ci.high and ci.high < 0
    assert paired_test(d).pvalue < 1e-4
    # no effect: across 20 fixed seeds at most a few (expected 1 at alpha 0.05) are significant, and the
    # 95 % interval covers the true 0 in most
    significant = covered = 0
    for seed in range(20):
        d0 = np.random.default_rng(seed).normal(0.0, 0.01, 30)
        significant += paired_test(d0).pvalue < 0.05
        ci0 = bootstrap_ci(d0, n_resamples=B, seed=seed, method="percentile")
        covered += ci0.low <= 0 <= ci0.high
    assert significant <= 3 and covered >= 16


def results_dict(per_case: dict[str, list[list[float | None]]], classes=("liver", "spleen")) -> dict:
    """A minimal ``SegmentationEvaluator.results``: per case, [dsc list, nsd list] over classes."""
    return {
        "per_class": {c: {} for c in classes},
        "per_case": {case: {"dsc": v[0], "nsd": v[1], "spacing_mm": [1, 1, 1]} for case, v in per_case.items()},
    }


def test_compare_builds_a_json_stats_section():
    fp32 = results_dict({"a": [[0.9, 0.8], [0.7, 0.6]], "b": [[0.8, None], [0.6, None]], "c": [[0.7, 0.6], [0.5, 0.4]]})
    quant = results_dict({"a": [[0.8, 0.8], [0.7, 0.5]], "b": [[0.7, 0.5], [0.5, 0.4]], "c": [[0.7, 0.5], [0.4, 0.4]]})
    s = compare(fp32, quant, n_resamples=B)
    json.dumps(s, allow_nan=False)  # JSON-able, no NaN
    liver = s["dsc"]["per_class"]["liver"]
    assert liver["n"] == 3 and liver["dropped"] == 0
    assert liver["delta"] == pytest.approx(((0.8 - 0.9) + (0.7 - 0.8) + 0.0) / 3)
    assert liver["fp32"] == pytest.approx(0.8) and liver["quant"] == pytest.approx(0.7333333)
    assert liver["drop_pct"] == pytest.approx(100 * (0.8 - 0.7333333) / 0.8, rel=1e-5)
    assert liver["test"] == "permutation-exact" and liver["p"] == pytest.approx(hand_permutation_p([-0.1, -0.1, 0.0]))
    assert liver["drop_pct_ci_low"] == pytest.approx(-100 * liver["ci_high"] / 0.8)
    assert "only 3 cases" in liver["ci_reason"]
    spleen = s["dsc"]["per_class"]["spleen"]
    assert spleen["n"] == 2 and spleen["dropped"] == 1  # case b: FP32 excluded the structure
    # mean over classes per case, over the classes valid on both sides: a: 0.85 -> 0.8, b: 0.8 -> 0.7 (liver
    # only), c: 0.65 -> 0.6
    mean = s["dsc"]["mean"]
    assert mean["n"] == 3 and mean["delta"] == pytest.approx((-0.05 - 0.1 - 0.05) / 3)
    assert s["nsd"]["per_class"]["liver"]["delta"] == pytest.approx((0.0 - 0.1 - 0.1) / 3)
    assert s["holm"] is False and s["metrics"] == ["dsc", "nsd"] and "quantized - FP32" in s["sign"]


def test_compare_recovers_a_known_effect_per_class():
    rng = np.random.default_rng(11)
    cases = [f"case{i:02d}" for i in range(30)]
    base = {c: [list(rng.uniform(0.7, 0.9, 2)), list(rng.uniform(0.6, 0.8, 2))] for c in cases}
    # liver loses 0.02 DSC (noise 0.01), spleen nothing (noise 0.01)
    quant = {c: [[v[0][0] - 0.02 + rng.normal(0, 0.01), v[0][1] + rng.normal(0, 0.01)], v[1]] for c, v in base.items()}
    s = compare(results_dict(base), results_dict(quant), metrics=("dsc",), n_resamples=B)
    liver, spleen = s["dsc"]["per_class"]["liver"], s["dsc"]["per_class"]["spleen"]
    assert liver["ci_low"] < -0.02 < liver["ci_high"] < 0 and liver["significant"] and liver["test"] == "wilcoxon"
    assert spleen["ci_low"] < 0 < spleen["ci_high"] and not spleen["significant"]
    assert "ci_reason" not in liver


def test_class_order_survives_a_json_round_trip():
    """Per-case lists follow the dataset's class order; a record read back from JSON (sort_keys) has its
    per_class keys sorted by name: the order is recovered from the class means, or given."""
    from mqb.analysis.stats import class_names

    cases = {"a": [[0.9, 0.5, 0.1], [0.8, 0.4, 0.2]], "b": [[0.7, 0.3, 0.3], [0.6, 0.2, 0.4]]}
    order = ("zeta", "alpha", "mid")
    results = results_dict(cases, classes=order)
    results["per_class"] = {c: {"dsc": float(np.mean([v[0][i] for v in cases.values()]))} for i, c in enumerate(order)}
    round_trip = json.loads(json.dumps(results, sort_keys=True))
    assert list(round_trip["per_class"]) == ["alpha", "mid", "zeta"]
    assert class_names(round_trip) == list(order)
    assert class_names(round_trip, names=order) == list(order)
    with pytest.raises(ValueError, match="class names"):
        class_names(round_trip, names=("x", "y"))
    shifted = 0.5 * np.ones(3)
    quant = results_dict({k: [list(np.array(v[0]) - 0.1), v[1]] for k, v in cases.items()}, classes=order)
    s = compare(round_trip, quant, metrics=iter(["dsc"]), n_resamples=B)
    assert s["metrics"] == ["dsc"] and s["dsc"]["per_class"]["zeta"]["delta"] == pytest.approx(-0.1)
    # equal class means everywhere: the order cannot be told, and compare says so instead of guessing
    tied = json.loads(
        json.dumps(
            results_dict(
                {"a": [[0.9, 0.1, 0.5], [0.1, 0.1, 0.1]], "b": [[0.1, 0.9, 0.5], [0.1, 0.1, 0.1]]}, classes=order
            )
        )
    )
    tied["per_class"] = {c: {"dsc": m} for c, m in zip(order, shifted, strict=True)}
    tied = json.loads(json.dumps(tied, sort_keys=True))
    with pytest.raises(ValueError, match="cannot tell"):
        compare(tied, tied, metrics=("dsc",), n_resamples=B)
    assert compare(tied, tied, metrics=("dsc",), n_resamples=B, class_names=order)["dsc"]["mean"]["n"] == 2


def test_apply_holm_across_configs():
    def section(p_liver):
        entry = {"p": p_liver}
        return {"metrics": ["dsc"], "alpha": 0.05, "dsc": {"mean": dict(entry), "per_class": {"liver": dict(entry)}}}

    sweep = {"w8a8": section(0.01), "w4a4": section(0.03), "w4a8": section(None)}
    apply_holm(sweep)
    assert sweep["w8a8"]["dsc"]["per_class"]["liver"]["p_holm"] == pytest.approx(0.02)
    assert sweep["w4a4"]["dsc"]["mean"]["p_holm"] == pytest.approx(0.03)
    assert sweep["w8a8"]["dsc"]["mean"]["significant"] and sweep["w4a4"]["dsc"]["mean"]["significant"]
    assert sweep["w4a8"]["dsc"]["mean"]["significant"] is None and sweep["w4a8"]["holm"] is True
    apply_holm(sweep, alpha=0.025)
    assert sweep["w8a8"]["dsc"]["mean"]["significant"] and not sweep["w4a4"]["dsc"]["mean"]["significant"]


def test_compare_values_without_cases():
    e = compare_values({"a": None}, {"a": 0.5}, n_resamples=B)
    assert e["n"] == 0 and e["dropped"] == 1 and e["delta"] is None and e["p"] is None and e["significant"] is None


def test_calibration_spread():
    s = calibration_spread([0.80, 0.82, None, 0.84, float("nan")])
    assert s["n_draws"] == 3 and s["skipped"] == 2
    assert s["mean"] == pytest.approx(0.82) and s["std"] == pytest.approx(0.02)
    assert (s["min"], s["max"]) == (0.80, 0.84) and s["range"] == pytest.approx(0.04)
    one = calibration_spread({"seed0": 0.5})
    assert one["n_draws"] == 1 and one["std"] is None and one["mean"] == 0.5
    assert calibration_spread([])["mean"] is None
