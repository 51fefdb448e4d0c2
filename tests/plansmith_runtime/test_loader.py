"""Fetching an engine verifies every artifact against the manifest."""

import shutil

import pytest

from plansmith.storage import IntegrityError, ObjectNotFound
from plansmith_runtime.loader import fetch_engine, normalize_manifest_uri


def test_manifest_uri_or_engine_folder():
    assert normalize_manifest_uri("s3://b/e/k") == "s3://b/e/k/manifest.json"
    assert normalize_manifest_uri("s3://b/e/k/manifest.json") == "s3://b/e/k/manifest.json"


def test_verified_artifacts_land_in_the_folder(engines, tmp_path):
    loaded = fetch_engine(engines["mlp"].manifest_uri, tmp_path / "local")
    assert loaded.path("engine").read_bytes() == engines["mlp"].engine_path.read_bytes()


def test_modified_artifact_is_refused_and_removed(engines, tmp_path):
    copy = tmp_path / "engine"
    shutil.copytree(engines["mlp"].engine_path.parent, copy)
    engine = copy / engines["mlp"].engine_path.name
    engine.write_bytes(engine.read_bytes() + b"\0")
    with pytest.raises(IntegrityError, match="refusing to serve a modified engine"):
        fetch_engine(f"file://{copy}", tmp_path / "local")
    assert not (tmp_path / "local" / engine.name).exists()


def test_missing_manifest_is_object_not_found(tmp_path):
    with pytest.raises(ObjectNotFound):
        fetch_engine(f"file://{tmp_path}/nothing", tmp_path / "local")
