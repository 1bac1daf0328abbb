"""``python -m mqb.models`` (``mqb-models``): the model zoo as a table (parameter counts and layer census computed,
not typed).

python -m mqb.models                    # every conf/model choice, BTCV setting (1 input channel, 14 classes)
python -m mqb.models unet meshnet_18cls --classes 18

Torch and the networks are imported when the table is built, not before: ``--help`` and errors come fast.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

from mqb.config import CONF_DIR, register_configs

#: The released brainchop models have a fixed number of classes.
MESHNET_CLASSES = {"meshnet_gwm": 3, "meshnet_18cls": 18, "meshnet_30chan_18cls": 18, "meshnet_50cls": 50,
                   "meshnet_104cls": 104}  # fmt: skip


def census(name: str, classes: int, roi: int = 96) -> dict[str, object]:
    """Parameter count and quantizable-layer census of one ``conf/model`` choice."""
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from mqb.quant import quantizable_layers

    names = ",".join(f"c{i}" for i in range(classes))
    overrides = [f"model={name}", f"dataset.num_classes={classes}", f"dataset.class_names=[{names}]",
                 f"dataset.roi_size=[{roi},{roi},{roi}]"]  # fmt: skip
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("eval", overrides=overrides)
    try:
        with torch.device("meta"):  # shapes only: STU-Net-H has 1.46 G parameters
            net = instantiate(cfg.model.net)
    except Exception:  # noqa: BLE001  (some constructors compute values, e.g. SwinUNETR's drop-path .item())
        net = instantiate(cfg.model.net)
    counts: Counter[str] = Counter()
    for info in quantizable_layers(net):
        counts[info.kernel_tag + (" dw" if info.depthwise else "") if info.kernel_tag else info.kind] += 1
    return {
        "config": name,
        "architecture": type(net).__name__,
        "params": sum(p.numel() for p in net.parameters()),
        "layers": dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))),
    }


def main(argv: list[str] | None = None) -> int:
    register_configs()
    choices = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
    parser = argparse.ArgumentParser(prog="python -m mqb.models", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("models", nargs="*", default=choices, help=f"model configs (default all: {', '.join(choices)})")
    parser.add_argument("--classes", type=int, default=14, help="output classes (default 14, the BTCV setting)")
    args = parser.parse_args(argv)
    unknown = [m for m in args.models if m not in choices]
    if unknown:
        print(f"mqb.models: unknown model(s) {unknown}; valid: {', '.join(choices)}", file=sys.stderr)
        return 2
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"mqb model zoo ({args.classes} classes, 1 input channel)")
    for col in ("config", "architecture", "parameters", "quantizable layers"):
        table.add_column(col)
    for name in args.models:
        fixed = MESHNET_CLASSES.get(name, args.classes)
        row = census(name, fixed)
        layers = ", ".join(f"{k}: {v}" for k, v in row["layers"].items())  # type: ignore[union-attr]
        table.add_row(str(row["config"]), str(row["architecture"]), f"{row['params']:,}", layers)
    Console(width=None if sys.stdout.isatty() else 200).print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
