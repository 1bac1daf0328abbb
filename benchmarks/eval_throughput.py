"""Evaluation cost vs forward cost of one quantized config, in one process (issue #14 item 1).

* ``config``: one mqb evaluation end to end: the config composed with Hydra's compose API, ``evaluate(cfg)``
  (:mod:`mqb.pipeline`; model build, data module, FP32 baseline, quantization and calibration, Lightning test
  loop, DSC / NSD / HD95, the record with its statistics) and the record written. Timed in the state every
  config of a sweep after the first one is in: the FP32 baseline, the preprocessed volumes and the min-max
  calibration ranges are cached (the first, cold run fills those caches and is reported too).
* ``forwards``: the bare MONAI ``sliding_window_inference`` of the same test volumes, preloaded on the device,
  through the same quantized network with the evaluator's window, overlap, sw batch size, blending mode and
  compute dtype; plus, where the timed config did calibrate (not from cached ranges), the calibration volumes'
  forwards.

``eval_vs_forward``: the median over ``--rounds`` of config / forwards, each config paired with the forwards
run right after it (a shared machine's load drifts between rounds); ``configs_per_hour``: 3600 / the median
config. The breakdown (what the evaluator spent in forwards, metrics and data loading; calibration; the rest:
model build, Lightning set-up, record) says where the difference goes. ``--profile FILE`` writes a cProfile of
one timed config.

    python benchmarks/eval_throughput.py                              # experiment=demo, W8A8 per-channel
    python benchmarks/eval_throughput.py --device cuda model=unetr precision=w4a4 granularity=adaptive

Last line: ``eval_vs_forward=<x> configs_per_hour=<n> device=<cpu|cuda>``.
"""

from __future__ import annotations

import argparse
import cProfile
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's mqb and its Hydra plugins (hydra_plugins/), installed or not

try:  # mqb >= the pipeline split
    import mqb.pipeline as pipeline
    from mqb.config import compose_eval

    EVALUATOR_FACTORY = "build_evaluator"
except ImportError:  # the layout before it: mqb.eval.evaluate and mqb.eval._evaluator
    import mqb.eval as pipeline  # type: ignore[no-redef]
    from mqb.sensitivity import compose_eval  # type: ignore[no-redef]

    EVALUATOR_FACTORY = "_evaluator"
from mqb.results import write_json_atomic  # noqa: E402  (after the path set-up)

DEFAULT = ["experiment=demo", "precision=w8a8", "granularity=per_channel"]


class Captured:
    """The evaluators (and data module) ``evaluate`` builds: the last one holds the quantized network."""

    def __init__(self) -> None:
        self.evaluators: list[Any] = []
        self.dm: Any = None
        self._original = getattr(pipeline, EVALUATOR_FACTORY)

    def __enter__(self) -> Captured:
        def build(cfg: Any, net: Any, dm: Any, dtype: str, **kwargs: Any) -> Any:
            evaluator = self._original(cfg, net, dm, dtype, **kwargs)
            self.evaluators.append(evaluator)
            self.dm = dm
            return evaluator

        setattr(pipeline, EVALUATOR_FACTORY, build)
        return self

    def __exit__(self, *exc: Any) -> None:
        setattr(pipeline, EVALUATOR_FACTORY, self._original)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_config(cfg: Any, out: Path, profile: str | None = None) -> tuple[float, dict[str, Any], Captured]:
    """One config end to end (record written); wall seconds, the record, the captured evaluators."""
    profiler = cProfile.Profile() if profile else None
    with Captured() as captured:
        start = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        record = pipeline.evaluate(cfg)
        write_json_atomic(out / f"{record['id']}.json", record)
        if profiler is not None:
            profiler.disable()
        seconds = time.perf_counter() - start
    if profiler is not None:
        profiler.dump_stats(profile)
    return seconds, record, captured


def load_volumes(loader: Any, device: torch.device) -> list[torch.Tensor]:
    return [batch["image"].to(device) for batch in loader]


def bare_forwards(net: torch.nn.Module, volumes: list[torch.Tensor], evaluator: Any, device: torch.device) -> float:
    """Seconds of the plain MONAI sliding-window forwards of ``volumes`` with ``evaluator``'s settings."""
    net = net.to(device).eval()
    sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        for image in volumes:
            evaluator.sliding_window(image, net)  # MONAI's sliding_window_inference with the evaluator's settings
    sync(device)
    return time.perf_counter() - start


def calibrated(record: dict[str, Any]) -> bool:
    """Whether the config ran calibration forwards (a quantized config whose ranges were not cached)."""
    return record["data"].get("calibration_cached") is False


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("eval_throughput: --device cuda, but CUDA is not available")
    return torch.device(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help=f"mqb.eval overrides (default: {' '.join(DEFAULT)})")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--rounds", type=int, default=3, help="timed configs (and forward passes), interleaved")
    parser.add_argument("--profile", help="write a cProfile of the first timed config to this file")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's); 1 is steadier on a "
                        "loaded machine, where threads wait for each other")  # fmt: skip
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    overrides = [*(args.overrides or DEFAULT), "logger=none", "trainer.progress=false",
                 f"trainer.accelerator={accelerator}", "trainer.devices=1"]  # fmt: skip
    checkpoints = str(compose_eval(overrides).paths.checkpoints)  # trained checkpoints stay where they are

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        cfg = compose_eval([*overrides, f"paths.output_dir={out / 'out'}", f"paths.cache_dir={out / 'cache'}",
                            f"paths.checkpoints={checkpoints}"])  # fmt: skip
        cold, record, captured = run_config(cfg, out)  # fills the caches: FP32 baseline, volumes, ranges
        if captured.dm is None:
            raise SystemExit("eval_throughput: the config ran no evaluation (a float32 config is its own baseline)")
        dm = captured.dm
        tests = load_volumes(dm.test_dataloader(), device)
        calib = load_volumes(dm.calib_dataloader(cfg.calibration.num_volumes, cfg.calibration.seed), device)
        float_net, _ = pipeline.load_model(cfg)
        quantized = captured.evaluators[-1]
        cold_forwards = sum(
            [
                bare_forwards(float_net, tests, quantized, device) if not record["baseline"]["cached"] else 0.0,
                bare_forwards(float_net, calib, quantized, device) if calibrated(record) else 0.0,
                bare_forwards(quantized.net, tests, quantized, device),
            ]
        )
        print(f"{record['model']} {record['precision']} {record['granularity']} {record['method']} on "
              f"{record['dataset']} ({len(tests)} test, {len(calib)} calibration volumes), {device.type}; cold "
              f"config (empty caches) {cold:.2f}s vs its forwards {cold_forwards:.2f}s "
              f"({cold / cold_forwards:.2f}x)", flush=True)  # fmt: skip

        configs, forwards = [], []
        for i in range(args.rounds):
            seconds, record, captured = run_config(cfg, out, args.profile if i == 0 else None)
            evaluator = captured.evaluators[-1]
            split = {k: getattr(evaluator, f"{k}_seconds", float("nan")) for k in ("forward", "metric", "data")}
            needed = bare_forwards(evaluator.net, tests, evaluator, device)
            if calibrated(record):
                needed += bare_forwards(float_net, calib, evaluator, device)
            configs.append(seconds)
            forwards.append(needed)
            t = record["timings"]
            known = sum(split.values()) + t.get("calibration_seconds", 0.0)
            print(f"round {i + 1}: config {seconds:.2f}s = evaluator forwards {split['forward']:.2f}s + "
                  f"metrics {split['metric']:.2f}s + data {split['data']:.2f}s + calibration "
                  f"{t.get('calibration_seconds', 0.0):.2f}s (cached ranges: {record['data']['calibration_cached']})"
                  f" + rest {seconds - known:.2f}s; bare forwards {needed:.2f}s ({seconds / needed:.3f}x)",
                  flush=True)  # fmt: skip
    ratio = statistics.median(c / f for c, f in zip(configs, forwards, strict=True))  # paired: the load drifts
    print(f"eval_vs_forward={ratio:.3f} configs_per_hour={3600 / statistics.median(configs):.0f} device={device.type}")


if __name__ == "__main__":
    main()
