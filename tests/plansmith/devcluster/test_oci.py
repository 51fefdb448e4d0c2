"""OCI archives written by plansmith: what `ctr images import` reads must be self-consistent
(digests, diff_ids, names), and overlayfs whiteouts must become OCI whiteouts."""

from __future__ import annotations

import hashlib
import json
import os
import tarfile

import pytest

from plansmith.devcluster.oci import ImageConfig, write_archive, write_layer


def blob(archive: tarfile.TarFile, digest: str) -> bytes:
    return archive.extractfile(f"blobs/sha256/{digest.removeprefix('sha256:')}").read()


def test_layer_is_root_owned_and_turns_overlay_whiteouts_into_oci_whiteouts(tmp_path):
    tree = tmp_path / "upper"
    (tree / "usr" / "bin").mkdir(parents=True)
    (tree / "usr" / "bin" / "tool").write_text("#!/bin/sh\n")
    os.chown(tree / "usr" / "bin" / "tool", 1234, 1234)
    (tree / "proc").mkdir()
    (tree / "proc" / "junk").write_text("never in a layer")
    if os.geteuid() != 0:
        pytest.skip("creating a whiteout device needs root")
    os.mknod(tree / "usr" / "bin" / "gone", 0o600 | 0o020000, os.makedev(0, 0))  # overlayfs: file deleted

    layer = write_layer(tree, tmp_path / "layer.tar")

    assert layer.digest == "sha256:" + hashlib.sha256(layer.path.read_bytes()).hexdigest()
    with tarfile.open(layer.path) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert "usr/bin/.wh.gone" in members and members["usr/bin/.wh.gone"].isfile()
    assert "usr/bin/gone" not in members
    assert members["usr/bin/tool"].uid == 0 and members["usr/bin/tool"].gid == 0
    assert "proc" in members and "proc/junk" not in members


def test_archive_names_every_image_and_its_blobs_match_their_digests(tmp_path):
    tree = tmp_path / "rootfs"
    tree.mkdir()
    (tree / "hello").write_text("hi")
    layer = write_layer(tree, tmp_path / "layer.tar")
    images = [ImageConfig("docker.io/plansmith/a:dev", ["tini", "--", "plansmith", "a"], env={"X": "1"}),
              ImageConfig("docker.io/plansmith/b:dev", ["tini", "--", "plansmith", "b"])]

    out = write_archive(tmp_path / "images.tar", [layer], images)

    with tarfile.open(out) as archive:
        assert json.loads(archive.extractfile("oci-layout").read()) == {"imageLayoutVersion": "1.0.0"}
        index = json.loads(archive.extractfile("index.json").read())
        names = [m["annotations"]["io.containerd.image.name"] for m in index["manifests"]]
        assert names == ["docker.io/plansmith/a:dev", "docker.io/plansmith/b:dev"]
        entrypoints = []
        for descriptor in index["manifests"]:
            manifest_bytes = blob(archive, descriptor["digest"])
            assert descriptor["size"] == len(manifest_bytes)
            manifest = json.loads(manifest_bytes)
            assert [l["digest"] for l in manifest["layers"]] == [layer.digest]
            assert hashlib.sha256(blob(archive, layer.digest)).hexdigest() == layer.digest.removeprefix("sha256:")
            config = json.loads(blob(archive, manifest["config"]["digest"]))
            assert config["rootfs"]["diff_ids"] == [layer.digest]
            entrypoints.append(config["config"]["Entrypoint"])
        assert entrypoints == [["tini", "--", "plansmith", "a"], ["tini", "--", "plansmith", "b"]]
        assert "X=1" in json.loads(blob(archive, json.loads(blob(archive, index["manifests"][0]["digest"]))
                                        ["config"]["digest"]))["config"]["Env"]
