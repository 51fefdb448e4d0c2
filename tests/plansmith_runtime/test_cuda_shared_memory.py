"""Triton's CUDA shared memory extension: the region registry's own logic against a stand-in for
cuda-python's runtime (conftest's StandInCudaRuntime: device memory played by host buffers, so what
is copied where is visible), inputs read in place on the model's device, and one namespace of region
names with the system regions. A real server and tritonclient's cuda_shared_memory utilities on a
GPU: test_server.py."""

from __future__ import annotations

import base64
import logging

import numpy as np
import pytest

from plansmith_runtime.cuda_shared_memory import CudaSharedMemory, cuda_raw_handle
from plansmith_runtime.executors.device_memory import DeviceTensor
from plansmith_runtime.protocol import SharedMemoryError, SharedMemoryReference
from plansmith_runtime.shared_memory import SharedMemoryRegions


def registry_with_region(cuda, nbytes: int = 256, device_id: int = 0, input_device: int | None = None):
    handle = cuda.allocate(nbytes, tag=7)
    registry = CudaSharedMemory(cuda, input_device=lambda: input_device)
    registry.register("images", handle, device_id, nbytes)
    return registry, cuda, handle


def test_inputs_are_copied_from_the_clients_allocation_and_outputs_into_it(stand_in_cuda):
    registry, cuda, handle = registry_with_region(stand_in_cuda(devices=2), device_id=1, input_device=0)
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


def test_an_input_on_the_models_device_is_read_in_place_and_its_mapping_outlives_the_region(stand_in_cuda):
    """The model runs on device 0 and the region is there: the input is a DeviceTensor at the
    region's address (no copy); unregistering the region while a request still holds it keeps the
    client's allocation mapped until the request lets go."""
    registry, cuda, handle = registry_with_region(stand_in_cuda(), device_id=0, input_device=0)
    x = np.arange(8, dtype=np.float32)
    cuda.memory(handle)[16:48] = np.frombuffer(x.tobytes(), np.uint8)
    [mapped] = cuda.opened

    read = registry.input_array(SharedMemoryReference("images", 32, 16), "input", np.dtype(np.float32), (2, 4))
    assert isinstance(read, DeviceTensor)
    assert (read.pointer, read.shape, read.dtype, read.device_id, read.nbytes) == (mapped + 16, (2, 4), np.float32, 0, 32)
    assert cuda.copies == []  # nothing read yet
    np.testing.assert_array_equal(np.asarray(read), x.reshape(2, 4))  # where host bytes are needed: one copy
    assert cuda.copies == [("cudaMemcpyDeviceToHost", 32, 0)]

    registry.unregister("images")
    assert registry.status() == [] and cuda.opened == {mapped: handle}  # a request still reads it
    del read  # the last reference: closed at once, not at some later garbage collection
    assert cuda.opened == {}


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
def test_bad_registrations_and_references_are_refused_with_the_reason(call, message, stand_in_cuda):
    registry, cuda, _ = registry_with_region(stand_in_cuda(devices=2))
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


def test_a_handle_cuda_cannot_close_is_logged_and_the_region_forgotten(caplog, stand_in_cuda):
    registry, cuda, _ = registry_with_region(stand_in_cuda())
    cuda.opened.clear()  # as if the client's process had gone and taken the mapping along
    with caplog.at_level(logging.WARNING):
        registry.close()
    assert registry.status() == []
    assert "cannot close a CUDA shared memory handle: CUDA error 400" in caplog.text


def test_system_and_cuda_regions_share_one_namespace_of_names(tmp_path, stand_in_cuda):
    from plansmith_runtime.shared_memory import SystemSharedMemory

    (tmp_path / "input-key").write_bytes(bytes(64))
    regions = SharedMemoryRegions(SystemSharedMemory(tmp_path), registry_with_region(stand_in_cuda())[0])
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


def test_a_copy_cuda_refuses_is_the_requests_error(stand_in_cuda):
    registry, cuda, _ = registry_with_region(stand_in_cuda(devices=2), device_id=1, input_device=0)
    cuda.cudaMemcpy = lambda destination, source, nbytes, kind: (700,)  # cudaErrorIllegalAddress
    with pytest.raises(SharedMemoryError, match="CUDA shared memory region 'images': copy failed: CUDA error 700"):
        registry.input_array(SharedMemoryReference("images", 32), "input", np.dtype(np.float32), (8,))
    with pytest.raises(SharedMemoryError, match="CUDA shared memory region 'images': copy failed: CUDA error 700"):
        registry.write_output(SharedMemoryReference("images", 32), "logits", np.zeros(8, np.float32))
