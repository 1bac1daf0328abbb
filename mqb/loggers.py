"""Experiment loggers of ``mqb.eval``: Lightning's W&B / CSV loggers built from ``cfg.logger``, the record's final
numbers and per-class table logged per run, and a sweep's paper-style table as a W&B Table.

W&B never blocks: it runs offline unless a key is configured, and ``WANDB_MODE`` (offline, disabled) always wins.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig

from mqb.analysis.tables import COLUMNS, summary_rows


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


def log_record(logger: Any, record: dict[str, Any], baseline: dict[str, Any]) -> None:
    """The record's Δ %, baseline and timings as metrics, its config as hyperparameters, the per-class table (W&B);
    then finish the run."""
    flat = {f"delta_pct/{k}": v for k, v in record["delta_pct"].items() if v is not None}
    flat.update({f"baseline/{k}": baseline[k] for k in ("dsc", "nsd", "hd95") if baseline[k] is not None})
    flat.update({f"timings/{k}": v for k, v in record["timings"].items()})
    logger.log_metrics(flat)
    logger.log_hyperparams(record["config"])
    if hasattr(logger, "log_table"):
        rows = [
            [name, v.get("dsc"), v.get("nsd"), v.get("hd95"), baseline["per_class"][name].get("dsc")]
            for name, v in record["metrics"]["per_class"].items()
        ]
        logger.log_table(key="per_class", columns=["class", "dsc", "nsd", "hd95", "fp32_dsc"], data=rows)
        logger.experiment.summary.update({"untrained": record["untrained"]})
    logger.finalize("success")
    if hasattr(logger, "experiment") and hasattr(logger.experiment, "finish"):
        logger.experiment.finish()


def log_sweep_table(records: list[dict[str, Any]], sweep: str, sweep_dir: Path, logger_cfg: Any) -> None:
    """The sweep's paper-style table as a W&B Table in a ``<sweep>-summary`` run of the sweep's group."""
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
    table = wandb.Table(columns=list(COLUMNS), data=[[r[c] for c in COLUMNS] for r in rows])
    run.log({"sweep_summary": table})
    run.finish()