"""Overhead of the mqb evaluation pipeline, as ratios measured in one run.

1. ``eval_ratio``: the FP32 evaluation inside ``mqb.eval`` (Lightning test loop, sliding windows, DSC/NSD/HD95)
   vs a plain MONAI loop doing the same work (same transforms, model, ``sliding_window_inference`` settings and
   MONAI metrics) on the same test volumes, interleaved; ratio of medians. Target <= 1.1.
2. ``sweep_ratio``: one ``python -m mqb.eval -m`` process over 6 configs (W8A8/W4A4 x per-tensor/per-channel/
   adaptive, UNet, synthetic data) vs the same 6 configs as 6 separate ``python -m mqb.eval`` processes, each
   side starting from an empty cache; ratio of wall times. Target <= 0.6.

Both use the UNet that ``make demo`` trains on the synthetic data (trained here first if missing).

Last line: ``eval_ratio=<x> sweep_ratio=<y>``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from monai.data import DataLoader, Dataset
from monai.inferers import sliding_window_inference

from mqb.checkpoints import load_weights
from mqb.config import CONF_DIR, register_configs
from mqb.metrics import case_metrics, spacing_from_affine
from mqb.pipeline import build_evaluator, build_trainer

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ["precision=w8a8,w4a4", "granularity=per_tensor,per_channel,adaptive"]
CHECKPOINT = ROOT / ".cache" / "mqb" / "checkpoints" / "synthetic" / "unet.safetensors"
COMMON = ["model=unet", f"model.checkpoint={CHECKPOINT}", "logger=none", "trainer.progress=false"]


def plain_loop(net: torch.nn.Module, dm, roi, sw_batch: int, overlap: float) -> float:
    start = time.perf_counter()
    loader = DataLoader(Dataset(dm.splits["test"], dm.eval_transforms()), batch_size=1)
    with torch.inference_mode():
        for batch in loader:
            logits = sliding_window_inference(batch["image"], roi, sw_batch, net, overlap, mode="gaussian")
            pred = logits.argmax(1)[0]
            case_metrics(
                pred,
                batch["label"][0, 0],
                dm.num_classes,
                spacing_from_affine(batch["image"].affine[0]),
                dm.nsd_tolerance_mm,
            )
    return time.perf_counter() - start


def mqb_loop(cfg, net: torch.nn.Module, dm, run_dir: Path) -> float:
    start = time.perf_counter()
    evaluator = build_evaluator(cfg, net, dm, "float32")
    build_trainer(cfg, None, run_dir, []).test(evaluator, datamodule=dm, verbose=False)
    return time.perf_counter() - start


def measure_eval(rounds: int, tmp: Path) -> float:
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("eval", overrides=[*COMMON, f"paths.cache_dir={tmp / 'cache_eval'}"])
    dm = instantiate(cfg.dataset)
    dm.prepare_data()
    dm.cache_dir = None  # both sides load from the NIfTI files through the same transforms
    net = instantiate(cfg.model.net).eval()
    load_weights(net, CHECKPOINT)
    plain_t, mqb_t = [], []
    plain_loop(net, dm, dm.roi_size, cfg.eval.sw_batch_size, cfg.eval.overlap)  # warm-up
    for _ in range(rounds):
        plain_t.append(plain_loop(net, dm, dm.roi_size, cfg.eval.sw_batch_size, cfg.eval.overlap))
        mqb_t.append(mqb_loop(cfg, net, dm, tmp / "run"))
    p, m = statistics.median(plain_t), statistics.median(mqb_t)
    print(
        f"FP32 eval of {len(dm.splits['test'])} volumes: plain MONAI loop {p:.2f}s, mqb.eval loop {m:.2f}s "
        f"({m / p:.3f}x) [median of {rounds}]",
        flush=True,
    )
    return m / p


def cli(args: list[str], cache: Path, out: Path) -> float:
    cmd = [sys.executable, "-m", "mqb.eval", *args, *COMMON, f"paths.cache_dir={cache}", f"paths.output_dir={out}"]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    return time.perf_counter() - start


def measure_sweep(tmp: Path) -> float:
    separate = 0.0
    for precision in ("w8a8", "w4a4"):
        for granularity in ("per_tensor", "per_channel", "adaptive"):
            separate += cli([f"precision={precision}", f"granularity={granularity}"], tmp / "c1", tmp / "o1")
    sweep = cli(["-m", *SWEEP], tmp / "c2", tmp / "o2")
    print(f"6 configs: one sweep {sweep:.1f}s vs 6 separate runs {separate:.1f}s ({sweep / separate:.3f}x)", flush=True)
    return sweep / separate


def ensure_checkpoint() -> None:
    """A trained UNet (the one `make demo` trains): untrained networks give noisy masks, unrepresentative timings."""
    if not CHECKPOINT.is_file():
        subprocess.run(
            [sys.executable, "-m", "mqb.train", "model=unet", "trainer.progress=false"], cwd=ROOT, check=True
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    ensure_checkpoint()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        eval_ratio = measure_eval(args.rounds, tmp)
        sweep_ratio = measure_sweep(tmp)
    print(f"eval_ratio={eval_ratio:.3f} sweep_ratio={sweep_ratio:.3f}")


if __name__ == "__main__":
    main()
