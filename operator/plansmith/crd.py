"""Generate the InferenceModel CustomResourceDefinition from the pydantic models in `plansmith.spec`.

The committed `crds/inferencemodel.yaml` is this module's output; `tests/operator/test_crd.py`
fails when they differ, so the schema and the Python model agree field by field.
Regenerate with:  python -m plansmith.crd > crds/inferencemodel.yaml

pydantic's JSON Schema is close to, but not, a Kubernetes *structural* schema: it uses
`$ref`/`$defs`, `anyOf` for optionals and unions, and titles. `to_structural` rewrites it:
references inlined, `X | None` becomes plain X (absent means unset), `int | str` becomes
`x-kubernetes-int-or-string`, and only keywords Kubernetes 1.20 accepts are kept.
"""

from __future__ import annotations

import sys
from typing import Any

import yaml

from plansmith.spec import (
    API_GROUP,
    API_VERSION,
    KIND,
    PLURAL,
    InferenceModelSpec,
    InferenceModelStatus,
)

KEPT_KEYWORDS = (
    "type",
    "description",
    "enum",
    "default",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "format",
)

PRINTER_COLUMNS = [
    {"name": "Ready", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].status'},
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Targets", "type": "integer", "jsonPath": ".status.targetCount"},
    {"name": "Engines Ready", "type": "integer", "jsonPath": ".status.enginesReady"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _resolve(merged, defs)
    return node


def to_structural(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """One JSON Schema node (pydantic flavour) as a Kubernetes structural schema node."""
    node = _resolve(node, defs)
    if "anyOf" in node:
        variants = [_resolve(v, defs) for v in node["anyOf"] if v.get("type") != "null"]
        types = sorted(v.get("type") for v in variants)
        outer = {k: v for k, v in node.items() if k != "anyOf"}
        if types == ["integer", "string"]:
            return {**_keep(outer), "x-kubernetes-int-or-string": True}
        if len(variants) != 1:
            raise ValueError(f"cannot express union {types} in a structural schema")
        merged = {**variants[0], **{k: v for k, v in outer.items() if k != "default" or v is not None}}
        return to_structural(merged, defs)

    out = _keep(node)
    kind = node.get("type")
    if kind == "object":
        properties = node.get("properties", {})
        if properties:
            out["properties"] = {name: to_structural(sub, defs) for name, sub in properties.items()}
            required = node.get("required")
            if required:
                out["required"] = list(required)
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            out["additionalProperties"] = to_structural(extra, defs)
    elif kind == "array":
        out["items"] = to_structural(node["items"], defs)
    return out


def _keep(node: dict[str, Any]) -> dict[str, Any]:
    kept = {k: node[k] for k in KEPT_KEYWORDS if k in node}
    if "default" in kept and kept["default"] in (None, "", [], {}):
        # Kubernetes 1.20 rejects "" as a string default, and would materialize empty lists
        # and maps on every object; absent means the same to the model.
        kept.pop("default")
    return kept


def model_schema(model: type) -> dict[str, Any]:
    schema = model.model_json_schema(by_alias=True, mode="validation")
    return to_structural(schema, schema.get("$defs", {}))


def crd() -> dict[str, Any]:
    spec_schema = model_schema(InferenceModelSpec)
    status_schema = model_schema(InferenceModelStatus)
    status_schema["description"] = "Observed state, written by the operator."
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{PLURAL}.{API_GROUP}",
            "labels": {"app.kubernetes.io/name": "plansmith", "app.kubernetes.io/part-of": "plansmith"},
        },
        "spec": {
            "group": API_GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": KIND.lower(),
                "shortNames": ["im"],
                "categories": ["plansmith", "all"],
            },
            "versions": [
                {
                    "name": API_VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {
                        "openAPIV3Schema": {
                            "description": (
                                "An ONNX model that plansmith compiles into an engine for every GPU type in "
                                "the cluster, checks against an FP32 reference, stores content-addressed "
                                "and serves over the KServe v2 / Triton inference protocol."
                            ),
                            "type": "object",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema,
                                "status": status_schema,
                            },
                        }
                    },
                }
            ],
        },
    }


def render() -> str:
    header = "# Generated from operator/plansmith/spec.py by `python -m plansmith.crd`; do not edit by hand.\n"
    return header + yaml.safe_dump(crd(), sort_keys=False, width=120)


if __name__ == "__main__":
    sys.stdout.write(render())
