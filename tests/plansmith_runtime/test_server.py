"""`plansmith serve` as users see it: real server processes serving the builder's engines, driven
by stock tritonclient over HTTP and gRPC (sync and asyncio)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import threading
import time
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.http as httpclient
import tritonclient.http.aio as httpaio
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from plansmith_runtime.http_transport import DIRECT_BODY_BYTES
from plansmith_runtime.system_metrics import NvmlGpus
from plansmith_runtime.trace_summary import read_traces, summarize


@pytest.fixture(scope="module")
def cnn_server(engines, module_server):
    return module_server("--manifest", engines["small_cnn"].manifest_uri, "--model-name", "cnn",
                         "--max-batch-size", "16", "--preferred-batch-sizes", "4,8", "--max-queue-delay-us", "2000",
                         "--instances", "2", "--warmup-iterations", "1", "--metrics-interval-ms", "100",
                         "--metrics-config", "summary_latencies=true").wait_ready()


def http_input(array: np.ndarray, name: str = "input", binary: bool = True, module=httpclient):
    tensor = module.InferInput(name, list(array.shape), "FP32")
    tensor.set_data_from_numpy(array, binary_data=binary)
    return tensor


def grpc_input(array: np.ndarray, name: str = "input", module=grpcclient, datatype: str = "FP32"):
    tensor = module.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def test_outputs_equal_direct_onnxruntime_over_every_client(engines, cnn_server, tolerance):
    session = engines["small_cnn"].session()
    # 8 images: 98 KB in binary and more as JSON, so over HTTP both bodies are received into buffers of
    # their own (http_transport.DIRECT_BODY_BYTES)
    x = engines["small_cnn"].model.sample_inputs(batch=8, seed=11)["input"]
    assert x.nbytes >= DIRECT_BODY_BYTES
    expected = session.run(None, {"input": x})[0]

    http = httpclient.InferenceServerClient(cnn_server.http_url)
    binary = http.infer("cnn", [http_input(x)]).as_numpy("logits")
    as_json = http.infer("cnn", [http_input(x, binary=False)],
                         outputs=[httpclient.InferRequestedOutput("logits", binary_data=False)]).as_numpy("logits")
    rpc = grpcclient.InferenceServerClient(cnn_server.grpc_url)
    over_grpc = rpc.infer("cnn", [grpc_input(x)]).as_numpy("logits")

    async def asynchronous():
        async with httpaio.InferenceServerClient(cnn_server.http_url) as client:
            a = (await client.infer("cnn", [http_input(x, module=httpaio)])).as_numpy("logits")
        client = grpcaio.InferenceServerClient(cnn_server.grpc_url)
        try:
            b = (await client.infer("cnn", [grpc_input(x, module=grpcaio)])).as_numpy("logits")
        finally:
            await client.close()
        return a, b

    http_aio, grpc_aio = asyncio.run(asynchronous())
    for result in (binary, as_json, over_grpc, http_aio, grpc_aio):
        assert result.shape == (8, 10)
        np.testing.assert_allclose(result, expected, **tolerance)


def test_classification_extension_returns_each_images_top_classes_over_http_and_grpc(engines, cnn_server):
    x = engines["small_cnn"].model.sample_inputs(batch=3, seed=5)["input"]
    logits = engines["small_cnn"].session().run(None, {"input": x})[0]

    def check(classes: np.ndarray) -> None:
        assert classes.shape == (3, 4)
        for scores, top in zip(logits, classes):
            pairs = [(element.decode() if isinstance(element, bytes) else element).split(":") for element in top]
            assert all(re.fullmatch(r"-?\d+\.\d{6}", value) for value, _ in pairs)  # std::to_string, as Triton
            indices = [int(index) for _, index in pairs]
            assert indices == np.argsort(-scores, kind="stable")[:4].tolist()
            np.testing.assert_allclose([float(value) for value, _ in pairs], scores[indices], atol=1e-5)

    http = httpclient.InferenceServerClient(cnn_server.http_url)
    assert "classification" in http.get_server_metadata()["extensions"]
    for binary in (True, False):
        check(http.infer("cnn", [http_input(x)], outputs=[
            httpclient.InferRequestedOutput("logits", binary_data=binary, class_count=4)]).as_numpy("logits"))
    rpc = grpcclient.InferenceServerClient(cnn_server.grpc_url)
    check(rpc.infer("cnn", [grpc_input(x)], outputs=[grpcclient.InferRequestedOutput("logits", class_count=4)]).as_numpy("logits"))

    with pytest.raises(InferenceServerException, match="classification must be a non-negative integer, got -2") as refused:
        http.infer("cnn", [http_input(x)], outputs=[httpclient.InferRequestedOutput("logits", class_count=-2)])
    assert refused.value.status() == "400"
    with pytest.raises(InferenceServerException, match="classification must be a non-negative integer, got -2") as refused:
        rpc.infer("cnn", [grpc_input(x)], outputs=[grpcclient.InferRequestedOutput("logits", class_count=-2)])
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert http.is_server_ready()


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_tritonclient_compressed_requests_and_responses(engines, cnn_server, algorithm, tolerance):
    x = engines["small_cnn"].model.sample_inputs(batch=2, seed=12)["input"]
    expected = engines["small_cnn"].session().run(None, {"input": x})[0]
    http = httpclient.InferenceServerClient(cnn_server.http_url)
    for binary in (True, False):
        result = http.infer("cnn", [http_input(x, binary=binary)], request_compression_algorithm=algorithm,
                            response_compression_algorithm=algorithm,
                            outputs=[httpclient.InferRequestedOutput("logits", binary_data=binary)])
        np.testing.assert_allclose(result.as_numpy("logits"), expected, **tolerance)
    # tritonclient hides the response's headers: ask once more by hand and look at them. As in
    # Triton, inference results are compressed, metadata and errors are not.
    infer_body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                         "data": x.ravel().tolist()}]}).encode()
    request = urllib.request.Request(f"http://{cnn_server.http_url}/v2/models/cnn/infer", data=infer_body,
                                     headers={"Accept-Encoding": algorithm})
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.headers["Content-Encoding"] == algorithm
        body = zlib.decompress(response.read(), 16 + zlib.MAX_WBITS if algorithm == "gzip" else zlib.MAX_WBITS)
    np.testing.assert_allclose(np.reshape(json.loads(body)["outputs"][0]["data"], (2, 10)), expected, **tolerance)
    request = urllib.request.Request(f"http://{cnn_server.http_url}/v2/models/cnn", headers={"Accept-Encoding": algorithm})
    with urllib.request.urlopen(request, timeout=5) as response:
        assert "Content-Encoding" not in response.headers and json.loads(response.read())["name"] == "cnn"


def test_health_metadata_and_config_like_triton(engines, cnn_server):
    http = httpclient.InferenceServerClient(cnn_server.http_url)
    assert http.is_server_live() and http.is_server_ready() and http.is_model_ready("cnn")
    assert "binary_tensor_data" in http.get_server_metadata()["extensions"]
    metadata = http.get_model_metadata("cnn")
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 32, 32]}]
    config = http.get_model_config("cnn")
    assert config["max_batch_size"] == 16 and config["dynamic_batching"]["preferred_batch_size"] == [4, 8]

    rpc = grpcclient.InferenceServerClient(cnn_server.grpc_url)
    assert rpc.is_server_live() and rpc.is_server_ready() and rpc.is_model_ready("cnn")
    assert list(rpc.get_model_metadata("cnn").outputs[0].shape) == [-1, 10]
    grpc_config = rpc.get_model_config("cnn").config
    assert grpc_config.platform == "onnxruntime_onnx" and grpc_config.instance_group[0].count == 2
    with pytest.raises(InferenceServerException, match="unknown model"):
        rpc.get_model_metadata("nope")
    # warmup ran every batch size the batcher forms (1, the preferred sizes, the maximum) before ready,
    # and on CUDA every bucket its sessions pad batches up to
    on_cuda = engines["small_cnn"].execution_provider == "CUDAExecutionProvider"
    assert f'"batch_sizes": {[1, 2, 4, 8, 16] if on_cuda else [1, 4, 8, 16]}' in cnn_server.log()


def test_metrics_port_polls_tritons_cpu_and_pinned_memory_metrics_and_gpu_ones_where_nvml_sees_gpus(cnn_server):
    time.sleep(0.3)  # polled every 100 ms here: the CPU utilization needs two polls
    _, body = cnn_server.get("/metrics", cnn_server.metrics_port)
    families = {family.name: family for family in text_string_to_metric_families(body.decode())}
    assert 0.0 <= families["nv_cpu_utilization"].samples[0].value <= 1.0
    memory_total = int(re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M).group(1)) * 1024
    assert families["nv_cpu_memory_total_bytes"].samples[0].value == memory_total
    assert 0 < families["nv_cpu_memory_used_bytes"].samples[0].value < memory_total
    gpus = NvmlGpus(os.environ.get("CUDA_VISIBLE_DEVICES")).handles
    assert ("nv_gpu_memory_used_bytes" in families) == bool(gpus), "GPU metrics exactly where NVML sees GPUs"
    # Triton's default pool, of which a CPU engine holds nothing and one on a GPU its batch buffers
    assert families["nv_pinned_memory_pool_total_bytes"].samples[0].value == 256 << 20
    pinned = families["nv_pinned_memory_pool_used_bytes"].samples[0].value
    on_a_gpu = model_ready_entry(cnn_server)["device_inputs"] is not None
    assert (0 < pinned <= 256 << 20) if on_a_gpu else pinned == 0


def test_latency_summaries_follow_the_counters_and_order_their_quantiles(engines, cnn_server):
    x = engines["small_cnn"].model.sample_inputs(batch=1, seed=2)["input"]
    client = httpclient.InferenceServerClient(cnn_server.http_url)
    for _ in range(20):
        client.infer("cnn", [http_input(x)])
    _, body = cnn_server.get("/metrics", cnn_server.metrics_port)
    families = {family.name: family for family in text_string_to_metric_families(body.decode())}

    def summary(name):
        return {sample.labels.get("quantile", sample.name.rsplit("_", 1)[-1]): sample.value
                for sample in families[name].samples}

    request = summary("nv_inference_request_summary_us")
    assert request["count"] == families["nv_inference_request_success"].samples[0].value >= 20
    # the counter is printed in whole microseconds
    assert request["sum"] == pytest.approx(families["nv_inference_request_duration_us"].samples[0].value, abs=request["count"])
    quantiles = [request[q] for q in ("0.5", "0.9", "0.95", "0.99", "0.999")]  # Triton's default quantiles
    assert quantiles == sorted(quantiles) and quantiles[0] > 0
    infer = summary("nv_inference_compute_infer_summary_us")
    assert infer["count"] == request["count"]
    assert 0 < infer["0.5"] < request["0.99"]  # a request's compute is part of its time in the server


def test_concurrent_clients_get_their_own_results_in_batches(engines, cnn_server, tolerance):
    session = engines["small_cnn"].session()
    before = cnn_server.metrics()
    count = 48
    inputs = [engines["small_cnn"].model.sample_inputs(batch=1 + i % 2, seed=100 + i)["input"] for i in range(count)]
    expected = [session.run(None, {"input": x})[0] for x in inputs]

    async def one(client, index):
        result = await client.infer("cnn", [grpc_input(inputs[index], module=grpcaio)])
        return index, result.as_numpy("logits")

    async def run_all():
        client = grpcaio.InferenceServerClient(cnn_server.grpc_url)
        try:
            return await asyncio.gather(*(one(client, i) for i in range(count)))
        finally:
            await client.close()

    http_results: dict[int, np.ndarray] = {}

    def http_worker(indices):
        client = httpclient.InferenceServerClient(cnn_server.http_url)
        for index in indices:
            http_results[index] = client.infer("cnn", [http_input(inputs[index])]).as_numpy("logits")

    threads = [threading.Thread(target=http_worker, args=(range(k, count, 4),)) for k in range(4)]
    for thread in threads:
        thread.start()
    grpc_results = dict(asyncio.run(run_all()))
    for thread in threads:
        thread.join()
    for index in range(count):  # each client got the outputs of its own input, not a neighbour's
        np.testing.assert_allclose(grpc_results[index], expected[index], **tolerance)
        np.testing.assert_allclose(http_results[index], expected[index], **tolerance)

    after = cnn_server.metrics()
    label = '{model="cnn",version="1"}'
    requests = after[f"nv_inference_request_success{label}"] - before.get(f"nv_inference_request_success{label}", 0)
    items = after[f"nv_inference_count{label}"] - before.get(f"nv_inference_count{label}", 0)
    executions = after[f"nv_inference_exec_count{label}"] - before.get(f"nv_inference_exec_count{label}", 0)
    assert requests == 2 * count
    assert items == 2 * sum(x.shape[0] for x in inputs)
    assert executions < requests, "concurrent requests should have been batched"
    single = after['plansmith_batch_size_bucket{le="1.0",model="cnn",version="1"}']
    assert after['plansmith_batch_size_count{model="cnn",version="1"}'] > single, "no batch larger than 1"
    assert after[f"nv_inference_queue_duration_us{label}"] > 0
    assert after[f"nv_inference_pending_request_count{label}"] == 0  # all answered, nothing left queued
    assert after['plansmith_queue_depth{model="cnn",version="1"}'] == 0
    assert after[f"nv_inference_compute_infer_duration_us{label}"] > 0


def test_malformed_requests_get_400_and_the_server_keeps_serving(engines, cnn_server):
    x = engines["small_cnn"].model.sample_inputs(batch=1)["input"]
    url = f"http://{cnn_server.http_url}/v2/models/cnn/infer"

    def post(body: bytes, headers=None) -> tuple[int, dict]:
        request = urllib.request.Request(url, data=body, headers=headers or {}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    status, body = post(b"{this is not json")
    assert status == 400 and "failed to parse" in body["error"]
    header = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32],
                                     "parameters": {"binary_data_size": x.nbytes}}]}).encode()
    status, body = post(header + x.tobytes()[:-4], {"Inference-Header-Content-Length": str(len(header))})
    assert status == 400 and "runs past the end" in body["error"]
    status, body = post(b'{"inputs": []}', {})
    assert status == 400 and "missing ['input']" in body["error"]

    http = httpclient.InferenceServerClient(cnn_server.http_url)
    for bad, message in [
        (lambda: http.infer("cnn", [http_input(x, name="image")]), "unexpected inference input 'image'"),
        (lambda: http.infer("cnn", [http_input(x[:, :, :16])]), "shape"),
        (lambda: http.infer("cnn", [http_input(np.zeros((17, 3, 32, 32), np.float32))]), "batch-size must be <= 16"),
    ]:
        with pytest.raises(InferenceServerException, match=message) as error:
            bad()
        assert error.value.status() == "400"
    # what a request names and is not there is 404 / NOT_FOUND, as Triton answers (HttpCodeFromError)
    for bad in (lambda: http.infer("missing", [http_input(x)]), lambda: http.infer("cnn", [http_input(x)], "7"),
                lambda: http.get_model_metadata("missing"), lambda: http.get_model_config("cnn", "2")):
        with pytest.raises(InferenceServerException, match="Request for unknown model: '(missing|cnn)'") as error:
            bad()
        assert error.value.status() == "404"

    rpc = grpcclient.InferenceServerClient(cnn_server.grpc_url)
    wrong_dtype = grpcclient.InferInput("input", list(x.shape), "FP64")
    wrong_dtype.set_data_from_numpy(x.astype(np.float64))
    for bad, message in [
        (lambda: rpc.infer("cnn", [grpc_input(x, name="image")]), "unexpected inference input"),
        (lambda: rpc.infer("cnn", [wrong_dtype]), "datatype FP64"),
        (lambda: rpc.infer("cnn", [grpc_input(x[:, :2])]), "shape"),
    ]:
        with pytest.raises(InferenceServerException, match=message) as error:
            bad()
        assert error.value.status() == "StatusCode.INVALID_ARGUMENT"
    for bad in (lambda: rpc.infer("missing", [grpc_input(x)]), lambda: rpc.get_model_metadata("cnn", "7")):
        with pytest.raises(InferenceServerException, match="Request for unknown model") as error:
            bad()
        assert error.value.status() == "StatusCode.NOT_FOUND"

    assert http.is_server_ready() and rpc.is_model_ready("cnn")
    assert rpc.infer("cnn", [grpc_input(x)]).as_numpy("logits").shape == (1, 10)
    metrics = cnn_server.metrics()
    assert metrics['nv_inference_request_failure{model="cnn",version="1"}'] >= 6


def test_queue_full_is_503_and_unavailable(engines, start_server, tolerance):
    server = start_server("--manifest", engines["mlp"].manifest_uri, "--max-batch-size", "32",
                          "--max-queue-delay-us", "1500000", "--max-queue-size", "2", "--no-warmup").wait_ready()
    x = engines["mlp"].model.sample_inputs(batch=1)["input"]
    expected = engines["mlp"].session().run(None, {"input": x})[0]

    async def scenario():
        client = grpcaio.InferenceServerClient(server.grpc_url)
        try:
            waiting = [asyncio.ensure_future(client.infer("model", [grpc_input(x, module=grpcaio)])) for _ in range(2)]
            await asyncio.sleep(0.5)  # both queued, waiting for the 1.5 s batching delay
            with pytest.raises(InferenceServerException) as grpc_error:
                await client.infer("model", [grpc_input(x, module=grpcaio)])
            async with httpaio.InferenceServerClient(server.http_url) as http:
                with pytest.raises(InferenceServerException) as http_error:
                    await http.infer("model", [http_input(x, module=httpaio)])
            results = await asyncio.gather(*waiting)
            return grpc_error.value, http_error.value, results
        finally:
            await client.close()

    started = time.monotonic()
    grpc_error, http_error, results = asyncio.run(scenario())
    assert grpc_error.status() == "StatusCode.UNAVAILABLE" and "maximum queue size" in grpc_error.message()
    assert http_error.status() == "503" and "maximum queue size" in http_error.message()
    assert time.monotonic() - started < 5
    for result in results:  # the queued requests still complete
        np.testing.assert_allclose(result.as_numpy("logits"), expected, **tolerance)


def test_tampered_artifact_keeps_the_server_not_ready(engines, start_server, tmp_path):
    import shutil

    source = engines["mlp"].engine_path.parent
    copy = tmp_path / "engine"
    shutil.copytree(source, copy)
    engine = copy / engines["mlp"].engine_path.name
    data = bytearray(engine.read_bytes())
    data[-10] ^= 0xFF  # flip bits in a weight
    engine.write_bytes(bytes(data))

    server = start_server("--manifest", f"file://{copy}/manifest.json")
    server.wait_live()
    deadline = time.monotonic() + 20
    while "model not ready" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "has sha256" in server.log() and "refusing to serve a modified engine" in server.log()
    assert server.get("/v2/health/live")[0] == 200
    assert server.get("/v2/health/ready")[0] == 503
    http = httpclient.InferenceServerClient(server.http_url)
    assert not http.is_model_ready("model")
    rpc = grpcclient.InferenceServerClient(server.grpc_url)
    assert rpc.is_server_live() and not rpc.is_server_ready()
    with pytest.raises(InferenceServerException, match="not ready") as error:
        rpc.infer("model", [grpc_input(np.zeros((1, 256), np.float32))])
    assert error.value.status() == "StatusCode.UNAVAILABLE"
    assert server.process.poll() is None  # stays up answering health, no crash loop


def test_engine_for_another_cpu_or_gpu_is_refused(engines, start_server, tmp_path):
    import shutil

    copy = tmp_path / "engine"
    shutil.copytree(engines["mlp"].engine_path.parent, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    if engines["mlp"].execution_provider == "CUDAExecutionProvider":  # the builder found a GPU
        manifest["target"]["computeCapability"], refusal = "5.0", "engine is built for compute capability 5.0"
    else:
        manifest["target"]["cpuIsa"], refusal = "aarch64-sve2", "engine is for CPU architecture aarch64"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    server = start_server("--manifest", f"file://{copy}")
    server.wait_live()
    deadline = time.monotonic() + 20
    while "model not ready" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert refusal in server.log()
    assert server.get("/v2/health/ready")[0] == 503


def test_sigterm_finishes_accepted_requests_and_exits_0(engines, start_server, tolerance):
    server = start_server("--manifest", engines["mlp"].manifest_uri, "--max-batch-size", "32",
                          "--max-queue-delay-us", "800000", "--no-warmup").wait_ready()
    model = engines["mlp"].model
    session = engines["mlp"].session()
    inputs = [model.sample_inputs(batch=1, seed=i)["input"] for i in range(12)]
    outcomes: dict[int, object] = {}

    def http_call(index):
        try:
            client = httpclient.InferenceServerClient(server.http_url, network_timeout=30)
            outcomes[index] = client.infer("model", [http_input(inputs[index])]).as_numpy("logits")
        except Exception as error:  # recorded and asserted on below
            outcomes[index] = error

    def grpc_call(index):
        try:
            client = grpcclient.InferenceServerClient(server.grpc_url)
            outcomes[index] = client.infer("model", [grpc_input(inputs[index])]).as_numpy("logits")
        except Exception as error:
            outcomes[index] = error

    threads = [threading.Thread(target=http_call if i % 2 else grpc_call, args=(i,)) for i in range(len(inputs))]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 10
    while server.metrics().get('nv_inference_pending_request_count{model="model",version="1"}', 0) < len(inputs):
        assert time.monotonic() < deadline, "requests were not queued"
        time.sleep(0.02)
    # every request is accepted and queued (waiting for the batching delay): now stop the server
    code = server.terminate(timeout=20)
    for thread in threads:
        thread.join(10)
    assert code == 0, server.log()
    for index, x in enumerate(inputs):
        assert not isinstance(outcomes[index], Exception), f"request {index} lost: {outcomes[index]!r}"
        np.testing.assert_allclose(outcomes[index], session.run(None, {"input": x})[0], **tolerance)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://{server.http_url}/v2/health/live", timeout=2)
    assert '"stopped"' in server.log()


def test_sigterm_while_the_engine_warms_up_exits_0_within_the_grace_period(engines, start_server):
    """The interpreter waited at exit for the loading thread: the whole warmup ran after "stopped".
    As Triton after --exit-timeout-secs, the process exits with that work in flight."""
    server = start_server("--manifest", engines["small_cnn"].manifest_uri, "--warmup-iterations", "1000000",
                          "--grace-seconds", "1")
    server.wait_live()
    deadline = time.monotonic() + 30
    while '"artifact verified"' not in server.log():  # warming up from here on (a million runs a size)
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.05)
    time.sleep(0.3)
    signalled = time.monotonic()
    code = server.terminate(timeout=30)
    assert code == 0 and time.monotonic() - signalled < 6, server.log()
    assert '"stopped while loading: executors left open"' in server.log() and '"warmup done"' not in server.log()


def test_serve_from_model_yaml_takes_settings_and_engine_from_the_spec(engines, start_server, tmp_path, tolerance):
    import yaml

    info = engines["mlp"].model
    store = engines["mlp"].manifest_uri.split("/engines/")[0]
    spec_file = tmp_path / "mlp.yaml"
    spec_file.write_text(yaml.safe_dump({
        "apiVersion": "plansmith.io/v1alpha1", "kind": "InferenceModel", "metadata": {"name": "tiny-mlp"},
        "spec": {"model": {"uri": f"file://{info.path}", "inputs": info.spec_inputs()},
                 "build": {"backend": "onnxruntime", "precision": "fp32"},
                 "serving": {"maxBatchSize": 32, "instances": 1,
                             "dynamicBatching": {"preferredBatchSizes": [8, 16], "maxQueueDelayMicroseconds": 300},
                             "metrics": {"latencySummaries": True}},
                 "storage": {"uri": store}}}))
    server = start_server(str(spec_file)).wait_ready()
    assert "engine found through the builder" in server.log() and '"status": "hit"' in server.log()
    http = httpclient.InferenceServerClient(server.http_url)
    config = http.get_model_config("tiny-mlp")
    assert config["dynamic_batching"]["preferred_batch_size"] == [8, 16]
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == "300"
    x = info.sample_inputs(batch=2, seed=5)["input"]
    np.testing.assert_allclose(http.infer("tiny-mlp", [http_input(x)]).as_numpy("logits"),
                               engines["mlp"].session().run(None, {"input": x})[0], **tolerance)
    assert server.metrics()['nv_inference_request_summary_us_count{model="tiny-mlp",version="1"}'] == 1


def test_serves_an_engine_from_s3(s3_server, start_server, tmp_path, monkeypatch, tolerance):
    import boto3

    from tests.plansmith_runtime.conftest import build_engine

    for key, value in s3_server.credentials_env().items():
        monkeypatch.setenv(key, value)
    boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1").create_bucket(Bucket="engines")
    info, uri = build_engine("mlp", tmp_path, "s3://engines/plansmith", s3_server.endpoint)
    assert uri.startswith("s3://engines/plansmith/engines/")
    server = start_server("--manifest", uri, "--endpoint", s3_server.endpoint,
                          env=s3_server.credentials_env()).wait_ready()
    x = info.sample_inputs(batch=1)["input"]
    import onnxruntime as ort

    expected = ort.InferenceSession(str(info.path)).run(None, {"input": x})[0]
    rpc = grpcclient.InferenceServerClient(server.grpc_url)
    result = rpc.infer("model", [grpc_input(x)])
    np.testing.assert_allclose(result.as_numpy("logits"), expected, **tolerance)
    # --manifest alone: batching on with the defaults, up to the batch size the engine accepts
    config = rpc.get_model_config("model").config
    assert config.max_batch_size == 32 and config.dynamic_batching.max_queue_delay_microseconds == 100


def test_request_timeout_rejects_requests_left_in_the_queue(engines, start_server):
    server = start_server("--manifest", engines["mlp"].manifest_uri, "--max-batch-size", "32",
                          "--max-queue-delay-us", "5000000", "--timeout-us", "200000", "--no-warmup").wait_ready()
    x = engines["mlp"].model.sample_inputs(batch=1)["input"]
    rpc = grpcclient.InferenceServerClient(server.grpc_url)
    started = time.monotonic()
    with pytest.raises(InferenceServerException, match="timeout") as error:
        rpc.infer("model", [grpc_input(x)])
    assert error.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    assert 0.15 < time.monotonic() - started < 3  # rejected at its 200 ms timeout, not after the 5 s delay
    http = httpclient.InferenceServerClient(server.http_url)
    with pytest.raises(InferenceServerException, match="timeout") as error:
        http.infer("model", [http_input(x)])
    assert error.value.status() == "503"
    assert http.is_server_ready()


def test_statistics_extension_counts_the_traffic_like_triton(engines, cnn_server):
    http = httpclient.InferenceServerClient(cnn_server.http_url)
    rpc = grpcclient.InferenceServerClient(cnn_server.grpc_url)
    assert "statistics" in http.get_server_metadata()["extensions"]
    before = http.get_inference_statistics("cnn")["model_stats"][0]
    x = engines["small_cnn"].model.sample_inputs(batch=3, seed=21)["input"]
    for _ in range(4):
        http.infer("cnn", [http_input(x)])
        rpc.infer("cnn", [grpc_input(x)])
    with pytest.raises(InferenceServerException):
        http.infer("cnn", [http_input(x[:, :1])])  # wrong shape: a failure, before any queueing

    stats = http.get_inference_statistics("cnn")["model_stats"][0]
    assert (stats["name"], stats["version"]) == ("cnn", "1")
    success = stats["inference_stats"]["success"]["count"] - before["inference_stats"]["success"]["count"]
    assert success == 8
    assert stats["inference_count"] - before["inference_count"] == 24
    assert stats["inference_stats"]["fail"]["count"] - before["inference_stats"]["fail"]["count"] == 1
    for phase in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
        assert stats["inference_stats"][phase]["count"] == stats["inference_stats"]["success"]["count"]
    assert stats["inference_stats"]["compute_infer"]["ns"] > before["inference_stats"]["compute_infer"]["ns"]
    # every execution is in batch_stats under the batch size it ran
    assert sum(b["batch_size"] * b["compute_infer"]["count"] for b in stats["batch_stats"]) == stats["inference_count"]
    assert sum(b["compute_infer"]["count"] for b in stats["batch_stats"]) == stats["execution_count"]
    assert stats["last_inference"] >= int((time.time() - 60) * 1000)

    over_grpc = rpc.get_inference_statistics("cnn").model_stats[0]  # the same counters through gRPC's messages
    assert over_grpc.inference_count == stats["inference_count"]
    assert over_grpc.inference_stats.success.count == stats["inference_stats"]["success"]["count"]
    assert {b.batch_size for b in over_grpc.batch_stats} == {b["batch_size"] for b in stats["batch_stats"]}
    assert [s["name"] for s in http.get_inference_statistics()["model_stats"]] == ["cnn"]  # every model
    with pytest.raises(InferenceServerException, match="unknown model"):
        http.get_inference_statistics("nope")
    with pytest.raises(InferenceServerException, match="unknown model"):
        rpc.get_inference_statistics("nope")


def infer_in_regions(client, module, x: np.ndarray, input_region: str, output: tuple[str, int, int]):
    """cnn's inference with its input in a shared memory region and its output written into one
    (region, byte size, offset), over tritonclient's `module` (httpclient or grpcclient)."""
    tensor = module.InferInput("input", list(x.shape), "FP32")
    tensor.set_shared_memory(input_region, x.nbytes)
    wanted = module.InferRequestedOutput("logits")
    region, byte_size, offset = output
    wanted.set_shared_memory(region, byte_size, offset=offset)
    return client.infer("cnn", [tensor], outputs=[wanted])


def test_system_shared_memory_inputs_and_outputs_over_http_and_grpc(engines, cnn_server, tolerance):
    import tritonclient.utils.shared_memory as shm

    session = engines["small_cnn"].session()
    x = engines["small_cnn"].model.sample_inputs(batch=2, seed=31)["input"]
    expected = session.run(None, {"input": x})[0]
    http = httpclient.InferenceServerClient(cnn_server.http_url)
    rpc = grpcclient.InferenceServerClient(cnn_server.grpc_url)
    assert "system_shared_memory" in rpc.get_server_metadata().extensions
    key = f"/plansmith-test-{os.getpid()}"
    output_bytes = expected.nbytes
    # one object, two regions in it: the input at offset 0, the outputs after it
    handle = shm.create_shared_memory_region("whole", key, x.nbytes + 2 * output_bytes)
    try:
        shm.set_shared_memory_region(handle, [x])
        http.register_system_shared_memory("images", key, x.nbytes)
        rpc.register_system_shared_memory("logits", key, 2 * output_bytes, offset=x.nbytes)
        status = http.get_system_shared_memory_status()
        assert sorted((r["name"], r["key"], r["offset"], r["byte_size"]) for r in status) == [
            ("images", key, 0, x.nbytes), ("logits", key, x.nbytes, 2 * output_bytes)]
        assert rpc.get_system_shared_memory_status("logits").regions["logits"].offset == x.nbytes

        def infer_over(client, module, output_offset):
            return infer_in_regions(client, module, x, "images", ("logits", output_bytes, output_offset))

        over_http = infer_over(http, httpclient, 0)
        over_grpc = infer_over(rpc, grpcclient, output_bytes)
        described = over_http.get_output("logits")
        assert described["parameters"] == {"shared_memory_region": "logits", "shared_memory_byte_size": output_bytes}
        assert "data" not in described  # the data went to shared memory, not into the response
        assert over_grpc.get_output("logits").parameters["shared_memory_byte_size"].int64_param == output_bytes
        both = shm.get_contents_as_numpy(handle, np.float32, [2, *expected.shape], offset=x.nbytes)
        np.testing.assert_allclose(both[0], expected, **tolerance)
        np.testing.assert_allclose(both[1], expected, **tolerance)

        # input from shared memory, output in the response, mixed with raw bytes in one server
        tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
        tensor.set_shared_memory("images", x.nbytes)
        np.testing.assert_allclose(rpc.infer("cnn", [tensor]).as_numpy("logits"), expected, **tolerance)

        # mistakes are the client's: 400 / INVALID_ARGUMENT, and the server keeps serving
        wrong_size = httpclient.InferInput("input", list(x.shape), "FP32")
        wrong_size.set_shared_memory("images", x.nbytes - 4)
        with pytest.raises(InferenceServerException, match="shared_memory_byte_size") as caught:
            http.infer("cnn", [wrong_size])
        assert caught.value.status() == "400"
        small = grpcclient.InferRequestedOutput("logits")
        small.set_shared_memory("logits", output_bytes - 4)
        before = rpc.get_inference_statistics("cnn").model_stats[0].inference_stats
        with pytest.raises(InferenceServerException, match="should be at least") as caught:
            rpc.infer("cnn", [tensor], outputs=[small])
        assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
        with pytest.raises(InferenceServerException, match="should be at least") as caught:
            infer_in_regions(http, httpclient, x, "images", ("logits", output_bytes - 4, 0))
        assert caught.value.status() == "400"
        after = rpc.get_inference_statistics("cnn").model_stats[0].inference_stats
        # the model ran, but the requests failed: Triton counts them so
        assert (after.success.count - before.success.count, after.fail.count - before.fail.count) == (0, 2)
        with pytest.raises(InferenceServerException, match="already registered"):
            http.register_system_shared_memory("images", key, x.nbytes)
        with pytest.raises(InferenceServerException, match="unable to open"):
            rpc.register_system_shared_memory("ghost", "/plansmith-no-such-object", 16)
        with pytest.raises(InferenceServerException, match="do not fit"):
            http.register_system_shared_memory("too-big", key, x.nbytes + 2 * output_bytes + 1)

        http.unregister_system_shared_memory("images")
        with pytest.raises(InferenceServerException, match="unable to find") as caught:
            rpc.infer("cnn", [tensor])
        assert caught.value.status() == "StatusCode.NOT_FOUND"  # as Triton's shared memory manager answers
        with pytest.raises(InferenceServerException, match="unable to find") as caught:
            infer_in_regions(http, httpclient, x, "images", ("logits", output_bytes, 0))
        assert caught.value.status() == "404"
        rpc.unregister_system_shared_memory()  # all
        assert http.get_system_shared_memory_status() == [] and not rpc.get_system_shared_memory_status().regions
        np.testing.assert_allclose(rpc.infer("cnn", [grpc_input(x)]).as_numpy("logits"), expected, **tolerance)
    finally:
        shm.destroy_shared_memory_region(handle)


def model_ready_entry(server) -> dict:
    """The server's "model ready" log entry (among its JSON lines: ONNX Runtime writes plain ones)."""
    entries = (json.loads(line) for line in server.log().splitlines() if line.startswith("{"))
    return next(entry for entry in entries if entry["message"] == "model ready")


def cuda_devices() -> int:
    """CUDA devices this machine's driver shows (0 without cuda-python, a driver or a device)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        return 0
    error, count = cudart.cudaGetDeviceCount()
    return count if int(error) == 0 else 0


NEEDS_A_GPU = pytest.mark.skipif(cuda_devices() == 0, reason="needs a CUDA device and its driver: CUDA shared memory "
                                 "regions are GPU memory (run on the lent GPU machine, docs/benchmarks.md says how)")


def test_cuda_shared_memory_registrations_the_server_cannot_open_are_refused(engines, cnn_server, tolerance):
    """Everywhere, with a GPU or without: a handle that opens nothing is refused with the reason (no
    driver here; an invalid handle on a GPU), a name a system region holds is refused, and the
    server goes on serving."""
    import tritonclient.utils.shared_memory as shm

    http = httpclient.InferenceServerClient(cnn_server.http_url)
    rpc = grpcclient.InferenceServerClient(cnn_server.grpc_url)
    assert "cuda_shared_memory" in http.get_server_metadata()["extensions"]
    if cuda_devices() == 0:  # a model on the CPU reads host memory: a CUDA region's input would be copied there
        assert model_ready_entry(cnn_server)["device_inputs"] is None
    nothing = base64.b64encode(bytes(64))
    with pytest.raises(InferenceServerException, match="unable to open CUDA shared memory region 'images' on device 0: "
                                                       "(cuda-python is not installed|CUDA error)") as caught:
        http.register_cuda_shared_memory("images", nothing, 0, 64)
    assert caught.value.status() == "400"
    with pytest.raises(InferenceServerException, match="unable to open CUDA shared memory region") as caught:
        rpc.register_cuda_shared_memory("images", nothing, 0, 64)
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(InferenceServerException, match="raw_handle must be a 64-byte cudaIpcMemHandle_t") as caught:
        rpc.register_cuda_shared_memory("images", base64.b64encode(bytes(8)), 0, 64)
    key = f"/plansmith-cuda-test-{os.getpid()}"
    handle = shm.create_shared_memory_region("taken", key, 64)
    try:
        http.register_system_shared_memory("taken", key, 64)
        with pytest.raises(InferenceServerException, match="shared memory region 'taken' is already registered"):
            rpc.register_cuda_shared_memory("taken", nothing, 0, 64)
        # each extension's status lists its own kind of region
        assert http.get_cuda_shared_memory_status() == [] and not rpc.get_cuda_shared_memory_status().regions
        assert [region["name"] for region in http.get_system_shared_memory_status()] == ["taken"]
        http.unregister_system_shared_memory("taken")
    finally:
        shm.destroy_shared_memory_region(handle)
    assert http.get_cuda_shared_memory_status() == [] and not rpc.get_cuda_shared_memory_status().regions
    http.unregister_cuda_shared_memory()  # nothing registered: not an error, as in Triton
    x = engines["small_cnn"].model.sample_inputs(batch=1, seed=3)["input"]
    np.testing.assert_allclose(rpc.infer("cnn", [grpc_input(x)]).as_numpy("logits"),
                               engines["small_cnn"].session().run(None, {"input": x})[0], **tolerance)


@NEEDS_A_GPU
def test_cuda_shared_memory_inputs_and_outputs_over_http_and_grpc_on_a_gpu(engines, cnn_server, tolerance):
    """tritonclient's cuda_shared_memory utilities, as Triton's simple_*_cudashm_client examples and
    perf_analyzer --shared-memory cuda use them: the input in one GPU region, the outputs written into
    another by an HTTP and a gRPC request, read back by the client from GPU memory."""
    import tritonclient.utils.cuda_shared_memory as cudashm

    session = engines["small_cnn"].session()
    x = engines["small_cnn"].model.sample_inputs(batch=2, seed=32)["input"]
    expected = session.run(None, {"input": x})[0]
    output_bytes = expected.nbytes
    http = httpclient.InferenceServerClient(cnn_server.http_url)
    rpc = grpcclient.InferenceServerClient(cnn_server.grpc_url)
    images = cudashm.create_shared_memory_region("images", x.nbytes, 0)
    logits = cudashm.create_shared_memory_region("logits", 2 * output_bytes, 0)
    try:
        cudashm.set_shared_memory_region(images, [x])
        http.register_cuda_shared_memory("images", cudashm.get_raw_handle(images), 0, x.nbytes)
        rpc.register_cuda_shared_memory("logits", cudashm.get_raw_handle(logits), 0, 2 * output_bytes)
        small = cudashm.create_shared_memory_region("small", 64, 0)
        try:  # as Triton refuses it: requests would read and write past the client's allocation
            with pytest.raises(InferenceServerException, match="larger than the .* bytes of device memory its handle"):
                rpc.register_cuda_shared_memory("oversized", cudashm.get_raw_handle(small), 0, 64 << 20)
        finally:
            cudashm.destroy_shared_memory_region(small)
        assert sorted(http.get_cuda_shared_memory_status(), key=lambda region: region["name"]) == [
            {"name": "images", "device_id": 0, "byte_size": x.nbytes},
            {"name": "logits", "device_id": 0, "byte_size": 2 * output_bytes}]
        assert rpc.get_cuda_shared_memory_status("logits").regions["logits"].byte_size == 2 * output_bytes

        def infer_over(client, module, output_offset):
            return infer_in_regions(client, module, x, "images", ("logits", output_bytes, output_offset))

        described = infer_over(http, httpclient, 0).get_output("logits")
        assert described["parameters"] == {"shared_memory_region": "logits", "shared_memory_byte_size": output_bytes}
        infer_over(rpc, grpcclient, output_bytes)
        both = cudashm.get_contents_as_numpy(logits, np.float32, [2, *expected.shape])
        np.testing.assert_allclose(both[0], expected, **tolerance)
        np.testing.assert_allclose(both[1], expected, **tolerance)

        wrong_size = grpcclient.InferInput("input", list(x.shape), "FP32")
        wrong_size.set_shared_memory("images", x.nbytes - 4)
        with pytest.raises(InferenceServerException, match="shared_memory_byte_size") as caught:
            rpc.infer("cnn", [wrong_size])
        assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
        rpc.unregister_cuda_shared_memory("images")
        http.unregister_cuda_shared_memory()
        assert http.get_cuda_shared_memory_status() == []
        with pytest.raises(InferenceServerException, match="unable to find shared memory region: 'images'"):
            infer_over(http, httpclient, 0)
    finally:
        cudashm.destroy_shared_memory_region(images)
        cudashm.destroy_shared_memory_region(logits)


@NEEDS_A_GPU
def test_concurrent_requests_in_cuda_regions_are_batched_on_the_gpu_with_requests_that_send_bytes(engines, cnn_server, tolerance):
    """A model on ONNX Runtime's CUDA provider reads inputs in its device's regions in place: the
    server says so when ready, and concurrent requests with inputs in regions (1 to 3 images, at
    offsets, so lone requests are padded to their bucket and batches are gathered on the device)
    mixed with requests sending their bytes each get their own outputs back, in batches. Then each
    request names a region for its logits too: batches of them get their rows copied there on the
    GPU, and each region holds its own request's logits."""
    import tritonclient.utils.cuda_shared_memory as cudashm

    assert model_ready_entry(cnn_server)["device_inputs"] == 0, "was the engine built for the CUDA provider?"
    session = engines["small_cnn"].session()
    count = 24
    inputs = [engines["small_cnn"].model.sample_inputs(batch=1 + i % 3, seed=300 + i)["input"] for i in range(count)]
    expected = [session.run(None, {"input": x})[0] for x in inputs]
    in_regions = [i for i in range(count) if i % 4 != 3]  # every fourth request sends its bytes instead
    offset = 256  # each input after some bytes of the region, as a client packing several tensors does
    regions = {i: cudashm.create_shared_memory_region(f"input-{i}", offset + inputs[i].nbytes, 0) for i in in_regions}
    rpc = grpcclient.InferenceServerClient(cnn_server.grpc_url)
    before = cnn_server.metrics()
    try:
        for i, region in regions.items():
            cudashm.set_shared_memory_region(region, [np.full(offset, 0xFF, np.uint8), inputs[i]])
            rpc.register_cuda_shared_memory(f"input-{i}", cudashm.get_raw_handle(region), 0, offset + inputs[i].nbytes)

        async def one(client, index, output_region=None):
            tensor = grpcaio.InferInput("input", list(inputs[index].shape), "FP32")
            if index in regions:
                tensor.set_shared_memory(f"input-{index}", inputs[index].nbytes, offset=offset)
            else:
                tensor.set_data_from_numpy(inputs[index])
            if output_region is None:
                return index, (await client.infer("cnn", [tensor])).as_numpy("logits")
            wanted = grpcaio.InferRequestedOutput("logits")
            wanted.set_shared_memory(output_region, expected[index].nbytes, offset=offset)
            result = await client.infer("cnn", [tensor], outputs=[wanted])
            return index, result.get_output("logits").parameters["shared_memory_byte_size"].int64_param

        async def run_all(output_regions=None):
            client = grpcaio.InferenceServerClient(cnn_server.grpc_url)
            try:
                return dict(await asyncio.gather(*(one(client, i, output_regions and output_regions[i])
                                                   for i in range(count))))
            finally:
                await client.close()

        results = asyncio.run(run_all())
        for index in range(count):
            np.testing.assert_allclose(results[index], expected[index], **tolerance)

        outputs = {i: cudashm.create_shared_memory_region(f"output-{i}", offset + expected[i].nbytes, 0) for i in range(count)}
        try:
            for i, region in outputs.items():
                rpc.register_cuda_shared_memory(f"output-{i}", cudashm.get_raw_handle(region), 0, offset + expected[i].nbytes)
            written = asyncio.run(run_all({i: f"output-{i}" for i in range(count)}))
            assert written == {i: expected[i].nbytes for i in range(count)}
            for i, region in outputs.items():
                contents = cudashm.get_contents_as_numpy(region, np.uint8, [offset + expected[i].nbytes])
                logits = contents[offset:].view(np.float32).reshape(expected[i].shape)
                np.testing.assert_allclose(logits, expected[i], **tolerance)
        finally:
            for i, region in outputs.items():
                rpc.unregister_cuda_shared_memory(f"output-{i}")
                cudashm.destroy_shared_memory_region(region)
        http = httpclient.InferenceServerClient(cnn_server.http_url)
        lone = httpclient.InferInput("input", list(inputs[2].shape), "FP32")  # 3 images: padded to a bucket of 4
        lone.set_shared_memory("input-2", inputs[2].nbytes, offset=offset)
        np.testing.assert_allclose(http.infer("cnn", [lone]).as_numpy("logits"), expected[2], **tolerance)
    finally:
        rpc.unregister_cuda_shared_memory()
        for region in regions.values():
            cudashm.destroy_shared_memory_region(region)
    after = cnn_server.metrics()
    label = '{model="cnn",version="1"}'
    requests = after[f"nv_inference_request_success{label}"] - before.get(f"nv_inference_request_success{label}", 0)
    executions = after[f"nv_inference_exec_count{label}"] - before.get(f"nv_inference_exec_count{label}", 0)
    assert requests == 2 * count + 1 and executions < 2 * count, "concurrent requests should have been batched"


@NEEDS_A_GPU
def test_a_model_without_a_batch_dimension_reads_and_writes_cuda_regions_on_a_gpu(engines, start_server, tolerance):
    """Served with maxBatchSize 0, a request of three images is one item that runs alone: its whole
    output, every image's logits, is written into its region (from the device), over HTTP and gRPC."""
    import tritonclient.utils.cuda_shared_memory as cudashm

    server = start_server("--manifest", engines["small_cnn"].manifest_uri, "--model-name", "cnn",
                          "--max-batch-size", "0", "--warmup-iterations", "1").wait_ready()
    x = engines["small_cnn"].model.sample_inputs(batch=3, seed=40)["input"]
    expected = engines["small_cnn"].session().run(None, {"input": x})[0]
    http = httpclient.InferenceServerClient(server.http_url)
    rpc = grpcclient.InferenceServerClient(server.grpc_url)
    images = cudashm.create_shared_memory_region("images", x.nbytes, 0)
    logits = cudashm.create_shared_memory_region("logits", expected.nbytes, 0)
    try:
        cudashm.set_shared_memory_region(images, [x])
        http.register_cuda_shared_memory("images", cudashm.get_raw_handle(images), 0, x.nbytes)
        http.register_cuda_shared_memory("logits", cudashm.get_raw_handle(logits), 0, expected.nbytes)
        for client, module in ((http, httpclient), (rpc, grpcclient)):
            cudashm.set_shared_memory_region(logits, [np.zeros_like(expected)])
            infer_in_regions(client, module, x, "images", ("logits", expected.nbytes, 0))
            written = cudashm.get_contents_as_numpy(logits, np.float32, list(expected.shape))
            np.testing.assert_allclose(written, expected, **tolerance)
    finally:
        http.unregister_cuda_shared_memory()
        cudashm.destroy_shared_memory_region(images)
        cudashm.destroy_shared_memory_region(logits)


def test_the_response_cache_answers_a_repeated_request_over_either_protocol(engines, start_server, tolerance):
    """--cache-config local,size=N (Triton's flag): the same inputs again, over HTTP or gRPC, are
    answered from the cache; Triton's statistics, metrics and model config say so."""
    server = start_server("--manifest", engines["small_cnn"].manifest_uri, "--model-name", "cnn",
                          "--warmup-iterations", "1", "--cache-config", "local,size=1048576").wait_ready()
    http, rpc = httpclient.InferenceServerClient(server.http_url), grpcclient.InferenceServerClient(server.grpc_url)
    x, other = (engines["small_cnn"].model.sample_inputs(batch=2, seed=seed)["input"] for seed in (50, 51))
    expected = engines["small_cnn"].session().run(None, {"input": x})[0]
    assert http.get_model_config("cnn")["response_cache"] == {"enable": True}
    np.testing.assert_allclose(http.infer("cnn", [http_input(x)]).as_numpy("logits"), expected, **tolerance)
    np.testing.assert_allclose(rpc.infer("cnn", [grpc_input(x)]).as_numpy("logits"), expected, **tolerance)
    np.testing.assert_allclose(http.infer("cnn", [http_input(x, binary=False)]).as_numpy("logits"), expected,
                               **tolerance)
    rpc.infer("cnn", [grpc_input(other)])
    stats = http.get_inference_statistics("cnn")["model_stats"][0]
    inference = stats["inference_stats"]
    counts = [inference[name]["count"] for name in ("cache_hit", "cache_miss", "success", "queue")]
    assert counts == [2, 2, 4, 4] and inference["cache_hit"]["ns"] > 0  # Triton counts hits in queue too
    assert rpc.get_inference_statistics("cnn").model_stats[0].inference_stats.cache_hit.count == 2
    metrics = server.metrics()
    assert metrics['nv_cache_num_hits_per_model{model="cnn",version="1"}'] == 2
    assert metrics['nv_cache_num_misses_per_model{model="cnn",version="1"}'] == 2
    assert metrics['nv_inference_request_success{model="cnn",version="1"}'] == 4


def test_tritonclient_streams_get_every_answer_and_errors_on_the_stream(engines, cnn_server, tolerance):
    """tritonclient's bidirectional ModelStreamInfer (sync start_stream / async_stream_infer and
    asyncio stream_infer): each request's answer comes back with its id; a bad request is answered
    with an error on the stream, which goes on."""
    import queue

    session = engines["small_cnn"].session()
    inputs = {f"request-{i}": engines["small_cnn"].model.sample_inputs(batch=1 + i % 3, seed=40 + i)["input"]
              for i in range(12)}
    expected = {request_id: session.run(None, {"input": x})[0] for request_id, x in inputs.items()}
    answers: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(cnn_server.grpc_url)
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for request_id, x in inputs.items():
            client.async_stream_infer("cnn", [grpc_input(x)], request_id=request_id)
        client.async_stream_infer("cnn", [grpc_input(x[:, :1])], request_id="bad shape")
        client.async_stream_infer("cnn", [grpc_input(inputs["request-0"])], request_id="after the error")
        got, errors = {}, []
        for _ in range(len(inputs) + 2):
            result, error = answers.get(timeout=30)
            if error is not None:
                errors.append(str(error))
            else:
                got[result.get_response().id] = result.as_numpy("logits")
    finally:
        client.stop_stream()
    assert len(errors) == 1 and "shape" in errors[0]
    for request_id, logits in expected.items():
        np.testing.assert_allclose(got[request_id], logits, **tolerance)
    np.testing.assert_allclose(got["after the error"], expected["request-0"], **tolerance)

    async def asynchronous():
        async def requests():
            for request_id, x in inputs.items():
                yield {"model_name": "cnn", "inputs": [grpc_input(x, module=grpcaio)], "request_id": request_id}

        aio = grpcaio.InferenceServerClient(cnn_server.grpc_url)
        try:
            return {result.get_response().id: result.as_numpy("logits")
                    async for result, error in aio.stream_infer(requests()) if error is None}
        finally:
            await aio.close()

    streamed = asyncio.run(asynchronous())
    for request_id, logits in expected.items():
        np.testing.assert_allclose(streamed[request_id], logits, **tolerance)


def test_repository_index_lists_the_model_and_load_unload_are_refused_with_the_reason(cnn_server):
    http = httpclient.InferenceServerClient(cnn_server.http_url)
    rpc = grpcclient.InferenceServerClient(cnn_server.grpc_url)
    assert "model_repository" in http.get_server_metadata()["extensions"]
    assert http.get_model_repository_index() == [{"name": "cnn", "version": "1", "state": "READY"}]
    index = rpc.get_model_repository_index().models
    assert [(m.name, m.version, m.state) for m in index] == [("cnn", "1", "READY")]
    for client in (http, rpc):
        for action in (client.load_model, client.unload_model):
            with pytest.raises(InferenceServerException, match="serves the one model it was started with"):
                action("cnn")
    assert http.is_model_ready("cnn")  # refused, not unloaded


def test_log_settings_change_at_runtime_through_tritonclient(engines, start_server):
    """Triton's logging extension over both protocols: verbose logging switched on shows each batch
    in the log; a setting the server cannot take is refused with its reason; INFO switched off
    silences the shutdown's INFO lines."""
    server = start_server("--manifest", engines["small_cnn"].manifest_uri, "--model-name", "cnn",
                          "--warmup-iterations", "1").wait_ready()
    http, rpc = httpclient.InferenceServerClient(server.http_url), grpcclient.InferenceServerClient(server.grpc_url)
    x = engines["small_cnn"].model.sample_inputs(batch=2, seed=5)["input"]
    assert "logging" in http.get_server_metadata()["extensions"]
    assert http.get_log_settings() == {"log_file": "", "log_info": True, "log_warning": True, "log_error": True,
                                       "log_verbose_level": 0, "log_format": "default"}
    http.infer("cnn", [http_input(x)])
    assert "batch executed" not in server.log()

    updated = rpc.update_log_settings({"log_verbose_level": 1}, as_json=True)["settings"]
    assert updated["log_verbose_level"] == {"uint32_param": 1} and updated["log_info"] == {"bool_param": True}
    rpc.infer("cnn", [grpc_input(x)])
    entries = [json.loads(line) for line in server.log().splitlines() if '"batch executed"' in line]
    assert entries and entries[-1]["level"] == "DEBUG" and entries[-1]["items"] == 2
    assert http.get_log_settings()["log_verbose_level"] == 1  # one setting for both protocols

    with pytest.raises(InferenceServerException, match="log_format 'ISO8601' is not supported"):
        http.update_log_settings({"log_format": "ISO8601"})
    with pytest.raises(InferenceServerException, match="can not be updated through network protocol") as refused:
        rpc.update_log_settings({"log_file": "/var/log/triton.log"})
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"

    assert http.update_log_settings({"log_info": False, "log_verbose_level": 0})["log_info"] is False
    assert server.terminate() == 0
    assert '"shutting down' not in server.log() and '"stopped"' not in server.log()


HTTP_TRACE = ["HTTP_RECV_START", "HTTP_RECV_END", "REQUEST_START", "QUEUE_START", "COMPUTE_START", "COMPUTE_INPUT_END",
              "COMPUTE_OUTPUT_START", "COMPUTE_END", "REQUEST_END", "INFER_RESPONSE_COMPLETE", "HTTP_SEND_START",
              "HTTP_SEND_END"]
GRPC_TRACE = ["GRPC_WAITREAD_START", "GRPC_WAITREAD_END", *HTTP_TRACE[2:-2], "GRPC_SEND_START", "GRPC_SEND_END"]


def stream_one(rpc, model: str, x: np.ndarray, request_id: str, headers: dict | None = None) -> None:
    """One request on a gRPC stream (tritonclient's start_stream, with `headers` as its metadata),
    answered without an error."""
    answers: list = []
    rpc.start_stream(callback=lambda result, error: answers.append(error or result), headers=headers)
    rpc.async_stream_infer(model, [grpc_input(x)], request_id=request_id)
    deadline = time.monotonic() + 10
    while not answers and time.monotonic() < deadline:
        time.sleep(0.01)
    # checked before stop_stream: tritonclient's stream thread never ends after a response it cannot parse
    assert len(answers) == 1 and not isinstance(answers[0], InferenceServerException), answers
    rpc.stop_stream()


def test_opentelemetry_mode_sends_tritons_spans_under_the_clients_context(engines, start_server, otlp_collector, tolerance):
    """Triton's OpenTelemetry trace mode through tritonclient: with rate 0 only requests that carry a
    W3C traceparent (HTTP header, gRPC metadata, a gRPC stream's metadata) are traced, each as
    InferRequest > model > compute spans under the client's span; a rate switched on at runtime
    traces the rest too; level TENSORS is refused; the server stops cleanly."""
    server = start_server("--manifest", engines["small_cnn"].manifest_uri, "--model-name", "cnn",
                          "--warmup-iterations", "1", "--trace-config", "mode=opentelemetry",
                          "--trace-config", f"opentelemetry,url={otlp_collector.url}", "--trace-config", "rate=0",
                          "--trace-config", "level=TIMESTAMPS", "--trace-config", "opentelemetry,bsp_schedule_delay=20",
                          "--trace-config", "opentelemetry,resource=service.name=cnn-service").wait_ready()
    http, rpc = httpclient.InferenceServerClient(server.http_url), grpcclient.InferenceServerClient(server.grpc_url)
    x = engines["small_cnn"].model.sample_inputs(batch=2, seed=8)["input"]
    # as Triton 2.51 reports them in this mode
    assert http.get_trace_settings() == {
        "trace_level": ["TIMESTAMPS"], "trace_rate": "0", "trace_count": "-1", "trace_mode": "opentelemetry",
        "url": otlp_collector.url, "resource": "service.name=cnn-service", "bsp_max_export_batch_size": "512",
        "bsp_schedule_delay": "20", "bsp_max_queue_size": "2048"}
    contexts = {request_id: (f"{n:032x}", f"{n + 100:016x}") for n, request_id in
                enumerate(["over-http", "over-grpc", "streamed"], start=1)}
    headers = {request_id: {"traceparent": f"00-{trace_id}-{span_id}-01", "tracestate": f"vendor={request_id}"}
               for request_id, (trace_id, span_id) in contexts.items()}

    http.infer("cnn", [http_input(x)], request_id="no-context")  # rate 0: not traced
    expected = engines["small_cnn"].session().run(None, {"input": x})[0]
    np.testing.assert_allclose(http.infer("cnn", [http_input(x)], request_id="over-http", headers=headers["over-http"])
                               .as_numpy("logits"), expected, **tolerance)
    rpc.infer("cnn", [grpc_input(x)], request_id="over-grpc", headers=headers["over-grpc"])
    stream_one(rpc, "cnn", x, "streamed", headers["streamed"])
    http.update_trace_settings(settings={"trace_rate": "1"})
    http.infer("cnn", [http_input(x)], request_id="sampled")
    with pytest.raises(InferenceServerException, match="TENSORS is not supported in trace mode opentelemetry") as \
            refused:
        http.update_trace_settings(settings={"trace_level": ["TENSORS"]})
    assert refused.value.status() == "400"

    spans = otlp_collector.wait_for(12)
    assert server.terminate() == 0
    assert len(otlp_collector.spans) == 12  # nothing more: no trace for the request without a context at rate 0
    traces: dict[str, dict[str, object]] = {}
    for span in spans:
        traces.setdefault(span.trace_id, {})[span.name] = span
    by_request = {trace["cnn"].attributes["triton.request_id"]: trace for trace in traces.values()}
    assert set(by_request) == {"over-http", "over-grpc", "streamed", "sampled"}
    for request_id, trace in by_request.items():
        root, model, compute = trace["InferRequest"], trace["cnn"], trace["compute"]
        trace_id, client_span = contexts.get(request_id, (root.trace_id, ""))
        assert (root.trace_id, root.parent_span_id) == (trace_id, client_span)
        assert {span.trace_state for span in trace.values()} == {f"vendor={request_id}" if client_span else ""}
        assert (model.parent_span_id, compute.parent_span_id) == (root.span_id, model.span_id)
        assert root.resource["service.name"] == "cnn-service"
        receive_and_send = HTTP_TRACE if request_id in ("over-http", "sampled") else GRPC_TRACE
        assert [name for name, _ in root.events] == [name for name in receive_and_send if name in (
            receive_and_send[:2] + receive_and_send[-3:])]
        assert [name for name, _ in model.events] == ["REQUEST_START", "QUEUE_START", "REQUEST_END"]
        assert [name for name, _ in compute.events] == HTTP_TRACE[4:8]
        assert root.start_ns <= model.start_ns <= compute.start_ns <= compute.end_ns <= model.end_ns <= root.end_ns
        assert model.attributes["triton.model_name"] == "cnn" and model.attributes["triton.model_version"] == 1


def traces_in(path: Path) -> dict[str, dict]:
    """A Triton trace file's traces by request id: header, timestamps in file order, tensors."""
    objects = json.loads(path.read_text())
    traces = {entry["id"]: {**entry, "timestamps": [], "tensors": []} for entry in objects if "model_name" in entry}
    for entry in objects:
        if "timestamps" in entry:
            traces[entry["id"]]["timestamps"].extend((stamp["name"], stamp["ns"]) for stamp in entry["timestamps"])
        elif "activity" in entry:
            traces[entry["id"]]["tensors"].append((entry["activity"], entry["tensor"]))
    return {trace.get("request_id", ""): trace for trace in traces.values()}


def assert_timeline(trace: dict, names: list[str]) -> None:
    assert [name for name, _ in trace["timestamps"]] == names
    times = [ns for _, ns in trace["timestamps"]]
    assert times == sorted(times) and times[0] > 0, trace["timestamps"]


def test_trace_extension_writes_tritons_trace_files_for_sampled_requests(engines, start_server, tmp_path):
    """Triton's trace extension through tritonclient: tracing switched on at runtime (globally over
    HTTP, for the model over gRPC), every timestamp of a request over HTTP, gRPC and a gRPC stream
    in the order the request reached it, tensors at level TENSORS, the count running out, the
    settings Triton refuses, and the traces kept until exit written when the server stops."""
    trace_file = tmp_path / "trace.json"
    server = start_server("--manifest", engines["small_cnn"].manifest_uri, "--model-name", "cnn",
                          "--warmup-iterations", "1", "--trace-config", f"triton,file={trace_file}",
                          "--trace-config", "rate=1").wait_ready()
    http, rpc = httpclient.InferenceServerClient(server.http_url), grpcclient.InferenceServerClient(server.grpc_url)
    x = engines["small_cnn"].model.sample_inputs(batch=2, seed=8)["input"]
    assert "trace" in http.get_server_metadata()["extensions"]
    assert http.get_trace_settings() == {"trace_level": ["OFF"], "trace_rate": "1", "trace_count": "-1",
                                         "log_frequency": "0", "trace_file": str(trace_file), "trace_mode": "triton"}
    http.infer("cnn", [http_input(x)], request_id="while-off")

    on = http.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"], "log_frequency": "2"})
    assert on["trace_level"] == ["TIMESTAMPS"] and on["log_frequency"] == "2"
    http.infer("cnn", [http_input(x)], request_id="over-http")
    rpc.infer("cnn", [grpc_input(x)], request_id="over-grpc")
    written = traces_in(Path(f"{trace_file}.0"))
    assert set(written) == {"over-http", "over-grpc"}
    assert written["over-http"]["model_name"] == "cnn" and written["over-http"]["model_version"] == 1
    assert_timeline(written["over-http"], HTTP_TRACE)
    assert_timeline(written["over-grpc"], GRPC_TRACE)

    # the model's own settings: its tensors, one trace only
    model_settings = rpc.update_trace_settings(model_name="cnn", settings={"trace_level": ["TENSORS"], "trace_count": "1"},
                                               as_json=True)["settings"]
    assert model_settings["trace_level"] == {"value": ["TENSORS"]} and model_settings["log_frequency"] == {"value": ["2"]}
    outputs = rpc.infer("cnn", [grpc_input(x)], request_id="tensors").as_numpy("logits")
    rpc.infer("cnn", [grpc_input(x)], request_id="after-the-count")
    assert http.get_trace_settings(model_name="cnn")["trace_count"] == "0"
    assert http.get_trace_settings()["trace_count"] == "-1"  # the global count is the global sampler's
    written = traces_in(Path(f"{trace_file}.1"))  # the count's last trace: written at once
    assert list(written) == ["tensors"] and written["tensors"]["timestamps"] == []
    (queued, into), (backend, out) = written["tensors"]["tensors"]
    assert (queued, backend) == ("TENSOR_QUEUE_INPUT", "TENSOR_BACKEND_OUTPUT")
    assert into == {"name": "input", "data": ",".join(format(v, "g") for v in x.ravel().tolist()),
                    "shape": "2,3,32,32", "dtype": "FP32"}
    assert out["name"] == "logits" and out["shape"] == "2,10"
    np.testing.assert_allclose(np.array(out["data"].split(","), np.float32), outputs.ravel(), rtol=1e-5)

    # refused, and the server goes on serving
    with pytest.raises(InferenceServerException, match="trace file location can not be updated") as refused:
        http.update_trace_settings(settings={"trace_file": str(tmp_path / "other.json")})
    assert refused.value.status() == "501"
    with pytest.raises(InferenceServerException, match="can not be updated") as refused:
        rpc.update_trace_settings(settings={"trace_file": None})
    assert refused.value.status() == "StatusCode.UNIMPLEMENTED"
    with pytest.raises(InferenceServerException, match="Unable to parse 'trace_rate', got: often") as refused:
        http.update_trace_settings(model_name="cnn", settings={"trace_rate": "often"})
    assert refused.value.status() == "400"
    with pytest.raises(InferenceServerException, match="expect only 1 value for 'trace_count'") as refused:
        rpc.update_trace_settings(settings={"trace_count": ["1", "2"]})
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(InferenceServerException, match="Request for unknown model : bert"):
        http.get_trace_settings(model_name="bert")
    assert http.get_trace_settings(model_name="cnn")["trace_rate"] == "1"

    # the model follows the global settings again; traces kept until the server stops (log_frequency 0)
    rpc.update_trace_settings(model_name="cnn", settings={"trace_level": None, "trace_count": None})
    assert http.update_trace_settings(settings={"log_frequency": None})["log_frequency"] == "0"
    http.infer("cnn", [http_input(x)], request_id="kept")
    stream_one(rpc, "cnn", x, "streamed")
    assert not trace_file.exists()
    assert server.terminate() == 0
    written = traces_in(trace_file)
    assert set(written) == {"kept", "streamed"}
    assert_timeline(written["kept"], HTTP_TRACE)
    assert_timeline(written["streamed"], GRPC_TRACE)
    assert not Path(f"{trace_file}.2").exists()

    # plansmith trace-summary reads them: every span of each timed request, over each protocol
    groups = {group.protocol: group for group in summarize(read_traces(
        [trace_file, Path(f"{trace_file}.0"), Path(f"{trace_file}.1")]))}
    assert {protocol: group.traces for protocol, group in groups.items()} == {"HTTP": 2, "GRPC": 2, "unknown": 1}
    spans = ("request", "receive", "handler", "queue", "compute", "input", "infer", "output", "overhead", "send")
    for group in (groups["HTTP"], groups["GRPC"]):
        assert {name: len(values) for name, values in group.spans.items()} == dict.fromkeys(spans, 2)
        assert all(value >= 0 for values in group.spans.values() for value in values)
