"""Triton's CUDA shared memory extension: a client on the same machine allocates GPU memory, shares it
through a CUDA IPC handle (tritonclient.utils.cuda_shared_memory's create_shared_memory_region and
get_raw_handle), registers the handle under a region name, and then names the region instead of
sending tensor bytes; perf_analyzer's `--shared-memory cuda` works this way.

The server opens each handle once at registration (cudaIpcOpenMemHandle) and closes it once the
region is unregistered and no request still reads it.

A request's input in a region of the device the model runs on (ONNX Runtime's CUDA provider, or
TensorRT) stays there: it becomes a DeviceTensor the executor binds in place, or gathers with the
batch's other requests on the device (executors/device_memory.py), as Triton's GPU backends read a
cudashm input.
Anywhere else (a CPU model, a region on another device) it is copied into host memory.

An output in a region of the model's device is written there by the executor, device-to-device,
when every request of its batch asked for it that way (`output_destination`; device_memory.py);
otherwise it is copied into its region from the host, where the executor left it.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import ctypes
import functools
import logging
import weakref
from dataclasses import dataclass
from typing import Callable

import numpy as np

from plansmith_runtime.executors import ExecutorError
from plansmith_runtime.executors.cuda import bytes_allocated_from, check_cuda, cuda_driver, cuda_runtime
from plansmith_runtime.executors.device_memory import DeviceDestination, DeviceTensor
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


class OpenedHandle:
    """A client's allocation mapped into this process by cudaIpcOpenMemHandle. The mapping is closed
    when nothing refers to it any more: its region is unregistered and every DeviceTensor reading
    it (a request in flight) is gone."""

    def __init__(self, pointer: int, device_id: int, region: str, runtime) -> None:
        self.pointer = pointer
        self.close = weakref.finalize(self, functools.partial(_close_handle, runtime, pointer, device_id, region))


def _close_handle(runtime, pointer: int, device_id: int, region: str) -> None:
    """cudaIpcCloseMemHandle; a handle CUDA cannot close is logged: the region is gone either way."""
    try:
        check_cuda(runtime.cudaSetDevice(device_id))
        check_cuda(runtime.cudaIpcCloseMemHandle(pointer))
    except ExecutorError as error:
        log.warning("cannot close a CUDA shared memory handle: %s", error, extra={"region": region, "device_id": device_id})


@dataclass
class CudaRegion:
    name: str
    device_id: int
    byte_size: int
    handle: OpenedHandle

    @property
    def pointer(self) -> int:
        """The device address the client's allocation is mapped to here."""
        return self.handle.pointer

    def status(self) -> dict:
        return {"name": self.name, "device_id": self.device_id, "byte_size": self.byte_size}


class CudaSharedMemory(RegionRegistry[CudaRegion]):
    """The registered CUDA regions by name. `runtime`: cuda-python's `cuda.bindings.runtime`, loaded
    at the first registration (None), or a stand-in with its calls. `input_device`: the CUDA device
    the served model reads inputs on (ServedModel.input_device), None while it reads host memory."""

    kind = "CUDA shared memory"

    def __init__(self, runtime=None, input_device: Callable[[], int | None] = lambda: None, driver=None) -> None:
        """`driver`: cuda-python's `cuda.bindings.driver`, loaded at the first registration (None), or
        a stand-in with its cuMemGetAddressRange."""
        super().__init__()
        self._runtime = runtime
        self._driver = driver
        self._input_device = input_device

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
            pointer = int(check_cuda(cudart.cudaIpcOpenMemHandle(handle, cudart.cudaIpcMemLazyEnablePeerAccess)))
        except ExecutorError as error:  # CudaUnavailable is one
            raise SharedMemoryError(f"unable to open CUDA shared memory region '{name}' on device {device_id}: "
                                    f"{error}") from None
        opened = OpenedHandle(pointer, device_id, name, cudart)
        try:
            if self._driver is None:
                self._driver = cuda_driver()
            allocated = bytes_allocated_from(self._driver, pointer)
        except ExecutorError as error:
            opened.close()
            raise SharedMemoryError(f"CUDA shared memory region '{name}': cannot tell the size of the memory its "
                                    f"handle opens: {error}") from None
        if byte_size > allocated:  # as Triton checks: requests would reach past the client's memory
            opened.close()
            raise SharedMemoryError(f"CUDA shared memory region '{name}': byte_size {byte_size} is larger than the "
                                    f"{allocated} bytes of device memory its handle opens")
        self._regions[name] = CudaRegion(name, device_id, byte_size, opened)

    def input_array(self, reference: SharedMemoryReference, tensor: str, dtype: np.dtype,
                    shape: tuple[int, ...]) -> np.ndarray | DeviceTensor:
        """The input where the model reads it: in place (a DeviceTensor) when its region is on the
        model's device, else copied into host memory. Its size must be what its shape needs."""
        region = self._input_region(reference, tensor, dtype, shape)
        in_place = DeviceTensor(region.pointer + reference.offset, dtype, shape, region.device_id, self._cuda(),
                                owner=region.handle)
        if region.device_id == self._input_device():
            return in_place
        with self._copying(region):
            return in_place.to_host()

    def output_destination(self, reference: SharedMemoryReference, tensor: str) -> DeviceDestination | None:
        """Where the executor may write the output on the device: the referenced span when its
        region is on the model's device; None when the output must come through the host."""
        region = self._span(reference, tensor)
        if region.device_id != self._input_device():
            return None
        return DeviceDestination(region.pointer + reference.offset, reference.byte_size, region.device_id, self._cuda(),
                                 owner=region.handle)

    def write_output(self, reference: SharedMemoryReference, tensor: str, array: np.ndarray | DeviceTensor) -> int:
        """Copy an output into its region; returns the bytes written. An output the executor wrote
        there already (a DeviceTensor at the reference's address) is not copied again."""
        region = self._output_region(reference, tensor, array)
        if isinstance(array, DeviceTensor) and array.pointer == region.pointer + reference.offset:
            return array.nbytes
        source = np.ascontiguousarray(array)
        cudart = self._cuda()
        with self._copying(region):
            check_cuda(cudart.cudaSetDevice(region.device_id))
            check_cuda(cudart.cudaMemcpy(region.pointer + reference.offset, source.ctypes.data, source.nbytes,
                                         cudart.cudaMemcpyKind.cudaMemcpyHostToDevice))
        return source.nbytes

    def _cuda(self):
        if self._runtime is None:
            self._runtime = cuda_runtime()
        return self._runtime

    @contextlib.contextmanager
    def _copying(self, region: CudaRegion):
        """A copy to or from `region` that CUDA refuses is the request's error (400), not the server's."""
        try:
            yield
        except ExecutorError as error:
            raise SharedMemoryError(f"CUDA shared memory region '{region.name}': copy failed: {error}") from None
