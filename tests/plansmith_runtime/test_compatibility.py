"""An engine runs only where it fits: backend version, CPU ISA, GPU compute capability."""

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
