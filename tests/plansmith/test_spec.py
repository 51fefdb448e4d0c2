"""The spec model: defaults, wire names, and the rules between fields."""

from __future__ import annotations

import copy

import pytest
import yaml

from plansmith.spec import InferenceModelSpec
from plansmith.validation import InvalidSpec, parse_spec, semantic_problems

MINIMAL = {"model": {"uri": "s3://models/m.onnx"}}


def spec_with(**overrides) -> dict:
    raw = copy.deepcopy(MINIMAL)
    for dotted, value in overrides.items():
        node = raw
        *parents, leaf = dotted.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return raw


def problem_paths(raw: dict) -> list[str]:
    with pytest.raises(InvalidSpec) as caught:
        parse_spec(raw)
    return [p.path for p in caught.value.problems]


def test_minimal_spec_gets_documented_defaults():
    spec = parse_spec(MINIMAL)
    assert spec.build.backend == "auto"
    assert spec.build.precision == "fp16"
    assert spec.build.workspace_mi_b == 4096
    assert spec.build.accuracy.min_cosine == 0.99
    assert spec.serving.replicas == 1
    assert spec.serving.max_batch_size == 8
    assert spec.serving.dynamic_batching is None
    assert spec.targets == []


def test_wire_names_are_camel_case_and_round_trip():
    raw = spec_with(build__workspaceMiB=512, serving__dynamicBatching={"maxQueueDelayMicroseconds": 50})
    spec = parse_spec(raw)
    wire = spec.to_api()
    assert wire["build"]["workspaceMiB"] == 512
    assert wire["serving"]["dynamicBatching"]["maxQueueDelayMicroseconds"] == 50
    assert "max_batch_size" not in wire["serving"] and "maxBatchSize" in wire["serving"]
    assert InferenceModelSpec.model_validate(wire) == spec


def test_example_manifest_is_valid(repo_root):
    document = yaml.safe_load((repo_root / "deploy/examples/model.yaml").read_text())
    spec = parse_spec(document["spec"])
    assert spec.serving.dynamic_batching.preferred_batch_sizes == [8, 32]


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        (spec_with(model__uri="https://example.com/m.onnx"), "spec.model.uri"),
        (spec_with(model__sha256="ABC"), "spec.model.sha256"),
        (spec_with(build__precision="fp64"), "spec.build.precision"),
        (spec_with(build__optimizationLevel=6), "spec.build.optimizationLevel"),
        (spec_with(build__workspaceMiB="lots"), "spec.build.workspaceMiB"),
        (spec_with(build__turbo=True), "spec.build.turbo"),
        (spec_with(serving__replicas=-1), "spec.serving.replicas"),
        (spec_with(serving__mig={"profile": "big"}), "spec.serving.mig.profile"),
        (spec_with(targets=[{"computeCapability": "nine"}]), "spec.targets[0].computeCapability"),
        (spec_with(storage__uri="gs://bucket/engines"), "spec.storage.uri"),
        (spec_with(serving__trace={"level": ["SPANS"]}), "spec.serving.trace.level[0]"),
        (spec_with(serving__trace={"count": 0}), "spec.serving.trace.count"),
        (spec_with(serving__trace={"rate": -1}), "spec.serving.trace.rate"),
        (spec_with(serving__responseCache={"sizeBytes": 0}), "spec.serving.responseCache.sizeBytes"),
        (spec_with(serving__responseCache={}), "spec.serving.responseCache.sizeBytes"),
        ({"build": {}}, "spec.model"),
    ],
)
def test_structural_problems_name_the_field(raw, path):
    assert path in problem_paths(raw)


def test_shape_ranges_must_be_ordered_and_of_equal_rank():
    inputs = [
        {"name": "a", "minShape": [1, 3], "optShape": [8, 3], "maxShape": [4, 3]},
        {"name": "b", "minShape": [1], "optShape": [1, 1], "maxShape": [1, 1]},
    ]
    paths = problem_paths(spec_with(model__inputs=inputs, serving__maxBatchSize=1))
    assert paths == ["spec.model.inputs[0].optShape[0]", "spec.model.inputs[1]"]


def test_max_batch_size_cannot_exceed_the_inputs_max_batch():
    inputs = [{"name": "x", "minShape": [1, 4], "optShape": [2, 4], "maxShape": [4, 4]}]
    assert problem_paths(spec_with(model__inputs=inputs, serving__maxBatchSize=16)) == ["spec.serving.maxBatchSize"]
    assert parse_spec(spec_with(model__inputs=inputs, serving__maxBatchSize=4)).serving.max_batch_size == 4


@pytest.mark.parametrize(
    ("build", "valid"),
    [
        ({"precision": "int8"}, False),
        ({"precision": "int8", "calibration": {"uri": "s3://models/calib.npz"}}, True),
        ({"precision": "int8", "quantization": "explicit"}, True),
        ({"precision": "int8", "quantization": "dynamic", "backend": "onnxruntime"}, True),
        ({"precision": "int8", "quantization": "dynamic", "backend": "tensorrt"}, False),
        ({"precision": "int8", "quantization": "calibrated"}, False),
        ({"precision": "fp16", "quantization": "dynamic"}, False),
        ({"precision": "fp8", "quantization": "explicit", "backend": "onnxruntime"}, False),
        ({"precision": "fp8", "quantization": "explicit"}, True),
    ],
)
def test_int8_and_fp8_need_a_source_of_scales(build, valid):
    raw = spec_with(build=build)
    if valid:
        parse_spec(raw)
    else:
        assert any(path.startswith("spec.build") for path in problem_paths(raw))


def test_batching_rules():
    assert problem_paths(spec_with(serving={"maxBatchSize": 4, "dynamicBatching": {"preferredBatchSizes": [2, 8]}})) == [
        "spec.serving.dynamicBatching.preferredBatchSizes[1]"
    ]
    assert problem_paths(spec_with(serving={"maxBatchSize": 0, "dynamicBatching": {}})) == ["spec.serving.dynamicBatching"]
    assert problem_paths(spec_with(serving={"dynamicBatching": {"preferredBatchSizes": [2, 2]}})) == [
        "spec.serving.dynamicBatching.preferredBatchSizes"
    ]


def test_targets_need_an_identity_and_no_duplicates():
    paths = problem_paths(spec_with(targets=[{}, {"computeCapability": "9.0"}, {"computeCapability": "9.0"}]))
    assert paths == ["spec.targets[0]", "spec.targets[2]"]


def test_gpu_resources_are_plansmiths_to_add():
    raw = spec_with(serving__resources={"limits": {"nvidia.com/gpu": 1, "memory": "1Gi"}})
    assert problem_paths(raw) == ["spec.serving.resources.limits"]
    raw = spec_with(serving__resources={"requests": {"nvidia.com/mig-1g.10gb": 1}})
    assert problem_paths(raw) == ["spec.serving.resources.requests"]


def test_quantities_must_be_kubernetes_quantities():
    """The API server refuses the Deployment otherwise, and the operator would learn it only then."""
    good = {"limits": {"memory": "8Gi", "cpu": "1.5", "ephemeral-storage": "1G"}, "requests": {"cpu": "500m", "memory": 2}}
    parse_spec(spec_with(serving__resources=good, serving__sharedMemorySize="1Gi"))
    raw = spec_with(serving={"resources": {"limits": {"memory": "8GB"}}, "sharedMemorySize": "1 GiB",
                             "sidecars": [{"name": "client", "image": "busybox", "resources": {"requests": {"cpu": "half"}}}]})
    assert problem_paths(raw) == ["spec.serving.resources.limits.memory", "spec.serving.sidecars[0].resources.requests.cpu",
                                  "spec.serving.sharedMemorySize"]


def test_a_sidecar_sets_each_environment_variable_once():
    sidecar = {"name": "client", "image": "busybox", "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"},
                                                              {"name": "A", "value": "3"}]}
    assert problem_paths(spec_with(serving__sidecars=[sidecar])) == ["spec.serving.sidecars[0].env[2].name"]


def test_hardware_compatibility_is_for_tensorrt_plans():
    assert problem_paths(spec_with(build={"backend": "onnxruntime", "hardwareCompatibility": "ampere+"})) == [
        "spec.build.hardwareCompatibility"]
    parse_spec(spec_with(build={"backend": "tensorrt", "hardwareCompatibility": "ampere+"}))


def test_file_storage_takes_no_credentials():
    raw = spec_with(storage={"uri": "file:///var/engines", "secretRef": {"name": "s3"}, "endpoint": "http://x:9000"})
    assert problem_paths(raw) == ["spec.storage.secretRef", "spec.storage.endpoint"]


@pytest.mark.parametrize(("trace", "paths"), [
    ({"mode": "triton", "opentelemetry": {"url": "http://collector:4318/v1/traces"}},
     ["spec.serving.trace.opentelemetry"]),
    ({"rate": 0}, ["spec.serving.trace.rate"]),
    ({"mode": "opentelemetry", "level": ["TIMESTAMPS", "TENSORS"]}, ["spec.serving.trace.level"]),
    ({"mode": "opentelemetry", "logFrequency": 10}, ["spec.serving.trace.logFrequency"]),
    ({"mode": "opentelemetry", "opentelemetry": {"resource": {"": "x", "a=b": "c"}}},
     ["spec.serving.trace.opentelemetry.resource"] * 2),
    ({"mode": "zipkin"}, ["spec.serving.trace.mode"]),
    ({"mode": "opentelemetry", "opentelemetry": {"url": ""}}, ["spec.serving.trace.opentelemetry.url"]),
])
def test_trace_modes_take_their_own_settings(trace, paths):
    assert problem_paths(spec_with(serving__trace=trace)) == paths


def test_opentelemetry_tracing_of_only_the_requests_that_carry_a_traceparent():
    spec = parse_spec(spec_with(serving__trace={"mode": "opentelemetry", "rate": 0,
                                                "opentelemetry": {"resource": {"service.name": "r"}}}))
    assert (spec.serving.trace.rate, spec.serving.trace.opentelemetry.url) == (0, "http://localhost:4318/v1/traces")


CLIENT = {"name": "client", "image": "registry.example/preprocess:1.2"}


@pytest.mark.parametrize(("sidecars", "paths"), [
    ([CLIENT, {**CLIENT, "image": "other:1"}], ["spec.serving.sidecars[1].name"]),
    ([{**CLIENT, "name": "runtime"}], ["spec.serving.sidecars[0].name"]),
    ([{**CLIENT, "name": "Client_1"}], ["spec.serving.sidecars[0].name"]),
    ([{"name": "client"}], ["spec.serving.sidecars[0].image"]),
    ([{**CLIENT, "resources": {"limits": {"nvidia.com/gpu": 1}}}], ["spec.serving.sidecars[0].resources.limits"]),
    ([{**CLIENT, "resources": {"requests": {"nvidia.com/mig-1g.10gb": 1}}}], ["spec.serving.sidecars[0].resources.requests"]),
    ([{**CLIENT, "env": [{"name": "1X", "value": "y"}]}], ["spec.serving.sidecars[0].env[0].name"]),
    ([{**CLIENT, "securityContext": {"privileged": True}}], ["spec.serving.sidecars[0].securityContext"]),
])
def test_sidecars_need_their_own_names_an_image_and_no_gpu(sidecars, paths):
    assert problem_paths(spec_with(serving__sidecars=sidecars)) == paths


def test_a_sidecar_takes_a_command_arguments_environment_and_resources():
    sidecar = {**CLIENT, "command": ["python", "-c"], "args": ["print(1)"], "env": [{"name": "MODEL", "value": "m"}],
               "resources": {"limits": {"memory": "256Mi"}}}
    [parsed] = parse_spec(spec_with(serving__sidecars=[sidecar])).serving.sidecars
    assert (parsed.command, parsed.args, parsed.env[0].value, parsed.resources.limits) == (
        ["python", "-c"], ["print(1)"], "m", {"memory": "256Mi"})
    assert parse_spec(MINIMAL).serving.sidecars == []


def test_semantic_problems_is_pure_and_empty_for_a_good_spec():
    spec = parse_spec(MINIMAL)
    assert semantic_problems(spec) == []
    assert semantic_problems(spec) == []
