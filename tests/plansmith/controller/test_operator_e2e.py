"""The whole product on the local cluster with real pods: the operator reconciles an InferenceModel into
build Jobs that run the real builder image on each simulated GPU type, engines land in (moto) S3,
serving Deployments run the real runtime image, and tritonclient gets correct answers through the
Service. Then: the cache across models, a replicas change, a failing accuracy gate that leaves the
serving pods alone, an operator restart mid-build, and deletion.

GPUs here are simulated (docs/local-cluster.md): engines are keyed per GPU type and run on the CPU.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from pathlib import Path

import boto3
import numpy as np
import onnxruntime
import pytest
from kubernetes import client, config

from plansmith import testmodels
from plansmith.devcluster.operator_process import OperatorProcess
from plansmith.devcluster.service_route import wait_until_routed
from plansmith.spec import API_GROUP, API_VERSION, PLURAL

BUCKET = "plansmith-models"
# per run: engines of earlier runs on a long-lived dev cluster would be cache hits, and an earlier
# run's namespace may still be terminating
PREFIX = NAMESPACE = f"e2e-{uuid.uuid4().hex[:8]}"
STORE = f"s3://plansmith-engines/{PREFIX}"
pytestmark = pytest.mark.timeout(1500)


def wait_for(what, check, timeout=240.0, interval=1.0):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


@pytest.fixture(scope="module")
def e2e(dev_cluster, repo_root, tmp_path_factory):
    api = config.new_client_from_config(config_file=str(dev_cluster.kubeconfig))
    workdir = tmp_path_factory.mktemp("e2e")
    # a fresh discovery cache: one from an earlier cluster at the same address would not know the CRD
    kubectl = [str(dev_cluster.kubectl), "--kubeconfig", str(dev_cluster.kubeconfig), "--cache-dir", str(workdir / "kube")]
    subprocess.run([*kubectl, "apply", "-f", str(repo_root / "crds/inferencemodel.yaml")], check=True, capture_output=True)
    subprocess.run([*kubectl, "wait", "--for=condition=Established", "crd/inferencemodels.plansmith.io"], check=True,
                   capture_output=True)
    # a discovery cache filled before the CRD existed would not know `im` for its 10 minutes
    kubectl = [*kubectl[:-1], str(workdir / "kube-with-crd")]
    dev_cluster.ensure_s3_secret(NAMESPACE)

    model = testmodels.small_cnn(workdir / "cnn.onnx")
    credentials = dev_cluster.s3_credentials()
    s3 = boto3.client("s3", endpoint_url=dev_cluster.s3_endpoint, region_name="us-east-1",
                      aws_access_key_id=credentials["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=credentials["AWS_SECRET_ACCESS_KEY"])
    s3.upload_file(str(model.path), BUCKET, "e2e/cnn.onnx")

    env = {"KUBECONFIG": str(dev_cluster.kubeconfig),
           "PLANSMITH_BUILDER_IMAGE": "docker.io/plansmith/builder:dev",
           "PLANSMITH_RUNTIME_IMAGE": "docker.io/plansmith/runtime:dev",
           "PLANSMITH_IMAGE_PULL_POLICY": "Never",
           "PLANSMITH_BUILDER_BACKEND": "onnxruntime",
           "PLANSMITH_BUILDER_BACKEND_VERSION": onnxruntime.__version__,  # the images install the same wheels
           "PLANSMITH_S3_ENDPOINT": dev_cluster.s3_endpoint,
           "PLANSMITH_SIMULATED_GPUS": "true",
           **credentials}
    operator = OperatorProcess(NAMESPACE, workdir / "operator.log", env).start()
    yield {"api": api, "kubectl": kubectl, "operator": operator, "model": model, "s3": s3, "workdir": workdir}
    operator.stop()
    Path("/tmp/plansmith-operator-e2e.log").write_text((workdir / "operator.log").read_text(errors="replace"))
    subprocess.run([*kubectl, "delete", "namespace", NAMESPACE, "--wait=false"], capture_output=True)


def body(name: str, e2e, **overrides) -> dict:
    spec = {
        "model": {"uri": f"s3://{BUCKET}/e2e/cnn.onnx", "inputs": e2e["model"].spec_inputs()},
        "build": {"precision": "fp32", "timeoutSeconds": 600, "accuracy": {"minCosine": 0.999, "samples": 4}},
        "serving": {"replicas": 1, "maxBatchSize": 8, "instances": 1,
                    "dynamicBatching": {"maxQueueDelayMicroseconds": 500, "preferredBatchSizes": [4, 8]},
                    # a CPU limit below the node's cores: the runtime sizes its threads by it
                    "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"cpu": "1"}},
                    "warmup": {"iterations": 1}},
        "storage": {"uri": STORE, "secretRef": {"name": "plansmith-s3"}},
    }
    for section, value in overrides.items():
        spec[section] = {**spec[section], **value}
    return {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": "InferenceModel",
            "metadata": {"name": name, "namespace": NAMESPACE}, "spec": spec}


def objects(e2e):
    return client.CustomObjectsApi(e2e["api"])


def get(e2e, name):
    return objects(e2e).get_namespaced_custom_object(API_GROUP, API_VERSION, NAMESPACE, PLURAL, name)


def jobs(e2e):
    return client.BatchV1Api(e2e["api"]).list_namespaced_job(NAMESPACE, label_selector="app.kubernetes.io/component=build").items


def events(e2e, name):
    return client.CoreV1Api(e2e["api"]).list_namespaced_event(NAMESPACE, field_selector=f"involvedObject.name={name}").items


def condition(model, type_):
    return next((c for c in model.get("status", {}).get("conditions", []) if c["type"] == type_), {})


def ready(e2e, name):
    model = get(e2e, name)
    status = model.get("status", {})
    failed = [t for t in status.get("targets", []) if t.get("state") == "Failed"]
    if failed:  # a failed build ends the wait with its reason and the builder's log
        logs = subprocess.run([*e2e["kubectl"], "logs", "-n", NAMESPACE, f"job/{failed[0].get('jobName')}", "--tail=30"],
                              capture_output=True, text=True)
        raise AssertionError(f"{failed[0].get('reason')}: {failed[0].get('message')}\n{logs.stdout}{logs.stderr}")
    return condition(model, "Ready").get("status") == "True" and status.get("observedGeneration") == model["metadata"]["generation"] and model


def infer(host: str, model_name: str, batch: np.ndarray) -> np.ndarray:
    import tritonclient.http as httpclient

    triton = httpclient.InferenceServerClient(f"{host}:8000")
    inputs = [httpclient.InferInput("input", list(batch.shape), "FP32")]
    inputs[0].set_data_from_numpy(batch, binary_data=True)
    return triton.infer(model_name, inputs).as_numpy("logits")


def model_ready_log(e2e, pod: str) -> dict:
    """The serving runtime's "model ready" log entry (JSON lines) in a pod's log."""
    text = client.CoreV1Api(e2e["api"]).read_namespaced_pod_log(pod, NAMESPACE)
    entries = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    ready_entries = [entry for entry in entries if entry.get("message") == "model ready"]
    assert ready_entries, f"no 'model ready' entry in the log of {pod}:\n{text[-2000:]}"
    return ready_entries[-1]


def containers_report(e2e, model: str) -> str:
    """Each serving pod's containers, their state and last log lines: why a model is not Ready."""
    core = client.CoreV1Api(e2e["api"])
    lines = []
    for pod in core.list_namespaced_pod(NAMESPACE, label_selector=f"plansmith.io/model={model}").items:
        for status in pod.status.container_statuses or []:
            lines.append(f"{pod.metadata.name}/{status.name}: ready={status.ready} restarts={status.restart_count} "
                         f"state={status.state.to_dict()}")
            try:
                tail = core.read_namespaced_pod_log(pod.metadata.name, NAMESPACE, container=status.name, tail_lines=10)
            except client.ApiException as error:
                tail = f"(no log: {error.reason})"
            lines.append(tail)
    return "\n".join(lines) or f"no pods of {model}"


def test_model_is_built_per_gpu_type_served_and_answers(e2e):
    objects(e2e).create_namespaced_custom_object(API_GROUP, API_VERSION, NAMESPACE, PLURAL, body("cnn", e2e))
    launched = wait_for("two build Jobs", lambda: len(jobs(e2e)) == 2 and jobs(e2e), timeout=60)
    # kopf posts Events in the background: a process killed the instant its Jobs exist may take them along
    wait_for("the EngineBuilding Events", lambda: len([e for e in events(e2e, "cnn") if e.reason == "EngineBuilding"]) >= 2,
             timeout=30, interval=0.1)

    # the operator dies mid-build and comes back: no duplicate Job, tracking resumes
    e2e["operator"].kill()
    e2e["operator"].start()

    model = wait_for("Ready", lambda: ready(e2e, "cnn"), timeout=420)
    assert sorted(j.metadata.name for j in jobs(e2e)) == sorted(j.metadata.name for j in launched)
    pods = client.CoreV1Api(e2e["api"]).list_namespaced_pod(NAMESPACE, label_selector="app.kubernetes.io/component=build").items
    nodes = {p.metadata.labels["plansmith.io/target"]: p.spec.node_name for p in pods}
    assert nodes == {"sm90-nvidia-h100-80gb-hbm3": "plansmith-dev-h100", "sm86-nvidia-a10g": "plansmith-dev-a10g"}

    status = model["status"]
    assert status["phase"] == "Ready" and status["targetCount"] == 2 and status["enginesReady"] == 2
    for target in status["targets"]:
        assert target["state"] == "Serving" and len(target["sha256"]) == 64
        assert target["accuracy"]["cosine"] >= 0.999 and target["latency"]["p50Ms"] > 0
        manifest = e2e["s3"].get_object(Bucket="plansmith-engines", Key=f"{PREFIX}/engines/{target['engineKey']}/manifest.json")
        assert b'"CPUExecutionProvider"' in manifest["Body"].read()  # simulated GPUs: honest about where it runs
    assert {c["type"]: c["status"] for c in status["conditions"]} == {
        "Valid": "True", "EnginesReady": "True", "ServingReady": "True", "Ready": "True",
        "Reconciling": "False", "Stalled": "False"}  # kstatus: Current

    deployments = client.AppsV1Api(e2e["api"]).list_namespaced_deployment(NAMESPACE).items
    assert sorted(d.metadata.name for d in deployments) == ["cnn-sm86-nvidia-a10g", "cnn-sm90-nvidia-h100-80gb-hbm3"]
    serving_pods = client.CoreV1Api(e2e["api"]).list_namespaced_pod(
        NAMESPACE, label_selector="app.kubernetes.io/component=serving").items
    assert {p.spec.node_name for p in serving_pods} == {"plansmith-dev-h100", "plansmith-dev-a10g"}
    for pod in serving_pods:  # the pod's CPU limit, read from its cgroup, not the node's cores
        assert model_ready_log(e2e, pod.metadata.name)["intra_op_threads"] == 1

    service = client.CoreV1Api(e2e["api"]).read_namespaced_service("cnn", NAMESPACE)
    batch = np.random.default_rng(7).standard_normal((3, 3, 32, 32), dtype=np.float32)
    expected = onnxruntime.InferenceSession(str(e2e["model"].path)).run(None, {"input": batch})[0]
    wait_until_routed(service.spec.cluster_ip, "cnn")  # kube-proxy's rules follow the endpoints a moment later
    for _ in range(4):  # the Service spreads requests over both GPU types' pods
        np.testing.assert_allclose(infer(service.spec.cluster_ip, "cnn", batch), expected, rtol=1e-4, atol=1e-4)

    printed = subprocess.run([*e2e["kubectl"], "get", "im", "cnn", "-n", NAMESPACE], capture_output=True, text=True)
    assert printed.stdout.splitlines()[1:2] and printed.stdout.splitlines()[1].split()[:5] == [
        "cnn", "True", "Ready", "2", "2"], printed.stdout + printed.stderr
    wanted = {"EngineBuilding", "EngineBuilt", "EnginesVerified", "ReplicasReady", "Serving"}
    wait_for(f"Events {sorted(wanted)}", lambda: wanted <= {e.reason for e in events(e2e, "cnn")}, timeout=30)
    posted = [(e.reason, e.message) for e in events(e2e, "cnn")]
    assert len(posted) == len(set(posted)), f"an Event posted twice: {sorted(posted)}"  # one per transition


# A sidecar of the serving pod that sends one request through Triton's system shared memory extension
# (input and output in POSIX shared memory objects in the pod's /dev/shm), prints the logits it reads
# back as a JSON line, and stays up (a container that exits would be restarted, and the pod not ready).
SHARED_MEMORY_CLIENT = """
import json, os, time, urllib.request
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm

while True:
    try:
        if urllib.request.urlopen("http://localhost:8000/v2/health/ready", timeout=2).status == 200:
            break
    except OSError:
        pass
    time.sleep(1)
x = SIDECAR_INPUT
client = grpcclient.InferenceServerClient("localhost:8001")
images = shm.create_shared_memory_region("images", "/sidecar-images", x.nbytes)
logits = shm.create_shared_memory_region("logits", "/sidecar-logits", 2 * 10 * 4)
shm.set_shared_memory_region(images, [x])
client.register_system_shared_memory("images", "/sidecar-images", x.nbytes)
client.register_system_shared_memory("logits", "/sidecar-logits", 2 * 10 * 4)
tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
tensor.set_shared_memory("images", x.nbytes)
wanted = grpcclient.InferRequestedOutput("logits")
wanted.set_shared_memory("logits", 2 * 10 * 4)
client.infer("cnn-copy", [tensor], outputs=[wanted])
dev_shm = os.statvfs("/dev/shm")
print(json.dumps({"logits": shm.get_contents_as_numpy(logits, np.float32, [2, 10]).tolist(),
                  "dev_shm_bytes": dev_shm.f_blocks * dev_shm.f_frsize}), flush=True)
while True:
    time.sleep(3600)
"""
SIDECAR_INPUT = "(np.arange(2 * 3 * 32 * 32, dtype=np.float32).reshape(2, 3, 32, 32) % 17) / 17 - 0.5"


def test_a_second_model_with_the_same_engine_inputs_builds_nothing(e2e, dev_cluster, start_otlp_collector):
    """... its pods send traces to an OpenTelemetry collector (on the node's address, which pods
    reach): a request with a W3C traceparent sent through the Service comes back as Triton's spans
    under the caller's span, naming the model, its namespace, Deployment and pod; and its sidecar
    passes a request to the server in the same pod through system shared memory, in a /dev/shm of
    the size the spec gives."""
    collector = start_otlp_collector(dev_cluster.node_ip)
    before = len(jobs(e2e))
    sidecar = {"name": "client", "image": "docker.io/plansmith/runtime:dev",
               "command": ["python3", "-c", SHARED_MEMORY_CLIENT.replace("SIDECAR_INPUT", SIDECAR_INPUT)],
               "resources": {"requests": {"cpu": "50m", "memory": "128Mi"}}}
    serving = {"trace": {"mode": "opentelemetry", "rate": 0, "opentelemetry": {"url": collector.url}},
               "sidecars": [sidecar], "sharedMemorySize": "128Mi"}
    objects(e2e).create_namespaced_custom_object(API_GROUP, API_VERSION, NAMESPACE, PLURAL,
                                                 body("cnn-copy", e2e, serving=serving))
    try:
        model = wait_for("the copy Ready", lambda: ready(e2e, "cnn-copy"), timeout=240)
    except AssertionError as error:
        raise AssertionError(f"{error}\n{containers_report(e2e, 'cnn-copy')}") from None
    assert len(jobs(e2e)) == before
    assert {t["engineKey"] for t in model["status"]["targets"]} == {t["engineKey"] for t in get(e2e, "cnn")["status"]["targets"]}

    x = eval(SIDECAR_INPUT, {"np": np})  # noqa: S307  (the constant expression the sidecar evaluates too)
    expected = onnxruntime.InferenceSession(str(e2e["model"].path)).run(None, {"input": x})[0]
    core = client.CoreV1Api(e2e["api"])
    for pod in core.list_namespaced_pod(NAMESPACE, label_selector="plansmith.io/model=cnn-copy,app.kubernetes.io/component=serving").items:
        assert [c.name for c in pod.spec.containers] == ["runtime", "client"]
        printed = wait_for(f"the sidecar's answer in {pod.metadata.name}", lambda: [
            line for line in core.read_namespaced_pod_log(pod.metadata.name, NAMESPACE, container="client").splitlines()
            if line.startswith("{")], timeout=60)
        answer = json.loads(printed[0])
        np.testing.assert_allclose(np.array(answer["logits"], np.float32), expected, rtol=1e-4, atol=1e-4)
        assert answer["dev_shm_bytes"] == 128 << 20  # serving.sharedMemorySize, not the runtime's 64 MiB

    import tritonclient.http as httpclient

    service = client.CoreV1Api(e2e["api"]).read_namespaced_service("cnn-copy", NAMESPACE)
    wait_until_routed(service.spec.cluster_ip, "cnn-copy")
    triton = httpclient.InferenceServerClient(f"{service.spec.cluster_ip}:8000")
    batch = np.zeros((1, 3, 32, 32), np.float32)
    inputs = [httpclient.InferInput("input", list(batch.shape), "FP32")]
    inputs[0].set_data_from_numpy(batch)
    triton.infer("cnn-copy", inputs, request_id="untraced")  # rate 0: only requests with a trace context
    traceparent = f"00-{'ab' * 16}-{'cd' * 8}-01"
    triton.infer("cnn-copy", inputs, request_id="traced", headers={"traceparent": traceparent})
    spans = collector.wait_for(3, timeout=30)  # the SDK exports every 5 s
    assert sorted(span.name for span in spans) == ["InferRequest", "cnn-copy", "compute"]
    root = next(span for span in spans if span.name == "InferRequest")
    assert (root.trace_id, root.parent_span_id) == ("ab" * 16, "cd" * 8)
    pods = {pod.metadata.name: pod for pod in client.CoreV1Api(e2e["api"]).list_namespaced_pod(
        NAMESPACE, label_selector="plansmith.io/model=cnn-copy,app.kubernetes.io/component=serving").items}
    resource = root.resource
    assert (resource["service.name"], resource["k8s.namespace.name"]) == ("cnn-copy", NAMESPACE)
    assert resource["k8s.pod.name"] in pods  # the downward API's name, put into OTEL_RESOURCE_ATTRIBUTES
    assert resource["k8s.deployment.name"] == pods[resource["k8s.pod.name"]].metadata.owner_references[0].name.rsplit(
        "-", 1)[0]  # the pod's ReplicaSet, less its template hash


def test_replicas_change_rebuilds_nothing(e2e):
    before = len(jobs(e2e))
    objects(e2e).patch_namespaced_custom_object(API_GROUP, API_VERSION, NAMESPACE, PLURAL, "cnn-copy",
                                                {"spec": {"serving": {"replicas": 2}}})
    model = wait_for("2 replicas per GPU type ready", lambda: (m := ready(e2e, "cnn-copy"))
                     and m["status"]["serving"]["readyReplicas"] == 4 and m, timeout=240)
    assert model["status"]["serving"]["replicas"] == 4
    assert len(jobs(e2e)) == before


def test_a_node_whose_gpu_type_changes_gets_one_build_and_its_own_deployment(e2e):
    """The A10G node is relabelled as an L4 node (as when a node pool is replaced): one new build for
    the new type (the two models share engines), a Deployment for it, and the A10G Deployment goes;
    relabelling it back rebuilds nothing (the A10G engine is still in storage)."""
    from plansmith.devcluster.gpus import A10G, GpuProfile

    core, apps = client.CoreV1Api(e2e["api"]), client.AppsV1Api(e2e["api"])
    l4 = GpuProfile("NVIDIA-L4", 8, 9, 23034, count=A10G.count)
    before = len(jobs(e2e))

    def serving_types():
        model = ready(e2e, "cnn-copy")
        return model and model["status"]["serving"]["readyReplicas"] == 4 and {
            t["gpuProduct"] for t in model["status"]["targets"] if t["state"] == "Serving"}

    core.patch_node("plansmith-dev-a10g", {"metadata": {"labels": l4.labels()}})
    try:
        wait_for("cnn-copy served on H100 and L4", lambda: serving_types() == {"NVIDIA-H100-80GB-HBM3", "NVIDIA-L4"},
                 timeout=360)
        assert len(jobs(e2e)) == before + 1  # one build for the new type, shared by cnn and cnn-copy
        names = {d.metadata.name for d in apps.list_namespaced_deployment(
            NAMESPACE, label_selector="plansmith.io/model=cnn-copy").items}
        assert names == {"cnn-copy-sm90-nvidia-h100-80gb-hbm3", "cnn-copy-sm89-nvidia-l4"}
    finally:
        core.patch_node("plansmith-dev-a10g", {"metadata": {"labels": A10G.labels()}})
    wait_for("cnn-copy served on H100 and A10G again",
             lambda: serving_types() == {"NVIDIA-H100-80GB-HBM3", "NVIDIA-A10G"}, timeout=360)
    assert len(jobs(e2e)) == before + 1


def test_an_impossible_accuracy_gate_fails_and_leaves_serving_alone(e2e):
    serving_before = {d.metadata.name: d.spec.template.metadata.annotations["plansmith.io/engine-key"]
                      for d in client.AppsV1Api(e2e["api"]).list_namespaced_deployment(
                          NAMESPACE, label_selector="plansmith.io/model=cnn").items}
    objects(e2e).patch_namespaced_custom_object(API_GROUP, API_VERSION, NAMESPACE, PLURAL, "cnn", {"spec": {"build": {
        "precision": "int8", "quantization": "dynamic", "backend": "onnxruntime", "accuracy": {"minCosine": 1.0}}}})

    def failed():
        model = get(e2e, "cnn")
        return model.get("status", {}).get("phase") == "Failed" and model

    model = wait_for("Failed", failed, timeout=300)
    target = next(t for t in model["status"]["targets"] if t["state"] == "Failed")
    assert target["reason"] == "AccuracyGateFailed" and "cosine" in target["message"]
    assert condition(model, "EnginesReady")["reason"] == "AccuracyGateFailed"
    serving_after = {d.metadata.name: d.spec.template.metadata.annotations["plansmith.io/engine-key"]
                     for d in client.AppsV1Api(e2e["api"]).list_namespaced_deployment(
                         NAMESPACE, label_selector="plansmith.io/model=cnn").items}
    assert serving_after == serving_before  # still the old, good engines
    service = client.CoreV1Api(e2e["api"]).read_namespaced_service("cnn", NAMESPACE)
    batch = np.ones((1, 3, 32, 32), dtype=np.float32)
    assert infer(service.spec.cluster_ip, "cnn", batch).shape == (1, 10)


def test_deleting_a_model_removes_its_children_and_keeps_the_engines(e2e):
    keys = {t["engineKey"] for t in get(e2e, "cnn-copy")["status"]["targets"]}
    objects(e2e).delete_namespaced_custom_object(API_GROUP, API_VERSION, NAMESPACE, PLURAL, "cnn-copy")
    apps = client.AppsV1Api(e2e["api"])
    wait_for("Deployments garbage-collected", lambda: not apps.list_namespaced_deployment(
        NAMESPACE, label_selector="plansmith.io/model=cnn-copy").items, timeout=120)
    for key in keys:  # engines are shared by key: they stay
        e2e["s3"].head_object(Bucket="plansmith-engines", Key=f"{PREFIX}/engines/{key}/manifest.json")
