"""Stop a job cleanly on SIGTERM: at the next batch, with nothing half-done, so that it can be requeued and resumed.

``python -m mqb.eval`` runs each config inside :func:`stop_on_sigterm`; the calibration and evaluation loops call
:func:`check` (or iterate through :func:`checked`) at every batch boundary. On SIGTERM the handler only sets a flag
(and says so on stderr); the next :func:`check` raises :class:`Preempted`. That is a :class:`SystemExit` with code
143 (128 + SIGTERM, what a shell reports for a process ended by SIGTERM), so it passes through every
``except Exception`` on its way out (the job's error-record writer, Hydra's job runner, submitit's
``process_job``): **no success record and no error record** are written for the interrupted config, every file
written so far is whole (records and caches are written to a temporary file and renamed,
:func:`mqb.results.atomic_write`), the config's claim (lock file) is released, and the process ends at once
instead of computing on until the SIGKILL. A relaunch (``resume=true``, the default) skips the configs with a
success record and computes this one again from the start (there is no partial state to resume from).

What happens where:

* **Lightning** installs its own SIGTERM handler for the duration of ``trainer.test`` (``_SignalConnector``): it
  logs the signal, sets ``trainer.received_sigterm`` and calls the handler it found (ours, which it restores
  afterwards). Its evaluation loop raises ``SIGTERMException`` (a ``SystemExit`` with code 0) after a batch, but
  it never looks at the flag during ``on_test_start``, where mqb calibrates: that is how a preempted job kept
  calibrating for minutes. :func:`check` also reads ``trainer.received_sigterm``, and :func:`stop_on_sigterm`
  turns Lightning's ``SIGTERMException`` into :class:`Preempted` (exit 143, not 0).
* **SLURM** sends SIGTERM when a job is preempted or cancelled (``scancel``), then SIGKILL after ``KillWait`` /
  the partition's ``GraceTime``; a preempted job is requeued by SLURM itself where the partition's
  ``PreemptMode`` is ``REQUEUE``. Near the time limit it sends the signal given to ``sbatch --signal``.
* **submitit** (``hydra/launcher=submitit_slurm``) asks for ``--signal=USR2@<signal_delay_s>`` and handles USR2
  itself (``JobEnvironment._handle_signals``): it calls the launcher's ``checkpoint``
  (``hydra_plugins.hydra_submitit_launcher.BaseSubmititLauncher.checkpoint``: the same config, resubmitted as it
  was), requeues the job with ``scontrol requeue`` and exits at once (``sys.exit(-1)``); mqb leaves USR2 alone
  (interrupting anywhere is safe: every write is atomic). submitit only logs SIGTERM ("Bypassing signal
  SIGTERM"); that handler is chained after ours. Since :class:`Preempted` is not an ``Exception``, submitit
  writes no result file for the job, exactly as after its own requeue exit, so the requeued job (by SLURM or by
  submitit) runs the config again and Hydra's launcher waits for it. ``submitit_local`` forwards the SIGTERM it
  receives to its job processes.

The flag is per process and stays set: once told to stop, a process starts no further config (a later
:func:`stop_on_sigterm` raises :class:`Preempted` at once), so a sweep run in one process (``hydra/launcher=basic``)
stops as a whole and a relaunch resumes it. A SIGTERM that comes after a config's last batch lets that config
finish and write its record (a second or less) before the process stops.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any, TypeVar

T = TypeVar("T")

#: The exit status of a preempted job: 128 + SIGTERM, as a shell reports a process ended by SIGTERM.
EXIT_CODE = 128 + int(signal.SIGTERM)

#: The stop signal received by this process (``None``: none). Never cleared by mqb: a process told to stop stops.
_received: int | None = None


class Preempted(SystemExit):
    """The job was asked to stop (SIGTERM) and stopped at a batch boundary; nothing of it was saved.

    A :class:`SystemExit` (code :data:`EXIT_CODE`), not an ``Exception``: no ``except Exception`` on the way out
    records it as a failure, and the process ends with 143 where nothing catches it."""

    def __init__(self, message: str) -> None:
        super().__init__(EXIT_CODE)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[type[Preempted], tuple[str]]:  # a worker process sends it back whole (a pool)
        return type(self), (self.message,)


def requested(trainer: Any = None) -> bool:
    """Whether this process was asked to stop: SIGTERM seen by :func:`stop_on_sigterm`'s handler, or by the
    SIGTERM handler of ``trainer`` (a Lightning ``Trainer``, which installs its own during ``fit``/``test``)."""
    return _received is not None or bool(getattr(trainer, "received_sigterm", False))


def check(where: str = "batch", trainer: Any = None) -> None:
    """Raise :class:`Preempted` if this process was asked to stop (:func:`requested`); call it at every batch
    boundary of a long loop. ``where`` names what comes next in the message (``"calibration batch"``)."""
    if requested(trainer):
        name = signal.Signals(_received).name if _received is not None else "SIGTERM"
        raise Preempted(
            f"{name} received: stopped before the next {where}; nothing of this config was saved (no record, "
            "no error record), every file written is complete; relaunch the same command to compute it "
            "(resume=true skips the configs already done)"
        )


def checked(batches: Iterable[T], where: str = "batch", trainer: Any = None) -> Iterator[T]:
    """Iterate ``batches``, calling :func:`check` before loading each batch and again before handing it out (the
    loading itself, e.g. preprocessing a volume, can take a while)."""
    iterator = iter(batches)
    while True:
        check(where, trainer)
        try:
            batch = next(iterator)
        except StopIteration:
            return
        check(where, trainer)
        yield batch


def reset() -> None:
    """Forget a received SIGTERM (for tests: a real process that received one is meant to stop)."""
    global _received
    _received = None


def _handler(previous: Any):
    def on_signal(signum: int, frame: FrameType | None) -> None:
        global _received
        first = _received is None
        _received = signum
        if first:  # os.write: safe at any point of the main thread, unlike print (reentrant buffered writes)
            name = signal.Signals(signum).name
            os.write(2, f"\nmqb: {name} received: stopping at the next batch boundary (the config in progress "
                        "is not saved; a relaunch computes it)\n".encode())  # fmt: skip
        if callable(previous):  # e.g. submitit's handler, which logs it
            previous(signum, frame)

    on_signal.mqb_previous = previous  # type: ignore[attr-defined]
    return on_signal


@contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """Run a job with SIGTERM turned into a stop at the next batch boundary (:func:`check`).

    Installs a SIGTERM handler that sets this process's flag and then calls the handler it replaces (when that is
    a function); restores the previous handler on exit. Raises :class:`Preempted` at once if the process was
    already asked to stop (an earlier config of the same sweep). When the job stops, it prints the reason on
    stderr and re-raises :class:`Preempted`; a Lightning ``SIGTERMException`` (exit code 0) becomes
    :class:`Preempted` (143). Outside the main thread (where Python cannot set signal handlers) it installs
    nothing: the loops then stop on Lightning's flag only.
    """
    check("config")  # an earlier config of this process was stopped: start no other
    installed = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if installed else None
    if installed:
        signal.signal(signal.SIGTERM, _handler(previous))
    try:
        yield
    except Preempted as err:
        print(f"mqb: {err}", file=sys.stderr, flush=True)
        raise
    except SystemExit as err:
        if not _lightning_sigterm(err):
            raise
        stopped = Preempted(
            "SIGTERM received: Lightning stopped the evaluation after a batch; nothing of this config was saved "
            "(no record, no error record); relaunch the same command to compute it"
        )
        print(f"mqb: {stopped}", file=sys.stderr, flush=True)
        raise stopped from err
    finally:
        if installed:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _lightning_sigterm(err: BaseException) -> bool:
    try:
        from lightning.pytorch.utilities.exceptions import SIGTERMException
    except ImportError:  # pragma: no cover
        return False
    return isinstance(err, SIGTERMException)
