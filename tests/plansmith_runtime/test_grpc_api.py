"""Parsing and decoding ModelInfer requests the way Triton does: inputs from raw_input_contents, typed contents
or shared memory in one request."""

from __future__ import annotations

import asyncio
import os

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as client_shm
from tritonclient.grpc import service_pb2

from plansmith_runtime.grpc_api import InferenceService, decode_grpc_inputs, parse_infer_request
from plansmith_runtime.protocol import InvalidRequest
from plansmith_runtime.shared_memory import SystemSharedMemory


def request_of(*inputs) -> service_pb2.ModelInferRequest:
    """The request tritonclient's gRPC client sends for these InferInputs."""
    request = service_pb2.ModelInferRequest(model_name="m")
    for tensor in inputs:
        request.inputs.append(tensor._get_tensor())
        if tensor._get_content() is not None:
            request.raw_input_contents.append(tensor._get_content())
    return request


def test_raw_contents_belong_to_the_inputs_not_in_shared_memory():
    a, b, c = (np.full((1, 4), value, np.float32) for value in (1, 2, 3))
    key = f"/plansmith-grpc-{os.getpid()}"
    handle = client_shm.create_shared_memory_region("b", key, b.nbytes)
    registry = SystemSharedMemory()
    try:
        client_shm.set_shared_memory_region(handle, [b])
        registry.register("b-region", key, 0, b.nbytes)
        first, second, third = (grpcclient.InferInput(name, [1, 4], "FP32") for name in "abc")
        first.set_data_from_numpy(a)
        second.set_shared_memory("b-region", b.nbytes)
        third.set_data_from_numpy(c)
        arrays = decode_grpc_inputs(request_of(first, second, third), registry)
        for name, expected in zip("abc", (a, b, c)):
            np.testing.assert_array_equal(arrays[name], expected)

        with pytest.raises(InvalidRequest, match="takes no shared memory"):
            decode_grpc_inputs(request_of(first, second, third))
        request = request_of(first, second, third)
        request.raw_input_contents.append(c.tobytes())
        with pytest.raises(InvalidRequest, match="3 raw_input_contents for 2 inputs"):
            decode_grpc_inputs(request, registry)
        del request.raw_input_contents[1:]
        with pytest.raises(InvalidRequest, match="unable to find data for input 'c'"):
            decode_grpc_inputs(request, registry)
    finally:
        registry.close()
        client_shm.destroy_shared_memory_region(handle)


def test_typed_contents_and_raw_contents_do_not_mix():
    request = service_pb2.ModelInferRequest(model_name="m")
    request.inputs.add(name="a", datatype="FP32", shape=[1, 2]).contents.fp32_contents.extend([1.0, 2.0])
    np.testing.assert_array_equal(decode_grpc_inputs(request)["a"], [[1.0, 2.0]])
    request.inputs.add(name="b", datatype="FP32", shape=[1, 2])
    request.raw_input_contents.append(np.zeros(2, np.float32).tobytes())
    with pytest.raises(InvalidRequest, match="contents must not be given when raw_input_contents"):
        decode_grpc_inputs(request)


def test_an_infer_request_is_parsed_with_its_tensors_as_views_of_the_received_bytes():
    images = np.random.default_rng(5).standard_normal((2, 3, 8, 8), dtype=np.float32)
    first, second = grpcclient.InferInput("images", list(images.shape), "FP32"), grpcclient.InferInput("ids", [2], "INT64")
    first.set_data_from_numpy(images)
    second.set_data_from_numpy(np.array([7, 9], np.int64))
    request = request_of(first, second)
    request.id = "call-1"
    received = request.SerializeToString()

    call = parse_infer_request(memoryview(received))
    assert call.message.id == "call-1" and [t.name for t in call.message.inputs] == ["images", "ids"]
    assert not call.message.raw_input_contents
    assert [bytes(raw) for raw in call.raw_input_contents] == list(request.raw_input_contents)
    arrays = decode_grpc_inputs(call.message, raw_input_contents=call.raw_input_contents)
    np.testing.assert_array_equal(arrays["images"], images)
    np.testing.assert_array_equal(arrays["ids"], [7, 9])
    assert arrays["images"].base is not None and np.shares_memory(arrays["images"], np.frombuffer(received, np.uint8))

    # wire bytes that protobuf_wire leaves to protobuf (a group) parse the same, with copies
    grouped = parse_infer_request(received + bytes([8 << 3 | 3, 8 << 3 | 4]))
    assert [bytes(raw) for raw in grouped.raw_input_contents] == list(request.raw_input_contents)
    np.testing.assert_array_equal(decode_grpc_inputs(grouped.message, raw_input_contents=grouped.raw_input_contents)["images"],
                                  images)


class DoublingModel:
    """A served model named "mlp" that doubles its input "x"."""
    name, version, ready, has_batch_dim = "mlp", "1", True, True

    def check_version(self, version: str) -> None:
        pass

    async def infer(self, inputs, wanted, timeout, trace, destinations, respond):
        return respond({"y": inputs["x"] * 2})


class NoTracing:
    def start(self, *args) -> None:
        return None


def test_a_failed_stream_request_is_answered_with_its_id_so_the_client_knows_which_failed():
    """Triton fills in a failed stream request's id: a client reading the raw stream (not through
    tritonclient's callback, which drops it) can tell which of its requests failed."""
    service = InferenceService(DoublingModel(), lambda: True, None, None, NoTracing())

    def answer(request_id: str, model: str) -> service_pb2.ModelStreamInferResponse:
        request = service_pb2.ModelInferRequest(id=request_id, model_name=model, model_version="1")
        request.inputs.add(name="x", datatype="FP32", shape=[1, 2])
        request.raw_input_contents.append(np.ones((1, 2), np.float32).tobytes())
        return asyncio.run(service.ModelStreamInfer(parse_infer_request(request.SerializeToString())))

    failed = answer("req-bad", "no-such-model")
    assert "no-such-model" in failed.error_message
    assert (failed.infer_response.id, failed.infer_response.model_name) == ("req-bad", "no-such-model")
    assert failed.infer_response.model_version == "1" and not failed.infer_response.outputs
    served = answer("req-ok", "mlp")
    assert served.error_message == "" and served.infer_response.id == "req-ok"
    assert np.frombuffer(served.infer_response.raw_output_contents[0], np.float32).tolist() == [2, 2]


def test_a_region_name_registered_twice_or_unknown_gets_triton_s_status_codes(tmp_path):
    """Triton's shared memory manager answers ALREADY_EXISTS and NOT_FOUND (tritonclient shows them);
    other bad registrations stay INVALID_ARGUMENT."""
    import grpc

    from plansmith_runtime.grpc_transport import GrpcError
    from plansmith_runtime.shared_memory import SharedMemoryRegions

    key = f"/plansmith-grpc-codes-{os.getpid()}"
    handle = client_shm.create_shared_memory_region("codes", key, 64)
    regions = SharedMemoryRegions()
    service = InferenceService(DoublingModel(), lambda: True, regions, None, NoTracing())
    register = service_pb2.SystemSharedMemoryRegisterRequest(name="r", key=key, offset=0, byte_size=64)
    try:
        service.SystemSharedMemoryRegister(register)
        codes = []
        for call, request in ((service.SystemSharedMemoryRegister, register),
                              (service.SystemSharedMemoryStatus, service_pb2.SystemSharedMemoryStatusRequest(name="nope")),
                              (service.CudaSharedMemoryStatus, service_pb2.CudaSharedMemoryStatusRequest(name="nope")),
                              (service.SystemSharedMemoryRegister,
                               service_pb2.SystemSharedMemoryRegisterRequest(name="big", key=key, offset=0, byte_size=65))):
            with pytest.raises(GrpcError) as failed:
                call(request)
            codes.append(failed.value.status)
        assert codes == [grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.NOT_FOUND,
                         grpc.StatusCode.INVALID_ARGUMENT]
    finally:
        regions.close()
        client_shm.destroy_shared_memory_region(handle)


def test_a_log_setting_named_without_a_value_is_refused_and_nothing_changes():
    """Triton answers INVALID_ARG ("expect boolean for 'log_info'"); such a setting was ignored."""
    import logging

    import grpc

    from plansmith_runtime.grpc_transport import GrpcError
    from plansmith_runtime.log_settings import LogControl, LogSettings

    logs = LogControl(LogSettings(), [], logging.getLogger("test-grpc-log-settings"))
    service = InferenceService(DoublingModel(), lambda: True, None, logs, NoTracing())
    request = service_pb2.LogSettingsRequest()
    request.settings["log_info"].bool_param = False
    request.settings["log_verbose_level"].SetInParent()  # named, no value
    with pytest.raises(GrpcError, match=r"without a value: \['log_verbose_level'\]") as refused:
        service.LogSettings(request)
    assert refused.value.status == grpc.StatusCode.INVALID_ARGUMENT
    assert service.LogSettings(service_pb2.LogSettingsRequest()).settings["log_info"].bool_param is True
