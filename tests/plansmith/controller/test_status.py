"""Status from observations: conditions, phase, counts, transition times."""

from __future__ import annotations

import pytest

from plansmith.controller.status import Observation, TargetObservation, compute_status, rollout_complete


def target(state, slug="sm90", **record):
    return TargetObservation(slug, {"state": state, "engineKey": slug, **record})


def conditions(status):
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def test_invalid_spec_fails_everything_with_the_message():
    status = compute_status(Observation(3, valid=False, invalid_reason="InvalidSpec", invalid_message="spec.x: bad"), [], "T1")
    assert status["phase"] == "Failed" and status["observedGeneration"] == 3
    assert conditions(status)["Valid"] == ("False", "InvalidSpec")
    assert next(c for c in status["conditions"] if c["type"] == "Valid")["message"] == "spec.x: bad"


def test_building_then_deploying_then_ready():
    building = compute_status(Observation(1, targets=[target("Building"), target("Built", "sm80")]), [], "T1")
    assert building["phase"] == "Building" and building["enginesReady"] == 1 and building["targetCount"] == 2
    assert conditions(building)["EnginesReady"] == ("False", "Building")

    built = [target("Built", "sm90", ), target("Built", "sm80")]
    for t in built:
        t.serving_wanted, t.serving_ready, t.serving_current = 2, 0, True
    deploying = compute_status(Observation(1, targets=built), building["conditions"], "T2")
    assert deploying["phase"] == "Deploying"
    assert conditions(deploying)["EnginesReady"] == ("True", "EnginesVerified")
    assert conditions(deploying)["ServingReady"] == ("False", "RollingOut")
    assert next(c for c in deploying["conditions"] if c["type"] == "ServingReady")["message"] == (
        "0/4 serving replicas ready on the current spec; rolling out sm90, sm80")

    for t in built:
        t.serving_ready = 2
    unrouted = compute_status(Observation(1, targets=built, endpoint="m.ns.svc:8000", routed_pods=3),
                              deploying["conditions"], "T3")
    assert unrouted["phase"] == "Deploying" and conditions(unrouted)["Ready"] == ("False", "WaitingForEndpoints")
    assert next(c for c in unrouted["conditions"] if c["type"] == "ServingReady")["message"] == (
        "4/4 serving replicas ready; the Service routes to 3 pods")
    ready = compute_status(Observation(1, targets=built, endpoint="m.ns.svc:8000", routed_pods=4),
                           unrouted["conditions"], "T3")
    assert ready["phase"] == "Ready" and conditions(ready)["Ready"] == ("True", "Serving")
    assert ready["serving"] == {"endpoint": "m.ns.svc:8000", "replicas": 4, "readyReplicas": 4}
    engines = next(c for c in ready["conditions"] if c["type"] == "EnginesReady")
    assert engines["lastTransitionTime"] == "T2"  # unchanged since it turned True


def test_old_pods_do_not_count_as_serving_the_new_engine():
    t = target("Built")
    t.serving_wanted, t.serving_ready, t.serving_current = 1, 1, False
    status = compute_status(Observation(2, targets=[t]), [], "T")
    assert conditions(status)["ServingReady"] == ("False", "RollingOut")


def test_a_failed_target_names_the_builder_reason():
    status = compute_status(Observation(1, targets=[target("Failed", reason="AccuracyGateFailed", message="cosine 0.2")]), [], "T")
    assert status["phase"] == "Failed"
    assert conditions(status)["EnginesReady"] == ("False", "AccuracyGateFailed")
    assert conditions(status)["Ready"] == ("False", "AccuracyGateFailed")


def test_no_matching_nodes_is_a_condition_not_a_crash():
    status = compute_status(Observation(1, unmatched=["no schedulable node with gpuProduct=NVIDIA-L4"]), [], "T")
    assert conditions(status)["EnginesReady"] == ("False", "NoMatchingNodes")
    assert status["phase"] == "Pending"


def kstatus(status: dict) -> str:
    """What sigs.k8s.io/cli-utils' kstatus computes for a custom resource from its generic properties
    (status.go: checkGenericProperties), observedGeneration equal to the generation here."""
    found = conditions(status)
    if found.get("Reconciling", ("False",))[0] == "True":
        return "InProgress"
    if found.get("Stalled", ("False",))[0] == "True":
        return "Failed"
    return "Current"


def test_kstatus_reads_building_as_in_progress_failures_as_failed_and_serving_as_current():
    built = target("Built")
    built.serving_wanted, built.serving_ready, built.serving_current = 1, 1, True
    cases = {
        "invalid": Observation(1, valid=False, invalid_reason="SourceNotFound", invalid_message="s3://m/x.onnx does not exist"),
        "building": Observation(1, targets=[target("Building")]),
        "accuracy gate failed": Observation(1, targets=[target("Failed", reason="AccuracyGateFailed", message="cosine 0.2")]),
        "no nodes": Observation(1, unmatched=["no schedulable node with gpuProduct=NVIDIA-L4"]),
        "rolling out": Observation(1, targets=[target("Built")]),
        "not routed yet": Observation(1, targets=[built], endpoint="m.ns.svc:8000"),
        "serving": Observation(1, targets=[built], endpoint="m.ns.svc:8000", routed_pods=1),
    }
    seen = {name: kstatus(compute_status(obs, [], "T")) for name, obs in cases.items()}
    assert seen == {"invalid": "Failed", "building": "InProgress", "accuracy gate failed": "Failed",
                    "no nodes": "Failed", "rolling out": "InProgress", "not routed yet": "InProgress",
                    "serving": "Current"}
    stalled = compute_status(cases["accuracy gate failed"], [], "T")
    assert conditions(stalled)["Stalled"] == ("True", "AccuracyGateFailed")
    assert all(c["observedGeneration"] == 1 for c in stalled["conditions"])


@pytest.mark.parametrize("generation, wanted, status, complete", [
    (4, 1, {"observedGeneration": 4, "replicas": 1, "updatedReplicas": 1, "availableReplicas": 1}, True),
    (4, 0, {"observedGeneration": 4}, True),  # scaled to zero
    (5, 1, {"observedGeneration": 4, "replicas": 1, "updatedReplicas": 1, "availableReplicas": 1}, False),
    # the surge pod with the new template cannot be scheduled; the old one still serves the old spec
    (4, 1, {"observedGeneration": 4, "replicas": 2, "updatedReplicas": 1, "availableReplicas": 1}, False),
    # the new pod runs but is not available yet
    (4, 1, {"observedGeneration": 4, "replicas": 1, "updatedReplicas": 1, "availableReplicas": 0}, False),
    (4, 2, {"observedGeneration": 4, "replicas": 2, "updatedReplicas": 1, "availableReplicas": 2}, False),
])
def test_a_rollout_is_complete_as_kubectl_rollout_status_says(generation, wanted, status, complete):
    assert rollout_complete(generation, wanted, status) is complete


def test_a_deployment_kept_on_unavailable_nodes_with_an_older_engine_is_not_ready():
    built = target("Built")
    built.serving_wanted, built.serving_ready, built.serving_current = 1, 1, True
    status = compute_status(Observation(2, targets=[built], stale_serving=["m-sm90-nvidia-h100"]), [], "T")
    assert conditions(status)["ServingReady"] == ("False", "StaleServing")
    assert conditions(status)["Ready"] == ("False", "StaleServing") and kstatus(status) == "InProgress"
    assert "m-sm90-nvidia-h100 still serve an older engine" in next(
        c["message"] for c in status["conditions"] if c["type"] == "ServingReady")
