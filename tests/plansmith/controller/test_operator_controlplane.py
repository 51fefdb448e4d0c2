"""The operator as a real process against the real API server and the moto S3 endpoint.

No kubelet here (tests/plansmith/devcluster has the cluster with running pods): the GPU nodes are
Node objects with GPU Feature Discovery labels and `nvidia.com/gpu` capacity, kept Ready by
renewing their Leases the way a kubelet does. This checks everything the operator decides before
a pod runs: validation, target discovery, engine keys, Job creation and pinning, the cache, restart
recovery, reaction to new GPU types and to a new builder version.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from pathlib import Path

import boto3
import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from plansmith import testmodels
from plansmith.devcluster.operator_process import OperatorProcess
from plansmith.spec import API_GROUP, API_VERSION, PLURAL

NAMESPACE = "operator-tests"
BUCKET = "operator-tests"
GPU_TYPES = {
    "gpu-h100": ("NVIDIA-H100-80GB-HBM3", "9", "0"),
    "gpu-a100": ("NVIDIA-A100-SXM4-40GB", "8", "0"),
}


def wait_for(what: str, check, timeout: float = 60.0, interval: float = 0.3):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except ApiException as error:
            last = error
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}; last value: {last!r}")


class NodeHeartbeats:
    """Renews each fake node's Lease every few seconds, as a kubelet would, so the node lifecycle
    controller keeps the nodes Ready and untainted."""

    def __init__(self, api: client.ApiClient):
        self.coordination = client.CoordinationV1Api(api)
        self.names: set[str] = set()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop.wait(3):
            for name in list(self.names):
                try:
                    self.renew(name)
                except Exception as error:  # the API server restarting (a test does it): a kubelet retries too
                    print(f"lease renewal of {name} failed, retrying: {error.__class__.__name__}")

    def renew(self, name: str):
        now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        body = {"metadata": {"name": name, "namespace": "kube-node-lease"},
                "spec": {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": now}}
        try:
            self.coordination.patch_namespaced_lease(name, "kube-node-lease", body)
        except ApiException as error:
            if error.status == 404:
                self.coordination.create_namespaced_lease("kube-node-lease", body)


def add_gpu_node(api: client.ApiClient, heartbeats: NodeHeartbeats, name: str, product: str, major: str, minor: str):
    core = client.CoreV1Api(api)
    labels = {"kubernetes.io/arch": "amd64", "kubernetes.io/hostname": name, "nvidia.com/gpu.present": "true",
              "nvidia.com/gpu.product": product, "nvidia.com/gpu.compute.major": major,
              "nvidia.com/gpu.compute.minor": minor, "nvidia.com/gpu.count": "4"}
    core.create_node({"metadata": {"name": name, "labels": labels}})
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    core.patch_node_status(name, {"status": {
        "capacity": {"cpu": "8", "memory": "64Gi", "pods": "110", "nvidia.com/gpu": "4"},
        "allocatable": {"cpu": "8", "memory": "64Gi", "pods": "110", "nvidia.com/gpu": "4"},
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "simulated",
                        "lastHeartbeatTime": now, "lastTransitionTime": now}]}})
    heartbeats.renew(name)
    heartbeats.names.add(name)


@pytest.fixture(scope="module")
def cluster(control_plane, kube_client, s3_server, repo_root, tmp_path_factory):
    import yaml

    extensions = client.ApiextensionsV1Api(kube_client)
    crd = yaml.safe_load((repo_root / "crds/inferencemodel.yaml").read_text())
    try:
        extensions.create_custom_resource_definition(crd)
    except ApiException as error:
        assert error.status == 409
    core = client.CoreV1Api(kube_client)
    core.create_namespace({"metadata": {"name": NAMESPACE}})
    core.create_namespaced_secret(NAMESPACE, {"metadata": {"name": "plansmith-s3"}, "stringData": {
        "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}})
    heartbeats = NodeHeartbeats(kube_client)
    heartbeats.thread.start()
    for name, (product, major, minor) in GPU_TYPES.items():
        add_gpu_node(kube_client, heartbeats, name, product, major, minor)

    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1",
                      aws_access_key_id="test", aws_secret_access_key="test")
    s3.create_bucket(Bucket=BUCKET)
    workdir = tmp_path_factory.mktemp("operator")
    model = testmodels.small_cnn(workdir / "cnn.onnx")
    s3.upload_file(str(model.path), BUCKET, "models/cnn.onnx")

    env = {"PLANSMITH_BUILDER_IMAGE": "plansmith/builder:dev", "PLANSMITH_BUILDER_BACKEND": "onnxruntime",
           "PLANSMITH_BUILDER_BACKEND_VERSION": "1.0-test", "PLANSMITH_RUNTIME_IMAGE": "plansmith/runtime:dev",
           "PLANSMITH_S3_ENDPOINT": s3_server.endpoint, "PLANSMITH_BUILD_CONCURRENCY": "50"}
    operator = OperatorProcess(NAMESPACE, workdir / "operator.log", {**env, "KUBECONFIG": str(control_plane.kubeconfig)},
                               verbose=True).start()
    yield {"api": kube_client, "operator": operator, "heartbeats": heartbeats, "model": model, "s3": s3,
           "log": workdir / "operator.log", "plane": control_plane}
    operator.stop()
    heartbeats.stop.set()
    # keep the operator's log where a failing run can be read after pytest rotates its temp dirs
    Path("/tmp/plansmith-operator-test.log").write_text((workdir / "operator.log").read_text(errors="replace"))


def model_body(name: str, cluster, **spec_overrides) -> dict:
    spec = {
        "model": {"uri": f"s3://{BUCKET}/models/cnn.onnx",
                  "inputs": [s.to_api() for s in cluster["model"].input_shapes]},
        "build": {"precision": "fp32", "timeoutSeconds": 600},
        "serving": {"replicas": 1, "maxBatchSize": 8},
        "storage": {"uri": f"s3://{BUCKET}/store", "secretRef": {"name": "plansmith-s3"}},
    }
    for section, value in spec_overrides.items():
        spec[section] = {**spec.get(section, {}), **value} if isinstance(value, dict) else value
    return {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": "InferenceModel",
            "metadata": {"name": name, "namespace": NAMESPACE}, "spec": spec}


def custom(cluster):
    return client.CustomObjectsApi(cluster["api"])


def get_model(cluster, name):
    return custom(cluster).get_namespaced_custom_object(API_GROUP, API_VERSION, NAMESPACE, PLURAL, name)


def build_jobs(cluster, model: str | None = None) -> list:
    selector = "app.kubernetes.io/component=build" + (f",plansmith.io/model={model}" if model else "")
    return client.BatchV1Api(cluster["api"]).list_namespaced_job(NAMESPACE, label_selector=selector).items


def condition(obj, type_):
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == type_), None)


def operator_log(cluster) -> str:
    return cluster["log"].read_text(errors="replace")[-4000:]


def test_model_gets_one_build_job_per_gpu_type(cluster):
    custom(cluster).create_namespaced_custom_object(API_GROUP, API_VERSION, NAMESPACE, PLURAL, model_body("cnn", cluster))
    jobs = wait_for("two build Jobs", lambda: (j := build_jobs(cluster, "cnn")) and len(j) == 2 and j, timeout=90)
    pinned = {}
    for job in jobs:
        assert job.metadata.name == f"plansmith-build-{job.metadata.labels['plansmith.io/engine-key'][:24]}"
        assert job.metadata.owner_references[0].kind == "InferenceModel"
        pod = job.spec.template.spec
        terms = pod.affinity.node_affinity.required_during_scheduling_ignored_during_execution.node_selector_terms
        product = next(e.values[0] for e in terms[0].match_expressions if e.key == "nvidia.com/gpu.product")
        pinned[product] = job
        container = pod.containers[0]
        assert container.resources.limits == {"nvidia.com/gpu": "1"}
        assert pod.security_context.run_as_non_root and container.security_context.capabilities.drop == ["ALL"]
        assert job.spec.active_deadline_seconds == 600
        assert all(e.value_from for e in container.env if e.name.startswith("AWS_"))  # by reference only
    assert set(pinned) == {"NVIDIA-H100-80GB-HBM3", "NVIDIA-A100-SXM4-40GB"}
    assert pinned["NVIDIA-H100-80GB-HBM3"].spec.template.spec.containers[0].args[-1] == "9.0"

    model = wait_for("status Building", lambda: (m := get_model(cluster, "cnn")).get("status", {}).get("phase") == "Building" and m)
    status = model["status"]
    assert status["targetCount"] == 2 and status["enginesReady"] == 0
    assert condition(model, "Valid")["status"] == "True"
    assert condition(model, "EnginesReady")["reason"] == "Building"
    assert {t["engineKey"] for t in status["targets"]} == {j.metadata.labels["plansmith.io/engine-key"] for j in jobs}
    assert all(t["state"] == "Building" for t in status["targets"])
    def reasons():
        events = client.CoreV1Api(cluster["api"]).list_namespaced_event(
            NAMESPACE, field_selector="involvedObject.name=cnn").items
        return {e.reason for e in events}

    wait_for("Events for the transitions", lambda: {"EngineBuilding", "SpecValid", "Building"} <= reasons())


def test_invalid_spec_sets_valid_false_creates_nothing_and_recovers(cluster):
    bad = model_body("bad", cluster, serving={"maxBatchSize": 4, "dynamicBatching": {"preferredBatchSizes": [8]}})
    custom(cluster).create_namespaced_custom_object(API_GROUP, API_VERSION, NAMESPACE, PLURAL, bad)
    model = wait_for("Valid=False", lambda: (m := get_model(cluster, "bad")) and condition(m, "Valid") and m)
    valid = condition(model, "Valid")
    assert valid["status"] == "False" and valid["reason"] == "InvalidSpec"
    assert "preferredBatchSizes[0]" in valid["message"]
    assert model["status"]["phase"] == "Failed"
    time.sleep(2)
    assert build_jobs(cluster, "bad") == []

    custom(cluster).patch_namespaced_custom_object(API_GROUP, API_VERSION, NAMESPACE, PLURAL, "bad",
        {"spec": {"serving": {"maxBatchSize": 8}, "build": {"precision": "fp16"}}})
    fixed = wait_for("Valid=True", lambda: (m := get_model(cluster, "bad")) and condition(m, "Valid")["status"] == "True" and m)
    assert fixed["status"]["observedGeneration"] == fixed["metadata"]["generation"]
    wait_for("Jobs for the fixed model", lambda: len(build_jobs(cluster, "bad")) == 2)


def test_same_engine_inputs_share_the_build(cluster):
    twin = model_body("cnn-twin", cluster, serving={"replicas": 3})
    before = {j.metadata.name for j in build_jobs(cluster)}
    custom(cluster).create_namespaced_custom_object(API_GROUP, API_VERSION, NAMESPACE, PLURAL, twin)
    model = wait_for("twin status", lambda: (m := get_model(cluster, "cnn-twin")).get("status", {}).get("targets") and m)
    original = {t["engineKey"] for t in get_model(cluster, "cnn")["status"]["targets"]}
    assert {t["engineKey"] for t in model["status"]["targets"]} == original
    time.sleep(2)
    assert {j.metadata.name for j in build_jobs(cluster)} == before


def test_restarted_operator_resumes_without_duplicate_jobs(cluster):
    before = sorted(j.metadata.name for j in build_jobs(cluster))
    cluster["operator"].kill()
    custom(cluster).patch_namespaced_custom_object(API_GROUP, API_VERSION, NAMESPACE, PLURAL, "cnn",
                                                   {"spec": {"serving": {"replicas": 2}}})
    cluster["operator"].start()
    model = wait_for("generation 2 observed after restart",
                     lambda: (m := get_model(cluster, "cnn"))["status"].get("observedGeneration") == 2 and m, timeout=90)
    assert model["status"]["phase"] == "Building"
    assert sorted(j.metadata.name for j in build_jobs(cluster)) == before


def test_a_node_of_a_new_gpu_type_gets_one_new_build(cluster):
    before = set(jobs_by_key(cluster))
    add_gpu_node(cluster["api"], cluster["heartbeats"], "gpu-l4", "NVIDIA-L4", "8", "9")
    model = wait_for("3 targets", lambda: (m := get_model(cluster, "cnn"))["status"].get("targetCount") == 3 and m)
    l4 = next(t for t in model["status"]["targets"] if t["gpuProduct"] == "NVIDIA-L4")
    jobs = wait_for("the L4 Job", lambda: (j := jobs_by_key(cluster)) and l4["engineKey"] in j and j)
    assert jobs[l4["engineKey"]].spec.template.spec.containers[0].args[-1] == "8.9"
    cnn_keys = {t["engineKey"] for t in model["status"]["targets"]}
    assert cnn_keys - before == {l4["engineKey"]}  # the H100 and A100 engines were not rebuilt


def jobs_by_key(cluster) -> dict:
    return {j.metadata.labels["plansmith.io/engine-key"]: j for j in build_jobs(cluster)}


def pinned_product(job) -> str:
    terms = job.spec.template.spec.affinity.node_affinity.required_during_scheduling_ignored_during_execution
    return next(e.values[0] for e in terms.node_selector_terms[0].match_expressions if e.key == "nvidia.com/gpu.product")


def test_a_new_builder_version_rebuilds_once_per_gpu_type(cluster):
    old_keys = {t["engineKey"] for t in get_model(cluster, "cnn")["status"]["targets"]}
    jobs_before = len(build_jobs(cluster))
    cluster["operator"].stop()
    cluster["operator"].start(PLANSMITH_BUILDER_BACKEND_VERSION="2.0-test")
    model = wait_for("targets keyed for the new builder version", lambda: (m := get_model(cluster, "cnn"))
                     and all(t.get("backendVersion") == "2.0-test" for t in m["status"]["targets"]) and m, timeout=90)
    new_keys = {t["engineKey"] for t in model["status"]["targets"]}
    assert len(new_keys) == len(old_keys) == 3 and not new_keys & old_keys
    jobs = wait_for("a Job for every new key", lambda: (j := jobs_by_key(cluster)) and new_keys <= set(j) and j)
    assert sorted(pinned_product(jobs[k]) for k in new_keys) == sorted(
        {*(p for p, _, _ in GPU_TYPES.values()), "NVIDIA-L4"})
    # exactly one rebuild per GPU type and model build options: cnn (+ its twin) and bad, 3 types each
    time.sleep(3)
    keys_by_model = {name: sorted(t["engineKey"] for t in get_model(cluster, name)["status"]["targets"])
                     for name in ("cnn", "cnn-twin", "bad")}
    assert len(build_jobs(cluster)) == jobs_before + 6, (jobs_before, keys_by_model, sorted(jobs_by_key(cluster)))


def test_build_concurrency_is_a_limit_across_models(cluster):
    running = len(build_jobs(cluster))  # no kubelet here: every Job stays running
    cluster["operator"].stop()
    cluster["operator"].start(PLANSMITH_BUILDER_BACKEND_VERSION="2.0-test", PLANSMITH_BUILD_CONCURRENCY=str(running + 1))
    for name in ("limited-a", "limited-b"):
        custom(cluster).create_namespaced_custom_object(
            API_GROUP, API_VERSION, NAMESPACE, PLURAL,
            model_body(name, cluster, build={"precision": "int8", "quantization": "dynamic", "backend": "onnxruntime",
                                             "optimizationLevel": 1 if name.endswith("a") else 2}))
    def settled():
        models = [get_model(cluster, n) for n in ("limited-a", "limited-b")]
        targets = [t for m in models for t in m.get("status", {}).get("targets", [])]
        return len(targets) == 6 and targets
    targets = wait_for("both models reconciled", settled, timeout=60)
    assert sorted(t["state"] for t in targets) == ["Building"] + ["Pending"] * 5
    assert {t.get("reason") for t in targets if t["state"] == "Pending"} == {"WaitingForBuildSlot"}
    time.sleep(2)
    assert len(build_jobs(cluster)) == running + 1


def test_deleting_the_model_that_holds_the_build_slot_lets_the_waiting_one_build(cluster):
    # continues the previous test: one of limited-a/-b holds the only free slot, the other waits for it
    building = {name: [t for t in get_model(cluster, name)["status"]["targets"] if t["state"] == "Building"]
                for name in ("limited-a", "limited-b")}
    holder, waiting = sorted(building, key=lambda name: not building[name])
    assert building[holder] and not building[waiting]
    custom(cluster).delete_namespaced_custom_object(API_GROUP, API_VERSION, NAMESPACE, PLURAL, holder)

    wait_for(f"{waiting} to get the freed build slot",
             lambda: any(t["state"] == "Building" for t in get_model(cluster, waiting)["status"]["targets"]), timeout=60)
    wait_for(f"{holder}'s Job to be garbage-collected", lambda: not build_jobs(cluster, holder), timeout=60)
    time.sleep(3)
    assert not build_jobs(cluster, holder)  # a deleted model's children are not re-created
    assert len(build_jobs(cluster, waiting)) == 1


def test_the_operator_survives_an_api_server_restart(cluster):
    # kopf retries its watches from their last resourceVersion; etcd's history is compacted meanwhile,
    # so those resumed watches get 410 Gone and kopf has to start them over
    log_before = cluster["log"].read_text(errors="replace")
    cluster["plane"].restart_api_server(down_seconds=10, compact_history=True)
    assert cluster["operator"].running(), "the operator exited while the API server was down"
    wait_for("kopf to restart a watch after 410 Gone", lambda: "Restarting the watch-stream" in
             cluster["log"].read_text(errors="replace")[len(log_before):], timeout=60)

    custom(cluster).create_namespaced_custom_object(
        API_GROUP, API_VERSION, NAMESPACE, PLURAL, model_body("after-restart", cluster, build={"precision": "fp16"}))
    model = wait_for("the operator to reconcile a model created after the restart",
                     lambda: (m := get_model(cluster, "after-restart")).get("status", {}).get("targets") and m, timeout=90)
    assert {c["type"]: c["status"] for c in model["status"]["conditions"]}["Valid"] == "True"
    nodes = {n.metadata.labels.get("nvidia.com/gpu.product") for n in client.CoreV1Api(cluster["api"]).list_node().items}
    assert {t["gpuProduct"] for t in model["status"]["targets"]} == nodes - {None}
