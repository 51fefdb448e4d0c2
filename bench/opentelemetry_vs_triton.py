"""Triton's OpenTelemetry trace mode, side by side: a real Triton Inference Server (tritonserver 2.51
from nvidia-pytriton's wheel, bench/triton_reference.py) and `plansmith serve`, started with the
same --trace-config entries, sent the same requests by tritonclient (one over HTTP with a W3C
traceparent, one over gRPC without), export their spans to one OTLP/HTTP receiver here. It prints
what each server sent, as span trees (name, kind, parent, event names, attribute names and value
types), the trace settings each reads back, and every difference; it exits 1 when the span trees
differ.

    .venv/bin/python bench/opentelemetry_vs_triton.py

Not a speed benchmark: a check of the claim that the mode behaves as Triton's, kept here because
it needs Triton's binary, which the tests do not download. About a minute once Triton's wheel is
cached (bench/serve.py --triton-reference caches it).
"""

from __future__ import annotations

import base64
import json
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve as serve_bench  # noqa: E402  (builds the generated MLP's engine; plansmith's server)
import triton_reference  # noqa: E402

from plansmith.devcluster.processes import free_port  # noqa: E402

CLIENT_TRACE_ID, CLIENT_SPAN_ID = "0af7651916cd43dd8448eb211c12666c", "b7ad6b7169242424"
TRACEPARENT = f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01"


class Receiver:
    """Takes OTLP/HTTP exports in protobuf (the Python SDK's) or JSON (opentelemetry-cpp's, Triton's)
    and keeps their spans in OTLP's JSON form, ids in hex."""

    def __init__(self) -> None:
        from google.protobuf import json_format
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        self.exports: list[tuple[str, dict]] = []  # (content type, the request as OTLP JSON)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802  (http.server's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                content_type = self.headers.get("Content-Type", "")
                if content_type.startswith("application/json"):
                    document = json.loads(body)
                else:
                    document = json_format.MessageToDict(ExportTraceServiceRequest.FromString(body),
                                                         use_integers_for_enums=True)
                    for span in spans_of(document):  # protobuf's JSON mapping writes bytes in base64
                        for key in ("traceId", "spanId", "parentSpanId"):
                            span[key] = base64.b64decode(span.get(key, "")).hex()
                receiver.exports.append((content_type, document))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def spans(self) -> list[dict]:
        return [span for _, document in self.exports for span in spans_of(document)]


def spans_of(document: dict) -> list[dict]:
    return [span for resource in document.get("resourceSpans", []) for scope in resource.get("scopeSpans", [])
            for span in scope.get("spans", [])]


def tree(spans: list[dict], trace_id: str) -> list[str]:
    """One trace's spans, children under their parents: name, kind, the parent outside the trace
    (the client's span, or none), event names and attribute names with their value types."""
    inside = [span for span in spans if span["traceId"] == trace_id]
    ids = {span["spanId"] for span in inside}
    lines: list[str] = []

    def add(span: dict, depth: int) -> None:
        attributes = {item["key"]: next(iter(item["value"])) for item in span.get("attributes", [])}
        parent = "" if depth else f" parent={span.get('parentSpanId') or '-'}"
        lines.append(f"{'  ' * depth}{span['name']} kind={span.get('kind')}{parent} "
                     f"events={[event['name'] for event in span.get('events', [])]} attributes={attributes}")
        for child in inside:
            if child.get("parentSpanId") == span["spanId"]:
                add(child, depth + 1)

    for root in inside:
        if root.get("parentSpanId", "") not in ids:
            add(root, 0)
    return lines


def drive(http_port: int, grpc_port: int, input_name: str, array) -> dict:
    http = httpclient.InferenceServerClient(f"127.0.0.1:{http_port}")
    rpc = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    over_http = httpclient.InferInput(input_name, list(array.shape), "FP32")
    over_http.set_data_from_numpy(array)
    over_grpc = grpcclient.InferInput(input_name, list(array.shape), "FP32")
    over_grpc.set_data_from_numpy(array)
    http.infer("model", [over_http], request_id="over-http", headers={"traceparent": TRACEPARENT})
    rpc.infer("model", [over_grpc], request_id="over-grpc")
    return http.get_trace_settings()


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="plansmith-otel-vs-triton-"))
    manifest_uri, engine, input_name, array = serve_bench.build("mlp", workdir)
    results: dict[str, tuple[dict, dict[str, list[str]], set[str]]] = {}
    receiver = Receiver()  # one for both, in turn: the url they read back is the same
    for name in ("triton", "plansmith"):
        receiver.exports.clear()
        trace_config = [f"--trace-config={entry}" for entry in (
            "mode=opentelemetry", f"opentelemetry,url={receiver.url}", "rate=1", "level=TIMESTAMPS",
            "opentelemetry,resource=service.name=side-by-side", "opentelemetry,bsp_schedule_delay=100")]
        if name == "triton":
            server = triton_reference.TritonServer(engine, True, serve_bench.DEFAULT_LAYOUT, serve_bench.QUEUE_DELAY_US,
                                                   workdir, free_port, tuple(trace_config))
        else:
            server = serve_bench.Server(manifest_uri, True, workdir / "plansmith.log", trace_config)
        try:
            settings = drive(server.http, server.grpc, input_name, array)
            deadline = time.monotonic() + 30
            while len(receiver.spans()) < 6 and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            server.stop()
        spans = receiver.spans()
        by_request = {}
        for span in spans:
            for item in span.get("attributes", []):
                if item["key"] == "triton.request_id":
                    by_request[item["value"]["stringValue"]] = tree(spans, span["traceId"])
        resource = {item["key"] for _, document in receiver.exports for resource in document["resourceSpans"]
                    for item in resource["resource"]["attributes"]}
        results[name] = (settings, by_request, resource)
        print(f"{name}: {len(spans)} spans in {len(receiver.exports)} exports "
              f"({', '.join(sorted({content for content, _ in receiver.exports}))})")
        for request, lines in by_request.items():
            print(f"  {request}:")
            print("\n".join(f"    {line}" for line in lines))
        print(f"  resource attributes: {sorted(resource)}")
        print(f"  trace settings: {json.dumps(settings)}")

    (triton_settings, triton_spans, _), (plansmith_settings, plansmith_spans, _) = results["triton"], results["plansmith"]
    same_spans = triton_spans == plansmith_spans and set(triton_spans) == {"over-http", "over-grpc"}
    print(f"span trees: {'the same' if same_spans else 'DIFFERENT'}")
    for key in sorted(set(triton_settings) | set(plansmith_settings)):
        if triton_settings.get(key) != plansmith_settings.get(key):
            print(f"  setting {key}: triton {triton_settings.get(key)!r}, plansmith {plansmith_settings.get(key)!r}")
    return 0 if same_spans else 1


if __name__ == "__main__":
    sys.exit(main())
