"""grpc_transport against grpcio's own client (the C core tritonclient uses): calls, errors, flow
control, compression, cancellation and a graceful close, over loopback."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import uvloop
from tritonclient.grpc import service_pb2

from plansmith_runtime.grpc_transport import GrpcConnection, GrpcError, GrpcServer, StreamingMethod, UnaryMethod

LIMIT = 16 << 20
Request, Response = service_pb2.ModelInferRequest, service_pb2.ModelInferResponse


class EchoService:
    def __init__(self) -> None:
        self.release = threading.Event()  # lets a Slow call finish
        self.cancelled = threading.Event()  # set when a Slow call's task is cancelled

    def Echo(self, request):
        response = Response(id=request.id, model_name=request.model_name)
        response.raw_output_contents.extend(request.raw_input_contents)
        return response

    async def Slow(self, request):
        try:
            while not self.release.is_set():
                await asyncio.sleep(0.005)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return Response(id=request.id)

    def Fail(self, request):
        raise GrpcError(grpc.StatusCode.INVALID_ARGUMENT, "tensor 'ïnput' is wrong:\n100% wrong")

    def Crash(self, request):
        raise RuntimeError("a bug in a handler")

    def Reject(self, request):
        """An error that echoes client input, as "Request for unknown model: '<name>'" does."""
        raise GrpcError(grpc.StatusCode.INVALID_ARGUMENT, f"unknown model '{request.model_name}'")

    async def Stream(self, request):
        """Each request of a stream on its own: "fail" ends the call, "slow" waits for release."""
        if request.id == "fail":
            raise GrpcError(grpc.StatusCode.FAILED_PRECONDITION, "this request ends the stream")
        if request.id == "slow":
            return await self.Slow(request)
        await asyncio.sleep(0)
        return Response(id=request.id, model_name="streamed")


class ServerThread:
    """A GrpcServer in its own thread and uvloop event loop, as the serving process runs it."""

    def __init__(self, service: EchoService) -> None:
        methods = {f"/test.Echo/{name}": UnaryMethod(Request, getattr(service, name))
                   for name in ("Echo", "Slow", "Fail", "Crash", "Reject")}
        methods["/test.Echo/Stream"] = StreamingMethod(Request, service.Stream)
        self.server = GrpcServer(methods, LIMIT)
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.call(self.server.start("127.0.0.1", 0))
        self.url = f"127.0.0.1:{self.server.port}"

    def call(self, coroutine, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self) -> None:
        self.call(self.server.close(1.0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def echo():
    service = EchoService()
    server = ServerThread(service)
    yield server, service
    service.release.set()
    server.stop()


def method(channel: grpc.Channel, name: str):
    return channel.unary_unary(f"/test.Echo/{name}", request_serializer=Request.SerializeToString,
                               response_deserializer=Response.FromString)


def channel_to(url: str, **kwargs) -> grpc.Channel:
    return grpc.insecure_channel(url, options=[("grpc.max_receive_message_length", 64 << 20)], **kwargs)


def test_concurrent_calls_on_one_connection_get_their_own_responses(echo):
    server, _ = echo
    with channel_to(server.url) as channel:
        call = method(channel, "Echo")

        def one(index: int) -> tuple[str, bytes]:
            response = call(Request(id=f"request-{index}", raw_input_contents=[index.to_bytes(4, "big") * 64]))
            return response.id, response.raw_output_contents[0]

        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(one, range(200)))
    assert results == [(f"request-{index}", index.to_bytes(4, "big") * 64) for index in range(200)]


def test_messages_larger_than_the_flow_control_windows_cross_both_ways(echo):
    server, _ = echo
    payload = bytes(range(256)) * (32 << 10)  # 8 MiB: over the client's 64 KiB initial window
    with channel_to(server.url) as channel:
        response = method(channel, "Echo")(Request(id="big", raw_input_contents=[payload]))
    assert response.raw_output_contents[0] == payload


def test_gzip_compressed_requests_are_decompressed(echo):
    server, _ = echo
    payload = b"plansmith " * 10000
    with channel_to(server.url, compression=grpc.Compression.Gzip) as channel:
        response = method(channel, "Echo")(Request(id="zipped", raw_input_contents=[payload]))
    assert response.raw_output_contents[0] == payload


def test_errors_carry_their_status_and_message_and_the_server_keeps_serving(echo):
    server, _ = echo
    with channel_to(server.url) as channel:
        with pytest.raises(grpc.RpcError) as failed:
            method(channel, "Fail")(Request())
        assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert failed.value.details() == "tensor 'ïnput' is wrong:\n100% wrong"
        with pytest.raises(grpc.RpcError) as crashed:
            method(channel, "Crash")(Request())
        assert crashed.value.code() == grpc.StatusCode.INTERNAL and "a bug in a handler" in crashed.value.details()
        with pytest.raises(grpc.RpcError) as unknown:
            method(channel, "Missing")(Request())
        assert unknown.value.code() == grpc.StatusCode.UNIMPLEMENTED and "/test.Echo/Missing" in unknown.value.details()
        assert method(channel, "Echo")(Request(id="after")).id == "after"


def h2_trailers_only_call(url: str, path: str, request: service_pb2.ModelInferRequest) -> dict:
    """The headers of a call answered trailers-only (an error), as h2, a strict HTTP/2 client (like
    nghttp2 in Envoy), receives them: it raises on a frame over its SETTINGS_MAX_FRAME_SIZE."""
    import h2.config
    import h2.connection
    import h2.events

    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    client.initiate_connection()
    client.send_headers(1, [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", url),
                            ("content-type", "application/grpc"), ("te", "trailers")])
    message = framed(request)
    for offset in range(0, len(message), 16384):  # the default frame size, until the server's SETTINGS
        client.send_data(1, message[offset:offset + 16384], end_stream=offset + 16384 >= len(message))
    host, port = url.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        raw.sendall(client.data_to_send())
        while True:
            chunk = raw.recv(65536)
            assert chunk, "the server closed the connection"
            for event in client.receive_data(chunk):
                if isinstance(event, h2.events.ResponseReceived):
                    return dict(event.headers)
            raw.sendall(client.data_to_send())


def test_an_error_message_echoing_a_long_input_is_cut_so_that_clients_get_the_calls_status(echo):
    """A 17,000-character model name in the error message made a 17 KB header block: h2 failed the
    connection on the oversized frame and grpcio answered RESOURCE_EXHAUSTED. The message is cut
    to 4 KiB, ending with "...", and every client gets INVALID_ARGUMENT."""
    server, _ = echo
    request = Request(model_name="x" * 17000)
    headers = h2_trailers_only_call(server.url, "/test.Echo/Reject", request)
    with channel_to(server.url) as channel, pytest.raises(grpc.RpcError) as rejected:
        method(channel, "Reject")(request)
    assert headers["grpc-status"] == str(grpc.StatusCode.INVALID_ARGUMENT.value[0])
    assert len(headers["grpc-message"]) <= 4096 and headers["grpc-message"].endswith("x...")
    assert rejected.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rejected.value.details().startswith("unknown model 'xxx") and rejected.value.details().endswith("...")


def test_a_cut_error_message_keeps_its_escapes_and_characters_whole():
    """The cut falls between characters: never inside a %XX escape or a multi-byte character."""
    from urllib.parse import unquote

    import hpack as hpack_library

    from plansmith_runtime.grpc_transport import status_block

    def grpc_message(text: str) -> str:
        return dict(hpack_library.Decoder().decode(status_block(grpc.StatusCode.INTERNAL, text)))["grpc-message"]

    assert grpc_message("100% short") == "100%25 short"
    for text in ("é" * 3000, "a" + "€" * 2000, "%" * 5000):
        encoded = grpc_message(text)
        assert 4096 - 9 < len(encoded) <= 4096 and encoded.endswith("...")
        assert text.startswith(unquote(encoded[:-3], errors="strict"))


def test_a_message_over_the_limit_is_refused_and_the_server_keeps_serving(echo):
    server, _ = echo
    with channel_to(server.url) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            method(channel, "Echo")(Request(raw_input_contents=[b"x" * (LIMIT + 1)]))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and str(LIMIT) in refused.value.details()
        assert method(channel, "Echo")(Request(id="after")).id == "after"


def test_a_call_the_client_gives_up_on_is_cancelled_on_the_server(echo):
    server, service = echo
    with channel_to(server.url) as channel:
        with pytest.raises(grpc.RpcError) as expired:
            method(channel, "Slow")(Request(), timeout=0.2)
        assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert service.cancelled.wait(5), "the handler's task was not cancelled"
        assert method(channel, "Echo")(Request(id="after")).id == "after"


def test_close_finishes_open_calls_and_refuses_new_connections(echo):
    server, service = echo
    with channel_to(server.url) as channel:
        slow = method(channel, "Slow").future(Request(id="in flight"))
        deadline = time.monotonic() + 5
        while not any(not c.idle for c in server.server.connections) and time.monotonic() < deadline:
            time.sleep(0.01)
        closing = asyncio.run_coroutine_threadsafe(server.server.close(10), server.loop)
        time.sleep(0.2)
        assert not closing.done(), "close returned with a call still open"
        service.release.set()
        assert slow.result(5).id == "in flight"
        closing.result(5)
    with channel_to(server.url) as fresh, pytest.raises(grpc.RpcError) as refused:
        method(fresh, "Echo")(Request(), timeout=2)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_client_that_does_not_speak_http2_is_disconnected(echo):
    server, _ = echo
    host, port = server.url.split(":")
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        raw.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        received = b""
        while chunk := raw.recv(4096):
            received += chunk
    goaway = received.rfind(b"\x07\x00\x00\x00\x00\x00")  # a GOAWAY frame's type, flags and stream 0
    assert goaway > 0 and b"preface" in received[goaway:]


def h2_echo_call(url: str, payload: bytes, client_window: int = 65535, piece: int = 0) -> tuple[bytes, dict, int]:
    """One Echo call from h2, a strict HTTP/2 client (it raises on any flow-control or framing
    violation by the server); `piece` > 0 sends the request in pieces that size, so that frames
    reach the server cut across reads. Returns the response body, the trailers and the most
    response bytes received between two WINDOW_UPDATEs the client sent."""
    import h2.config
    import h2.connection
    import h2.events
    import h2.settings

    body = Request(id="h2", raw_input_contents=[payload]).SerializeToString()
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    client.local_settings = h2.settings.Settings(client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: client_window})
    client.initiate_connection()
    client.send_headers(1, [(":method", "POST"), (":scheme", "http"), (":path", "/test.Echo/Echo"),
                            (":authority", url), ("content-type", "application/grpc"), ("te", "trailers")])
    message = b"\x00" + len(body).to_bytes(4, "big") + body
    for offset in range(0, len(message), 16384):  # the default frame size, until the server's SETTINGS
        client.send_data(1, message[offset:offset + 16384], end_stream=offset + 16384 >= len(message))
    received, trailers, largest_unacknowledged = bytearray(), None, 0
    host, port = url.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        outgoing = client.data_to_send()
        for offset in range(0, len(outgoing), piece or len(outgoing)):
            raw.sendall(outgoing[offset:offset + (piece or len(outgoing))])
            if piece:
                time.sleep(0.0005)
        while trailers is None:
            chunk = raw.recv(65536)
            assert chunk, "the server closed the connection"
            unacknowledged = 0
            for event in client.receive_data(chunk):
                if isinstance(event, h2.events.DataReceived):
                    received += event.data
                    unacknowledged += event.flow_controlled_length
                    client.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.TrailersReceived):
                    trailers = dict(event.headers)
            largest_unacknowledged = max(largest_unacknowledged, unacknowledged)
            raw.sendall(client.data_to_send())
    return bytes(received), trailers, largest_unacknowledged


def test_response_data_waits_for_the_clients_flow_control_window(echo):
    """The client announces a 1 KiB window: the 32 KiB response arrives only as it gives window back."""
    server, _ = echo
    payload = bytes(range(256)) * 128  # within the 64 KiB the client may send before the server's SETTINGS
    received, trailers, largest_unacknowledged = h2_echo_call(server.url, payload, client_window=1024)
    assert trailers["grpc-status"] == "0"
    assert Response.FromString(received[5:]).raw_output_contents[0] == payload
    assert 0 < largest_unacknowledged <= 1024


def test_frames_cut_across_reads_are_put_back_together(echo):
    server, _ = echo
    payload = bytes(range(251)) * 200  # 50 KB in 16 KiB frames, sent 997 bytes at a time
    received, trailers, _ = h2_echo_call(server.url, payload, piece=997)
    assert trailers["grpc-status"] == "0"
    assert Response.FromString(received[5:]).raw_output_contents[0] == payload


def read_frames(raw: socket.socket, *until_streams_end: int) -> list[tuple[int, int, int, bytes]]:
    """(type, flags, stream, payload) of every frame the server sends until every stream in
    `until_streams_end` has ended."""
    frames, buffered, open_streams = [], b"", set(until_streams_end)
    while True:
        while len(buffered) >= 9 and len(buffered) >= 9 + int.from_bytes(buffered[:3], "big"):
            length = int.from_bytes(buffered[:3], "big")
            kind, flags, stream = buffered[3], buffered[4], int.from_bytes(buffered[5:9], "big")
            frames.append((kind, flags, stream, buffered[9:9 + length]))
            buffered = buffered[9 + length:]
            if flags & 0x1 and kind in (0, 1):
                open_streams.discard(stream)
            if not open_streams:
                return frames
        chunk = raw.recv(65536)
        assert chunk, "the server closed the connection"
        buffered += chunk


@pytest.mark.parametrize("writes", ["one", "7000-byte", "cut-in-a-large-frame-header"])
def test_large_data_frames_read_into_their_own_buffers_arrive_whole(echo, writes):
    """DATA frames of DIRECT_BODY_BYTES and more (padded or not) whose payload the socket reads into
    a buffer of its own, then a small call, on one connection; written at once, cut every 7000
    bytes, or cut inside the header of a large frame (the rest of the header comes with the next
    read)."""
    import hpack as hpack_library

    from plansmith_runtime.grpc_transport import frame
    from plansmith_runtime.http_transport import DIRECT_BODY_BYTES

    server, _ = echo
    encoder = hpack_library.Encoder()
    payloads = {1: os.urandom(300_000), 3: os.urandom(DIRECT_BODY_BYTES), 5: b"small"}
    window = 16 << 20  # for the answers: SETTINGS_INITIAL_WINDOW_SIZE, and the connection's WINDOW_UPDATE
    outgoing = (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0, struct.pack(">HI", 0x4, window))
                + frame(8, 0, 0, struct.pack(">I", window - 65535)))
    for stream, payload in payloads.items():
        body = Request(id=f"call {stream}", raw_input_contents=[payload]).SerializeToString()
        message = b"\x00" + len(body).to_bytes(4, "big") + body
        block = encoder.encode([(":method", "POST"), (":scheme", "http"), (":path", "/test.Echo/Echo"),
                                (":authority", server.url), ("content-type", "application/grpc")])
        outgoing += frame(1, 0x4, stream, block)
        if stream == 3:  # padded, END_STREAM
            outgoing += frame(0, 0x1 | 0x8, stream, bytes([9]) + message + b"\x00" * 9)
        else:  # the 300 KB message in two frames, the second one large
            outgoing += frame(0, 0, stream, message[:1000])
            large_frame_at = len(outgoing)
            outgoing += frame(0, 0x1, stream, message[1000:])
    cuts = {"one": [], "7000-byte": list(range(7000, len(outgoing), 7000)),
            "cut-in-a-large-frame-header": [large_frame_at + 4]}[writes]
    host, port = server.url.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for start, end in zip([0, *cuts], [*cuts, len(outgoing)]):
            raw.sendall(outgoing[start:end])
            time.sleep(0.002 if writes == "cut-in-a-large-frame-header" else 0.0002)
        frames = read_frames(raw, *payloads)
    for stream, payload in payloads.items():
        data = b"".join(body for kind, _, number, body in frames if kind == 0 and number == stream)
        response = Response.FromString(data[5:])
        assert response.id == f"call {stream}" and response.raw_output_contents[0] == payload


def test_continuation_padding_and_ping_are_understood(echo):
    """Frames no client library sends by default here, written by hand: a header block split over
    HEADERS and CONTINUATION, padded HEADERS and DATA, and a PING the server must echo."""
    import hpack as hpack_library

    from plansmith_runtime.grpc_transport import frame

    server, _ = echo
    block = hpack_library.Encoder().encode([(":method", "POST"), (":scheme", "http"), (":path", "/test.Echo/Echo"),
                                            (":authority", server.url), ("content-type", "application/grpc")])
    body = Request(id="by hand", raw_input_contents=[b"payload"]).SerializeToString()
    message = b"\x00" + len(body).to_bytes(4, "big") + body
    padding = 7
    outgoing = (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0)
                + frame(1, 0x8, 1, bytes([padding]) + block[:10] + b"\x00" * padding)  # PADDED, no END_HEADERS
                + frame(9, 0x4, 1, block[10:])  # CONTINUATION with END_HEADERS
                + frame(6, 0, 0, b"pingpong")
                + frame(0, 0x1 | 0x8, 1, bytes([padding]) + message + b"\x00" * padding))  # padded DATA, END_STREAM
    host, port = server.url.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        raw.sendall(outgoing)
        frames = read_frames(raw, 1)
    assert (6, 0x1, 0, b"pingpong") in frames  # the PING came back acknowledged
    decoder = hpack_library.Decoder()
    headers = [dict(decoder.decode(payload)) for kind, _, stream, payload in frames if kind == 1 and stream == 1]
    assert headers[0][":status"] == "200" and headers[-1]["grpc-status"] == "0"
    data = b"".join(payload for kind, _, stream, payload in frames if kind == 0 and stream == 1)
    assert Response.FromString(data[5:]).id == "by hand"


def test_a_header_block_larger_than_the_peers_frame_size_reaches_a_strict_client_in_continuation_frames(echo, monkeypatch):
    """With the grpc-message cap lifted, a 40 KB error goes out as HEADERS and CONTINUATION frames
    within the peer's SETTINGS_MAX_FRAME_SIZE (RFC 9113 6.10), which h2 accepts whole."""
    from plansmith_runtime import grpc_transport

    monkeypatch.setattr(grpc_transport, "MAX_STATUS_MESSAGE_BYTES", 1 << 20, raising=False)
    server, _ = echo
    headers = h2_trailers_only_call(server.url, "/test.Echo/Reject", Request(model_name="x" * 40000))
    assert headers["grpc-status"] == str(grpc.StatusCode.INVALID_ARGUMENT.value[0])
    assert headers["grpc-message"] == f"unknown model '{'x' * 40000}'"


def test_header_frames_put_end_stream_on_the_headers_frame_and_end_headers_on_the_last():
    from plansmith_runtime.grpc_transport import header_frames, literal_header

    block = literal_header("grpc-status", "3") + literal_header("x-long", "v" * 40000)
    frames, written = [], header_frames(0x1, 5, block, 16384)
    while written:
        length = int.from_bytes(written[:3], "big")
        frames.append((written[3], written[4], int.from_bytes(written[5:9], "big"), written[9:9 + length]))
        written = written[9 + length:]
    assert [(kind, flags, stream) for kind, flags, stream, _ in frames] == [(1, 0x1, 5), (9, 0, 5), (9, 0x4, 5)]
    assert all(len(payload) <= 16384 for *_, payload in frames) and b"".join(p for *_, p in frames) == block
    small = literal_header("grpc-status", "0")
    assert header_frames(0x1, 5, small, 16384) == struct.pack(">IBI", len(small) << 8 | 1, 0x1 | 0x4, 5) + small


def test_a_header_block_that_never_ends_is_refused(echo):
    """CONTINUATION frames without END_HEADERS would grow the block without bound."""
    from plansmith_runtime.grpc_transport import MAX_HEADER_LIST_BYTES, frame

    server, _ = echo
    filler = b"\x00" * 16000
    outgoing = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0) + frame(1, 0, 1, filler)
    outgoing += b"".join(frame(9, 0, 1, filler) for _ in range(MAX_HEADER_LIST_BYTES // len(filler) + 1))
    host, port = server.url.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        raw.sendall(outgoing)
        received = b""
        while chunk := raw.recv(65536):
            received += chunk
    goaway = received.rfind(b"\x07\x00\x00\x00\x00\x00")
    assert goaway > 0 and b"header block over" in received[goaway:]


def test_parse_grpc_timeout_reads_every_unit_and_refuses_malformed_values():
    from plansmith_runtime.grpc_transport import parse_grpc_timeout

    assert parse_grpc_timeout(b"2H") == 7200 and parse_grpc_timeout(b"3M") == 180 and parse_grpc_timeout(b"1S") == 1
    assert parse_grpc_timeout(b"250m") == 0.25 and parse_grpc_timeout(b"99999999u") == pytest.approx(99.999999)
    assert parse_grpc_timeout(b"5n") == pytest.approx(5e-9)
    for malformed in (b"", b"S", b"10", b"1.5S", b"-1S", b"123456789S", b"10x"):
        assert parse_grpc_timeout(malformed) is None


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
@pytest.mark.parametrize("damage", ["truncated", "trailing bytes"])
def test_a_compressed_message_cut_short_or_followed_by_other_bytes_fails_with_internal(encoding, damage):
    """zlib raises on neither: a cut message was parsed from the part that inflated (its last
    tensor shorter, or missing), and bytes after the compressed stream were ignored."""
    from plansmith_runtime.grpc_transport import unframe_message

    message = Request(id="zipped", raw_input_contents=[b"x" * 1000, b"y" * 1000]).SerializeToString()
    compressor = zlib.compressobj(wbits=16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
    compressed = compressor.compress(message) + compressor.flush()
    whole = b"\x01" + len(compressed).to_bytes(4, "big") + compressed
    assert bytes(unframe_message(whole, encoding, LIMIT)) == message
    damaged = compressed[:len(compressed) // 2] if damage == "truncated" else compressed + b"garbage"
    with pytest.raises(GrpcError) as failed:
        unframe_message(b"\x01" + len(damaged).to_bytes(4, "big") + damaged, encoding, LIMIT)
    assert failed.value.status == grpc.StatusCode.INTERNAL and encoding in failed.value.message


def test_the_server_enforces_the_calls_grpc_timeout(echo):
    """A client that sends grpc-timeout but never resets the stream (unlike grpcio, which resets it
    at its own deadline) still gets DEADLINE_EXCEEDED, and the handler's work is cancelled."""
    import hpack as hpack_library

    from plansmith_runtime.grpc_transport import frame

    server, service = echo
    encoder = hpack_library.Encoder()
    body = Request(id="late").SerializeToString()
    message = b"\x00" + len(body).to_bytes(4, "big") + body

    def call(stream: int, path: str, timeout: str) -> bytes:
        block = encoder.encode([(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", server.url),
                                ("content-type", "application/grpc"), ("grpc-timeout", timeout)])
        return frame(1, 0x4, stream, block) + frame(0, 0x1, stream, message)

    host, port = server.url.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        started = time.monotonic()
        raw.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0) + call(1, "/test.Echo/Slow", "150m"))
        frames = read_frames(raw, 1)
        waited = time.monotonic() - started
        raw.sendall(call(3, "/test.Echo/Echo", "10S"))  # a timeout the call meets: answered normally
        later = read_frames(raw, 3)
    decoder = hpack_library.Decoder()
    blocks = [dict(decoder.decode(payload)) for kind, _, stream, payload in frames + later if kind == 1]
    assert blocks[0]["grpc-status"] == str(grpc.StatusCode.DEADLINE_EXCEEDED.value[0])
    assert waited >= 0.14, "answered before the deadline"
    assert service.cancelled.wait(5), "the handler's task was not cancelled"
    assert blocks[-1]["grpc-status"] == "0"


def streaming(channel: grpc.Channel):
    return channel.stream_stream("/test.Echo/Stream", request_serializer=Request.SerializeToString,
                                 response_deserializer=Response.FromString)


def open_stream(channel: grpc.Channel):
    """A Stream call fed from a queue: put requests one at a time, None to close the client's side."""
    import queue

    outgoing: queue.Queue = queue.Queue()

    def requests():
        while (item := outgoing.get()) is not None:
            yield item

    return streaming(channel)(requests(), timeout=10), outgoing


def test_a_stream_answers_each_request_before_the_client_closes_its_side(echo):
    """The requests of a stream run as they arrive: each answer comes back while the client still
    holds the stream open (it sends the next request only after reading the last answer)."""
    server, _ = echo
    with channel_to(server.url) as channel:
        responses, outgoing = open_stream(channel)
        for index in range(5):
            outgoing.put(Request(id=f"r{index}"))
            answer = next(responses)
            assert (answer.id, answer.model_name) == (f"r{index}", "streamed")
        outgoing.put(None)  # close our side: the call ends with OK
        assert list(responses) == []
        assert responses.code() == grpc.StatusCode.OK
        many = streaming(channel)(iter([Request(id=str(i)) for i in range(50)]))  # all at once
        assert [int(r.id) for r in many] == list(range(50))


def test_a_streams_answers_come_in_request_order_though_a_later_request_finishes_first(echo):
    """As Triton answers a model that is not decoupled: tritonclient's stream callback gets no id
    with an error, so a client matches answers to its requests by their order."""
    server, service = echo
    with channel_to(server.url) as channel:
        responses, outgoing = open_stream(channel)
        for request_id in ("slow", "quick", "quicker"):
            outgoing.put(Request(id=request_id))
        time.sleep(0.2)  # the two quick ones are answered by now, held behind "slow"
        service.release.set()
        assert [next(responses).id for _ in range(3)] == ["slow", "quick", "quicker"]
        outgoing.put(None)
        assert list(responses) == [] and responses.code() == grpc.StatusCode.OK


def test_an_error_ends_the_stream_after_the_answers_already_given(echo):
    server, _ = echo
    with channel_to(server.url) as channel:
        responses, outgoing = open_stream(channel)
        outgoing.put(Request(id="first"))
        assert next(responses).id == "first"  # answered: the error below comes after it, in the trailers
        outgoing.put(Request(id="fail"))
        outgoing.put(Request(id="never"))
        later: list[str] = []
        with pytest.raises(grpc.RpcError) as failed:
            for response in responses:
                later.append(response.id)
        outgoing.put(None)
        assert later == []  # "never" was cancelled with the stream
        assert failed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "ends the stream" in failed.value.details()
        assert method(channel, "Echo")(Request(id="after")).id == "after"


def test_a_stream_the_client_cancels_cancels_its_running_requests(echo):
    server, service = echo
    with channel_to(server.url) as channel:
        with pytest.raises(grpc.RpcError) as expired:
            list(streaming(channel)(iter([Request(id="slow")]), timeout=0.3))
        assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert service.cancelled.wait(5), "the request's task was not cancelled"
        assert method(channel, "Echo")(Request(id="after")).id == "after"


@pytest.mark.parametrize("data, status", [
    (b"\x00\x00\x00\x00\x10" + b"\x08", grpc.StatusCode.INTERNAL),  # ends 15 bytes short of its message
    (b"\x00" + (LIMIT + 1).to_bytes(4, "big"), grpc.StatusCode.RESOURCE_EXHAUSTED),  # announces one over the limit
], ids=["ends-inside-a-message", "message-over-the-limit"])
def test_a_stream_ending_inside_a_message_or_over_the_limit_fails_with_its_status(echo, data, status):
    import hpack as hpack_library

    from plansmith_runtime.grpc_transport import frame

    server, _ = echo
    block = hpack_library.Encoder().encode([(":method", "POST"), (":scheme", "http"), (":path", "/test.Echo/Stream"),
                                            (":authority", server.url), ("content-type", "application/grpc")])
    host, port = server.url.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        raw.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0) + frame(1, 0x4, 1, block) + frame(0, 0x1, 1, data))
        frames = read_frames(raw, 1)
    trailers = dict(hpack_library.Decoder().decode([payload for kind, _, stream, payload in frames if kind == 1][-1]))
    assert trailers["grpc-status"] == str(status.value[0])


class RecordingTransport:
    """What a GrpcConnection driven without a socket writes, and whether it closed."""

    def __init__(self) -> None:
        self.events: list = []

    def write(self, data: bytes) -> None:
        self.events.append(bytes(data))

    def close(self) -> None:
        self.events.append("closed")


def read_into(connection: GrpcConnection, data: bytes) -> None:
    """One read as the event loop does it for a BufferedProtocol: into the buffer the connection gives."""
    buffer = connection.get_buffer(len(data))
    assert len(buffer) >= len(data)
    buffer[:len(data)] = data
    connection.buffer_updated(len(data))


def test_the_rest_of_a_large_data_frame_is_read_into_its_own_buffer_even_after_a_cut_header():
    from plansmith_runtime.grpc_transport import frame
    from plansmith_runtime.http_transport import DIRECT_BODY_BYTES, READ_BUFFER_BYTES

    server = GrpcServer({}, LIMIT)
    connection = GrpcConnection(server)
    connection.connection_made(RecordingTransport())
    payload = os.urandom(DIRECT_BODY_BYTES + 1000)
    data_frame = frame(0, 0x1, 1, payload)
    read_into(connection, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0) + data_frame[:4])
    read_into(connection, data_frame[4:9])  # the header is whole: the payload gets a buffer of its own
    assert len(connection.get_buffer(-1)) == len(payload)
    read_into(connection, data_frame[9:5009])
    assert len(connection.get_buffer(-1)) == len(payload) - 5000
    read_into(connection, data_frame[5009:])
    assert connection.get_buffer(-1) is server.read_buffer and len(server.read_buffer) == READ_BUFFER_BYTES


def test_closing_a_connection_first_sends_the_frames_waiting_for_the_end_of_the_loop_turn():
    """A call's last frames are written at the end of the loop turn (_flush_soon), but the call
    already counts as done: a graceful close that came in between lost them (a SIGTERM race)."""
    connection, transport = GrpcConnection(GrpcServer({}, LIMIT)), RecordingTransport()
    connection.connection_made(transport)
    connection._send(b"the last frames of a call")  # queued as _answer queues them
    assert connection.idle
    connection.close()
    assert transport.events[-2:] == [b"the last frames of a call", "closed"]


def start_call(connection: GrpcConnection, stream: int) -> None:
    """The connection preface, SETTINGS and a call's HEADERS for /test.Echo/Record, in one read."""
    import hpack as hpack_library

    from plansmith_runtime.grpc_transport import frame

    block = hpack_library.Encoder().encode([(":method", "POST"), (":scheme", "http"), (":path", "/test.Echo/Record"),
                                            (":authority", "x"), ("content-type", "application/grpc")])
    read_into(connection, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0) + frame(1, 0x4, stream, block))


def send_data(connection: GrpcConnection, stream: int, flags: int, payload: bytes, reads: list[int] | None = None) -> None:
    """A DATA frame, in reads of 50,000 bytes or at the offsets `reads` says."""
    from plansmith_runtime.grpc_transport import frame

    data = frame(0, flags, stream, payload)
    cuts = reads if reads is not None else list(range(50_000, len(data), 50_000))
    for begin, end in zip([0, *cuts], [*cuts, len(data)]):
        read_into(connection, data[begin:end])


def recording_connection() -> tuple[GrpcConnection, RecordingTransport, list]:
    """A connection without a socket whose /test.Echo/Record method records what its parser gets."""
    received: list = []

    def record(data, read_started_ns, traceparent, tracestate):
        received.append(data)
        return Request.FromString(data)

    methods = {"/test.Echo/Record": UnaryMethod(Request, lambda request: Response(id=request.id), record)}
    connection, transport = GrpcConnection(GrpcServer(methods, LIMIT)), RecordingTransport()
    connection.connection_made(transport)
    return connection, transport, received


def written_frames(transport: RecordingTransport) -> list[tuple[int, int, int, bytes]]:
    """(type, flags, stream, payload) of every frame the connection wrote."""
    written = b"".join(event for event in transport.events if isinstance(event, bytes))
    frames, position = [], 0
    while position + 9 <= len(written):
        length = int.from_bytes(written[position:position + 3], "big")
        frames.append((written[position + 3], written[position + 4], int.from_bytes(written[position + 5:position + 9], "big"),
                       written[position + 9:position + 9 + length]))
        position += 9 + length
    return frames


def grpc_status_of(transport: RecordingTransport) -> str:
    """The grpc-status the connection answered with (its trailers, or a trailers-only response)."""
    import hpack as hpack_library

    blocks = [payload for kind, _, _, payload in written_frames(transport) if kind == 1]
    decoder = hpack_library.Decoder()
    return next(h["grpc-status"] for h in (dict(decoder.decode(block)) for block in blocks) if "grpc-status" in h)


def framed(request: service_pb2.ModelInferRequest) -> bytes:
    body = request.SerializeToString()
    return b"\x00" + len(body).to_bytes(4, "big") + body


def test_a_message_in_several_data_frames_is_received_into_one_buffer_without_a_join():
    """A 400 KB request in four DATA frames (a small one with the prefix, a large one, a small one,
    a large one): it reaches the parser as a view of one buffer of exactly its length, and the
    socket reads the large frames straight into their place in it."""
    request = Request(id="one buffer", raw_input_contents=[os.urandom(400_000)])
    message = framed(request)

    async def main():
        connection, transport, received = recording_connection()
        start_call(connection, 1)
        send_data(connection, 1, 0, message[:1_000])
        stream = connection._streams[1]
        assert stream.message is not None and len(stream.message) == len(message)
        send_data(connection, 1, 0, message[1_000:151_000], reads=[9 + 1_000])
        assert stream.filled == 151_000 and received == []
        send_data(connection, 1, 0, message[151_000:153_000])
        send_data(connection, 1, 0x1, message[153_000:], reads=[9 + 10])
        return transport, received

    transport, received = asyncio.run(main())
    (data,) = received
    assert isinstance(data, memoryview) and len(data.obj) == len(message) and bytes(data) == message[5:]
    assert grpc_status_of(transport) == "0"


@pytest.mark.parametrize("first_read", [9 + 10, 9 + 3])
def test_the_first_large_frame_of_a_message_is_read_into_the_message_when_its_prefix_came_with_its_header(first_read):
    """A 300 KB message in two large frames. When the read with the first frame's header also holds
    the message's 5-byte prefix, the rest of that frame goes straight into the message's buffer;
    with 3 bytes of it, into a buffer of the frame's own, copied into the message once whole. The
    second frame goes into the message either way."""
    from plansmith_runtime.grpc_transport import frame

    message = framed(Request(id="in place", raw_input_contents=[os.urandom(300_000)]))
    first, second = frame(0, 0, 1, message[:100_000]), frame(0, 0x1, 1, message[100_000:])

    async def main():
        connection, _, received = recording_connection()
        start_call(connection, 1)
        read_into(connection, first[:first_read])
        stream = connection._streams[1]
        in_place = stream.message is not None and connection.get_buffer(-1).obj is stream.message.obj
        read_into(connection, first[first_read:])
        read_into(connection, second[:20])
        assert connection.get_buffer(-1).obj is stream.message.obj
        read_into(connection, second[20:])
        return in_place, received

    in_place, (data,) = asyncio.run(main())
    assert in_place == (first_read == 9 + 10)
    assert bytes(data) == message[5:] and len(data.obj) == len(message)


@pytest.mark.parametrize("ending", ["a second message", "short of its prefix"])
def test_a_multi_frame_message_longer_or_shorter_than_its_prefix_fails_the_call(ending):
    """Two messages in a unary call, or a message that ends (END_STREAM) before its prefix's length:
    INTERNAL, as when the message comes in one frame."""
    message = framed(Request(id="x", raw_input_contents=[os.urandom(200_000)]))
    last = message[100_000:] + framed(Request(id="y")) if ending == "a second message" else message[100_000:-10]

    async def main():
        connection, transport, received = recording_connection()
        start_call(connection, 1)
        send_data(connection, 1, 0, message[:100_000])
        send_data(connection, 1, 0x1, last)
        return transport, received

    transport, received = asyncio.run(main())
    assert received == [] and grpc_status_of(transport) == str(grpc.StatusCode.INTERNAL.value[0])


class StreamClient:
    """Drives a GrpcConnection without a socket whose methods are EchoService's Stream and Echo,
    with one HPACK encoder, as one client connection has."""

    def __init__(self) -> None:
        import hpack as hpack_library

        service = EchoService()
        methods = {"/test.Echo/Stream": StreamingMethod(Request, service.Stream),
                   "/test.Echo/Echo": UnaryMethod(Request, service.Echo)}
        self.connection, self.transport = GrpcConnection(GrpcServer(methods, LIMIT)), RecordingTransport()
        self.connection.connection_made(self.transport)
        self.encoder = hpack_library.Encoder()
        read_into(self.connection, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + self.frame(4, 0, 0))

    @staticmethod
    def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
        from plansmith_runtime.grpc_transport import frame

        return frame(kind, flags, stream, payload)

    def call(self, stream: int, name: str, *messages: bytes, end_stream: bool = True) -> bytes:
        block = self.encoder.encode([(":method", "POST"), (":scheme", "http"), (":path", f"/test.Echo/{name}"),
                                     (":authority", "x"), ("content-type", "application/grpc")])
        return self.frame(1, 0x4, stream, block) + self.frame(0, 0x1 if end_stream else 0, stream, b"".join(messages))

    def trailers(self, stream: int) -> bytes:
        return self.frame(1, 0x4 | 0x1, stream, self.encoder.encode([("x-trailer", "1")]))

    def send(self, data: bytes) -> None:
        read_into(self.connection, data)


def test_a_stream_answered_before_the_client_closed_its_side_is_reset_with_no_error():
    """A request that fails its stream ends the call while the client still holds its side open:
    RST_STREAM(NO_ERROR) follows the trailers, so the client stops sending (grpc-go, grpc-core). A
    call the client had closed is not reset."""
    client = StreamClient()

    async def main():
        client.send(client.call(1, "Stream", framed(Request(id="fail")), end_stream=False)
                    + client.call(3, "Echo", framed(Request(id="unary"))))
        await asyncio.sleep(0.01)  # the handler task fails the call; its frames go at the end of a loop turn

    asyncio.run(main())
    frames = [(kind, flags, stream) for kind, flags, stream, _ in written_frames(client.transport) if stream]
    assert frames.index((1, 0x4 | 0x1, 1)) < frames.index((3, 0, 1))  # the trailers-only answer, then the reset
    resets = [(stream, payload) for kind, _, stream, payload in written_frames(client.transport) if kind == 3]
    assert resets == [(1, b"\x00\x00\x00\x00")]


def test_a_stream_the_client_closes_while_its_ended_answer_waits_on_flow_control_is_not_reset():
    """Ended by a failing request while its responses wait for the client's window, then closed by
    the client: once the window opens the trailers end it, and no RST_STREAM follows on a stream
    closed both ways (RFC 9113 5.1)."""
    client = StreamClient()

    async def main():
        client.send(client.frame(4, 0, 0, struct.pack(">HI", 4, 0)))  # an initial stream window of 0
        client.send(client.call(1, "Stream", framed(Request(id="ok")), end_stream=False))
        await asyncio.sleep(0.01)  # the answer to "ok" waits for the window
        client.send(client.frame(0, 0, 1, framed(Request(id="fail"))))
        await asyncio.sleep(0.01)  # the stream is ended; its trailers wait behind the blocked DATA
        client.send(client.frame(0, 0x1, 1, b""))  # the client closes its side
        client.send(client.frame(8, 0, 1, struct.pack(">I", 65535)))  # and opens the window
        await asyncio.sleep(0.01)

    asyncio.run(main())
    frames = [(kind, flags) for kind, flags, stream, _ in written_frames(client.transport) if stream == 1]
    assert frames[-1] == (1, 0x4 | 0x1) and (3, 0) not in frames  # trailers last, no reset


def test_request_trailers_and_data_on_a_stream_already_answered_are_ignored():
    """The client closes its side (trailers, or DATA crossing the server's answer) of a stream the
    server answered and forgot: ignored (RFC 9113 5.1), where it used to be taken for a new stream
    with an old id and end the connection with GOAWAY, and every call on it."""
    client = StreamClient()

    async def main():
        client.send(client.call(1, "Stream", framed(Request(id="fail")), end_stream=False))
        await asyncio.sleep(0.01)
        client.send(client.trailers(1) + client.frame(0, 0x1, 1, framed(Request(id="late")))
                    + client.call(3, "Echo", framed(Request(id="after"))))

    asyncio.run(main())
    assert "closed" not in client.transport.events
    assert not [frame for frame in written_frames(client.transport) if frame[0] == 7]  # no GOAWAY
    data = b"".join(payload for kind, _, stream, payload in written_frames(client.transport) if kind == 0 and stream == 3)
    assert Response.FromString(data[5:]).id == "after"
