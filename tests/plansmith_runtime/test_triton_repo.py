"""Rendering a stock Triton model repository; config.pbtxt must parse as Triton's ModelConfig."""

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from plansmith.manifest import Manifest
from plansmith.spec import ResponseCacheSpec
from plansmith.validation import parse_spec
from plansmith_runtime.triton_repo import RepositoryError, render_repository

SPEC = parse_spec({
    "model": {"uri": "s3://models/cnn/model.onnx", "inputs": [
        {"name": "input", "minShape": [1, 3, 32, 32], "optShape": [8, 3, 32, 32], "maxShape": [32, 3, 32, 32]}]},
    "serving": {"runtime": "triton", "maxBatchSize": 16, "instances": 2, "warmup": {"iterations": 3},
                "dynamicBatching": {"preferredBatchSizes": [4, 8], "maxQueueDelayMicroseconds": 200,
                                    "maxQueueSize": 64, "timeoutMicroseconds": 5000}},
})


CNN_INPUTS = [{"name": "input", "dtype": "float32", "shape": [-1, 3, 32, 32], "optShape": [8, 3, 32, 32]}]
CNN_OUTPUTS = [{"name": "logits", "dtype": "float32", "shape": [-1, 10]}]


def manifest(backend="tensorrt", cc="9.0", key="k90", inputs=CNN_INPUTS, outputs=CNN_OUTPUTS) -> Manifest:
    target = {"device": "gpu", "computeCapability": cc} if backend == "tensorrt" else {"device": "cpu", "cpuIsa": "x86_64-avx2"}
    name = "model.plan" if backend == "tensorrt" else "model.onnx"
    return Manifest.model_validate({
        "key": key, "backend": backend, "backendVersion": "10.3.0", "target": target, "precision": "fp16",
        "buildOptions": {}, "source": {"uri": "s3://models/cnn/model.onnx", "sha256": "0" * 64},
        "inputs": inputs, "outputs": outputs, "maxBatchSize": 32,
        "artifacts": [{"name": name, "sha256": "1" * 64, "bytes": 10}], "buildSeconds": 1, "builderVersion": "0",
        "createdAt": "now"})


def parse(text: str) -> mc.ModelConfig:
    return text_format.Parse(text, mc.ModelConfig())


def test_one_plan_renders_a_tensorrt_model():
    repo = render_repository("cnn", SPEC, [manifest()])
    config = parse(repo.files["cnn/config.pbtxt"])
    assert config.platform == "tensorrt_plan" and config.max_batch_size == 16
    assert list(config.input[0].dims) == [3, 32, 32] and config.input[0].data_type == mc.TYPE_FP32
    assert list(config.output[0].dims) == [10]
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]
    assert config.dynamic_batching.max_queue_delay_microseconds == 200
    assert config.dynamic_batching.default_queue_policy.max_queue_size == 64
    assert config.dynamic_batching.default_queue_policy.default_timeout_microseconds == 5000
    assert config.instance_group[0].count == 2 and config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    assert [w.batch_size for w in config.model_warmup] == [1, 4, 8, 16]
    assert all(w.count == 3 and list(w.inputs["input"].dims) == [3, 32, 32] for w in config.model_warmup)
    assert config.default_model_filename == "model.plan"
    assert list(repo.engines) == ["cnn/1/model.plan"]


def test_plans_for_several_compute_capabilities_use_cc_model_filenames():
    repo = render_repository("cnn", SPEC, [manifest(cc="9.0", key="a"), manifest(cc="8.6", key="b")])
    config = parse(repo.files["cnn/config.pbtxt"])
    assert dict(config.cc_model_filenames) == {"9.0": "model_sm90.plan", "8.6": "model_sm86.plan"}
    assert repo.engines["cnn/1/model_sm86.plan"].manifest.key == "b"


def text_model() -> Manifest:
    """Token ids, and a tensor of one value an item each way."""
    return manifest(inputs=[{"name": "input_ids", "dtype": "int64", "shape": [-1, 16]},
                            {"name": "temperature", "dtype": "float32", "shape": [-1]}],
                    outputs=[{"name": "label", "dtype": "int64", "shape": [-1]}])


def test_a_tensor_of_one_value_an_item_is_dims_1_reshaped_and_token_ids_warm_up_on_zeros():
    """Triton refuses empty dims ("must specify 'dims'"), and random bytes as token ids make an
    embedding's Gather fail every warmup run."""
    config = parse(render_repository("text", SPEC, [text_model()]).files["text/config.pbtxt"])
    temperature, label = config.input[1], config.output[0]
    assert list(temperature.dims) == [1] and temperature.HasField("reshape") and not temperature.reshape.shape
    assert list(label.dims) == [1] and label.HasField("reshape")
    assert list(config.input[0].dims) == [16] and not config.input[0].HasField("reshape")
    warmup = config.model_warmup[0].inputs
    assert warmup["input_ids"].zero_data and not warmup["input_ids"].random_data
    assert warmup["temperature"].random_data and list(warmup["temperature"].dims) == [1]


def test_onnxruntime_engine_renders_onnxruntime_onnx_on_cpu():
    config = parse(render_repository("cnn", SPEC, [manifest("onnxruntime")]).files["cnn/config.pbtxt"])
    assert config.platform == "onnxruntime_onnx"
    assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU


def test_a_response_cache_renders_tritons_response_cache_setting():
    assert not parse(render_repository("cnn", SPEC, [manifest()]).files["cnn/config.pbtxt"]).HasField("response_cache")
    cached = SPEC.model_copy(update={"serving": SPEC.serving.model_copy(update={
        "response_cache": ResponseCacheSpec(size_bytes=1 << 20)})})
    text = render_repository("cnn", cached, [manifest()]).files["cnn/config.pbtxt"]
    assert "response_cache {\n  enable: true\n}" in text and parse(text).response_cache.enable


def test_mixed_or_duplicate_engines_are_refused():
    with pytest.raises(RepositoryError, match="mix backends"):
        render_repository("cnn", SPEC, [manifest(), manifest("onnxruntime")])
    with pytest.raises(RepositoryError, match="two engines for compute capability 9.0"):
        render_repository("cnn", SPEC, [manifest(key="a"), manifest(key="b")])


def test_repository_is_written_with_verified_engines(engines, tmp_path):
    from plansmith.manifest import parse_manifest
    from plansmith_runtime.triton_repo import write_repository

    built = engines["mlp"]
    manifest = parse_manifest(open(built.manifest_uri.removeprefix("file://"), "rb").read())
    store = built.manifest_uri.split("/engines/")[0]
    spec = parse_spec({"model": {"uri": f"file://{built.model.path}", "inputs": built.model.spec_inputs()},
                       "serving": {"runtime": "triton", "maxBatchSize": 32, "dynamicBatching": {}}})
    written = write_repository(render_repository("mlp", spec, [manifest]), tmp_path / "repo", store)
    assert sorted(p.relative_to(tmp_path / "repo").as_posix() for p in written) == ["mlp/1/model.onnx", "mlp/config.pbtxt"]
    assert (tmp_path / "repo/mlp/1/model.onnx").read_bytes() == built.engine_path.read_bytes()
    config = parse((tmp_path / "repo/mlp/config.pbtxt").read_text())
    assert config.platform == "onnxruntime_onnx" and list(config.input[0].dims) == [256]


def test_the_init_containers_command_writes_the_repository_and_refuses_a_tampered_engine(engines, tmp_path, capsys):
    """`plansmith triton-repository`, as a Triton serving pod's init container runs it."""
    import json
    import shutil

    from plansmith.cli import main

    built = engines["mlp"]
    spec = {"model": {"uri": f"file://{built.model.path}", "inputs": built.model.spec_inputs()},
            "serving": {"runtime": "triton", "maxBatchSize": 32, "dynamicBatching": {"preferredBatchSizes": [8]},
                        "instances": 2}}
    command = ["triton-repository", "--manifest", built.manifest_uri, "--model-name", "mlp",
               "--spec-json", json.dumps(spec), "--out", str(tmp_path / "repo")]
    assert main(command) == 0
    assert json.loads(capsys.readouterr().out) == {"status": "written", "repository": str(tmp_path / "repo"),
                                                   "files": ["mlp/1/model.onnx", "mlp/config.pbtxt"]}
    config = parse((tmp_path / "repo/mlp/config.pbtxt").read_text())
    assert (config.max_batch_size, list(config.dynamic_batching.preferred_batch_size)) == (32, [8])
    assert config.instance_group[0].count == 2
    assert (tmp_path / "repo/mlp/1/model.onnx").read_bytes() == built.engine_path.read_bytes()

    # the same engine with its bytes changed in storage: refused, and the engine file not left behind
    store = tmp_path / "store"
    engine_folder = built.engine_path.parent
    copy = store / "engines" / engine_folder.name
    shutil.copytree(engine_folder, copy)
    (copy / built.engine_path.name).write_bytes(b"not the engine")
    tampered = command[:2] + [(copy / "manifest.json").as_uri()] + command[3:-1] + [str(tmp_path / "tampered")]
    assert main(tampered) == 1
    error = json.loads(capsys.readouterr().out)
    assert error["status"] == "failed" and error["reason"] == "IntegrityError" and "sha256" in error["message"]
    assert not (tmp_path / "tampered/mlp/1/model.onnx").exists()
    assert main(command[:-3] + ["{not json", "--out", str(tmp_path / "bad")]) == 1
    assert json.loads(capsys.readouterr().out)["reason"] == "InvalidSpec"
    (tmp_path / "a-file").write_text("not a folder")
    assert main(command[:-1] + [str(tmp_path / "a-file" / "repo")]) == 1  # an --out it cannot write
    assert json.loads(capsys.readouterr().out)["reason"] == "NotADirectoryError"


def test_a_real_tritonserver_accepts_the_rendered_configs_and_refuses_a_broken_one(engines, tritonserver, tmp_path):
    """Triton checks a model's config.pbtxt when it polls the repository, before it looks for the
    model's backend (with auto-complete off, inputs and outputs included: auto-complete would leave
    them to the backend). The tritonserver here has the Python backend alone, so a model whose
    config Triton accepts gets as far as "unable to find backend library" for onnxruntime or
    tensorrt; a config it refuses fails at the poll, with its reason. The broken copies show that
    the check can fail, on the batching settings and on the tensors."""
    import json
    import re
    import subprocess

    from plansmith.cli import main

    repository = tmp_path / "repo"
    built = engines["mlp"]
    spec = {"model": {"uri": f"file://{built.model.path}", "inputs": built.model.spec_inputs()},
            "serving": {"runtime": "triton", "maxBatchSize": 32, "instances": 2, "warmup": {"iterations": 2},
                        "dynamicBatching": {"preferredBatchSizes": [8, 16], "maxQueueDelayMicroseconds": 200,
                                            "maxQueueSize": 64, "timeoutMicroseconds": 5000}}}
    assert main(["triton-repository", "--manifest", built.manifest_uri, "--model-name", "mlp",
                 "--spec-json", json.dumps(spec), "--out", str(repository)]) == 0
    # TensorRT plans for two compute capabilities (cc_model_filenames, instances of kind GPU), and a
    # plan whose tensors hold one value an item (dims [1] reshaped to [])
    for plans in (render_repository("cnn", SPEC, [manifest(cc="9.0", key="a"), manifest(cc="8.6", key="b")]),
                  render_repository("text", SPEC, [text_model()])):
        for relative, text in plans.files.items():
            (repository / relative).parent.mkdir(parents=True, exist_ok=True)
            (repository / relative).write_text(text)
        for relative in plans.engines:
            (repository / relative).parent.mkdir(parents=True, exist_ok=True)
            (repository / relative).write_bytes(b"not a plan")
    broken = (repository / "mlp/config.pbtxt").read_text().replace('name: "mlp"', 'name: "broken"')
    broken = broken.replace("max_batch_size: 32", "max_batch_size: 4")  # under its preferred sizes
    (repository / "broken/1").mkdir(parents=True)
    (repository / "broken/config.pbtxt").write_text(broken)
    broken_tensors = (repository / "mlp/config.pbtxt").read_text().replace('name: "mlp"', 'name: "broken_tensors"')
    broken_tensors = broken_tensors.replace("dims: 256", "dims: -7")
    (repository / "broken_tensors/1").mkdir(parents=True)
    (repository / "broken_tensors/config.pbtxt").write_text(broken_tensors)

    run = subprocess.run([str(tritonserver), "--model-repository", str(repository),
                          "--backend-directory", str(tritonserver.parents[1] / "backends"), "--disable-auto-complete-config",
                          "--allow-http", "false", "--allow-grpc", "false", "--allow-metrics", "false"],
                         capture_output=True, text=True, timeout=300)
    log = run.stdout + run.stderr
    assert run.returncode != 0, log  # no model loads: there is no onnxruntime or tensorrt backend here
    refused = dict(re.findall(r"Poll failed for model directory '(\w+)': ([^\"]+)", log))
    reached_backend = dict(re.findall(r"failed to load '(\w+)' version 1: .*unable to find backend library "
                                      r"for backend '(\w+)'", log))
    assert refused.pop("broken") == "dynamic batching preferred size must be <= max batch size for broken", log
    assert refused.pop("broken_tensors").startswith("model input 'input' dimension must be integer >= 1"), log
    assert not refused, log
    assert reached_backend == {"mlp": "onnxruntime", "cnn": "tensorrt", "text": "tensorrt"}, log
