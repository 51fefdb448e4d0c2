"""An engine runs only where it fits: backend version, CPU ISA, GPU compute capability."""

import os
import subprocess
import sys

import pytest

from plansmith.manifest import Manifest
from plansmith_runtime.compatibility import Machine, problems


def manifest(**overrides) -> Manifest:
    raw = {"key": "k", "backend": "onnxruntime", "backendVersion": "1.20.0",
           "target": {"device": "cpu", "cpuIsa": "x86_64-avx2"}, "precision": "fp32", "buildOptions": {},
           "source": {"uri": "file:///m.onnx", "sha256": "0" * 64}, "inputs": [], "outputs": [], "maxBatchSize": 8,
           "artifacts": [], "buildSeconds": 1, "builderVersion": "0", "createdAt": "now"}
    raw.update(overrides)
    return Manifest.model_validate(raw)


CPU = Machine(arch="x86_64", cpu_flags=frozenset({"sse4_2", "avx", "avx2"}), backend_versions={"onnxruntime": "1.22.1"})


def test_cpu_engine_runs_on_a_cpu_with_its_isa():
    assert problems(manifest(), CPU) == []
    assert problems(manifest(target={"device": "cpu", "cpuIsa": "x86_64-generic"}), CPU) == []


def test_cpu_engine_for_a_wider_isa_is_refused():
    found = problems(manifest(target={"device": "cpu", "cpuIsa": "x86_64-avx512_vnni"}), CPU)
    assert found == ["engine is optimized for x86_64-avx512_vnni, this CPU lacks avx512_vnni"]


def test_other_architecture_is_refused():
    assert "architecture aarch64" in problems(manifest(target={"device": "cpu", "cpuIsa": "aarch64-sve"}), CPU)[0]


def test_older_onnxruntime_than_the_builder_is_refused():
    assert "older" in problems(manifest(backendVersion="1.30.0"), CPU)[0]


def test_tensorrt_needs_the_same_version_and_compute_capability():
    gpu = Machine(arch="x86_64", gpu_compute_capabilities=("9.0",), backend_versions={"tensorrt": "10.3.0"})
    trt = {"backend": "tensorrt", "backendVersion": "10.3.0", "target": {"device": "gpu", "computeCapability": "9.0"}}
    assert problems(manifest(**trt), gpu) == []
    assert "TensorRT 10.1.0" in problems(manifest(**{**trt, "backendVersion": "10.1.0"}), gpu)[0]
    wrong_gpu = {**trt, "target": {"device": "gpu", "computeCapability": "8.6"}}
    assert problems(manifest(**wrong_gpu), gpu) == ["engine is built for compute capability 8.6, this GPU has 9.0"]
    ampere_plus = {**trt, "target": {"device": "gpu", "computeCapability": "8.6", "hardwareCompatibility": "ampere+"}}
    assert problems(manifest(**ampere_plus), gpu) == []
    turing = Machine(arch="x86_64", gpu_compute_capabilities=("7.5",), backend_versions={"tensorrt": "10.3.0"})
    assert "Ampere or newer" in problems(manifest(**ampere_plus), turing)[0]


def test_gpu_engine_without_a_gpu_or_backend_is_refused():
    found = problems(manifest(backend="tensorrt", backendVersion="10.3.0",
                              target={"device": "gpu", "computeCapability": "9.0"}), CPU)
    assert any("not installed" in p for p in found) and any("none is visible" in p for p in found)


def test_simulated_gpu_engine_runs_on_the_cpu_it_was_built_for():
    """`plansmith build --simulated-gpu`: keyed for a GPU type, built for (and recorded as) the CPU."""
    simulated = manifest(target={"device": "gpu", "computeCapability": "9.0",
                                 "executionProvider": "CPUExecutionProvider", "cpuIsa": "x86_64-avx2"})
    assert problems(simulated, CPU) == []
    wider = manifest(target={"device": "gpu", "computeCapability": "9.0",
                             "executionProvider": "CPUExecutionProvider", "cpuIsa": "x86_64-avx512f"})
    assert "avx512f" in problems(wider, CPU)[0]


def test_the_gpu_that_counts_is_cuda_device_0_the_one_the_executors_use():
    """A machine (or pod) with GPUs of two kinds: the engine must fit the first CUDA device, the one
    it will run on; another visible GPU that fits does not make it run there."""
    trt = {"backend": "tensorrt", "backendVersion": "10.3.0", "target": {"device": "gpu", "computeCapability": "9.0"}}
    hopper_first = Machine(arch="x86_64", gpu_compute_capabilities=("9.0", "7.5"), backend_versions={"tensorrt": "10.3.0"})
    turing_first = Machine(arch="x86_64", gpu_compute_capabilities=("7.5", "9.0"), backend_versions={"tensorrt": "10.3.0"})
    assert problems(manifest(**trt), hopper_first) == []
    assert problems(manifest(**trt), turing_first) == [
        "engine is built for compute capability 9.0, the GPU it would run on (CUDA device 0) has 7.5"]
    ampere_plus = {**trt, "target": {"device": "gpu", "computeCapability": "8.6", "hardwareCompatibility": "ampere+"}}
    assert problems(manifest(**ampere_plus), hopper_first) == []
    assert "(CUDA device 0) has compute capability 7.5" in problems(manifest(**ampere_plus), turing_first)[0]


class StandInCudaRuntime:
    """cuda.bindings.runtime's device queries, for `devices` compute capabilities, or `error`."""

    class cudaDeviceAttr:
        cudaDevAttrComputeCapabilityMajor, cudaDevAttrComputeCapabilityMinor = 75, 76

    def __init__(self, devices: list[tuple[int, int]], error: int = 0) -> None:
        self.devices, self.error = devices, error

    def cudaGetDeviceCount(self):
        return (self.error, 0 if self.error else len(self.devices))

    def cudaDeviceGetAttribute(self, attribute, device):
        return (0, self.devices[device][0 if attribute == 75 else 1])


def test_this_machines_gpus_come_from_cuda_in_its_order_else_from_nvml(monkeypatch):
    from plansmith_runtime import compatibility
    from plansmith_runtime.executors import cuda

    monkeypatch.setattr(compatibility, "nvml_compute_capabilities", lambda: ("8.0", "8.0"))
    monkeypatch.setattr(cuda, "cuda_runtime", lambda: StandInCudaRuntime([(7, 5), (9, 0)]))
    assert compatibility.gpu_compute_capabilities() == ("7.5", "9.0")
    monkeypatch.setattr(cuda, "cuda_runtime", lambda: StandInCudaRuntime([], error=100))  # cudaErrorNoDevice
    assert compatibility.gpu_compute_capabilities() == ()  # CUDA can use none: NVML's list does not count

    def no_cuda_python():
        raise cuda.CudaUnavailable("cuda-python is not installed")

    monkeypatch.setattr(cuda, "cuda_runtime", no_cuda_python)
    assert compatibility.gpu_compute_capabilities() == ("8.0", "8.0")


def nvml_gpus() -> int:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return 0
    try:
        return pynvml.nvmlDeviceGetCount()
    finally:
        pynvml.nvmlShutdown()


@pytest.mark.skipif(nvml_gpus() == 0, reason="needs a GPU and its driver (run on the lent GPU machine, "
                    "docs/benchmarks.md says how)")
def test_on_a_gpu_cuda_lists_its_gpus_and_cuda_visible_devices_hides_them():
    """Through the real CUDA runtime: what NVML sees, in a process free to use every GPU, and none in
    one whose CUDA_VISIBLE_DEVICES is empty (an engine for this GPU is refused there)."""
    from plansmith_runtime import compatibility

    def listed(visible: str | None) -> list[str]:
        environment = {name: value for name, value in os.environ.items() if name != "CUDA_VISIBLE_DEVICES"}
        if visible is not None:
            environment["CUDA_VISIBLE_DEVICES"] = visible
        code = "from plansmith_runtime.compatibility import gpu_compute_capabilities as g; print(','.join(g()))"
        result = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True, check=True)
        return [cc for cc in result.stdout.strip().split(",") if cc]

    everything = listed(None)
    assert sorted(everything) == sorted(compatibility.nvml_compute_capabilities()) and everything
    assert listed("0") == everything[:1]
    assert listed("") == []
