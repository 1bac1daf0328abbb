"""``python -m mqb.train``: produce a checkpoint for any model/dataset of the config system.

    python -m mqb.train model=unet dataset=synthetic train.max_steps=300

writes ``${paths.checkpoints}/${dataset.name}/${model.name}.safetensors`` (plus a ``.json`` sidecar with the
training config, steps, validation DSC and what its reproducibility rests on), which ``mqb.eval`` picks up with
``model.checkpoint=auto`` or loads with ``model.checkpoint=PATH``.

Training is deterministic: the same config gives the same weights to the bit on every run, for any number of
CPU cores and DataLoader workers (measured), and, by the same kernels, on other x86-64 CPUs with AVX2 under the same
PyTorch build (checked on an AVX-512 CPU, which with the pins below computes what it computed with oneDNN's AVX2
kernels forced from outside; not yet on an AVX2-only CPU, whose cache sizes could change oneDNN's blocking). It runs
in a child process pinned to :data:`TRAIN_THREADS` threads (the thread count changes how reductions are split, and so
the rounding: 1 vs 2 threads gave different weights after 10 steps) and to oneDNN's AVX2 kernels
(:data:`TRAIN_CPU_ENV`: oneDNN picks its convolution kernels by CPU; AVX-512 and AVX2 kernels round differently,
measured: after 10 steps weights differ by up to 0.2). The pins apply to the child alone, so an evaluation that
trains first (``auto_train``) runs with this machine's own kernels. Each item's random transforms are seeded by
(seed, epoch, item) (:func:`mqb.lit.trainer.seeded_train_loader`), not per DataLoader worker.

On a GPU, PyTorch has no deterministic CUDA kernel for some ops a training runs (the DiceCE loss's cross entropy
over 5-D inputs, trilinear interpolation's backward): there deterministic algorithms are asked for with a warning
for those ops instead of an error (:func:`training_determinism`), with cuDNN deterministic and without its
benchmark, and the sidecar says so.
"""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from mqb.config import CONF_DIR, register_configs

#: CPU threads of a training run (fixed: the result depends on it; one thread was also the fastest on 2 cores).
TRAIN_THREADS = 1
#: The numerics a training child runs with: oneDNN and ATen capped at AVX2 (what every x86-64 CPU since 2013 has),
#: MKL on its AVX2 code path, so an AVX-512 or AMX machine computes what an AVX2 machine does.
TRAIN_CPU_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2"}
#: cuBLAS's deterministic workspace setting, read when CUDA first creates a cuBLAS handle.
CUBLAS_WORKSPACE_CONFIG = ":4096:8"
#: The CPU features that decide which kernels run (recorded; /proc/cpuinfo flags).
_ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


def cpu_isa() -> list[str]:
    """The ISA extensions among :data:`_ISA_FLAGS` this CPU has (empty where /proc/cpuinfo is absent)."""
    from mqb.devices import cpu_flags

    flags = cpu_flags()
    return [f for f in _ISA_FLAGS if f in flags]


def determinism(seed: int, threads: int, pinned: bool, device: str) -> dict[str, Any]:
    """What the bit-for-bit reproducibility of a checkpoint rests on (the sidecar's ``determinism``)."""
    import platform

    import torch

    record: dict[str, Any] = {
        "seed": seed,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpu_isa": cpu_isa(),
        "device": device,
        "threads": threads,
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "per_item_transform_seeds": True,
    }
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    if warn_only:  # a GPU training (training_determinism): what else its reproducibility rests on
        record.update(deterministic_warn_only=True, cudnn_deterministic=bool(torch.backends.cudnn.deterministic),
                      cudnn_benchmark=bool(torch.backends.cudnn.benchmark),
                      cublas_workspace_config=os.environ.get("CUBLAS_WORKSPACE_CONFIG"))  # fmt: skip
    if pinned:
        record["cpu_env"] = dict(TRAIN_CPU_ENV)
    if device == "cpu" and pinned and "avx2" in record["cpu_isa"]:
        record["holds"] = (
            "same weights to the bit on re-runs, for any core and DataLoader worker count; the same kernels "
            f"(oneDNN AVX2) on other x86-64 CPUs with AVX2 under torch {torch.__version__}"
        )
    else:
        record["holds"] = "same weights to the bit on re-runs on this machine and software"
    if warn_only:
        record["holds"] = ("re-runs on this machine and software use the same deterministic kernels, except for the "
                           "ops PyTorch warned have none; those may change the last bits of the weights")
    return record


def training_determinism(accelerator: str) -> bool | str:
    """Lightning's ``deterministic`` for a training on ``trainer.accelerator``: ``True`` on the CPU (every op
    deterministic; one without a deterministic kernel is an error); ``"warn"`` elsewhere: on CUDA the DiceCE loss's
    cross entropy over 5-D inputs (``nll_loss2d``) and trilinear interpolation's backward have no deterministic
    kernel and would stop a training at its first step, so those warn and every other op still runs a deterministic
    kernel (with cuDNN deterministic and :data:`CUBLAS_WORKSPACE_CONFIG`, see :func:`_fit`)."""
    return True if _trains_on_cpu(accelerator) else "warn"


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
    threads: int = TRAIN_THREADS,
    isolate: bool | None = None,
) -> dict[str, Any]:
    """Train ``model_cfg.net`` on ``dataset_cfg``'s train split and save safetensors weights to ``output``.

    ``isolate`` (default: for a CPU training on one device without a ``logger`` object, which cannot cross
    processes; a GPU's numerics do not depend on the CPU's kernels): train in a child
    process (a fresh interpreter) with ``threads`` CPU threads and :data:`TRAIN_CPU_ENV`, the same kernels on every
    x86-64 CPU with AVX2 (this process's own threads and kernels are left as they are). Without isolation the weights
    are reproducible on this machine with ``threads`` threads only (the sidecar's ``determinism`` says which).
    """
    if isolate is None:  # the pins concern CPU kernels: a GPU or multi-process training runs here
        isolate = logger is None and int(devices) == 1 and _trains_on_cpu(accelerator)
    kwargs = dict(accelerator=accelerator, devices=devices, fp32_precision=fp32_precision, progress=progress,
                  default_root_dir=default_root_dir, threads=threads)  # fmt: skip
    if not isolate:
        return _fit(model_cfg, dataset_cfg, train_cfg, str(output), logger=logger, pinned=False, **kwargs)
    return _fit_in_child(model_cfg, dataset_cfg, train_cfg, Path(output), kwargs)


def _trains_on_cpu(accelerator: str) -> bool:
    """Whether ``trainer.accelerator`` puts training on the CPU (``auto``: where no CUDA GPU is visible)."""
    if accelerator == "cpu":
        return True
    if accelerator != "auto":
        return False
    import torch

    return not torch.cuda.is_available()


def _fit_in_child(model_cfg: DictConfig, dataset_cfg: DictConfig, train_cfg: DictConfig, output: Path,
                  kwargs: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """Run :func:`_fit` in a fresh interpreter (``python -c``: nothing of the caller's ``__main__`` is re-run) with
    the pinned threads and kernels in its environment, read by oneDNN and ATen once, on first use."""
    import json
    import subprocess
    import sys
    import tempfile

    import mqb

    threads = str(kwargs["threads"])
    env = {**os.environ, **TRAIN_CPU_ENV, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    package_root = str(Path(mqb.__file__).resolve().parents[1])  # the mqb this process runs, also uninstalled
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    spec = {"configs": [OmegaConf.to_container(c, resolve=True) for c in (model_cfg, dataset_cfg, train_cfg)],
            "output": str(output), "kwargs": kwargs}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="mqb-train-") as tmp:
        spec_file = Path(tmp) / "spec.json"
        spec_file.write_text(json.dumps(spec))
        code = "import sys; from mqb.train import _child_main; _child_main(sys.argv[1])"
        done = subprocess.run([sys.executable, "-c", code, str(spec_file)], env=env, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"training {output} failed in its process (exit code {done.returncode}; "
                               "its error is printed above)")  # fmt: skip
        return json.loads((Path(tmp) / "metadata.json").read_text())


def _child_main(spec_file: str) -> None:
    """The training process of :func:`_fit_in_child`: train, and leave the metadata beside the spec."""
    import json

    spec = json.loads(Path(spec_file).read_text())
    model, dataset, train = (OmegaConf.create(c) for c in spec["configs"])
    metadata = _fit(model, dataset, train, spec["output"], pinned=True, **spec["kwargs"])
    Path(spec_file).with_name("metadata.json").write_text(json.dumps(metadata, default=str))


def _fit(
    model_cfg: DictConfig,
    dataset_cfg: DictConfig,
    train_cfg: DictConfig,
    output: str,
    *,
    accelerator: str,
    devices: int,
    fp32_precision: str,
    progress: bool,
    default_root_dir: str | None,
    threads: int,
    pinned: bool,
    logger: Any = None,
) -> dict[str, Any]:
    import lightning as L  # imported here: --help and --cfg come without torch
    import torch

    from mqb.checkpoints import save_weights
    from mqb.devices import apply_fp32_precision, device_info
    from mqb.lit import quiet_lightning
    from mqb.lit.trainer import SegmentationTrainer, StepProgressBar, seeded_train_loader
    from mqb.results import git_commit

    saved_threads, saved_deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    saved_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    saved_cudnn = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    deterministic = training_determinism(accelerator)
    if deterministic == "warn":  # a GPU
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE_CONFIG)  # before cuBLAS starts
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.set_num_threads(int(threads))
    try:
        seed = int(train_cfg.seed)
        L.seed_everything(seed, workers=True, verbose=False)
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
            callbacks=[StepProgressBar()] if progress else [],  # steps of max_steps, time left
            default_root_dir=default_root_dir,
            deterministic=deterministic,
        )
        datamodule.prepare_data()
        start, cpu_start = time.perf_counter(), time.process_time()
        trainer.fit(module, train_dataloaders=seeded_train_loader(datamodule, seed),
                    val_dataloaders=datamodule.val_dataloader())  # fmt: skip
        root = trainer.strategy.root_device
        metadata = {
            "model": OmegaConf.to_container(model_cfg, resolve=True),
            "dataset": OmegaConf.to_container(dataset_cfg, resolve=True),
            "train": OmegaConf.to_container(train_cfg, resolve=True),
            "steps": int(trainer.global_step),
            "best_val_dsc": module.best_val_dsc,
            "train_seconds": round(time.perf_counter() - start, 1),
            "train_cpu_seconds": round(time.process_time() - cpu_start, 1),  # ~ the time on an idle CPU (1 thread)
            "device": {**device_info(root), **numerics},
            "determinism": determinism(seed, int(threads), pinned, root.type),
            "git": git_commit(),
            "created": datetime.now(UTC).isoformat(),
        }
        save_weights(net, output, metadata)
    finally:
        torch.set_num_threads(saved_threads)
        torch.use_deterministic_algorithms(saved_deterministic, warn_only=saved_warn_only)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved_cudnn
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
    print(f"saved {cfg.output} (steps {metadata['steps']}, best val DSC {metadata['best_val_dsc']}, "
          f"{metadata['train_seconds']} s)")  # fmt: skip


main = hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")(run_task)

register_configs()

if __name__ == "__main__":
    # Run the importable module, not this __main__ copy: launchers (submitit) pickle the task function, which
    # must be pickled by reference to mqb.train, not by value with this module's globals.
    from mqb.train import main as _main

    _main()
