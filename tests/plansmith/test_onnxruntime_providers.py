"""ONNX Runtime's execution providers (plansmith.onnxruntime_providers): finding NVIDIA's CUDA and
cuDNN libraries across site-packages folders, and refusing a session that fell back to the CPU."""

import pytest

from plansmith.onnxruntime_providers import ProviderUnavailable, check_providers, cuda_library_dirs


def _touch(folder, *names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")


def test_cuda_library_dirs_finds_cuda13_cuda12_and_cudnn_layouts(tmp_path):
    venv = tmp_path / "venv" / "nvidia"  # CUDA 13: one consolidated folder, cuDNN apart
    _touch(venv / "cu13" / "lib", "libcublasLt.so.13", "libcublas.so.13", "libcudart.so.13")
    _touch(venv / "cudnn" / "lib", "libcudnn.so.9", "libcudnn_ops.so.9")
    _touch(venv / "nccl" / "lib", "libnccl.so.2")  # neither: left out
    _touch(venv / "cudnn" / "include", "cudnn.h")
    older = tmp_path / "other-site" / "nvidia"  # CUDA 12: a folder per component
    _touch(older / "cublas" / "lib", "libcublas.so.12")
    _touch(older / "curand" / "lib", "libcurand.so.10")

    found = cuda_library_dirs([venv, older, tmp_path / "missing" / "nvidia"])

    assert found == [
        (venv / "cu13" / "lib", True, False),
        (venv / "cudnn" / "lib", False, True),
        (older / "cublas" / "lib", True, False),
        (older / "curand" / "lib", True, False),
    ]
    assert cuda_library_dirs([venv, venv]) == found[:2]  # a folder listed twice is loaded once


def test_a_session_that_fell_back_to_the_cpu_is_refused():
    check_providers("CUDAExecutionProvider", ["CUDAExecutionProvider", "CPUExecutionProvider"])
    check_providers("CPUExecutionProvider", ["CPUExecutionProvider"])
    with pytest.raises(ProviderUnavailable, match="CUDAExecutionProvider is not active"):
        check_providers("CUDAExecutionProvider", ["CPUExecutionProvider"])
    with pytest.raises(ProviderUnavailable):
        check_providers("CUDAExecutionProvider", [])
