"""`plansmith serve` argument handling (no server is started for these)."""

import pytest

from plansmith.cli import main


def test_serve_needs_a_spec_or_a_manifest(capsys):
    assert main(["serve"]) == 2
    assert "give MODEL.yaml or --manifest URI" in capsys.readouterr().err


def test_invalid_spec_names_the_problem(tmp_path, capsys):
    spec = tmp_path / "bad.yaml"
    spec.write_text("apiVersion: plansmith.io/v1alpha1\nkind: InferenceModel\nmetadata: {name: m}\n"
                    "spec: {model: {uri: 'file:///m.onnx'}, serving: {maxBatchSize: -1}}\n")
    assert main(["serve", str(spec)]) == 1
    assert "spec.serving.maxBatchSize" in capsys.readouterr().err


def test_bad_batch_size_list_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--manifest", "file:///x", "--preferred-batch-sizes", "4,x"])
    assert exit_info.value.code == 2
    assert "comma-separated integers" in capsys.readouterr().err


def test_port_in_use_is_reported(engines, capsys):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = main(["serve", "--manifest", engines["mlp"].manifest_uri, "--host", "127.0.0.1",
                     "--http-port", str(port), "--grpc-port", "0", "--metrics-port", "0"])
    assert code == 1
    assert "cannot listen" in capsys.readouterr().err


def test_grpc_port_in_use_is_reported(engines, capsys):
    import socket

    from plansmith.devcluster.processes import free_port

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = main(["serve", "--manifest", engines["mlp"].manifest_uri, "--host", "127.0.0.1",
                     "--http-port", str(free_port()), "--grpc-port", str(port), "--metrics-port", str(free_port())])
    assert code == 1
    error = capsys.readouterr().err
    assert "cannot listen" in error and f"('127.0.0.1', {port})" in error and "address already in use" in error


def test_an_unknown_log_level_is_a_usage_error(capsys):
    assert main(["serve", "--manifest", "file:///x", "--log-level", "LOUD"]) == 2
    assert "--log-level: unknown log level 'LOUD'" in capsys.readouterr().err


@pytest.mark.parametrize("interval", ["0", "-5", "often"])
def test_a_metrics_interval_that_is_not_a_positive_integer_is_a_usage_error(interval, capsys):
    import argparse

    from plansmith_runtime import cli as runtime_cli

    parser = argparse.ArgumentParser()  # parsed only: a wrongly accepted value must not start a server
    runtime_cli.register(parser.add_subparsers())
    with pytest.raises(SystemExit) as exited:
        parser.parse_args(["serve", "--manifest", "file:///x", "--metrics-interval-ms", interval])
    assert exited.value.code == 2
    assert "--metrics-interval-ms" in capsys.readouterr().err
    assert parser.parse_args(["serve", "--metrics-interval-ms", "1"]).metrics_interval_ms == 1


def test_a_metrics_config_triton_does_not_take_is_a_usage_error(capsys):
    assert main(["serve", "--manifest", "file:///x", "--metrics-config", "summary_latencies=yes"]) == 2
    assert "--metrics-config 'summary_latencies=yes': summary_latencies is true or false" in capsys.readouterr().err


def test_a_cache_config_the_server_cannot_take_is_a_usage_error(capsys):
    assert main(["serve", "--manifest", "file:///x", "--cache-config", "redis,host=cache"]) == 2
    assert "cache 'redis' is not supported: the local (in-memory) cache is" in capsys.readouterr().err


def test_a_trace_config_that_would_trace_nothing_is_a_usage_error(capsys):
    assert main(["serve", "--manifest", "file:///x", "--trace-config", "level=TIMESTAMPS"]) == 2
    assert "--trace-config level=TIMESTAMPS would trace nothing: trace file name is not given" in capsys.readouterr().err


def test_the_specs_latency_summaries_are_on_unless_the_command_line_turns_them_off():
    import argparse

    from plansmith.validation import parse_spec
    from plansmith_runtime import cli as runtime_cli
    from plansmith_runtime.summaries import DEFAULT_QUANTILES

    parser = argparse.ArgumentParser()
    runtime_cli.register(parser.add_subparsers())
    serving = parse_spec({"model": {"uri": "s3://models/m.onnx"}, "serving": {"metrics": {"latencySummaries": True}}}).serving

    def quantiles(*flags):
        return runtime_cli.serving_config(parser.parse_args(["serve", *flags]), serving, "m").summary_quantiles

    assert quantiles() == DEFAULT_QUANTILES
    assert quantiles("--metrics-config", "summary_latencies=false") == ()
    assert quantiles("--metrics-config", "summary_quantiles=0.99:0.001") == ((0.99, 0.001),)


def test_the_trace_settings_the_operator_renders_are_the_runtimes_and_flags_override_them():
    import argparse

    from plansmith.controller import rendering
    from plansmith.validation import parse_spec
    from plansmith_runtime import cli as runtime_cli
    from plansmith_runtime.tracing import (OPENTELEMETRY_MODE, TENSORS, TIMESTAMPS, OpenTelemetryConfig,
                                           TraceSettings)

    parser = argparse.ArgumentParser()
    runtime_cli.register(parser.add_subparsers())
    spec = parse_spec({"model": {"uri": "s3://models/m.onnx"},
                       "serving": {"trace": {"level": ["TENSORS"], "rate": 10, "logFrequency": 100}}})
    rendered = parser.parse_args(["serve", *rendering.runtime_args("m", spec, "s3://engines/engines/k/manifest.json")])
    expected = TraceSettings(level=frozenset({TENSORS}), rate=10, count=-1, log_frequency=100, file="/tmp/trace.json")
    assert runtime_cli.serving_config(rendered, spec.serving, "m").trace == expected
    # `plansmith serve MODEL.yaml` takes the spec's, and its flags override them
    local = parser.parse_args(["serve", "--trace-config", "rate=1", "--trace-config", "level=TIMESTAMPS"])
    assert runtime_cli.serving_config(local, spec.serving, "m").trace == TraceSettings(
        level=frozenset({TIMESTAMPS, TENSORS}), rate=1, log_frequency=100, file="/tmp/trace.json")
    # off in the spec (no level): the file is set, so clients can switch tracing on at runtime
    off = parse_spec({"model": {"uri": "s3://models/m.onnx"}, "serving": {"trace": {"level": []}}})
    assert runtime_cli.serving_config(parser.parse_args(["serve"]), off.serving, "m").trace == TraceSettings(
        file="/tmp/trace.json")
    # the response cache: the operator's --cache-config, and the spec's size for `plansmith serve MODEL.yaml`
    cached = parse_spec({"model": {"uri": "s3://models/m.onnx"}, "serving": {"responseCache": {"sizeBytes": 4096}}})
    rendered = parser.parse_args(["serve", *rendering.runtime_args("m", cached,
                                                                   "s3://engines/engines/k/manifest.json")])
    assert runtime_cli.serving_config(rendered, None, "m").response_cache_bytes == 4096
    assert runtime_cli.serving_config(parser.parse_args(["serve"]), cached.serving, "m").response_cache_bytes == 4096
    assert runtime_cli.serving_config(parser.parse_args(["serve"]), spec.serving, "m").response_cache_bytes == 0
    # mode opentelemetry: the collector and the resource attributes
    spans = parse_spec({"model": {"uri": "s3://models/m.onnx"}, "serving": {"trace": {
        "mode": "opentelemetry", "rate": 0, "opentelemetry": {"url": "collector:4318/v1/traces",
                                                              "resource": {"service.name": "m-prod"}}}}})
    rendered = parser.parse_args(["serve", *rendering.runtime_args("m", spans, "s3://engines/engines/k/manifest.json")])
    assert runtime_cli.serving_config(rendered, spans.serving, "m").trace == TraceSettings(
        level=frozenset({TIMESTAMPS}), rate=0, mode=OPENTELEMETRY_MODE, opentelemetry=OpenTelemetryConfig(
            url="http://collector:4318/v1/traces", resource=(("service.name", "m-prod"),)))


@pytest.mark.parametrize("flag, pool_bytes", [([], 256 << 20), (["--pinned-memory-pool-byte-size", "0"], 0),
                                              (["--pinned-memory-pool-byte-size", "1048576"], 1 << 20)])
def test_the_pinned_memory_pool_is_tritons_256_mb_unless_the_flag_sizes_it(flag, pool_bytes, monkeypatch):
    from plansmith_runtime import server

    started = []
    monkeypatch.setattr(server, "run", lambda config, options, listen, log_control: started.append(options) or 0)
    assert main(["serve", "--manifest", "file:///x", *flag]) == 0
    assert started[0].pinned_memory_pool_bytes == pool_bytes


def test_a_negative_pinned_memory_pool_is_a_usage_error(capsys):
    import argparse

    from plansmith_runtime import cli as runtime_cli

    parser = argparse.ArgumentParser()  # parsed only: a wrongly accepted value must not start a server
    runtime_cli.register(parser.add_subparsers())
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--manifest", "file:///x", "--pinned-memory-pool-byte-size", "-1"])
    assert "--pinned-memory-pool-byte-size: must be at least 0, got -1" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value", [
    ("--instances", "0"), ("--max-queue-size", "-1"), ("--timeout-us", "-1"), ("--max-batch-size", "-2"),
    ("--max-queue-delay-us", "-1"), ("--warmup-iterations", "0"), ("--intra-op-threads", "-1"),
    ("--http-port", "70001"), ("--grpc-port", "-1"), ("--metrics-port", "65536"),
    ("--grace-seconds", "-1"), ("--grace-seconds", "nan"),
])
def test_flags_the_spec_would_refuse_are_usage_errors_not_a_broken_server(flag, value, capsys):
    """--instances -1 left the model loading for ever, --max-queue-size -1 refused every request,
    and a port past 65535 was bound modulo 65536 (70001: 4465) while the log said 70001."""
    import argparse

    from plansmith_runtime import cli as runtime_cli

    parser = argparse.ArgumentParser()  # parsed only: a wrongly accepted value must not start a server
    runtime_cli.register(parser.add_subparsers())
    with pytest.raises(SystemExit) as exited:
        parser.parse_args(["serve", "--manifest", "file:///x", flag, value])
    assert exited.value.code == 2 and flag in capsys.readouterr().err
    lowest = {"--instances": "1", "--max-queue-size": "1", "--warmup-iterations": "1", "--grace-seconds": "0"}.get(flag, "0")
    parsed = vars(parser.parse_args(["serve", flag, lowest]))
    assert parsed[flag[2:].replace("-", "_")] == float(lowest)
