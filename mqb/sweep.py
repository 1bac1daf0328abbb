"""``python -m mqb.sweep``: the state of a sweep from its records, and its paper-style summary.

    python -m mqb.sweep status outputs/results                       # done / failed per config
    python -m mqb.sweep status outputs/results --sweep outputs/multirun/2026-11-27_20-43-59   # + missing
    python -m mqb.sweep summary outputs/results --out summary         # CSV + Markdown table of successes

``status`` exits 0 when every config is done, 1 when some failed, are missing or are still running. With
``--sweep`` it lists the sweep's whole grid (from its ``multirun.yaml``), also the configs a killed sweep never
started. A corrupt record file is named on stderr and its config counts as missing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from mqb.analysis.tables import console, status_table, write_summary
from mqb.results import BadRecord, load_records, lock_holder, read_records, warn_bad_record
from mqb.samples import shipped_folder

CONF_DIR = shipped_folder("conf")
LAUNCHERS_DIR = shipped_folder("launchers")
STATES = ("done", "failed", "running", "missing")

def _job_overrides(job: Path) -> list[str]:
    overrides_file = job / ".hydra" / "overrides.yaml"
    if not overrides_file.is_file():
        return []
    try:
        data = yaml.safe_load(overrides_file.read_text()) or []
    except yaml.YAMLError:
        return []
    return [str(o) for o in data] if isinstance(data, list) else []


def sweep_jobs(sweep_dir: Path) -> list[dict[str, Any]]:
    """The started jobs of a Hydra sweep folder: name, overrides and (once started) the config id it writes."""
    jobs = []
    for job in sorted(p for p in sweep_dir.iterdir() if p.is_dir() and (p / ".hydra").is_dir()):
        id_file = job / "record_id.txt"
        rid = id_file.read_text().strip() if id_file.is_file() else None
        overrides = _job_overrides(job)
        jobs.append({"job": job.name, "overrides": "\n".join(f"- {o}" for o in overrides), "id": rid,
                     "override_list": overrides})  # fmt: skip
    return jobs


def sweep_grid(sweep_dir: Path) -> list[list[str]] | None:
    """Every job's overrides of a basic-sweeper sweep, in job order, as Hydra expands them from the sweep's
    ``multirun.yaml`` (``hydra.sweeper.params`` then the command line); ``None`` when that is unknown."""
    cfg_file = sweep_dir / "multirun.yaml"
    if not cfg_file.is_file():
        return None
    try:
        from hydra._internal.config_loader_impl import ConfigLoaderImpl
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra._internal.utils import create_config_search_path
        from hydra.core.override_parser.overrides_parser import OverridesParser

        from mqb.config import register_configs

        register_configs()
        conf = OmegaConf.to_container(OmegaConf.load(cfg_file), resolve=False)
        assert isinstance(conf, dict)
        hydra_conf = conf.get("hydra") or {}
        sweeper = hydra_conf.get("sweeper") or {}
        from hydra.utils import get_class

        if not issubclass(get_class(str(sweeper.get("_target_", ""))), BasicSweeper):  # basic, mqb_grid
            return None
        params = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
        task = [str(o) for o in (hydra_conf.get("overrides") or {}).get("task") or []]
        loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(CONF_DIR)))
        overrides = OverridesParser.create(config_loader=loader).parse_overrides(params + task)
        return [list(job) for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]
    except Exception:  # noqa: BLE001  (another sweeper, an unparsable file: fall back to the started jobs)
        return None


def grid_ids(grid: list[list[str]]) -> list[str | None]:
    """The config id of each job of a grid (composed like ``mqb.eval`` does; ``None`` where that fails)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from mqb.config import register_configs
    from mqb.results import config_id

    if GlobalHydra.instance().is_initialized():  # inside a Hydra app: cannot compose here
        return [None] * len(grid)
    register_configs()
    ids: list[str | None] = []
    search = [f"hydra.searchpath=[file://{LAUNCHERS_DIR}]"] if LAUNCHERS_DIR.is_dir() else []
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for overrides in grid:
            try:
                ids.append(config_id(compose(config_name="eval", overrides=[*overrides, *search])))
            except Exception:  # noqa: BLE001
                ids.append(None)
    return ids


def sweep_configs(sweep_dir: Path, compose: bool = True) -> list[dict[str, Any]]:
    """Every config of a sweep: its grid (``multirun.yaml``) matched with the job folders that started; a job
    that never started gets its id by composing its config (``compose``), else ``None``."""
    started = sweep_jobs(sweep_dir)
    grid = sweep_grid(sweep_dir)
    if grid is None:
        return started
    by_overrides = {tuple(j["override_list"]): j for j in started}
    jobs, unmatched = [], []
    for num, overrides in enumerate(grid):
        job = by_overrides.pop(tuple(overrides), None)
        if job is None:
            job = {"job": f"{num} (not started)", "overrides": "\n".join(f"- {o}" for o in overrides), "id": None,
                   "override_list": overrides}  # fmt: skip
            unmatched.append(job)
        jobs.append(job)
    if compose and unmatched:
        for job, rid in zip(unmatched, grid_ids([j["override_list"] for j in unmatched]), strict=True):
            job["id"] = rid
    return jobs + list(by_overrides.values())


def status(
    results_dir: Path, sweep_dir: Path | None = None, on_bad: Any = warn_bad_record, compose: bool = True
) -> list[dict[str, Any]]:
    """One row per config: ``done`` (success record), ``failed`` (error record only), ``running`` (claimed by a
    live process) or ``missing`` (no record, or only a corrupt one: each is reported to ``on_bad``)."""
    records, bad = load_records(results_dir)
    rows: dict[str, dict[str, Any]] = {}
    for r in records:
        rid = r["id"]
        state = "done" if r.get("status") == "success" else "failed"
        if rows.get(rid, {}).get("status") == "done":
            continue  # a success record wins over an older error record of the same config
        rows[rid] = {
            "id": rid,
            "status": state,
            "model": r.get("model"),
            "precision": r.get("precision"),
            "granularity": r.get("granularity"),
            "method": r.get("method"),
            "error": r.get("error", "") if state == "failed" else "",
        }
    for problem in bad:
        if on_bad is not None:
            on_bad(problem)
        rows.setdefault(problem.record_id, _missing_row(problem.record_id, "", _corrupt(problem)))
    if sweep_dir is not None:
        wanted = sweep_configs(sweep_dir, compose=compose)
        ids = {j["id"] for j in wanted if j["id"]}
        rows = {k: v for k, v in rows.items() if k in ids}
        for job in wanted:
            if job["id"] is None or job["id"] not in rows:
                key = job["id"] or job["job"]
                rows[key] = _missing_row(job["id"] or "-", job["job"], job["overrides"].replace("\n", " "))
            elif rows[job["id"]]["status"] == "missing":
                rows[job["id"]]["model"] = job["job"]
    for row in rows.values():
        if row["status"] in ("missing", "failed") and row["id"] != "-":
            holder = lock_holder(results_dir, row["id"])
            if holder is not None:
                row["status"], row["error"] = "running", f"claimed by {holder.describe()}"
    order = {s: i for i, s in enumerate(STATES)}
    return sorted(rows.values(), key=lambda r: (order[r["status"]], str(r["model"]), str(r["precision"])))


def _corrupt(problem: BadRecord) -> str:
    return f"corrupt record {problem.path.name}: {problem.reason}"


def _missing_row(rid: str, model: str, error: str) -> dict[str, Any]:
    return {"id": rid, "status": "missing", "model": model, "precision": "", "granularity": "", "method": "",
            "error": error}  # fmt: skip


#: what ``clear-cache`` deletes under ``paths.cache_dir``: results that can be recomputed (not checkpoints)
CACHE_FOLDERS = ("baselines", "calibration", "persistent", "labels")


def clear_cache(cache_dir: Path) -> int:
    """Delete the recomputable caches under ``cache_dir`` (:data:`CACHE_FOLDERS`); trained checkpoints stay."""
    import shutil

    if not cache_dir.is_dir():
        print(f"mqb.sweep: cache directory {str(cache_dir)!r} does not exist (paths.cache_dir)", file=sys.stderr)
        return 2
    removed = [f for f in CACHE_FOLDERS if (cache_dir / f).is_dir()]
    for folder in removed:
        shutil.rmtree(cache_dir / folder)
    print(f"cleared {', '.join(removed) or 'nothing'} under {cache_dir} (checkpoints kept)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mqb.sweep", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    st = sub.add_parser("status", help="done / failed / missing per config")
    st.add_argument("results_dir", type=Path)
    st.add_argument("--sweep", type=Path, default=None, help="a Hydra multirun folder, to list missing configs")
    sm = sub.add_parser("summary", help="CSV + Markdown table of the successful configs")
    sm.add_argument("results_dir", type=Path)
    sm.add_argument("--out", type=Path, default=Path("summary"))
    cc = sub.add_parser("clear-cache", help="delete the cached FP32 baselines, calibration ranges and preprocessed "
                        "volumes (trained checkpoints are kept)")  # fmt: skip
    cc.add_argument("cache_dir", type=Path, nargs="?", default=Path(".cache/mqb"), help="paths.cache_dir")
    args = parser.parse_args(argv)
    if args.command == "clear-cache":
        return clear_cache(args.cache_dir)
    if not args.results_dir.is_dir():
        print(f"mqb.sweep: results directory {str(args.results_dir)!r} does not exist", file=sys.stderr)
        return 2

    if args.command == "summary":
        csv_path, md_path = write_summary(read_records(args.results_dir), args.out)
        console.print(f"wrote {csv_path} and {md_path}")
        return 0
    if args.sweep is not None and not args.sweep.is_dir():
        print(f"mqb.sweep: sweep folder {str(args.sweep)!r} does not exist", file=sys.stderr)
        return 2
    rows = status(args.results_dir, args.sweep)
    console.print(status_table(rows, title=f"sweep status: {args.results_dir}"))
    counts = {s: sum(r["status"] == s for r in rows) for s in STATES}
    console.print(", ".join(f"{n} {s}" for s, n in counts.items() if n or s in ("done", "failed", "missing")))
    if not rows:
        print(f"mqb.sweep: no configs found in {str(args.sweep or args.results_dir)!r}", file=sys.stderr)
        return 1
    return 0 if counts["done"] == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
