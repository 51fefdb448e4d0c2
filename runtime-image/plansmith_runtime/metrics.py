"""Prometheus metrics with Triton's names.

Triton exposes its cumulative counters without the `_total` suffix (`nv_inference_count`, typed
counter); prometheus_client always appends `_total` to counters, so those few counters are kept
as plain numbers here (updated from the event loop thread only) and written in Triton's exact
format, followed by prometheus_client's own exposition of the batch-size histogram and the queue
depth gauge.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Sequence

from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest

from plansmith_runtime.summaries import SlidingSummary

TRITON_COUNTERS = (
    ("nv_inference_request_success", "success", "Number of successful inference requests, all batch sizes"),
    ("nv_inference_request_failure", "failure", "Number of failed inference requests, all batch sizes"),
    ("nv_inference_count", "inference_count", "Number of inferences performed (a batch of N counts N)"),
    ("nv_inference_exec_count", "exec_count", "Number of model executions performed (one per batch)"),
    ("nv_inference_request_duration_us", "request_us", "Cumulative inference request duration in microseconds"),
    ("nv_inference_queue_duration_us", "queue_us", "Cumulative inference queuing duration in microseconds"),
    ("nv_inference_compute_input_duration_us", "compute_input_us", "Cumulative compute input duration in microseconds"),
    ("nv_inference_compute_infer_duration_us", "compute_us", "Cumulative compute inference duration in microseconds"),
    ("nv_inference_compute_output_duration_us", "compute_output_us", "Cumulative compute output duration in microseconds"),
)

# Triton's per-model response cache counters, on the metrics port when the model's cache is on
CACHE_COUNTERS = (
    ("nv_cache_num_hits_per_model", "cache_hits", "Number of cache hits per model"),
    ("nv_cache_num_misses_per_model", "cache_misses", "Number of cache misses per model"),
    ("nv_cache_hit_duration_per_model", "cache_hit_us", "Total cache hit duration per model, in microseconds"),
    ("nv_cache_miss_duration_per_model", "cache_miss_us",
     "Total cache miss (lookup and insertion) duration per model, in microseconds"),
)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

# Triton's latency summaries (--metrics-config summary_latencies=true), its names and help texts
TRITON_SUMMARIES = (
    ("request", "nv_inference_request_summary_us",
     "Summary of inference request duration in microseconds (includes cached requests)"),
    ("queue", "nv_inference_queue_summary_us",
     "Summary of inference queuing duration in microseconds (includes cached requests)"),
    ("compute_input", "nv_inference_compute_input_summary_us",
     "Cumulative compute input duration in microseconds (does not include cached requests)"),
    ("compute_infer", "nv_inference_compute_infer_summary_us",
     "Cumulative compute inference duration in microseconds (does not include cached requests)"),
    ("compute_output", "nv_inference_compute_output_summary_us",
     "Cumulative inference compute output duration in microseconds (does not include cached requests)"),
)


@dataclass
class BatchSizeStats:
    """Executions of one batch size and their cumulative compute phases (Triton's batch_stats)."""

    executions: int = 0
    input_us: float = 0.0  # forming the batch's inputs
    infer_us: float = 0.0  # the engine's run
    output_us: float = 0.0  # cutting the outputs back into the requests'


@dataclass
class ModelStats:
    """Cumulative counters since start. Per-request durations follow Triton: every request of a
    batch is charged the batch's compute phases."""

    success: int = 0
    failure: int = 0
    inference_count: int = 0
    exec_count: int = 0
    request_us: float = 0.0  # successful requests, from arrival to answer
    failure_us: float = 0.0  # failed requests, from arrival to the error
    queue_us: float = 0.0
    compute_input_us: float = 0.0
    compute_us: float = 0.0  # the engine's run (Triton's compute_infer)
    compute_output_us: float = 0.0
    last_inference_ms: int = 0  # wall-clock time of the last execution, ms since the epoch (0: none yet)
    batch_sizes: dict[int, BatchSizeStats] = field(default_factory=dict)
    pending: int = 0  # requests queued, not yet in a batch (Triton's nv_inference_pending_request_count)
    in_flight: int = 0  # requests accepted and not yet answered
    cache_hits: int = 0  # successful requests answered from the response cache (no queue, no compute)
    cache_hit_us: float = 0.0  # their lookups
    cache_misses: int = 0
    cache_miss_us: float = 0.0  # the lookups that missed and the insertions after them


class Metrics:
    def __init__(self, model: str, version: str = "1", summary_quantiles: Sequence[tuple[float, float]] = (),
                 response_cache: bool = False) -> None:
        self.model, self.version = model, version
        self.counters = TRITON_COUNTERS + CACHE_COUNTERS if response_cache else TRITON_COUNTERS
        self.stats = ModelStats()
        self.summary_quantiles = tuple(quantile for quantile, _ in summary_quantiles)
        # by TRITON_SUMMARIES' first column; none when off
        self.summaries = {key: SlidingSummary() for key, _, _ in TRITON_SUMMARIES} if summary_quantiles else {}
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
        labels = f'model="{self.model}",version="{self.version}"'
        label = f"{{{labels}}}"
        for name, attribute, help_text in self.counters:
            value = getattr(self.stats, attribute)
            lines.append(f"# HELP {name} {help_text}\n# TYPE {name} counter\n{name}{label} {int(value)}\n")
        lines.append("# HELP nv_inference_pending_request_count Instantaneous number of pending requests awaiting "
                     "execution per-model\n# TYPE nv_inference_pending_request_count gauge\n"
                     f"nv_inference_pending_request_count{label} {self.stats.pending}\n")
        for key, name, help_text in TRITON_SUMMARIES if self.summaries else ():
            summary = self.summaries[key]
            lines.append(f"# HELP {name} {help_text}\n# TYPE {name} summary\n"
                         f"{name}_count{label} {summary.count}\n{name}_sum{label} {_number(summary.sum)}\n")
            lines.extend(f'{name}{{{labels},quantile="{quantile:g}"}} {_number(value)}\n'
                         for quantile, value in zip(self.summary_quantiles, summary.quantiles(self.summary_quantiles)))
        return "".join(lines).encode() + generate_latest(self.registry)

    def record_success(self, request_us: float, queue_us: float) -> None:
        """A request answered: its time from arrival to answer and its part of that in the queue."""
        stats = self.stats
        stats.success += 1
        stats.request_us += request_us
        stats.queue_us += queue_us
        if self.summaries:
            self.summaries["request"].observe(request_us)
            self.summaries["queue"].observe(queue_us)

    def record_cache_hit(self, request_us: float, lookup_us: float) -> None:
        """A request answered from the response cache: a success with no compute, and no time in the
        queue (looked up before it: Triton counts the time up to the lookup, as short)."""
        stats = self.stats
        stats.success += 1
        stats.request_us += request_us
        stats.cache_hits += 1
        stats.cache_hit_us += lookup_us
        if self.summaries:
            self.summaries["request"].observe(request_us)
            self.summaries["queue"].observe(0.0)

    def record_cache_miss(self, us: float) -> None:
        """A lookup that missed, with the insertion of the response after it."""
        self.stats.cache_misses += 1
        self.stats.cache_miss_us += us

    def record_execution(self, items: int, requests: int, input_us: float, infer_us: float, output_us: float) -> None:
        """A batch of `items` ran; `requests` of its requests were still waiting for the answer."""
        stats = self.stats
        stats.exec_count += 1
        stats.inference_count += items
        stats.compute_input_us += input_us * requests
        stats.compute_us += infer_us * requests
        stats.compute_output_us += output_us * requests
        if self.summaries and requests:  # every answered request of the batch took these phases
            self.summaries["compute_input"].observe(input_us, requests)
            self.summaries["compute_infer"].observe(infer_us, requests)
            self.summaries["compute_output"].observe(output_us, requests)
        stats.last_inference_ms = time.time_ns() // 1_000_000
        size = stats.batch_sizes.get(items)
        if size is None:
            size = stats.batch_sizes[items] = BatchSizeStats()
        size.executions += 1
        size.input_us += input_us
        size.infer_us += infer_us
        size.output_us += output_us
        self.batch_size.observe(items)

    def set_queue_depth(self, depth: int) -> None:
        self.stats.pending = depth


def _number(value: float) -> str:
    """A sample value as the exposition format writes it (NaN for an empty summary window)."""
    return "NaN" if math.isnan(value) else repr(float(value))


def _duration(count: int, us: float) -> dict:
    return {"count": int(count), "ns": int(us * 1000)}


def model_statistics(name: str, version: str, stats: ModelStats) -> dict:
    """One model's entry of Triton's statistics extension (`model_stats` in GET
    v2/models/{name}/stats and in gRPC's ModelStatisticsResponse). As in Triton, a request answered
    from the response cache counts in success, queue and cache_hit, not in compute."""
    executed = stats.success - stats.cache_hits
    return {
        "name": name,
        "version": version,
        "last_inference": stats.last_inference_ms,
        "inference_count": stats.inference_count,
        "execution_count": stats.exec_count,
        "inference_stats": {
            "success": _duration(stats.success, stats.request_us),
            "fail": _duration(stats.failure, stats.failure_us),
            "queue": _duration(stats.success, stats.queue_us),
            "compute_input": _duration(executed, stats.compute_input_us),
            "compute_infer": _duration(executed, stats.compute_us),
            "compute_output": _duration(executed, stats.compute_output_us),
            "cache_hit": _duration(stats.cache_hits, stats.cache_hit_us),
            "cache_miss": _duration(stats.cache_misses, stats.cache_miss_us),
        },
        "batch_stats": [
            {"batch_size": size,
             "compute_input": _duration(batch.executions, batch.input_us),
             "compute_infer": _duration(batch.executions, batch.infer_us),
             "compute_output": _duration(batch.executions, batch.output_us)}
            for size, batch in sorted(stats.batch_sizes.items())
        ],
        "memory_usage": [],
    }
