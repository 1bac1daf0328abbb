"""Input quantizers that overwrite their input: no fake-quantized copy of a tensor that nothing reads again.

A quantized layer reads ``Q(x)`` where the float layer read ``x``. While ``Q(x)`` is computed and read, ``x`` and
``Q(x)`` both exist. For the 64-channel concatenation at full resolution of a 3D U-Net, the largest tensor of the
network, that copy is what lifts the peak memory of a quantized forward above the float one (DynUNet at 96^3 on
the CPU: 1.27x). Where ``x`` is a temporary that only the quantizer reads, writing ``Q(x)`` into ``x`` is the same
computation without the copy (:func:`mqb.quant.fake_quant.quantize_dequantize` ``in_place``: same values, bit for
bit).

Which inputs those are is measured, not guessed. :func:`install` (called by :func:`mqb.quant.quantize`) hooks the
model's root. On a forward without gradients whose *setting* (hooks of every module, quantizer modes, layers
switched on or off) has not been traced yet, a ``TorchFunctionMode`` records each torch call with the tensors it
reads and makes. A quantizer's input qualifies when, in that forward,

1. it was made inside the forward (not the caller's input, a parameter or a buffer);
2. it shares its storage with no other tensor (it is no view or alias, and none was taken of it);
3. nothing read it after the quantizer did (no residual, no second reader, no hook; reading only its shape is
   not a read);
4. it was dead when the forward returned (not part of the output, not kept by a hook, an attribute or a list).

Later forwards with the same setting overwrite those inputs, each time checking again that the root that made
the plan is running (a submodule called on its own overwrites nothing), that the tensor is no view, needs no
gradient, is no inference tensor outside inference mode, and has no more Python references and no more tensors on
its storage than in the traced forward (a caller or hook that keeps it, a ``detach()`` / ``numpy()`` alias, adds
one). The setting is every module's type, hooks (by handle), train/eval mode, patched ``forward`` and buffers set
(a low-rank branch), every quantizer's mode and which layers quantize: a change traces again. With gradients
enabled, under ``torch.jit`` tracing or ``torch.compile``, in a model holding TorchScript (whose reads the trace
cannot see), nothing is overwritten; a forward that leaves by an exception no hook sees (``KeyboardInterrupt``)
leaves no trace running. What the trace cannot see is a read that only another setting makes (a branch on a plain
attribute or on the data, reading a local variable after the quantizer): ``uninstall(model)`` turns it off.
"""

from __future__ import annotations

import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack, _pop_mode, _push_mode

from mqb.quant.live import LiveTensors

if TYPE_CHECKING:
    from mqb.quant.quantizer import TensorQuantizer

#: calls that read a tensor's metadata only (a later ``x.shape`` does not need ``x``'s values)
_METADATA = {
    torch.Tensor.size,
    torch.Tensor.dim,
    torch.Tensor.stride,
    torch.Tensor.numel,
    torch.Tensor.is_contiguous,
    torch.Tensor.is_floating_point,
    torch.Tensor.element_size,
    torch.Tensor.storage_offset,
    torch.Tensor.__len__,
    torch.Tensor.shape.__get__,  # type: ignore[attr-defined]
    torch.Tensor.ndim.__get__,  # type: ignore[attr-defined]
    torch.Tensor.dtype.__get__,  # type: ignore[attr-defined]
    torch.Tensor.device.__get__,  # type: ignore[attr-defined]
    torch.Tensor.requires_grad.__get__,  # type: ignore[attr-defined]
    torch.Tensor.is_cuda.__get__,  # type: ignore[attr-defined]
    torch.Tensor.layout.__get__,  # type: ignore[attr-defined]
}

_LOCAL = threading.local()


def _live(frame: Any) -> bool:
    """Whether ``frame`` is on this thread's call stack (its forward is still running)."""
    f = sys._getframe(1)
    while f is not None:
        if f is frame:
            return True
        f = f.f_back
    return False


def active_trace() -> _UseTrace | None:
    """The trace of the forward running in this thread, if one is being traced (a trace whose forward was left by
    an exception that skipped the hooks, ``KeyboardInterrupt`` say, is taken off the mode stack here)."""
    trace: _UseTrace | None = getattr(_LOCAL, "trace", None)
    if trace is not None and not _live(trace.frame):
        _discard(trace)
        return None
    return trace


def _discard(trace: _UseTrace) -> None:
    """Take a stale trace off this thread's mode stack and its root; nothing is planned from it."""
    modes = [_pop_mode() for _ in range(len(_get_current_function_mode_stack()))]
    for mode in reversed(modes):
        if mode is not trace:
            _push_mode(mode)
    _LOCAL.trace = None
    if trace.state is not None and trace.state.trace is trace:
        trace.state.trace = None


def input_refs(x: torch.Tensor) -> int:
    """Python references to ``x`` where a quantizer asks (:meth:`TensorQuantizer.forward`)."""
    return sys.getrefcount(x)


def storage_uses(x: torch.Tensor) -> int:
    """Tensors holding ``x``'s storage (aliases without a Python reference to ``x``: ``detach()``, ``.data``,
    ``numpy()``); a large number where it cannot be read."""
    try:
        return int(torch._C._storage_Use_Count(x.untyped_storage()._cdata))
    except (AttributeError, RuntimeError, NotImplementedError):
        return sys.maxsize


def may_overwrite(x: torch.Tensor, refs: int, quantizer: TensorQuantizer) -> bool:
    """The run-time checks before a planned quantizer overwrites its input ``x`` (``refs``: its references now):
    the root that made the plan is running (not a submodule called on its own), no gradients, no tracing or
    compiling, ``x`` is no view, has no more references and storage users than in the traced forward, and is no
    inference tensor outside inference mode."""
    if torch.is_grad_enabled() or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    if x._base is not None or refs > quantizer.overwrite_refs or storage_uses(x) > quantizer.overwrite_uses:
        return False
    if x.is_inference() and not torch.is_inference_mode_enabled():
        return False
    running = getattr(_LOCAL, "running", None)
    return bool(running) and running[-1][0] is quantizer.overwrite_root and _live(running[-1][1])


def _tensors(value: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif depth < 3 and isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v, depth + 1)
    elif depth < 3 and isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v, depth + 1)


_PLAIN = (torch.Tensor, int, float, bool, complex, str, type(None), torch.dtype, torch.device, torch.layout)


def _plain(value: Any, depth: int = 0) -> bool:
    """Whether ``value`` (what a torch call returned) is tensors and plain values, nothing that can hold a tensor's
    memory outside torch (a NumPy array, a storage, a DLPack capsule)."""
    if isinstance(value, _PLAIN):
        return True
    if isinstance(value, (tuple, list)) and depth < 3:
        return all(_plain(v, depth + 1) for v in value)
    return False


def _storage(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # a tensor without storage (a subclass, functional tensors)
        return 0


@contextmanager
def _without_function_modes() -> Iterator[None]:
    """Run with the torch function mode stack empty (an attention block's operand mode stays in place around it,
    unlike popping only the top; tensor subclasses keep their own handling, unlike ``DisableTorchFunction``)."""
    modes = [_pop_mode() for _ in range(len(_get_current_function_mode_stack()))]
    try:
        yield
    finally:
        for mode in reversed(modes):
            _push_mode(mode)


class _UseTrace(TorchFunctionMode):
    """Records, for one forward, which tensors were made, aliased and read, and what each quantizer consumed.

    Tensors are followed by object (a serial per tensor made, through weak references: the trace keeps nothing
    alive) and storages by address. A quantizer's own fake quantization runs outside the trace: its reading of its
    input is its consumption, and its result a tensor made.
    """

    def __init__(self, state: _Root | None = None, frame: Any = None) -> None:
        super().__init__()
        self.state, self.frame = state, frame
        self.seq = 0
        self.serials = 0
        self.made: LiveTensors[int] = LiveTensors()  # the serial of each tensor made
        self.storages: dict[int, tuple[weakref.ref, int | None]] = {}  # storage address -> (owner, its serial)
        self.aliased: set[int] = set()
        self.last_read: dict[int, int] = {}  # serial -> seq of its last read
        self.refs: dict[int, weakref.ref] = {}  # serial -> ref
        #: (quantizer, serial of its input or None, seq, (references, storage users))
        self.consumed: list[tuple[TensorQuantizer, int | None, int, tuple[int, int]]] = []

    def serial(self, t: torch.Tensor) -> int | None:
        return self.made.get(t)

    def _see_storage(self, t: torch.Tensor, serial: int | None) -> None:
        address = _storage(t)
        if address == 0:
            if serial is not None:
                self.aliased.add(serial)  # cannot tell what it shares
            return
        entry = self.storages.get(address)
        owner = entry[0]() if entry is not None else None
        if owner is None:
            self.storages[address] = (weakref.ref(t), serial)
        elif owner is not t:
            for s in (serial, entry[1]):  # type: ignore[index]
                if s is not None:
                    self.aliased.add(s)

    def _make(self, t: torch.Tensor) -> None:
        self.serials += 1
        serial = self.serials
        self.made.set(t, serial)
        self.refs[serial] = weakref.ref(t)
        if t._base is not None:
            self.aliased.add(serial)
        self._see_storage(t, serial)

    def _read(self, t: torch.Tensor) -> None:
        serial = self.serial(t)
        if serial is not None:
            self.last_read[serial] = self.seq
        else:
            self._see_storage(t, None)  # the caller's input, a parameter: a tensor made from it may alias it

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _METADATA:
            return out
        self.seq += 1
        inputs = list(_tensors((args, kwargs)))
        for t in inputs:
            self._read(t)
        if not _plain(out):  # a NumPy array, a storage, a DLPack capsule: memory shared outside torch's view
            for t in inputs:
                serial = self.serial(t)
                if serial is not None:
                    self.aliased.add(serial)
        for t in _tensors(out):
            if not any(t is i for i in inputs):  # an in-place call returns its input: nothing new
                self._make(t)
        return out

    def consume(self, quantizer: TensorQuantizer, x: torch.Tensor, refs: int, run: Callable[[], Any]) -> Any:
        """Record that ``quantizer`` read ``x`` (with ``refs`` references) and run its fake quantization."""
        self.seq += 1
        serial = self.serial(x)
        if serial is not None:
            self.last_read[serial] = self.seq
        # the fake quantization runs outside the trace (and any other torch function mode: it needs none, and
        # torch.compile cannot trace through this one); its reads are the consumption, its result a tensor made
        with _without_function_modes():
            self.consumed.append((quantizer, serial, self.seq, (refs, storage_uses(x))))
            out = run()
        if isinstance(out, torch.Tensor) and out is not x:
            self._make(out)
        return out

    def plan(self) -> dict[TensorQuantizer, tuple[int, int]]:
        """The quantizers whose every input of this forward qualified, with the most references and storage users
        seen."""
        verdict: dict[TensorQuantizer, tuple[int, int] | None] = {}
        for quantizer, serial, seq, counts in self.consumed:
            ok = (
                serial is not None
                and serial not in self.aliased
                and self.last_read.get(serial) == seq
                and self.refs[serial]() is None
            )
            if quantizer in verdict and verdict[quantizer] is None:
                continue
            before = verdict.get(quantizer) or (0, 0)
            verdict[quantizer] = (max(counts[0], before[0]), max(counts[1], before[1])) if ok else None
        return {q: c for q, c in verdict.items() if c is not None}


class _Root:
    """The hooks' state on a quantized model's root: the setting the plan was made for, the trace running."""

    def __init__(self) -> None:
        self.setting: tuple | None = None
        self.trace: _UseTrace | None = None
        self.pending: tuple | None = None


def _setting(root: nn.Module) -> tuple | None:
    """What a plan depends on: every module's type, hooks (by handle: a hook replaced is a new setting), train/eval
    mode, patched ``forward``, buffers set (a low-rank branch, a correction), every quantizer's mode and which layers
    quantize; the global hooks. ``None`` where no plan can be made (TorchScript inside: its reads are not traced)."""
    from mqb.quant.quantizer import TensorQuantizer

    module = nn.modules.module
    parts: list[Any] = [tuple(module._global_forward_hooks), tuple(module._global_forward_pre_hooks)]
    for m in root.modules():  # every forward of the root: one tuple per module, from its __dict__ (~0.5 ms / 500)
        if isinstance(m, torch.jit.ScriptModule):
            return None
        d = m.__dict__
        if isinstance(m, TensorQuantizer):
            state: Any = d["mode"]  # (its range buffers are data, set at the first forward for weights)
        else:
            state = tuple(k for k, v in d["_buffers"].items() if v is not None)
        parts.append((type(m), tuple(d["_forward_hooks"]), tuple(d["_forward_pre_hooks"]), d["training"],
                      id(d.get("forward")), state, d.get("quantizers_enabled")))  # fmt: skip
    return tuple(parts)


def _quantizers(root: nn.Module) -> Iterator[TensorQuantizer]:
    from mqb.quant.quantizer import TensorQuantizer

    for m in root.modules():
        if isinstance(m, TensorQuantizer):
            yield m


def _clear(root: nn.Module) -> None:
    for q in _quantizers(root):
        q.overwrite_refs, q.overwrite_uses, q.overwrite_root = 0, 0, None


def _before(root: nn.Module, args: tuple) -> None:
    state: _Root | None = root.__dict__.get("_mqb_in_place")
    if state is None:
        return
    frame = sys._getframe(1)  # the module call running this forward: alive until it returns
    running = getattr(_LOCAL, "running", None)
    if running is None:
        running = _LOCAL.running = []
    while running and not _live(running[-1][1]):  # left by an exception that skipped the hooks
        running.pop()
    running.append((state, frame))
    if torch.is_grad_enabled() or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return
    if active_trace() is not None or state.trace is not None:  # (a stale trace is discarded by active_trace)
        return
    setting = _setting(root)
    if setting is not None and setting == state.setting:
        return
    _clear(root)
    state.setting = state.pending = None
    if setting is None:
        return
    state.pending = setting
    state.trace = _UseTrace(state, frame)
    state.trace.__enter__()
    _LOCAL.trace = state.trace


def _after(root: nn.Module, args: tuple, output: Any) -> None:
    state: _Root | None = root.__dict__.get("_mqb_in_place")
    if state is None:
        return
    running = getattr(_LOCAL, "running", None)
    if running and running[-1][0] is state:
        running.pop()
    trace = state.trace
    if trace is None or getattr(_LOCAL, "trace", None) is not trace:  # not traced here (another thread's)
        return
    state.trace = None
    _LOCAL.trace = None
    trace.__exit__(None, None, None)
    if output is None:  # the forward raised: no plan from it
        return
    del output
    for quantizer, (refs, uses) in trace.plan().items():
        quantizer.overwrite_refs, quantizer.overwrite_uses, quantizer.overwrite_root = refs, uses, state
    state.setting = state.pending


def install(model: nn.Module) -> None:
    """Hook ``model``'s root so that input quantizers overwrite inputs that nothing reads again (module docstring).
    Idempotent; :func:`uninstall` removes the hooks."""
    if "_mqb_in_place" in model.__dict__:
        return
    model.__dict__["_mqb_in_place"] = _Root()
    model.register_forward_pre_hook(_before)
    model.register_forward_hook(_after, always_call=True)


def uninstall(model: nn.Module) -> None:
    """Remove the hooks of :func:`install` and every plan."""
    for hooks, hook in ((model._forward_pre_hooks, _before), (model._forward_hooks, _after)):
        for key, fn in list(hooks.items()):
            if fn is hook:
                del hooks[key]
    model.__dict__.pop("_mqb_in_place", None)
    _clear(model)


def planned(model: nn.Module) -> list[str]:
    """The names of the quantizers that overwrite their input under the current plan."""
    return [name for name, m in model.named_modules() if getattr(m, "overwrite_refs", 0) > 0]
