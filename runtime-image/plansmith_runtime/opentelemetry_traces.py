"""Triton's OpenTelemetry trace mode (`--trace-config mode=opentelemetry`): each sampled request's
timestamps become OpenTelemetry spans, which the OpenTelemetry SDK's batch span processor sends to
a collector over OTLP/HTTP. The spans are laid out as Triton's tracer.cc lays them out:

  InferRequest        the request in the server, its first timestamp to its last; events
                      HTTP_RECV_START/_END or GRPC_WAITREAD_START/_END, INFER_RESPONSE_COMPLETE,
                      HTTP_SEND_START/_END or GRPC_SEND_START/_END
    <model name>      REQUEST_START .. REQUEST_END, with those events and QUEUE_START; attributes
                      triton.model_name, triton.model_version, triton.trace_id,
                      triton.trace_parent_id and triton.request_id (when the request has an id)
      compute         COMPUTE_START .. COMPUTE_END with the four COMPUTE_* events: one span for each
                      batch the request ran in (a request larger than a batch runs in several)

All are SERVER spans. A request that carries a W3C `traceparent` (an HTTP header, or gRPC metadata)
gets its InferRequest span under the client's span. Timestamps are taken on the monotonic clock and
moved onto the wall clock when the trace is exported, as Triton moves its steady clock's.

Departures from Triton: InferRequest starts at the request's first timestamp and ends at its last,
where Triton starts it when the request is sampled and ends it when the trace is released; and a
request that failed before REQUEST_END gets its model span ended at its last timestamp, where
Triton leaves the span open and never sends it.

The SDK is imported here only, and the server imports this module only in this mode.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Mapping

from opentelemetry import trace as otel_trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from plansmith_runtime import tracing
from plansmith_runtime.tracing import OpenTelemetryConfig, Trace

log = logging.getLogger(__name__)

ROOT_SPAN, COMPUTE_SPAN = "InferRequest", "compute"  # Triton's names; the model span is named after the model
DEFAULT_SERVICE_NAME = "plansmith"  # the server's name in /v2 (Triton's default is triton-inference-server)
MODEL_EVENTS = frozenset({tracing.REQUEST_START, tracing.QUEUE_START, tracing.REQUEST_END})
COMPUTE_EVENTS = frozenset({tracing.COMPUTE_START, tracing.COMPUTE_INPUT_END, tracing.COMPUTE_OUTPUT_START,
                            tracing.COMPUTE_END})
CLOSE_TIMEOUT_MS = 3000  # the longest the server's stop waits for the last spans to reach the collector


@dataclass(frozen=True)
class SpanPlan:
    """One span to send: its name, times (monotonic nanoseconds), events, attributes and children."""
    name: str
    start_ns: int
    end_ns: int
    events: tuple[tuple[str, int], ...]
    attributes: Mapping[str, str | int] = field(default_factory=dict)
    children: tuple[SpanPlan, ...] = ()


def compute_spans(stamps: list[tuple[str, int]]) -> tuple[SpanPlan, ...]:
    """The compute spans of a trace's COMPUTE_* timestamps: each COMPUTE_START opens one."""
    groups: list[list[tuple[str, int]]] = []
    for stamp in stamps:
        if stamp[0] == tracing.COMPUTE_START or not groups:
            groups.append([])
        groups[-1].append(stamp)
    return tuple(SpanPlan(COMPUTE_SPAN, group[0][1], group[-1][1], tuple(group)) for group in groups)


def plan_spans(trace: Trace) -> SpanPlan | None:
    """The spans Triton sends for this trace (the module's docstring); None for a trace without
    timestamps."""
    stamps = trace.timestamps
    if not stamps:
        return None
    first, last = min(ns for _, ns in stamps), max(ns for _, ns in stamps)
    model_stamps = [stamp for stamp in stamps if stamp[0] in MODEL_EVENTS]
    computed = compute_spans([stamp for stamp in stamps if stamp[0] in COMPUTE_EVENTS])
    root_events = tuple(stamp for stamp in stamps if stamp[0] not in MODEL_EVENTS and stamp[0] not in COMPUTE_EVENTS)
    children: tuple[SpanPlan, ...] = computed
    if model_stamps:
        ended = [ns for name, ns in model_stamps if name == tracing.REQUEST_END]
        attributes: dict[str, str | int] = {
            "triton.model_name": trace.model,
            "triton.model_version": int(trace.version) if trace.version.isdigit() else trace.version,
            "triton.trace_id": trace.id, "triton.trace_parent_id": 0}
        if trace.request_id:
            attributes["triton.request_id"] = trace.request_id
        children = (SpanPlan(trace.model, model_stamps[0][1], ended[0] if ended else last, tuple(model_stamps),
                             attributes, computed),)
    return SpanPlan(ROOT_SPAN, first, last, root_events, {}, children)


def service_resource(config: OpenTelemetryConfig) -> Resource:
    """The resource the spans carry: the SDK's (OTEL_RESOURCE_ATTRIBUTES, OTEL_SERVICE_NAME) under
    the configured attributes, with service.name plansmith when neither names the service."""
    resource = Resource.create(dict(config.resource))
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    return resource


class OpenTelemetryExporter:
    """Sends traces as spans through one TracerProvider with a batch span processor and an OTLP/HTTP
    exporter. A collector that cannot be reached loses spans (the SDK logs it), never requests."""

    def __init__(self, config: OpenTelemetryConfig, version: str) -> None:
        self.config = config
        self._provider = TracerProvider(resource=service_resource(config))
        self._span_exporter = OTLPSpanExporter(endpoint=config.url)
        self._provider.add_span_processor(BatchSpanProcessor(
            self._span_exporter, max_queue_size=config.bsp_max_queue_size,
            schedule_delay_millis=config.bsp_schedule_delay, max_export_batch_size=config.bsp_max_export_batch_size))
        self._tracer = self._provider.get_tracer("plansmith_runtime", version)
        self._propagator = TraceContextTextMapPropagator()
        log.info("traces go to an OpenTelemetry collector", extra={"url": config.url})

    def parent_context(self, traceparent: str, tracestate: str | None) -> Context | None:
        """The client's span context from W3C trace context headers; None for a malformed traceparent
        (the request is then sampled like one without)."""
        carrier = {"traceparent": traceparent}
        if tracestate:
            carrier["tracestate"] = tracestate
        context = self._propagator.extract(carrier)
        return context if otel_trace.get_current_span(context).get_span_context().is_valid else None

    def export(self, trace: Trace) -> None:
        plan = plan_spans(trace)
        if plan is not None:
            # the wall clock now, less the monotonic clock now: moves every timestamp of this trace
            self._send(plan, trace.parent or Context(), time.time_ns() - time.monotonic_ns())

    def _send(self, plan: SpanPlan, context: object, wall_offset_ns: int) -> None:
        span = self._tracer.start_span(plan.name, context=context, kind=otel_trace.SpanKind.SERVER,
                                       attributes=plan.attributes, start_time=plan.start_ns + wall_offset_ns)
        for name, ns in plan.events:
            span.add_event(name, timestamp=ns + wall_offset_ns)
        inside = otel_trace.set_span_in_context(span, Context())
        for child in plan.children:
            self._send(child, inside, wall_offset_ns)
        span.end(end_time=plan.end_ns + wall_offset_ns)

    def close(self) -> None:
        """Send the spans still queued, waiting at most CLOSE_TIMEOUT_MS for the collector; then the
        exporter stops retrying and the SDK logs the spans lost. The SDK's shutdown alone waits up to
        30 s, and its force_flush takes no timeout yet (opentelemetry-python#4568): it runs in a
        thread, and the exporter's shutdown ends its retries."""
        shutdown = threading.Thread(target=self._provider.shutdown, name="opentelemetry-shutdown", daemon=True)
        shutdown.start()
        shutdown.join(CLOSE_TIMEOUT_MS / 1000)
        if shutdown.is_alive():
            log.warning("the OpenTelemetry collector did not take the last spans before the server stopped",
                        extra={"url": self.config.url, "waited_ms": CLOSE_TIMEOUT_MS})
            self._span_exporter.shutdown()
            shutdown.join(CLOSE_TIMEOUT_MS / 1000)
