"""The committed CRD is exactly what the Python model generates, and is a structural schema."""

from __future__ import annotations

import typing

import pydantic
import yaml

from plansmith import crd
from plansmith.spec import InferenceModelSpec, InferenceModelStatus


def committed(repo_root):
    return (repo_root / "crds/inferencemodel.yaml").read_text()


def test_committed_crd_is_generated_from_the_model(repo_root):
    assert committed(repo_root) == crd.render(), (
        "crds/inferencemodel.yaml is stale: run `python -m plansmith.crd > crds/inferencemodel.yaml`"
    )


def _model_of(annotation):
    """The pydantic model inside an annotation such as `Foo | None` or `list[Foo]`, if any."""
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_of(arg)
        if found:
            return found
    return None


def assert_agrees(model: type[pydantic.BaseModel], schema: dict, path: str) -> int:
    """Walk model and schema together: same fields, same required set, same nested shapes."""
    properties = schema["properties"]
    aliases = {field.alias or name: field for name, field in model.model_fields.items()}
    assert set(properties) == set(aliases), f"{path}: fields differ"
    required = {alias for alias, field in aliases.items() if field.is_required()}
    assert set(schema.get("required", [])) == required, f"{path}: required fields differ"
    checked = len(aliases)
    for alias, field in aliases.items():
        node = properties[alias]
        assert node.get("description"), f"{path}.{alias} has no description (kubectl explain shows nothing)"
        nested = _model_of(field.annotation)
        if nested is not None:
            node = node["items"] if node["type"] == "array" else node
            checked += assert_agrees(nested, node, f"{path}.{alias}")
    return checked


def test_schema_and_model_agree_field_by_field(repo_root):
    schema = yaml.safe_load(committed(repo_root))["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert assert_agrees(InferenceModelSpec, schema["properties"]["spec"], "spec") > 50
    assert assert_agrees(InferenceModelStatus, schema["properties"]["status"], "status") > 20


def walk(node, path="$"):
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from walk(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}{{}}")


def test_schema_is_structural(repo_root):
    schema = yaml.safe_load(committed(repo_root))["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in walk(schema):
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path} has no type"
        assert not {"$ref", "anyOf", "oneOf", "allOf", "title"} & set(node), f"{path} is not structural"


def test_enums_and_defaults_come_from_the_model(repo_root):
    schema = yaml.safe_load(committed(repo_root))["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    build = schema["properties"]["spec"]["properties"]["build"]["properties"]
    assert build["precision"]["enum"] == ["fp32", "fp16", "bf16", "int8", "fp8"]
    assert build["precision"]["default"] == "fp16"
    assert build["optimizationLevel"]["minimum"] == 0 and build["optimizationLevel"]["maximum"] == 5
