"""KServe v2 HTTP routing (pure) and the API's answers for paths, methods and a model not loaded yet."""

from __future__ import annotations

import json
import logging

import pytest

from plansmith_runtime.config import BatchingPolicy, ServingConfig
from plansmith_runtime.http_api import HttpApi, Route, route
from plansmith_runtime.http_transport import HttpRequest, HttpResponse
from plansmith_runtime.log_settings import LogControl, LogSettings
from plansmith_runtime.model import ServedModel
from plansmith_runtime.shared_memory import SharedMemoryRegions
from plansmith_runtime.tracing import TraceControl, TraceSettings


@pytest.mark.parametrize("path, expected", [
    ("/v2", Route("server_metadata")),
    ("/v2/", Route("server_metadata")),
    ("/v2/health/live", Route("live")),
    ("/v2/health/ready", Route("ready")),
    ("/v2/models/resnet", Route("model_metadata", "resnet")),
    ("/v2/models/resnet/versions/3", Route("model_metadata", "resnet", "3")),
    ("/v2/models/resnet/ready", Route("model_ready", "resnet")),
    ("/v2/models/resnet/versions/1/ready", Route("model_ready", "resnet", "1")),
    ("/v2/models/resnet/config", Route("model_config", "resnet")),
    ("/v2/models/resnet/versions/1/config", Route("model_config", "resnet", "1")),
    ("/v2/models/resnet/infer", Route("infer", "resnet")),
    ("/v2/trace/setting", Route("trace_settings")),
    ("/v2/models/resnet/trace/setting", Route("trace_settings", "resnet")),
    ("/v2/models/resnet/versions/1/infer", Route("infer", "resnet", "1")),
    ("/v2/models/stats", Route("model_statistics")),
    ("/v2/models/resnet/stats", Route("model_statistics", "resnet")),
    ("/v2/models/resnet/versions/1/stats", Route("model_statistics", "resnet", "1")),
    ("/v2/systemsharedmemory/status", Route("shared_memory_status")),
    ("/v2/systemsharedmemory/unregister", Route("shared_memory_unregister")),
    ("/v2/systemsharedmemory/region/images/status", Route("shared_memory_status", region="images")),
    ("/v2/systemsharedmemory/region/images/register", Route("shared_memory_register", region="images")),
    ("/v2/systemsharedmemory/region/images/unregister", Route("shared_memory_unregister", region="images")),
    ("/v2/cudasharedmemory/status", Route("shared_memory_status", shared_memory="cuda")),
    ("/v2/cudasharedmemory/unregister", Route("shared_memory_unregister", shared_memory="cuda")),
    ("/v2/cudasharedmemory/region/images/register", Route("shared_memory_register", region="images",
                                                          shared_memory="cuda")),
    ("/v2/repository/index", Route("repository_index")),
    ("/v2/repository/models/resnet/load", Route("repository_load", "resnet")),
    ("/v2/repository/models/resnet/unload", Route("repository_unload", "resnet")),
    ("/v2/logging", Route("log_settings")),
])
def test_route_names_every_kserve_v2_endpoint(path, expected):
    assert route(path) == expected


@pytest.mark.parametrize("path", [
    "/", "/v1/models/resnet", "/v2/health", "/v2/health/dead", "/v2/models", "/v2/models/", "/v2/models//infer",
    "/v2/models/resnet/versions", "/v2/models/resnet/versions//infer", "/v2/models/resnet/explain",
    "/v2/models/resnet/infer/more", "/v2/systemsharedmemory",
    "/v2/systemsharedmemory/region/images", "/v2/systemsharedmemory/region//register",
    "/v2/systemsharedmemory/region/images/delete", "/v2/cudasharedmemory/region//status", "/v2/repository",
    "/v2/repository/models/resnet", "/v2/repository/models//load", "/v2/repository/models/resnet/reload",
    "/v2/trace", "/v2/models/resnet/trace", "/v2/models/resnet/versions/1/trace/setting",
])
def test_route_rejects_unknown_paths(path):
    assert route(path) is None


@pytest.fixture
def api():
    model = ServedModel(ServingConfig("resnet", BatchingPolicy()))
    return HttpApi(model, lambda: model.ready, SharedMemoryRegions(), LogControl(LogSettings(), [], logging.getLogger("test-http-api")),
                   TraceControl(TraceSettings(), [model.name], model.version))


def request(method: str, path: str, body: bytes = b"") -> HttpRequest:
    return HttpRequest(method, path, {}, body)


async def answer(api: HttpApi, request: HttpRequest) -> HttpResponse:
    """As the transport does: an inference answers through a coroutine, every other endpoint at once."""
    response = api.handle(request)
    return response if isinstance(response, HttpResponse) else await response


def test_only_an_inference_answers_through_a_coroutine(api):
    assert isinstance(api.handle(request("GET", "/v2/health/live")), HttpResponse)
    assert isinstance(api.handle(request("GET", "/v2/nothing")), HttpResponse)
    pending = api.handle(request("POST", "/v2/models/resnet/infer", b'{"inputs": []}'))
    assert not isinstance(pending, HttpResponse)
    pending.close()  # never awaited here


async def test_unknown_path_is_404_and_wrong_method_is_405_with_allow(api):
    missing = await answer(api, request("GET", "/v2/nothing"))
    assert missing.status == 404 and json.loads(missing.body) == {"error": "no endpoint at /v2/nothing"}
    wrong = await answer(api, request("GET", "/v2/models/resnet/infer"))
    assert wrong.status == 405 and dict(wrong.headers) == {"Allow": "POST"}
    assert (await answer(api, request("POST", "/v2/health/live"))).status == 405


async def test_trace_settings_take_a_json_object_and_get_or_post(api):
    refused = await answer(api, request("POST", "/v2/trace/setting", b'["trace_rate", "1"]'))
    assert refused.status == 400 and "trace settings are a JSON object" in json.loads(refused.body)["error"]
    unparsable = await answer(api, request("POST", "/v2/models/resnet/trace/setting", b"{rate"))
    assert unparsable.status == 400 and "failed to parse" in json.loads(unparsable.body)["error"]
    wrong = await answer(api, request("PUT", "/v2/trace/setting"))
    assert wrong.status == 405 and dict(wrong.headers) == {"Allow": "GET, POST"}
    read = await answer(api, request("GET", "/v2/models/resnet/trace/setting"))
    assert read.status == 200 and json.loads(read.body)["trace_level"] == ["OFF"]


async def test_a_model_still_loading_is_live_not_ready_and_refuses_inference(api):
    live = await answer(api, request("GET", "/v2/health/live"))
    assert live.status == 200 and json.loads(live.body) == {"live": True}
    assert (await answer(api, request("GET", "/v2/health/ready"))).status == 503
    assert (await answer(api, request("GET", "/v2/models/resnet/ready"))).status == 503
    infer = await answer(api, request("POST", "/v2/models/resnet/infer", b'{"inputs": []}'))
    assert infer.status == 503 and "is not ready" in json.loads(infer.body)["error"]
    other = await answer(api, request("POST", "/v2/models/other/infer", b'{"inputs": []}'))
    assert other.status == 404 and "unknown model: 'other'" in json.loads(other.body)["error"]
    # as Triton's model ready endpoint, an unknown model or version is not ready: 400
    version = await answer(api, request("GET", "/v2/models/resnet/versions/7/ready"))
    assert version.status == 400 and "'resnet' version 7 is not found" in json.loads(version.body)["error"]


@pytest.mark.parametrize("kind, body, message", [
    ("systemsharedmemory", b"{not json", "failed to parse"),
    ("systemsharedmemory", b"[1, 2]", "JSON object with key, offset and byte_size"),
    ("systemsharedmemory", b'{"offset": 0, "byte_size": 16}', "is not a shared memory object name"),
    ("systemsharedmemory", b'{"key": "/k", "offset": 0}', "byte_size must be a non-negative integer"),
    ("systemsharedmemory", b'{"key": "/k", "offset": "0", "byte_size": 16}', "offset must be a non-negative integer"),
    ("cudasharedmemory", b"[1]", "JSON object with raw_handle"),
    ("cudasharedmemory", b'{"device_id": 0, "byte_size": 16}', 'raw_handle must be {"b64"'),
    ("cudasharedmemory", b'{"raw_handle": {"b64": "%%"}, "device_id": 0, "byte_size": 16}', "raw_handle is not base64"),
    ("cudasharedmemory", b'{"raw_handle": {"b64": "AAAA"}, "device_id": 0, "byte_size": 16}',
     "64-byte cudaIpcMemHandle_t"),
])
def test_a_bad_shared_memory_registration_is_400_and_registers_nothing(api, kind, body, message):
    response = api.handle(request("POST", f"/v2/{kind}/region/images/register", body))
    assert response.status == 400 and message in json.loads(response.body)["error"]
    assert api.shared_memory.system.status() == [] and api.shared_memory.cuda.status() == []
    assert api.handle(request("GET", f"/v2/{kind}/region/images/register")).status == 405
    status = api.handle(request("GET", f"/v2/{kind}/region/images/status"))
    kind_name = {"systemsharedmemory": "system", "cudasharedmemory": "CUDA"}[kind]
    assert status.status == 404  # Triton's NOT_FOUND
    assert f"unable to find {kind_name} shared memory region" in json.loads(status.body)["error"]
    assert api.handle(request("POST", f"/v2/{kind}/unregister")).status == 200


def test_the_repository_index_reports_a_loading_model_with_its_reason(api):
    everything = api.handle(request("POST", "/v2/repository/index"))
    assert json.loads(everything.body) == [{"name": "resnet", "version": "1", "state": "LOADING",
                                            "reason": "loading the engine"}]
    assert json.loads(api.handle(request("POST", "/v2/repository/index", b'{"ready": true}')).body) == []
    assert api.handle(request("POST", "/v2/repository/index", b"[1]")).status == 400
    refused = api.handle(request("POST", "/v2/repository/models/resnet/unload"))
    assert refused.status == 400 and "serves the one model" in json.loads(refused.body)["error"]


def test_the_logging_endpoint_reads_and_changes_the_log_settings(api):
    current = api.handle(request("GET", "/v2/logging"))
    assert current.status == 200 and json.loads(current.body)["log_verbose_level"] == 0
    changed = api.handle(request("POST", "/v2/logging", b'{"log_verbose_level": 1, "log_info": null}'))
    assert changed.status == 200 and json.loads(changed.body) == {
        "log_file": "", "log_info": True, "log_warning": True, "log_error": True, "log_verbose_level": 1,
        "log_format": "default"}
    assert api.log_control.settings.verbose_level == 1
    for body, message in ((b"{bad", "failed to parse"), (b"[1]", "JSON object"),
                          (b'{"log_file": "/var/log/x"}', "can not be updated")):
        refused = api.handle(request("POST", "/v2/logging", body))
        assert refused.status == 400 and message in json.loads(refused.body)["error"]
    assert api.log_control.settings.verbose_level == 1
    wrong = api.handle(request("PUT", "/v2/logging"))
    assert wrong.status == 405 and dict(wrong.headers) == {"Allow": "GET, POST"}
