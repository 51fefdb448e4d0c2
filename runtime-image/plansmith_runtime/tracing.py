"""Triton's trace extension, in Triton's own trace mode: a sampled request's timestamps (and, at
level TENSORS, its input and output tensors) written as JSON to a trace file, and the settings read
and changed at runtime through `GET/POST /v2[/models/{name}]/trace/setting` and the TraceSetting
RPC (tritonclient's get_trace_settings and update_trace_settings).

As in Triton (tracer.cc, http_server.cc, grpc_server.cc):
- settings are global, and a model may override some of them; a setting the override leaves out
  follows the global one, also when the global one changes later. Clearing a setting (a JSON null,
  a gRPC SettingValue without values) returns it to the global value (for a model) or to the value
  the server started with (globally). Every change restarts the sampling counters it touches.
- `trace_rate` N traces every N-th request; `trace_count` is how many traces are left to take (-1:
  no limit) and reads back as what is left; the trace file cannot be changed through the protocol.
- traces are written when `log_frequency` of them are collected, to `FILE.0`, `FILE.1`, ...; with
  `log_frequency` 0 they are kept until the settings change or the server stops, then appended to
  FILE itself (here also whenever HELD_TRACES of them are held: Triton's memory grows with every
  trace until then). A file is a JSON array of objects: a header (id, model_name, model_version,
  request_id), then one object per timestamp ({"id", "timestamps": [{"name", "ns"}]}) and per
  tensor ({"id", "activity", "tensor": {"name", "data", "shape", "dtype"}}). Timestamps are
  nanoseconds of the monotonic clock (Triton's steady_clock).

In Triton's OpenTelemetry trace mode (`--trace-config mode=opentelemetry`) the same sampled
requests become OpenTelemetry spans sent to a collector (opentelemetry_traces), and a request that
carries a W3C `traceparent` is traced whatever the rate and count. The mode and its settings
(opentelemetry,url=, opentelemetry,resource=KEY=VALUE, opentelemetry,bsp_*=) are the command line's
only, as in Triton; the protocol reads the mode back and changes the rest.

Where this server departs from Triton, it is to refuse what Triton takes silently or misreads: an
unknown trace level or a non-integer number is a 400 (Triton ignores the one and reads "12abc" as
12), the command line refuses a level without a trace file (Triton starts and traces nothing), and
level TENSORS in the OpenTelemetry mode, and one mode's settings given to the other, are refused
(Triton logs an error for each request, or ignores the setting).
"""

from __future__ import annotations

import importlib
import itertools
import logging
import os
import re
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Iterator, Mapping, Protocol

import numpy as np
import orjson

log = logging.getLogger(__name__)

TIMESTAMPS, TENSORS = "TIMESTAMPS", "TENSORS"
LEVELS = (TIMESTAMPS, TENSORS)  # in the order Triton lists them
OFF = "OFF"
TRITON_MODE, OPENTELEMETRY_MODE = "triton", "opentelemetry"
UINT32_MAX = 4294967295
INT32_MAX = 2147483647

# Triton's setting names -> TraceSettings fields, for the settings the protocol may change
SETTABLE = {"trace_level": "level", "trace_rate": "rate", "trace_count": "count", "log_frequency": "log_frequency"}
FILE_NOT_SETTABLE = "trace file location can not be updated through network protocol"
HELD_TRACES = 1000  # with log_frequency 0, traces held before they are appended to the file anyway

# The timestamps a trace records, in the order a request reaches them
HTTP_RECV_START, HTTP_RECV_END = "HTTP_RECV_START", "HTTP_RECV_END"
GRPC_WAITREAD_START, GRPC_WAITREAD_END = "GRPC_WAITREAD_START", "GRPC_WAITREAD_END"
REQUEST_START, QUEUE_START = "REQUEST_START", "QUEUE_START"
COMPUTE_START, COMPUTE_INPUT_END = "COMPUTE_START", "COMPUTE_INPUT_END"
COMPUTE_OUTPUT_START, COMPUTE_END = "COMPUTE_OUTPUT_START", "COMPUTE_END"
REQUEST_END, INFER_RESPONSE_COMPLETE = "REQUEST_END", "INFER_RESPONSE_COMPLETE"
HTTP_SEND_START, HTTP_SEND_END = "HTTP_SEND_START", "HTTP_SEND_END"
GRPC_SEND_START, GRPC_SEND_END = "GRPC_SEND_START", "GRPC_SEND_END"
# ... and the tensors, at level TENSORS
TENSOR_QUEUE_INPUT, TENSOR_BACKEND_OUTPUT = "TENSOR_QUEUE_INPUT", "TENSOR_BACKEND_OUTPUT"


class InvalidTraceSetting(ValueError):
    """A trace setting the server cannot take: HTTP 400 / gRPC INVALID_ARGUMENT, nothing changed."""


class TraceSettingNotSettable(InvalidTraceSetting):
    """A setting only the command line sets (the trace file): HTTP 501 / gRPC UNIMPLEMENTED, as Triton."""


# The batch span processor's settings: Triton's names, the OpenTelemetry SDK's environment variables
# (which set them when the command line does not) and their defaults, the same in Triton and the SDK
BATCH_SPAN_PROCESSOR = {"bsp_max_queue_size": ("OTEL_BSP_MAX_QUEUE_SIZE", 2048),
                        "bsp_schedule_delay": ("OTEL_BSP_SCHEDULE_DELAY", 5000),
                        "bsp_max_export_batch_size": ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512)}


@dataclass(frozen=True)
class OpenTelemetryConfig:
    """Where the OpenTelemetry mode sends spans, and how the SDK's batch span processor batches them."""
    url: str = "http://localhost:4318/v1/traces"  # an OTLP/HTTP collector's traces endpoint
    resource: tuple[tuple[str, str], ...] = ()  # resource attributes, over OTEL_RESOURCE_ATTRIBUTES'
    bsp_max_queue_size: int = 2048
    bsp_schedule_delay: int = 5000  # milliseconds between exports
    bsp_max_export_batch_size: int = 512

    def as_triton(self) -> dict[str, str]:
        """As Triton reports them among the trace settings; the resource attributes as
        OTEL_RESOURCE_ATTRIBUTES writes them (Triton shows the last one given)."""
        return {"url": self.url, "resource": ",".join(f"{key}={value}" for key, value in self.resource),
                **{name: str(getattr(self, name)) for name in BATCH_SPAN_PROCESSOR}}


@dataclass(frozen=True)
class TraceSettings:
    level: frozenset[str] = frozenset()  # empty: OFF
    rate: int = 1000
    count: int = -1
    log_frequency: int = 0
    file: str = ""
    mode: str = TRITON_MODE  # or OPENTELEMETRY_MODE; the command line's only
    opentelemetry: OpenTelemetryConfig = OpenTelemetryConfig()

    def idle_reason(self) -> str | None:
        """Why these settings trace nothing, or None when they trace."""
        if not self.level:
            return "tracing is disabled"
        if self.mode == OPENTELEMETRY_MODE:
            # with rate 0 or no count left, requests that carry a trace context are still traced
            return None
        if self.rate == 0:
            return "sample rate must be non-zero"
        if not self.file:
            return ("trace file name is not given (an InferenceModel's spec.serving.trace sets it for its pods, "
                    "--trace-config triton,file=PATH for plansmith serve)")
        if self.count == 0:
            return "trace count is 0: no trace is left to take"
        return None

    def as_triton(self, count: int | None = None) -> dict[str, str | list[str]]:
        """The settings as Triton reports them: strings, and the level a list; `count` is what is left.
        Mode opentelemetry has the exporter's settings where mode triton has the file's."""
        reported: dict[str, str | list[str]] = {
            "trace_level": [level for level in LEVELS if level in self.level] or [OFF],
            "trace_rate": str(self.rate), "trace_count": str(self.count if count is None else count)}
        if self.mode == TRITON_MODE:
            return {**reported, "log_frequency": str(self.log_frequency), "trace_file": self.file,
                    "trace_mode": self.mode}
        return {**reported, "trace_mode": self.mode, **self.opentelemetry.as_triton()}


# ---------------------------------------------------------------------- parsing

_INTEGER = re.compile(r"-?[0-9]+")


def parse_level(values: Any) -> frozenset[str] | None:
    """A trace_level value (a list of OFF, TIMESTAMPS, TENSORS); None for an empty list, which
    changes nothing (Triton's reading)."""
    if not isinstance(values, list) or not all(isinstance(value, str) for value in values):
        raise InvalidTraceSetting(f"trace_level must be an array of strings, got {values!r}")
    if not values:
        return None
    if OFF in values:
        if len(values) > 1:
            raise InvalidTraceSetting("Expect only one trace level 'OFF' is specified")
        return frozenset()
    unknown = [value for value in values if value not in LEVELS]
    if unknown:
        raise InvalidTraceSetting(f"unknown trace level {unknown[0]!r}: the levels are OFF, TIMESTAMPS and TENSORS")
    return frozenset(values)


def parse_number(name: str, value: Any) -> int:
    """trace_rate, log_frequency (0 to 2^32-1) or trace_count (-1 to 2^31-1): a string holding an
    integer, as Triton's clients send them (a JSON integer is taken too)."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InvalidTraceSetting(f"'{name}' must be a string holding an integer, got {value!r}")
    text = str(value)
    if not _INTEGER.fullmatch(text):
        raise InvalidTraceSetting(f"Unable to parse '{name}', got: {text}")
    number = int(text)
    if name == "trace_count":
        if number < -1:
            raise InvalidTraceSetting(f"Unable to parse 'trace_count'. Expecting value >= -1, got: {text}")
        low, high = -1, INT32_MAX
    else:
        low, high = 0, UINT32_MAX
    if not low <= number <= high:
        raise InvalidTraceSetting(f"Unable to parse '{name}', value is out of range [ {low}, {high} ], got: {text}")
    return number


def parse_changes(changes: Mapping[str, Any]) -> dict[str, Any]:
    """Triton-named setting changes -> TraceSettings fields and their new values; None for a setting
    cleared. Names Triton does not let the protocol change are ignored (trace_mode), except the
    trace file (TraceSettingNotSettable). Every change is checked before any is made."""
    parsed: dict[str, Any] = {}
    for name, value in changes.items():
        if name == "trace_file":
            raise TraceSettingNotSettable(FILE_NOT_SETTABLE)
        setting = SETTABLE.get(name)
        if setting is None:
            continue
        if value is None:
            parsed[setting] = None
        elif setting == "level":
            level = parse_level(value)
            if level is not None:
                parsed[setting] = level
        else:
            parsed[setting] = parse_number(name, value)
    return parsed


def changes_from_grpc(settings: Mapping[str, Iterable[str]]) -> dict[str, Any]:
    """A TraceSettingRequest's settings (name -> its SettingValue's values) in the JSON form
    parse_changes reads: no value clears a setting; only trace_level takes several."""
    changes: dict[str, Any] = {}
    for name, values in settings.items():
        values = list(values)
        if not values:
            changes[name] = None
        elif name == "trace_level":
            changes[name] = values
        elif len(values) > 1:
            raise InvalidTraceSetting(f"expect only 1 value for '{name}'")
        else:
            changes[name] = values[0]
    return changes


CONFIG_FORMAT = "--trace-config takes <setting>=<value> or <mode>,<setting>=<value>"
LEVEL_WORDS = {"off": None, "false": None, "timestamps": TIMESTAMPS, "true": TIMESTAMPS, "on": TIMESTAMPS,
               "min": TIMESTAMPS, "max": TIMESTAMPS, "tensors": TENSORS}  # Triton's command line words
MODE_SETTINGS = {TRITON_MODE: ("file", "log-frequency"),
                 OPENTELEMETRY_MODE: ("url", "resource", "bsp_max_queue_size", "bsp_schedule_delay",
                                      "bsp_max_export_batch_size")}
MODES_SUPPORTED = "the modes are triton and opentelemetry"
OPENTELEMETRY_PACKAGES = "opentelemetry-sdk and opentelemetry-exporter-otlp-proto-http (plansmith[runtime])"


def parse_trace_config(entries: Iterable[str]) -> TraceSettings:
    """Triton's --trace-config settings: level= (repeatable), rate=, count=, mode=triton|opentelemetry,
    triton,file= and triton,log-frequency=, and opentelemetry,url=, opentelemetry,resource=KEY=VALUE
    (repeatable) and opentelemetry,bsp_max_queue_size|bsp_schedule_delay|bsp_max_export_batch_size=.
    A level that would trace needs a file and a rate in mode triton."""
    fields: dict[str, Any] = {}
    level: set[str] = set()
    mode = TRITON_MODE
    mode_settings: dict[str, dict[str, Any]] = {TRITON_MODE: {}, OPENTELEMETRY_MODE: {}}
    for entry in entries:
        prefix, comma, setting = entry.partition(",")
        if not comma:
            prefix, setting = "", entry
        name, equals, value = setting.partition("=")
        if not equals or not name or not value or (comma and not prefix):
            raise InvalidTraceSetting(f"{CONFIG_FORMAT}, got {entry!r}")
        if prefix:
            if prefix not in MODE_SETTINGS:
                raise InvalidTraceSetting(f"trace mode {prefix!r} is not supported: {MODES_SUPPORTED}")
            if name not in MODE_SETTINGS[prefix]:
                raise InvalidTraceSetting(f"unknown {prefix} trace setting {name!r} in {entry!r}: "
                                          f"{', '.join(MODE_SETTINGS[prefix])} are")
            if name == "resource":  # KEY=VALUE, repeatable: a key given again takes its last value
                key, attribute = parse_resource_attribute(value)
                mode_settings[prefix].setdefault(name, {})[key] = attribute
            else:
                mode_settings[prefix][name] = value
        elif name == "level":
            word = value.lower()
            if word not in LEVEL_WORDS:
                raise InvalidTraceSetting(f"invalid value for trace level option: {value}")
            if LEVEL_WORDS[word] is None:
                level.clear()
            else:
                level.add(LEVEL_WORDS[word])
        elif name == "mode":
            if value not in MODE_SETTINGS:
                raise InvalidTraceSetting(f"trace mode {value!r} is not supported: {MODES_SUPPORTED}")
            mode = value
        elif name in ("rate", "count"):
            key = f"trace_{name}"
            fields[SETTABLE[key]] = parse_number(key, value)
        else:
            raise InvalidTraceSetting(f"unknown trace setting {name!r} in {entry!r}: level, rate, count and mode are, "
                                      "and the modes' own (triton,file=, opentelemetry,url=, ...)")
    other = OPENTELEMETRY_MODE if mode == TRITON_MODE else TRITON_MODE
    if mode_settings[other]:
        given = ", ".join(f"{other},{name}" for name in mode_settings[other])
        raise InvalidTraceSetting(f"{given} applies to trace mode {other}, and the trace mode is {mode}"
                                  + (" (give mode=opentelemetry)" if other == OPENTELEMETRY_MODE else ""))
    if mode == TRITON_MODE:
        triton = mode_settings[TRITON_MODE]
        if "file" in triton:
            fields["file"] = triton["file"]
        if "log-frequency" in triton:
            fields["log_frequency"] = parse_number("log_frequency", triton["log-frequency"])
    else:
        fields["opentelemetry"] = opentelemetry_config(mode_settings[OPENTELEMETRY_MODE])
    settings = TraceSettings(level=frozenset(level), mode=mode, **fields)
    check_mode_supports(settings)
    if settings.level and (reason := settings.idle_reason()):
        raise InvalidTraceSetting(f"--trace-config level={'+'.join(sorted(settings.level))} would trace nothing: {reason}")
    return settings


def parse_resource_attribute(value: str) -> tuple[str, str]:
    key, equals, attribute = value.partition("=")
    if not equals or not key:
        raise InvalidTraceSetting(f"opentelemetry,resource takes KEY=VALUE (service.name=resnet), got {value!r}")
    return key, attribute


def opentelemetry_config(settings: Mapping[str, Any], environment: Mapping[str, str] = os.environ
                         ) -> OpenTelemetryConfig:
    """The OpenTelemetry mode's settings (the opentelemetry,NAME=VALUE entries by name; "resource" a
    dict of attributes), checked: positive sizes, a batch no larger than the queue (Triton drops the
    spans that do not fit), and the SDK installed. A batch span processor setting the command line
    leaves out comes from the SDK's environment variable, else its default."""
    numbers: dict[str, int] = {}
    for name, (variable, default) in BATCH_SPAN_PROCESSOR.items():
        given = f"opentelemetry,{name}" if name in settings else variable
        number = parse_number(given, settings.get(name, environment.get(variable, default)))
        if number == 0:
            raise InvalidTraceSetting(f"{given} must be at least 1, got 0")
        numbers[name] = number
    if numbers["bsp_max_export_batch_size"] > numbers["bsp_max_queue_size"]:
        raise InvalidTraceSetting(f"bsp_max_export_batch_size must not exceed bsp_max_queue_size "
                                  f"({numbers['bsp_max_export_batch_size']} > {numbers['bsp_max_queue_size']}): "
                                  "the spans that do not fit are lost")
    url = settings.get("url", OpenTelemetryConfig.url)
    if "://" not in url:  # Triton's form, host:port/path
        url = f"http://{url}"
    try:  # the exporter imports them when the server starts: a missing one is refused here, with the flags
        for module in ("opentelemetry.sdk.trace", "opentelemetry.exporter.otlp.proto.http.trace_exporter"):
            importlib.import_module(module)
    except ImportError as error:
        raise InvalidTraceSetting(f"trace mode opentelemetry needs {OPENTELEMETRY_PACKAGES}: {error}") from None
    return OpenTelemetryConfig(url=url, resource=tuple(settings.get("resource", {}).items()), **numbers)


def check_mode_supports(settings: TraceSettings) -> None:
    if settings.mode == OPENTELEMETRY_MODE and TENSORS in settings.level:
        raise InvalidTraceSetting("trace level TENSORS is not supported in trace mode opentelemetry: tensors are "
                                  "written to Triton's trace files only (mode triton)")


# ---------------------------------------------------------------------- traces


def tensor_text(array: np.ndarray) -> str:
    """A tensor's elements as Triton's TENSORS traces write them: comma-separated, as C++ streams
    print them (6 significant digits for floats, 0/1 for BOOL, BYTES elements in quotes). INT8 and
    UINT8 are written as numbers and FP16 too, where Triton streams the first as characters and
    leaves the second empty."""
    flat = np.asarray(array).reshape(-1)
    kind = flat.dtype.kind
    if kind == "f":
        return ",".join(format(value, "g") for value in flat.tolist())
    if kind == "b":
        return ",".join("1" if value else "0" for value in flat.tolist())
    if kind in "OSU":
        return ",".join('"' + (value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)) + '"'
                        for value in flat.tolist())
    return ",".join(map(str, flat.tolist()))


class Trace:
    """One sampled request: its timestamps and tensors, written out when the request is answered."""

    __slots__ = ("id", "model", "version", "request_id", "parent", "timestamps", "tensors", "_sampler",
                 "_timestamp_level", "_tensor_level", "_done")

    def __init__(self, trace_id: int, sampler: Sampler, model: str, version: str, request_id: str,
                 parent: object | None = None) -> None:
        self.id, self.model, self.version, self.request_id = trace_id, model, version, request_id
        self.parent = parent  # the OpenTelemetry context a client propagated, or None
        self._sampler = sampler
        self.timestamps: list[tuple[str, int]] = []
        self.tensors: list[dict[str, Any]] = []
        self._timestamp_level = TIMESTAMPS in sampler.settings.level
        self._tensor_level = TENSORS in sampler.settings.level
        self._done = False

    def stamp(self, name: str, ns: int) -> None:
        if self._timestamp_level:
            self.timestamps.append((name, ns))

    def record_tensors(self, activity: str, arrays: Mapping[str, np.ndarray]) -> None:
        """At level TENSORS, the tensors as they are now (formatted at once: a request's inputs may
        be views of a receive buffer that the next request reuses)."""
        if self._tensor_level:
            # imported here: protocol imports the batching settings, whose ServingConfig holds TraceSettings
            from plansmith_runtime.protocol import datatype_of

            for name, array in arrays.items():
                self.tensors.append({"id": self.id, "activity": activity, "tensor": {
                    "name": name, "data": tensor_text(array), "shape": ",".join(map(str, np.shape(array))),
                    "dtype": datatype_of(np.asarray(array).dtype)}})

    def sent(self, start_ns: int | None, end_ns: int | None, start: str, end: str) -> None:
        """The response left (its send's start and end), or was not sent (None): the trace is complete."""
        if start_ns is not None and end_ns is not None:
            self.stamp(start, start_ns)
            self.stamp(end, end_ns)
        self.finish()

    def sent_over_http(self, start_ns: int | None, end_ns: int | None) -> None:
        self.sent(start_ns, end_ns, HTTP_SEND_START, HTTP_SEND_END)

    def sent_over_grpc(self, start_ns: int | None, end_ns: int | None) -> None:
        self.sent(start_ns, end_ns, GRPC_SEND_START, GRPC_SEND_END)

    def finish(self) -> None:
        if not self._done:
            self._done = True
            self._sampler.collect(self)

    def to_json(self) -> bytes:
        """The trace's objects, comma-separated, as they go into a trace file's array."""
        header: dict[str, Any] = {"id": self.id, "model_name": self.model,
                                  "model_version": int(self.version) if self.version.isdigit() else self.version}
        if self.request_id:
            header["request_id"] = self.request_id
        objects = [header, *({"id": self.id, "timestamps": [{"name": name, "ns": ns}]} for name, ns in self.timestamps),
                   *self.tensors]
        return b",".join(map(orjson.dumps, objects))


class TraceFile:
    """Where one trace file's traces go: numbered files FILE.0, FILE.1, ... (log_frequency), or
    FILE itself, appended to while the server runs. FILE stays a valid JSON array after every
    append: the closing bracket is written each time and overwritten by the next append."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.next_index = 0
        self._appended = False

    def write_numbered(self, chunks: list[bytes]) -> str:
        path = f"{self.path}.{self.next_index}"
        self.next_index += 1
        with open(path, "wb") as out:
            out.write(b"[" + b",".join(chunks) + b"]")
        return path

    def append(self, chunks: list[bytes]) -> str:
        body = b",".join(chunks)
        if not self._appended:
            with open(self.path, "wb") as out:
                out.write(b"[" + body + b"]")
            self._appended = True
        else:
            with open(self.path, "r+b") as out:
                out.seek(-1, os.SEEK_END)
                out.write(b"," + body + b"]")
        return self.path


class TraceExporter(Protocol):
    """Where the OpenTelemetry mode's traces go (opentelemetry_traces.OpenTelemetryExporter)."""

    def parent_context(self, traceparent: str, tracestate: str | None) -> object | None: ...

    def export(self, trace: Trace) -> None: ...

    def close(self) -> None: ...


@dataclass(eq=False)
class Sampler:
    """Picks the requests one set of settings traces and collects their traces: the global settings'
    sampler serves every model without an override of its own. Traces go to a trace file (mode
    triton) or to the exporter (mode opentelemetry)."""

    settings: TraceSettings
    file: TraceFile | None
    ids: Iterator[int]  # trace ids, shared by every sampler of the server
    exporter: TraceExporter | None = None
    remaining: int = field(init=False)  # traces left to take; -1: no limit
    traces: bool = field(init=False)  # the settings trace (a level, a rate, a file)
    seen: int = 0  # requests sampled from
    created: int = 0
    collected: int = 0
    _chunks: list[bytes] = field(default_factory=list)  # collected traces not written yet
    _closed: bool = False  # replaced by new settings, or the server stopped: write what still comes at once

    def __post_init__(self) -> None:
        self.remaining = self.settings.count
        self.traces = self.settings.idle_reason() is None

    def sample(self, model: str, version: str, request_id: str, parent: object | None = None) -> Trace | None:
        """A trace for this request, or None. A request with a propagated context (`parent`) is
        traced whatever the rate and the count left, and counts against neither (Triton's rule)."""
        if parent is not None:
            return Trace(next(self.ids), self, model, version, request_id, parent)
        if self.remaining == 0 or self.settings.rate == 0:
            return None
        self.seen += 1
        if self.seen % self.settings.rate:
            return None
        if self.remaining > 0:
            self.remaining -= 1
        self.created += 1
        return Trace(next(self.ids), self, model, version, request_id)

    def collect(self, trace: Trace) -> None:
        if self.exporter is not None:  # the SDK's batch span processor batches and sends them
            self.exporter.export(trace)
            return
        self._chunks.append(trace.to_json())
        self.collected += 1
        frequency = self.settings.log_frequency
        if (frequency and len(self._chunks) >= frequency) or (self.remaining == 0 and self.collected == self.created):
            self._write(numbered=True)
        elif self._closed or (not frequency and len(self._chunks) >= HELD_TRACES):
            self._write(numbered=bool(frequency))

    def close(self) -> None:
        """Write what is left: numbered like the rest with a log_frequency, else appended to FILE. A
        trace of a request still running when its sampler closes is written when it completes."""
        self._closed = True
        if self._chunks:
            self._write(numbered=bool(self.settings.log_frequency))

    def _write(self, numbered: bool) -> None:
        chunks, self._chunks = self._chunks, []
        if self.file is None:
            return
        try:
            path = self.file.write_numbered(chunks) if numbered else self.file.append(chunks)
        except OSError as error:  # a full disk or a missing folder loses these traces, not the request
            log.error("cannot write traces: %s", error, extra={"traces": len(chunks), "trace_file": self.file.path})
            return
        log.debug("traces written", extra={"traces": len(chunks), "trace_file": path})

    def as_triton(self) -> dict[str, str | list[str]]:
        return self.settings.as_triton(self.remaining)


class TraceControl:
    """The server's trace settings (global, and per model) and their samplers."""

    def __init__(self, startup: TraceSettings, models: Iterable[str], version: str,
                 exporter: TraceExporter | None = None) -> None:
        """`exporter`: where traces go in mode opentelemetry (default: an OpenTelemetryExporter of
        the startup settings)."""
        self.startup = startup  # what a cleared global setting returns to
        self.version = version
        self.models = frozenset(models)
        if exporter is None and startup.mode == OPENTELEMETRY_MODE:
            from plansmith_runtime.opentelemetry_traces import OpenTelemetryExporter

            exporter = OpenTelemetryExporter(startup.opentelemetry, version)
        self.exporter = exporter
        self._global = startup
        self._overrides: dict[str, dict[str, Any]] = {}  # model -> the settings it sets itself
        self._files: dict[str, TraceFile] = {}
        self._ids = itertools.count(1)
        self._global_sampler = self._sampler(startup)
        self._model_samplers: dict[str, Sampler] = {}
        self.active: dict[str, Sampler] = {}  # model -> its sampler, for the models whose settings trace
        self._refresh_active()

    def start(self, model: str, request_id: str, traceparent: str | None = None,
              tracestate: str | None = None) -> Trace | None:
        """A trace for this request of `model`, if it is sampled or carries a trace context (its
        W3C traceparent and tracestate; called for every inference request)."""
        sampler = self.active.get(model)
        if sampler is None:
            return None
        parent = None
        if traceparent is not None and self.exporter is not None:
            parent = self.exporter.parent_context(traceparent, tracestate)
        return sampler.sample(model, self.version, request_id, parent)

    def settings(self, model: str | None = None) -> dict[str, str | list[str]]:
        self._check_model(model)
        return self._sampler_of(model).as_triton()

    def update(self, model: str | None, changes: Mapping[str, Any]) -> dict[str, str | list[str]]:
        """Apply Triton-named changes to the global settings (model None) or to a model's override;
        InvalidTraceSetting, and nothing changed, for a bad one. The settings as they are now."""
        self._check_model(model)
        parsed = parse_changes(changes)
        if parsed and model:
            self._update_model(model, parsed)
        elif parsed:
            self._update_global(parsed)
        return self.settings(model)

    def close(self) -> None:
        """Write every trace collected and not yet written (the server is stopping)."""
        for sampler in {self._global_sampler, *self._model_samplers.values()}:
            sampler.close()
        if self.exporter is not None:
            self.exporter.close()

    def _check_model(self, model: str | None) -> None:
        if model and model not in self.models:
            raise InvalidTraceSetting(f"Request for unknown model : {model}")

    def _sampler_of(self, model: str | None) -> Sampler:
        return self._model_samplers.get(model, self._global_sampler) if model else self._global_sampler

    def _sampler(self, settings: TraceSettings) -> Sampler:
        file = None
        if settings.file:
            file = self._files.setdefault(settings.file, TraceFile(settings.file))
        return Sampler(settings, file, self._ids, self.exporter)

    @staticmethod
    def _checked(settings: TraceSettings) -> TraceSettings:
        check_mode_supports(settings)
        reason = settings.idle_reason()
        if reason and settings.level:
            raise InvalidTraceSetting(f"Attempting to set invalid trace setting: {reason}")
        return settings

    def _update_model(self, model: str, parsed: dict[str, Any]) -> None:
        override = {name: value for name, value in {**self._overrides.get(model, {}), **parsed}.items()
                    if value is not None}
        settings = replace(self._global, **override)
        if "count" not in parsed:  # trace_count is a budget of traces left: other changes do not refill it
            settings = replace(settings, count=self._sampler_of(model).remaining)
        settings = self._checked(settings)
        old = self._model_samplers.pop(model, None)
        if override:
            self._overrides[model] = override
            self._model_samplers[model] = self._sampler(settings)
        else:  # every setting cleared: the model follows the global settings again
            self._overrides.pop(model, None)
        if old is not None:
            old.close()
        self._refresh_active()

    def _update_global(self, parsed: dict[str, Any]) -> None:
        fields = {name: getattr(self.startup, name) if value is None else value for name, value in parsed.items()}
        # trace_count is a budget of traces left (Triton carries count_ over): other changes do not refill
        # it, the global one or a model's own
        fields.setdefault("count", self._global_sampler.remaining)
        settings = self._checked(replace(self._global, **fields))

        def with_override(model: str, override: dict[str, Any]) -> TraceSettings:
            merged = replace(settings, **override)
            if "count" in override:  # the model's own budget: what it has left
                merged = replace(merged, count=self._model_samplers[model].remaining)
            return self._checked(merged)

        overridden = {model: with_override(model, override) for model, override in self._overrides.items()}
        old = [self._global_sampler, *self._model_samplers.values()]
        self._global = settings
        self._global_sampler = self._sampler(settings)
        # a model's override follows the global settings it leaves out: its sampler starts again too
        self._model_samplers = {model: self._sampler(merged) for model, merged in overridden.items()}
        for sampler in old:
            sampler.close()
        self._refresh_active()

    def _refresh_active(self) -> None:
        self.active = {model: sampler for model in self.models if (sampler := self._sampler_of(model)).traces}
