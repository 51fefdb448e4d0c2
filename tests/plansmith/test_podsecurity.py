"""plansmith.podsecurity: the Pod Security "restricted" checks accept a compliant pod and name each violation."""

from __future__ import annotations

import copy

import pytest

from plansmith.podsecurity import pod_template, restricted_violations

COMPLIANT = {
    "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "seccompProfile": {"type": "RuntimeDefault"}},
    "initContainers": [{"name": "fetch", "image": "x:1", "securityContext": {
        "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}}],
    "containers": [{"name": "main", "image": "x:1", "ports": [{"containerPort": 8000}], "securityContext": {
        "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}}}],
    "volumes": [{"name": "tmp", "emptyDir": {}}, {"name": "creds", "secret": {"secretName": "s3"}},
                {"name": "token", "projected": {"sources": []}}],
}


def mutated(change) -> dict:
    spec = copy.deepcopy(COMPLIANT)
    change(spec)
    return spec


def test_a_compliant_pod_has_no_violations():
    assert restricted_violations(COMPLIANT) == []


def test_seccomp_and_non_root_may_be_set_per_container_instead():
    def per_container(spec):
        del spec["securityContext"]
        for container in spec["containers"] + spec["initContainers"]:
            container["securityContext"].update(runAsNonRoot=True, seccompProfile={"type": "Localhost", "localhostProfile": "p"})
    assert restricted_violations(mutated(per_container)) == []


VIOLATIONS = {
    "host network": (lambda s: s.update(hostNetwork=True), "hostNetwork"),
    "host PID": (lambda s: s.update(hostPID=True), "hostPID"),
    "hostPath volume": (lambda s: s["volumes"].append({"name": "h", "hostPath": {"path": "/"}}), "hostPath"),
    "privileged": (lambda s: s["containers"][0]["securityContext"].update(privileged=True), "privileged"),
    "privilege escalation": (lambda s: s["containers"][0]["securityContext"].pop("allowPrivilegeEscalation"),
                             "allowPrivilegeEscalation"),
    "root user": (lambda s: s["securityContext"].update(runAsUser=0), "runAsUser"),
    "runAsNonRoot off in a container": (lambda s: s["initContainers"][0]["securityContext"].update(runAsNonRoot=False),
                                        "runAsNonRoot"),
    "no runAsNonRoot": (lambda s: s["securityContext"].pop("runAsNonRoot"), "runAsNonRoot"),
    "no seccomp": (lambda s: s["securityContext"].pop("seccompProfile"), "seccompProfile"),
    "unconfined seccomp in a container": (
        lambda s: s["containers"][0]["securityContext"].update(seccompProfile={"type": "Unconfined"}), "seccompProfile"),
    "capabilities not dropped": (lambda s: s["initContainers"][0]["securityContext"].pop("capabilities"), "drop must include ALL"),
    "capability added": (lambda s: s["containers"][0]["securityContext"]["capabilities"].update(add=["SYS_ADMIN"]), "SYS_ADMIN"),
    "host port": (lambda s: s["containers"][0]["ports"][0].update(hostPort=80), "hostPort"),
    "unsafe sysctl": (lambda s: s["securityContext"].update(sysctls=[{"name": "kernel.msgmax", "value": "1"}]), "kernel.msgmax"),
    "unmasked proc": (lambda s: s["containers"][0]["securityContext"].update(procMount="Unmasked"), "procMount"),
    "SELinux user": (lambda s: s["securityContext"].update(seLinuxOptions={"user": "root"}), "seLinuxOptions.user"),
    "ephemeral container": (lambda s: s.update(ephemeralContainers=[{"name": "debug", "image": "busybox:1"}]),
                            "ephemeralContainers[0]"),
}


@pytest.mark.parametrize("change,named", VIOLATIONS.values(), ids=VIOLATIONS.keys())
def test_each_violation_is_reported_by_name(change, named):
    problems = restricted_violations(mutated(change))
    assert problems, "violation not detected"
    assert any(named in problem for problem in problems), problems


def test_apparmor_unconfined_annotation_is_a_violation():
    annotations = {"container.apparmor.security.beta.kubernetes.io/main": "unconfined"}
    assert restricted_violations(COMPLIANT, annotations)
    assert restricted_violations(COMPLIANT, {"container.apparmor.security.beta.kubernetes.io/main": "runtime/default"}) == []


@pytest.mark.parametrize("kind,wrap", [
    ("Pod", lambda spec: {"kind": "Pod", "metadata": {"annotations": {"a": "b"}}, "spec": spec}),
    ("Deployment", lambda spec: {"kind": "Deployment", "spec": {"template": {"metadata": {"annotations": {"a": "b"}}, "spec": spec}}}),
    ("Job", lambda spec: {"kind": "Job", "spec": {"template": {"metadata": {"annotations": {"a": "b"}}, "spec": spec}}}),
    ("CronJob", lambda spec: {"kind": "CronJob", "spec": {"jobTemplate": {"spec": {"template": {
        "metadata": {"annotations": {"a": "b"}}, "spec": spec}}}}}),
])
def test_pod_template_finds_the_pod_spec_of_workloads(kind, wrap):
    assert pod_template(wrap(COMPLIANT)) == (COMPLIANT, {"a": "b"})


def test_pod_template_ignores_objects_without_pods():
    assert pod_template({"kind": "Service", "spec": {}}) is None
