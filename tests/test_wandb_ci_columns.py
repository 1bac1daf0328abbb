"""The uncertainty of every Δ in W&B: per-run per-class tables with ↓Δ%, 95 % interval and p per class, scalar
``delta_pct_ci/...`` bounds, and the sweep table's p / Holm / significance columns, logged by real offline W&B runs
and read back from the run files.

The expected values are recomputed here from the records' per-case values, independently of mqb.analysis.stats:
↓Δ% = -100 mean(quant - fp32) / mean(fp32) over the paired cases, the interval by ``scipy.stats.bootstrap`` (BCa,
the same seeded generator), the p-value by enumerating all sign flips, Holm's correction by hand.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from scipy import stats as scipy_stats

from mqb.analysis.stats import compare
from mqb.loggers import CLASS_TABLE_COLUMNS, class_table, log_record, log_sweep_table
from tests.test_wandb_offline import read_wandb_records

CLASSES = ["liver", "spleen", "aorta"]
CASES = [f"case_{i}" for i in range(8)]
RNG = np.random.default_rng(7)
FP32 = {c: [float(v) for v in RNG.uniform(0.75, 0.95, 3)] for c in CASES}
FP32["case_3"][2] = None  # the aorta is absent in case 3 (excluded on both sides)
NSD_OFFSET = -0.05  # NSD = DSC - 0.05, so both metrics are exercised with different values


def results(per_case_dsc: dict[str, list]) -> dict:
    """A results dict as ``mqb.metrics`` writes it: per-case lists over the foreground classes, per-class means over
    the cases where the class is not excluded, means over classes."""
    per_case = {case: {"dsc": v, "nsd": [None if x is None else x + NSD_OFFSET for x in v], "hd95": [2.0] * 3}
                for case, v in per_case_dsc.items()}  # fmt: skip
    per_class = {}
    for i, c in enumerate(CLASSES):
        per_class[c] = {m: float(np.mean([v[m][i] for v in per_case.values() if v[m][i] is not None]))
                        for m in ("dsc", "nsd")}  # fmt: skip
        per_class[c]["hd95"] = 2.0
    means = {m: float(np.mean([per_class[c][m] for c in CLASSES])) for m in ("dsc", "nsd")}
    return {**means, "hd95": 2.0, "per_class": per_class, "per_case": per_case, "num_cases": len(per_case)}


def quantized(rid: str, drops: dict[str, float], with_stats: bool = True, n_resamples: int = 2000,
              mixed: bool = False) -> dict:  # fmt: skip
    """A W4A4 record whose classes lose ``drops[class]`` per case, times a case-dependent factor in [0.7, 1.3] (or,
    ``mixed``, in [-1, 1]: some cases better, some worse)."""

    def factor(k: int, i: int) -> float:
        return float(np.sin(1.3 * k + i)) if mixed else 1 + 0.3 * float(np.sin(k + i))

    values = {case: [None if x is None else x - drops[c] * factor(k, i) for i, (c, x) in
                     enumerate(zip(CLASSES, v, strict=True))] for k, (case, v) in enumerate(FP32.items())}  # fmt: skip
    metrics, base = results(values), results(FP32)
    record = {"id": rid, "status": "success", "created": "2026-11-30T00:00:00", "model": "unet", "dataset": "btcv",
              "precision": "w4a4", "granularity": "per_tensor", "method": "rtn", "untrained": False,
              "reference": "labels", "metrics": metrics,
              "baseline": {"key": "b", "cached": True, **{k: base[k] for k in ("dsc", "nsd", "hd95")}},
              "delta_pct": {m: 100 * (base[m] - metrics[m]) / base[m] for m in ("dsc", "nsd")} | {"hd95": 0.0},
              "timings": {"eval_seconds": 1.0}, "stats": None,
              "config": {"seed": 0, "dataset": {"name": "btcv", "class_names": ["background", *CLASSES]},
                         "precision": {"name": "w4a4"}}}  # fmt: skip
    if with_stats:
        record["stats"] = compare(base, metrics, n_resamples=n_resamples, seed=0, class_names=CLASSES)
    return record


def fp32_record() -> dict:
    base = results(FP32)
    return {"id": "fp32", "status": "success", "created": "2026-11-30T00:00:00", "model": "unet", "dataset": "btcv",
            "precision": "fp32", "granularity": "-", "method": "-", "untrained": False, "reference": "labels",
            "metrics": base, "baseline": {"key": "b", "cached": True, **{k: base[k] for k in ("dsc", "nsd", "hd95")}},
            "delta_pct": {"dsc": 0.0, "nsd": 0.0, "hd95": 0.0}, "timings": {}, "stats": None,
            "config": {"seed": 0}}  # fmt: skip


# -- the independent reference -------------------------------------------------------------------------------
def paired(record: dict, metric: str, cls: str) -> tuple[np.ndarray, np.ndarray]:
    """FP32 and quantized per-case values of ``cls`` (or the per-case mean over the classes valid on both sides for
    ``"mean"``), pairs with an excluded side dropped."""
    base, quant = FP32_RESULTS["per_case"], record["metrics"]["per_case"]
    f, q = [], []
    for case in CASES:
        a, b = base[case][metric], quant[case][metric]
        idx = range(len(CLASSES)) if cls == "mean" else [CLASSES.index(cls)]
        pairs = [(a[i], b[i]) for i in idx if a[i] is not None and b[i] is not None]
        if pairs:
            f.append(np.mean([x for x, _ in pairs]))
            q.append(np.mean([y for _, y in pairs]))
    return np.asarray(f), np.asarray(q)


def exact_p(d: np.ndarray) -> float:
    observed = abs(d.sum())
    flips = [abs(np.dot(s, d)) >= observed - 1e-12 for s in itertools.product((1, -1), repeat=len(d))]
    return sum(flips) / len(flips)


def expected(record: dict, metric: str, cls: str, n_resamples: int) -> dict:
    f, q = paired(record, metric, cls)
    d = q - f
    ci = scipy_stats.bootstrap((d,), np.mean, confidence_level=0.95, n_resamples=n_resamples, method="BCa",
                               rng=np.random.default_rng(0)).confidence_interval  # fmt: skip
    scale = -100 / f.mean()
    return {"delta_pct": scale * d.mean(), "low": scale * ci.high, "high": scale * ci.low, "p": exact_p(d),
            "cases": len(d)}  # fmt: skip


FP32_RESULTS = results(FP32)


#: expected() key -> column suffix of the per-class table
COLUMN_OF = {"delta_pct": "delta_pct", "low": "drop_ci_low", "high": "drop_ci_high", "p": "p", "cases": "cases"}


def check_class_table(table: dict, record: dict, n_resamples: int) -> None:
    assert table["columns"] == list(CLASS_TABLE_COLUMNS)
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    assert [r["class"] for r in rows] == [*CLASSES, "mean"]
    for r in rows:
        own = record["metrics"] if r["class"] == "mean" else record["metrics"]["per_class"][r["class"]]
        base = FP32_RESULTS if r["class"] == "mean" else FP32_RESULTS["per_class"][r["class"]]
        assert r["dsc"] == pytest.approx(own["dsc"]) and r["fp32_dsc"] == pytest.approx(base["dsc"])
        assert r["nsd"] == pytest.approx(own["nsd"]) and r["fp32_nsd"] == pytest.approx(base["nsd"])
        for metric in ("dsc", "nsd"):
            want = expected(record, metric, r["class"], n_resamples)
            got = {k: r[f"{metric}_{c}"] for k, c in COLUMN_OF.items()}
            assert got == pytest.approx(want, rel=1e-9, abs=1e-12), (r["class"], metric)
            assert r[f"{metric}_significant"] == (want["p"] < 0.05)
            assert got["low"] <= got["delta_pct"] <= got["high"]
    assert rows[CLASSES.index("aorta")]["dsc_cases"] == len(CASES) - 1  # the excluded pair is dropped


def only(paths: list[Path]) -> Path:
    assert len(paths) == 1, paths
    return paths[0]


def history(run_dir: Path) -> dict:
    run_file = only(list(run_dir.glob("wandb/offline-run-*/run-*.wandb")))
    out = {}
    for r in read_wandb_records(run_file):
        if r.WhichOneof("record_type") == "history":
            out.update({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item})
    return out


def log_offline(record: dict, save_dir: Path) -> None:
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(offline=True, save_dir=str(save_dir), project="mqb", name=record["id"])
    log_record(logger, record, FP32_RESULTS)


# -- tests ---------------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    for key in ("WANDB_API_KEY", "WANDB_DIR", "WANDB_PROJECT", "WANDB_RUN_GROUP"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


@pytest.mark.parametrize("with_stats", [True, False], ids=["from-stats", "from-per-case"])
def test_per_class_table_and_ci_scalars_of_an_offline_run(tmp_path, with_stats):
    # with a stats section (as mqb.eval writes it) its numbers are logged; without one (an older record) they are
    # computed from the per-case values, seeded with config.seed and 10 000 resamples: the same either way
    n_resamples = 2000 if with_stats else 10_000
    record = quantized("q", {"liver": 0.02, "spleen": 0.0005, "aorta": -0.01}, with_stats, n_resamples)
    log_offline(record, tmp_path)
    table = json.loads(only(list(tmp_path.glob("wandb/offline-run-*/files/media/table/per_class_*.table.json")))
                       .read_text())  # fmt: skip
    check_class_table(table, record, n_resamples)
    logged = history(tmp_path)
    for metric in ("dsc", "nsd"):
        want = expected(record, metric, "mean", n_resamples)
        assert logged[f"delta_pct_ci/{metric}_low"] == pytest.approx(want["low"], rel=1e-9)
        assert logged[f"delta_pct_ci/{metric}_high"] == pytest.approx(want["high"], rel=1e-9)
        assert logged[f"delta_pct_ci/{metric}_p"] == pytest.approx(want["p"])
        assert logged[f"delta_pct/{metric}"] == pytest.approx(record["delta_pct"][metric])
    # the liver loses 2 points in every case: the exact test's smallest p (2 / 2^8), an interval above 0
    liver = dict(zip(table["columns"], table["data"][0], strict=True))
    assert liver["dsc_p"] == pytest.approx(2 / 2 ** len(CASES)) and liver["dsc_drop_ci_low"] > 0


def test_fp32_and_class_mean_only_records():
    # the FP32 run has no drop: the columns are there, empty
    rows = class_table(fp32_record(), FP32_RESULTS)
    assert len(rows) == len(CLASSES) + 1 and all(len(r) == len(CLASS_TABLE_COLUMNS) for r in rows)
    delta_cols = [i for i, c in enumerate(CLASS_TABLE_COLUMNS) if c.startswith(("dsc_", "nsd_"))]
    assert all(r[i] is None for r in rows for i in delta_cols)
    # no per-case values: ↓Δ% from the class means, no interval, no test
    record = quantized("q", {"liver": 0.02, "spleen": 0.01, "aorta": 0.0}, with_stats=False)
    record["metrics"] = {**record["metrics"], "per_case": {}}
    rows = [dict(zip(CLASS_TABLE_COLUMNS, r, strict=True)) for r in class_table(record, FP32_RESULTS)]
    for r in rows[:-1]:
        base = FP32_RESULTS["per_class"][r["class"]]["dsc"]
        want = 100 * (base - record["metrics"]["per_class"][r["class"]]["dsc"]) / base
        assert r["dsc_delta_pct"] == pytest.approx(want) and r["dsc_drop_ci_low"] is None and r["dsc_p"] is None
        assert r["source"] == "per_class"
    assert rows[-1]["dsc_delta_pct"] == pytest.approx(record["delta_pct"]["dsc"])  # the record's own mean Δ%


def test_sweep_table_carries_intervals_p_and_holm(tmp_path):
    strong = quantized("strong", {"liver": 0.03, "spleen": 0.02, "aorta": 0.02})  # every case worse: p = 2/256
    weak = quantized("weak", {"liver": 0.01, "spleen": 0.01, "aorta": 0.01}, mixed=True)
    records = [fp32_record(), strong, weak]
    log_sweep_table(records, "sweep-x", tmp_path, OmegaConf.create({"project": "mqb"}))
    table = json.loads(only(list(tmp_path.glob("wandb/offline-run-*/files/media/table/sweep_summary_*.table.json")))
                       .read_text())  # fmt: skip
    rows = {r["id"]: r for r in (dict(zip(table["columns"], row, strict=True)) for row in table["data"])}
    assert set(rows) == {"fp32", "strong", "weak"}
    for metric in ("dsc", "nsd"):
        for col in ("drop_ci_low", "drop_ci_high", "p", "p_holm", "significant", "test"):
            assert f"{metric}_{col}" in table["columns"]
    assert rows["fp32"]["dsc_p"] is None and rows["fp32"]["dsc_drop_ci_low"] is None
    for metric in ("dsc", "nsd"):
        want = {rid: expected(rows_record, metric, "mean", 2000) for rid, rows_record in
                (("strong", strong), ("weak", weak))}  # fmt: skip
        # Holm over the two configs, by hand: the smaller p times 2, the larger one at least that
        (lo_id, lo), (hi_id, hi) = sorted(((k, v["p"]) for k, v in want.items()), key=lambda kv: kv[1])
        holm = {lo_id: min(1.0, 2 * lo), hi_id: max(min(1.0, 2 * lo), min(1.0, hi))}
        for rid in ("strong", "weak"):
            row = rows[rid]
            assert row[f"{metric}_drop_ci_low"] == pytest.approx(want[rid]["low"], rel=1e-9)
            assert row[f"{metric}_drop_ci_high"] == pytest.approx(want[rid]["high"], rel=1e-9)
            assert row[f"{metric}_p"] == pytest.approx(want[rid]["p"])
            assert row[f"{metric}_p_holm"] == pytest.approx(holm[rid])
            assert row[f"{metric}_significant"] == (holm[rid] < 0.05)
            assert row[f"{metric}_test"] == "permutation-exact" and row[f"{metric}_cases"] == len(CASES)
            assert row[f"{metric}_delta_pct"] == pytest.approx(records[[r["id"] for r in records].index(rid)]
                                                               ["delta_pct"][metric])  # fmt: skip
    assert rows["strong"]["dsc_significant"] is True and rows["weak"]["dsc_significant"] is False
    assert math.isclose(rows["strong"]["dsc_p_holm"], 2 * 2 / 2 ** len(CASES))
