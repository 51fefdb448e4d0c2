"""One served model in this process: loading the builder's engine into several instances,
inference through the batcher, and the startup objects moved out of the collector's reach."""

from __future__ import annotations

import asyncio
import gc

import numpy as np
import pytest

from plansmith_runtime.config import BatchingPolicy, ServingConfig
from plansmith_runtime.model import LoadOptions, ServedModel
from plansmith_runtime.system_metrics import PinnedMemoryUse

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_a_loaded_model_runs_two_sessions_answers_like_onnxruntime_and_froze_its_startup_objects(engines, tolerance):
    policy = BatchingPolicy(max_batch_size=8, enabled=True, max_queue_delay_us=1000)
    model = ServedModel(ServingConfig("mlp", policy, instances=2, warmup_iterations=1))
    gc.unfreeze()
    await model.load(LoadOptions(engines["mlp"].manifest_uri))
    try:
        assert model.ready, model.reason
        assert len(model._executors) == 2
        assert gc.get_freeze_count() > 0
        inputs = [engines["mlp"].model.sample_inputs(batch=1, seed=seed)["input"] for seed in range(4)]
        results = await asyncio.gather(*(model.infer({"input": x}, []) for x in inputs))
        session = engines["mlp"].session()
        for x, result in zip(inputs, results):
            np.testing.assert_allclose(result["logits"], session.run(None, {"input": x})[0], **tolerance)
        assert model.metrics.stats.success == 4
    finally:
        await model.stop(1.0)


@pytest.mark.parametrize("pool_bytes", [64 << 20, 0])
async def test_a_model_on_a_gpu_joins_batches_in_pinned_buffers_from_warmup_on_unless_the_pool_is_off(
        engines, monkeypatch, caplog, pool_bytes, tolerance):
    """The GPU's path on the CPU provider, pinned memory from numpy: each instance's buffer is
    allocated by warmup, serves the batches, and is freed at stop; with a pool of 0 bytes none is."""
    from plansmith_runtime import model as model_module
    from plansmith_runtime.executors import onnxruntime as ort_executor
    from plansmith_runtime.executors.pinned_memory import PinnedMemoryPool

    live: dict[int, np.ndarray] = {}

    class NumpyHostAllocator:
        def allocate(self, nbytes):
            array = np.empty(nbytes, np.uint8)
            live[array.ctypes.data] = array
            return array.ctypes.data

        def free(self, pointer):
            del live[pointer]

    monkeypatch.setattr(ort_executor, "uses_io_binding", lambda providers: True)
    monkeypatch.setattr(ort_executor, "session_batch_buckets", lambda provider, size: ort_executor.batch_buckets(size))
    monkeypatch.setattr(model_module, "PinnedMemoryPool", lambda size: PinnedMemoryPool(size, NumpyHostAllocator))
    built = engines["small_cnn"]
    policy = BatchingPolicy(max_batch_size=8, enabled=True, max_queue_delay_us=20_000)
    model = ServedModel(ServingConfig("cnn", policy, instances=2, warmup_iterations=1))
    await model.load(LoadOptions(built.manifest_uri, pinned_memory_pool_bytes=pool_bytes))
    try:
        assert model.ready, model.reason
        row_bytes = built.model.sample_inputs(batch=1)["input"].nbytes
        assert sorted(array.nbytes for array in live.values()) == ([8 * row_bytes] * 2 if pool_bytes else [])
        assert model.pinned_memory() == PinnedMemoryUse(pool_bytes, 2 * 8 * row_bytes if pool_bytes else 0)
        assert "pageable memory" not in caplog.text  # turned off is not a refusal to warn about
        inputs = [built.model.sample_inputs(batch=1, seed=seed)["input"] for seed in range(3)]
        results = await asyncio.gather(*(model.infer({"input": x}, []) for x in inputs))
        expected = built.session().run(None, {"input": np.concatenate(inputs)})[0]
        np.testing.assert_allclose(np.concatenate([result["logits"] for result in results]), expected, **tolerance)
    finally:
        await model.stop(1.0)
    assert not live and model.pinned_memory() == PinnedMemoryUse(pool_bytes, 0)


async def test_with_a_response_cache_a_repeated_request_is_answered_without_running_the_model(engines, tolerance):
    """Triton's response cache: the first request with some inputs runs and is kept (a miss), the
    same inputs again are answered from the cache (a hit: success, no queue, no execution), and
    other inputs run; the statistics and the metrics say so with Triton's names."""
    from plansmith_runtime.metrics import model_statistics

    policy = BatchingPolicy(max_batch_size=8, enabled=True, max_queue_delay_us=100)
    model = ServedModel(ServingConfig("mlp", policy, warmup_iterations=1, response_cache_bytes=1 << 20))
    await model.load(LoadOptions(engines["mlp"].manifest_uri))
    try:
        assert model.ready, model.reason
        session = engines["mlp"].session()
        x, other = (engines["mlp"].model.sample_inputs(batch=2, seed=seed)["input"] for seed in (1, 2))
        executions = model.metrics.stats.exec_count  # warmup's
        first = await model.infer({"input": x}, [])
        again = await model.infer({"input": x.copy()}, ["logits"])
        third = await model.infer({"input": other}, [])
        np.testing.assert_allclose(first["logits"], session.run(None, {"input": x})[0], **tolerance)
        np.testing.assert_array_equal(again["logits"], first["logits"])
        np.testing.assert_allclose(third["logits"], session.run(None, {"input": other})[0], **tolerance)
        stats = model.metrics.stats
        assert (stats.success, stats.cache_hits, stats.cache_misses) == (3, 1, 2)
        assert stats.exec_count - executions == 2 and stats.cache_hit_us > 0 and stats.cache_miss_us > 0
        reported = model_statistics("mlp", "1", stats)["inference_stats"]
        counts = [reported[name]["count"] for name in ("success", "queue", "compute_infer", "cache_hit", "cache_miss")]
        assert counts == [3, 3, 2, 1, 2]  # as Triton: a cache hit counts in queue, not in compute
        rendered = model.metrics.render().decode()
        assert 'nv_cache_num_hits_per_model{model="mlp",version="1"} 1\n' in rendered
        assert 'nv_cache_num_misses_per_model{model="mlp",version="1"} 2\n' in rendered
        assert model.model_config().response_cache.enable
    finally:
        await model.stop(1.0)


async def test_without_a_response_cache_nothing_is_cached_or_reported(engines):
    policy = BatchingPolicy(max_batch_size=8, enabled=True, max_queue_delay_us=100)
    model = ServedModel(ServingConfig("mlp", policy, warmup_iterations=1))
    await model.load(LoadOptions(engines["mlp"].manifest_uri))
    try:
        x = engines["mlp"].model.sample_inputs(batch=1, seed=1)["input"]
        executions = model.metrics.stats.exec_count
        await model.infer({"input": x}, [])
        await model.infer({"input": x}, [])
        assert model.metrics.stats.exec_count - executions == 2 and model.metrics.stats.cache_hits == 0
        assert "nv_cache_" not in model.metrics.render().decode()
        assert not model.model_config().HasField("response_cache")
    finally:
        await model.stop(1.0)


@pytest.mark.parametrize("response_cache_bytes", [0, 1 << 20])
async def test_a_request_whose_response_fails_counts_as_a_failure_not_a_success(engines, response_cache_bytes):
    """The front end's `respond` (writing an output into a region too small for it) is the
    request's last step: when it raises, the request counts as a failure, as Triton's backends
    count it, whether it ran or came from the response cache; `respond`'s value is the answer."""
    from plansmith_runtime.protocol import SharedMemoryError

    def too_small(outputs):
        raise SharedMemoryError("output 'logits': the region is too small")

    policy = BatchingPolicy(max_batch_size=8, enabled=True, max_queue_delay_us=100)
    model = ServedModel(ServingConfig("mlp", policy, warmup_iterations=1, response_cache_bytes=response_cache_bytes))
    await model.load(LoadOptions(engines["mlp"].manifest_uri))
    try:
        x = engines["mlp"].model.sample_inputs(batch=1, seed=5)["input"]
        assert await model.infer({"input": x}, [], respond=lambda outputs: sorted(outputs)) == ["logits"]
        for _ in range(2):  # with a cache, the second one is a hit
            with pytest.raises(SharedMemoryError, match="too small"):
                await model.infer({"input": x}, [], respond=too_small)
        stats = model.metrics.stats
        assert (stats.success, stats.failure, stats.in_flight) == (1, 2, 0)
        assert stats.cache_hits == 0 and stats.failure_us > 0
    finally:
        await model.stop(1.0)


async def load_on_stand_in_device(built, policy: BatchingPolicy, cuda, response_cache_bytes: int = 0) -> ServedModel:
    """The small CNN served with IO binding, its executors' device batches on a stand-in CUDA
    runtime (host memory), so that what is copied where is visible."""
    from plansmith_runtime.executors import onnxruntime as ort_executor
    from plansmith_runtime.executors.device_memory import DeviceBatches

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ort_executor, "uses_io_binding", lambda providers: True)
        model = ServedModel(ServingConfig("cnn", policy, warmup_iterations=1, response_cache_bytes=response_cache_bytes))
        await model.load(LoadOptions(built.manifest_uri, pinned_memory_pool_bytes=0))
    for executor in model._executors:
        executor.device_inputs, executor.device_batches = 0, DeviceBatches(0, 8, runtime=cuda)
    return model


async def test_outputs_named_in_a_device_region_come_through_the_host_with_the_response_cache(cpu_engines,
                                                                                              stand_in_cuda, tolerance):
    """The response cache keeps host copies of what it answers: a request's device destination is
    not handed to the executor, and the output comes back as an array (its region is written from
    it), on a miss and on a hit."""
    from plansmith_runtime.executors.device_memory import DeviceDestination

    built, cuda = cpu_engines["small_cnn"], stand_in_cuda()
    policy = BatchingPolicy(max_batch_size=8, enabled=True, max_queue_delay_us=100)
    model = await load_on_stand_in_device(built, policy, cuda, response_cache_bytes=1 << 20)
    try:
        x = built.model.sample_inputs(batch=2, seed=7)["input"]
        expected = built.session().run(None, {"input": x})[0]
        region = DeviceDestination(cuda.cudaMalloc(expected.nbytes)[1], expected.nbytes, 0, cuda)
        for _ in range(2):  # a miss, then a hit
            answer = await model.infer({"input": x}, [], output_destinations={"logits": region})
            assert type(answer["logits"]) is np.ndarray and cuda.copies == []
            np.testing.assert_allclose(answer["logits"], expected, **tolerance)
        assert model.metrics.stats.cache_hits == 1
    finally:
        await model.stop(1.0)


async def test_a_model_without_a_batch_dimension_writes_a_requests_whole_output_into_its_device_region(
        cpu_engines, stand_in_cuda, tolerance):
    """Served with maxBatchSize 0, a request of two images is one item that runs alone: its whole
    output (both images' logits) is copied device-to-device into its region, not one row of it."""
    from plansmith_runtime.executors.device_memory import DeviceDestination, DeviceTensor

    built, cuda = cpu_engines["small_cnn"], stand_in_cuda()
    model = await load_on_stand_in_device(built, BatchingPolicy(max_batch_size=0), cuda)
    try:
        assert not model.has_batch_dim
        x = built.model.sample_inputs(batch=2, seed=7)["input"]
        expected = built.session().run(None, {"input": x})[0]
        address = cuda.cudaMalloc(expected.nbytes)[1]
        region = DeviceDestination(address, expected.nbytes, 0, cuda)
        answer = await model.infer({"input": x}, [], output_destinations={"logits": region})
        written = answer["logits"]
        assert isinstance(written, DeviceTensor) and written.pointer == address and written.shape == expected.shape
        assert cuda.copies == [("cudaMemcpyDeviceToDevice", expected.nbytes, 0)]
        in_region = np.frombuffer(cuda.device_memory[address], np.float32).reshape(expected.shape)
        np.testing.assert_allclose(in_region, expected, **tolerance)
        small = DeviceDestination(address, expected.nbytes - 1, 0, cuda)  # no room: the host path, and the region's error
        answer = await model.infer({"input": x}, [], output_destinations={"logits": small})
        assert type(answer["logits"]) is np.ndarray and len(cuda.copies) == 1
    finally:
        await model.stop(1.0)


async def test_stopping_past_the_grace_period_fails_the_running_request_and_leaves_its_executor_open(engines):
    """A batch still computing when the grace period ends: its request fails (503 / UNAVAILABLE), and
    the executor it runs on is not closed under it (the process is exiting)."""
    import threading

    from plansmith_runtime.scheduler import ShuttingDown

    model = ServedModel(ServingConfig("mlp", BatchingPolicy(max_batch_size=8, enabled=True), warmup_iterations=1))
    await model.load(LoadOptions(engines["mlp"].manifest_uri))
    executor = model._executors[0]
    started, release, closed = threading.Event(), threading.Event(), []
    run = executor.run

    def slow_run(feeds, destinations=None):
        started.set()
        release.wait(10)
        return run(feeds, destinations)

    executor.run, executor.close = slow_run, lambda: closed.append(executor)
    model.batcher.inline_max_items = 0  # on an instance thread, as any batch longer than INLINE_MAX_US
    try:
        request = asyncio.ensure_future(model.infer({"input": engines["mlp"].model.sample_inputs(batch=1)["input"]}, []))
        assert await asyncio.get_running_loop().run_in_executor(None, started.wait, 5)
        await model.stop(0.05)
        with pytest.raises(ShuttingDown):
            await asyncio.wait_for(request, 5)
        assert closed == []
    finally:
        release.set()


async def test_a_load_failing_after_the_manifest_was_read_leaves_no_metadata_config_or_statistics(engines, monkeypatch):
    """A model that did not load answers metadata and config requests as not ready (503), not with
    the signature of an engine it is not serving; as in Triton, the statistics extension lists it
    not, and asked for it by name answers that it is not available (400 / INVALID_ARGUMENT)."""
    import json

    import grpc
    from tritonclient.grpc import service_pb2

    import plansmith_runtime.model as model_module
    from plansmith_runtime.grpc_api import InferenceService
    from plansmith_runtime.grpc_transport import GrpcError
    from plansmith_runtime.http_api import HttpApi, Route
    from plansmith_runtime.model import ModelNotReady
    from plansmith_runtime.shared_memory import SharedMemoryRegions

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory while creating the session")

    monkeypatch.setattr(model_module, "create_executor", out_of_memory)
    model = ServedModel(ServingConfig("mlp", BatchingPolicy(max_batch_size=8, enabled=True), warmup_iterations=1))
    await model.load(LoadOptions(engines["mlp"].manifest_uri))
    assert model.state == "UNAVAILABLE" and "out of memory" in model.reason
    with pytest.raises(ModelNotReady, match="out of memory"):
        model.metadata()
    assert model.model_config() is None
    api = HttpApi(model, lambda: model.ready, SharedMemoryRegions(), None, None)
    assert json.loads(api.model_statistics(Route("model_statistics")).body) == {"model_stats": []}
    named = api.model_statistics(Route("model_statistics", model="mlp"))
    assert named.status == 400 and json.loads(named.body) == {"error": "requested model 'mlp' is not available"}
    service = InferenceService(model, lambda: model.ready, SharedMemoryRegions(), None, None)
    assert not service.ModelStatistics(service_pb2.ModelStatisticsRequest()).model_stats
    with pytest.raises(GrpcError, match="not available") as refused:
        service.ModelStatistics(service_pb2.ModelStatisticsRequest(name="mlp"))
    assert refused.value.status == grpc.StatusCode.INVALID_ARGUMENT
