"""``python -m mqb.train``: produce a checkpoint for any model/dataset of the config system.

    python -m mqb.train model=unet dataset=synthetic train.max_steps=300

writes ``${paths.checkpoints}/${dataset.name}/${model.name}.safetensors`` (plus a ``.json`` sidecar with the
training config, steps and validation DSC), which ``mqb.eval`` picks up with ``model.checkpoint=auto`` or
loads with ``model.checkpoint=PATH``.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from mqb.config import CONF_DIR, register_configs


def fit(
    model_cfg: DictConfig,
    dataset_cfg: DictConfig,
    train_cfg: DictConfig,
    output: str | Path,
    *,
    accelerator: str = "auto",
    devices: int = 1,
    fp32_precision: str = "ieee",
    progress: bool = True,
    logger: Any = None,
    default_root_dir: str | None = None,
) -> dict[str, Any]:
    """Train ``model_cfg.net`` on ``dataset_cfg``'s train split and save safetensors weights to ``output``."""
    import lightning as L  # imported here: --help and --cfg come without torch

    from mqb.checkpoints import save_weights
    from mqb.devices import apply_fp32_precision, device_info
    from mqb.lit import quiet_lightning
    from mqb.lit.trainer import SegmentationTrainer
    from mqb.results import git_commit

    L.seed_everything(int(train_cfg.seed), workers=True, verbose=False)
    numerics = apply_fp32_precision(fp32_precision)
    datamodule = instantiate(dataset_cfg)
    net = instantiate(model_cfg.net)
    module = SegmentationTrainer(
        net,
        num_classes=datamodule.num_classes,
        roi_size=datamodule.roi_size,
        lr=float(train_cfg.lr),
        max_steps=int(train_cfg.max_steps),
    )
    quiet_lightning()
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=devices,
        max_steps=int(train_cfg.max_steps),
        val_check_interval=int(train_cfg.val_every),
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        logger=logger if logger is not None else False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
        default_root_dir=default_root_dir,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    metadata = {
        "model": OmegaConf.to_container(model_cfg, resolve=True),
        "dataset": OmegaConf.to_container(dataset_cfg, resolve=True),
        "train": OmegaConf.to_container(train_cfg, resolve=True),
        "steps": int(trainer.global_step),
        "best_val_dsc": module.best_val_dsc,
        "train_seconds": round(time.perf_counter() - start, 1),
        "device": {**device_info(trainer.strategy.root_device), **numerics},
        "git": git_commit(),
        "created": datetime.now(UTC).isoformat(),
    }
    save_weights(net, output, metadata)
    return metadata


def run_task(cfg: DictConfig) -> None:
    """The Hydra task (module-level and undecorated so launchers pickle it by reference)."""
    metadata = fit(
        cfg.model,
        cfg.dataset,
        cfg.train,
        cfg.output,
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        fp32_precision=cfg.trainer.fp32_precision,
        progress=cfg.trainer.progress,
    )
    print(f"saved {cfg.output} (steps {metadata['steps']}, best val DSC {metadata['best_val_dsc']})")


main = hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")(run_task)

register_configs()

if __name__ == "__main__":
    # Run the importable module, not this __main__ copy: launchers (submitit) pickle the task function, which
    # must be pickled by reference to mqb.train, not by value with this module's globals.
    from mqb.train import main as _main

    _main()
