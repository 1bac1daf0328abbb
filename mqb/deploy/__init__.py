"""mqb.deploy: real low-bit deployment of calibrated mqb models, and hardware profiling.

Export a calibrated model to ONNX with INT8 QuantizeLinear / DequantizeLinear nodes carrying mqb's own scales
(:func:`export_onnx`), run it with ONNX Runtime or OpenVINO on the CPU (TensorRT where a GPU exists), report
which layers the runtime actually executes in INT8 (:mod:`mqb.deploy.layer_precision`), check that the deployed
prediction agrees with mqb's fake-quantized one (:mod:`mqb.deploy.agreement`) and profile latency, throughput,
memory and size (:mod:`mqb.deploy.profile`). CLI: ``python -m mqb.deploy export|profile|compare ...``.

The runtime packages are optional (``pip install -e ".[deploy]"``); they are imported when a runtime is built.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: public name -> submodule; loaded on first use, so ``python -m mqb.deploy --help`` needs neither torch nor MONAI
_EXPORTS = {
    "logit_agreement": "agreement", "prediction_dice": "agreement", "ExportResult": "export", "LayerExport": "export",
    "export_onnx": "export", "layer_export_mode": "export", "OpenVINORuntime": "runtimes", "OrtRuntime": "runtimes",
    "Runtime": "runtimes", "RuntimeUnavailable": "runtimes", "TensorRTRuntime": "runtimes",
    "TorchRuntime": "runtimes", "tensorrt_available": "runtimes",
}  # fmt: skip

if TYPE_CHECKING:
    from mqb.deploy.agreement import logit_agreement, prediction_dice
    from mqb.deploy.export import ExportResult, LayerExport, export_onnx, layer_export_mode
    from mqb.deploy.runtimes import (
        OpenVINORuntime,
        OrtRuntime,
        Runtime,
        RuntimeUnavailable,
        TensorRTRuntime,
        TorchRuntime,
        tensorrt_available,
    )


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mqb.deploy' has no attribute {name!r}")
    return getattr(importlib.import_module(f"mqb.deploy.{_EXPORTS[name]}"), name)


__all__ = [
    "ExportResult",
    "LayerExport",
    "OpenVINORuntime",
    "OrtRuntime",
    "Runtime",
    "RuntimeUnavailable",
    "TensorRTRuntime",
    "TorchRuntime",
    "export_onnx",
    "layer_export_mode",
    "logit_agreement",
    "prediction_dice",
    "tensorrt_available",
]
assert sorted(__all__) == sorted(_EXPORTS)
