"""Fixtures for the deploy/ tests: helm and the kubectl 1.20 binary from the cached Kubernetes build."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def helm() -> Path:
    from plansmith.devcluster.helm import helm_binary

    return helm_binary()


@pytest.fixture(scope="session")
def kubectl_bin() -> Path:
    from plansmith.devcluster.binaries import kubernetes_bin_dir

    return kubernetes_bin_dir() / "kubectl"
