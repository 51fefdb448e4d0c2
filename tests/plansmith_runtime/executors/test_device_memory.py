"""Device tensors and the device buffers a CUDA executor gathers batches in, against conftest's
stand-in for cuda-python's runtime (device memory played by host memory, so the bytes can be read).
The executor binding them to a session: test_onnxruntime.py; on a real GPU: test_server.py."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from plansmith_runtime.executors import ExecutorError
from plansmith_runtime.executors.device_memory import DeviceBatches, DeviceTensor, has_device_inputs


def on_device(cuda, array: np.ndarray) -> DeviceTensor:
    pointer = cuda.cudaMalloc(array.nbytes)[1]
    ctypes.memmove(pointer, array.ctypes.data, array.nbytes)
    return DeviceTensor(pointer, array.dtype, array.shape, 0, cuda)


def test_a_device_tensor_reads_like_an_array_and_pads_only_into_room_it_has(stand_in_cuda):
    cuda = stand_in_cuda()
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    tensor = on_device(cuda, x)
    assert (tensor.shape, tensor.ndim, tensor.nbytes) == ((3, 4), 2, 48)
    np.testing.assert_array_equal(np.asarray(tensor), x)
    np.testing.assert_array_equal(np.asarray(tensor, dtype=np.float64), x)
    assert np.ascontiguousarray(tensor).dtype == np.float32
    assert tensor.with_rows(3) is tensor and tensor.with_rows(4) is None  # a region holds what it holds
    padded = DeviceTensor(tensor.pointer, x.dtype, (2, 4), 0, cuda, capacity_rows=3).with_rows(3)
    assert padded.shape == (3, 4) and padded.pointer == tensor.pointer
    assert has_device_inputs([{"a": x}, {"a": tensor}]) and not has_device_inputs([{"a": x}])


def test_buffers_are_kept_grown_for_a_larger_batch_and_freed_at_close(stand_in_cuda):
    cuda = stand_in_cuda()
    batches = DeviceBatches(0, max_rows=2, runtime=cuda)
    rows = [np.full((1, 4), index, np.float32) for index in range(5)]
    parts = [on_device(cuda, row) for row in rows]
    regions = set(cuda.device_memory)

    first = batches.gather([{"x": parts[0]}, {"x": rows[1]}], rows_to=2)
    [buffer] = set(cuda.device_memory) - regions
    assert first["x"].pointer == buffer and cuda.device_memory[buffer]._length_ == 2 * 16  # room for max_rows
    np.testing.assert_array_equal(np.asarray(first["x"]), np.concatenate(rows[:2]))

    again = batches.gather([{"x": parts[2]}, {"x": parts[3]}], rows_to=2)
    assert again["x"].pointer == buffer  # the same buffer, batch after batch

    larger = batches.gather([{"x": part} for part in parts[:3]], rows_to=4)  # beyond max_rows: grown
    [grown] = set(cuda.device_memory) - regions
    assert grown != buffer and cuda.device_memory[grown]._length_ == 4 * 16
    np.testing.assert_array_equal(ctypes.string_at(grown, 64), np.concatenate([*rows[:3], np.zeros((1, 4), np.float32)]).tobytes())
    assert larger["x"].with_rows(4) is not None and larger["x"].with_rows(5) is None
    assert cuda.synchronized == 3  # once a batch, before it runs

    batches.close()
    assert set(cuda.device_memory) == regions and cuda.streams == []
    batches.close()  # twice: nothing left to free


def test_a_cuda_failure_while_gathering_is_an_executor_error(stand_in_cuda):
    cuda = stand_in_cuda()
    batches = DeviceBatches(0, max_rows=2, runtime=cuda)
    cuda.cudaMalloc = lambda nbytes: (2, None)  # cudaErrorMemoryAllocation
    with pytest.raises(ExecutorError, match="CUDA error 2"):
        batches.gather([{"x": on_device(stand_in_cuda(), np.zeros((1, 4), np.float32))}, {"x": np.zeros((1, 4), np.float32)}],
                       rows_to=2)


def test_what_needs_host_bytes_reads_a_device_tensor_as_its_host_copy(stand_in_cuda):
    """The response cache's key and a TENSORS trace see the same bytes whether the input came in the
    request or stayed in a CUDA region."""
    from plansmith_runtime.response_cache import response_key
    from plansmith_runtime.tracing import tensor_text

    x = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
    tensor = on_device(stand_in_cuda(), x)
    assert response_key({"input": tensor}) == response_key({"input": x})
    assert tensor_text(tensor) == tensor_text(x)
