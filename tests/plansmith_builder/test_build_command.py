"""`plansmith build` end to end against the real moto S3 endpoint, with real generated ONNX models
and the real ONNX Runtime backend."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from plansmith.devcluster.processes import free_port
from plansmith.engine_key import engine_key
from plansmith.manifest import parse_manifest
from plansmith.validation import load_models
from plansmith_builder.errors import EXIT_PERMANENT, EXIT_RETRYABLE
from plansmith_builder.target import detect_target

CNN_INT8 = {"precision": "int8", "quantization": "dynamic"}


def upload_model(bucket, models, which="cnn") -> str:
    return bucket.put(f"models/{which}.onnx", models[which].path.read_bytes())


def test_build_publishes_verified_engine_under_the_operator_key(bucket, models, tmp_path, cli, write_yaml):
    cnn = models["cnn"]
    calibration_uri = bucket.put("models/cnn-calibration.npz", models["cnn_calibration"].read_bytes())
    manifest_file = write_yaml(tmp_path / "m.yaml", upload_model(bucket, models), inputs=cnn.spec_inputs(),
                               build={"precision": "int8", "calibration": {"uri": calibration_uri, "samples": 16}},
                               storage_uri=bucket.uri("store"))
    run = cli(str(manifest_file))

    assert run.exit_code == 0, run.result
    assert run.result["status"] == "built" and run.result["reason"] is None
    key = run.result["key"]
    assert run.result["manifestUri"] == bucket.uri(f"store/engines/{key}/manifest.json")

    # the operator computes the same key without running the builder
    spec = load_models(manifest_file.read_text())[0].spec
    source_sha = hashlib.sha256(cnn.path.read_bytes()).hexdigest()
    calibration_sha = hashlib.sha256(models["cnn_calibration"].read_bytes()).hexdigest()
    import onnxruntime

    assert key == engine_key(source_sha256=source_sha, build=spec.build, inputs=spec.model.inputs,
                             backend="onnxruntime", backend_version=onnxruntime.__version__,
                             target=detect_target().target, calibration_sha256=calibration_sha)

    manifest = parse_manifest(bucket.read(f"store/engines/{key}/manifest.json"))
    assert manifest.key == key and manifest.backend == "onnxruntime" and manifest.precision == "int8"
    assert manifest.source.sha256 == source_sha
    assert manifest.target.device == "cpu" and manifest.target.execution_provider == "CPUExecutionProvider"
    assert [t.name for t in manifest.inputs] == ["input"] and manifest.inputs[0].max_shape == [32, 3, 32, 32]
    assert [t.name for t in manifest.outputs] == ["logits"] and manifest.max_batch_size == 32
    assert manifest.accuracy.cosine >= 0.99 and manifest.accuracy.samples >= 1
    assert manifest.benchmark.batch1.p50_ms > 0 and manifest.benchmark.max_batch.batch_size == 32
    assert manifest.benchmark.reference_max_batch.throughput > 0
    for artifact in manifest.artifacts:
        stored = bucket.read(f"store/engines/{key}/{artifact.name}")
        assert hashlib.sha256(stored).hexdigest() == artifact.sha256 and len(stored) == artifact.bytes

    # the published engine really runs and answers like the model
    import numpy as np
    import onnxruntime as ort

    engine_path = tmp_path / "engine.onnx"
    engine_path.write_bytes(bucket.read(f"store/engines/{key}/{manifest.artifact('engine').name}"))
    feeds = cnn.sample_inputs(4, seed=3)
    got = ort.InferenceSession(str(engine_path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    want = ort.InferenceSession(str(cnn.path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert got.shape == (4, 10)
    cosine = float(got.ravel() @ want.ravel() / np.linalg.norm(got) / np.linalg.norm(want))
    assert cosine >= 0.99  # on inputs the gate never saw


def test_second_build_is_a_hit_and_rewrites_nothing(bucket, models, tmp_path, cli, write_yaml):
    manifest_file = write_yaml(tmp_path / "m.yaml", upload_model(bucket, models, "mlp"),
                               inputs=models["mlp"].spec_inputs(), build={"precision": "fp32"},
                               storage_uri=bucket.uri("store"))
    first = cli(str(manifest_file))
    assert first.result["status"] == "built"
    before = bucket.objects("store/")
    assert any(k.endswith("manifest.json") for k in before)

    second = cli(str(manifest_file))
    assert second.exit_code == 0
    assert second.result["status"] == "hit"
    assert second.result["key"] == first.result["key"]
    assert bucket.objects("store/") == before  # same objects, same ETags, same LastModified


def test_changed_precision_gives_a_new_key_and_both_engines(bucket, models, tmp_path, cli, write_yaml):
    model_uri = upload_model(bucket, models, "mlp")
    keys = []
    for precision in ({"precision": "fp32"}, {"precision": "int8", "quantization": "dynamic"}):
        manifest_file = write_yaml(tmp_path / "m.yaml", model_uri, inputs=models["mlp"].spec_inputs(),
                                   build=precision, storage_uri=bucket.uri("store"))
        run = cli(str(manifest_file))
        assert run.result["status"] == "built", run.result
        keys.append(run.result["key"])
    assert keys[0] != keys[1]
    assert {k.split("/")[2] for k in bucket.objects("store/engines/")} == set(keys)


def test_impossible_accuracy_gate_fails_and_publishes_nothing(bucket, models, tmp_path, cli, write_yaml):
    manifest_file = write_yaml(tmp_path / "m.yaml", upload_model(bucket, models), inputs=models["cnn"].spec_inputs(),
                               build={**CNN_INT8, "accuracy": {"minCosine": 1.0, "samples": 2}},
                               storage_uri=bucket.uri("store"))
    run = cli(str(manifest_file))
    assert run.exit_code == EXIT_PERMANENT
    assert run.result["status"] == "failed" and run.result["reason"] == "AccuracyGateFailed"
    assert "cosine" in run.result["message"] and "minCosine 1.0" in run.result["message"]
    assert bucket.objects("store/") == {}


def test_cached_engine_that_fails_a_stricter_gate_is_refused_without_rebuilding(bucket, models, tmp_path, cli, write_yaml):
    model_uri = upload_model(bucket, models)
    inputs = models["cnn"].spec_inputs()
    first = cli(str(write_yaml(tmp_path / "a.yaml", model_uri, inputs=inputs, build=CNN_INT8,
                                   storage_uri=bucket.uri("store"))))
    assert first.result["status"] == "built"
    before = bucket.objects("store/")
    strict = write_yaml(tmp_path / "b.yaml", model_uri, inputs=inputs,
                        build={**CNN_INT8, "accuracy": {"minCosine": 1.0, "samples": 2}}, storage_uri=bucket.uri("store"))
    run = cli(str(strict))
    assert run.result["key"] == first.result["key"]  # the gate is not part of the key
    assert run.result["reason"] == "AccuracyGateFailed" and "cached engine" in run.result["message"]
    assert bucket.objects("store/") == before


def test_corrupted_artifact_is_rebuilt_not_served(bucket, models, tmp_path, cli, write_yaml):
    manifest_file = write_yaml(tmp_path / "m.yaml", upload_model(bucket, models, "mlp"),
                               inputs=models["mlp"].spec_inputs(), build={"precision": "fp32"},
                               storage_uri=bucket.uri("store"))
    key = cli(str(manifest_file)).result["key"]
    engine_name = parse_manifest(bucket.read(f"store/engines/{key}/manifest.json")).artifact("engine").name
    engine_key_path = f"store/engines/{key}/{engine_name}"
    good = bucket.read(engine_key_path)
    bucket.put(engine_key_path, b"garbage")
    run = cli(str(manifest_file))
    assert run.result["status"] == "built" and run.result["key"] == key
    assert bucket.read(engine_key_path) == good  # deterministic rebuild restored the bytes


@pytest.mark.parametrize(
    "case, reason, words",
    [
        ("corrupt", "UnsupportedModel", "not an ONNX model"),
        ("sha256", "IntegrityError", "spec.model.sha256"),
        ("missing", "ModelNotFound", "not found"),
        ("no-shapes", "UnsupportedModel", "dynamic dimensions"),
        ("wrong-rank", "InvalidSpec", "spec.model.inputs[0].minShape"),
    ],
)
def test_bad_model_input_is_a_permanent_failure_that_publishes_nothing(bucket, models, tmp_path, case, reason, words, cli, write_yaml):
    inputs = models["cnn"].spec_inputs()
    sha256 = None
    if case == "corrupt":
        model_uri = bucket.put("models/bad.onnx", b"\x08\x07this is not protobuf" * 10)
    elif case == "missing":
        model_uri = bucket.uri("models/absent.onnx")
    else:
        model_uri = upload_model(bucket, models)
    if case == "sha256":
        sha256 = "0" * 64
    if case == "no-shapes":
        inputs = None
    if case == "wrong-rank":
        inputs = [{"name": "input", "minShape": [1, 3, 32], "optShape": [8, 3, 32], "maxShape": [32, 3, 32]}]
    run = cli(str(write_yaml(tmp_path / "m.yaml", model_uri, inputs=inputs, build={"precision": "fp32"},
                                 storage_uri=bucket.uri("store"), sha256=sha256)))
    assert run.exit_code == EXIT_PERMANENT
    assert run.result["status"] == "failed" and run.result["reason"] == reason
    assert words in run.result["message"]
    assert bucket.objects("store/") == {}


def test_unreachable_store_is_retryable(models, tmp_path, monkeypatch, cli, write_yaml):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    manifest_file = write_yaml(tmp_path / "m.yaml", "s3://models/cnn.onnx", inputs=models["cnn"].spec_inputs(),
                               storage_uri="s3://engines/store")
    run = cli(str(manifest_file), "--endpoint", dead)
    assert run.exit_code == EXIT_RETRYABLE
    assert run.result["status"] == "failed" and run.result["reason"] == "StorageUnavailable"
    assert "127.0.0.1" in run.result["message"]


def test_store_bucket_that_does_not_exist_fails_before_building(bucket, models, tmp_path, cli, write_yaml):
    """A typo in the store's bucket: retryable, but found before the build, so a Job retry does not
    repeat an hour of TensorRT build each time."""
    missing = f"no-such-bucket-{uuid.uuid4().hex[:12]}"
    manifest_file = write_yaml(tmp_path / "m.yaml", upload_model(bucket, models, "mlp"),
                               inputs=models["mlp"].spec_inputs(), build={"precision": "fp32"},
                               storage_uri=f"s3://{missing}/store")
    workdir = tmp_path / "work"
    run = cli(str(manifest_file), "--workdir", str(workdir))
    assert run.result["key"] and not (workdir / "build").exists()  # the lookup ran, the build did not
    assert run.exit_code == EXIT_RETRYABLE
    assert run.result["status"] == "failed" and run.result["reason"] == "StorageUnavailable"
    assert f"bucket {missing} does not exist" in run.result["message"]
    assert missing not in {b["Name"] for b in bucket.client.list_buckets()["Buckets"]}


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_store_folder_that_cannot_be_written_fails_before_building(tmp_path, models, cli, write_yaml):
    """A file:// store in a folder nobody can create files in, root included (/proc here; a read-only
    mount or missing permissions look the same to the builder): the lookup is a plain miss, and the
    write check then fails it as StorageUnavailable, retryable, before anything is built."""
    store = Path(f"/proc/plansmith-store-{uuid.uuid4().hex[:12]}")
    workdir = tmp_path / "work"
    run = cli(str(write_yaml(tmp_path / "m.yaml", models["mlp"].path.as_uri(), inputs=models["mlp"].spec_inputs(),
                             build={"precision": "fp32"}, storage_uri=store.as_uri())),
              "--backend", "onnxruntime", "--workdir", str(workdir))
    assert not (workdir / "build").exists()
    assert run.exit_code == EXIT_RETRYABLE
    assert run.result["status"] == "failed" and run.result["reason"] == "StorageUnavailable"
    assert "the engine store cannot be written" in run.result["message"]
    assert "cannot create files in /proc" in run.result["message"]


def test_transformer_block_with_dynamic_int8_passes_the_gate(bucket, models, tmp_path, cli, write_yaml):
    model_uri = upload_model(bucket, models, "transformer")
    run = cli(str(write_yaml(tmp_path / "m.yaml", model_uri, inputs=models["transformer"].spec_inputs(),
                                 build={"precision": "int8", "quantization": "dynamic"},
                                 storage_uri=bucket.uri("store"))))
    assert run.result["status"] == "built", run.result
    manifest = parse_manifest(bucket.read(f"store/engines/{run.result['key']}/manifest.json"))
    assert manifest.accuracy.per_output["output"].cosine >= 0.99
    assert manifest.quantization == "dynamic"


def test_fp16_on_a_cpu_target_builds_float32_kernels_and_says_so(tmp_path, models, cli, write_yaml):
    """file:// store, no S3: precision is the lowest precision allowed, and CPU kernels are float32."""
    store = tmp_path / "store"
    run = cli(str(write_yaml(tmp_path / "m.yaml", models["mlp"].path.as_uri(), inputs=models["mlp"].spec_inputs(),
                                 build={"precision": "fp16"}, storage_uri=store.as_uri())))
    assert run.result["status"] == "built", run.result
    manifest = parse_manifest((store / "engines" / run.result["key"] / "manifest.json").read_bytes())
    assert manifest.precision == "fp16" and manifest.effective_precision == "fp32"
    assert "float32" in run.result["message"]
    # the same engine, so the same key: an fp32 spec finds it
    fp32 = cli(str(write_yaml(tmp_path / "fp32.yaml", models["mlp"].path.as_uri(), inputs=models["mlp"].spec_inputs(),
                              build={"precision": "fp32"}, storage_uri=store.as_uri())))
    assert (fp32.result["status"], fp32.result["key"]) == ("hit", run.result["key"])


def test_a_builder_keying_the_engine_otherwise_than_the_operator_publishes_nothing(tmp_path, models, cli, write_yaml,
                                                                                   monkeypatch):
    """The operator's build Jobs name the key they wait for (PLANSMITH_ENGINE_KEY). A builder image of
    another plansmith version that keys the engine otherwise fails with KeyMismatch, permanently,
    instead of publishing an engine under a key no operator looks for."""
    store, workdir = tmp_path / "store", tmp_path / "work"
    model = write_yaml(tmp_path / "m.yaml", models["mlp"].path.as_uri(), inputs=models["mlp"].spec_inputs(),
                       build={"precision": "fp32"}, storage_uri=store.as_uri())
    monkeypatch.setenv("PLANSMITH_ENGINE_KEY", "0" * 32)
    refused = cli(str(model), "--workdir", str(workdir))
    assert refused.exit_code == EXIT_PERMANENT and refused.result["reason"] == "KeyMismatch"
    assert "0" * 32 in refused.result["message"] and refused.result["key"] in refused.result["message"]
    assert not (store / "engines").exists() and not (workdir / "build").exists()

    monkeypatch.setenv("PLANSMITH_ENGINE_KEY", refused.result["key"])
    assert cli(str(model)).result["status"] == "built"


def test_cross_target_without_a_gpu_backend_is_backend_unavailable(tmp_path, models, cli, write_yaml):
    run = cli(str(write_yaml(tmp_path / "m.yaml", models["mlp"].path.as_uri(),
                                 inputs=models["mlp"].spec_inputs(), storage_uri=(tmp_path / "s").as_uri())),
                  "--target", "9.0", "--backend", "onnxruntime")
    assert run.exit_code == EXIT_PERMANENT and run.result["reason"] == "BackendUnavailable"
    assert not (tmp_path / "s").exists()


def test_invalid_spec_names_the_field(tmp_path, cli, write_yaml):
    bad = tmp_path / "m.yaml"
    bad.write_text("apiVersion: plansmith.io/v1alpha1\nkind: InferenceModel\nmetadata: {name: x}\n"
                   "spec: {model: {uri: 'http://nope'}, build: {precision: int4}}\n")
    run = cli(str(bad))
    assert run.exit_code == EXIT_PERMANENT and run.result["reason"] == "InvalidSpec"
    assert "spec.model.uri" in run.result["message"] and "spec.build.precision" in run.result["message"]


def test_console_script_exit_code_stdout_and_termination_log(s3_server, bucket, models, tmp_path, cli, write_yaml):
    """The real `plansmith` executable, as a build Job runs it."""
    manifest_file = write_yaml(tmp_path / "m.yaml", upload_model(bucket, models, "mlp"),
                               inputs=models["mlp"].spec_inputs(), build={"precision": "fp32"},
                               storage_uri=bucket.uri("store"))
    termination_log = tmp_path / "termination-log"
    termination_log.touch()  # Kubernetes creates the file; the builder only writes to an existing one
    plansmith = Path(sys.executable).with_name("plansmith")
    env = {**os.environ, **s3_server.credentials_env()}
    done = subprocess.run([str(plansmith), "build", str(manifest_file), "--quick-benchmark",
                           "--termination-log", str(termination_log)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["status"] == "built"
    assert json.loads(termination_log.read_text()) == result
    assert "event=phase phase=build" in done.stderr  # structured log lines when not on a terminal

    bucket.put("models/mlp.onnx", b"corrupt")
    done = subprocess.run([str(plansmith), "build", str(manifest_file), "--quick-benchmark",
                           "--termination-log", str(termination_log)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == EXIT_PERMANENT
    assert json.loads(termination_log.read_text())["reason"] == "UnsupportedModel"


def test_fixed_batch_model_with_calibration_on_a_file_store(tmp_path, cli, write_yaml):
    """A model without dynamic dimensions needs no shapes; calibration batches match its fixed batch."""
    from plansmith import testmodels

    info = testmodels.small_cnn(tmp_path / "fixed.onnx", batch=4)
    calibration = testmodels.write_calibration(tmp_path / "calibration.npz", info, samples=10)
    store = tmp_path / "store"
    run = cli(str(write_yaml(tmp_path / "m.yaml", info.path.as_uri(), storage_uri=store.as_uri(),
                             build={"precision": "int8", "calibration": {"uri": calibration.as_uri()}})))
    assert run.result["status"] == "built", run.result
    manifest = parse_manifest((store / "engines" / run.result["key"] / "manifest.json").read_bytes())
    assert manifest.max_batch_size == 0 and manifest.inputs[0].shape == [4, 3, 32, 32]
    assert manifest.benchmark.batch1.batch_size == 4 and manifest.benchmark.max_batch is None
    assert manifest.accuracy.samples == 2  # the 8 of 10 calibration samples that fill whole batches of 4


def test_explicit_quantization_needs_a_quantized_model(tmp_path, models, cli, write_yaml):
    run = cli(str(write_yaml(tmp_path / "m.yaml", models["mlp"].path.as_uri(), inputs=models["mlp"].spec_inputs(),
                             storage_uri=(tmp_path / "s").as_uri(),
                             build={"precision": "int8", "quantization": "explicit"})))
    assert run.exit_code == EXIT_PERMANENT and run.result["reason"] == "UnsupportedModel"
    assert "QuantizeLinear" in run.result["message"]
    assert not (tmp_path / "s" / "engines").exists()
