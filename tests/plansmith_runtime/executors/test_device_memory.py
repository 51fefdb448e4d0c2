"""Device tensors and the device buffers a CUDA executor gathers batches in, against conftest's
stand-in for cuda-python's runtime (device memory played by host memory, so the bytes can be read).
The executor binding them to a session: test_onnxruntime.py; on a real GPU: test_server.py."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from plansmith_runtime.executors import ExecutorError
from plansmith_runtime.batching import split
from plansmith_runtime.executors.device_memory import (DeviceBatches, DeviceDestination, DeviceTensor, WrittenOnDevice,
                                                       batch_destinations, has_device_inputs, outputs_in_place)


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


def destination(cuda, nbytes: int, device_id: int = 0) -> DeviceDestination:
    """A client's region of `nbytes`, as the CUDA registry hands it to the batcher for an output."""
    return DeviceDestination(cuda.cudaMalloc(nbytes)[1], nbytes, device_id, cuda)


def test_an_output_goes_to_the_device_only_when_every_request_has_room_for_it_there(stand_in_cuda):
    cuda = stand_in_cuda()
    row = 16  # bytes of one output row
    assert batch_destinations([1, 2], [None, {}]) is None  # nobody asked: the usual host path
    two, one = destination(cuda, 2 * row), destination(cuda, row)
    destinations = batch_destinations([2, 1], [{"y": two}, {"y": one, "z": destination(cuda, row)}])
    assert destinations.for_output("y", row, device_id=0) == (two, one)
    assert destinations.for_output("z", row, device_id=0) is None  # the first request wants z in its response
    assert destinations.for_output("y", row, device_id=1) is None  # regions of another GPU
    assert destinations.for_output("y", row + 4, device_id=0) is None  # too small: the host path reports it
    assert batch_destinations([1], [{"y": one}]).for_output("y", row, 0) == (one,)
    output = WrittenOnDevice(np.dtype(np.float32), (3, 5))
    assert destinations.item_nbytes(output) == 20  # a row: dimension 0 is the batch's
    assert batch_destinations([1], [{"y": one}], batch_dim=False).item_nbytes(output) == 60  # the whole output


def test_a_batchs_output_rows_are_copied_device_to_device_into_each_requests_region(stand_in_cuda):
    cuda = stand_in_cuda()
    batches = DeviceBatches(0, max_rows=4, runtime=cuda)
    output = on_device(cuda, np.arange(4 * 3, dtype=np.float32).reshape(4, 3))  # 3 rows of requests, 1 of padding
    first, second = destination(cuda, 2 * 12 + 8), destination(cuda, 12)  # the first has room to spare
    destinations = batch_destinations([2, 1], [{"y": first}, {"y": second}])
    cuda.copies.clear()
    assert batches.scatter("y", output.pointer, WrittenOnDevice(np.dtype(np.float32), (4, 3)), destinations)
    assert cuda.copies == [("cudaMemcpyDeviceToDevice", 24, 0), ("cudaMemcpyDeviceToDevice", 12, 0)]
    assert cuda.synchronized == 1  # the regions hold the rows before the responses say so
    written = WrittenOnDevice(np.dtype(np.float32), (4, 3))[:3]
    parts = split({"y": written, "x": np.zeros((3, 1))}, [2, 1])
    answers = [outputs_in_place(part, wanted) for part, wanted in zip(parts, destinations.by_request)]
    np.testing.assert_array_equal(np.asarray(answers[0]["y"]), np.arange(6, dtype=np.float32).reshape(2, 3))
    np.testing.assert_array_equal(np.asarray(answers[1]["y"]), np.arange(6, 9, dtype=np.float32).reshape(1, 3))
    assert answers[1]["y"].pointer == second.pointer and answers[1]["x"].shape == (1, 1)  # the others as they were
    assert outputs_in_place({"x": np.zeros(1)}, None).keys() == {"x"}

    cuda.copies.clear()
    short = batch_destinations([2, 1], [{"y": first}, {"y": destination(cuda, 8)}])
    assert not batches.scatter("y", output.pointer, WrittenOnDevice(np.dtype(np.float32), (4, 3)), short) and cuda.copies == []
    batches.close()
