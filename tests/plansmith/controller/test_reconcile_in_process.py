"""The reconcile (handlers.reconcile) in process, against the real API server: kopf's indexes given
as plain dicts, engines published to file:// storage, the children read back from the API server.

What a GitOps user relies on: removing a sidecar or a nodeSelector entry from the spec removes it
from the pods (server-side apply; a strategic merge patch kept both); a change of serving settings
is not reported Ready before its Deployment rolls out; a cordoned or NotReady GPU type keeps its
serving Deployment, as Kubernetes keeps its pods; a model file or Secret that is not there is a
condition with its reason, not a silent retry.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import uuid
from pathlib import Path
from typing import Any

import kopf
import pytest
from kubernetes import client

from plansmith import testmodels
from plansmith.controller import handlers, rendering
from plansmith.controller.targets import node_info
from plansmith.engine_key import manifest_uri
from plansmith.spec import API_GROUP, API_VERSION, PLURAL

NAMESPACE = "serving-rollout-tests"


def gpu_node(name: str, product: str, major: str, minor: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": {
        "nvidia.com/gpu.present": "true", "nvidia.com/gpu.product": product, "nvidia.com/gpu.compute.major": major,
        "nvidia.com/gpu.compute.minor": minor, "kubernetes.io/arch": "amd64", "pool": "canary"}},
        "spec": {}, "status": {"allocatable": {"nvidia.com/gpu": "8"}, "conditions": [{"type": "Ready", "status": "True"}]}}


H100_NODE = gpu_node("gpu-h100", "NVIDIA-H100-80GB-HBM3", "9", "0")
A100_NODE = gpu_node("gpu-a100", "NVIDIA-A100-SXM4-40GB", "8", "0")
H100, A100 = "sm90-nvidia-h100-80gb-hbm3", "sm80-nvidia-a100-sxm4-40gb"


@pytest.fixture
def operator_state(control_plane, kube_client, inference_model_crd, monkeypatch):
    from kubernetes.client.rest import ApiException

    from plansmith.controller.kube import KubeApi

    monkeypatch.setattr(handlers, "KubeApi", lambda: KubeApi(str(control_plane.kubeconfig)))
    posted: list[dict[str, Any]] = []  # kopf posts Events only inside its own handlers' context
    monkeypatch.setattr(handlers.kopf, "event", lambda objs, **event: posted.append(event))
    try:
        client.CoreV1Api(kube_client).create_namespace({"metadata": {"name": NAMESPACE}})
    except ApiException as error:
        assert error.status == 409
    handlers.OPERATOR = handlers.Operator()
    yield handlers.OPERATOR
    handlers.OPERATOR = None


class Model:
    """An InferenceModel in the API server (its children's owner), reconciled in this process."""

    def __init__(self, kube_client, tmp_path: Path, serving: dict[str, Any], name: str | None = None,
                 **spec_changes: Any) -> None:
        self.custom = client.CustomObjectsApi(kube_client)
        self.apps = client.AppsV1Api(kube_client)
        source = testmodels.mlp(tmp_path / "mlp.onnx")
        self.storage = (tmp_path / "engines").as_uri()
        self.name = name or f"m-{uuid.uuid4().hex[:8]}"
        spec = {"model": {"uri": source.path.as_uri(), "inputs": source.spec_inputs()},
                "storage": {"uri": self.storage}, "serving": serving, **spec_changes}
        self.body = self.custom.create_namespaced_custom_object(API_GROUP, API_VERSION, NAMESPACE, PLURAL, {
            "apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": "InferenceModel",
            "metadata": {"name": self.name}, "spec": spec})
        self.nodes = [node_info(H100_NODE)]
        self.deployments: list[dict[str, Any]] = []  # the serving index
        self.endpoint_slices: list[list[str]] = []  # the Service's EndpointSlices: the pods each routes to

    def change_serving(self, **serving: Any) -> None:
        self.body = self.custom.get_namespaced_custom_object(API_GROUP, API_VERSION, NAMESPACE, PLURAL, self.name)
        spec = self.body["spec"]
        spec["serving"] = {**{k: v for k, v in spec["serving"].items() if k not in serving},
                           **{k: v for k, v in serving.items() if v is not None}}
        self.body = self.custom.replace_namespaced_custom_object(API_GROUP, API_VERSION, NAMESPACE, PLURAL,
                                                                 self.name, self.body)

    def reconcile(self) -> dict[str, Any]:
        model = {**self.body, "status": {}}
        indexes = handlers.Indexes(nodes={handlers.NODES: self.nodes}, build_jobs={},
                                   serving={(NAMESPACE, self.name): self.deployments},
                                   service_endpoints={(NAMESPACE, self.name): self.endpoint_slices})
        asyncio.run(handlers.reconcile(NAMESPACE, self.name, model, logging.getLogger("test"), indexes))
        return handlers.state().written_status[self.body["metadata"]["uid"]]

    def publish_engine(self, key: str, compute_capability: str, gpu_product: str) -> None:
        """What a finished build Job leaves in storage: the engine and its manifest."""
        folder = Path(manifest_uri(self.storage, key).removeprefix("file://")).parent
        folder.mkdir(parents=True, exist_ok=True)
        engine = b"an engine"
        (folder / "model.onnx").write_bytes(engine)
        (folder / "manifest.json").write_text(json.dumps({
            "schemaVersion": 1, "key": key, "backend": "onnxruntime", "backendVersion": "1.20.0",
            "target": {"device": "gpu", "computeCapability": compute_capability, "gpuProduct": gpu_product},
            "precision": "fp32", "buildOptions": {}, "source": {"uri": "file:///m.onnx", "sha256": "0" * 64},
            "inputs": [], "outputs": [], "maxBatchSize": 8,
            "artifacts": [{"name": "model.onnx", "role": "engine", "sha256": hashlib.sha256(engine).hexdigest(),
                           "bytes": len(engine)}],
            "buildSeconds": 1, "builderVersion": "0", "createdAt": "now"}))

    def deployment(self, target: str = H100) -> client.V1Deployment:
        return self.apps.read_namespaced_deployment(f"{self.name}-{target}", NAMESPACE)

    def rolled_out(self, routed: bool = True) -> None:
        """The indexes as the watches show them once the Deployments' pods are ready and, if `routed`,
        the Service's EndpointSlices list them (one slice per Deployment here)."""
        listed = self.apps.list_namespaced_deployment(NAMESPACE, label_selector=f"{rendering.MODEL_LABEL}={self.name}")
        self.deployments = [{
            "name": deployment.metadata.name, "target": deployment.metadata.labels[rendering.TARGET_LABEL],
            "key": deployment.spec.template.metadata.annotations[rendering.KEY_LABEL],
            "replicas": deployment.spec.replicas, "readyReplicas": deployment.spec.replicas, "rolledOut": True,
            "specHash": deployment.metadata.annotations[handlers.SPEC_HASH_ANNOTATION]} for deployment in listed.items]
        self.endpoint_slices = [[f"{deployment.metadata.name}-pod-{i}" for i in range(deployment.spec.replicas)]
                                for deployment in listed.items] if routed else []


def conditions(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def serving_model(operator_state, kube_client, tmp_path, serving: dict[str, Any], nodes=(H100_NODE,)) -> Model:
    """A model whose engines are built and whose Deployments have rolled out: Ready."""
    model = Model(kube_client, tmp_path, serving)
    model.nodes = [node_info(node) for node in nodes]
    building = model.reconcile()  # launches the build Jobs; their keys are in the status
    for target in building["targets"]:
        model.publish_engine(target["engineKey"], target["computeCapability"], target["gpuProduct"])
    model.reconcile()
    model.rolled_out()
    assert conditions(model.reconcile())["Ready"] == ("True", "Serving")
    return model


def test_a_rolled_out_model_is_not_ready_until_its_service_routes_to_every_replica(operator_state, kube_client,
                                                                                   tmp_path):
    model = serving_model(operator_state, kube_client, tmp_path, {"replicas": 2})
    model.rolled_out(routed=False)  # pods ready; the EndpointSlice controller has not listed them yet
    status = model.reconcile()
    assert conditions(status)["ServingReady"] == ("False", "WaitingForEndpoints")
    assert conditions(status)["Ready"] == ("False", "WaitingForEndpoints") and status["phase"] == "Deploying"
    assert next(c["message"] for c in status["conditions"] if c["type"] == "ServingReady") == (
        "2/2 serving replicas ready; the Service routes to 0 pods")
    model.endpoint_slices = [[f"{model.name}-{H100}-pod-0"], [f"{model.name}-{H100}-pod-0"]]  # one pod, two slices
    assert conditions(model.reconcile())["ServingReady"] == ("False", "WaitingForEndpoints")
    model.rolled_out()
    assert conditions(model.reconcile())["Ready"] == ("True", "Serving")


def test_removing_a_sidecar_and_a_node_selector_removes_them_from_the_deployment(operator_state, kube_client, tmp_path):
    model = serving_model(operator_state, kube_client, tmp_path, {
        "nodeSelector": {"pool": "canary"}, "sharedMemorySize": "128Mi",
        "sidecars": [{"name": "client", "image": "busybox:1.36", "command": ["sleep", "infinity"]}]})
    pod = model.deployment().spec.template.spec
    assert [c.name for c in pod.containers] == ["runtime", "client"] and pod.node_selector == {"pool": "canary"}
    assert "shared-memory" in [v.name for v in pod.volumes]

    model.change_serving(sidecars=[], nodeSelector={}, sharedMemorySize=None)
    model.reconcile()
    pod = model.deployment().spec.template.spec
    assert [c.name for c in pod.containers] == ["runtime"]
    assert not pod.node_selector
    assert "shared-memory" not in [v.name for v in pod.volumes]
    assert all(m.name != "shared-memory" for m in pod.containers[0].volume_mounts)


def test_a_serving_change_is_not_ready_until_its_deployment_rolls_out(operator_state, kube_client, tmp_path):
    model = serving_model(operator_state, kube_client, tmp_path, {"maxBatchSize": 8})
    model.change_serving(dynamicBatching={"maxQueueDelayMicroseconds": 5000})
    status = model.reconcile()  # applies the new pod template; the index still shows the old rollout
    assert "--max-queue-delay-us" in model.deployment().spec.template.spec.containers[0].args
    assert status["observedGeneration"] == model.body["metadata"]["generation"]
    assert conditions(status)["Ready"][0] == "False" and conditions(status)["ServingReady"][0] == "False"
    model.rolled_out()
    assert conditions(model.reconcile())["Ready"] == ("True", "Serving")


def test_a_cordoned_or_not_ready_gpu_type_keeps_its_deployment(operator_state, kube_client, tmp_path):
    model = serving_model(operator_state, kube_client, tmp_path, {}, nodes=(H100_NODE, A100_NODE))
    cordoned = {**H100_NODE, "spec": {"unschedulable": True}}
    not_ready = {**H100_NODE, "status": {**H100_NODE["status"], "conditions": [{"type": "Ready", "status": "Unknown"}]}}
    for node in (cordoned, not_ready):
        model.nodes = [node_info(node), node_info(A100_NODE)]
        model.reconcile()
        assert model.deployment(H100).metadata.name == f"{model.name}-{H100}"
    # a new setting while the H100 nodes are cordoned: the kept H100 Deployment is not updated, and
    # the model is not Ready while it serves the old one
    model.nodes = [node_info(cordoned), node_info(A100_NODE)]
    model.change_serving(dynamicBatching={"maxQueueDelayMicroseconds": 7000})
    model.reconcile()
    model.rolled_out()
    status = model.reconcile()
    assert conditions(status)["ServingReady"] == ("False", "StaleServing")
    assert f"{model.name}-{H100}" in next(c["message"] for c in status["conditions"] if c["type"] == "ServingReady")
    assert "7000" not in model.deployment(H100).spec.template.spec.containers[0].args
    model.nodes = [node_info(H100_NODE), node_info(A100_NODE)]  # uncordoned: it is updated
    model.reconcile()
    assert "7000" in model.deployment(H100).spec.template.spec.containers[0].args
    model.rolled_out()
    assert conditions(model.reconcile())["Ready"] == ("True", "Serving")
    model.nodes = [node_info(A100_NODE)]  # the type's nodes left the cluster: its Deployment goes
    model.reconcile()
    with pytest.raises(client.ApiException) as gone:
        model.deployment(H100)
    assert gone.value.status == 404
    assert model.deployment(A100).metadata.name == f"{model.name}-{A100}"


def test_runtime_triton_rolls_out_tritonserver_and_switching_back_rolls_out_the_runtime(
        operator_state, kube_client, tmp_path):
    model = serving_model(operator_state, kube_client, tmp_path, {"runtime": "triton"})
    pod = model.deployment().spec.template.spec
    assert pod.containers[0].command == ["tritonserver"] and pod.containers[0].image == operator_state.settings.triton_image
    assert [c.name for c in pod.init_containers] == ["model-repository"]
    assert pod.init_containers[0].command == ["plansmith", "triton-repository"]
    model.change_serving(runtime="plansmith")
    model.reconcile()
    pod = model.deployment().spec.template.spec
    assert pod.containers[0].image == operator_state.settings.runtime_image and not pod.containers[0].command
    assert not pod.init_containers and "model-repository" not in [v.name for v in pod.volumes]


def test_a_model_whose_only_gpu_type_is_cordoned_stays_ready_while_its_pods_serve(
        operator_state, kube_client, tmp_path):
    """Routine maintenance: its pods keep serving the current engine, and nothing can be built or
    moved there meanwhile. Ready stays (kstatus: Current), the target says why it is idle; a model
    with no Deployment there yet waits, saying the nodes take no new pods."""
    model = serving_model(operator_state, kube_client, tmp_path, {})
    model.nodes = [node_info({**H100_NODE, "spec": {"unschedulable": True}})]
    status = model.reconcile()
    assert conditions(status)["Ready"] == ("True", "Serving") and conditions(status)["Stalled"][0] == "False"
    (target,) = status["targets"]
    assert (target["state"], target["reason"]) == ("Serving", "NodesTakeNoNewPods")

    (tmp_path / "newcomer").mkdir()
    newcomer = Model(kube_client, tmp_path / "newcomer", {})
    newcomer.nodes = model.nodes
    status = newcomer.reconcile()
    assert conditions(status)["EnginesReady"] == ("False", "NoMatchingNodes")
    assert "the nodes of NVIDIA-H100-80GB-HBM3 take no new pods (cordoned or not Ready)" in next(
        c["message"] for c in status["conditions"] if c["type"] == "EnginesReady")


@pytest.mark.parametrize("change, reason, message", [
    ("model", "SourceNotFound", "missing.onnx does not exist"),
    ("secret", "SecretNotFound", "Secret serving-rollout-tests/no-such-secret (the storage credentials) does not exist"),
    ("name", "InvalidName", "the model name 'resnet50.v2' names its Service"),
])
def test_what_the_operator_cannot_act_on_is_a_condition_and_creates_nothing(
        operator_state, kube_client, tmp_path, change, reason, message):
    """A typo in the model's URI or the Secret's name, a name no Service can have: Valid=False and
    Stalled with the reason (Argo CD shows Degraded), where the reconcile raised (and kopf retried
    with no status at all) or the API server refused half-way."""
    source = testmodels.mlp(tmp_path / "mlp.onnx")
    spec_changes, name = {}, None
    if change == "model":
        spec_changes = {"model": {"uri": (tmp_path / "missing.onnx").as_uri(), "inputs": source.spec_inputs()}}
    elif change == "secret":
        spec_changes = {"storage": {"uri": "s3://engines/plansmith", "secretRef": {"name": "no-such-secret"}}}
    else:
        name = "resnet50.v2"  # a valid InferenceModel name, not a valid Service name
    model = Model(kube_client, tmp_path, {}, name=name, **spec_changes)
    if change == "name":
        status = model.reconcile()
    else:  # written, and looked for again: the file may be uploaded, the Secret created, after the model
        with pytest.raises(kopf.TemporaryError, match=message.replace("(", r"\(").replace(")", r"\)")) as retried:
            model.reconcile()
        assert retried.value.delay == handlers.MISSING_OBJECT_RETRY_SECONDS
        status = handlers.state().written_status[model.body["metadata"]["uid"]]
    assert conditions(status)["Valid"] == ("False", reason) and conditions(status)["Stalled"] == ("True", reason)
    assert message in next(c["message"] for c in status["conditions"] if c["type"] == "Ready")
    assert client.BatchV1Api(kube_client).list_namespaced_job(
        NAMESPACE, label_selector=f"{rendering.MODEL_LABEL}={model.name}").items == []
    if change == "model":  # the file uploaded after the model: the next look builds it
        testmodels.mlp(tmp_path / "missing.onnx")
        assert conditions(model.reconcile())["Valid"] == ("True", "SpecValid")


def test_a_retry_after_an_event_handlers_error_runs_once_per_model_after_its_delay():
    """kopf never retries an event handler: reconcile_from_event schedules the model again."""
    operator = handlers.Operator.__new__(handlers.Operator)  # the retry bookkeeping alone, no API clients
    operator.retries = {}
    runs: list[str] = []

    async def scenario() -> None:
        async def again(label: str) -> None:
            runs.append(label)

        operator.retry_later("ns", "m", 0.05, lambda: again("first"))
        operator.retry_later("ns", "m", 0.05, lambda: again("second"))  # already scheduled: not twice
        operator.retry_later("ns", "other", 0.05, lambda: again("other"))
        await asyncio.sleep(0.01)
        assert runs == []
        await asyncio.sleep(0.1)
        operator.retry_later("ns", "m", 0.01, lambda: again("after it ran"))
        await asyncio.sleep(0.05)

    asyncio.run(scenario())
    assert runs == ["first", "other", "after it ran"] and operator.retries == {}
