"""CUDA's runtime API through cuda-python (`cuda.bindings.runtime`), for the executors that manage
host memory themselves: TensorRT's (streams, device buffers, pinned host buffers) and the pinned
batch buffers of ONNX Runtime's CUDA executor (pinned_memory.py).

Imported on first use: machines without cuda-python still import the executors, and serving on the
CPU never loads it.
"""

from __future__ import annotations

import ctypes

import numpy as np

from plansmith_runtime.executors import ExecutorError


class CudaUnavailable(ExecutorError):
    """cuda-python is not installed, so the CUDA runtime cannot be called from Python."""


def cuda_runtime():
    """The `cuda.bindings.runtime` module."""
    try:
        from cuda.bindings import runtime as cudart  # type: ignore[import-not-found]
    except ImportError as error:
        raise CudaUnavailable(f"cuda-python is not installed ({error})") from None
    return cudart


def cuda_driver():
    """The `cuda.bindings.driver` module (the few calls the runtime API lacks)."""
    try:
        from cuda.bindings import driver  # type: ignore[import-not-found]
    except ImportError as error:
        raise CudaUnavailable(f"cuda-python is not installed ({error})") from None
    return driver


def bytes_allocated_from(driver, pointer: int) -> int:
    """How many bytes of the device allocation `pointer` lies in start at it (cuMemGetAddressRange;
    the allocation's context must be current)."""
    base, size = check_cuda(driver.cuMemGetAddressRange(driver.CUdeviceptr(pointer)))
    return int(base) + int(size) - pointer


def check_cuda(result) -> object:
    """cuda-python calls return (error, *values); raise on a non-zero error."""
    error, *values = result if isinstance(result, tuple) else (result,)
    if int(error) != 0:
        raise ExecutorError(f"CUDA error {error}")
    return values[0] if len(values) == 1 else tuple(values)


def host_array(pointer: int, nbytes: int) -> np.ndarray:
    """A uint8 numpy array over `nbytes` of host memory at `pointer`, without a copy: the memory must
    outlive the array and every view of it."""
    return np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(pointer))
