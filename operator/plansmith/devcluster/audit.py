"""What a user did against the API server, read from the control plane's audit log, compared with
what RBAC grants it: the calls an operator really makes versus the rules of its ClusterRole/Roles.

    events = read_audit_log(plane.workdir / "logs" / "audit.log")
    used = api_calls(events, "system:serviceaccount:plansmith-system:plansmith")
    refused = denied_calls(events, "system:serviceaccount:plansmith-system:plansmith")
    unused = rbac_grants(rendered_roles) - {call.rule for call in used}

Pure functions over the JSON lines kube-apiserver writes with the Metadata audit level
(ControlPlane's policy); a Call is (apiGroup, resource[/subresource], verb, namespace).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping


@dataclass(frozen=True, order=True)
class Call:
    group: str
    resource: str  # "pods" or "pods/log"
    verb: str
    namespace: str  # "" for cluster-scoped requests and requests across all namespaces

    @property
    def rule(self) -> tuple[str, str, str]:
        """The (apiGroup, resource, verb) an RBAC rule must grant for this call."""
        return self.group, self.resource, self.verb


def read_audit_log(path: Path) -> list[dict[str, Any]]:
    """Every audit event in the log (one JSON object per line); unreadable lines are skipped."""
    events = []
    for line in Path(path).read_text(errors="replace").splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line being written while we read
    return events


def _call(event: Mapping[str, Any]) -> Call | None:
    ref = event.get("objectRef")
    if not ref or "resource" not in ref:
        return None  # non-resource URLs (/version, /apis discovery)
    resource = ref["resource"] + (f"/{ref['subresource']}" if ref.get("subresource") else "")
    return Call(ref.get("apiGroup", ""), resource, event["verb"], ref.get("namespace", ""))


def _by(events: Iterable[Mapping[str, Any]], username: str) -> Iterable[Mapping[str, Any]]:
    return (e for e in events if e.get("user", {}).get("username") == username)


def api_calls(events: Iterable[Mapping[str, Any]], username: str) -> set[Call]:
    """The resource calls `username` made that the authorizer allowed."""
    return {
        call for event in _by(events, username)
        if event.get("annotations", {}).get("authorization.k8s.io/decision") == "allow"
        and (call := _call(event)) is not None
    }


def denied_calls(events: Iterable[Mapping[str, Any]], username: str) -> set[Call]:
    """The resource calls `username` made that RBAC refused (403)."""
    return {
        call for event in _by(events, username)
        if (event.get("annotations", {}).get("authorization.k8s.io/decision") == "forbid"
            or event.get("responseStatus", {}).get("code") == 403)
        and (call := _call(event)) is not None
    }


def rbac_grants(roles: Iterable[Mapping[str, Any]]) -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) granted by the rules of these ClusterRole/Role objects."""
    return {
        (group, resource, verb)
        for role in roles
        for rule in role.get("rules") or []
        for group in rule.get("apiGroups") or []
        for resource in rule.get("resources") or []
        for verb in rule.get("verbs") or []
    }
