"""split_bytes_field against protobuf's own parser, on inference requests as tritonclient builds them
and on wire bytes it would not write (fields out of order, unknown fields, wrong wire types,
truncation)."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2

from plansmith_runtime.protobuf_wire import split_bytes_field

RAW = service_pb2.ModelInferRequest.DESCRIPTOR.fields_by_name["raw_input_contents"].number


def infer_request(raw: list[bytes], **fields) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="cnn", model_version="1", id="request-7", **fields)
    request.parameters["timeout"].int64_param = 5000
    for index, contents in enumerate(raw):
        request.inputs.add(name=f"input{index}", datatype="UINT8", shape=[len(contents)])
    request.outputs.add(name="logits")
    request.raw_input_contents.extend(raw)
    return request


def key(number: int, wire_type: int) -> bytes:
    """A field's key on the wire: a varint of its number and wire type."""
    value, encoded = number << 3 | wire_type, bytearray()
    while value >= 0x80:
        encoded.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes(encoded + bytes([value]))


def split_and_parse(data: bytes) -> tuple[service_pb2.ModelInferRequest, list[bytes]]:
    split = split_bytes_field(data, RAW)
    assert split is not None
    rest, values = split
    assert all(isinstance(value, memoryview) and value.obj is data for value in values)  # views, not copies
    return service_pb2.ModelInferRequest.FromString(rest), [bytes(value) for value in values]


@pytest.mark.parametrize("raw", [[], [b""], [b"\x01"], [bytes(range(256)) * 700, b"", b"tail"],
                                 [np.random.default_rng(3).bytes(602_112)]])
def test_the_field_comes_out_as_views_and_the_rest_parses_as_before(raw):
    request = infer_request(raw)
    data = request.SerializeToString()
    rest, values = split_and_parse(data)
    assert values == list(request.raw_input_contents)
    expected = service_pb2.ModelInferRequest()
    expected.CopyFrom(request)
    expected.ClearField("raw_input_contents")
    assert rest == expected


def test_fields_in_any_order_and_unknown_fields_are_kept():
    first = infer_request([b"a" * 300]).SerializeToString()
    later = service_pb2.ModelInferRequest(raw_input_contents=[b"b" * 200]).SerializeToString()
    unknown = key(99, 0) + b"\x96\x01" + key(2000, 2) + b"\x03xyz" + key(9, 5) + b"\0\0\0\0"
    data = later + unknown + first + key(96, 1) + b"\0" * 8
    rest, values = split_and_parse(data)
    whole = service_pb2.ModelInferRequest.FromString(data)
    assert values == list(whole.raw_input_contents) == [b"b" * 200, b"a" * 300]
    whole.ClearField("raw_input_contents")
    assert rest == whole and rest.SerializeToString() == whole.SerializeToString()  # the unknown fields too
    assert rest.SerializeToString().count(b"xyz") == 1


def test_the_field_with_another_wire_type_is_left_to_protobuf():
    data = infer_request([]).SerializeToString() + key(RAW, 0) + b"\x05"  # a varint under the bytes field's number
    split = split_bytes_field(data, RAW)
    assert split is not None and split[1] == []
    assert list(service_pb2.ModelInferRequest.FromString(split[0]).raw_input_contents) == list(
        service_pb2.ModelInferRequest.FromString(data).raw_input_contents)


def test_a_group_leaves_the_message_to_protobuf():
    data = infer_request([b"abc"]).SerializeToString() + key(95, 3) + key(95, 4)
    assert split_bytes_field(data, RAW) is None


@pytest.mark.parametrize("data", [
    infer_request([b"x" * 1000]).SerializeToString()[:-1],  # the last value cut short
    key(RAW, 2) + b"\x80",  # a length whose varint never ends
    key(RAW, 2) + b"\xff" * 11,  # a varint over 10 bytes
    key(0, 0) + b"\x01",  # field number 0
    key(8, 6),  # wire type 6 does not exist
    key(9, 1) + b"\0" * 7,  # a fixed64 cut short
])
def test_malformed_messages_are_refused_as_protobuf_refuses_them(data):
    with pytest.raises(DecodeError):
        service_pb2.ModelInferRequest.FromString(data)
    with pytest.raises(DecodeError):
        split_bytes_field(data, RAW)
