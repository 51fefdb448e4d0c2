"""Triton's CUDA shared memory extension: the region registry's own logic against a stand-in for
cuda-python's runtime (conftest's StandInCudaRuntime: device memory played by host buffers, so what
is copied where is visible), inputs read in place on the model's device, and one namespace of region
names with the system regions. A real server and tritonclient's cuda_shared_memory utilities on a
GPU: test_server.py. Outputs written into regions by the executor, through the HTTP and gRPC front
ends in this process: the last test."""

from __future__ import annotations

import asyncio
import base64
import json
import logging

import numpy as np
import pytest

from plansmith_runtime.config import BatchingPolicy, ServingConfig
from plansmith_runtime.cuda_shared_memory import CudaSharedMemory, cuda_raw_handle
from plansmith_runtime.executors.device_memory import DeviceBatches, DeviceTensor
from plansmith_runtime.protocol import SharedMemoryError, SharedMemoryReference
from plansmith_runtime.shared_memory import SharedMemoryRegions


def registry_with_region(cuda, nbytes: int = 256, device_id: int = 0, input_device: int | None = None):
    handle = cuda.allocate(nbytes, tag=7)
    registry = CudaSharedMemory(cuda, input_device=lambda: input_device, driver=cuda)
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
    # as Triton checks (cuMemGetAddressRange): requests would read and write past the client's memory
    (lambda r: r.register("oversized", r._runtime.allocate(16, tag=3), 0, 17),
     "byte_size 17 is larger than the 16 bytes of device memory its handle opens"),
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


def test_an_output_in_a_region_of_the_models_device_is_a_destination_the_executor_writes(stand_in_cuda, tmp_path):
    """A region on the model's device gives the batcher a device destination for the output; its
    write afterwards sees the executor's DeviceTensor at that address and copies nothing. A region
    of another device, a system region or a CPU model: the output comes through the host."""
    registry, cuda, handle = registry_with_region(stand_in_cuda(devices=2), device_id=0, input_device=0)
    [mapped] = cuda.opened
    reference = SharedMemoryReference("images", 64, 32)
    destination = registry.output_destination(reference, "logits")
    assert (destination.pointer, destination.capacity, destination.device_id) == (mapped + 32, 64, 0)
    written = destination.tensor(np.dtype(np.float32), (2, 8))
    assert registry.write_output(reference, "logits", written) == 64 and cuda.copies == []
    with pytest.raises(SharedMemoryError, match="should be at least 72 bytes"):
        registry.write_output(reference, "logits", destination.tensor(np.dtype(np.float32), (2, 9)))
    with pytest.raises(SharedMemoryError, match="run past the end of CUDA shared memory region 'images'"):
        registry.output_destination(SharedMemoryReference("images", 64, 224), "logits")
    registry.unregister("images")
    assert cuda.opened == {mapped: handle}  # the request holding the destination keeps the region mapped
    del destination, written
    assert cuda.opened == {}

    elsewhere, _, _ = registry_with_region(cuda, device_id=1, input_device=0)
    assert elsewhere.output_destination(reference, "logits") is None
    on_cpu, _, _ = registry_with_region(cuda, device_id=0, input_device=None)
    assert on_cpu.output_destination(reference, "logits") is None

    regions = SharedMemoryRegions(cuda=registry_with_region(cuda, device_id=0, input_device=0)[0])
    (tmp_path / "outputs").write_bytes(bytes(64))
    regions.system.directory = tmp_path
    regions.register_system("outputs", "/outputs", 0, 64)
    destinations = regions.output_destinations({"logits": reference, "scores": SharedMemoryReference("outputs", 8, 0)})
    assert list(destinations) == ["logits"]  # the system region's output is written from the host
    regions.close()


async def test_outputs_in_regions_of_the_models_device_are_written_there_by_the_executor_over_http_and_grpc(
        cpu_engines, stand_in_cuda, monkeypatch):
    """The whole path in this process, the model's executor in its GPU mode on the CPU (as in
    test_onnxruntime.py): requests over HTTP and gRPC name a CUDA region of the model's device for
    the logits. A batch of them gets its logits copied there device-to-device, none through the host;
    a batch that also holds a request wanting its logits in the response writes the region from the
    host, as before; the responses describe the regions either way."""
    import tritonclient.http as httpclient
    from tritonclient.grpc import service_pb2

    from plansmith_runtime.executors import onnxruntime as ort_executor
    from plansmith_runtime.grpc_api import InferCall, InferenceService
    from plansmith_runtime.http_api import HttpApi
    from plansmith_runtime.http_transport import HttpRequest
    from plansmith_runtime.log_settings import LogControl, LogSettings
    from plansmith_runtime.model import LoadOptions, ServedModel
    from plansmith_runtime.tracing import TraceControl, TraceSettings

    built = cpu_engines["small_cnn"]
    monkeypatch.setattr(ort_executor, "uses_io_binding", lambda providers: True)
    model = ServedModel(ServingConfig("cnn", BatchingPolicy(max_batch_size=8, enabled=True, max_queue_delay_us=50_000),
                                      warmup_iterations=1))
    await model.load(LoadOptions(built.manifest_uri, pinned_memory_pool_bytes=0))
    cuda = stand_in_cuda()
    for executor in model._executors:  # what a session on the CUDA provider has
        executor.device_inputs, executor.device_batches = 0, DeviceBatches(0, 8, runtime=cuda)
    regions = SharedMemoryRegions(cuda=CudaSharedMemory(cuda, input_device=lambda: model.input_device, driver=cuda))
    logs = LogControl(LogSettings(), [], logging.getLogger("test-cuda-outputs"))
    http = HttpApi(model, lambda: model.ready, regions, logs, TraceControl(TraceSettings(), [model.name], model.version))
    rpc = InferenceService(model, lambda: model.ready, regions, logs, TraceControl(TraceSettings(), [model.name], model.version))
    x = [built.model.sample_inputs(batch=1, seed=60 + index)["input"] for index in range(4)]
    expected = [built.session().run(None, {"input": image})[0] for image in x]
    row = expected[0].nbytes
    handle = cuda.allocate(4 * row, tag=3)
    regions.register_cuda("logits", handle, 0, 4 * row)

    def in_region(index: int) -> np.ndarray:
        return np.frombuffer(cuda.memory(handle)[index * row:(index + 1) * row].tobytes(), np.float32).reshape(expected[0].shape)

    async def over_http(index: int, region: bool) -> dict:
        tensor = httpclient.InferInput("input", list(x[index].shape), "FP32")
        tensor.set_data_from_numpy(x[index])
        wanted = httpclient.InferRequestedOutput("logits")
        if region:
            wanted.set_shared_memory("logits", row, offset=index * row)
        body, header_length = httpclient.InferenceServerClient.generate_request_body([tensor], [wanted])
        headers = {"inference-header-content-length": str(header_length)} if header_length else {}
        response = await http.handle(HttpRequest("POST", "/v2/models/cnn/infer", headers, body))
        assert response.status == 200, response.body
        return json.loads(response.body[:int(dict(response.headers).get("Inference-Header-Content-Length", len(response.body)))])

    try:
        answers = await asyncio.gather(*(over_http(index, region=True) for index in range(3)))
        assert [answer["outputs"][0]["parameters"] for answer in answers] == [
            {"shared_memory_region": "logits", "shared_memory_byte_size": row, **({"shared_memory_offset": index * row} if index else {})}
            for index in range(3)]
        assert cuda.copies == [("cudaMemcpyDeviceToDevice", row, 0)] * 3  # one batch, its rows straight to the regions
        for index in range(3):
            np.testing.assert_allclose(in_region(index), expected[index], rtol=1e-5, atol=1e-5)

        cuda.copies.clear()
        mixed = await asyncio.gather(over_http(3, region=True), over_http(0, region=False))
        assert cuda.copies == [("cudaMemcpyHostToDevice", row, 0)]  # the batch's logits came to the host
        np.testing.assert_allclose(in_region(3), expected[3], rtol=1e-5, atol=1e-5)
        assert "shared_memory_region" in mixed[0]["outputs"][0]["parameters"]

        cuda.copies.clear()
        request = service_pb2.ModelInferRequest(model_name="cnn")
        request.inputs.add(name="input", datatype="FP32", shape=list(x[1].shape))
        output = request.outputs.add(name="logits")
        output.parameters["shared_memory_region"].string_param = "logits"
        output.parameters["shared_memory_byte_size"].int64_param = row
        cuda.memory(handle)[:] = 0
        response = await rpc.ModelInfer(InferCall(request, [x[1].tobytes()]))
        assert cuda.copies == [("cudaMemcpyDeviceToDevice", row, 0)] and list(response.raw_output_contents) == [b""]
        assert response.outputs[0].parameters["shared_memory_byte_size"].int64_param == row
        np.testing.assert_allclose(in_region(0), expected[1], rtol=1e-5, atol=1e-5)
    finally:
        await model.stop(1.0)
        regions.close()


def test_a_refused_registration_closes_the_handle_it_opened_at_once(stand_in_cuda):
    """Not when the exception and its traceback (whose frames hold the handle) are collected."""
    registry, cuda, _ = registry_with_region(stand_in_cuda())
    try:
        registry.register("oversized", cuda.allocate(16, tag=3), 0, 17)
    except SharedMemoryError as error:
        refused = error  # alive, with its traceback, while the handles are counted
    assert "larger than the 16 bytes" in str(refused) and len(cuda.opened) == 1
