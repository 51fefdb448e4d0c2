"""The real operator, configured and authorized exactly as the chart installs it, against the real
API server: it authenticates with the token of the chart's ServiceAccount, runs with the rendered
Deployment's arguments and environment, reconciles an InferenceModel into a build Job, and the
audit log shows that every call it made was allowed and granted by the chart's roles."""

from __future__ import annotations

import base64
import datetime as dt
import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import boto3
import pytest
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

from plansmith.devcluster.audit import api_calls, denied_calls, rbac_grants, read_audit_log
from plansmith.devcluster.controlplane import write_kubeconfig
from plansmith.spec import API_GROUP, API_VERSION, PLURAL

RELEASE = "rbac-e2e"
OPERATOR_NAMESPACE = "rbac-e2e-system"
MODEL_NAMESPACE = "rbac-e2e-models"
BUCKET = "rbac-e2e"
ACCOUNT = f"system:serviceaccount:{OPERATOR_NAMESPACE}:{RELEASE}-plansmith"
FAKE_ONNX_SHA256 = "ab" * 32  # the operator only hashes sources without spec.model.sha256
NODE = "rbac-e2e-gpu"


def wait_for(what: str, check, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except ApiException as error:
            last = error
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


def add_gpu_node(core: client.CoreV1Api) -> None:
    """A Node object with GPU Feature Discovery labels (no kubelet: the Job only needs to be created)."""
    labels = {"kubernetes.io/arch": "amd64", "kubernetes.io/hostname": NODE,
              "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "nvidia.com/gpu.compute.major": "9",
              "nvidia.com/gpu.compute.minor": "0", "nvidia.com/gpu.count": "1"}
    core.create_node({"metadata": {"name": NODE, "labels": labels}})
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    core.patch_node_status(NODE, {"status": {
        "capacity": {"cpu": "8", "memory": "64Gi", "pods": "110", "nvidia.com/gpu": "1"},
        "allocatable": {"cpu": "8", "memory": "64Gi", "pods": "110", "nvidia.com/gpu": "1"},
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "simulated",
                        "lastHeartbeatTime": now, "lastTransitionTime": now}]}})


@pytest.fixture(scope="module")
def chart_install(control_plane, kube_client, s3_server, helm, chart_dir, repo_root, tmp_path_factory):
    """The chart's objects created for real (the Deployment's pod is run below as a local process)."""
    core = client.CoreV1Api(kube_client)
    extensions = client.ApiextensionsV1Api(kube_client)
    crd = yaml.safe_load((repo_root / "crds" / "inferencemodel.yaml").read_text())
    try:
        extensions.create_custom_resource_definition(crd)
        created_crd = True
    except ApiException as error:
        assert error.status == 409, error
        created_crd = False
    for namespace in (OPERATOR_NAMESPACE, MODEL_NAMESPACE):
        core.create_namespace({"metadata": {"name": namespace}})
    core.create_namespaced_secret(MODEL_NAMESPACE, {"metadata": {"name": "engine-creds"}, "stringData": {
        "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}})
    add_gpu_node(core)
    boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1", aws_access_key_id="test",
                 aws_secret_access_key="test").create_bucket(Bucket=BUCKET)

    values = {"watchNamespaces": [MODEL_NAMESPACE], "storage": {"endpoint": s3_server.endpoint},
              "build": {"backend": "onnxruntime", "backendVersion": "1.0-test"}, "verbose": True}
    rendered = subprocess.run([str(helm), "template", RELEASE, str(chart_dir), "--namespace", OPERATOR_NAMESPACE,
                               "--values", "-"], input=yaml.safe_dump(values), capture_output=True, text=True)
    assert rendered.returncode == 0, rendered.stderr
    objects = [d for d in yaml.safe_load_all(rendered.stdout) if d]
    to_create = [o for o in objects if o["kind"] != "Deployment"]
    applied = subprocess.run([str(control_plane.kubectl), f"--kubeconfig={control_plane.kubeconfig}", "apply", "-f", "-"],
                             input=yaml.safe_dump_all(to_create), capture_output=True, text=True)
    assert applied.returncode == 0, applied.stderr

    # the token controller gives the ServiceAccount a token Secret (Kubernetes 1.20)
    account = ACCOUNT.rsplit(":", 1)[1]
    secret_name = wait_for("the ServiceAccount's token", lambda: (
        (sa := core.read_namespaced_service_account(account, OPERATOR_NAMESPACE)).secrets and sa.secrets[0].name))
    token = base64.b64decode(core.read_namespaced_secret(secret_name, OPERATOR_NAMESPACE).data["token"]).decode()
    workdir = tmp_path_factory.mktemp("rbac-e2e")
    kubeconfig = write_kubeconfig(workdir / "operator.kubeconfig", server=control_plane.server,
                                  ca=control_plane.ca_cert, user=account, token=token)
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    yield {"objects": objects, "deployment": deployment, "kubeconfig": kubeconfig, "workdir": workdir}

    custom = client.CustomObjectsApi(kube_client)
    for item in custom.list_namespaced_custom_object(API_GROUP, API_VERSION, MODEL_NAMESPACE, PLURAL)["items"]:
        name = item["metadata"]["name"]
        custom.patch_namespaced_custom_object(API_GROUP, API_VERSION, MODEL_NAMESPACE, PLURAL, name,
                                              {"metadata": {"finalizers": None}})
        custom.delete_namespaced_custom_object(API_GROUP, API_VERSION, MODEL_NAMESPACE, PLURAL, name)
    core.delete_node(NODE)
    if created_crd:  # leave the API server as we found it: other modules create the CRD themselves
        extensions.delete_custom_resource_definition(crd["metadata"]["name"])

        def gone():
            try:
                extensions.read_custom_resource_definition(crd["metadata"]["name"])
                return False
            except ApiException as error:
                return error.status == 404

        wait_for("the CRD to be deleted", gone)


@pytest.fixture(scope="module")
def operator_run(chart_install, control_plane):
    """`plansmith operator` with the container's args and env from the rendered Deployment, as the chart's ServiceAccount."""
    container = chart_install["deployment"]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e and e["value"] != ""}
    env.update(PLANSMITH_NAMESPACE=OPERATOR_NAMESPACE, PLANSMITH_POD_NAME="rbac-e2e-operator-0",
               KUBECONFIG=str(chart_install["kubeconfig"]))
    log = chart_install["workdir"] / "operator.log"
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("PLANSMITH_", "KUBECONFIG", "AWS_"))}
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "plansmith.cli", "operator", *container["args"]],
                                   stdout=out, stderr=subprocess.STDOUT, env={**base_env, **env})
    yield {"process": process, "log": log}
    process.terminate()
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


def test_operator_under_the_charts_rbac_reconciles_a_model(kube_client, operator_run, control_plane, chart_install):
    custom = client.CustomObjectsApi(kube_client)
    model = {
        "apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": "InferenceModel",
        "metadata": {"name": "rbac-probe", "namespace": MODEL_NAMESPACE},
        "spec": {
            "model": {"uri": f"s3://{BUCKET}/models/probe.onnx", "sha256": FAKE_ONNX_SHA256},
            "build": {"precision": "fp32"},
            "storage": {"uri": f"s3://{BUCKET}/store", "secretRef": {"name": "engine-creds"}},
        },
    }
    custom.create_namespaced_custom_object(API_GROUP, API_VERSION, MODEL_NAMESPACE, PLURAL, model)
    log = operator_run["log"]

    def building():
        assert operator_run["process"].poll() is None, log.read_text(errors="replace")[-4000:]
        obj = custom.get_namespaced_custom_object(API_GROUP, API_VERSION, MODEL_NAMESPACE, PLURAL, "rbac-probe")
        jobs = client.BatchV1Api(kube_client).list_namespaced_job(MODEL_NAMESPACE).items
        return obj.get("status", {}).get("observedGeneration") == obj["metadata"]["generation"] and jobs

    try:
        wait_for("a build Job and an observed status", building, timeout=60)
    except AssertionError as error:
        refused = denied_calls(read_audit_log(control_plane.workdir / "logs" / "audit.log"), ACCOUNT)
        status = custom.get_namespaced_custom_object(API_GROUP, API_VERSION, MODEL_NAMESPACE, PLURAL,
                                                     "rbac-probe").get("status")
        raise AssertionError(f"{error}\nrefused calls: {sorted(refused)}\nstatus: {status}\n"
                             f"operator log:\n{log.read_text(errors='replace')[-3000:]}") from None

    events = read_audit_log(control_plane.workdir / "logs" / "audit.log")
    refused = denied_calls(events, ACCOUNT)
    assert not refused, f"the chart's RBAC refused the operator: {sorted(refused)}"
    used = api_calls(events, ACCOUNT)
    roles = [o for o in chart_install["objects"] if o["kind"] in ("ClusterRole", "Role")]
    granted = rbac_grants(roles)
    assert {call.rule for call in used} <= granted
    # the calls this scenario must make: list models, write their status, read nodes, read the
    # storage Secret in the model's namespace, create the build Job (watches may start later)
    assert {("plansmith.io", "inferencemodels", "list"), ("plansmith.io", "inferencemodels/status", "patch"),
            ("", "nodes", "list"), ("", "secrets", "get"), ("batch", "jobs", "create")} <= {c.rule for c in used}
    # its children are listed and watched by their labels on the server, not every one in the cluster
    children = [event for event in events if event.get("user", {}).get("username") == ACCOUNT
                and event.get("verb") in ("list", "watch")
                and (event.get("objectRef") or {}).get("resource") in ("jobs", "deployments", "endpointslices")]
    assert {event["objectRef"]["resource"] for event in children} == {"jobs", "deployments", "endpointslices"}
    selectors = {(event["objectRef"]["resource"], parse_qs(urlsplit(event["requestURI"]).query).get(
        "labelSelector", [""])[0]) for event in children}
    assert selectors == {
        ("jobs", "app.kubernetes.io/component=build,app.kubernetes.io/managed-by=plansmith"),
        ("deployments", "app.kubernetes.io/component=serving,app.kubernetes.io/managed-by=plansmith"),
        ("endpointslices", "app.kubernetes.io/component=serving,app.kubernetes.io/managed-by=plansmith")}
    unused = sorted(granted - {call.rule for call in used})
    print(f"granted but not used in this scenario (serving, deletion, logs): {unused}")
