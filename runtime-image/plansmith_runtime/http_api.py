"""The KServe v2 HTTP/REST front end, as Triton speaks it (served by `http_transport`), plus the
metrics endpoint (aiohttp: a scrape every few seconds needs no fast path)."""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from typing import Awaitable

import numpy as np
import orjson
from aiohttp import web

from plansmith_runtime import __version__ as runtime_version
from plansmith_runtime import tracing
from plansmith_runtime.classification import classify_outputs
from plansmith_runtime.cuda_shared_memory import CudaSharedMemory, cuda_raw_handle
from plansmith_runtime.http_transport import (HttpRequest, HttpResponse, accepted_encoding, compress_response,
                                              error_response, json_response)
from plansmith_runtime.log_settings import InvalidLogSetting, LogControl
from plansmith_runtime.model import ModelNotReady, ServedModel
from plansmith_runtime.protocol import (HEADER_CONTENT_LENGTH, InvalidRequest, ModelNotFound, NotFound, SharedMemoryError,
                                        decode_http_request, encode_http_response)
from plansmith_runtime.scheduler import ExecutionFailed, QueueFull, RequestTimedOut, ShuttingDown
from plansmith_runtime.shared_memory import SharedMemoryRegions, SystemSharedMemory
from plansmith_runtime.system_metrics import SystemMetrics
from plansmith_runtime.tracing import InvalidTraceSetting, TraceControl, TraceSettingNotSettable

log = logging.getLogger(__name__)

SERVER_NAME = "plansmith"
EXTENSIONS = ["binary_tensor_data", "classification", "cuda_shared_memory", "logging", "model_configuration",
              "model_repository", "statistics", "system_shared_memory", "trace"]
MAX_BODY_BYTES = 256 << 20
_HEADER_CONTENT_LENGTH = HEADER_CONTENT_LENGTH.lower()
# What an inference answers with an error status (HTTP here, gRPC in grpc_api) instead of failing
INFERENCE_ERRORS = (InvalidRequest, ModelNotReady, QueueFull, ShuttingDown, RequestTimedOut, ExecutionFailed)


def error_status(error: BaseException) -> int:
    if isinstance(error, NotFound):
        return 404
    if isinstance(error, InvalidRequest):
        return 400
    if isinstance(error, (QueueFull, ModelNotReady, ShuttingDown, RequestTimedOut)):
        return 503
    return 500


def json_object(body: bytes | memoryview, expected: str) -> dict:
    """A request body that must be a JSON object; InvalidRequest saying `expected` when it is not."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise InvalidRequest(f"failed to parse the request JSON: {error}") from None
    if not isinstance(document, dict):
        raise InvalidRequest(expected)
    return document


def server_metadata() -> dict:
    return {"name": SERVER_NAME, "version": runtime_version, "extensions": EXTENSIONS}


@dataclass(frozen=True)
class Route:
    endpoint: str  # a method of HttpApi: live, ready, model_metadata, infer, shared_memory_register, ...
    model: str | None = None  # for model_statistics, None: every model
    version: str | None = None
    region: str | None = None  # for shared_memory_status and _unregister, None: every region
    shared_memory: str = "system"  # the shared_memory_* endpoints' kind of region: system or cuda


MODEL_ENDPOINTS = {"": "model_metadata", "ready": "model_ready", "config": "model_config", "infer": "infer",
                   "stats": "model_statistics"}
SHARED_MEMORY_ACTIONS = ("status", "register", "unregister")
POST = ("POST",)
METHODS = {"infer": POST, "shared_memory_register": POST, "shared_memory_unregister": POST, "repository_index": POST,
           "repository_load": POST, "repository_unload": POST, "log_settings": ("GET", "POST"),
           "trace_settings": ("GET", "POST")}  # others: GET
TAKES_BODY = frozenset({"infer", "shared_memory_register", "repository_index", "log_settings", "trace_settings"})
SHARED_MEMORY_KINDS = {"systemsharedmemory": "system", "cudasharedmemory": "cuda"}
TRACE_SETTING = ["trace", "setting"]


@functools.lru_cache(maxsize=1024)  # clients repeat a handful of paths: a hit skips the split and compares
def route(path: str) -> Route | None:
    """The endpoint a request path names (Triton's KServe v2 paths), None for an unknown path."""
    parts = path.rstrip("/").split("/")
    if parts[:2] != ["", "v2"]:
        return None
    rest = parts[2:]
    if not rest:
        return Route("server_metadata")
    if rest == ["health", "live"]:
        return Route("live")
    if rest == ["health", "ready"]:
        return Route("ready")
    if rest == ["logging"]:
        return Route("log_settings")
    if rest == TRACE_SETTING:
        return Route("trace_settings")
    if rest[0] in SHARED_MEMORY_KINDS:
        return _shared_memory_route(SHARED_MEMORY_KINDS[rest[0]], rest[1:])
    if rest == ["models", "stats"]:
        return Route("model_statistics")
    if rest == ["repository", "index"]:
        return Route("repository_index")
    if len(rest) == 4 and rest[:2] == ["repository", "models"] and rest[2] and rest[3] in ("load", "unload"):
        return Route(f"repository_{rest[3]}", rest[2])
    if rest[0] != "models" or len(rest) < 2 or not rest[1]:
        return None
    name, rest = rest[1], rest[2:]
    if rest == TRACE_SETTING:
        return Route("trace_settings", name)
    version = None
    if rest[:1] == ["versions"]:
        if len(rest) < 2 or not rest[1]:
            return None
        version, rest = rest[1], rest[2:]
    if len(rest) > 1 or (rest and rest[0] not in MODEL_ENDPOINTS):
        return None
    return Route(MODEL_ENDPOINTS[rest[0] if rest else ""], name, version)


def _shared_memory_route(kind: str, rest: list[str]) -> Route | None:
    """v2/{system,cuda}sharedmemory/{status,unregister} and .../region/{name}/{status,register,unregister}."""
    if rest in (["status"], ["unregister"]):
        return Route(f"shared_memory_{rest[0]}", shared_memory=kind)
    if len(rest) == 3 and rest[0] == "region" and rest[1] and rest[2] in SHARED_MEMORY_ACTIONS:
        return Route(f"shared_memory_{rest[2]}", region=rest[1], shared_memory=kind)
    return None


class HttpApi:
    def __init__(self, model: ServedModel, is_ready, shared_memory: SharedMemoryRegions, log_control: LogControl,
                 trace_control: TraceControl) -> None:
        self.model = model
        self.is_ready = is_ready  # callable: server accepting requests and model ready
        self.shared_memory = shared_memory  # the server's regions, shared with the gRPC front end
        self.log_control = log_control  # the process's log settings, shared with the gRPC front end
        self.trace_control = trace_control  # the trace settings and samplers, shared with the gRPC front end

    def handle(self, request: HttpRequest) -> HttpResponse | Awaitable[HttpResponse]:
        """The answer, or for an inference the coroutine that answers once the batch has run."""
        target = route(request.path)
        if target is None:
            return error_response(404, f"no endpoint at {request.path}")
        methods = METHODS.get(target.endpoint, ("GET",))
        if request.method not in methods:
            allowed = ", ".join(methods)
            return error_response(405, f"{request.path} takes {' or '.join(methods)}", (("Allow", allowed),))
        if target.endpoint in TAKES_BODY:
            return getattr(self, target.endpoint)(target, request)
        return getattr(self, target.endpoint)(target)

    def _model(self, target: Route) -> ServedModel:
        if target.model != self.model.name:
            raise ModelNotFound(f"Request for unknown model: '{target.model}' is not found")
        self.model.check_version(target.version)
        return self.model

    def live(self, target: Route) -> HttpResponse:
        return json_response({"live": True})

    def ready(self, target: Route) -> HttpResponse:
        ready = self.is_ready()
        return json_response({"ready": ready}, 200 if ready else 503)

    def server_metadata(self, target: Route) -> HttpResponse:
        return json_response(server_metadata())

    def model_metadata(self, target: Route) -> HttpResponse:
        try:
            return json_response(self._model(target).metadata())
        except (InvalidRequest, ModelNotReady) as error:
            return error_response(error_status(error), str(error))

    def model_ready(self, target: Route) -> HttpResponse:
        try:
            model = self._model(target)
        except InvalidRequest as error:
            return error_response(400, str(error))
        ready = model.ready and self.is_ready()
        return json_response({"name": model.name, "ready": ready}, 200 if ready else 503)

    def model_config(self, target: Route) -> HttpResponse:
        from plansmith_runtime.model_config import config_as_json

        try:
            config = self._model(target).model_config()
        except InvalidRequest as error:
            return error_response(error_status(error), str(error))
        if config is None:
            return error_response(503, f"model '{self.model.name}' is not ready: {self.model.reason}")
        return json_response(config_as_json(config))

    def model_statistics(self, target: Route) -> HttpResponse:
        if target.model is None:  # every model: this server's one
            return json_response({"model_stats": self.model.statistics()})
        try:
            return json_response({"model_stats": self._model(target).statistics(named=True)})
        except InvalidRequest as error:
            return error_response(error_status(error), str(error))

    def repository_index(self, target: Route, request: HttpRequest) -> HttpResponse:
        try:
            ready_only = bool(request.body) and orjson.loads(request.body).get("ready", False)
        except (orjson.JSONDecodeError, AttributeError):
            return error_response(400, "a repository index request is empty or a JSON object like {\"ready\": true}")
        return json_response(self.model.repository_index(ready_only))

    def repository_load(self, target: Route) -> HttpResponse:
        return error_response(400, self.model.control_refusal(target.model or "", "load"))

    def repository_unload(self, target: Route) -> HttpResponse:
        return error_response(400, self.model.control_refusal(target.model or "", "unload"))

    def log_settings(self, target: Route, request: HttpRequest) -> HttpResponse:
        """Triton's logging extension: GET reads the log settings, POST changes some of them."""
        if request.method == "GET":
            return json_response(self.log_control.settings.as_triton())
        try:
            changes = json_object(request.body, 'log settings are a JSON object like {"log_verbose_level": 1}')
            return json_response(self.log_control.update(changes))
        except (InvalidRequest, InvalidLogSetting) as error:
            return error_response(400, str(error))

    def trace_settings(self, target: Route, request: HttpRequest) -> HttpResponse:
        """Triton's trace extension: GET reads the global or a model's trace settings, POST changes
        some of them (a null clears one)."""
        try:
            if request.method == "GET":
                return json_response(self.trace_control.settings(target.model))
            changes = json_object(request.body, 'trace settings are a JSON object like {"trace_rate": "100"}')
            return json_response(self.trace_control.update(target.model, changes))
        except TraceSettingNotSettable as error:
            return error_response(501, str(error))
        except (InvalidRequest, InvalidTraceSetting) as error:
            return error_response(400, str(error))

    def shared_memory_status(self, target: Route) -> HttpResponse:
        try:
            return json_response(self._regions(target).status(target.region or ""))
        except SharedMemoryError as error:
            return error_response(error_status(error), str(error))

    def shared_memory_register(self, target: Route, request: HttpRequest) -> HttpResponse:
        assert target.region is not None
        try:
            if target.shared_memory == "cuda":
                document = json_object(request.body, 'a CUDA shared memory registration is a JSON object with raw_handle '
                                                     '({"b64": ...}), device_id and byte_size')
                self.shared_memory.register_cuda(target.region, cuda_raw_handle(document.get("raw_handle")),
                                                 document.get("device_id", 0), document.get("byte_size"))
            else:
                document = json_object(request.body, "a shared memory registration is a JSON object with key, offset "
                                                     "and byte_size")
                self.shared_memory.register_system(target.region, document.get("key"), document.get("offset", 0),
                                                   document.get("byte_size"))
        except InvalidRequest as error:  # SharedMemoryError is one
            return error_response(error_status(error), str(error))
        return HttpResponse(200, b"")

    def shared_memory_unregister(self, target: Route) -> HttpResponse:
        regions = self._regions(target)
        if target.region is None:
            regions.unregister_all()
        else:
            regions.unregister(target.region)
        return HttpResponse(200, b"")

    def _regions(self, target: Route) -> SystemSharedMemory | CudaSharedMemory:
        return self.shared_memory.cuda if target.shared_memory == "cuda" else self.shared_memory.system

    async def infer(self, target: Route, request: HttpRequest) -> HttpResponse:
        trace = None
        try:
            model = self._model(target)
            decoded = decode_http_request(request.body, request.headers.get(_HEADER_CONTENT_LENGTH), self.shared_memory)
            # a client's OpenTelemetry context travels in W3C's trace context headers
            trace = self.trace_control.start(model.name, decoded.id, request.headers.get("traceparent"),
                                             request.headers.get("tracestate"))
            if trace is not None:
                trace.stamp(tracing.HTTP_RECV_START, request.receive_started_ns)
                trace.stamp(tracing.HTTP_RECV_END, request.received_ns)
            destinations = (self.shared_memory.output_destinations(decoded.shared_memory_outputs)
                            if decoded.shared_memory_outputs else None)

            def respond(outputs: dict[str, np.ndarray]) -> tuple[bytes, int | None]:
                if decoded.classifications:
                    outputs = classify_outputs(outputs, decoded.classifications, model.has_batch_dim)
                return encode_http_response(model.name, model.version, decoded, outputs, self.shared_memory)

            payload, header_length = await model.infer(decoded.inputs, decoded.outputs, trace=trace,
                                                       output_destinations=destinations, respond=respond)
        except INFERENCE_ERRORS as error:
            response = error_response(error_status(error), str(error))
            return response if trace is None else response._replace(on_sent=trace.sent_over_http)
        except BaseException:  # cancelled, or a bug answered 500 by the transport: the trace ends here
            if trace is not None:
                trace.finish()
            raise
        if header_length is None:
            response = HttpResponse(200, payload)
        else:
            response = HttpResponse(200, payload, "application/octet-stream", ((HEADER_CONTENT_LENGTH, str(header_length)),))
        # Like Triton, only a successful inference response is compressed (tritonclient's asyncio
        # client asks for gzip on every request but decompresses inference results only).
        response = compress_response(response, accepted_encoding(request.headers.get("accept-encoding")))
        if trace is None:
            return response
        trace.stamp(tracing.INFER_RESPONSE_COMPLETE, time.monotonic_ns())
        return response._replace(on_sent=trace.sent_over_http)


def metrics_app(model: ServedModel, system: SystemMetrics) -> web.Application:
    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=model.metrics.render() + system.render().encode(),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    app = web.Application()
    app.add_routes([web.get("/metrics", metrics)])
    return app
