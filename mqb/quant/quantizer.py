"""``TensorQuantizer``: the module that fake-quantizes one tensor stream (a weight or an activation).

Modes:
* ``quantize``: apply the spec (static scales from calibration, or dynamic scales from each input);
* ``calibrate``: pass the tensor through unchanged and feed the observer (the float model is observed);
* ``off``: pass through (used to dequantize a layer without removing it).

Static ranges are buffers (``amax`` or ``lo``/``hi``), so they travel in the state dict and move with
``model.to(device)``. A quantizer also remembers the device it was last moved to (or created for), so ranges
set later (:meth:`TensorQuantizer.load_ranges` from a CPU range cache, a CPU state dict) land on the model's
device. Ranges stay float32 when the model is cast to float16/bfloat16: half-precision inputs are quantized in
float32 (:func:`mqb.quant.fake_quant.quantize_dequantize`), with the scales calibrated in float32.

``kernel`` (``auto`` / ``eager`` / ``compiled``, set on a whole model with :func:`mqb.quant.set_kernel`) says how
the quantize-dequantize runs (:mod:`mqb.quant.fake_quant`); every choice gives the same result to the bit.

Memory: a weight is stored once, as the float parameter. :class:`WeightQuantizer` computes the fake-quantized
weight at each forward (one fused kernel, or for static INT one multiply and three in-place passes over the weight)
and the layer frees it after use; only the weight's range and its scales are kept between forwards. So a
quantized model holds its float parameters plus a few scales, and ``dequantize`` gives back the float weights as
they are (no copy to restore from).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from mqb.quant.fake_quant import (
    check_kernel,
    choose_kernel,
    fake_quant_scaled,
    fake_quant_symmetric,
    quantize_dequantize,
    symmetric_scales,
)
from mqb.quant.granularity import normalize_axis
from mqb.quant.in_place import active_trace, input_refs, may_overwrite
from mqb.quant.live import tensor_version
from mqb.quant.observers import Observer, make_observer
from mqb.quant.spec import QuantSpec

MODES = ("quantize", "calibrate", "off")
_RANGE_BUFFERS = ("amax", "lo", "hi")
_REDUCED_FLOATS = (torch.float16, torch.bfloat16)


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


def module_device(module: nn.Module) -> torch.device | None:
    """The device of a module's first parameter or buffer (its submodules' included); ``None`` if it has none."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return None


class TensorQuantizer(nn.Module):
    """Fake-quantizes one tensor stream according to a :class:`QuantSpec`.

    Args:
        spec: the quantization spec.
        axis: channel axis (per-channel) or reduction axis (per-group); ignored otherwise.
        name: the owning layer and stream (for error messages), e.g. ``encoder.conv.input``.
        device: the device of the model the quantizer is attached to (``None``: unknown until the quantizer is
            moved with ``.to()`` or receives ranges); ranges loaded later are put there.
    """

    #: how the fake quantization runs: ``auto``, ``eager`` or ``compiled`` (:mod:`mqb.quant.fake_quant`)
    kernel: str = "auto"
    #: > 0: the input is a temporary nothing reads again (:mod:`mqb.quant.in_place`), overwritten by its fake
    #: quantization while it has at most this many Python references and storage users, during a forward of the
    #: root that planned it (``overwrite_root``)
    overwrite_refs: int = 0
    overwrite_uses: int = 0
    overwrite_root: Any = None

    def __init__(
        self, spec: QuantSpec, axis: int | None = None, name: str = "", *, device: torch.device | str | None = None
    ) -> None:
        super().__init__()
        self.spec = spec
        self.axis = axis
        self.name = name
        self.mode = "quantize"
        for key in _RANGE_BUFFERS:
            self.register_buffer(key, None)
        self._observer: Observer | None = None
        self._ndim = 0
        self._device: torch.device | None = torch.device(device) if device is not None else None

    # -- device ------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device | None:
        """Where the quantizer's ranges live (``None`` while unknown: never moved, no ranges yet)."""
        for key in _RANGE_BUFFERS:
            value = self._buffers.get(key)
            if value is not None:
                return value.device
        return self._device

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> TensorQuantizer:
        """``.to()`` / ``.cuda()`` / ``.half()`` ...: move the ranges (keeping them float32 under a cast to
        float16/bfloat16) and remember the target device for ranges that arrive later."""
        before = {key: self._buffers.get(key) for key in _RANGE_BUFFERS}
        super()._apply(fn, recurse)
        for key, old in before.items():
            new = self._buffers.get(key)
            if old is not None and new is not None and new.dtype in _REDUCED_FLOATS and old.dtype == torch.float32:
                self._buffers[key] = old.to(device=new.device)
        try:
            self._device = fn(torch.empty(0, device=self._device)).device
        except Exception:  # noqa: BLE001  (a conversion that does not apply to a float tensor: keep the device)
            pass
        self._on_apply()
        return self

    def _on_apply(self) -> None:
        """Hook for subclasses: state that is not a buffer and must not outlive a move (caches)."""

    def _place(self, value: torch.Tensor) -> torch.Tensor:
        """A range tensor on this quantizer's device (as is while the device is unknown), in float32 at least."""
        device = self.device
        dtype = value.dtype if value.dtype not in _REDUCED_FLOATS else torch.float32
        return value.to(device=device if device is not None else value.device, dtype=dtype)

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
            self._device = self.device
        self._observer = None
        self.mode = "quantize"

    def load_ranges(self, ranges: dict[str, torch.Tensor], ndim: int) -> None:
        """Set static ranges from per-group ``amax``/``lo``/``hi`` vectors (G,) for tensors of rank ``ndim``.

        The values are copied to the quantizer's device (e.g. a range cache loaded on the CPU for a CUDA model)."""
        for key, value in ranges.items():
            setattr(self, key, _broadcast_shape(self._place(value), self.spec.granularity, self.axis, ndim))
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
        refs = input_refs(x)
        trace = active_trace()
        if trace is not None:  # the forward that decides which inputs may be overwritten (mqb.quant.in_place)
            return trace.consume(self, x, refs, lambda: self._quantize(x, False))
        return self._quantize(x, self.overwrite_refs > 0 and may_overwrite(x, refs, self))

    def _quantize(self, x: torch.Tensor, in_place: bool) -> torch.Tensor:
        return quantize_dequantize(
            x, self.spec, axis=self.axis, amax=self.amax, lo=self.lo, hi=self.hi, kernel=self.kernel, in_place=in_place
        )

    def set_kernel(self, kernel: str) -> None:
        """``auto``, ``eager`` or ``compiled``: how this quantizer's fake quantization runs (same result)."""
        self.kernel = check_kernel(kernel)

    def extra_repr(self) -> str:
        axis = f", axis={self.axis}" if self.spec.granularity in ("per_channel", "per_group") else ""
        kernel = f", kernel={self.kernel}" if self.kernel != "auto" else ""
        return f"{self.spec.short()}{axis}, mode={self.mode}{kernel}"

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        for key in _RANGE_BUFFERS:
            if prefix + key in state_dict and getattr(self, key) is None:
                incoming = state_dict[prefix + key]
                # on this quantizer's device, like every other loaded buffer (the state dict may be on the CPU)
                device = self.device if self.device is not None else incoming.device
                setattr(self, key, torch.empty_like(incoming, device=device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class WeightQuantizer(TensorQuantizer):
    """A :class:`TensorQuantizer` for a parameter: ranges come from the weight itself and are recomputed when the
    parameter changes (in place or by reassignment), unless ``range_frozen``.

    The fake-quantized weight is not kept: it is computed at each forward and freed after the layer, so the weight
    is stored once (the float parameter). What is kept is the range and, for static symmetric specs, its scales
    ``(S, 1/S)`` (``_cache``, dropped on a move or a new range).
    """

    def __init__(
        self, spec: QuantSpec, axis: int | None = None, name: str = "", *, device: torch.device | str | None = None
    ) -> None:
        super().__init__(spec, axis, name, device=device)
        #: (data pointer, version) of the weight the range was taken from
        self._range_key: tuple[int, int] | None = None
        #: (range key, S, 1/S) of a static symmetric spec
        self._cache: tuple[tuple[int, int, int], torch.Tensor, torch.Tensor | None] | None = None
        #: keep the current range when the weight changes (GPTQ writes weights onto a grid it chose)
        self.range_frozen = False

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.mode != "quantize":
            return w
        key = (w.data_ptr(), w._version)
        if self.is_static and (not self.is_calibrated or (self._range_key != key and not self.range_frozen)):
            self.set_range(w)
        self._range_key = key
        if self.is_static and self.spec.symmetric and choose_kernel(self.kernel, self.spec, w) == "eager":
            # what quantize_dequantize computes, with the scales of this range computed once
            scale, reciprocal = self._scales()
            dtype = w.dtype
            wf = w.float() if dtype in _REDUCED_FLOATS else w
            return fake_quant_scaled(wf, self.spec, scale, reciprocal).to(dtype)
        return super().forward(w)

    def _scales(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        amax = self.amax
        assert amax is not None
        range_key = (id(amax), amax.data_ptr(), tensor_version(amax))
        if self._cache is None or self._cache[0] != range_key:
            self._cache = (range_key, *symmetric_scales(amax, self.spec))
        return self._cache[1], self._cache[2]

    def begin_calibration(self) -> None:
        """Weights are not observed during activation calibration; they pass through in float."""
        self.mode = "calibrate"

    def end_calibration(self) -> None:
        self.mode = "quantize"

    def clear_cache(self) -> None:
        """Forget the range's source and scales: the next forward takes the range from the weight again (unless
        ``range_frozen``)."""
        self._cache, self._range_key = None, None

    def _on_apply(self) -> None:
        # the scales are not buffers: drop them rather than keep them on the old device / in the old dtype
        self.clear_cache()

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        self._cache = None  # the range buffers are overwritten in place
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
