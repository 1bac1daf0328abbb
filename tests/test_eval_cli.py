"""The real CLI: mqb.train then a `python -m mqb.eval -m` sweep, resume, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

#: Tiny synthetic data: 8 cases of 48x48x32, 32^3 windows.
TINY = [
    "dataset.source.num_cases=8",
    "dataset.source.shape=[48,48,32]",
    "dataset.roi_size=[32,32,32]",
    "dataset.splits={test: 2, calib: 2, val: 1}",
    "trainer.progress=false",
]


def run_cli(
    module: str, *args: str, tmp: Path, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", module, *args, f"paths.output_dir={tmp / 'out'}", f"paths.cache_dir={tmp / 'cache'}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env={**_env(), **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


def _env() -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB")}
    env["PYTHONWARNINGS"] = "ignore"
    return env


def records(results: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(results.glob("*.json"))]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """Briefly trained unet and segresnet checkpoints for the tiny synthetic data."""
    tmp = tmp_path_factory.mktemp("e2e")
    for model in ("unet", "segresnet"):
        run_cli("mqb.train", f"model={model}", "train.max_steps=40", "train.val_every=40", *TINY, tmp=tmp)
        assert (tmp / "cache" / "checkpoints" / "synthetic" / f"{model}.safetensors").is_file()
    return tmp


@pytest.mark.slow
def test_sweep_two_models_two_granularities(trained):
    tmp = trained
    args = ["-m", "model=unet,segresnet", "precision=w8a8", "granularity=per_channel,adaptive", "logger=csv", *TINY]
    run_cli("mqb.eval", *args, "hydra/launcher=basic", tmp=tmp)
    run_cli("mqb.eval", "-m", "model=unet,segresnet", "precision=fp32", *TINY, tmp=tmp)
    results = tmp / "out" / "results"
    recs = records(results)
    assert len(recs) == 6 and all(r["status"] == "success" for r in recs)
    assert len({r["id"] for r in recs}) == 6
    for r in recs:
        assert r["untrained"] is False
        for case in r["metrics"]["per_case"].values():  # the real voxel spacing reached the metrics
            assert case["spacing_mm"] == [1.5, 1.5, 2.0]
        for metric in ("dsc", "nsd"):
            assert 0.0 <= r["metrics"][metric] <= 1.0
        for values in r["metrics"]["per_class"].values():
            assert values["dsc"] is None or 0.0 <= values["dsc"] <= 1.0
        if r["precision"] == "fp32":
            assert r["delta_pct"]["dsc"] == 0.0 and r["delta_pct"]["nsd"] == 0.0
            assert r["baseline"]["cached"] is True  # computed once by the W8A8 sweep
        else:
            assert abs(r["delta_pct"]["dsc"]) < 5.0, r["delta_pct"]
            # trainer.accelerator=auto: the GPU where there is one; true FP32 (no TF32) either way
            assert r["device"]["type"] == ("cuda" if torch.cuda.is_available() else "cpu")
            assert r["device"]["fp32_precision"] == "ieee" and r["device"]["tf32_conv"] is False
            mean = r["stats"]["dsc"]["mean"]  # paired per-case differences vs FP32 (2 test cases: exact test)
            assert mean["n"] == 2 and mean["test"] == "permutation-exact" and mean["min_p"] == 0.5
            assert mean["drop_pct_ci_low"] <= mean["drop_pct"] <= mean["drop_pct_ci_high"]
            assert r["realizability"]["groups"]
            timed_calibration = "calibration_seconds" in r["timings"]  # a phase that ran is in the record
            assert timed_calibration and r["data"]["calibration_cases"]
            assert isinstance(r["data"]["calibration_cached"], bool)  # calibrated (or reused the shared ranges)
        assert r["config"]["dataset"]["source"]["num_cases"] == 8
        assert r["data"]["test_cases"] and not set(r["data"]["test_cases"]) & set(r["data"]["calibration_cases"])
    # resuming the same sweep runs nothing new and writes no second record
    proc = run_cli("mqb.eval", *args, tmp=tmp)
    assert proc.stdout.count("skip") == 4
    assert len(records(results)) == 6


@pytest.mark.slow
def test_submitit_local_launcher_runs_a_sweep(tmp_path):
    args = ["-m", "hydra/launcher=submitit_local", "precision=w8a8,w4a4", "model.checkpoint=null", *TINY]
    run_cli("mqb.eval", *args, tmp=tmp_path)
    recs = records(tmp_path / "out" / "results")
    assert sorted(r["precision"] for r in recs) == ["w4a4", "w8a8"]
    assert all(r["status"] == "success" and r["untrained"] for r in recs)
    assert len({r["baseline"]["key"] for r in recs}) == 1


def test_unknown_model_fails_with_both_messages(tmp_path):
    proc = run_cli("mqb.eval", "model=medformerx", *TINY, tmp=tmp_path, check=False)
    assert proc.returncode != 0
    assert "unknown model 'medformerx'" in proc.stderr and "valid model choices" in proc.stderr
    assert "Could not find 'model/medformerx'" in proc.stderr  # Hydra's own message
    assert not (tmp_path / "out" / "results").exists()


def test_unsupported_precision_fails(tmp_path):
    proc = run_cli("mqb.eval", "precision=w3a3", *TINY, tmp=tmp_path, check=False)
    assert proc.returncode != 0 and "unknown precision 'w3a3'" in proc.stderr and "w4a4" in proc.stderr


def test_missing_checkpoint_is_a_clear_error_and_no_success_record(tmp_path):
    proc = run_cli("mqb.eval", "model.checkpoint=/nonexistent/unet.pt", *TINY, tmp=tmp_path, check=False)
    assert proc.returncode == 2
    assert "model.checkpoint='/nonexistent/unet.pt' does not exist" in proc.stderr
    results = tmp_path / "out" / "results"
    assert [p.name.endswith(".error.json") for p in results.glob("*.json")] == [True]


@pytest.mark.slow
def test_a_failing_config_does_not_take_the_sweep_down(tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a checkpoint")
    args = ["-m", f"model.checkpoint=null,{bad}", "precision=w8a8", "logger=none", *TINY]
    proc = run_cli("mqb.eval", *args, tmp=tmp_path, check=False)
    assert proc.returncode == 1  # the sweep finishes, then reports the failure
    results = tmp_path / "out" / "results"
    ok = [p for p in results.glob("*.json") if not p.name.endswith(".error.json")]
    failed = list(results.glob("*.error.json"))
    assert len(ok) == 1 and len(failed) == 1
    error = json.loads(failed[0].read_text())
    assert "is not a readable safetensors file" in error["error"] and error["status"] == "error"
    status = subprocess.run([sys.executable, "-m", "mqb.sweep", "status", str(results)], capture_output=True,
                            text=True, cwd=ROOT)  # fmt: skip
    assert status.returncode == 1 and "1 done, 1 failed" in status.stdout
    # relaunch: the finished config is skipped, the failed one runs again (and fails again)
    again = run_cli("mqb.eval", *args, tmp=tmp_path, check=False)
    assert again.returncode == 1 and again.stdout.count("skip") == 1
    assert len(list(results.glob("*.json"))) == 2


@pytest.mark.slow
def test_ddp_on_two_processes_matches_one_device(tmp_path):
    """Two CPU processes (Lightning DDP, gloo) split the test volumes; gathered per-case metrics equal one device.

    One thread per process on both sides: the same arithmetic order, so quantization rounds identically.
    """
    args = ["model.checkpoint=null", "logger=none", *TINY, "dataset.splits={test: 3, calib: 2, val: 1}"]
    one_thread = {"OMP_NUM_THREADS": "1"}
    run_cli("mqb.eval", *args, tmp=tmp_path / "one", env=one_thread)
    run_cli("mqb.eval", *args, "trainer.devices=2", "trainer.strategy=ddp", tmp=tmp_path / "two", env=one_thread)
    (single,) = records(tmp_path / "one" / "out" / "results")
    (ddp,) = records(tmp_path / "two" / "out" / "results")  # one record, written by rank 0 only
    assert single["id"] == ddp["id"] and len(single["metrics"]["per_case"]) == 3
    assert ddp["metrics"]["per_case"] == single["metrics"]["per_case"]
    assert ddp["metrics"]["dsc"] == single["metrics"]["dsc"] and ddp["baseline"] == {**single["baseline"]}
