"""Where the Kubernetes binaries come from: built once from Debian's source package and cached."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]
BUILD_SCRIPT = REPO_ROOT / "deploy" / "local" / "kubernetes-binaries.sh"
REQUIRED = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")


class BinariesUnavailable(RuntimeError):
    """The Kubernetes binaries are missing and could not be built."""


def kubernetes_bin_dir() -> Path:
    """The folder with kube-apiserver & co: $PLANSMITH_K8S_BIN, else built/cached by the repo script."""
    override = os.environ.get("PLANSMITH_K8S_BIN")
    if override:
        folder = Path(override)
    else:
        if not BUILD_SCRIPT.exists():
            raise BinariesUnavailable(f"{BUILD_SCRIPT} not found; set PLANSMITH_K8S_BIN")
        result = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True)
        if result.returncode != 0:
            raise BinariesUnavailable(f"building Kubernetes binaries failed:\n{result.stderr[-4000:]}")
        folder = Path(result.stdout.strip().splitlines()[-1])
    missing = [name for name in REQUIRED if not (folder / name).exists()]
    if missing:
        raise BinariesUnavailable(f"{folder} lacks {', '.join(missing)}")
    return folder


def etcd_binary() -> Path:
    found = shutil.which("etcd")
    if not found:
        raise BinariesUnavailable("etcd not found (apt-get install etcd-server)")
    return Path(found)
