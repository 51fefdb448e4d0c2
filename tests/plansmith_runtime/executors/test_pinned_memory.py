"""Pinned batch buffers: the pool's budget and refusals, joining and padding batches in place, and the
ONNX Runtime executor running batches joined there. CUDA's own allocation runs on the GPU machine
(bench/gpu); here the pool's memory comes from numpy, which exercises every decision around it."""

from __future__ import annotations

import logging
import sys

import numpy as np
import pytest

from plansmith_runtime.executors import ExecutorError, create_executor
from plansmith_runtime.executors.cuda import check_cuda
from plansmith_runtime.executors.onnxruntime import OnnxRuntimeExecutor
from plansmith_runtime.executors.pinned_memory import (BatchStaging, CudaHostAllocator, PinnedMemoryPool,
                                                        PinnedMemoryUnavailable)
from plansmith_runtime.loader import fetch_engine


class NumpyHostAllocator:
    """Host memory from numpy in place of cudaHostAlloc; remembers what was freed."""

    def __init__(self) -> None:
        self.live: dict[int, np.ndarray] = {}
        self.freed: list[int] = []

    def allocate(self, nbytes: int) -> int:
        array = np.empty(nbytes, np.uint8)
        self.live[array.ctypes.data] = array
        return array.ctypes.data

    def free(self, pointer: int) -> None:
        del self.live[pointer]
        self.freed.append(pointer)


def numpy_pool(byte_size: int) -> tuple[PinnedMemoryPool, NumpyHostAllocator]:
    allocator = NumpyHostAllocator()
    return PinnedMemoryPool(byte_size, lambda: allocator), allocator


def rows(count: int, value: float, width: int = 3) -> np.ndarray:
    return np.full((count, width), value, np.float32)


def test_the_pool_hands_out_buffers_within_its_budget_and_takes_them_back():
    pool, allocator = numpy_pool(1000)
    first, second = pool.allocate(600), pool.allocate(400)
    assert first.nbytes == 600 and second.nbytes == 400 and pool.used_bytes == 1000
    assert first.ctypes.data in allocator.live  # the allocator's memory, not a copy
    with pytest.raises(PinnedMemoryUnavailable, match=r"pool \(1000 bytes, 1000 in use\) has no room for 1 bytes more"):
        pool.allocate(1)
    pool.release(first)
    assert pool.used_bytes == 400 and allocator.freed == [first.ctypes.data]
    assert pool.allocate(600).nbytes == 600
    pool.close()
    assert pool.used_bytes == 0 and not allocator.live


def test_without_cuda_python_no_pinned_memory_is_asked_for_again(monkeypatch):
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)  # as where cuda-python is not installed
    attempts = []

    def factory():
        attempts.append(1)
        return CudaHostAllocator()

    pool = PinnedMemoryPool(1 << 20, factory)
    for _ in range(2):
        with pytest.raises(PinnedMemoryUnavailable, match="pinned memory is unavailable: cuda-python is not installed"):
            pool.allocate(64)
    assert len(attempts) == 1 and pool.used_bytes == 0


def test_a_cuda_error_is_raised_with_its_code():
    assert check_cuda((0, 1234)) == 1234 and check_cuda((0, 1, 2)) == (1, 2)
    with pytest.raises(ExecutorError, match="CUDA error 2"):
        check_cuda((2, 0))


def test_a_batch_is_joined_in_the_inputs_pinned_buffer_and_the_buffer_is_kept():
    pool, allocator = numpy_pool(1 << 20)
    staging = BatchStaging(pool, max_rows=8)
    requests = [{"x": rows(1, 1.0), "mask": np.ones((1, 2), np.int64)},
                {"x": rows(2, 2.0), "mask": np.zeros((2, 2), np.int64)}]
    feeds = staging.join(requests)
    np.testing.assert_array_equal(feeds["x"], np.concatenate([rows(1, 1.0), rows(2, 2.0)]))
    np.testing.assert_array_equal(feeds["mask"], [[1, 1], [0, 0], [0, 0]])
    assert feeds["mask"].dtype == np.int64
    assert pool.used_bytes == 8 * 3 * 4 + 8 * 2 * 8  # room for the largest batch, per input
    assert {feeds["x"].ctypes.data, feeds["mask"].ctypes.data} == set(allocator.live)
    again = staging.join([{"x": rows(4, 5.0), "mask": np.ones((4, 2), np.int64)},
                          {"x": rows(1, 6.0), "mask": np.ones((1, 2), np.int64)}])
    assert again["x"].ctypes.data == feeds["x"].ctypes.data and len(allocator.live) == 2
    np.testing.assert_array_equal(again["x"], np.concatenate([rows(4, 5.0), rows(1, 6.0)]))
    staging.close()
    assert pool.used_bytes == 0 and not allocator.live


def test_a_lone_request_is_not_copied_but_its_buffers_are_allocated():
    pool, allocator = numpy_pool(1 << 20)
    staging = BatchStaging(pool, max_rows=8)
    request = {"x": rows(3, 1.0)}
    feeds = staging.join([request])
    assert feeds["x"] is request["x"] and pool.used_bytes == 8 * 3 * 4
    padded = staging.pad(feeds, 4)  # not joined in the buffer: the executor pads a copy
    assert padded is None
    staging.close()
    assert pool.used_bytes == 0 and not allocator.live


def test_a_batch_joined_in_its_buffer_is_padded_in_place_with_zero_rows():
    pool, _ = numpy_pool(1 << 20)
    staging = BatchStaging(pool, max_rows=8)
    staging.join([{"x": rows(4, 9.0)}, {"x": rows(4, 9.0)}])  # leaves nines in every row
    feeds = staging.join([{"x": rows(1, 1.0)}, {"x": rows(2, 2.0)}])
    padded = staging.pad(feeds, 4)
    assert padded is not None and padded["x"].ctypes.data == feeds["x"].ctypes.data
    np.testing.assert_array_equal(padded["x"], np.concatenate([rows(1, 1.0), rows(2, 2.0), rows(1, 0.0)]))
    assert staging.pad(feeds, 9) is None  # beyond the buffer
    assert staging.pad({"x": rows(3, 2.0)}, 4) is None  # not joined here


def test_a_larger_row_shape_gets_a_larger_buffer_and_the_old_one_is_returned():
    pool, allocator = numpy_pool(1 << 20)
    staging = BatchStaging(pool, max_rows=2)
    small = staging.join([{"x": rows(1, 1.0, width=3)}, {"x": rows(1, 1.0, width=3)}])
    large = staging.join([{"x": rows(1, 2.0, width=50)}, {"x": rows(1, 3.0, width=50)}])
    np.testing.assert_array_equal(large["x"], np.concatenate([rows(1, 2.0, width=50), rows(1, 3.0, width=50)]))
    assert allocator.freed == [small["x"].ctypes.data] and pool.used_bytes == 2 * 50 * 4


def test_an_input_the_pool_has_no_room_for_is_joined_in_pageable_memory_with_one_warning(caplog):
    pool, allocator = numpy_pool(90)
    staging = BatchStaging(pool, max_rows=8)
    with caplog.at_level(logging.WARNING, logger="plansmith_runtime.executors.pinned_memory"):
        for _ in range(2):
            feeds = staging.join([{"x": rows(1, 1.0)}, {"x": rows(2, 2.0)}])
            np.testing.assert_array_equal(feeds["x"], np.concatenate([rows(1, 1.0), rows(2, 2.0)]))
    assert not allocator.live and staging.pad(feeds, 4) is None
    warnings = [record.getMessage() for record in caplog.records]
    assert warnings == ["batches of input 'x' are joined in pageable memory: the pinned memory pool (90 bytes, 0 in use) "
                        "has no room for 96 bytes more (--pinned-memory-pool-byte-size)"]


def test_the_executor_runs_batches_joined_and_padded_in_its_buffers(engines, tmp_path, monkeypatch):
    """The GPU's path on the CPU provider (its IO binding included): requests joined in the pool's
    memory, padded in place to the bucket's size, each bucket's session seeing only its size, and only
    the requests' rows returned."""
    from plansmith_runtime.executors import onnxruntime as ort_executor

    built = engines["small_cnn"]
    pool, allocator = numpy_pool(64 << 20)
    monkeypatch.setattr(ort_executor, "uses_io_binding", lambda providers: True)  # as for a session on a GPU
    executor = OnnxRuntimeExecutor(fetch_engine(built.manifest_uri, tmp_path / "engine"), intra_op_threads=1,
                                   buckets=(1, 2, 4, 8), pinned_pool=pool)
    assert pool.used_bytes == 0  # buffers come with the first batch (warmup's, when served)
    seen: dict[int, list] = {size: [] for size in executor.sessions}
    for size, session in executor.sessions.items():
        bind = session.io_binding
        session.io_binding = lambda size=size, bind=bind: RecordingBinding(bind(), seen[size])
    for sizes in ((1,), (1, 2), (3, 2), (8,), (4, 4)):
        requests = [built.model.sample_inputs(batch=size, seed=index) for index, size in enumerate(sizes)]
        feeds = executor.form_batch(requests)
        assert (feeds["input"].ctypes.data in allocator.live) == (len(requests) > 1)  # a lone request stays put
        joined = np.concatenate([request["input"] for request in requests])
        outputs = executor.run(feeds)
        assert outputs["logits"].shape[0] == sum(sizes)
        np.testing.assert_allclose(outputs["logits"], built.session().run(None, {"input": joined})[0], rtol=1e-5, atol=1e-5)
    assert {size: [len(batch) for batch in batches] for size, batches in seen.items()} == {
        1: [1], 2: [], 4: [4], 8: [8, 8, 8]}
    # padded in place, but for the lone request of 8
    assert [batch.ctypes.data in allocator.live for batch in seen[4] + seen[8]] == [True, True, False, True]
    executor.close()
    assert pool.used_bytes == 0


class RecordingBinding:
    """An IO binding that remembers the inputs bound to it."""

    def __init__(self, binding, bound: list) -> None:
        self._binding, self._bound = binding, bound

    def bind_cpu_input(self, name, array):
        self._bound.append(array)
        self._binding.bind_cpu_input(name, array)

    def __getattr__(self, name):
        return getattr(self._binding, name)


def test_only_sessions_on_a_gpu_get_pinned_buffers(engines, tmp_path):
    pool, allocator = numpy_pool(64 << 20)
    engine = fetch_engine(engines["small_cnn"].manifest_uri, tmp_path / "engine")
    request = engines["small_cnn"].model.sample_inputs(batch=2, seed=0)
    on_a_gpu = engines["small_cnn"].execution_provider == "CUDAExecutionProvider"  # where the builder found one
    for executor in (create_executor(engine, intra_op_threads=1, max_batch_size=8, pinned_pool=pool),
                     OnnxRuntimeExecutor(engine, intra_op_threads=1, buckets=(1, 2, 4, 8), pinned_pool=pool)):
        if on_a_gpu:
            assert executor.staging is not None
        else:
            assert executor.staging is None and executor.form_batch([request]) is request  # a CPU batch of one: no copy
        executor.close()
    assert not allocator.live  # closing gave back what the pool lent
