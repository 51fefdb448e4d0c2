"""Session-wide real services: a Kubernetes v1.20.2 control plane and an S3 endpoint, on loopback.

Tests that use `control_plane` (or anything built on it) are marked `controlplane`, those that use
`s3_server` are marked `s3`, so `pytest -m "not controlplane"` runs the fast unit tests alone.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SERVICE_MARKERS = {"control_plane": "controlplane", "s3_server": "s3", "dev_cluster": "cluster"}
# the dev cluster runs a control plane and S3 too: `-m "not controlplane and not s3"` skips it
IMPLIED_MARKERS = {"cluster": ("controlplane", "s3")}


def pytest_collection_modifyitems(items):
    for item in items:
        for fixture, marker in SERVICE_MARKERS.items():
            if fixture in getattr(item, "fixturenames", ()):
                for name in (marker, *IMPLIED_MARKERS.get(marker, ())):
                    item.add_marker(getattr(pytest.mark, name))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory):
    from plansmith.devcluster.controlplane import ControlPlane

    plane = ControlPlane(tmp_path_factory.mktemp("control-plane")).start()
    yield plane
    plane.stop()


@pytest.fixture(scope="session")
def kube_client(control_plane):
    """A kubernetes.client.ApiClient authenticated as cluster admin."""
    from kubernetes import client, config

    api = config.new_client_from_config(config_file=str(control_plane.kubeconfig))
    yield api
    api.close()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    from plansmith.devcluster.s3 import S3Server

    server = S3Server(tmp_path_factory.mktemp("s3")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def dev_cluster():
    """The local cluster with real pods (`plansmith dev-cluster up`): reused when already up (and
    then left running), otherwise started for this session and stopped at its end."""
    from plansmith.devcluster import cluster

    running = cluster.status()
    started = running is None
    dev = running or cluster.up(say=lambda line: print(line, flush=True))
    if running:
        cluster.refresh_images(dev)  # the plansmith images follow the working tree
    yield dev
    if started:
        cluster.down(say=lambda _: None)
