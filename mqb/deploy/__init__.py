"""mqb.deploy: real low-bit deployment of calibrated mqb models, and hardware profiling.

Export a calibrated model to ONNX with INT8 QuantizeLinear / DequantizeLinear nodes carrying mqb's own scales
(:func:`export_onnx`), run it with ONNX Runtime or OpenVINO on the CPU (TensorRT where a GPU exists), report
which layers the runtime actually executes in INT8 (:mod:`mqb.deploy.report`), check that the deployed
prediction agrees with mqb's fake-quantized one (:mod:`mqb.deploy.agreement`) and profile latency, throughput,
memory and size (:mod:`mqb.deploy.profile`). CLI: ``python -m mqb.deploy export|profile|compare ...``.

The runtime packages are optional (``pip install -e ".[deploy]"``); they are imported when a runtime is built.
"""

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
