"""Sweep throughput: configs per hour of a 24-config ``python -m mqb.eval -m`` sweep (W8A8/W4A4/W4A8 x
per-tensor/per-channel/per-voxel/adaptive x RTN/SmoothQuant, the trained UNet, synthetic data) on the device it
finds, three ways in one run, each from an empty cache:

* ``basic``: Hydra's basic launcher (one process, configs in turn);
* ``pool``: ``hydra/launcher=mqb_pool`` with ``--workers`` long-lived worker processes (CPU threads split);
* ``separate``: the first ``--separate`` configs as separate ``python -m mqb.eval`` processes (the cost of one
  Python start-up, import and set-up per config), extrapolated per config.

Last line: ``configs_per_hour=<basic> pool_configs_per_hour=<pool> separate_configs_per_hour=<separate>
pool_vs_basic=<ratio> basic_vs_separate=<ratio>``.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
from pathlib import Path

from eval_overhead import cli, ensure_checkpoint

PRECISIONS = ("w8a8", "w4a4", "w4a8")
GRANULARITIES = ("per_tensor", "per_channel", "per_voxel", "adaptive")
METHODS = ("rtn", "smoothquant")
GRID = [f"precision={','.join(PRECISIONS)}", f"granularity={','.join(GRANULARITIES)}", f"method={','.join(METHODS)}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--separate", type=int, default=6, help="configs run as separate processes")
    args = parser.parse_args()
    ensure_checkpoint()
    n = len(PRECISIONS) * len(GRANULARITIES) * len(METHODS)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        basic = cli(["-m", *GRID], tmp / "c1", tmp / "o1")
        pool = cli(["-m", "hydra/launcher=mqb_pool", f"hydra.launcher.workers={args.workers}", *GRID], tmp / "c2",
                   tmp / "o2")  # fmt: skip
        combos = list(itertools.product(PRECISIONS, GRANULARITIES, METHODS))[: args.separate]
        separate = sum(cli([f"precision={p}", f"granularity={g}", f"method={m}"], tmp / "c3", tmp / "o3")
                       for p, g, m in combos) / len(combos)  # fmt: skip
        for folder in ("o1", "o2"):
            done = len([p for p in (tmp / folder / "results").glob("*.json") if not p.name.endswith(".error.json")])
            assert done == n, f"{folder}: the sweep wrote {done} success records, expected {n}"
    rates = {"basic": 3600 * n / basic, "pool": 3600 * n / pool, "separate": 3600 / separate}
    print(f"{n} configs: basic {basic:.1f}s, pool ({args.workers} workers) {pool:.1f}s, separate processes "
          f"{separate:.1f}s per config")  # fmt: skip
    print(f"configs_per_hour={rates['basic']:.0f} pool_configs_per_hour={rates['pool']:.0f} "
          f"separate_configs_per_hour={rates['separate']:.0f} pool_vs_basic={rates['pool'] / rates['basic']:.2f} "
          f"basic_vs_separate={rates['basic'] / rates['separate']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
