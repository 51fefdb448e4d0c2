"""The KServe v2 HTTP/REST front end (aiohttp), as Triton speaks it, plus the metrics endpoint."""

from __future__ import annotations

import logging

from aiohttp import web

from plansmith_runtime import __version__ as runtime_version
from plansmith_runtime.model import ModelNotReady, ServedModel
from plansmith_runtime.protocol import (HEADER_CONTENT_LENGTH, InvalidRequest, ModelNotFound, decode_http_request,
                                        encode_http_response)
from plansmith_runtime.scheduler import ExecutionFailed, QueueFull, RequestTimedOut, ShuttingDown

log = logging.getLogger(__name__)

SERVER_NAME = "plansmith"
EXTENSIONS = ["binary_tensor_data", "model_configuration"]
MAX_BODY_BYTES = 256 << 20


def error_status(error: BaseException) -> int:
    if isinstance(error, InvalidRequest):
        return 400
    if isinstance(error, (QueueFull, ModelNotReady, ShuttingDown, RequestTimedOut)):
        return 503
    return 500


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def server_metadata() -> dict:
    return {"name": SERVER_NAME, "version": runtime_version, "extensions": EXTENSIONS}


class HttpApi:
    def __init__(self, model: ServedModel, is_ready) -> None:
        self.model = model
        self.is_ready = is_ready  # callable: server accepting requests and model ready

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.add_routes([
            web.get("/v2/health/live", self.live),
            web.get("/v2/health/ready", self.ready),
            web.get("/v2", self.server_metadata),
            web.get("/v2/models/{name}", self.model_metadata),
            web.get("/v2/models/{name}/versions/{version}", self.model_metadata),
            web.get("/v2/models/{name}/ready", self.model_ready),
            web.get("/v2/models/{name}/versions/{version}/ready", self.model_ready),
            web.get("/v2/models/{name}/config", self.model_config),
            web.get("/v2/models/{name}/versions/{version}/config", self.model_config),
            web.post("/v2/models/{name}/infer", self.infer),
            web.post("/v2/models/{name}/versions/{version}/infer", self.infer),
        ])
        return app

    def _model(self, request: web.Request) -> ServedModel:
        name = request.match_info["name"]
        if name != self.model.name:
            raise ModelNotFound(f"Request for unknown model: '{name}' is not found")
        self.model.check_version(request.match_info.get("version"))
        return self.model

    async def live(self, request: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def ready(self, request: web.Request) -> web.Response:
        ready = self.is_ready()
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    async def server_metadata(self, request: web.Request) -> web.Response:
        return web.json_response(server_metadata())

    async def model_metadata(self, request: web.Request) -> web.Response:
        try:
            return web.json_response(self._model(request).metadata())
        except (InvalidRequest, ModelNotReady) as error:
            return _error(error_status(error), str(error))

    async def model_ready(self, request: web.Request) -> web.Response:
        try:
            model = self._model(request)
        except InvalidRequest as error:
            return _error(400, str(error))
        ready = model.ready and self.is_ready()
        return web.json_response({"name": model.name, "ready": ready}, status=200 if ready else 503)

    async def model_config(self, request: web.Request) -> web.Response:
        from plansmith_runtime.model_config import config_as_json

        try:
            config = self._model(request).model_config()
        except InvalidRequest as error:
            return _error(400, str(error))
        if config is None:
            return _error(503, f"model '{self.model.name}' is not ready: {self.model.reason}")
        return web.json_response(config_as_json(config))

    async def infer(self, request: web.Request) -> web.Response:
        try:
            model = self._model(request)
            body = await request.read()
            decoded = decode_http_request(body, request.headers.get(HEADER_CONTENT_LENGTH))
            outputs = await model.infer(decoded.inputs, decoded.outputs)
            payload, header_length = encode_http_response(model.name, model.version, decoded, outputs)
        except (InvalidRequest, ModelNotReady, QueueFull, ShuttingDown, RequestTimedOut, ExecutionFailed) as error:
            return _error(error_status(error), str(error))
        if header_length is None:
            return web.Response(body=payload, content_type="application/json")
        return web.Response(body=payload, content_type="application/octet-stream",
                            headers={HEADER_CONTENT_LENGTH: str(header_length)})


def metrics_app(model: ServedModel) -> web.Application:
    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=model.metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    app = web.Application()
    app.add_routes([web.get("/metrics", metrics)])
    return app
