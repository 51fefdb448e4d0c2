"""Fetch an engine: the manifest, then every artifact, each verified against its sha256."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from plansmith.manifest import MANIFEST_NAME, Manifest, parse_manifest
from plansmith.storage import IntegrityError, join, open_store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedEngine:
    manifest: Manifest
    manifest_uri: str
    directory: Path  # local folder holding the verified artifacts

    def path(self, role: str = "engine") -> Path:
        return self.directory / self.manifest.artifact(role).name


def normalize_manifest_uri(uri: str) -> str:
    """Accept the manifest's URI or its engine folder's."""
    if uri.endswith(".json"):
        return uri
    return join(uri, MANIFEST_NAME)


def fetch_engine(uri: str, directory: Path, endpoint: str | None = None) -> LoadedEngine:
    """Download manifest + artifacts into `directory`. Raises storage errors (ObjectNotFound,
    StorageUnavailable, IntegrityError) and ManifestError."""
    uri = normalize_manifest_uri(uri)
    store = open_store(uri, endpoint)
    manifest = parse_manifest(store.read_bytes(uri))
    folder = uri.rsplit("/", 1)[0]
    directory.mkdir(parents=True, exist_ok=True)
    for artifact in manifest.artifacts:
        if "/" in artifact.name or artifact.name in ("", ".", ".."):
            raise IntegrityError(f"artifact name {artifact.name!r} is not a plain file name")
        source = join(folder, artifact.name)
        target = directory / artifact.name
        digest = store.download(source, target)
        if digest != artifact.sha256:
            target.unlink(missing_ok=True)
            raise IntegrityError(
                f"artifact {artifact.name} from {source} has sha256 {digest}, the manifest says {artifact.sha256}: "
                "refusing to serve a modified engine")
        log.info("artifact verified", extra={"artifact": artifact.name, "sha256": digest, "bytes": artifact.bytes})
    return LoadedEngine(manifest=manifest, manifest_uri=uri, directory=directory)
