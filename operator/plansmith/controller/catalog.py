"""What the operator needs from engine storage: manifests by key and the sha256 of source files.

Manifests are immutable per key (content addressing), so a found manifest is cached for the life of
the process; a miss is never cached (a build may publish it any moment). Source sha256s are cached
by (URI, ETag): hashing a large model once, not on every reconcile.
"""

from __future__ import annotations

import functools
import logging
import threading
from dataclasses import dataclass

from plansmith.engine_key import manifest_uri
from plansmith.manifest import Manifest, ManifestError, parse_manifest
from plansmith.storage import FileStore, ObjectNotFound, S3Store, Store, StorageError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Credentials:
    access_key_id: str | None = None
    secret_access_key: str | None = None
    region: str | None = None


class CatalogError(Exception):
    """Storage could not answer (retry later) or holds something that is not an engine."""


class SourceNotFound(CatalogError):
    """The spec names a source object (model, calibration data) that storage does not hold."""


@functools.lru_cache(maxsize=64)
def _s3_store(endpoint: str | None, credentials: Credentials) -> S3Store:
    """One S3 client per (endpoint, credentials), shared by every reconcile: creating a boto3 client
    costs about 30 ms of CPU, and boto3 clients are thread-safe."""
    return S3Store(endpoint=endpoint, access_key_id=credentials.access_key_id,
                   secret_access_key=credentials.secret_access_key, region=credentials.region)


class EngineCatalog:
    def __init__(self) -> None:
        self._manifests: dict[str, Manifest] = {}
        self._digests: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()

    @staticmethod
    def store(uri: str, endpoint: str | None, credentials: Credentials) -> Store:
        if uri.startswith("s3://"):
            return _s3_store(endpoint, credentials)
        return FileStore()

    def find_manifest(self, storage_uri: str, key: str, endpoint: str | None, credentials: Credentials) -> Manifest | None:
        """The verified manifest for `key`, or None when no engine with that key is published."""
        uri = manifest_uri(storage_uri, key)
        with self._lock:
            if uri in self._manifests:
                return self._manifests[uri]
        store = self.store(uri, endpoint, credentials)
        try:
            manifest = parse_manifest(store.read_bytes(uri))
        except ObjectNotFound:
            return None
        except ManifestError as error:
            raise CatalogError(f"{uri}: {error}") from None
        except StorageError as error:
            raise CatalogError(f"storage unavailable: {error}") from None
        if manifest.key != key:
            raise CatalogError(f"{uri} describes engine {manifest.key}, not {key}")
        prefix = uri.rsplit("/", 1)[0]
        missing = [a.name for a in manifest.artifacts if not store.exists(f"{prefix}/{a.name}")]
        if missing:
            raise CatalogError(f"{uri}: artifacts missing from storage: {', '.join(missing)}")
        with self._lock:
            self._manifests[uri] = manifest
        return manifest

    def sha256_of(self, uri: str, endpoint: str | None, credentials: Credentials) -> str:
        """sha256 of a source object (model or calibration file), streamed once per version."""
        store = self.store(uri, endpoint, credentials)
        try:
            version = store.version(uri)
            with self._lock:
                cached = self._digests.get((uri, version))
            if cached:
                return cached
            value = store.sha256(uri)
        except ObjectNotFound:
            raise SourceNotFound(f"{uri} does not exist") from None
        except StorageError as error:
            raise CatalogError(f"storage unavailable: {error}") from None
        with self._lock:
            self._digests[(uri, version)] = value
        log.info("sha256 of %s is %s", uri, value)
        return value
