"""Experiment loggers of ``mqb.eval``: Lightning's W&B / CSV loggers built from ``cfg.logger``, the record's final
numbers, the interval of its Δ % and the per-class table (Δ %, 95 % interval and p per class) logged per run, and
a sweep's paper-style table (with intervals, p-values and Holm's correction) as a W&B Table.

W&B never blocks: it runs offline unless a key is configured, and ``WANDB_MODE`` (offline, disabled) always wins.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig

from mqb.analysis.tables import MEAN, SWEEP_TABLE_COLUMNS, summary_rows


def build_logger(cfg: DictConfig, run_dir: Path, sweep: str) -> Any:
    """The experiment logger, or ``None``. W&B runs offline unless a key is configured (never hangs)."""
    lcfg = cfg.get("logger")
    if not lcfg or "_target_" not in lcfg:
        return None
    kwargs: dict[str, Any] = {}
    if lcfg._target_.endswith("WandbLogger"):
        offline = lcfg.get("offline")
        if offline is None:
            offline = not wandb_key_available()
        from mqb.pipeline import precision_label

        label = precision_label(cfg)
        name = f"{cfg.model.name}-{label}-{cfg.granularity.name}-{cfg.method.name}"
        tags = [cfg.model.name, label, cfg.granularity.name, cfg.method.name, cfg.dataset.name]
        kwargs = {
            "offline": bool(offline),
            "name": lcfg.get("name") or name,
            "group": lcfg.get("group") or sweep,
            "tags": list(lcfg.get("tags") or []) + tags,
            "save_dir": str(run_dir),
        }
        # one line per run instead of W&B's banners (WANDB_SILENT=false brings them back)
        os.environ.setdefault("WANDB_SILENT", "true")
        where = run_dir / "wandb"
        print(f"W&B {'offline' if offline else 'online'} run {kwargs['name']}"
              + (f"; upload later: wandb sync {where}/offline-run-*" if offline else f" in {where}"), flush=True)
    return instantiate(lcfg, **kwargs)


def wandb_key_available() -> bool:
    """Whether W&B may go online: ``WANDB_MODE=offline`` (or disabled) wins over a configured key."""
    if os.environ.get("WANDB_MODE") in ("offline", "disabled", "dryrun"):
        return False
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import netrc

        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_mode(logger_cfg: Any) -> str:
    """The W&B mode: ``WANDB_MODE`` (offline, disabled) wins, then ``logger.offline``, then online only where a
    key is configured."""
    env = os.environ.get("WANDB_MODE")
    if env in ("offline", "dryrun"):
        return "offline"
    if env == "disabled":
        return "disabled"
    offline = logger_cfg.get("offline")
    if offline is None:
        offline = not wandb_key_available()
    return "offline" if offline else "online"


#: Columns of the per-run W&B table ``per_class`` (one row per class, then ``mean``): the run's values, the FP32
#: baseline's, and per metric the drop ↓Δ% from FP32 (positive: worse), its 95 % bootstrap interval over the test
#: cases, the paired test's p-value (uncorrected: one config; Holm across a sweep is in the sweep table) and whether
#: it is below α, the number of paired cases, and where the numbers came from (``stats``: the record's stats
#: section; ``per_case``: computed from the per-case values; ``per_class``: class means only, no interval).
CLASS_TABLE_COLUMNS = ("class", "dsc", "nsd", "hd95", "fp32_dsc", "fp32_nsd",
                       *(f"{m}_{c}" for m in ("dsc", "nsd") for c in ("delta_pct", "drop_ci_low", "drop_ci_high", "p",
                                                                       "significant", "cases")),
                       "source")  # fmt: skip


def class_entries(record: dict[str, Any], baseline: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{metric: {class or "mean": entry}}`` of :func:`mqb.analysis.report.record_entries` (the record's
    ``stats`` section where present, else computed from the per-case values of the record and the baseline);
    ``{}`` per metric for an FP32 record."""
    from mqb.analysis.report import record_entries

    return {m: {e["class"]: e for e in record_entries(record, baseline, m)} for m in ("dsc", "nsd")}


def class_table(record: dict[str, Any], baseline: dict[str, Any],
                entries: dict[str, dict[str, dict[str, Any]]] | None = None) -> list[list[Any]]:  # fmt: skip
    """The rows of the ``per_class`` W&B table (:data:`CLASS_TABLE_COLUMNS`): one per class of the record, then
    ``mean`` (the record's mean metrics and the baseline's)."""
    entries = class_entries(record, baseline) if entries is None else entries
    metrics = record["metrics"]
    per_class = dict(metrics.get("per_class") or {})
    base_class = baseline.get("per_class") or {}
    rows = []
    for name in [*per_class, MEAN]:
        own = metrics if name == MEAN else per_class[name] or {}
        base = baseline if name == MEAN else base_class.get(name) or {}
        row: dict[str, Any] = {"class": name, "dsc": own.get("dsc"), "nsd": own.get("nsd"), "hd95": own.get("hd95"),
                               "fp32_dsc": base.get("dsc"), "fp32_nsd": base.get("nsd"), "source": None}  # fmt: skip
        for m in ("dsc", "nsd"):
            e = entries.get(m, {}).get(name) or {}
            row.update({f"{m}_delta_pct": e.get("drop_pct"), f"{m}_drop_ci_low": e.get("drop_pct_ci_low"),
                        f"{m}_drop_ci_high": e.get("drop_pct_ci_high"), f"{m}_p": e.get("p"),
                        f"{m}_significant": e.get("significant"), f"{m}_cases": e.get("n_cases")})  # fmt: skip
            row["source"] = row["source"] or e.get("source")
        rows.append([row[c] for c in CLASS_TABLE_COLUMNS])
    return rows


def ci_scalars(entries: dict[str, dict[str, dict[str, Any]]]) -> dict[str, float]:
    """Scalars of the mean drop's interval and test, per metric: ``delta_pct_ci/<metric>_low`` / ``_high`` (the
    95 % bootstrap interval of ↓Δ%, in %), ``delta_pct_ci/<metric>_p`` (paired test, uncorrected); only those
    defined."""
    out = {}
    for m, by_class in entries.items():
        e = by_class.get(MEAN) or {}
        for key, value in (("low", e.get("drop_pct_ci_low")), ("high", e.get("drop_pct_ci_high")), ("p", e.get("p"))):
            if value is not None:
                out[f"delta_pct_ci/{m}_{key}"] = float(value)
    return out


def log_record(logger: Any, record: dict[str, Any], baseline: dict[str, Any]) -> None:
    """The record's Δ %, the 95 % interval of the mean Δ % (``delta_pct_ci/...``), baseline and timings as
    metrics, its config as hyperparameters, the per-class table with Δ %, interval and p per class
    (:data:`CLASS_TABLE_COLUMNS`; W&B); then finish the run."""
    entries = class_entries(record, baseline)
    flat = {f"delta_pct/{k}": v for k, v in record["delta_pct"].items() if v is not None}
    flat.update(ci_scalars(entries))
    flat.update({f"baseline/{k}": baseline[k] for k in ("dsc", "nsd", "hd95") if baseline[k] is not None})
    flat.update({f"timings/{k}": v for k, v in record["timings"].items()})
    logger.log_metrics(flat)
    logger.log_hyperparams(record["config"])
    if hasattr(logger, "log_table"):
        logger.log_table(key="per_class", columns=list(CLASS_TABLE_COLUMNS), data=class_table(record, baseline,
                                                                                              entries))  # fmt: skip
        logger.experiment.summary.update({"untrained": record["untrained"]})
    logger.finalize("success")
    if hasattr(logger, "experiment") and hasattr(logger.experiment, "finish"):
        logger.experiment.finish()


def log_sweep_table(records: list[dict[str, Any]], sweep: str, sweep_dir: Path, logger_cfg: Any) -> None:
    """The sweep's paper-style table as a W&B Table in a ``<sweep>-summary`` run of the sweep's group: per config
    (:data:`mqb.analysis.tables.SWEEP_TABLE_COLUMNS`) the mean DSC / NSD, ↓Δ% with its 95 % bootstrap interval,
    the paired test's p-value, test and Holm-adjusted p across the sweep's configs, and whether the drop is
    significant after Holm."""
    import wandb

    rows = summary_rows(records)
    run = wandb.init(
        project=logger_cfg.get("project", "mqb"),
        group=sweep,
        name=f"{sweep}-summary",
        job_type="sweep-summary",
        dir=str(sweep_dir),
        mode=wandb_mode(logger_cfg),
    )
    table = wandb.Table(columns=list(SWEEP_TABLE_COLUMNS), data=[[r[c] for c in SWEEP_TABLE_COLUMNS] for r in rows])
    run.log({"sweep_summary": table})
    run.finish()