"""Object storage behind one small interface: s3:// (boto3, any S3-compatible endpoint) and file://.

Used by the builder (fetch models, publish engines), the runtime (load engines) and the operator
(look for manifests). Every write is verified by sha256 after upload; reads can verify too.

Errors are typed so callers can tell a retryable outage (`StorageUnavailable`) from a missing
object (`ObjectNotFound`) or corrupted bytes (`IntegrityError`).

Credentials come from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, optionally
AWS_SESSION_TOKEN and AWS_DEFAULT_REGION), as a Kubernetes Secret mounted with envFrom provides
them; the endpoint from the spec, else PLANSMITH_S3_ENDPOINT / AWS_ENDPOINT_URL_S3.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Protocol
from urllib.parse import urlparse

CHUNK = 1 << 20
Progress = Callable[[int], None]


class StorageError(Exception):
    """Base class of storage failures."""


class StorageUnavailable(StorageError):
    """The store could not be reached or refused the request; retrying later may succeed."""


class ObjectNotFound(StorageError):
    """No object at that URI."""


class ObjectExists(StorageError):
    """A write that creates only a missing object found one there."""


class IntegrityError(StorageError):
    """The bytes read or written do not have the expected sha256."""


class InvalidStorageUri(StorageError, ValueError):
    """Not an s3:// or file:// URI."""


def sha256_file(path: Path, progress: Progress | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
            if progress:
                progress(len(chunk))
    return digest.hexdigest()


def join(base: str, *parts: str) -> str:
    """Append path parts to a storage URI: join('s3://b/prefix', 'engines', 'k') -> 's3://b/prefix/engines/k'."""
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


class Store(Protocol):
    def exists(self, uri: str) -> bool: ...
    def read_bytes(self, uri: str) -> bytes: ...
    def download(self, uri: str, dest: Path, progress: Progress | None = None) -> str:
        """Stream the object to `dest`; return its sha256."""
        ...
    def upload(self, src: Path, uri: str, sha256: str, progress: Progress | None = None) -> None:
        """Write `src` to `uri` and verify the stored bytes have `sha256`."""
        ...
    def create(self, src: Path, uri: str, sha256: str) -> bool:
        """Write `src` to `uri` (verified) unless an object is there already: False then, and the
        object there is kept (another writer was first)."""
        ...
    def write_bytes(self, uri: str, data: bytes) -> None: ...
    def delete(self, uri: str) -> None: ...
    def version(self, uri: str) -> str:
        """A token that changes whenever the object's bytes change (ETag+size, mtime+size)."""
        ...
    def sha256(self, uri: str) -> str:
        """sha256 of the object, streamed (nothing written to disk)."""
        ...

    def check_writable(self, uri: str) -> None:
        """Raise StorageUnavailable when objects under the folder `uri` plainly cannot be written
        (a bucket that does not exist, a folder this process cannot create files in); cheap, and
        leaves nothing behind."""
        ...


# --------------------------------------------------------------------------- file://


class FileStore:
    """file:///absolute/path objects; writes go through a temp file and an atomic rename."""

    @staticmethod
    def _path(uri: str) -> Path:
        parsed = urlparse(uri)
        if parsed.scheme != "file" or parsed.netloc not in ("", "localhost"):
            raise InvalidStorageUri(f"not a file:/// URI: {uri}")
        return Path(parsed.path)

    def exists(self, uri: str) -> bool:
        return self._path(uri).is_file()

    def read_bytes(self, uri: str) -> bytes:
        try:
            return self._path(uri).read_bytes()
        except FileNotFoundError:
            raise ObjectNotFound(uri) from None
        except OSError as error:
            raise StorageUnavailable(f"{uri}: {error}") from error

    def download(self, uri: str, dest: Path, progress: Progress | None = None) -> str:
        source = self._path(uri)
        if not source.is_file():
            raise ObjectNotFound(uri)
        digest = hashlib.sha256()
        with open(source, "rb") as src, open(dest, "wb") as out:
            while chunk := src.read(CHUNK):
                out.write(chunk)
                digest.update(chunk)
                if progress:
                    progress(len(chunk))
        return digest.hexdigest()

    def _atomic_write(self, target: Path, fill: Callable[[BinaryIO], None]) -> None:
        """Write through a temp file beside `target`, then rename it into place.

        The temp file is created as open() creates files, with mode 0o666 less the umask (and the
        folder's default ACL), so readers under other uids (a serving pod on a shared volume) can
        read what is published. tempfile.NamedTemporaryFile always creates mode 0o600, and
        computing the mode from os.umask() would mean setting the process-wide umask for a moment,
        which races with files other threads create."""
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".tmp-{target.name}-{secrets.token_hex(8)}"
        descriptor = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with open(descriptor, "wb") as out:
                fill(out)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def upload(self, src: Path, uri: str, sha256: str, progress: Progress | None = None) -> None:
        target = self._path(uri)
        self._atomic_write(target, lambda out: shutil.copyfileobj(open(src, "rb"), out, CHUNK))
        if progress:
            progress(target.stat().st_size)
        if sha256_file(target) != sha256:
            target.unlink(missing_ok=True)
            raise IntegrityError(f"{uri}: stored bytes do not match sha256 {sha256}")

    def create(self, src: Path, uri: str, sha256: str) -> bool:
        """Written beside the target, then hard-linked to it: link() fails when the name exists, so
        of two writers exactly one creates it."""
        target = self._path(uri)
        staged = target.with_name(f".create-{target.name}-{secrets.token_hex(8)}")
        self.upload(src, "file://" + str(staged), sha256)  # as _path reads URIs: not percent-encoded
        try:
            os.link(staged, target)
            return True
        except FileExistsError:
            return False
        finally:
            staged.unlink(missing_ok=True)

    def write_bytes(self, uri: str, data: bytes) -> None:
        self._atomic_write(self._path(uri), lambda out: out.write(data))

    def delete(self, uri: str) -> None:
        self._path(uri).unlink(missing_ok=True)

    def version(self, uri: str) -> str:
        try:
            stat = self._path(uri).stat()
        except FileNotFoundError:
            raise ObjectNotFound(uri) from None
        return f"{stat.st_mtime_ns}:{stat.st_size}"

    def sha256(self, uri: str) -> str:
        path = self._path(uri)
        if not path.is_file():
            raise ObjectNotFound(uri)
        return sha256_file(path)

    def check_writable(self, uri: str) -> None:
        """Create and remove a probe file in the folder `uri`, or in its nearest existing parent when
        the folder does not exist yet (writes create it), so nothing is left behind.

        A probe rather than os.access(W_OK): access() says yes to root for any folder not on a
        read-only mount, /proc included, and yes for a writable regular file in the way of the folder."""
        folder = self._path(uri)
        existing = folder
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        try:
            with tempfile.NamedTemporaryFile(dir=existing, prefix=".plansmith-write-check-"):
                pass
        except OSError as error:
            raise StorageUnavailable(f"{uri}: cannot create files in {existing}: {error}") from None


# --------------------------------------------------------------------------- s3://


@dataclass
class S3Store:
    """s3://bucket/key objects through boto3 against AWS or any S3-compatible endpoint."""

    endpoint: str | None = None
    # explicit credentials (the operator reads them from the model's Secret); default: the environment
    access_key_id: str | None = None
    secret_access_key: str | None = None
    region: str | None = None

    def __post_init__(self) -> None:
        import boto3
        from botocore.config import Config

        endpoint = self.endpoint or os.environ.get("PLANSMITH_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL_S3")
        # boto3 >= 1.36 adds CRC checksums by default, which some S3-compatible stores reject;
        # we verify our own sha256 instead (GUIDE.md §3).
        config = Config(
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=5,
            read_timeout=60,
        )
        self._client = boto3.client(
            "s3", endpoint_url=endpoint, config=config,
            region_name=self.region or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1",
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
        )

    @staticmethod
    def _split(uri: str) -> tuple[str, str]:
        parsed = urlparse(uri)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise InvalidStorageUri(f"not an s3://bucket/key URI: {uri}")
        return parsed.netloc, parsed.path.lstrip("/")

    def _call(self, uri: str, operation: Callable):
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        try:
            return operation()
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code", "")
            if code in ("404", "NoSuchKey", "NotFound"):
                raise ObjectNotFound(uri) from None
            if code == "NoSuchBucket":
                raise ObjectNotFound(f"{uri}: bucket does not exist") from None
            if code in ("PreconditionFailed", "ConditionalRequestConflict"):  # a conditional write lost
                raise ObjectExists(uri) from None
            raise StorageUnavailable(f"{uri}: {code or 'error'}: {error}") from None
        except NoCredentialsError:
            raise StorageUnavailable(f"{uri}: no S3 credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)") from None
        except BotoCoreError as error:
            raise StorageUnavailable(f"{uri}: {error}") from None

    def exists(self, uri: str) -> bool:
        bucket, key = self._split(uri)
        try:
            self._call(uri, lambda: self._client.head_object(Bucket=bucket, Key=key))
            return True
        except ObjectNotFound:
            return False

    def read_bytes(self, uri: str) -> bytes:
        bucket, key = self._split(uri)
        response = self._call(uri, lambda: self._client.get_object(Bucket=bucket, Key=key))
        return self._call(uri, lambda: response["Body"].read())

    def download(self, uri: str, dest: Path, progress: Progress | None = None) -> str:
        bucket, key = self._split(uri)
        response = self._call(uri, lambda: self._client.get_object(Bucket=bucket, Key=key))
        digest = hashlib.sha256()

        def stream() -> None:
            with open(dest, "wb") as out:
                for chunk in response["Body"].iter_chunks(CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    if progress:
                        progress(len(chunk))

        self._call(uri, stream)
        return digest.hexdigest()

    def upload(self, src: Path, uri: str, sha256: str, progress: Progress | None = None) -> None:
        self._put(src, uri, sha256)
        if progress:
            progress(src.stat().st_size)
        if self._stored_sha256(uri) != sha256:
            self.delete(uri)
            raise IntegrityError(f"{uri}: stored bytes do not match sha256 {sha256}")

    def create(self, src: Path, uri: str, sha256: str) -> bool:
        """PutObject with If-None-Match: * (S3's conditional write): refused with 412 when the key
        exists. A store that ignores the header (older S3-compatible servers) overwrites instead;
        the artifacts a manifest names are content-addressed, so it still describes stored bytes."""
        try:
            self._put(src, uri, sha256, IfNoneMatch="*")
        except ObjectExists:
            return False
        return True

    def _put(self, src: Path, uri: str, sha256: str, **conditions: str) -> None:
        """PutObject of `src` with its sha256: ChecksumSHA256 makes the server reject bytes that
        arrive corrupted, and the metadata keeps it for readers."""
        import base64

        bucket, key = self._split(uri)
        checksum = base64.b64encode(bytes.fromhex(sha256)).decode()
        with open(src, "rb") as body:
            self._call(uri, lambda: self._client.put_object(Bucket=bucket, Key=key, Body=body, ChecksumSHA256=checksum,
                                                            Metadata={"sha256": sha256}, **conditions))

    def _stored_sha256(self, uri: str) -> str:
        """The sha256 of what is stored now: the server's own SHA256 checksum where the store keeps
        one (AWS, moto, MinIO), else computed by reading the object back."""
        import base64

        bucket, key = self._split(uri)
        head = self._call(uri, lambda: self._client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED"))
        if head.get("ChecksumSHA256") and "-" not in head["ChecksumSHA256"]:
            return base64.b64decode(head["ChecksumSHA256"]).hex()
        with tempfile.NamedTemporaryFile() as check:
            return self.download(uri, Path(check.name))

    def write_bytes(self, uri: str, data: bytes) -> None:
        bucket, key = self._split(uri)
        self._call(uri, lambda: self._client.put_object(Bucket=bucket, Key=key, Body=data))

    def delete(self, uri: str) -> None:
        bucket, key = self._split(uri)
        self._call(uri, lambda: self._client.delete_object(Bucket=bucket, Key=key))

    def version(self, uri: str) -> str:
        bucket, key = self._split(uri)
        head = self._call(uri, lambda: self._client.head_object(Bucket=bucket, Key=key))
        return f"{head.get('ETag', '')}:{head.get('ContentLength')}"

    def sha256(self, uri: str) -> str:
        bucket, key = self._split(uri)
        response = self._call(uri, lambda: self._client.get_object(Bucket=bucket, Key=key))
        digest = hashlib.sha256()

        def stream() -> None:
            for chunk in response["Body"].iter_chunks(CHUNK):
                digest.update(chunk)

        self._call(uri, stream)
        return digest.hexdigest()

    def check_writable(self, uri: str) -> None:
        """HeadBucket: the bucket exists and answers these credentials; it writes nothing.

        It needs s3:ListBucket, which telling a missing object (404) from a refused one (403) on
        reads already needs. A bucket whose policy refuses PutObject alone is found only at upload."""
        bucket, _ = self._split(uri)
        try:
            self._call(uri, lambda: self._client.head_bucket(Bucket=bucket))
        except ObjectNotFound:
            raise StorageUnavailable(f"{uri}: bucket {bucket} does not exist") from None


def open_store(uri: str, endpoint: str | None = None) -> Store:
    """The store for a URI's scheme."""
    scheme = urlparse(uri).scheme
    if scheme == "s3":
        return S3Store(endpoint=endpoint)
    if scheme == "file":
        return FileStore()
    raise InvalidStorageUri(f"storage URIs must be s3:// or file://, got {uri!r}")
