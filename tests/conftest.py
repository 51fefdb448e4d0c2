"""Session-wide real services: a Kubernetes v1.20.2 control plane and an S3 endpoint, on loopback.

Tests that use `control_plane` (or anything built on it) are marked `controlplane`, those that use
`s3_server` are marked `s3`, so `pytest -m "not controlplane"` runs the fast unit tests alone.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SERVICE_MARKERS = {"control_plane": "controlplane", "s3_server": "s3"}


def pytest_collection_modifyitems(items):
    for item in items:
        for fixture, marker in SERVICE_MARKERS.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(getattr(pytest.mark, marker))


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
