"""Triton's trace extension, without a server: parsing and checking the settings, the global and
per-model settings, sampling, the trace files, and how tensors are written."""

from __future__ import annotations

import importlib
import json
import logging

import numpy as np
import pytest

from plansmith_runtime import tracing
from plansmith_runtime.tracing import (COMPUTE_START, HTTP_SEND_END, HTTP_SEND_START, OPENTELEMETRY_MODE, REQUEST_START,
                                       TENSOR_QUEUE_INPUT, TENSORS, TIMESTAMPS, InvalidTraceSetting,
                                       OpenTelemetryConfig, Sampler, TraceControl, TraceFile, TraceSettingNotSettable,
                                       TraceSettings, changes_from_grpc, opentelemetry_config, parse_changes,
                                       parse_level, parse_number, parse_trace_config, tensor_text)


def tracing_settings(tmp_path, **fields) -> TraceSettings:
    return TraceSettings(**{"level": frozenset({TIMESTAMPS}), "rate": 1, "file": str(tmp_path / "trace.json"), **fields})


def read_json(path) -> list[dict]:
    with open(path) as file:
        return json.load(file)


def trace_ids(objects: list[dict]) -> list[int]:
    return [entry["id"] for entry in objects if "model_name" in entry]


# ---------------------------------------------------------------------- parsing


def test_settings_read_back_as_triton_writes_them():
    assert TraceSettings().as_triton() == {"trace_level": ["OFF"], "trace_rate": "1000", "trace_count": "-1",
                                           "log_frequency": "0", "trace_file": "", "trace_mode": "triton"}
    both = TraceSettings(level=frozenset({TENSORS, TIMESTAMPS}), rate=5, count=7, log_frequency=2, file="/t.json")
    assert both.as_triton(count=3) == {"trace_level": ["TIMESTAMPS", "TENSORS"], "trace_rate": "5", "trace_count": "3",
                                       "log_frequency": "2", "trace_file": "/t.json", "trace_mode": "triton"}


def test_trace_levels():
    assert parse_level(["TIMESTAMPS"]) == {TIMESTAMPS}
    assert parse_level(["TENSORS", "TIMESTAMPS"]) == {TIMESTAMPS, TENSORS}
    assert parse_level(["OFF"]) == frozenset()
    assert parse_level([]) is None  # changes nothing, as in Triton
    with pytest.raises(InvalidTraceSetting, match="Expect only one trace level 'OFF' is specified"):
        parse_level(["OFF", "TIMESTAMPS"])
    with pytest.raises(InvalidTraceSetting, match="unknown trace level 'SPANS'"):
        parse_level(["TIMESTAMPS", "SPANS"])
    with pytest.raises(InvalidTraceSetting, match="must be an array of strings"):
        parse_level("TIMESTAMPS")


@pytest.mark.parametrize("name, value, expected", [
    ("trace_rate", "1", 1), ("trace_rate", 250, 250), ("trace_rate", "4294967295", 4294967295),
    ("log_frequency", "0", 0), ("trace_count", "-1", -1), ("trace_count", "2147483647", 2147483647),
])
def test_numbers_taken(name, value, expected):
    assert parse_number(name, value) == expected


@pytest.mark.parametrize("name, value, message", [
    ("trace_rate", "12abc", "Unable to parse 'trace_rate', got: 12abc"),
    ("trace_rate", "", "Unable to parse 'trace_rate', got: "),
    ("trace_rate", "-1", r"Unable to parse 'trace_rate', value is out of range \[ 0, 4294967295 \], got: -1"),
    ("log_frequency", "4294967296", r"out of range \[ 0, 4294967295 \]"),
    ("trace_count", "-2", "Unable to parse 'trace_count'. Expecting value >= -1, got: -2"),
    ("trace_count", "2147483648", r"out of range \[ -1, 2147483647 \]"),
    ("trace_rate", True, "must be a string holding an integer"),
    ("trace_rate", 1.5, "must be a string holding an integer"),
])
def test_numbers_refused(name, value, message):
    with pytest.raises(InvalidTraceSetting, match=message):
        parse_number(name, value)


def test_changes_name_fields_clear_with_none_and_ignore_what_triton_ignores():
    assert parse_changes({"trace_level": ["TENSORS"], "trace_rate": "10", "trace_count": None, "log_frequency": "3",
                          "trace_mode": "opentelemetry", "unknown": 1}) == {
        "level": {TENSORS}, "rate": 10, "count": None, "log_frequency": 3}
    for value in ("/tmp/elsewhere.json", None):
        with pytest.raises(TraceSettingNotSettable, match="trace file location can not be updated through network protocol"):
            parse_changes({"trace_rate": "1", "trace_file": value})


def test_grpc_setting_values():
    assert changes_from_grpc({"trace_level": ["TIMESTAMPS", "TENSORS"], "trace_rate": ["5"], "trace_count": []}) == {
        "trace_level": ["TIMESTAMPS", "TENSORS"], "trace_rate": "5", "trace_count": None}
    with pytest.raises(InvalidTraceSetting, match="expect only 1 value for 'trace_rate'"):
        changes_from_grpc({"trace_rate": ["1", "2"]})


def test_command_line_settings_like_tritons_trace_config():
    settings = parse_trace_config(["level=TIMESTAMPS", "level=tensors", "rate=100", "count=5", "mode=triton",
                                   "triton,file=/tmp/a,b.json", "triton,log-frequency=50"])
    assert settings == TraceSettings(level=frozenset({TIMESTAMPS, TENSORS}), rate=100, count=5, log_frequency=50,
                                     file="/tmp/a,b.json")
    assert parse_trace_config(["level=max", "level=off"]).level == frozenset()
    assert parse_trace_config([]) == TraceSettings()
    assert parse_trace_config(["triton,file=/t.json"]) == TraceSettings(file="/t.json")  # off, ready to switch on


def test_command_line_settings_of_the_opentelemetry_mode():
    settings = parse_trace_config(["mode=opentelemetry", "level=TIMESTAMPS", "rate=0",
                                   "opentelemetry,url=otel:4318/v1/traces",
                                   "opentelemetry,resource=service.name=old", "opentelemetry,resource=team=a=b",
                                   "opentelemetry,resource=service.name=resnet",
                                   "opentelemetry,bsp_max_queue_size=100", "opentelemetry,bsp_schedule_delay=50",
                                   "opentelemetry,bsp_max_export_batch_size=100"])
    # rate 0 traces the requests that carry a trace context, and nothing else (Triton's way to ask for that)
    assert settings == TraceSettings(level=frozenset({TIMESTAMPS}), rate=0, mode=OPENTELEMETRY_MODE,
                                     opentelemetry=OpenTelemetryConfig(
                                         url="http://otel:4318/v1/traces",
                                         resource=(("service.name", "resnet"), ("team", "a=b")),
                                         bsp_max_queue_size=100, bsp_schedule_delay=50, bsp_max_export_batch_size=100))
    # read back as Triton 2.51 reads them back in this mode: the exporter's settings, no file
    assert settings.as_triton() == {"trace_level": ["TIMESTAMPS"], "trace_rate": "0", "trace_count": "-1",
                                    "trace_mode": "opentelemetry", "url": "http://otel:4318/v1/traces",
                                    "resource": "service.name=resnet,team=a=b", "bsp_max_export_batch_size": "100",
                                    "bsp_schedule_delay": "50", "bsp_max_queue_size": "100"}
    secure = parse_trace_config(["mode=opentelemetry", "opentelemetry,url=https://collector/v1/traces"])
    assert secure.opentelemetry == OpenTelemetryConfig(url="https://collector/v1/traces")


def test_batch_span_processor_settings_the_command_line_leaves_out_come_from_the_sdks_environment():
    assert opentelemetry_config({}, {}) == OpenTelemetryConfig(bsp_max_queue_size=2048, bsp_schedule_delay=5000,
                                                                   bsp_max_export_batch_size=512)
    environment = {"OTEL_BSP_SCHEDULE_DELAY": "250", "OTEL_BSP_MAX_QUEUE_SIZE": "64"}
    config = opentelemetry_config({"bsp_max_export_batch_size": "16"}, environment)
    assert (config.bsp_schedule_delay, config.bsp_max_queue_size, config.bsp_max_export_batch_size) == (250, 64, 16)
    with pytest.raises(InvalidTraceSetting, match="Unable to parse 'OTEL_BSP_SCHEDULE_DELAY', got: soon"):
        opentelemetry_config({}, {"OTEL_BSP_SCHEDULE_DELAY": "soon"})
    with pytest.raises(InvalidTraceSetting, match=r"must not exceed bsp_max_queue_size \(512 > 64\)"):
        opentelemetry_config({}, {"OTEL_BSP_MAX_QUEUE_SIZE": "64"})


def test_the_opentelemetry_mode_without_the_sdk_is_refused_with_the_packages_to_install(monkeypatch):
    real_import = importlib.import_module

    def without_sdk(name, *args):
        if name.startswith("opentelemetry.sdk"):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real_import(name, *args)

    monkeypatch.setattr(importlib, "import_module", without_sdk)
    with pytest.raises(InvalidTraceSetting, match="trace mode opentelemetry needs opentelemetry-sdk and "
                                                  "opentelemetry-exporter-otlp-proto-http"):
        parse_trace_config(["mode=opentelemetry", "level=TIMESTAMPS"])


@pytest.mark.parametrize("entries, message", [
    (["level"], "takes <setting>=<value>"),
    ([",file=/t.json"], "takes <setting>=<value>"),
    (["rate="], "takes <setting>=<value>"),
    (["level=spans"], "invalid value for trace level option: spans"),
    (["mode=zipkin"], "trace mode 'zipkin' is not supported: the modes are triton and opentelemetry"),
    (["jaeger,url=localhost:14268"], "trace mode 'jaeger' is not supported"),
    (["opentelemetry,url=localhost:4318"], "opentelemetry,url applies to trace mode opentelemetry, and the trace mode "
                                           "is triton \\(give mode=opentelemetry\\)"),
    (["opentelemetry,resource=a=b"], "opentelemetry,resource applies to trace mode opentelemetry"),
    (["mode=opentelemetry", "triton,file=/t.json"], "triton,file applies to trace mode triton, and the trace mode is "
                                                    "opentelemetry"),
    (["mode=opentelemetry", "level=TENSORS"], "TENSORS is not supported in trace mode opentelemetry"),
    (["mode=opentelemetry", "opentelemetry,endpoint=x"], "unknown opentelemetry trace setting 'endpoint'"),
    (["mode=opentelemetry", "opentelemetry,resource=service.name"], "takes KEY=VALUE"),
    (["mode=opentelemetry", "opentelemetry,resource==x"], "takes KEY=VALUE"),
    (["mode=opentelemetry", "opentelemetry,bsp_schedule_delay=0"], "bsp_schedule_delay must be at least 1"),
    (["mode=opentelemetry", "opentelemetry,bsp_max_queue_size=soon"],
     "Unable to parse 'opentelemetry,bsp_max_queue_size', got: soon"),
    (["mode=opentelemetry", "opentelemetry,bsp_max_export_batch_size=4096"],
     "must not exceed bsp_max_queue_size \\(4096 > 2048\\)"),
    (["mode=opentelemetry", "opentelemetry,bsp_max_queue_size=100"], "must not exceed bsp_max_queue_size \\(512 > 100"),
    (["triton,rate=1"], "unknown triton trace setting 'rate'"),
    (["sampling=1"], "unknown trace setting 'sampling'"),
    (["rate=ten"], "Unable to parse 'trace_rate', got: ten"),
    (["level=TIMESTAMPS"], "would trace nothing: trace file name is not given"),
    (["level=TIMESTAMPS", "rate=0", "triton,file=/t.json"], "would trace nothing: sample rate must be non-zero"),
])
def test_command_line_settings_refused(entries, message):
    with pytest.raises(InvalidTraceSetting, match=message):
        parse_trace_config(entries)


def test_tensor_text_prints_elements_as_cpp_streams_do():
    assert tensor_text(np.array([[0.1, 1e-7], [123456789.0, -2.5]], np.float32)) == "0.1,1e-07,1.23457e+08,-2.5"
    assert tensor_text(np.array([True, False])) == "1,0"
    assert tensor_text(np.array([-3, 7], np.int64)) == "-3,7"
    assert tensor_text(np.array([b"cat", "dog"], dtype=object)) == '"cat","dog"'
    assert tensor_text(np.float16([0.5])) == "0.5"


# ---------------------------------------------------------------------- global and per-model settings


def test_a_models_override_follows_the_global_settings_it_leaves_out(tmp_path):
    startup = TraceSettings(file=str(tmp_path / "trace.json"))
    control = TraceControl(startup, ["resnet"], "1")
    assert control.start("resnet", "") is None  # level OFF
    control.update("resnet", {"trace_level": ["TIMESTAMPS"], "trace_rate": "2"})
    control.update(None, {"trace_count": "10", "log_frequency": "4"})
    assert control.settings("resnet") == {"trace_level": ["TIMESTAMPS"], "trace_rate": "2", "trace_count": "10",
                                          "log_frequency": "4", "trace_file": startup.file, "trace_mode": "triton"}
    assert control.settings() == {**startup.as_triton(), "trace_count": "10", "log_frequency": "4"}

    # cleared, the model's rate follows the global one; cleared globally, a setting returns to the startup value
    assert control.update("resnet", {"trace_rate": None})["trace_rate"] == "1000"
    assert control.update(None, {"trace_count": None})["trace_count"] == "-1"
    assert control.settings("resnet")["trace_count"] == "-1"
    # every override cleared: the model is traced by the global settings again
    control.update("resnet", {"trace_level": None})
    assert control.settings("resnet")["trace_level"] == ["OFF"]
    assert control.start("resnet", "") is None


def test_a_model_without_an_override_shares_the_global_sampler(tmp_path):
    control = TraceControl(tracing_settings(tmp_path, count=3), ["resnet"], "1")
    control.update("resnet", {"trace_rate": "1"})  # an override: the model samples on its own
    control.start("resnet", "")
    assert (control.settings("resnet")["trace_count"], control.settings()["trace_count"]) == ("2", "3")
    control.update("resnet", {"trace_rate": None})  # cleared: the global sampler's traces and count again
    control.start("resnet", "")
    assert control.settings()["trace_count"] == control.settings("resnet")["trace_count"] == "2"


def test_a_trace_count_used_up_is_not_refilled_by_changing_another_setting(tmp_path):
    """trace_count is the traces left (Triton carries count_ over into new settings): changing the
    log frequency, or the global rate under a model's own count, leaves what is left."""
    control = TraceControl(tracing_settings(tmp_path, rate=1), ["resnet"], "1")

    def traced(requests: int) -> int:
        taken = [trace for index in range(requests) if (trace := control.start("resnet", str(index))) is not None]
        for trace in taken:
            trace.finish()
        return len(taken)

    control.update(None, {"trace_count": "2"})
    assert traced(5) == 2
    with pytest.raises(InvalidTraceSetting, match="trace count is 0"):  # as Triton refuses it: nothing is left
        control.update(None, {"log_frequency": "0"})
    assert control.settings()["trace_count"] == "0" and traced(5) == 0
    assert control.update(None, {"trace_count": "3"})["trace_count"] == "3"  # set anew: a new budget
    control.update("resnet", {"trace_count": "4"})
    assert traced(1) == 1
    control.update(None, {"trace_rate": "1"})
    control.update("resnet", {"log_frequency": "0"})
    assert (control.settings("resnet")["trace_count"], control.settings()["trace_count"]) == ("3", "3")
    assert traced(5) == 3
    with pytest.raises(InvalidTraceSetting, match="trace count is 0"):  # a model's own count too
        control.update("resnet", {"trace_rate": "2"})


def test_settings_that_would_trace_nothing_are_refused_and_nothing_changes(tmp_path):
    control = TraceControl(TraceSettings(), ["resnet"], "1")  # started without a trace file
    with pytest.raises(InvalidTraceSetting, match="Attempting to set invalid trace setting: trace file name is not given"):
        control.update(None, {"trace_level": ["TIMESTAMPS"]})
    control = TraceControl(TraceSettings(file=str(tmp_path / "t.json")), ["resnet"], "1")
    with pytest.raises(InvalidTraceSetting, match="sample rate must be non-zero"):
        control.update("resnet", {"trace_level": ["TIMESTAMPS"], "trace_rate": "0"})
    with pytest.raises(InvalidTraceSetting, match="trace count is 0"):
        control.update(None, {"trace_level": ["TIMESTAMPS"], "trace_count": "0"})
    with pytest.raises(InvalidTraceSetting, match="unknown trace level"):  # a bad value after a good one
        control.update(None, {"trace_rate": "5", "trace_level": ["NONE"]})
    with pytest.raises(InvalidTraceSetting, match="Request for unknown model : bert"):
        control.update("bert", {"trace_rate": "5"})
    with pytest.raises(InvalidTraceSetting, match="Request for unknown model : bert"):
        control.settings("bert")
    assert control.settings() == control.settings("resnet") == TraceSettings(file=str(tmp_path / "t.json")).as_triton()
    # level OFF with a rate of 0 traces nothing, as asked: taken
    assert control.update(None, {"trace_rate": "0"})["trace_rate"] == "0"


# ---------------------------------------------------------------------- sampling and files


def test_every_nth_request_is_traced_until_the_count_runs_out(tmp_path):
    control = TraceControl(tracing_settings(tmp_path, rate=3, count=2), ["resnet"], "1")
    traced = [control.start("resnet", f"r{index}") for index in range(12)]
    assert [index for index, trace in enumerate(traced) if trace is not None] == [2, 5]
    assert control.settings("resnet")["trace_count"] == "0"
    for trace in traced:
        if trace is not None:
            trace.finish()
    # the last trace of the count taken: written at once, to FILE.0
    objects = read_json(tmp_path / "trace.json.0")
    assert [entry.get("request_id") for entry in objects if "model_name" in entry] == ["r2", "r5"]


def test_a_settings_change_restarts_the_sampling(tmp_path):
    control = TraceControl(tracing_settings(tmp_path, rate=2), ["resnet"], "1")
    assert control.start("resnet", "") is None
    control.update(None, {"trace_rate": "2"})  # the same rate: the counter starts again all the same
    assert control.start("resnet", "") is None
    assert control.start("resnet", "") is not None


def test_log_frequency_writes_numbered_files_and_the_rest_at_close(tmp_path):
    control = TraceControl(tracing_settings(tmp_path, log_frequency=2), ["resnet"], "1")
    for index in range(5):
        trace = control.start("resnet", "")
        trace.stamp(REQUEST_START, 1000 + index)
        trace.finish()
        trace.finish()  # once only
    assert sorted(path.name for path in tmp_path.iterdir()) == ["trace.json.0", "trace.json.1"]
    assert trace_ids(read_json(tmp_path / "trace.json.0")) == [1, 2]
    assert read_json(tmp_path / "trace.json.1")[1] == {"id": 3, "timestamps": [{"name": REQUEST_START, "ns": 1002}]}
    control.close()
    assert trace_ids(read_json(tmp_path / "trace.json.2")) == [5]


def test_without_log_frequency_traces_are_appended_to_the_file_when_the_settings_change_and_at_close(tmp_path):
    control = TraceControl(tracing_settings(tmp_path), ["resnet"], "1")
    control.start("resnet", "a").finish()
    assert not (tmp_path / "trace.json").exists()  # kept until the settings change or the server stops
    control.update(None, {"trace_rate": "1"})
    assert trace_ids(read_json(tmp_path / "trace.json")) == [1]
    control.start("resnet", "b").finish()
    control.start("resnet", "c").finish()
    control.close()
    assert trace_ids(read_json(tmp_path / "trace.json")) == [1, 2, 3]  # still one JSON array


def test_without_log_frequency_held_traces_are_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(tracing, "HELD_TRACES", 3)
    control = TraceControl(tracing_settings(tmp_path), ["resnet"], "1")
    for _ in range(7):
        control.start("resnet", "").finish()
    assert trace_ids(read_json(tmp_path / "trace.json")) == [1, 2, 3, 4, 5, 6]
    control.close()
    assert trace_ids(read_json(tmp_path / "trace.json")) == list(range(1, 8))


def test_a_request_traced_before_a_settings_change_is_written_when_it_completes(tmp_path):
    control = TraceControl(tracing_settings(tmp_path), ["resnet"], "1")
    running = control.start("resnet", "running")
    control.update(None, {"trace_rate": "5"})  # its sampler is replaced meanwhile
    running.finish()
    assert [entry.get("request_id") for entry in read_json(tmp_path / "trace.json")] == ["running"]


def test_traces_record_only_their_levels(tmp_path):
    for level, expect_timestamps, expect_tensors in ([{TIMESTAMPS}, True, False], [{TENSORS}, False, True],
                                                    [{TIMESTAMPS, TENSORS}, True, True]):
        control = TraceControl(tracing_settings(tmp_path, level=frozenset(level)), ["resnet"], "1")
        trace = control.start("resnet", "")
        trace.stamp(COMPUTE_START, 5)
        trace.record_tensors(TENSOR_QUEUE_INPUT, {"input": np.array([[1.5, 2.0]], np.float32)})
        assert bool(trace.timestamps) is expect_timestamps
        assert trace.tensors == ([{"id": trace.id, "activity": TENSOR_QUEUE_INPUT, "tensor": {
            "name": "input", "data": "1.5,2", "shape": "1,2", "dtype": "FP32"}}] if expect_tensors else [])


def test_a_send_closes_the_trace_with_its_times_or_without_when_nothing_was_sent(tmp_path):
    control = TraceControl(tracing_settings(tmp_path, log_frequency=1), ["resnet"], "1")
    control.start("resnet", "").sent_over_http(10, 20)
    control.start("resnet", "").sent_over_http(None, None)
    assert read_json(tmp_path / "trace.json.0")[1:] == [{"id": 1, "timestamps": [{"name": HTTP_SEND_START, "ns": 10}]},
                                                       {"id": 1, "timestamps": [{"name": HTTP_SEND_END, "ns": 20}]}]
    assert read_json(tmp_path / "trace.json.1") == [{"id": 2, "model_name": "resnet", "model_version": 1}]


def test_a_trace_file_that_cannot_be_written_is_logged_and_the_request_goes_on(tmp_path, caplog):
    control = TraceControl(tracing_settings(tmp_path, file=str(tmp_path / "missing" / "t.json"), log_frequency=1),
                           ["resnet"], "1")
    with caplog.at_level(logging.ERROR, logger="plansmith_runtime.tracing"):
        control.start("resnet", "").finish()
    assert "cannot write traces" in caplog.text


def test_samplers_share_one_file_and_its_numbering(tmp_path):
    file = TraceFile(str(tmp_path / "t.json"))
    ids = iter(range(1, 100))
    first = Sampler(tracing_settings(tmp_path, log_frequency=1), file, ids)
    second = Sampler(tracing_settings(tmp_path, log_frequency=1), file, ids)
    first.sample("m", "1", "").finish()
    second.sample("m", "1", "").finish()
    assert trace_ids(read_json(tmp_path / "t.json.0")) == [1] and trace_ids(read_json(tmp_path / "t.json.1")) == [2]
