"""Status of an InferenceModel from what was observed: conditions in metav1.Condition shape, phase, counts.

Pure: `compute_status(observation, previous_conditions, now)`; a condition's lastTransitionTime
changes only when its status does, so re-reconciling an unchanged model writes nothing new.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TargetObservation:
    """What is known of one target's engine and serving pods."""

    slug: str
    record: dict[str, Any]  # the status.targets[] entry (camelCase), state included
    serving_wanted: int = 0
    serving_ready: int = 0
    serving_current: bool = False  # the Deployment runs this target's current engine key


@dataclass
class Observation:
    generation: int
    valid: bool = True
    invalid_reason: str = ""
    invalid_message: str = ""
    targets: list[TargetObservation] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)
    endpoint: str | None = None
    # serving pods the model's Service routes to: ready endpoints of its EndpointSlices
    routed_pods: int = 0
    # Deployments kept on nodes that take no new pods (cordoned, NotReady) serving an older engine
    stale_serving: list[str] = field(default_factory=list)
    retry_seconds: float | None = None  # look again after this long (a missing object may appear)


def rollout_complete(generation: int, wanted_replicas: int, status: dict[str, Any]) -> bool:
    """Whether a Deployment runs its current pod template everywhere, as `kubectl rollout status`
    decides: the controller saw the latest spec, every wanted replica has the new template and is
    available, and no pod of an older template is left. Counting the new template's pods alone is
    not enough: a surge pod that cannot be scheduled (no room on the node) has it too, while the old
    pod goes on serving the old spec."""
    updated = status.get("updatedReplicas", 0) or 0
    return (status.get("observedGeneration", 0) >= generation and updated >= wanted_replicas
            and (status.get("replicas", 0) or 0) <= updated and (status.get("availableReplicas", 0) or 0) >= updated)


def condition(type_: str, ok: bool, reason: str, message: str, generation: int,
              previous: dict[str, dict[str, Any]], now: str) -> dict[str, Any]:
    status = "True" if ok else "False"
    before = previous.get(type_)
    changed = before is None or before.get("status") != status
    return {"type": type_, "status": status, "reason": reason, "message": message or reason,
            "lastTransitionTime": now if changed else before.get("lastTransitionTime", now),
            "observedGeneration": generation}


def compute_status(obs: Observation, previous_conditions: list[dict[str, Any]], now: str) -> dict[str, Any]:
    previous = {c.get("type"): c for c in previous_conditions or []}
    gen = obs.generation
    cond = lambda t, ok, reason, message: condition(t, ok, reason, message, gen, previous, now)  # noqa: E731

    if not obs.valid:
        conditions = [
            cond("Valid", False, obs.invalid_reason or "InvalidSpec", obs.invalid_message),
            cond("EnginesReady", False, "InvalidSpec", "the spec is invalid; nothing was built"),
            cond("ServingReady", False, "InvalidSpec", "the spec is invalid; nothing was deployed"),
            cond("Ready", False, obs.invalid_reason or "InvalidSpec", obs.invalid_message),
            cond("Reconciling", False, "Stalled", "nothing to do until the spec changes"),
            cond("Stalled", True, obs.invalid_reason or "InvalidSpec", obs.invalid_message),
        ]
        return {"observedGeneration": gen, "phase": "Failed", "conditions": conditions,
                "targetCount": 0, "enginesReady": 0, "targets": []}

    states = [t.record.get("state") for t in obs.targets]
    built = [t for t in obs.targets if t.record.get("state") in ("Built", "Serving")]
    failed = [t for t in obs.targets if t.record.get("state") == "Failed"]
    total = len(obs.targets)

    if not obs.targets:
        engines = cond("EnginesReady", False, "NoMatchingNodes", "; ".join(obs.unmatched) or "no target GPU type")
    elif failed:
        first = failed[0].record
        engines = cond("EnginesReady", False, first.get("reason") or "BuildFailed",
                       f"{first.get('gpuProduct') or failed[0].slug}: {first.get('message') or first.get('reason')}")
    elif len(built) < total:
        engines = cond("EnginesReady", False, "Building", f"{len(built)}/{total} engines ready")
    elif obs.unmatched:
        engines = cond("EnginesReady", False, "NoMatchingNodes", "; ".join(obs.unmatched))
    else:
        engines = cond("EnginesReady", True, "EnginesVerified", f"{total}/{total} engines built and verified")

    wanted = sum(t.serving_wanted for t in obs.targets)
    ready = sum(t.serving_ready for t in obs.targets if t.serving_current)
    all_served = bool(obs.targets) and all(t.serving_current and t.serving_ready >= t.serving_wanted for t in obs.targets)
    if all_served and obs.stale_serving:
        serving = cond("ServingReady", False, "StaleServing",
                       f"{', '.join(obs.stale_serving)} still serve an older engine: their nodes take no new pods "
                       "(cordoned or not Ready), and they are updated once the nodes do")
    elif all_served and obs.routed_pods < wanted:
        # a pod that turned ready is listed by the Service's EndpointSlices a moment later; a client
        # told Ready before that would be refused
        serving = cond("ServingReady", False, "WaitingForEndpoints",
                       f"{ready}/{wanted} serving replicas ready; the Service routes to {obs.routed_pods} pods")
    elif all_served:
        serving = cond("ServingReady", True, "ReplicasReady", f"{ready}/{wanted} serving replicas ready")
    elif len(built) < total or not obs.targets:
        serving = cond("ServingReady", False, "WaitingForEngines", "serving starts once every target has an engine")
    else:
        behind = [t.slug for t in obs.targets if not (t.serving_current and t.serving_ready >= t.serving_wanted)]
        serving = cond("ServingReady", False, "RollingOut",
                       f"{ready}/{wanted} serving replicas ready on the current spec; rolling out {', '.join(behind)}")

    ready_ok = engines["status"] == "True" and serving["status"] == "True"
    if ready_ok:
        overall = cond("Ready", True, "Serving", f"serving {total} GPU type(s) at {obs.endpoint}")
    else:
        blocker = engines if engines["status"] != "True" else serving
        overall = cond("Ready", False, blocker["reason"], blocker["message"])
    # kstatus' conditions (sigs.k8s.io/cli-utils), which tools that know nothing of this kind read
    # (kpt, Config Sync, Flux's generic health check): without them a model counts as Current
    # whatever it is doing. Stalled: it cannot get on without a change (a failed build, no node).
    stalled = bool(failed) or engines["reason"] == "NoMatchingNodes"
    if stalled:
        reconciling = cond("Reconciling", False, "Stalled", engines["message"])
    elif ready_ok:
        reconciling = cond("Reconciling", False, "Serving", overall["message"])
    else:
        reconciling = cond("Reconciling", True, overall["reason"], overall["message"])
    stalled_condition = cond("Stalled", stalled, engines["reason"] if stalled else "Progressing",
                             engines["message"] if stalled else "nothing blocks the model")

    if failed:
        phase = "Failed"
    elif ready_ok:
        phase = "Ready"
    elif len(built) == total and obs.targets:
        phase = "Deploying"
    elif "Building" in states:
        phase = "Building"
    else:
        phase = "Pending"
    return {
        "observedGeneration": gen,
        "phase": phase,
        "conditions": [cond("Valid", True, "SpecValid", "the spec is valid"), engines, serving, overall, reconciling,
                       stalled_condition],
        "targetCount": total,
        "enginesReady": len(built),
        "targets": [t.record for t in obs.targets],
        "serving": {"endpoint": obs.endpoint, "replicas": wanted, "readyReplicas": ready},
    }
