"""Helpers for the builder tests: generated ONNX models, an S3 bucket on the moto endpoint, and
`plansmith build` run through the real command-line entry point."""

from __future__ import annotations

import io
import json
import uuid
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
import yaml
from botocore.config import Config

from plansmith import testmodels


@dataclass
class CliRun:
    exit_code: int
    result: dict


def run_cli(*args: str) -> CliRun:
    """`plansmith build ...` through plansmith.cli.main, returning the exit code and the JSON line."""
    from plansmith.cli import main

    out = io.StringIO()
    with redirect_stdout(out):
        code = main(["build", *args, "--quick-benchmark"])
    lines = [line for line in out.getvalue().splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one JSON line on stdout, got {out.getvalue()!r}"
    return CliRun(code, json.loads(lines[0]))


def model_yaml(path: Path, model_uri: str, *, inputs: list[dict] | None = None, build: dict | None = None,
               storage_uri: str | None = None, sha256: str | None = None, name: str = "test-model") -> Path:
    spec: dict = {"model": {"uri": model_uri}}
    if inputs:
        spec["model"]["inputs"] = inputs
    if sha256:
        spec["model"]["sha256"] = sha256
    spec["build"] = {"accuracy": {"samples": 2}, **(build or {})}
    if storage_uri:
        spec["storage"] = {"uri": storage_uri}
    document = {"apiVersion": "plansmith.io/v1alpha1", "kind": "InferenceModel", "metadata": {"name": name},
                "spec": spec}
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """The generated models, once per session."""
    folder = tmp_path_factory.mktemp("models")
    cnn = testmodels.small_cnn(folder / "cnn.onnx")
    return {
        "cnn": cnn,
        "cnn_calibration": testmodels.write_calibration(folder / "cnn-calibration.npz", cnn, samples=16),
        "transformer": testmodels.transformer_block(folder / "transformer.onnx"),
        "mlp": testmodels.mlp(folder / "mlp.onnx"),
    }


@dataclass
class Bucket:
    client: object
    name: str

    def uri(self, key: str = "") -> str:
        return f"s3://{self.name}/{key}".rstrip("/")

    def put(self, key: str, data: bytes) -> str:
        self.client.put_object(Bucket=self.name, Key=key, Body=data)
        return self.uri(key)

    def objects(self, prefix: str = "") -> dict[str, tuple[str, object]]:
        """key -> (ETag, LastModified) of every object under `prefix`."""
        found = {}
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=prefix):
            for item in page.get("Contents", []):
                found[item["Key"]] = (item["ETag"], item["LastModified"])
        return found

    def read(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.name, Key=key)["Body"].read()


@pytest.fixture
def bucket(s3_server, monkeypatch) -> Bucket:
    """A fresh bucket on the moto endpoint, with the builder's environment pointing at it."""
    for name, value in s3_server.credentials_env().items():
        monkeypatch.setenv(name, value)
    client = boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1",
                          aws_access_key_id="plansmith-dev", aws_secret_access_key="plansmith-dev-secret",
                          config=Config(request_checksum_calculation="when_required"))
    name = f"builder-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    return Bucket(client, name)


@pytest.fixture
def cli():
    """`plansmith build` through the real entry point: cli(*args) -> CliRun."""
    return run_cli


@pytest.fixture
def write_yaml():
    """write_yaml(path, model_uri, inputs=..., build=..., storage_uri=..., sha256=...) -> path."""
    return model_yaml
