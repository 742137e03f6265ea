"""Classify training failures in one place.

Training and the objective decide what to do with a failed step (prune the
trial, halve the batch, report the configuration as too large) by *kind* of
failure; the kinds are recognised here and nowhere else, so a new allocator
message is one line and one test.
"""

from __future__ import annotations

import math

import torch

__all__ = ["OOM_MESSAGES", "is_out_of_memory", "is_non_finite_loss"]

#: Substrings of ``RuntimeError`` messages raised when an allocation fails.
OOM_MESSAGES: tuple[str, ...] = (
    "CUDA out of memory",
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_ALLOC_FAILED",
    "DefaultCPUAllocator: can't allocate memory",
    "not enough memory",
    "out of memory",
)

_OOM_TYPES: tuple[type[BaseException], ...] = tuple(
    cls
    for cls in (
        MemoryError,
        getattr(torch, "OutOfMemoryError", None),
        getattr(torch.cuda, "OutOfMemoryError", None),
    )
    if cls is not None
)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is an out-of-memory error.

    Recognises :class:`MemoryError`, ``torch.OutOfMemoryError`` /
    ``torch.cuda.OutOfMemoryError``, and ``RuntimeError`` messages from the
    CUDA, cuBLAS, cuDNN and CPU allocators (:data:`OOM_MESSAGES`).  The
    ``__cause__`` / ``__context__`` chain is followed, so an OOM re-raised as
    another error (for example by a data loader worker) still counts.

    Args:
        exc: The caught exception.

    Returns:
        ``True`` for an allocation failure, ``False`` for anything else.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, _OOM_TYPES):
            return True
        if isinstance(current, RuntimeError):
            message = str(current)
            if any(marker in message for marker in OOM_MESSAGES):
                return True
        current = current.__cause__ or current.__context__
    return False


def is_non_finite_loss(loss: torch.Tensor | float) -> bool:
    """Whether a loss value is NaN or infinite (a diverged step).

    Args:
        loss: A scalar tensor (any device, any float dtype) or a Python number.
            For a tensor with several elements, any non-finite element counts.
    """
    if isinstance(loss, torch.Tensor):
        return not bool(torch.isfinite(loss.detach()).all())
    return not math.isfinite(float(loss))
