"""Triton's CUDA shared memory extension: a client on the same machine allocates GPU memory, shares it
through a CUDA IPC handle (tritonclient.utils.cuda_shared_memory's create_shared_memory_region and
get_raw_handle), registers the handle under a region name, and then names the region instead of
sending tensor bytes; perf_analyzer's `--shared-memory cuda` works this way.

The server opens each handle once at registration (cudaIpcOpenMemHandle) and closes it when the
region is unregistered. A request's input is copied from the region into host memory, and an
output from host memory into its region: the executors take host arrays (ONNX Runtime's CPU
sessions; the CUDA ones copy to the device themselves), so the region is read with one
device-to-host copy, where Triton's backends for GPU models read it in place. Correct for every
model; not the zero-copy path a GPU model could have.
"""

from __future__ import annotations

import base64
import binascii
import ctypes
import logging
from dataclasses import dataclass

import numpy as np

from plansmith_runtime.executors import ExecutorError
from plansmith_runtime.executors.cuda import check_cuda, cuda_runtime
from plansmith_runtime.protocol import SharedMemoryError, SharedMemoryReference
from plansmith_runtime.region_registry import RegionRegistry

log = logging.getLogger(__name__)

CUDA_IPC_HANDLE_SIZE = 64  # bytes of a cudaIpcMemHandle_t


def cuda_raw_handle(value: object) -> bytes:
    """A registration's raw_handle as the HTTP protocol sends it, {"b64": BASE64}: the handle's bytes."""
    if not isinstance(value, dict) or not isinstance(value.get("b64"), str):
        raise SharedMemoryError(f'raw_handle must be {{"b64": "<base64 cudaIpcMemHandle_t>"}}, got {value!r}')
    try:
        return base64.b64decode(value["b64"], validate=True)
    except binascii.Error as error:
        raise SharedMemoryError(f"raw_handle is not base64: {error}") from None


@dataclass
class CudaRegion:
    name: str
    device_id: int
    byte_size: int
    pointer: int  # the device address cudaIpcOpenMemHandle mapped the client's allocation to

    def status(self) -> dict:
        return {"name": self.name, "device_id": self.device_id, "byte_size": self.byte_size}


class CudaSharedMemory(RegionRegistry[CudaRegion]):
    """The registered CUDA regions by name. `runtime`: cuda-python's `cuda.bindings.runtime`, loaded
    at the first registration (None), or a stand-in with its calls."""

    kind = "CUDA shared memory"

    def __init__(self, runtime=None) -> None:
        super().__init__()
        self._runtime = runtime

    def register(self, name: str, raw_handle: bytes, device_id: int, byte_size: int) -> None:
        self._check_new(name)
        for label, value, low in (("device_id", device_id, 0), ("byte_size", byte_size, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise SharedMemoryError(f"CUDA shared memory region '{name}': {label} must be an integer of at least "
                                        f"{low}, got {value!r}")
        if not isinstance(raw_handle, (bytes, bytearray)) or len(raw_handle) != CUDA_IPC_HANDLE_SIZE:
            size = len(raw_handle) if isinstance(raw_handle, (bytes, bytearray)) else type(raw_handle).__name__
            raise SharedMemoryError(f"CUDA shared memory region '{name}': raw_handle must be a "
                                    f"{CUDA_IPC_HANDLE_SIZE}-byte cudaIpcMemHandle_t (tritonclient's get_raw_handle), "
                                    f"got {size} bytes")
        try:
            cudart = self._cuda()
            check_cuda(cudart.cudaSetDevice(device_id))
            handle = cudart.cudaIpcMemHandle_t()
            # cuda-bindings 13 exposes the handle's bytes only through its address (as tritonclient reads them)
            ctypes.memmove(handle.getPtr(), bytes(raw_handle), CUDA_IPC_HANDLE_SIZE)
            pointer = check_cuda(cudart.cudaIpcOpenMemHandle(handle, cudart.cudaIpcMemLazyEnablePeerAccess))
        except ExecutorError as error:  # CudaUnavailable is one
            raise SharedMemoryError(f"unable to open CUDA shared memory region '{name}' on device {device_id}: "
                                    f"{error}") from None
        self._regions[name] = CudaRegion(name, device_id, byte_size, int(pointer))

    def input_array(self, reference: SharedMemoryReference, tensor: str, dtype: np.dtype,
                    shape: tuple[int, ...]) -> np.ndarray:
        """The input, copied from its region into host memory; its size must be what its shape needs."""
        region = self._input_region(reference, tensor, dtype, shape)
        array = np.empty(shape, dtype)
        self._copy(region, array.ctypes.data, region.pointer + reference.offset, array.nbytes, to_device=False)
        return array

    def write_output(self, reference: SharedMemoryReference, tensor: str, array: np.ndarray) -> int:
        """Copy an output into its region; returns the bytes written."""
        region = self._output_region(reference, tensor, array)
        source = np.ascontiguousarray(array)
        self._copy(region, region.pointer + reference.offset, source.ctypes.data, source.nbytes, to_device=True)
        return source.nbytes

    def _release(self, region: CudaRegion) -> None:
        """Close the region's handle; one CUDA cannot close is logged: the region is gone either way."""
        cudart = self._cuda()
        try:
            check_cuda(cudart.cudaSetDevice(region.device_id))
            check_cuda(cudart.cudaIpcCloseMemHandle(region.pointer))
        except ExecutorError as error:
            log.warning("cannot close a CUDA shared memory handle: %s", error,
                        extra={"region": region.name, "device_id": region.device_id})

    def _cuda(self):
        if self._runtime is None:
            self._runtime = cuda_runtime()
        return self._runtime

    def _copy(self, region: CudaRegion, destination: int, source: int, nbytes: int, to_device: bool) -> None:
        cudart = self._cuda()
        kinds = cudart.cudaMemcpyKind
        kind = kinds.cudaMemcpyHostToDevice if to_device else kinds.cudaMemcpyDeviceToHost
        try:
            check_cuda(cudart.cudaSetDevice(region.device_id))
            check_cuda(cudart.cudaMemcpy(destination, source, nbytes, kind))
        except ExecutorError as error:
            raise SharedMemoryError(f"CUDA shared memory region '{region.name}': copy failed: {error}") from None
