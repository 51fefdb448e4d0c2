"""Takes one repeated bytes field out of a protobuf message's wire bytes without copying it: for
ModelInferRequest.raw_input_contents, the tensors of a gRPC inference request.

Why by hand: protobuf's Python API (upb) copies a bytes field into a new bytes object on every
access, and copies a whole message it parses from a memoryview (the transport's receive buffers).
For a 600 KB image that was two copies on the event loop (~50 us, measured at c=1), after the
socket's. Here only the message's top-level fields are walked (a handful for an inference
request); the field's values come back as views of the received bytes, and protobuf parses the
rest of the message, which is small.
"""

from __future__ import annotations

from google.protobuf.message import DecodeError

VARINT, FIXED64, LENGTH_DELIMITED, GROUP_START, GROUP_END, FIXED32 = range(6)
MAX_VARINT_BYTES = 10


def split_bytes_field(message: bytes | memoryview, field_number: int) -> tuple[bytes, list[memoryview]] | None:
    """The message without its top-level field `field_number`, and that field's values in order
    (views of `message`). A field with that number and another wire type stays in the rest, where
    protobuf treats it as it would have. None when the message holds a group (a deprecated
    encoding this walk does not follow): parse the whole message then. DecodeError when the
    message is malformed."""
    view = memoryview(message)
    end = len(view)
    kept: list[memoryview] = []
    values: list[memoryview] = []
    kept_from = position = 0
    while position < end:
        field_start = position
        key, position = _varint(view, position, end)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise DecodeError("a field number of 0")
        if wire_type == VARINT:
            _, position = _varint(view, position, end)
        elif wire_type == FIXED64:
            position += 8
        elif wire_type == FIXED32:
            position += 4
        elif wire_type == LENGTH_DELIMITED:
            length, position = _varint(view, position, end)
            if position + length > end:
                raise DecodeError("a length-delimited field runs past the end of the message")
            if number == field_number:
                kept.append(view[kept_from:field_start])
                values.append(view[position:position + length])
                kept_from = position + length
            position += length
        elif wire_type in (GROUP_START, GROUP_END):
            return None
        else:
            raise DecodeError(f"wire type {wire_type} does not exist")
        if position > end:
            raise DecodeError("a field runs past the end of the message")
    kept.append(view[kept_from:end])
    return b"".join(kept), values


def _varint(view: memoryview, position: int, end: int) -> tuple[int, int]:
    value = shift = 0
    for index in range(position, min(end, position + MAX_VARINT_BYTES)):
        byte = view[index]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, index + 1
        shift += 7
    raise DecodeError("a varint is truncated or longer than 10 bytes")
