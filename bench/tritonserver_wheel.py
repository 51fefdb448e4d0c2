"""A real `tritonserver` on this machine: the binary nvidia-pytriton's wheel embeds (Triton 2.51,
Python backend only), downloaded with pip once and unpacked, not installed (the wheel pins
numpy < 2), into PLANSMITH_CACHE (default /var/cache/plansmith), keyed by the wheel's version.

Used by bench/triton_reference.py (the reference server the serving benchmark compares with) and by
the tests that check plansmith's rendered Triton model repositories against Triton's own validation.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

PYTRITON_VERSION = "0.7.0"
CACHE = Path(os.environ.get("PLANSMITH_CACHE", "/var/cache/plansmith")) / f"triton-reference-{PYTRITON_VERSION}"


def tritonserver_root() -> Path:
    """The unpacked wheel's tritonserver directory (bin/tritonserver, backends/python), fetched once."""
    root = CACHE / "pytriton" / "tritonserver"
    prepared = CACHE / "prepared"  # written last: an interrupted download or unpack is done again
    if not prepared.exists():
        download = CACHE / "download"
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", f"nvidia-pytriton=={PYTRITON_VERSION}",
                        "-d", str(download)], check=True)
        wheel = next(download.glob("nvidia_pytriton-*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(CACHE)
        (root / "bin" / "tritonserver").chmod(0o755)
        stub = root / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}" / "triton_python_backend_stub"
        shutil.copy(stub, root / "backends" / "python" / stub.name)
        (root / "backends" / "python" / stub.name).chmod(0o755)
        prepared.touch()
    return root
