"""``python -m mqb.activations``: activation statistics of a model's quantizable layers (paper Fig. 1b, Fig. 5).

    python -m mqb.activations model=medformer dataset=btcv dataset.root=/data/btcv --layers conv1x3x3 conv1x1x1
    python -m mqb.activations model=meshnet_18cls dataset=brain_aseg_sample --out outputs/activations/meshnet

For every selected layer input, on the calibration volumes (sliding windows, as calibration sees them):
within-channel and across-channel kurtosis (appendix C, eq. 5), channel imbalance before/after SmoothQuant
smoothing, outlier maps. Writes ``activation_stats.csv`` / ``.safetensors``, ``kurtosis_scatter.png`` and
``outliers_<layer>.png`` to ``--out`` (default ``<output_dir>/activations/<model>-<dataset>``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mqb.analysis.activation_stats import activation_report
from mqb.cli import user_error
from mqb.config import compose_eval
from mqb.pipeline import calibration_inputs, compute_device, load_model
from mqb.quant.selectors import validate_selector


def main(argv: list[str] | None = None) -> int:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(prog="python -m mqb.activations", description=doc.split("\n\n")[0],
                                     epilog=doc, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("overrides", nargs="*", help="mqb.eval overrides (model=..., dataset=..., ...)")
    parser.add_argument("--layers", nargs="+", default=["conv", "conv_transpose", "linear"], help="layer selectors")
    parser.add_argument("--out", type=Path, default=None, help="output folder")
    parser.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant strength for the 'after' view")
    parser.add_argument("--plot", type=int, default=4, help="heat maps for the N layers of largest kurtosis")
    parser.add_argument("--max-batches", type=int, default=None, help="use only the first N calibration volumes")
    args = parser.parse_args(argv)
    try:
        for selector in args.layers:
            validate_selector(selector)
        cfg = compose_eval(args.overrides)
        net, _ = load_model(cfg)
        net.to(compute_device(cfg))  # statistics are gathered on the device the config asks for
        batches, forward = calibration_inputs(cfg, net)
        out = args.out or Path(cfg.paths.output_dir) / "activations" / f"{cfg.model.name}-{cfg.dataset.name}"
        activation_report(net, batches(), out, args.layers, alpha=args.alpha, plot_layers=args.plot,
                          forward=forward, max_batches=args.max_batches)  # fmt: skip
    except Exception as err:  # noqa: BLE001
        problem = user_error(err)
        if problem is None:
            raise
        print(f"mqb.activations: error: {problem}", file=sys.stderr)
        return 2
    print(f"activation statistics written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
