"""One config as a job, and a sweep of them: resume, claims, atomic records, error records, the sweep's summary.

``run_job(cfg)``: skip the config if a valid success record exists (``resume``), else claim it (an exclusive lock
file, so two sweeps never compute the same config), evaluate it (:func:`mqb.pipeline.evaluate`) and write
``<results_dir>/<id>.json`` atomically, or ``<id>.error.json`` when it fails. :class:`SweepSummaryCallback` (a Hydra
callback of ``mqb.eval -m``) checks the results folder before a sweep and summarises it at the end.
"""

from __future__ import annotations

import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from mqb import preemption
from mqb.analysis.stats import with_holm
from mqb.analysis.tables import DELTA_LEGEND, console, reference_first, results_table, write_summary
from mqb.cli import hydra_job, is_multirun, user_error
from mqb.results import (
    Claim,
    ResultsDirError,
    check_writable,
    clean_temp_files,
    config_id,
    is_rank_zero,
    lock_holder,
    read_record,
    read_records,
    try_claim,
    write_json_atomic,
)
from mqb.sweep import status, sweep_configs


def run_job(cfg: DictConfig) -> dict[str, Any] | None:
    """One config: skip it if it has a valid success record (``resume``), else claim it, evaluate it and write
    its record (``<id>.json``, or ``<id>.error.json`` when it fails). Returns ``None`` in a sweep when another
    live process has claimed the config (the sweep waits for its record at the end)."""
    results_dir = Path(cfg.results_dir)
    cid = config_id(cfg)
    success, failure = results_dir / f"{cid}.json", results_dir / f"{cid}.error.json"
    if (job := hydra_job()) is not None and is_rank_zero():  # lets the sweep summary find skipped configs too
        job_dir = Path(job.runtime.output_dir)
        job_dir.mkdir(parents=True, exist_ok=True)
        (job_dir / "record_id.txt").write_text(cid)
    if is_rank_zero():
        check_writable(results_dir)  # before any work: a record that cannot be saved is not computed
        for folder in (results_dir, Path(cfg.paths.cache_dir) / "baselines", Path(cfg.paths.cache_dir) / "calibration"):
            clean_temp_files(folder)
    if cfg.resume and (done := success_record(success)) is not None:
        console.print(f"[green]skip {cid}: a success record exists ({success})")
        return done
    claim: Claim | None = None
    if is_rank_zero():
        got = claim_config(cfg, results_dir, cid, success)
        if not isinstance(got, Claim):
            return got
        claim = got
    try:
        return evaluate_and_record(cfg, cid, success, failure)
    finally:
        if claim is not None:
            claim.release()


#: Seconds between looks at a config another process has claimed.


#: Seconds between looks at a config another process has claimed.
CLAIM_POLL_S = 2.0


def success_record(path: Path, quiet: bool = False) -> dict[str, Any] | None:
    """The success record in ``path``, or ``None``; a corrupt one is treated as missing (re-run) and, unless
    ``quiet``, named on stderr."""
    record = read_record(path, on_bad=None) if quiet else read_record(path)
    return record if record is not None and record.get("status") == "success" else None


def claim_config(cfg: DictConfig, results_dir: Path, cid: str, success: Path) -> Claim | dict[str, Any] | None:
    """This process's claim on the config; or, when another live process holds it: ``None`` in a sweep (skip it
    now, the sweep's end waits for it), else its record once it is done (waits)."""
    waiting = False
    while True:
        got = try_claim(results_dir, cid)
        if isinstance(got, Claim):
            if cfg.resume and (done := success_record(success)) is not None:  # finished while we looked
                got.release()
                console.print(f"[green]skip {cid}: a success record exists ({success})")
                return done
            return got
        if is_multirun():
            console.print(f"[yellow]skip {cid} for now: claimed by {got.describe()} (another run computes it; this "
                          "sweep waits for its record at the end)")  # fmt: skip
            return None
        if not waiting:
            console.print(f"[yellow]{cid} is being computed by {got.describe()}: waiting for its record")
            waiting = True
        time.sleep(CLAIM_POLL_S)
        preemption.check("wait")
        if (done := success_record(success)) is not None:
            return done


def evaluate_and_record(cfg: DictConfig, cid: str, success: Path, failure: Path) -> dict[str, Any] | None:
    from mqb.pipeline import evaluate, method_label, precision_label

    try:
        record = evaluate(cfg)
    except Exception as err:  # noqa: BLE001  (recorded, then re-raised or reported)
        try:
            label = precision_label(cfg)
        except Exception:  # noqa: BLE001
            label = cfg.precision.get("name")
        error = {
            "id": cid,
            "status": "error",
            "created": datetime.now(UTC).isoformat(),
            "model": cfg.model.get("name"),
            "dataset": cfg.dataset.get("name"),
            "precision": label,
            "granularity": cfg.granularity.get("name"),
            "method": method_label(cfg),
            "error": f"{type(user_error(err) or err).__name__}: {user_error(err) or err}",
            "traceback": traceback.format_exc(),
            "sweep": Path(hydra_job().sweep.dir).name if is_multirun() else None,
            "config": OmegaConf.to_container(cfg, resolve=False),
        }
        if is_rank_zero():
            write_error_record(err, failure, error)
        raise
    if not is_rank_zero():
        return record
    try:
        write_json_atomic(success, record)  # first the record that counts ...
    except OSError as err:
        lost = ResultsDirError(err.errno or 5, f"could not save the record of {cid} to {str(success)!r} "
                               f"({err.strerror or err}); the evaluation's results are lost")  # fmt: skip
        error = {"id": cid, "status": "error", "created": datetime.now(UTC).isoformat(), "model": record["model"],
                 "dataset": record["dataset"], "precision": record["precision"], "granularity": record["granularity"],
                 "method": record["method"], "error": f"ResultsDirError: {lost}", "sweep": record["sweep"]}  # fmt: skip
        write_error_record(lost, failure, error)
        raise lost from err
    try:  # ... then its copy in the run folder
        write_json_atomic(Path(record["run_dir"]) / "record.json", record)
    except OSError as err:
        console.print(f"[yellow]could not copy the record into the run folder {record['run_dir']}: {err}")
    failure.unlink(missing_ok=True)
    if not is_multirun():
        console.print(results_table([record]))
    return record


def write_error_record(err: BaseException, failure: Path, error: dict[str, Any]) -> None:
    """Write the error record; remember on ``err`` where it went (``None``: it could not be written)."""
    try:
        write_json_atomic(failure, error)
        err.mqb_error_record = str(failure)  # type: ignore[attr-defined]
    except OSError as write_err:
        err.mqb_error_record = None  # type: ignore[attr-defined]
        print(f"mqb.eval: could not write the error record {str(failure)!r} either: {write_err}", file=sys.stderr)


class SweepSummaryCallback(Callback):
    """Hydra callback: refuse a results_dir that cannot take records before a multirun starts; at its end wait
    for configs other runs were computing, print the sweep's results table, save it as CSV/Markdown, and exit
    non-zero when any config of the sweep has no success record (failed, not saved, never run) or the sweep was
    empty."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            results_dir = Path(str(config.results_dir))
        except Exception:  # noqa: BLE001  (results_dir swept or not resolvable here: each job checks it)
            return
        try:
            check_writable(results_dir)
        except ResultsDirError as err:
            print(f"mqb.eval: error: {err}", file=sys.stderr)
            sys.exit(2)
        clean_temp_files(results_dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        results_dir = Path(config.results_dir)
        sweep = sweep_dir.name
        jobs = sweep_configs(sweep_dir, compose=False) if sweep_dir.is_dir() else []
        if not jobs:
            task = " ".join(config.hydra.overrides.task)
            print(f"mqb.eval: error: the sweep ran no config: its overrides expand to an empty grid ({task})",
                  file=sys.stderr)  # fmt: skip
            sys.exit(2)
        ids = {j["id"] for j in jobs if j["id"]}
        self._wait_for_others(results_dir, ids)
        latest: dict[str, dict[str, Any]] = {}
        for r in read_records(results_dir):  # success wins over an error record of the same config
            if r["id"] in ids and (r.get("status") == "success" or latest.get(r["id"], {}).get("status") != "success"):
                latest[r["id"]] = r
        records = list(latest.values())
        if records:
            console.print(results_table(sorted(with_holm(records), key=reference_first), title=f"mqb sweep {sweep}"))
            console.print(DELTA_LEGEND)
            csv_path, md_path = write_summary(records, sweep_dir / "summary")
            console.print(f"sweep summary: {csv_path} {md_path}")
            logger_cfg = config.get("logger") or {}
            if str(logger_cfg.get("_target_", "")).endswith("WandbLogger"):
                from mqb.loggers import log_sweep_table

                log_sweep_table(records, sweep, sweep_dir, logger_cfg)
        rows = status(results_dir, sweep_dir, on_bad=None, compose=False)
        failed = [r for r in rows if r["status"] == "failed"]
        unsaved = [r for r in rows if r["status"] not in ("done", "failed")]
        if failed:
            console.print(f"[red]{len(failed)} config(s) failed; see the .error.json records in {results_dir}")
        if unsaved:
            names = ", ".join(f"{r['model']} ({r['id']})" for r in unsaved[:10])
            print(f"mqb.eval: {len(unsaved)} config(s) of the sweep have no record in {str(results_dir)!r}: {names}",
                  file=sys.stderr)  # fmt: skip
        if failed or unsaved:
            sys.exit(1)

    @staticmethod
    def _wait_for_others(results_dir: Path, ids: set[str]) -> None:
        """Wait until no config of ``ids`` is claimed by another live process (they were skipped here)."""
        announced = False
        while True:
            held = {}
            for cid in sorted(ids):
                done = success_record(results_dir / f"{cid}.json", quiet=True)
                if done is None and (h := lock_holder(results_dir, cid)):
                    held[cid] = h
            if not held:
                return
            if not announced:
                who = "; ".join(f"{cid}: {h.describe()}" for cid, h in list(held.items())[:5])
                console.print(f"[yellow]waiting for {len(held)} config(s) other runs are computing ({who})")
                announced = True
            time.sleep(CLAIM_POLL_S)