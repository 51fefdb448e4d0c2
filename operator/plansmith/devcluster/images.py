"""Container images for the local cluster, built without a registry or a container engine.

    pause      a static C `pause` binary in a one-layer image (containerd's sandbox image)
    python     Debian bookworm minbase + python3 + pip + tini (debootstrap), for plain test pods
    plansmith  python + a dependency layer + a source layer, tagged three ways
               (operator, builder, runtime): ONE root filesystem with every extra installed,
               different entrypoints. A code change rebuilds only the source layer.

Every layer is cached under $PLANSMITH_CACHE/images (default /var/cache/plansmith/images), keyed
by the sha256 of what went into it, so a fresh clone on the same machine reuses them. Python
packages are fetched on the host into a wheelhouse (the host's pip already trusts this network's
TLS interception) and installed offline inside the image with the image's own pip (chroot on an
overlayfs mount whose upper directory becomes the layer).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from plansmith.devcluster.binaries import REPO_ROOT
from plansmith.devcluster.oci import ImageConfig, Layer, layer_from_file, write_archive, write_layer

log = logging.getLogger(__name__)

RECIPE_VERSION = "1"  # bump when a build step below changes what ends up in a layer
SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-pip", "ca-certificates", "tini")
EXTRAS = ("operator", "builder", "runtime")
IMAGE_ENV = {"PYTHONUNBUFFERED": "1", "PIP_BREAK_SYSTEM_PACKAGES": "1"}

PAUSE_REF = "docker.io/plansmith/pause:3.2"
PYTHON_REF = "docker.io/plansmith/python:dev"
# the names the chart and the operator use; entrypoints as in the Dockerfiles (`plansmith operator`,
# `plansmith build`, `plansmith serve`) under tini, which reaps and forwards SIGTERM (python as
# PID 1 ignores it, so every pod would wait out its grace period)
PLANSMITH_IMAGES = {
    "operator": ImageConfig("docker.io/plansmith/operator:dev", ["tini", "--", "plansmith", "operator"], env=IMAGE_ENV),
    "builder": ImageConfig("docker.io/plansmith/builder:dev", ["tini", "--", "plansmith", "build"], env=IMAGE_ENV),
    "runtime": ImageConfig("docker.io/plansmith/runtime:dev", ["tini", "--", "plansmith", "serve"], env=IMAGE_ENV),
}
SOURCE_DIRS = ("operator", "builder-image", "runtime-image")

PAUSE_C = r"""
#include <signal.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
static void on_term(int s) { (void)s; _exit(0); }
static void on_chld(int s) { (void)s; while (waitpid(-1, NULL, WNOHANG) > 0) {} }
int main(void) {
  struct sigaction sa; memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_term; sigaction(SIGINT, &sa, NULL); sigaction(SIGTERM, &sa, NULL);
  sa.sa_handler = on_chld; sa.sa_flags = SA_NOCLDSTOP; sigaction(SIGCHLD, &sa, NULL);
  for (;;) pause();
}
"""


class ImageBuildFailed(RuntimeError):
    """A step of an image build failed; the message quotes the command's output."""


def cache_root() -> Path:
    return Path(os.environ.get("PLANSMITH_CACHE", "/var/cache/plansmith")) / "images"


def content_key(*parts: object) -> str:
    return hashlib.sha256(json.dumps([RECIPE_VERSION, *parts], sort_keys=True, default=str).encode()).hexdigest()[:16]


def _run(argv: list[str], *, what: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=cwd)
    if result.returncode != 0:
        raise ImageBuildFailed(f"{what} failed ({' '.join(argv[:4])} ...):\n{(result.stdout + result.stderr)[-4000:]}")
    return result.stdout


@dataclass(frozen=True)
class CachedLayer:
    """A layer tar plus, for layers later builds stack on, the directory it was made from."""

    folder: Path

    @property
    def tar(self) -> Path:
        return self.folder / "layer.tar"

    @property
    def tree(self) -> Path:
        return self.folder / "tree"

    @property
    def complete(self) -> bool:
        return (self.folder / ".complete").exists()

    def layer(self) -> Layer:
        digest_file = self.folder / "digest"
        if digest_file.exists():
            digest, size = digest_file.read_text().split()
            return Layer(self.tar, digest, int(size))
        layer = layer_from_file(self.tar)
        digest_file.write_text(f"{layer.digest} {layer.size}")
        return layer

    def seal(self) -> None:
        self.layer()
        (self.folder / ".complete").touch()


# ---------------------------------------------------------------- pause


def pause_archive() -> Path:
    """The sandbox ("pause") image as an OCI archive, compiled from PAUSE_C once per content."""
    folder = cache_root() / f"pause-{content_key(PAUSE_C, PAUSE_REF)}"
    archive = folder / "image.tar"
    if archive.exists():
        return archive
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as work:
        rootfs = Path(work) / "rootfs"
        rootfs.mkdir()
        source = Path(work) / "pause.c"
        source.write_text(PAUSE_C)
        _run(["gcc", "-Os", "-static", "-s", "-o", str(rootfs / "pause"), str(source)], what="compiling pause")
        layer = write_layer(rootfs, folder / "layer.tar")
        write_archive(archive, [layer], [ImageConfig(PAUSE_REF, ["/pause"])])
    return archive


# ---------------------------------------------------------------- python base


def debian_mirror() -> str:
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.exists():
        for line in sources.read_text().splitlines():
            if line.startswith("URIs:"):
                return line.split()[1]
    return "http://deb.debian.org/debian"


def base_layer() -> CachedLayer:
    """Debian minbase with python3, pip and tini: the root filesystem every image starts from."""
    cached = CachedLayer(cache_root() / f"base-{content_key(SUITE, BASE_PACKAGES)}")
    if cached.complete:
        return cached
    shutil.rmtree(cached.folder, ignore_errors=True)
    cached.folder.mkdir(parents=True)
    started = time.monotonic()
    log.info("building the Debian %s base root filesystem with debootstrap (2-3 minutes, once)", SUITE)
    argv = ["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", SUITE,
            str(cached.tree), debian_mirror()]
    for attempt in range(3):
        try:
            _run(argv, what="debootstrap")
            break
        except ImageBuildFailed:
            shutil.rmtree(cached.tree, ignore_errors=True)
            if attempt == 2:
                raise
            time.sleep(5)
    for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for entry in (cached.tree / junk).glob("*"):
            if entry.is_file():
                entry.unlink()
    write_layer(cached.tree, cached.tar)
    cached.seal()
    log.info("base root filesystem ready in %.0f s", time.monotonic() - started)
    return cached


def python_archive() -> Path:
    base = base_layer()
    archive = base.folder / "python-image.tar"
    if not archive.exists():
        write_archive(archive, [base.layer()], [ImageConfig(PYTHON_REF, cmd=["python3"], env=IMAGE_ENV)])
    return archive


# ---------------------------------------------------------------- plansmith


def requirements(pyproject: Path = REPO_ROOT / "pyproject.toml") -> list[str]:
    """plansmith's dependencies with the operator, builder and runtime extras (not dev)."""
    project = tomllib.loads(pyproject.read_text())["project"]
    found = list(project.get("dependencies", []))
    for extra in EXTRAS:
        found += [r for r in project.get("optional-dependencies", {}).get(extra, []) if not r.startswith("plansmith")]
    return sorted(set(found))


def wheelhouse(reqs: list[str]) -> Path:
    """Wheels for `reqs` (and everything they pull), fetched once on the host."""
    folder = cache_root() / f"wheels-{content_key(reqs, sys.version_info[:2])}"
    if (folder / ".complete").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    log.info("fetching wheels for %d requirements into %s", len(reqs), folder)
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--wheel-dir", str(folder), *reqs], what="pip wheel")
    (folder / ".complete").touch()
    return folder


@contextmanager
def overlay(lower: list[Path], upper: Path) -> Iterator[Path]:
    """`lower` (top first) + writable `upper`, mounted on a temporary folder; unmounted on exit."""
    upper.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=upper.parent) as scratch:
        work, merged = Path(scratch) / "work", Path(scratch) / "merged"
        work.mkdir()
        merged.mkdir()
        options = f"lowerdir={':'.join(map(str, lower))},upperdir={upper},workdir={work}"
        _run(["mount", "-t", "overlay", "overlay", "-o", options, str(merged)], what="mounting overlayfs")
        try:
            yield merged
        finally:
            subprocess.run(["umount", str(merged)], check=False)
            shutil.rmtree(work, ignore_errors=True)


def _pip_in_image(root: Path, args: list[str]) -> None:
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/root", "LANG": "C.UTF-8",
           "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_CACHE_DIR": "1", "PIP_BREAK_SYSTEM_PACKAGES": "1"}
    _run([shutil.which("chroot") or "/usr/sbin/chroot", str(root), "python3", "-m", "pip", "install", "-q", "--no-index", *args], env=env,
         what="pip install inside the image")


def _with_files_in(root: Path, files: list[Path], install: list[str]) -> None:
    """Copy `files` into root/tmp/plansmith-build, run pip there with `install`, remove them again."""
    inbox = root / "tmp" / "plansmith-build"
    inbox.mkdir(parents=True)
    try:
        for f in files:
            (shutil.copytree if f.is_dir() else shutil.copy2)(f, inbox / f.name)
        _pip_in_image(root, install)
    finally:
        shutil.rmtree(inbox, ignore_errors=True)


def dependency_layer(base: CachedLayer) -> CachedLayer:
    reqs = requirements()
    wheels = wheelhouse(reqs)
    wheel_names = sorted(p.name for p in wheels.glob("*.whl"))
    cached = CachedLayer(cache_root() / f"deps-{content_key(base.folder.name, reqs, wheel_names)}")
    if cached.complete:
        return cached
    shutil.rmtree(cached.folder, ignore_errors=True)
    cached.folder.mkdir(parents=True)
    started = time.monotonic()
    (cached.folder / "requirements.txt").write_text("\n".join(reqs) + "\n")
    with overlay([base.tree], cached.tree) as root:
        _with_files_in(root, [wheels, cached.folder / "requirements.txt"],
                       ["--find-links", f"/tmp/plansmith-build/{wheels.name}",
                        "-r", "/tmp/plansmith-build/requirements.txt"])
    write_layer(cached.tree, cached.tar)
    cached.seal()
    log.info("dependency layer ready in %.0f s", time.monotonic() - started)
    _prune(cache_root(), "deps-*", keep=2)  # a dependency change makes a new one (about 1 GiB each)
    _prune(cache_root(), "wheels-*", keep=2)
    return cached


def source_digest(repo: Path = REPO_ROOT) -> str:
    """sha256 over plansmith's source files (what the source layer installs)."""
    digest = hashlib.sha256((repo / "pyproject.toml").read_bytes())
    for top in SOURCE_DIRS:
        for path in sorted((repo / top).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and ".egg-info" not in str(path):
                digest.update(str(path.relative_to(repo)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def source_layer(base: CachedLayer, deps: CachedLayer) -> CachedLayer:
    cached = CachedLayer(cache_root() / "source" / f"src-{content_key(deps.folder.name, source_digest())}")
    if cached.complete:
        return cached
    shutil.rmtree(cached.folder, ignore_errors=True)
    cached.folder.mkdir(parents=True)
    with tempfile.TemporaryDirectory(dir=cached.folder) as scratch:
        # the image's own pip builds and installs a copy of the source (its setuptools and wheel
        # come with Debian's python3-pip), so the host needs no build tools
        source = Path(scratch) / "plansmith-src"
        ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
        source.mkdir()
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(REPO_ROOT / name, source / name)
        for top in SOURCE_DIRS:
            shutil.copytree(REPO_ROOT / top, source / top, ignore=ignore)
        with overlay([deps.tree, base.tree], cached.tree) as root:
            _with_files_in(root, [source], ["--no-deps", "--no-build-isolation", "/tmp/plansmith-build/plansmith-src"])
    write_layer(cached.tree, cached.tar)
    shutil.rmtree(cached.tree)  # nothing stacks on the source layer
    cached.seal()
    _prune(cache_root() / "source", "src-*", keep=3)  # each code change makes a new one
    return cached


def _prune(folder: Path, pattern: str, keep: int) -> None:
    """Remove all but the `keep` most recently built cache entries matching `pattern`."""
    for old in sorted(folder.glob(pattern), key=lambda p: p.stat().st_mtime)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def plansmith_archive() -> Path:
    """operator, builder and runtime images (one filesystem, three entrypoints) as one OCI archive."""
    base = base_layer()
    deps = dependency_layer(base)
    source = source_layer(base, deps)
    archive = source.folder / f"plansmith-images-{content_key(list(PLANSMITH_IMAGES.values()))}.tar"
    if not archive.exists():
        write_archive(archive, [base.layer(), deps.layer(), source.layer()], list(PLANSMITH_IMAGES.values()))
    return archive
