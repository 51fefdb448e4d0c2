"""The CRD on a real kube-apiserver (v1.20.2): installs, accepts and rejects what the schema says,
defaults like the Python model, explains its fields, and keeps status separate from spec."""

from __future__ import annotations

import copy
import subprocess
import time

import pytest
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

from plansmith.spec import API_GROUP, API_VERSION, PLURAL
from plansmith.validation import InvalidSpec, parse_spec

NAMESPACE = "crd-tests"


@pytest.fixture(scope="module")
def crd_installed(kube_client, inference_model_crd):
    assert inference_model_crd["spec"]["names"]["kind"] == "InferenceModel"
    client.CoreV1Api(kube_client).create_namespace({"metadata": {"name": NAMESPACE}})
    return inference_model_crd


@pytest.fixture
def objects(kube_client, crd_installed):
    return client.CustomObjectsApi(kube_client)


def example(repo_root, name: str) -> dict:
    body = yaml.safe_load((repo_root / "deploy/examples/model.yaml").read_text())
    body["metadata"]["name"] = name
    return body


def create(objects, body):
    return objects.create_namespaced_custom_object(API_GROUP, API_VERSION, NAMESPACE, PLURAL, body)


def test_example_is_accepted_as_written(objects, repo_root):
    stored = create(objects, example(repo_root, "example"))
    assert stored["spec"]["serving"]["dynamicBatching"]["preferredBatchSizes"] == [8, 32]
    assert stored["metadata"]["generation"] == 1


def test_server_defaults_agree_with_the_python_model(objects):
    minimal = {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": "InferenceModel", "metadata": {"name": "minimal"},
               "spec": {"model": {"uri": "s3://models/m.onnx"}, "build": {"accuracy": {}},
                        "serving": {"dynamicBatching": {}, "warmup": {}}}}
    stored = create(objects, minimal)["spec"]
    model = parse_spec(minimal["spec"]).to_api()
    assert stored["build"]["precision"] == "fp16"
    assert stored["serving"]["dynamicBatching"]["maxQueueSize"] == 1024

    def compare(server, python, path="spec"):
        for key, value in server.items():
            if isinstance(value, dict):
                compare(value, python[key], f"{path}.{key}")
            else:
                assert python[key] == value, f"{path}.{key}: server default {value!r} != model default {python[key]!r}"

    compare(stored, model)


def with_change(repo_root, path: str, value) -> dict:
    body = example(repo_root, "invalid")
    node = body
    *parents, leaf = path.split(".")
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    node[leaf] = value
    return body


INVALID = {
    "spec.build.precision": "fp64",
    "spec.build.optimizationLevel": 9,
    "spec.build.workspaceMiB": 8,
    "spec.build.hardwareCompatibility": "turing+",
    "spec.model.uri": "https://example.com/m.onnx",
    "spec.model.sha256": "not-a-digest",
    "spec.model.inputs.0.minShape": [0, 3, 32, 32],
    "spec.serving.replicas": -1,
    "spec.serving.maxBatchSize": "eight",
    "spec.serving.runtime": "torchserve",
    "spec.serving.dynamicBatching.maxQueueSize": 0,
    "spec.serving.tolerations": [{"key": "gpu", "effect": "Sometimes"}],
    "spec.storage.uri": "gs://bucket/engines",
}


@pytest.mark.parametrize("path", sorted(INVALID))
def test_server_and_model_reject_the_same_objects(objects, repo_root, path):
    body = with_change(repo_root, path, INVALID[path])
    with pytest.raises(ApiException) as caught:
        create(objects, body)
    assert caught.value.status == 422
    field = path.split(".")[-1]
    assert field in caught.value.body, caught.value.body
    with pytest.raises(InvalidSpec):
        parse_spec(body["spec"])


def test_missing_required_fields_are_rejected(objects):
    body = {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": "InferenceModel", "metadata": {"name": "nomodel"},
            "spec": {"build": {"precision": "fp32"}}}
    with pytest.raises(ApiException) as caught:
        create(objects, body)
    assert caught.value.status == 422 and "spec.model" in caught.value.body


def test_kubectl_explain_shows_field_descriptions(control_plane, crd_installed):
    def explain(field: str) -> str:
        deadline = time.monotonic() + 60
        while True:  # the OpenAPI document is republished a few seconds after the CRD appears
            result = subprocess.run([str(control_plane.kubectl), "--kubeconfig", str(control_plane.kubeconfig),
                                     "explain", field], capture_output=True, text=True, timeout=30)
            if result.returncode == 0 or time.monotonic() > deadline:
                return result.stdout + result.stderr
            time.sleep(1)

    build = explain("inferencemodel.spec.build")
    assert "Engine build options." in build
    assert "hardwareCompatibility" in build and "optimizationLevel" in build
    precision = explain("inferencemodel.spec.build.precision")
    assert "Lowest precision kernels may use" in precision


def test_status_subresource_keeps_spec_and_generation(objects, repo_root):
    created = create(objects, example(repo_root, "status-demo"))
    assert created["metadata"]["generation"] == 1
    status = {"status": {"phase": "Building", "observedGeneration": 1, "targetCount": 2, "enginesReady": 0,
                         "conditions": [{"type": "Ready", "status": "False", "reason": "EnginesBuilding",
                                         "message": "0/2 engines", "lastTransitionTime": "2026-11-24T00:00:00Z"}]}}
    patched = objects.patch_namespaced_custom_object_status(API_GROUP, API_VERSION, NAMESPACE, PLURAL, "status-demo", status)
    assert patched["status"]["phase"] == "Building"
    assert patched["metadata"]["generation"] == 1

    # status written through the main resource is ignored; a spec change bumps the generation
    change = copy.deepcopy(status)
    change["status"]["phase"] = "Ready"
    change["spec"] = {"serving": {"replicas": 3}}
    updated = objects.patch_namespaced_custom_object(API_GROUP, API_VERSION, NAMESPACE, PLURAL, "status-demo", change)
    assert updated["status"]["phase"] == "Building"
    assert updated["spec"]["serving"]["replicas"] == 3
    assert updated["metadata"]["generation"] == 2


def test_printer_columns(control_plane, objects, repo_root):
    create(objects, example(repo_root, "columns"))
    objects.patch_namespaced_custom_object_status(
        API_GROUP, API_VERSION, NAMESPACE, PLURAL, "columns",
        {"status": {"phase": "Ready", "targetCount": 2, "enginesReady": 2,
                    "conditions": [{"type": "Ready", "status": "True", "reason": "Serving", "message": "2/2 engines serving",
                                    "lastTransitionTime": "2026-11-24T00:00:00Z"}]}})
    result = subprocess.run([str(control_plane.kubectl), "--kubeconfig", str(control_plane.kubeconfig),
                             "get", "im", "columns", "-n", NAMESPACE], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    header, row = result.stdout.splitlines()[:2]
    assert header.split()[:6] == ["NAME", "READY", "PHASE", "TARGETS", "ENGINES", "READY"]
    assert row.split()[:5] == ["columns", "True", "Ready", "2", "2"]
