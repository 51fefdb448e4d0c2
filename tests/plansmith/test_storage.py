"""The storage adapter against a real S3 endpoint (moto) and the local file system."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

import pytest

from plansmith.devcluster.processes import free_port
from plansmith.storage import (
    IntegrityError,
    InvalidStorageUri,
    ObjectNotFound,
    StorageUnavailable,
    open_store,
    sha256_file,
)


@pytest.fixture
def s3_base(s3_server, monkeypatch):
    import boto3

    for name, value in s3_server.credentials_env().items():
        monkeypatch.setenv(name, value)
    bucket = f"storage-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/prefix"


@pytest.fixture(params=["s3", "file"])
def base(request, tmp_path):
    if request.param == "s3":
        return request.getfixturevalue("s3_base")
    return (tmp_path / "store").as_uri()


def test_upload_verifies_and_download_streams(base, tmp_path):
    store = open_store(base)
    payload = tmp_path / "engine.plan"
    payload.write_bytes(b"plan bytes " * 50_000)
    digest = sha256_file(payload)
    uploaded: list[int] = []
    store.upload(payload, f"{base}/engines/k/model.plan", digest, uploaded.append)
    assert sum(uploaded) == payload.stat().st_size
    assert store.exists(f"{base}/engines/k/model.plan")
    copy = tmp_path / "copy"
    assert store.download(f"{base}/engines/k/model.plan", copy) == digest
    assert copy.read_bytes() == payload.read_bytes()
    store.write_bytes(f"{base}/engines/k/manifest.json", b"{}")
    assert store.read_bytes(f"{base}/engines/k/manifest.json") == b"{}"
    store.delete(f"{base}/engines/k/manifest.json")
    assert not store.exists(f"{base}/engines/k/manifest.json")


def test_upload_with_the_wrong_sha256_is_refused_and_leaves_nothing(base, tmp_path):
    store = open_store(base)
    payload = tmp_path / "engine.plan"
    payload.write_bytes(b"real bytes")
    wrong = hashlib.sha256(b"other bytes").hexdigest()
    # the stored bytes are checked after the upload and removed when they do not match
    with pytest.raises(IntegrityError):
        store.upload(payload, f"{base}/x/model.plan", wrong)
    assert not store.exists(f"{base}/x/model.plan")


def test_missing_objects_are_object_not_found(base, tmp_path):
    store = open_store(base)
    with pytest.raises(ObjectNotFound):
        store.read_bytes(f"{base}/nothing/here")
    with pytest.raises(ObjectNotFound):
        store.download(f"{base}/nothing/here", tmp_path / "x")
    assert store.exists(f"{base}/nothing/here") is False


def test_unreachable_endpoint_is_storage_unavailable(monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    store = open_store("s3://bucket/p", endpoint=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(StorageUnavailable):
        store.read_bytes("s3://bucket/p/manifest.json")
    with pytest.raises(StorageUnavailable):
        store.exists("s3://bucket/p/manifest.json")


def test_bad_uris_are_refused():
    with pytest.raises(InvalidStorageUri):
        open_store("http://example.com/x")
    with pytest.raises(InvalidStorageUri):
        open_store("file:///tmp").read_bytes("s3://bucket/key")


@pytest.fixture(params=[0o022, 0o002], ids=["umask-022", "umask-002"])
def umask(request):
    """The process umask set to the parameter for the test, restored afterwards."""
    import os

    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def test_file_store_publishes_with_the_mode_open_gives_under_the_umask(umask, tmp_path):
    """Not 0600: a serving process under another uid must be able to read what the builder published."""
    base = (tmp_path / "store").as_uri()
    store = open_store(base)
    payload = tmp_path / "engine.plan"
    payload.write_bytes(b"plan bytes")
    store.upload(payload, f"{base}/engines/k/model.plan", sha256_file(payload))
    store.write_bytes(f"{base}/engines/k/manifest.json", b"{}")
    plain = tmp_path / "store" / "engines" / "k" / "written-by-open"
    plain.write_bytes(b"x")

    folder = tmp_path / "store" / "engines" / "k"
    expected = 0o666 & ~umask
    assert oct(plain.stat().st_mode & 0o777) == oct(expected)
    for name in ("model.plan", "manifest.json"):
        assert oct((folder / name).stat().st_mode & 0o777) == oct(expected), name
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "model.plan", "written-by-open"]


def test_check_writable_passes_on_a_usable_store_and_leaves_nothing(base, tmp_path):
    store = open_store(base)
    store.check_writable(f"{base}/engines/k")
    assert store.exists(f"{base}/engines/k") is False
    if base.startswith("file://"):
        assert list(tmp_path.iterdir()) == []  # not even the store folder: writes create it
    else:
        import boto3

        bucket = base.split("/")[2]
        assert boto3.client("s3").list_objects_v2(Bucket=bucket).get("KeyCount") == 0


def test_check_writable_refuses_a_missing_bucket(s3_base):
    store = open_store(s3_base)
    with pytest.raises(StorageUnavailable, match="bucket no-such-bucket-for-plansmith does not exist"):
        store.check_writable("s3://no-such-bucket-for-plansmith/prefix/engines/k")


@pytest.mark.parametrize("where", ["under-a-file", "in-proc"])
def test_check_writable_refuses_a_folder_that_cannot_be_created(where, tmp_path):
    """A file standing where a folder must go, and /proc, where not even root can create files (and
    where os.access(W_OK) says yes to root)."""
    if where == "in-proc" and not Path("/proc/self").is_dir():
        pytest.skip("needs Linux's /proc")
    blocker = tmp_path / "file"
    blocker.write_bytes(b"in the way")
    folder = blocker / "store" if where == "under-a-file" else Path(f"/proc/plansmith-store-{uuid.uuid4().hex[:8]}")
    with pytest.raises(StorageUnavailable, match="cannot create files in"):
        open_store("file:///").check_writable((folder / "engines" / "k").as_uri())
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_create_writes_only_where_nothing_is(base, tmp_path):
    """The manifest's conditional write: of two writers the first creates the object, the second is
    told and changes nothing (S3's If-None-Match, a hard link on file://)."""
    store = open_store(base)
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    first.write_bytes(b'{"by": "first"}')
    second.write_bytes(b'{"by": "second"}')
    uri = f"{base}/engines/k/manifest.json"
    assert store.create(first, uri, sha256_file(first)) is True
    assert store.create(second, uri, sha256_file(second)) is False
    assert store.read_bytes(uri) == b'{"by": "first"}'
    if base.startswith("file://"):  # nothing staged is left beside it
        assert sorted(p.name for p in Path(base.removeprefix("file://"), "engines/k").iterdir()) == ["manifest.json"]


def test_create_in_a_folder_whose_name_a_uri_would_escape(tmp_path):
    """A store path with a space or a '+': the staged copy goes beside the target, as any write does."""
    store = open_store((tmp_path / "my engines+v2").as_uri())
    manifest = tmp_path / "manifest.json"
    manifest.write_bytes(b"{}")
    target = tmp_path / "my engines+v2" / "engines" / "k" / "manifest.json"
    assert store.create(manifest, "file://" + str(target), sha256_file(manifest)) is True
    assert target.read_bytes() == b"{}" and sorted(p.name for p in target.parent.iterdir()) == ["manifest.json"]
