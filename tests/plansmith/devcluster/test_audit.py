"""plansmith.devcluster.audit: audit events become allowed and refused calls; roles become grants."""

from __future__ import annotations

import json

from plansmith.devcluster.audit import Call, api_calls, denied_calls, rbac_grants, read_audit_log

USER = "system:serviceaccount:ops:plansmith"


def event(verb, resource, decision, *, group="", subresource=None, namespace=None, user=USER, code=200):
    ref = {"resource": resource, **({"apiGroup": group} if group else {}),
           **({"subresource": subresource} if subresource else {}), **({"namespace": namespace} if namespace else {})}
    return {"verb": verb, "user": {"username": user}, "objectRef": ref, "responseStatus": {"code": code},
            "annotations": {"authorization.k8s.io/decision": decision}}


def test_allowed_and_refused_calls_of_one_user(tmp_path):
    log = tmp_path / "audit.log"
    lines = [
        event("list", "nodes", "allow"),
        event("get", "pods", "allow", subresource="log", namespace="ml"),
        event("delete", "secrets", "forbid", namespace="ml", code=403),
        event("create", "jobs", "allow", group="batch", namespace="ml", user="someone-else"),
        {"verb": "get", "user": {"username": USER}, "requestURI": "/version"},  # no objectRef
    ]
    log.write_text("\n".join(json.dumps(line) for line in lines) + "\n{truncated")
    events = read_audit_log(log)
    assert len(events) == 5
    assert api_calls(events, USER) == {Call("", "nodes", "list", ""), Call("", "pods/log", "get", "ml")}
    assert denied_calls(events, USER) == {Call("", "secrets", "delete", "ml")}
    assert Call("", "pods/log", "get", "ml").rule == ("", "pods/log", "get")


def test_rbac_grants_expand_every_rule():
    role = {"rules": [{"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]}]}
    assert rbac_grants([role, {"rules": None}]) == {
        ("", "events", "create"), ("", "events", "patch"),
        ("events.k8s.io", "events", "create"), ("events.k8s.io", "events", "patch")}
