"""The contract between the operator's build Jobs and `plansmith build`: the model comes from an
environment variable, and the engine key is the one the operator computed from the target it
pinned the Job to (a GPU type, `cpu:<arch>`, or a simulated GPU in the dev cluster)."""

from __future__ import annotations

import hashlib

import onnxruntime

from plansmith.controller import rendering
from plansmith.controller.settings import OperatorSettings
from plansmith.controller.targets import Target
from plansmith.engine_key import engine_key
from plansmith.manifest import parse_manifest
from plansmith.validation import parse_spec
from plansmith_builder.backends.ort_plan import plan_ort_build
from plansmith_builder.errors import EXIT_PERMANENT


def job_env_and_args(tmp_path, models, target: Target, simulated: bool = False):
    """Render the build Job the operator would launch, under the key it computes, and return (the spec,
    the settings, its env, its builder args)."""
    mlp = models["mlp"]
    spec = parse_spec({"model": {"uri": mlp.path.as_uri(), "inputs": mlp.spec_inputs()},
                       "build": {"precision": "fp32", "accuracy": {"samples": 2}},
                       "storage": {"uri": (tmp_path / "store").as_uri()}})
    settings = OperatorSettings(builder_backend="onnxruntime", builder_backend_version=onnxruntime.__version__)
    job = rendering.render_build_job(name="mlp", namespace="ns", spec=spec, target=target,
                                     key=operator_key(spec, settings, target, simulated), settings=settings)
    container = job["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    return spec, settings, env, container["args"]


def operator_key(spec, settings, target: Target, simulated: bool = False) -> str:
    sha = hashlib.sha256(open(spec.model.uri[len("file://"):], "rb").read()).hexdigest()
    return engine_key(source_sha256=sha, build=spec.build, inputs=spec.model.inputs, backend="onnxruntime",
                      backend_version=settings.builder_backend_version, target=target.engine_target(simulated))


def test_cpu_target_job_builds_under_the_operators_key(tmp_path, models, cli, monkeypatch):
    target = Target("cpu", None, None, None, ("n1",), cpu_arch="x86_64")
    spec, settings, env, args = job_env_and_args(tmp_path, models, target)
    monkeypatch.setenv("PLANSMITH_MODEL", env["PLANSMITH_MODEL"])
    monkeypatch.setenv("PLANSMITH_ENGINE_KEY", env["PLANSMITH_ENGINE_KEY"])  # the builder checks it is its own
    assert args[0] == "env:PLANSMITH_MODEL"  # arguments of the image's entrypoint, `plansmith build`
    run = cli(*args)
    assert run.exit_code == 0, run.result
    assert run.result["key"] == operator_key(spec, settings, target)
    manifest = parse_manifest((tmp_path / "store" / "engines" / run.result["key"] / "manifest.json").read_bytes())
    assert manifest.target.device == "cpu" and manifest.target.cpu_isa == "x86_64"


def test_portable_cpu_targets_do_not_bake_in_simd_specific_layouts():
    build = parse_spec({"model": {"uri": "s3://models/m.onnx"}, "build": {"optimizationLevel": 5}}).build
    from plansmith.engine_key import EngineTarget

    assert plan_ort_build(build, EngineTarget(device="cpu", cpu_isa="x86_64")).graph_level == "ORT_ENABLE_EXTENDED"
    assert plan_ort_build(build, EngineTarget(device="cpu", cpu_isa="x86_64-avx2")).graph_level == "ORT_ENABLE_ALL"


def test_simulated_gpu_is_keyed_for_the_gpu_type_and_runs_on_the_cpu(tmp_path, models, cli, monkeypatch):
    target = Target("gpu", "NVIDIA-H100-80GB-HBM3", "9.0", "nvidia.com/gpu", ("h1",))
    spec, settings, env, args = job_env_and_args(tmp_path, models, target, simulated=True)
    monkeypatch.setenv("PLANSMITH_MODEL", env["PLANSMITH_MODEL"])
    monkeypatch.setenv("PLANSMITH_ENGINE_KEY", env["PLANSMITH_ENGINE_KEY"])  # the builder checks it is its own
    assert args[-2:] == ["--target", "9.0"]
    refused = cli(*args)  # a GPU target on a machine without CUDA, not declared simulated
    assert refused.exit_code == EXIT_PERMANENT and refused.result["reason"] == "BackendUnavailable"

    run = cli(*args, "--simulated-gpu")
    assert run.exit_code == 0, run.result
    assert run.result["key"] == operator_key(spec, settings, target, simulated=True)
    # a real sm90 build of the same spec never gets this CPU-built engine as a cache hit
    assert run.result["key"] != operator_key(spec, settings, target)
    manifest = parse_manifest((tmp_path / "store" / "engines" / run.result["key"] / "manifest.json").read_bytes())
    assert manifest.target.device == "gpu" and manifest.target.compute_capability == "9.0"
    assert manifest.target.execution_provider == "CPUExecutionProvider"


def test_model_from_a_missing_environment_variable_is_invalid_spec(cli, monkeypatch):
    monkeypatch.delenv("PLANSMITH_NOT_SET", raising=False)
    run = cli("env:PLANSMITH_NOT_SET")
    assert run.exit_code == EXIT_PERMANENT and run.result["reason"] == "InvalidSpec"
    assert "PLANSMITH_NOT_SET" in run.result["message"]
