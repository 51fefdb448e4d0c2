"""Prometheus metrics with Triton's names.

Triton exposes its cumulative counters without the `_total` suffix (`nv_inference_count`, typed
counter); prometheus_client always appends `_total` to counters, so those few counters are kept
as plain numbers here (updated from the event loop thread only) and written in Triton's exact
format, followed by prometheus_client's own exposition of the batch-size histogram and the queue
depth gauge.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest

TRITON_COUNTERS = (
    ("nv_inference_request_success", "success", "Number of successful inference requests, all batch sizes"),
    ("nv_inference_request_failure", "failure", "Number of failed inference requests, all batch sizes"),
    ("nv_inference_count", "inference_count", "Number of inferences performed (a batch of N counts N)"),
    ("nv_inference_exec_count", "exec_count", "Number of model executions performed (one per batch)"),
    ("nv_inference_request_duration_us", "request_us", "Cumulative inference request duration in microseconds"),
    ("nv_inference_queue_duration_us", "queue_us", "Cumulative inference queuing duration in microseconds"),
    ("nv_inference_compute_infer_duration_us", "compute_us", "Cumulative compute inference duration in microseconds"),
)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass
class ModelStats:
    success: int = 0
    failure: int = 0
    inference_count: int = 0
    exec_count: int = 0
    request_us: float = 0.0
    queue_us: float = 0.0
    compute_us: float = 0.0
    pending: int = 0  # requests queued, not yet in a batch (Triton's nv_inference_pending_request_count)
    in_flight: int = 0  # requests accepted and not yet answered


class Metrics:
    def __init__(self, model: str, version: str = "1") -> None:
        self.model, self.version = model, version
        self.stats = ModelStats()
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ("model", "version")
        self.batch_size = Histogram("plansmith_batch_size", "Items per model execution (batch size formed by the batcher)",
                                    labels, buckets=BATCH_BUCKETS, registry=self.registry).labels(model, version)
        self.queue_depth = Gauge("plansmith_queue_depth", "Requests waiting in the batcher's queue",
                                 labels, registry=self.registry).labels(model, version)
        self.in_flight = Gauge("plansmith_requests_in_flight", "Requests accepted and not yet answered",
                               labels, registry=self.registry).labels(model, version)
        # Read when scraped: a gauge's set/inc takes a lock, twice per request on the event loop
        self.queue_depth.set_function(lambda: self.stats.pending)
        self.in_flight.set_function(lambda: self.stats.in_flight)
        self.rejected = Gauge("plansmith_queue_full_rejections", "Requests rejected because the queue was full",
                              labels, registry=self.registry).labels(model, version)

    def render(self) -> bytes:
        lines = []
        label = f'{{model="{self.model}",version="{self.version}"}}'
        for name, attribute, help_text in TRITON_COUNTERS:
            value = getattr(self.stats, attribute)
            lines.append(f"# HELP {name} {help_text}\n# TYPE {name} counter\n{name}{label} {int(value)}\n")
        lines.append("# HELP nv_inference_pending_request_count Instantaneous number of pending requests awaiting "
                     "execution per-model\n# TYPE nv_inference_pending_request_count gauge\n"
                     f"nv_inference_pending_request_count{label} {self.stats.pending}\n")
        return "".join(lines).encode() + generate_latest(self.registry)

    def set_queue_depth(self, depth: int) -> None:
        self.stats.pending = depth
