"""Progress output: readable phases on a terminal, key=value log lines in a Job."""

from __future__ import annotations

import io
import logging

from plansmith_builder.progress import Progress


def test_terminal_shows_phases_and_bytes():
    out = io.StringIO()
    progress = Progress(stream=out, tty=True)
    progress.phase("fetch", uri="s3://models/a.onnx")
    count = progress.transfer("download model", total=3 << 20)
    count(1 << 20)
    count(2 << 20)
    progress.end_transfer()
    progress.done("fetch")
    text = out.getvalue()
    assert "==> fetch  uri=s3://models/a.onnx" in text
    assert "download model: 3.0 MiB / 3.0 MiB" in text
    assert "fetch done  seconds=" in text


def test_job_logs_are_structured_lines(caplog):
    out = io.StringIO()
    progress = Progress(stream=out, tty=False)
    with caplog.at_level(logging.INFO, logger="plansmith_builder"):
        progress.phase("build", backend="onnxruntime")
        progress.done("build", engine="model.onnx")
    assert out.getvalue() == ""  # nothing drawn
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == "event=phase phase=build backend=onnxruntime"
    assert messages[1].startswith("event=done phase=build seconds=") and messages[1].endswith("engine=model.onnx")
