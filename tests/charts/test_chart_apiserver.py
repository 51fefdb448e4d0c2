"""The chart's objects on a real kube-apiserver (v1.20.2): server-side dry-run accepts every render,
and the RBAC it installs lets the operator's ServiceAccount do what it needs and nothing more."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import yaml

NON_DEFAULT = [
    {},
    {"replicaCount": 2},
    {"replicaCount": 3, "watchNamespaces": ["chart-team-a", "chart-team-b"]},
    {"rbac": {"secretNamespaces": ["chart-team-a"]}, "migStrategy": "mixed",
     "storage": {"uri": "s3://engines/a", "endpoint": "http://minio:9000", "secretName": "s3"},
     "images": {"builderImages": {"10.3.0": "plansmith/builder:0.1.0-trt10.3"}},
     "tolerations": [{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}]},
    {"rbac": {"clusterWideSecrets": True}, "serviceAccount": {"create": False, "name": "default"}},
]


def kubectl(plane, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([str(plane.kubectl), f"--kubeconfig={plane.kubeconfig}", *args],
                            input=input, capture_output=True, text=True, timeout=120)
    if check:
        assert result.returncode == 0, f"kubectl {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def ensure_namespace(plane, name: str) -> None:
    if kubectl(plane, "get", "namespace", name, check=False).returncode != 0:
        kubectl(plane, "create", "namespace", name)


@pytest.fixture(scope="module")
def kopf_peering_crds(control_plane, chart_dir: Path):
    """The kopf peering CRDs from the chart's crds/, installed for real (peering objects need them).
    The InferenceModel CRD is only dry-run here: tests/plansmith installs it for real."""
    kubectl(control_plane, "apply", "-f", str(chart_dir / "crds" / "kopf-peering.yaml"))
    kubectl(control_plane, "wait", "--for=condition=established", "--timeout=60s",
            "crd/clusterkopfpeerings.kopf.dev", "crd/kopfpeerings.kopf.dev")
    for namespace in ("plansmith-system", "chart-team-a", "chart-team-b"):
        ensure_namespace(control_plane, namespace)
    deadline = time.monotonic() + 30  # discovery may lag behind Established
    while kubectl(control_plane, "get", "clusterkopfpeerings", check=False).returncode != 0:
        assert time.monotonic() < deadline, "kopf.dev resources never appeared in discovery"
        time.sleep(0.5)


@pytest.mark.parametrize("values", NON_DEFAULT, ids=lambda v: ",".join(v) or "defaults")
def test_server_side_dry_run_accepts_the_render(control_plane, kopf_peering_crds, run_helm, values):
    rendered = run_helm("template", values, "--namespace", "plansmith-system", "--include-crds")
    assert rendered.returncode == 0, rendered.stderr
    result = kubectl(control_plane, "apply", "--dry-run=server", "-f", "-", input=rendered.stdout)
    documents = [d for d in yaml.safe_load_all(rendered.stdout) if d]
    # one line per object ("... created (server dry run)" or "... configured (server dry run)")
    assert result.stdout.count("(server dry run)") == len(documents), result.stdout


def test_server_side_dry_run_rejects_a_broken_object(control_plane, kopf_peering_crds, run_helm):
    """The dry-run really validates: the same render with an impossible field value is refused."""
    rendered = run_helm("template", None, "--namespace", "plansmith-system")
    broken = rendered.stdout.replace("type: Recreate", "type: Sideways")
    result = kubectl(control_plane, "apply", "--dry-run=server", "-f", "-", input=broken, check=False)
    assert result.returncode != 0
    assert "Sideways" in result.stderr


@pytest.fixture(scope="module")
def installed_rbac(control_plane, kopf_peering_crds, run_helm):
    """The default render's ServiceAccount, roles and bindings, created for real in their own namespace."""
    namespace = "chart-rbac"
    ensure_namespace(control_plane, namespace)
    ensure_namespace(control_plane, "chart-other")
    rendered = run_helm("template", {"rbac": {"secretNamespaces": ["chart-team-a"]}}, "--namespace", namespace)
    assert rendered.returncode == 0, rendered.stderr
    documents = [d for d in yaml.safe_load_all(rendered.stdout) if d and d["kind"] != "Deployment"]
    for document in documents:  # cluster-scoped names must not clash with the dry-run tests' release
        if document["kind"] in ("ClusterRole", "ClusterRoleBinding"):
            document["metadata"]["name"] = "chart-rbac-plansmith"
        if document["kind"] == "ClusterRoleBinding":
            document["roleRef"]["name"] = "chart-rbac-plansmith"
    kubectl(control_plane, "apply", "-f", "-", input=yaml.safe_dump_all(documents))
    return f"system:serviceaccount:{namespace}:plansmith"


# (verb, apiGroup, resource[/subresource], namespace or None for cluster-wide)
ALLOWED = [
    ("list", "plansmith.io", "inferencemodels", None),
    ("update", "plansmith.io", "inferencemodels", "anywhere"),
    ("patch", "plansmith.io", "inferencemodels/status", "anywhere"),
    ("create", "batch", "jobs", "anywhere"),
    ("delete", "apps", "deployments", "anywhere"),
    ("create", "", "services", "anywhere"),
    ("watch", "discovery.k8s.io", "endpointslices", None),
    ("get", "", "pods/log", "anywhere"),
    ("watch", "", "nodes", None),
    ("create", "", "events", "anywhere"),
    ("list", "apiextensions.k8s.io", "customresourcedefinitions", None),
    ("watch", "", "namespaces", None),
    ("get", "", "secrets", "chart-rbac"),
    ("get", "", "secrets", "chart-team-a"),
]
DENIED = [
    ("delete", "plansmith.io", "inferencemodels", "anywhere"),
    ("create", "plansmith.io", "inferencemodels", "anywhere"),
    ("create", "", "pods", "anywhere"),
    ("delete", "", "services", "anywhere"),
    ("create", "discovery.k8s.io", "endpointslices", "anywhere"),  # read only: the control plane writes them
    ("update", "apps", "deployments", "anywhere"),
    ("get", "", "secrets", "chart-other"),
    ("list", "", "secrets", "chart-rbac"),
    ("get", "", "configmaps", "chart-rbac"),  # settings come from the environment, not ConfigMaps
    ("patch", "", "events", "anywhere"),  # Events are created, never updated
    ("patch", "", "nodes", None),
    ("create", "rbac.authorization.k8s.io", "clusterroles", None),
    ("patch", "kopf.dev", "clusterkopfpeerings", None),  # peering is off with one replica
    ("create", "", "pods/exec", "anywhere"),
]


def allowed(kube_client, account: str, verb: str, group: str, resource: str, namespace: str | None) -> bool:
    """Ask the API server's authorizer (SubjectAccessReview) whether the ServiceAccount may do this."""
    from kubernetes import client

    name, _, subresource = resource.partition("/")
    namespace_of_account = account.split(":")[2]
    review = client.AuthorizationV1Api(kube_client).create_subject_access_review({
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": {
            "user": account,
            "groups": ["system:serviceaccounts", f"system:serviceaccounts:{namespace_of_account}", "system:authenticated"],
            "resourceAttributes": {"verb": verb, "group": group, "resource": name, "subresource": subresource,
                                   "namespace": namespace or ""},
        },
    })
    return review.status.allowed


@pytest.mark.parametrize("verb,group,resource,namespace", ALLOWED, ids=[f"{v} {r} {n}" for v, _, r, n in ALLOWED])
def test_operator_account_may(kube_client, installed_rbac, verb, group, resource, namespace):
    assert allowed(kube_client, installed_rbac, verb, group, resource, namespace)


@pytest.mark.parametrize("verb,group,resource,namespace", DENIED, ids=[f"{v} {r} {n}" for v, _, r, n in DENIED])
def test_operator_account_may_not(kube_client, installed_rbac, verb, group, resource, namespace):
    assert not allowed(kube_client, installed_rbac, verb, group, resource, namespace)
