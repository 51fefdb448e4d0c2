"""The local cluster runs real pods: Jobs complete or fail per backoffLimit, Deployments serve the
host, simulated GPUs steer scheduling, garbage collection stops containers, pods reach the API
server and S3. Marked `cluster` (through the dev_cluster fixture): minutes, root only."""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
import urllib.request
import uuid

import boto3
import pytest
from kubernetes import client, config

from plansmith.devcluster import cluster as cluster_module
from plansmith.devcluster import images, node

NAMESPACE = "cluster-tests"
PYTHON = images.PYTHON_REF
# python as PID 1 ignores SIGTERM: exit on it so deleted pods stop at once
SERVE = ("import http.server, signal, sys; signal.signal(signal.SIGTERM, lambda *a: sys.exit(0)); "
         "http.server.test(HandlerClass=http.server.SimpleHTTPRequestHandler, port=8080, bind='0.0.0.0')")
SLEEP = "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(0)); time.sleep(3600)"


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def api(dev_cluster):
    api_client = config.new_client_from_config(config_file=str(dev_cluster.kubeconfig))
    dev_cluster.ensure_s3_secret(NAMESPACE)
    yield api_client
    client.CoreV1Api(api_client).delete_namespace(NAMESPACE)
    api_client.close()


@pytest.fixture(scope="module")
def core(api):
    return client.CoreV1Api(api)


@pytest.fixture(scope="module")
def batch(api):
    return client.BatchV1Api(api)


@pytest.fixture(scope="module")
def apps(api):
    return client.AppsV1Api(api)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def kubectl(dev_cluster, *args: str) -> str:
    result = subprocess.run([str(dev_cluster.kubectl), "--kubeconfig", str(dev_cluster.kubeconfig), "-n", NAMESPACE,
                             *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def container(name: str, code: str, image: str = PYTHON, **extra) -> dict:
    return {"name": name, "image": image, "imagePullPolicy": "Never", "command": ["python3", "-c", code], **extra}


def job(name: str, code: str, *, backoff_limit: int = 0) -> dict:
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
            "spec": {"backoffLimit": backoff_limit, "template": {"spec": {
                "restartPolicy": "Never", "terminationGracePeriodSeconds": 1, "containers": [container("main", code)]}}}}


def job_condition(batch, name: str) -> str | None:
    conditions = batch.read_namespaced_job_status(name, NAMESPACE).status.conditions or []
    return next((c.type for c in conditions if c.status == "True" and c.type in ("Complete", "Failed")), None)


def pods_of(core, selector: str) -> list:
    return core.list_namespaced_pod(NAMESPACE, label_selector=selector).items


def test_job_runs_to_completion_with_logs_and_termination_message(dev_cluster, core, batch):
    name = unique("hello")
    code = ("import platform; print('hello from', platform.python_version()); "
            "open('/dev/termination-log', 'w').write('{\"result\": 42}')")
    batch.create_namespaced_job(NAMESPACE, job(name, code))
    assert wait_for(lambda: job_condition(batch, name), 90, "the Job to finish") == "Complete"
    (pod,) = pods_of(core, f"job-name={name}")
    assert pod.status.phase == "Succeeded"
    terminated = pod.status.container_statuses[0].state.terminated
    assert terminated.exit_code == 0
    assert json.loads(terminated.message) == {"result": 42}
    assert kubectl(dev_cluster, "logs", f"job/{name}").strip() == "hello from 3.11.2"  # Debian bookworm's python


def test_failing_container_is_retried_per_backoff_limit_then_the_job_fails(core, batch):
    name = unique("fails")
    batch.create_namespaced_job(NAMESPACE, job(name, "import sys; print('bad input'); sys.exit(3)", backoff_limit=1))
    assert wait_for(lambda: job_condition(batch, name), 120, "the Job to finish") == "Failed"
    conditions = batch.read_namespaced_job_status(name, NAMESPACE).status.conditions
    assert any(c.type == "Failed" and c.reason == "BackoffLimitExceeded" for c in conditions)
    pods = pods_of(core, f"job-name={name}")
    assert len(pods) == 2  # the first try and one retry
    assert all(p.status.phase == "Failed" for p in pods)
    assert all(p.status.container_statuses[0].state.terminated.exit_code == 3 for p in pods)


def web_deployment(name: str, node_name: str | None = None) -> dict:
    spec: dict = {"terminationGracePeriodSeconds": 5, "containers": [container("web", SERVE, ports=[
        {"containerPort": 8080}], readinessProbe={"httpGet": {"path": "/", "port": 8080}, "periodSeconds": 1})]}
    if node_name:
        spec["nodeSelector"] = {"kubernetes.io/hostname": node_name}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name}}, "spec": spec}}}


def available(apps, name: str) -> bool:
    conditions = apps.read_namespaced_deployment_status(name, NAMESPACE).status.conditions or []
    return any(c.type == "Available" and c.status == "True" for c in conditions)


def http_get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status, response.read()


def test_deployment_becomes_available_and_answers_the_host_by_pod_ip_and_services(dev_cluster, core, apps):
    name = unique("web")
    second_node = cluster_module.NODES[1].name  # pods on the second node are reachable too
    apps.create_namespaced_deployment(NAMESPACE, web_deployment(name, second_node))
    core.create_namespaced_service(NAMESPACE, {"metadata": {"name": name}, "spec": {
        "type": "NodePort", "selector": {"app": name}, "ports": [{"port": 80, "targetPort": 8080}]}})
    wait_for(lambda: available(apps, name), 90, "the Deployment to become Available")
    (pod,) = pods_of(core, f"app={name}")
    assert pod.spec.node_name == second_node
    status, body = http_get(f"http://{pod.status.pod_ip}:8080/")
    assert status == 200 and b"Directory listing" in body
    service = core.read_namespaced_service(name, NAMESPACE).spec
    # kube-proxy programs the Service a moment after the endpoints appear
    for url in (f"http://{service.cluster_ip}/", f"http://{dev_cluster.node_ip}:{service.ports[0].node_port}/"):
        status, body = wait_for(lambda: _try_get(url), 30, f"the Service to answer on {url}")
        assert status == 200 and b"Directory listing" in body
    apps.delete_namespaced_deployment(name, NAMESPACE)


def _try_get(url: str):
    try:
        return http_get(url)
    except OSError:
        return None


def gpu_pod(name: str, product: str, resource: str = "nvidia.com/gpu", count: int = 1) -> dict:
    affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "nvidia.com/gpu.product", "operator": "In", "values": [product]}]}]}}}
    return {"metadata": {"name": name}, "spec": {
        "affinity": affinity, "terminationGracePeriodSeconds": 1, "restartPolicy": "Never",
        "containers": [container("gpu", SLEEP, resources={"limits": {resource: str(count)}})]}}


def free_gpus(core, node: str) -> int:
    """GPUs of `node` not requested by a running or pending pod (other tests' pods may hold some).
    Counted once nothing is being deleted: GPUs still held by the pods of a namespace an earlier test
    deleted would be freed under this test's feet."""
    def settled():
        terminating_namespaces = [n for n in core.list_namespace().items if n.status.phase == "Terminating"]
        terminating_pods = [p for p in core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={node}").items
                            if p.metadata.deletion_timestamp]
        return not terminating_namespaces and not terminating_pods
    wait_for(settled, 180, f"pods on {node} and namespaces being deleted to be gone")
    allocatable = int(core.read_node(node).status.allocatable["nvidia.com/gpu"])
    pods = core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={node}").items
    used = sum(int((c.resources.limits or {}).get("nvidia.com/gpu", 0)) for p in pods
               if p.status.phase in ("Pending", "Running") for c in p.spec.containers)
    return allocatable - used


def phase(core, name: str) -> str:
    return core.read_namespaced_pod(name, NAMESPACE).status.phase


def test_gpu_pods_land_on_the_matching_gpu_type_and_wait_when_none_is_free(core):
    a10g, h100 = cluster_module.NODES[1], cluster_module.NODES[0]
    first, second, mig = unique("a10g"), unique("a10g"), unique("mig")
    free = free_gpus(core, a10g.name)
    assert free >= 1
    core.create_namespaced_pod(NAMESPACE, gpu_pod(first, a10g.gpus.product, count=free))
    wait_for(lambda: phase(core, first) == "Running", 60, "the first GPU pod to run")
    assert core.read_namespaced_pod(first, NAMESPACE).spec.node_name == a10g.name

    # every A10G is taken; the H100 node has free GPUs but the affinity rules it out
    core.create_namespaced_pod(NAMESPACE, gpu_pod(second, a10g.gpus.product))
    events = wait_for(lambda: [e for e in core.list_namespaced_event(
        NAMESPACE, field_selector=f"involvedObject.name={second}").items if e.reason == "FailedScheduling"],
        30, "a FailedScheduling event")
    assert "Insufficient nvidia.com/gpu" in events[0].message
    assert phase(core, second) == "Pending"

    # a MIG slice (mixed strategy) is only offered by the H100 node
    core.create_namespaced_pod(NAMESPACE, gpu_pod(mig, h100.gpus.product, "nvidia.com/mig-1g.10gb"))
    wait_for(lambda: phase(core, mig) == "Running", 60, "the MIG pod to run")
    assert core.read_namespaced_pod(mig, NAMESPACE).spec.node_name == h100.name

    # freeing the A10G lets the waiting pod schedule there
    core.delete_namespaced_pod(first, NAMESPACE)
    wait_for(lambda: phase(core, second) == "Running", 90, "the waiting GPU pod to run once the GPU is free")
    assert core.read_namespaced_pod(second, NAMESPACE).spec.node_name == a10g.name
    for name in (second, mig):
        core.delete_namespaced_pod(name, NAMESPACE)


def test_deleting_a_deployment_collects_its_replicaset_and_pods_and_stops_containers(dev_cluster, core, apps):
    name = unique("gc")
    deployment = web_deployment(name)
    deployment["spec"]["replicas"] = 2
    apps.create_namespaced_deployment(NAMESPACE, deployment)
    wait_for(lambda: available(apps, name) and all(
        p.status.container_statuses and p.status.container_statuses[0].ready for p in pods_of(core, f"app={name}")),
        90, "both replicas ready")
    pods = pods_of(core, f"app={name}")
    assert len(pods) == 2 and len(apps.list_namespaced_replica_set(NAMESPACE, label_selector=f"app={name}").items) == 1
    container_ids = {p.spec.node_name: [] for p in pods}
    for pod in pods:
        container_ids[pod.spec.node_name].append(pod.status.container_statuses[0].container_id.removeprefix("containerd://"))
    running = {n: node.running_tasks(dev_cluster.node_paths(n)) for n in container_ids}
    assert all(cid in running[n] for n, ids in container_ids.items() for cid in ids)

    apps.delete_namespaced_deployment(name, NAMESPACE, propagation_policy="Background")
    wait_for(lambda: not apps.list_namespaced_replica_set(NAMESPACE, label_selector=f"app={name}").items
             and not pods_of(core, f"app={name}"), 90, "the ReplicaSet and pods to be collected")
    wait_for(lambda: not any(cid in node.running_tasks(dev_cluster.node_paths(n))
                             for n, ids in container_ids.items() for cid in ids), 30, "the containers to stop")


def test_pod_reaches_the_api_server_through_the_kubernetes_service(dev_cluster, core, batch):
    name = unique("incluster")
    code = """
import json, os, ssl, urllib.request
sa = '/var/run/secrets/kubernetes.io/serviceaccount'
url = f"https://{os.environ['KUBERNETES_SERVICE_HOST']}:{os.environ['KUBERNETES_SERVICE_PORT']}/version"
request = urllib.request.Request(url, headers={'Authorization': 'Bearer ' + open(sa + '/token').read()})
context = ssl.create_default_context(cafile=sa + '/ca.crt')
print(json.load(urllib.request.urlopen(request, context=context, timeout=10))['gitVersion'])
"""
    batch.create_namespaced_job(NAMESPACE, job(name, code))
    assert wait_for(lambda: job_condition(batch, name), 90, "the Job to finish") == "Complete", \
        kubectl(dev_cluster, "logs", f"job/{name}")
    assert kubectl(dev_cluster, "logs", f"job/{name}").strip() == "v1.20.2"


def test_pod_reaches_s3_with_the_secret_credentials(dev_cluster, core, batch):
    name = unique("s3")
    key = f"from-pod/{name}.txt"
    code = f"""
import boto3, onnxruntime, plansmith
s3 = boto3.client('s3')  # credentials, region and endpoint all come from the plansmith-s3 Secret
s3.put_object(Bucket='plansmith-engines', Key='{key}', Body=b'written by ' + onnxruntime.__version__.encode())
print(s3.head_object(Bucket='plansmith-engines', Key='{key}')['ContentLength'])
"""
    body = job(name, code)
    pod_container = body["spec"]["template"]["spec"]["containers"][0]
    pod_container["image"] = images.PLANSMITH_IMAGES["builder"].ref
    pod_container["envFrom"] = [{"secretRef": {"name": cluster_module.S3_SECRET}}]
    batch.create_namespaced_job(NAMESPACE, body)
    assert wait_for(lambda: job_condition(batch, name), 120, "the Job to finish") == "Complete", \
        kubectl(dev_cluster, "logs", f"job/{name}")
    credentials = dev_cluster.s3_credentials()
    s3 = boto3.client("s3", endpoint_url=dev_cluster.s3_endpoint, region_name=credentials["AWS_DEFAULT_REGION"],
                      aws_access_key_id=credentials["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=credentials["AWS_SECRET_ACCESS_KEY"])
    written = s3.get_object(Bucket="plansmith-engines", Key=key)["Body"].read()
    assert written.startswith(b"written by 1.")
    assert kubectl(dev_cluster, "logs", f"job/{name}").strip() == str(len(written))


def test_plansmith_images_run_their_entrypoints_and_carry_this_working_tree(dev_cluster, batch):
    """operator/builder/runtime: one filesystem, three entrypoints; logs readable on both nodes."""
    commands = {"operator": "operator", "builder": "build", "runtime": "serve"}
    names = {}
    for index, (image, command) in enumerate(commands.items()):
        name = names[image] = unique(image)
        body = job(name, "")
        spec = body["spec"]["template"]["spec"]
        spec["containers"][0] = {"name": "main", "image": images.PLANSMITH_IMAGES[image].ref,
                                 "imagePullPolicy": "Never", "args": ["--help"]}  # the image's own entrypoint
        spec["nodeSelector"] = {"kubernetes.io/hostname": cluster_module.NODES[index % 2].name}
        batch.create_namespaced_job(NAMESPACE, body)
    for image, command in commands.items():
        assert wait_for(lambda: job_condition(batch, names[image]), 90, f"the {image} Job") == "Complete"
        assert kubectl(dev_cluster, "logs", f"job/{names[image]}").startswith(f"usage: plansmith {command}")

    # the installed code is this tree's (the dev_cluster fixture runs load-image when it changed)
    name = unique("code")
    body = job(name, "import hashlib, plansmith.devcluster.oci as m; print(hashlib.sha256(open(m.__file__, 'rb').read()).hexdigest())")
    body["spec"]["template"]["spec"]["containers"][0]["image"] = images.PLANSMITH_IMAGES["operator"].ref
    batch.create_namespaced_job(NAMESPACE, body)
    assert wait_for(lambda: job_condition(batch, name), 90, "the code Job") == "Complete"
    local = hashlib.sha256((images.REPO_ROOT / "operator/plansmith/devcluster/oci.py").read_bytes()).hexdigest()
    assert kubectl(dev_cluster, "logs", f"job/{name}").strip() == local
