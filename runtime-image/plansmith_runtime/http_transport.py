"""HTTP/1.1 server transport: an asyncio Protocol around httptools' parser (llhttp, the parser
uvicorn uses) that hands whole requests to a handler (answering at once or through a coroutine) and
writes the responses in order. A large request body (an image) is received straight into its own
buffer rather than through the parser.

Why not aiohttp's web server, which the runtime used before: on the 2-core machine its
per-request machinery (Request and Response objects, router, middlewares, StreamWriter) took
about 70 us of the event loop's CPU per request, more than half the server's CPU for a model whose
compute is 10 us (bench/serve.py, MLP), and the loop's CPU is what bounds an overhead-dominated
model's throughput. This keeps only what the KServe v2 endpoints need: keep-alive, pipelining,
Content-Length and chunked request bodies, `Expect: 100-continue`, gzip/deflate request bodies
(tritonclient's request_compression_algorithm; `compress_response` is the handlers' side), size
limits, and a graceful close. Parsing HTTP stays in the library.
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections import deque
from functools import lru_cache
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from typing import Awaitable, Callable, NamedTuple
from urllib.parse import unquote

import httptools
import numpy as np
import orjson

log = logging.getLogger(__name__)

# Requests read ahead on one connection (pipelining) before the connection stops reading.
PIPELINE_LIMIT = 16
# The request line and headers together (aiohttp allows 8 KiB a line; Triton's clients send < 1 KiB).
MAX_HEAD_BYTES = 64 << 10
# After answering a request it rejected while the client may still be sending (413, 431, 400), the
# server stops writing and reads and drops what still comes, this long at most, before it closes:
# closing a socket with unread bytes sends a reset, and the client's TCP stack may then drop the
# error response it had not read yet (nginx's lingering close, 5 s there).
LINGER_SECONDS = 2.0
# An idle keep-alive connection is closed after this long (nginx's and aiohttp's default).
KEEP_ALIVE_TIMEOUT_SECONDS = 75.0
# Bytes read from a socket at a time into the server's read buffer, and fed to the parser from there.
READ_BUFFER_BYTES = 64 << 10
# A body of at least this many bytes with a Content-Length (and over gRPC, a DATA frame's payload) is
# received by the socket straight into a buffer of its own: otherwise a 600 KB image is copied three
# times on the event loop (into a bytes object per read, into the parser's body chunks, into one
# joined body), 28% of the loop thread's time serving the 224x224 CNN (perf). Not below the read
# buffer's size: a body this large cannot end in the read that brought its head, so the parser
# never sees the bytes after it.
DIRECT_BODY_BYTES = READ_BUFFER_BYTES


def receive_buffer(size: int) -> memoryview:
    """A buffer the socket reads `size` bytes into, uninitialized: a bytearray's zero fill was 16% of
    the event loop thread's time serving the 224x224 CNN (perf)."""
    return memoryview(np.empty(size, np.uint8))


@dataclass(slots=True)
class HttpRequest:
    method: str
    path: str  # percent-decoded, without the query string
    headers: dict[str, str]  # lower-case names
    body: bytes | memoryview  # a memoryview of its own buffer when received directly (DIRECT_BODY_BYTES or more)
    receive_started_ns: int = 0  # time.monotonic_ns() when its first byte was parsed
    received_ns: int = 0  # ... and when its last byte was


class HttpResponse(NamedTuple):  # immutable, and made in a third of a frozen dataclass's time
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    # called once the response is written (with time.monotonic_ns() before and after the write) or
    # cannot be, the client being gone (with None, None)
    on_sent: Callable[[int | None, int | None], None] | None = None


# A handler answers at once, or returns an awaitable of the answer (a coroutine, for a request that
# waits, like an inference): endpoints that answer at once then cost no coroutine.
Handler = Callable[[HttpRequest], "HttpResponse | Awaitable[HttpResponse]"]


@lru_cache(maxsize=None)
def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


@lru_cache(maxsize=1024)  # clients repeat a handful of request targets
def path_of(target: bytes) -> str:
    """The percent-decoded path of a request target, without its query string."""
    return unquote(httptools.parse_url(target).path.decode("latin-1"))


@lru_cache(maxsize=512)  # clients send a handful of header names
def header_name(raw: bytes) -> str:
    """A header's name as the handlers look it up: lower case."""
    return raw.decode("latin-1").lower()


@lru_cache(maxsize=64)
def method_name(raw: bytes) -> str:
    return raw.decode("latin-1")


class _Clock:
    """RFC 9110 Date header value, formatted once a second."""

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def date(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second, self._value = now, formatdate(now, usegmt=True).encode()
        return self._value


class BodyError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# zlib window bits per Content-Encoding: gzip framing, and zlib framing for "deflate" (RFC 9110)
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def decode_body(body: bytes, content_encoding: str | None, limit: int) -> bytes:
    """The request body with its Content-Encoding undone, at most `limit` bytes once decoded."""
    encoding = (content_encoding or "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding not in _WBITS:
        raise BodyError(415, f"Content-Encoding {content_encoding!r} is not supported (gzip, deflate)")
    decompressor = zlib.decompressobj(_WBITS[encoding])
    try:
        decoded = decompressor.decompress(body, limit + 1)
    except zlib.error as error:
        raise BodyError(400, f"request body is not valid {encoding}: {error}") from None
    if len(decoded) > limit:
        raise BodyError(413, f"request body is larger than {limit} bytes once decompressed")
    if not decompressor.eof:
        raise BodyError(400, f"request body is truncated {encoding}")
    return decoded


def accepted_encoding(accept_encoding: str | None) -> str | None:
    """gzip or deflate when the client asks for it (a q of 0 refuses), else None: no compression."""
    if not accept_encoding:
        return None
    wanted = {}
    for item in accept_encoding.split(","):
        name, _, parameters = item.strip().lower().partition(";")
        quality = 1.0
        if parameters.strip().startswith("q="):
            try:
                quality = float(parameters.strip()[2:])
            except ValueError:
                quality = 0.0
        wanted[name.strip()] = quality
    for name in ("gzip", "deflate"):
        if wanted.get(name, 0.0) > 0:
            return name
    return None


def compress_response(response: HttpResponse, encoding: str | None) -> HttpResponse:
    if encoding is None or not response.body:
        return response
    compressor = zlib.compressobj(wbits=_WBITS[encoding])
    body = compressor.compress(response.body) + compressor.flush()
    return HttpResponse(response.status, body, response.content_type, (*response.headers, ("Content-Encoding", encoding)))


# What a response's Connection header says: nothing (HTTP/1.1's connections persist unless told),
# that the server closes the connection, or that it keeps it (RFC 9112 section 9.3: an HTTP/1.0
# client that asked for keep-alive keeps the connection only when the response says so).
CONNECTION_PERSISTS = b""
CONNECTION_CLOSE = b"close"
CONNECTION_KEEP_ALIVE = b"keep-alive"


def connection_option(keep_alive: bool, request: HttpRequest | HttpResponse) -> bytes:
    """The Connection header a response to `request` carries (a rejection is answered and closed)."""
    if not keep_alive:
        return CONNECTION_CLOSE
    asked = request.headers.get("connection") if type(request) is HttpRequest else None
    if asked is not None and "keep-alive" in asked.lower():
        return CONNECTION_KEEP_ALIVE
    return CONNECTION_PERSISTS


def render_response(response: HttpResponse, connection: bytes, date: bytes, server: bytes = b"plansmith") -> bytes:
    """The status line and headers of a response (the body follows them on the wire); `connection`
    is what connection_option says of it."""
    head = _response_head(response.status, response.content_type, response.headers, connection, server)
    return b"%sDate: %s\r\nContent-Length: %d\r\n\r\n" % (head, date, len(response.body))


@lru_cache(maxsize=256)  # responses repeat a few statuses, content types and headers: made once each
def _response_head(status: int, content_type: str, headers: tuple[tuple[str, str], ...], connection: bytes,
                   server: bytes) -> bytes:
    """Every line of a response's head but its Date and Content-Length, each ending in CRLF."""
    lines = [b"HTTP/1.1 %d %s" % (status, _reason(status).encode()), b"Server: " + server,
             b"Content-Type: " + content_type.encode("latin-1")]
    lines.extend(f"{name}: {value}".encode("latin-1") for name, value in headers)
    if connection:
        lines.append(b"Connection: " + connection)
    return b"\r\n".join(lines) + b"\r\n"


def json_response(payload: object, status: int = 200, headers: tuple[tuple[str, str], ...] = ()) -> HttpResponse:
    return HttpResponse(status, orjson.dumps(payload), headers=headers)


def error_response(status: int, message: str, headers: tuple[tuple[str, str], ...] = ()) -> HttpResponse:
    """Triton's error body: {"error": message}."""
    return json_response({"error": message}, status, headers)


class HttpConnection(asyncio.BufferedProtocol):
    """One client connection: parses requests as bytes arrive, runs them one at a time in
    arrival order (HTTP/1.1 pipelining answers in order), and writes each response.

    A BufferedProtocol: the loop reads into the buffer `get_buffer` gives. That is the server's read
    buffer, fed to the parser, except while a large body is arriving (`_direct_body`): then it is
    the rest of that body's own buffer."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        # parsed and not yet answered, in arrival order: a request and whether to keep the connection
        # alive after it, or the error answer to a request that was rejected while parsing (then close)
        self.pending: deque[tuple[HttpRequest | HttpResponse, bool]] = deque()
        # Answers this connection's requests in order. It lives as long as the connection and waits on
        # `_wakeup` while nothing is pending: creating a task per request cost ~2.4 us of the loop
        # (asyncio registers every task in a WeakSet), a tenth of the request path for a small model.
        self.worker: asyncio.Task | None = None
        self._wakeup: asyncio.Future | None = None
        self.answering = False  # a request has been taken from `pending` and is not answered yet
        self.writable = asyncio.Event()
        self.writable.set()
        self.reading_paused = False
        self.closing = False
        self.failed = False  # a request was rejected while parsing: nothing after it is read
        self.last_active = time.monotonic()
        self._direct_body: memoryview | None = None  # a large body being received into its own buffer
        self._direct_received = 0
        self._direct_keep_alive = True
        self._lingering = False  # answered a rejected request, dropping what the client still sends
        self._receiving = False  # a request's head or body has begun to arrive and is not whole yet
        self._method = "GET"
        self._reset()

    def _reset(self) -> None:
        self._began_ns = time.monotonic_ns()
        self._url = b""
        self._head_size = 0
        self._head_complete = False
        self._head_bytes_before_parsed = 0  # reads that all went into this head, parsed or not
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._body_size = 0

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.server.connections.discard(self)
        self.writable.set()  # a worker waiting to write gives up instead of waiting forever
        self._wake_worker()

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._direct_body is not None and not self._lingering:
            return self._direct_body[self._direct_received:]
        return self.server.read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.last_active = time.monotonic()
        if self._lingering:
            return
        if self._direct_body is None:
            self._feed(self.server.read_buffer[:nbytes])
            return
        self._direct_received += nbytes
        if self._direct_received == len(self._direct_body):
            body, self._direct_body = self._direct_body, None
            # the parser still waits for this body's bytes: the next request gets a fresh one
            self.parser = httptools.HttpRequestParser(self)
            self._complete(body, self._direct_keep_alive)

    def _feed(self, data: bytes | memoryview) -> None:
        message = self._began_ns
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._ignore_upgrade(bytes(data[upgrade.args[0]:]))
        except httptools.HttpParserError as error:
            self._fail(400, f"malformed HTTP request: {error}")
        else:
            # httptools hands a header over only once its line ends, buffering it until then: a head
            # still unfinished after a whole read counts that read (MAX_HEAD_BYTES bounds it, give or
            # take the read it began in), so one endless header line cannot grow without bound
            if not self._head_complete and self._began_ns == message and not self.failed:
                self._head_bytes_before_parsed += len(data)
                if self._head_bytes_before_parsed > MAX_HEAD_BYTES:
                    self._head_too_large()

    def _ignore_upgrade(self, rest: bytes) -> None:
        """A request that asks to switch protocols (`Upgrade: h2c`, as `curl --http2` sends) is served
        over HTTP/1.1, ignoring the header as RFC 9110 section 7.8 lets a server. httptools stops at
        the end of such a request's head, its body unread: the head is parsed again without the
        upgrade, followed by the bytes after it (the body, and any pipelined requests)."""
        if self.failed:
            return
        if self._method == "CONNECT":
            self._fail(400, "CONNECT is not supported")
            return
        dropped = {"upgrade", "http2-settings", "expect"}  # expect: a 100 Continue was already sent
        connection = [token.strip() for token in self._headers.get("connection", "").split(",")
                      if token.strip() and token.strip().lower() not in dropped]
        head = [f"{self._method} {self._url.decode('latin-1')} HTTP/{self.parser.get_http_version()}"]
        head.extend(f"{name}: {value}" for name, value in self._headers.items() if name not in dropped | {"connection"})
        if connection:
            head.append(f"connection: {', '.join(connection)}")
        self.parser = httptools.HttpRequestParser(self)
        self._feed("\r\n".join(head).encode("latin-1") + b"\r\n\r\n" + rest)

    # httptools callbacks

    def on_message_begin(self) -> None:
        self._reset()
        self._receiving = not self.failed  # after a rejected request nothing more is answered

    # The callbacks below run once per header and request: the head's size is counted inline and
    # header names are decoded through a cache (a method call and a decode-and-lower per header
    # were a third of the parsing's cost for a small request).

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_size += len(url)
        if self._head_size > MAX_HEAD_BYTES:
            self._head_too_large()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value)
        if self._head_size > MAX_HEAD_BYTES:
            self._head_too_large()
        self._headers[header_name(name)] = value.decode("latin-1")

    def _head_too_large(self) -> None:
        self._fail(431, f"request line and headers are larger than {MAX_HEAD_BYTES} bytes")

    def on_headers_complete(self) -> None:
        self._head_complete = True
        if self.failed:
            return
        self._method = method_name(self.parser.get_method())
        declared = self._headers.get("content-length")
        length = int(declared) if declared is not None and declared.isdigit() else None
        if length is not None and length > self.server.max_body_bytes:
            self._fail(413, f"request body of {declared} bytes is larger than {self.server.max_body_bytes}")
            return
        expect = self._headers.get("expect")
        if expect is not None and expect.lower() == "100-continue" and self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if (length is not None and length >= DIRECT_BODY_BYTES and "transfer-encoding" not in self._headers
                and not self.parser.should_upgrade()):
            self._direct_body, self._direct_received = receive_buffer(length), 0
            self._direct_keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        if self.failed:
            return
        if self._direct_body is not None:  # the body's first bytes, read with its head
            self._direct_body[self._direct_received:self._direct_received + len(body)] = body
            self._direct_received += len(body)
            return
        self._body_size += len(body)
        if self._body_size > self.server.max_body_bytes:  # chunked bodies give no length up front
            self._fail(413, f"request body is larger than {self.server.max_body_bytes} bytes")
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self.failed or self.parser.should_upgrade():  # an upgrade's body is still unread: _ignore_upgrade
            return
        self._complete(self._body[0] if len(self._body) == 1 else b"".join(self._body), self.parser.should_keep_alive())

    def _complete(self, body: bytes | memoryview, keep_alive: bool) -> None:
        """Hand a whole request to the worker (its head parsed, its body received)."""
        self._receiving = False
        content_encoding = self._headers.get("content-encoding")
        if content_encoding is not None:
            try:
                body = decode_body(body, content_encoding, self.server.max_body_bytes)
            except BodyError as error:
                self._fail(error.status, str(error))
                return
        try:
            path = path_of(self._url)
        except httptools.HttpParserInvalidURLError:
            self._fail(400, "malformed request target")
            return
        request = HttpRequest(self._method, path, self._headers, body, self._began_ns, time.monotonic_ns())
        self._enqueue(request, keep_alive)

    def _enqueue(self, item: HttpRequest | HttpResponse, keep_alive: bool) -> None:
        self.pending.append((item, keep_alive))
        if (len(self.pending) >= PIPELINE_LIMIT or self.failed) and self.transport is not None and not self.reading_paused:
            self.transport.pause_reading()
            self.reading_paused = True
        if self.worker is None:
            self.worker = asyncio.get_running_loop().create_task(self._answer_pending())
        else:
            self._wake_worker()

    def _wake_worker(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    # answering

    async def _answer_pending(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while not self.closing:
                if not self.pending:
                    if self.server.closing:
                        self._close()
                        return
                    self._wakeup = loop.create_future()
                    await self._wakeup  # a request arrived, or the connection is closing
                    self._wakeup = None
                    continue
                item, keep_alive = self.pending.popleft()
                self.answering = True
                if (self.reading_paused and not self.failed and len(self.pending) < PIPELINE_LIMIT // 2
                        and self.transport is not None):
                    self.transport.resume_reading()
                    self.reading_paused = False
                if isinstance(item, HttpResponse):  # the answer to a request rejected while parsing
                    response = item
                else:
                    try:
                        answer = self.server.handler(item)
                        response = answer if isinstance(answer, HttpResponse) else await answer
                    except Exception:  # a handler bug answers 500 and the connection keeps serving
                        log.exception("HTTP handler failed", extra={"method": item.method, "path": item.path})
                        response = error_response(500, "internal server error")
                keep_alive = keep_alive and not self.server.closing
                if not self.writable.is_set():
                    await self.writable.wait()  # the client reads slowly: wait for the buffer to drain
                self._write(response, connection_option(keep_alive, item),
                            head_only=isinstance(item, HttpRequest) and item.method == "HEAD")
                self.answering = False
                if not keep_alive:
                    self._close()
                    return
        finally:
            self.worker = None
            self.answering = False
            if self.server.closing and not self.pending:
                self._close()

    def _write(self, response: HttpResponse, connection: bytes, head_only: bool = False) -> None:
        """Write a response; to a HEAD request without its body (RFC 9110 section 9.3.2: it would be
        read as the start of the next response), its Content-Length kept."""
        on_sent = response.on_sent
        # the client went away, or the connection lingers after a rejection (its end already sent)
        if self.transport is None or self.transport.is_closing() or self._lingering:
            if on_sent is not None:
                on_sent(None, None)
            return
        started = time.monotonic_ns() if on_sent is not None else 0
        head = render_response(response, connection, self.server.clock.date())
        self.transport.write(head if head_only else head + response.body)
        self.last_active = time.monotonic()
        if on_sent is not None:
            on_sent(started, time.monotonic_ns())

    def _fail(self, status: int, message: str) -> None:
        """Answer a request the parser or the limits reject, after the requests before it, then close:
        the rest of the stream cannot be trusted, so nothing more is read."""
        if self.failed:
            return
        self.failed = True
        self._receiving = False
        self._enqueue(error_response(status, message), False)

    def _close(self) -> None:
        self.closing = True
        transport = self.transport
        if transport is not None and not transport.is_closing():
            if self.failed and not self._lingering and transport.can_write_eof():
                self._linger(transport)
            else:
                transport.close()
        self._wake_worker()

    def _linger(self, transport: asyncio.Transport) -> None:
        """Close after a rejected request without resetting the connection (LINGER_SECONDS): send
        the end of the stream once the error response is out, drop what the client still sends,
        and close when it closes its side or the time is up."""
        self._lingering = True
        transport.write_eof()
        if self.reading_paused:
            transport.resume_reading()
            self.reading_paused = False
        asyncio.get_running_loop().call_later(LINGER_SECONDS, transport.close)

    @property
    def idle(self) -> bool:
        """No request in progress: none arriving, none waiting for its answer. A closing server
        waits for a request that began to arrive before it closed, and answers it."""
        return not self.answering and not self.pending and not self._receiving

    def close_when_idle(self) -> None:
        if self.idle:
            self._close()


async def wait_until_idle(connections: set, grace_seconds: float) -> None:
    """Until no connection has a request in progress (each has an `idle` property), or the grace
    period is over: a closing server's wait for the requests it accepted (HTTP and gRPC alike)."""
    deadline = time.monotonic() + grace_seconds
    while any(not connection.idle for connection in connections) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


class HttpServer:
    """Listens and serves `handler`; `close` stops accepting, lets the requests it accepted
    finish (bounded by a grace period) and closes every connection."""

    def __init__(self, handler: Handler, max_body_bytes: int,
                 keep_alive_timeout: float = KEEP_ALIVE_TIMEOUT_SECONDS) -> None:
        self.handler = handler
        self.max_body_bytes = max_body_bytes
        self.keep_alive_timeout = keep_alive_timeout
        self.connections: set[HttpConnection] = set()
        # every connection reads into this one (a read is fed to the parser before the next begins)
        self.read_buffer = memoryview(bytearray(READ_BUFFER_BYTES))
        self.clock = _Clock()
        self.closing = False
        self._server: asyncio.base_events.Server | None = None
        self._sweeper: asyncio.Task | None = None

    async def start(self, host: str, port: int, backlog: int = 2048) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: HttpConnection(self), host, port, backlog=backlog,
                                                reuse_address=True)
        self._sweeper = loop.create_task(self._close_idle_connections())

    async def _close_idle_connections(self) -> None:
        while True:
            await asyncio.sleep(self.keep_alive_timeout / 4)
            cutoff = time.monotonic() - self.keep_alive_timeout
            for connection in list(self.connections):
                # a request that stopped arriving half-way counts as idle here: the client stalled
                if not connection.answering and not connection.pending and connection.last_active < cutoff:
                    connection._close()

    @property
    def port(self) -> int:
        assert self._server is not None and self._server.sockets
        return self._server.sockets[0].getsockname()[1]

    async def close(self, grace_seconds: float) -> None:
        self.closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            connection.close_when_idle()  # busy ones close after their current response (Connection: close)
        await wait_until_idle(self.connections, grace_seconds)
        for connection in list(self.connections):
            connection._close()
        if self._server is not None:
            await self._server.wait_closed()
