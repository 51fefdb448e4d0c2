"""ONNX Runtime's execution providers, as the builder and the runtime both use them.

The CUDA execution provider needs NVIDIA's CUDA and cuDNN libraries. Where onnxruntime-gpu and
NVIDIA's wheels (nvidia-cublas, nvidia-cudnn-cu13, ...) sit in different site-packages folders
(a target folder on PYTHONPATH next to a virtual environment, as on the project's GPU machine),
ONNX Runtime's own `preload_dlls()` does not find them and the CUDA provider fails to load;
`preload_cuda_libraries` hands it each folder of those libraries instead (see `cuda_library_dirs`).
And when a provider cannot load, ONNX Runtime falls back to the CPU with only a log line:
`check_providers` turns that into an error.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import sys
from pathlib import Path
from typing import Iterable

log = logging.getLogger(__name__)


class ProviderUnavailable(Exception):
    """The session does not run on the execution provider it was made for."""


CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"

# The first library of each kind that ONNX Runtime's CUDA provider links against (Linux names).
CUDA_LIBRARY_PREFIXES = ("libcublasLt.so", "libcublas.so", "libcudart.so", "libcurand.so", "libcufft.so", "libnvrtc.so")
CUDNN_LIBRARY_PREFIX = "libcudnn.so"


# CUDA provider options, measured on an H200 with ResNet-50 (docs/benchmarks.md, "GPU (issue 7)"):
# - cudnn_conv_algo_search HEURISTIC instead of ONNX Runtime's default EXHAUSTIVE, which times every
#   cuDNN algorithm of every convolution when the input shape changes; at batch sizes varying from run
#   to run (as the dynamic batcher forms them) the fp16 engine ran 28-36 images/s with EXHAUSTIVE
#   (slowest run 1.1-1.5 s) and 191-265 with HEURISTIC: better, but still far below the 11,000 images/s
#   of a fixed batch of 64, and not because a size is new (it stayed so with every size run before):
#   each change of shape costs the convolutions about 0.1 s (see the doc for what to try next).
# - prefer_nhwc: convolutions in NHWC, the tensor cores' layout: fp16 batch 64 11,055 images/s
#   against 8,818 with EXHAUSTIVE and NCHW, batch 1 p50 1.21 ms against 1.41-2.17 ms.
CUDA_PROVIDER_OPTIONS = {"cudnn_conv_algo_search": "HEURISTIC", "prefer_nhwc": "1"}


def cuda_library_dirs(nvidia_roots: Iterable[Path]) -> list[tuple[Path, bool, bool]]:
    """(folder, has CUDA libraries, has cuDNN) for each `lib` folder of NVIDIA's wheels under the
    given `nvidia` package folders: CUDA 13's consolidated `nvidia/cu13/lib`, CUDA 12's
    `nvidia/cublas/lib`, ..., and `nvidia/cudnn/lib`. Folders with neither are left out."""
    found: list[tuple[Path, bool, bool]] = []
    seen: set[Path] = set()
    for root in nvidia_roots:
        root = Path(root)
        if not root.is_dir():
            continue
        for lib in sorted(root.glob("*/lib")):
            if lib in seen or not lib.is_dir():
                continue
            seen.add(lib)
            names = [entry.name for entry in lib.iterdir()]
            cuda = any(name.startswith(CUDA_LIBRARY_PREFIXES) for name in names)
            cudnn = any(name.startswith(CUDNN_LIBRARY_PREFIX) for name in names)
            if cuda or cudnn:
                found.append((lib, cuda, cudnn))
    return found


def nvidia_package_roots() -> list[Path]:
    """Every `nvidia` package folder on sys.path (a namespace package may have several)."""
    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        return []
    if spec is None or spec.submodule_search_locations is None:
        return []
    return [Path(location) for location in spec.submodule_search_locations]


_preloaded = False


def preload_cuda_libraries() -> list[Path]:
    """Load the CUDA and cuDNN libraries the CUDA provider needs, once per process; the folders
    used. Without NVIDIA's wheels on sys.path, ONNX Runtime's default search (its own site-packages,
    then the system's library path) is used. Never raises: a provider that still cannot load is
    reported by the session (see `check_providers`)."""
    global _preloaded
    if _preloaded:
        return []
    _preloaded = True
    try:
        import onnxruntime as ort
    except ImportError:
        return []
    preload = getattr(ort, "preload_dlls", None)  # onnxruntime >= 1.21
    if preload is None or CUDA_PROVIDER not in ort.get_available_providers():
        return []
    folders = cuda_library_dirs(nvidia_package_roots())
    # preload_dlls reports failures with print(); stdout is reserved for results (plansmith build)
    with contextlib.redirect_stdout(sys.stderr):
        try:
            if not folders:
                preload()
            for folder, cuda, cudnn in folders:
                preload(cuda=cuda, cudnn=cudnn, msvc=False, directory=str(folder))
        except Exception as error:  # a broken or unexpected layout: the session will say what is missing
            log.warning("could not preload the CUDA libraries: %s", error)
    return [folder for folder, _, _ in folders]


def check_providers(wanted: str, active: list[str]) -> None:
    """ONNX Runtime falls back to the CPU, with only a log line, when a provider cannot load
    (missing CUDA libraries, no GPU): a session meant for `wanted` that does not run on it is an error."""
    if not active or active[0] != wanted:
        raise ProviderUnavailable(f"execution provider {wanted} is not active (the session has {active}); "
                            "for CUDAExecutionProvider: onnxruntime-gpu with the CUDA and cuDNN libraries of its "
                            "CUDA version, and a visible GPU")
