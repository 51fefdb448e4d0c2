"""The TensorRT executor's device path, against stand-ins for TensorRT and cuda-python.

Neither TensorRT nor a GPU exists on the machines these tests run on (test_tensorrt_logic.py covers
the pure decisions). The stand-ins below implement the TensorRT 10 and CUDA runtime calls the
executor makes, with host memory for the device and an engine that doubles its input, so that the
executor's own work is exercised: buffers sized from the profiles, the profile chosen per batch,
input shapes set, batches joined in the pinned host buffers and copied both ways, outputs returned
as arrays of their own, and everything freed at close. They are not a check of TensorRT itself.
"""

from __future__ import annotations

import ctypes
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from plansmith_runtime.executors import ExecutorError
from plansmith_runtime.executors.device_memory import DeviceDestination, DeviceTensor, WrittenOnDevice, batch_destinations
from plansmith_runtime.executors.tensorrt import NoProfileFits, TensorRTExecutor

# one input, two profiles: batches 1-4 (opt 2) and 1-16 (opt 8); rows of 3 float32 values
PROFILES = [((1, 3), (2, 3), (4, 3)), ((1, 3), (8, 3), (16, 3))]


class FakeCudaRuntime(types.ModuleType):
    """cudaMalloc / cudaMallocHost from numpy; copies with ctypes.memmove; errors are 0."""

    class cudaMemcpyKind:
        cudaMemcpyHostToDevice = "h2d"
        cudaMemcpyDeviceToHost = "d2h"
        cudaMemcpyDeviceToDevice = "d2d"

    def __init__(self) -> None:
        super().__init__("cuda.bindings.runtime")
        self.device: dict[int, np.ndarray] = {}
        self.pinned: dict[int, np.ndarray] = {}
        self.copies: list[tuple[str, int, int]] = []  # (kind, source address, bytes)
        self.streams = 0
        self.synchronized = 0

    def _allocate(self, table: dict, size: int):
        array = np.zeros(size, np.uint8)
        table[array.ctypes.data] = array
        return 0, array.ctypes.data

    def cudaMalloc(self, size):
        return self._allocate(self.device, size)

    def cudaMallocHost(self, size):
        return self._allocate(self.pinned, size)

    def cudaFree(self, pointer):
        del self.device[pointer]
        return (0,)

    def cudaFreeHost(self, pointer):
        del self.pinned[pointer]
        return (0,)

    def cudaStreamCreate(self):
        self.streams += 1
        return 0, 7

    def cudaStreamDestroy(self, stream):
        self.streams -= 1
        return (0,)

    def cudaMemcpyAsync(self, destination, source, size, kind, stream):
        ctypes.memmove(destination, source, size)
        self.copies.append((kind, source, size))
        return (0,)

    def cudaStreamSynchronize(self, stream):
        self.synchronized += 1
        return (0,)


class FakeContext:
    def __init__(self, engine: "FakeEngine") -> None:
        self.engine = engine
        self.addresses: dict[str, int] = {}
        self.input_shape: tuple[int, ...] = ()
        self.profiles_set: list[int] = []

    def set_tensor_address(self, name, pointer):
        self.addresses[name] = pointer

    def set_optimization_profile_async(self, profile, stream):
        self.profiles_set.append(profile)

    def set_input_shape(self, name, shape):
        self.input_shape = tuple(shape)

    def get_tensor_shape(self, name):
        return self.input_shape

    def execute_async_v3(self, stream):
        count = int(np.prod(self.input_shape))
        source = np.ctypeslib.as_array((ctypes.c_float * count).from_address(self.addresses["x"]))
        target = np.ctypeslib.as_array((ctypes.c_float * count).from_address(self.addresses["y"]))
        target[:] = source * 2
        return True


class FakeEngine:
    num_io_tensors = 2
    num_optimization_profiles = len(PROFILES)

    def __init__(self) -> None:
        self.contexts: list[FakeContext] = []

    def get_tensor_name(self, index):
        return ("x", "y")[index]

    def get_tensor_mode(self, name):
        return "input" if name == "x" else "output"

    def get_tensor_dtype(self, name):
        return "float"

    def get_tensor_profile_shape(self, name, profile):
        return [list(shape) for shape in PROFILES[profile]]

    def get_tensor_shape(self, name):
        return (-1, 3)

    def create_execution_context(self):
        self.contexts.append(FakeContext(self))
        return self.contexts[-1]


def fake_tensorrt(engine: FakeEngine) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    trt.TensorIOMode = types.SimpleNamespace(INPUT="input", OUTPUT="output")
    trt.nptype = lambda dtype: np.float32
    trt.Runtime = lambda logger: types.SimpleNamespace(deserialize_cuda_engine=lambda plan: engine)
    return trt


def executor_over(engine: FakeEngine, tmp_path: Path, monkeypatch) -> tuple[TensorRTExecutor, FakeCudaRuntime]:
    """A TensorRTExecutor over `engine`, with the fake TensorRT and CUDA runtime in sys.modules."""
    cudart = FakeCudaRuntime()
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime = cudart
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(engine))
    monkeypatch.setitem(sys.modules, "cuda", types.ModuleType("cuda"))
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", cudart)
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"plan")
    return TensorRTExecutor(types.SimpleNamespace(path=lambda name: plan)), cudart


@pytest.fixture
def executor_and_fakes(tmp_path: Path, monkeypatch):
    engine = FakeEngine()
    executor, cudart = executor_over(engine, tmp_path, monkeypatch)
    engine.contexts[0].profiles_set.clear()  # the output shapes were probed under each profile
    return executor, cudart, engine


def rows(count: int, start: float) -> np.ndarray:
    return np.arange(start, start + 3 * count, dtype=np.float32).reshape(count, 3)


def test_buffers_fit_the_largest_profile_and_are_freed_at_close(executor_and_fakes):
    executor, cudart, _ = executor_and_fakes
    assert sorted(array.nbytes for array in cudart.device.values()) == [16 * 3 * 4] * 2
    assert sorted(array.nbytes for array in cudart.pinned.values()) == [16 * 3 * 4] * 2
    executor.close()
    assert not cudart.device and not cudart.pinned and cudart.streams == 0


class SequenceEngine(FakeEngine):
    """x and y of shape [batch, sequence]: batches 1-4, sequences 1-64; y has x's shape."""

    num_optimization_profiles = 1

    def get_tensor_profile_shape(self, name, profile):
        return [[1, 1], [2, 16], [4, 64]]

    def get_tensor_shape(self, name):
        return (-1, -1)


def test_an_outputs_buffers_fit_the_largest_shape_its_inputs_allow_not_only_the_largest_batch(tmp_path, monkeypatch):
    """A sequence output sized by putting the largest batch for every dynamic dimension got (4, 4):
    TensorRT would have written a (2, 64) batch's output past its end."""
    engine = SequenceEngine()
    executor, cudart = executor_over(engine, tmp_path, monkeypatch)
    assert cudart.device[engine.contexts[0].addresses["y"]].nbytes == 4 * 64 * 4
    x = np.arange(2 * 64, dtype=np.float32).reshape(2, 64)
    np.testing.assert_array_equal(executor.run({"x": x})["y"], x * 2)
    executor.close()


def test_a_batch_is_joined_in_the_pinned_buffer_and_copied_to_the_device_from_there(executor_and_fakes):
    executor, cudart, engine = executor_and_fakes
    requests = [{"x": rows(1, 0)}, {"x": rows(2, 100)}]
    feeds = executor.form_batch(requests)
    assert feeds["x"].ctypes.data in cudart.pinned  # joined in the pinned buffer itself
    outputs = executor.run(feeds)
    np.testing.assert_array_equal(outputs["y"], np.concatenate([rows(1, 0), rows(2, 100)]) * 2)
    assert [(kind, size) for kind, _, size in cudart.copies] == [("h2d", 3 * 3 * 4), ("d2h", 3 * 3 * 4)]
    assert cudart.copies[0][1] == feeds["x"].ctypes.data
    assert engine.contexts[0].profiles_set == [0]  # batch 3: the tight profile
    assert not any(np.shares_memory(outputs["y"], buffer) for buffer in cudart.pinned.values())  # the caller's to keep


def test_feeds_from_elsewhere_are_staged_and_the_profile_follows_the_batch(executor_and_fakes):
    executor, cudart, engine = executor_and_fakes
    for batch, start in ((2, 0), (9, 50), (9, 70), (1, 5)):
        outputs = executor.run({"x": rows(batch, start)})
        np.testing.assert_array_equal(outputs["y"], rows(batch, start) * 2)
    assert engine.contexts[0].profiles_set == [0, 1, 0]  # switched only when the batch needs it


def test_a_failed_run_waits_for_its_input_copies_before_the_pinned_buffers_are_reused(executor_and_fakes):
    executor, cudart, engine = executor_and_fakes
    engine.contexts[0].execute_async_v3 = lambda stream: False
    feeds = executor.form_batch([{"x": rows(2, 0)}])
    with pytest.raises(ExecutorError, match="execute_async_v3 failed"):
        executor.run(feeds)
    assert [kind for kind, _, _ in cudart.copies] == ["h2d"] and cudart.synchronized == 1


def test_a_batch_larger_than_the_buffers_is_joined_in_pageable_memory_and_refused(executor_and_fakes):
    executor, cudart, _ = executor_and_fakes
    feeds = executor.form_batch([{"x": rows(10, 0)}, {"x": rows(7, 0)}])
    assert feeds["x"].shape == (17, 3) and feeds["x"].ctypes.data not in cudart.pinned
    with pytest.raises(NoProfileFits, match="no optimization profile accepts input shapes"):
        executor.run(feeds)


def in_a_region(cudart, array: np.ndarray, keep: list, device_id: int = 0) -> DeviceTensor:
    """`array` in "device memory" a client's CUDA shared memory region would hold (host memory here)."""
    memory = np.ascontiguousarray(array).copy()
    keep.append(memory)
    return DeviceTensor(memory.ctypes.data, memory.dtype, memory.shape, device_id, cudart)


def test_inputs_in_cuda_regions_are_gathered_into_the_engines_device_buffer(executor_and_fakes):
    """Device-to-device from the regions, host-to-device from the requests that sent bytes, straight
    into the buffer the engine reads: nothing goes through the pinned buffer."""
    executor, cudart, engine = executor_and_fakes
    assert executor.device_inputs == 0
    keep: list = []
    region = in_a_region(cudart, rows(2, 10), keep)
    feeds = executor.form_batch([{"x": region}, {"x": rows(1, 500)}, {"x": in_a_region(cudart, rows(1, 90), keep)}])
    assert feeds["x"].pointer == engine.contexts[0].addresses["x"] and feeds["x"].shape == (4, 3)
    outputs = executor.run(feeds)
    np.testing.assert_array_equal(outputs["y"], np.concatenate([rows(2, 10), rows(1, 500), rows(1, 90)]) * 2)
    assert [(kind, size) for kind, _, size in cudart.copies] == [("d2d", 24), ("h2d", 12), ("d2d", 12), ("d2h", 48)]
    assert cudart.copies[0][1] == region.pointer
    assert engine.contexts[0].profiles_set == [0]

    cudart.copies.clear()  # a device tensor handed to run as it is (not gathered) is copied in first
    np.testing.assert_array_equal(executor.run({"x": region})["y"], rows(2, 10) * 2)
    assert [kind for kind, _, _ in cudart.copies] == ["d2d", "d2h"]


def test_device_inputs_no_profile_takes_or_on_another_gpu_are_refused_before_any_copy(executor_and_fakes):
    executor, cudart, _ = executor_and_fakes
    keep: list = []
    with pytest.raises(NoProfileFits, match="no optimization profile accepts input shapes"):
        executor.form_batch([{"x": in_a_region(cudart, rows(16, 0), keep)}, {"x": rows(1, 0)}])
    with pytest.raises(ExecutorError, match="input 'x' is in the memory of CUDA device 1, the engine runs on device 0"):
        executor.form_batch([{"x": in_a_region(cudart, rows(1, 0), keep, device_id=1)}])
    assert cudart.copies == []


def test_outputs_every_request_wants_in_a_region_are_copied_there_from_the_engines_buffer(executor_and_fakes):
    """On the instance's stream after the run, each request's rows to its region; nothing of that
    output goes to the pinned buffer. A batch with a request that wants it in the response takes
    the host path."""
    executor, cudart, engine = executor_and_fakes
    keep: list = []
    regions = [in_a_region(cudart, np.zeros((3, 3), np.float32), keep) for _ in range(2)]
    wanted = [{"y": DeviceDestination(region.pointer, region.nbytes, 0, cudart)} for region in regions]
    x = [rows(2, 10), rows(1, 500)]
    outputs = executor.run(executor.form_batch([{"x": x[0]}, {"x": x[1]}]), batch_destinations([2, 1], wanted))
    assert outputs == {"y": WrittenOnDevice(np.dtype(np.float32), (3, 3))}
    assert [(kind, source, size) for kind, source, size in cudart.copies[1:]] == [
        ("d2d", engine.contexts[0].addresses["y"], 24), ("d2d", engine.contexts[0].addresses["y"] + 24, 12)]
    np.testing.assert_array_equal(keep[0][:2], x[0] * 2)
    np.testing.assert_array_equal(keep[1][:1], x[1] * 2)

    cudart.copies.clear()
    outputs = executor.run(executor.form_batch([{"x": x[0]}, {"x": x[1]}]), batch_destinations([2, 1], [wanted[0], None]))
    np.testing.assert_array_equal(outputs["y"], np.concatenate(x) * 2)
    assert [kind for kind, _, _ in cudart.copies] == ["h2d", "d2h"]


def test_without_a_batch_dimension_a_requests_whole_output_is_copied_into_its_region(executor_and_fakes):
    """Served with maxBatchSize 0 a request runs alone, as one item: its three rows are its output."""
    executor, cudart, engine = executor_and_fakes
    keep: list = []
    region = in_a_region(cudart, np.zeros((3, 3), np.float32), keep)
    wanted = {"y": DeviceDestination(region.pointer, region.nbytes, 0, cudart)}
    x = rows(3, 7)
    outputs = executor.run(executor.form_batch([{"x": x}]), batch_destinations([1], [wanted], batch_dim=False))
    assert outputs == {"y": WrittenOnDevice(np.dtype(np.float32), (3, 3))}
    assert [(kind, size) for kind, _, size in cudart.copies[1:]] == [("d2d", 36)]
    np.testing.assert_array_equal(keep[0], x * 2)
