"""`plansmith up MODEL.yaml`: build for this machine, then serve - one command, same YAML."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import onnxruntime
import yaml

from plansmith import testmodels
from plansmith.devcluster.processes import free_port


def start_up(model_file, store, ports):
    return subprocess.Popen([sys.executable, "-m", "plansmith.cli", "up", str(model_file), "--store", store,
                             "--http-port", str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_ready(client, process, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read()[-3000:]
        try:
            if client.is_server_ready():
                return
        except Exception:  # noqa: BLE001 - not listening yet
            pass
        time.sleep(0.3)
    raise AssertionError("plansmith up never became ready")


def test_up_builds_then_serves_and_a_second_up_hits_the_cache(tmp_path):
    import tritonclient.http as httpclient

    mlp = testmodels.mlp(tmp_path / "mlp.onnx")
    model_file = tmp_path / "model.yaml"
    model_file.write_text(yaml.safe_dump({
        "apiVersion": "plansmith.io/v1alpha1", "kind": "InferenceModel", "metadata": {"name": "tiny-mlp"},
        "spec": {"model": {"uri": mlp.path.as_uri(), "inputs": mlp.spec_inputs()},
                 "build": {"precision": "fp32", "accuracy": {"samples": 2}},
                 "serving": {"maxBatchSize": 8, "dynamicBatching": {}}}}))
    store = (tmp_path / "engines").as_uri()
    batch = np.random.default_rng(3).standard_normal((2, 256), dtype=np.float32)
    expected = onnxruntime.InferenceSession(str(mlp.path)).run(None, {"input": batch})[0]

    statuses = []
    for _ in range(2):
        ports = (free_port(), free_port(), free_port())
        process = start_up(model_file, store, ports)
        client = httpclient.InferenceServerClient(f"127.0.0.1:{ports[0]}")
        try:
            wait_ready(client, process)
            request = httpclient.InferInput("input", list(batch.shape), "FP32")
            request.set_data_from_numpy(batch)
            np.testing.assert_allclose(client.infer("tiny-mlp", [request]).as_numpy("logits"), expected, rtol=1e-4, atol=1e-5)
        finally:
            process.send_signal(signal.SIGTERM)
            out, err = process.communicate(timeout=60)
        assert process.returncode == 0, err[-2000:]
        statuses.append(json.loads(out.splitlines()[0])["status"])
    assert statuses == ["built", "hit"]


def test_up_with_a_broken_file_says_why(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: plansmith.io/v1alpha1\nkind: InferenceModel\nmetadata: {name: x}\nspec: {}\n")
    result = subprocess.run([sys.executable, "-m", "plansmith.cli", "up", str(bad)], capture_output=True, text=True)
    assert result.returncode == 1 and "spec.model: required field is missing" in result.stderr
