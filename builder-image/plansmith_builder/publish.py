"""The engine folder in the store: cache-hit verification and publishing, manifest last.

`<storage>/engines/<key>/` holds the artifacts and `manifest.json`. The manifest is uploaded only
after every artifact is uploaded and its stored bytes verified by sha256, so a reader that finds
a manifest finds a complete engine; a key without a manifest is not an engine.

Two builders may build one key at once (models of two namespaces with the same model and spec),
and their engines differ: TensorRT builds are not bit-reproducible. So artifacts are stored under
names that carry their sha256 (`model-<sha256[:16]>.plan`), which one build never overwrites with
another's bytes, and the manifest is created only where none is (S3's If-None-Match, a hard link on
file://): the first manifest wins and describes bytes that are there; the later builder finds it
and reports a hit. Artifacts of a publish that lost or failed half-way are left in place: no
manifest names them.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from plansmith.engine_key import engine_prefix, manifest_uri
from plansmith.manifest import Artifact, Manifest, ManifestError, parse_manifest
from plansmith.storage import ObjectNotFound, StorageUnavailable, Store, join, sha256_file
from plansmith_builder.backends.base import ArtifactRole
from plansmith_builder.errors import BuildError


@dataclass(frozen=True)
class Existing:
    """What is found at a key: a verified manifest, or why it cannot be used."""

    manifest: Manifest | None
    problem: str | None = None


def stored_sha256(store: Store, uri: str, workdir: Path) -> str:
    """sha256 of a stored object (streamed where the store can, else through a temp file)."""
    digest = getattr(store, "sha256", None)
    if callable(digest):
        return digest(uri)
    with tempfile.NamedTemporaryFile(dir=workdir) as handle:
        return store.download(uri, Path(handle.name))


def find_engine(store: Store, storage_uri: str, key: str, workdir: Path) -> Existing:
    """The engine at `key` when its manifest parses, matches the key and every artifact verifies.
    StorageUnavailable propagates (the caller cannot tell a miss from an outage)."""
    uri = manifest_uri(storage_uri, key)
    try:
        data = store.read_bytes(uri)
    except ObjectNotFound:
        return Existing(None)
    try:
        manifest = parse_manifest(data)
    except ManifestError as error:
        return Existing(None, f"unreadable manifest at {uri}: {error}")
    if manifest.key != key:
        return Existing(None, f"manifest at {uri} is for key {manifest.key}")
    prefix = engine_prefix(storage_uri, key)
    for artifact in manifest.artifacts:
        artifact_uri = join(prefix, artifact.name)
        try:
            actual = stored_sha256(store, artifact_uri, workdir)
        except ObjectNotFound:
            return Existing(None, f"artifact {artifact.name} listed in {uri} is missing")
        if actual != artifact.sha256:
            return Existing(None, f"artifact {artifact.name} has sha256 {actual}, the manifest says {artifact.sha256}")
    return Existing(manifest)


def check_publishable(store: Store, storage_uri: str, key: str) -> None:
    """Fail with StorageUnavailable (retryable) when the engine folder for `key` plainly cannot be
    written: a bucket that does not exist, a folder this process cannot create files in."""
    try:
        store.check_writable(engine_prefix(storage_uri, key))
    except StorageUnavailable as error:
        raise BuildError("StorageUnavailable", f"the engine store cannot be written, so nothing was built: "
                                               f"{error}") from None


def stored_name(name: str, sha256: str) -> str:
    """An artifact's name in the store: its file name with its content's sha256 in it
    (model.plan -> model-<sha256[:16]>.plan)."""
    stem, dot, suffix = name.partition(".")
    return f"{stem}-{sha256[:16]}{dot}{suffix}"


def artifact_for(path: Path, name: str, role: ArtifactRole) -> Artifact:
    """The manifest entry of a built file, under its content-addressed stored name."""
    sha256 = sha256_file(path)
    return Artifact(name=stored_name(name, sha256), role=role, sha256=sha256, bytes=path.stat().st_size)


def publish(store: Store, storage_uri: str, manifest: Manifest, files: dict[str, Path], workdir: Path,
            progress=None, replace_broken: bool = False) -> tuple[str, bool]:
    """Upload each artifact (verified), then the manifest; the manifest URI, and whether this
    manifest is the one published (False: another builder's was there first, and is kept).
    `replace_broken`: a manifest there was found unusable (find_engine's problem) and is replaced.

    `files` maps artifact names in `manifest.artifacts` to local paths."""
    prefix = engine_prefix(storage_uri, manifest.key)
    for artifact in manifest.artifacts:
        callback = progress.transfer(f"upload {artifact.name}", artifact.bytes) if progress else None
        store.upload(files[artifact.name], join(prefix, artifact.name), artifact.sha256, callback)
        if progress:
            progress.end_transfer()
    manifest_path = workdir / "manifest.json"
    manifest_path.write_text(manifest.to_json(), encoding="utf-8")
    uri = manifest_uri(storage_uri, manifest.key)
    if replace_broken:
        store.upload(manifest_path, uri, sha256_file(manifest_path))
        return uri, True
    return uri, store.create(manifest_path, uri, sha256_file(manifest_path))
