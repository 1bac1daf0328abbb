"""Sweep throughput: configs per hour of one local ``python -m mqb.eval -m`` sweep over 12 configs
(W8A8/W4A4/W4A8 x per-tensor/per-channel/per-voxel/adaptive, the trained UNet, synthetic data) vs the same 12
configs run one by one as separate processes; both sides start from an empty cache. Ratio in one run.

Last line: ``sweep_configs_per_hour=<x> separate_configs_per_hour=<y> throughput_ratio=<x/y>``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from eval_overhead import cli, ensure_checkpoint

PRECISIONS = ("w8a8", "w4a4", "w4a8")
GRANULARITIES = ("per_tensor", "per_channel", "per_voxel", "adaptive")


def main() -> None:
    ensure_checkpoint()
    n = len(PRECISIONS) * len(GRANULARITIES)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        separate = sum(
            cli([f"precision={p}", f"granularity={g}"], tmp / "c1", tmp / "o1")
            for p in PRECISIONS
            for g in GRANULARITIES
        )
        sweep = cli(["-m", f"precision={','.join(PRECISIONS)}", f"granularity={','.join(GRANULARITIES)}"],
                    tmp / "c2", tmp / "o2")  # fmt: skip
        done = len(list((tmp / "o2" / "results").glob("*.json")))
    assert done == n, f"the sweep wrote {done} records, expected {n}"
    sweep_rate, separate_rate = 3600 * n / sweep, 3600 * n / separate
    print(f"{n} configs: sweep {sweep:.1f}s ({sweep_rate:.0f}/h), separate processes {separate:.1f}s "
          f"({separate_rate:.0f}/h)")  # fmt: skip
    print(f"sweep_configs_per_hour={sweep_rate:.0f} separate_configs_per_hour={separate_rate:.0f} "
          f"throughput_ratio={sweep_rate / separate_rate:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
