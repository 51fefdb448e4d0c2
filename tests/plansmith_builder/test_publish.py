"""Publishing an engine folder when two builders build one key at once (models of two namespaces
with the same model and spec): TensorRT builds differ run to run, and the published manifest must
describe bytes that are in the store, whichever builder finishes first."""

from __future__ import annotations

import pytest

from plansmith.manifest import Manifest
from plansmith.storage import open_store, sha256_file
from plansmith_builder.publish import artifact_for, find_engine, publish

KEY = "0123456789abcdef0123456789abcdef"


def build(tmp_path, builder: str, plan_bytes: bytes) -> tuple[Manifest, dict]:
    """What one builder has once its build passed the gate: a plan and the manifest naming it."""
    folder = tmp_path / builder
    folder.mkdir()
    plan = folder / "model.plan"
    plan.write_bytes(plan_bytes)
    artifact = artifact_for(plan, "model.plan", "engine")
    manifest = Manifest.model_validate({
        "key": KEY, "backend": "tensorrt", "backendVersion": "10.3.0",
        "target": {"device": "gpu", "computeCapability": "9.0"}, "precision": "fp16", "buildOptions": {},
        "source": {"uri": "s3://models/m.onnx", "sha256": "0" * 64}, "inputs": [], "outputs": [],
        "maxBatchSize": 8, "artifacts": [artifact.model_dump(by_alias=True)], "buildSeconds": 1,
        "builderVersion": "0", "createdAt": "now"})
    return manifest, {artifact.name: plan}


@pytest.fixture(params=["file", "s3"])
def storage(request, tmp_path):
    if request.param == "file":
        return (tmp_path / "store").as_uri()
    return request.getfixturevalue("bucket").uri("store")  # a fresh moto bucket, the environment pointing at it


def test_artifacts_are_stored_under_their_sha256():
    from plansmith_builder.publish import stored_name

    assert stored_name("model.plan", "ab" * 32) == "model-abababababababab.plan"
    assert stored_name("timing.cache", "01" * 32) == "timing-0101010101010101.cache"


def test_two_builders_of_one_key_leave_a_manifest_that_describes_the_stored_engine(storage, tmp_path):
    store = open_store(storage)
    first, first_files = build(tmp_path, "a", b"plan built by A " * 100)
    second, second_files = build(tmp_path, "b", b"plan built by B, not bit-identical " * 100)
    assert first.artifacts[0].name != second.artifacts[0].name  # content-addressed: neither overwrites the other

    # B publishes while A's upload is under way; A's manifest comes last and loses
    uri, ours = publish(store, storage, second, second_files, tmp_path / "b")
    assert ours is True
    uri_again, ours = publish(store, storage, first, first_files, tmp_path / "a")
    assert (uri_again, ours) == (uri, False)

    found = find_engine(store, storage, KEY, tmp_path)
    assert found.problem is None and found.manifest == second  # B's manifest, and B's bytes under it
    assert store.read_bytes(f"{storage}/engines/{KEY}/{second.artifacts[0].name}") == \
        second_files[second.artifacts[0].name].read_bytes()


def test_a_rebuild_replaces_a_manifest_whose_engine_does_not_verify(storage, tmp_path):
    store = open_store(storage)
    manifest, files = build(tmp_path, "a", b"the engine " * 100)
    publish(store, storage, manifest, files, tmp_path / "a")
    store.write_bytes(f"{storage}/engines/{KEY}/{manifest.artifacts[0].name}", b"damaged")
    assert find_engine(store, storage, KEY, tmp_path).problem
    rebuilt, rebuilt_files = build(tmp_path, "b", b"the engine, rebuilt " * 100)
    assert publish(store, storage, rebuilt, rebuilt_files, tmp_path / "b", replace_broken=True)[1] is True
    assert find_engine(store, storage, KEY, tmp_path).manifest == rebuilt
