"""`plansmith trace-summary`: spans and their percentiles from Triton trace files."""

from __future__ import annotations

import json

import pytest

from plansmith.cli import main
from plansmith_runtime.trace_summary import RequestTrace, TraceFileError, read_traces, render, summarize

HTTP_NAMES = ["HTTP_RECV_START", "HTTP_RECV_END", "REQUEST_START", "QUEUE_START", "COMPUTE_START", "COMPUTE_INPUT_END",
              "COMPUTE_OUTPUT_START", "COMPUTE_END", "REQUEST_END", "INFER_RESPONSE_COMPLETE", "HTTP_SEND_START",
              "HTTP_SEND_END"]


def trace_objects(trace_id: int, model: str, stamps: dict[str, int]) -> list[dict]:
    return [{"id": trace_id, "model_name": model, "model_version": 1},
            *({"id": trace_id, "timestamps": [{"name": name, "ns": ns}]} for name, ns in stamps.items())]


def http_stamps(offset_us: int = 0) -> dict[str, int]:
    """An HTTP request whose every step takes 10 us, and whose queue wait takes 10 + offset_us."""
    stamps, now = {}, 1_000_000
    for name in HTTP_NAMES:
        if name == "COMPUTE_START":
            now += offset_us * 1000
        stamps[name] = now
        now += 10_000
    return stamps


def test_spans_of_an_http_request():
    [group] = summarize([RequestTrace("cnn", "1", http_stamps())])
    assert (group.model, group.protocol, group.traces) == ("cnn", "HTTP", 1)
    spans = {name: values[0] for name, values in group.spans.items()}
    assert spans == {"request": 110.0, "receive": 10.0, "handler": 60.0, "queue": 10.0, "compute": 30.0,
                     "input": 10.0, "infer": 10.0, "output": 10.0, "overhead": 20.0, "send": 10.0}


def test_percentiles_per_model_and_protocol_and_traces_without_timestamps(tmp_path):
    objects = []
    for index in range(100):
        objects += trace_objects(index + 1, "cnn", http_stamps(offset_us=index))
    grpc = {"GRPC_WAITREAD_START": 0, "GRPC_WAITREAD_END": 5000, "REQUEST_START": 6000, "REQUEST_END": 9000,
            "GRPC_SEND_START": 9500, "GRPC_SEND_END": 10_000}
    objects += trace_objects(101, "cnn", grpc)
    objects += [{"id": 102, "model_name": "mlp", "model_version": 1},  # a TENSORS-only trace
                {"id": 102, "activity": "TENSOR_QUEUE_INPUT", "tensor": {"name": "x", "data": "1", "shape": "1",
                                                                         "dtype": "FP32"}}]
    path = tmp_path / "trace.json.0"
    path.write_text(json.dumps(objects))
    groups = summarize(read_traces([path]))
    assert [(g.model, g.protocol, g.traces) for g in groups] == [("cnn", "GRPC", 1), ("cnn", "HTTP", 100),
                                                                ("mlp", "unknown", 1)]
    lines = render(groups).splitlines()
    http = [line.split() for line in lines[lines.index("cnn (version 1), HTTP: 100 traces") + 2:][:10]]
    assert [row[0] for row in http] == ["request", "receive", "handler", "queue", "compute", "input", "infer", "output",
                                        "overhead", "send"]
    # the queue waits 10 .. 109 us: mean and p50 59.5, p95 104.05, p99 108.01
    assert http[3] == ["queue", "59.5", "59.5", "104.0", "108.0"]
    grpc = [line.split() for line in lines[lines.index("cnn (version 1), GRPC: 1 traces") + 2:][:4]]
    assert grpc == [["request", "10.0", "10.0", "10.0", "10.0"], ["receive", "5.0", "5.0", "5.0", "5.0"],
                    ["handler", "3.0", "3.0", "3.0", "3.0"], ["send", "0.5", "0.5", "0.5", "0.5"]]
    assert lines[-2:] == ["mlp (version 1), unknown: 1 traces", "  (no timestamps: traced at level TENSORS only)"]


def test_ids_are_per_file(tmp_path):
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps(trace_objects(1, "cnn", http_stamps())))
    second.write_text(json.dumps(trace_objects(1, "cnn", http_stamps(offset_us=50))))
    [group] = summarize(read_traces([first, second]))
    assert group.traces == 2 and sorted(group.spans["queue"]) == [10.0, 60.0]


@pytest.mark.parametrize("content, message", [
    ("[{", "not a readable JSON trace file"),
    ('{"id": 1}', "a JSON array of objects with an 'id'"),
    ('[{"model_name": "cnn"}]', "a JSON array of objects with an 'id'"),
])
def test_files_that_are_not_trace_files_are_refused(tmp_path, content, message):
    path = tmp_path / "trace.json"
    path.write_text(content)
    with pytest.raises(TraceFileError, match=message):
        read_traces([path])


def test_command(tmp_path, capsys):
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(trace_objects(1, "cnn", http_stamps())))
    assert main(["trace-summary", str(path)]) == 0
    assert "cnn (version 1), HTTP: 1 traces" in capsys.readouterr().out
    assert main(["trace-summary", str(tmp_path / "missing.json")]) == 1
    assert "missing.json: not a readable JSON trace file" in capsys.readouterr().err
