"""Records about the live tensors of a traced forward (:mod:`mqb.quant.in_place`,
:mod:`mqb.quant.methods.shared_ranges`, the weight quantizer's range key).

Tensors are keyed by ``id`` with a weak reference that checks the entry is still that tensor: an id is reused once a
tensor is freed, and ``WeakKeyDictionary`` would compare tensors with ``==``, which is element-wise. The records keep
nothing alive.
"""

from __future__ import annotations

import weakref
from typing import Generic, TypeVar

import torch

V = TypeVar("V")


def tensor_version(t: torch.Tensor) -> int:
    """How often ``t`` was written in place (``Tensor._version``); -1 for an inference tensor, which keeps no count."""
    try:
        return t._version
    except RuntimeError:
        return -1


class LiveTensors(Generic[V]):
    """A value per live tensor object."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[weakref.ref, V]] = {}

    def get(self, t: torch.Tensor) -> V | None:
        """The value recorded for ``t`` itself, or ``None`` (never recorded, or recorded for a freed tensor)."""
        entry = self._entries.get(id(t))
        return entry[1] if entry is not None and entry[0]() is t else None

    def set(self, t: torch.Tensor, value: V) -> V:
        self._entries[id(t)] = (weakref.ref(t), value)
        return value
