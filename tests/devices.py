"""Devices for device-parametrized tests, and checks that state follows ``model.to(device)``.

``devices()`` lists the devices this machine can run. Tests parametrize over :func:`device_params`: the ``cpu``
case always runs; the ``cuda`` case (test id ``...[cuda...]``, selected with ``pytest -k cuda``) is skipped when no
GPU is present and otherwise compares the CUDA result with the CPU one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch import nn

HAS_CUDA = torch.cuda.is_available()


def devices() -> list[str]:
    """``["cpu"]`` plus ``"cuda"`` when a GPU is present."""
    return ["cpu"] + (["cuda"] if HAS_CUDA else [])


def device_params() -> list[Any]:
    """``cpu`` and ``cuda`` as pytest params (ids ``cpu`` / ``cuda``); ``cuda`` is skipped without a GPU."""
    return [
        pytest.param("cpu", id="cpu"),
        pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")),
    ]


def to_device(value: Any, device: str | torch.device) -> Any:
    """``value`` with every tensor (in lists / tuples / dicts too) moved to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device) for v in value)
    return value


def assert_close_to_cpu(result: torch.Tensor, reference: torch.Tensor, *, exact: bool) -> None:
    """A result computed on some device against the CPU result: bit-exact for deterministic elementwise ops,
    1e-5 relative otherwise."""
    got = result.detach().cpu()
    assert got.shape == reference.shape and got.dtype == reference.dtype
    if exact:
        assert torch.equal(got, reference), f"max diff {(got.double() - reference.double()).abs().max():.3g}"
    else:
        torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max()) + 1e-12)


def _tensors_in(value: Any, path: str, depth: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    if depth > 4:
        return
    if isinstance(value, torch.Tensor):
        yield path, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _tensors_in(v, f"{path}[{k!r}]", depth + 1)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for i, v in enumerate(value):
            yield from _tensors_in(v, f"{path}[{i}]", depth + 1)
    elif not isinstance(value, nn.Module) and type(value).__module__.startswith("mqb.") and hasattr(value, "__dict__"):
        for k, v in vars(value).items():  # mqb helper objects held by modules (observers, ...)
            yield from _tensors_in(v, f"{path}.{k}", depth + 1)


def module_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor reachable as an attribute of a module of ``model`` (``vars(module)``: parameters, buffers
    and plain attributes, inside lists / tuples / dicts too), named ``module.attribute[...]``."""
    for name, module in model.named_modules():
        for attr, value in vars(module).items():
            if attr == "_modules":
                continue
            yield from _tensors_in(value, f"{name or '<root>'}.{attr}")


def stray_tensors(model: nn.Module, device: str | torch.device) -> list[str]:
    """The module attributes of ``model`` holding a tensor that is not on ``device`` (what ``.to()`` missed)."""
    want = torch.device(device)
    return [f"{path} on {t.device}" for path, t in module_tensors(model) if t.device.type != want.type]


@contextmanager
def exact_float32() -> Iterator[None]:
    """Full float32 convolutions and matmuls on CUDA (TF32 would make CUDA results differ from the CPU's), through
    the switches mqb itself uses (:func:`mqb.devices.float32_arithmetic`)."""
    from mqb.devices import float32_arithmetic

    with float32_arithmetic("ieee"):
        yield
