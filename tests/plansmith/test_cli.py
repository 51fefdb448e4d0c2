"""`plansmith validate` as a user runs it: exit codes, field paths, no tracebacks."""

from __future__ import annotations

import subprocess
import sys

import pytest


def validate(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "plansmith.cli", "validate", *args],
                          capture_output=True, text=True, input=stdin, timeout=60)


def test_example_is_valid_and_printed_with_defaults(repo_root):
    result = validate(str(repo_root / "deploy/examples/model.yaml"))
    assert result.returncode == 0, result.stderr
    assert "is valid" in result.stderr
    assert "kind: InferenceModel" in result.stdout
    assert "samples: 128" not in result.stdout  # calibration is commented out in the example
    assert "iterations: 2" in result.stdout


def test_defaults_are_filled_in():
    minimal = "apiVersion: plansmith.io/v1alpha1\nkind: InferenceModel\nmetadata: {name: m}\nspec:\n  model: {uri: file:///m.onnx}\n"
    result = validate("-", stdin=minimal)
    assert result.returncode == 0, result.stderr
    assert "precision: fp16" in result.stdout and "maxBatchSize: 8" in result.stdout


BROKEN = {
    "bad enum": ("spec:\n  model: {uri: file:///m.onnx}\n  build: {precision: fp64}\n", "spec.build.precision"),
    "unknown field": ("spec:\n  model: {uri: file:///m.onnx, checksum: x}\n", "spec.model.checksum: unknown field"),
    "wrong type": ("spec:\n  model: {uri: file:///m.onnx}\n  serving: {replicas: many}\n", "spec.serving.replicas"),
    "semantic": (
        "spec:\n  model: {uri: file:///m.onnx}\n  serving: {maxBatchSize: 2, dynamicBatching: {preferredBatchSizes: [4]}}\n",
        "spec.serving.dynamicBatching.preferredBatchSizes[0]: 4 is larger than maxBatchSize 2",
    ),
    "missing model": ("spec:\n  build: {}\n", "spec.model: required field is missing"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_file_names_the_field_and_exits_1(tmp_path, case):
    body, expected = BROKEN[case]
    path = tmp_path / "model.yaml"
    path.write_text("apiVersion: plansmith.io/v1alpha1\nkind: InferenceModel\nmetadata: {name: m}\n" + body)
    result = validate(str(path))
    assert result.returncode == 1
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("spec: {model: [unclosed\n", "malformed YAML"),
        ("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {}\n", "kind: must be InferenceModel"),
        ("apiVersion: plansmith.io/v2\nkind: InferenceModel\n", "apiVersion: must be plansmith.io/v1alpha1"),
        ("- just\n- a list\n", "expected an InferenceModel mapping"),
        ("", "no YAML document found"),
    ],
)
def test_not_an_inference_model(text, expected):
    result = validate("-", stdin=text)
    assert result.returncode == 1
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_file_is_an_error_not_a_traceback(tmp_path):
    result = validate(str(tmp_path / "absent.yaml"))
    assert result.returncode == 1
    assert "cannot read" in result.stderr and "Traceback" not in result.stderr


def test_every_document_of_a_multi_document_file_is_checked(repo_root, tmp_path):
    good = (repo_root / "deploy/examples/model.yaml").read_text()
    path = tmp_path / "two.yaml"
    path.write_text(good + "\n---\napiVersion: plansmith.io/v1alpha1\nkind: InferenceModel\nmetadata: {name: b}\nspec: {}\n")
    result = validate(str(path))
    assert result.returncode == 1
    assert "document 2: required field is missing" in result.stderr
