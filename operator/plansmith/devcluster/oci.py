"""OCI image archives written by plansmith itself, for `ctr images import` (no registry, no buildah).

An image here is a list of uncompressed layer tars plus a config; `write_archive` packs one or more
images sharing those layers into one OCI image-layout tar. Layers are made from directories with
`write_layer`; an overlayfs upper directory is accepted as is (its whiteouts, character devices
0:0, become OCI `.wh.` entries).

Hand-written rather than through a library: the layout is four small JSON documents
(https://github.com/opencontainers/image-spec/blob/main/image-layout.md) and the only Python
libraries for it pull a registry client along.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar"
MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# never part of a layer: the runtime mounts its own /proc, /sys and /dev
SKIPPED_TOP_LEVEL_CONTENT = ("proc", "sys", "dev", "run")


@dataclass(frozen=True)
class Layer:
    path: Path
    digest: str  # sha256:<hex> of the uncompressed tar (also its diff_id)
    size: int


@dataclass(frozen=True)
class ImageConfig:
    ref: str  # e.g. docker.io/plansmith/runtime:dev
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = "/"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def layer_from_file(path: Path) -> Layer:
    return Layer(path, sha256_file(path), path.stat().st_size)


def _normalise(info: tarfile.TarInfo) -> tarfile.TarInfo:
    """Root-owned, reproducible entries."""
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mtime = min(int(info.mtime), 2_000_000_000)
    return info


def _is_overlay_whiteout(info: tarfile.TarInfo) -> bool:
    return info.ischr() and info.devmajor == 0 and info.devminor == 0


def _whiteout(name: str) -> tarfile.TarInfo:
    head, _, base = name.rpartition("/")
    info = tarfile.TarInfo(f"{head}/.wh.{base}" if head else f".wh.{base}")
    info.mode = 0o644
    return info


def write_layer(source: Path, out: Path) -> Layer:
    """Tar `source` (a root filesystem or an overlayfs upper dir) into `out` as one layer."""
    source = Path(source)
    tmp = out.with_name(out.name + ".tmp")
    whiteouts: list[str] = []

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        if _is_overlay_whiteout(info):  # added below as an empty .wh. file
            whiteouts.append(info.name)
            return None
        return _normalise(info)

    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as layer:
        for top in sorted(os.listdir(source)):
            full = source / top
            skip_content = top in SKIPPED_TOP_LEVEL_CONTENT and full.is_dir() and not full.is_symlink()
            layer.add(full, arcname=top, recursive=not skip_content, filter=keep)
        for name in whiteouts:
            layer.addfile(_whiteout(name), io.BytesIO(b""))
        for opaque in _opaque_dirs(source):
            layer.addfile(tarfile.TarInfo(f"{opaque}/.wh..wh..opq"), io.BytesIO(b""))
    os.replace(tmp, out)
    return layer_from_file(out)


def _opaque_dirs(source: Path) -> list[str]:
    """Directories overlayfs marked opaque (replaced wholesale in the upper layer)."""
    found = []
    for root, dirs, _ in os.walk(source):
        for name in dirs:
            path = os.path.join(root, name)
            try:
                if os.getxattr(path, "trusted.overlay.opaque", follow_symlinks=False) == b"y":
                    found.append(os.path.relpath(path, source))
            except OSError:
                continue
    return found


def _config_document(image: ImageConfig, layers: list[Layer]) -> dict:
    env = {"PATH": DEFAULT_PATH, **image.env}
    config: dict = {"Env": [f"{k}={v}" for k, v in env.items()], "WorkingDir": image.workdir}
    if image.entrypoint:
        config["Entrypoint"] = image.entrypoint
    if image.cmd:
        config["Cmd"] = image.cmd
    return {
        "architecture": "amd64",
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [layer.digest for layer in layers]},
    }


def _tag_of(ref: str) -> str:
    last = ref.rsplit("/", 1)[-1]
    return last.rsplit(":", 1)[1] if ":" in last else "latest"


def write_archive(out: Path, layers: list[Layer], images: list[ImageConfig]) -> Path:
    """One OCI image-layout tar holding every image in `images`, all made of `layers`."""
    tmp = out.with_name(out.name + ".tmp")
    with tarfile.open(tmp, "w") as archive:
        def add_bytes(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            archive.addfile(info, io.BytesIO(data))

        def add_blob(data: bytes) -> dict:
            digest = hashlib.sha256(data).hexdigest()
            add_bytes(f"blobs/sha256/{digest}", data)
            return {"digest": f"sha256:{digest}", "size": len(data)}

        for layer in layers:
            archive.add(layer.path, arcname=f"blobs/sha256/{layer.digest.removeprefix('sha256:')}")
        index = []
        for image in images:
            config = add_blob(json.dumps(_config_document(image, layers), sort_keys=True).encode())
            manifest = add_blob(json.dumps({
                "schemaVersion": 2,
                "mediaType": MANIFEST_MEDIA_TYPE,
                "config": {"mediaType": CONFIG_MEDIA_TYPE, **config},
                "layers": [{"mediaType": LAYER_MEDIA_TYPE, "digest": l.digest, "size": l.size} for l in layers],
            }, sort_keys=True).encode())
            index.append({
                "mediaType": MANIFEST_MEDIA_TYPE, **manifest,
                "platform": {"architecture": "amd64", "os": "linux"},
                "annotations": {"io.containerd.image.name": image.ref,
                                "org.opencontainers.image.ref.name": _tag_of(image.ref)},
            })
        add_bytes("oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        add_bytes("index.json", json.dumps({"schemaVersion": 2, "manifests": index}).encode())
    os.replace(tmp, out)
    return out

