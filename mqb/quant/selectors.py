"""Layer selectors: which layers a recipe quantizes, excludes or overrides, and which get dequantized.

A selector is a string:

* a kind: ``conv``, ``conv_transpose``, ``linear``, ``attention``, ``norm`` (the input of InstanceNorm /
  GroupNorm; never in the default ``include``);
* a kernel shape: ``conv3x3x3``, ``conv1x3x3``, ``conv1x1x1``, ``conv_transpose2x2x2`` (2D: ``conv3x3``);
* a property: ``depthwise``, ``pointwise`` (1x1x1 channel-mixing conv), ``grouped``;
* a class: ``type:Conv3d``;
* a layer name or glob over qualified names: ``decoder.*``, ``encoder1.layer.conv1`` (``name:`` prefix
  optional, required only for a name without ``.``/``*``/``?``/``[``), or ``all`` / ``*``.

A leading ``!`` negates: ``!depthwise``.
"""

from __future__ import annotations

import fnmatch
import re

from mqb.quant.layers import LayerInfo

KIND_WORDS = ("conv", "conv_transpose", "linear", "attention", "norm", "depthwise", "pointwise", "grouped")
_KERNEL = re.compile(r"^(conv|conv_transpose)\d+(x\d+)*$")
_GLOB_CHARS = set("*?[.")

VALID_SELECTORS = (
    "kinds " + ", ".join(KIND_WORDS) + "; kernel shapes like conv3x3x3 / conv1x1x1; type:<ClassName>; "
    "'all'; layer names or globs like 'decoder.*' (or name:<name>); prefix '!' to negate"
)


def validate_selector(selector: str) -> None:
    """Raise ``ValueError`` for a string that is not a selector."""
    body = selector[1:] if selector.startswith("!") else selector
    if not body:
        raise ValueError(f"empty layer selector {selector!r}; valid: {VALID_SELECTORS}")
    if body in KIND_WORDS or body == "all" or _KERNEL.match(body) or body.startswith(("type:", "name:")):
        return
    if _GLOB_CHARS & set(body):
        return
    raise ValueError(f"unknown layer selector {selector!r}; valid: {VALID_SELECTORS}")


def matches(selector: str, info: LayerInfo) -> bool:
    """Whether ``info`` answers to ``selector``."""
    validate_selector(selector)
    if selector.startswith("!"):
        return not matches(selector[1:], info)
    if selector == "all":
        return True
    if selector.startswith("name:"):
        return fnmatch.fnmatchcase(info.name, selector[5:])
    if selector in info.tags:
        return True
    if selector in KIND_WORDS or _KERNEL.match(selector) or selector.startswith("type:"):
        return False
    return fnmatch.fnmatchcase(info.name, selector)


def matches_any(selectors: tuple[str, ...] | list[str], info: LayerInfo) -> bool:
    return any(matches(s, info) for s in selectors)
