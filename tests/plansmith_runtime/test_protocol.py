"""Request decoding and validation shared by the HTTP and gRPC front ends."""

import json

import numpy as np
import pytest

from plansmith.manifest import TensorSpec
from plansmith_runtime.protocol import (InferRequest, InvalidRequest, Signature, check_inputs, decode_http_request,
                                        encode_http_response, requested_classes, tensor_bytes)

SIGNATURE = Signature((TensorSpec(name="input", dtype="float32", shape=[-1, 4]),),
                      (TensorSpec(name="logits", dtype="float32", shape=[-1, 2]),), max_batch_size=8)


def binary_body(array: np.ndarray, **extra) -> tuple[bytes, str]:
    header = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(array.shape),
                                     "parameters": {"binary_data_size": array.nbytes}}], **extra}).encode()
    return header + array.tobytes(), str(len(header))


def test_binary_tensor_extension_round_trip():
    array = np.arange(8, dtype=np.float32).reshape(2, 4)
    body, length = binary_body(array, outputs=[{"name": "logits", "parameters": {"binary_data": True}}])
    request = decode_http_request(body, length)
    np.testing.assert_array_equal(request.inputs["input"], array)
    assert request.outputs == ("logits",) and request.binary_outputs == {"logits": True}


def test_json_tensor_data():
    body = json.dumps({"id": "7", "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]})
    request = decode_http_request(body.encode(), None)
    assert request.id == "7"
    np.testing.assert_array_equal(request.inputs["input"], [[1, 2, 3, 4]])


@pytest.mark.parametrize("body, header, message", [
    (b"{not json", None, "failed to parse"),
    (b'{"inputs": 3}', None, "'inputs' list"),
    (json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4],
                             "parameters": {"binary_data_size": 16}}]}).encode() + b"\0" * 8, "BAD", "not an integer"),
    (json.dumps({"inputs": [{"name": "input", "datatype": "STRING", "shape": [1], "data": [1]}]}).encode(), None, "unsupported datatype"),
    (json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, 2]}]}).encode(), None, "2 values for shape"),
    # values out of their datatype's range, and shapes numpy refuses even without elements: 400, not 500
    (json.dumps({"inputs": [{"name": "x", "datatype": "UINT8", "shape": [1, 1], "data": [300]}]}).encode(), None, "data is not UINT8"),
    (json.dumps({"inputs": [{"name": "x", "datatype": "INT64", "shape": [1], "data": [2 ** 63]}]}).encode(), None, "data is not INT64"),
    (json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2 ** 63, 0], "data": []}]}).encode(), None, "larger than any tensor"),
    (json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2 ** 62, 0], "parameters": {"binary_data_size": 0}}]}).encode(),
     "BINARY", "larger than any tensor"),
    (json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}], "outputs": True}).encode(), None,
     "'outputs' must be a list"),
    (json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}],
                 "outputs": [{"name": "y", "parameters": {"binary_data": "false"}}]}).encode(), None, "must be true or false"),
    (json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}],
                 "parameters": {"binary_data_output": 1}}).encode(), None, "'binary_data_output' must be true or false"),
])
def test_malformed_bodies_are_invalid_requests(body, header, message):
    if header == "BAD":
        header = "abc"
    elif header == "BINARY":  # the whole body is the JSON header
        header = str(len(body))
    with pytest.raises(InvalidRequest, match=message):
        decode_http_request(body, header)


def test_binary_length_mismatch_is_reported():
    array = np.zeros((1, 4), np.float32)
    header = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4],
                                     "parameters": {"binary_data_size": 12}}]}).encode()
    with pytest.raises(InvalidRequest, match="12 bytes of data for shape"):
        decode_http_request(header + array.tobytes()[:12], str(len(header)))


@pytest.mark.parametrize("arrays, message", [
    ({}, "missing \\['input'\\]"),
    ({"other": np.zeros((1, 4), np.float32)}, "unexpected inference input 'other'"),
    ({"input": np.zeros((1, 4), np.float64)}, "datatype FP64"),
    ({"input": np.zeros((1, 5), np.float32)}, "shape"),
    ({"input": np.zeros((9, 4), np.float32)}, "batch-size must be <= 8"),
])
def test_inputs_are_checked_against_the_model(arrays, message):
    with pytest.raises(InvalidRequest, match=message):
        check_inputs(SIGNATURE, arrays)


def test_batch_size_is_dimension_zero():
    assert check_inputs(SIGNATURE, {"input": np.zeros((3, 4), np.float32)}) == 3


def test_response_with_binary_and_json_outputs():
    request = InferRequest(id="x", inputs={}, outputs=[], binary_default=True)
    out = np.ones((1, 2), np.float32)
    body, length = encode_http_response("m", "1", request, {"logits": out})
    document = json.loads(body[:length])
    assert document["outputs"][0]["parameters"]["binary_data_size"] == 8
    assert np.frombuffer(body[length:], np.float32).tolist() == [1, 1]
    body, length = encode_http_response("m", "1", InferRequest(id="", inputs={}, outputs=[]), {"logits": out})
    assert length is None and json.loads(body)["outputs"][0]["data"] == [1, 1]


def test_inputs_of_a_layout_seen_before_are_not_checked_again(monkeypatch):
    from plansmith_runtime import protocol

    signature = Signature(SIGNATURE.inputs, SIGNATURE.outputs, SIGNATURE.max_batch_size)
    checks = []
    monkeypatch.setattr(protocol, "check_inputs", lambda sig, arrays: checks.append(arrays) or check_inputs(sig, arrays))
    first = signature.check({"input": np.zeros((3, 4), np.float32)})
    again = signature.check({"input": np.ones((3, 4), np.float32)})  # other values, same layout
    other = signature.check({"input": np.zeros((5, 4), np.float32)})
    assert len(checks) == 2 and first is again
    assert (first.batch, other.batch) == (3, 5) and first.batch_key == other.batch_key  # they batch together


def test_inputs_that_fail_the_checks_fail_every_time_and_are_not_remembered():
    signature = Signature(SIGNATURE.inputs, SIGNATURE.outputs, SIGNATURE.max_batch_size)
    for _ in range(2):
        with pytest.raises(InvalidRequest, match="datatype FP64"):
            signature.check({"input": np.zeros((1, 4), np.float64)})
    assert signature.check({"input": np.zeros((1, 4), np.float32)}).batch == 1


def test_the_memo_of_checked_layouts_stays_bounded(monkeypatch):
    from plansmith_runtime import protocol

    monkeypatch.setattr(protocol, "MEMO_LAYOUTS", 4)
    tokens = Signature((TensorSpec(name="tokens", dtype="int64", shape=[-1, -1], minShape=[1, 1], maxShape=[8, 128]),),
                       (), max_batch_size=8)
    for length in range(1, 20):
        assert tokens.check({"tokens": np.zeros((2, length), np.int64)}).batch == 2
    assert len(tokens._checked_layouts) <= 4


def test_an_all_binary_response_header_is_made_once_per_layout_and_reads_as_the_general_one():
    from plansmith_runtime import protocol

    outputs = {"logits": np.arange(6, dtype=np.float32).reshape(2, 3).T,  # not C-contiguous: sent in C order
               "ids": np.array([[1], [2], [3]], np.int64)}
    anonymous = InferRequest(id="", inputs={}, outputs=(), binary_default=True)
    before = protocol._binary_outputs_header.cache_info()
    body, length = encode_http_response("m", "1", anonymous, outputs)
    again, _ = encode_http_response("m", "1", anonymous, outputs)
    after = protocol._binary_outputs_header.cache_info()
    assert (after.misses - before.misses, after.hits - before.hits) == (1, 1) and again == body
    # a request with an id takes the general path; both headers say the same, and the bytes follow in order
    general, general_length = encode_http_response("m", "1", InferRequest(id="7", inputs={}, outputs=(), binary_default=True), outputs)
    memo_header, general_header = json.loads(body[:length]), json.loads(general[:general_length])
    assert general_header.pop("id") == "7" and memo_header == general_header
    assert [t["parameters"]["binary_data_size"] for t in memo_header["outputs"]] == [24, 24]
    assert body[length:] == general[general_length:] == outputs["logits"].tobytes(order="C") + outputs["ids"].tobytes()
    assert np.frombuffer(body[length:length + 24], np.float32).reshape(3, 2).tolist() == outputs["logits"].tolist()


def test_dynamic_dimensions_must_stay_in_the_engines_range():
    tokens = Signature((TensorSpec(name="tokens", dtype="int64", shape=[-1, -1], minShape=[1, 4], maxShape=[8, 128]),),
                       (), max_batch_size=8)
    assert check_inputs(tokens, {"tokens": np.zeros((2, 64), np.int64)}) == 2
    with pytest.raises(InvalidRequest, match="dimension 1 is 200, the engine accepts 4 to 128"):
        check_inputs(tokens, {"tokens": np.zeros((2, 200), np.int64)})


def test_a_repeated_header_is_parsed_once_and_each_body_keeps_its_own_values():
    from plansmith_runtime import protocol

    first, second = np.full((2, 4), 1.5, np.float32), np.full((2, 4), -3.0, np.float32)
    body_one, length = binary_body(first, outputs=[{"name": "logits"}])
    body_two, same_length = binary_body(second, outputs=[{"name": "logits"}])
    assert body_one[:int(length)] == body_two[:int(same_length)]  # the same header bytes
    before = protocol._parse_repeated_header.cache_info().hits
    one, two = decode_http_request(body_one, length), decode_http_request(body_two, same_length)
    assert protocol._parse_repeated_header.cache_info().hits > before
    np.testing.assert_array_equal(one.inputs["input"], first)
    np.testing.assert_array_equal(two.inputs["input"], second)
    # the outputs asked for come from the memo, shared by both requests: read-only, so no request can change another's
    assert one.outputs == two.outputs == ("logits",)
    with pytest.raises(TypeError):
        one.binary_outputs["logits"] = True  # type: ignore[index]


def test_a_memoized_header_still_has_its_body_checked():
    array = np.zeros((1, 4), np.float32)
    body, length = binary_body(array)
    decode_http_request(body, length)
    with pytest.raises(InvalidRequest, match="runs past the end of the body"):
        decode_http_request(body[:-4], length)
    with pytest.raises(InvalidRequest, match="4 unexpected bytes"):
        decode_http_request(body + b"\0" * 4, length)


class FakeRegions:
    """Stands in for SystemSharedMemory (tested against real shared memory in test_shared_memory)."""

    def __init__(self) -> None:
        self.memory = np.zeros(64, np.float32)
        self.written: dict[str, tuple] = {}

    def input_array(self, reference, tensor, dtype, shape):
        start = reference.offset // 4
        return self.memory[start:start + int(np.prod(shape))].reshape(shape)

    def write_output(self, reference, tensor, array):
        self.written[tensor] = (reference, array.copy())
        return array.nbytes


def test_tensors_in_shared_memory_are_read_and_written_there_not_sent():
    regions = FakeRegions()
    regions.memory[4:12] = np.arange(8)
    header = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 4],
                          "parameters": {"shared_memory_region": "in", "shared_memory_byte_size": 32,
                                         "shared_memory_offset": 16}}],
              "outputs": [{"name": "logits", "parameters": {"shared_memory_region": "out", "shared_memory_byte_size": 16,
                                                            "binary_data": True}}]}
    request = decode_http_request(json.dumps(header).encode(), None, regions)
    np.testing.assert_array_equal(request.inputs["input"], np.arange(8, dtype=np.float32).reshape(2, 4))
    logits = np.ones((2, 2), np.float32)
    body, header_length = encode_http_response("m", "1", request, {"logits": logits}, regions)
    assert header_length is None  # nothing binary follows: the output went to shared memory
    assert json.loads(body)["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [2, 2], "parameters": {
        "shared_memory_region": "out", "shared_memory_byte_size": 16}}]
    reference, written = regions.written["logits"]
    assert (reference.region, reference.byte_size, reference.offset) == ("out", 16, 0)
    np.testing.assert_array_equal(written, logits)


def test_a_bytes_output_in_shared_memory_is_written_length_prefixed():
    """A classification (BYTES) asked for in a region: written as a binary response carries it,
    each element after its 4-byte length, which tritonclient's shared memory utilities read back."""
    from tritonclient.utils import deserialize_bytes_tensor

    regions = FakeRegions()
    header = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1], "data": [1]}],
              "outputs": [{"name": "classes", "parameters": {"shared_memory_region": "out", "shared_memory_byte_size": 64}}]}
    request = decode_http_request(json.dumps(header).encode(), None, regions)
    classes = np.array([[b"0.700000:1", b"0.200000:2"]], dtype=object)
    body, _ = encode_http_response("m", "1", request, {"classes": classes}, regions)
    written = regions.written["classes"][1]
    assert written.dtype == np.uint8 and json.loads(body)["outputs"][0]["parameters"]["shared_memory_byte_size"] == 28
    assert deserialize_bytes_tensor(written.tobytes()).tolist() == [b"0.700000:1", b"0.200000:2"]


@pytest.mark.parametrize("parameters, extra, message", [
    ({"shared_memory_region": "in"}, {}, "shared_memory_byte_size must be a non-negative integer"),
    ({"shared_memory_region": "", "shared_memory_byte_size": 16}, {}, "must be a region name"),
    ({"shared_memory_region": "in", "shared_memory_byte_size": 16, "shared_memory_offset": -4}, {}, "shared_memory_offset"),
    ({"shared_memory_region": "in", "shared_memory_byte_size": 16}, {"data": [1, 2, 3, 4]}, "also carries data"),
])
def test_malformed_shared_memory_parameters_are_invalid_requests(parameters, extra, message):
    header = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "parameters": parameters, **extra}]}
    with pytest.raises(InvalidRequest, match=message):
        decode_http_request(json.dumps(header).encode(), None, FakeRegions())
    with pytest.raises(InvalidRequest, match="takes no shared memory"):  # a front end without regions
        decode_http_request(json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "parameters": {
            "shared_memory_region": "in", "shared_memory_byte_size": 16}}]}).encode(), None)


def test_classification_counts_are_read_from_each_outputs_parameters():
    body, length = binary_body(np.ones((1, 4), np.float32), outputs=[
        {"name": "logits", "parameters": {"classification": 3, "binary_data": False}}, {"name": "other"}])
    request = decode_http_request(body, length)
    assert request.classifications == {"logits": 3} and request.binary_outputs == {"logits": False}
    assert requested_classes("logits", {"classification": 0}) == 0  # 0: the raw tensor, as tritonclient's default


@pytest.mark.parametrize("parameters, message", [
    ({"classification": -1}, "classification must be a non-negative integer, got -1"),
    ({"classification": True}, "classification must be a non-negative integer, got True"),
    ({"classification": "3"}, "classification must be a non-negative integer, got '3'"),
    ({"classification": 2, "shared_memory_region": "out", "shared_memory_byte_size": 8},
     "a classification result is not written to shared memory"),
])
def test_malformed_classification_parameters_are_invalid_requests(parameters, message):
    body, length = binary_body(np.ones((1, 4), np.float32), outputs=[{"name": "logits", "parameters": parameters}])
    with pytest.raises(InvalidRequest, match=f"output 'logits': {message}"):
        decode_http_request(body, length, FakeRegions())


def test_a_bytes_output_is_sent_length_prefixed_in_binary_and_as_strings_in_json():
    classes = np.array([[b"7.125000:3", b"2.250000:1"]], dtype=object)
    assert tensor_bytes(classes) == b"\x0a\x00\x00\x007.125000:3\x0a\x00\x00\x002.250000:1"
    assert tensor_bytes(np.empty((1, 0), dtype=object)) == b""
    binary = InferRequest(id="", inputs={}, outputs=["logits"], binary_default=True, classifications={"logits": 2})
    body, length = encode_http_response("m", "1", binary, {"logits": classes})
    assert json.loads(body[:length])["outputs"] == [
        {"name": "logits", "datatype": "BYTES", "shape": [1, 2], "parameters": {"binary_data_size": 28}}]
    assert body[length:] == tensor_bytes(classes)
    as_json = InferRequest(id="", inputs={}, outputs=["logits"], classifications={"logits": 2})
    body, length = encode_http_response("m", "1", as_json, {"logits": classes})
    assert length is None and json.loads(body)["outputs"] == [
        {"name": "logits", "datatype": "BYTES", "shape": [1, 2], "data": ["7.125000:3", "2.250000:1"]}]
