"""Triton's CUDA shared memory extension: the region registry's own logic against a stand-in for
cuda-python's runtime (device memory played by host buffers, so what is copied where is visible),
one namespace of region names with the system regions, and, where a CUDA device is present, a real
server process and tritonclient's cuda_shared_memory utilities (test_cuda_shared_memory_on_a_gpu)."""

from __future__ import annotations

import base64
import ctypes
import enum
import logging

import numpy as np
import pytest

from plansmith_runtime.cuda_shared_memory import CUDA_IPC_HANDLE_SIZE, CudaSharedMemory, cuda_raw_handle
from plansmith_runtime.protocol import SharedMemoryError, SharedMemoryReference
from plansmith_runtime.shared_memory import SharedMemoryRegions


class StandInCudaRuntime:
    """The calls CudaSharedMemory makes, as cuda.bindings.runtime answers them ((error, value)
    tuples), over host memory: a "client allocation" is a ctypes buffer its IPC handle's bytes name."""

    class cudaMemcpyKind(enum.IntEnum):  # noqa: N801  (cuda-python's names)
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2

    cudaIpcMemLazyEnablePeerAccess = 1

    class cudaIpcMemHandle_t:  # noqa: N801
        def __init__(self) -> None:
            self._bytes = ctypes.create_string_buffer(CUDA_IPC_HANDLE_SIZE)

        def getPtr(self) -> int:  # noqa: N802
            return ctypes.addressof(self._bytes)

    def __init__(self, devices: int = 1) -> None:
        self.devices = devices
        self.allocations: dict[bytes, ctypes.Array] = {}  # handle bytes -> the client's "device memory"
        self.opened: dict[int, bytes] = {}  # mapped address -> handle
        self.current_device = 0
        self.copies: list[tuple[str, int, int]] = []  # (direction, bytes, the device current then)

    def allocate(self, nbytes: int, tag: int) -> bytes:
        """A client's allocation and the raw IPC handle it would send."""
        handle = bytes([tag]) * CUDA_IPC_HANDLE_SIZE
        self.allocations[handle] = ctypes.create_string_buffer(nbytes)
        return handle

    def memory(self, handle: bytes) -> np.ndarray:
        buffer = self.allocations[handle]
        return np.frombuffer(buffer, np.uint8, len(buffer))

    def cudaSetDevice(self, device: int):  # noqa: N802
        if not 0 <= device < self.devices:
            return (101,)  # cudaErrorInvalidDevice
        self.current_device = device
        return (0,)

    def cudaIpcOpenMemHandle(self, handle, flags):  # noqa: N802
        raw = ctypes.string_at(handle.getPtr(), CUDA_IPC_HANDLE_SIZE)
        if raw not in self.allocations or flags != self.cudaIpcMemLazyEnablePeerAccess:
            return (400, None)  # cudaErrorInvalidResourceHandle
        address = ctypes.addressof(self.allocations[raw])
        self.opened[address] = raw
        return (0, address)

    def cudaIpcCloseMemHandle(self, pointer: int):  # noqa: N802
        return (0,) if self.opened.pop(pointer, None) is not None else (400,)

    def cudaMemcpy(self, destination: int, source: int, nbytes: int, kind):  # noqa: N802
        self.copies.append((kind.name, nbytes, self.current_device))
        ctypes.memmove(destination, source, nbytes)
        return (0,)


def registry_with_region(nbytes: int = 256, device_id: int = 0):
    cuda = StandInCudaRuntime(devices=2)
    handle = cuda.allocate(nbytes, tag=7)
    registry = CudaSharedMemory(cuda)
    registry.register("images", handle, device_id, nbytes)
    return registry, cuda, handle


def test_inputs_are_copied_from_the_clients_allocation_and_outputs_into_it():
    registry, cuda, handle = registry_with_region(device_id=1)
    client_memory = cuda.memory(handle)
    x = np.arange(8, dtype=np.float32)
    client_memory[16:48] = np.frombuffer(x.tobytes(), np.uint8)  # the client wrote x at offset 16
    cuda.cudaSetDevice(0)  # another device current, as another region's copy would leave it

    read = registry.input_array(SharedMemoryReference("images", 32, 16), "input", np.dtype(np.float32), (2, 4))
    np.testing.assert_array_equal(read, x.reshape(2, 4))
    client_memory[16:48] = 0  # a host copy: the client reusing its memory does not change the request's input
    np.testing.assert_array_equal(read, x.reshape(2, 4))

    y = np.array([[1.5, -2.0]], np.float32)
    assert registry.write_output(SharedMemoryReference("images", 64, 128), "logits", y) == 8
    np.testing.assert_array_equal(np.frombuffer(client_memory[128:136].tobytes(), np.float32), y.ravel())
    # each copy on the region's device
    assert cuda.copies == [("cudaMemcpyDeviceToHost", 32, 1), ("cudaMemcpyHostToDevice", 8, 1)]
    assert registry.status() == [{"name": "images", "device_id": 1, "byte_size": 256}]
    assert registry.status("images") == registry.status()

    registry.unregister("images")
    assert cuda.opened == {} and registry.status() == []
    registry.unregister("images")  # unknown names are not an error, as in Triton


@pytest.mark.parametrize("call, message", [
    (lambda r: r.input_array(SharedMemoryReference("images", 32, 240), "input", np.dtype(np.float32), (8,)),
     "'input': 32 bytes at offset 240 run past the end of CUDA shared memory region 'images' \\(256 bytes\\)"),
    (lambda r: r.input_array(SharedMemoryReference("images", 16, 0), "input", np.dtype(np.float32), (8,)),
     "shared_memory_byte_size 16 for shape \\[8\\], expected 32"),
    (lambda r: r.write_output(SharedMemoryReference("images", 4, 0), "logits", np.zeros(2, np.float32)),
     "output 'logits' \\(4 bytes\\) should be at least 8 bytes"),
    (lambda r: r.status("videos"), "unable to find CUDA shared memory region: 'videos'"),
    (lambda r: r.register("images", bytes(64), 0, 8), "'images' is already registered"),
    (lambda r: r.register("", bytes(64), 0, 8), "needs a name"),
    (lambda r: r.register("short", bytes(16), 0, 8), "raw_handle must be a 64-byte cudaIpcMemHandle_t .* got 16 bytes"),
    (lambda r: r.register("negative", bytes(64), -1, 8), "device_id must be an integer of at least 0, got -1"),
    (lambda r: r.register("empty", bytes(64), 0, 0), "byte_size must be an integer of at least 1, got 0"),
    (lambda r: r.register("absent-device", bytes([7]) * 64, 5, 8),
     "unable to open CUDA shared memory region 'absent-device' on device 5: CUDA error 101"),
    (lambda r: r.register("stale", bytes([9]) * 64, 0, 8),
     "unable to open CUDA shared memory region 'stale' on device 0: CUDA error 400"),
])
def test_bad_registrations_and_references_are_refused_with_the_reason(call, message):
    registry, cuda, _ = registry_with_region()
    with pytest.raises(SharedMemoryError, match=message):
        call(registry)
    assert [region["name"] for region in registry.status()] == ["images"]  # nothing else registered
    assert len(cuda.opened) == 1


def test_without_cuda_python_registration_is_refused_and_nothing_else_needs_it(monkeypatch):
    import plansmith_runtime.cuda_shared_memory as module
    from plansmith_runtime.executors.cuda import CudaUnavailable

    def unavailable():
        raise CudaUnavailable("cuda-python is not installed (No module named 'cuda')")

    monkeypatch.setattr(module, "cuda_runtime", unavailable)
    registry = CudaSharedMemory()
    with pytest.raises(SharedMemoryError, match="unable to open CUDA shared memory region 'r' on device 0: "
                                                "cuda-python is not installed"):
        registry.register("r", bytes(64), 0, 8)
    assert registry.status() == []
    registry.close()  # nothing registered: CUDA is not loaded to close nothing


def test_a_handle_cuda_cannot_close_is_logged_and_the_region_forgotten(caplog):
    registry, cuda, _ = registry_with_region()
    cuda.opened.clear()  # as if the client's process had gone and taken the mapping along
    with caplog.at_level(logging.WARNING):
        registry.close()
    assert registry.status() == []
    assert "cannot close a CUDA shared memory handle: CUDA error 400" in caplog.text


def test_system_and_cuda_regions_share_one_namespace_of_names(tmp_path):
    from plansmith_runtime.shared_memory import SystemSharedMemory

    (tmp_path / "input-key").write_bytes(bytes(64))
    regions = SharedMemoryRegions(SystemSharedMemory(tmp_path), registry_with_region()[0])
    regions.register_system("input", "/input-key", 0, 64)
    with pytest.raises(SharedMemoryError, match="shared memory region 'images' is already registered"):
        regions.register_system("images", "/input-key", 0, 64)
    with pytest.raises(SharedMemoryError, match="shared memory region 'input' is already registered"):
        regions.register_cuda("input", bytes(64), 0, 8)

    x = np.ones(4, np.float32)
    assert regions.write_output(SharedMemoryReference("images", 16), "y", x) == 16  # the CUDA region
    np.testing.assert_array_equal(regions.input_array(SharedMemoryReference("images", 16), "x", np.dtype(np.float32),
                                                      (4,)), x)
    assert regions.write_output(SharedMemoryReference("input", 16), "y", 2 * x) == 16  # the system region
    np.testing.assert_array_equal(np.frombuffer((tmp_path / "input-key").read_bytes()[:16], np.float32), 2 * x)
    with pytest.raises(SharedMemoryError, match="unable to find shared memory region: 'videos'"):
        regions.input_array(SharedMemoryReference("videos", 16), "x", np.dtype(np.float32), (4,))
    regions.close()
    assert regions.system.status() == [] and regions.cuda.status() == []


def test_the_http_raw_handle_is_base64_in_an_object():
    assert cuda_raw_handle({"b64": base64.b64encode(bytes(range(64))).decode()}) == bytes(range(64))
    with pytest.raises(SharedMemoryError, match='raw_handle must be {"b64": "<base64 cudaIpcMemHandle_t>"}, got'):
        cuda_raw_handle("AAAA")
    with pytest.raises(SharedMemoryError, match="raw_handle is not base64"):
        cuda_raw_handle({"b64": "not base64!"})
