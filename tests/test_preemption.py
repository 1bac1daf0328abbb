"""Issue 16, item 7: on SIGTERM a job stops at the next batch (calibration included), saves nothing half-done and
exits 143 so that it can be requeued; a relaunch completes it (:mod:`mqb.preemption`)."""

from __future__ import annotations

import os
import pickle
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch import nn

from mqb import preemption
from mqb.lit.callbacks import PreemptionCallback
from mqb.preemption import EXIT_CODE, Preempted, check, checked, requested, stop_on_sigterm
from mqb.quant import QuantRecipe, QuantSpec, ptq
from mqb.results import _TEMP_NAME, read_records
from tests.test_eval_cli import ROOT, _env


@pytest.fixture(autouse=True)
def _fresh_process_state():
    """Each test starts as a process that was never told to stop, with the default SIGTERM action back after."""
    preemption.reset()
    before = signal.getsignal(signal.SIGTERM)
    yield
    preemption.reset()
    signal.signal(signal.SIGTERM, before)


#: Native runtimes that run their own thread pools: once an earlier test of the session loaded them, a SIGTERM sent
#: to the test process itself can crash it (seen: exit 139 after tests/deploy/test_runtimes.py)
NATIVE_RUNTIMES = ("openvino", "onnxruntime")


def _ran_in_a_fresh_process(request: pytest.FixtureRequest) -> bool:
    """Run this test in a fresh interpreter instead (and check that it passed there) when native runtimes are loaded
    here; ``False`` when it is to run in this process."""
    if os.environ.get("MQB_TEST_CHILD") or not any(m in sys.modules for m in NATIVE_RUNTIMES):
        return False
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", request.node.nodeid]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "MQB_TEST_CHILD": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    return True


def _sigterm_self() -> None:
    os.kill(os.getpid(), signal.SIGTERM)
    for _ in range(200):  # Python runs the handler in the main thread at its next check
        if preemption._received is not None:
            return
        time.sleep(0.005)


def test_sigterm_sets_a_flag_the_next_check_raises_preempted_and_the_old_handler_is_chained_and_restored(
    request, capfd
):
    if _ran_in_a_fresh_process(request):
        return
    calls = []

    def previous(signum, frame):  # e.g. submitit's handler, which logs the signal
        calls.append(signum)

    signal.signal(signal.SIGTERM, previous)
    seen = []
    with pytest.raises(Preempted) as info, stop_on_sigterm():
        check("calibration batch")  # nothing asked yet: goes on
        assert signal.getsignal(signal.SIGTERM) is not previous
        for i in checked(range(5), "calibration batch"):
            seen.append(i)
            if i == 1:
                _sigterm_self()  # arrives while batch 1 is computed
    assert seen == [0, 1]  # stopped before batch 2 was even loaded
    assert info.value.code == EXIT_CODE == 143 and isinstance(info.value, SystemExit)
    assert not isinstance(info.value, Exception)  # no `except Exception` (error records, Hydra, submitit) takes it
    back = pickle.loads(pickle.dumps(info.value))  # as a process pool's worker sends it to the parent
    assert isinstance(back, Preempted) and back.code == 143 and str(back) == str(info.value)
    assert "stopped before the next calibration batch" in str(info.value)
    assert calls == [signal.SIGTERM]  # the handler it replaced was called too
    assert signal.getsignal(signal.SIGTERM) is previous  # and is back
    err = capfd.readouterr().err
    assert "mqb: SIGTERM received: stopping at the next batch boundary" in err  # said when the signal came
    assert "mqb: SIGTERM received: stopped before the next calibration batch" in err  # and when it stopped
    with pytest.raises(Preempted, match="stopped before the next config"), stop_on_sigterm():
        pytest.fail("a process told to stop must not start another config (a sweep in one process stops)")


def test_without_sigterm_nothing_changes():
    with stop_on_sigterm():
        assert list(checked(range(3))) == [0, 1, 2]
        assert not requested()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the fixture's default action, restored


def test_lightning_sigterm_exit_becomes_preempted_with_exit_code_143():
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    with pytest.raises(Preempted) as info, stop_on_sigterm():
        raise SIGTERMException  # what Lightning's evaluation loop raises after a batch: a SystemExit with code 0
    assert info.value.code == 143 and isinstance(info.value.__cause__, SIGTERMException)
    with pytest.raises(SystemExit) as other, stop_on_sigterm():
        sys.exit(3)  # any other exit passes unchanged
    assert other.value.code == 3 and not isinstance(other.value, Preempted)


def test_ptq_calibration_stops_before_the_next_batch(request):
    if _ran_in_a_fresh_process(request):
        return
    model = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 2, 1)).eval()
    recipe = QuantRecipe(weight=QuantSpec(bits=8), activation=QuantSpec(bits=8), granularity="per_tensor")
    loaded = []

    def batches():
        for i in range(6):
            loaded.append(i)
            if i == 2:
                _sigterm_self()  # SIGTERM while the third volume is loaded
            yield torch.randn(1, 1, 8, 8, 8)

    with pytest.raises(Preempted, match="calibration batch"), stop_on_sigterm():
        ptq(model, recipe, batches)
    assert loaded == [0, 1, 2]  # the third batch is not run, the fourth not loaded


class _Windows(L.LightningModule):
    """Runs its network three times per batch (three sliding windows)."""

    def __init__(self, stop_at: int) -> None:
        super().__init__()
        self.net = nn.Conv3d(1, 1, 1)
        self.windows, self.stop_at = 0, stop_at

    def test_step(self, batch, batch_idx):
        for _ in range(3):
            self.net(batch[0])
            self.windows += 1
            if self.windows == self.stop_at:
                _sigterm_self()


def test_preemption_callback_stops_evaluation_before_the_next_window(request):
    if _ran_in_a_fresh_process(request):
        return
    module = _Windows(stop_at=4)  # SIGTERM during the first window of the second batch
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(5, 1, 4, 4, 4)), batch_size=1)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, callbacks=[PreemptionCallback()])  # fmt: skip
    with pytest.raises(Preempted, match="stopped before the next evaluation window"), stop_on_sigterm():
        trainer.test(module, dataloaders=data, verbose=False)
    assert module.windows == 4  # not a window more
    assert not module.net._forward_pre_hooks  # the callback's hook is gone
    preemption.reset()  # Lightning's own flag is enough too (a SIGTERM only its handler saw)
    with pytest.raises(Preempted):
        check("evaluation batch", SimpleNamespace(received_sigterm=True))


# -- the real CLI ------------------------------------------------------------------------------------------------
#: Synthetic data whose calibration lasts long enough (8 volumes) to be interrupted.
ARGS = ["model.checkpoint=null", "logger=none", "dataset.source.num_cases=10", "dataset.source.shape=[64,64,48]",
        "dataset.roi_size=[32,32,32]", "dataset.splits={test: 2, calib: 8, val: 0}", "calibration.num_volumes=8",
        "trainer.progress=true"]  # fmt: skip
EVAL = [sys.executable, "-m", "mqb.eval"]


def _temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob(".*") if _TEMP_NAME.match(p.name) and p.suffix != ".lock"]


@pytest.mark.slow
def test_sigterm_during_calibration_stops_within_seconds_saves_nothing_and_a_relaunch_completes(tmp_path):
    cmd = [*EVAL, *ARGS, f"paths.output_dir={tmp_path / 'out'}",
           f"paths.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    os.set_blocking(proc.stderr.fileno(), False)
    err, sent = b"", None
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        if select.select([proc.stderr], [], [], 0.05)[0]:
            err += proc.stderr.read() or b""
        if sent is None and b"calibration:" in err:  # the calibration progress bar: calibration has started
            proc.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            timeout = sent + 60
            deadline = min(deadline, timeout)
    if proc.poll() is None:
        proc.kill()
    err += proc.communicate()[1] or b""
    stopped = time.monotonic()
    text = err.decode(errors="replace")
    assert sent is not None, text[-3000:]
    assert proc.returncode == EXIT_CODE, text[-3000:]
    assert stopped - sent < 20, f"took {stopped - sent:.1f} s to stop"  # calibrating 8 volumes takes far longer
    assert re.search(r"mqb: SIGTERM received: stopped before the next calibration (window|batch)", text), text[-3000:]
    assert "8/8" not in text  # calibration did not run to its end
    results = tmp_path / "out" / "results"
    assert not list(results.glob("*.json"))  # no record, no error record
    assert not list((tmp_path / "cache").glob("calibration/*.pt"))  # no calibration ranges from a partial pass
    assert _temp_files(tmp_path) == [] and not list(results.glob(".*.lock"))  # nothing half-written, claim released

    again = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    records = read_records(results, on_bad=None)
    assert [(r["status"], r["precision"], len(r["data"]["calibration_cases"])) for r in records] == [
        ("success", "w8a8", 8)
    ]
    assert _temp_files(tmp_path) == []
