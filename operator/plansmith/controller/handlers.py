"""kopf handlers: the operator's wiring of watches, indexes and the reconcile loop.

Watches (no polling): InferenceModels, plansmith's Jobs and Deployments and the EndpointSlices of
its Services (selected by label on the server) and Nodes are kept in kopf indexes. A model is
reconciled when it is created, changed or resumed after a restart, when one of its build Jobs,
serving Deployments or its Service's endpoints change, and when the cluster's set of GPU types
changes. Reconciling reads the indexes (no API calls), looks engines up in storage (cached
per key), creates what is missing and writes status only when it differs.

Status is written through the status subresource by `KubeApi.patch_status` rather than kopf's
`patch.status`, because most reconciles are triggered by a child's event, where kopf has no patch
object for the parent; one path for every trigger keeps the status consistent.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import kopf
from kubernetes.client.rest import ApiException

from plansmith.accuracy_gate import gate_failure
from plansmith.controller import rendering
from plansmith.controller.catalog import CatalogError, Credentials, EngineCatalog, SourceNotFound
from plansmith.controller.kube import KubeApi
from plansmith.controller.settings import OperatorSettings
from plansmith.controller.status import Observation, TargetObservation, compute_status, rollout_complete
from plansmith.controller.targets import (Discovery, NodeInfo, Target, discover_targets, hardware_compatibility_problem,
                                          node_info)
from plansmith.engine_key import effective_quantization, engine_key, manifest_uri
from plansmith.manifest import Manifest
from plansmith.spec import API_GROUP, API_VERSION, PLURAL, InferenceModelSpec
from plansmith.validation import InvalidSpec, parse_spec

BUILD_LABELS = {**rendering.MANAGED_BY, rendering.COMPONENT_LABEL: "build"}
SERVING_LABELS = {**rendering.MANAGED_BY, rendering.COMPONENT_LABEL: "serving"}
NODES = "nodes"  # the single key of the node index
SPEC_HASH_ANNOTATION = "plansmith.io/spec-hash"
KSTATUS_CONDITIONS = ("Reconciling", "Stalled")
# (group, plural) of the children the operator watches, and the labels that select plansmith's own
WATCHED_CHILDREN = {("batch", "jobs"): BUILD_LABELS, ("apps", "deployments"): SERVING_LABELS,
                    ("discovery.k8s.io", "endpointslices"): SERVING_LABELS}
# a condition False for one of these is on its way: its Event is Normal, not a Warning
PROGRESS_REASONS = ("Building", "WaitingForEngines", "RollingOut", "WaitingForEndpoints")
# a model file or Secret the spec names and storage or the API lacks is looked for again this often
# (the operator watches neither: it may be uploaded or created after the model)
MISSING_OBJECT_RETRY_SECONDS = 60.0


class Operator:
    """Process-wide state: settings, API adapter, storage catalog, per-model locks."""

    def __init__(self) -> None:
        self.settings = OperatorSettings.from_env()
        self.kube = KubeApi()
        self.catalog = EngineCatalog()
        self.locks: dict[tuple[str, str], asyncio.Lock] = {}
        self.node_signature: frozenset[tuple] = frozenset()
        # build slots: Jobs launched by this process that the Job watch has not shown yet (with when),
        # and one lock around "count running builds, then launch", so concurrent reconciles cannot overshoot
        self.launched: dict[tuple[str, str], float] = {}
        self.build_slots = asyncio.Lock()
        # the status this process last wrote, by model uid: the watch delivers it a moment later, and a
        # reconcile in between (a Job event right after launch) must not take the older copy for the
        # current one and post every transition's Event twice
        self.written_status: dict[str, dict[str, Any]] = {}
        # uids of models deleted while a reconcile of them may still be queued behind the model's lock:
        # without a finalizer nothing else marks them, and acting on them would re-create their children
        self.deleted: collections.OrderedDict[str, None] = collections.OrderedDict()
        # reconciles scheduled after a storage error in an event handler, which kopf does not retry
        self.retries: dict[tuple[str, str], asyncio.Task] = {}

    def running_builds(self, build_job_index: kopf.Index, now: float) -> int:
        """Unfinished build Jobs: those indexed, plus those launched so recently that the watch has not
        delivered them. A launched Job the watch saw come and go (deleted with its model) is forgotten by
        `job_seen`; LAUNCH_VISIBLE_SECONDS bounds the wait for one the watch never reported."""
        indexed = {key: store for key, store in build_job_index.items()}
        self.launched = {job: at for job, at in self.launched.items()
                         if job not in indexed and now - at < LAUNCH_VISIBLE_SECONDS}
        running = sum(1 for store in indexed.values() for job in store if not job["finished"])
        return running + len(self.launched)

    def job_seen(self, namespace: str, name: str) -> None:
        self.launched.pop((namespace, name), None)

    def lock(self, namespace: str, name: str) -> asyncio.Lock:
        return self.locks.setdefault((namespace, name), asyncio.Lock())

    def retry_later(self, namespace: str, name: str, delay: float, again: Callable[[], Awaitable[None]]) -> None:
        """Run `again` after `delay` seconds, once per model however many times it is asked meanwhile."""
        if (namespace, name) in self.retries:
            return

        async def later() -> None:
            try:
                await asyncio.sleep(delay)
            finally:
                self.retries.pop((namespace, name), None)
            await again()

        self.retries[(namespace, name)] = asyncio.get_running_loop().create_task(later())


OPERATOR: Operator | None = None
LAUNCH_VISIBLE_SECONDS = 60.0


def label_selector(labels: dict[str, str]) -> str:
    return ",".join(f"{key}={value}" for key, value in sorted(labels.items()))


def state() -> Operator:
    assert OPERATOR is not None, "the startup handler creates the operator state"
    return OPERATOR


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, logger: logging.Logger, **_: Any) -> None:
    global OPERATOR
    OPERATOR = Operator()
    settings.posting.level = logging.INFO
    settings.persistence.finalizer = "plansmith.io/finalizer"
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.networking.request_timeout = 60
    settings.execution.max_workers = 8
    # children are selected by their labels on the server: only plansmith's Jobs, Deployments and its
    # Services' EndpointSlices stream to the operator, not every one in the cluster (kopf's `labels=`
    # on a handler filters after the watch has delivered an object)
    for resource, labels in WATCHED_CHILDREN.items():
        settings.watching.label_selectors[resource] = label_selector(labels)
    logger.info("plansmith operator: builder %s (%s %s), runtime %s, storage %s",
                OPERATOR.settings.builder_image, OPERATOR.settings.builder_backend,
                OPERATOR.settings.builder_backend_version, OPERATOR.settings.runtime_image,
                OPERATOR.settings.storage_uri or "(per model)")


# ----------------------------------------------------------------------------- indexes


@kopf.index(API_GROUP, API_VERSION, PLURAL)
def model_index(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict[tuple[str, str], dict[str, Any]]:
    return {(namespace, name): model_of(body)}


def model_of(body: kopf.Body) -> dict[str, Any]:
    """A plain copy of the InferenceModel (owner references and Events need apiVersion and kind)."""
    return {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": "InferenceModel", "metadata": dict(body.metadata),
            "spec": dict(body.spec), "status": dict(body.status)}


@kopf.index("batch", "v1", "jobs", labels=BUILD_LABELS)
def build_job_index(namespace: str, name: str, status: kopf.Status, labels: kopf.Labels, **_: Any) -> dict:
    conditions = {c.get("type"): c for c in status.get("conditions") or [] if c.get("status") == "True"}
    finished = "Complete" if "Complete" in conditions else "Failed" if "Failed" in conditions else None
    return {(namespace, name): {
        "key": labels.get(rendering.KEY_LABEL), "model": labels.get(rendering.MODEL_LABEL),
        "finished": finished, "failureReason": conditions.get("Failed", {}).get("reason"),
        "failureMessage": conditions.get("Failed", {}).get("message"),
    }}


@kopf.index("apps", "v1", "deployments", labels=SERVING_LABELS)
def serving_index(namespace: str, name: str, labels: kopf.Labels, spec: kopf.Spec, status: kopf.Status,
                  meta: kopf.Meta, **_: Any) -> dict:
    template_annotations = spec.get("template", {}).get("metadata", {}).get("annotations", {}) or {}
    rolled_out = rollout_complete(meta.get("generation", 0), spec.get("replicas", 1), dict(status))
    return {(namespace, labels.get(rendering.MODEL_LABEL)): {
        "name": name, "target": labels.get(rendering.TARGET_LABEL),
        "key": template_annotations.get(rendering.KEY_LABEL), "replicas": spec.get("replicas", 1),
        "readyReplicas": status.get("readyReplicas", 0) or 0, "rolledOut": rolled_out,
        "specHash": (meta.get("annotations") or {}).get(SPEC_HASH_ANNOTATION),
    }}


@kopf.index("discovery.k8s.io", "endpointslices", labels=SERVING_LABELS)
def service_endpoint_index(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict:
    """The serving pods one EndpointSlice of a model's Service routes to. The EndpointSlice
    controller copies the Service's labels to its slices (from Kubernetes 1.20, the chart's oldest).
    No version: the API server's preferred one (v1 from 1.21, v1beta1 before; the fields read here
    are the same). An endpoint whose `ready` is unset counts as ready, as the API says to; a
    terminating one is not ready."""
    ready = []
    for endpoint in body.get("endpoints") or []:  # null, not [], in a slice without endpoints
        if (endpoint.get("conditions") or {}).get("ready") is False:
            continue
        pod = (endpoint.get("targetRef") or {}).get("name")
        ready.append(pod or ",".join(endpoint.get("addresses", [])))
    return {(namespace, labels.get(rendering.MODEL_LABEL)): ready}


@kopf.index("", "v1", "nodes")
def node_index(body: kopf.Body, **_: Any) -> dict[str, NodeInfo]:
    return {NODES: node_info(dict(body))}


@dataclass(frozen=True)
class Indexes:
    """The kopf indexes a reconcile reads, which kopf passes to every handler by name."""

    nodes: kopf.Index
    build_jobs: kopf.Index
    serving: kopf.Index
    service_endpoints: kopf.Index

    @classmethod
    def of(cls, handler_kwargs: dict[str, Any]) -> Indexes:
        return cls(handler_kwargs["node_index"], handler_kwargs["build_job_index"], handler_kwargs["serving_index"],
                   handler_kwargs["service_endpoint_index"])

    def routed_pods(self, namespace: str, name: str) -> int:
        """Serving pods of a model that its Service routes to, each once: a dual-stack Service has a
        slice per address family, and a large one several."""
        return len({pod for slice_pods in self.service_endpoints.get((namespace, name), []) for pod in slice_pods})


# ----------------------------------------------------------------------------- triggers


@kopf.on.resume(API_GROUP, API_VERSION, PLURAL, id="reconcile-on-resume", backoff=10)
@kopf.on.create(API_GROUP, API_VERSION, PLURAL, id="reconcile", backoff=10)
@kopf.on.update(API_GROUP, API_VERSION, PLURAL, id="reconcile-on-change", field="spec", backoff=10)
async def reconcile_model(namespace: str, name: str, body: kopf.Body, logger: logging.Logger, **kwargs: Any) -> None:
    model = model_of(body)
    await reconcile(namespace, name, model, logger, Indexes.of(kwargs))


@kopf.on.event(API_GROUP, API_VERSION, PLURAL, when=lambda type, **_: type == "DELETED")
def model_deleted(uid: str, **_: Any) -> None:
    """Forget what this process kept for a deleted model (its children go by ownerReferences)."""
    operator = state()
    operator.written_status.pop(uid, None)
    operator.deleted[uid] = None
    while len(operator.deleted) > 10_000:
        operator.deleted.popitem(last=False)


@kopf.on.event("batch", "v1", "jobs", labels=BUILD_LABELS)
async def build_job_changed(namespace: str, name: str, labels: kopf.Labels, type: str | None, logger: logging.Logger,
                            model_index: kopf.Index, **kwargs: Any) -> None:
    """A build Job changed: reconcile every model of the namespace still waiting for an engine
    (models share engines by key), and models anywhere waiting for a build slot."""
    state().job_seen(namespace, name)
    if type is None:  # the initial listing: resume handlers already reconcile every model
        return
    for ns, name, model in indexed_models(model_index):
        waiting = latest_status(model).get("phase") in (None, "Pending", "Building")
        if (ns == namespace and (waiting or name == labels.get(rendering.MODEL_LABEL))) or _waits_for_slot(model):
            await reconcile_from_event(ns, name, model, logger, model_index, Indexes.of(kwargs))


@kopf.on.event("apps", "v1", "deployments", labels=SERVING_LABELS)
@kopf.on.event("discovery.k8s.io", "endpointslices", labels=SERVING_LABELS)
async def serving_changed(namespace: str, labels: kopf.Labels, type: str | None, logger: logging.Logger,
                          model_index: kopf.Index, **kwargs: Any) -> None:
    """A serving Deployment or an EndpointSlice of a model's Service changed: reconcile that model."""
    if type is None:
        return
    name = labels.get(rendering.MODEL_LABEL)
    for model in list(model_index.get((namespace, name), [])):
        await reconcile_from_event(namespace, name, model, logger, model_index, Indexes.of(kwargs))


@kopf.on.event("", "v1", "nodes")
async def node_changed(type: str | None, logger: logging.Logger, model_index: kopf.Index, **kwargs: Any) -> None:
    """Reconcile every model when anything target discovery reads changes on any node (GPU labels,
    GPU and MIG allocatable, taints, schedulability, readiness); heartbeats change none of it."""
    operator = state()
    indexes = Indexes.of(kwargs)
    signature = frozenset(_discovery_signature(n) for n in indexes.nodes.get(NODES, []))
    if signature == operator.node_signature:
        return
    operator.node_signature = signature
    if type is None:
        return
    logger.info("schedulable GPU capacity changed; reconciling every model")
    for ns, name, model in indexed_models(model_index):
        await reconcile_from_event(ns, name, model, logger, model_index, indexes)


async def reconcile_from_event(namespace: str, name: str, model: dict[str, Any], logger: logging.Logger,
                               model_index: kopf.Index, indexes: Indexes) -> None:
    """`reconcile` for an event of a model's Job, Deployment, EndpointSlice or a Node. kopf never
    retries an event handler (the error "is logged and then ignored"): a retryable error (storage
    unavailable) here schedules another reconcile of the model after its delay, of the model as it
    is then."""
    try:
        await reconcile(namespace, name, model, logger, indexes)
    except kopf.TemporaryError as error:
        logger.warning("reconciling %s/%s again in %ss: %s", namespace, name, error.delay, error)

        async def again() -> None:
            for current in list(model_index.get((namespace, name), [])):
                await reconcile_from_event(namespace, name, current, logger, model_index, indexes)

        state().retry_later(namespace, name, error.delay or 30, again)


def indexed_models(model_index: kopf.Index) -> list[tuple[str, str, dict[str, Any]]]:
    """(namespace, name, model) of every indexed model, copied first: kopf updates the index while a
    handler awaits, and iterating a live store then fails with 'dictionary changed size'."""
    return [(ns, name, model) for (ns, name), store in list(model_index.items()) for model in list(store)]


def _discovery_signature(node: NodeInfo) -> tuple:
    return (node.name, tuple(sorted((k, v) for k, v in node.labels.items() if k.startswith("nvidia.com/") or k == "kubernetes.io/arch")),
            tuple(sorted((k, v) for k, v in node.allocatable.items() if k.startswith("nvidia.com/"))),
            node.taints, node.unschedulable, node.ready)


def _waits_for_slot(model: dict[str, Any]) -> bool:
    return any(t.get("reason") == "WaitingForBuildSlot" for t in latest_status(model).get("targets", []))


# ----------------------------------------------------------------------------- reconcile


def latest_status(model: dict[str, Any]) -> dict[str, Any]:
    """The model's status as this process last wrote it, or as the watch last delivered it."""
    return state().written_status.get(model["metadata"].get("uid")) or model.get("status") or {}


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


async def reconcile(namespace: str, name: str, model: dict[str, Any], logger: logging.Logger,
                    indexes: Indexes) -> None:
    operator = state()
    async with operator.lock(namespace, name):
        if model["metadata"].get("uid") in operator.deleted:
            return
        observation = await observe_and_act(operator, namespace, name, model, logger, indexes)
        previous = latest_status(model)
        status = compute_status(observation, previous.get("conditions", []), _now())
        _post_transitions(model, previous, status)
        if _differs(previous, status):
            await asyncio.to_thread(operator.kube.patch_status, namespace, name, status)
            operator.written_status[model["metadata"]["uid"]] = status
    if observation.retry_seconds:  # what is missing may appear (an upload, a Secret): look again, status written
        raise kopf.TemporaryError(observation.invalid_message, delay=observation.retry_seconds)


def _differs(previous: dict[str, Any], status: dict[str, Any]) -> bool:
    return any(previous.get(k) != v for k, v in status.items())


def _post_transitions(model: dict[str, Any], previous: dict[str, Any], status: dict[str, Any]) -> None:
    """An Event for each condition that changed and each target whose state changed."""
    before = {c["type"]: c for c in previous.get("conditions", [])}
    ref = model
    for c in status["conditions"]:
        if c["type"] in KSTATUS_CONDITIONS:  # they restate the others for kstatus; an Event each would repeat them
            continue
        old = before.get(c["type"])
        if old is None or old.get("status") != c["status"] or old.get("reason") != c["reason"]:
            kind = "Normal" if c["status"] == "True" or c["reason"] in PROGRESS_REASONS else "Warning"
            kopf.event(ref, type=kind, reason=c["reason"], message=f"{c['type']}={c['status']}: {c['message']}")
    old_targets = {t.get("engineKey"): t.get("state") for t in previous.get("targets", [])}
    for target in status.get("targets", []):
        if old_targets.get(target.get("engineKey")) != target.get("state"):
            kind = "Warning" if target.get("state") == "Failed" else "Normal"
            kopf.event(ref, type=kind, reason=f"Engine{target.get('state')}",
                       message=f"{target.get('gpuProduct') or 'cpu'} ({target.get('computeCapability') or '-'}): "
                               f"engine {target.get('engineKey')} {target.get('state')}"
                               + (f" - {target.get('reason')}: {target.get('message')}" if target.get("reason") else ""))


async def observe_and_act(operator: Operator, namespace: str, name: str, model: dict[str, Any],
                          logger: logging.Logger, indexes: Indexes) -> Observation:
    settings = operator.settings
    generation = model["metadata"].get("generation", 1)
    name_problem = rendering.model_name_problem(name)
    if name_problem:
        return Observation(generation, valid=False, invalid_reason="InvalidName", invalid_message=name_problem)
    try:
        spec = parse_spec(model.get("spec"))
    except InvalidSpec as error:
        return Observation(generation, valid=False, invalid_reason="InvalidSpec", invalid_message=str(error))
    storage = rendering.storage_uri(spec, settings)
    if not storage:
        return Observation(generation, valid=False, invalid_reason="NoStorage",
                           invalid_message="spec.storage.uri is unset and the operator has no default storage")
    if spec.build.backend not in ("auto", settings.builder_backend):
        return Observation(generation, valid=False, invalid_reason="BackendUnavailable",
                           invalid_message=f"build.backend {spec.build.backend} requested, but the builder image "
                                           f"{settings.builder_image} builds with {settings.builder_backend}")

    discovery = discover_targets(indexes.nodes.get(NODES, []), spec, settings)
    endpoint = spec.storage.endpoint or settings.s3_endpoint
    try:
        credentials = await _credentials(operator, namespace, spec)
        source_sha = spec.model.sha256 or await asyncio.to_thread(
            operator.catalog.sha256_of, spec.model.uri, endpoint, credentials)
        calibration_sha = None
        if effective_quantization(spec.build) == "calibrated":
            calibration_sha = await asyncio.to_thread(
                operator.catalog.sha256_of, spec.build.calibration.uri, endpoint, credentials)
    except (SourceNotFound, SecretNotFound) as error:  # the spec names what is not there (yet): the user's to fix
        return Observation(generation, valid=False, invalid_reason=type(error).__name__, invalid_message=str(error),
                           retry_seconds=MISSING_OBJECT_RETRY_SECONDS)
    except CatalogError as error:
        raise kopf.TemporaryError(f"cannot read the model from storage: {error}", delay=30) from None

    observation = Observation(generation, unmatched=discovery.unmatched,
                              endpoint=f"{rendering.service_name(name)}.{namespace}.svc:{rendering.HTTP_PORT}",
                              routed_pods=indexes.routed_pods(namespace, name))
    plans: list[tuple[Target, str, Manifest | None]] = []

    def key_for(target: Target) -> str:
        return engine_key(source_sha256=source_sha, build=spec.build, inputs=spec.model.inputs,
                          backend=settings.builder_backend, backend_version=settings.builder_backend_version,
                          target=target.engine_target(simulated=settings.simulated_gpus),
                          calibration_sha256=calibration_sha)

    for target in discovery.targets:
        unbuildable = hardware_compatibility_problem(spec, target, settings.builder_backend)
        if unbuildable:
            observation.targets.append(TargetObservation(target.slug, {
                "gpuProduct": target.gpu_product, "computeCapability": target.compute_capability, "state": "Failed",
                "reason": "HardwareCompatibilityUnsupported", "message": unbuildable}))
            plans.append((target, "", None))
            continue
        key = key_for(target)
        record: dict[str, Any] = {"gpuProduct": target.gpu_product, "computeCapability": target.compute_capability,
                                  "engineKey": key, "engineUri": manifest_uri(storage, key),
                                  "backend": settings.builder_backend,
                                  "backendVersion": settings.builder_backend_version}
        try:
            manifest = await asyncio.to_thread(operator.catalog.find_manifest, storage, key, endpoint, credentials)
        except CatalogError as error:
            raise kopf.TemporaryError(str(error), delay=30) from None
        job_name = rendering.job_name(key)
        job = next(iter(indexes.build_jobs.get((namespace, job_name), [])), None)
        if manifest is not None:
            _record_engine(record, manifest, spec)
            if job:
                record["jobName"] = job_name
        elif job is not None:
            record["jobName"] = job_name
            if job["finished"] is None:
                record["state"] = "Building"
            else:
                result = await asyncio.to_thread(operator.kube.job_termination, namespace, job_name)
                record["state"] = "Failed"
                if job["finished"] == "Complete":
                    record["reason"] = "ManifestMissing"
                    record["message"] = result.get("message") or "the build Job completed but published no manifest"
                else:
                    record["reason"] = result.get("reason") or job["failureReason"] or "BuildFailed"
                    record["message"] = result.get("message") or job["failureMessage"] or "the build Job failed"
        else:
            record.update(await _launch_build(operator, namespace, name, model, spec, target, key,
                                              indexes.build_jobs, logger))
        plans.append((target, key, manifest if record.get("state") == "Built" else None))
        observation.targets.append(TargetObservation(target.slug, {k: v for k, v in record.items() if v is not None}))

    deployments = {d["target"]: d for d in indexes.serving.get((namespace, name), [])}
    all_built = bool(plans) and all(m is not None for _, _, m in plans)
    applied: set[str] = set()
    if all_built:
        applied = await _roll_out(operator, namespace, name, model, spec, plans, deployments,
                                  discovery.still_present, logger)
    for obs, (target, key, _) in zip(observation.targets, plans):
        deployment = deployments.get(target.slug)
        obs.serving_wanted = spec.serving.replicas
        if deployment is not None:
            obs.serving_ready = deployment["readyReplicas"]
            # one this reconcile applied has not begun to roll out: the index still shows it as it was
            obs.serving_current = (target.slug not in applied and deployment["key"] == key
                                   and deployment["rolledOut"])
            if obs.serving_current and obs.record.get("state") == "Built" and obs.serving_ready > 0:
                obs.record["state"] = "Serving"
    _observe_kept(observation, discovery, deployments, key_for, name, namespace, spec, storage, settings)
    return observation


def _observe_kept(observation: Observation, discovery: Discovery, deployments: dict[str, dict[str, Any]],
                  key_for: Callable[[Target], str], name: str, namespace: str, spec: InferenceModelSpec,
                  storage: str, settings: OperatorSettings) -> None:
    """The GPU types whose nodes take no new pods (cordoned, NotReady): no build or rollout there.
    One whose Deployment runs its current engine and pod template still serves the model, and
    counts as a target doing so; one whose Deployment is older serves the model as it was
    (`stale_serving`: not Ready); one without a Deployment cannot serve (`unmatched`)."""
    targets = {t.slug for t in discovery.targets}
    for kept in discovery.present:
        if kept.slug in targets:
            continue
        deployment = deployments.get(kept.slug)
        if deployment is None:
            observation.unmatched.append(f"the nodes of {kept.gpu_product or kept.slug} take no new pods "
                                         "(cordoned or not Ready)")
            continue
        key = key_for(kept)
        wanted = rendering.render_deployment(name=name, namespace=namespace, spec=spec, target=kept, key=key,
                                             manifest_uri=manifest_uri(storage, key), settings=settings)
        if not _runs_as_rendered(deployment, wanted):
            observation.stale_serving.append(deployment["name"])
            continue
        ready = deployment["readyReplicas"]
        observation.targets.append(TargetObservation(kept.slug, {
            "gpuProduct": kept.gpu_product, "computeCapability": kept.compute_capability, "engineKey": key,
            "engineUri": manifest_uri(storage, key), "state": "Serving" if ready > 0 else "Built",
            "reason": "NodesTakeNoNewPods",
            "message": "its nodes are cordoned or not Ready: its Deployment serves on, and is updated once they take pods"},
            serving_wanted=spec.serving.replicas, serving_ready=ready, serving_current=deployment["rolledOut"]))


async def _launch_build(operator: Operator, namespace: str, name: str, model: dict[str, Any],
                        spec: InferenceModelSpec, target: Target, key: str, build_job_index: kopf.Index,
                        logger: logging.Logger) -> dict[str, Any]:
    """Launch the build Job for `key` if a build slot is free; the target's state either way."""
    settings = operator.settings
    job_name = rendering.job_name(key)
    async with operator.build_slots:
        running = operator.running_builds(build_job_index, time.monotonic())
        if running >= settings.build_concurrency:
            return {"state": "Pending", "reason": "WaitingForBuildSlot",
                    "message": f"{running} builds running (limit {settings.build_concurrency})"}
        body = rendering.render_build_job(name=name, namespace=namespace, spec=spec, target=target, key=key,
                                          settings=settings)
        kopf.adopt(body, owner=model)
        if await asyncio.to_thread(operator.kube.create_job, body):
            operator.launched[(namespace, job_name)] = time.monotonic()
            logger.info("build Job %s launched for %s (engine %s)", job_name, target.slug, key)
    return {"state": "Building", "jobName": job_name}


class SecretNotFound(Exception):
    """The Secret the spec (or the operator's settings) names for storage credentials does not exist."""


def _record_engine(record: dict[str, Any], manifest: Manifest, spec: InferenceModelSpec) -> None:
    engine = manifest.artifact("engine")
    record.update(state="Built", sha256=engine.sha256, backend=manifest.backend, backendVersion=manifest.backend_version)
    if manifest.accuracy:
        record["accuracy"] = {"cosine": manifest.accuracy.cosine, "maxAbsError": manifest.accuracy.max_abs_error}
        if manifest.accuracy.relative_rms_error is not None:
            record["accuracy"]["relativeRmsError"] = manifest.accuracy.relative_rms_error
        failure = gate_failure(manifest.accuracy, spec.build.accuracy)
        if failure:  # built under another model's gate (models share engines by key)
            record.update(state="Failed", reason="AccuracyGateFailed",
                          message=f"engine {manifest.key} fails this model's accuracy gate: {failure}")
    if manifest.benchmark:
        b1 = manifest.benchmark.batch1
        record["latency"] = {"p50Ms": b1.p50_ms, "p95Ms": b1.p95_ms, "p99Ms": b1.p99_ms}
        best = manifest.benchmark.max_batch or b1
        record["throughput"] = best.throughput


async def _credentials(operator: Operator, namespace: str, spec: InferenceModelSpec) -> Credentials:
    secret = spec.storage.secret_ref.name if spec.storage.secret_ref else operator.settings.storage_secret
    if not secret:
        return Credentials()
    try:
        data = await asyncio.to_thread(operator.kube.secret_data, namespace, secret)
    except ApiException as error:
        if error.status == 404:
            raise SecretNotFound(f"Secret {namespace}/{secret} (the storage credentials) does not exist") from None
        raise kopf.TemporaryError(f"cannot read Secret {namespace}/{secret}: {error.reason}", delay=30) from None
    return Credentials(data.get("AWS_ACCESS_KEY_ID"), data.get("AWS_SECRET_ACCESS_KEY"), data.get("AWS_DEFAULT_REGION"))


async def _roll_out(operator: Operator, namespace: str, name: str, model: dict[str, Any], spec: InferenceModelSpec,
                    plans: list[tuple[Target, str, Manifest | None]], deployments: dict[str, dict[str, Any]],
                    still_present: frozenset[str], logger: logging.Logger) -> set[str]:
    """Every target has a verified engine: make the Deployments and the Service say so; the targets
    whose Deployment was applied. Deployments already running the right engine with the right
    settings are left alone. A Deployment whose GPU type is no longer a target is deleted, unless
    that type still has nodes which new pods cannot use now (cordoned, NotReady): Kubernetes leaves
    the pods running there, and so does the operator."""
    settings = operator.settings
    storage = rendering.storage_uri(spec, settings)
    applied: set[str] = set()
    for target, key, _ in plans:
        body = rendering.render_deployment(name=name, namespace=namespace, spec=spec, target=target, key=key,
                                           manifest_uri=manifest_uri(storage, key), settings=settings)
        current = deployments.get(target.slug)
        if current and _runs_as_rendered(current, body):
            continue
        body["metadata"]["annotations"][SPEC_HASH_ANNOTATION] = _spec_hash(body)
        kopf.adopt(body, owner=model)
        await asyncio.to_thread(operator.kube.apply, body)
        applied.add(target.slug)
        logger.info("Deployment %s applied (engine %s)", body["metadata"]["name"], key)
    service = rendering.render_service(name=name, namespace=namespace)
    kopf.adopt(service, owner=model)
    if not deployments:
        await asyncio.to_thread(operator.kube.apply, service)
    wanted = {t.slug for t, _, _ in plans}
    for slug, deployment in deployments.items():
        if slug in wanted:
            continue
        if slug in still_present:
            logger.info("Deployment %s kept: its GPU type's nodes take no new pods now (cordoned or not Ready)",
                        deployment["name"])
            continue
        logger.info("Deployment %s removed: its GPU type is no longer a target", deployment["name"])
        await asyncio.to_thread(operator.kube.delete_deployment, namespace, deployment["name"])
    return applied


def _spec_hash(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body["spec"], sort_keys=True).encode()).hexdigest()[:16]


def _runs_as_rendered(deployment: dict[str, Any], body: dict[str, Any]) -> bool:
    """Whether an indexed Deployment was applied from this rendering: the spec hash covers the pod
    template, whose annotations name the engine key and manifest."""
    return deployment.get("specHash") == _spec_hash(body)
