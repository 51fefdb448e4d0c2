"""Session-wide real services: a Kubernetes v1.20.2 control plane and an S3 endpoint, on loopback;
and an OTLP/HTTP endpoint that keeps the spans OpenTelemetry exporters send it.

Tests that use `control_plane` (or anything built on it) are marked `controlplane`, those that use
`s3_server` are marked `s3`, so `pytest -m "not controlplane"` runs the fast unit tests alone.
Tests that use `tritonserver` (a real Triton server binary, fetched with pip once) are marked
`tritonserver`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SERVICE_MARKERS = {"control_plane": "controlplane", "s3_server": "s3", "dev_cluster": "cluster",
                   "tritonserver": "tritonserver"}
# the dev cluster runs a control plane and S3 too: `-m "not controlplane and not s3"` skips it
IMPLIED_MARKERS = {"cluster": ("controlplane", "s3")}


def pytest_collection_modifyitems(items):
    for item in items:
        for fixture, marker in SERVICE_MARKERS.items():
            if fixture in getattr(item, "fixturenames", ()):
                for name in (marker, *IMPLIED_MARKERS.get(marker, ())):
                    item.add_marker(getattr(pytest.mark, name))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def tritonserver() -> Path:
    """A real tritonserver binary (Triton 2.51, the Python backend alone): bench/tritonserver_wheel.py
    fetches nvidia-pytriton's wheel once and caches it by version, for the benchmark and the tests."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tritonserver_wheel", REPO_ROOT / "bench" / "tritonserver_wheel.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.tritonserver_root() / "bin" / "tritonserver"


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory):
    from plansmith.devcluster.controlplane import ControlPlane

    plane = ControlPlane(tmp_path_factory.mktemp("control-plane")).start()
    yield plane
    plane.stop()


@pytest.fixture(scope="session")
def kube_client(control_plane):
    """A kubernetes.client.ApiClient authenticated as cluster admin."""
    from kubernetes import client, config

    api = config.new_client_from_config(config_file=str(control_plane.kubeconfig))
    yield api
    api.close()


@pytest.fixture(scope="session")
def inference_model_crd(kube_client) -> dict:
    """The InferenceModel CRD installed on the control plane, Established and served; its body."""
    import yaml
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    from plansmith.spec import API_GROUP, API_VERSION, PLURAL

    extensions = client.ApiextensionsV1Api(kube_client)
    body = yaml.safe_load((REPO_ROOT / "crds/inferencemodel.yaml").read_text())
    try:
        extensions.create_custom_resource_definition(body)
    except ApiException as error:
        assert error.status == 409, error
    name = body["metadata"]["name"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status = extensions.read_custom_resource_definition(name).status
        if any(c.type == "Established" and c.status == "True" for c in status.conditions or []):
            break
        time.sleep(0.2)
    else:
        pytest.fail("CRD never became Established")
    # the first requests after Established can race the discovery cache
    custom = client.CustomObjectsApi(kube_client)
    deadline = time.monotonic() + 30
    while True:
        try:
            custom.list_cluster_custom_object(API_GROUP, API_VERSION, PLURAL)
            return body
        except ApiException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    from plansmith.devcluster.s3 import S3Server

    server = S3Server(tmp_path_factory.mktemp("s3")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def dev_cluster():
    """The local cluster with real pods (`plansmith dev-cluster up`): reused when already up (and
    then left running), otherwise started for this session and stopped at its end."""
    from plansmith.devcluster import cluster

    running = cluster.status()
    started = running is None
    dev = running or cluster.up(say=lambda line: print(line, flush=True))
    if running:
        cluster.refresh_images(dev)  # the plansmith images follow the working tree
    yield dev
    if started:
        cluster.down(say=lambda _: None)


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
    receiver does. `reachable` False answers 503, as a collector that is down or overloaded would.
    On `host` (loopback by default; the node's address for the local cluster's pods)."""

    def __init__(self, host: str = "127.0.0.1") -> None:
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

        self._server = ThreadingHTTPServer((host, 0), Receiver)
        self.url = f"http://{host}:{self._server.server_address[1]}/v1/traces"
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
def start_otlp_collector():
    """Starts OtlpCollectors (on loopback, or the host given), closed after the test."""
    started: list[OtlpCollector] = []

    def start(host: str = "127.0.0.1") -> OtlpCollector:
        started.append(OtlpCollector(host))
        return started[-1]

    yield start
    for collector in started:
        collector.close()


@pytest.fixture
def otlp_collector(start_otlp_collector) -> OtlpCollector:
    return start_otlp_collector()
