"""Engines built by the real builder, and `plansmith serve` processes on free loopback ports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from plansmith.devcluster.processes import free_port

PLANSMITH = str(Path(sys.executable).with_name("plansmith"))


@dataclass
class BuiltEngine:
    model: object  # plansmith.testmodels.TestModel
    manifest_uri: str
    engine_path: Path  # the engine artifact in the file:// store

    def session(self):
        import onnxruntime as ort

        return ort.InferenceSession(str(self.engine_path), providers=["CPUExecutionProvider"])


def build_engine(kind: str, workdir: Path, storage_uri: str, endpoint: str | None = None) -> tuple[object, str]:
    """Generate a test model and build its engine with the real builder; (TestModel, manifest URI)."""
    from plansmith import testmodels
    from plansmith.validation import parse_spec
    from plansmith_builder.build import BuildRequest, run_build

    info = getattr(testmodels, kind)(workdir / f"{kind}.onnx")
    spec = parse_spec({"model": {"uri": f"file://{info.path}", "inputs": info.spec_inputs()},
                       "build": {"backend": "onnxruntime", "precision": "fp32"},
                       "storage": {"uri": storage_uri, **({"endpoint": endpoint} if endpoint else {})}})
    result = run_build(BuildRequest(spec=spec, workdir=workdir / f"build-{kind}"))
    assert result.status in ("built", "hit"), result.to_json()
    return info, result.manifest_uri


@pytest.fixture(scope="session")
def engines(tmp_path_factory) -> dict[str, BuiltEngine]:
    workdir = tmp_path_factory.mktemp("engines")
    store = workdir / "store"
    built = {}
    for kind in ("mlp", "small_cnn"):
        info, uri = build_engine(kind, workdir, f"file://{store}")
        folder = Path(uri.removeprefix("file://")).parent
        built[kind] = BuiltEngine(info, uri, folder / "model.onnx")
    return built


class ServerProcess:
    """`plansmith serve` in its own process; stopped by SIGTERM to its pid."""

    def __init__(self, args: list[str], log_path: Path, env: dict | None = None) -> None:
        self.args, self.log_path, self.env = args, log_path, {**os.environ, **(env or {})}
        self.launches = 0
        self._launch()

    def _launch(self) -> None:
        self.launches += 1
        self.http_port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
        command = [PLANSMITH, "serve", *self.args, "--host", "127.0.0.1", "--http-port", str(self.http_port),
                   "--grpc-port", str(self.grpc_port), "--metrics-port", str(self.metrics_port)]
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=self.env)

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def get(self, path: str, port: int | None = None) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port or self.http_port}{path}", timeout=5) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def metrics(self) -> dict[str, float]:
        _, body = self.get("/metrics", self.metrics_port)
        values = {}
        for line in body.decode().splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        return values

    def wait_live(self, timeout: float = 60) -> None:
        self._wait(lambda: self.get("/v2/health/live")[0] == 200, timeout, "live")

    def wait_ready(self, timeout: float = 60) -> "ServerProcess":
        self._wait(lambda: self.get("/v2/health/ready")[0] == 200, timeout, "ready")
        return self

    def _wait(self, check, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                if "cannot listen" in self.log() and self.launches < 3:
                    # another process on this shared machine took a "free" port first: new ports
                    self._log.close()
                    self._launch()
                    continue
                raise AssertionError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if check():
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"server not {what} after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


@pytest.fixture
def start_server(tmp_path):
    started: list[ServerProcess] = []

    def start(*args: str, env: dict | None = None) -> ServerProcess:
        server = ServerProcess(list(args), tmp_path / f"server-{len(started)}.log", env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.terminate()


@pytest.fixture(scope="module")
def module_server(tmp_path_factory):
    """A module-scoped server factory (servers shared by the tests of one module)."""
    started: list[ServerProcess] = []
    workdir = tmp_path_factory.mktemp("servers")

    def start(*args: str) -> ServerProcess:
        server = ServerProcess(list(args), workdir / f"server-{len(started)}.log")
        started.append(server)
        return server

    yield start
    for server in started:
        server.terminate()


@dataclass(frozen=True)
class CollectedSpan:
    """A span as an OpenTelemetry collector received it (ids in hex, as collectors print them)."""
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str  # "" for a root span
    trace_state: str  # W3C tracestate, the caller's carried on
    kind: int  # opentelemetry.proto's Span.SpanKind: 2 is SERVER
    start_ns: int
    end_ns: int
    events: tuple[tuple[str, int], ...]
    attributes: dict
    resource: dict
    scope: str


def otlp_value(value) -> object:
    return getattr(value, value.WhichOneof("value"))


class OtlpCollector:
    """A real OTLP/HTTP endpoint (POST /v1/traces, protobuf) on a loopback port: it decodes what
    exporters send with the OpenTelemetry protocol's own messages and keeps the spans. No collector
    binary is installable here; this speaks the same protocol an OpenTelemetry Collector's otlp
    receiver does. `reachable` False answers 503, as a collector that is down or overloaded would."""

    def __init__(self) -> None:
        import gzip
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest, ExportTraceServiceResponse)

        self.spans: list[CollectedSpan] = []
        self.requests = 0
        self.reachable = True
        self._lock = threading.Lock()
        collector = self

        class Receiver(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802  (http.server's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                with collector._lock:
                    collector.requests += 1
                if self.path != "/v1/traces" or not collector.reachable:
                    self.send_response(404 if collector.reachable else 503)
                    self.end_headers()
                    return
                collector._keep(ExportTraceServiceRequest.FromString(body))
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1/traces"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _keep(self, request) -> None:
        received = []
        for resource_spans in request.resource_spans:
            resource = {item.key: otlp_value(item.value) for item in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    received.append(CollectedSpan(
                        span.name, span.trace_id.hex(), span.span_id.hex(), span.parent_span_id.hex(), span.trace_state,
                        span.kind,
                        span.start_time_unix_nano, span.end_time_unix_nano,
                        tuple((event.name, event.time_unix_nano) for event in span.events),
                        {item.key: otlp_value(item.value) for item in span.attributes}, resource,
                        scope_spans.scope.name))
        with self._lock:
            self.spans.extend(received)

    def wait_for(self, count: int, timeout: float = 20) -> list[CollectedSpan]:
        """The spans once at least `count` have arrived (AssertionError after `timeout` seconds)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.spans) >= count:
                    return list(self.spans)
            time.sleep(0.02)
        raise AssertionError(f"{len(self.spans)} spans reached the collector in {timeout}s, expected {count}")

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def otlp_collector():
    collector = OtlpCollector()
    yield collector
    collector.close()
