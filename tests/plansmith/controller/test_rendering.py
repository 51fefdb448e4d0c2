"""Rendered build Jobs, Deployments and the Service: names, pinning, resources, security, secrets."""

from __future__ import annotations

import json

import pytest

from plansmith.controller import rendering
from plansmith.controller.settings import OperatorSettings
from plansmith.controller.targets import Target
from plansmith.validation import parse_spec

SETTINGS = OperatorSettings(builder_backend_version="1.0", builder_image="plansmith/builder:dev")
H100 = Target("gpu", "NVIDIA-H100-80GB-HBM3", "9.0", "nvidia.com/gpu", ("h1",))
MIG = Target("gpu", "NVIDIA-A100-SXM4-40GB", "8.0", "nvidia.com/mig-1g.10gb", ("m1",))
KEY = "0123456789abcdef0123456789abcdef"
SPEC = parse_spec({
    "model": {"uri": "s3://models/m.onnx", "inputs": [{"name": "x", "minShape": [1, 4], "optShape": [4, 4], "maxShape": [16, 4]}]},
    "build": {"timeoutSeconds": 900},
    "serving": {"replicas": 2, "maxBatchSize": 16, "instances": 2,
                "dynamicBatching": {"preferredBatchSizes": [4, 8], "maxQueueDelayMicroseconds": 200},
                "resources": {"limits": {"memory": "2Gi"}},
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
    "storage": {"uri": "s3://engines/prod", "secretRef": {"name": "s3-creds"}, "endpoint": "http://minio:9000"},
})


def job(target=H100):
    return rendering.render_build_job(name="resnet", namespace="ml", spec=SPEC, target=target, key=KEY, settings=SETTINGS)


def test_job_is_named_from_the_key_and_labelled():
    body = job()
    assert body["metadata"]["name"] == "plansmith-build-0123456789abcdef01234567"
    labels = body["metadata"]["labels"]
    assert labels["plansmith.io/engine-key"] == KEY and labels["plansmith.io/model"] == "resnet"
    assert body["spec"]["template"]["metadata"]["labels"] == labels


def test_job_is_pinned_to_the_gpu_type_and_requests_it():
    spec = job()["spec"]
    assert spec["backoffLimit"] == 1 and spec["activeDeadlineSeconds"] == 900
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert {(e["key"], e["values"][0]) for e in terms[0]["matchExpressions"]} == {
        ("nvidia.com/gpu.product", "NVIDIA-H100-80GB-HBM3"), ("nvidia.com/gpu.compute.major", "9"),
        ("nvidia.com/gpu.compute.minor", "0")}
    assert pod["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": "1"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert job(MIG)["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"] == {"nvidia.com/mig-1g.10gb": "1"}


def test_job_runs_the_builder_for_that_target_with_credentials_only_by_reference():
    container = job()["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["env:PLANSMITH_MODEL", "--store", "s3://engines/prod", "--backend",
                                 "onnxruntime", "--target", "9.0"]
    env = {e["name"]: e for e in container["env"]}
    assert json.loads(env["PLANSMITH_MODEL"]["value"])["spec"]["model"]["uri"] == "s3://models/m.onnx"
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "s3-creds", "key": "AWS_SECRET_ACCESS_KEY"}
    assert env["PLANSMITH_S3_ENDPOINT"]["value"] == "http://minio:9000"
    assert "value" not in env["AWS_ACCESS_KEY_ID"]


def test_simulated_gpu_clusters_build_on_the_cpu_under_the_gpu_key():
    from dataclasses import replace

    settings = replace(SETTINGS, simulated_gpus=True)
    body = rendering.render_build_job(name="resnet", namespace="ml", spec=SPEC, target=H100, key=KEY, settings=settings)
    assert body["spec"]["template"]["spec"]["containers"][0]["args"][-3:] == ["--target", "9.0", "--simulated-gpu"]
    assert "--simulated-gpu" not in job()["spec"]["template"]["spec"]["containers"][0]["args"]


def restricted(pod: dict) -> None:
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in pod["containers"]:
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["readOnlyRootFilesystem"] is True
    assert all(set(v) <= {"name", "emptyDir"} for v in pod.get("volumes", []))


def test_every_pod_is_restricted():
    restricted(job()["spec"]["template"]["spec"])
    restricted(deployment()["spec"]["template"]["spec"])


def deployment(target=H100, key=KEY):
    return rendering.render_deployment(name="resnet", namespace="ml", spec=SPEC, target=target, key=key,
                                       manifest_uri=f"s3://engines/prod/engines/{key}/manifest.json", settings=SETTINGS)


def test_deployment_serves_the_engine_with_the_batching_settings():
    body = deployment()
    assert body["metadata"]["name"] == "resnet-sm90-nvidia-h100-80gb-hbm3"
    assert body["spec"]["replicas"] == 2
    container = body["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert args[:2] == ["--manifest", f"s3://engines/prod/engines/{KEY}/manifest.json"]
    assert args[args.index("--preferred-batch-sizes") + 1] == "4,8"
    assert args[args.index("--max-queue-delay-us") + 1] == "200"
    assert args[args.index("--instances") + 1] == "2"
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert [p["containerPort"] for p in container["ports"]] == [8000, 8001, 8002]
    assert container["resources"]["limits"] == {"memory": "2Gi", "nvidia.com/gpu": "1"}
    assert container["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"


def test_a_new_engine_changes_the_pod_template_so_the_deployment_rolls():
    old, new = deployment(key=KEY), deployment(key="f" * 32)
    assert old["spec"]["template"] != new["spec"]["template"]
    assert old["spec"]["selector"] == new["spec"]["selector"]


def test_batching_off_is_passed_on():
    spec = parse_spec({"model": {"uri": "s3://models/m.onnx"}, "storage": {"uri": "s3://engines"}})
    args = rendering.runtime_args("m", spec, "s3://engines/engines/k/manifest.json")
    assert "--no-batching" in args
    assert args[args.index("--warmup-iterations") + 1] == "2"
    no_warmup = parse_spec({"model": {"uri": "s3://models/m.onnx"}, "serving": {"warmup": {"enabled": False}}})
    assert "--no-warmup" in rendering.runtime_args("m", no_warmup, "s3://engines/engines/k/manifest.json")


def test_latency_summaries_are_asked_of_the_runtime_only_when_the_spec_wants_them():
    plain = parse_spec({"model": {"uri": "s3://models/m.onnx"}})
    assert "--metrics-config" not in rendering.runtime_args("m", plain, "s3://engines/engines/k/manifest.json")
    summaries = parse_spec({"model": {"uri": "s3://models/m.onnx"}, "serving": {"metrics": {"latencySummaries": True}}})
    args = rendering.runtime_args("m", summaries, "s3://engines/engines/k/manifest.json")
    assert args[args.index("--metrics-config") + 1] == "summary_latencies=true"


def test_tracing_is_asked_of_the_runtime_with_tritons_trace_config_only_when_the_spec_wants_it():
    plain = parse_spec({"model": {"uri": "s3://models/m.onnx"}})
    assert "--trace-config" not in rendering.runtime_args("m", plain, "s3://engines/engines/k/manifest.json")
    traced = parse_spec({"model": {"uri": "s3://models/m.onnx"},
                         "serving": {"trace": {"level": ["TIMESTAMPS", "TENSORS"], "rate": 50, "count": 200}}})
    args = rendering.runtime_args("m", traced, "s3://engines/engines/k/manifest.json")
    entries = [args[index + 1] for index, arg in enumerate(args) if arg == "--trace-config"]
    assert entries == ["mode=triton", "rate=50", "count=200", "triton,file=/tmp/trace.json", "triton,log-frequency=0",
                       "level=TIMESTAMPS", "level=TENSORS"]
    # /tmp is the pod's scratch volume: the trace file is written there
    container = rendering.render_deployment(name="m", namespace="ml", spec=traced, target=H100, key=KEY,
                                            manifest_uri="s3://engines/engines/k/manifest.json",
                                            settings=SETTINGS)["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "scratch", "mountPath": "/tmp"} in container["volumeMounts"]
    assert not any(variable["name"].startswith("OTEL_") for variable in container["env"])  # trace files: no spans


def test_opentelemetry_tracing_names_the_collector_and_the_pods_kubernetes_resource():
    spec = parse_spec({"model": {"uri": "s3://models/m.onnx"},
                       "serving": {"trace": {"mode": "opentelemetry", "rate": 0, "opentelemetry": {
                           "url": "http://otel-collector.observability:4318/v1/traces",
                           "resource": {"service.name": "resnet-prod", "team": "vision"}}}}})
    args = rendering.runtime_args("resnet", spec, "s3://engines/engines/k/manifest.json")
    entries = [args[index + 1] for index, arg in enumerate(args) if arg == "--trace-config"]
    assert entries == ["mode=opentelemetry", "rate=0", "count=-1",
                       "opentelemetry,url=http://otel-collector.observability:4318/v1/traces",
                       "opentelemetry,resource=service.name=resnet-prod", "opentelemetry,resource=team=vision",
                       "level=TIMESTAMPS"]
    rendered = rendering.render_deployment(name="resnet", namespace="ml", spec=spec, target=H100, key="k" * 64,
                                           manifest_uri="s3://engines/engines/k/manifest.json",
                                           settings=SETTINGS)
    env = rendered["spec"]["template"]["spec"]["containers"][0]["env"]
    assert env[-3:] == [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "OTEL_SERVICE_NAME", "value": "resnet"},
        {"name": "OTEL_RESOURCE_ATTRIBUTES", "value": f"k8s.namespace.name=ml,k8s.deployment.name="
                                                      f"{rendered['metadata']['name']},k8s.pod.name=$(POD_NAME)"}]
    sidecar = parse_spec({"model": {"uri": "s3://models/m.onnx"}, "serving": {"trace": {"mode": "opentelemetry"}}})
    args = rendering.runtime_args("resnet", sidecar, "s3://engines/engines/k/manifest.json")
    assert "opentelemetry,url=http://localhost:4318/v1/traces" in args


def test_a_response_cache_is_asked_of_the_runtime_with_tritons_cache_config_only_when_the_spec_wants_it():
    plain = parse_spec({"model": {"uri": "s3://models/m.onnx"}})
    assert "--cache-config" not in rendering.runtime_args("m", plain, "s3://engines/engines/k/manifest.json")
    cached = parse_spec({"model": {"uri": "s3://models/m.onnx"}, "serving": {"responseCache": {"sizeBytes": 4096}}})
    args = rendering.runtime_args("m", cached, "s3://engines/engines/k/manifest.json")
    assert args[args.index("--cache-config") + 1] == "local,size=4096"


def test_sidecars_join_the_runtime_in_each_serving_pod_restricted_as_it_is():
    spec = SPEC.model_copy(update={"serving": SPEC.serving.model_copy(update={"sidecars": parse_spec({
        "model": {"uri": "s3://models/m.onnx"},
        "serving": {"sidecars": [
            {"name": "preprocess", "image": "registry.example/preprocess:1.2", "command": ["python", "-m", "pre"],
             "args": ["--server", "localhost:8001"], "env": [{"name": "MODEL", "value": "resnet"}],
             "resources": {"limits": {"cpu": "500m", "memory": 268435456}}},
            {"name": "bare", "image": "busybox:1.36"}]}}).serving.sidecars})})
    pod = rendering.render_deployment(name="resnet", namespace="ml", spec=spec, target=H100, key=KEY,
                                      manifest_uri="s3://engines/prod/engines/k/manifest.json",
                                      settings=SETTINGS)["spec"]["template"]["spec"]
    runtime, preprocess, bare = pod["containers"]
    assert runtime["name"] == "runtime" and runtime["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {k: v for k, v in preprocess.items() if k != "securityContext"} == {
        "name": "preprocess", "image": "registry.example/preprocess:1.2", "command": ["python", "-m", "pre"],
        "args": ["--server", "localhost:8001"], "env": [{"name": "MODEL", "value": "resnet"}],
        "resources": {"limits": {"cpu": "500m", "memory": "268435456"}},
        "volumeMounts": [{"name": "scratch", "mountPath": "/tmp"}]}
    assert set(bare) == {"name", "image", "securityContext", "volumeMounts"}  # the image's entrypoint, no GPU
    restricted(pod)
    build = rendering.render_build_job(name="resnet", namespace="ml", spec=spec, target=H100, key=KEY, settings=SETTINGS)
    assert [c["name"] for c in build["spec"]["template"]["spec"]["containers"]] == ["builder"]  # serving pods only
    assert deployment()["spec"]["template"]["spec"]["containers"][0]["name"] == "runtime"
    assert len(deployment()["spec"]["template"]["spec"]["containers"]) == 1


def test_a_sized_dev_shm_is_a_memory_backed_volume_every_serving_container_mounts():
    sized = parse_spec({"model": {"uri": "s3://models/m.onnx"}, "storage": {"uri": "s3://engines"},
                        "serving": {"sharedMemorySize": "1Gi", "sidecars": [{"name": "client", "image": "c:1"}]}})
    pod = rendering.render_deployment(name="m", namespace="ml", spec=sized, target=H100, key=KEY,
                                      manifest_uri="s3://engines/engines/k/manifest.json", settings=SETTINGS)["spec"]["template"]["spec"]
    assert pod["volumes"] == [{"name": "scratch", "emptyDir": {}},
                              {"name": "shared-memory", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}}]
    for container in pod["containers"]:
        assert {"name": "shared-memory", "mountPath": "/dev/shm"} in container["volumeMounts"]
    restricted(pod)
    unsized = deployment()["spec"]["template"]["spec"]
    assert unsized["volumes"] == [{"name": "scratch", "emptyDir": {}}]  # the container runtime's /dev/shm
    assert unsized["containers"][0]["volumeMounts"] == [{"name": "scratch", "mountPath": "/tmp"}]


def test_service_selects_all_targets_of_the_model():
    service = rendering.render_service(name="resnet", namespace="ml")
    assert service["spec"]["selector"] == {"plansmith.io/model": "resnet", "app.kubernetes.io/component": "serving"}
    assert {p["port"] for p in service["spec"]["ports"]} == {8000, 8001, 8002}
    assert set(deployment()["spec"]["template"]["metadata"]["labels"].items()) >= set(service["spec"]["selector"].items())


def test_long_names_stay_valid_dns_labels():
    name = rendering.dns_name("a" * 60, "sm90-nvidia-h100-80gb-hbm3")
    assert len(name) <= 63 and name == rendering.dns_name("a" * 60, "sm90-nvidia-h100-80gb-hbm3")


@pytest.mark.parametrize("name, usable", [
    ("resnet50", True), ("bert-large-2", True), ("m", True), ("a" * 63, True),
    ("resnet50.v2", False), ("3d-unet", False), ("a" * 64, False), ("model-", False), ("Model", False),
])
def test_a_model_name_must_name_a_service_and_label_its_children(name, usable):
    problem = rendering.model_name_problem(name)
    assert (problem is None) == usable
    if not usable:
        assert "DNS-1035 label" in problem and repr(name) in problem


def test_runtime_triton_runs_tritonserver_on_a_repository_its_init_container_writes():
    """serving.runtime: triton: stock Triton (the chart's images.triton) serves the repository that
    `plansmith triton-repository` renders from the spec and fills with the verified engine."""
    import json

    spec = SPEC.model_copy(update={"serving": SPEC.serving.model_copy(update={"runtime": "triton"})})
    body = rendering.render_deployment(name="resnet", namespace="ml", spec=spec, target=H100, key=KEY,
                                       manifest_uri="s3://engines/prod/engines/k/manifest.json", settings=SETTINGS)
    pod = body["spec"]["template"]["spec"]
    server = pod["containers"][0]
    assert server["image"] == SETTINGS.triton_image and server["command"] == ["tritonserver"]
    assert server["args"][:4] == ["--model-repository=/models", "--http-port=8000", "--grpc-port=8001",
                                  "--metrics-port=8002"]
    assert {"name": "model-repository", "mountPath": "/models", "readOnly": True} in server["volumeMounts"]
    assert not any(e["name"].startswith("AWS_") for e in server["env"])  # credentials stay with the init container
    assert server["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"  # Triton's, as the runtime's
    (init,) = pod["initContainers"]
    assert init["image"] == SETTINGS.runtime_image and init["command"] == ["plansmith", "triton-repository"]
    args = dict(zip(init["args"][::2], init["args"][1::2]))
    assert args["--manifest"] == "s3://engines/prod/engines/k/manifest.json" and args["--out"] == "/models"
    assert parse_spec(json.loads(args["--spec-json"])) == spec and args["--model-name"] == "resnet"
    assert any(e["name"] == "AWS_ACCESS_KEY_ID" for e in init["env"])
    assert {"name": "model-repository", "emptyDir": {}} in pod["volumes"]
    # switching the runtime rolls the pods
    assert body["spec"]["template"] != deployment()["spec"]["template"]
