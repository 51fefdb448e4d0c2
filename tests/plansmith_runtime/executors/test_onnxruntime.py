"""The ONNX Runtime executor: provider choice, and a real session behind the executor interface."""

import ctypes

import numpy as np
import pytest

from plansmith_runtime.executors import create_executor
from plansmith_runtime.executors import ExecutorError
from plansmith_runtime.executors.device_memory import (DeviceBatches, DeviceDestination, DeviceTensor, WrittenOnDevice,
                                                       batch_destinations)
from plansmith_runtime.executors.pinned_memory import BatchStaging, PinnedMemoryPool
from plansmith_runtime.executors.onnxruntime import (OnnxRuntimeExecutor, batch_buckets, bucket_for, is_device_value,
                                                     numpy_dtype, providers_for, session_batch_buckets, uses_io_binding)
from plansmith_runtime.loader import fetch_engine


def test_cuda_engines_use_cuda_with_cpu_fallback_and_io_binding():
    providers = providers_for("CUDAExecutionProvider", device_id=1)
    assert providers == [("CUDAExecutionProvider", {"device_id": 1, "cudnn_conv_algo_search": "HEURISTIC",
                                                    "prefer_nhwc": "1"}), "CPUExecutionProvider"]
    assert uses_io_binding(providers)
    assert providers_for("CPUExecutionProvider") == ["CPUExecutionProvider"]
    assert not uses_io_binding(providers_for(None))


def test_executor_runs_the_builders_engine_like_onnxruntime(engines, tmp_path):
    built = engines["mlp"]
    engine = fetch_engine(built.manifest_uri, tmp_path / "engine")
    executor = create_executor(engine, intra_op_threads=1)
    x = built.model.sample_inputs(batch=5, seed=2)["input"]
    outputs = executor.run({"input": x})
    np.testing.assert_allclose(outputs["logits"], built.session().run(None, {"input": x})[0], rtol=1e-6, atol=1e-6)
    executor.close()


def test_executor_takes_ortvalues_and_binds_io(engines, tmp_path):
    """OrtValues (inputs already on the session's device) give the same answer as numpy arrays,
    through session.run and through the IO-binding path the GPU uses (exercised here on the CPU)."""
    import onnxruntime as ort

    built = engines["small_cnn"]
    executor = create_executor(fetch_engine(built.manifest_uri, tmp_path / "engine"), intra_op_threads=1)
    x = built.model.sample_inputs(batch=3, seed=4)["input"]
    expected = built.session().run(None, {"input": x})[0]
    value = ort.OrtValue.ortvalue_from_numpy(x, "cpu", 0)
    assert is_device_value(value) and not is_device_value(x)
    np.testing.assert_allclose(executor.run({"input": value})["logits"], expected, rtol=1e-5, atol=1e-5)
    executor.io_binding = True
    for feed in (x, value):
        outputs = executor.run({"input": feed})
        assert isinstance(outputs["logits"], np.ndarray)
        np.testing.assert_allclose(outputs["logits"], expected, rtol=1e-5, atol=1e-5)
    executor.close()


def test_gpu_engines_get_a_session_per_power_of_two_bucket_cpu_engines_one():
    assert batch_buckets(64) == (1, 2, 4, 8, 16, 32, 64)
    assert batch_buckets(48) == (1, 2, 4, 8, 16, 32, 48)
    assert batch_buckets(1) == (1,) and batch_buckets(0) == ()
    assert session_batch_buckets("CUDAExecutionProvider", 8) == (1, 2, 4, 8)
    assert session_batch_buckets("CPUExecutionProvider", 8) == () and session_batch_buckets(None, 8) == ()
    assert [bucket_for(size, (1, 2, 4, 8, 16, 32, 48)) for size in (1, 3, 4, 17, 33, 48)] == [1, 4, 4, 32, 48, 48]
    with pytest.raises(ExecutorError, match="larger than the largest bucket 8"):
        bucket_for(9, (1, 2, 4, 8))


def test_bucketed_executor_pads_to_the_next_bucket_and_answers_each_request_alone(engines, tmp_path):
    """Each bucket's session only ever sees its own batch size; padding rows never reach the caller."""
    built = engines["small_cnn"]
    if built.execution_provider == "CUDAExecutionProvider":
        pytest.skip("spies on session.run, which sessions on a GPU leave for IO binding (test_server's GPU tests "
                    "and test_model's pinned buffer tests run the buckets there)")
    engine = fetch_engine(built.manifest_uri, tmp_path / "engine")
    executor = OnnxRuntimeExecutor(engine, intra_op_threads=1, buckets=(1, 2, 4, 8))
    seen: dict[int, set] = {size: set() for size in executor.sessions}
    for size, session in executor.sessions.items():
        run = session.run
        session.run = lambda names, feeds, size=size, run=run: seen[size].add(feeds["input"].shape[0]) or run(names, feeds)
    for batch in (1, 3, 4, 5, 8, 2, 7):
        x = built.model.sample_inputs(batch=batch, seed=batch)["input"]
        outputs = executor.run({"input": x})
        assert outputs["logits"].shape[0] == batch
        np.testing.assert_allclose(outputs["logits"], built.session().run(None, {"input": x})[0], rtol=1e-5, atol=1e-5)
    assert seen == {1: {1}, 2: {2}, 4: {4}, 8: {8}}
    executor.close()


class FallbackSession:
    """What onnxruntime.InferenceSession gives when the CUDA provider could not load."""

    def __init__(self, path, options=None, providers=None):
        self.asked = providers

    def get_providers(self):
        return ["CPUExecutionProvider"]


def test_a_cuda_engine_whose_session_fell_back_to_the_cpu_is_refused(engines, tmp_path, monkeypatch):
    import dataclasses

    import onnxruntime

    from plansmith_runtime.executors import ExecutorError

    loaded = fetch_engine(engines["small_cnn"].manifest_uri, tmp_path / "engine")
    manifest = loaded.manifest.model_copy(update={"target": loaded.manifest.target.model_copy(
        update={"execution_provider": "CUDAExecutionProvider"})})
    monkeypatch.setattr(onnxruntime, "InferenceSession", FallbackSession)
    with pytest.raises(ExecutorError, match="CUDAExecutionProvider is not active"):
        create_executor(dataclasses.replace(loaded, manifest=manifest))


def device_tensor(cuda, array: np.ndarray, device_id: int = 0) -> DeviceTensor:
    """`array` placed in the stand-in's device memory, as a client's CUDA region would hold it."""
    pointer = cuda.cudaMalloc(array.nbytes)[1]
    ctypes.memmove(pointer, np.ascontiguousarray(array).ctypes.data, array.nbytes)
    return DeviceTensor(pointer, array.dtype, array.shape, device_id, cuda)


def test_device_inputs_are_bound_in_place_or_gathered_on_the_device(cpu_engines, tmp_path, stand_in_cuda):
    """The GPU executor's path for inputs in CUDA regions, exercised on the CPU: the stand-in's
    "device memory" is host memory, which the session binds as the CPU's. A lone request that fills
    its bucket is bound where it is; other batches are gathered into the executor's device buffer
    (device-to-device from regions, host-to-device from request bodies), padded with zero rows to
    their bucket; no byte goes through the host."""
    built = cpu_engines["small_cnn"]
    executor = OnnxRuntimeExecutor(fetch_engine(built.manifest_uri, tmp_path / "engine"), intra_op_threads=1,
                                   buckets=(1, 2, 4, 8))
    cuda = stand_in_cuda()
    executor.io_binding, executor.device_inputs = True, 0
    executor.device_batches = DeviceBatches(0, max_rows=8, runtime=cuda)

    class HostMemory:  # pinned memory's stand-in, for the host batches a GPU executor also joins
        def allocate(self, nbytes: int) -> int:
            return cuda.cudaMalloc(nbytes)[1]

        def free(self, pointer: int) -> None:
            cuda.cudaFree(pointer)

    executor.staging = BatchStaging(PinnedMemoryPool(1 << 20, HostMemory), max_rows=8)
    host = built.model.sample_inputs(batch=2, seed=3)["input"]
    expect_host = executor.run(executor.form_batch([{"input": host}, {"input": host[:1]}]))  # as warmup: pinned
    bound_rows = []
    for size, session in executor.sessions.items():
        run = session.run_with_iobinding
        session.run_with_iobinding = lambda binding, run=run, size=size: bound_rows.append(size) or run(binding)

    def form_and_run(*requests):
        """The batch's feeds, outputs, and every copy made from forming it to its outputs."""
        cuda.copies.clear()
        feeds = executor.form_batch([{"input": request} for request in requests])
        return feeds, executor.run(feeds), list(cuda.copies)

    def expect(outputs, *parts):
        x = np.concatenate([np.asarray(part) for part in parts])
        np.testing.assert_allclose(outputs["logits"], built.session().run(None, {"input": x})[0], rtol=1e-5, atol=1e-5)

    expect(expect_host, host, host[:1])
    pair = device_tensor(cuda, built.model.sample_inputs(batch=2, seed=1)["input"])
    feeds, outputs, copies = form_and_run(pair)
    assert feeds["input"] is pair and copies == []  # the region itself
    expect(outputs, pair)

    three = device_tensor(cuda, built.model.sample_inputs(batch=3, seed=2)["input"])
    row = three.nbytes // 3
    feeds, outputs, copies = form_and_run(three)
    assert feeds["input"].shape == three.shape and feeds["input"].capacity_rows == 4
    assert copies == [("cudaMemcpyDeviceToDevice", 3 * row, 0), ("cudaMemsetAsync", row, 0)]
    assert outputs["logits"].shape[0] == 3
    expect(outputs, three)

    allocated = set(cuda.device_memory)
    one = device_tensor(cuda, built.model.sample_inputs(batch=1, seed=4)["input"])
    _, outputs, copies = form_and_run(three, host, one)
    assert copies == [("cudaMemcpyDeviceToDevice", 3 * row, 0), ("cudaMemcpyHostToDevice", 2 * row, 0),
                      ("cudaMemcpyDeviceToDevice", row, 0), ("cudaMemsetAsync", 2 * row, 0)]
    assert outputs["logits"].shape[0] == 6
    expect(outputs, three, host, one)
    assert set(cuda.device_memory) == allocated | {one.pointer}  # the batch buffer is kept, not allocated again
    assert bound_rows == [2, 4, 8]

    with pytest.raises(ExecutorError, match="input 'input' is in the memory of CUDA device 1, the engine runs on device 0"):
        executor.form_batch([{"input": DeviceTensor(one.pointer, one.dtype, one.shape, 1, cuda)}, {"input": host}])
    executor.close()
    assert set(cuda.device_memory) == {pair.pointer, three.pointer, one.pointer} and cuda.streams == []  # all freed


def test_a_cpu_session_reads_device_inputs_from_a_host_copy(cpu_engines, tmp_path, stand_in_cuda):
    built = cpu_engines["small_cnn"]
    executor = create_executor(fetch_engine(built.manifest_uri, tmp_path / "engine"), intra_op_threads=1)
    assert executor.device_inputs is None  # the regions hand a CPU model host arrays; should one come anyway:
    cuda = stand_in_cuda()
    x = built.model.sample_inputs(batch=2, seed=5)["input"]
    outputs = executor.run(executor.form_batch([{"input": device_tensor(cuda, x)}]))
    np.testing.assert_allclose(outputs["logits"], built.session().run(None, {"input": x})[0], rtol=1e-5, atol=1e-5)
    assert [kind for kind, _, _ in cuda.copies] == ["cudaMemcpyDeviceToHost"]
    executor.close()


def test_outputs_every_request_wants_in_a_region_are_copied_there_device_to_device(cpu_engines, tmp_path, stand_in_cuda):
    """The other direction, on the CPU as above: when each request of a batch names a region of the
    model's device for the logits, the session's output rows are copied into the regions (no copy
    to the host); when one request wants them in its response, the batch's outputs come to the host."""
    built = cpu_engines["small_cnn"]
    executor = OnnxRuntimeExecutor(fetch_engine(built.manifest_uri, tmp_path / "engine"), intra_op_threads=1,
                                   buckets=(1, 2, 4))
    cuda = stand_in_cuda()
    executor.io_binding, executor.device_inputs = True, 0
    executor.device_batches = DeviceBatches(0, max_rows=4, runtime=cuda)
    assert executor.output_dtypes == {"logits": np.dtype(np.float32)}
    x = [device_tensor(cuda, built.model.sample_inputs(batch=rows, seed=20 + rows)["input"]) for rows in (2, 1)]
    expected = [built.session().run(None, {"input": np.asarray(tensor)})[0] for tensor in x]
    row = expected[0].nbytes // 2
    regions = [DeviceDestination(cuda.cudaMalloc(2 * row + 64)[1], 2 * row + 64, 0, cuda) for _ in x]

    def region_rows(index: int, rows: int) -> np.ndarray:
        return np.frombuffer(ctypes.string_at(regions[index].pointer, rows * row), np.float32).reshape(rows, -1)

    cuda.copies.clear()
    destinations = batch_destinations([2, 1], [{"logits": regions[0]}, {"logits": regions[1]}])
    outputs = executor.run(executor.form_batch([{"input": tensor} for tensor in x]), destinations)  # 3 rows, padded to 4
    assert outputs["logits"] == WrittenOnDevice(np.dtype(np.float32), (3, *expected[0].shape[1:]))
    assert [kind for kind, _, _ in cuda.copies if kind != "cudaMemsetAsync"] == ["cudaMemcpyDeviceToDevice"] * 4
    assert [nbytes for kind, nbytes, _ in cuda.copies[-2:]] == [2 * row, row]  # the two requests' rows, not the padding's
    np.testing.assert_allclose(region_rows(0, 2), expected[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(region_rows(1, 1), expected[1], rtol=1e-5, atol=1e-5)

    lone = executor.run(executor.form_batch([{"input": x[0]}]), batch_destinations([2], [{"logits": regions[1]}]))
    assert isinstance(lone["logits"], WrittenOnDevice)
    np.testing.assert_allclose(region_rows(1, 2), expected[0], rtol=1e-5, atol=1e-5)

    cuda.copies.clear()
    mixed = batch_destinations([2, 1], [{"logits": regions[0]}, None])  # the second wants its logits in the response
    outputs = executor.run(executor.form_batch([{"input": tensor} for tensor in x]), mixed)
    np.testing.assert_allclose(outputs["logits"], np.concatenate(expected), rtol=1e-5, atol=1e-5)
    assert [kind for kind, _, _ in cuda.copies if kind != "cudaMemsetAsync"] == ["cudaMemcpyDeviceToDevice"] * 2  # inputs only
    executor.close()


def test_onnx_runtime_tensor_types_map_to_numpy_dtypes_of_fixed_size_elements():
    assert numpy_dtype("tensor(float)") == np.float32 and numpy_dtype("tensor(double)") == np.float64
    assert numpy_dtype("tensor(float16)") == np.float16 and numpy_dtype("tensor(int64)") == np.int64
    assert numpy_dtype("tensor(bool)") == np.bool_
    for other in ("tensor(string)", "tensor(float4e2m1x)", "seq(tensor(float))", "map(int64,tensor(float))"):
        assert numpy_dtype(other) is None, other
