"""Operator benchmark on the local cluster: reaction latencies, idle API traffic and memory.

    .venv/bin/python bench/operator.py [--models 20] [--idle-models 200] [--idle-seconds 60]

Uses the dev cluster (`plansmith dev-cluster up`; started here when it is not up, and stopped again
at the end), with the operator running as a local process so its memory can be read from /proc, under
a ServiceAccount of its own so its API requests can be picked out of the API server's audit log.

1. Reaction latency, one model at a time (`--models`, each its own generated ONNX so nothing is a
   cache hit): the model is created through the API, then a watch on Jobs and Deployments times
   - apply -> every build Job created (one per GPU type), and
   - last build Job seen complete -> every serving Deployment created.
   The build Jobs are real: the builder image builds the engine in a pod on the node of that type.
2. Idle cost (`--idle-models`): that many more models sharing one ONNX (cache hits, `replicas: 0`, so
   no pods), left alone for `--idle-seconds` after they are all reconciled. Reported: the operator's
   API requests per minute (from the audit log, watches included) and its resident memory.

Targets (issue 4): both latencies <= 1 s p50, idle API traffic near zero, RSS <= 200 MB.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import onnxruntime
from kubernetes import client, config, watch

from plansmith import testmodels
from plansmith.controller.rendering import MODEL_LABEL
from plansmith.controller.settings import OperatorSettings
from plansmith.controller.targets import discover_targets, node_info
from plansmith.devcluster import cluster
from plansmith.devcluster.audit import read_audit_log
from plansmith.devcluster.controlplane import write_kubeconfig
from plansmith.devcluster.operator_process import OperatorProcess
from plansmith.spec import API_GROUP, API_VERSION, PLURAL, InferenceModelSpec

ROOT = Path(__file__).resolve().parents[1]
MODEL_BUCKET = "plansmith-models"
ENGINE_BUCKET = "plansmith-engines"
OPERATOR_ACCOUNT = "plansmith-bench-operator"
TARGET_LATENCY_S = 1.0
TARGET_RSS_MB = 200.0


@dataclass
class Timeline:
    """When (time.monotonic) the watches saw each model's children appear or finish."""
    jobs_created: dict[str, dict[str, float]] = field(default_factory=dict)  # model -> job -> first seen
    jobs_complete: dict[str, dict[str, float]] = field(default_factory=dict)
    jobs_failed: dict[str, set[str]] = field(default_factory=dict)
    deployments_created: dict[str, dict[str, float]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    changed: threading.Condition = field(init=False)

    def __post_init__(self) -> None:
        self.changed = threading.Condition(self.lock)

    def record(self, table: dict[str, dict[str, float]], model: str, name: str) -> None:
        with self.changed:
            table.setdefault(model, {}).setdefault(name, time.monotonic())
            self.changed.notify_all()

    def wait(self, what: str, done, timeout: float):
        deadline = time.monotonic() + timeout
        with self.changed:
            while not (result := done()):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
                self.changed.wait(min(left, 1.0))
        return result


def watch_children(api: client.ApiClient, namespace: str, timeline: Timeline, stop: threading.Event) -> list[threading.Thread]:
    batch, apps = client.BatchV1Api(api), client.AppsV1Api(api)

    def follow(list_call, on_object) -> None:
        while not stop.is_set():
            try:
                for event in watch.Watch().stream(list_call, namespace, timeout_seconds=30):
                    on_object(event["object"])
                    if stop.is_set():
                        return
            except Exception as error:  # a dropped watch is re-opened; the bench must not stop timing
                print(f"  (watch re-opened after {type(error).__name__})", flush=True)

    def on_job(job) -> None:
        model = (job.metadata.labels or {}).get(MODEL_LABEL)
        if not model:
            return
        timeline.record(timeline.jobs_created, model, job.metadata.name)
        if job.status and job.status.succeeded:
            timeline.record(timeline.jobs_complete, model, job.metadata.name)
        if job.status and job.status.failed:
            with timeline.changed:
                timeline.jobs_failed.setdefault(model, set()).add(job.metadata.name)
                timeline.changed.notify_all()

    def on_deployment(deployment) -> None:
        model = (deployment.metadata.labels or {}).get(MODEL_LABEL)
        if model:
            timeline.record(timeline.deployments_created, model, deployment.metadata.name)

    threads = [threading.Thread(target=follow, args=(batch.list_namespaced_job, on_job), daemon=True),
               threading.Thread(target=follow, args=(apps.list_namespaced_deployment, on_deployment), daemon=True)]
    for thread in threads:
        thread.start()
    return threads


def operator_kubeconfig(dev: cluster.DevCluster, api: client.ApiClient, namespace: str, path: Path) -> Path:
    """A kubeconfig for a ServiceAccount of the operator's own (cluster-admin, for the bench only), so
    that its requests are the audit log's lines with that user."""
    core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": OPERATOR_ACCOUNT}})
    rbac.create_cluster_role_binding({
        "metadata": {"name": namespace},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
        "subjects": [{"kind": "ServiceAccount", "name": OPERATOR_ACCOUNT, "namespace": namespace}]})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # Kubernetes 1.20's token controller writes the token Secret
        account = core.read_namespaced_service_account(OPERATOR_ACCOUNT, namespace)
        if account.secrets:
            secret = core.read_namespaced_secret(account.secrets[0].name, namespace)
            token = base64.b64decode(secret.data["token"]).decode()
            ca = json.loads(Path(dev.kubeconfig).read_text())["clusters"][0]["cluster"]["certificate-authority"]
            return write_kubeconfig(path, server=dev.state.api_server, ca=Path(ca), user=OPERATOR_ACCOUNT, token=token)
        time.sleep(0.5)
    raise TimeoutError("the operator's ServiceAccount got no token")


def model_body(name: str, namespace: str, model_uri: str, model: testmodels.TestModel, store: str, replicas: int) -> dict:
    return {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": "InferenceModel",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"model": {"uri": model_uri, "inputs": model.spec_inputs()},
                     "build": {"precision": "fp32", "timeoutSeconds": 600, "accuracy": {"samples": 2}},
                     "serving": {"replicas": replicas, "maxBatchSize": 8,
                                 "resources": {"requests": {"cpu": "50m", "memory": "128Mi"}},
                                 "warmup": {"iterations": 1}},
                     "storage": {"uri": store, "secretRef": {"name": "plansmith-s3"}}}}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def operator_requests(audit_log: Path, namespace: str, since: dt.datetime, until: dt.datetime) -> dict[str, int]:
    """The operator's requests received in [since, until), by verb (a watch counts once, when opened)."""
    username = f"system:serviceaccount:{namespace}:{OPERATOR_ACCOUNT}"
    verbs: dict[str, int] = {}
    seen: set[str] = set()
    for event in read_audit_log(audit_log):
        if event.get("user", {}).get("username") != username or event["auditID"] in seen:
            continue
        received = dt.datetime.fromisoformat(event["requestReceivedTimestamp"].replace("Z", "+00:00"))
        if since <= received < until:
            seen.add(event["auditID"])
            verbs[event["verb"]] = verbs.get(event["verb"], 0) + 1
    return verbs


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=int, default=20, help="models timed one at a time (real builds)")
    parser.add_argument("--idle-models", type=int, default=200, help="models left idle for the traffic and memory figures")
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    args = parser.parse_args()

    dev = cluster.status()
    started = dev is None
    if started:
        dev = cluster.up(say=lambda line: print(line, flush=True))
    namespace = f"bench-{uuid.uuid4().hex[:6]}"
    workdir = Path(tempfile.mkdtemp(prefix="plansmith-bench-operator-"))
    api = config.new_client_from_config(config_file=str(dev.kubeconfig))
    core, objects = client.CoreV1Api(api), client.CustomObjectsApi(api)
    kubectl = [str(dev.kubectl), "--kubeconfig", str(dev.kubeconfig), "--cache-dir", str(workdir / "kube")]
    subprocess.run([*kubectl, "apply", "-f", str(ROOT / "crds/inferencemodel.yaml")], check=True, capture_output=True)
    subprocess.run([*kubectl, "wait", "--for=condition=Established", "crd/inferencemodels.plansmith.io"], check=True,
                   capture_output=True)
    core.create_namespace({"metadata": {"name": namespace}})
    dev.ensure_s3_secret(namespace)

    credentials = dev.s3_credentials()
    s3 = boto3.client("s3", endpoint_url=dev.s3_endpoint, region_name="us-east-1",
                      aws_access_key_id=credentials["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=credentials["AWS_SECRET_ACCESS_KEY"])
    store = f"s3://{ENGINE_BUCKET}/{namespace}"
    models = []
    for index in range(args.models + 1):  # the last one is the idle models' shared ONNX
        model = testmodels.mlp(workdir / f"mlp-{index}.onnx", sizes=(64, 64, 10), seed=index)
        s3.upload_file(str(model.path), MODEL_BUCKET, f"{namespace}/mlp-{index}.onnx")
        models.append((f"s3://{MODEL_BUCKET}/{namespace}/mlp-{index}.onnx", model))

    settings = OperatorSettings.from_env({"PLANSMITH_SIMULATED_GPUS": "true"})
    nodes = [node_info(n) for n in json.loads(core.list_node(_preload_content=False).data)["items"]]
    expected_targets = len(discover_targets(nodes, InferenceModelSpec.model_validate(
        model_body("x", namespace, models[0][0], models[0][1], store, 1)["spec"]), settings).targets)
    print(f"dev cluster: {len(nodes)} nodes, {expected_targets} GPU types; namespace {namespace}", flush=True)

    env = {"KUBECONFIG": str(operator_kubeconfig(dev, api, namespace, workdir / "operator.kubeconfig")),
           "PLANSMITH_BUILDER_IMAGE": "docker.io/plansmith/builder:dev",
           "PLANSMITH_RUNTIME_IMAGE": "docker.io/plansmith/runtime:dev",
           "PLANSMITH_IMAGE_PULL_POLICY": "Never",
           "PLANSMITH_BUILDER_BACKEND": "onnxruntime",
           "PLANSMITH_BUILDER_BACKEND_VERSION": onnxruntime.__version__,
           "PLANSMITH_S3_ENDPOINT": dev.s3_endpoint,
           "PLANSMITH_SIMULATED_GPUS": "true",
           # every build of one model starts at once: the latency measured is the operator's, not the queue's
           "PLANSMITH_BUILD_CONCURRENCY": str(max(4, expected_targets)),
           **credentials}
    log = workdir / "operator.log"
    operator = OperatorProcess(namespace, log, env).start()
    timeline, stop = Timeline(), threading.Event()
    watch_children(api, namespace, timeline, stop)
    rss_samples: list[float] = []
    try:
        time.sleep(3)  # the operator's start-up (kopf's initial listings) is not what is timed
        apply_to_jobs, complete_to_deployments = [], []
        for index, (uri, model) in enumerate(models[:args.models]):
            name = f"timed-{index}"
            applied = time.monotonic()
            objects.create_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL,
                                                    model_body(name, namespace, uri, model, store, 1))
            try:
                created = timeline.wait(f"{name}'s build Jobs", lambda: len(timeline.jobs_created.get(name, {})) >= expected_targets and timeline.jobs_created[name], 60)
            except TimeoutError:
                status = objects.get_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL, name).get("status")
                raise TimeoutError(f"{name} got no build Jobs in 60 s; its status: {json.dumps(status)}") from None
            apply_to_jobs.append(max(created.values()) - applied)

            def all_complete():
                if timeline.jobs_failed.get(name):
                    raise RuntimeError(f"{name}: build Job failed: {sorted(timeline.jobs_failed[name])}; see {log}")
                done = timeline.jobs_complete.get(name, {})
                return len(done) >= expected_targets and done
            completed = timeline.wait(f"{name}'s builds", all_complete, 600)
            deployed = timeline.wait(f"{name}'s Deployments", lambda: len(timeline.deployments_created.get(name, {})) >= expected_targets and timeline.deployments_created[name], 120)
            # the operator acts on the engine's manifest in storage, which the builder writes before its pod
            # exits: the Deployments may exist before the Job is marked complete (then nothing was waited for)
            complete_to_deployments.append(max(0.0, max(deployed.values()) - max(completed.values())))
            rss_samples.append(rss_mb(operator.pid))
            print(f"  {name}: apply -> {expected_targets} Jobs {apply_to_jobs[-1]*1000:6.0f} ms; "
                  f"last Job complete -> Deployments {complete_to_deployments[-1]*1000:6.0f} ms", flush=True)
            objects.delete_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL, name)

        idle_uri, idle_model = models[args.models]
        print(f"creating {args.idle_models} idle models (one shared ONNX, replicas 0) ...", flush=True)
        burst_start, burst_since = time.monotonic(), dt.datetime.now(dt.timezone.utc)
        for index in range(args.idle_models):
            objects.create_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL,
                                                    model_body(f"idle-{index}", namespace, idle_uri, idle_model, store, 0))
        names = [f"idle-{index}" for index in range(args.idle_models)]
        timeline.wait("the idle models' Deployments", lambda: all(
            len(timeline.deployments_created.get(n, {})) >= expected_targets for n in names), 1800)
        created_s = time.monotonic() - burst_start

        def all_ready() -> bool:
            listed = objects.list_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL)["items"]
            idle = [m for m in listed if m["metadata"]["name"].startswith("idle-")]
            return len(idle) == len(names) and all(m.get("status", {}).get("phase") == "Ready" for m in idle)
        deadline = time.monotonic() + 1800
        while not all_ready():  # the Deployment controller reports 2 x idle-models rollouts, each a status change
            if time.monotonic() > deadline:
                raise TimeoutError("the idle models did not all become Ready")
            time.sleep(2)
        reconciled_s = time.monotonic() - burst_start
        burst_until = dt.datetime.now(dt.timezone.utc)
        time.sleep(10)  # the last status patches and Events
        since = dt.datetime.now(dt.timezone.utc)
        idle_rss = []
        end = time.monotonic() + args.idle_seconds
        while time.monotonic() < end:
            idle_rss.append(rss_mb(operator.pid))
            time.sleep(2)
        until = dt.datetime.now(dt.timezone.utc)
        time.sleep(2)  # the audit log is written asynchronously
        audit_log = Path(dev.state.kubeconfig).parent / "logs" / "audit.log"
        verbs = operator_requests(audit_log, namespace, since, until)
        burst_verbs = operator_requests(audit_log, namespace, burst_since, burst_until)
        if not burst_verbs:  # the operator surely called the API while reconciling: the filter is wrong
            raise RuntimeError(f"no requests by {OPERATOR_ACCOUNT} in {audit_log}: cannot count the idle ones")
        minutes = (until - since).total_seconds() / 60
    finally:
        stop.set()
        operator.stop()
        subprocess.run([*kubectl, "delete", "namespace", namespace, "--wait=false"], capture_output=True)
        client.RbacAuthorizationV1Api(api).delete_cluster_role_binding(namespace)
        if started:
            cluster.down(say=lambda _: None)

    requests_per_minute = sum(verbs.values()) / minutes
    p50_jobs, p50_deploy = statistics.median(apply_to_jobs), statistics.median(complete_to_deployments)
    peak_rss = max(rss_samples + idle_rss)
    print()
    print(f"operator benchmark: {args.models} models timed one at a time, {expected_targets} GPU types each "
          f"(real build Jobs on the dev cluster); {args.idle_models} idle models")
    print(f"{'measure':48} {'p50':>9} {'p95':>9} {'target':>9} {'ratio':>7}")
    for label, values in (("apply -> all build Jobs created", apply_to_jobs),
                          ("last Job complete -> all Deployments created", complete_to_deployments)):
        p50 = statistics.median(values)
        print(f"{label:48} {p50*1000:7.0f}ms {percentile(values, 0.95)*1000:7.0f}ms {TARGET_LATENCY_S*1000:7.0f}ms "
              f"{p50/TARGET_LATENCY_S:6.2f}x")
    print(f"{args.idle_models} models created at once: every Deployment there after {created_s:.1f} s, every model "
          f"Ready after {reconciled_s:.1f} s "
          f"({sum(burst_verbs.values())} API requests: {', '.join(f'{v} {k}' for k, v in sorted(burst_verbs.items()))})")
    print(f"idle API requests by the operator: {requests_per_minute:.1f}/min over {minutes*60:.0f} s "
          f"({', '.join(f'{v} {k}' for k, v in sorted(verbs.items())) or 'none'})")
    print(f"operator RSS: {idle_rss[-1]:.0f} MB idle with {args.idle_models} models, peak {peak_rss:.0f} MB "
          f"(target <= {TARGET_RSS_MB:.0f} MB, ratio {peak_rss/TARGET_RSS_MB:.2f}x)")
    print(f"operator log: {log}")
    met = p50_jobs <= TARGET_LATENCY_S and p50_deploy <= TARGET_LATENCY_S and peak_rss <= TARGET_RSS_MB
    print("targets met" if met else "targets MISSED")
    return 0


if __name__ == "__main__":
    sys.exit(main())
