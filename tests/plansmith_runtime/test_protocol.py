"""Request decoding and validation shared by the HTTP and gRPC front ends."""

import json

import numpy as np
import pytest

from plansmith.manifest import TensorSpec
from plansmith_runtime.protocol import (InferRequest, InvalidRequest, Signature, check_inputs, decode_http_request,
                                        encode_http_response)

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
    assert request.outputs == ["logits"] and request.binary_outputs == {"logits": True}


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
])
def test_malformed_bodies_are_invalid_requests(body, header, message):
    if header == "BAD":
        header = "abc"
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
    one.outputs.append("mutated")  # each request gets its own lists, not the memo's
    assert decode_http_request(body_two, same_length).outputs == ["logits"]


def test_a_memoized_header_still_has_its_body_checked():
    array = np.zeros((1, 4), np.float32)
    body, length = binary_body(array)
    decode_http_request(body, length)
    with pytest.raises(InvalidRequest, match="runs past the end of the body"):
        decode_http_request(body[:-4], length)
    with pytest.raises(InvalidRequest, match="4 unexpected bytes"):
        decode_http_request(body + b"\0" * 4, length)
