"""The HTTP/1.1 transport on a real loopback socket, spoken to byte by byte: keep-alive,
pipelining in order, 100-continue, chunked bodies, limits, malformed input, a graceful close, and
large bodies received into their own buffers."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
import os
import time
import zlib

import pytest

from plansmith_runtime.http_transport import (DIRECT_BODY_BYTES, HttpRequest, HttpResponse, HttpServer,
                                              accepted_encoding, compress_response, path_of)

MAX_BODY = 1024
# the server fixture and the tests share one event loop (fixtures default to the session loop here)
on_session_loop = pytest.mark.asyncio(loop_scope="session")


async def echo(request: HttpRequest) -> HttpResponse:
    """Answers with what it received; /sleep/N waits N ms first, /fail raises, /big/N answers N bytes."""
    if request.path.startswith("/sleep/"):
        await asyncio.sleep(int(request.path.rsplit("/", 1)[1]) / 1000)
    if request.path == "/fail":
        raise RuntimeError("handler bug")
    if request.path.startswith("/big/"):
        return HttpResponse(200, b"x" * int(request.path.rsplit("/", 1)[1]), "application/octet-stream")
    document = {"method": request.method, "path": request.path, "body": request.body.decode(),
                "header": request.headers.get("x-test")}
    return HttpResponse(200, json.dumps(document).encode(), headers=(("X-Answer", "yes"),))


@contextlib.asynccontextmanager
async def serving(handler, max_body: int, **options):
    """An HttpServer on a free loopback port, closed afterwards."""
    http = HttpServer(handler, max_body, **options)
    await http.start("127.0.0.1", 0)
    try:
        yield http
    finally:
        await http.close(1.0)


@pytest.fixture
async def server():
    async with serving(echo, MAX_BODY) as http:
        yield http


@pytest.fixture
async def connection(server):
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    yield reader, writer
    writer.close()


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    """A response's status and headers (lower-case names)."""
    status_line = await asyncio.wait_for(reader.readline(), 5)
    assert status_line.startswith(b"HTTP/1.1 "), status_line
    headers = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, value = line.decode().rstrip("\r\n").split(": ", 1)
        headers[name.lower()] = value
    return int(status_line.split()[1]), headers


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    status, headers = await read_head(reader)
    return status, headers, await reader.readexactly(int(headers["content-length"]))


async def read_100_continue(reader: asyncio.StreamReader) -> None:
    assert await asyncio.wait_for(reader.readline(), 5) == b"HTTP/1.1 100 Continue\r\n"
    assert await reader.readline() == b"\r\n"


async def read_last_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """A response that ends the connection: it says `Connection: close`, and the stream ends after it."""
    status, headers, body = await read_response(reader)
    assert headers["connection"] == "close"
    assert await asyncio.wait_for(reader.read(), 5) == b""
    return status, body


def post(path: str, body: bytes, extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{extra}\r\n").encode() + body


@on_session_loop
async def test_keep_alive_serves_several_requests_on_one_connection(connection):
    reader, writer = connection
    for index in range(3):
        writer.write(post("/v2/models/m%2Fx/infer?q=1", f"body {index}".encode(), "X-Test: hello\r\n"))
        status, headers, body = await read_response(reader)
        assert status == 200 and headers["x-answer"] == "yes" and "connection" not in headers
        assert json.loads(body) == {"method": "POST", "path": "/v2/models/m/x/infer", "body": f"body {index}",
                                    "header": "hello"}
        assert headers["content-type"] == "application/json" and "date" in headers


@on_session_loop
async def test_one_worker_answers_a_connection_until_it_closes(server, connection):
    reader, writer = connection
    workers = set()
    for index in range(3):
        writer.write(post("/x", f"body {index}".encode()))
        assert (await read_response(reader))[0] == 200
        (served,) = server.connections
        workers.add(served.worker)
        assert served.idle
    assert len(workers) == 1 and None not in workers  # kept between requests, not made per request
    worker = workers.pop()
    writer.close()
    await asyncio.wait_for(worker, 5)  # the client went away: the worker ends instead of waiting forever
    assert not server.connections


@on_session_loop
async def test_a_handler_may_answer_at_once_without_a_coroutine():
    server = HttpServer(lambda request: HttpResponse(200, request.path.encode(), "text/plain"), MAX_BODY)
    await server.start("127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        for path in ("/one", "/two"):
            writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            status, headers, body = await read_response(reader)
            assert (status, headers["content-type"], body) == (200, "text/plain", path.encode())
    finally:
        writer.close()
        await server.close(1.0)


def test_a_response_head_has_its_date_and_length_and_closes_only_when_asked():
    from plansmith_runtime.http_transport import CONNECTION_CLOSE, CONNECTION_PERSISTS, render_response

    response = HttpResponse(200, b"{}", headers=(("X-Answer", "yes"),))
    kept = render_response(response, CONNECTION_PERSISTS, b"Sun, 29 Nov 2026 22:00:00 GMT")
    assert kept == (b"HTTP/1.1 200 OK\r\nServer: plansmith\r\nContent-Type: application/json\r\nX-Answer: yes\r\n"
                    b"Date: Sun, 29 Nov 2026 22:00:00 GMT\r\nContent-Length: 2\r\n\r\n")
    closed = render_response(HttpResponse(404, b"not here"), CONNECTION_CLOSE, b"Sun, 29 Nov 2026 22:00:01 GMT")
    assert closed.startswith(b"HTTP/1.1 404 Not Found\r\n") and b"Connection: close\r\n" in closed
    assert closed.endswith(b"Date: Sun, 29 Nov 2026 22:00:01 GMT\r\nContent-Length: 8\r\n\r\n")


@on_session_loop
async def test_pipelined_requests_are_answered_in_order(connection):
    reader, writer = connection
    # the first request is the slowest: answers must still come in request order
    writer.write(b"".join(post(f"/sleep/{delay}", str(delay).encode()) for delay in (60, 0, 20)))
    bodies = [json.loads((await read_response(reader))[2])["body"] for _ in range(3)]
    assert bodies == ["60", "0", "20"]


@on_session_loop
async def test_expect_100_continue_is_answered_before_the_body(connection):
    reader, writer = connection
    writer.write(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
    await read_100_continue(reader)
    writer.write(b"hello")
    status, _, body = await read_response(reader)
    assert status == 200 and json.loads(body)["body"] == "hello"


@on_session_loop
async def test_chunked_request_body_reaches_the_handler_whole(connection):
    reader, writer = connection
    writer.write(b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    status, _, body = await read_response(reader)
    assert status == 200 and json.loads(body)["body"] == "hello world"


@pytest.mark.parametrize("request_bytes", [
    post("/x", b"y" * (MAX_BODY + 1)),
    b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + b"%x\r\n" % (MAX_BODY + 1) + b"y" * (MAX_BODY + 1)
    + b"\r\n0\r\n\r\n",
], ids=["content-length", "chunked"])
@on_session_loop
async def test_a_body_over_the_limit_gets_413_and_the_connection_closes(connection, request_bytes):
    reader, writer = connection
    writer.write(request_bytes)
    status, body = await read_last_response(reader)
    assert status == 413 and b"larger than 1024" in body


@on_session_loop
async def test_headers_over_the_limit_get_431_and_the_connection_closes(connection):
    reader, writer = connection
    writer.write(b"GET /x HTTP/1.1\r\nHost: x\r\n" + b"X-Filler: %s\r\n" % (b"y" * 1000) * 80 + b"\r\n")
    status, body = await read_last_response(reader)
    assert status == 431 and b"larger than 65536" in body


@on_session_loop
async def test_one_endless_header_line_gets_431_before_it_ends(connection):
    """httptools buffers a header until its line ends: the transport counts the reads instead."""
    reader, writer = connection
    writer.write(b"GET /x HTTP/1.1\r\nHost: x\r\nX-Filler: ")
    with contextlib.suppress(ConnectionResetError):  # the server answers and closes while this still writes
        for _ in range(40):  # 2.5 MB, never a line end
            writer.write(b"y" * (64 << 10))
            await writer.drain()
    status, headers, body = await read_response(reader)
    assert status == 431 and b"larger than 65536" in body and headers["connection"] == "close"


@pytest.mark.parametrize("extra", ["Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n",
                                   "Connection: keep-alive, Upgrade\r\nUpgrade: websocket\r\nExpect: 100-continue\r\n"],
                         ids=["h2c", "websocket"])
@on_session_loop
async def test_a_request_asking_to_upgrade_is_served_over_http_1_1_with_its_body(connection, extra):
    """As `curl --http2 http://...` asks: RFC 9110 lets a server ignore Upgrade, as Triton does. The
    body reaches the handler, the connection stays open, and a pipelined request after it is served."""
    reader, writer = connection
    writer.write(post("/x", b"hello", extra) + post("/y", b"after"))
    if "100-continue" in extra:
        await read_100_continue(reader)
    for path, sent in (("/x", "hello"), ("/y", "after")):
        status, headers, body = await read_response(reader)
        assert status == 200 and "upgrade" not in headers
        asked_keep_alive = path == "/x" and "keep-alive" in extra
        assert headers.get("connection") == ("keep-alive" if asked_keep_alive else None)  # never "Upgrade"
        assert json.loads(body) == {"method": "POST", "path": path, "body": sent, "header": None}
    writer.write(b"GET /z HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n")
    status, _, body = await read_response(reader)
    assert status == 200 and json.loads(body)["path"] == "/z"


@on_session_loop
async def test_a_head_request_gets_the_head_alone_and_the_next_response_stays_intact(connection):
    reader, writer = connection
    writer.write(b"HEAD /x HTTP/1.1\r\nHost: x\r\n\r\n" + post("/y", b"next"))
    status, headers = await read_head(reader)
    assert status == 200 and int(headers["content-length"]) > 0  # what a GET would have sent
    status, _, body = await read_response(reader)  # begins right after the head
    assert status == 200 and json.loads(body)["body"] == "next"


@pytest.mark.parametrize("encoding, compress", [("gzip", gzip.compress), ("deflate", zlib.compress)])
@on_session_loop
async def test_compressed_request_bodies_reach_the_handler_decoded(connection, encoding, compress):
    reader, writer = connection
    writer.write(post("/x", compress(b"squeezed " * 20), f"Content-Encoding: {encoding}\r\n"))
    status, headers, body = await read_response(reader)
    assert status == 200 and json.loads(body)["body"] == "squeezed " * 20


def test_the_handler_sees_the_percent_decoded_path_without_the_query_string():
    assert path_of(b"/v2/models/my%20model/ready?verbose=1") == "/v2/models/my model/ready"
    assert path_of(b"http://host:8000/v2/health/live") == "/v2/health/live"


def test_responses_are_compressed_only_in_an_encoding_the_client_accepts():
    response = HttpResponse(200, b"{}" * 100)
    assert accepted_encoding(None) is None and accepted_encoding("identity") is None
    assert accepted_encoding("gzip, deflate") == "gzip" and accepted_encoding("deflate") == "deflate"
    assert accepted_encoding("gzip;q=0, deflate;q=0.5") == "deflate" and accepted_encoding("gzip;q=0") is None
    compressed = compress_response(response, "gzip")
    assert dict(compressed.headers)["Content-Encoding"] == "gzip" and gzip.decompress(compressed.body) == response.body
    assert zlib.decompress(compress_response(response, "deflate").body) == response.body
    assert compress_response(response, None) is response


@pytest.mark.parametrize("body, encoding, status, message", [
    (b"whatever", "br", 415, b"not supported"),
    (b"not gzip at all", "gzip", 400, b"not valid gzip"),
    (gzip.compress(b"x" * 100)[:-12], "gzip", 400, b"truncated"),
    (gzip.compress(b"0" * (MAX_BODY + 1)), "gzip", 413, b"once decompressed"),
], ids=["unsupported", "corrupt", "truncated", "bomb"])
@on_session_loop
async def test_bad_compressed_bodies_get_a_clear_error(connection, body, encoding, status, message):
    reader, writer = connection
    writer.write(post("/x", body, f"Content-Encoding: {encoding}\r\n"))
    got, _, answer = await read_response(reader)
    assert got == status and message in answer


@on_session_loop
async def test_a_malformed_request_gets_400_and_the_server_keeps_serving(server):
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"NOT HTTP AT ALL\r\n\r\n")
    status, body = await read_last_response(reader)
    assert status == 400 and b"malformed HTTP request" in body
    writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(post("/x", b"ok"))
    assert (await read_response(reader))[0] == 200
    writer.close()


@on_session_loop
async def test_a_request_rejected_while_parsing_is_answered_after_the_requests_before_it(connection):
    reader, writer = connection
    writer.write(post("/sleep/200", b"first") + b"NOT HTTP AT ALL\r\n\r\n" + post("/x", b"never read"))
    status, _, body = await read_response(reader)
    assert status == 200 and json.loads(body)["body"] == "first"
    status, body = await read_last_response(reader)
    assert status == 400 and b"malformed HTTP request" in body


@on_session_loop
async def test_http_1_0_without_keep_alive_closes_after_the_response(connection):
    reader, writer = connection
    writer.write(b"GET /x HTTP/1.0\r\n\r\n")
    status, _ = await read_last_response(reader)
    assert status == 200


@on_session_loop
async def test_http_1_0_with_keep_alive_is_told_the_connection_persists_and_keeps_it(connection):
    """An HTTP/1.0 client keeps its connection only when the response says "Connection:
    keep-alive" (RFC 9112 section 9.3; ApacheBench's -k counts on it); one that did not ask, or an
    HTTP/1.1 client, gets no such header."""
    reader, writer = connection
    for body in (b"first", b"second"):
        writer.write(b"POST /x HTTP/1.0\r\nConnection: Keep-Alive\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        status, headers, answer = await read_response(reader)
        assert status == 200 and json.loads(answer)["body"] == body.decode()
        assert headers["connection"] == "keep-alive"
    writer.write(post("/x", b"over 1.1"))
    status, headers, _ = await read_response(reader)
    assert status == 200 and "connection" not in headers


@on_session_loop
async def test_a_failing_handler_answers_500_and_the_connection_keeps_serving(connection):
    reader, writer = connection
    writer.write(post("/fail", b""))
    status, _, body = await read_response(reader)
    assert status == 500 and json.loads(body) == {"error": "internal server error"}
    writer.write(post("/x", b"after"))
    assert json.loads((await read_response(reader))[2])["body"] == "after"


@on_session_loop
async def test_a_large_response_reaches_a_slow_reader_whole(server):
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port, limit=1 << 16)
    writer.write(b"GET /big/%d HTTP/1.1\r\nHost: x\r\n\r\n" % (8 << 20))
    await asyncio.sleep(0.2)  # the response fills the socket buffers: the server must wait, not drop
    status, _, body = await read_response(reader)
    assert status == 200 and len(body) == 8 << 20
    writer.write(post("/x", b"next"))
    assert json.loads((await read_response(reader))[2])["body"] == "next"
    writer.close()


@on_session_loop
async def test_a_client_that_does_not_read_holds_at_most_one_response_in_the_server(server):
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port, limit=1 << 16)
    size, count = 1 << 20, 24
    writer.write(b"".join(b"GET /big/%d HTTP/1.1\r\nHost: x\r\n\r\n" % size for _ in range(count)))
    await asyncio.sleep(0.5)  # the client reads nothing: the server must stop producing, not buffer them all
    (connection,) = server.connections
    assert connection.transport.get_write_buffer_size() <= 2 * size
    for _ in range(count):
        status, _, body = await read_response(reader)
        assert status == 200 and len(body) == size
    writer.close()


@on_session_loop
async def test_an_idle_keep_alive_connection_is_closed_after_the_timeout_a_busy_one_is_not():
    async with serving(echo, MAX_BODY, keep_alive_timeout=0.2) as server:
        idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", server.port)
        idle_writer.write(post("/x", b"once"))
        assert (await read_response(idle_reader))[0] == 200
        busy_reader, busy_writer = await asyncio.open_connection("127.0.0.1", server.port)
        busy_writer.write(post("/sleep/800", b"slow"))
        assert await asyncio.wait_for(idle_reader.read(), 2) == b""
        status, headers, body = await read_response(busy_reader)
        assert status == 200 and "connection" not in headers and json.loads(body)["body"] == "slow"
        stalled_reader, stalled_writer = await asyncio.open_connection("127.0.0.1", server.port)
        stalled_writer.write(post("/x", b"never all sent")[:-4])  # a client that stops half-way is idle too
        assert await asyncio.wait_for(stalled_reader.read(), 2) == b""
        for writer in (idle_writer, busy_writer, stalled_writer):
            writer.close()


@on_session_loop
async def test_close_finishes_in_flight_requests_and_closes_idle_connections():
    server = HttpServer(echo, MAX_BODY)
    await server.start("127.0.0.1", 0)
    port = server.port
    busy_reader, busy_writer = await asyncio.open_connection("127.0.0.1", port)
    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)
    idle_writer.write(post("/x", b"first"))
    assert (await read_response(idle_reader))[0] == 200
    busy_writer.write(post("/sleep/2000", b"in flight"))
    await asyncio.sleep(0.05)
    closing = asyncio.create_task(server.close(5.0))
    # the idle keep-alive connection is closed at once, while the busy one is still computing
    assert await asyncio.wait_for(idle_reader.read(), 1.0) == b""
    status, headers, body = await read_response(busy_reader)  # the accepted request still completes
    assert status == 200 and headers["connection"] == "close" and json.loads(body)["body"] == "in flight"
    await asyncio.wait_for(closing, 5)
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)
    busy_writer.close()
    idle_writer.close()


@on_session_loop
async def test_close_answers_a_request_that_began_to_arrive_before_it():
    """As Triton drains before it stops its endpoints: half a body in when the server starts closing,
    the rest after; the request is answered (and the connection then closed), not dropped."""
    async with serving(echo, MAX_BODY) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        request = post("/x", b"0123456789")
        writer.write(request[:-5])
        await writer.drain()
        await asyncio.sleep(0.05)
        closing = asyncio.create_task(server.close(5.0))
        await asyncio.sleep(0.05)
        assert not closing.done()
        writer.write(request[-5:])
        status, headers, body = await read_response(reader)
        assert status == 200 and headers["connection"] == "close" and json.loads(body)["body"] == "0123456789"
        await asyncio.wait_for(closing, 5)
        writer.close()


@on_session_loop
async def test_a_rejected_request_leaves_nothing_to_wait_for_at_close_and_no_write_after_its_end():
    """After a 413 the connection lingers: the start of a request read with the rejected one is not
    a request in progress (a closing server would wait out the linger), and an earlier request's
    answer, due once the connection's end was sent, is dropped, not written (the worker crashed)."""
    async with serving(echo, MAX_BODY) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(post("/big", b"x" * (MAX_BODY + 1)) + b"GET /next HTTP/1.1\r\nHost: x\r\n")
        assert (await read_response(reader))[0] == 413
        await asyncio.sleep(0.05)
        (lingering,) = server.connections
        assert lingering.idle
        writer.close()
    async with serving(echo, MAX_BODY) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(post("/sleep/300", b"first") + b"NOT HTTP AT ALL\r\n\r\n")
        await asyncio.sleep(0.1)
        (connection,) = server.connections
        worker = connection.worker
        started = time.monotonic()
        await server.close(0.05)  # the grace period ends with /sleep/300 still in its handler
        assert time.monotonic() - started < 1
        await asyncio.wait_for(worker, 2)  # ends without raising
        writer.close()


# Large bodies (DIRECT_BODY_BYTES and up) are received by the socket straight into their own buffer.

LARGE_MAX_BODY = 4 << 20


async def digest(request: HttpRequest) -> HttpResponse:
    """Answers with the body's length and sha256, and whether it came in a buffer of its own."""
    body = request.body
    document = {"path": request.path, "length": len(body), "sha256": hashlib.sha256(body).hexdigest(),
                "received_directly": isinstance(body, memoryview)}
    return HttpResponse(200, json.dumps(document).encode())


@pytest.fixture
async def large_server():
    async with serving(digest, LARGE_MAX_BODY) as http:
        yield http


def expected_digest(path: str, body: bytes, received_directly: bool) -> dict:
    return {"path": path, "length": len(body), "sha256": hashlib.sha256(body).hexdigest(),
            "received_directly": received_directly}


@pytest.mark.parametrize("piece", [None, 1000, 70_000], ids=["one-write", "1000-byte-writes", "70000-byte-writes"])
@on_session_loop
async def test_large_bodies_arrive_whole_with_the_requests_after_them(large_server, piece):
    reader, writer = await asyncio.open_connection("127.0.0.1", large_server.port)
    first, second, small = os.urandom(300_000), os.urandom(DIRECT_BODY_BYTES), b"small"
    stream = post("/first", first) + post("/second", second) + post("/small", small)
    if piece is None:  # pipelined: every request in one write
        writer.write(stream)
    else:  # in pieces that cut heads and bodies anywhere, each read on its own
        for start in range(0, len(stream), piece):
            writer.write(stream[start:start + piece])
            await writer.drain()
            await asyncio.sleep(0.001)
    answers = [json.loads((await read_response(reader))[2]) for _ in range(3)]
    assert answers == [expected_digest("/first", first, True), expected_digest("/second", second, True),
                       expected_digest("/small", small, False)]
    writer.close()


@on_session_loop
async def test_a_large_body_keeps_its_content_encoding_and_connection_close(large_server):
    reader, writer = await asyncio.open_connection("127.0.0.1", large_server.port)
    plain = os.urandom(200_000)  # incompressible: its gzip is as large, so it is received directly
    writer.write(post("/gzip", gzip.compress(plain), "Content-Encoding: gzip\r\n")
                 + post("/last", plain, "Connection: close\r\n"))
    assert json.loads((await read_response(reader))[2]) == expected_digest("/gzip", plain, False)  # decoded: bytes
    status, body = await read_last_response(reader)
    assert status == 200 and json.loads(body) == expected_digest("/last", plain, True)


@on_session_loop
async def test_a_client_gone_in_the_middle_of_a_large_body_leaves_the_server_serving(large_server):
    reader, writer = await asyncio.open_connection("127.0.0.1", large_server.port)
    body = os.urandom(500_000)
    writer.write(post("/cut", body)[:200_000])
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.close()
    await asyncio.sleep(0.05)
    assert not large_server.connections
    reader, writer = await asyncio.open_connection("127.0.0.1", large_server.port)
    writer.write(post("/whole", body))
    assert json.loads((await read_response(reader))[2]) == expected_digest("/whole", body, True)
    writer.close()


@on_session_loop
async def test_a_large_body_over_the_limit_gets_413_before_it_is_received(large_server):
    reader, writer = await asyncio.open_connection("127.0.0.1", large_server.port)
    writer.write(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (LARGE_MAX_BODY + 1))  # no body yet
    status, body = await read_last_response(reader)
    assert status == 413 and b"larger than" in body
