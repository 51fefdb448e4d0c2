"""The Helm chart, rendered by the real helm v4: lint, values schema, RBAC, peering, settings, pod security."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from plansmith.podsecurity import pod_template, restricted_violations

NON_DEFAULT_VALUES: list[dict[str, Any]] = [
    {"replicaCount": 3},
    {"replicaCount": 2, "watchNamespaces": ["team-a", "team-b"], "peering": {"name": "ml-ops"}},
    {
        "watchNamespaces": ["team-a"],
        "rbac": {"secretNamespaces": ["team-a", "team-c"]},
        "storage": {"uri": "s3://engines/cluster-a", "endpoint": "http://minio.minio.svc:9000", "secretName": "s3"},
        "images": {"builderImages": {"10.3.0": "registry.local:5000/plansmith/builder:0.1.0-trt10.3"}},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"}],
        "podAnnotations": {"example.com/team": "ml"},
        "imagePullSecrets": [{"name": "regcred"}],
        "priorityClassName": "system-cluster-critical",
    },
    {"rbac": {"clusterWideSecrets": True, "secretNamespaces": ["team-a"]}, "migStrategy": "mixed"},
    {"serviceAccount": {"create": False, "name": "existing-sa"}, "podSecurityContext": {
        "runAsNonRoot": True, "runAsUser": 2000, "seccompProfile": {"type": "Localhost", "localhostProfile": "op.json"}}},
]

# What the operator does with the API, as (apiGroup, resource, verb); the ClusterRole must grant
# exactly this (plus the peering rule when replicas > 1), Roles the namespaced reads.
OPERATOR_CLUSTER_CALLS = {
    *{("plansmith.io", "inferencemodels", v) for v in ("get", "list", "watch", "patch", "update")},
    *{("plansmith.io", "inferencemodels/status", v) for v in ("get", "patch", "update")},
    *{("batch", "jobs", v) for v in ("get", "list", "watch", "create", "delete", "patch")},
    *{("apps", "deployments", v) for v in ("get", "list", "watch", "create", "patch", "delete")},
    *{("", "services", v) for v in ("get", "list", "watch", "create", "patch")},
    *{("discovery.k8s.io", "endpointslices", v) for v in ("get", "list", "watch")},
    *{("", "pods", v) for v in ("get", "list", "watch")},
    ("", "pods/log", "get"),
    *{("", "nodes", v) for v in ("get", "list", "watch")},
    ("", "events", "create"),
    *{("apiextensions.k8s.io", "customresourcedefinitions", v) for v in ("get", "list", "watch")},
    *{("", "namespaces", v) for v in ("get", "list", "watch")},
}
PEERING_CALLS = {("kopf.dev", r, v) for r in ("clusterkopfpeerings", "kopfpeerings") for v in ("get", "list", "watch", "patch")}


def find(objects: list[dict], kind: str, name: str | None = None, namespace: str | None = None) -> list[dict]:
    return [
        o for o in objects
        if o["kind"] == kind
        and (name is None or o["metadata"]["name"] == name)
        and (namespace is None or o["metadata"].get("namespace") == namespace)
    ]


def grants(role: dict) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in role.get("rules") or []
        for group in rule.get("apiGroups", [])
        for resource in rule.get("resources", [])
        for verb in rule.get("verbs", [])
    }


def operator_container(objects: list[dict]) -> dict:
    (deployment,) = find(objects, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def env_of(objects: list[dict]) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in operator_container(objects)["env"]}


# --------------------------------------------------------------------------- lint and files


@pytest.mark.parametrize("strict", [False, True], ids=["lint", "lint-strict"])
def test_helm_lint_is_clean(run_helm, strict):
    result = run_helm("lint", None, *(["--strict"] if strict else []))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout
    assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout, result.stdout


def test_chart_ships_the_generated_crd_unchanged(repo_root, chart_dir):
    generated = (repo_root / "crds" / "inferencemodel.yaml").read_bytes()
    shipped = (chart_dir / "crds" / "inferencemodel.yaml").read_bytes()
    assert shipped == generated, (
        "charts/plansmith/crds/inferencemodel.yaml differs from crds/inferencemodel.yaml; "
        "run: cp crds/inferencemodel.yaml charts/plansmith/crds/"
    )


def test_chart_crds_folder_holds_only_crds(chart_dir):
    names = set()
    for path in (chart_dir / "crds").glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                assert doc["kind"] == "CustomResourceDefinition", f"{path.name}: {doc['kind']}"
                names.add(doc["metadata"]["name"])
    assert names == {"inferencemodels.plansmith.io", "clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"}


def test_every_value_is_documented_by_a_comment(chart_dir):
    """Each top-level value in values.yaml is preceded by a comment (what it does, which PLANSMITH_* it sets)."""
    lines = (chart_dir / "values.yaml").read_text().splitlines()
    for index, line in enumerate(lines):
        if line and not line.startswith((" ", "#")):
            previous = next((p for p in reversed(lines[:index]) if p.strip()), "")
            first_child = next((n for n in lines[index + 1:] if n.strip()), "")
            assert previous.startswith("#") or first_child.strip().startswith("#"), f"undocumented value: {line}"


# --------------------------------------------------------------------------- values schema


BAD_VALUES = [
    ({"replicaCount": 0}, "/replicaCount"),
    ({"replicaCount": "two"}, "/replicaCount"),
    ({"migStrategy": "full"}, "/migStrategy"),
    ({"images": {"operator": "plansmith/operator:latest"}}, "/images/operator"),
    ({"images": {"runtime": ""}}, "/images/runtime"),
    ({"images": {"builderImages": {"ten": "plansmith/builder:1"}}}, "ten"),
    ({"storage": {"uri": "http://bucket/prefix"}}, "/storage/uri"),
    ({"storage": {"endpoint": "minio:9000"}}, "/storage/endpoint"),
    ({"build": {"concurrency": 0}}, "/build/concurrency"),
    ({"watchNamespaces": ["Team_A"]}, "/watchNamespaces/0"),
    ({"verbose": "yes"}, "/verbose"),
    ({"build": {"backend": "tensorrt"}}, "/build/backendVersion"),
    ({"build": {"backend": "openvino"}}, "/build/backend"),
    ({"securityContext": {"allowPrivilegeEscalation": True, "capabilities": {"drop": ["ALL"]}}},
     "/securityContext/allowPrivilegeEscalation"),
    ({"securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["NET_RAW"]}}},
     "/securityContext/capabilities/drop"),
    ({"podSecurityContext": {"runAsNonRoot": False, "seccompProfile": {"type": "RuntimeDefault"}}},
     "/podSecurityContext/runAsNonRoot"),
    ({"podSecurityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "Unconfined"}}},
     "/podSecurityContext/seccompProfile/type"),
    ({"imageTag": "0.2.0"}, "imageTag"),
    ({"rbac": {"create": True, "verbs": ["*"]}}, "verbs"),
]


@pytest.mark.parametrize("values,named", BAD_VALUES, ids=[n for _, n in BAD_VALUES])
@pytest.mark.parametrize("command", ["template", "lint"])
def test_schema_rejects_bad_values_naming_the_field(run_helm, command, values, named):
    result = run_helm(command, values)
    assert result.returncode != 0, f"helm {command} accepted {values}"
    output = result.stdout + result.stderr
    assert "don't meet the specifications of the schema" in output, output
    assert named in output, output


# --------------------------------------------------------------------------- the operator Deployment


def test_default_render_is_one_standalone_replica_watching_all_namespaces(render_chart):
    objects = render_chart()
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == ["ClusterRole", "ClusterRoleBinding", "Deployment", "Role", "RoleBinding", "ServiceAccount"]
    (deployment,) = find(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert operator_container(objects)["args"] == ["--all-namespaces", "--health-port=8080"]
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == find(objects, "ServiceAccount")[0]["metadata"]["name"]
    assert grants(find(objects, "ClusterRole")[0]) & PEERING_CALLS == set()


def test_more_replicas_turn_on_kopf_peering_cluster_wide(render_chart):
    objects = render_chart({"replicaCount": 2})
    assert operator_container(objects)["args"] == ["--all-namespaces", "--peering=plansmith", "--health-port=8080"]
    (peering,) = find(objects, "ClusterKopfPeering", "plansmith")
    assert peering["apiVersion"] == "kopf.dev/v1"
    assert PEERING_CALLS <= grants(find(objects, "ClusterRole")[0])
    assert find(objects, "Deployment")[0]["spec"]["strategy"] == {"type": "Recreate"}


def test_peering_in_watched_namespaces_uses_namespaced_peering_objects(render_chart):
    objects = render_chart({"replicaCount": 2, "watchNamespaces": ["team-a", "team-b"], "peering": {"name": "ml-ops"}})
    assert operator_container(objects)["args"] == ["--namespace=team-a", "--namespace=team-b", "--peering=ml-ops", "--health-port=8080"]
    assert sorted(p["metadata"]["namespace"] for p in find(objects, "KopfPeering", "ml-ops")) == ["team-a", "team-b"]
    assert find(objects, "ClusterKopfPeering") == []


def test_operator_settings_reach_the_operator_as_plansmith_env(render_chart):
    values = {
        "images": {
            "builder": "reg.example/plansmith/builder:9",
            "builderImages": {"10.3.0": "reg.example/plansmith/builder:9-trt10.3", "8.6.1": "reg.example/b:trt8.6"},
            "runtime": "reg.example/plansmith/runtime:9",
            "triton": "reg.example/tritonserver:25.01-py3",
        },
        "storage": {"uri": "s3://engines/cluster-a", "endpoint": "https://s3.internal:9000", "secretName": "engine-creds"},
        "gpuLabels": {"product": "example.com/gpu-model"},
        "migStrategy": "mixed",
        "build": {"concurrency": 7, "backend": "tensorrt", "backendVersion": "10.3.0", "backoffLimit": 3,
                  "cpuFallback": False},
        "extraEnv": [{"name": "HTTPS_PROXY", "value": "http://proxy:3128"}],
    }
    env = env_of(render_chart(values))
    assert env["PLANSMITH_BUILDER_IMAGE"] == "reg.example/plansmith/builder:9"
    assert json.loads(env["PLANSMITH_BUILDER_IMAGES"]) == values["images"]["builderImages"]
    assert env["PLANSMITH_RUNTIME_IMAGE"] == "reg.example/plansmith/runtime:9"
    assert env["PLANSMITH_TRITON_IMAGE"] == "reg.example/tritonserver:25.01-py3"
    assert env["PLANSMITH_STORAGE_URI"] == "s3://engines/cluster-a"
    assert env["PLANSMITH_S3_ENDPOINT"] == "https://s3.internal:9000"
    assert env["PLANSMITH_STORAGE_SECRET"] == "engine-creds"
    assert env["PLANSMITH_GPU_PRODUCT_LABEL"] == "example.com/gpu-model"
    assert env["PLANSMITH_GPU_COMPUTE_MAJOR_LABEL"] == "nvidia.com/gpu.compute.major"  # untouched default
    assert env["PLANSMITH_MIG_STRATEGY"] == "mixed"
    assert env["PLANSMITH_BUILD_CONCURRENCY"] == "7"
    assert env["PLANSMITH_BUILDER_BACKEND"] == "tensorrt"
    assert env["PLANSMITH_BUILDER_BACKEND_VERSION"] == "10.3.0"
    assert env["PLANSMITH_BUILD_BACKOFF_LIMIT"] == "3"
    assert env["PLANSMITH_CPU_FALLBACK"] == "false"
    assert env["PLANSMITH_IMAGE_PULL_POLICY"] == "IfNotPresent"
    assert env["HTTPS_PROXY"] == "http://proxy:3128"
    assert all(isinstance(v, str) for k, v in env.items() if k.startswith("PLANSMITH_") and v is not None)


def test_operator_reads_the_settings_the_chart_sets(render_chart):
    """The rendered env, read by the operator's own settings loader, gives the values' settings."""
    from plansmith.controller.settings import OperatorSettings

    defaults = OperatorSettings.from_env({k: v for k, v in env_of(render_chart()).items() if v is not None})
    assert defaults.builder_backend == "onnxruntime" and defaults.mig_strategy == "single"
    assert defaults.storage_uri is None and defaults.storage_secret is None  # empty values mean unset
    values = {"build": {"backend": "tensorrt", "backendVersion": "10.3.0", "concurrency": 5, "cpuFallback": False},
              "images": {"builderImages": {"10.3.0": "reg/builder:trt10.3"}}, "migStrategy": "mixed",
              "storage": {"uri": "s3://engines/a", "secretName": "creds"},
              "gpuLabels": {"computeMajor": "example.com/cc-major"}}
    settings = OperatorSettings.from_env({k: v for k, v in env_of(render_chart(values)).items() if v is not None})
    assert (settings.builder_backend, settings.builder_backend_version) == ("tensorrt", "10.3.0")
    assert settings.builder_image_for("10.3.0") == "reg/builder:trt10.3"
    assert settings.build_concurrency == 5 and settings.cpu_fallback is False and settings.mig_strategy == "mixed"
    assert (settings.storage_uri, settings.storage_secret) == ("s3://engines/a", "creds")
    assert settings.gpu_compute_major_label == "example.com/cc-major"


@pytest.mark.parametrize("values", [{}, *NON_DEFAULT_VALUES, {"verbose": True}], ids=lambda v: ",".join(v) or "defaults")
def test_operator_command_line_accepts_the_rendered_args(render_chart, values):
    from plansmith.cli import build_parser

    args = operator_container(render_chart(values))["args"]
    parsed = build_parser().parse_args(["operator", *args])  # SystemExit (a failed test) if not
    assert parsed.peering == (values.get("peering", {}).get("name", "plansmith") if values.get("replicaCount", 1) > 1 else None)
    assert parsed.namespace == values.get("watchNamespaces", [])


def test_liveness_probe_asks_the_port_the_operator_serves_its_health_on(render_chart):
    from plansmith.cli import build_parser

    container = operator_container(render_chart())
    parsed = build_parser().parse_args(["operator", *container["args"]])
    port = next(p for p in container["ports"] if p["name"] == container["livenessProbe"]["httpGet"]["port"])
    assert (port["containerPort"], container["livenessProbe"]["httpGet"]["path"]) == (parsed.health_port, "/healthz")


def test_every_plansmith_env_var_is_documented_in_values(render_chart, chart_dir):
    documented = (chart_dir / "values.yaml").read_text()
    runtime_only = {"PLANSMITH_NAMESPACE", "PLANSMITH_POD_NAME"}  # from the downward API, not values
    for name in env_of(render_chart()):
        if name.startswith("PLANSMITH_") and name not in runtime_only:
            assert name in documented, f"{name} is not named in a values.yaml comment"


# --------------------------------------------------------------------------- RBAC


def all_renders(render_chart) -> list[list[dict]]:
    return [render_chart()] + [render_chart(values) for values in NON_DEFAULT_VALUES]


def test_no_role_has_a_wildcard(render_chart):
    for objects in all_renders(render_chart):
        roles = find(objects, "ClusterRole") + find(objects, "Role")
        assert roles
        for role in roles:
            for rule in role["rules"]:
                for field in ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"):
                    assert not any("*" in item for item in rule.get(field) or []), (role["metadata"], rule)


def test_cluster_role_grants_exactly_what_the_operator_calls(render_chart):
    assert grants(find(render_chart(), "ClusterRole")[0]) == OPERATOR_CLUSTER_CALLS
    assert grants(find(render_chart({"replicaCount": 2}), "ClusterRole")[0]) == OPERATOR_CLUSTER_CALLS | PEERING_CALLS


def test_secrets_are_readable_only_where_values_say(render_chart):
    objects = render_chart()
    assert ("", "secrets", "get") not in grants(find(objects, "ClusterRole")[0])
    (role,) = find(objects, "Role")
    assert role["metadata"]["namespace"] == "plansmith-system"
    assert grants(role) == {("", "secrets", "get")}

    objects = render_chart({"rbac": {"secretNamespaces": ["team-a", "plansmith-system"]}})
    roles = {r["metadata"]["namespace"]: grants(r) for r in find(objects, "Role")}
    assert set(roles) == {"plansmith-system", "team-a"}
    assert roles["team-a"] == {("", "secrets", "get")}
    bindings = {b["metadata"]["namespace"] for b in find(objects, "RoleBinding")}
    assert bindings == {"plansmith-system", "team-a"}

    # the operator reads storage Secrets in the InferenceModel's namespace: watched namespaces get a Role
    objects = render_chart({"watchNamespaces": ["team-b"], "rbac": {"secretNamespaces": ["team-a"]}})
    roles = {r["metadata"]["namespace"]: grants(r) for r in find(objects, "Role")}
    assert set(roles) == {"plansmith-system", "team-a", "team-b"}
    assert roles["team-b"] == {("", "secrets", "get")}

    objects = render_chart({"rbac": {"clusterWideSecrets": True, "secretNamespaces": ["team-a"]}})
    assert ("", "secrets", "get") in grants(find(objects, "ClusterRole")[0])
    assert find(objects, "Role") == [] and find(objects, "RoleBinding") == []  # nothing left for a Role to grant


def test_bindings_name_the_operator_service_account(render_chart):
    for values in ({}, {"serviceAccount": {"create": False, "name": "existing-sa"}}):
        objects = render_chart(values)
        account = find(objects, "Deployment")[0]["spec"]["template"]["spec"]["serviceAccountName"]
        for binding in find(objects, "ClusterRoleBinding") + find(objects, "RoleBinding"):
            assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": "plansmith-system"}]
        assert bool(find(objects, "ServiceAccount")) == (values == {})


def test_rbac_can_be_left_to_the_cluster_admin(render_chart):
    objects = render_chart({"rbac": {"create": False}})
    assert not [o for o in objects if o["kind"] in ("ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")]


# --------------------------------------------------------------------------- pod security


def test_every_rendered_pod_passes_pod_security_restricted(render_chart):
    checked = 0
    for objects in all_renders(render_chart):
        for obj in objects:
            template = pod_template(obj)
            if template is None:
                continue
            spec, annotations = template
            assert restricted_violations(spec, annotations) == [], (obj["kind"], obj["metadata"]["name"])
            checked += 1
    assert checked == len(NON_DEFAULT_VALUES) + 1


def test_operator_root_filesystem_is_read_only_with_a_writable_tmp(render_chart):
    objects = render_chart()
    container = operator_container(objects)
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    (volume,) = find(objects, "Deployment")[0]["spec"]["template"]["spec"]["volumes"]
    assert "emptyDir" in volume
    assert {"name": volume["name"], "mountPath": "/tmp"} in container["volumeMounts"]


def test_notes_tell_the_user_what_to_apply_next(helm, chart_dir):
    import subprocess

    result = subprocess.run(
        [str(helm), "install", "plansmith", str(chart_dir), "--namespace", "ml", "--dry-run=client",
         "--set", "storage.secretName=engine-creds"],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    notes = result.stdout.split("NOTES:", 1)[1]
    assert "kubectl -n ml rollout status deployment/plansmith" in notes
    assert "kubectl -n default create secret generic engine-creds" in notes
    assert "reads storage Secrets only in: ml." in notes
    assert "kubectl apply -f model.yaml" in notes
    assert "spec.storage.uri" in notes  # no default store set: the user is told what that means
