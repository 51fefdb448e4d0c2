"""`plansmith trace-summary FILE...`: where sampled requests spent their time, from Triton trace
files (the server's trace extension, or Triton's own).

Triton ships a script for this (qa/common/trace_summary.py, not in its images) that prints each
span's mean. This prints the mean and the p50, p95 and p99 of each span, per model and protocol:
a p99 is what a latency target is written against, and a mean hides the slow requests it is
about. Spans, from the timestamps a trace holds:

    request   first byte received (HTTP_RECV_START, GRPC_WAITREAD_START) .. response sent (*_SEND_END)
      receive   .._RECV_START .. _RECV_END (gRPC: WAITREAD_START .. WAITREAD_END)
      handler   REQUEST_START .. REQUEST_END, and within it:
        queue     QUEUE_START .. COMPUTE_START
        compute   COMPUTE_START .. COMPUTE_END: input (forming the batch), infer, output
        overhead  handler less queue and compute
      send      *_SEND_START .. *_SEND_END
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

# span name, its depth in the printout, start timestamp, end timestamp (by protocol where they differ)
SPANS: dict[str, tuple[tuple[str, int, str, str], ...]] = {
    "HTTP": (("request", 0, "HTTP_RECV_START", "HTTP_SEND_END"), ("receive", 1, "HTTP_RECV_START", "HTTP_RECV_END")),
    "GRPC": (("request", 0, "GRPC_WAITREAD_START", "GRPC_SEND_END"),
             ("receive", 1, "GRPC_WAITREAD_START", "GRPC_WAITREAD_END")),
}
CORE_SPANS = (("handler", 1, "REQUEST_START", "REQUEST_END"), ("queue", 2, "QUEUE_START", "COMPUTE_START"),
              ("compute", 2, "COMPUTE_START", "COMPUTE_END"), ("input", 3, "COMPUTE_START", "COMPUTE_INPUT_END"),
              ("infer", 3, "COMPUTE_INPUT_END", "COMPUTE_OUTPUT_START"), ("output", 3, "COMPUTE_OUTPUT_START", "COMPUTE_END"))
SEND_SPANS = {"HTTP": ("send", 1, "HTTP_SEND_START", "HTTP_SEND_END"), "GRPC": ("send", 1, "GRPC_SEND_START", "GRPC_SEND_END")}
OVERHEAD_DEPTH = 2


class TraceFileError(ValueError):
    """A file that is not a Triton trace file."""


@dataclass(frozen=True)
class RequestTrace:
    model: str
    version: str
    timestamps: dict[str, int]  # name -> ns

    @property
    def protocol(self) -> str:
        if "HTTP_RECV_START" in self.timestamps:
            return "HTTP"
        if "GRPC_WAITREAD_START" in self.timestamps:
            return "GRPC"
        return "unknown"  # no receive timestamps: traced at level TENSORS only


@dataclass
class Group:
    """The traces of one model over one protocol: each span's durations in microseconds."""

    model: str
    version: str
    protocol: str
    traces: int = 0
    spans: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))


def read_traces(paths: Iterable[Path]) -> list[RequestTrace]:
    """The requests traced in Triton trace files (ids are per file: a server numbers its traces
    from 1, so files of two runs may share them)."""
    requests = []
    for path in paths:
        try:
            objects = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise TraceFileError(f"{path}: not a readable JSON trace file: {error}") from None
        if not isinstance(objects, list) or not all(isinstance(entry, dict) and "id" in entry for entry in objects):
            raise TraceFileError(f"{path}: a trace file is a JSON array of objects with an 'id'")
        headers = {entry["id"]: entry for entry in objects if "model_name" in entry}
        stamps: dict[object, dict[str, int]] = defaultdict(dict)
        for entry in objects:
            for stamp in entry.get("timestamps", ()):
                stamps[entry["id"]][stamp["name"]] = stamp["ns"]
        for trace_id, header in headers.items():
            requests.append(RequestTrace(header["model_name"], str(header.get("model_version", "")), stamps[trace_id]))
    return requests


def protocol_spans(protocol: str) -> list[tuple[str, int, str, str]]:
    """The spans measured from a protocol's timestamps, in the printout's order (overhead, derived
    from three of them, goes before send)."""
    spans = [*SPANS.get(protocol, ()), *CORE_SPANS]
    if protocol in SEND_SPANS:
        spans.append(SEND_SPANS[protocol])
    return spans


def summarize(requests: Sequence[RequestTrace]) -> list[Group]:
    groups: dict[tuple[str, str, str], Group] = {}
    for request in requests:
        key = (request.model, request.version, request.protocol)
        group = groups.setdefault(key, Group(*key))
        group.traces += 1
        times = request.timestamps
        measured = {name: (times[end] - times[start]) / 1000 for name, _, start, end in protocol_spans(request.protocol)
                    if start in times and end in times}
        if {"handler", "queue", "compute"} <= measured.keys():
            measured["overhead"] = measured["handler"] - measured["queue"] - measured["compute"]
        for name, value in measured.items():
            group.spans[name].append(value)
    return sorted(groups.values(), key=lambda group: (group.model, group.version, group.protocol))


def span_order(protocol: str) -> list[tuple[str, int]]:
    """The spans of a protocol's printout, in order, with their depths."""
    spans = [(name, depth) for name, depth, _, _ in protocol_spans(protocol)]
    # overhead is the handler's last part, before send
    return ([span for span in spans if span[0] != "send"] + [("overhead", OVERHEAD_DEPTH)]
            + [span for span in spans if span[0] == "send"])


def span_statistics(group: Group) -> dict[str, dict[str, float]]:
    """Each span's mean, p50, p95 and p99 in microseconds, in the printout's order."""
    import numpy as np  # here: the plansmith command imports this module for every subcommand

    statistics = {}
    for name, _ in span_order(group.protocol):
        values = group.spans.get(name)
        if values:
            p50, p95, p99 = np.percentile(values, [50, 95, 99])
            statistics[name] = {"mean": float(np.mean(values)), "p50": float(p50), "p95": float(p95), "p99": float(p99)}
    return statistics


def render(groups: Sequence[Group]) -> str:
    lines = []
    for group in groups:
        lines.append(f"{group.model} (version {group.version}), {group.protocol}: {group.traces} traces")
        statistics = span_statistics(group)
        if not statistics:
            lines.append("  (no timestamps: traced at level TENSORS only)")
            continue
        lines.append(f"  {'span':<14}{'mean':>10}{'p50':>10}{'p95':>10}{'p99':>10}   us")
        depths = dict(span_order(group.protocol))
        for name, figures in statistics.items():
            label = "  " * depths[name] + name
            lines.append(f"  {label:<14}" + "".join(f"{figures[key]:>10.1f}" for key in ("mean", "p50", "p95", "p99")))
    return "\n".join(lines) if lines else "no traced requests"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "trace-summary", help="where traced requests spent their time (Triton trace files)",
        description="Mean, p50, p95 and p99 of each span of the requests in Triton trace files (plansmith serve "
                    "--trace-config, or Triton's own), per model and protocol.")
    parser.add_argument("files", nargs="+", type=Path, metavar="FILE", help="trace files (FILE, FILE.0, FILE.1, ...)")
    parser.set_defaults(handler=cmd_trace_summary)


def cmd_trace_summary(args) -> int:
    import sys

    try:
        requests = read_traces(args.files)
    except TraceFileError as error:
        print(f"plansmith trace-summary: {error}", file=sys.stderr)
        return 1
    print(render(summarize(requests)))
    return 0
