"""Output quantizers (ModelOpt's ``output_quantizer``): a quantizer on a module's *output*, so every reader of that
tensor reads the quantized value.

mqb quantizes layer inputs; a float op that reads the same tensor (the identity shortcut of a residual unit, say)
reads the float value. Deployment toolkits quantize the tensor once where it is produced (NNCF, TensorRT explicit
quantization): the residual Add then reads INT8 too, and the producing layer can write INT8. An output quantizer
reproduces that placement in simulation. It is attached by :class:`mqb.quant.methods.SharedInputRanges` with
``output_quantizers=True`` to a leaf module whose output feeds quantized layers, with their (shared) range, so the
readers' own input quantizers see values already on their grid and leave them unchanged
(``Q(Q(x)) = Q(x)`` for one scale). The module is the one that produced the value the readers read: after an
in-place activation (nnU-Net's ``InstanceNorm -> LeakyReLU(inplace=True) -> conv``) that is the activation, not the
norm that allocated the tensor; a quantizer on the norm would quantize the value before the activation rewrote it,
and the conv would quantize ``LeakyReLU(Q(x))``, which is off the grid for negative ``x``, a second time.

The quantizer is the submodule ``mqb_output_quantizer`` of the producer and runs from a forward hook; it is
exported as QDQ after the producer (:func:`mqb.deploy.export_onnx`), and removed by :func:`mqb.quant.dequantize`
together with any of its readers.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from mqb.quant.quantizer import TensorQuantizer

#: attribute (submodule) name of a module's output quantizer
OUTPUT_QUANTIZER = "mqb_output_quantizer"


def _quantize_output(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
    quantizer = module._modules.get(OUTPUT_QUANTIZER)
    if quantizer is None or not isinstance(output, torch.Tensor):
        return output
    return quantizer(output)


def attach_output_quantizer(module: nn.Module, quantizer: nn.Module, readers: Iterable[str]) -> None:
    """Quantize ``module``'s output with ``quantizer``; ``readers`` are the quantized layers that read it."""
    if OUTPUT_QUANTIZER in module._modules:
        raise ValueError(f"{type(module).__name__} already has an output quantizer")
    module.add_module(OUTPUT_QUANTIZER, quantizer)
    module.mqb_output_readers = list(readers)
    module.register_forward_hook(_quantize_output)


def detach_output_quantizer(module: nn.Module) -> None:
    """Remove the output quantizer and its hook (found by function, so copies of the model detach their own)."""
    for key, hook in list(module._forward_hooks.items()):
        if hook is _quantize_output:
            del module._forward_hooks[key]
    module._modules.pop(OUTPUT_QUANTIZER, None)
    module.__dict__.pop("mqb_output_readers", None)


def output_quantizers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) for every module of ``model`` with an output quantizer."""
    for name, module in model.named_modules():
        if OUTPUT_QUANTIZER in module._modules:
            yield name, module


def detach_for_readers(model: nn.Module, readers: Iterable[str]) -> list[str]:
    """Remove the output quantizers read by any of ``readers`` (a dequantized layer must read float again);
    returns the producers' names."""
    wanted = set(readers)
    removed = []
    for name, module in list(output_quantizers(model)):
        if wanted & set(module.mqb_output_readers):
            detach_output_quantizer(module)
            removed.append(name)
    return removed


def make_output_quantizer(reader_quantizer: TensorQuantizer, name: str) -> TensorQuantizer:
    """A calibrated copy of a reader's static per-tensor input quantizer, for the producer's output."""
    quantizer = TensorQuantizer(reader_quantizer.spec, reader_quantizer.axis, name, device=reader_quantizer.device)
    quantizer.load_ranges({"amax": reader_quantizer.amax.detach().clone().reshape(1)}, 1)
    return quantizer
