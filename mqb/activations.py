"""``python -m mqb.activations`` (``mqb-activations``): activation statistics of a model's quantizable layers (paper
Fig. 1b, Fig. 5).

    mqb-activations model=medformer dataset=btcv dataset.root=/data/btcv activations.layers=[conv1x3x3,conv1x1x1]
    mqb-activations model=meshnet_18cls dataset=brain_aseg_sample activations.out=outputs/activations/meshnet
    mqb-activations -m model=unet,segresnet                                   # one report per model
    mqb-activations --help                                                    # groups, choices, the report's keys

A Hydra app over ``conf/activations.yaml``: the ``mqb.eval`` config plus the ``activations`` node
(:class:`mqb.tool_config.ActivationsOptions`); the earlier options (``--layers a b``, ``--out``, ``--alpha``,
``--plot``, ``--max-batches``) set its keys. For every selected layer input, on the calibration volumes (sliding
windows, as calibration sees them): within-channel and across-channel kurtosis (appendix C, eq. 5), channel
imbalance before/after SmoothQuant smoothing, outlier maps. Writes ``activation_stats.csv`` / ``.safetensors``,
``kurtosis_scatter.png`` and ``outliers_<layer>.png`` to ``activations.out`` (default
``<paths.output_dir>/activations/<model>-<dataset>``).

Torch and the pipeline are imported when a report runs, not before: ``--help``, ``--cfg`` and errors come fast.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from mqb.cli import run_tool_task, tool_config, tool_main
from mqb.config import CONF_DIR
from mqb.tool_config import ACTIVATIONS, register_tool_configs


def report(cfg: DictConfig) -> Path:
    """Write the activation statistics ``cfg.activations`` asks for (``cfg`` composed from
    ``conf/activations.yaml``); returns the output folder. ``ValueError`` for bad input."""
    from mqb.analysis.activation_stats import activation_report
    from mqb.pipeline import calibration_inputs, compute_device, load_model
    from mqb.quant.selectors import validate_selector

    eval_cfg, options = tool_config(cfg, ACTIVATIONS)
    for selector in options.layers:
        try:
            validate_selector(selector)
        except ValueError as err:
            raise ValueError(f"activations.layers: {err}") from err
    net, _ = load_model(eval_cfg)
    net.to(compute_device(eval_cfg))  # statistics are gathered on the device the config asks for
    batches, forward = calibration_inputs(eval_cfg, net)
    default = Path(eval_cfg.paths.output_dir) / "activations" / f"{eval_cfg.model.name}-{eval_cfg.dataset.name}"
    out = Path(options.out) if options.out is not None else default
    activation_report(net, batches(), out, list(options.layers), alpha=float(options.alpha), plot_layers=options.plot,
                      forward=forward, max_batches=options.max_batches)  # fmt: skip
    print(f"activation statistics written to {out}")
    return out


def run_task(cfg: DictConfig) -> None:
    """The Hydra task: one report. Module-level and undecorated so launchers pickle it by reference."""
    run_tool_task(ACTIVATIONS, lambda: report(cfg))


_hydra_main = hydra.main(config_path=str(CONF_DIR), config_name=ACTIVATIONS.config_name, version_base="1.3")(run_task)


def main(argv: list[str] | None = None) -> int:
    """``mqb-activations`` / ``python -m mqb.activations``: the exit status (2 for a user error)."""
    return tool_main(ACTIVATIONS, _hydra_main, argv)


register_tool_configs()

if __name__ == "__main__":
    # Run the importable module, not this __main__ copy: launchers (submitit) pickle the task function by reference.
    from mqb.activations import main as _main

    sys.exit(_main())
