"""``python -m mqb.sweep``: the state of a sweep from its records, and its paper-style summary.

    python -m mqb.sweep status outputs/results                       # done / failed per config
    python -m mqb.sweep status outputs/results --sweep outputs/multirun/2026-11-27_20-43-59   # + missing
    python -m mqb.sweep summary outputs/results --out summary         # CSV + Markdown table of successes

``status`` exits 0 when every config is done, 1 when some failed or are missing.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from mqb.results import read_records

COLUMNS = ("model", "dataset", "precision", "granularity", "method", "dsc", "dsc_delta_pct", "nsd", "nsd_delta_pct",
           "hd95", "untrained", "id")  # fmt: skip


def metric_with_delta(value: float | None, delta: float | None) -> str:
    """``0.881 (0.3%)`` as in the paper's tables; ``-`` when the metric is undefined."""
    if value is None:
        return "-"
    return f"{value:.3f} ({delta:.1f}%)" if delta is not None else f"{value:.3f}"


def sweep_jobs(sweep_dir: Path) -> list[dict[str, Any]]:
    """The jobs of a Hydra sweep folder: name, overrides and (once started) the config id it writes."""
    jobs = []
    for job in sorted(p for p in sweep_dir.iterdir() if p.is_dir() and (p / ".hydra").is_dir()):
        overrides_file = job / ".hydra" / "overrides.yaml"
        overrides = overrides_file.read_text().strip() if overrides_file.is_file() else ""
        id_file = job / "record_id.txt"
        rid = id_file.read_text().strip() if id_file.is_file() else None
        jobs.append({"job": job.name, "overrides": overrides, "id": rid})
    return jobs


def status(results_dir: Path, sweep_dir: Path | None = None) -> list[dict[str, Any]]:
    """One row per config: ``done`` (success record), ``failed`` (error record only) or ``missing``."""
    rows: dict[str, dict[str, Any]] = {}
    for r in read_records(results_dir):
        rid = r.get("id")
        if rid is None:
            continue
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
    if sweep_dir is not None:
        wanted = sweep_jobs(sweep_dir)
        ids = {j["id"] for j in wanted if j["id"]}
        rows = {k: v for k, v in rows.items() if k in ids}
        for job in wanted:
            if job["id"] is None or job["id"] not in rows:
                key = job["id"] or job["job"]
                rows[key] = {"id": job["id"] or "-", "status": "missing", "model": job["job"], "precision": "",
                             "granularity": "", "method": "", "error": job["overrides"].replace("\n", " ")}  # fmt: skip
    return sorted(rows.values(), key=lambda r: (r["status"], str(r["model"]), str(r["precision"])))


def summary_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Flat rows (one per successful config) in the paper's table format."""
    rows = []
    for r in records:
        if r.get("status") != "success":
            continue
        m, d = r["metrics"], r["delta_pct"]
        rows.append({
            "model": r["model"], "dataset": r["dataset"], "precision": r["precision"],
            "granularity": r["granularity"], "method": r["method"], "dsc": m["dsc"], "dsc_delta_pct": d["dsc"],
            "nsd": m["nsd"], "nsd_delta_pct": d["nsd"], "hd95": m["hd95"], "untrained": r.get("untrained"),
            "id": r["id"],
        })  # fmt: skip
    return rows


def write_summary(records: list[dict[str, Any]], out: Path) -> tuple[Path, Path]:
    """Write ``out.csv`` and ``out.md`` (DSC (↓Δ%) / NSD (↓Δ%) like the paper's tables); returns the paths."""
    rows = summary_rows(records)
    out.parent.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out.with_suffix(".csv"), out.with_suffix(".md")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)

    lines = ["| Architecture | Dataset | Precision | Quant-Granularity | Method | DSC (↓Δ%) | NSD (↓Δ%) |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['dataset']} | {r['precision']} | {r['granularity']} | {r['method']} | "
            f"{metric_with_delta(r['dsc'], r['dsc_delta_pct'])} | {metric_with_delta(r['nsd'], r['nsd_delta_pct'])} |"
        )
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mqb.sweep", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    st = sub.add_parser("status", help="done / failed / missing per config")
    st.add_argument("results_dir", type=Path)
    st.add_argument("--sweep", type=Path, default=None, help="a Hydra multirun folder, to list missing configs")
    sm = sub.add_parser("summary", help="CSV + Markdown table of the successful configs")
    sm.add_argument("results_dir", type=Path)
    sm.add_argument("--out", type=Path, default=Path("summary"))
    args = parser.parse_args(argv)
    if not args.results_dir.is_dir():
        print(f"mqb.sweep: results directory {str(args.results_dir)!r} does not exist", file=sys.stderr)
        return 2
    console = Console(width=None if sys.stdout.isatty() else 160)
    if args.command == "summary":
        csv_path, md_path = write_summary(read_records(args.results_dir), args.out)
        console.print(f"wrote {csv_path} and {md_path}")
        return 0
    if args.sweep is not None and not args.sweep.is_dir():
        print(f"mqb.sweep: sweep folder {str(args.sweep)!r} does not exist", file=sys.stderr)
        return 2
    rows = status(args.results_dir, args.sweep)
    table = Table(title=f"sweep status: {args.results_dir}")
    for col in ("status", "id", "model", "precision", "granularity", "method", "error"):
        table.add_column(col)
    colors = {"done": "green", "failed": "red", "missing": "yellow"}
    for r in rows:
        table.add_row(f"[{colors[r['status']]}]{r['status']}", str(r["id"]), str(r["model"]), str(r["precision"]),
                      str(r["granularity"]), str(r["method"]), str(r["error"])[:200])  # fmt: skip
    console.print(table)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("done", "failed", "missing")}
    console.print(", ".join(f"{n} {s}" for s, n in counts.items()))
    return 0 if counts["failed"] == 0 and counts["missing"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
