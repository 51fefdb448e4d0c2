"""gRPC server transport: unary and bidirectional streaming calls over HTTP/2 on an asyncio Protocol.

Why not grpcio's server (grpc.aio, which the runtime used before): every call crosses from
grpcio's poller threads into the event loop and back through its completion machinery, about
275 us of the loop thread's CPU a call under load; the MLP over gRPC ran at 2.3-2.5k requests/s at
c=64 where a real Triton server on the same harness serves 7.2-7.8k. With a canned response and
the same generator, grpc.aio served 4.2-4.7k calls/s, grpcio's synchronous server 3.0k, grpclib
(pure Python, on h2) 3.7k, and a first cut of this transport 17.5k; the MLP now runs at 10-13.5k
(docs/benchmarks.md). The KServe v2 service has unary methods and one bidirectional stream of
independent requests (ModelStreamInfer), so this keeps what they need from HTTP/2 (RFC 9113) and
the gRPC wire format (grpc/doc/PROTOCOL-HTTP2.md): the connection preface and SETTINGS, flow
control both ways, PING, RST_STREAM (a cancelled call; NO_ERROR for a call answered before the
client closed its side), GOAWAY (a graceful close), CONTINUATION (both ways), padding,
length-prefixed messages, gzip/deflate request messages, grpc-timeout (the server answers
DEADLINE_EXCEEDED at the deadline and cancels the call), trailers with grpc-status and
grpc-message (cut to 4 KiB), and size limits. Header compression (HPACK, stateful per connection) is the `hpack`
library's; responses send their headers as literals without indexing, so they need no encoder
state and are built once."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import struct
import time
import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import Awaitable, Callable, NamedTuple
from urllib.parse import quote

import grpc
import hpack
from hpack.hpack import encode_integer

from plansmith_runtime.http_transport import DIRECT_BODY_BYTES, READ_BUFFER_BYTES, receive_buffer, wait_until_idle

log = logging.getLogger(__name__)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME_HEADER = struct.Struct(">IBI")  # (24-bit length << 8 | type), flags, stream id

# frame types
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
# flags
END_STREAM = ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20
# SETTINGS parameters
SETTINGS_HEADER_TABLE_SIZE, SETTINGS_ENABLE_PUSH, SETTINGS_MAX_CONCURRENT_STREAMS = 0x1, 0x2, 0x3
SETTINGS_INITIAL_WINDOW_SIZE, SETTINGS_MAX_FRAME_SIZE, SETTINGS_MAX_HEADER_LIST_SIZE = 0x4, 0x5, 0x6
# error codes (RST_STREAM, GOAWAY)
NO_ERROR, PROTOCOL_ERROR, FLOW_CONTROL_ERROR, FRAME_SIZE_ERROR, REFUSED_STREAM, COMPRESSION_ERROR = 0x0, 0x1, 0x3, 0x6, 0x7, 0x9

DEFAULT_WINDOW = 65535  # both sides start with it (RFC 9113 6.9.2)
DEFAULT_MAX_FRAME = 16384
MAX_WINDOW = (1 << 31) - 1
# What this server announces. Windows this large let a client send a whole tensor without waiting
# for a WINDOW_UPDATE round trip (an image batch is megabytes); memory stays bounded by the
# concurrent streams times the message limit.
MAX_CONCURRENT_STREAMS = 256
RECEIVE_WINDOW = 16 << 20
RECEIVE_FRAME_SIZE = 1 << 20
MAX_HEADER_LIST_BYTES = 64 << 10

# A request message -> its response message: a plain function, or a coroutine function for a call
# that waits (an inference)
Handler = Callable[[object], "object | Awaitable[object]"]


class GrpcError(Exception):
    """Ends a call with this status and message (a handler's way to answer with an error)."""

    def __init__(self, status: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class Method:
    request_type: type  # the protobuf message class requests are parsed into
    handler: Handler
    # what the handler takes, from a request message's bytes, when its reading began (a
    # time.monotonic_ns()) and the call's W3C trace context metadata (traceparent, tracestate: for
    # OpenTelemetry tracing); None: request_type.FromString of the bytes
    parse: Callable[[bytes | memoryview, int, str | None, str | None], object] | None = None

    @functools.cached_property
    def parser(self) -> Callable[[bytes | memoryview, int, str | None, str | None], object]:
        if self.parse is not None:
            return self.parse
        from_string = self.request_type.FromString
        return lambda data, read_started_ns, traceparent, tracestate: from_string(data)

    @functools.cached_property
    def waits(self) -> bool:
        """The handler is a coroutine function: it runs in a task."""
        return inspect.iscoroutinefunction(self.handler)


class UnaryMethod(Method):
    """One request message, one response message."""


class ObservedResponse(NamedTuple):
    """A handler's response with a callback the transport calls once the response is queued to the
    socket (with time.monotonic_ns() before and after), or could not be, the call having ended
    without it (with None, None)."""
    message: object
    on_sent: Callable[[int | None, int | None], None]


class StreamingMethod(Method):
    """A bidirectional streaming method whose requests are independent (Triton's ModelStreamInfer):
    the handler runs for each request message as it arrives, several at once, and the responses go
    out in request order, each once those before it have (as Triton answers a model that is not
    decoupled: tritonclient's stream callback gets no request id with an error, so the order is
    how a client matches answers to requests). The call ends with OK once the client has closed
    its side and every response is out, or with the status of a GrpcError a handler raises."""


class Http2Error(Exception):
    """The peer broke HTTP/2: the connection ends with GOAWAY and this error code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def frame(frame_type: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return FRAME_HEADER.pack(len(payload) << 8 | frame_type, flags, stream_id) + payload


def literal_header(name: str, value: str) -> bytes:
    """One header as an HPACK literal without indexing, new name, no Huffman coding (RFC 7541 6.2.2)."""
    raw_name, raw_value = name.encode("ascii"), value.encode("ascii")
    return b"\x00" + bytes(encode_integer(len(raw_name), 7)) + raw_name + bytes(encode_integer(len(raw_value), 7)) + raw_value


RESPONSE_HEADERS = literal_header(":status", "200") + literal_header("content-type", "application/grpc")
OK_TRAILERS = literal_header("grpc-status", "0")
ACCEPTED_ENCODINGS = "identity,gzip,deflate"


# The longest grpc-message value sent (percent-encoded). Error messages echo client input (a model
# name of any length): uncapped, one became a header block grpcio refuses above 16 KiB
# (RESOURCE_EXHAUSTED instead of the call's status).
MAX_STATUS_MESSAGE_BYTES = 4096
TRUNCATION_MARK = "..."
# what the gRPC spec leaves unencoded in grpc-message: printable ASCII but %
GRPC_MESSAGE_SAFE = " !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~"


def grpc_message(message: str) -> str:
    """`message` percent-encoded for grpc-message; a longer one than MAX_STATUS_MESSAGE_BYTES is cut
    between characters (never inside an escape or a UTF-8 sequence, so it still decodes) and ends
    with TRUNCATION_MARK."""
    encoded = quote(message, safe=GRPC_MESSAGE_SAFE)
    if len(encoded) <= MAX_STATUS_MESSAGE_BYTES:
        return encoded
    budget, kept = MAX_STATUS_MESSAGE_BYTES - len(TRUNCATION_MARK), 0
    for character in message[:budget]:  # a character takes at least one byte encoded
        width = len(quote(character, safe=GRPC_MESSAGE_SAFE))
        if width > budget:
            break
        budget -= width
        kept += 1
    return quote(message[:kept], safe=GRPC_MESSAGE_SAFE) + TRUNCATION_MARK


def status_block(status: grpc.StatusCode, message: str) -> bytes:
    """grpc-status and grpc-message (percent-encoded, as the gRPC spec asks) as a header block."""
    block = literal_header("grpc-status", str(status.value[0]))
    if message:
        block += literal_header("grpc-message", grpc_message(message))
    return block


def header_frames(flags: int, stream_id: int, block: bytes, max_frame: int) -> bytes:
    """A header block as one HEADERS frame with `flags`, or, when it exceeds the peer's
    SETTINGS_MAX_FRAME_SIZE, as HEADERS and CONTINUATION frames of at most `max_frame` bytes
    (RFC 9113 6.2, 6.10: END_STREAM stays on the HEADERS frame, END_HEADERS goes on the last). A
    strict peer (h2, nghttp2 in Envoy) fails the whole connection on one oversized frame."""
    if len(block) <= max_frame:
        return frame(HEADERS, flags | END_HEADERS, stream_id, block)
    pieces = [block[offset:offset + max_frame] for offset in range(0, len(block), max_frame)]
    return (frame(HEADERS, flags & ~END_HEADERS, stream_id, pieces[0])
            + b"".join(frame(CONTINUATION, 0, stream_id, piece) for piece in pieces[1:-1])
            + frame(CONTINUATION, END_HEADERS, stream_id, pieces[-1]))


GRPC_TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}


def parse_grpc_timeout(value: bytes) -> float | None:
    """Seconds in a grpc-timeout header (1-8 digits and a unit, gRPC's HTTP/2 protocol), None if malformed."""
    unit = GRPC_TIMEOUT_UNITS.get(value[-1:])
    digits = value[:-1]
    if unit is None or not 1 <= len(digits) <= 8 or not digits.isdigit():
        return None
    return int(digits) * unit


def unframe_message(body: bytes | memoryview, encoding: str | None, limit: int) -> bytes | memoryview:
    """The one message of a unary request body (1-byte compressed flag, 4-byte length, message)."""
    if len(body) < 5:
        raise GrpcError(grpc.StatusCode.INTERNAL, "the request has no message")
    compressed, length = body[0], int.from_bytes(body[1:5], "big")
    if len(body) != 5 + length:
        raise GrpcError(grpc.StatusCode.INTERNAL, "a unary call takes exactly one request message")
    message = memoryview(body)[5:]  # a slice of bytes would copy the message
    if not compressed:
        return message
    if encoding in ("gzip", "deflate"):
        decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
        try:
            inflated = decompressor.decompress(message, limit + 1)
        except zlib.error as error:
            raise GrpcError(grpc.StatusCode.INTERNAL, f"cannot decompress the {encoding} request: {error}") from None
        if len(inflated) > limit:
            raise GrpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"the decompressed request exceeds {limit} bytes")
        # zlib raises on neither: the message would be parsed from part of its bytes, or with junk ignored
        if not decompressor.eof:
            raise GrpcError(grpc.StatusCode.INTERNAL, f"the {encoding} request message is truncated")
        if decompressor.unused_data:
            raise GrpcError(grpc.StatusCode.INTERNAL, f"the {encoding} request message has bytes after its end")
        return inflated
    if encoding in (None, "identity"):
        raise GrpcError(grpc.StatusCode.INTERNAL, "compressed message without grpc-encoding")
    raise GrpcError(grpc.StatusCode.UNIMPLEMENTED, f"grpc-encoding {encoding} is not supported ({ACCEPTED_ENCODINGS})")


@dataclass(eq=False)
class _Stream:
    stream_id: int
    path: str = ""
    content_type: str = ""
    encoding: str | None = None
    body: list[bytes | memoryview] = field(default_factory=list)
    size: int = 0
    # A unary request message that spans DATA frames: received into one buffer of its length (from
    # its 5-byte prefix) rather than joined at the end, a large frame's payload read straight there.
    message: memoryview | None = None
    filled: int = 0  # bytes of `message` received
    unacknowledged: int = 0  # received bytes not yet given back with a WINDOW_UPDATE
    send_window: int = DEFAULT_WINDOW
    outgoing: bytes | bytearray = b""  # framed response messages; outgoing[:sent] has left in DATA frames
    sent: int = 0
    complete: bool = False  # every response message is in `outgoing`: the trailers follow them
    trailers: bytes = OK_TRAILERS
    answered: bool = False  # a response (or an error) has been queued: later DATA is ignored
    task: asyncio.Task | None = None
    streaming: StreamingMethod | None = None  # set for a call of a streaming method
    received: bytearray = field(default_factory=bytearray)  # streaming: request bytes not yet a whole message
    tasks: set = field(default_factory=set)  # streaming: handlers still running
    # streaming: a slot per request in arrival order, empty until its response is ready (then sent
    # once the slots before it have been)
    replies: deque = field(default_factory=deque)
    half_closed: bool = False  # the client sent END_STREAM (else the server resets the stream once it answers)
    headers_sent: bool = False  # streaming: the response HEADERS are out
    deadline: float | None = None  # loop time by which the client wants its answer (grpc-timeout)
    read_started_ns: int = 0  # when reading its (next) request message began: the stream opened, or the last was read
    traceparent: str | None = None  # W3C trace context metadata a client's OpenTelemetry propagated
    tracestate: str | None = None
    deadline_timer: asyncio.TimerHandle | None = None


@dataclass(slots=True)
class _LargeFrame:
    """A DATA frame of DIRECT_BODY_BYTES or more that a read ended inside: the socket reads the rest
    of its payload straight into `payload` (a 600 KB image comes in frames of 130-440 KB from
    grpcio: gathering them in the read buffer and copying them out cost about 15% of the event
    loop's time serving the 224x224 CNN, perf)."""

    flags: int
    stream_id: int
    payload: memoryview
    received: int


class GrpcConnection(asyncio.BufferedProtocol):
    """One client connection. The loop reads into the server's read buffer, whose bytes are copied
    out and parsed into frames, or into the rest of a large DATA frame's payload (_LargeFrame)."""

    def __init__(self, server: GrpcServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._large_frame: _LargeFrame | None = None
        self._preface_seen = False
        self._decoder = hpack.Decoder(MAX_HEADER_LIST_BYTES)
        self._streams: dict[int, _Stream] = {}
        self._last_stream_id = 0
        self._header_fragments: list[bytes] | None = None  # a header block waiting for CONTINUATION
        self._header_stream = 0
        self._header_end_stream = False
        self._peer_initial_window = DEFAULT_WINDOW
        self._peer_max_frame = DEFAULT_MAX_FRAME
        self._send_window = DEFAULT_WINDOW  # the connection's, for our DATA
        self._unacknowledged = 0  # received DATA not yet given back on the connection window
        self._blocked: dict[int, _Stream] = {}  # streams with response DATA waiting for window
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._indexed_blocks: dict[bytes, list] = {}  # see _decode_headers
        self._going_away = False
        self._closed = False

    # ------------------------------------------------------------------ connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  (uvloop's transports are not asyncio.Transport subclasses)
        self.server.connections.add(self)
        settings = struct.pack(">HIHIHIHIHI", SETTINGS_ENABLE_PUSH, 0, SETTINGS_MAX_CONCURRENT_STREAMS, MAX_CONCURRENT_STREAMS,
                               SETTINGS_INITIAL_WINDOW_SIZE, RECEIVE_WINDOW, SETTINGS_MAX_FRAME_SIZE, RECEIVE_FRAME_SIZE,
                               SETTINGS_MAX_HEADER_LIST_SIZE, MAX_HEADER_LIST_BYTES)
        transport.write(frame(SETTINGS, 0, 0, settings)
                        + frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", RECEIVE_WINDOW - DEFAULT_WINDOW)))

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self.server.connections.discard(self)
        for stream in self._streams.values():
            self._cancel(stream)
        self._streams.clear()

    def pause_writing(self) -> None:  # the peer does not read its responses: stop reading its requests
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    @property
    def idle(self) -> bool:
        return not self._streams

    def go_away(self) -> None:
        """Graceful close: refuse new streams, finish the open ones (RFC 9113 6.8)."""
        if not self._going_away and not self._closed:
            self._going_away = True
            self._send(frame(GOAWAY, 0, 0, struct.pack(">II", self._last_stream_id, NO_ERROR)))
            self._flush()

    def close(self) -> None:
        if self.transport is not None and not self._closed:
            # A call's last frames may still wait for the end of this loop turn (_flush_soon): the
            # connection is idle once they are queued, and the transport sends what it was given.
            self._flush()
            self.transport.close()

    def _fail(self, code: int, message: str) -> None:
        log.warning("closing a gRPC connection: %s", message)
        if self.transport is not None and not self._closed:
            self.transport.write(frame(GOAWAY, 0, 0, struct.pack(">II", self._last_stream_id, code) + message.encode()[:256]))
            self.transport.close()
        self._closed = True

    def _send(self, data: bytes) -> None:
        self._out.append(data)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._out and not self._closed and self.transport is not None:
            self.transport.write(b"".join(self._out) if len(self._out) > 1 else self._out[0])
        self._out.clear()

    def _flush_soon(self) -> None:
        """Write at the end of this turn of the event loop: the answers of one batch, completed in
        the same turn, leave in one write (one system call and one wake-up of the client for up to
        a batch of calls on this connection, instead of one each)."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    # ------------------------------------------------------------------ reading frames

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._large_frame is not None:
            return self._large_frame.payload[self._large_frame.received:]
        return self.server.read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        large = self._large_frame
        if large is None:
            self._read_frames(bytes(self.server.read_buffer[:nbytes]))  # frames keep views of their read
            return
        large.received += nbytes
        if large.received == len(large.payload) and not self._closed:
            self._large_frame = None
            self._read_frames(b"", (large.flags, large.stream_id, large.payload))

    def _read_frames(self, data: bytes, whole_data_frame: tuple[int, int, memoryview] | None = None) -> None:
        """Parse the frames in `data` (with what the last read left), after `whole_data_frame`: a
        large DATA frame's flags, stream and payload, once all of it has been read."""
        if self._closed:
            return
        if not self._preface_seen:
            self._buffer += data
            if len(self._buffer) < len(PREFACE):
                if not PREFACE.startswith(bytes(self._buffer)):
                    self._fail(PROTOCOL_ERROR, "not an HTTP/2 connection preface")
                return
            if self._buffer[:len(PREFACE)] != PREFACE:
                self._fail(PROTOCOL_ERROR, "not an HTTP/2 connection preface")
                return
            self._preface_seen = True
            data = bytes(self._buffer[len(PREFACE):])
            self._buffer.clear()
        # Frames are read straight from `data` when nothing is left over from the last read: their
        # payloads are then views of the bytes copied out of the read buffer, not further copies. A
        # small frame cut by the end of a read waits in the buffer; a large DATA frame's payload is
        # read into its own buffer (_LargeFrame).
        if self._buffer:
            buffer = self._buffer
            buffer += data
            if len(buffer) < 9:
                return
            waiting_for = buffer[0] << 16 | buffer[1] << 8 | buffer[2]
            large_data = buffer[3] == DATA and waiting_for >= DIRECT_BODY_BYTES  # read into its own buffer below
            if waiting_for <= RECEIVE_FRAME_SIZE and len(buffer) < 9 + waiting_for and not large_data:
                return  # the frame is still incomplete: copy the buffer out once, when it is whole
            data = bytes(buffer)
            buffer.clear()
        view = memoryview(data)
        position, end = 0, len(data)
        try:
            if whole_data_frame is not None:
                self._frame(DATA, *whole_data_frame)
            while end - position >= 9:
                length_and_type, flags, stream_id = FRAME_HEADER.unpack_from(data, position)
                length = length_and_type >> 8
                if length > RECEIVE_FRAME_SIZE:
                    raise Http2Error(FRAME_SIZE_ERROR, f"a frame of {length} bytes exceeds {RECEIVE_FRAME_SIZE}")
                if end - position - 9 < length:
                    if length_and_type & 0xFF == DATA and length >= DIRECT_BODY_BYTES:
                        head = view[position + 9:]
                        payload = self._large_data_buffer(stream_id & 0x7FFFFFFF, flags, length, head)
                        payload[:len(head)] = head
                        self._large_frame = _LargeFrame(flags, stream_id & 0x7FFFFFFF, payload, len(head))
                        position = end
                    break
                payload = view[position + 9:position + 9 + length]
                position += 9 + length
                self._frame(length_and_type & 0xFF, flags, stream_id & 0x7FFFFFFF, payload)
        except Http2Error as error:
            self._fail(error.code, str(error))
            return
        if position < end:
            self._buffer += view[position:]
        self._give_back_window()
        self._flush()

    def _large_data_buffer(self, stream_id: int, flags: int, length: int, head: memoryview) -> memoryview:
        """Where the socket reads the rest of a large DATA frame: the place it takes in its stream's
        request message, or a buffer of its own."""
        stream = self._streams.get(stream_id)
        if stream is not None and not flags & PADDED:
            if stream.message is None and not stream.body and stream.streaming is None and not stream.answered:
                self._start_message(stream, head, length)
            message = stream.message
            if message is not None and stream.filled + length <= len(message):
                return message[stream.filled:stream.filled + length]
        return receive_buffer(length)

    def _start_message(self, stream: _Stream, first: memoryview, frame_length: int) -> None:
        """Give a unary request one buffer for its message when its first DATA (`first`, of a frame
        of `frame_length` bytes) shows an uncompressed message longer than that frame."""
        if len(first) < 5 or first[0] != 0:
            return  # the prefix is not here yet, or a compressed message: joined at the end, then inflated
        total = 5 + int.from_bytes(first[1:5], "big")
        if frame_length < total <= self.server.max_message_bytes + 5:
            stream.message, stream.filled = receive_buffer(total), 0

    def _frame(self, frame_type: int, flags: int, stream_id: int, payload: memoryview) -> None:
        if self._header_fragments is not None and frame_type != CONTINUATION:
            raise Http2Error(PROTOCOL_ERROR, "a header block was interrupted")
        if frame_type == DATA:
            self._on_data(flags, stream_id, payload)
        elif frame_type == HEADERS:
            self._on_headers(flags, stream_id, payload)
        elif frame_type == CONTINUATION:
            if self._header_fragments is None or stream_id != self._header_stream:
                raise Http2Error(PROTOCOL_ERROR, "CONTINUATION without a header block to continue")
            self._header_fragments.append(bytes(payload))
            if sum(map(len, self._header_fragments)) > MAX_HEADER_LIST_BYTES:
                raise Http2Error(PROTOCOL_ERROR, f"a header block over {MAX_HEADER_LIST_BYTES} bytes")
            if flags & END_HEADERS:
                block = b"".join(self._header_fragments)
                self._header_fragments = None
                self._on_header_block(stream_id, block, self._header_end_stream)
        elif frame_type == SETTINGS:
            if not flags & ACK:
                self._on_settings(payload)
        elif frame_type == WINDOW_UPDATE:
            self._on_window_update(stream_id, payload)
        elif frame_type == PING:
            if len(payload) != 8:
                raise Http2Error(FRAME_SIZE_ERROR, "a PING carries 8 bytes")
            if not flags & ACK:
                self._send(frame(PING, ACK, 0, payload))
        elif frame_type == RST_STREAM:
            stream = self._streams.pop(stream_id, None)
            self._blocked.pop(stream_id, None)
            if stream is not None:
                self._cancel(stream)  # the client cancelled the call (or its deadline passed)
        elif frame_type == GOAWAY:
            self._going_away = True  # the client opens no more streams; the open ones finish
        elif frame_type == PUSH_PROMISE:
            raise Http2Error(PROTOCOL_ERROR, "a client cannot push")
        # PRIORITY and unknown frame types are ignored (RFC 9113 5.3.2, 5.5)

    @staticmethod
    def _unpad(flags: int, payload: memoryview) -> memoryview:
        if flags & PADDED:
            if not payload or payload[0] >= len(payload):
                raise Http2Error(PROTOCOL_ERROR, "padding longer than the frame")
            return payload[1:len(payload) - payload[0]]
        return payload

    def _on_headers(self, flags: int, stream_id: int, payload: memoryview) -> None:
        if stream_id == 0:
            raise Http2Error(PROTOCOL_ERROR, "HEADERS on stream 0")
        block = bytes(self._unpad(flags, payload))
        if flags & PRIORITY_FLAG:
            block = block[5:]
        if flags & END_HEADERS:
            self._on_header_block(stream_id, block, bool(flags & END_STREAM))
        else:
            self._header_fragments, self._header_stream, self._header_end_stream = [block], stream_id, bool(flags & END_STREAM)

    def _on_header_block(self, stream_id: int, block: bytes, end_stream: bool) -> None:
        try:  # decoded even for a stream that is refused: the decoder's table must follow the client's
            headers = self._decode_headers(block)
        except hpack.HPACKError as error:
            raise Http2Error(COMPRESSION_ERROR, f"header block: {error}") from None
        stream = self._streams.get(stream_id)
        if stream is not None:  # trailers from the client end its half of the stream
            if end_stream:
                self._request_complete(stream)
            return
        if stream_id % 2 == 0:
            raise Http2Error(PROTOCOL_ERROR, f"stream {stream_id} is not a client stream")
        if stream_id <= self._last_stream_id:
            # A stream already answered (and reset if the client had not closed its side), or
            # refused: its trailers, or frames crossing our RST_STREAM, are ignored (RFC 9113 5.1),
            # not a reason to end the other calls on the connection.
            return
        self._last_stream_id = stream_id
        if self._going_away or len(self._streams) >= MAX_CONCURRENT_STREAMS:
            self._send(frame(RST_STREAM, 0, stream_id, struct.pack(">I", REFUSED_STREAM)))
            return
        stream = _Stream(stream_id, send_window=self._peer_initial_window, read_started_ns=time.monotonic_ns())
        for name, value in headers:
            if name == b":path":
                stream.path = value.decode("latin-1")
            elif name == b"content-type":
                stream.content_type = value.decode("latin-1")
            elif name == b"grpc-encoding":
                stream.encoding = value.decode("latin-1")
            elif name == b"grpc-timeout":  # a malformed one is ignored, as grpcio's server does
                timeout = parse_grpc_timeout(value)
                if timeout is not None:
                    stream.deadline = asyncio.get_running_loop().time() + timeout
            elif name == b"traceparent":
                stream.traceparent = value.decode("latin-1")
            elif name == b"tracestate":
                stream.tracestate = value.decode("latin-1")
        method = self.server.methods.get(stream.path)
        if isinstance(method, StreamingMethod) and stream.content_type.startswith("application/grpc"):
            stream.streaming = method
            stream.outgoing = bytearray()
            if stream.deadline is not None:
                stream.deadline_timer = asyncio.get_running_loop().call_at(stream.deadline, self._deadline_passed, stream)
        self._streams[stream_id] = stream
        if end_stream:
            self._request_complete(stream)

    def _decode_headers(self, block: bytes) -> list:
        """hpack's decoding, remembered for blocks made only of one-byte indexed fields (RFC 7541
        6.1: bytes 0x80-0xFE; 0xFF would start a longer index). A client repeating a call sends
        exactly such a block (grpcio: 8 bytes, which hpack takes 15 us to decode): it changes nothing
        in the decoder's dynamic table, so it decodes to the same headers until a block with any other
        representation, which may change the table, clears what was remembered."""
        if block and min(block) >= 0x80 and 0xFF not in block:
            headers = self._indexed_blocks.get(block)
            if headers is None:
                headers = self._decoder.decode(block, raw=True)
                if len(self._indexed_blocks) >= 64:
                    self._indexed_blocks.clear()
                self._indexed_blocks[block] = headers
            return headers
        self._indexed_blocks.clear()
        return self._decoder.decode(block, raw=True)

    def _on_data(self, flags: int, stream_id: int, payload: memoryview) -> None:
        self._unacknowledged += len(payload)  # padding counts against flow control too
        stream = self._streams.get(stream_id)
        if stream is None or stream.answered:
            if stream is not None and flags & END_STREAM:  # closed both ways now: no RST_STREAM for it
                stream.half_closed = True
            return  # a refused, reset or already answered stream: only the connection window counts
        data = self._unpad(flags, payload)
        stream.unacknowledged += len(payload)
        if stream.streaming is not None:
            stream.received += data
            self._next_messages(stream)  # each message is held to the size limit there
        else:
            stream.size += len(data)
            if stream.size > self.server.max_message_bytes + 5:
                self._answer_error(stream, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   f"the request exceeds the maximum message size {self.server.max_message_bytes}")
                return
            if stream.message is None and not stream.body:
                self._start_message(stream, data, len(data))
            message = stream.message
            if message is None:
                stream.body.append(data)
            elif stream.filled + len(data) > len(message):
                self._answer_error(stream, grpc.StatusCode.INTERNAL, "a unary call takes exactly one request message")
                return
            else:
                if data.obj is not message.obj:  # not read in place (_large_data_buffer)
                    message[stream.filled:stream.filled + len(data)] = data
                stream.filled += len(data)
        if flags & END_STREAM:
            self._request_complete(stream)
        elif stream.unacknowledged >= RECEIVE_WINDOW // 2:
            self._send(frame(WINDOW_UPDATE, 0, stream_id, struct.pack(">I", stream.unacknowledged)))
            stream.unacknowledged = 0

    def _give_back_window(self) -> None:
        if self._unacknowledged >= RECEIVE_WINDOW // 2:
            self._send(frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", self._unacknowledged)))
            self._unacknowledged = 0

    def _on_settings(self, payload: memoryview) -> None:
        if len(payload) % 6:
            raise Http2Error(FRAME_SIZE_ERROR, "a SETTINGS frame holds 6-byte entries")
        for offset in range(0, len(payload), 6):
            identifier, value = struct.unpack_from(">HI", payload, offset)
            if identifier == SETTINGS_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise Http2Error(FLOW_CONTROL_ERROR, "initial window above 2^31-1")
                delta, self._peer_initial_window = value - self._peer_initial_window, value
                for stream in self._streams.values():
                    stream.send_window += delta
            elif identifier == SETTINGS_MAX_FRAME_SIZE:
                if not DEFAULT_MAX_FRAME <= value <= (1 << 24) - 1:
                    raise Http2Error(PROTOCOL_ERROR, f"max frame size {value} out of range")
                self._peer_max_frame = value
            # The header table size limits our encoder's table, which responses never use.
        self._send(frame(SETTINGS, ACK, 0))
        self._send_blocked()

    def _on_window_update(self, stream_id: int, payload: memoryview) -> None:
        if len(payload) != 4:
            raise Http2Error(FRAME_SIZE_ERROR, "a WINDOW_UPDATE carries 4 bytes")
        increment = struct.unpack(">I", payload)[0] & 0x7FFFFFFF
        if stream_id == 0:
            self._send_window += increment
            if self._send_window > MAX_WINDOW:
                raise Http2Error(FLOW_CONTROL_ERROR, "connection window above 2^31-1")
        elif (stream := self._streams.get(stream_id)) is not None:
            stream.send_window += increment
        self._send_blocked()

    # ------------------------------------------------------------------ calls

    def _request_complete(self, stream: _Stream) -> None:
        stream.half_closed = True
        if stream.streaming is not None:
            if stream.received:
                self._end_streaming(stream, grpc.StatusCode.INTERNAL, "the request stream ended inside a message")
            self._finish_streaming(stream)
            return
        if stream.answered:
            return
        stream.answered = True
        if not stream.content_type.startswith("application/grpc"):
            self._send(frame(HEADERS, END_HEADERS | END_STREAM, stream.stream_id, literal_header(":status", "415")))
            self._close_stream(stream)
            return
        method = self.server.methods.get(stream.path)
        if method is None:
            self._answer_error(stream, grpc.StatusCode.UNIMPLEMENTED, f"Method not found: {stream.path}")
            return
        if stream.message is not None:
            body, stream.message = stream.message[:stream.filled], None  # shorter than its prefix says: refused below
        else:
            body = stream.body[0] if len(stream.body) == 1 else b"".join(stream.body)  # views of the reads' bytes
        stream.body = []
        loop = asyncio.get_running_loop()
        if stream.deadline is not None and loop.time() >= stream.deadline:
            self._answer_error(stream, grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
            return
        stream.task = self._handle(stream, method, body)
        if stream.task is not None and stream.deadline is not None:
            stream.deadline_timer = loop.call_at(stream.deadline, self._deadline_passed, stream)

    def _handle(self, stream: _Stream, method: Method, framed: bytes | memoryview,
                slot: list | None = None) -> asyncio.Task | None:
        """Parse one request message and answer it: a plain handler's response goes out at once; a
        coroutine handler runs in the task returned (the task calls it, so a task cancelled before
        it starts leaves no coroutine behind). A bad message or a failing handler fails the call."""
        try:
            request = method.parser(unframe_message(framed, stream.encoding, self.server.max_message_bytes),
                                    stream.read_started_ns, stream.traceparent, stream.tracestate)
            if method.waits:
                return asyncio.get_running_loop().create_task(self._await_answer(stream, method.handler, request, slot))
            response = method.handler(request)
        except GrpcError as error:
            self._fail_call(stream, error.status, error.message)
            return None
        except Exception as error:  # noqa: BLE001  (protobuf's DecodeError, or a handler's bug)
            self._answer_unexpected(stream, error)
            return None
        self._respond(stream, response, slot)
        return None

    def _deadline_passed(self, stream: _Stream) -> None:
        """The call outlived its grpc-timeout: answer DEADLINE_EXCEEDED and cancel its work (as a
        gRPC server does; the batcher then drops the request if it is still queued)."""
        self._fail_call(stream, grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
        self._flush_soon()
        self._cancel(stream)

    @staticmethod
    def _cancel(stream: _Stream) -> None:
        if stream.task is not None:
            stream.task.cancel()
        current = asyncio.current_task() if stream.tasks else None
        for task in list(stream.tasks):
            if task is not current:  # a handler ending the call itself returns on its own
                task.cancel()
        if stream.deadline_timer is not None:
            stream.deadline_timer.cancel()

    # ------------------------------------------------------------------ streaming calls

    def _next_messages(self, stream: _Stream) -> None:
        """Start a handler for every whole request message received so far."""
        received, limit = stream.received, self.server.max_message_bytes
        while len(received) >= 5 and not stream.answered:
            length = int.from_bytes(received[1:5], "big")
            if length > limit:
                self._end_streaming(stream, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    f"a request message exceeds the maximum message size {limit}")
                return
            if len(received) < 5 + length:
                return
            framed = bytes(received[:5 + length])
            del received[:5 + length]
            slot: list = []
            stream.replies.append(slot)
            task = self._handle(stream, stream.streaming, framed, slot)
            stream.read_started_ns = time.monotonic_ns()
            if task is not None:
                stream.tasks.add(task)

    def _send_message(self, stream: _Stream, response) -> None:
        if stream.answered or stream.stream_id not in self._streams:
            return
        if not stream.headers_sent:
            stream.headers_sent = True
            self._send(frame(HEADERS, END_HEADERS, stream.stream_id, RESPONSE_HEADERS))
        message = response.SerializeToString()
        stream.outgoing += b"\x00" + len(message).to_bytes(4, "big") + message
        self._send_data(stream)

    def _finish_streaming(self, stream: _Stream) -> None:
        """End the call with OK once the client has closed its side and every response is queued."""
        if stream.half_closed and not stream.tasks and not stream.answered and stream.stream_id in self._streams:
            stream.answered = stream.complete = True
            if stream.deadline_timer is not None:
                stream.deadline_timer.cancel()
            if not stream.headers_sent:
                stream.headers_sent = True
                self._send(frame(HEADERS, END_HEADERS, stream.stream_id, RESPONSE_HEADERS))
            self._send_data(stream)

    def _end_streaming(self, stream: _Stream, status: grpc.StatusCode, message: str) -> None:
        """End the call with an error status at once, cancelling the handlers still running."""
        if stream.answered or stream.stream_id not in self._streams:
            return
        if stream.headers_sent:  # responses went out already: the status follows them in the trailers
            stream.answered = stream.complete = True
            stream.trailers = status_block(status, message)
            self._send_data(stream)
        else:
            self._answer_error(stream, status, message)
        self._cancel(stream)

    async def _await_answer(self, stream: _Stream, handler: Handler, request, slot: list | None = None) -> None:
        """Send what a coroutine handler returns: the call's response, or one response of a stream
        (`slot`: the request's place in the stream's order)."""
        streaming = stream.streaming is not None
        try:
            response = await handler(request)  # type: ignore[misc]
        except GrpcError as error:
            self._fail_call(stream, error.status, error.message)
        except asyncio.CancelledError:
            return  # the client reset the stream, the deadline passed, or the connection is gone
        except Exception as error:  # noqa: BLE001
            self._answer_unexpected(stream, error)
        else:
            self._respond(stream, response, slot)
        finally:
            if streaming:
                stream.tasks.discard(asyncio.current_task())
            elif stream.deadline_timer is not None:
                stream.deadline_timer.cancel()
        if streaming:
            self._finish_streaming(stream)
        self._flush_soon()

    def _respond(self, stream: _Stream, response, slot: list | None = None) -> None:
        if slot is not None:  # a stream's response: out once the responses to the requests before it are
            slot.append(response)
            replies = stream.replies
            while replies and replies[0]:
                self._deliver(stream, replies.popleft()[0])
            return
        self._deliver(stream, response)

    def _deliver(self, stream: _Stream, response) -> None:
        if type(response) is ObservedResponse:
            started = time.monotonic_ns()
            if stream.stream_id not in self._streams or (stream.streaming is not None and stream.answered):
                response.on_sent(None, None)  # the call ended meanwhile: nothing is sent
                return
            self._deliver(stream, response.message)
            response.on_sent(started, time.monotonic_ns())
        elif stream.streaming is not None:
            self._send_message(stream, response)
        else:
            self._answer(stream, response)

    def _fail_call(self, stream: _Stream, status: grpc.StatusCode, message: str) -> None:
        if stream.streaming is not None:
            self._end_streaming(stream, status, message)
        else:
            self._answer_error(stream, status, message)

    def _answer_unexpected(self, stream: _Stream, error: Exception) -> None:
        self._fail_call(stream, *self._unexpected(stream, error))

    @staticmethod
    def _unexpected(stream: _Stream, error: Exception) -> tuple[grpc.StatusCode, str]:
        from google.protobuf.message import DecodeError

        if isinstance(error, DecodeError):
            return grpc.StatusCode.INVALID_ARGUMENT, f"cannot parse the request message: {error}"
        log.exception("gRPC handler for %s failed", stream.path, exc_info=error)
        return grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}"

    def _answer_error(self, stream: _Stream, status: grpc.StatusCode, message: str) -> None:
        """A trailers-only response: one HEADERS frame with the status and END_STREAM."""
        stream.answered = True
        if stream.stream_id not in self._streams:
            return
        self._send(header_frames(END_STREAM, stream.stream_id, RESPONSE_HEADERS + status_block(status, message),
                                 self._peer_max_frame))
        self._close_stream(stream)

    def _answer(self, stream: _Stream, response) -> None:
        if stream.stream_id not in self._streams:
            return  # reset by the client meanwhile
        message = response.SerializeToString()
        stream.outgoing = b"\x00" + len(message).to_bytes(4, "big") + message
        stream.complete = True
        self._send(frame(HEADERS, END_HEADERS, stream.stream_id, RESPONSE_HEADERS))
        self._send_data(stream)

    def _send_data(self, stream: _Stream) -> None:
        """Response DATA within the peer's windows, then the trailers; what does not fit waits for
        a WINDOW_UPDATE."""
        outgoing = stream.outgoing
        while stream.sent < len(outgoing):
            size = min(len(outgoing) - stream.sent, self._send_window, stream.send_window, self._peer_max_frame)
            if size <= 0:
                self._blocked[stream.stream_id] = stream
                return
            self._send(frame(DATA, 0, stream.stream_id, outgoing[stream.sent:stream.sent + size]))
            stream.sent += size
            self._send_window -= size
            stream.send_window -= size
        if not stream.complete:  # a streaming call with more responses to come
            del outgoing[:stream.sent]  # type: ignore[union-attr]  (a bytearray for streaming calls)
            stream.sent = 0
            self._blocked.pop(stream.stream_id, None)
            return
        self._send(header_frames(END_STREAM, stream.stream_id, stream.trailers, self._peer_max_frame))
        self._blocked.pop(stream.stream_id, None)
        self._close_stream(stream)

    def _close_stream(self, stream: _Stream) -> None:
        """Forget a stream whose END_STREAM has been queued. A client that has not closed its side
        yet is told with RST_STREAM(NO_ERROR) that the rest of its request is not wanted (RFC 9113
        8.1, as grpc-go and grpc-core do); what it sends meanwhile is ignored (_on_header_block)."""
        self._streams.pop(stream.stream_id, None)
        if not stream.half_closed:
            self._send(frame(RST_STREAM, 0, stream.stream_id, struct.pack(">I", NO_ERROR)))

    def _send_blocked(self) -> None:
        for stream in list(self._blocked.values()):
            if self._send_window <= 0:
                return
            self._send_data(stream)


class GrpcServer:
    """Listens and serves `methods` (full method path -> a UnaryMethod or StreamingMethod); `close`
    stops accepting, sends GOAWAY, lets open calls finish (bounded by a grace period) and closes."""

    def __init__(self, methods: dict[str, Method], max_message_bytes: int) -> None:
        self.methods = methods
        self.max_message_bytes = max_message_bytes
        self.connections: set[GrpcConnection] = set()
        # every connection reads into this one (a read is parsed before the next begins)
        self.read_buffer = memoryview(bytearray(READ_BUFFER_BYTES))
        self._server: asyncio.base_events.Server | None = None

    async def start(self, host: str, port: int, backlog: int = 2048) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: GrpcConnection(self), host, port, backlog=backlog,
                                                reuse_address=True)

    @property
    def port(self) -> int:
        assert self._server is not None and self._server.sockets
        return self._server.sockets[0].getsockname()[1]

    async def close(self, grace_seconds: float) -> None:
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            connection.go_away()
        await wait_until_idle(self.connections, grace_seconds)
        for connection in list(self.connections):
            connection.close()
        if self._server is not None:
            await self._server.wait_closed()
