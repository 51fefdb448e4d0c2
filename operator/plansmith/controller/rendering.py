"""Kubernetes objects plansmith creates, rendered as plain dicts by pure functions.

- one build Job per missing engine key, named from the key (a restarted operator finds the
  Job it already launched instead of launching another), pinned to a node of the target's GPU type;
- one serving Deployment per target, rolling to a new engine when its key changes (its pods: the
  runtime, and the spec's sidecars beside it);
- one Service per InferenceModel selecting the serving pods of all its targets.

Every pod gets the Pod Security "restricted" profile: non-root, no privilege escalation, all
capabilities dropped, RuntimeDefault seccomp, read-only root filesystem with an emptyDir for /tmp.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from plansmith.controller.settings import OperatorSettings
from plansmith.controller.targets import Target
from plansmith.spec import RUNTIME_CONTAINER, InferenceModelSpec, SidecarContainer

MANAGED_BY = {"app.kubernetes.io/managed-by": "plansmith"}
MODEL_LABEL = "plansmith.io/model"
TARGET_LABEL = "plansmith.io/target"
KEY_LABEL = "plansmith.io/engine-key"
COMPONENT_LABEL = "app.kubernetes.io/component"
MANIFEST_ANNOTATION = "plansmith.io/manifest-uri"
RUN_AS_USER = 10001
HTTP_PORT, GRPC_PORT, METRICS_PORT = 8000, 8001, 8002
DRAIN_SECONDS = 5


def dns_name(*parts: str, limit: int = 63) -> str:
    """Join parts into a DNS-1123 label; too long -> truncated with a stable hash suffix."""
    name = "-".join(p.strip("-") for p in parts if p)
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return name[: limit - 9].rstrip("-") + "-" + digest


# A Service's name is a DNS-1035 label, and the model's name is its Service's and a label value on
# every child: an InferenceModel (any DNS-1123 subdomain) named resnet50.v2, 3d-unet or longer than
# 63 characters would be refused by the API server half-way through creating its children. KServe
# asks the same of InferenceService names.
MODEL_NAME = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


def model_name_problem(name: str) -> str | None:
    """Why `name` cannot name a served model's Service and labels, or None."""
    if len(name) <= 63 and MODEL_NAME.fullmatch(name):
        return None
    return (f"the model name {name!r} names its Service and labels: use at most 63 lowercase letters, digits and "
            "'-', starting with a letter and ending with a letter or digit (a DNS-1035 label)")


def job_name(key: str) -> str:
    return f"plansmith-build-{key[:24]}"


def deployment_name(model: str, target: Target) -> str:
    return dns_name(model, target.slug)


def service_name(model: str) -> str:
    return dns_name(model)


def storage_env(spec: InferenceModelSpec, settings: OperatorSettings) -> list[dict[str, Any]]:
    """S3 endpoint and credentials as environment variables; credentials only by reference to the
    Secret, so they never appear in the Job/Deployment spec, in args, in status or in logs."""
    env: list[dict[str, Any]] = []
    endpoint = spec.storage.endpoint or settings.s3_endpoint
    if endpoint:
        env.append({"name": "PLANSMITH_S3_ENDPOINT", "value": endpoint})
    secret = spec.storage.secret_ref.name if spec.storage.secret_ref else settings.storage_secret
    if secret:
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            env.append({"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}})
        env.append({"name": "AWS_DEFAULT_REGION",
                    "valueFrom": {"secretKeyRef": {"name": secret, "key": "AWS_DEFAULT_REGION", "optional": True}}})
    return env


def storage_uri(spec: InferenceModelSpec, settings: OperatorSettings) -> str | None:
    return spec.storage.uri or settings.storage_uri


def node_affinity(target: Target, settings: OperatorSettings) -> dict[str, Any]:
    if target.device == "cpu":
        arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(target.cpu_arch or "", target.cpu_arch)
        expressions = [{"key": "kubernetes.io/arch", "operator": "In", "values": [arch]}]
    else:
        major, minor = (target.compute_capability or "0.0").split(".")
        expressions = [
            {"key": settings.gpu_product_label, "operator": "In", "values": [target.gpu_product]},
            {"key": settings.gpu_compute_major_label, "operator": "In", "values": [major]},
            {"key": settings.gpu_compute_minor_label, "operator": "In", "values": [minor]},
        ]
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": expressions}]}}}


def pod_security_context() -> dict[str, Any]:
    return {"runAsNonRoot": True, "runAsUser": RUN_AS_USER, "runAsGroup": RUN_AS_USER, "fsGroup": RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"}}


def container_security_context() -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}


def _gpu_limits(target: Target) -> dict[str, Any]:
    return {target.resource: "1"} if target.resource else {}


def _scheduling(spec: InferenceModelSpec, target: Target, settings: OperatorSettings) -> dict[str, Any]:
    scheduling: dict[str, Any] = {"affinity": node_affinity(target, settings)}
    if spec.serving.node_selector:
        scheduling["nodeSelector"] = dict(spec.serving.node_selector)
    if spec.serving.tolerations:
        scheduling["tolerations"] = [t.to_api() for t in spec.serving.tolerations]
    return scheduling


def model_document(name: str, namespace: str, spec: InferenceModelSpec) -> str:
    """The InferenceModel as the builder reads it (from the PLANSMITH_MODEL environment variable)."""
    return json.dumps({"apiVersion": "plansmith.io/v1alpha1", "kind": "InferenceModel",
                       "metadata": {"name": name, "namespace": namespace}, "spec": spec.to_api()},
                      sort_keys=True, separators=(",", ":"))


def render_build_job(*, name: str, namespace: str, spec: InferenceModelSpec, target: Target, key: str,
                     settings: OperatorSettings) -> dict[str, Any]:
    labels = {**MANAGED_BY, COMPONENT_LABEL: "build", MODEL_LABEL: name, TARGET_LABEL: target.slug, KEY_LABEL: key}
    store = storage_uri(spec, settings)
    # the builder image's entrypoint is `plansmith build`: these are its arguments
    args = ["env:PLANSMITH_MODEL", "--store", store, "--backend", settings.builder_backend,
            "--target", target.builder_target_arg]
    if settings.simulated_gpus and target.device == "gpu":
        args.append("--simulated-gpu")
    container = {
        "name": "builder",
        "image": settings.builder_image_for(settings.builder_backend_version),
        "imagePullPolicy": settings.image_pull_policy,
        "args": args,
        "env": [{"name": "PLANSMITH_MODEL", "value": model_document(name, namespace, spec)},
                {"name": "PLANSMITH_ENGINE_KEY", "value": key},
                {"name": "HOME", "value": "/tmp"},
                *storage_env(spec, settings)],
        "resources": {"limits": _gpu_limits(target)} if target.resource else {},
        "securityContext": container_security_context(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [{"name": "scratch", "mountPath": "/tmp"}],
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": job_name(key), "namespace": namespace, "labels": labels,
                     "annotations": {MANIFEST_ANNOTATION: f"{store.rstrip('/')}/engines/{key}/manifest.json"}},
        "spec": {
            "backoffLimit": settings.build_backoff_limit,
            "activeDeadlineSeconds": spec.build.timeout_seconds,
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": False,
                    "securityContext": pod_security_context(),
                    **_scheduling(spec, target, settings),
                    "containers": [container],
                    "volumes": [{"name": "scratch", "emptyDir": {}}],
                },
            },
        },
    }


def runtime_args(name: str, spec: InferenceModelSpec, manifest_uri: str) -> list[str]:
    """Arguments of the runtime image's entrypoint, `plansmith serve`."""
    serving = spec.serving
    args = ["--manifest", manifest_uri, "--model-name", name,
            "--http-port", str(HTTP_PORT), "--grpc-port", str(GRPC_PORT), "--metrics-port", str(METRICS_PORT),
            "--instances", str(serving.instances), "--max-batch-size", str(serving.max_batch_size)]
    batching = serving.dynamic_batching
    if batching is None or serving.max_batch_size == 0:
        args.append("--no-batching")
    else:
        args += ["--max-queue-delay-us", str(batching.max_queue_delay_microseconds),
                 "--max-queue-size", str(batching.max_queue_size),
                 "--timeout-us", str(batching.timeout_microseconds)]
        if batching.preferred_batch_sizes:
            args += ["--preferred-batch-sizes", ",".join(map(str, batching.preferred_batch_sizes))]
    args += ["--warmup-iterations", str(serving.warmup.iterations)] if serving.warmup.enabled else ["--no-warmup"]
    if serving.metrics.latency_summaries:
        args += ["--metrics-config", "summary_latencies=true"]
    if serving.trace is not None:
        for entry in serving.trace.trace_config():
            args += ["--trace-config", entry]
    if serving.response_cache is not None:
        args += ["--cache-config", serving.response_cache.cache_config()]
    return args


def opentelemetry_env(name: str, namespace: str, deployment: str, spec: InferenceModelSpec) -> list[dict[str, Any]]:
    """With trace mode opentelemetry, the OpenTelemetry SDK's own variables naming the spans' service
    (the model) and where they come from (the Kubernetes resource attributes of its semantic
    conventions); the spec's resource attributes override them."""
    trace = spec.serving.trace
    if trace is None or trace.mode != "opentelemetry":
        return []
    return [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "OTEL_SERVICE_NAME", "value": name},
            {"name": "OTEL_RESOURCE_ATTRIBUTES",
             "value": f"k8s.namespace.name={namespace},k8s.deployment.name={deployment},k8s.pod.name=$(POD_NAME)"}]


def render_sidecar(sidecar: SidecarContainer, spec: InferenceModelSpec) -> dict[str, Any]:
    """A spec.serving.sidecars entry as a container of the serving pod, under the same restricted
    security context as the runtime, with the pod's scratch /tmp (its root filesystem is read-only)
    and /dev/shm."""
    container: dict[str, Any] = {"name": sidecar.name, "image": sidecar.image}
    for field in ("command", "args"):
        if getattr(sidecar, field):
            container[field] = list(getattr(sidecar, field))
    if sidecar.env:
        container["env"] = [{"name": variable.name, "value": variable.value} for variable in sidecar.env]
    resources = {kind: {k: str(v) for k, v in getattr(sidecar.resources, kind).items()} for kind in ("limits", "requests")}
    if any(resources.values()):
        container["resources"] = {kind: values for kind, values in resources.items() if values}
    return {**container, "securityContext": container_security_context(), "volumeMounts": serving_mounts(spec)}


SHARED_MEMORY_VOLUME = "shared-memory"


def serving_mounts(spec: InferenceModelSpec) -> list[dict[str, Any]]:
    """What each container of a serving pod mounts: the scratch /tmp, and /dev/shm when the spec sizes it."""
    mounts = [{"name": "scratch", "mountPath": "/tmp"}]
    if spec.serving.shared_memory_size is not None:
        mounts.append({"name": SHARED_MEMORY_VOLUME, "mountPath": "/dev/shm"})
    return mounts


def serving_volumes(spec: InferenceModelSpec) -> list[dict[str, Any]]:
    volumes: list[dict[str, Any]] = [{"name": "scratch", "emptyDir": {}}]
    if spec.serving.shared_memory_size is not None:
        volumes.append({"name": SHARED_MEMORY_VOLUME,
                        "emptyDir": {"medium": "Memory", "sizeLimit": str(spec.serving.shared_memory_size)}})
    return volumes


MODEL_REPOSITORY = "/models"  # where a Triton pod's init container writes the repository tritonserver serves
MODEL_REPOSITORY_VOLUME = "model-repository"


def triton_args(spec: InferenceModelSpec) -> list[str]:
    """tritonserver's flags: the repository the init container wrote, the ports, and the settings
    plansmith's runtime takes under Triton's own flag names (the rest is in config.pbtxt)."""
    serving = spec.serving
    args = [f"--model-repository={MODEL_REPOSITORY}", f"--http-port={HTTP_PORT}", f"--grpc-port={GRPC_PORT}",
            f"--metrics-port={METRICS_PORT}", "--strict-readiness=true", "--exit-timeout-secs=30"]
    if serving.metrics.latency_summaries:
        args.append("--metrics-config=summary_latencies=true")
    if serving.trace is not None:
        args += [f"--trace-config={entry}" for entry in serving.trace.trace_config()]
    if serving.response_cache is not None:
        args.append(f"--cache-config={serving.response_cache.cache_config()}")
    return args


def triton_repository_init_container(name: str, spec: InferenceModelSpec, manifest_uri: str,
                                     settings: OperatorSettings) -> dict[str, Any]:
    """Fetches the engine (checking its sha256) and renders config.pbtxt beside it, with the runtime
    image's `plansmith triton-repository`, before tritonserver starts."""
    return {
        "name": MODEL_REPOSITORY_VOLUME,
        "image": settings.runtime_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["plansmith", "triton-repository"],
        "args": ["--manifest", manifest_uri, "--model-name", name, "--out", MODEL_REPOSITORY,
                 "--spec-json", json.dumps(spec.to_api(), sort_keys=True, separators=(",", ":"))],
        "env": [{"name": "HOME", "value": "/tmp"}, *storage_env(spec, settings)],
        "securityContext": container_security_context(),
        "volumeMounts": [{"name": "scratch", "mountPath": "/tmp"},
                         {"name": MODEL_REPOSITORY_VOLUME, "mountPath": MODEL_REPOSITORY}],
    }


def render_deployment(*, name: str, namespace: str, spec: InferenceModelSpec, target: Target, key: str,
                      manifest_uri: str, settings: OperatorSettings) -> dict[str, Any]:
    """The serving Deployment of one target. With `serving.runtime: triton` its pods run stock
    tritonserver (the chart's images.triton) on a model repository an init container writes;
    otherwise plansmith's runtime, which fetches the engine itself."""
    selector = {MODEL_LABEL: name, TARGET_LABEL: target.slug, COMPONENT_LABEL: "serving"}
    labels = {**MANAGED_BY, **selector}
    resources = spec.serving.resources
    limits = {**{k: str(v) for k, v in resources.limits.items()}, **_gpu_limits(target)}
    requests = {k: str(v) for k, v in resources.requests.items()}
    triton = spec.serving.runtime == "triton"
    telemetry = opentelemetry_env(name, namespace, deployment_name(name, target), spec)
    if triton:
        server = {"image": settings.triton_image, "command": ["tritonserver"], "args": triton_args(spec),
                  "env": [{"name": "HOME", "value": "/tmp"}, *telemetry]}
    else:
        server = {"image": settings.runtime_image, "args": runtime_args(name, spec, manifest_uri),
                  "env": [{"name": "HOME", "value": "/tmp"}, *storage_env(spec, settings), *telemetry]}
    container = {
        "name": RUNTIME_CONTAINER,
        "imagePullPolicy": settings.image_pull_policy,
        **server,
        # protocol spelled out: server-side apply keys port lists by (port, protocol) and, before
        # Kubernetes 1.21, refuses an entry that leaves the default out
        "ports": [{"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"},
                  {"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"},
                  {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}],
        "startupProbe": {"httpGet": {"path": "/v2/health/live", "port": "http"}, "periodSeconds": 2, "failureThreshold": 150},
        "readinessProbe": {"httpGet": {"path": "/v2/health/ready", "port": "http"}, "periodSeconds": 2, "failureThreshold": 2},
        "livenessProbe": {"httpGet": {"path": "/v2/health/live", "port": "http"}, "periodSeconds": 10, "failureThreshold": 3},
        # keep serving while endpoints controllers and load balancers drop the pod, then SIGTERM drains
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(DRAIN_SECONDS)]}}},
        "resources": {k: v for k, v in (("limits", limits), ("requests", requests)) if v},
        "securityContext": container_security_context(),
        "volumeMounts": serving_mounts(spec) + ([{"name": MODEL_REPOSITORY_VOLUME, "mountPath": MODEL_REPOSITORY,
                                                  "readOnly": True}] if triton else []),
    }
    pod_extras: dict[str, Any] = {}
    if triton:
        pod_extras["initContainers"] = [triton_repository_init_container(name, spec, manifest_uri, settings)]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": deployment_name(name, target), "namespace": namespace, "labels": labels,
                     "annotations": {KEY_LABEL: key}},
        "spec": {
            "replicas": spec.serving.replicas,
            "selector": {"matchLabels": selector},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {"labels": labels, "annotations": {KEY_LABEL: key, MANIFEST_ANNOTATION: manifest_uri}},
                "spec": {
                    "automountServiceAccountToken": False,
                    "terminationGracePeriodSeconds": 30 + DRAIN_SECONDS,
                    "securityContext": pod_security_context(),
                    **_scheduling(spec, target, settings),
                    **pod_extras,
                    "containers": [container, *(render_sidecar(sidecar, spec) for sidecar in spec.serving.sidecars)],
                    "volumes": serving_volumes(spec) + ([{"name": MODEL_REPOSITORY_VOLUME, "emptyDir": {}}]
                                                        if triton else []),
                },
            },
        },
    }


def render_service(*, name: str, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": service_name(name), "namespace": namespace,
                     "labels": {**MANAGED_BY, MODEL_LABEL: name, COMPONENT_LABEL: "serving"}},
        "spec": {
            "selector": {MODEL_LABEL: name, COMPONENT_LABEL: "serving"},
            "ports": [{"name": "http", "port": HTTP_PORT, "targetPort": "http", "protocol": "TCP"},
                      {"name": "grpc", "port": GRPC_PORT, "targetPort": "grpc", "protocol": "TCP"},
                      {"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics", "protocol": "TCP"}],
        },
    }
