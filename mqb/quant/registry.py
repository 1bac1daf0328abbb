"""The quant-module registry: float module class -> its fake-quantized twin (ModelOpt's ``QuantModuleRegistry``).

Every module mqb quantizes (convolutions, linear layers, norm inputs, attention blocks) is found, described,
swapped in and swapped out through this one table, so :mod:`mqb.quant.api` has no per-kind branches. A twin is a
subclass of both :class:`QuantModule` and the float class; ``quantize`` changes the module's ``__class__`` in place
(parameters untouched) and ``dequantize`` changes it back.

Registering a model's own block (an attention block with functional matmuls, a custom conv)::

    @register_quant_module(MyAttention)          # or register_quant_module(MyAttention, QuantMyAttention)
    class QuantMyAttention(QuantAttention, MyAttention):
        float_class = MyAttention

Matching is by exact type, so subclasses with their own ``forward`` are never silently replaced.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

from torch import nn

if TYPE_CHECKING:
    from mqb.quant.layers import LayerInfo
    from mqb.quant.spec import QuantSpec


class QuantModule(nn.Module):
    """What every fake-quantized twin provides (mixed in before the float class).

    Class attributes: ``float_class`` (restored by ``dequantize``), ``kind`` (a :data:`mqb.quant.layers.LAYER_KINDS`
    word), ``takes_input_ranges`` (its static input range can be set from per-channel float statistics,
    :func:`mqb.quant.apply_input_ranges`).
    """

    float_class: ClassVar[type[nn.Module]]
    kind: ClassVar[str]
    takes_input_ranges: ClassVar[bool] = False
    mqb_info: LayerInfo

    @classmethod
    def describe_float(cls, name: str, module: nn.Module) -> LayerInfo:
        """The :class:`~mqb.quant.layers.LayerInfo` of a float ``module`` of ``float_class``."""
        raise NotImplementedError

    def attach_quantizers(self, weight: QuantSpec | None, activation: QuantSpec | None) -> None:
        raise NotImplementedError

    def detach_quantizers(self) -> None:
        raise NotImplementedError

    @property
    def weight_spec(self) -> QuantSpec | None:
        return None

    @property
    def activation_spec(self) -> QuantSpec | None:
        return None

    def set_calibrating(self, flag: bool) -> None:
        """Calibration starts (``True``) or ends; quantizers made during it observe instead of quantizing."""

    def set_kernel(self, kernel: str) -> bool:
        """Remember ``kernel`` for quantizers the module makes later; ``True`` if it keeps such a setting."""
        return False


#: Float module class -> quantized twin.
QUANT_MODULES: dict[type[nn.Module], type[QuantModule]] = {}


def register_quant_module(
    float_cls: type[nn.Module], quant_cls: type[QuantModule] | None = None
) -> type[QuantModule] | Callable[[type[QuantModule]], type[QuantModule]]:
    """Register ``quant_cls`` as the twin of ``float_cls``; without ``quant_cls``, a class decorator doing so.

    The twin's ``float_class`` is set to ``float_cls`` when it has none of its own.
    """

    def register(cls: type[QuantModule]) -> type[QuantModule]:
        if not (isinstance(cls, type) and issubclass(cls, QuantModule) and issubclass(cls, float_cls)):
            raise TypeError(
                f"register_quant_module: {getattr(cls, '__name__', cls)!r} must subclass mqb.quant.QuantModule "
                f"(QuantLayer, QuantAttention) and {float_cls.__name__}"
            )
        if "float_class" not in vars(cls):
            cls.float_class = float_cls
        QUANT_MODULES[float_cls] = cls
        return cls

    return register if quant_cls is None else register(quant_cls)


def quant_class(module: nn.Module) -> type[QuantModule] | None:
    """The registered twin of ``module``'s exact class, or ``None``."""
    return QUANT_MODULES.get(type(module))


def describe(name: str, module: nn.Module) -> LayerInfo | None:
    """A :class:`~mqb.quant.layers.LayerInfo` for any float module with a registered twin, else ``None``."""
    cls = quant_class(module)
    return None if cls is None else cls.describe_float(name, module)


def swap_in(module: nn.Module, info: LayerInfo, weight: QuantSpec | None, activation: QuantSpec | None) -> None:
    """Turn a float module into its quantized twin in place (restored if its quantizers cannot be attached)."""
    float_cls = type(module)
    module.__class__ = QUANT_MODULES[float_cls]
    module.mqb_info = info
    try:
        module.attach_quantizers(weight, activation)  # type: ignore[operator]
    except Exception:
        del module.mqb_info
        module.__class__ = float_cls
        raise


def swap_out(module: QuantModule) -> None:
    """Restore the float class of a quantized module in place (parameters untouched)."""
    module.detach_quantizers()
    del module.mqb_info
    module.__class__ = module.float_class
