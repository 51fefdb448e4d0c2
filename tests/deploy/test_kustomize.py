"""deploy/kustomize/base: generated from the Helm chart, up to date, and the same objects as its default render."""

from __future__ import annotations

import subprocess
import sys

import yaml

RELEASE, NAMESPACE = "plansmith", "plansmith-system"


def identity(obj: dict) -> tuple[str, str, str, str]:
    return obj["apiVersion"], obj["kind"], obj["metadata"].get("namespace", ""), obj["metadata"]["name"]


def without_helm_labels(obj: dict) -> dict:
    """The one documented difference: kustomize's objects do not claim to be managed by Helm."""
    labels = obj["metadata"].get("labels") or {}
    labels.pop("helm.sh/chart", None)
    if labels.get("app.kubernetes.io/managed-by") == "Helm":
        labels["app.kubernetes.io/managed-by"] = "kustomize"
    return obj


def test_base_is_up_to_date_with_the_chart(repo_root):
    result = subprocess.run([sys.executable, str(repo_root / "deploy/kustomize/generate.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_kustomize_build_equals_the_charts_default_render(repo_root, helm, kubectl_bin):
    helm_run = subprocess.run(
        [str(helm), "template", RELEASE, str(repo_root / "charts/plansmith"), "--namespace", NAMESPACE, "--include-crds"],
        capture_output=True, text=True,
    )
    assert helm_run.returncode == 0, helm_run.stderr
    kustomize_run = subprocess.run([str(kubectl_bin), "kustomize", str(repo_root / "deploy/kustomize/base")],
                                   capture_output=True, text=True)
    assert kustomize_run.returncode == 0, kustomize_run.stderr

    from_helm = {identity(o): without_helm_labels(o) for o in yaml.safe_load_all(helm_run.stdout) if o}
    from_kustomize = {identity(o): o for o in yaml.safe_load_all(kustomize_run.stdout) if o}
    namespace = ("v1", "Namespace", "", NAMESPACE)
    assert namespace in from_kustomize, "the base must create the operator's namespace"
    del from_kustomize[namespace]
    assert sorted(from_kustomize) == sorted(from_helm)
    for key, obj in from_helm.items():
        assert from_kustomize[key] == obj, f"{key} differs between kustomize and helm"
    kinds = {key[1] for key in from_helm}
    assert {"CustomResourceDefinition", "Deployment", "ClusterRole", "ServiceAccount"} <= kinds
