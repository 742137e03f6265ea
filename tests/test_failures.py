"""Tests for stagetune.failures: which exceptions and losses count as which failure."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stagetune.failures import is_non_finite_loss, is_out_of_memory

torch.set_num_threads(1)


def _raised(action) -> BaseException:  # noqa: ANN001 - any zero-argument callable
    with pytest.raises(BaseException) as info:
        action()
    return info.value


def test_real_cpu_allocation_failure_is_out_of_memory() -> None:
    exc = _raised(lambda: torch.empty(2**62, dtype=torch.uint8))
    assert isinstance(exc, RuntimeError)
    assert "DefaultCPUAllocator: can't allocate memory" in str(exc)
    assert is_out_of_memory(exc)


def test_real_python_and_numpy_memory_errors_are_out_of_memory() -> None:
    assert is_out_of_memory(_raised(lambda: bytearray(2**62)))
    assert is_out_of_memory(_raised(lambda: np.empty(2**62, dtype=np.uint8)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_real_cuda_allocation_failure_is_out_of_memory() -> None:
    exc = _raised(lambda: torch.empty(2**50, dtype=torch.uint8, device="cuda"))
    assert is_out_of_memory(exc)


@pytest.mark.parametrize(
    "exc",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
        torch.cuda.OutOfMemoryError("CUDA out of memory."),
        RuntimeError("CUDA out of memory. Tried to allocate 2.00 MiB (GPU 0; 7.79 GiB total)"),
        RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
        RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
        RuntimeError("[enforce fail at alloc_cpu.cpp:127] not enough memory: tried to allocate"),
        RuntimeError("CUDA error: out of memory"),
        MemoryError(),
    ],
    ids=repr,
)
def test_out_of_memory_kinds(exc: BaseException) -> None:
    assert is_out_of_memory(exc)


def test_ordinary_errors_are_not_out_of_memory() -> None:
    shape = _raised(lambda: torch.zeros(2, 3) @ torch.zeros(4, 5))
    assert isinstance(shape, RuntimeError) and not is_out_of_memory(shape)
    assert not is_out_of_memory(_raised(lambda: torch.zeros(2)[5]))
    assert not is_out_of_memory(ValueError("memory layout must be contiguous"))
    assert not is_out_of_memory(KeyboardInterrupt())
    assert not is_out_of_memory(RuntimeError("Expected all tensors to be on the same device"))


def test_out_of_memory_is_found_through_exception_chains() -> None:
    try:
        try:
            torch.empty(2**62, dtype=torch.uint8)
        except RuntimeError as oom:
            raise ValueError("batch 17 failed") from oom
    except ValueError as wrapped:
        assert is_out_of_memory(wrapped)
    try:
        try:
            raise MemoryError
        except MemoryError:
            raise RuntimeError("while collating")  # implicit __context__
    except RuntimeError as wrapped:
        assert is_out_of_memory(wrapped)
    a, b = ValueError("a"), ValueError("b")
    a.__context__, b.__context__ = b, a  # a cycle must not hang
    assert not is_out_of_memory(a)


@pytest.mark.parametrize(
    ("loss", "expected"),
    [
        (torch.tensor(1.5), False),
        (torch.tensor(0.0, dtype=torch.bfloat16), False),
        (torch.tensor(float("nan")), True),
        (torch.tensor(float("inf")), True),
        (torch.tensor(-float("inf"), dtype=torch.float16), True),
        (torch.tensor([1.0, float("nan")]), True),
        (2.0, False),
        (math.nan, True),
        (math.inf, True),
    ],
    ids=repr,
)
def test_non_finite_loss(loss: torch.Tensor | float, expected: bool) -> None:
    assert is_non_finite_loss(loss) is expected


def test_non_finite_loss_accepts_a_loss_that_requires_grad() -> None:
    weight = torch.tensor(1.0, requires_grad=True)
    assert not is_non_finite_loss(weight * 2)
    assert is_non_finite_loss(weight / torch.tensor(0.0) - weight / torch.tensor(0.0))
