"""Generate deploy/kustomize/base from the Helm chart's default render, so the two cannot drift.

    .venv/bin/python deploy/kustomize/generate.py          # rewrite deploy/kustomize/base/
    .venv/bin/python deploy/kustomize/generate.py --check  # exit 1 if base/ is out of date

The base is `helm template plansmith charts/plansmith --namespace plansmith-system --include-crds`
with two changes a kustomize user expects: a Namespace object, and labels that do not claim Helm
manages the objects (`helm.sh/chart` dropped, `app.kubernetes.io/managed-by: kustomize`).
tests/deploy/test_kustomize.py renders both with the real helm and `kubectl kustomize` and checks
that they are the same objects.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from plansmith.devcluster.helm import helm_binary

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART = REPO_ROOT / "charts" / "plansmith"
BASE = REPO_ROOT / "deploy" / "kustomize" / "base"
RELEASE = "plansmith"
NAMESPACE = "plansmith-system"
HEADER = "# Generated from charts/plansmith by deploy/kustomize/generate.py; do not edit by hand.\n"


def render_chart(extra_args: list[str] | None = None) -> str:
    """`helm template` of the chart as a release named plansmith in plansmith-system, CRDs included."""
    result = subprocess.run(
        [str(helm_binary()), "template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--include-crds",
         *(extra_args or [])],
        capture_output=True, text=True,
    )
    if result.returncode != 0:
        raise RuntimeError(f"helm template failed:\n{result.stderr}")
    return result.stdout


def source_documents(rendered: str) -> list[tuple[str, dict[str, Any]]]:
    """(template file name, object) for each document, in helm's order; the name comes from the
    `# Source: plansmith/<dir>/<file>` comment helm writes above each file's first document."""
    documents: list[tuple[str, dict[str, Any]]] = []
    source: str | None = None
    for chunk in rendered.split("\n---"):
        source = next((line.split(": ", 1)[1] for line in chunk.splitlines() if line.startswith("# Source: ")), source)
        obj = yaml.safe_load(chunk)
        if obj is None:
            continue
        if source is None:
            raise RuntimeError(f"a rendered document has no '# Source:' comment: {chunk[:200]!r}")
        documents.append((Path(source).name, obj))
    return documents


def for_kustomize(obj: dict[str, Any]) -> dict[str, Any]:
    """The object as the kustomize base carries it: labels no longer name Helm."""
    labels = obj.get("metadata", {}).get("labels")
    if labels:
        labels.pop("helm.sh/chart", None)
        if labels.get("app.kubernetes.io/managed-by") == "Helm":
            labels["app.kubernetes.io/managed-by"] = "kustomize"
    return obj


def namespace_object() -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": NAMESPACE, "labels": {"app.kubernetes.io/part-of": "plansmith"}},
    }


def base_files(rendered: str) -> dict[str, str]:
    """File name -> content of every file in the kustomize base (kustomization.yaml included)."""
    grouped: dict[str, list[dict[str, Any]]] = {"namespace.yaml": [namespace_object()]}
    for source, obj in source_documents(rendered):
        name = "crd-" + source if obj.get("kind") == "CustomResourceDefinition" and not source.startswith("crd") else source
        grouped.setdefault(name, []).append(for_kustomize(obj))
    files = {
        name: HEADER + "".join("---\n" + yaml.safe_dump(obj, sort_keys=False, width=120) for obj in objects)
        for name, objects in grouped.items()
    }
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": list(grouped),
    }
    files["kustomization.yaml"] = HEADER + yaml.safe_dump(kustomization, sort_keys=False)
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report whether base/ is up to date")
    args = parser.parse_args(argv)
    wanted = base_files(render_chart())
    present = {path.name: path.read_text() for path in BASE.glob("*.yaml")} if BASE.is_dir() else {}
    if args.check:
        stale = sorted(name for name in wanted.keys() | present.keys() if wanted.get(name) != present.get(name))
        if stale:
            print(f"deploy/kustomize/base is out of date ({', '.join(stale)}); "
                  "run .venv/bin/python deploy/kustomize/generate.py", file=sys.stderr)
            return 1
        return 0
    BASE.mkdir(parents=True, exist_ok=True)
    for name in present.keys() - wanted.keys():
        (BASE / name).unlink()
    for name, content in wanted.items():
        (BASE / name).write_text(content)
    print(f"wrote {len(wanted)} files to {BASE.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
