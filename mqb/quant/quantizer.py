"""``TensorQuantizer``: the module that fake-quantizes one tensor stream (a weight or an activation).

Modes:
* ``quantize``: apply the spec (static scales from calibration, or dynamic scales from each input);
* ``calibrate``: pass the tensor through unchanged and feed the observer (the float model is observed);
* ``off``: pass through (used to dequantize a layer without removing it).

Static ranges are buffers (``amax`` or ``lo``/``hi``), so they travel in the state dict.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mqb.quant.fake_quant import fake_quant_symmetric, quantize_dequantize
from mqb.quant.granularity import normalize_axis
from mqb.quant.observers import Observer, make_observer
from mqb.quant.spec import QuantSpec

MODES = ("quantize", "calibrate", "off")
_RANGE_BUFFERS = ("amax", "lo", "hi")


def _rows(x: torch.Tensor, granularity: str, axis: int | None) -> torch.Tensor:
    """Reshape ``x`` to (groups, elements) for a static per-tensor / per-channel observer."""
    if granularity == "per_tensor":
        return x.reshape(1, -1)
    assert axis is not None
    return x.movedim(axis, 0).reshape(x.shape[axis], -1)


def _broadcast_shape(values: torch.Tensor, granularity: str, axis: int | None, ndim: int) -> torch.Tensor:
    """Per-group values (G,) shaped to broadcast against tensors of rank >= ``ndim``.

    Per-channel scales get the shape (C, 1, ..., 1) with as many trailing ones as dims after the channel axis,
    so the same buffer broadcasts against a batch of any size (or none, for Linear inputs).
    """
    if granularity == "per_tensor":
        return values.reshape(())
    assert axis is not None
    trailing = ndim - normalize_axis(axis, ndim) - 1
    return values.reshape((-1,) + (1,) * trailing)


class TensorQuantizer(nn.Module):
    """Fake-quantizes one tensor stream according to a :class:`QuantSpec`.

    Args:
        spec: the quantization spec.
        axis: channel axis (per-channel) or reduction axis (per-group); ignored otherwise.
        name: the owning layer and stream (for error messages), e.g. ``encoder.conv.input``.
    """

    def __init__(self, spec: QuantSpec, axis: int | None = None, name: str = "") -> None:
        super().__init__()
        self.spec = spec
        self.axis = axis
        self.name = name
        self.mode = "quantize"
        for key in _RANGE_BUFFERS:
            self.register_buffer(key, None)
        self._observer: Observer | None = None
        self._ndim = 0

    # -- calibration -------------------------------------------------------------------------------------
    @property
    def is_static(self) -> bool:
        return not self.spec.dynamic

    @property
    def is_calibrated(self) -> bool:
        return (self.amax if self.spec.symmetric else self.lo) is not None

    def _element_quant(self, values: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
        return fake_quant_symmetric(values, amax, self.spec)

    def begin_calibration(self) -> None:
        """Start (or restart) collecting statistics; static quantizers only, others just pass through."""
        self.mode = "calibrate"
        self._observer = make_observer(self.spec, self._element_quant) if self.is_static else None

    def observe(self, x: torch.Tensor) -> None:
        assert self._observer is not None
        self._observer.update(_rows(x, self.spec.granularity, self.axis))
        self._ndim = x.ndim

    def end_calibration(self) -> None:
        """Freeze the observed ranges into buffers and go back to quantizing."""
        if self._observer is not None:
            try:
                ranges = self._observer.compute()
            except RuntimeError as err:
                raise RuntimeError(f"{self.name or 'quantizer'}: {err}") from None
            for key, value in ranges.items():
                if value is not None:
                    setattr(self, key, _broadcast_shape(value, self.spec.granularity, self.axis, self._ndim))
        self._observer = None
        self.mode = "quantize"

    def load_ranges(self, ranges: dict[str, torch.Tensor], ndim: int) -> None:
        """Set static ranges from per-group ``amax``/``lo``/``hi`` vectors (G,) for tensors of rank ``ndim``."""
        for key, value in ranges.items():
            setattr(self, key, _broadcast_shape(value, self.spec.granularity, self.axis, ndim))
        self._observer = None
        self.mode = "quantize"

    def set_range(self, x: torch.Tensor) -> None:
        """Set the static range directly from one tensor (used for weights)."""
        mode = self.mode
        TensorQuantizer.begin_calibration(self)
        if self._observer is not None:
            self.observe(x)
        TensorQuantizer.end_calibration(self)
        self.mode = mode

    # -- forward -----------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "off":
            return x
        if self.mode == "calibrate":
            if self._observer is not None:
                self.observe(x)
            return x
        if self.is_static and not self.is_calibrated:
            raise RuntimeError(
                f"{self.name or 'quantizer'} uses static {self.spec.granularity} scales but was never calibrated: "
                "call mqb.quant.calibrate(model, batches) first, or use a dynamic spec"
            )
        return quantize_dequantize(x, self.spec, axis=self.axis, amax=self.amax, lo=self.lo, hi=self.hi)

    def extra_repr(self) -> str:
        axis = f", axis={self.axis}" if self.spec.granularity in ("per_channel", "per_group") else ""
        return f"{self.spec.short()}{axis}, mode={self.mode}"

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        for key in _RANGE_BUFFERS:
            if prefix + key in state_dict and getattr(self, key) is None:
                setattr(self, key, torch.empty_like(state_dict[prefix + key]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class WeightQuantizer(TensorQuantizer):
    """A :class:`TensorQuantizer` for a parameter: ranges come from the weight itself, and the fake-quantized
    weight is cached until the parameter changes (in place or by reassignment), so evaluation pays for weight
    quantization once, not per forward.
    """

    def __init__(self, spec: QuantSpec, axis: int | None = None, name: str = "") -> None:
        super().__init__(spec, axis, name)
        self._cache_key: tuple[int, int] | None = None
        self._cache: torch.Tensor | None = None
        #: keep the current range when the weight changes (GPTQ writes weights onto a grid it chose)
        self.range_frozen = False

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.mode != "quantize":
            return w
        cacheable = not (torch.is_grad_enabled() and w.requires_grad)
        key = (w.data_ptr(), w._version)
        if cacheable and self._cache is not None and self._cache_key == key:
            return self._cache
        if self.is_static and (not self.is_calibrated or (self._cache_key != key and not self.range_frozen)):
            self.set_range(w)
        out = super().forward(w)
        if cacheable:
            self._cache, self._cache_key = out.detach(), key
        return out

    def begin_calibration(self) -> None:
        """Weights are not observed during activation calibration; they pass through in float."""
        self.mode = "calibrate"

    def end_calibration(self) -> None:
        self.mode = "quantize"

    def clear_cache(self) -> None:
        self._cache, self._cache_key = None, None
