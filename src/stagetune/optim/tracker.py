"""Live tensor bytes of a step, counted as its operators allocate them.

:class:`AllocationTracker` is a ``TorchDispatchMode``: every tensor an
operator returns is counted once per storage and uncounted when the storage
is freed, so its ``peak`` is the step's peak of live tensor storage.  It
works on any device, the meta device included, which is why both the CPU
measurement (:func:`stagetune.optim.memory.measure_step`) and the meta
estimate (:func:`stagetune.optim.estimate.estimate_step`) run under it.
Buffers a kernel allocates and frees internally never pass the mode; for the
kernels where they matter (oneDNN convolutions and LSTM, CTC's backward) the
tracker adds them from the operator's arguments (``_KERNEL_SCRATCH``).

This module depends on torch only: the step it watches is defined in
:mod:`stagetune.optim.estimate` and measured in :mod:`stagetune.optim.memory`.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_iter

__all__ = ["AllocationTracker"]


class AllocationTracker(TorchDispatchMode):
    """Counts live tensor storage bytes and their running peak.

    Every tensor an operator returns is counted once per storage (keyed by
    the storage's ``StorageImpl``, which views share) and uncounted when the
    storage is freed.  Works on any device, meta included (meta storages have
    sizes but no data).  Tensors created before the mode was entered are
    counted when an operator first returns them, so build what you measure
    inside the mode.

    Attributes:
        current: Bytes of tracked storages alive now.
        peak: Highest ``current`` seen.
    """

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def track(self, tensor: Tensor) -> None:
        """Count ``tensor``'s storage if it is not counted yet (or grew)."""
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse and other storage-less layouts
            return
        key, size = storage._cdata, storage.nbytes()
        counted = self._live.get(key)
        if counted is None:
            self._live[key] = size
            weakref.finalize(storage, self._release, key)
            self.current += size
        elif size > counted:  # resized in place (out= ops)
            self._live[key] = size
            self.current += size - counted
        self.peak = max(self.peak, self.current)

    def _release(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def _run(self, func: Any, args: Any, kwargs: Any) -> Any:
        return func(*args, **kwargs)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = self._run(func, args, kwargs or {})
        for item in tree_iter(out):
            if isinstance(item, Tensor):
                self.track(item)
        scratch = _KERNEL_SCRATCH.get(getattr(func, "overloadpacket", None))
        if scratch is not None:
            named = {a.name: v for a, v in zip(func._schema.arguments, args)} | (kwargs or {})
            self.peak = max(self.peak, self.current + scratch(named, out))
        return out


def _nbytes(tensor: Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _rnn_scratch(a: dict[str, Any], weights: tuple[str, str], extra: str | None) -> int:
    w_ih, w_hh = a[weights[0]], a[weights[1]]
    frames = a["input"].numel() // a["input"].size(-1)
    gates = frames * w_ih.size(0) * w_ih.element_size()
    return (1 if extra is None else 2) * (_nbytes(w_ih) + _nbytes(w_hh)) + gates + (
        0 if extra is None else _nbytes(a[extra])
    )


#: Operator -> bytes its kernel holds internally (freed before it returns)
#: while its outputs exist, as ``f(named arguments, outputs)``.  Read off the
#: allocator profiler (torch 2.13, CPU): oneDNN convolutions reorder the output
#: to a blocked layout, their backward the gradient and twice the input;
#: oneDNN's LSTM reorders its weights and keeps the gates of every frame in a
#: scratchpad (backward: weights twice, plus the incoming gradient); CTC's
#: backward holds ``log_beta``, the size of ``log_alpha``.
_KERNEL_SCRATCH: dict[Any, Callable[[dict[str, Any], Any], int]] = {
    torch.ops.aten.convolution: lambda a, out: _nbytes(out),
    torch.ops.aten.convolution_backward: lambda a, out: (
        _nbytes(a["grad_output"]) + 2 * _nbytes(a["input"])
    ),
    torch.ops.aten.mkldnn_rnn_layer: lambda a, out: _rnn_scratch(a, ("weight0", "weight1"), None),
    torch.ops.aten.mkldnn_rnn_layer_backward: lambda a, out: _rnn_scratch(
        a, ("weight1", "weight2"), "grad_output"
    ),
    torch.ops.aten._ctc_loss_backward: lambda a, out: _nbytes(a["log_alpha"]),
}
