"""What this CPU's INT8 dot product computes, and how mqb keeps a CPU INT8 deployment equal to its fake quantization.

x86 INT8 convolutions multiply unsigned 8-bit activations by signed 8-bit weights (oneDNN, which OpenVINO's CPU
plugin uses, and ONNX Runtime's MLAS shift mqb's signed activations by 128 to ``u8``). How the products are summed
depends on the instruction set:

* **AMX** (``amx_int8``) and **VNNI** (``avx512_vnni``, ``avx_vnni``): ``vpdpbusd`` adds four ``u8 x s8`` products
  straight into a 32-bit accumulator: exact.
* **AVX2 / AVX-512 without VNNI**: ``vpmaddubsw`` first adds *pairs* of products into a **saturating int16**::

      a_1 w_1 + a_2 w_2  in  [-2 * 255 * 128, 2 * 255 * 127] = [-65280, 64770],   int16: [-32768, 32767]

  so a pair of large activations times large weights is clipped, and the INT8 network no longer computes what
  mqb's fake quantization computes (on an AVX2-only EPYC OpenVINO agreed with mqb's W8A8 nnU-Net on argmax Dice
  0.29-0.32). This is the overflow NNCF's ``overflow_fix`` and ONNX Runtime's ``reduce_range`` exist for.

The **overflow fix** stores weights on a 7-bit grid: ``|q_w| <= 63`` gives ``2 * 255 * 64 = 32640 <= 32767``, so
no pair can saturate and the runtime is exact again. The weights are still INT8 tensors (same file size and
kernels); only their grid is coarser (``S_w = amax / 63``, :class:`mqb.quant.spec.QuantSpec` ``bits=7``). mqb
fake-quantizes with the same 7-bit grid, so ``mqb.deploy compare`` checks the runtime against exactly what it runs.

``ONEDNN_MAX_CPU_ISA`` (and the older ``DNNL_MAX_CPU_ISA``) caps the ISA oneDNN may use; OpenVINO honours it. It is
read here, so a VNNI machine capped with ``ONEDNN_MAX_CPU_ISA=AVX2`` is treated as the AVX2-only machine it then
behaves like (the tests use this to check the AVX2 path on every machine).
"""

from __future__ import annotations

import dataclasses
import os
import platform
from typing import Any

#: the environment variables with which oneDNN (and so OpenVINO's CPU plugin) caps its instruction set
ISA_CAP_ENV = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")
#: ``deploy.overflow_fix`` values: ``auto`` applies the fix where the INT8 dot product saturates
OVERFLOW_FIX = ("auto", "enable", "disable")
#: weight bits of the overflow fix: |q| <= 2^(7-1) - 1 = 63 keeps a u8 x s8 pair sum within int16
FIXED_WEIGHT_BITS = 7

# INT8 dot-product classes, from the best: a cap or the hardware yields the lower of the two
_RANK = {"amx": 3, "vnni": 2, "saturating": 1, "other": 0}


@dataclasses.dataclass(frozen=True)
class Int8Isa:
    """The INT8 dot product of this machine (as the runtimes will see it).

    Attributes:
        dot: ``amx``, ``vnni`` (exact 32-bit accumulation), ``saturating`` (x86 without VNNI: int16 pair sums)
            or ``other`` (not x86: no known saturation).
        flags: the relevant ``/proc/cpuinfo`` flags present.
        cap: the ``ONEDNN_MAX_CPU_ISA`` / ``DNNL_MAX_CPU_ISA`` value in force, or ``None``.
        hardware: what the hardware alone offers (before the cap).
    """

    dot: str
    flags: tuple[str, ...]
    cap: str | None
    hardware: str

    @property
    def saturates(self) -> bool:
        """True where ``u8 x s8`` pairs are summed into saturating int16 (the overflow fix is needed)."""
        return self.dot == "saturating"

    def describe(self) -> str:
        what = {
            "amx": "AMX INT8 tiles (exact int32 accumulation)",
            "vnni": "VNNI vpdpbusd (exact int32 accumulation)",
            "saturating": "no VNNI: u8 x s8 pairs are summed into saturating int16 (vpmaddubsw)",
            "other": "not x86: no known INT8 saturation",
        }[self.dot]
        capped = f", capped by {self.cap}" if self.cap else ""
        return f"{what}{capped}"

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "saturates": self.saturates, "description": self.describe()}


def _hardware_dot(flags: set[str], machine: str) -> str:
    if machine.lower() not in ("x86_64", "amd64", "i686", "x86"):
        return "other"
    if "amx_int8" in flags:
        return "amx"
    if "avx512_vnni" in flags or "avx_vnni" in flags:
        return "vnni"
    return "saturating"


def _cap_dot(cap: str) -> str | None:
    """The dot-product class a oneDNN ISA cap allows (``None``: no limit), e.g. ``AVX2`` -> saturating."""
    name = cap.strip().upper()
    if not name or name == "ALL":
        return None
    if "AMX" in name:
        return "amx"
    if "VNNI" in name or "BF16" in name or "FP16" in name:  # avx512_core_bf16/fp16 imply avx512_core_vnni
        return "vnni"
    return "saturating"  # SSE41, AVX, AVX2, AVX512_CORE: no VNNI


def int8_isa(flags: set[str] | None = None, env: dict[str, str] | None = None, machine: str | None = None) -> Int8Isa:
    """This machine's INT8 dot product (``flags`` / ``env`` / ``machine`` default to this machine's; tests pass
    their own)."""
    from mqb.devices import cpu_flags

    flags = cpu_flags() if flags is None else set(flags)
    env = dict(os.environ) if env is None else env
    hardware = _hardware_dot(flags, machine or platform.machine())
    cap = next((env[k] for k in ISA_CAP_ENV if env.get(k)), None)
    dot = hardware
    capped = _cap_dot(cap) if cap else None
    if capped is not None and hardware != "other" and _RANK[capped] < _RANK[hardware]:
        dot = capped
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
    return Int8Isa(dot=dot, flags=tuple(f for f in wanted if f in flags), cap=cap, hardware=hardware)


def overflow_fix_active(setting: str, isa: Int8Isa | None = None) -> bool:
    """Whether ``deploy.overflow_fix=<setting>`` stores weights on the 7-bit grid on this machine."""
    if setting not in OVERFLOW_FIX:
        raise ValueError(f"deploy.overflow_fix={setting!r} is invalid; valid: {', '.join(OVERFLOW_FIX)}")
    if setting == "auto":
        return (isa or int8_isa()).saturates
    return setting == "enable"


def recipe_for_cpu(recipe: Any, setting: str = "auto", isa: Int8Isa | None = None) -> tuple[Any, bool]:
    """``(recipe, applied)``: ``recipe`` with the overflow fix where ``deploy.overflow_fix=<setting>`` applies it on
    this machine (:func:`overflow_fix_active`), else unchanged."""
    applied = overflow_fix_active(setting, isa)
    return (overflow_fixed(recipe) if applied else recipe), applied


def fix_weight_spec(spec: Any) -> Any:
    """An INT8 integer weight spec on the 7-bit grid; any other spec unchanged."""
    if spec is not None and spec.format == "int" and spec.bits == 8:
        return spec.replace(bits=FIXED_WEIGHT_BITS)
    return spec


def overflow_fixed(recipe: Any) -> Any:
    """``recipe`` with every INT8 weight (the recipe's and its rules') on the 7-bit grid."""
    from mqb.quant.recipe import LayerRule
    from mqb.quant.spec import Precision

    rules = []
    for rule in recipe.rules:
        p = rule.precision
        if isinstance(p, Precision):
            p = dataclasses.replace(p, name=f"{p.name}-w7", weight=fix_weight_spec(p.weight))
        rules.append(LayerRule(rule.select, precision=p, scheme=rule.scheme))
    return dataclasses.replace(recipe, weight=fix_weight_spec(recipe.weight), rules=tuple(rules))
