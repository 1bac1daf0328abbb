"""Start-up of mqb's command lines, in seconds and as a ratio to a bare ``python -c pass`` in the same run.

Commands: ``mqb.eval --help``, ``mqb.eval --cfg job`` (the composed config), ``mqb.eval model=<wrong>`` (an
argument error), ``mqb.sweep status`` and ``summary`` over 300 records, ``mqb.models`` (the model table). Each is
run ``--repeats`` times, interleaved; the figure is the median. Targets (issue 14): <= 3 s for help, config and
errors on a 2-core CPU; <= 2 s for status / summary over 300 records.

Last line: ``python_s=<x> eval_help_s=<x> eval_cfg_s=<x> eval_error_s=<x> status_300_s=<x> summary_300_s=<x>
models_s=<x> eval_help_vs_python=<x>``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _records(folder: Path, n: int = 300) -> None:
    for i in range(n):
        rid = f"{i:016x}"
        record = {"id": rid, "status": "success", "model": f"m{i % 7}", "dataset": "synthetic",
                  "precision": ("w8a8", "w4a4", "fp32")[i % 3], "granularity": "per_channel", "method": "rtn",
                  "metrics": {"dsc": 0.5, "nsd": 0.6, "hd95": 3.0}, "delta_pct": {"dsc": 1.0, "nsd": 1.0, "hd95": 1.0},
                  "baseline": {"key": "k", "dsc": 0.5, "nsd": 0.6, "hd95": 3.0}, "config": {}}  # fmt: skip
        (folder / f"{rid}.json").write_text(json.dumps(record))


def _time(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, capture_output=True, timeout=600)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    py = sys.executable
    with tempfile.TemporaryDirectory() as d:
        results = Path(d)
        _records(results)
        commands = {
            "python_s": [py, "-c", "pass"],
            "eval_help_s": [py, "-m", "mqb.eval", "--help"],
            "eval_cfg_s": [py, "-m", "mqb.eval", "--cfg", "job", "model=unetr", "precision=w4a4"],
            "eval_error_s": [py, "-m", "mqb.eval", "model=no_such_model"],
            "status_300_s": [py, "-m", "mqb.sweep", "status", str(results)],
            "summary_300_s": [py, "-m", "mqb.sweep", "summary", str(results), "--out", str(results / "summary")],
            "models_s": [py, "-m", "mqb.models"],
        }
        times: dict[str, list[float]] = {k: [] for k in commands}
        for _ in range(args.repeats):
            for name, cmd in commands.items():
                times[name].append(_time(cmd))
    med = {k: statistics.median(v) for k, v in times.items()}
    for name, value in med.items():
        print(f"{name:>16}: {value:.2f} s")
    figures = " ".join(f"{k}={v:.2f}" for k, v in med.items())
    print(f"{figures} eval_help_vs_python={med['eval_help_s'] / med['python_s']:.1f}")


if __name__ == "__main__":
    main()
