"""Triton's OpenTelemetry trace mode: the spans a trace becomes (pure), and the exporter sending them
through the OpenTelemetry SDK to a real OTLP/HTTP endpoint."""

from __future__ import annotations

import logging
import time

import pytest

from plansmith_runtime import tracing
from plansmith_runtime.opentelemetry_traces import (CLOSE_TIMEOUT_MS, COMPUTE_SPAN, ROOT_SPAN, OpenTelemetryExporter,
                                                     plan_spans, service_resource)
from plansmith_runtime.tracing import (OPENTELEMETRY_MODE, InvalidTraceSetting, OpenTelemetryConfig, TraceControl,
                                       TraceSettings, parse_trace_config)

HTTP_REQUEST = [(tracing.HTTP_RECV_START, 100), (tracing.HTTP_RECV_END, 110), (tracing.REQUEST_START, 120),
                (tracing.QUEUE_START, 130), (tracing.COMPUTE_START, 140), (tracing.COMPUTE_INPUT_END, 150),
                (tracing.COMPUTE_OUTPUT_START, 160), (tracing.COMPUTE_END, 170), (tracing.REQUEST_END, 180),
                (tracing.INFER_RESPONSE_COMPLETE, 190), (tracing.HTTP_SEND_START, 200), (tracing.HTTP_SEND_END, 210)]
CLIENT_TRACE_ID, CLIENT_SPAN_ID = "0af7651916cd43dd8448eb211c12666c", "b7ad6b7169242424"
TRACEPARENT = f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01"


def otel_settings(url: str = "http://127.0.0.1:9/v1/traces", **fields) -> TraceSettings:
    return TraceSettings(level=frozenset({tracing.TIMESTAMPS}), mode=OPENTELEMETRY_MODE,
                         opentelemetry=OpenTelemetryConfig(url=url, bsp_schedule_delay=20), **fields)


def traced(control: TraceControl, stamps, request_id: str = "r1", traceparent: str | None = None):
    trace = control.start("cnn", request_id, traceparent)
    assert trace is not None
    for name, ns in stamps:
        trace.stamp(name, ns)
    trace.finish()
    return trace


def test_a_request_becomes_tritons_three_nested_spans():
    control = TraceControl(otel_settings(rate=1), ["cnn"], "1", exporter=RecordingExporter())
    trace = control.start("cnn", "req-7")
    for name, ns in HTTP_REQUEST:
        trace.stamp(name, ns)
    root = plan_spans(trace)
    assert (root.name, root.start_ns, root.end_ns) == (ROOT_SPAN, 100, 210)
    assert [name for name, _ in root.events] == [tracing.HTTP_RECV_START, tracing.HTTP_RECV_END,
                                                 tracing.INFER_RESPONSE_COMPLETE, tracing.HTTP_SEND_START,
                                                 tracing.HTTP_SEND_END]
    (model,) = root.children
    assert (model.name, model.start_ns, model.end_ns) == ("cnn", 120, 180)
    assert model.events == ((tracing.REQUEST_START, 120), (tracing.QUEUE_START, 130), (tracing.REQUEST_END, 180))
    assert model.attributes == {"triton.model_name": "cnn", "triton.model_version": 1, "triton.trace_id": trace.id,
                                "triton.trace_parent_id": 0, "triton.request_id": "req-7"}
    (compute,) = model.children
    assert (compute.name, compute.start_ns, compute.end_ns, compute.children) == (COMPUTE_SPAN, 140, 170, ())
    assert [name for name, _ in compute.events] == [tracing.COMPUTE_START, tracing.COMPUTE_INPUT_END,
                                                    tracing.COMPUTE_OUTPUT_START, tracing.COMPUTE_END]


def test_spans_of_a_request_in_two_batches_of_a_failed_request_and_of_no_timestamps():
    control = TraceControl(otel_settings(rate=1), ["cnn"], "1", exporter=RecordingExporter())
    compute = [tracing.COMPUTE_START, tracing.COMPUTE_INPUT_END, tracing.COMPUTE_OUTPUT_START, tracing.COMPUTE_END]
    trace = control.start("cnn", "")
    for ns, name in enumerate([tracing.GRPC_WAITREAD_START, tracing.GRPC_WAITREAD_END, tracing.REQUEST_START,
                               tracing.QUEUE_START, *compute, *compute, tracing.REQUEST_END]):
        trace.stamp(name, 10 * ns)
    (model,) = plan_spans(trace).children
    assert "triton.request_id" not in model.attributes
    assert [(span.start_ns, span.end_ns) for span in model.children] == [(40, 70), (80, 110)]

    failed = control.start("cnn", "bad")  # refused after REQUEST_START: no compute, no REQUEST_END, no send
    for name, ns in [(tracing.HTTP_RECV_START, 5), (tracing.HTTP_RECV_END, 6), (tracing.REQUEST_START, 7)]:
        failed.stamp(name, ns)
    root = plan_spans(failed)
    assert (root.start_ns, root.end_ns) == (5, 7)
    (model,) = root.children
    assert (model.start_ns, model.end_ns, model.children) == (7, 7, ())
    assert plan_spans(control.start("cnn", "untouched")) is None


class RecordingExporter:
    """Stands in for the OpenTelemetry exporter where a test checks what TraceControl hands it."""

    def __init__(self) -> None:
        self.exported: list = []
        self.closed = False

    def parent_context(self, traceparent: str, tracestate: str | None) -> object | None:
        return ("context", traceparent) if traceparent.startswith("00-") else None

    def export(self, trace) -> None:
        self.exported.append(trace)

    def close(self) -> None:
        self.closed = True


def test_a_propagated_context_is_traced_whatever_the_rate_and_count():
    exporter = RecordingExporter()
    control = TraceControl(otel_settings(rate=0, count=1), ["cnn"], "1", exporter=exporter)
    assert control.start("cnn", "no-context") is None  # rate 0: only requests that carry a context
    assert control.start("cnn", "malformed", "ff-nonsense") is None
    for request in ("first", "second"):
        traced(control, HTTP_REQUEST, request, TRACEPARENT)
    assert [(trace.request_id, trace.parent) for trace in exporter.exported] == [
        ("first", ("context", TRACEPARENT)), ("second", ("context", TRACEPARENT))]
    assert control.settings()["trace_count"] == "1"  # propagated traces count against nothing
    assert control.settings()["trace_mode"] == "opentelemetry"

    control.update(None, {"trace_rate": "2"})
    traced_ids = [control.start("cnn", str(n)) is not None for n in range(4)]
    assert traced_ids == [False, True, False, False]  # every 2nd, until the count of 1 ran out
    control.close()
    assert exporter.closed


def test_level_tensors_is_refused_in_the_opentelemetry_mode_and_nothing_changes():
    control = TraceControl(otel_settings(rate=5), ["cnn"], "1", exporter=RecordingExporter())
    with pytest.raises(InvalidTraceSetting, match="TENSORS is not supported in trace mode opentelemetry"):
        control.update("cnn", {"trace_level": ["TIMESTAMPS", "TENSORS"]})
    assert control.settings("cnn")["trace_level"] == ["TIMESTAMPS"] and control.settings("cnn")["trace_rate"] == "5"


def test_the_exporter_sends_nested_server_spans_on_the_wall_clock_to_an_otlp_collector(otlp_collector):
    settings = parse_trace_config(["mode=opentelemetry", f"opentelemetry,url={otlp_collector.url}", "rate=1",
                                   "level=TIMESTAMPS", "opentelemetry,resource=service.name=resnet",
                                   "opentelemetry,resource=deployment.environment=test",
                                   "opentelemetry,bsp_schedule_delay=20"])
    control = TraceControl(settings, ["cnn"], "1")
    before = time.time_ns()
    now = time.monotonic_ns()
    stamps = [(name, now + ns) for name, ns in HTTP_REQUEST]
    traced(control, stamps, "with-parent", TRACEPARENT)
    traced(control, stamps, "alone")
    spans = otlp_collector.wait_for(6)
    control.close()
    assert len(spans) == 6
    by_trace: dict[str, dict[str, object]] = {}
    for span in spans:
        by_trace.setdefault(span.trace_id, {})[span.name] = span
    assert len(by_trace) == 2 and CLIENT_TRACE_ID in by_trace
    for trace_id, named in by_trace.items():
        root, model, compute = named[ROOT_SPAN], named["cnn"], named[COMPUTE_SPAN]
        assert root.parent_span_id == (CLIENT_SPAN_ID if trace_id == CLIENT_TRACE_ID else "")
        assert (model.parent_span_id, compute.parent_span_id) == (root.span_id, model.span_id)
        assert {span.kind for span in (root, model, compute)} == {2}  # SERVER
        assert root.resource["service.name"] == "resnet" and root.resource["deployment.environment"] == "test"
        assert root.scope == "plansmith_runtime"
        # the monotonic timestamps moved onto the wall clock (within the 1 ms the two clock reads of
        # the conversion, taken one after the other, and the clock's adjustments may move them), gaps kept
        assert before - 1_000_000 <= root.start_ns <= time.time_ns() + 1_000_000
        assert root.end_ns - root.start_ns == 110 and compute.start_ns - root.start_ns == 40
        assert [name for name, _ in compute.events] == [tracing.COMPUTE_START, tracing.COMPUTE_INPUT_END,
                                                        tracing.COMPUTE_OUTPUT_START, tracing.COMPUTE_END]
        assert [ns - root.start_ns for _, ns in model.events] == [20, 30, 80]
    assert by_trace[CLIENT_TRACE_ID]["cnn"].attributes["triton.request_id"] == "with-parent"


def test_a_collector_that_is_down_loses_spans_not_requests_and_stopping_is_bounded(otlp_collector, caplog):
    otlp_collector.reachable = False
    exporter = OpenTelemetryExporter(OpenTelemetryConfig(url=otlp_collector.url, bsp_schedule_delay=20), "1")
    control = TraceControl(otel_settings(otlp_collector.url, rate=1), ["cnn"], "1", exporter=exporter)
    with caplog.at_level(logging.WARNING):
        for request in range(3):
            traced(control, HTTP_REQUEST, str(request))
        deadline = time.monotonic() + 10
        while otlp_collector.requests == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        started = time.monotonic()
        control.close()
    assert time.monotonic() - started < CLOSE_TIMEOUT_MS / 1000 + 1.5  # not the exporter's 10 s of retries
    assert otlp_collector.requests >= 1 and otlp_collector.spans == []
    messages = [record.getMessage() for record in caplog.records]
    assert any("Service Unavailable" in message for message in messages), messages
    assert "the OpenTelemetry collector did not take the last spans before the server stopped" in messages


def test_a_malformed_traceparent_gives_no_parent():
    exporter = OpenTelemetryExporter(OpenTelemetryConfig(), "1")
    try:
        assert exporter.parent_context("00-zz-bad-01", None) is None
        assert exporter.parent_context(f"00-{'0' * 32}-{CLIENT_SPAN_ID}-01", None) is None  # an all-zero trace id
        assert exporter.parent_context(TRACEPARENT, "vendor=1") is not None
    finally:
        exporter.close()


def test_the_service_is_plansmith_unless_the_sdks_variables_or_the_resource_attributes_name_it(monkeypatch):
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    assert service_resource(OpenTelemetryConfig()).attributes["service.name"] == "plansmith"
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "k8s.namespace.name=ml,k8s.pod.name=resnet-0")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "resnet")
    from_pod = service_resource(OpenTelemetryConfig()).attributes
    assert (from_pod["service.name"], from_pod["k8s.namespace.name"], from_pod["k8s.pod.name"]) == ("resnet", "ml",
                                                                                                    "resnet-0")
    given = service_resource(OpenTelemetryConfig(resource=(("service.name", "resnet-prod"), ("k8s.pod.name", "p"))))
    assert (given.attributes["service.name"], given.attributes["k8s.pod.name"]) == ("resnet-prod", "p")
